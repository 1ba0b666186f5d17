"""The WebSocket edge on one in-process server: authentication, every frame flow of the
contract's section 5, bad frames, limits, delivery marks and the keepalive."""

import asyncio
import json
import uuid

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from .conftest import SECRET, Couple, InProcess, make_couple, make_settings, token
from .support_helpers import eventually
from .support_ws import (
    SilentClient,
    close_quietly,
    connect,
    no_frame,
    refused,
    send_http,
)
from .wsclient import Client

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------------------- connecting


async def test_a_bad_or_expired_token_is_closed_with_4401(server: InProcess, couple: Couple):
    other_secret = token(couple.a).rsplit(".", 1)[0] + ".c2lnbmF0dXJl"
    for tok in ["not-a-jwt", token(couple.a, ttl=-30), other_secret, ""]:
        code, frames = await refused(server.ws_url, couple.id, tok)
        assert code == 4401, tok
        assert frames == []


async def test_an_unsigned_token_is_closed_with_4401(server: InProcess, couple: Couple):
    def b64(obj) -> str:
        import base64

        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': couple.a, 'exp': 2**40})}."
    code, frames = await refused(server.ws_url, couple.id, unsigned)
    assert (code, frames) == (4401, [])


async def test_a_stranger_gets_4403_and_never_a_frame_of_the_relationship(
    server: InProcess, api: httpx.AsyncClient, couple: Couple
):
    await send_http(api, server.url, couple, "partner_a", message="private")
    stranger = token(f"stranger-{uuid.uuid4().hex[:8]}")
    code, frames = await refused(server.ws_url, couple.id, stranger)
    assert (code, frames) == (4403, [])
    # Even naming a role does not help.
    ws = await ws_connect(
        f"{server.ws_url}?relationship_id={couple.id}&partner_id=partner_b&token={stranger}"
    )
    client = Client(ws)
    assert (await client.closed_with(), client.seen) == (4403, [])


async def test_a_refused_partner_id_is_named_in_the_close_reason(server: InProcess, couple: Couple):
    """The socket's role comes from its `partner_id` query parameter: the reason says so."""
    from service import auth

    service = auth.issue(SECRET, service=True)
    for tok, query in [(service, ""), (couple.a_token, "&partner_id=partner_b")]:
        ws = await ws_connect(f"{server.ws_url}?relationship_id={couple.id}{query}&token={tok}")
        assert await Client(ws).closed_with() == 4403
        assert ws.close_reason.startswith("partner_id:"), ws.close_reason


async def test_an_unknown_relationship_is_closed_with_4403(server: InProcess, couple: Couple):
    code, frames = await refused(server.ws_url, uuid.uuid4(), couple.a_token)
    assert (code, frames) == (4403, [])


async def test_a_missing_or_malformed_relationship_id_is_closed_with_4400(
    server: InProcess, couple: Couple
):
    for rel in ["not-a-uuid", "", f"{couple.id}x"]:
        code, frames = await refused(server.ws_url, rel, couple.a_token)
        assert (code, frames) == (4400, []), rel
    ws = await ws_connect(f"{server.ws_url}?token={couple.a_token}")  # no relationship_id
    client = Client(ws)
    assert (await client.closed_with(), client.seen) == (4400, [])
    assert ws.close_reason == "relationship_id must be a UUID"


async def test_a_bad_token_wins_over_a_bad_relationship_id(server: InProcess, couple: Couple):
    """Both wrong: 4401, the token is checked first (as over HTTP, 401 before 422)."""
    for rel in ["not-a-uuid", ""]:
        code, frames = await refused(server.ws_url, rel, "not-a-jwt")
        assert (code, frames) == (4401, []), rel


async def test_the_token_may_come_in_an_authorization_header(server: InProcess, couple: Couple):
    async with ws_connect(
        f"{server.ws_url}?relationship_id={couple.id}",
        additional_headers={"Authorization": f"Bearer {couple.b_token}"},
    ) as ws:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert frame == {"type": "presence", "partner": "partner_a", "online": False}


