"""Several real `uvicorn` processes sharing PostgreSQL and Redis: partners on different
processes, presence across processes, and failures for real (kill -9, pub/sub connections
killed, a Redis restart, a client that stops reading, SIGTERM)."""

import asyncio
import collections
import re
import signal
import time
import uuid

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from .conftest import Couple, make_couple
from .support_helpers import OwnRedis, eventually
from .support_ws import (
    SilentClient,
    close_quietly,
    connect,
    gather,
    gather_received,
    headers_of,
    no_frame,
    refused,
    send_http,
)
from .wsclient import Client

pytestmark = [pytest.mark.anyio, pytest.mark.multiprocess]

NOTE = "x" * 280


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def presence_key(settings, couple: Couple, role: str) -> str:
    return f"{settings.presence_prefix}{{{couple.id}}}:{role}"


# ---------------------------------------------------------------------------- frame flows


async def test_every_frame_flow_works_with_the_partners_on_different_processes(
    processes, couple: Couple, db: asyncpg.Connection
):
    p1, p2 = await processes(2)
    b = await Client.open(p2.ws_url, couple.id, couple.b_token)
    assert await b.recv() == {"type": "presence", "partner": "partner_a", "online": False}
    a = await Client.open(p1.ws_url, couple.id, couple.a_token)
    assert await a.recv() == {"type": "presence", "partner": "partner_b", "online": True}
    await b.expect("presence", partner="partner_a", online=True)

    await a.send(type="ping", request_id="p")
    await a.expect("pong", request_id="p")

    # gesture -> gesture_sent, gesture_received on the other process, gesture_delivered back
    await a.send(type="gesture", gesture_type="hug", message="from p1", request_id="g")
    sent = (await a.expect("gesture_sent", request_id="g"))["gesture"]
    received = (await b.expect("gesture_received"))["gesture"]
    assert received["id"] == sent["id"] and received["message"] == "from p1"
    delivered = await a.expect("gesture_delivered", gesture_id=sent["id"])
    assert delivered["delivered_at"]
    assert await db.fetchval(
        "SELECT delivered_at IS NOT NULL FROM connection_gestures WHERE id = $1",
        uuid.UUID(sent["id"]),
    )

    # acknowledge with send-back on p2 -> confirm on p2; acknowledged and response on p1
    await b.send(
        type="gesture_acknowledge",
        gesture_id=sent["id"],
        send_back=True,
        send_back_message="from p2",
        request_id="ack",
    )
    confirm = await b.expect("gesture_acknowledged_confirm", request_id="ack")
    response = confirm["response_gesture"]
    assert (response["gesture_type"], response["message"]) == ("hug", "from p2")
    acked = await a.expect("gesture_acknowledged", gesture_id=sent["id"])
    assert acked["acknowledged_by"] == "partner_b"
    assert acked["response_gesture"]["id"] == response["id"]
    assert (await a.expect("gesture_received"))["gesture"]["id"] == response["id"]
    await b.expect("gesture_delivered", gesture_id=response["id"])

    # a second acknowledgement: an error, and no second response
    await b.send(type="gesture_acknowledge", gesture_id=sent["id"], send_back=True, request_id=2)
    assert (await b.expect("error", request_id=2))["code"] == "invalid"
    # the sender acknowledging its own: forbidden
    await a.send(type="gesture_acknowledge", gesture_id=sent["id"], request_id="own")
    assert (await a.expect("error", request_id="own"))["code"] == "forbidden"
    # the response acknowledged by its recipient on p1 reaches its sender on p2
    await a.send(type="gesture_acknowledge", gesture_id=response["id"], request_id="ack2")
    await a.expect("gesture_acknowledged_confirm", request_id="ack2")
    await b.expect("gesture_acknowledged", gesture_id=response["id"])

    # B's own gesture travels the other way; A has seen no second response in between
    await b.send(type="gesture", gesture_type="kiss", request_id="k")
    kiss = (await b.expect("gesture_sent", request_id="k"))["gesture"]
    assert (await a.expect("gesture_received"))["gesture"]["id"] == kiss["id"]
    assert [f["gesture"]["id"] for f in a.seen if f["type"] == "gesture_received"] == [
        response["id"],
        kiss["id"],
    ]
    await close_quietly(a, b)


