"""`python -m bench chaos [--quick] [--out FILE]`: break the servers under load, then count.

Starts a PostgreSQL and a Redis of its own (temporary, on free loopback ports, so that
restarting them disturbs nothing else on the machine), each behind a TCP proxy of this
process, migrates, and starts three service processes the way the Procfile does. A load
process (`bench/chaos_load.py`) runs couples that send, receive and acknowledge over HTTP and
WebSocket. While it runs, at times printed as they happen:

1. `kill -9` of a service process, started again on its port;
2. Redis restarted (the services' proxy cut first, so this process's own subscriber, which
   talks to Redis directly, is subscribed again before any service can publish);
3. PostgreSQL cut for a few seconds at the proxy (new connections refused, open ones dropped);
4. SIGTERM of another service process, started again on its port.

Two replicas of a consumer group (`python -m service consume`) read the event streams
throughout. Then every partner connects, the outbox drains, and the run reconciles what
clients were told against PostgreSQL, against every event its own subscriber saw on the
relationship channels (`gestures:<id>`), and every event of the log against what the
consumer group printed. It prints a table, writes every figure to a JSON file, and exits 1
when anything was lost, doubled or unserved. Bounded in time; talks to 127.0.0.1 only.
"""

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .infra import ROOT, Gen, Service, free_port, raise_nofile
from .report import percentiles, table


@dataclass
class Plan:
    quick: bool
    couples: int = 40
    intermittent_share: float = 0.3
    send_interval: float = 3.0  # mean seconds between two gestures of one partner
    ws_share: float = 0.5
    resend_share: float = 0.1
    ack_share: float = 0.7
    send_back_share: float = 0.35
    race_share: float = 0.15
    retry_window: float = 40.0
    offline_s: tuple = (4.0, 9.0)
    # seconds after the load starts: (fault, at)
    faults: list = field(
        default_factory=lambda: [
            ("kill -9", 20.0),
            ("redis restart", 60.0),
            ("postgres cut", 100.0),
            ("sigterm", 140.0),
        ]
    )
    redis_down_s: float = 2.0
    pg_cut_s: float = 6.0
    tail_s: float = 30.0  # load after the last fault's recovery
    deadline_s: float = 900.0  # the whole run, hard

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            couples=16,
            retry_window=25.0,
            faults=[
                ("kill -9", 6.0),
                ("redis restart", 15.0),
                ("postgres cut", 24.0),
                ("sigterm", 35.0),
            ],
            pg_cut_s=4.0,
            tail_s=8.0,
            deadline_s=300.0,
        )


# ---------------------------------------------------------------------------- servers


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as the postgres user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _pg_bin() -> Path:
    env = os.environ.get("CHAOS_PG_BIN")
    if env:
        return Path(env)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
    )
    if not found:
        on_path = shutil.which("initdb")
        if on_path:
            return Path(on_path).parent
        raise RuntimeError(
            "no PostgreSQL binaries: install postgresql (Debian: /usr/lib/postgresql/*/bin) "
            "or set CHAOS_PG_BIN to the directory holding initdb and pg_ctl"
        )
    return found[-1].parent


