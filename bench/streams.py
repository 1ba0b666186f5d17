"""The `streams` step: what the event streams cost and how fast the package's consumer reads.

1. **The append**, in this process against the bench's Redis: the service's own publishing
   path (`bus.Publisher._send`) over real event payloads, once with PUBLISH only and once
   with PUBLISH + XADD (the default), in batches as the publish loop sends them. Reported: this
   process's CPU and redis-server's per event, the difference, and Redis memory per
   retained entry (`used_memory` before and after).
2. **The consumer**, `service.consumer.Consumer` with a handler that does nothing, in
   processes of its own (`python -m bench.streams --member …`) over streams filled
   beforehand: one member, then a group of four, timed until the group has read and
   acknowledged every entry (XINFO). Target: one member at 20,000 events/s or more.
3. **Lag while delivering**: `delivery_lag_member` is started by the delivery step before its
   rates and stopped after; it records, for each event, the time from its XADD (the entry
   id) to the handler, and the step reports the percentiles per offered rate.
"""

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psutil

from .infra import ROOT, Bench, free_port, process_cpu
from .report import percentiles, table

PARTITIONS = 16


def _payloads(n: int) -> list[tuple[bytes, uuid.UUID]]:
    from service.schemas import Gesture, GestureSent, encoder

    now = datetime.now(UTC)
    out = []
    for i in range(n):
        rel = uuid.uuid4()
        g = Gesture(
            id=uuid.uuid4(),
            relationship_id=rel,
            gesture_type="hug",
            sent_by="partner_a",
            message="thinking of you, see you tonight" if i % 2 else None,
            ai_generated=False,
            sent_at=now,
            delivered_at=None,
            acknowledged_at=None,
            acknowledged_by=None,
            response_gesture_id=None,
            ai_context_used=None,
        )
        event = GestureSent(event_id=uuid.uuid4(), occurred_at=now, relationship_id=rel, gesture=g)
        out.append((encoder.encode(event), rel))
    return out


def _redis_pid(b: Bench) -> int | None:
    import redis

    try:
        return int(redis.Redis.from_url(b.redis_url).info("server")["process_id"])
    except Exception:
        return None


async def _append_cost(b: Bench, n: int, batch: int) -> dict:
    from service import bus, store

    prefix = f"{b.channel_prefix}append-{uuid.uuid4().hex[:6]}:"
    redis = bus.redis_client(b.redis_url, cluster=False, max_connections=4)
    rpid = _redis_pid(b)
    me = psutil.Process()
    rows = [
        store.OutboxRow(f"{prefix}{rel}", payload, rel, datetime.now(UTC))
        for payload, rel in _payloads(n)
    ]
    out = {}
    try:
        for label, partitions in (("publish only", 0), ("publish + XADD", PARTITIONS)):
            pub = bus.Publisher(
                redis,
                None,  # type: ignore[arg-type]  (no PostgreSQL: _send only)
                channel_prefix=prefix,
                event_streams=partitions,
                stream_retention=86400,
                relay_interval=1.0,
                node_ttl=15.0,
                idempotency_hours=24,
                log_retention_days=7,
            )
            mem0 = (await redis.info("memory"))["used_memory"]
            c_me, c_redis, t0 = me.cpu_times(), process_cpu(rpid), time.perf_counter()
            for i in range(0, n, batch):
                if not await pub._send(rows[i : i + batch]):
                    raise RuntimeError("Redis refused the bench's events")
            wall = time.perf_counter() - t0
            c_me2 = me.cpu_times()
            service = (c_me2.user + c_me2.system - c_me.user - c_me.system) / n * 1e6
            redis_us = (process_cpu(rpid) - c_redis) / n * 1e6
            mem1 = (await redis.info("memory"))["used_memory"]
            out[label] = {
                "events": n,
                "batch": batch,
                "service_cpu_us": round(service, 1),
                "redis_cpu_us": round(redis_us, 1),
                "events_per_s": round(n / wall),
                "redis_memory_per_event_b": round((mem1 - mem0) / n) if partitions else None,
            }
        keys = [bus.stream_key(prefix, p) for p in range(PARTITIONS)]
        await redis.delete(*keys)
    finally:
        await bus.close_client(redis)
    with_x, without = out["publish + XADD"], out["publish only"]
    out["xadd_adds"] = {
        "service_cpu_us": round(with_x["service_cpu_us"] - without["service_cpu_us"], 1),
        "redis_cpu_us": round(with_x["redis_cpu_us"] - without["redis_cpu_us"], 1),
    }
    return out


