"""`python -m service status`: the deployment at a glance, from PostgreSQL and Redis."""

import asyncio
import json
import subprocess
import sys

import httpx
import pytest
import redis.asyncio as aioredis

from .conftest import ROOT, settings_env
from .support_helpers import eventually, send
from .support_ws import close_quietly, connect

pytestmark = [pytest.mark.anyio, pytest.mark.multiprocess]


async def status(settings, *args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", "status", *args],
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_status_shows_the_processes_their_sockets_the_outbox_and_the_groups(
    processes, settings, redis_url, couple
):
    p1, p2 = await processes(2)
    http = httpx.AsyncClient(base_url=p1.url, timeout=10)
    client = await connect(p2.ws_url, couple, "partner_b")
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await send(http, couple.id, couple.a_headers)
        partition = couple.id.int % settings.event_streams
        stream = f"{settings.channel_prefix}stream:{{{partition}}}"
        await redis.xgroup_create(stream, "push", id="0")

        async def shown() -> dict | None:
            found = json.loads((await status(settings, "--json")).stdout)
            mine = {p["port"]: p for p in found["processes"] if p["up"]}
            ports = {p1.port, p2.port}
            # Dead processes of earlier tests are taken over by these within NODE_TTL; the
            # outbox then reads 0.
            if ports <= mine.keys() and mine[p2.port]["sockets"] == 1:
                if found["outbox"]["waiting"] == 0:
                    return found
            return None

        found = await eventually(shown, timeout=20)
        mine = {p["port"]: p for p in found["processes"] if p["port"] in (p1.port, p2.port)}
        assert {p["pid"] for p in mine.values()} == {p1.popen.pid, p2.popen.pid}
        assert mine[p1.port]["sockets"] == 0
        assert all(p["version"] for p in mine.values())
        assert len(found["streams"]["partitions"]) == settings.event_streams
        assert found["streams"]["partitions"][partition]["length"] >= 1
        # The new group has not read the gesture.sent (nor the delivery) yet.
        group = found["streams"]["groups"]["push"]
        assert group["pending"] == 0 and group["lag"] >= 1
        # The table says the same for a person.
        table = (await status(settings)).stdout
        assert "Processes:" in table and str(p2.port) in table
        assert "Outbox: 0 events not yet on Redis" in table
        assert "push" in table
    finally:
        await close_quietly(client)
        await redis.aclose()
        await http.aclose()


async def test_status_names_what_is_missing_in_one_line(settings, tmp_path):
    env = settings_env(settings)
    env["DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", "status"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