async def test_http_sends_to_either_process_reach_websocket_clients_on_either(
    processes, couple: Couple, http: httpx.AsyncClient
):
    p1, p2 = await processes(2)
    a = await connect(p1.ws_url, couple, "partner_a")
    b = await connect(p2.ws_url, couple, "partner_b")
    for via in (p1, p2):
        answer = await send_http(http, via.url, couple, "partner_a", message=f"via {via.port}")
        assert answer["recipient_online"] is True
        got = await b.expect("gesture_received")
        assert got["gesture"]["id"] == answer["gesture"]["id"]
        answer = await send_http(http, via.url, couple, "partner_b", gesture_type="kiss")
        assert answer["recipient_online"] is True
        got = await a.expect("gesture_received")
        assert got["gesture"]["id"] == answer["gesture"]["id"]
    await close_quietly(a, b)


async def test_a_partner_with_two_devices_on_two_processes_gets_each_gesture_on_both(
    processes, couple: Couple, http: httpx.AsyncClient, db: asyncpg.Connection
):
    p1, p2 = await processes(2)
    b1 = await connect(p1.ws_url, couple, "partner_b")
    b2 = await connect(p2.ws_url, couple, "partner_b")
    a = await connect(p2.ws_url, couple, "partner_a")
    ids = []
    start = len(a.seen)
    for i, via in enumerate((p1, p2, p1)):
        if i == 1:
            await a.send(type="gesture", gesture_type="kiss", request_id="ws")
            ids.append((await a.expect("gesture_sent", request_id="ws"))["gesture"]["id"])
        else:
            ids.append((await send_http(http, via.url, couple, "partner_a"))["gesture"]["id"])
    for b in (b1, b2):
        assert await gather_received(b, set(ids)) == ids
    delivered = await gather(a, "gesture_delivered", set(ids), since=start)
    assert sorted(delivered) == sorted(ids)  # once each, though both devices received each
    rows = await db.fetch(
        "SELECT id FROM connection_gestures WHERE id = any($1::uuid[]) AND delivered_at IS NULL",
        [uuid.UUID(i) for i in ids],
    )
    assert rows == []
    await close_quietly(a, b1, b2)


# ---------------------------------------------------------------------------- presence


async def test_presence_follows_a_partner_across_processes_without_flapping_on_reconnect(
    processes, couple: Couple, http: httpx.AsyncClient, settings
):
    p1, p2 = await processes(2)
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        a = await Client.open(p1.ws_url, couple.id, couple.a_token)
        await a.expect("presence", partner="partner_b", online=False)
        assert (await send_http(http, p1.url, couple))["recipient_online"] is False

        b = await Client.open(p2.ws_url, couple.id, couple.b_token)
        await a.expect("presence", partner="partner_b", online=True)
        await b.expect("presence", partner="partner_a", online=True)
        for via in (p1, p2):
            assert (await send_http(http, via.url, couple))["recipient_online"] is True

        # B's last connection closes: offline, after the grace.
        await b.close()
        closed_at = time.monotonic()
        await a.expect("presence", partner="partner_b", online=False)
        assert time.monotonic() - closed_at >= settings.presence_grace * 0.8
        for via in (p1, p2):
            assert (await send_http(http, via.url, couple))["recipient_online"] is False

        b = await connect(p2.ws_url, couple, "partner_b")
        await a.expect("presence", partner="partner_b", online=True)
        frames_before = len(a.seen)

        # A phone changing networks: reconnects to the same process within the grace ...
        await b.close()
        b = await connect(p2.ws_url, couple, "partner_b")
        window = await no_frame(a, settings.presence_grace * 2)
        # ... and to the other process within the grace.
        await b.close()
        b = await connect(p1.ws_url, couple, "partner_b")

        # Barrier: p2's entry is gone once its grace ran out; only p1's remains.
        key = presence_key(settings, couple, "partner_b")

        async def one_entry() -> bool:
            return await redis.scard(key) == 1

        await eventually(one_entry, timeout=5)
        await b.send(type="gesture", gesture_type="hug", request_id="barrier")
        barrier = (await b.expect("gesture_sent", request_id="barrier"))["gesture"]
        await a.expect("gesture_received")
        assert a.seen[-1]["gesture"]["id"] == barrier["id"]
        flaps = [f for f in window + a.seen[frames_before:] if f["type"] == "presence"]
        assert flaps == []
        assert (await send_http(http, p2.url, couple))["recipient_online"] is True
        await close_quietly(a, b)
    finally:
        await redis.aclose()


