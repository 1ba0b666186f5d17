"""The README runs as written: its curl walk-through (each bash block marked with
`<!-- readme-test: run -->`) is run by bash, as it stands, against `python -m service dev`
pointed at the test PostgreSQL and Redis, so that a change that breaks a documented command
fails the build. The only change made to the text is the ports, dev's on this machine."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, SECRET
from .test_cli import _two_free_ports

MARK = "<!-- readme-test: run -->"


def marked_blocks(text: str) -> list[str]:
    """The bash blocks that follow the marker (blank lines allowed between)."""
    pattern = re.compile(re.escape(MARK) + r"\s*\n```bash\n(.*?)\n```", re.DOTALL)
    return pattern.findall(text)


def test_the_readme_marks_its_walk_through():
    blocks = marked_blocks((ROOT / "README.md").read_text())
    assert blocks, "no block marked to run in README.md"
    assert all("<id" not in b and "from above>" not in b for b in blocks)


@pytest.mark.multiprocess
def test_the_readme_walk_through_runs_against_dev(
    tmp_path: Path, database_url: str, redis_url: str
):
    blocks = marked_blocks((ROOT / "README.md").read_text())
    port = _two_free_ports()
    # The reader's folder: the project's interpreter as .venv/bin/python, the package from
    # this checkout, the dev command's secret.
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_", "REDIS_", "JWT_", "TEST_"))
    }
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        JWT_SECRET=SECRET,
        PYTHONPATH=str(ROOT),
        CHANNEL_PREFIX=f"readme{port}:gestures:",
        PRESENCE_PREFIX=f"readme{port}:presence:",
    )
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
        while "Ctrl-C (or SIGTERM) stops everything" not in log.read_text(errors="replace"):
            assert dev.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        for block in blocks:
            script = block.replace("localhost:8000", f"localhost:{port}").replace(
                "localhost:8001", f"localhost:{port + 1}"
            )
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, (
                f"{done.stdout}\n{done.stderr}\n{log.read_text(errors='replace')}"
            )
            assert '"ai_generated":true' in done.stdout.replace(" ", ""), done.stdout
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
            try:
                dev.wait(timeout=60)
            except subprocess.TimeoutExpired:
                dev.kill()
                dev.wait()
    assert "Traceback" not in log.read_text(errors="replace")
