"""Section 4b: the couple's statistics, in SQL on the relationship's indexes."""

import json
import uuid
from datetime import datetime, timedelta

import asyncpg
import pytest

from service import store

from .conftest import bearer, make_couple, token
from .support_helpers import assert_error, assert_iso_utc, send

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


async def test_stats_count_each_partners_gestures_acknowledgements_send_backs_and_median(
    api, couple, db
):
    now = await db.fetchval("SELECT now()")
    hour = timedelta(hours=1)
    # partner_b answers the first hug with a hug of its own.
    response = await insert(db, couple.id, "partner_b", "hug", now - hour + timedelta(seconds=10))
    await insert(db, couple.id, "partner_a", "hug", now - hour, 10, response)
    await insert(db, couple.id, "partner_a", "hug", now - 2 * hour, 30)
    await insert(db, couple.id, "partner_a", "kiss", now - 3 * hour, 20)
    await insert(db, couple.id, "partner_b", "kiss", now - 5 * hour)
    await insert(db, couple.id, "partner_a", "thinking_of_you", now - timedelta(days=40), 5)

    r = await stats(api, couple)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["relationship_id"] == str(couple.id) and body["days"] == 30
    since = assert_iso_utc(body["since"])
    assert abs((now - timedelta(days=30) - since).total_seconds()) < 60
    assert body["sent"] == {
        "partner_a": {"hug": 2, "kiss": 1, "thinking_of_you": 0, "total": 3},
        "partner_b": {"hug": 1, "kiss": 1, "thinking_of_you": 0, "total": 2},
    }
    assert body["acknowledged"] == {"partner_a": 3, "partner_b": 0}
    assert body["sent_back"] == {"partner_a": 0, "partner_b": 1}
    assert body["median_seconds_to_acknowledge"] == {"partner_a": 20.0, "partner_b": None}
    assert body["streak_days"] in (1, 2)  # the last 5 hours may straddle midnight UTC

    # A longer window takes in the old one.
    old = (await stats(api, couple, days=60)).json()
    assert old["sent"]["partner_a"]["thinking_of_you"] == 1
    assert old["sent"]["partner_a"]["total"] == 4
    assert old["median_seconds_to_acknowledge"]["partner_a"] == 15.0


async def test_a_couple_with_no_gesture_gets_zeros_and_nulls(api, couple):
    body = (await stats(api, couple, days=7)).json()
    zero = {"hug": 0, "kiss": 0, "thinking_of_you": 0, "total": 0}
    assert body["sent"] == {"partner_a": zero, "partner_b": zero}
    assert body["acknowledged"] == body["sent_back"] == {"partner_a": 0, "partner_b": 0}
    assert body["median_seconds_to_acknowledge"] == {"partner_a": None, "partner_b": None}
    assert body["streak_days"] == 0 and body["days"] == 7


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


async def test_stats_have_the_access_rules_of_recent(api, couple):
    outsider = bearer(token("stranger-" + uuid.uuid4().hex[:8]))
    assert_error(await stats(api, couple, headers=outsider), 403)
    missing = await api.get(
        "/api/gestures/stats",
        params={"relationship_id": str(uuid.uuid4())},
        headers=couple.a_headers,
    )
    assert_error(missing, 403)
    assert (await stats(api, couple, headers=couple.b_headers)).status_code == 200
    assert (await stats(api, couple, headers=bearer(token(service=True)))).status_code == 200
    assert_error(
        await api.get("/api/gestures/stats", params={"relationship_id": str(couple.id)}), 401
    )
    for days in ("0", "366", "x", "-1"):
        assert_error(await stats(api, couple, days=days), 422, "days", case=days)
    r = await api.get(
        "/api/gestures/stats", params={"relationship_id": "nope"}, headers=couple.a_headers
    )
    assert_error(r, 422, "relationship_id")


# ---------------------------------------------------------------------------- the plan


def _scans(plan: dict) -> list[tuple[str, str | None]]:
    """(node type, relation) of every scan node in an EXPLAIN (FORMAT JSON) plan."""
    found = []
    if "Scan" in plan["Node Type"]:
        found.append((plan["Node Type"], plan.get("Relation Name")))
    for child in plan.get("Plans", ()):
        found.extend(_scans(child))
    return found


async def test_a_couple_with_100000_gestures_is_not_read_by_scanning_the_table(fresh_database):
    """EXPLAIN of the statistics and the streak: index scans of the couple's rows only,
    whatever the size of their history or of the table."""
    conn = await asyncpg.connect(fresh_database)
    try:
        await store.apply_migrations(conn, lambda _: None)
        heavy = uuid.uuid4()
        others = [uuid.uuid4() for _ in range(200)]
        await conn.execute(
            "INSERT INTO relationships (id) SELECT unnest($1::uuid[])", [heavy, *others]
        )
        # 100,000 gestures over three years for one couple; 20,000 more for 200 others.
        await conn.execute(
            """INSERT INTO connection_gestures
                (relationship_id, gesture_type, sent_by, sent_at, acknowledged_at)
            SELECT $1, (ARRAY['hug','kiss','thinking_of_you'])[1 + i % 3],
                (ARRAY['partner_a','partner_b'])[1 + i % 2],
                now() - (i * interval '15 minutes'), now() - (i * interval '15 minutes')
                    + interval '1 minute'
            FROM generate_series(1, 100000) AS i""",
            heavy,
        )
        await conn.execute(
            """INSERT INTO connection_gestures (relationship_id, gesture_type, sent_by, sent_at)
            SELECT ($1::uuid[])[1 + i % 200], 'hug', 'partner_a', now() - i * interval '7 minutes'
            FROM generate_series(1, 20000) AS i""",
            others,
        )
        await conn.execute("ANALYZE connection_gestures")
        for days in (30, 90):
            plan = json.loads(
                await conn.fetchval(f"EXPLAIN (FORMAT JSON) {store.STATS_SQL}", heavy, days)
            )[0]["Plan"]
            scans = _scans(plan)
            assert ("Seq Scan", "connection_gestures") not in scans, (days, scans)
            assert any(r == "connection_gestures" for _, r in scans), scans
        plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {store.STREAK_SQL}", heavy))[
            0
        ]["Plan"]
        scans = _scans(plan)
        assert ("Seq Scan", "connection_gestures") not in scans, scans
        # And the answer is right: a gesture every 15 minutes, three years long.
        _, per = await store.stats(conn, heavy, 30)
        assert per["partner_a"].total + per["partner_b"].total in (2879, 2880)
        assert await store.streak_days(conn, heavy) > 1000
    finally:
        await conn.close()