async def _fill(b: Bench, prefix: str, n: int) -> None:
    from service import bus

    redis = bus.redis_client(b.redis_url, cluster=False, max_connections=4)
    try:
        payloads = _payloads(min(n, 5000))
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(n):
                payload, rel = payloads[i % len(payloads)]
                key = bus.stream_key(prefix, bus.partition_of(rel, PARTITIONS))
                pipe.xadd(key, {"event": payload})
                if i % 2000 == 1999:
                    await pipe.execute()
            await pipe.execute()
    finally:
        await bus.close_client(redis)


async def _group_done(b: Bench, prefix: str, group: str, n: int, timeout: float) -> float:
    """Wait until `group` has read and acknowledged `n` entries; the time that took."""
    from service import bus

    redis = bus.redis_client(b.redis_url, cluster=False, max_connections=4)
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < timeout:
            report = await bus.stream_report(redis, prefix, PARTITIONS)
            read = pending = 0
            for p in report:
                for g in p.groups:
                    if g.name == group:
                        read += p.length - (g.lag or 0)
                        pending += g.pending
            if read >= n and pending == 0:
                return time.perf_counter() - t0
            await asyncio.sleep(0.05)
    finally:
        await bus.close_client(redis)
    raise TimeoutError(f"group {group} did not read {n} entries in {timeout} s")


