"""What the bench starts and must stop: its database, the service processes, the generators.

`Bench` is a context manager; leaving it (normally, on an exception or on Ctrl-C) stops every
process it started, by pid, drops the database and deletes the Redis keys under its prefixes.
"""

import asyncio
import json
import os
import queue
import re
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil

from service.cli import WS_PROTOCOL, uvicorn_command
from service.config import from_env

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://root@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, and not one this process handed out before: the kernel
    can give the same free port to two binds in a row (once, the two service processes
    were told the same port, and the second one's readiness check was answered by the first)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far; 0 for one gone or None."""
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    return t.user + t.system


def _dsn_with_db(dsn: str, db: str) -> str:
    return dsn.rsplit("/", 1)[0] + "/" + db


class GenError(RuntimeError):
    pass


class Gen:
    """One generator process and its line protocol."""

    def __init__(self, bench: "Bench", name: str, cfg: dict, argv: list[str] | None = None) -> None:
        self.name = name
        fd, path = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".json", dir=bench.tmp)
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f)
        self.stderr = open(Path(bench.tmp) / f"{name}.stderr", "w")
        self.proc = subprocess.Popen(
            # `python -m bench.gen` unless told otherwise (the socket.io step's node script).
            [*(argv or [sys.executable, "-m", "bench.gen"]), path],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue = queue.Queue()
        self.pending: list[dict] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"event": "garbage", "line": line})
        self.lines.put(None)

    def send(self, cmd: str, **kw) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise GenError(f"generator {self.name} is gone: {self.tail()}") from exc

    def expect(self, event: str, timeout: float) -> dict:
        for i, msg in enumerate(self.pending):
            if msg.get("event") == event:
                return self.pending.pop(i)
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise GenError(f"generator {self.name}: no {event!r} within {timeout:.0f} s")
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                raise GenError(f"generator {self.name} exited: {self.tail()}")
            if msg.get("event") == "error":
                raise GenError(f"generator {self.name} failed: {msg.get('error')}")
            if msg.get("event") == event:
                return msg
            self.pending.append(msg)

    def tail(self) -> str:
        try:
            self.stderr.flush()
            text = Path(self.stderr.name).read_text()
            return text[-1500:] or "(no stderr)"
        except OSError:
            return "(no stderr)"

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            try:
                self.send("stop")
                self.proc.wait(timeout)
            except (GenError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.stderr.close()


class Service:
    """One `uvicorn service.app:app` process."""

    def __init__(
        self,
        bench: "Bench",
        name: str,
        port: int,
        ws: str = WS_PROTOCOL,
        flags: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.ws = ws
        self.log = open(Path(bench.tmp) / f"{name}.log", "a")
        env = {**bench.service_env(), **(env or {})}
        self.proc = subprocess.Popen(
            # The project's own command line (compression off, uvicorn's keepalive pings),
            # plus what the bench needs: quiet logs and a backlog for connect storms.
            uvicorn_command(
                from_env(env),
                port,
                "--host",
                "127.0.0.1",
                "--log-level",
                "warning",
                "--no-access-log",
                "--backlog",
                "4096",
                *(flags or []),
                ws=ws,
            ),
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=raise_nofile,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.ps = psutil.Process(self.pid)

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Poll /readyz until 200; returns when it answered. Raises past the deadline."""
        deadline = time.time() + timeout
        url = f"http://127.0.0.1:{self.port}/readyz"
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service {self.name} exited: {self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if resp.status == 200:
                        return time.time()
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"service {self.name} not ready within {timeout:.0f} s: {self.tail()}")

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def tail(self) -> str:
        self.log.flush()
        try:
            return Path(self.log.name).read_text()[-2000:]
        except OSError:
            return ""

    def terminate(self, timeout: float = 30.0) -> float:
        """SIGTERM and wait for exit (SIGKILL past `timeout`); returns the exit time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
        return time.time()


class CpuMeter:
    """CPU seconds of groups of processes over an interval, as % of one core."""

    # "postgres: [cluster: ]user database host(port) state" for a client backend.
    _BACKEND = re.compile(r"^postgres: (?:\S+: )?\S+ (\S+) \S*\(\d+\)")

    def __init__(self, bench: "Bench") -> None:
        self.bench = bench

    def _postgres(self) -> dict[int, float]:
        """The postmaster of the server we use, its auxiliary processes, and the backends of
        our database only (other people's tests use other databases on the same server)."""
        out = {}
        pid = self.bench.postmaster_pid
        if pid is None:
            return out
        try:
            master = psutil.Process(pid)
            procs = [master, *master.children()]
        except psutil.NoSuchProcess:
            return out
        for p in procs:
            try:
                cmd = " ".join(x for x in p.cmdline() if x)
                m = self._BACKEND.match(cmd)
                if m and m.group(1) != self.bench.db:
                    continue
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def _times(self, pids) -> dict[int, float]:
        out = {}
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def snapshot(self, gens: list[Gen]) -> dict:
        b = self.bench
        return {
            "t": time.time(),
            "service": self._times([s.pid for s in b.services.values()]),
            "postgres": self._postgres(),
            "redis": self._times([b.redis_pid] if b.redis_pid else []),
            "gens": {g.name: self._times([g.pid]) for g in gens},
        }

    @staticmethod
    def delta(a: dict, b: dict) -> dict:
        wall = max(b["t"] - a["t"], 1e-6)

        def pct(x: dict, y: dict) -> float:
            return round(100.0 * sum(v - x.get(pid, 0.0) for pid, v in y.items()) / wall, 1)

        gens = {name: pct(a["gens"].get(name, {}), y) for name, y in b["gens"].items()}
        return {
            "wall_s": round(wall, 2),
            "service_pct": pct(a["service"], b["service"]),
            "service_per_process_pct": {
                str(pid): round(100.0 * (v - a["service"].get(pid, 0.0)) / wall, 1)
                for pid, v in b["service"].items()
            },
            "postgres_pct": pct(a["postgres"], b["postgres"]),
            "redis_pct": pct(a["redis"], b["redis"]),
            "generators_pct": gens,
            "generators_saturated": sorted(n for n, v in gens.items() if v > 90.0),
        }


class Bench:
    def __init__(
        self, quick: bool, admin_dsn: str | None = None, redis_url: str | None = None
    ) -> None:
        self.quick = quick
        tag = secrets.token_hex(4)
        self.db = f"bench_{tag}"
        # The shared servers unless told otherwise (`--own-servers`: bench.servers).
        self.admin_dsn = admin_dsn or PG_ADMIN_DSN
        self.dsn = _dsn_with_db(self.admin_dsn, self.db)
        self.redis_url = redis_url or REDIS_URL
        self.own_servers = admin_dsn is not None
        self.pg_log: Path | None = None  # the own server's log (`servers.server_events`)
        # Delivery steps run so far on this database: each tags its rows apart, so that
        # counting one step's rows in SQL does not count an earlier step's too.
        self.delivery_runs = 0
        # Readable on this server (set by __main__ when the server preloads the library).
        self.pg_stat_statements = False
        self.redis_cluster = False  # the cluster step points the services at a cluster
        # The delivery step runs a consumer group member for the streams' lag (streams_cost
        # turns it off: it measures the append, not another service's reads).
        self.lag_member = True
        self.channel_prefix = f"bench-{tag}:gestures:"
        self.presence_prefix = f"bench-{tag}:presence:"
        self.jwt_secret = secrets.token_urlsafe(32)
        self.tmp = tempfile.mkdtemp(prefix=f"bench-{tag}-")
        self.services: dict[str, Service] = {}
        self.gens: list[Gen] = []
        self.redis_pid: int | None = None
        self.postmaster_pid: int | None = None
        self.cpu = CpuMeter(self)
        self.db_created = False
        # The figures of the steps run so far (filled in by __main__), for steps that compare.
        self.results: dict = {}

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Bench":
        raise_nofile()
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._create_db()
            env = {**os.environ, "DATABASE_URL": self.dsn}
            subprocess.run(
                [sys.executable, "-m", "service", "migrate"],
                cwd=ROOT,
                env=env,
                check=True,
                capture_output=True,
                timeout=120,
            )
            self.redis_pid = self._redis_pid()
            self.postmaster_pid = self._postmaster_pid()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        # A second Ctrl-C must not interrupt the cleanup itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for g in self.gens:
            g.kill()
        self.gens.clear()
        for s in list(self.services.values()):
            try:
                s.terminate(timeout=15)
            except Exception:
                pass
        self.services.clear()
        if self.db_created:
            try:
                asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)'))
                self.db_created = False
            except Exception as exc:
                print(f"warning: could not drop database {self.db}: {exc!r}", file=sys.stderr)
        try:
            asyncio.run(self._redis_cleanup())
        except Exception as exc:
            print(f"warning: could not delete bench keys from Redis: {exc!r}", file=sys.stderr)

    async def _admin(self, sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def _create_db(self) -> None:
        asyncio.run(self._admin(f'CREATE DATABASE "{self.db}"'))
        self.db_created = True

    async def _redis_cleanup(self) -> None:
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(self.redis_url)
        try:
            prefix = self.channel_prefix.split(":", 1)[0]
            async for key in r.scan_iter(match=f"{prefix}:*", count=1000):
                await r.delete(key)
        finally:
            await r.aclose()

    def _postmaster_pid(self) -> int | None:
        """The parent of one of our backends: the server that 127.0.0.1:5432 is."""

        async def run():
            import asyncpg

            conn = await asyncpg.connect(self.dsn, timeout=10)
            try:
                # Asked while the backend lives: it exits as soon as the connection closes.
                return psutil.Process(await conn.fetchval("SELECT pg_backend_pid()")).ppid()
            finally:
                await conn.close()

        try:
            return asyncio.run(run())
        except Exception:
            return None

    def _redis_pid(self) -> int | None:
        import redis

        try:
            r = redis.Redis.from_url(self.redis_url)
            pid = int(r.info("server")["process_id"])
            r.close()
            return pid if psutil.pid_exists(pid) else None
        except Exception:
            return None

    # ------------------------------------------------------------------ pieces

    def service_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DATABASE_URL": self.dsn,
            "REDIS_URL": self.redis_url,
            "REDIS_CLUSTER": "true" if self.redis_cluster else "false",
            "JWT_SECRET": self.jwt_secret,
            "CHANNEL_PREFIX": self.channel_prefix,
            "PRESENCE_PREFIX": self.presence_prefix,
            "RATE_LIMIT_PER_MINUTE": "100000000",
            "REDIS_MAX_CONNECTIONS": "256",
            "DB_POOL_MAX": os.environ.get("BENCH_DB_POOL_MAX", "16"),
        }

    def start_service(self, name: str, port: int, ws: str = WS_PROTOCOL, **kw) -> Service:
        svc = Service(self, name, port, ws, **kw)
        self.services[name] = svc
        svc.wait_ready()
        return svc

    def stop_service(self, name: str) -> float:
        svc = self.services.pop(name)
        return svc.terminate()

    def gen(
        self, name: str, mode: str, deadline: float, argv: list[str] | None = None, **cfg
    ) -> Gen:
        g = Gen(self, name, {"mode": mode, "deadline": deadline, **cfg}, argv)
        self.gens.append(g)
        return g

    def stop_gens(self, gens: list[Gen]) -> None:
        for g in gens:
            g.stop()
            if g in self.gens:
                self.gens.remove(g)

    def seed(self, n: int) -> list[tuple[str, str, str]]:
        """n relationships, inserted by direct SQL: (id, partner_a_id, partner_b_id)."""
        rows = []
        for _ in range(n):
            rid = uuid.uuid4()
            rows.append((str(rid), f"ua-{rid.hex[:12]}", f"ub-{rid.hex[:12]}"))

        async def insert() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.dsn, timeout=10)
            try:
                await conn.execute(
                    """INSERT INTO relationships (id, partner_a_id, partner_b_id)
                    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])""",
                    [uuid.UUID(r[0]) for r in rows],
                    [r[1] for r in rows],
                    [r[2] for r in rows],
                )
            finally:
                await conn.close()

        asyncio.run(insert())
        return rows

    def token(self, sub: str) -> str:
        from service.auth import issue

        return issue(self.jwt_secret, sub=sub, ttl=3 * 3600)

    def query(self, sql: str, *args):
        async def run():
            import asyncpg

            conn = await asyncpg.connect(self.dsn, timeout=10)
            try:
                return await conn.fetchval(sql, *args)
            finally:
                await conn.close()

        return asyncio.run(run())

    def pg_free_connections(self) -> int:
        async def run():
            import asyncpg

            conn = await asyncpg.connect(self.admin_dsn, timeout=10)
            try:
                limit = int(await conn.fetchval("SHOW max_connections"))
                reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
                used = await conn.fetchval("SELECT count(*) FROM pg_stat_activity")
                return limit - reserved - used
            finally:
                await conn.close()

        return asyncio.run(run())


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