class Postgres:
    """A throwaway cluster: initdb in a temporary directory, trust auth, 127.0.0.1 only."""

    def __init__(self, tmp: Path) -> None:
        self.bin = _pg_bin()
        self.dir = tmp / "pg"
        self.port = free_port()
        self.dsn = f"postgresql://root@127.0.0.1:{self.port}/chaos"
        self.started = False

    def start(self) -> None:
        self.dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        log = self.dir.parent / "postgres.log"
        log.touch()
        if os.geteuid() == 0:
            shutil.chown(log, "postgres", "postgres")
        data = self.dir / "data"
        subprocess.run(
            _as_postgres(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "root",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
            cwd="/",
        )
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c fsync=off -c max_connections=200"
        )
        subprocess.run(
            _as_postgres(
                [
                    str(self.bin / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-o",
                    opts,
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
            cwd="/",
        )
        self.started = True

        async def create() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.dsn.rsplit("/", 1)[0] + "/postgres", timeout=10)
            try:
                await conn.execute("CREATE DATABASE chaos")
            finally:
                await conn.close()

        asyncio.run(create())

    def stop(self) -> None:
        if self.started:
            subprocess.run(
                _as_postgres(
                    [
                        str(self.bin / "pg_ctl"),
                        "-D",
                        str(self.dir / "data"),
                        "-m",
                        "immediate",
                        "stop",
                    ]
                ),
                capture_output=True,
                timeout=60,
                cwd="/",
            )
            self.started = False


class Redis:
    """A redis-server of this run's own, without persistence, restartable on its port."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = tmp / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.binary = shutil.which("redis-server") or "redis-server"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                str(self.log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        import redis

        deadline = time.time() + 20
        while True:
            try:
                r = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
                r.ping()
                r.close()
                return
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: see {self.log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, as a service manager restarting it would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


# ---------------------------------------------------------------------------- proxies


class TcpProxy:
    """Forwards 127.0.0.1:`port` to a server; `cut()` refuses new connections and drops the
    open ones, `restore()` forwards again on the same port (shaped like the tests' proxy)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()
            self._writers.discard(dst)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        if self._server is None:
            await self.start()


class Observer:
    """Subscribes to every relationship channel on Redis directly (not through the
    services' proxy) and records every event: at least once means each committed change
    shows up here at least once."""

    def __init__(self, url: str, channels: list[str]) -> None:
        self.url = url
        self.channels = channels
        self.events: list[tuple] = []  # (t, event, event_id, gesture_id, channel)
        self.generation = 0  # how many times the subscription was confirmed
        self.garbage = 0

    async def run(self) -> None:
        import redis.asyncio as aioredis

        while True:
            client = aioredis.Redis.from_url(self.url, socket_connect_timeout=0.5)
            pubsub = client.pubsub(ignore_subscribe_messages=False)
            try:
                await pubsub.subscribe(*self.channels)
                confirmed = 0
                async for message in pubsub.listen():
                    kind = message["type"]
                    if kind in ("subscribe", b"subscribe"):
                        confirmed += 1
                        if confirmed == len(self.channels):
                            self.generation += 1
                        continue
                    if kind not in ("message", b"message"):
                        continue
                    channel = message["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else channel
                    try:
                        ev = json.loads(message["data"])
                        self.events.append(
                            (
                                time.time(),
                                ev["event"],
                                ev["event_id"],
                                ev["gesture"]["id"],
                                channel,
                            )
                        )
                    except (ValueError, KeyError, TypeError):
                        self.garbage += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.02)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                    await client.aclose()


class Consumer:
    """A replica of a consumer group, as another service runs it: `python -m service consume`
    on the run's own Redis (directly, as the observer: it lives through the restart, which
    takes the streams with it) and the API of a service process for its catch-ups. What it
    prints, one event a line, goes to a file the run reads at the end."""

    def __init__(self, rig: "Rig", name: str, group: str, api_port: int) -> None:
        self.name = name
        self.out = Path(rig.tmp) / f"consumer-{name}.jsonl"
        self.err = Path(rig.tmp) / f"consumer-{name}.log"
        env = {
            **os.environ,
            "REDIS_URL": rig.redis.url,
            "JWT_SECRET": rig.jwt_secret,
            "EVENTS_API_URL": f"http://127.0.0.1:{api_port}",
        }
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service",
                    "consume",
                    "--group",
                    group,
                    "--consumer",
                    name,
                    "--claim-idle",
                    "5",
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def events(self) -> list[dict]:
        found = []
        for line in self.out.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def stop(self) -> int | None:
        """SIGTERM, as a deploy would; what it printed was acknowledged or stays pending."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


class IoThread:
    """An event loop on a thread of its own for the proxies and the observer, so that the
    orchestrator may block (waiting for a process) without stalling the forwarding."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.tasks: set[asyncio.Task] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro) -> None:
        # The loop holds tasks weakly: keep a reference, or the task may vanish mid-await.
        self.loop.call_soon_threadsafe(lambda: self.tasks.add(self.loop.create_task(coro)))

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(cancel_all(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# ---------------------------------------------------------------------------- the rig


class Rig:
    """Everything the run starts; leaving it stops all of it, by pid, and deletes the
    temporary directory (unless the run failed: its logs are kept then)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.tag = secrets.token_hex(3)
        self.tmp = tempfile.mkdtemp(prefix=f"chaos-{self.tag}-")
        os.chmod(self.tmp, 0o755)  # the postgres user must reach its data directory
        self.pg = Postgres(Path(self.tmp))
        self.redis = Redis(Path(self.tmp))
        self.io: IoThread | None = None
        self.pg_proxy: TcpProxy | None = None
        self.redis_proxy: TcpProxy | None = None
        self.observer: Observer | None = None
        self.jwt_secret = secrets.token_urlsafe(32)
        self.services: dict[str, Service] = {}
        self.ports: dict[str, int] = {}
        self.gens: list[Gen] = []
        self.consumers: list[Consumer] = []
        self.keep_tmp = False

    def __enter__(self) -> "Rig":
        raise_nofile()
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for g in self.gens:
            g.kill()
        for c in self.consumers:
            c.kill()
        for s in self.services.values():
            with contextlib.suppress(Exception):
                if s.proc.poll() is None:
                    os.killpg(s.pid, signal.SIGKILL)
                    s.proc.wait(5)
        if self.io is not None:
            self.io.stop()
        with contextlib.suppress(Exception):
            self.redis.stop()
        with contextlib.suppress(Exception):
            self.pg.stop()
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def service_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DATABASE_URL": self.pg_proxy_dsn,
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_proxy.port}/0",
            "JWT_SECRET": self.jwt_secret,
            "RATE_LIMIT_PER_MINUTE": "100000",
        }

    @property
    def pg_proxy_dsn(self) -> str:
        return f"postgresql://root@127.0.0.1:{self.pg_proxy.port}/chaos"

    def start_servers(self, channels_for) -> list[tuple[str, str, str]]:
        self.pg.start()
        self.redis.start()
        self.io = IoThread()
        self.pg_proxy = TcpProxy(self.pg.port)
        self.redis_proxy = TcpProxy(self.redis.port)
        self.io.call(self.pg_proxy.start())
        self.io.call(self.redis_proxy.start())
        subprocess.run(
            [sys.executable, "-m", "service", "migrate"],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": self.pg.dsn},
            check=True,
            capture_output=True,
            timeout=120,
        )
        rels = self.seed(self.plan.couples)
        self.observer = Observer(self.redis.url, [channels_for(r[0]) for r in rels])
        self.io.spawn(self.observer.run())
        self.wait_observer(0)
        return rels

    def wait_observer(self, generation: int, timeout: float = 20.0) -> None:
        deadline = time.time() + timeout
        while self.observer.generation <= generation:
            if time.time() > deadline:
                raise RuntimeError("the observer could not subscribe to Redis")
            time.sleep(0.01)

    def seed(self, n: int) -> list[tuple[str, str, str]]:
        rows = []
        for _ in range(n):
            rid = uuid.uuid4()
            rows.append((str(rid), f"ca-{rid.hex[:10]}", f"cb-{rid.hex[:10]}"))
        self.sql(
            """INSERT INTO relationships (id, partner_a_id, partner_b_id)
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])""",
            [uuid.UUID(r[0]) for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
        )
        return rows

    def sql(self, query: str, *args, fetch: bool = False):
        async def run():
            import asyncpg

            conn = await asyncpg.connect(self.pg.dsn, timeout=10)
            try:
                if fetch:
                    return [dict(r) for r in await conn.fetch(query, *args)]
                return await conn.execute(query, *args)
            finally:
                await conn.close()

        return asyncio.run(run())

    def token(self, sub: str) -> str:
        import jwt

        return jwt.encode(
            {"sub": sub, "exp": int(time.time()) + 3 * 3600}, self.jwt_secret, algorithm="HS256"
        )

    def start_service(self, name: str) -> Service:
        if name not in self.ports:
            self.ports[name] = free_port()
        # The project's own command line (`service.cli.uvicorn_command`, as the Procfile).
        svc = Service(self, name, self.ports[name])
        self.services[name] = svc
        svc.wait_ready(timeout=60)
        return svc


# ---------------------------------------------------------------------------- the run


class Clock:
    def __init__(self) -> None:
        self.t0 = time.time()

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.t0:6.1f} s] {text}", flush=True)


def _fault(rig: Rig, clock: Clock, name: str, plan: Plan) -> dict:
    """Do one fault; returns when it is over and the broken part answers again."""
    t = time.time()
    out: dict = {"fault": name, "t_start": t}
    if name in ("kill -9", "sigterm"):
        victim = "p1" if name == "kill -9" else "p2"
        svc = rig.services[victim]
        out["process"] = f"{victim} (pid {svc.pid}, port {svc.port})"
        if name == "kill -9":
            clock.say(f"FAULT kill -9 {out['process']}")
            os.kill(svc.pid, signal.SIGKILL)
            svc.proc.wait(10)
        else:
            clock.say(f"FAULT SIGTERM {out['process']}: graceful shutdown")
            svc.terminate(timeout=30)
            out["shutdown_s"] = round(time.time() - t, 2)
            clock.say(f"      {victim} exited after {out['shutdown_s']} s")
        out["t_down"] = time.time()
        svc = rig.start_service(victim)
        clock.say(f"      {victim} started again (pid {svc.pid}), ready")
    elif name == "redis restart":
        clock.say("FAULT Redis restart: services cut off, redis-server stopped (SIGTERM)")
        rig.io.call(rig.redis_proxy.cut())
        time.sleep(0.3)  # what Redis took before the cut reaches the observer
        generation = rig.observer.generation
        rig.redis.stop()
        rig.redis.start()
        rig.wait_observer(generation)
        time.sleep(max(0.0, plan.redis_down_s - (time.time() - t)))
        rig.io.call(rig.redis_proxy.restore())
        clock.say(
            f"      Redis back (empty: no presence, no rate windows) after {time.time() - t:.1f} s"
        )
    elif name == "postgres cut":
        clock.say(f"FAULT PostgreSQL cut at the proxy for {plan.pg_cut_s:.0f} s")
        rig.io.call(rig.pg_proxy.cut())
        time.sleep(plan.pg_cut_s)
        rig.io.call(rig.pg_proxy.restore())
        clock.say("      PostgreSQL reachable again")
    out["t_end"] = time.time()
    out["outage_s"] = round(out["t_end"] - t, 2)
    return out


def run(plan: Plan, out_path: Path) -> int:
    clock = Clock()
    result: dict = {
        "mode": "quick" if plan.quick else "default",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "plan": asdict(plan),
        "loadavg_at_start": os.getloadavg(),
        "cores": os.cpu_count(),
    }
    code = 1
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.signal(signal.SIGTERM, _out_of_time)
    signal.alarm(int(plan.deadline_s))  # the hard bound: a run that hangs is stopped
    with Rig(plan) as rig:
        try:
            code = _run(rig, plan, clock, result)
        except KeyboardInterrupt:
            print("\nchaos: interrupted; cleaning up", file=sys.stderr)
            result["failure"] = "interrupted"
            code = 130
        except Exception as exc:
            traceback.print_exc()
            result["failure"] = repr(exc)
            rig.keep_tmp = True
            print(f"\nchaos: failed: {exc!r}; logs kept in {rig.tmp}", file=sys.stderr)
            code = 2
        finally:
            signal.alarm(0)
            result["elapsed_s"] = round(time.time() - clock.t0, 1)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=1, default=str))
            if code == 1:
                rig.keep_tmp = True
                print(f"chaos: service logs kept in {rig.tmp}")
    print(f"chaos: {result['elapsed_s']} s; figures in {out_path}")
    return code


# Events that may not have reached Redis yet: past their process's published mark (that
# process beats it forward once Redis took its rows; a survivor takes over a dead one's).
UNPUBLISHED = """SELECT count(*) FROM gesture_events e JOIN gesture_nodes n USING (node)
    WHERE e.created_at >= n.published_through"""


class OutOfTime(Exception):
    pass


def _out_of_time(signum, frame) -> None:
    raise OutOfTime("SIGALRM: the run's time limit" if signum == signal.SIGALRM else "SIGTERM")


def _run(rig: Rig, plan: Plan, clock: Clock, result: dict) -> int:
    clock.say(
        f"chaos: {result['mode']} mode, {plan.couples} couples, load {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} cores"
    )
    rels = rig.start_servers(lambda rid: f"gestures:{rid}")
    clock.say(
        f"own PostgreSQL :{rig.pg.port} (proxy :{rig.pg_proxy.port}), own Redis "
        f":{rig.redis.port} (proxy :{rig.redis_proxy.port}), migrated, {len(rels)} couples"
    )
    for name in ("p1", "p2", "p3"):
        rig.start_service(name)
    ports = [rig.ports[n] for n in ("p1", "p2", "p3")]
    clock.say(f"3 service processes on ports {ports}; logs in {rig.tmp}")
    # Two replicas of one consumer group read the streams throughout; p3 is never faulted,
    # so their catch-ups always find an API to read.
    for name in ("c1", "c2"):
        rig.consumers.append(Consumer(rig, name, CONSUMER_GROUP, rig.ports["p3"]))

    couples = []
    n_intermittent = round(plan.couples * plan.intermittent_share)
    for i, (rid, a, b) in enumerate(rels):
        home = i % 3
        couples.append(
            {
                "rel": rid,
                "a": {"token": rig.token(a), "devices": 1 + i % 3, "home": home},
                "b": {
                    "token": rig.token(b),
                    "devices": 1 + (i // 3) % 2 + (i % 5 == 0),
                    "home": (home + 1) % 3,
                    "intermittent": i < n_intermittent,
                },
            }
        )
    cfg = {
        "tag": rig.tag,
        "gen": 0,
        "ports": ports,
        "couples": couples,
        "send_interval": plan.send_interval,
        "ws_share": plan.ws_share,
        "resend_share": plan.resend_share,
        "ack_share": plan.ack_share,
        "send_back_share": plan.send_back_share,
        "race_share": plan.race_share,
        "retry_window": plan.retry_window,
        "offline_s": list(plan.offline_s),
        "deadline": int(plan.deadline_s),
    }
    load = Gen(
        rig, "load", {"mode": "chaos", **cfg}, argv=[sys.executable, "-m", "bench.chaos_load"]
    )
    rig.gens.append(load)
    ready = load.expect("ready", 60)
    devices = sum(c["a"]["devices"] + c["b"]["devices"] for c in couples)
    clock.say(f"load: {ready['up']} sockets up of {devices} devices; going")
    load.send("go")
    t_go = load.expect("going", 10)["t"]

    faults = []
    for name, at in plan.faults:
        wait = t_go + at - time.time()
        if wait > 0:
            time.sleep(wait)
        faults.append(_fault(rig, clock, name, plan))
    t_stop = max(time.time() + plan.tail_s, t_go + plan.faults[-1][1] + plan.tail_s)
    time.sleep(max(0.0, t_stop - time.time()))
    clock.say("load: stop sending; pending retries finish, every partner connects")
    load.send("stop")
    drained = load.expect("drained", plan.retry_window + 60)
    clock.say(
        f"load: drained, {drained['up']} of {drained['devices']} sockets up, "
        f"{drained['unfinished']} unfinished"
    )
    # The outbox drains (the relay publishes what Redis missed), then the observer is quiet.
    deadline = time.time() + 30
    while (left := rig.sql(UNPUBLISHED, fetch=True)[0]["count"]) and (time.time() < deadline):
        time.sleep(0.5)
    result["outbox_left"] = left
    time.sleep(3.0)  # the last events and frames in flight
    report = None
    rows = []
    verdict: dict = {}
    for attempt in range(4):  # "by the end": a few seconds more for stragglers
        load.send("report")
        report = load.expect("report", 60)
        rows = rig.sql(
            """SELECT id, relationship_id, sent_by, message, sent_at, delivered_at,
                acknowledged_at, acknowledged_by, response_gesture_id
            FROM connection_gestures""",
            fetch=True,
        )
        verdict = reconcile(report, rows, rig.observer.events, faults, t_go, t_stop)
        if (verdict["unserved"] == 0 and verdict["events_missing"] == 0) or attempt == 3:
            break
        clock.say(f"waiting for stragglers: {verdict['unserved']} unserved so far")
        time.sleep(3.0)
    load.send("quit")
    with contextlib.suppress(Exception):
        load.expect("stopped", 15)
    result["consumer_group"] = _consumer_verdict(rig, clock)

    result["faults"] = faults
    result["verdict"] = verdict
    result["service_log_errors"] = _log_errors(rig)
    result["load"] = {
        "ws_errors": report["ws_errors"],
        "connect_failures": report["connect_failures"],
        "device_crashes": report["device_crashes"],
        "close_codes": dict(Counter(str(c[1]) for c in report["closes"] if c[2])),
    }
    result["observer_garbage"] = rig.observer.garbage
    print(render(verdict, faults, result))
    failed = [k for k in MUST_BE_ZERO if verdict[k]]
    if left:
        failed.append("outbox_left")
    if result["consumer_group"]["missed"]:
        failed.append("consumer_group_missed")
    # Every fault the run injects is one the service handles: each is a one-line warning in
    # its log, never a traceback (those are for the unexpected, which a run must not meet).
    if any(e["tracebacks"] for e in result["service_log_errors"].values()):
        failed.append("service_log_tracebacks")
    if failed:
        print(f"\nchaos: FAILED: {', '.join(failed)}")
        return 1
    print("\nchaos: nothing lost, doubled or unserved")
    return 0


CONSUMER_GROUP = "chaos"


def _consumer_verdict(rig: Rig, clock: Clock, timeout: float = 45.0) -> dict:
    """Every event of the log (PostgreSQL, the source of truth) against what the group's
    replicas printed: missed ones (must be 0), and duplicates (at least once allows them)."""
    logged = {
        json.loads(bytes(r["payload"]))["event_id"]
        for r in rig.sql(
            "SELECT payload FROM gesture_events WHERE relationship_id IS NOT NULL", fetch=True
        )
    }
    deadline = time.time() + timeout
    while True:
        seen = [e.get("event_id") for c in rig.consumers for e in c.events()]
        missed = logged - set(seen)
        if not missed or time.time() > deadline:
            break
        time.sleep(0.5)
    exits = {c.name: c.stop() for c in rig.consumers}
    seen = [e.get("event_id") for c in rig.consumers for e in c.events()]
    counts = Counter(seen)
    missed = logged - set(seen)
    verdict = {
        "replicas": len(rig.consumers),
        "events_in_log": len(logged),
        "events_seen": len(seen),
        "missed": len(missed),
        "missed_ids": sorted(missed)[:20],
        "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        "by_replica": {c.name: len(c.events()) for c in rig.consumers},
        "exit_codes": exits,
        "catchups": _count_lines(rig, "catching up"),
    }
    clock.say(
        f"consumer group: {verdict['events_seen']} events seen of {len(logged)} in the log, "
        f"{verdict['missed']} missed, {verdict['duplicates']} duplicates"
    )
    return verdict


def _count_lines(rig: Rig, needle: str) -> int:
    return sum(c.err.read_text(errors="replace").lower().count(needle) for c in rig.consumers)


def _log_errors(rig: Rig) -> dict:
    out = {}
    for path in sorted(Path(rig.tmp).glob("p[0-9].log")):
        text = path.read_text(errors="replace")
        out[path.stem] = {
            "error_lines": sum(
                1
                for line in text.splitlines()
                if '"level": "ERROR"' in line or " ERROR " in line or line.startswith("ERROR")
            ),
            "tracebacks": text.count("Traceback"),
        }
    return out


# ---------------------------------------------------------------------------- reconciling

MUST_BE_ZERO = [
    "answered_missing",
    "answered_twice_differently",
    "duplicate_rows",
    "acknowledged_twice",
    "acknowledgements_lost",
    "responses_without_acknowledgement",
    "responses_lost",
    "unserved",
    "events_missing",
    "frames_foreign",
    "errors_5xx_unexpected",
    "http_503_slow",
]


def _connected_at(timeline: list[list[float]], t: float) -> bool:
    times = [x[0] for x in timeline]
    i = bisect.bisect_right(times, t) - 1
    return i >= 0 and timeline[i][1] > 0


def reconcile(report: dict, rows: list[dict], events: list, faults: list, t_go, t_stop) -> dict:
    by_id = {str(r["id"]): r for r in rows}
    v: dict = {}
    sends = report["sends"]
    answered = [s for s in sends if s["gid"]]
    v["sends"] = len(sends)
    v["answered"] = len(answered)
    v["answered_http"] = sum(1 for s in answered if s["via"] == "http")
    v["answered_ws"] = sum(1 for s in answered if s["via"] == "ws")
    v["answered_missing"] = sum(1 for s in answered if s["gid"] not in by_id)
    v["answered_twice_differently"] = sum(1 for s in answered if len(set(s["answers"])) > 1)
    v["replays_same_id"] = sum(len(s["answers"]) - 1 for s in answered)
    v["gave_up"] = sum(1 for s in sends if s.get("gave_up"))
    v["rejected"] = dict(Counter(str(s["rejected"]) for s in sends if s.get("rejected")))
    stamps = Counter(r["message"] for r in rows if (r["message"] or "").startswith("c|"))
    v["duplicate_rows"] = sum(n - 1 for n in stamps.values() if n > 1)
    v["rows"] = len(rows)
    v["retried_sends"] = sum(1 for s in answered if s["attempts"] > 1)

    # Acknowledgements
    acks = [a for a in report["acks"] if "acknowledged" in a]
    won = Counter(a["gid"] for a in acks if a["acknowledged"])
    v["acknowledgements"] = len(won)
    v["acknowledged_twice"] = sum(1 for n in won.values() if n > 1)
    v["acknowledgements_lost"] = sum(
        1 for gid in won if gid not in by_id or by_id[gid]["acknowledged_at"] is None
    )
    v["ack_races_lost_cleanly"] = sum(1 for a in acks if not a["acknowledged"])
    v["ack_gave_up"] = sum(1 for a in report["acks"] if a.get("via") == "gave_up")
    v["ack_rejected"] = dict(
        Counter(str(a["rejected"]) for a in report["acks"] if a.get("rejected"))
    )
    responses_told = {a["response"] for a in acks if a.get("response")}
    v["responses_lost"] = sum(1 for r in responses_told if r not in by_id)
    referenced = Counter(
        str(r["response_gesture_id"]) for r in rows if r["response_gesture_id"] is not None
    )
    orphan = 0
    for r in rows:
        if (r["message"] or "").startswith("r|"):
            original = by_id.get(r["message"][2:])
            if (
                referenced.get(str(r["id"]), 0) != 1
                or original is None
                or original["acknowledged_at"] is None
                or str(original["response_gesture_id"]) != str(r["id"])
            ):
                orphan += 1
    orphan += sum(
        1 for r in rows if r["response_gesture_id"] is not None and r["acknowledged_at"] is None
    )
    v["responses_without_acknowledgement"] = orphan
    v["responses"] = sum(1 for r in rows if (r["message"] or "").startswith("r|"))

    # Receipt: every row reached its recipient by the end.
    received: dict[tuple[str, str], dict[str, float]] = {}
    timelines: dict[tuple[str, str], list] = {}
    for p in report["partners"]:
        received[(p["rel"], p["role"])] = p["received"]
        # Waits are measured for partners who stay online: an intermittent one that went
        # offline on purpose right after a send would "wait" until its next visit.
        if not p["intermittent"]:
            timelines[(p["rel"], p["role"])] = p["timeline"]
    waits: list[tuple[float, float, str]] = []  # (sent_at, wait, gesture id)
    unserved = []
    for r in rows:
        recipient = "partner_b" if r["sent_by"] == "partner_a" else "partner_a"
        key = (str(r["relationship_id"]), recipient)
        got = received.get(key, {}).get(str(r["id"]))
        sent_at = r["sent_at"].timestamp()
        if got is None:
            unserved.append(
                {
                    "id": str(r["id"]),
                    "rel": str(r["relationship_id"]),
                    "recipient": recipient,
                    "sent_s": round(sent_at - t_go, 2),
                    "delivered": r["delivered_at"] is not None,
                    "acknowledged": r["acknowledged_at"] is not None,
                    "message": r["message"],
                }
            )
            continue
        if _connected_at(timelines.get(key, []), sent_at):
            waits.append((sent_at, got - sent_at, str(r["id"])))
    v["unserved"] = len(unserved)
    v["unserved_ids"] = unserved[:20]
    v["frames_foreign"] = report["frames_foreign"]

    # Events: every committed change was published at least once.
    seen = {(e[1], e[3]) for e in events}
    missing = Counter()
    for r in rows:
        gid = str(r["id"])
        if ("gesture.sent", gid) not in seen:
            missing["gesture.sent"] += 1
        if r["delivered_at"] is not None and ("gesture.delivered", gid) not in seen:
            missing["gesture.delivered"] += 1
        if r["acknowledged_at"] is not None and ("gesture.acknowledged", gid) not in seen:
            missing["gesture.acknowledged"] += 1
    v["events_seen"] = len(events)
    v["events_duplicated"] = len(events) - len({e[2] for e in events})
    v["events_missing"] = sum(missing.values())
    v["events_missing_by_kind"] = dict(missing)

    # HTTP statuses: >= 500 is expected only as a 503 while PostgreSQL was cut.
    cuts = [(f["t_start"], f["t_end"]) for f in faults if f["fault"] == "postgres cut"]
    statuses = Counter()
    unexpected = Counter()
    for t0, t1, path, status, _port in report["http"]:
        statuses[str(status)] += 1
        if status >= 500:
            during_cut = any(t0 <= end and t1 >= start for start, end in cuts)
            if not (status == 503 and during_cut):
                unexpected[f"{status} {path}"] += 1
    v["http_statuses"] = dict(statuses)
    took_503 = [t1 - t0 for t0, t1, _path, status, _port in report["http"] if status == 503]
    v["http_503_seconds"] = percentiles(took_503)
    # The contract: PostgreSQL unreachable, 503 within 5 seconds.
    v["http_503_slow"] = sum(1 for x in took_503 if x > 5.0)
    v["errors_5xx_unexpected"] = sum(unexpected.values())
    v["errors_5xx_unexpected_by_path"] = dict(unexpected)

    sends_by_gid = {s["gid"]: s for s in answered}

    # What each fault cost: windows from 1 s before a fault to 1 s before the next.
    bounds = [("steady", t_go)] + [(f["fault"], f["t_start"] - 1.0) for f in faults]
    windows = []
    for i, (name, start) in enumerate(bounds):
        end = bounds[i + 1][1] if i + 1 < len(bounds) else t_stop
        inside = [x for x in waits if start <= x[0] < end]
        w = [x[1] for x in inside]
        worst = max(inside, key=lambda x: x[1], default=None)
        sender_waits = [
            s["t_ok"] - s["t0"] for s in answered if start <= s["t0"] < end and s["t_ok"]
        ]
        closes = Counter(str(c[1]) for c in report["closes"] if c[2] and start <= c[0] < end)
        http = [h for h in report["http"] if start <= h[0] < end]
        windows.append(
            {
                "window": name,
                "from_s": round(start - t_go, 1),
                "to_s": round(end - t_go, 1),
                "received": len(w),
                "worst": None if worst is None else _explain(worst, by_id, sends_by_gid, t_go),
                "recipient_wait_ms": percentiles([x * 1000 for x in w]),
                "sender_wait_ms": percentiles([x * 1000 for x in sender_waits]),
                "http_503": sum(1 for h in http if h[3] == 503),
                "http_no_answer": sum(1 for h in http if h[3] == 0),
                "socket_closes": dict(closes),
                "no_answer_samples": [
                    {
                        "t_s": round(h[0] - t_go, 3),
                        "took_s": round(h[1] - h[0], 3),
                        "path": h[2],
                        "port": h[4],
                    }
                    for h in http
                    if h[3] == 0
                ][:10],
            }
        )
    v["windows"] = windows
    return v


def _explain(worst: tuple, by_id: dict, sends_by_gid: dict, t_go: float) -> dict:
    """The longest wait of a window, with what is known of that gesture (for the JSON)."""
    sent_at, wait, gid = worst
    row = by_id[gid]
    out = {"id": gid, "sent_s": round(sent_at - t_go, 2), "wait_s": round(wait, 3)}
    if row["delivered_at"] is not None:
        out["delivered_after_s"] = round(row["delivered_at"].timestamp() - sent_at, 3)
    send = sends_by_gid.get(gid)
    if send is not None:
        out["via"] = send["via"]
        out["attempts"] = send["attempts"]
        out["answered_after_s"] = round(send["t_ok"] - sent_at, 3)
    else:
        out["via"] = "send-back" if (row["message"] or "").startswith("r|") else "?"
    return out


def render(v: dict, faults: list, result: dict) -> str:
    out = []
    rows = [
        [
            "gestures answered 200 / gesture_sent",
            v["answered"],
            f"http {v['answered_http']}, ws {v['answered_ws']}, {v['retried_sends']} after a retry",
        ],
        ["  of them missing in PostgreSQL", v["answered_missing"], "must be 0"],
        ["  one key answered with two ids", v["answered_twice_differently"], "must be 0"],
        [
            "  rows doubled by a retry",
            v["duplicate_rows"],
            f"must be 0 ({v['replays_same_id']} replays answered the same id)",
        ],
        [
            "acknowledged (acknowledged: true)",
            v["acknowledgements"],
            f"{v['ack_races_lost_cleanly']} second tries answered false",
        ],
        ["  acknowledged twice", v["acknowledged_twice"], "must be 0"],
        ["  acknowledgement answered, not stored", v["acknowledgements_lost"], "must be 0"],
        [
            "  response gestures without their ack",
            v["responses_without_acknowledgement"],
            f"must be 0 (of {v['responses']} responses)",
        ],
        ["  response answered, not stored", v["responses_lost"], "must be 0"],
        ["gestures never received by the end", v["unserved"], f"must be 0 (of {v['rows']} rows)"],
        ["frames of another relationship", v["frames_foreign"], "must be 0"],
        [
            "events missing on Redis",
            v["events_missing"],
            f"must be 0 ({v['events_seen']} seen, {v['events_duplicated']} repeats)",
        ],
        [
            "responses >= 500 but 503s in a cut",
            v["errors_5xx_unexpected"],
            "must be 0 "
            + (
                json.dumps(v["errors_5xx_unexpected_by_path"]) if v["errors_5xx_unexpected"] else ""
            ),
        ],
        [
            "503s answered after more than 5 s",
            v["http_503_slow"],
            f"must be 0 (slowest {v['http_503_seconds']['max']} s)",
        ],
        ["sends given up (no answer in time)", v["gave_up"], "not answered: no promise made"],
        ["outbox rows left at the end", result.get("outbox_left"), "must be 0"],
        [
            "consumer group: events missed",
            result["consumer_group"]["missed"],
            f"must be 0 ({result['consumer_group']['events_in_log']} in the log, "
            f"{result['consumer_group']['replicas']} replicas)",
        ],
        [
            "  duplicates it saw",
            result["consumer_group"]["duplicates"],
            "allowed: at least once",
        ],
    ]
    out.append(
        table("chaos: what was promised, against PostgreSQL and Redis", ["", "count", "note"], rows)
    )
    frows = []
    for f in faults:
        frows.append([f["fault"], f.get("process", ""), f["outage_s"], f.get("shutdown_s")])
    out.append(table("faults", ["fault", "process", "until back (s)", "SIGTERM exit (s)"], frows))
    wrows = []
    for w in v["windows"]:
        wrows.append(
            [
                w["window"],
                f"{w['from_s']}..{w['to_s']}",
                w["received"],
                w["recipient_wait_ms"]["p50"],
                w["recipient_wait_ms"]["p99"],
                w["recipient_wait_ms"]["max"],
                w["sender_wait_ms"]["max"],
                w["http_503"],
                w["http_no_answer"],
                " ".join(f"{k}x{n}" for k, n in sorted(w["socket_closes"].items())) or "-",
            ]
        )
    out.append(
        table(
            "what each fault cost (partners who stay online, a socket up at the send)",
            [
                "window",
                "s",
                "gestures",
                "wait p50 ms",
                "p99 ms",
                "max ms",
                "sender max ms",
                "503s",
                "no answer",
                "socket closes",
            ],
            wrows,
        )
    )
    out.append(
        f"\nHTTP statuses: {v['http_statuses']}; WebSocket errors: {result['load']['ws_errors']}"
    )
    out.append(f"service log errors: {result['service_log_errors']}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about a minute (CI)")
    ap.add_argument(
        "--out", default=None, help="JSON file (default bench/results/chaos[-quick].json)"
    )
    args = ap.parse_args(argv)
    plan = Plan.make(args.quick)
    out = Path(args.out or f"bench/results/chaos{'-quick' if args.quick else ''}.json")
    return run(plan, out)