async def test_kill_9_of_a_process_takes_its_partner_offline_within_the_ttl(
    processes, couple: Couple, http: httpx.AsyncClient, settings
):
    ttl = 3.0
    p1, p2 = await processes(2, presence_ttl=ttl)
    a = await connect(p1.ws_url, couple, "partner_a")
    b = await connect(p2.ws_url, couple, "partner_b")
    await a.expect("presence", partner="partner_b", online=True)
    assert (await send_http(http, p1.url, couple))["recipient_online"] is True

    p2.popen.send_signal(signal.SIGKILL)
    p2.popen.wait()
    killed_at = time.monotonic()
    await a.expect("presence", partner="partner_b", online=False, timeout=ttl + 3)
    assert time.monotonic() - killed_at <= ttl + 1.5
    assert (await send_http(http, p1.url, couple))["recipient_online"] is False
    # The survivor removed the dead process's entries and its liveness: nothing lingers.
    dead_node = re.search(r"ready pid=\d+ node=(\w+)", p2.log()).group(1)
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        assert await redis.scard(presence_key(settings, couple, "partner_b")) == 0

        async def reaped() -> bool:
            prefix = settings.presence_prefix
            return not await redis.exists(f"{prefix}entries:{dead_node}") and (
                await redis.zscore(f"{prefix}nodes", dead_node) is None
            )

        await eventually(reaped, timeout=5)
    finally:
        await redis.aclose()
    assert "removed a dead process's entries" in p1.log()
    # A is still served by p1.
    await a.send(type="ping", request_id="alive")
    await a.expect("pong", request_id="alive")
    await close_quietly(a, b)


# ---------------------------------------------------------------------------- Redis failures


async def _stream(
    http: httpx.AsyncClient, urls: list[str], couple: Couple, n: int, at: int, disrupt
) -> list[str]:
    """Send `n` gestures over HTTP, round robin over `urls`, calling `disrupt()` before the
    `at`-th; the ids of every gesture answered with 200."""
    ids = []
    for i in range(n):
        if i == at:
            await disrupt()
        answer = await send_http(http, urls[i % len(urls)], couple, message=f"#{i}")
        ids.append(answer["gesture"]["id"])
    return ids