async def test_connect_greets_with_partner_presence_then_pending_gestures_oldest_first(
    server: InProcess, api: httpx.AsyncClient, couple: Couple
):
    a = await Client.open(server.ws_url, couple.id, couple.a_token)
    assert await a.recv() == {"type": "presence", "partner": "partner_b", "online": False}
    sent = []
    for kind in ["hug", "kiss", "thinking_of_you"]:
        await a.send(type="gesture", gesture_type=kind, message=f"a {kind}", request_id=kind)
        sent.append((await a.expect("gesture_sent", request_id=kind))["gesture"])
    b = await Client.open(server.ws_url, couple.id, couple.b_token)
    greeting = [await b.recv() for _ in range(4)]
    assert greeting[0] == {"type": "presence", "partner": "partner_a", "online": True}
    assert [f["type"] for f in greeting[1:]] == ["gesture_received"] * 3
    assert [f["gesture"]["id"] for f in greeting[1:]] == [g["id"] for g in sent]
    assert [f["gesture"]["message"] for f in greeting[1:]] == [g["message"] for g in sent]
    # B's arrival is announced to A.
    await a.expect("presence", partner="partner_b", online=True)
    await close_quietly(a, b)


async def test_a_partner_with_more_pending_gestures_than_the_queue_holds_gets_them_all(
    database_url: str, redis_url: str, prefix: str, couple: Couple
):
    s = InProcess(make_settings(database_url, redis_url, prefix, ws_queue_size=8))
    await s.start()
    try:
        conn = await asyncpg.connect(database_url)
        try:
            ids = await conn.fetch(
                """INSERT INTO connection_gestures (relationship_id, gesture_type, sent_by,
                       message, sent_at)
                   SELECT $1, 'hug', 'partner_a', 'pending ' || i,
                          now() - interval '1 hour' + i * interval '1 second'
                   FROM generate_series(1, 30) AS i
                   RETURNING id""",
                couple.id,
            )
        finally:
            await conn.close()
        b = await Client.open(s.ws_url, couple.id, couple.b_token)
        await b.expect("presence")
        got = [(await b.expect("gesture_received"))["gesture"]["id"] for _ in range(30)]
        assert got == [str(r["id"]) for r in ids]
        await b.send(type="ping", request_id="still open")
        await b.expect("pong", request_id="still open")
        await b.close()
    finally:
        await s.stop()


# ---------------------------------------------------------------------------- frame flows


async def test_ping_gets_pong_with_the_request_id(server: InProcess, couple: Couple):
    a = await connect(server.ws_url, couple, "partner_a")
    await a.send(type="ping", request_id="p-1")
    assert await a.recv() == {"type": "pong", "request_id": "p-1"}
    await a.send(type="ping", request_id=42)
    assert await a.recv() == {"type": "pong", "request_id": 42}
    await a.send(type="ping")
    assert await a.recv() == {"type": "pong"}
    await a.close()


async def test_a_gesture_frame_is_confirmed_to_the_sender_and_received_by_the_partner(
    server: InProcess, couple: Couple, db: asyncpg.Connection
):
    a = await connect(server.ws_url, couple, "partner_a")
    b = await connect(server.ws_url, couple, "partner_b")
    await a.send(
        type="gesture", gesture_type="kiss", message="miss you\n", ai_generated=True, request_id="g"
    )
    sent = (await a.expect("gesture_sent", request_id="g"))["gesture"]
    assert sent["sent_by"] == "partner_a"
    assert sent["relationship_id"] == str(couple.id)
    assert (sent["gesture_type"], sent["message"], sent["ai_generated"]) == (
        "kiss",
        "miss you\n",
        True,
    )
    received = (await b.expect("gesture_received"))["gesture"]
    assert received["id"] == sent["id"]
    assert received["message"] == "miss you\n"
    row = await db.fetchrow("SELECT sent_by FROM connection_gestures WHERE id = $1", sent["id"])
    assert row["sent_by"] == "partner_a"
    await close_quietly(a, b)


