"""`python -m service status`: the deployment at a glance, from PostgreSQL and Redis alone.

* Processes: every service process registers in `gesture_nodes` when it starts and beats
  every RELAY_INTERVAL seconds (host, port, pid, version, start, sockets held); one whose
  beat is older than NODE_TTL is shown as gone until a survivor has taken over its events.
* The outbox: events of the log that may not have reached Redis yet, and the oldest's age.
* The event streams: each partition's length, each consumer group's lag, pending entries,
  dead letters and catch-ups (what `service.consumer` records).

It reads; it changes nothing.
"""

from datetime import UTC, datetime
from typing import Any

from . import bus, store


async def gather(
    database_url: str,
    redis_url: str,
    *,
    cluster: bool,
    prefix: str,
    partitions: int,
    node_ttl: float,
    grace: float,
) -> dict[str, Any]:
    """Everything `status` shows, as plain data (what `--json` prints)."""
    pool = await store.create_pool(database_url, min_size=1, max_size=1, timeout=5.0)
    try:
        async with store.connection(pool) as conn:
            if missing := await store.missing_migrations(conn):
                raise RuntimeError(
                    f"migrations missing ({', '.join(missing)}): run `python -m service migrate`"
                )
            nodes = await store.nodes(conn, node_ttl)
            waiting, oldest = await store.outbox_backlog(conn, grace)
    finally:
        await pool.close()
    redis = bus.redis_client(redis_url, cluster=cluster, max_connections=4)
    try:
        report = await bus.stream_report(redis, prefix, partitions)
        counts = await bus.consumer_counts(
            redis, prefix, {g.name for p in report for g in p.groups}
        )
    finally:
        await bus.close_client(redis)
    groups: dict[str, dict[str, Any]] = {}
    for p in report:
        for g in p.groups:
            found = groups.setdefault(g.name, {"lag": 0, "pending": 0, "lag_known": True})
            found["pending"] += g.pending
            if g.lag is None:
                found["lag_known"] = False
            else:
                found["lag"] += g.lag
    for name, found in groups.items():
        if not found.pop("lag_known"):
            found["lag"] = None
        found["catchups"] = counts.get(name, {}).get("catchups", 0)
        found["dead_lettered"] = counts.get(name, {}).get("dead_letters", 0)
    now = datetime.now(UTC)
    return {
        "processes": [
            {
                "node": n.node,
                "host": n.host,
                "port": n.port,
                "pid": n.pid,
                "version": n.version,
                "started_at": n.started_at.isoformat(),
                "beat_seconds_ago": round((now - n.seen_at).total_seconds(), 1),
                "sockets": n.sockets,
                "up": n.alive,
            }
            for n in nodes
        ],
        "outbox": {"waiting": waiting, "oldest_seconds": round(oldest, 1)},
        "streams": {
            "partitions": [
                {
                    "partition": p.partition,
                    "length": p.length,
                    "first_id": p.first_id,
                    "last_id": p.last_id,
                    "dead_letters": p.dead_letters,
                }
                for p in report
            ],
            "groups": groups,
        },
    }


def render(found: dict[str, Any]) -> str:
    """The same as a person reads it."""
    lines = []
    procs = found["processes"]
    up = [p for p in procs if p["up"]]
    lines.append(f"Processes: {len(up)} up, {len(procs) - len(up)} gone (not yet taken over)")
    if procs:
        lines += _table(
            ["node", "state", "host", "port", "pid", "version", "started", "beat", "sockets"],
            [
                [
                    p["node"],
                    "up" if p["up"] else "gone",
                    p["host"],
                    p["port"] if p["port"] is not None else "-",
                    p["pid"] if p["pid"] is not None else "-",
                    p["version"],
                    p["started_at"][:19].replace("T", " "),
                    f"{p['beat_seconds_ago']:.1f}s ago",
                    p["sockets"],
                ]
                for p in procs
            ],
        )
    outbox = found["outbox"]
    state = "draining" if outbox["waiting"] else "empty"
    lines.append("")
    lines.append(
        f"Outbox: {outbox['waiting']} events not yet on Redis"
        + (f", oldest {outbox['oldest_seconds']:.1f}s" if outbox["waiting"] else "")
        + f" ({state})"
    )
    streams = found["streams"]
    parts = streams["partitions"]
    lines.append("")
    lines.append(
        f"Event streams: {len(parts)} partitions, {sum(p['length'] for p in parts)} entries, "
        f"{sum(p['dead_letters'] for p in parts)} dead letters"
    )
    groups = streams["groups"]
    if groups:
        lines += _table(
            ["group", "lag", "pending", "dead-lettered", "catch-ups"],
            [
                [
                    name,
                    "unknown (Redis < 7)" if g["lag"] is None else g["lag"],
                    g["pending"],
                    g["dead_lettered"],
                    g["catchups"],
                ]
                for name, g in sorted(groups.items())
            ],
        )
    else:
        lines.append("  no consumer group yet")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
