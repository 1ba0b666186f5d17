"""The command line: `python -m service dev` stops everything it started on SIGTERM."""

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
