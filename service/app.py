"""`create_app(settings)`: the lifespan and the wiring. The only module that knows every part.

The lifespan owns every resource: the PostgreSQL pool, the Redis clients, the hub and the
background tasks (group commits, outbox publisher and relay, presence heartbeats, the
pub/sub subscriber). A background task that dies makes `/readyz` answer 503 and is logged;
none dies silently. On shutdown the gateway's sockets close with 1012, this process's
presence entries are dropped, pending delivery marks and events are flushed.
"""

import asyncio
import contextlib
import logging
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator

import httpx
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.websockets import WebSocket

from . import __version__, api, bus, config, heap, logs, metrics, store
from .auth import Verifier
from .bus import Publisher
from .gateway import Gateway
from .gestures import Gestures
from .hub import Hub
from .presence import Presence
from .suggestions import Suggester

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A fault at start that the operator fixes (a setting, a server that is not there, the
    schema): logged as one line that names it and says what to do, without a traceback, and
    uvicorn exits non-zero. Anything else that fails at start keeps its traceback."""


class MissingMigrations(StartupError):
    pass


def create_app(settings: config.Settings | None = None) -> Starlette:
    logs.configure()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict]:
        nonlocal settings
        try:
            try:
                settings = settings or config.from_env()
            except config.ConfigError as exc:
                raise StartupError(f"cannot start: {exc}") from None
            pool = await _connect_postgres(settings)
        except StartupError as exc:
            _refuse_start(app, exc)
            raise
        try:
            async with store.connection(pool) as conn:
                missing = await store.missing_migrations(conn)
            if missing:
                raise MissingMigrations(
                    f"cannot start: the database lacks migrations {', '.join(missing)}: "
                    "run `python -m service migrate` first"
                )
            await _check_redis(settings)
            async with _resources(settings, pool) as state:
                log.info("ready", extra={"pid": os.getpid(), "node": state["node"]})
                yield state
        except StartupError as exc:
            _refuse_start(app, exc)
            raise
        finally:
            await pool.close()

    return App(
        routes=api.routes(),
        lifespan=lifespan,
        exception_handlers={HTTPException: api.http_exception},
    )


def _refuse_start(app: Starlette, exc: StartupError) -> None:
    log.error("%s", exc)
    app.refused_start = True  # so that `App` keeps the traceback out of uvicorn's log


async def _connect_postgres(settings: config.Settings) -> store.Pool:
    where = config.describe_url(settings.database_url)
    try:
        return await store.create_pool(
            settings.database_url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            timeout=settings.db_timeout,
        )
    except Exception as exc:
        # Only connecting can fail here: a refused connection, a timeout, a wrong password
        # or database name. Each is the operator's to fix, and its cause is enough to.
        cause = exc.__cause__ or exc
        raise StartupError(
            f"cannot start: PostgreSQL at {where} is unreachable ({_cause(cause)}): "
            "check DATABASE_URL and that the server is running"
        ) from None


async def _check_redis(settings: config.Settings) -> None:
    """Redis is pinged once at start, so that a wrong REDIS_URL stops the process at once
    rather than leaving it up and undeliverable; after that its outages are survived."""
    client = bus.redis_client(settings.redis_url, cluster=settings.redis_cluster, max_connections=2)
    try:
        async with asyncio.timeout(5.0):
            await client.ping()
    except (*bus.REDIS_ERRORS, TimeoutError) as exc:
        raise StartupError(
            f"cannot start: Redis at {config.describe_url(settings.redis_url)} is unreachable "
            f"({_cause(exc)}): check REDIS_URL and that the server is running"
        ) from None
    finally:
        await bus.close_client(client)


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class App(Starlette):
    """The routes, with `/ws` taken before Starlette's middleware and router: a socket's
    task then waits in the gateway's read loop alone, not under a dozen frames of wrappers
    that have nothing to do for a WebSocket (they only act on HTTP requests and exceptions
    the gateway handles itself), which is memory per idle socket and CPU per connect.
    The API's endpoints without a path parameter are taken the same way when a request
    names one exactly (`api.direct_routes`): each maps its own errors, so the wrappers had
    nothing to do for them either."""

    refused_start = False
    direct = api.direct_routes()

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await super().__call__(scope, receive, self._quiet_refusal(send))
            return
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]  # the route's path, as Starlette's router reads it
        if kind == "http":
            endpoint = self.direct.get((scope["method"], path))
            if endpoint is not None:
                scope["app"] = self
                response = await endpoint(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        elif kind == "websocket" and path == "/ws":
            gateway: Gateway = scope["state"]["gateway"]
            await gateway.endpoint(WebSocket(scope, receive, send))
            return
        await super().__call__(scope, receive, send)

    def _quiet_refusal(self, send):
        """Starlette reports a failed start to the server with the traceback's text, which
        uvicorn logs; a refusal already logged its one line, so the text goes."""

        async def quiet(message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.refused_start:
                message = {**message, "message": ""}
            await send(message)

        return quiet


@contextlib.asynccontextmanager
async def _resources(settings: config.Settings, pool: store.Pool) -> AsyncIterator[dict]:
    node = uuid.uuid4().hex[:12]
    redis = bus.redis_client(
        settings.redis_url,
        cluster=settings.redis_cluster,
        max_connections=settings.redis_max_connections,
    )
    hub = Hub()
    publisher = Publisher(
        redis,
        pool,
        channel_prefix=settings.channel_prefix,
        event_streams=settings.event_streams,
        stream_retention=settings.event_stream_retention,
        relay_interval=settings.relay_interval,
        node_ttl=settings.node_ttl,
        idempotency_hours=settings.idempotency_hours,
        log_retention_days=settings.event_log_retention_days,
        identity=(socket.gethostname(), _listening_port(settings), __version__),
        sockets=lambda: len(hub),
    )
    await publisher.register()
    presence = Presence(
        redis,
        prefix=settings.presence_prefix,
        node=node,
        ttl=settings.presence_ttl,
        grace=settings.presence_grace,
        publish_command="SPUBLISH" if settings.redis_cluster else "PUBLISH",
    )
    # Only when a provider is configured: otherwise suggestions never touch the network.
    provider_http = (
        httpx.AsyncClient(
            timeout=settings.suggestion_provider_timeout,
            limits=httpx.Limits(max_connections=20),
            follow_redirects=False,
        )
        if settings.suggestion_provider_url
        else None
    )
    suggester = Suggester(
        provider_http,
        url=settings.suggestion_provider_url,
        model=settings.suggestion_provider_model,
        key=settings.suggestion_provider_key,
        timeout=settings.suggestion_provider_timeout,
    )
    gestures = Gestures(
        settings,
        pool,
        redis,
        publisher,
        presence,
        settings.relationship_cache_ttl,
        suggester,
    )
    verifier = Verifier(settings.jwt_secret)
    gateway = Gateway(
        settings,
        gestures,
        presence,
        hub,
        lambda on_message, on_resubscribed: bus.subscriber(
            redis,
            settings.redis_url,
            node_channel=f"{settings.presence_prefix}node:{node}",
            on_message=on_message,
            on_resubscribed=on_resubscribed,
        ),
        verifier,
    )
    tasks = {
        "publisher": publisher.run,
        "gestures": gestures.run,
        "presence": presence.run,
        "subscriber": gateway.subscriber.run,
        "access": gateway.watch_access,
    }
    if settings.gc_freeze_interval > 0:
        tasks["heap"] = lambda: heap.keep_pauses_short(
            settings.gc_freeze_interval, settings.gc_sweep_interval
        )
    running = {name: asyncio.create_task(run(), name=name) for name, run in tasks.items()}
    for task in running.values():
        task.add_done_callback(_report_death)

    async def readiness() -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            await store.ping(pool)
            checks["postgres"] = "ok"
        except Exception:
            checks["postgres"] = "unavailable"
        try:
            async with asyncio.timeout(2.0):
                await redis.ping()
            checks["redis"] = "ok"
        except Exception:
            checks["redis"] = "unavailable"
        dead = [name for name, task in running.items() if task.done()]
        checks["tasks"] = "ok" if not dead else f"stopped: {', '.join(dead)}"
        return checks

    async def sample_metrics() -> None:
        """Gauges read at scrape time rather than kept up to date on every change."""
        in_use, size, most = store.pool_usage(pool)  # before the scrape borrows one below
        metrics.DB_POOL_IN_USE.set(in_use)
        metrics.DB_POOL_SIZE.set(size)
        metrics.DB_POOL_MAX.set(most)
        try:
            async with asyncio.timeout(1.0), store.connection(pool, 1.0) as conn:
                waiting, oldest = await store.outbox_backlog(conn, 2 * settings.relay_interval + 1)
        except Exception:
            waiting = oldest = float("nan")  # unknown, rather than a stale figure
        metrics.OUTBOX_WAITING.set(waiting)
        metrics.OUTBOX_OLDEST_SECONDS.set(oldest)
        await _sample_streams(redis, settings)

    try:
        yield {
            "settings": settings,
            "gestures": gestures,
            "gateway": gateway,
            "readiness": readiness,
            "sample_metrics": sample_metrics,
            "verify": verifier,
            "openapi": msgspec.json.encode(api.openapi()),
            "node": node,
            # Called by service.wsserver.WSProtocol when the server starts closing its
            # sockets, before the lifespan's shutdown: sockets then skip their one-by-one
            # clean-up, which `_shutdown` does for all of them at once.
            "server_stopping": gateway.stop_accepting,
        }
    finally:
        await _shutdown(settings, gateway, presence, gestures, publisher, running)
        await gateway.subscriber.aclose()  # again, if the shutdown failed before it
        if provider_http is not None:
            await provider_http.aclose()
        await bus.close_client(redis)


def _listening_port(settings: config.Settings) -> int | None:
    """The port this process serves, for `status`: uvicorn's `--port` (the Procfile passes
    $PORT there), else PORT; None when started some other way (the app cannot ask uvicorn)."""
    argv = sys.argv
    for i, arg in enumerate(argv[:-1]):
        if arg == "--port" and argv[i + 1].isdigit():
            return int(argv[i + 1])
    for arg in argv:
        if arg.startswith("--port=") and arg[7:].isdigit():
            return int(arg[7:])
    return settings.port if os.environ.get("PORT") else None


async def _sample_streams(redis: bus.Client, settings: config.Settings) -> None:
    gauges = (
        metrics.STREAM_LENGTH,
        metrics.GROUP_LAG,
        metrics.GROUP_PENDING,
        metrics.DEAD_LETTERS,
        metrics.GROUP_CATCHUPS,
        metrics.GROUP_DEAD_LETTERED,
    )
    for gauge in gauges:
        gauge.clear()  # a group that went away stops being reported
    try:
        async with asyncio.timeout(1.0):
            report = await bus.stream_report(redis, settings.channel_prefix, settings.event_streams)
            groups = {g.name for p in report for g in p.groups}
            counts = await bus.consumer_counts(redis, settings.channel_prefix, groups)
    except Exception:
        return  # Redis away: no figures rather than stale ones
    for p in report:
        label = str(p.partition)
        metrics.STREAM_LENGTH.labels(label).set(p.length)
        metrics.DEAD_LETTERS.labels(label).set(p.dead_letters)
        for g in p.groups:
            if g.lag is not None:
                metrics.GROUP_LAG.labels(g.name, label).set(g.lag)
            metrics.GROUP_PENDING.labels(g.name, label).set(g.pending)
    for name, found in counts.items():
        metrics.GROUP_CATCHUPS.labels(name).set(found.get("catchups", 0))
        metrics.GROUP_DEAD_LETTERED.labels(name).set(found.get("dead_letters", 0))


async def _shutdown(settings, gateway, presence, gestures, publisher, running) -> None:
    try:
        async with asyncio.timeout(settings.shutdown_timeout):
            await gateway.shutdown()
            # No socket is left to tell: unsubscribe before dropping our presence entries,
            # or every partner's "offline" would come back to this process to be routed.
            await _stop(running.pop("subscriber"))
            await gateway.subscriber.aclose()
            await presence.close()
            await gestures.flush_deliveries()
            await publisher.flush()
    except Exception:
        log.exception("shutdown did not finish cleanly")
    for task in running.values():
        task.remove_done_callback(_report_death)
    # Bounded: a cancellation swallowed below us (seen with redis-py's pipeline while the
    # outbox relay publishes) must not keep the process from exiting.
    stuck = await bus.cancel_until_done(list(running.values()), 2.0)
    for task in stuck:
        log.error("background task did not stop when cancelled", extra={"task": task.get_name()})
    log.info("stopped", extra={"pid": os.getpid()})


async def _stop(task: asyncio.Task) -> None:
    """Cancel one background task and wait (at most 2 s) until it ended."""
    task.remove_done_callback(_report_death)
    await bus.cancel_until_done([task], 2.0)


def _report_death(task: asyncio.Task) -> None:
    if task.cancelled():
        log.error("background task cancelled", extra={"task": task.get_name()})
    elif task.exception() is not None:
        log.error(
            "background task died; /readyz now answers 503",
            exc_info=task.exception(),
            extra={"task": task.get_name()},
        )


app = create_app()
