"""Where a persisted gesture's time goes: counters read before and after a load, per gesture.

`Counters.snapshot()` reads, at one moment:

- CPU seconds (psutil) of the sender's service process, the recipient's, PostgreSQL split
  into the backends of the bench's database, the WAL writer and the rest of the server
  (postmaster, checkpointer, background writer, autovacuum...), and redis-server;
- `pg_stat_database` of the bench's database (commits, rollbacks, rows), `pg_stat_wal`
  (WAL records and bytes, server-wide) and the WAL insert position;
- `pg_stat_statements` of the bench's database, when the server preloads it
  (`--own-servers` does; the shared server on 5432 does not);
- Redis `INFO commandstats` (calls and µs per command, server-wide).

PostgreSQL's cumulative statistics (`pg_stat_database`, `pg_stat_wal`) reach the views only
when a backend flushes them: at most once a second while it works, and up to
`PGSTAT_IDLE_INTERVAL` (10 s) after it goes idle. `SETTLE_S` is how long the delivery step
waits after a load before reading them. The other counters are read at once.
"""

import asyncio
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil

from .infra import process_cpu
from .report import table

SETTLE_S = 11.0  # PGSTAT_IDLE_INTERVAL (10 s) and a margin
IDLE_WINDOW_S = 5.0  # the background measured while every socket is up and nothing is sent
PG_SETTINGS = [
    "server_version",
    "synchronous_commit",
    "fsync",
    "full_page_writes",
    "wal_level",
    "wal_sync_method",
    "wal_writer_delay",
    "commit_delay",
    "shared_buffers",
    "max_connections",
    "min_wal_size",
    "max_wal_size",
    "checkpoint_timeout",
    "work_mem",
    "shared_preload_libraries",
    "track_io_timing",
]
_BACKEND = re.compile(r"^postgres: (?:\S+: )?\S+ (\S+) \S*\(\d+\)")


def _run(coro):
    return asyncio.run(coro)


def pg_settings(admin_dsn: str) -> dict:
    async def run():
        import asyncpg

        conn = await asyncpg.connect(admin_dsn, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])",
                PG_SETTINGS,
            )
            shown = {}
            for r in rows:
                shown[r["name"]] = await conn.fetchval(f"SHOW {r['name']}")
            return {k: shown[k] for k in PG_SETTINGS if k in shown}
        finally:
            await conn.close()

    return _run(run())


def print_pg_settings(settings: dict, where: str) -> None:
    print(f"bench: PostgreSQL ({where}): " + ", ".join(f"{k}={v}" for k, v in settings.items()))


def enable_pg_stat_statements(admin_dsn: str) -> bool:
    """CREATE EXTENSION pg_stat_statements in the admin database (its view shows every
    database's statements), when the server preloads the library. True when it is readable."""

    async def run():
        import asyncpg

        conn = await asyncpg.connect(admin_dsn, timeout=10)
        try:
            libs = await conn.fetchval("SHOW shared_preload_libraries")
            if "pg_stat_statements" not in libs:
                return False
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.fetchval("SELECT count(*) FROM pg_stat_statements")
            return True
        finally:
            await conn.close()

    try:
        return _run(run())
    except Exception as exc:
        print(f"bench: pg_stat_statements not readable: {exc!r}", file=sys.stderr)
        return False


