"""The generator process's side of the line protocol, shared by every generator.

A generator (`python -m bench.gen CONFIG.json`, or `python -m bench.chaos_load CONFIG.json`
for the chaos run's couples) reads commands from stdin and writes events to stdout, one
JSON object a line (see `bench/infra.py`, `Gen`, for the orchestrator's side). This module
holds what both need: `emit`, `commands`, and `main`, which runs one mode of a config under
its hard time limit. It imports no generator, so the generators never import each other.
"""

import asyncio
import json
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping


def emit(obj: dict) -> None:
    """Write one event line to the orchestrator."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def commands() -> AsyncIterator[dict]:
    """Yield commands read from stdin (EOF ends the generator)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        line = line.strip()
        if line:
            yield json.loads(line)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(modes: Mapping[str, Callable[[dict], Awaitable[None]]]) -> None:
    """Run the mode that the config file (argv[1]) names; never returns.

    The config's `deadline` (seconds, default 600) is enforced with SIGALRM, whose default
    action ends the process; a failure is reported as an `error` event and exit status 1.
    """
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    raise_nofile()
    signal.alarm(int(cfg.get("deadline", 600)))  # the hard limit: SIGALRM ends the process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator stops us, not Ctrl-C
    try:
        import uvloop  # optional; plain asyncio otherwise

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    code = 0
    try:
        runner(modes[cfg["mode"]](cfg))
    except Exception as exc:
        emit({"event": "error", "error": repr(exc)})
        code = 1
    sys.stdout.flush()
    os._exit(code)
