"""`--own-servers`: a PostgreSQL and a Redis of the bench's own, so that what the delivery
step counts per gesture (WAL, the WAL writer's CPU, Redis commands and CPU) is the bench's
alone rather than everyone's on the shared servers, and so that `pg_stat_statements` can be
loaded (it needs `shared_preload_libraries`, which the shared server does not set).

PostgreSQL is initdb'd in a temporary directory (as the `postgres` user when run as root) on
a free loopback port, with the durability of a stock server (fsync and synchronous_commit
on; the chaos run turns fsync off, this does not) and the stock memory settings of the
Debian package (shared_buffers 128MB), `max_connections` 200 for the bench's pools and
generators, and `pg_stat_statements` preloaded. Redis is a plain `redis-server` without
persistence, as `bench.cluster` starts one. Both are stopped and deleted at the end.

The WAL is given the segments that a server which has run a while under load has
(`WAL_SEGMENTS`, kept by `min_wal_size`): a fresh cluster has none to recycle, so every
16 MB of WAL makes a new segment, written full of zeros while the commit that needs it
waits. Under the delivery load (about 3 KB of WAL a gesture) that was one stall of about
100 ms every four seconds, in every configuration alike, and it decided the held rate
(seen as the disk's write rate doubling in exactly the seconds of late deliveries). A
server in service recycles its old segments at each checkpoint instead.
"""

import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .chaos import _as_postgres, _pg_bin
from .cluster import _OneRedis
from .infra import free_port

# 1 GB of WAL, the stock max_wal_size: past it a checkpoint recycles the oldest segments
# (min_wal_size keeps them all), so no run makes a new one.
WAL_SEGMENTS = 64


class OwnServers:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-servers-"))
        self.tmp.chmod(0o755)  # the postgres user must reach its data directory
        self.bin = _pg_bin()
        self.port = free_port()
        self.data = self.tmp / "pg" / "data"
        self.pg_started = False
        self.redis: _OneRedis | None = None

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://root@127.0.0.1:{self.port}/postgres"

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def __enter__(self) -> "OwnServers":
        try:
            self._start_pg()
            self.redis = _OneRedis(self.tmp)
            # Redis records what took it 5 ms or more (`redis_events`).
            import redis

            r = redis.Redis.from_url(self.redis.url)
            r.config_set("latency-monitor-threshold", REDIS_LATENCY_MS)
            r.close()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_pg(self) -> None:
        pg = self.tmp / "pg"
        pg.mkdir()
        log = self.log
        log.touch()
        if _as_postgres([]) != []:
            shutil.chown(pg, "postgres", "postgres")
            shutil.chown(log, "postgres", "postgres")
        subprocess.run(
            _as_postgres(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
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
            "-c max_connections=200 -c shared_buffers=128MB "
            "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.max=1000 "
            "-c pg_stat_statements.track_utility=on "
            # What the server did on its own during a window (`server_events`): every
            # autovacuum and autoanalyze, and the checkpoints (logged by default).
            "-c log_autovacuum_min_duration=0 -c log_checkpoints=on -c log_line_prefix='%n ' "
            f"-c min_wal_size={WAL_SEGMENTS * 16}MB"
        )
        subprocess.run(
            _as_postgres(
                [
                    str(self.bin / "pg_ctl"),
                    "-D",
                    str(self.data),
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
        self.pg_started = True
        self._make_wal_segments()

    def _make_wal_segments(self) -> None:
        """WAL_SEGMENTS segments made now and recycled by a checkpoint, so that the runs
        write into segments that exist (as on a server in service), not into new ones."""
        import asyncpg

        async def run() -> None:
            conn = await asyncpg.connect(self.admin_dsn, timeout=10)
            try:
                await conn.execute("CREATE TEMP TABLE walfill (x int)")
                for _ in range(WAL_SEGMENTS):
                    await conn.execute("INSERT INTO walfill VALUES (1)")
                    await conn.execute("SELECT pg_switch_wal()")
                await conn.execute("CHECKPOINT")
            finally:
                await conn.close()

        started = time.monotonic()
        asyncio.run(run())
        print(
            f"bench: {WAL_SEGMENTS} WAL segments made and recycled "
            f"({time.monotonic() - started:.1f} s)",
            flush=True,
        )

    @property
    def log(self) -> Path:
        return self.tmp / "postgres.log"

    def stop(self) -> None:
        if self.redis is not None:
            try:
                self.redis.stop()
            except Exception:
                pass
            self.redis = None
        if self.pg_started:
            subprocess.run(
                _as_postgres(
                    [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]
                ),
                capture_output=True,
                timeout=60,
                cwd="/",
            )
            self.pg_started = False
        shutil.rmtree(self.tmp, ignore_errors=True)


REDIS_LATENCY_MS = 5


def redis_events(url: str | None, t0: float, t1: float) -> list[str]:
    """What held the bench's own Redis REDIS_LATENCY_MS or more between t0 and t1 (epoch
    seconds), from its latency monitor, as "+Ss what N ms" (the monitor keeps whole
    seconds and the worst of each second). Nothing when the server is not the bench's own."""
    if url is None:
        return []
    import redis

    r = redis.Redis.from_url(url, socket_timeout=2)
    try:
        found = []
        for event, *_ in r.execute_command("LATENCY", "LATEST"):
            name = event.decode() if isinstance(event, bytes) else str(event)
            for at, ms in r.execute_command("LATENCY", "HISTORY", name):
                if int(t0) <= at <= t1:
                    found.append((at, f"+{at - int(t0)}s {name} {ms} ms"))
        return [line for _, line in sorted(found)]
    except redis.RedisError:
        return []
    finally:
        r.close()


_EVENTS = ("automatic vacuum", "automatic analyze", "checkpoint starting", "checkpoint complete")


def server_events(log: Path | None, t0: float, t1: float) -> list[str]:
    """What PostgreSQL did on its own between t0 and t1 (epoch seconds), from its log:
    autovacuum, autoanalyze and checkpoints, each as "+S.Ss what" from t0. Nothing when the
    server is not the bench's own."""
    if log is None or not log.exists():
        return []
    found = []
    for line in log.read_text(errors="replace").splitlines():
        stamp, _, rest = line.partition(" ")
        try:
            at = float(stamp)
        except ValueError:
            continue  # a continuation line (DETAIL, a statement's text)
        message = rest.split(":", 1)[-1].strip() if rest.startswith("LOG:") else rest
        if t0 <= at <= t1 and message.startswith(_EVENTS):
            found.append(f"+{at - t0:.1f}s {message[:100]}")
    return found
