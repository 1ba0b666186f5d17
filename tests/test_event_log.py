"""Section 6: the event log in PostgreSQL, the partitioned streams it feeds, and
`GET /api/events`, the source of truth other services catch up from."""

import asyncio
import contextlib
import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from service import bus, store

from .conftest import (
    InProcess,
    bearer,
    create_database,
    drop_database,
    make_couple,
    make_settings,
    token,
)
from .support_helpers import Events, assert_error, eventually, send

pytestmark = pytest.mark.anyio

SERVICE = bearer(token(service=True))


def stream_of(settings, relationship_id: uuid.UUID) -> str:
    partition = uuid.UUID(str(relationship_id)).int % settings.event_streams
    return f"{settings.channel_prefix}stream:{{{partition}}}"


async def stream_events(redis_url: str, key: str) -> list[dict]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries = await client.xrange(key)
    finally:
        await client.aclose()
    for _, fields in entries:
        assert list(fields) == [b"event"], "an entry has one field, event"
    return [json.loads(fields[b"event"]) for _, fields in entries]


async def read_log(api: httpx.AsyncClient, **query) -> tuple[list[dict], str]:
    """Every page from the query on, until an empty one: (events, the last next)."""
    found: list[dict] = []
    while True:
        r = await api.get("/api/events", params=query, headers=SERVICE)
        assert r.status_code == 200, r.text
        page = r.json()
        found += page["events"]
        if not page["events"]:
            return found, page["next"]
        query = {"after": page["next"], "limit": query.get("limit", 500)}


def of(events: list[dict], relationship_id: uuid.UUID) -> list[dict]:
    return [e for e in events if e["relationship_id"] == str(relationship_id)]


async def test_every_event_goes_to_its_partition_stream_as_it_goes_to_the_channel(
    api, settings, redis_url, couple
):
    channel = await Events.subscribe(redis_url, f"{settings.channel_prefix}{couple.id}")
    try:
        g = await send(api, couple.id, couple.a_headers, message="to the stream")
        r = await api.post(
            "/api/gestures/acknowledge",
            json={"gesture_id": g["id"], "acknowledged_by": "partner_b", "send_back": True},
            headers=couple.b_headers,
        )
        assert r.status_code == 200, r.text
        published = await channel.drain(settings.database_url)
    finally:
        await channel.close()
    streamed = await stream_events(redis_url, stream_of(settings, couple.id))
    assert [e["event"] for e in published] == [
        "gesture.sent",
        "gesture.acknowledged",
        "gesture.sent",
    ]
    # The same JSON, in the same (commit) order, and nothing of another couple's.
    assert of(streamed, couple.id) == published
    for other in range(settings.event_streams):
        key = f"{settings.channel_prefix}stream:{{{other}}}"
        if key != stream_of(settings, couple.id):
            assert of(await stream_events(redis_url, key), couple.id) == []


async def test_an_event_redis_refuses_reaches_the_stream_once_redis_takes_it(
    api, settings, redis_url, couple, caplog
):
    # The partition's key holds a string: every XADD to it is answered WRONGTYPE.
    key = stream_of(settings, couple.id)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(key, "not a stream")
        caplog.set_level("WARNING", logger="service.bus")
        g = await send(api, couple.id, couple.a_headers, message="refused, then taken")
        await eventually(lambda: "publish failed, the relay will retry" in caplog.text)
        assert await client.type(key) == b"string", "the refused event overwrote nothing"
        await client.delete(key)

        async def streamed() -> list[dict]:
            return [
                e
                for e in of(await stream_events(redis_url, key), couple.id)
                if e["gesture"]["id"] == g["id"]
            ]

        # The relay's replay sends it again: on the stream, once.
        found = await eventually(streamed, timeout=10)
        assert [e["event"] for e in found] == ["gesture.sent"]
    finally:
        await client.delete(key)
        await client.aclose()