async def test_every_gesture_arrives_once_when_redis_kills_the_pubsub_connections(
    processes, couple: Couple, http: httpx.AsyncClient, tmp_path
):
    # A Redis of the test's own: CLIENT KILL TYPE pubsub on a shared one would break every
    # other subscriber on it (other test runs, the bench).
    own = OwnRedis(tmp_path)
    await own.start()
    p1, p2 = await processes(2, redis_url=own.url, rate_limit_per_minute=10_000)
    b1 = await connect(p1.ws_url, couple, "partner_b")
    b2 = await connect(p2.ws_url, couple, "partner_b")
    redis = aioredis.Redis.from_url(own.url)
    killed = []

    async def kill_pubsub() -> None:
        killed.append(await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))

    try:
        ids = await _stream(http, [p1.url, p2.url], couple, 60, 20, kill_pubsub)
        assert killed[0] >= 2  # one pub/sub connection per process at least
        await kill_pubsub()  # and once more, after the last send
        for b in (b1, b2):
            got = await gather_received(b, set(ids), timeout=20)
            assert set(got) == set(ids)
            duplicates = {i: n for i, n in collections.Counter(got).items() if n > 1}
            assert duplicates == {}
    finally:
        await redis.aclose()
        await close_quietly(b1, b2)
        await own.shutdown()


async def test_every_committed_gesture_reaches_the_online_recipient_across_a_redis_restart(
    processes, couple: Couple, http: httpx.AsyncClient, tmp_path
):
    own = OwnRedis(tmp_path)
    await own.start()
    try:
        p1, p2 = await processes(2, redis_url=own.url, rate_limit_per_minute=10_000)
        b = await connect(p2.ws_url, couple, "partner_b")
        a = await connect(p1.ws_url, couple, "partner_a")

        async def restart() -> None:
            await own.shutdown()

        before = await _stream(http, [p1.url, p2.url], couple, 10, 5, restart)
        # Redis is down: sends still commit.
        during = await _stream(http, [p1.url, p2.url], couple, 5, -1, restart)
        await own.start()
        after = await _stream(http, [p1.url, p2.url], couple, 5, -1, restart)
        ids = before + during + after
        got = await gather_received(b, set(ids), timeout=30)
        assert set(got) == set(ids)
        # The sender hears of every delivery too.
        await gather(a, "gesture_delivered", set(ids), timeout=30)
        await close_quietly(a, b)
    finally:
        own.stop()


# ---------------------------------------------------------------------------- protection


