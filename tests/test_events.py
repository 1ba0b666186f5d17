"""Section 6: every committed change is announced on Redis, also across outages."""

import asyncio
import json
import sys
import time
import uuid

import asyncpg
import httpx
import pytest

from service.schemas import GestureAcknowledged, GestureSent

from .conftest import ROOT, InProcess, make_couple, make_settings
from .support_helpers import (
    Events,
    OwnRedis,
    assert_error,
    assert_iso_utc,
    committed_event_schema,
    decode_event,
    eventually,
    gesture_row,
    schema_errors,
    send,
    send_body,
)
from .support_proxy import TcpProxy

pytestmark = pytest.mark.anyio


@pytest.fixture
async def events(settings, redis_url, couple):
    subscription = await Events.subscribe(redis_url, f"{settings.channel_prefix}{couple.id}")
    yield subscription
    await subscription.close()


def check_event(event: dict, name: str, relationship_id: uuid.UUID) -> None:
    """The event fits the committed JSON Schema, the service's own Struct, and section 6."""
    assert schema_errors(event, committed_event_schema()) == []
    decode_event(event)
    assert event["v"] == 1 and event["event"] == name
    uuid.UUID(event["event_id"])
    assert_iso_utc(event["occurred_at"])
    assert event["relationship_id"] == str(relationship_id)
    assert event["gesture"]["relationship_id"] == str(relationship_id)


async def test_send_publishes_gesture_sent_after_the_row_is_readable(api, couple, db, events):
    g = await send(api, couple.id, couple.a_headers, message="hello")
    event = await events.expect("gesture.sent", id=g["id"])
    row = await gesture_row(db, g["id"])
    assert row is not None and row["message"] == "hello"
    check_event(event, "gesture.sent", couple.id)
    assert event["gesture"] == g
    assert "response_gesture" not in event or event["response_gesture"] is None
    assert isinstance(decode_event(event), GestureSent)


async def test_acknowledge_publishes_gesture_acknowledged_after_it_is_readable(
    api, couple, db, events
):
    g = await send(api, couple.id, couple.a_headers)
    r = await api.post(
        "/api/gestures/acknowledge",
        json={"gesture_id": g["id"], "acknowledged_by": "partner_b"},
        headers=couple.b_headers,
    )
    assert r.json()["acknowledged"] is True
    event = await events.expect("gesture.acknowledged", id=g["id"])
    row = await gesture_row(db, g["id"])
    assert row["acknowledged_at"] is not None and row["acknowledged_by"] == "partner_b"
    check_event(event, "gesture.acknowledged", couple.id)
    assert event["gesture"]["acknowledged_by"] == "partner_b"
    assert assert_iso_utc(event["gesture"]["acknowledged_at"]) == row["acknowledged_at"]
    assert event["response_gesture"] is None
    assert isinstance(decode_event(event), GestureAcknowledged)


async def test_acknowledge_with_send_back_publishes_the_ack_and_the_response(
    api, couple, db, events
):
    g = await send(api, couple.id, couple.a_headers, gesture_type="thinking_of_you")
    r = await api.post(
        "/api/gestures/acknowledge",
        json={"gesture_id": g["id"], "acknowledged_by": "partner_b", "send_back": True},
        headers=couple.b_headers,
    )
    response = r.json()["response_gesture"]
    acked = await events.expect("gesture.acknowledged", id=g["id"])
    assert (await gesture_row(db, g["id"]))["response_gesture_id"] == uuid.UUID(response["id"])
    assert await gesture_row(db, response["id"]) is not None
    check_event(acked, "gesture.acknowledged", couple.id)
    assert acked["response_gesture"] == response
    assert acked["gesture"]["response_gesture_id"] == response["id"]
    sent = await events.expect("gesture.sent", id=response["id"])
    check_event(sent, "gesture.sent", couple.id)
    assert sent["gesture"]["sent_by"] == "partner_b"
    assert sent["event_id"] != acked["event_id"]


async def test_each_event_has_its_own_id(api, couple, events, database_url):
    for _ in range(3):
        await send(api, couple.id, couple.a_headers)
    seen = await events.drain(database_url)
    assert len(seen) == 3
    assert len({e["event_id"] for e in seen}) == 3


