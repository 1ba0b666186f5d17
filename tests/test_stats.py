"""`GET /api/gestures/stats`: the couple's statistics of CONTRACT 4b, computed in SQL over the
relationship's rows (never the whole table), with the access rules of `recent`."""

import asyncio
import json
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from service import store

from .conftest import Couple, create_database, drop_database, token
from .support_helpers import assert_error

pytestmark = pytest.mark.anyio

# Partner A: a hug 2 days ago, acknowledged by B after 40 s with a kiss sent back; a hug a day
# ago, acknowledged after 60 s; a thinking-of-you now, not yet acknowledged; a kiss 40 days ago.
HISTORY = [
    """INSERT INTO connection_gestures (id, relationship_id, gesture_type, sent_by, sent_at)
    VALUES ($2, $1, 'kiss', 'partner_b', now() - interval '2 days' + interval '40 seconds')""",
    """INSERT INTO connection_gestures (relationship_id, gesture_type, sent_by, sent_at,
        acknowledged_at, acknowledged_by, response_gesture_id)
    VALUES ($1, 'hug', 'partner_a', now() - interval '2 days',
        now() - interval '2 days' + interval '40 seconds', 'partner_b', $2)""",
    """INSERT INTO connection_gestures (relationship_id, gesture_type, sent_by, sent_at,
        acknowledged_at, acknowledged_by)
    VALUES ($1, 'hug', 'partner_a', now() - interval '1 day',
            now() - interval '1 day' + interval '60 seconds', 'partner_b'),
        ($1, 'thinking_of_you', 'partner_a', now(), NULL, NULL),
        ($1, 'kiss', 'partner_a', now() - interval '40 days', NULL, NULL)""",
]


async def write_history(db: asyncpg.Connection, couple: Couple) -> None:
    response = uuid.uuid4()
    async with db.transaction():
        for sql in HISTORY:
            await db.execute(sql, *((couple.id, response) if "$2" in sql else (couple.id,)))


async def stats(api: httpx.AsyncClient, couple: Couple, headers=None, **params) -> httpx.Response:
    return await api.get(
        "/api/gestures/stats",
        params={"relationship_id": str(couple.id), **params},
        headers=couple.a_headers if headers is None else headers,
    )


async def test_stats_count_what_each_partner_sent_acknowledged_and_sent_back(
    api: httpx.AsyncClient, couple: Couple, db: asyncpg.Connection
):
    await write_history(db, couple)
    r = await stats(api, couple)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["relationship_id"] == str(couple.id) and body["days"] == 30
    assert body["sent"] == {
        "partner_a": {"hug": 2, "kiss": 0, "thinking_of_you": 1, "total": 3},
        "partner_b": {"hug": 0, "kiss": 1, "thinking_of_you": 0, "total": 1},
    }
    assert body["acknowledged"] == {"partner_a": 2, "partner_b": 0}
    assert body["sent_back"] == {"partner_a": 0, "partner_b": 1}
    assert body["median_seconds_to_acknowledge"] == {"partner_a": 50.0, "partner_b": None}
    assert body["streak_days"] == 3  # today, yesterday, the day before; not 40 days ago
    # Either partner reads the same figures.
    as_b = (await stats(api, couple, couple.b_headers)).json()
    assert {**as_b, "since": None} == {**body, "since": None}  # `since` is each request's own


async def test_stats_cover_only_the_last_days_asked_for(
    api: httpx.AsyncClient, couple: Couple, db: asyncpg.Connection
):
    await write_history(db, couple)
    body = (await stats(api, couple, days=1)).json()
    assert body["sent"]["partner_a"] == {"hug": 0, "kiss": 0, "thinking_of_you": 1, "total": 1}
    assert body["sent"]["partner_b"]["total"] == 0
    assert body["median_seconds_to_acknowledge"] == {"partner_a": None, "partner_b": None}
    wide = (await stats(api, couple, days=365)).json()
    assert wide["sent"]["partner_a"]["kiss"] == 1  # the one of 40 days ago