async def test_acknowledge_with_send_back_notifies_both_partners(
    server: InProcess, couple: Couple, db: asyncpg.Connection
):
    a = await connect(server.ws_url, couple, "partner_a")
    b = await connect(server.ws_url, couple, "partner_b")
    await a.send(type="gesture", gesture_type="hug", request_id="g")
    original = (await a.expect("gesture_sent", request_id="g"))["gesture"]
    await b.expect("gesture_received")
    await b.send(
        type="gesture_acknowledge",
        gesture_id=original["id"],
        send_back=True,
        send_back_type="kiss",
        send_back_message="back at you",
        request_id="ack",
    )
    confirm = await b.expect("gesture_acknowledged_confirm", request_id="ack")
    response = confirm["response_gesture"]
    assert confirm["gesture_id"] == original["id"]
    assert (response["sent_by"], response["gesture_type"], response["message"]) == (
        "partner_b",
        "kiss",
        "back at you",
    )
    acked = await a.expect("gesture_acknowledged", gesture_id=original["id"])
    assert acked["acknowledged_by"] == "partner_b"
    assert acked["response_gesture"]["id"] == response["id"]
    received = await a.expect("gesture_received")
    assert received["gesture"]["id"] == response["id"]

    # A second acknowledgement is refused and creates no second response.
    await b.send(
        type="gesture_acknowledge", gesture_id=original["id"], send_back=True, request_id="again"
    )
    error = await b.expect("error", request_id="again")
    assert error["code"] == "invalid"
    await b.send(type="gesture", gesture_type="hug", message="marker", request_id="m")
    marker = (await b.expect("gesture_sent", request_id="m"))["gesture"]
    nxt = await a.expect("gesture_received")
    assert nxt["gesture"]["id"] == marker["id"]  # nothing came between
    assert not [f for f in a.seen if f["type"] == "gesture_acknowledged"][1:]
    count = await db.fetchval(
        "SELECT count(*) FROM connection_gestures WHERE relationship_id = $1", couple.id
    )
    assert count == 3  # original, one response, marker
    row = await db.fetchrow(
        "SELECT acknowledged_by, response_gesture_id FROM connection_gestures WHERE id = $1",
        uuid.UUID(original["id"]),
    )
    assert (row["acknowledged_by"], str(row["response_gesture_id"])) == (
        "partner_b",
        response["id"],
    )
    await close_quietly(a, b)


async def test_acknowledge_without_send_back_confirms_with_no_response(
    server: InProcess, couple: Couple
):
    a = await connect(server.ws_url, couple, "partner_a")
    b = await connect(server.ws_url, couple, "partner_b")
    await a.send(type="gesture", gesture_type="hug", request_id="g")
    gid = (await a.expect("gesture_sent"))["gesture"]["id"]
    await b.send(type="gesture_acknowledge", gesture_id=gid, request_id=7)
    confirm = await b.expect("gesture_acknowledged_confirm", request_id=7)
    assert confirm["response_gesture"] is None
    acked = await a.expect("gesture_acknowledged", gesture_id=gid)
    assert acked["response_gesture"] is None
    await close_quietly(a, b)


async def test_the_sender_acknowledging_its_own_gesture_gets_forbidden(
    server: InProcess, couple: Couple
):
    a = await connect(server.ws_url, couple, "partner_a")
    await a.send(type="gesture", gesture_type="hug", request_id="g")
    gid = (await a.expect("gesture_sent"))["gesture"]["id"]
    await a.send(type="gesture_acknowledge", gesture_id=gid, send_back=True, request_id="own")
    error = await a.expect("error", request_id="own")
    assert error["code"] == "forbidden"
    await a.send(type="ping", request_id="after")
    await a.expect("pong", request_id="after")
    await a.close()


async def test_acknowledging_a_gesture_of_another_relationship_is_not_found(
    server: InProcess, couple: Couple, database_url: str
):
    other = await make_couple(database_url)
    a = await connect(server.ws_url, other, "partner_a")
    await a.send(type="gesture", gesture_type="hug", request_id="g")
    foreign = (await a.expect("gesture_sent"))["gesture"]["id"]
    b = await connect(server.ws_url, couple, "partner_b")
    await b.send(type="gesture_acknowledge", gesture_id=foreign, request_id="x")
    assert (await b.expect("error", request_id="x"))["code"] == "not_found"
    await b.send(type="gesture_acknowledge", gesture_id=str(uuid.uuid4()), request_id="y")
    assert (await b.expect("error", request_id="y"))["code"] == "not_found"
    await close_quietly(a, b)


