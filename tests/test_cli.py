"""The command line: the ways the project starts the service negotiate no permessage-deflate
unless the operator turns it on (`WS_PER_MESSAGE_DEFLATE`), whichever of them runs it (clients
here offer the extension, as every browser does); and `python -m service dev` stops everything
it started on SIGTERM."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from websockets.asyncio.client import connect as ws_connect

from .conftest import ROOT, Couple, Process, settings_env

pytestmark = pytest.mark.anyio


async def extensions_answered(process: Process, couple: Couple) -> str | None:
    """The 101 answer's Sec-WebSocket-Extensions to a client offering permessage-deflate."""
    url = f"{process.ws_url}?relationship_id={couple.id}&token={couple.a_token}"
    async with ws_connect(url, compression="deflate") as ws:
        assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
        return ws.response.headers.get("Sec-WebSocket-Extensions")


@pytest.mark.parametrize("deflate", [False, True])
async def test_the_dev_bench_and_test_command_compresses_only_when_told(
    processes, couple: Couple, deflate: bool
):
    [p] = await processes(1, ws_per_message_deflate=deflate)
    answer = await extensions_answered(p, couple)
    if deflate:
        assert answer is not None and answer.startswith("permessage-deflate")
    else:
        assert answer is None


def _procfile_web() -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return line.removeprefix("web:").strip()
    raise AssertionError("no web process in the Procfile")


def _image_cmd() -> str:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("CMD "):
            sh, flag, script = json.loads(line.removeprefix("CMD "))
            assert (sh, flag) == ("sh", "-c")
            return script
    raise AssertionError("no CMD in the Dockerfile")


class ShellProcess(Process):
    """The Procfile's or the image's command line, run by a shell as those platforms do,
    on 127.0.0.1 rather than every interface."""

    def __init__(self, settings, log_dir: Path, line: str, extra_env: dict[str, str]) -> None:
        super().__init__(settings, log_dir)
        assert "--host 0.0.0.0" in line
        line = line.replace("--host 0.0.0.0", "--host 127.0.0.1")
        self.line = line if line.startswith("exec ") else f"exec {line}"
        self.extra_env = extra_env

    def start(self) -> None:
        env = settings_env(self.settings)
        for name in ("WS_PER_MESSAGE_DEFLATE", "WS_PING_INTERVAL", "WS_PING_TIMEOUT"):
            env.pop(name)  # the line's own defaults
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(PORT=str(self.port), **self.extra_env)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                ["sh", "-c", self.line], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )


@pytest.mark.parametrize("source", ["Procfile", "Dockerfile"])
@pytest.mark.parametrize("deflate", [None, "true"])
async def test_the_procfile_and_the_image_compress_only_when_told(
    settings, tmp_path: Path, couple: Couple, source: str, deflate: str | None
):
    line = _procfile_web() if source == "Procfile" else _image_cmd()
    env = {"WS_PER_MESSAGE_DEFLATE": deflate} if deflate else {}
    p = ShellProcess(settings, tmp_path, line, env)
    p.start()
    try:
        await p.ready()
        answer = await extensions_answered(p, couple)
    finally:
        p.stop()
    if deflate:
        assert answer is not None and answer.startswith("permessage-deflate")
    else:
        assert answer is None


def _two_free_ports() -> int:
    """A port P with P + 1 free too (the dev command uses consecutive ports), below the
    ephemeral range, where other tests' outgoing connections could take one meanwhile."""
    for _ in range(100):
        port = random.randrange(20000, 32000)
        try:
            with socket.socket() as s, socket.socket() as t:
                s.bind(("127.0.0.1", port))
                t.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@pytest.mark.multiprocess
def test_dev_stops_both_processes_and_the_embedded_servers_on_sigterm(tmp_path: Path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_", "REDIS_", "JWT_", "TEST_"))
    }
    port = _two_free_ports()
    log = tmp_path / "dev.log"
    with open(log, "wb") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "service", "dev", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 120
        while "The gesture service is running" not in log.read_text(errors="replace"):
            assert dev.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        services = psutil.Process(dev.pid).children()
        assert len(services) == 2
        redis_pid = int((tmp_path / ".dev" / "redis" / "redis.pid").read_text())
        pidfile = next((tmp_path / ".dev" / "postgres").rglob("postmaster.pid"))
        postgres_pid = int(pidfile.read_text().splitlines()[0])
        started = [*services, psutil.Process(redis_pid), psutil.Process(postgres_pid)]

        dev.send_signal(signal.SIGTERM)
        assert dev.wait(timeout=60) == 0, log.read_text(errors="replace")
        _, alive = psutil.wait_procs(started, timeout=30)
        assert alive == [], f"still running after SIGTERM: {alive}"
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
