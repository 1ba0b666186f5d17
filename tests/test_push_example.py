"""The worked example of docs/events.md: a push-notification service on the streams,
run as its readers would run it, against a real service."""

import asyncio
import json
import subprocess
import sys

import pytest
import redis.asyncio as aioredis

from .conftest import ROOT, SECRET, settings_env
from .support_helpers import eventually, send
from .support_ws import close_quietly, connect

pytestmark = pytest.mark.anyio

EXAMPLE = ROOT / "docs" / "examples" / "push_notifications.py"


async def test_the_example_notifies_a_partner_only_of_gestures_sent_while_offline(
    api, server, settings, redis_url, couple
):
    env = {**settings_env(settings), "EVENTS_API_URL": server.url, "JWT_SECRET": SECRET}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), cwd=ROOT, env=env, stdout=subprocess.PIPE
    )
    redis = aioredis.Redis.from_url(redis_url)
    try:
        partition = couple.id.int % settings.event_streams
        stream = f"{settings.channel_prefix}stream:{{{partition}}}"

        async def group_ready() -> bool:
            groups = await redis.xinfo_groups(stream) if await redis.exists(stream) else []
            return any(g["name"] == b"push" for g in groups)

        await eventually(group_ready, timeout=20)
        b = await connect(server.ws_url, couple, "partner_b")
        online = await send(api, couple.id, couple.a_headers)  # b is there: no push
        await b.expect("gesture_received")
        await close_quietly(b)

        async def b_offline() -> bool:
            r = await api.post(
                "/api/gestures/send",
                json={
                    "relationship_id": str(couple.id),
                    "gesture_type": "kiss",
                    "sender_id": "partner_a",
                },
                headers=couple.a_headers,
            )
            assert r.status_code == 200, r.text
            return not r.json()["recipient_online"] or None

        await eventually(b_offline, timeout=10)  # presence notices b left (grace period)
        line = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
        # The first push is for a kiss to partner_b: the hug sent while b was online, read
        # before it from the same partition, gave none.
        assert line == {"push": "partner_b", "relationship_id": str(couple.id), "what": "kiss"}
        assert online["gesture_type"] == "hug"
    finally:
        proc.terminate()
        await proc.wait()
        await redis.aclose()