async def test_the_window_holds_the_gesture_acknowledged_and_the_streak_runs_past_it(
    api: httpx.AsyncClient, couple: Couple, db: asyncpg.Connection
):
    """As docs/api.md says: a gesture sent before the window and answered inside it counts in
    neither `acknowledged` nor `sent_back` (the gesture sent back does count in `sent`), and
    `streak_days` is not bounded by `days`."""
    await write_history(db, couple)
    assert (await stats(api, couple, days=1)).json()["streak_days"] == 3
    before = (await stats(api, couple)).json()

    # A hug of 31 days ago, acknowledged an hour ago by B with a kiss sent back.
    kiss = uuid.uuid4()
    async with db.transaction():
        await db.execute(
            """INSERT INTO connection_gestures (id, relationship_id, gesture_type, sent_by,
                sent_at)
            VALUES ($2, $1, 'kiss', 'partner_b', now() - interval '1 hour')""",
            couple.id,
            kiss,
        )
        await db.execute(
            """INSERT INTO connection_gestures (relationship_id, gesture_type, sent_by, sent_at,
                acknowledged_at, acknowledged_by, response_gesture_id)
            VALUES ($1, 'hug', 'partner_a', now() - interval '31 days',
                now() - interval '1 hour', 'partner_b', $2)""",
            couple.id,
            kiss,
        )
    after = (await stats(api, couple)).json()
    assert after["sent"]["partner_a"] == before["sent"]["partner_a"]
    assert after["sent"]["partner_b"]["kiss"] == before["sent"]["partner_b"]["kiss"] + 1
    assert after["acknowledged"] == before["acknowledged"]
    assert after["sent_back"] == before["sent_back"]
    assert after["median_seconds_to_acknowledge"] == before["median_seconds_to_acknowledge"]


async def test_a_couple_with_no_gesture_gets_zeros_and_no_streak(
    api: httpx.AsyncClient, couple: Couple
):
    body = (await stats(api, couple)).json()
    zero = {"hug": 0, "kiss": 0, "thinking_of_you": 0, "total": 0}
    assert body["sent"] == {"partner_a": zero, "partner_b": zero}
    assert body["acknowledged"] == {"partner_a": 0, "partner_b": 0}
    assert body["streak_days"] == 0


async def test_stats_have_the_access_rules_of_recent(api: httpx.AsyncClient, couple: Couple):
    stranger = {"Authorization": f"Bearer {token('stranger-' + uuid.uuid4().hex[:8])}"}
    assert_error(await stats(api, couple, stranger), 403)
    missing = Couple()  # never inserted: no such relationship
    assert_error(await stats(api, missing, couple.a_headers), 403)
    service = {"Authorization": f"Bearer {token(service=True)}"}
    assert (await stats(api, couple, service)).status_code == 200
    for days in ("0", "366", "a week"):
        assert_error(await stats(api, couple, days=days), 422, "days", days)
    r = await api.get("/api/gestures/stats", params={"relationship_id": str(couple.id)})
    assert_error(r, 401)


# ---------------------------------------------------------------------------- the plan


@pytest.fixture(scope="module")
def big_database(pg_admin_dsn: str) -> Iterator[str]:
    """A database of its own with 100,000 gestures for one couple among 200,000 others."""
    dsn = create_database(pg_admin_dsn)

    async def fill() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                """INSERT INTO relationships (id, partner_a_id, partner_b_id)
                   SELECT md5(i::text)::uuid, 'a' || i, 'b' || i FROM generate_series(0, 199) i
                   UNION ALL SELECT $1, 'big-a', 'big-b'""",
                BIG_COUPLE,
            )
            await conn.execute(
                """INSERT INTO connection_gestures (relationship_id, gesture_type, sent_by,
                       sent_at, acknowledged_at)
                   SELECT CASE WHEN i % 3 = 0 THEN $1::uuid
                               ELSE md5((i % 200)::text)::uuid END,
                          (ARRAY['hug', 'kiss', 'thinking_of_you'])[1 + i % 3],
                          CASE WHEN i % 2 = 0 THEN 'partner_a' ELSE 'partner_b' END,
                          now() - i * interval '90 seconds',
                          CASE WHEN i % 5 = 0 THEN now() - i * interval '80 seconds' END
                   FROM generate_series(1, 300000) AS i""",
                BIG_COUPLE,
            )
            await conn.execute("ANALYZE connection_gestures")
        finally:
            await conn.close()

    asyncio.run(fill())
    yield dsn
    drop_database(pg_admin_dsn, dsn)


BIG_COUPLE = uuid.uuid4()


def _scans(plan: object) -> list[tuple[str, str | None]]:
    """(node type, index name) of every scan of connection_gestures in a JSON plan."""
    found = []
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("Relation Name") == "connection_gestures":
                found.append((node["Node Type"], node.get("Index Name")))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


@pytest.mark.parametrize("query", ["stats", "streak"])
async def test_a_couple_with_100000_gestures_is_read_by_index_not_by_scanning_the_table(
    big_database: str, query: str
):
    sql, args = {
        "stats": (store.STATS_SQL, (BIG_COUPLE, 30)),
        "streak": (store.STREAK_SQL, (BIG_COUPLE,)),
    }[query]
    conn = await asyncpg.connect(big_database)
    try:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM connection_gestures WHERE relationship_id = $1", BIG_COUPLE
            )
            == 100_000
        )
        plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args))
    finally:
        await conn.close()
    scans = _scans(plan)
    assert scans, plan
    assert all(kind != "Seq Scan" for kind, _ in scans), scans
    assert all(index is not None for _, index in scans), scans
