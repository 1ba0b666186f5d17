"""The four measurements. Each takes the `Bench` and a `Plan` and returns a dict of figures
(and prints its table)."""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import breakdown
from . import streams as bench_streams
from .breakdown import IDLE_WINDOW_S, SETTLE_S, Counters
from .infra import WS_PROTOCOL, Bench, Gen, free_port, process_cpu
from .report import CPU_HEADERS, cpu_cells, percentiles, table
from .servers import redis_events, server_events


@dataclass
class Plan:
    quick: bool
    write_concurrency: list[int] = field(default_factory=lambda: [32, 128])
    write_gens: int = 2
    write_duration: float = 12.0
    write_rels: int = 500
    delivery_rates: list[int] = field(
        default_factory=lambda: [200, 500, 1000, 2000, 2500, 3000, 3500, 4000, 6000, 8000]
    )
    # Set by `--delivery-rates`; otherwise `streams_cost` climbs a ladder of its own around
    # the rate the delivery step held (`streams.cost_ladder`).
    delivery_rates_given: bool = False
    # `--compare VAR=VALUE,...`: the second configuration of the `compare` step.
    compare: str | None = None
    delivery_duration: float = 8.0
    delivery_rels: int = 200
    # Windows more for a rung that fails its first (held: two of them pass); 0: one window.
    delivery_retries: int = 0
    # `--profile [DIR]`: py-spy samples both service processes during the delivery step's
    # `profile_rate` (folded stacks and a summary saved in `profile_dir`).
    profile_dir: str | None = None
    profile_rate: int = 1000
    fanout_rates: list[int] = field(default_factory=lambda: [1000, 2000, 4000, 7000, 10000, 14000])
    fanout_duration: float = 8.0
    fanout_rels: int = 200
    latency_rate: int = 200
    latency_duration: float = 20.0
    connections: int = 15000
    per_gen_sockets: int = 3750
    hold_delivery_duration: float = 15.0
    # The service's CPU while the sockets are held and idle: after `idle_settle` seconds
    # (the last connects' joins and greetings), over `idle_window` seconds.
    idle_settle: float = 10.0
    idle_window: float = 60.0
    # One gesture to every held socket, sent over HTTP at this rate, before RSS is read again.
    touch_rate: int = 1000
    # uvicorn --ws values compared with the project's own protocol (the main run): uvicorn's
    # wsproto and websockets-sansio with the project's keepalive (item 5 of issue 7), and
    # uvicorn's plain wsproto as it ships.
    ws_impls: list[str] = field(
        default_factory=lambda: [
            "service.wsserver:WsprotoProtocol",
            "service.wsserver:SansioWSProtocol",
            "wsproto",
        ]
    )
    ws_compare_connections: int = 5000
    # The socket.io peer: the delivery and fan-out rates together, and beyond them.
    socketio_rates: list[int] = field(
        default_factory=lambda: [200, 500, 1000, 2000, 4000, 6000, 7000, 8000, 10000, 14000]
    )

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            write_duration=3.0,
            delivery_rates=[200, 1000, 2000, 4000],
            delivery_duration=3.0,
            fanout_rates=[1000, 4000, 7000],
            fanout_duration=3.0,
            latency_duration=5.0,
            connections=2000,
            per_gen_sockets=1000,
            hold_delivery_duration=5.0,
            idle_settle=3.0,
            idle_window=10.0,
            ws_impls=[],
            ws_compare_connections=0,
            socketio_rates=[200, 1000, 2000, 4000, 7000, 10000],
        )


def _split(items: list, n: int) -> list[list]:
    return [items[i::n] for i in range(n)]


def _ready_all(gens: list[Gen], timeout: float) -> list[dict]:
    return [g.expect("ready", timeout) for g in gens]


def _report_all(gens: list[Gen], tag: str, full: bool = True) -> list[dict]:
    for g in gens:
        g.send("report", tag=tag, full=full)
    return [g.expect("report", 30) for g in gens]


WARM_UP_S = 3.0


def _warm_up(send: list[Gen], recv: list[Gen], rate: float, seconds: float) -> None:
    for g in send:
        g.send("go", rate=rate / len(send), duration=seconds, tag="warm")
    done = [g.expect("done", seconds + 30) for g in send]
    _wait_received(recv, "warm", sum(d["sent"] for d in done), 0.3, 5.0)


def _late_by_second(reports: list[dict], t0: float) -> dict[int, int]:
    """Deliveries later than 50 ms, by whole second since `t0`: one stall or a spread tail."""
    late: dict[int, int] = {}
    for r in reports:
        for second, n in (r.get("slow") or {}).items():
            k = int(second) - int(t0)
            late[k] = late.get(k, 0) + n
    return dict(sorted(late.items()))