class Counters:
    def __init__(self, bench, sender_pid: int, recipient_pid: int) -> None:
        self.b = bench
        self.sender_pid = sender_pid
        self.recipient_pid = recipient_pid
        self.pgss = bench.pg_stat_statements

    # ------------------------------------------------------------------ reading

    def _postgres_cpu(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {"backends": {}, "walwriter": {}, "other": {}}
        pid = self.b.postmaster_pid
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
                t = p.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            m = _BACKEND.match(cmd)
            if m:
                if m.group(1) == self.b.db:
                    out["backends"][p.pid] = t.user + t.system
                continue  # other people's databases
            group = "walwriter" if "walwriter" in cmd else "other"
            out[group][p.pid] = t.user + t.system
        return out

    def _pg(self) -> dict:
        async def run():
            import asyncpg

            conn = await asyncpg.connect(self.b.admin_dsn, timeout=10)
            try:
                db = await conn.fetchrow(
                    "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, "
                    "tup_returned, tup_fetched, blks_hit, blks_read "
                    "FROM pg_stat_database WHERE datname = $1",
                    self.b.db,
                )
                wal = await conn.fetchrow(
                    "SELECT wal_records, wal_fpi, wal_bytes::bigint AS wal_bytes, wal_write, "
                    "wal_sync FROM pg_stat_wal"
                )
                lsn = await conn.fetchval(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"
                )
                stmts = None
                if self.pgss:
                    rows = await conn.fetch(
                        "SELECT queryid, query, calls, total_exec_time, rows, "
                        "wal_bytes::bigint AS wal_bytes FROM pg_stat_statements s "
                        "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1",
                        self.b.db,
                    )
                    stmts = {
                        r["queryid"]: {
                            "query": r["query"],
                            "calls": r["calls"],
                            "ms": r["total_exec_time"],
                            "rows": r["rows"],
                            "wal_bytes": r["wal_bytes"],
                        }
                        for r in rows
                    }
                return {
                    "db": dict(db) if db else {},
                    "wal": dict(wal) if wal else {},
                    "lsn": lsn,
                    "statements": stmts,
                }
            finally:
                await conn.close()

        return _run(run())

    def _redis(self) -> dict:
        import redis

        r = redis.Redis.from_url(self.b.redis_url)
        try:
            stats = r.info("commandstats")
        finally:
            r.close()
        return {
            k.removeprefix("cmdstat_"): {"calls": v["calls"], "usec": v["usec"]}
            for k, v in stats.items()
        }

    def snapshot(self) -> dict:
        import time

        return {
            "t": time.time(),
            "sender": process_cpu(self.sender_pid),
            "recipient": process_cpu(self.recipient_pid),
            "postgres": self._postgres_cpu(),
            "redis_cpu": process_cpu(self.b.redis_pid) if self.b.redis_pid else 0.0,
            "pg": self._pg(),
            "redis": self._redis(),
        }

    # ------------------------------------------------------------------ per gesture

    @staticmethod
    def per_gesture(a: dict, b: dict, c: dict, n: int) -> dict:
        """CPU, statements and Redis commands from `a` to `b` (load start to every gesture
        received); PostgreSQL's flushed statistics from `a` to `c` (after SETTLE_S)."""
        n = max(n, 1)

        def us(x: float) -> float:
            return round(1e6 * x / n, 1)

        def groups(key: str) -> float:
            x, y = a["postgres"][key], b["postgres"][key]
            return sum(v - x.get(pid, 0.0) for pid, v in y.items())

        cpu = {
            "sender": us(b["sender"] - a["sender"]),
            "recipient": us(b["recipient"] - a["recipient"]),
            "pg_backends": us(groups("backends")),
            "pg_walwriter": us(groups("walwriter")),
            "pg_other": us(groups("other")),
            "redis": us(b["redis_cpu"] - a["redis_cpu"]),
        }
        cpu["total"] = round(sum(cpu.values()), 1)
        dba, dbc = a["pg"]["db"], c["pg"]["db"]
        wa, wc = a["pg"]["wal"], c["pg"]["wal"]

        def d(x: dict, y: dict, k: str):
            return round((y.get(k, 0) - x.get(k, 0)) / n, 3) if k in y else None

        pg = {
            "commits": d(dba, dbc, "xact_commit"),
            "rollbacks": d(dba, dbc, "xact_rollback"),
            "rows_inserted": d(dba, dbc, "tup_inserted"),
            "rows_updated": d(dba, dbc, "tup_updated"),
            "rows_deleted": d(dba, dbc, "tup_deleted"),
            "wal_bytes": d(wa, wc, "wal_bytes"),
            "wal_records": d(wa, wc, "wal_records"),
            "wal_fpi": d(wa, wc, "wal_fpi"),
            "wal_syncs": d(wa, wc, "wal_sync"),
            "wal_bytes_by_lsn": round((b["pg"]["lsn"] - a["pg"]["lsn"]) / n, 1),
            "statements": None,
            "top_statements": [],
        }
        sa, sb = a["pg"]["statements"], b["pg"]["statements"]
        if sa is not None and sb is not None:
            rows = []
            for qid, s in sb.items():
                calls = s["calls"] - sa.get(qid, {}).get("calls", 0)
                if calls <= 0 or "pg_stat_statements" in s["query"]:
                    continue
                ms = s["ms"] - sa.get(qid, {}).get("ms", 0.0)
                wal = s["wal_bytes"] - sa.get(qid, {}).get("wal_bytes", 0)
                rows.append(
                    {
                        "query": " ".join(s["query"].split())[:160],
                        "per_gesture": round(calls / n, 3),
                        "mean_exec_us": round(1000 * ms / calls, 1),
                        "wal_bytes_per_gesture": round(wal / n, 1),
                    }
                )
            rows.sort(key=lambda r: -r["per_gesture"])
            pg["statements"] = round(sum(r["per_gesture"] for r in rows), 3)
            pg["top_statements"] = rows[:8]
        ra, rb = a["redis"], b["redis"]
        calls = Counter()
        usec = Counter()
        for cmd, v in rb.items():
            calls[cmd] = v["calls"] - ra.get(cmd, {}).get("calls", 0)
            usec[cmd] = v["usec"] - ra.get(cmd, {}).get("usec", 0)
        calls = Counter({k: v for k, v in calls.items() if v > 0 and k != "info"})
        redis = {
            "commands": round(sum(calls.values()) / n, 3),
            "top_commands": [
                {
                    "command": k,
                    "per_gesture": round(v / n, 3),
                    "usec_per_gesture": us(usec[k] / 1e6),
                }
                for k, v in calls.most_common(8)
            ],
        }
        return {"gestures": n, "cpu_us": cpu, "postgres": pg, "redis": redis}

    @staticmethod
    def per_second(a: dict, c: dict) -> dict:
        """The background while nothing is sent: counts per second from `a` to `c`."""
        wall = max(c["t"] - a["t"], 1e-6)
        g = Counters.per_gesture(a, c, c, 1)
        f = 1.0 / wall
        return {
            "window_s": round(wall, 1),
            "cpu_pct": {k: round(v * f / 1e4, 2) for k, v in g["cpu_us"].items()},
            "pg_commits": round((g["postgres"]["commits"] or 0) * f, 2),
            "pg_statements": round((g["postgres"]["statements"] or 0) * f, 2)
            if g["postgres"]["statements"] is not None
            else None,
            "wal_bytes": round((g["postgres"]["wal_bytes"] or 0) * f, 1),
            "redis_commands": round(g["redis"]["commands"] * f, 2),
        }


def print_breakdown(rows: list[dict], idle: dict | None, shared: bool) -> None:
    """The per-gesture table of the delivery step, and each rate's top statements/commands."""
    if not rows:
        return

    def v(x):
        return "-" if x is None else x

    print(
        table(
            "2c. delivery, per gesture: CPU µs by process, PostgreSQL and Redis work",
            [
                "offered/s",
                "gestures",
                "sender µs",
                "recipient µs",
                "pg backends µs",
                "pg walwriter µs",
                "pg other µs",
                "redis µs",
                "total µs",
                "pg stmts",
                "commits",
                "WAL bytes",
                "redis cmds",
            ],
            [
                [
                    r["offered_per_s"],
                    r["gestures"],
                    r["cpu_us"]["sender"],
                    r["cpu_us"]["recipient"],
                    r["cpu_us"]["pg_backends"],
                    r["cpu_us"]["pg_walwriter"],
                    r["cpu_us"]["pg_other"],
                    r["cpu_us"]["redis"],
                    r["cpu_us"]["total"],
                    v(r["postgres"]["statements"]),
                    v(r["postgres"]["commits"]),
                    v(r["postgres"]["wal_bytes"]),
                    r["redis"]["commands"],
                ]
                for r in rows
            ],
        )
    )
    top = rows[-1]
    print(f"   at {top['offered_per_s']}/s, per gesture:")
    print(
        "   redis: "
        + ", ".join(f"{c['command']} {c['per_gesture']}" for c in top["redis"]["top_commands"])
    )
    if top["postgres"]["top_statements"]:
        for s in top["postgres"]["top_statements"]:
            print(
                f"   pg {s['per_gesture']:>6} x {s['mean_exec_us']:>7} µs  "
                f"{s['wal_bytes_per_gesture']:>7} WAL B  {s['query'][:100]}"
            )
    else:
        print("   pg statements: pg_stat_statements not loaded on this server (--own-servers)")
    if idle:
        print(
            f"   idle background over {idle['window_s']} s, per second: "
            f"{idle['pg_commits']} commits, {idle['pg_statements']} statements, "
            f"{idle['wal_bytes']} WAL bytes, {idle['redis_commands']} Redis commands; CPU % "
            + ", ".join(f"{k} {x}" for k, x in idle["cpu_pct"].items())
        )
    if shared:
        print(
            "   (shared servers: WAL, the WAL writer, Redis CPU and commandstats are server-wide "
            "and include other users' work; --own-servers gives the bench's alone)"
        )


# ---------------------------------------------------------------------------- profiles


def py_spy(pid: int, out: Path, duration: float, rate: int = 100) -> subprocess.Popen:
    """py-spy record of one process, folded stacks (speedscope and flamegraph.pl read them),
    aggregated by function, idle threads left out, without pausing the process."""
    exe = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen(
        [
            str(exe),
            "record",
            "-p",
            str(pid),
            "-d",
            str(max(1, round(duration))),
            "-r",
            str(rate),
            "--nonblocking",
            "--function",
            "-f",
            "raw",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _short(frame: str) -> str:
    """`fn (path/to/site-packages/pkg/mod.py:12)` -> `fn (pkg/mod.py:12)`."""
    m = re.match(r"^(.*) \((.*):(\d+)\)$", frame)
    if not m:
        return frame
    fn, path, line = m.groups()
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib"):
                path = path.split("/", 1)[1] if "/" in path else path
            break
    else:
        for root in ("/service/", "/bench/"):
            if root in path:
                path = root.strip("/") + "/" + path.split(root, 1)[1]
                break
    return f"{fn} ({path}:{line})"


# Frames every stack of the loop's thread passes through (uvicorn's start-up): left out of
# the cumulative list, where they would fill the top at ~90 %. `Runner.run` stays in the self
# list: with uvloop, its self time is the loop's own C code (I/O, callbacks, timers).
_WRAPPERS = ("(<frozen runpy>", "(click/", "(uvicorn/main.py", "(uvicorn/__main__.py")
_WRAPPERS += ("(uvicorn/server.py", "(uvicorn/_compat.py", "Runner.run (asyncio/runners.py")


def summarise(folded: Path, top: int = 15) -> dict:
    """Self and cumulative shares of the samples, per frame, from py-spy's folded stacks."""
    self_c: Counter = Counter()
    cum_c: Counter = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = [_short(f) for f in stack.split(";")]
        # py-spy puts the thread (and with -s the process) first, as "thread (0x...)"
        frames = [f for f in frames if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        total += k
        self_c[frames[-1]] += k
        for f in set(frames):
            if not any(w in f for w in _WRAPPERS):
                cum_c[f] += k

    def share(c: Counter) -> list[dict]:
        return [
            {"frame": f, "samples": n, "pct": round(100.0 * n / max(total, 1), 1)}
            for f, n in c.most_common(top)
        ]

    return {"samples": total, "self": share(self_c), "cumulative": share(cum_c)}


def format_profile(name: str, s: dict) -> str:
    out = [f"\n== profile of {name}: {s['samples']} samples (idle threads left out)"]
    if s.get("error"):
        out.append(f"   py-spy failed: {s['error']}")
    out.append("   self %  | frame")
    out += [f"   {r['pct']:6.1f}  | {r['frame']}" for r in s["self"]]
    out.append("   cum %   | frame")
    out += [f"   {r['pct']:6.1f}  | {r['frame']}" for r in s["cumulative"]]
    return "\n".join(out)


def print_profile(name: str, s: dict) -> None:
    print(format_profile(name, s))
