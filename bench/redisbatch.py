"""`python -m bench.redisbatch [--redis URL] [--batches N] [--out FILE]`: what a batch of the
publisher's commands costs this process, sent through redis-py's pipeline and through
`service.resp` (hand-encoded, replies read from the parser), in one run.

The batch is the publisher's: for each of 20 events a PUBLISH of a 300-byte payload, then,
with the streams, an XADD of it to one of 16 partitions. Reported: this process's CPU a
command and the wall time a batch, for PUBLISH alone and PUBLISH + XADD, each way. The keys
are the bench's own (`bench-redisbatch-<hex>:`) and deleted after.
"""

import argparse
import asyncio
import json
import os
import secrets
import time
from pathlib import Path

import redis.asyncio as aioredis

from service import resp

from .report import table

EVENTS = 20


async def _run(url: str, batches: int) -> list[dict]:
    client = aioredis.Redis.from_url(url)
    prefix = f"bench-redisbatch-{secrets.token_hex(4)}:"
    payload = os.urandom(300)
    channels = [f"{prefix}ch:{i}".encode() for i in range(EVENTS)]
    streams = [f"{prefix}stream:{i % 16}".encode() for i in range(EVENTS)]

    async def pipeline(xadd: bool) -> None:
        minid = int(time.time() * 1000) - 86_400_000
        async with client.pipeline(transaction=False) as pipe:
            for channel, stream in zip(channels, streams, strict=True):
                pipe.publish(channel, payload)
                if xadd:
                    pipe.xadd(stream, {"event": payload}, minid=minid, approximate=True)
            await pipe.execute()

    async def by_hand(xadd: bool) -> None:
        minid = b"%d" % (int(time.time() * 1000) - 86_400_000)
        commands = []
        for channel, stream in zip(channels, streams, strict=True):
            commands.append(resp.command(b"PUBLISH", channel, payload))
            if xadd:
                commands.append(
                    resp.command(b"XADD", stream, b"MINID", b"~", minid, b"*", b"event", payload)
                )
        await resp.execute(client, commands, 2.0)

    rows = []
    try:
        for xadd in (False, True):
            for name, send in (("redis-py pipeline", pipeline), ("service.resp", by_hand)):
                for _ in range(50):  # warm: connections, caches
                    await send(xadd)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                for _ in range(batches):
                    await send(xadd)
                cpu = time.process_time() - cpu0
                wall = time.perf_counter() - wall0
                commands = batches * EVENTS * (2 if xadd else 1)
                rows.append(
                    {
                        "commands": "PUBLISH + XADD" if xadd else "PUBLISH",
                        "way": name,
                        "cpu_us_per_command": round(cpu / commands * 1e6, 2),
                        "wall_ms_per_batch": round(wall / batches * 1e3, 3),
                    }
                )
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.redisbatch", description=__doc__)
    ap.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--out", default="bench/results/redisbatch.json")
    args = ap.parse_args()
    rows = asyncio.run(_run(args.redis, args.batches))
    print(
        table(
            f"a batch of {EVENTS} events to Redis: this process's CPU a command",
            ["commands", "way", "CPU µs a command", "ms a batch"],
            [
                [r["commands"], r["way"], r["cpu_us_per_command"], r["wall_ms_per_batch"]]
                for r in rows
            ],
        )
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "batches": args.batches,
                "events_a_batch": EVENTS,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