def _member(b: Bench, prefix: str, group: str, name: str, out: Path | None = None, nice: int = 0):
    cmd = [sys.executable, "-m", "bench.streams", "--member", name, "--group", group]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    cmd += ["--prefix", prefix, "--redis-url", b.redis_url]
    if out is not None:
        cmd += ["--lag-file", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def _consumer_rate(b: Bench, n: int, members: int) -> dict:
    import redis.asyncio as aioredis

    from service import bus

    prefix = f"{b.channel_prefix}read-{uuid.uuid4().hex[:6]}:"
    await _fill(b, prefix, n)
    group = "bench"
    client = aioredis.Redis.from_url(b.redis_url)
    for p in range(PARTITIONS):
        await client.xgroup_create(bus.stream_key(prefix, p), group, id="0", mkstream=True)
    procs = [_member(b, prefix, group, f"m{i}") for i in range(members)]
    cpu0 = [0.0] * members
    try:
        took = await _group_done(b, prefix, group, n, timeout=120)
        cpu = [process_cpu(p.pid) - c for p, c in zip(procs, cpu0, strict=True)]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        await client.delete(*[bus.stream_key(prefix, p) for p in range(PARTITIONS)])
        await client.aclose()
    return {
        "members": members,
        "events": n,
        "seconds": round(took, 3),
        "events_per_s": round(n / took),
        "member_cpu_s": [round(c, 2) for c in cpu],
    }


def delivery_lag_member(b: Bench) -> tuple[subprocess.Popen | None, Path]:
    """A member of a group of its own on the services' streams, recording each event's lag
    (for the delivery step); stop it with `stop_lag_member`.

    It stands for another service, which runs on machines of its own: here it shares the
    two cores with the services, so it runs at nice 19 and takes only what they leave
    (BENCH_LAG_MEMBER_NICE=0: at the services' priority, where its 11 % of a core cost
    the held rate about a third on the 2-core machine; BENCH_LAG_MEMBER=0: no member)."""
    out = Path(b.tmp) / "stream-lag.json"
    if os.environ.get("BENCH_LAG_MEMBER") == "0" or not b.lag_member:
        return None, out
    nice = int(os.environ.get("BENCH_LAG_MEMBER_NICE", "19"))
    return _member(b, b.channel_prefix, "bench-lag", "lag", out, nice=nice), out


def stop_lag_member(proc: subprocess.Popen | None, out: Path) -> list[list[float]]:
    if proc is None:
        return []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return []
    try:
        return json.loads(out.read_text())
    except (OSError, ValueError):
        return []


def lag_between(samples: list[list[float]], t0: float, t1: float) -> dict:
    return percentiles([lag for t, lag in samples if t0 <= t <= t1])


def streams(b: Bench, plan, ports: list[int]) -> dict:
    n = 20_000 if plan.quick else 100_000
    append = asyncio.run(_append_cost(b, n, 64))
    one = asyncio.run(_consumer_rate(b, n, 1))
    four = asyncio.run(_consumer_rate(b, n, 4))
    rows = [
        [label, r["events"], r["batch"], r["service_cpu_us"], r["redis_cpu_us"], r["events_per_s"]]
        for label, r in append.items()
        if label != "xadd_adds"
    ]
    rows.append(
        [
            "XADD adds",
            "",
            "",
            append["xadd_adds"]["service_cpu_us"],
            append["xadd_adds"]["redis_cpu_us"],
            "",
        ]
    )
    print(
        table(
            "streams: the append (the service's publish path, this process)",
            ["", "events", "batch", "service CPU µs/event", "redis CPU µs/event", "events/s"],
            rows,
        )
    )
    mem = append["publish + XADD"]["redis_memory_per_event_b"]
    print(f"   Redis memory per retained entry: {mem} B")
    print(
        table(
            "streams: the consumer (service.consumer, a handler that does nothing)",
            ["members", "events", "seconds", "events/s", "target"],
            [
                [1, one["events"], one["seconds"], one["events_per_s"], ">= 20,000"],
                [4, four["events"], four["seconds"], four["events_per_s"], ""],
            ],
        )
    )
    return {"append": append, "consumer_one": one, "consumer_four": four}


# ---------------------------------------------------------------------------- a member


async def _run_member(args: argparse.Namespace) -> list[list[float]]:
    from service.consumer import Consumer

    samples: list[list[float]] = []

    async def handler(delivery) -> None:
        if args.lag_file and delivery.entry_id:
            now = time.time()
            samples.append([now, now * 1000 - int(delivery.entry_id.split("-")[0])])

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with Consumer(
        args.redis_url,
        group=args.group,
        consumer=args.member,
        streams=PARTITIONS,
        prefix=args.prefix,
        batch=args.batch,
    ) as consumer:
        task = asyncio.create_task(consumer.run(handler))
        await stop.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.streams")
    ap.add_argument("--member", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--lag-file")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    samples = asyncio.run(_run_member(args))
    if args.lag_file:
        Path(args.lag_file).write_text(json.dumps(samples))


if __name__ == "__main__":
    main()


async def _empty_delivery_tables(b: Bench) -> None:
    """What a delivery step leaves behind, gone: its gestures, the event log, the nodes of the
    stopped processes, the bench's keys in Redis (streams included). Then the statistics and
    a checkpoint, so that the next step starts where the first one did."""
    import asyncpg

    conn = await asyncpg.connect(b.dsn, timeout=10)
    try:
        await conn.execute("TRUNCATE connection_gestures, gesture_events CASCADE")
        await conn.execute("DELETE FROM gesture_nodes")
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    await b._redis_cleanup()


def _restart(b: Bench, ports: list[int], env: dict[str, str] | None, empty: bool) -> None:
    """Both service processes again with `env`; with `empty`, on emptied tables."""
    for label in ("p1", "p2"):
        if label in b.services:
            b.stop_service(label)
    if empty:
        asyncio.run(_empty_delivery_tables(b))
    for label, port in (("p1", ports[0]), ("p2", ports[1])):
        b.start_service(label, port, env=env)


# The two configurations of `streams_cost`; `paired` runs their windows at each rung in the
# order A B B A, so that what drifts through a rung (the tables growing, the machine's other
# load) weighs on both alike.
COST_CONFIGS: dict[str, dict[str, str] | None] = {"with": None, "without": {"EVENT_STREAMS": "0"}}
# Without `--delivery-rates` in a full run, the ladder of `paired` is this fraction of
# the rate the delivery step held, rung by rung: 5 % apart near it, so that a drop of 10 %
# is two rungs, not a fraction of one.
COST_LADDER = [0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.4]
# When both configurations hold the ladder's top, it goes on, 10 % a rung, up to this many
# (not with --quick).
COST_MOST_RUNGS = 16


def cost_ladder(plan, b: Bench) -> list[int]:
    held = (b.results.get("delivery") or {}).get("highest_held_per_s")
    if plan.delivery_rates_given or plan.quick or not held:
        return list(plan.delivery_rates)
    return sorted({round(held * f / 25) * 25 for f in COST_LADDER})


def streams_cost(b: Bench, plan, ports: list[int]) -> dict:
    """What the streams cost the delivery step's held rate, measured in pairs (`paired`):
    one pair of service processes with the streams and one without (EVENT_STREAMS=0).

    No consumer group reads meanwhile: on this 2-core machine its reads (10 % of a core, and
    Redis's XREADGROUP) would weigh on the runs with the streams only, which is the cost of
    another service, on machines of its own, not of the append (the `delivery` step measures
    the group's lag)."""
    result = paired(
        b,
        plan,
        ports,
        COST_CONFIGS,
        "2e. the streams' cost, windows in pairs: at each rung with, without, without, with "
        "(a rung held: both windows, or two of three, passed)",
    )
    held = result["held_per_s"]
    drop = 1 - (held["with"] or 0) / held["without"] if held["without"] else None
    if drop is not None:
        capped = " (the ladder's top)" if held["without"] == result["ladder"][-1] else ""
        print(
            f"   held with the streams {held['with']}/s, without {held['without']}/s{capped}: "
            f"{drop * 100:+.1f} % (target: a drop of at most 10 %)"
        )
    return {**result, "streams_drop": None if drop is None else round(drop, 3)}


def parse_compare(spec: str) -> dict[str, str]:
    """`VAR=VALUE[,VAR=VALUE...]` of `--compare`, as an environment (ValueError if not)."""
    env = {}
    for part in spec.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or not name.isupper() or not name.replace("_", "").isalnum():
            raise ValueError(f"--compare: {part.strip()!r} is not VAR=VALUE")
        if not value:  # the service reads an empty variable as unset: the default again
            raise ValueError(f"--compare: {name} has no value")
        if name in env:
            raise ValueError(f"--compare: {name} given twice")
        env[name] = value
    if not env:
        raise ValueError("--compare: no VAR=VALUE given")
    return env


def compare(b: Bench, plan, ports: list[int]) -> dict:
    """The service as configured against the same with `--compare VAR=VALUE,...`, measured in
    pairs (`paired`): what a setting, or the change behind it, does to the held rate and the
    CPU a gesture, with what drifts on a shared machine weighing on both alike."""
    if not plan.compare:
        raise ValueError("the compare step needs --compare VAR=VALUE[,VAR=VALUE...]")
    other = parse_compare(plan.compare)
    label = ",".join(f"{k}={v}" for k, v in other.items())
    configs: dict[str, dict[str, str] | None] = {"as configured": None, label: other}
    result = paired(
        b,
        plan,
        ports,
        configs,
        f"2f. as configured against {label}, windows in pairs (order A B B A; a rung held: "
        "both windows, or two of three, passed)",
    )
    held = result["held_per_s"]
    print(f"   held as configured {held['as configured']}/s, with {label} {held[label]}/s")
    return result


def _rig_name(label: str) -> str:
    return "-" + (re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")[:24] or "x")


def paired(
    b: Bench, plan, ports: list[int], configs: dict[str, dict[str, str] | None], title: str
) -> dict:
    """Two configurations of the delivery step measured in pairs: two pairs of service
    processes run side by side on one database and one Redis, the first pair with the first
    configuration's environment (None: as the bench starts them), the second with the
    second's, each with couples and generators of its own. At each rung of the ladder the
    windows run in the order A, B, B, A, one pair loaded at a time; a configuration holds the
    rung when both its windows pass, or (one of two failed) when a third one does. A
    configuration that misses a rung stops there; the ladder goes on for the other.
    Comparing windows 20 s apart, rung by rung, leaves out what a comparison of whole ladders
    run one after the other could not: the tables' growth, a checkpoint, the machine's other
    load, a quarter of an hour later."""
    from . import steps

    first, second = configs
    order = [first, second, second, first]
    ladder = cost_ladder(plan, b)
    print(f"   {'/'.join(configs)}: ladder {ladder}", flush=True)
    rigs: dict[str, steps.DeliveryRig] = {}
    held: dict[str, int | None] = {first: None, second: None}
    rungs: list[dict] = []
    rates, plan.delivery_rates = plan.delivery_rates, ladder
    b.lag_member = False
    try:
        _restart(b, ports, configs[first], empty=True)
        extra = [free_port(), free_port()]
        for label, port in zip(("p3", "p4"), extra, strict=True):
            b.start_service(label, port, env=configs[second])
        # The rigs' names go into generator names, file names and message tags: letters,
        # digits and dashes only.
        rigs[first] = steps.DeliveryRig(b, plan, ports, ("p1", "p2"), _rig_name(first))
        rigs[second] = steps.DeliveryRig(b, plan, extra, ("p3", "p4"), _rig_name(second))
        for rig in rigs.values():
            rig.start(measure_idle=False)
        climbing = [first, second]
        for rate in ladder:
            windows: dict[str, list[dict]] = {name: [] for name in climbing}
            for name in [n for n in order if n in climbing]:
                windows[name].append(rigs[name].window(rate, len(windows[name])))
            for name in climbing:
                if sum(w["held"] for w in windows[name]) == 1:
                    print(f"   {rate}/s {name}: one window of two failed; a third", flush=True)
                    windows[name].append(rigs[name].window(rate, 2))
            rung: dict = {"offered_per_s": rate}
            for name in list(climbing):
                ok = sum(w["held"] for w in windows[name]) >= 2
                rung[name] = {
                    "held": ok,
                    "p99_ms": [w["latency_ms"]["p99"] for w in windows[name]],
                    "p50_ms": [w["latency_ms"]["p50"] for w in windows[name]],
                    "delivered_fraction": [w["delivered_fraction"] for w in windows[name]],
                    "cpu_us_per_gesture": [
                        w["per_gesture"]["cpu_us"]["total"] for w in windows[name]
                    ],
                }
                if ok:
                    held[name] = rate
                else:
                    climbing.remove(name)
            rungs.append(rung)
            if not climbing:
                break
            on = not plan.quick and len(climbing) == 2 and len(ladder) < COST_MOST_RUNGS
            if rate == ladder[-1] and on:
                # Both held the top: a difference cannot be read from two tops, so on, 10 %
                # a rung (not in a quick run, which only shows that the step works).
                ladder.append(round(rate * 1.1 / 25) * 25)
    finally:
        plan.delivery_rates = rates
        b.lag_member = True
        for rig in rigs.values():
            rig.close()
        for label in ("p3", "p4"):
            if label in b.services:
                b.stop_service(label)
        _restart(b, ports, None, empty=True)

    def cells(rung: dict, name: str) -> list:
        r = rung.get(name)
        if r is None:
            return ["-", "-", "-", "-"]
        p50 = " / ".join("-" if x is None else f"{x:.1f}" for x in r["p50_ms"])
        p99 = " / ".join("-" if x is None else f"{x:.0f}" for x in r["p99_ms"])
        cpu = [x for x in r["cpu_us_per_gesture"] if x is not None]
        mean_cpu = round(sum(cpu) / len(cpu)) if cpu else "-"
        return [p50, p99, "yes" if r["held"] else "NO", mean_cpu]

    head = []
    for name in configs:
        head += [f"{name}: p50 ms", "p99 ms", "held", "µs/gesture"]
    print(
        table(
            title,
            ["offered/s", *head],
            [[r["offered_per_s"], *cells(r, first), *cells(r, second)] for r in rungs],
        )
    )
    return {
        "ladder": ladder,
        "order": order,
        "configs": configs,
        "held_per_s": held,
        "rungs": rungs,
        "windows": {name: rig.steps for name, rig in rigs.items()},
    }


def delivery_without_streams(b: Bench, plan, ports: list[int]) -> dict:
    """The delivery step again with EVENT_STREAMS=0 on both processes (no XADD), so that
    what the streams cost the held rate is read within one run: compare with `delivery`."""
    from . import steps

    _restart(b, ports, {"EVENT_STREAMS": "0"}, empty=False)
    try:
        found = steps.delivery(b, plan, ports)
    finally:
        _restart(b, ports, None, empty=False)
    with_streams = (b.results.get("delivery") or {}).get("highest_held_per_s")
    without = found["highest_held_per_s"]
    if with_streams and without:
        drop = 1 - with_streams / without
        found["streams_drop"] = round(drop, 3)
        print(
            f"   held with the streams {with_streams}/s, without {without}/s: "
            f"{drop * 100:+.0f} % (target: a drop of at most 10 %)"
        )
    return found
