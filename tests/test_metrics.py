"""`GET /metrics`: what an operator scrapes from each process, read the way Prometheus reads
it, on separate uvicorn processes (each its own registry) and real PostgreSQL and Redis."""

import asyncio
import gc
import re
import uuid

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.hub import Connection

from .conftest import Couple
from .support_helpers import OwnRedis, eventually
from .support_ws import connect, send_http

pytestmark = pytest.mark.anyio

UUID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.I)


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def scrape(http: httpx.AsyncClient, base_url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one process's /metrics."""
    r = await http.get(f"{base_url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_show_a_gesture_crossing_processes_and_name_no_one(
    processes, couple: Couple, http: httpx.AsyncClient
):
    p1, p2 = await processes(2)
    a = await connect(p1.ws_url, couple, "partner_a")
    b = await connect(p2.ws_url, couple, "partner_b")
    await a.send(type="gesture", gesture_type="hug", message="secret note", request_id="r1")
    sent = await a.expect("gesture_sent", request_id="r1")
    await b.expect("gesture_received")
    await a.expect("gesture_delivered")
    await a.send(type="ping", request_id="p")
    await a.expect("pong")
    await a.send(type="nonsense")
    await a.expect("error")

    one = await scrape(http, p1.url)
    assert value(one, "gesture_ws_connections") == 1
    assert value(one, "gesture_ws_frames_received_total", type="gesture") == 1
    assert value(one, "gesture_ws_frames_received_total", type="ping") == 1
    assert value(one, "gesture_ws_frames_received_total", type="invalid") == 1
    assert value(one, "gesture_ws_frames_sent_total", type="gesture_sent") == 1
    assert value(one, "gesture_ws_frames_sent_total", type="gesture_delivered") == 1
    assert value(one, "gesture_ws_frames_sent_total", type="pong") == 1
    assert value(one, "gesture_ws_frames_sent_total", type="error") == 1
    assert value(one, "gesture_sends_total", outcome="ok") == 1
    assert value(one, "gesture_db_pool_size") >= 1
    assert value(one, "gesture_db_pool_max") == 10  # DB_POOL_MAX's default
    assert value(one, "gesture_db_pool_in_use") >= 0

    two = await scrape(http, p2.url)
    assert value(two, "gesture_ws_connections") == 1
    assert value(two, "gesture_ws_frames_sent_total", type="gesture_received") == 1
    # The delivery histogram observed the one gesture, on the process that delivered it.
    assert value(two, "gesture_delivery_seconds_count") == 1
    assert value(two, "gesture_delivery_seconds_bucket", le="+Inf") == 1
    assert 0 < value(two, "gesture_delivery_seconds_sum") < 5
    assert value(one, "gesture_delivery_seconds_count") == 0

    # No id, token or note in any label value, on either process.
    secrets = {str(couple.id), couple.a, couple.b, couple.a_token, couple.b_token}
    secrets |= {sent["gesture"]["id"], "secret note"}
    for samples in (one, two):
        for _, labels in samples:
            for _, label in labels:
                assert label not in secrets
                assert not UUID.search(label), label

    await a.close()
    await b.close()

    async def closed() -> bool:
        return value(await scrape(http, p1.url), "gesture_ws_connections") == 0

    await eventually(closed)


async def test_sends_are_counted_by_outcome_on_both_edges(
    processes, couple: Couple, http: httpx.AsyncClient
):
    [p] = await processes(1, rate_limit_per_minute=2)
    base = p.url
    await send_http(http, base, couple, message="one")
    key = {"Idempotency-Key": "k-1"}
    body = {"relationship_id": str(couple.id), "gesture_type": "kiss", "sender_id": "partner_a"}
    headers = {**key, "Authorization": f"Bearer {couple.a_token}"}
    assert (await http.post(f"{base}/api/gestures/send", json=body, headers=headers)).is_success
    # Past the limit, the same key is a replay, not a rate-limited send.
    assert (await http.post(f"{base}/api/gestures/send", json=body, headers=headers)).is_success
    r = await http.post(
        f"{base}/api/gestures/send",
        json=body,
        headers={"Authorization": f"Bearer {couple.a_token}"},
    )
    assert r.status_code == 429
    a = await connect(p.ws_url, couple, "partner_a")
    await a.send(type="gesture", gesture_type="hug", request_id="w")
    await a.expect("error", code="rate_limited", request_id="w")
    stranger = {"Authorization": f"Bearer {couple.b_token}"}
    other = {**body, "relationship_id": str(uuid.uuid4())}
    r = await http.post(f"{base}/api/gestures/send", json=other, headers=stranger)
    assert r.status_code == 403
    await a.close()

    samples = await scrape(http, base)
    assert value(samples, "gesture_sends_total", outcome="ok") == 2
    assert value(samples, "gesture_sends_total", outcome="replay") == 1
    assert value(samples, "gesture_sends_total", outcome="rate_limited") == 2
    assert value(samples, "gesture_sends_total", outcome="forbidden") == 1
    assert value(samples, "gesture_ws_frames_sent_total", type="error") == 1


async def test_outbox_backlog_and_subscriber_reconnects_while_redis_is_away(
    processes, couple: Couple, http: httpx.AsyncClient, tmp_path
):
    own = OwnRedis(tmp_path)
    await own.start()
    try:
        [p] = await processes(1, redis_url=own.url)
        before = await scrape(http, p.url)
        assert value(before, "gesture_pubsub_reconnects_total") == 0
        await own.shutdown()
        # Committed while Redis is away: the event waits in the outbox.
        await send_http(http, p.url, couple, message="while redis is down")

        async def backlog() -> dict | None:
            samples = await scrape(http, p.url)
            waiting = value(samples, "gesture_outbox_rows_waiting") >= 1
            return samples if waiting and value(samples, "gesture_outbox_oldest_seconds") else None

        await eventually(backlog, timeout=10)
        await own.start()

        async def recovered() -> bool:
            samples = await scrape(http, p.url)
            return (
                value(samples, "gesture_pubsub_reconnects_total") >= 1
                and value(samples, "gesture_outbox_rows_waiting") == 0
            )

        # The relay publishes what waited; the subscriber came back.
        await eventually(recovered, timeout=20)
    finally:
        own.stop()


async def test_a_slow_consumer_is_counted_when_it_is_dropped():
    closed = asyncio.Event()

    async def send(frame: bytes) -> None:
        await asyncio.Event().wait()  # a client that never reads

    async def close(code: int, reason: str) -> None:
        closed.set()

    conn = Connection(
        uuid.uuid4(), "partner_a", send=send, close=close, on_delivered=lambda _: None, limit=2
    )
    conn.open([])
    before = REGISTRY.get_sample_value("gesture_ws_slow_consumers_total")
    for _ in range(4):
        conn.push(b'{"type":"pong"}')
    await asyncio.wait_for(closed.wait(), 5)
    assert REGISTRY.get_sample_value("gesture_ws_slow_consumers_total") == before + 1


def test_frames_are_counted_by_the_type_their_bytes_start_with():
    types = ("gesture_acknowledged", "gesture_acknowledged_confirm", "other")

    def counts() -> list[float]:
        return [
            REGISTRY.get_sample_value("gesture_ws_frames_sent_total", {"type": t}) or 0.0
            for t in types
        ]

    before = counts()
    metrics.frame_written(b'{"type":"gesture_acknowledged","gesture_id":"x"}')
    metrics.frame_written(b'{"type":"gesture_acknowledged_confirm","gesture_id":"x"}')
    metrics.frame_written(b'{"type":"something_new"}')
    assert counts() == [v + 1 for v in before]


def test_a_full_garbage_collection_is_timed():
    def full() -> tuple[float, float]:
        labels = {"generation": "2"}
        count = REGISTRY.get_sample_value("gesture_gc_pause_seconds_count", labels) or 0.0
        total = REGISTRY.get_sample_value("gesture_gc_pause_seconds_sum", labels) or 0.0
        return count, total

    count, total = full()
    gc.collect()
    after_count, after_total = full()
    assert after_count == count + 1
    assert after_total > total
