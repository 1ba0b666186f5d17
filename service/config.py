"""Settings, read once from the environment.

`Settings.from_env()` is the only reader of `os.environ` in the package. A missing or
malformed value stops start-up with a `ConfigError` naming the variable.
"""

import os
import urllib.parse
from collections.abc import Mapping

import msgspec

# The event log has 32 day partitions (sql/014_event_log.sql).
MAX_LOG_RETENTION_DAYS = 30


class ConfigError(Exception):
    """A variable is missing or malformed; the message names it."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str
    redis_url: str
    jwt_secret: str
    # REDIS_URL names any node of a Redis Cluster: sharded pub/sub, hash-tagged keys.
    redis_cluster: bool = False
    port: int = 8000
    # Pools
    db_pool_min: int = 2
    db_pool_max: int = 10
    redis_max_connections: int = 200
    db_timeout: float = 4.0
    # Rules
    rate_limit_per_minute: int = 60
    idempotency_hours: int = 24
    # Under load (500 to 2,000 sends a second on this process: send_linger_gaps), a send
    # waits up to SEND_LINGER s for others to share its round trips to Redis and
    # PostgreSQL, or until sends stop coming (0: never waits).
    send_linger: float = 0.004
    # Sends wait (SEND_LINGER) while they come this far apart on a process, on average (s):
    # 500 to 2,000 a second. Slower, a send is worth its own round trips; faster, batches
    # fill while the previous one is out. Not read from the environment.
    send_linger_gaps: tuple[float, float] = (1 / 2000, 1 / 500)
    # How long a process trusts a relationship row it read (0: read it on every request).
    relationship_cache_ttl: float = 5.0
    # Redis names
    channel_prefix: str = "gestures:"
    presence_prefix: str = "gesture-presence:"
    # Presence: each process beats every presence_ttl / 6 s; a dead one stops counting
    # within presence_ttl.
    presence_ttl: float = 30.0
    presence_grace: float = 3.0
    # What uvicorn's command line carries (see `uvicorn_options`): the app can neither refuse
    # an extension uvicorn negotiated nor ping below the ASGI interface.
    ws_per_message_deflate: bool = False
    ws_ping_interval: float = 30.0  # 0: no protocol pings
    ws_ping_timeout: float = 20.0
    # WebSocket gateway
    ws_queue_size: int = 256
    # Pending gestures sent on connect, oldest first; the rest stay readable over HTTP.
    ws_greeting_limit: int = 100
    ws_max_frame: int = 16 * 1024
    shutdown_timeout: float = 10.0
    # Garbage collection (service.heap): survivors frozen once a GC_FREEZE_INTERVAL
    # (0: CPython's own collector, untouched), a full collection once a GC_SWEEP_INTERVAL.
    gc_freeze_interval: float = 1.0
    gc_sweep_interval: float = 3600.0
    # The event log (service.bus): each process beats and re-publishes what Redis missed
    # every RELAY_INTERVAL s; a process whose beat is NODE_TTL s old is taken over.
    relay_interval: float = 1.0
    node_ttl: float = 15.0
    # Event streams: EVENT_STREAMS partitions (0: none, to measure what they cost), entries
    # kept EVENT_STREAM_RETENTION s; the
    # log in PostgreSQL keeps events EVENT_LOG_RETENTION_DAYS days (1 to 30).
    event_streams: int = 16
    event_stream_retention: int = 86400
    event_log_retention_days: int = 7
    # Suggested notes: a per-sender limit, and the optional OpenAI-compatible provider
    # (unset URL: the built-in composer answers, with no network at all).
    suggestion_rate_limit_per_minute: int = 20
    suggestion_provider_url: str = ""
    suggestion_provider_model: str = ""
    suggestion_provider_key: str = ""
    suggestion_provider_timeout: float = 3.0

    def __repr__(self) -> str:
        # Settings may end up in a log line or a traceback: never with a secret in them.
        shown = {
            f: ("<hidden>" if f in _SECRET_FIELDS and getattr(self, f) else getattr(self, f))
            for f in self.__struct_fields__
        }
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


_SECRET_FIELDS = {"jwt_secret", "suggestion_provider_key"}
# The longest wait SEND_LINGER may ask for, in seconds.
MAX_SEND_LINGER = 0.1


def boolean(raw: str) -> bool:
    """`true`/`false` (also 1/0, yes/no, on/off); ValueError otherwise."""
    match raw.strip().lower():
        case "true" | "1" | "yes" | "on":
            return True
        case "false" | "0" | "no" | "off":
            return False
    raise ValueError(raw)


# name in the environment -> (field, parser)
_VARIABLES: dict[str, tuple[str, object]] = {
    "DATABASE_URL": ("database_url", str),
    "REDIS_URL": ("redis_url", str),
    "JWT_SECRET": ("jwt_secret", str),
    "REDIS_CLUSTER": ("redis_cluster", boolean),
    "PORT": ("port", int),
    "DB_POOL_MIN": ("db_pool_min", int),
    "DB_POOL_MAX": ("db_pool_max", int),
    "REDIS_MAX_CONNECTIONS": ("redis_max_connections", int),
    "DB_TIMEOUT": ("db_timeout", float),
    "RATE_LIMIT_PER_MINUTE": ("rate_limit_per_minute", int),
    "IDEMPOTENCY_HOURS": ("idempotency_hours", int),
    "SEND_LINGER": ("send_linger", float),
    "RELATIONSHIP_CACHE_TTL": ("relationship_cache_ttl", float),
    "CHANNEL_PREFIX": ("channel_prefix", str),
    "PRESENCE_PREFIX": ("presence_prefix", str),
    "PRESENCE_TTL": ("presence_ttl", float),
    "PRESENCE_GRACE": ("presence_grace", float),
    "WS_PER_MESSAGE_DEFLATE": ("ws_per_message_deflate", boolean),
    "WS_PING_INTERVAL": ("ws_ping_interval", float),
    "WS_PING_TIMEOUT": ("ws_ping_timeout", float),
    "WS_QUEUE_SIZE": ("ws_queue_size", int),
    "WS_GREETING_LIMIT": ("ws_greeting_limit", int),
    "SHUTDOWN_TIMEOUT": ("shutdown_timeout", float),
    "GC_FREEZE_INTERVAL": ("gc_freeze_interval", float),
    "GC_SWEEP_INTERVAL": ("gc_sweep_interval", float),
    "RELAY_INTERVAL": ("relay_interval", float),
    "NODE_TTL": ("node_ttl", float),
    "EVENT_STREAMS": ("event_streams", int),
    "EVENT_STREAM_RETENTION": ("event_stream_retention", int),
    "EVENT_LOG_RETENTION_DAYS": ("event_log_retention_days", int),
    "SUGGESTION_RATE_LIMIT_PER_MINUTE": ("suggestion_rate_limit_per_minute", int),
    "SUGGESTION_PROVIDER_URL": ("suggestion_provider_url", str),
    "SUGGESTION_PROVIDER_MODEL": ("suggestion_provider_model", str),
    "SUGGESTION_PROVIDER_KEY": ("suggestion_provider_key", str),
    "SUGGESTION_PROVIDER_TIMEOUT": ("suggestion_provider_timeout", float),
}
_ZERO_ALLOWED = {
    "RELATIONSHIP_CACHE_TTL",
    "WS_PING_INTERVAL",
    "GC_FREEZE_INTERVAL",
    "EVENT_STREAMS",
    "SEND_LINGER",
}
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
                raise ConfigError(f"{name} is not set: set it to {_REQUIRED[name]}")
            continue
        try:
            value = parser(raw)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(parser, "true or false")
            raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
        if parser in (int, float) and (value < 0 or (value == 0 and name not in _ZERO_ALLOWED)):
            raise ConfigError(f"{name} must be positive, got {raw!r}")
        values[field] = value
    url = str(values.get("suggestion_provider_url", ""))
    if url:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"SUGGESTION_PROVIDER_URL must be an http(s) URL, got {url!r}")
        if not values.get("suggestion_provider_model"):
            raise ConfigError(
                "SUGGESTION_PROVIDER_MODEL is not set: the model to ask when "
                "SUGGESTION_PROVIDER_URL is set, e.g. gpt-4o-mini"
            )
    settings = Settings(**values)
    if settings.event_log_retention_days > MAX_LOG_RETENTION_DAYS:
        # The log's 32 day partitions are reused in turn: today's, tomorrow's and the
        # retained days must all have one of their own.
        raise ConfigError(
            f"EVENT_LOG_RETENTION_DAYS must be at most {MAX_LOG_RETENTION_DAYS}, "
            f"got {settings.event_log_retention_days}"
        )
    if settings.send_linger > MAX_SEND_LINGER:
        # Seconds, not milliseconds: a send held for seconds would outlast its timeouts.
        raise ConfigError(
            f"SEND_LINGER must be at most {MAX_SEND_LINGER} (seconds), got {settings.send_linger}"
        )
    if settings.channel_prefix.startswith(settings.presence_prefix):
        # The gateway reads a channel under PRESENCE_PREFIX as presence: every event would
        # be taken for one, fail to decode, and be dropped.
        raise ConfigError(
            f"CHANNEL_PREFIX must not start with PRESENCE_PREFIX, got "
            f"{settings.channel_prefix!r} and {settings.presence_prefix!r}"
        )
    return settings


def uvicorn_options(settings: Settings) -> dict[str, object]:
    """The settings that only the server can apply, as `uvicorn.Config` keywords.

    uvicorn negotiates permessage-deflate with every client that offers it (browsers always
    do) unless told not to, and sends protocol pings itself; the ASGI app sees neither. So
    every way the project starts uvicorn passes these: `cli.uvicorn_command` for the dev
    command, the bench and the tests, and the same flags spelled in shell in the Procfile
    and the image (`${WS_PER_MESSAGE_DEFLATE:-false}` and so on).
    """
    return {
        "ws_per_message_deflate": settings.ws_per_message_deflate,
        "ws_ping_interval": settings.ws_ping_interval or None,
        "ws_ping_timeout": settings.ws_ping_timeout,
    }


def describe_url(url: str) -> str:
    """`host:port/path` of a DSN or URL, without its user or password, for messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "localhost"
        where = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "(an unreadable URL)"
    return f"{where}{parts.path}" if parts.path not in ("", "/") else where
