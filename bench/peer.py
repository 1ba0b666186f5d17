"""Step `socketio`: the peer users would pick instead, measured in the same run.

A Node socket.io 4 server with `@socket.io/redis-adapter` (on the `redis` npm client), two
processes on a redis-server of the bench's own, relays a message from client A on process 1
to client B on process 2 (the same room), as our `delivery` step sends a gesture from A on
process 1 to B on process 2. Its clients are `socket.io-client` in node load scripts
(`bench/socketio/load.js`, driven like `python -m bench.gen`), so node is measured against
node's own client. The rates rise as in `delivery` and `fanout`; the step finds the highest
rate socket.io holds with every message delivered and p99 within each of our two bounds
(50 ms for persisted delivery, 20 ms for fan-out) and prints our figures as ratios to it.

Ours come from this run's `delivery` and `fanout` steps only: a step that did not run gives
no ratio ("—"), never a figure from another results file. The packages are installed
by `npm ci` into `bench/socketio/node_modules` (git-ignored), exact versions in
`package.json` and `package-lock.json`. Without node, npm or redis-server the step is skipped
with a message.
"""

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil

from .cluster import _OneRedis
from .infra import ROOT, Bench, Gen, free_port
from .report import percentiles, table
from .steps import Plan, _ready_all, _report_all, _split, _wait_received

DIR = ROOT / "bench" / "socketio"
PACKAGES = ["socket.io", "@socket.io/redis-adapter", "redis", "socket.io-client"]
BOUNDS = {"delivery": 50.0, "fanout": 20.0}  # p99 ms, as our steps hold them
RELS = 200  # couples, as in `delivery`
GENS = 2  # load processes per side


def _install() -> dict:
    """`npm ci` unless node_modules already matches the lockfile; returns the versions."""
    stamp = DIR / "node_modules" / ".package-lock.json"
    lock = DIR / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        print("   socketio: npm ci in bench/socketio (first run: a few seconds to a minute)")
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"npm ci failed: {(done.stdout + done.stderr)[-1500:]}")
    versions = {}
    for pkg in PACKAGES:
        meta = DIR / "node_modules" / pkg / "package.json"
        versions[pkg] = json.loads(meta.read_text())["version"]
    return versions


