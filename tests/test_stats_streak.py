"""Section 4b: the streak day by day, and statistics that follow real sends and send-backs."""

import uuid
from datetime import datetime, timedelta

import asyncpg
import pytest

from .conftest import make_couple
from .support_helpers import send

pytestmark = pytest.mark.anyio


async def insert(
    db: asyncpg.Connection,
    relationship_id: uuid.UUID,
    sent_by: str,
    gesture_type: str,
    sent_at: datetime,
    acknowledged_after: float | None = None,
    response_id: uuid.UUID | None = None,
    gesture_id: uuid.UUID | None = None,
) -> uuid.UUID:
    gesture_id = gesture_id or uuid.uuid4()
    acknowledged_at = None
    if acknowledged_after is not None:
        acknowledged_at = sent_at + timedelta(seconds=acknowledged_after)
    await db.execute(
        """INSERT INTO connection_gestures (id, relationship_id, gesture_type, sent_by, sent_at,
            acknowledged_at, acknowledged_by, response_gesture_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        gesture_id,
        relationship_id,
        gesture_type,
        sent_by,
        sent_at,
        acknowledged_at,
        None
        if acknowledged_at is None
        else ("partner_b" if sent_by == "partner_a" else "partner_a"),
        response_id,
    )
    return gesture_id


async def stats(api, couple, headers=None, **params):
    return await api.get(
        "/api/gestures/stats",
        params={"relationship_id": str(couple.id), **params},
        headers=headers or couple.a_headers,
    )


async def test_the_streak_counts_consecutive_utc_days_ending_today_or_yesterday(
    api, database_url, db
):
    now = await db.fetchval("SELECT now()")
    day = timedelta(days=1)
    cases = {
        # days ago on which either partner sent something -> expected streak
        (0, 1, 2, 4): 3,
        (1, 2): 2,  # ending yesterday still counts
        (0,): 1,
        (2, 3, 4): 0,  # nothing today or yesterday
        (0, 0, 1, 3): 2,
    }
    for days_ago, expected in cases.items():
        couple = await make_couple(database_url)
        for i, n in enumerate(days_ago):
            await insert(db, couple.id, ("partner_a", "partner_b")[i % 2], "hug", now - n * day)
        body = (await stats(api, couple)).json()
        assert body["streak_days"] == expected, days_ago


async def test_stats_follow_real_sends_acknowledgements_and_send_backs(api, couple):
    g = await send(api, couple.id, couple.a_headers, gesture_type="kiss")
    r = await api.post(
        "/api/gestures/acknowledge",
        json={"gesture_id": g["id"], "acknowledged_by": "partner_b", "send_back": True},
        headers=couple.b_headers,
    )
    assert r.status_code == 200
    await send(api, couple.id, couple.b_headers, gesture_type="thinking_of_you")
    body = (await stats(api, couple, headers=couple.b_headers)).json()
    assert body["sent"]["partner_a"] == {"hug": 0, "kiss": 1, "thinking_of_you": 0, "total": 1}
    # The response gesture is a kiss sent by partner_b.
    assert body["sent"]["partner_b"] == {"hug": 0, "kiss": 1, "thinking_of_you": 1, "total": 2}
    assert body["acknowledged"] == {"partner_a": 1, "partner_b": 0}
    assert body["sent_back"] == {"partner_a": 0, "partner_b": 1}
    assert body["median_seconds_to_acknowledge"]["partner_a"] >= 0
    assert body["streak_days"] == 1