async def test_a_client_that_stops_reading_is_dropped_while_others_keep_receiving(
    processes, database_url: str, http: httpx.AsyncClient
):
    [p] = await processes(
        1, ws_queue_size=16, rate_limit_per_minute=100_000, ws_greeting_limit=10_000
    )
    slow_couple = await make_couple(database_url)
    other = await make_couple(database_url)
    # Loopback TCP buffers a few MB before the server's writes block (the kernel grows the
    # send buffer to tcp_wmem's max): a backlog of pending gestures, greeted whole under a
    # raised WS_GREETING_LIMIT, fills them at connect, so the live gestures that follow find
    # the socket stuck.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """INSERT INTO connection_gestures (relationship_id, gesture_type, sent_by, message,
                   sent_at, delivered_at)
               SELECT $1, 'hug', 'partner_a', $2, now() - interval '1 day', now()
               FROM generate_series(1, 8000)""",
            slow_couple.id,
            NOTE,
        )
    finally:
        await conn.close()
    slow = await SilentClient.open(p.port, slow_couple.id, slow_couple.b_token)
    reader = await connect(p.ws_url, other, "partner_b")
    try:
        other_ids: list[str] = []
        deadline = time.monotonic() + 20
        online = True
        rounds = 0
        while online:
            assert time.monotonic() < deadline, "the slow reader was never dropped"
            rounds += 1
            answers = await asyncio.gather(
                *(send_http(http, p.url, slow_couple, message=NOTE) for _ in range(10)),
                send_http(http, p.url, other, message=NOTE),
            )
            other_ids.append(answers[-1]["gesture"]["id"])
            online = all(r["recipient_online"] for r in answers[:-1])
        await slow.dropped(timeout=10)
        got = await gather_received(reader, set(other_ids), timeout=20)
        assert got == other_ids  # everything, in order, once
        await reader.send(type="ping", request_id="alive")
        await reader.expect("pong", request_id="alive")
        assert "closing slow consumer" in p.log_path.read_text(errors="replace")
    finally:
        slow.close()
        await close_quietly(reader)


async def test_sigterm_closes_sockets_with_1012_and_the_client_resumes_on_another_process(
    processes, couple: Couple, settings
):
    p1, p2 = await processes(2)
    b = await connect(p1.ws_url, couple, "partner_b")
    a = await connect(p2.ws_url, couple, "partner_a")
    assert a.seen == [{"type": "presence", "partner": "partner_b", "online": True}]
    await a.send(type="gesture", gesture_type="hug", request_id="1")
    first = (await a.expect("gesture_sent", request_id="1"))["gesture"]
    await b.expect("gesture_received")

    p1.popen.send_signal(signal.SIGTERM)
    assert await b.closed_with(timeout=5) == 1012
    await a.expect("presence", partner="partner_b", online=False)
    await asyncio.wait_for(asyncio.to_thread(p1.popen.wait), settings.shutdown_timeout + 5)
    # uvicorn re-raises the signal it caught once it has shut down cleanly.
    assert p1.popen.returncode in (0, -signal.SIGTERM)
    log = p1.log_path.read_text(errors="replace")
    assert "Application shutdown complete" in log
    assert "shutdown did not finish cleanly" not in log
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        assert await redis.scard(presence_key(settings, couple, "partner_b")) == 0
    finally:
        await redis.aclose()

    await a.send(type="gesture", gesture_type="kiss", request_id="2")
    second = (await a.expect("gesture_sent", request_id="2"))["gesture"]
    b = await Client.open(p2.ws_url, couple.id, couple.b_token)
    assert await b.recv() == {"type": "presence", "partner": "partner_a", "online": True}
    pending = [(await b.recv())["gesture"]["id"] for _ in range(2)]
    assert pending == [first["id"], second["id"]]
    await a.expect("presence", partner="partner_b", online=True)
    await close_quietly(a, b)


# ---------------------------------------------------------------------------- connect storms


async def _insert_pending(db: asyncpg.Connection, couple: Couple, n: int) -> list[str]:
    rows = await db.fetch(
        """INSERT INTO connection_gestures (relationship_id, gesture_type, sent_by, message,
               sent_at)
           SELECT $1, 'hug', 'partner_a', 'pending ' || i,
                  now() - interval '1 hour' + i * interval '1 second'
           FROM generate_series(1, $2) AS i
           RETURNING id""",
        couple.id,
        n,
    )
    return [str(r["id"]) for r in rows]


async def test_the_greeting_sends_at_most_ws_greeting_limit_pending_the_rest_stay_over_http(
    processes, couple: Couple, db: asyncpg.Connection
):
    [p] = await processes(1, ws_greeting_limit=5)
    ids = await _insert_pending(db, couple, 8)
    b = await Client.open(p.ws_url, couple.id, couple.b_token)
    await b.expect("presence", partner="partner_a")
    got = [(await b.expect("gesture_received"))["gesture"]["id"] for _ in range(5)]
    assert got == ids[:5]  # the oldest first
    # Nothing more of the greeting: the next frame is the answer to this ping.
    await b.send(type="ping", request_id="after")
    assert await b.recv() == {"type": "pong", "request_id": "after"}
    async with httpx.AsyncClient(base_url=p.url) as http:
        r = await http.get(
            "/api/gestures/pending",
            params={"relationship_id": str(couple.id), "partner_id": "partner_b"},
            headers={"Authorization": f"Bearer {couple.b_token}"},
        )
    assert r.status_code == 200
    assert [g["id"] for g in r.json()["gestures"]] == ids  # all eight stay pending
    # Acknowledging the five greeted makes the next three the greeting of a new socket.
    for gesture_id in got:
        await b.send(type="gesture_acknowledge", gesture_id=gesture_id, request_id=gesture_id)
        await b.expect("gesture_acknowledged_confirm", request_id=gesture_id)
    again = await Client.open(p.ws_url, couple.id, couple.b_token)
    await again.expect("presence", partner="partner_a")
    rest = [(await again.expect("gesture_received"))["gesture"]["id"] for _ in range(3)]
    assert rest == ids[5:]
    await close_quietly(b, again)


async def test_a_connect_storm_greets_every_socket_with_its_own_relationship_only(
    processes, database_url: str, db: asyncpg.Connection
):
    """Sockets that connect at the same moment share the coalesced reads (relationships,
    SUBSCRIBE, pending); each still gets exactly its own greeting, is refused alone when it
    is not a partner, and receives live gestures afterwards."""
    [p] = await processes(1)
    couples = [await make_couple(database_url) for _ in range(20)]
    for i, c in enumerate(couples):
        await db.execute(
            """INSERT INTO connection_gestures (relationship_id, gesture_type, sent_by, message)
               SELECT $1, 'kiss', 'partner_a', 'for ' || $2 FROM generate_series(1, $3)""",
            c.id,
            str(c.id),
            i % 3,
        )
    stranger = couples[0]
    clients = await asyncio.gather(
        *(Client.open(p.ws_url, c.id, c.b_token) for c in couples),
        refused(p.ws_url, couples[1].id, stranger.b_token),
    )
    *opened, (code, frames) = clients
    assert code == 4403 and frames == []
    for i, (c, client) in enumerate(zip(couples, opened, strict=True)):
        assert await client.recv() == {"type": "presence", "partner": "partner_a", "online": False}
        for _ in range(i % 3):
            g = (await client.expect("gesture_received"))["gesture"]
            assert g["relationship_id"] == str(c.id) and g["message"] == f"for {c.id}"
        await client.send(type="ping", request_id="p")
        assert await client.recv() == {"type": "pong", "request_id": "p"}
    # Subscribed: a live gesture reaches every one of them.
    async with httpx.AsyncClient(base_url=p.url) as http:
        for c in couples:
            r = await http.post(
                "/api/gestures/send",
                json={
                    "relationship_id": str(c.id),
                    "gesture_type": "hug",
                    "sender_id": "partner_a",
                },
                headers={"Authorization": f"Bearer {c.a_token}"},
            )
            assert r.status_code == 200
    for c, client in zip(couples, opened, strict=True):
        live = (await client.expect("gesture_received"))["gesture"]
        assert live["relationship_id"] == str(c.id) and live["gesture_type"] == "hug"
    await close_quietly(*opened)


async def test_the_greeting_sends_at_most_the_limit_oldest_first_and_http_lists_the_rest(
    processes, couple: Couple, http: httpx.AsyncClient
):
    p1, p2 = await processes(2, ws_greeting_limit=3)
    sent = [
        (await send_http(http, p1.url, couple, message=f"#{i}"))["gesture"]["id"] for i in range(5)
    ]
    b = await Client.open(p2.ws_url, couple.id, couple.b_token)
    greeting = [await b.recv() for _ in range(4)]
    assert greeting[0]["type"] == "presence"
    assert [f["gesture"]["id"] for f in greeting[1:]] == sent[:3]
    # Nothing more of the greeting: the next frame is the answer to a ping.
    await b.send(type="ping", request_id="after-greeting")
    assert await b.recv() == {"type": "pong", "request_id": "after-greeting"}
    # The other two stay pending, readable over HTTP, oldest first.
    r = await http.get(
        f"{p2.url}/api/gestures/pending",
        params={"relationship_id": str(couple.id), "partner_id": "partner_b"},
        headers=headers_of(couple, "partner_b"),
    )
    assert r.status_code == 200, r.text
    assert [g["id"] for g in r.json()["gestures"]] == sent
    # A live gesture still arrives after a limited greeting.
    live = (await send_http(http, p1.url, couple, message="live"))["gesture"]["id"]
    assert (await b.expect("gesture_received"))["gesture"]["id"] == live
    await close_quietly(b)