def _version(cmd: str) -> str:
    try:
        return subprocess.run(
            [cmd, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


class _Node:
    """One `node server.js` process."""

    def __init__(self, b: Bench, name: str, port: int, redis_url: str, key: str) -> None:
        self.name = name
        self.port = port
        self.log = open(Path(b.tmp) / f"{name}.log", "a")
        self.proc = subprocess.Popen(
            ["node", str(DIR / "server.js")],
            cwd=DIR,
            env={**os.environ, "PORT": str(port), "REDIS_URL": redis_url, "KEY": key},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"socket.io server {self.name} exited: {self.tail()}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/readyz", timeout=1.0
                ) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"socket.io server {self.name} not ready: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-1500:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def _cpu_times(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def _pct(a: dict, b: dict, wall: float) -> float:
    return round(100.0 * sum(v - a.get(pid, 0.0) for pid, v in b.items()) / wall, 1)


# ---------------------------------------------------------------------------- ours


def _held_summary(step: dict) -> dict:
    """Highest rate held, and whether that was the top rate offered (then a lower bound)."""
    held = step.get("highest_held_per_s")
    offered = [s["offered_per_s"] for s in step.get("steps", [])]
    return {
        "held_per_s": held,
        "lower_bound": bool(held is not None and offered and held >= max(offered)),
        "lowest_offered_per_s": min(offered) if offered else None,
    }


def ours(b: Bench, name: str) -> dict:
    """Our figure for `name` (delivery or fanout), from this run only.

    A step that did not run (or failed) gives no figure, and so no ratio: a figure from
    another results file was measured on another day, under another load, and dividing it
    by this run's socket.io figure compares two machines' moods, not two designs."""
    step = b.results.get(name)
    if isinstance(step, dict) and "highest_held_per_s" in step:
        return {**_held_summary(step), "source": "this run", "ran": True}
    return {
        "held_per_s": None,
        "lower_bound": False,
        "lowest_offered_per_s": None,
        "source": f"not run: add {name} to --only",
        "ran": False,
    }


# ---------------------------------------------------------------------------- the step


def socketio(b: Bench, plan: Plan, ports: list[int]) -> dict:
    missing = [cmd for cmd in ("node", "npm", "redis-server") if shutil.which(cmd) is None]
    if missing:
        msg = (
            f"skipped: {' and '.join(missing)} not found on PATH; the socket.io comparison "
            "needs Node.js >= 18 with npm (and redis-server for its own Redis)"
        )
        print(f"\n== socketio: {msg}")
        return {"skipped": msg}
    out: dict = {
        "node": _version("node"),
        "npm": _version("npm"),
        "packages": _install(),
        "relationships": RELS,
        "bounds_p99_ms": BOUNDS,
    }
    redis = _OneRedis(Path(b.tmp))
    servers: list[_Node] = []
    gens: list[Gen] = []
    steps = []
    rows = []
    held = {k: None for k in BOUNDS}
    missed: set[str] = set()
    try:
        key = f"{b.channel_prefix.split(':', 1)[0]}-sio"
        sio_ports = [free_port(), free_port()]
        for i, port in enumerate(sio_ports):
            servers.append(_Node(b, f"sio{i + 1}", port, redis.url, key))
        for s in servers:
            s.wait_ready()
        rooms = [str(i) for i in range(RELS)]
        senders = [[sio_ports[0], r] for r in rooms]
        receivers = [[sio_ports[1], r] for r in rooms]
        deadline = len(plan.socketio_rates) * (plan.delivery_duration + 40) + 60
        argv = ["node", str(DIR / "load.js")]

        def load(prefix: str, clients: list) -> list[Gen]:
            return [
                b.gen(f"{prefix}-{i}", "socketio", deadline, argv=argv, gen=i, clients=part)
                for i, part in enumerate(_split(clients, GENS))
            ]

        recv = load("sio-recv", receivers)
        send = load("sio-send", senders)
        gens = recv + send
        for r in _ready_all(gens, 60):
            if r["connected"] != r["total"]:
                raise RuntimeError(f"socketio: only {r['connected']}/{r['total']} connected")
        pids = [s.pid for s in servers]
        for rate in plan.socketio_rates:
            tag = f"s{rate}"
            t0 = time.time()
            s0, r0 = _cpu_times(pids), _cpu_times([redis.popen.pid])
            g0 = b.cpu.snapshot(gens)
            for g in send:
                g.send("go", rate=rate / len(send), duration=plan.delivery_duration, tag=tag)
            done = [g.expect("done", plan.delivery_duration + 30) for g in send]
            wall = time.time() - t0
            s1, r1 = _cpu_times(pids), _cpu_times([redis.popen.pid])
            gcpu = b.cpu.delta(g0, b.cpu.snapshot(gens))
            sent = sum(d["sent"] for d in done)
            _wait_received(recv, tag, sent, 0.3, 5.0)
            reps = _report_all(recv, tag)
            got = sum(r["n"] for r in reps)
            lat = percentiles([x for r in reps for x in r["lat"]])
            achieved = sent / max(d["elapsed"] for d in done)
            frac = got / sent if sent else 0.0
            ok = {
                k: frac >= 1.0 and lat["p99"] is not None and lat["p99"] <= bound
                for k, bound in BOUNDS.items()
            }
            for k, v in ok.items():
                # As our steps count: the highest rate before the first one missed.
                if v and k not in missed:
                    held[k] = rate
                elif not v:
                    missed.add(k)
            cpu = {
                "wall_s": round(wall, 2),
                "socketio_pct": _pct(s0, s1, wall),
                "redis_pct": _pct(r0, r1, wall),
                "generators_pct": gcpu["generators_pct"],
                "generators_saturated": gcpu["generators_saturated"],
            }
            steps.append(
                {
                    "offered_per_s": rate,
                    "achieved_send_per_s": round(achieved, 1),
                    "sent": sent,
                    "received": got,
                    "delivered_fraction": round(frac, 5),
                    "latency_ms": lat,
                    "cpu": cpu,
                    "held_within_50ms": ok["delivery"],
                    "held_within_20ms": ok["fanout"],
                }
            )
            gp = cpu["generators_pct"]
            rows.append(
                [
                    rate,
                    round(achieved),
                    round(frac * 100, 2),
                    lat["p50"],
                    lat["p90"],
                    lat["p99"],
                    lat["max"],
                    ok["fanout"],
                    ok["delivery"],
                    cpu["socketio_pct"],
                    cpu["redis_pct"],
                    round(sum(gp.values()), 1),
                    max(gp.values()) if gp else 0.0,
                    "SATURATED " + ",".join(cpu["generators_saturated"])
                    if cpu["generators_saturated"]
                    else "",
                ]
            )
            if not ok["delivery"]:
                break
        snd = _report_all(send, "none", full=False)
        out["sender_acks"] = sum(r["acks"] for r in snd)
    finally:
        b.stop_gens(gens)
        for s in servers:
            s.stop()
        redis.stop()
    top = max(plan.socketio_rates)
    print(
        table(
            "6a. socket.io 4 + redis-adapter: A on node process 1 -> B on node process 2 "
            f"({RELS} couples, own Redis)",
            [
                "offered/s",
                "sent/s",
                "deliv %",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "<=20ms",
                "<=50ms",
                "sio cpu%",
                "redis cpu%",
                "gens cpu%",
                "max gen%",
                "gen flag",
            ],
            rows,
        )
    )
    comparison = []
    for name, label in (("delivery", "persisted delivery"), ("fanout", "fan-out")):
        mine = ours(b, name)
        theirs = held[name]
        ratio = below = None
        if not mine["ran"]:
            pass  # no figure of ours in this run: no ratio
        elif mine["held_per_s"] is not None and theirs:
            ratio = round(mine["held_per_s"] / theirs, 3)
        elif mine["lowest_offered_per_s"] and theirs:
            # Ours held not even its lowest rate: the ratio is below lowest / theirs.
            below = round(mine["lowest_offered_per_s"] / theirs, 3)
        comparison.append(
            {
                "what": name,
                "p99_bound_ms": BOUNDS[name],
                "ours_per_s": mine["held_per_s"],
                "ours_lower_bound": mine["lower_bound"],
                "ours_source": mine["source"],
                "socketio_per_s": theirs,
                "socketio_lower_bound": theirs == top,
                "ratio": ratio,
                "ratio_below": below,
                "ours_lowest_offered_per_s": mine["lowest_offered_per_s"],
                "label": label,
                "ours_ran": mine["ran"],
            }
        )

    def rate(x, lower: bool, lowest=None) -> str:
        if x is None:
            return f"< {lowest:,}" if lowest else "-"
        return f"{'>= ' if lower else ''}{x:,}"

    def ratio_cell(c: dict) -> str:
        if c["ratio"] is not None:
            return f"{c['ratio']:.2f}x"
        return f"< {c['ratio_below']:.2f}x" if c["ratio_below"] is not None else "—"

    print(
        table(
            "6b. ours / socket.io's relay, each at our p99 bound, 100 % delivered",
            ["ours", "p99 bound", "ours /s", "socket.io /s", "ratio", "ours from"],
            [
                [
                    c["label"],
                    f"{c['p99_bound_ms']:.0f} ms",
                    rate(c["ours_per_s"], c["ours_lower_bound"], c["ours_lowest_offered_per_s"])
                    if c["ours_ran"]
                    else "—",
                    rate(c["socketio_per_s"], c["socketio_lower_bound"], min(plan.socketio_rates)),
                    ratio_cell(c),
                    c["ours_source"],
                ]
                for c in comparison
            ],
        )
    )
    print(
        "   targets: fan-out >= 1.0x, persisted delivery as close as it gets. socket.io relays "
        "without persisting;\n   '>=' marks a rate held at the top of its ladder, '<' that "
        "not even the lowest rate held"
    )
    out.update(steps=steps, highest_held_per_s=held, comparison=comparison)
    return out
