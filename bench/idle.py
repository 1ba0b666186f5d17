"""`python -m bench.idle`: what one service process spends holding idle sockets.

    flock /tmp/bench.lock python -m bench.idle --sockets 15000 --window 60 \\
        --options uvicorn-ping,app-ping,none --out bench/results/idle.json

For each keepalive option: a fresh service process, `--sockets` authenticated sockets held
by generator processes (at most `--per-gen` each: a process may hold 20,000 descriptors),
a few seconds to settle, then the CPU of the service process and of Redis over `--window`
seconds, as % of one core, and how many sockets were still open at the end (an option that
drops idle sockets is no keepalive). Everything else in the process (presence, the
pub/sub watchdog, the outbox relay) is in every option's figure; `none` is that floor.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from .infra import WS_PROTOCOL, Bench, free_port
from .steps import _ready_all, _report_all, _ws_gens

_NO_IDLE = {"WS_IDLE_TIMEOUT": "100000"}  # the app's own idle timeout out of the way
OPTIONS: dict[str, dict] = {
    # What the project shipped before issue 7: both mechanisms at once.
    "both": {
        "ws": "wsproto",
        "flags": ["--ws-ping-interval", "20", "--ws-ping-timeout", "20"],
        "app_ping": 30,
        "env": {},
    },
    "uvicorn-ping-20": {
        "ws": "wsproto",
        "flags": ["--ws-ping-interval", "20", "--ws-ping-timeout", "20"],
        "app_ping": 0,
        "env": _NO_IDLE,
    },
    "uvicorn-ping-30": {
        "ws": "wsproto",
        "flags": ["--ws-ping-interval", "30", "--ws-ping-timeout", "20"],
        "app_ping": 0,
        "env": _NO_IDLE,
    },
    # Ten times the pings of uvicorn-ping-30: for profiling what one ping costs.
    "uvicorn-ping-3": {
        "ws": "wsproto",
        "flags": ["--ws-ping-interval", "3", "--ws-ping-timeout", "20"],
        "app_ping": 0,
        "env": _NO_IDLE,
    },
    # The project's keepalive: the same pings, sent by one timer a process (service.wsserver).
    "wheel-30": {
        "flags": ["--ws-ping-interval", "30", "--ws-ping-timeout", "20"],
        "app_ping": 0,
        "env": _NO_IDLE,
    },
    "wheel-3": {
        "flags": ["--ws-ping-interval", "3", "--ws-ping-timeout", "20"],
        "app_ping": 0,
        "env": _NO_IDLE,
    },
    "wheel-30-sansio": {
        "ws": "service.wsserver:SansioWSProtocol",
        "flags": ["--ws-ping-interval", "30", "--ws-ping-timeout", "20"],
        "app_ping": 0,
        "env": _NO_IDLE,
    },
    "sansio-ping-30": {
        "ws": "websockets-sansio",
        "flags": ["--ws-ping-interval", "30", "--ws-ping-timeout", "20"],
        "app_ping": 0,
        "env": _NO_IDLE,
    },
    # The client's `ping` frame every 30 s, the app's idle timeout, no protocol pings.
    "app-ping-30": {
        "flags": ["--ws-ping-interval", "0"],
        "app_ping": 30,
        "env": {"WS_IDLE_TIMEOUT": "75"},
    },
    "none": {"flags": ["--ws-ping-interval", "0"], "app_ping": 0, "env": _NO_IDLE},
    # Clients offering permessage-deflate, as browsers do: the default (refused) and
    # WS_PER_MESSAGE_DEFLATE=true (negotiated: a compressor and a decompressor per socket).
    "deflate-offered": {"flags": [], "app_ping": 0, "env": {}, "compression": "deflate"},
    "deflate-on": {
        "flags": [],
        "app_ping": 0,
        "env": {"WS_PER_MESSAGE_DEFLATE": "true"},
        "compression": "deflate",
    },
}


def measure(
    b: Bench,
    name: str,
    rels: list,
    n: int,
    per_gen: int,
    window: float,
    ws: str,
    profile: str | None = None,
) -> dict:
    opt = OPTIONS[name]
    port = free_port()
    ws = opt.get("ws", ws)
    svc = b.start_service(f"idle-{name}", port, ws=ws, flags=opt["flags"], env=opt["env"])
    time.sleep(1.0)
    rss0 = svc.rss()
    clients = []
    for rid, a, bb in rels:
        clients += [[port, rid, b.token(a)], [port, rid, b.token(bb)]]
    clients = clients[:n]
    k = max(1, math.ceil(n / per_gen))
    gens = _ws_gens(
        b,
        f"idle-{name}",
        clients,
        k,
        window + 400,
        reconnect=False,
        app_ping=opt["app_ping"],
        compression=opt.get("compression"),
        connect_concurrency=64,
        connect_deadline=240,
    )
    try:
        ready = _ready_all(gens, 300)
        connected = sum(r["connected"] for r in ready)
        time.sleep(10.0)  # joins, greetings and the first beats of the newly connected
        c0 = b.cpu.snapshot(gens)
        if profile:
            # py-spy samples the service for the window (and costs it a little CPU).
            svg = Path(profile) / f"idle-{name}.txt"
            subprocess.run(
                [
                    Path(sys.executable).parent / "py-spy",
                    "record",
                    "-p",
                    str(svc.pid),
                    "-d",
                    str(int(window)),
                    "-r",
                    "50",
                    "-o",
                    str(svg),
                    "--nonblocking",
                    "-f",
                    "raw",
                ],
                capture_output=True,
                timeout=window + 60,
            )
        else:
            time.sleep(window)
        cpu = b.cpu.delta(c0, b.cpu.snapshot(gens))
        reps = _report_all(gens, "none", full=False)
        res = {
            "option": name,
            "ws": ws,
            "flags": opt["flags"],
            "app_ping_s": opt["app_ping"],
            "env": opt["env"],
            "sockets": connected,
            "still_open": sum(r["up"] for r in reps),
            "service_cpu_pct": cpu["service_pct"],
            "redis_cpu_pct": cpu["redis_pct"],
            "generators_cpu_pct": round(sum(cpu["generators_pct"].values()), 1),
            "window_s": cpu["wall_s"],
            "rss_mib": round(svc.rss() / 2**20, 1),
            # Every socket has had at least one frame (its greeting) through its compressor.
            "kib_per_socket": round((svc.rss() - rss0) / 1024 / max(connected, 1), 1),
            "loadavg_after": os.getloadavg(),
        }
    finally:
        b.stop_gens(gens)
        b.stop_service(f"idle-{name}")
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__)
    ap.add_argument("--sockets", type=int, default=15000)
    ap.add_argument("--per-gen", type=int, default=3750)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--options", default="uvicorn-ping-30,app-ping-30,none")
    ap.add_argument("--ws", default=WS_PROTOCOL, help="uvicorn's --ws, where an option names none")
    ap.add_argument("--profile", help="a folder: py-spy flame graphs of the service there")
    ap.add_argument("--label", default="", help="recorded with the figures (e.g. the change)")
    ap.add_argument("--out", default="bench/results/idle.json", help="figures appended here")
    args = ap.parse_args()
    names = [x for x in args.options.split(",") if x]
    for name in names:
        if name not in OPTIONS:
            ap.error(f"unknown option {name!r}; choose from {list(OPTIONS)}")
    results = []
    with Bench(quick=False) as b:
        rels = b.seed(math.ceil(args.sockets / 2))
        for name in names:
            results.append(
                measure(
                    b, name, rels, args.sockets, args.per_gen, args.window, args.ws, args.profile
                )
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else []
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    previous.append({"label": args.label, "started": started, "results": results})
    out.write_text(json.dumps(previous, indent=1))


if __name__ == "__main__":
    main()