def _stages_by_second(b: Bench, tag: str, t0: float) -> dict[int, tuple[float, float]]:
    """From the rows themselves, by whole second of the send since `t0`: the longest time
    from a generator's send to PostgreSQL starting the gesture's INSERT (`sent_at`: the WS
    read, the rate limit, the group commit's queue) and to the recipient's process marking
    it delivered (`delivered_at`: the commit, Redis, the push), in ms. Where a stall fell."""
    found = b.query(
        """SELECT coalesce(json_agg(json_build_array(sec, before_insert, before_mark)), '[]')
        FROM (SELECT floor(stamp)::bigint AS sec,
                     round(max(extract(epoch FROM sent_at) - stamp) * 1000) AS before_insert,
                     round(max(extract(epoch FROM delivered_at) - stamp) * 1000) AS before_mark
              FROM (SELECT split_part(message, '|', 4)::float8 AS stamp, sent_at, delivered_at
                    FROM connection_gestures WHERE message LIKE $1) AS r
              GROUP BY 1) AS s""",
        f"b|{tag}|%",
    )
    return {
        int(sec) - int(t0): (before_insert, before_mark)
        for sec, before_insert, before_mark in json.loads(found)
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _wait_received(gens: list[Gen], tag: str, expected: int, settle: float, limit: float) -> None:
    """Wait for the receivers to have `expected` stamped frames, at most `limit` seconds."""
    time.sleep(settle)
    deadline = time.time() + limit
    while time.time() < deadline:
        got = sum(r["n"] for r in _report_all(gens, tag, full=False))
        if got >= expected:
            return
        time.sleep(0.25)


# ---------------------------------------------------------------------------- 1. write path


def write_path(b: Bench, plan: Plan, ports: list[int]) -> dict:
    rels = b.seed(plan.write_rels)
    targets = []
    for rid, a, bb in rels:
        targets.append([ports[0], rid, b.token(a), "partner_a"])
        targets.append([ports[0], rid, b.token(bb), "partner_b"])
    rel_ids = [r[0] for r in rels]
    out = {"relationships": len(rels), "runs": []}
    rows = []
    for conc in plan.write_concurrency:
        per = conc // plan.write_gens
        run = {"concurrency": conc}
        for kind in ("service", "ceiling"):
            deadline = plan.write_duration + 90
            gens = []
            pool = None
            # Measured now: the services' pools have grown during their run.
            free = b.pg_free_connections() if kind == "ceiling" else 0
            for i in range(plan.write_gens):
                if kind == "service":
                    gens.append(
                        b.gen(
                            f"write{conc}-{i}",
                            "http",
                            deadline,
                            gen=i,
                            targets=_split(targets, plan.write_gens)[i],
                            ports=ports,
                            concurrency=per,
                            warmup=1.0,
                        )
                    )
                else:
                    # One commit per row over as many connections as the clients, bounded by
                    # what PostgreSQL (max_connections) has left for us.
                    pool = max(1, min(per, (free - 8) // plan.write_gens))
                    gens.append(
                        b.gen(
                            f"ceiling{conc}-{i}",
                            "ceiling",
                            deadline,
                            concurrency=per,
                            pool=pool,
                            rels=rel_ids,
                            dsn=b.dsn,
                            redis_url=b.redis_url,
                            channel_prefix=b.channel_prefix,
                        )
                    )
            try:
                _ready_all(gens, 30)
                for g in gens:
                    g.send("go", duration=plan.write_duration, warmup=1.0)
                time.sleep(1.0)
                c0 = b.cpu.snapshot(gens)
                done = [g.expect("done", plan.write_duration + 60) for g in gens]
                cpu = b.cpu.delta(c0, b.cpu.snapshot(gens))
            finally:
                b.stop_gens(gens)
            lat = [x for d in done for x in d["lat"]]
            ok = sum(d["ok"] for d in done)
            res = {
                "per_s": round(ok / plan.write_duration, 1),
                "ok": ok,
                "latency_ms": percentiles(lat),
                "cpu": cpu,
                "statuses": _merge([d.get("statuses", {}) for d in done]),
                "errors": sum(d.get("errors", 0) for d in done),
            }
            if pool is not None:
                res["pg_connections_per_process"] = pool
            run[kind] = res
            rows.append(
                [
                    kind,
                    conc,
                    res["per_s"],
                    res["latency_ms"]["p50"],
                    res["latency_ms"]["p99"],
                    *cpu_cells(cpu),
                ]
            )
        ceiling = run["ceiling"]["per_s"]
        run["ratio"] = round(run["service"]["per_s"] / ceiling, 3) if ceiling else None
        out["runs"].append(run)
    print(
        table(
            "1. write path: POST /api/gestures/send via 2 processes vs bare INSERT+PUBLISH loop",
            ["what", "clients", "per s", "p50 ms", "p99 ms", *CPU_HEADERS],
            rows,
        )
    )
    for run in out["runs"]:
        print(
            f"   {run['concurrency']} clients: service / ceiling = {run['ratio']}x "
            f"(target >= 1.0x); service statuses {run['service']['statuses']}"
        )
    return out


def _merge(dicts: list[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


# ---------------------------------------------------------------------------- 2. delivery


def _ws_gens(b: Bench, prefix: str, clients: list, n: int, deadline: float, **kw) -> list[Gen]:
    return [
        b.gen(f"{prefix}-{i}", "ws", deadline, gen=i, clients=part, **kw)
        for i, part in enumerate(_split(clients, n))
    ]


class DeliveryRig:
    """One pair of service processes under the delivery load: `plan.delivery_rels` couples
    whose senders hold sockets on the first process and whose recipients on the second,
    connected, measured idle and warmed up by `start`; `window` offers one rate for one
    window and returns its figures. `delivery` climbs one rig's ladder; `streams_cost`
    interleaves the windows of two rigs, one with the streams and one without."""

    def __init__(
        self, b: Bench, plan: Plan, ports: list[int], labels=("p1", "p2"), name: str = ""
    ) -> None:
        self.b, self.plan, self.labels, self.name = b, plan, labels, name
        b.delivery_runs += 1
        self.run = b.delivery_runs
        self.rels = b.seed(plan.delivery_rels)
        senders_c = [[ports[0], rid, b.token(a)] for rid, a, _ in self.rels]
        receivers_c = [[ports[1], rid, b.token(bb)] for rid, _, bb in self.rels]
        rungs = len(plan.delivery_rates)
        if name:  # an interleaved rig's ladder may go on past its top (`streams_cost`)
            rungs = max(rungs, bench_streams.COST_MOST_RUNGS)
        most_windows = rungs * (1 + max(plan.delivery_retries, 2))
        deadline = most_windows * (plan.delivery_duration + 40) + 60
        deadline += (most_windows + 2) * SETTLE_S + IDLE_WINDOW_S + WARM_UP_S + 40
        if name:  # an interleaved rig waits through the other rig's windows too
            deadline *= 2
        self.recv = _ws_gens(b, f"dlv-recv{name}", receivers_c, 2, deadline)
        self.send = _ws_gens(b, f"dlv-send{name}", senders_c, 2, deadline)
        self.gens = self.recv + self.send
        self.counters = Counters(b, b.services[labels[0]].pid, b.services[labels[1]].pid)
        # A consumer group reads the event streams throughout: its lag at each rate.
        self.lag_member, self.lag_file = bench_streams.delivery_lag_member(b)
        self.windows: list[tuple[int, float, float]] = []
        self.steps: list[dict] = []
        self.idle: dict | None = None
        self.profile: dict | None = None

    def start(self, measure_idle: bool = True) -> None:
        for r in _ready_all(self.gens, 60):
            if r["connected"] != r["total"]:
                raise RuntimeError(f"delivery: only {r['connected']}/{r['total']} connected")
        # The connects' statistics reach pg_stat_database first; then the background (relay
        # polls, presence beats) while every socket is up and idle.
        time.sleep(SETTLE_S)
        if measure_idle:
            k_idle = self.counters.snapshot()
            time.sleep(IDLE_WINDOW_S)
            self.idle = Counters.per_second(k_idle, self.counters.snapshot())
        # A warm-up, measured by none of the rows: the processes' first burst opens their
        # pool's connections, whose first statements are prepared and whose types are
        # introspected (a stall of about 200 ms, once, not the cost of a gesture). Every
        # run of this step (with and without the streams) pays it here alike.
        _warm_up(self.send, self.recv, self.plan.delivery_rates[0], WARM_UP_S)
        time.sleep(SETTLE_S)

    def window(self, rate: int, attempt: int) -> dict:
        """Offer `rate` for one window: delivered fraction, latency, CPU by process and per
        gesture; held when every gesture arrived and p99 <= 50 ms."""
        b, plan = self.b, self.plan
        tag = f"d{rate}{self.name}" + (f"r{self.run}" if self.run > 1 else "")
        tag += f"w{attempt}" if attempt else ""
        # From now, not from this rig's last window: another rig's windows may lie between.
        k0 = self.counters.snapshot()
        spies = []
        if plan.profile_dir and rate == plan.profile_rate and not self.name:
            spies = _start_profiles(b, plan)
        c0 = b.cpu.snapshot(self.gens)
        m0 = process_cpu(self.lag_member.pid if self.lag_member else None)
        t_go = time.time()
        for g in self.send:
            g.send("go", rate=rate / len(self.send), duration=plan.delivery_duration, tag=tag)
        done = [g.expect("done", plan.delivery_duration + 30) for g in self.send]
        t_done = time.time()
        member_cpu = process_cpu(self.lag_member.pid if self.lag_member else None) - m0
        self.windows.append((rate, t_go, t_done + 1.0))
        cpu = b.cpu.delta(c0, b.cpu.snapshot(self.gens))
        sent = sum(d["sent"] for d in done)
        _wait_received(self.recv, tag, sent, 0.3, 5.0)
        k1 = self.counters.snapshot()
        if spies:
            self.profile = _finish_profiles(plan, rate, spies)
        reps = _report_all(self.recv, tag)
        got = sum(r["n"] for r in reps)
        lat = percentiles([x for r in reps for x in r["lat"]])
        late = _late_by_second(reps, t_go)
        pg_events = server_events(b.pg_log, t_go, t_done)
        redis_stalls = redis_events(b.redis_url if b.pg_log else None, t_go, t_done)
        persisted = b.query(
            "SELECT count(*) FROM connection_gestures WHERE message LIKE $1", f"b|{tag}|%"
        )
        achieved = sent / max(d["elapsed"] for d in done)
        frac = got / sent if sent else 0.0
        ok = frac >= 1.0 and lat["p99"] is not None and lat["p99"] <= 50.0
        step = {
            "offered_per_s": rate,
            "achieved_send_per_s": round(achieved, 1),
            "sent": sent,
            "received": got,
            "delivered_fraction": round(frac, 5),
            "persisted": persisted,
            "latency_ms": lat,
            "cpu": cpu,
            "held": ok,
            "profiled": bool(spies),
            "late_by_second": late,
            "pg_server_events": pg_events,
            "redis_latency_events": redis_stalls,
            "stream_member_cpu_pct": round(member_cpu / (t_done - t_go) * 100, 1),
            "window": attempt,
        }
        # PostgreSQL's statistics reach its views up to 10 s after the load.
        time.sleep(max(0.0, SETTLE_S - (time.time() - t_done)))
        step["per_gesture"] = Counters.per_gesture(k0, k1, self.counters.snapshot(), sent)
        step["stages_by_second_ms"] = stages = _stages_by_second(b, tag, t_go)
        self.steps.append(step)
        who = f"{rate}/s" + (f" {self.name}" if self.name else "")
        if late:
            print(
                f"   {who} (from {time.strftime('%H:%M:%S', time.localtime(t_go))}):"
                " arrived over 50 ms, by second of the window: "
                + ", ".join(f"{k}s {v}" for k, v in late.items())
                + "; longest send-to-INSERT / send-to-mark ms by second of the send: "
                + ", ".join(f"{k}s {_ms(a)}/{_ms(m)}" for k, (a, m) in sorted(stages.items())),
                flush=True,
            )
        for event in pg_events:
            print(f"   {who}: PostgreSQL {event}", flush=True)
        for event in redis_stalls:
            print(f"   {who}: Redis {event}", flush=True)
        return step

    def close(self) -> int | None:
        """Stop the generators and the lag member; the senders' error frames (None when a
        sender could not say, after a failure). Raises nothing of its own, so that it can
        run in a `finally` without hiding what failed."""
        try:
            errors = sum(r["errors"] for r in _report_all(self.send, "none", full=False))
        except Exception as exc:
            print(f"   delivery: the senders' report failed: {exc!r}", flush=True)
            errors = None
        self.b.stop_gens(self.gens)
        lag_samples = bench_streams.stop_lag_member(self.lag_member, self.lag_file)
        for step, (_rate, t0, t1) in zip(self.steps, self.windows, strict=False):
            step["stream_lag_ms"] = bench_streams.lag_between(lag_samples, t0, t1)
        return errors


def delivery(b: Bench, plan: Plan, ports: list[int]) -> dict:
    rig = DeliveryRig(b, plan, ports)
    held = None
    try:
        rig.start()
        # With `delivery_retries`, a rung that fails its window gets up to that many more,
        # and holds when two of its windows pass.
        rungs = list(plan.delivery_rates)
        windows_of: dict[int, list[bool]] = {}
        while rungs:
            rate = rungs[0]
            passes = windows_of.setdefault(rate, [])
            attempt = len(passes)
            ok = rig.window(rate, attempt)["held"]
            passes.append(ok)
            if (ok and attempt == 0) or sum(passes) >= 2:
                held = rate
                rungs.pop(0)
            elif len(passes) - sum(passes) >= 2 or attempt >= plan.delivery_retries:
                break
            else:
                print(f"   {rate}/s: the window failed; again ({attempt + 2} of 3)", flush=True)
    finally:
        errors = rig.close()
    steps = rig.steps
    rows = [
        [
            s["offered_per_s"],
            round(s["achieved_send_per_s"]),
            round(s["delivered_fraction"] * 100, 2),
            s["persisted"],
            s["latency_ms"]["p50"],
            s["latency_ms"]["p90"],
            s["latency_ms"]["p99"],
            s["latency_ms"]["max"],
            s["held"],
            *cpu_cells(s["cpu"]),
        ]
        for s in steps
    ]
    per_gesture = [{"offered_per_s": s["offered_per_s"], **s["per_gesture"]} for s in steps]
    idle, profile = rig.idle, rig.profile
    rels = rig.rels
    print(
        table(
            "2a. delivery: WS gesture on process 1 -> gesture_received on process 2 (200 couples)",
            [
                "offered/s",
                "sent/s",
                "deliv %",
                "persisted",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "held",
                *CPU_HEADERS,
            ],
            rows,
        )
    )
    print(f"   highest rate held (100% delivered, p99 <= 50 ms): {held}/s (target >= 2000/s)")
    if any(s["profiled"] for s in steps):
        print(f"   (the {plan.profile_rate}/s row ran under py-spy, which costs the service CPU)")
    print(
        table(
            "2d. a consumer group on the event streams meanwhile: XADD to handler, ms",
            ["offered/s", "events", "p50", "p90", "p99", "max", "target p99", "member cpu%"],
            [
                [
                    s["offered_per_s"],
                    s["stream_lag_ms"]["n"],
                    s["stream_lag_ms"]["p50"],
                    s["stream_lag_ms"]["p90"],
                    s["stream_lag_ms"]["p99"],
                    s["stream_lag_ms"]["max"],
                    "<= 100",
                    s["stream_member_cpu_pct"],
                ]
                for s in steps
            ],
        )
    )
    breakdown.print_breakdown(per_gesture, idle, shared=not b.own_servers)
    if profile:
        for name in ("sender", "recipient"):
            breakdown.print_profile(f"{name} ({profile[name]['process']})", profile[name])
        print(f"   folded stacks and summaries in {profile['dir']} (speedscope.app opens them)")
    return {
        "relationships": len(rels),
        "steps": steps,
        "highest_held_per_s": held,
        "sender_error_frames": errors,
        "idle_background_per_s": idle,
        "servers": "own" if b.own_servers else "shared",
        "pg_stat_statements": b.pg_stat_statements,
        "profile": profile,
    }


def _start_profiles(b: Bench, plan: Plan) -> list:
    out = Path(plan.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        (
            name,
            label,
            path,
            breakdown.py_spy(b.services[label].pid, path, plan.delivery_duration),
        )
        for name, label in (("sender", "p1"), ("recipient", "p2"))
        for path in [out / f"delivery-{plan.profile_rate}-{name}-{label}.folded"]
    ]


def _finish_profiles(plan: Plan, rate: int, spies: list) -> dict:
    res: dict = {"rate_per_s": rate, "dir": plan.profile_dir, "sampling_hz": 100}
    for name, label, path, proc in spies:
        try:
            _, err = proc.communicate(timeout=plan.delivery_duration + 30)
        except Exception:
            proc.kill()
            _, err = proc.communicate()
        if not path.exists():
            res[name] = {
                "process": label,
                "error": (err or "")[-500:],
                "self": [],
                "cumulative": [],
            }
            res[name]["samples"] = 0
            continue
        res[name] = {"process": label, "file": str(path), **breakdown.summarise(path)}
    summary = Path(plan.profile_dir) / f"delivery-{rate}-summary"
    summary.with_suffix(".json").write_text(json.dumps(res, indent=1))
    summary.with_suffix(".txt").write_text(
        "".join(
            breakdown.format_profile(f"{n} ({res[n]['process']}) at {rate}/s", res[n]) + "\n"
            for n in ("sender", "recipient")
        )
    )
    return res


def fanout(b: Bench, plan: Plan, ports: list[int]) -> dict:
    rels = b.seed(plan.fanout_rels)
    receivers_c = [[ports[i % 2], rid, b.token(bb)] for i, (rid, _, bb) in enumerate(rels)]
    deadline = len(plan.fanout_rates) * (plan.fanout_duration + 40) + 60
    recv = _ws_gens(b, "fan-recv", receivers_c, 2, deadline)
    pubs = [
        b.gen(
            f"fan-pub-{i}",
            "redis_pub",
            deadline,
            gen=i,
            rels=[r[0] for r in part],
            redis_url=b.redis_url,
            channel_prefix=b.channel_prefix,
        )
        for i, part in enumerate(_split(rels, 2))
    ]
    gens = recv + pubs
    steps = []
    rows = []
    held = None
    try:
        for r in _ready_all(recv, 60):
            if r["connected"] != r["total"]:
                raise RuntimeError(f"fan-out: only {r['connected']}/{r['total']} connected")
        _ready_all(pubs, 30)
        for rate in plan.fanout_rates:
            tag = f"f{rate}"
            c0 = b.cpu.snapshot(gens)
            for g in pubs:
                g.send("go", rate=rate / len(pubs), duration=plan.fanout_duration, tag=tag)
            done = [g.expect("done", plan.fanout_duration + 30) for g in pubs]
            cpu = b.cpu.delta(c0, b.cpu.snapshot(gens))
            sent = sum(d["sent"] for d in done)
            _wait_received(recv, tag, sent, 0.3, 5.0)
            reps = _report_all(recv, tag)
            got = sum(r["n"] for r in reps)
            lat = percentiles([x for r in reps for x in r["lat"]])
            achieved = sent / max(d["elapsed"] for d in done)
            frac = got / sent if sent else 0.0
            ok = frac >= 1.0 and lat["p99"] is not None and lat["p99"] <= 20.0
            steps.append(
                {
                    "offered_per_s": rate,
                    "achieved_publish_per_s": round(achieved, 1),
                    "sent": sent,
                    "received": got,
                    "delivered_fraction": round(frac, 5),
                    "latency_ms": lat,
                    "cpu": cpu,
                    "held": ok,
                }
            )
            rows.append(
                [
                    rate,
                    round(achieved),
                    round(frac * 100, 2),
                    lat["p50"],
                    lat["p90"],
                    lat["p99"],
                    lat["max"],
                    ok,
                    *cpu_cells(cpu),
                ]
            )
            if ok:
                held = rate
            else:
                break
    finally:
        b.stop_gens(gens)
    print(
        table(
            "2b. pure fan-out: gesture.sent published on Redis -> WS clients on both processes",
            [
                "offered/s",
                "pub/s",
                "deliv %",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "held",
                *CPU_HEADERS,
            ],
            rows,
        )
    )
    print(f"   highest rate held (100% delivered, p99 <= 20 ms): {held}/s (target >= 7000/s)")
    return {"relationships": len(rels), "steps": steps, "highest_held_per_s": held}


# ---------------------------------------------------------------------------- 3. latency


def latency(b: Bench, plan: Plan, ports: list[int]) -> dict:
    rels = b.seed(200)
    receivers_c = [[ports[1], rid, b.token(bb)] for rid, _, bb in rels]
    targets = [[ports[0], rid, b.token(a), "partner_a"] for rid, a, _ in rels]
    deadline = plan.latency_duration + 90
    recv = _ws_gens(b, "lat-recv", receivers_c, 1, deadline)
    sender = b.gen(
        "lat-http", "http", deadline, gen=0, targets=targets, ports=[ports[0]], concurrency=64
    )
    gens = [*recv, sender]
    try:
        for r in _ready_all(recv, 60):
            if r["connected"] != r["total"]:
                raise RuntimeError(f"latency: only {r['connected']}/{r['total']} connected")
        sender.expect("ready", 30)
        c0 = b.cpu.snapshot(gens)
        sender.send("go", rate=plan.latency_rate, duration=plan.latency_duration, tag="lat")
        done = sender.expect("done", plan.latency_duration + 30)
        cpu = b.cpu.delta(c0, b.cpu.snapshot(gens))
        _wait_received(recv, "lat", done["sent"], 0.3, 5.0)
        reps = _report_all(recv, "lat")
    finally:
        b.stop_gens(gens)
    got = sum(r["n"] for r in reps)
    e2e = percentiles([x for r in reps for x in r["lat"]])
    http = percentiles(done["lat"])
    res = {
        "rate_per_s": plan.latency_rate,
        "sent": done["sent"],
        "received": got,
        "end_to_end_ms": e2e,
        "http_response_ms": http,
        "statuses": done["statuses"],
        "cpu": cpu,
    }
    print(
        table(
            f"3. end-to-end latency at {plan.latency_rate}/s: HTTP send on process 1 -> "
            "gesture_received on process 2",
            ["what", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", *CPU_HEADERS],
            [
                [
                    "send->received",
                    e2e["n"],
                    e2e["p50"],
                    e2e["p90"],
                    e2e["p99"],
                    e2e["max"],
                    *cpu_cells(cpu),
                ],
                [
                    "HTTP response",
                    http["n"],
                    http["p50"],
                    http["p90"],
                    http["p99"],
                    http["max"],
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ],
            ],
        )
    )
    print(f"   delivered {got}/{done['sent']}; target p50 <= 3 ms, p99 <= 10 ms")
    return res


# ---------------------------------------------------------------------------- 4. connections


def _hold(
    b: Bench,
    name: str,
    port: int,
    rels: list,
    n: int,
    per_gen: int,
    deadline: float,
    reconnect: bool,
) -> tuple[list[Gen], list[dict]]:
    clients = []
    for rid, a, bb in rels:
        clients.append([port, rid, b.token(a)])
        clients.append([port, rid, b.token(bb)])
    clients = clients[:n]
    k = max(2, math.ceil(n / per_gen))
    gens = _ws_gens(
        b,
        name,
        clients,
        k,
        deadline,
        reconnect=reconnect,
        connect_concurrency=64,
        connect_deadline=120,
        start_at=time.time() + 1.0 + 0.5 * k,  # once every generator process is up
    )
    return gens, _ready_all(gens, 150)


def connections(b: Bench, plan: Plan, ports: list[int]) -> dict:
    n = plan.connections
    rels = b.seed(math.ceil(n / 2))
    port = ports[0]
    # A fresh process 1, so "before" is a process that holds nothing yet.
    b.stop_service("p1")
    svc = b.start_service("p1", port)
    _warm(b, port, rels[0])
    time.sleep(1.0)
    rss0 = svc.rss()
    deadline = 600 if not plan.quick else 200
    c0 = b.cpu.snapshot([])
    gens, ready = _hold(b, "conn", port, rels, n, plan.per_gen_sockets, deadline, reconnect=True)
    res: dict = {"connections": n}
    try:
        connected = sum(r["connected"] for r in ready)
        span = max(r["t_done"] for r in ready) - min(r["t_start"] for r in ready)
        cpu_connect = b.cpu.delta(c0, b.cpu.snapshot(gens))
        time.sleep(2.0)
        rss1 = svc.rss()
        kib = (rss1 - rss0) / 1024 / max(connected, 1)
        res.update(
            connected=connected,
            connect_failures=sum(r["failures"] for r in ready),
            # The clients offer permessage-deflate, as browsers do; this many got it.
            deflate_negotiated=sum(r.get("deflate", 0) for r in ready),
            # What the clients spend, measured in each generator from its first connect on.
            generator_ms_per_connect=round(
                1000 * sum(r.get("cpu_s", 0) for r in ready) / max(connected, 1), 3
            ),
            # The service's CPU per connect (its wall clock includes the generators' start).
            service_ms_per_connect=round(
                10 * cpu_connect["service_pct"] * cpu_connect["wall_s"] / max(connected, 1), 3
            ),
            connects_per_s=round(connected / span, 1) if span > 0 else None,
            connect_span_s=round(span, 2),
            rss_before_mib=round(rss0 / 2**20, 1),
            rss_after_mib=round(rss1 / 2**20, 1),
            kib_per_connection=round(kib, 2),
            cpu_while_connecting=cpu_connect,
        )
        # What holding them costs: the process's CPU while every socket is idle.
        time.sleep(plan.idle_settle)
        c_idle = b.cpu.snapshot(gens)
        time.sleep(plan.idle_window)
        cpu_idle = b.cpu.delta(c_idle, b.cpu.snapshot(gens))
        res["idle"] = {
            "window_s": cpu_idle["wall_s"],
            "service_pct": cpu_idle["service_per_process_pct"].get(str(svc.pid)),
            "cpu": cpu_idle,
        }
        res["after_gesture"] = _touch(b, plan, gens, rels, ports[1], svc, rss0, connected)
        res["kib_per_connection_after_gesture"] = res["after_gesture"]["kib_per_connection"]
        # Delivery while they are held: HTTP sends via process 2 to partners held on process 1.
        held = rels[: min(len(rels), 500)]
        targets = [[ports[1], rid, b.token(a), "partner_a"] for rid, a, _ in held]
        sender = b.gen(
            "conn-http",
            "http",
            plan.hold_delivery_duration + 90,
            gen=9,
            targets=targets,
            ports=[ports[1]],
            concurrency=64,
        )
        sender.expect("ready", 30)
        c1 = b.cpu.snapshot([*gens, sender])
        sender.send("go", rate=200, duration=plan.hold_delivery_duration, tag="hold")
        done = sender.expect("done", plan.hold_delivery_duration + 30)
        cpu_hold = b.cpu.delta(c1, b.cpu.snapshot([*gens, sender]))
        b.stop_gens([sender])
        _wait_received(gens, "hold", done["sent"], 0.3, 5.0)
        reps = _report_all(gens, "hold")
        lat = percentiles([x for r in reps for x in r["lat"]])
        res["delivery_while_held"] = {
            "rate_per_s": 200,
            "sent": done["sent"],
            "received": sum(r["n"] for r in reps),
            "latency_ms": lat,
            "cpu": cpu_hold,
        }
        # The reconnect storm.
        up_before = sum(r["up"] for r in reps)
        t0 = time.time()
        b.stop_service("p1")
        t_exit = time.time()
        svc = b.start_service("p1", port)
        t_ready = time.time()
        backs = []
        back_times: list[float] = []
        storm_limit = 60 if not plan.quick else 40
        for g in gens:
            try:
                up = g.expect("allup", max(1.0, t0 + storm_limit - time.time()))
                backs.append(up["t"])
                back_times += up.get("back", [])
            except Exception:
                backs.append(None)
        back_times.sort()
        if not all(x is not None for x in backs):
            back_times = []  # a generator whose clients did not all come back: no tenths
        # When each tenth of the clients was back: a storm slow all through, or a long tail.
        tenths = (
            [
                round(back_times[max(0, math.ceil(len(back_times) * k / 10) - 1)] - t0, 2)
                for k in range(1, 11)
            ]
            if back_times
            else []
        )
        reps = _report_all(gens, "none", full=False)
        up_after = sum(r["up"] for r in reps)
        all_back = all(x is not None for x in backs)
        res["storm"] = {
            "clients": up_before,
            "back": up_after,
            "sigterm_to_exit_s": round(t_exit - t0, 2),
            "sigterm_to_fresh_ready_s": round(t_ready - t0, 2),
            "sigterm_to_all_back_s": round(max(backs) - t0, 2) if all_back else None,
            "sigterm_to_each_tenth_back_s": tenths,
            "close_codes": _merge([r["close_codes"] for r in reps]),
        }
    finally:
        b.stop_gens(gens)
    s = res["storm"] if "storm" in res else {}
    d = res.get("delivery_while_held", {}).get("latency_ms", {})
    idle = res.get("idle", {})
    touched = res.get("after_gesture", {})
    print(
        table(
            f"4. connections: {n} idle authenticated sockets on one process (--ws {WS_PROTOCOL})",
            [
                "connected",
                "connects/s",
                "KiB/conn idle",
                "KiB/conn after gesture",
                "RSS before MiB",
                "RSS after MiB",
                f"idle svc cpu% ({plan.idle_window:g} s)",
                "deliv p99 ms @200/s",
                "storm all back s",
                "back",
            ],
            [
                [
                    res.get("connected"),
                    res.get("connects_per_s"),
                    res.get("kib_per_connection"),
                    touched.get("kib_per_connection"),
                    res.get("rss_before_mib"),
                    touched.get("rss_mib", res.get("rss_after_mib")),
                    idle.get("service_pct"),
                    d.get("p99"),
                    s.get("sigterm_to_all_back_s"),
                    f"{s.get('back')}/{s.get('clients')}",
                ]
            ],
        )
    )
    cpu_c = res["cpu_while_connecting"]
    print(
        f"   connect CPU: service {res.get('service_ms_per_connect')} ms a connect, generators "
        f"{cpu_c['generators_pct']} (their start-up included; "
        f"{res.get('generator_ms_per_connect')} ms of generator CPU per connect without it); "
        f"clients offer permessage-deflate, {res.get('deflate_negotiated')} got it"
    )
    print(
        f"   after gesture: {touched.get('received')}/{touched.get('sockets')} sockets got one "
        f"gesture frame before RSS was read again; storm: exit after "
        f"{s.get('sigterm_to_exit_s')} s, fresh process ready after "
        f"{s.get('sigterm_to_fresh_ready_s')} s, close codes {s.get('close_codes')}"
    )
    if s.get("sigterm_to_each_tenth_back_s"):
        print(
            "   storm: each tenth of the clients back after (s) "
            f"{s['sigterm_to_each_tenth_back_s']}"
        )
    print("   targets: <= 20 KiB/conn, >= 2000 connects/s, idle CPU <= 5 %, storm over within 8 s")
    res["ws_implementations"] = ws_compare(b, plan, rels, res)
    return res


def _touch(
    b: Bench, plan: Plan, gens: list[Gen], rels: list, port: int, svc, rss0: int, connected: int
) -> dict:
    """Every held socket receives one gesture frame, then RSS is read again.

    Each held partner gets one gesture from the other, sent with POST /api/gestures/send
    through the other process (`port`), so the frame reaches the held socket over the
    pub/sub path as any delivery does. Memory read only after greetings leaves out what the
    first real frame costs (buffers, a compressor where compression was negotiated)."""
    targets = []
    n = plan.connections  # _hold holds partner_a, partner_b of each relationship, in order
    for i, (rid, a, bb) in enumerate(rels):
        if 2 * i + 1 < n:  # partner_b held: partner_a sends to it
            targets.append([port, rid, b.token(a), "partner_a"])
        if 2 * i < n:
            targets.append([port, rid, b.token(bb), "partner_b"])
    count = len(targets)
    duration = count / plan.touch_rate * 3 + 30
    sender = b.gen(
        "conn-touch",
        "http",
        duration + 90,
        gen=8,
        targets=targets,
        ports=[port],
        concurrency=64,
    )
    try:
        sender.expect("ready", 30)
        sender.send("go", rate=plan.touch_rate, duration=duration, tag="touch", count=count)
        done = sender.expect("done", duration + 30)
    finally:
        b.stop_gens([sender])
    _wait_received(gens, "touch", done["sent"], 0.3, 30.0)
    got = sum(r["n"] for r in _report_all(gens, "touch", full=False))
    time.sleep(2.0)
    rss = svc.rss()
    # Acknowledged at once, as a client would: otherwise each would come back as a pending
    # gesture in the greeting of every reconnect in the storm that follows.
    b.query(
        "UPDATE connection_gestures SET acknowledged_at = now(), acknowledged_by = "
        "CASE sent_by WHEN 'partner_a' THEN 'partner_b' ELSE 'partner_a' END "
        "WHERE message LIKE 'b|touch|%' AND acknowledged_at IS NULL"
    )
    return {
        "sockets": count,
        "sent": done["sent"],
        "received": got,
        "statuses": done.get("statuses", {}),
        "rss_mib": round(rss / 2**20, 1),
        "kib_per_connection": round((rss - rss0) / 1024 / max(connected, 1), 2),
    }


def _warm(b: Bench, port: int, rel) -> None:
    """One socket opened and closed, so lazily created state is in 'before'."""
    g = b.gen("warm", "ws", 60, gen=99, clients=[[port, rel[0], b.token(rel[1])]])
    try:
        g.expect("ready", 30)
    finally:
        b.stop_gens([g])


def ws_compare(b: Bench, plan: Plan, rels: list, main: dict) -> list[dict]:
    out = [
        {
            "ws": WS_PROTOCOL,
            "connections": main.get("connected"),
            "kib_per_connection": main.get("kib_per_connection"),
            "connects_per_s": main.get("connects_per_s"),
            "source": "step 4 main run",
        }
    ]
    m = plan.ws_compare_connections
    for impl in plan.ws_impls if m else []:
        port = free_port()
        svc = b.start_service(f"cmp-{impl}", port, ws=impl)
        try:
            _warm(b, port, rels[0])
            time.sleep(1.0)
            rss0 = svc.rss()
            gens, ready = _hold(
                b, f"cmp-{impl}", port, rels, m, plan.per_gen_sockets, 300, reconnect=False
            )
            try:
                connected = sum(r["connected"] for r in ready)
                span = max(r["t_done"] for r in ready) - min(r["t_start"] for r in ready)
                time.sleep(2.0)
                rss1 = svc.rss()
            finally:
                b.stop_gens(gens)
        finally:
            b.stop_service(f"cmp-{impl}")
        out.append(
            {
                "ws": impl,
                "connections": connected,
                "kib_per_connection": round((rss1 - rss0) / 1024 / max(connected, 1), 2),
                "connects_per_s": round(connected / span, 1) if span > 0 else None,
                "rss_before_mib": round(rss0 / 2**20, 1),
                "rss_after_mib": round(rss1 / 2**20, 1),
            }
        )
    print(
        table(
            "4b. RSS per connection by uvicorn --ws implementation",
            ["--ws", "connections", "KiB/conn", "connects/s", "measured in"],
            [
                [
                    r["ws"],
                    r["connections"],
                    r["kib_per_connection"],
                    r["connects_per_s"],
                    r.get("source", f"{m} sockets, fresh process"),
                ]
                for r in out
            ],
        )
    )
    if not m:
        print(
            "   (quick mode: wsproto only; the full run compares websockets-sansio and websockets)"
        )
    return out