async def test_the_event_log_pages_every_event_for_a_service_token(api, couple):
    start = datetime.now(UTC)
    sent = [await send(api, couple.id, couple.a_headers, message=f"n{i}") for i in range(5)]
    events, last = await read_log(api, since=start.isoformat(), limit=2)
    mine = of(events, couple.id)
    assert [e["gesture"]["id"] for e in mine] == [g["id"] for g in sent]
    assert len({e["event_id"] for e in events}) == len(events), "an event repeated"
    # Caught up: the last cursor gives nothing until something new commits, then just that.
    r = await api.get("/api/events", params={"after": last}, headers=SERVICE)
    assert r.json() == {"events": [], "next": last}
    later = await send(api, couple.id, couple.b_headers)
    more, _ = await read_log(api, after=last)
    assert [e["gesture"]["id"] for e in of(more, couple.id)] == [later["id"]]


async def test_the_event_log_is_for_services_and_says_what_is_wrong(api, couple):
    r = await api.get("/api/events", headers=couple.a_headers)
    assert_error(r, 403)
    assert_error(await api.get("/api/events"), 401)
    for query, field in [
        ({"after": "not-a-cursor"}, "after"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-01-01T00:00:00"}, "since"),  # no UTC offset
    ]:
        assert_error(await api.get("/api/events", params=query, headers=SERVICE), 422, field)
    long_ago = (datetime.now(UTC) - timedelta(days=8)).isoformat()
    r = await api.get("/api/events", params={"since": long_ago}, headers=SERVICE)
    detail = assert_error(r, 410, "since")
    assert "no longer kept" in detail


async def test_a_transaction_that_commits_late_is_not_passed_over(api, database_url, couple):
    """Ids are handed out before commit: an event whose transaction began first and commits
    last must still come, after the cursor has gone past a later one."""
    _, cursor = await read_log(api)
    first = await asyncpg.connect(database_url)
    second = await asyncpg.connect(database_url)
    try:
        early = first.transaction()
        await early.start()
        await store.add_events(first, [("c", b'{"n": "slow"}', couple.id)], 0)
        async with second.transaction():
            await store.add_events(second, [("c", b'{"n": "quick"}', couple.id)], 0)
        # The quick one committed, but the slow one began before it and is still open:
        # nothing past the slow one's place is readable yet.
        seen, cursor = await read_log(api, after=cursor)
        assert [e for e in seen if e.get("n")] == []
        await early.commit()
        seen, _ = await read_log(api, after=cursor)
        assert [e["n"] for e in seen if e.get("n")] == ["slow", "quick"]
    finally:
        await first.close()
        await second.close()


async def test_a_dead_process_events_are_published_by_a_survivor(
    server, settings, redis_url, database_url, db
):
    """A process that committed and died before publishing: another takes over its node
    and puts its events on the channel and the stream."""
    couple = await make_couple(database_url)
    channel = await Events.subscribe(redis_url, f"{settings.channel_prefix}{couple.id}")
    try:
        dead = await store.register_node(db, "gone", 1, 1, "x")
        await db.execute(
            "UPDATE gesture_nodes SET seen_at = now() - interval '1 hour' WHERE node = $1", dead
        )
        payload = json.dumps({"event": "test.orphan", "relationship_id": str(couple.id)})
        await store.add_events(
            db, [(f"{settings.channel_prefix}{couple.id}", payload.encode(), couple.id)], dead
        )
        event = await channel.next(timeout=10)
        assert event["event"] == "test.orphan"

        async def forgotten() -> bool:
            return (
                await db.fetchval("SELECT count(*) FROM gesture_nodes WHERE node = $1", dead) == 0
            )

        await eventually(forgotten, timeout=10)
        streamed = await stream_events(redis_url, stream_of(settings, couple.id))
        assert [e["event"] for e in of(streamed, couple.id)] == ["test.orphan"]
    finally:
        await channel.close()


async def test_events_of_a_write_whose_reply_was_lost_are_published_again(
    settings, redis_url, database_url, db
):
    """A write of events that committed while its caller saw an error (PostgreSQL cut
    between its commit and its reply) handed nobody its rows: `uncertain` makes the relay
    publish them all the same."""
    couple = await make_couple(database_url)
    pool = await store.create_pool(database_url, min_size=1, max_size=2, timeout=5)
    redis = bus.redis_client(redis_url, cluster=False, max_connections=4)
    publisher = bus.Publisher(
        redis,
        pool,
        channel_prefix=settings.channel_prefix,
        event_streams=settings.event_streams,
        stream_retention=settings.event_stream_retention,
        relay_interval=0.05,
        node_ttl=30,
        idempotency_hours=24,
        log_retention_days=7,
    )
    channel = await Events.subscribe(redis_url, f"{settings.channel_prefix}{couple.id}")
    running = None
    try:
        node = await publisher.register()
        started = datetime.now(UTC) - timedelta(seconds=5)
        payload = json.dumps({"event": "test.lost_reply", "relationship_id": str(couple.id)})
        # Committed under this process's node, and never handed to the publisher.
        await store.add_events(
            db, [(f"{settings.channel_prefix}{couple.id}", payload.encode(), couple.id)], node
        )
        running = asyncio.create_task(publisher.run())
        publisher.uncertain(started)
        event = await channel.next(timeout=10)
        assert event["event"] == "test.lost_reply"
        streamed = await eventually(
            lambda: stream_events(redis_url, stream_of(settings, couple.id)), timeout=5
        )
        assert [e["event"] for e in of(streamed, couple.id)] == ["test.lost_reply"]
    finally:
        if running is not None:
            running.cancel()
            with contextlib.suppress(BaseException):
                await running
        await channel.close()
        await bus.close_client(redis)
        await pool.close()


@pytest.fixture
def own_database(pg_admin_dsn: str):
    """A migrated database of this test's own: it empties partitions of the log."""
    dsn = create_database(pg_admin_dsn)
    yield dsn
    drop_database(pg_admin_dsn, dsn)


async def test_old_days_are_emptied_whole_and_a_cursor_into_them_answers_410(
    own_database, redis_url, prefix
):
    dsn = own_database
    conn = await asyncpg.connect(dsn)
    try:
        old_day = int(datetime.now(UTC).timestamp() // 86400) - 10
        when = datetime.fromtimestamp(old_day * 86400 + 3600, UTC)
        await conn.execute(
            """INSERT INTO gesture_events
                (node, relationship_id, channel, payload, created_at, day_slot)
            VALUES (0, $1, 'c', '{}', $2, $3)""",
            uuid.uuid4(),
            when,
            old_day % 32,
        )
        old = await conn.fetchrow("SELECT txid, id FROM gesture_events")
        await store.add_events(conn, [("c", b'{"n": "today"}', uuid.uuid4())], 0)
        assert await store.truncate_old_events(conn, 7) == [old_day % 32]
        assert await conn.fetchval("SELECT count(*) FROM gesture_events") == 1
        assert await store.truncate_old_events(conn, 7) == []  # nothing left to empty
    finally:
        await conn.close()
    server = InProcess(make_settings(dsn, redis_url, prefix))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as api:
            r = await api.get(
                "/api/events", params={"after": f"{old['txid']}.{old['id']}"}, headers=SERVICE
            )
            assert "no longer kept" in assert_error(r, 410, "after")
            events, _ = await read_log(api)
            assert [e["n"] for e in events] == ["today"]
    finally:
        await server.stop()


def test_partition_of_a_relationship_is_its_uuid_modulo_the_stream_count():
    rid = uuid.UUID("00000000-0000-0000-0000-000000000013")
    assert bus.partition_of(rid, 16) == 3
    assert bus.stream_key("gestures:", 3) == "gestures:stream:{3}"


async def logged(db, events) -> list[tuple]:
    """The log's rows holding these events' payloads, in the order written."""
    rows = await db.fetch(
        """SELECT channel, payload, relationship_id, created_at FROM gesture_events
        WHERE payload = any($1::bytea[]) ORDER BY id""",
        [e[1] for e in events],
    )
    return [tuple(r) for r in rows]


async def test_events_written_in_a_transaction_are_handed_on_as_the_log_holds_them(db, couple):
    """`add_events` answers with the rows to publish without reading them back: each must
    be the log's row, its time the transaction's (the column's default), not the clock's."""
    events = [("c", f'{{"n": "{uuid.uuid4()}"}}'.encode(), couple.id) for _ in range(3)]
    events.append(("control", b'{"n": "internal"}', None))
    async with db.transaction():
        began = await db.fetchval("SELECT now()")  # the clock moves on; now() does not
        rows = await store.add_events(db, events, 0)
    assert [(r.channel, r.payload, r.relationship_id) for r in rows] == events
    assert {r.created_at for r in rows} == {began}
    assert await logged(db, events) == [
        (r.channel, r.payload, r.relationship_id, r.created_at) for r in rows
    ]


async def test_a_delivery_mark_counts_only_where_the_row_still_matches_the_copy(api, db, couple):
    """The mark and its event are one statement written from the recipient process's copy:
    a gesture acknowledged (or delivered) meanwhile is not marked from that copy."""
    fresh = await send(api, couple.id, couple.a_headers)
    answered = await send(api, couple.id, couple.a_headers)
    r = await api.post(
        "/api/gestures/acknowledge",
        json={"gesture_id": answered["id"], "acknowledged_by": "partner_b"},
        headers=couple.b_headers,
    )
    assert r.status_code == 200, r.text
    at = datetime.now(UTC)
    ids = [uuid.UUID(fresh["id"]), uuid.UUID(answered["id"])]
    events = [("c", f'{{"n": "{i}"}}'.encode(), couple.id) for i in ids]
    marked, rows = await store.mark_delivered_from(db, ids, at, events, 0)
    assert marked == {ids[0]}
    assert [row.payload for row in rows] == [events[0][1]]
    # The rows handed to the publisher are the log's: the time bounds what a takeover replays.
    assert await logged(db, events) == [
        (row.channel, row.payload, row.relationship_id, row.created_at) for row in rows
    ]
    assert (await store.get_gesture(db, ids[0])).delivered_at == at
    assert (await store.get_gesture(db, ids[1])).delivered_at is None
    # Marked once: a second mark of the same copy finds it delivered and writes nothing.
    assert await store.mark_delivered_from(db, ids[:1], at, events[:1], 0) == (set(), [])


async def test_delivery_mark_looks_gestures_up_by_key_in_a_table_grown_since_analyze(
    fresh_database,
):
    """A new database, its delivery mark run a few times while `connection_gestures` was
    tiny, then 20,000 unacknowledged gestures later: the mark must still find its rows by
    primary key. Two plans did not: one read the partial index of every unacknowledged
    gesture (12 ms a batch at 16,000 rows), and a generic plan cached while the table was
    tiny read the whole table (17 ms at 20,000). The plan PostgreSQL ran is read from
    auto_explain, nested statements included."""
    conn = await asyncpg.connect(fresh_database)
    try:
        await store.apply_migrations(conn, lambda _: None)
        couple = await make_couple(fresh_database)
        await conn.execute("ANALYZE connection_gestures")

        async def mark(ids: list[uuid.UUID]) -> set[uuid.UUID]:
            events = [("c", b"{}", couple.id)] * len(ids)
            marked, _ = await store.mark_delivered_from(conn, ids, datetime.now(UTC), events, 0)
            return marked

        for _ in range(8):  # past the five executions after which a plan may be cached
            await mark([uuid.uuid4() for _ in range(4)])
        ids = [uuid.uuid4() for _ in range(20_000)]
        await conn.execute(
            """INSERT INTO connection_gestures (id, relationship_id, gesture_type, sent_by)
            SELECT id, $2, 'hug', 'partner_a' FROM unnest($1::uuid[]) AS t(id)""",
            ids,
            couple.id,
        )
        plans: list[str] = []
        conn.add_log_listener(lambda _, message: plans.append(message.message))
        await conn.execute(
            """LOAD 'auto_explain';
            SET auto_explain.log_min_duration = 0;
            SET auto_explain.log_nested_statements = on;
            SET auto_explain.log_level = notice;
            SET client_min_messages = notice"""
        )
        marked = ids[-20:]
        first = await mark(marked)
        await conn.execute("RESET client_min_messages")
        plan = "\n".join(plans)
        assert "Update on connection_gestures" in plan, plan
        assert "connection_gestures_pkey" in plan, plan
        assert "idx_gestures_unacknowledged" not in plan, plan
        assert "Seq Scan on connection_gestures" not in plan, plan
        # And it marks what it should: all 20, each once.
        assert (first, await mark(marked)) == (set(marked), set())
    finally:
        await conn.close()