@pytest.mark.parametrize(
    ("raw", "request_id"),
    [
        ("not json at all", None),
        ('{"type": "ping", "request_id": "broken', None),
        ("[1, 2, 3]", None),
        ('{"type": "teleport", "request_id": "u1"}', "u1"),
        ('{"request_id": "u2"}', "u2"),
        ('{"type": "gesture", "gesture_type": "slap", "request_id": "u3"}', "u3"),
        ('{"type": "gesture", "gesture_type": "hug", "message": 5, "request_id": 4}', 4),
        (json.dumps({"type": "gesture", "gesture_type": "hug", "message": "x" * 281}), None),
        (json.dumps({"type": "gesture", "gesture_type": "hug", "message": "a\x00b"}), None),
        ('{"type": "gesture_acknowledge", "gesture_id": "nope", "request_id": "u5"}', "u5"),
        ('{"type": "gesture_acknowledge", "request_id": "u6"}', "u6"),
        ("[" * 5_000 + "]" * 5_000, None),
    ],
)
async def test_a_bad_frame_gets_an_error_frame_and_the_connection_goes_on(
    server: InProcess, couple: Couple, raw: str, request_id
):
    a = await connect(server.ws_url, couple, "partner_a")
    await a.ws.send(raw)
    error = await a.expect("error")
    assert error["code"] == "invalid"
    assert error.get("request_id") == request_id
    assert "Traceback" not in error["message"]
    await a.send(type="ping", request_id="alive")
    await a.expect("pong", request_id="alive")
    await a.close()


async def test_a_binary_frame_that_is_not_utf8_gets_an_error_frame(
    server: InProcess, couple: Couple
):
    a = await connect(server.ws_url, couple, "partner_a")
    await a.ws.send(b"\xff\xfe\x00garbage")
    assert (await a.expect("error"))["code"] == "invalid"
    await a.send(type="ping", request_id="alive")
    await a.expect("pong", request_id="alive")
    await a.close()


async def test_a_frame_over_16_kib_closes_the_connection_with_1009(
    server: InProcess, couple: Couple
):
    a = await connect(server.ws_url, couple, "partner_a")
    await a.send(type="ping", request_id="x" * (16 * 1024))
    assert await a.closed_with() == 1009


async def test_a_frame_just_under_16_kib_is_answered(server: InProcess, couple: Couple):
    a = await connect(server.ws_url, couple, "partner_a")
    frame = '{"type": "ping"}' + " " * (16 * 1024 - 16)
    assert len(frame) == 16 * 1024
    await a.ws.send(frame)
    await a.expect("pong")
    await a.close()


# ---------------------------------------------------------------------------- delivery


async def test_delivered_reaches_the_sender_once_even_when_the_recipient_has_two_devices(
    server: InProcess, couple: Couple, db: asyncpg.Connection, redis_url: str
):
    events = aioredis.Redis.from_url(redis_url).pubsub()
    await events.subscribe(f"{server.settings.channel_prefix}{couple.id}")
    try:
        a = await connect(server.ws_url, couple, "partner_a")
        b1 = await connect(server.ws_url, couple, "partner_b")
        b2 = await connect(server.ws_url, couple, "partner_b")
        await a.send(type="gesture", gesture_type="hug", request_id="g")
        gid = (await a.expect("gesture_sent"))["gesture"]["id"]
        for b in (b1, b2):
            assert (await b.expect("gesture_received"))["gesture"]["id"] == gid
        delivered = await a.expect("gesture_delivered", gesture_id=gid)

        # A later gesture's delivery is a barrier: every mark of the first is done by then.
        await a.send(type="gesture", gesture_type="kiss", request_id="g2")
        gid2 = (await a.expect("gesture_sent"))["gesture"]["id"]
        await a.expect("gesture_delivered", gesture_id=gid2)
        assert [f for f in a.seen if f["type"] == "gesture_delivered"] == [
            delivered,
            {
                "type": "gesture_delivered",
                "gesture_id": gid2,
                "delivered_at": a.seen[-1]["delivered_at"],
            },
        ]
        row = await db.fetchrow(
            "SELECT delivered_at FROM connection_gestures WHERE id = $1", uuid.UUID(gid)
        )
        assert row["delivered_at"].isoformat() == delivered["delivered_at"].replace("Z", "+00:00")

        # Exactly one gesture.delivered event was published for it.
        kinds: list[tuple[str, str]] = []

        async def both_delivered_events_seen() -> bool:
            message = await events.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                event = json.loads(message["data"])
                kinds.append((event["event"], event["gesture"]["id"]))
            return ("gesture.delivered", gid2) in kinds

        await eventually(both_delivered_events_seen)
        assert kinds.count(("gesture.delivered", gid)) == 1
        await close_quietly(a, b1, b2)
    finally:
        await events.aclose()


