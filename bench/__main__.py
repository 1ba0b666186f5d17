"""`python -m bench [--quick] [--out FILE] [--only write,delivery,fanout,...,cluster,socketio]
[--own-servers] [--profile [DIR]] [--delivery-rates 1000,...]`,
`python -m bench chaos [--quick]` (see `bench/chaos.py`), and `python -m bench conformance`
(RFC 6455 cases against ours and `--ws wsproto`, see `bench/wsconformance.py`).

Starts its own database, two service processes and the load generators, runs the steps,
prints a table per step, writes every figure as JSON, and cleans up even on Ctrl-C.
"""

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import psutil

from . import breakdown, cluster, peer, steps, streams
from .infra import ROOT, Bench, free_port

STEPS = {
    "write": steps.write_path,
    "delivery": steps.delivery,
    "fanout": steps.fanout,
    "latency": steps.latency,
    "connections": steps.connections,
    "cluster": cluster.cluster,
    "socketio": peer.socketio,
    "streams": streams.streams,
    "delivery_nostreams": streams.delivery_without_streams,
    "streams_cost": streams.streams_cost,
    "compare": streams.compare,
}

# Run only when named: `delivery_nostreams` is the one-way form of `streams_cost` (which
# alternates windows with and without the streams at each rung, about 15 minutes).
# `compare` needs `--compare`.
ON_REQUEST = {"delivery_nostreams", "compare"}


def _machine() -> dict:
    def cmd(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=5).stdout.strip()
        except Exception:
            return ""

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
        "git": cmd("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
        "postgres": cmd("psql", "--version"),
    }


def main() -> int:
    if sys.argv[1:2] == ["conformance"]:
        from . import wsconformance

        return wsconformance.main(*sys.argv[2:3])
    if sys.argv[1:2] == ["chaos"]:
        from . import chaos

        return chaos.main(sys.argv[2:])
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small and short: under 2 minutes")
    ap.add_argument("--out", default="bench/results/latest.json", help="where the JSON goes")
    ap.add_argument(
        "--only",
        default=",".join(s for s in STEPS if s not in ON_REQUEST),
        help="comma-separated steps to run, in that order",
    )
    ap.add_argument(
        "--own-servers",
        action="store_true",
        help="a PostgreSQL (with pg_stat_statements) and a Redis of the bench's own, so the "
        "delivery step's per-gesture WAL, Redis and server CPU are the bench's alone",
    )
    ap.add_argument(
        "--profile",
        nargs="?",
        const="auto",
        help="py-spy both service processes during the delivery step's --profile-rate; folded "
        "stacks and summaries in DIR (default bench/results/profile-<time>)",
    )
    ap.add_argument("--profile-rate", type=int, default=1000, help="delivery rate to profile")
    ap.add_argument("--delivery-rates", help="comma-separated offered rates for `delivery`")
    ap.add_argument(
        "--compare",
        metavar="VAR=VALUE,...",
        help="for the `compare` step: the environment of the second pair of service processes",
    )
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    plan = steps.Plan.make(args.quick)
    if args.compare:
        try:
            streams.parse_compare(args.compare)
        except ValueError as exc:
            ap.error(str(exc))
        plan.compare = args.compare
    elif "compare" in only:
        ap.error("the compare step needs --compare VAR=VALUE[,VAR=VALUE...]")
    if args.delivery_rates:
        plan.delivery_rates = [int(x) for x in args.delivery_rates.split(",") if x.strip()]
        plan.delivery_rates_given = True
    if args.profile:
        plan.profile_rate = args.profile_rate
        plan.profile_dir = (
            str(ROOT / "bench" / "results" / time.strftime("profile-%Y%m%d-%H%M%S"))
            if args.profile == "auto"
            else args.profile
        )
        if plan.profile_rate not in plan.delivery_rates:
            ap.error(f"--profile-rate {plan.profile_rate} is not among {plan.delivery_rates}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result: dict = {
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": _machine(),
        "plan": plan.__dict__,
        "steps": {},
        "failures": {},
    }
    print(
        f"bench: {result['mode']} mode, steps {only}; machine {result['machine']['cpu']} "
        f"x{result['machine']['cores']}, load {result['machine']['loadavg_at_start']}"
    )
    code = 0
    own = None
    try:
        if args.own_servers:
            from .servers import OwnServers

            own = OwnServers().__enter__()
            bench = Bench(args.quick, admin_dsn=own.admin_dsn, redis_url=own.redis_url)
            bench.pg_log = own.log
        else:
            bench = Bench(args.quick)
        with bench:
            bench.pg_stat_statements = breakdown.enable_pg_stat_statements(bench.admin_dsn)
            where = "the bench's own" if own else f"shared, {bench.admin_dsn}"
            result["servers"] = {
                "own": bool(own),
                "postgres": breakdown.pg_settings(bench.admin_dsn),
                "pg_stat_statements": bench.pg_stat_statements,
                "redis_url": bench.redis_url,
            }
            breakdown.print_pg_settings(result["servers"]["postgres"], where)
            ports = [free_port(), free_port()]
            bench.start_service("p1", ports[0])
            bench.start_service("p2", ports[1])
            result["database"] = bench.db
            bench.results = result["steps"]
            print(f"bench: database {bench.db}, services on ports {ports}, logs in {bench.tmp}")
            for name in only:
                t = time.time()
                try:
                    result["steps"][name] = STEPS[name](bench, plan, ports)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:
                    code = 1
                    result["failures"][name] = repr(exc)
                    print(f"\n!! step {name} failed: {exc!r}", file=sys.stderr)
                    traceback.print_exc()
                    for g in list(bench.gens):
                        g.kill()
                    bench.gens.clear()
                    for label, port in (("p1", ports[0]), ("p2", ports[1])):
                        svc = bench.services.get(label)
                        if svc is None or svc.proc.poll() is not None:
                            bench.services.pop(label, None)
                            bench.start_service(label, port)
                print(f"   ({name}: {time.time() - t:.1f} s)")
    except KeyboardInterrupt:
        print("\nbench: interrupted; cleaned up", file=sys.stderr)
        result["failures"]["interrupted"] = True
        code = 130
    finally:
        if own is not None:
            with contextlib.suppress(Exception):
                own.stop()
        result["elapsed_s"] = round(time.time() - started, 1)
        out_path.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nbench: {result['elapsed_s']} s; figures in {out_path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
