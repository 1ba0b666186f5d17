"""What a gesture costs PostgreSQL by batch size: `python -m bench.pgcost [--dsn DSN]`.

Runs the service's own two statements of a delivered gesture, `store.insert_sent` (the
gesture and its `gesture.sent` event) and `store.mark_delivered_from` (the delivery mark and
its event), on one connection, each its own commit as in the service, in batches of 1, 4 and
16 gestures, and reads the backend's CPU from /proc (user and system apart: the system part
is mostly the socket and the commit's WAL flush). Once with PostgreSQL's default plan cache
and once with `plan_cache_mode=force_generic_plan` (no planning per execution).

It makes a database of its own on the server of `--dsn` (default: the tests' server),
migrates it and drops it at the end. The backend must run on this machine (its CPU is read
from /proc). Prints a table and writes the figures to `--out` (JSON).
"""

import argparse
import asyncio
import json
import os
import secrets
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from service import store

from .report import table

GESTURES = 3000
BATCHES = (1, 4, 16)
MODES = ("auto", "force_generic_plan")


def _cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def _measure(dsn: str, mode: str, batch: int) -> dict:
    conn = await asyncpg.connect(dsn, server_settings={"plan_cache_mode": mode})
    try:
        rid = uuid.uuid4()
        await conn.execute(
            "INSERT INTO relationships (id, partner_a_id, partner_b_id) VALUES ($1, 'a', 'b')",
            rid,
        )
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        payload = b'{"type":"gesture.sent","payload":"' + b"x" * 300 + b'"}'
        u0, s0 = _cpu(pid)
        for _ in range(GESTURES // batch):
            new = [
                store.NewGesture(rid, "hug", "partner_a", "a short note", False)
                for _ in range(batch)
            ]
            events = [("gestures:bench", payload, rid)] * batch
            await store.insert_sent(conn, new, events, 0)
            await store.mark_delivered_from(conn, [g.id for g in new], datetime.now(UTC), events, 0)
        u1, s1 = _cpu(pid)
    finally:
        await conn.close()
    n = (GESTURES // batch) * batch
    return {
        "plan_cache_mode": mode,
        "batch": batch,
        "gestures": n,
        "user_us": round((u1 - u0) / n * 1e6),
        "system_us": round((s1 - s0) / n * 1e6),
    }


async def run(admin_dsn: str) -> list[dict]:
    name = f"bench_pgcost_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = admin_dsn.rsplit("/", 1)[0] + "/" + name
        try:
            conn = await asyncpg.connect(dsn)
            try:
                await store.apply_migrations(conn, lambda _: None)
            finally:
                await conn.close()
            found = []
            for mode in MODES:
                for batch in BATCHES:
                    print(f"   plan_cache_mode={mode}, batches of {batch} ...", flush=True)
                    found.append(await _measure(dsn, mode, batch))
            return found
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default="postgresql://root@127.0.0.1:5432/postgres")
    ap.add_argument("--out", default="bench/results/pgcost.json")
    args = ap.parse_args()
    found = asyncio.run(run(args.dsn))
    print(
        table(
            f"PostgreSQL backend CPU a delivered gesture ({GESTURES} gestures a row)",
            ["plan cache", "batch", "user µs", "system µs", "total µs"],
            [
                [
                    r["plan_cache_mode"],
                    r["batch"],
                    r["user_us"],
                    r["system_us"],
                    r["user_us"] + r["system_us"],
                ]
                for r in found
            ],
        )
    )
    Path(args.out).write_text(json.dumps({"rows": found}, indent=1))
    print(f"figures in {args.out}")


if __name__ == "__main__":
    main()