async def test_a_gesture_sent_while_the_partner_is_offline_is_delivered_when_they_connect(
    server: InProcess, api: httpx.AsyncClient, couple: Couple, db: asyncpg.Connection
):
    a = await connect(server.ws_url, couple, "partner_a")
    answer = await send_http(api, server.url, couple, "partner_a")
    gid = answer["gesture"]["id"]
    assert answer["recipient_online"] is False
    assert answer["gesture"]["delivered_at"] is None
    assert (
        await db.fetchval(
            "SELECT delivered_at FROM connection_gestures WHERE id = $1", uuid.UUID(gid)
        )
        is None
    )
    b = await Client.open(server.ws_url, couple.id, couple.b_token)
    assert (await b.expect("gesture_received"))["gesture"]["id"] == gid
    delivered = await a.expect("gesture_delivered", gesture_id=gid)
    r = await api.get(f"/api/gestures/{gid}", headers=couple.b_headers)
    assert r.json()["delivered_at"] is not None
    assert r.json()["delivered_at"][:19] == delivered["delivered_at"][:19]
    await close_quietly(a, b)


async def test_http_send_reports_the_recipient_online_while_connected(
    server: InProcess, api: httpx.AsyncClient, couple: Couple
):
    b = await connect(server.ws_url, couple, "partner_b")
    answer = await send_http(api, server.url, couple, "partner_a")
    assert answer["recipient_online"] is True
    await b.expect("gesture_received")
    await b.close()

    async def offline() -> bool:
        return (await send_http(api, server.url, couple, "partner_a"))["recipient_online"] is False

    await eventually(offline, timeout=5, interval=0.2)


# ---------------------------------------------------------------------------- limits


async def test_sending_past_the_rate_limit_over_websocket_gets_rate_limited(
    database_url: str, redis_url: str, prefix: str, couple: Couple
):
    s = InProcess(make_settings(database_url, redis_url, prefix, rate_limit_per_minute=3))
    await s.start()
    try:
        a = await connect(s.ws_url, couple, "partner_a")
        for i in range(3):
            await a.send(type="gesture", gesture_type="hug", request_id=i)
            await a.expect("gesture_sent", request_id=i)
        await a.send(type="gesture", gesture_type="hug", request_id="over")
        error = await a.expect("error", request_id="over")
        assert error["code"] == "rate_limited"
        assert "retry after" in error["message"]
        await a.send(type="ping", request_id="alive")
        await a.expect("pong", request_id="alive")
        await a.close()
    finally:
        await s.stop()


@pytest.mark.parametrize(
    "ws",
    [
        "service.wsserver:WSProtocol",
        "service.wsserver:WsprotoProtocol",
        "service.wsserver:SansioWSProtocol",
        "wsproto",
    ],
)
async def test_a_peer_that_stops_answering_pings_is_closed_and_a_quiet_one_that_answers_stays(
    database_url: str, redis_url: str, prefix: str, couple: Couple, ws: str
):
    """The one keepalive: protocol pings (one timer per process, service.wsserver), which
    browsers answer by themselves; no idle timeout."""
    settings = make_settings(
        database_url, redis_url, prefix, ws_ping_interval=0.3, ws_ping_timeout=0.3
    )
    s = InProcess(settings, ws)
    await s.start()
    try:
        quiet = await connect(s.ws_url, couple, "partner_b")  # sends nothing, answers pings
        dead = await SilentClient.open(s.port, couple.id, couple.a_token)  # answers nothing
        await quiet.expect("presence", partner="partner_a", online=True)
        await dead.dropped(timeout=5)
        await quiet.expect("presence", partner="partner_a", online=False, timeout=5)
        # Several ping periods later the quiet one is still open and served.
        assert await no_frame(quiet, 2.0) == []
        await quiet.send(type="ping", request_id="still")
        await quiet.expect("pong", request_id="still")
        await quiet.close()
        dead.close()
    finally:
        await s.stop()