async def test_schema_command_reproduces_the_committed_schemas(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "schema",
        "--dir",
        str(tmp_path),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    for name in ("event.schema.json", "openapi.json"):
        assert (tmp_path / name).read_bytes() == (ROOT / "schemas" / name).read_bytes(), name


def test_committed_event_schema_rejects_what_is_not_an_event():
    schema = committed_event_schema()
    assert schema_errors({"event": "gesture.sent"}, schema)
    assert schema_errors({"v": 1, "event": "gesture.lost", "gesture": {}}, schema)


# ---------------------------------------------------------------------------- Redis outage


@pytest.fixture
async def own_redis(tmp_path):
    server = OwnRedis(tmp_path)
    await server.start()
    yield server
    server.stop()


async def test_send_while_redis_is_down_succeeds_and_its_event_follows_when_redis_is_back(
    own_redis, database_url, prefix, db
):
    settings = make_settings(database_url, own_redis.url, prefix)
    couple = await make_couple(database_url)
    server = InProcess(settings)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as api:
            await send(api, couple.id, couple.a_headers)  # warm: the relationship is known
            await own_redis.shutdown()
            r = await api.post(
                "/api/gestures/send",
                json=send_body(couple.id, message="while redis was away"),
                headers=couple.a_headers,
            )
            assert r.status_code == 200, r.text
            g = r.json()["gesture"]
            assert (await gesture_row(db, g["id"]))["message"] == "while redis was away"
            # Back, but refusing the service until this test has subscribed, so the event
            # cannot go out before anyone listens.
            await own_redis.start("--requirepass", "wait-for-the-test")
            events = await Events.subscribe(
                own_redis.url, f"{settings.channel_prefix}{couple.id}", "wait-for-the-test"
            )
            try:
                await events.redis.config_set("requirepass", "")
                event = await events.expect("gesture.sent", timeout=10, id=g["id"])
                check_event(event, "gesture.sent", couple.id)
                assert event["gesture"] == g
                # The same event reached its stream too (the channel's XADD is in the
                # same pipeline, after the PUBLISH).
                partition = couple.id.int % settings.event_streams
                stream = f"{settings.channel_prefix}stream:{{{partition}}}"
                entries = await events.redis.xrange(stream)
                assert event in [json.loads(fields[b"event"]) for _, fields in entries]

                async def ready() -> bool:
                    return (await api.get("/readyz")).status_code == 200

                await eventually(ready, timeout=10)
            finally:
                await events.close()
    finally:
        await server.stop()


# ---------------------------------------------------------------------------- PostgreSQL outage


@pytest.fixture
async def pg_proxy(database_url):
    proxy = TcpProxy.for_dsn(database_url)
    await proxy.start()
    yield proxy
    await proxy.close()


async def _timed(request) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = await request
    return r, time.monotonic() - started


@pytest.mark.parametrize("outage", ["refused", "silent"])
async def test_postgres_unreachable_answers_503_within_5_seconds_then_recovers(
    pg_proxy, database_url, redis_url, prefix, outage
):
    known = await make_couple(database_url)
    unknown = await make_couple(database_url)
    # The default db_timeout: the contract's bound holds for the shipped configuration.
    settings = make_settings(pg_proxy.dsn(database_url), redis_url, prefix, db_timeout=5.0)
    server = InProcess(settings)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as api:
            await send(api, known.id, known.a_headers)
            if outage == "refused":
                await pg_proxy.cut()
            else:
                pg_proxy.stall()
            attempts = await asyncio.gather(
                _timed(
                    api.post(
                        "/api/gestures/send", json=send_body(known.id), headers=known.a_headers
                    )
                ),
                _timed(
                    api.post(
                        "/api/gestures/send", json=send_body(unknown.id), headers=unknown.a_headers
                    )
                ),
                _timed(
                    api.get(
                        "/api/gestures/pending",
                        params={"relationship_id": str(unknown.id), "partner_id": "partner_b"},
                        headers=unknown.b_headers,
                    )
                ),
                _timed(api.get("/readyz")),
            )
            for r, elapsed in attempts:
                assert r.status_code == 503, (r.request.url, r.text)
                assert elapsed < 5.5, (r.request.url, elapsed)
            for r, _ in attempts[:3]:
                assert_error(r, 503)
            assert attempts[3][0].json()["checks"]["postgres"] != "ok"
            await pg_proxy.restore()

            async def sends_again() -> bool:
                r = await api.post(
                    "/api/gestures/send", json=send_body(unknown.id), headers=unknown.a_headers
                )
                return r.status_code == 200

            await eventually(sends_again, timeout=15, interval=0.2)
            assert (await api.get("/readyz")).status_code == 200
    finally:
        await server.stop()
    conn = await asyncpg.connect(database_url)
    try:
        n = await conn.fetchval(
            "SELECT count(*) FROM connection_gestures WHERE relationship_id = $1", known.id
        )
    finally:
        await conn.close()
    assert n == 1  # the refused send left nothing behind


async def test_a_connection_lost_mid_query_is_unavailable_not_an_internal_error(
    pg_proxy, database_url
):
    """The chaos run's PostgreSQL cut: a query in flight when the connection drops raised
    InterfaceError from the cleanup (a 500) instead of Unavailable (a 503)."""
    from service import errors, store

    pool = await store.create_pool(pg_proxy.dsn(database_url), min_size=1, max_size=2, timeout=5)
    watcher = await asyncpg.connect(database_url)
    marker = f"mid-query {uuid.uuid4()}"

    async def on_the_server() -> bool:
        return await watcher.fetchval(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE $1", f"%{marker}%"
        )

    try:
        with pytest.raises(errors.Unavailable):
            async with store.connection(pool) as conn:
                query = asyncio.ensure_future(conn.fetchval(f"SELECT pg_sleep(3), '{marker}'"))
                await eventually(on_the_server)
                await pg_proxy.cut()
                await query
        await pg_proxy.restore()
        async with store.connection(pool) as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await watcher.close()
        await pool.close()
