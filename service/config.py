"""Settings, read once from the environment.

`Settings.from_env()` is the only reader of `os.environ` in the package. A missing or
malformed value stops start-up with a `ConfigError` naming the variable.
"""

import os
from collections.abc import Mapping

import msgspec


class ConfigError(Exception):
    """A variable is missing or malformed; the message names it."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str
    redis_url: str
    jwt_secret: str
    port: int = 8000
    # Pools
    db_pool_min: int = 2
    db_pool_max: int = 10
    redis_max_connections: int = 200
    db_timeout: float = 4.0
    # Rules
    rate_limit_per_minute: int = 60
    idempotency_hours: int = 24
    # How long a process trusts a relationship row it read (0: read it on every request).
    relationship_cache_ttl: float = 5.0
    # Redis names
    channel_prefix: str = "gestures:"
    presence_prefix: str = "gesture-presence:"
    # Presence: a process refreshes its entries every presence_ttl / 3 seconds.
    presence_ttl: float = 30.0
    presence_grace: float = 3.0
    # WebSocket gateway
    ws_queue_size: int = 256
    ws_idle_timeout: float = 75.0
    ws_max_frame: int = 16 * 1024
    # Pending gestures sent on connect, oldest first; the rest stay readable over HTTP.
    ws_greeting_limit: int = 100
    shutdown_timeout: float = 10.0
    # Outbox relay: how often, and how old a row must be before the relay takes it.
    relay_interval: float = 1.0
    relay_min_age: float = 2.0


# name in the environment -> (field, parser)
_VARIABLES: dict[str, tuple[str, type]] = {
    "DATABASE_URL": ("database_url", str),
    "REDIS_URL": ("redis_url", str),
    "JWT_SECRET": ("jwt_secret", str),
    "PORT": ("port", int),
    "DB_POOL_MIN": ("db_pool_min", int),
    "DB_POOL_MAX": ("db_pool_max", int),
    "REDIS_MAX_CONNECTIONS": ("redis_max_connections", int),
    "DB_TIMEOUT": ("db_timeout", float),
    "RATE_LIMIT_PER_MINUTE": ("rate_limit_per_minute", int),
    "IDEMPOTENCY_HOURS": ("idempotency_hours", int),
    "RELATIONSHIP_CACHE_TTL": ("relationship_cache_ttl", float),
    "CHANNEL_PREFIX": ("channel_prefix", str),
    "PRESENCE_PREFIX": ("presence_prefix", str),
    "PRESENCE_TTL": ("presence_ttl", float),
    "PRESENCE_GRACE": ("presence_grace", float),
    "WS_QUEUE_SIZE": ("ws_queue_size", int),
    "WS_IDLE_TIMEOUT": ("ws_idle_timeout", float),
    "WS_GREETING_LIMIT": ("ws_greeting_limit", int),
    "SHUTDOWN_TIMEOUT": ("shutdown_timeout", float),
    "RELAY_INTERVAL": ("relay_interval", float),
    "RELAY_MIN_AGE": ("relay_min_age", float),
}
_ZERO_ALLOWED = {"RELATIONSHIP_CACHE_TTL"}
_REQUIRED = {
    "DATABASE_URL": "the PostgreSQL DSN, e.g. postgresql://user@host:5432/db",
    "REDIS_URL": "the Redis URL, e.g. redis://127.0.0.1:6379/0",
    "JWT_SECRET": "the HS256 key that signs tokens (any long random string)",
}


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings; raise ConfigError naming the first bad variable."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name, (field, parser) in _VARIABLES.items():
        raw = env.get(name)
        if raw is None or raw == "":
            if name in _REQUIRED:
                raise ConfigError(f"{name} is not set: {_REQUIRED[name]}")
            continue
        try:
            value = parser(raw)
        except ValueError:
            kind = "an integer" if parser is int else "a number"
            raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
        if parser is not str and (value < 0 or (value == 0 and name not in _ZERO_ALLOWED)):
            raise ConfigError(f"{name} must be positive, got {raw!r}")
        values[field] = value
    return Settings(**values)