# ---------------------------------------------------------------------------- logs


async def test_the_token_never_appears_in_the_process_log(processes, couple: Couple):
    """At the default level nothing is logged per socket, so no URL and no token either;
    uvicorn's accept line, written before its 101 answer, would be in the log by now."""
    [p] = await processes(1)
    a = await Client.open(p.ws_url, couple.id, couple.a_token)
    await a.expect("presence")
    await a.close()
    bad = token(couple.a, ttl=-30)
    code, _ = await refused(p.ws_url, couple.id, bad)
    assert code == 4401
    assert SECRET not in couple.a_token
    # At the default level nothing is logged per socket (no URL, so no token); uvicorn's
    # accept line, written before its 101 answer, would be in the log by now.
    text = p.log_path.read_text(errors="replace")
    assert "Application startup complete" in text  # the log is uvicorn's, at its default level
    for per_socket in ("WebSocket /ws", "token=", "socket opened", "socket closed"):
        assert per_socket not in text
    # A handshake the server denies is logged with its query string, token and all.
    denied = p.ws_url.replace("/ws", "/nowhere") + f"?token={couple.b_token}"
    with pytest.raises(InvalidStatus):
        async with ws_connect(denied):
            pass

    async def logged() -> bool:
        return "token=[redacted]" in p.log_path.read_text(errors="replace")

    await eventually(logged)
    text = p.log_path.read_text(errors="replace")
    for secret in (couple.a_token, couple.b_token, bad):
        assert secret not in text


# ---------------------------------------------------------------------------- presence races


async def test_a_presence_change_during_the_greeting_is_not_undone_by_the_greetings_read():
    """The partner comes online while the greeting reads presence, and the read misses it
    (it ran first): the live change wins, so when the partner later goes offline that change
    is pushed too, instead of being taken for no change."""
    from service.gateway import Gateway
    from service.hub import Connection, Hub

    settings = make_settings("postgresql://unused", "redis://unused", "t:")
    read_started, release_read = asyncio.Event(), asyncio.Event()

    class SlowPresence:
        async def is_online(self, relationship_id, role) -> bool:
            read_started.set()
            await release_read.wait()
            return False  # read before the partner's connection counted

        def online_future(self, relationship_id, role) -> asyncio.Future:
            return asyncio.ensure_future(self.is_online(relationship_id, role))

    class NoPending:
        async def pending_for(self, relationship_id, role, *limit) -> list:
            return []

        async def pending_many(self, wanted, limit) -> dict:
            return {pair: [] for pair in wanted}

    class NoSubscriber:
        def keep(self, channels) -> None:
            pass

    gateway = Gateway(settings, NoPending(), SlowPresence(), Hub(), lambda *_: NoSubscriber(), None)
    frames: list[dict] = []

    async def send(frame: bytes) -> None:
        frames.append(json.loads(frame))

    async def close(code: int, reason: str) -> None:
        pass

    rel = uuid.uuid4()
    conn = Connection(rel, "partner_a", send=send, close=close, on_delivered=print, limit=16)
    gateway.hub.add(conn)
    channel = f"{settings.presence_prefix}{rel}"
    greeting = asyncio.create_task(gateway._greet(conn))
    await asyncio.wait_for(read_started.wait(), 5)
    gateway.on_message(channel, b'{"partner":"partner_b","online":true}')
    release_read.set()
    await asyncio.wait_for(greeting, 5)
    gateway.on_message(channel, b'{"partner":"partner_b","online":false}')
    await eventually(lambda: len(frames) >= 2 and not frames[-1]["online"], timeout=2)
    assert [f["type"] for f in frames] == ["presence"] * len(frames)
    assert frames[-1] == {"type": "presence", "partner": "partner_b", "online": False}
