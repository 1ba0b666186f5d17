"""Step `cluster`: four service processes on one Redis, then on a local Redis Cluster (three
masters, three replicas), under the same load: pure fan-out (events published straight to
Redis, PUBLISH on one Redis, SPUBLISH on the cluster) and persisted delivery (WS gestures
between partners on different processes). Reports delivered fractions, latency, and the CPU
of each Redis node, which shows whether the pub/sub load spreads over the shards.

Both Redis setups are the bench's own (a redis-server and a `LocalCluster` on free loopback
ports), so no other user of the shared Redis shows in their CPU.
"""

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from tests.support_cluster import LocalCluster, missing_binaries

from .infra import Bench, Gen, free_port
from .report import percentiles, table

PROCESSES = 4
FANOUT_RATE = 3000  # events/s
FANOUT_RELS = 400
DELIVERY_RATE = 600  # gestures/s
DELIVERY_RELS = 200


class _OneRedis:
    """A plain redis-server of the bench's own."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.popen = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        import redis

        deadline = time.time() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.5).ping()
                break
            except redis.RedisError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

    url = property(lambda self: f"redis://127.0.0.1:{self.port}/0")

    def pids(self) -> dict[int, int]:
        return {self.port: self.popen.pid}

    def masters(self) -> list[int]:
        return [self.port]

    def stop(self) -> None:
        self.popen.kill()
        self.popen.wait()


def _cpu(pids: dict[int, int]) -> dict[int, float]:
    out = {}
    for port, pid in pids.items():
        t = psutil.Process(pid).cpu_times()
        out[port] = t.user + t.system
    return out


def _split(items: list, n: int) -> list[list]:
    return [items[i::n] for i in range(n)]


def _measure(b: Bench, target, gens_go, gens_all, recv: list[Gen], tag: str) -> dict:
    """Run one load (gens_go get `go`), and report delivery and CPU per Redis node."""
    pids = target.pids()
    r0, t0 = _cpu(pids), time.time()
    c0 = b.cpu.snapshot(gens_all)
    done = gens_go()
    c1 = b.cpu.snapshot(gens_all)
    r1, t1 = _cpu(pids), time.time()
    sent = sum(d["sent"] for d in done)
    deadline = time.time() + 10
    while time.time() < deadline:
        for g in recv:
            g.send("report", tag=tag, full=False)
        if sum(g.expect("report", 30)["n"] for g in recv) >= sent:
            break
        time.sleep(0.25)
    for g in recv:
        g.send("report", tag=tag, full=True)
    reps = [g.expect("report", 30) for g in recv]
    got = sum(r["n"] for r in reps)
    cpu = b.cpu.delta(c0, c1)
    return {
        "sent": sent,
        "sent_per_s": round(sent / max(d["elapsed"] for d in done), 1),
        "received": got,
        "delivered_fraction": round(got / sent, 5) if sent else 0.0,
        "latency_ms": percentiles([x for r in reps for x in r["lat"]]),
        "service_pct": cpu["service_pct"],
        "postgres_pct": cpu["postgres_pct"],
        "redis_node_pct": _node_pct(target, r0, r1, t1 - t0),
    }


def _node_pct(target, r0: dict, r1: dict, wall: float) -> dict[str, float]:
    masters = set(target.masters())
    return {
        f"{port}{'' if port in masters else ' (replica)'}": round(
            100.0 * (r1[port] - r0[port]) / wall, 1
        )
        for port in r0
    }


def _run_on(b: Bench, name: str, target, cluster: bool) -> dict:
    saved = b.redis_url, b.redis_cluster
    b.redis_url, b.redis_cluster = target.url, cluster
    services = []
    gens: list[Gen] = []
    try:
        ports = [free_port() for _ in range(PROCESSES)]
        for i, port in enumerate(ports):
            services.append(f"{name}-{i}")
            b.start_service(f"{name}-{i}", port)
        out = {}

        # Fan-out: receivers spread over the four processes, events published straight on.
        rels = b.seed(FANOUT_RELS)
        receivers = [
            [ports[i % PROCESSES], rid, b.token(bb)] for i, (rid, _, bb) in enumerate(rels)
        ]
        recv = [
            b.gen(f"{name}-fan-recv-{i}", "ws", 300, gen=i, clients=part)
            for i, part in enumerate(_split(receivers, 2))
        ]
        pubs = [
            b.gen(
                f"{name}-fan-pub-{i}",
                "redis_pub",
                300,
                gen=i,
                rels=[r[0] for r in part],
                redis_url=target.url,
                channel_prefix=b.channel_prefix,
                cluster=cluster,
            )
            for i, part in enumerate(_split(rels, 2))
        ]
        gens += recv + pubs
        for g in recv:
            r = g.expect("ready", 60)
            if r["connected"] != r["total"]:
                raise RuntimeError(f"{name}: only {r['connected']}/{r['total']} connected")
        for g in pubs:
            g.expect("ready", 30)

        # The Redis nodes' own idle cost (cluster bus gossip, cron, the services' heartbeats)
        # with the sockets connected and no load, to subtract from the loaded figures.
        pids = target.pids()
        r0, t0 = _cpu(pids), time.time()
        time.sleep(5.0)
        r1, t1 = _cpu(pids), time.time()
        out["idle_redis_node_pct"] = _node_pct(target, r0, r1, t1 - t0)

        def fan() -> list[dict]:
            for g in pubs:
                g.send("go", rate=FANOUT_RATE / len(pubs), duration=8.0, tag=f"{name}f")
            return [g.expect("done", 60) for g in pubs]

        out["fanout"] = _measure(b, target, fan, recv + pubs, recv, f"{name}f")
        b.stop_gens(recv + pubs)

        # Persisted delivery: partner A on process i sends, partner B on process i+1 receives.
        rels = b.seed(DELIVERY_RELS)
        senders = [[ports[i % PROCESSES], rid, b.token(a)] for i, (rid, a, _) in enumerate(rels)]
        receivers = [
            [ports[(i + 1) % PROCESSES], rid, b.token(bb)] for i, (rid, _, bb) in enumerate(rels)
        ]
        recv = [
            b.gen(f"{name}-dlv-recv-{i}", "ws", 300, gen=i, clients=part)
            for i, part in enumerate(_split(receivers, 2))
        ]
        send = [
            b.gen(f"{name}-dlv-send-{i}", "ws", 300, gen=i, clients=part)
            for i, part in enumerate(_split(senders, 2))
        ]
        gens += recv + send
        for g in recv + send:
            r = g.expect("ready", 60)
            if r["connected"] != r["total"]:
                raise RuntimeError(f"{name}: only {r['connected']}/{r['total']} connected")

        def deliver() -> list[dict]:
            for g in send:
                g.send("go", rate=DELIVERY_RATE / len(send), duration=8.0, tag=f"{name}d")
            return [g.expect("done", 60) for g in send]

        out["delivery"] = _measure(b, target, deliver, recv + send, recv, f"{name}d")
        out["delivery"]["persisted"] = b.query(
            "SELECT count(*) FROM connection_gestures WHERE message LIKE $1", f"b|{name}d|%"
        )
        return out
    finally:
        b.stop_gens([g for g in gens if g in b.gens])
        for s in services:
            if s in b.services:
                b.stop_service(s)
        b.redis_url, b.redis_cluster = saved


def cluster(b: Bench, plan, ports: list[int]) -> dict:
    if (reason := missing_binaries()) is not None:
        raise RuntimeError(f"cluster step needs a local Redis Cluster: {reason}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    one = _OneRedis(workdir)
    many = LocalCluster(workdir / "cluster")
    try:
        many.start()
        result = {
            "processes": PROCESSES,
            "fanout_rate": FANOUT_RATE,
            "delivery_rate": DELIVERY_RATE,
            "one_redis": _run_on(b, "one", one, cluster=False),
            "cluster": _run_on(b, "cluster", many, cluster=True),
        }
    finally:
        one.stop()
        many.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for target in ("one_redis", "cluster"):
        idle = result[target]["idle_redis_node_pct"]
        masters = " ".join(f"{v}" for k, v in sorted(idle.items()) if "replica" not in k)
        replicas = " ".join(f"{v}" for k, v in sorted(idle.items()) if "replica" in k)
        blank = [None] * 7
        rows.append([target, "idle", *blank, round(sum(idle.values()), 1), masters, replicas, None])
        for kind in ("fanout", "delivery"):
            r = result[target][kind]
            nodes = sorted(r["redis_node_pct"].items())
            # Redis CPU (all nodes, idle subtracted) per gesture or event, in microseconds.
            busy = sum(v for _, v in nodes) - sum(idle.values())
            r["redis_us_per_item"] = round(10_000.0 * busy / r["sent_per_s"], 1)
            rows.append(
                [
                    target,
                    kind,
                    r["sent_per_s"],
                    round(100 * r["delivered_fraction"], 2),
                    r.get("persisted"),
                    r["latency_ms"]["p50"],
                    r["latency_ms"]["p99"],
                    r["service_pct"],
                    r["postgres_pct"],
                    sum(v for _, v in nodes),
                    " ".join(f"{v}" for k, v in nodes if "replica" not in k),
                    " ".join(f"{v}" for k, v in nodes if "replica" in k),
                    r["redis_us_per_item"],
                ]
            )
    print(
        table(
            f"6. cluster: {PROCESSES} processes on one Redis vs a 3-master cluster, same load "
            f"(fan-out {FANOUT_RATE}/s published to Redis; delivery {DELIVERY_RATE}/s WS gestures)",
            [
                "redis",
                "load",
                "per s",
                "deliv %",
                "persisted",
                "p50 ms",
                "p99 ms",
                "svc cpu%",
                "pg cpu%",
                "redis cpu% sum",
                "masters cpu%",
                "replicas cpu%",
                "redis µs/item",
            ],
            rows,
        )
    )
    return result
