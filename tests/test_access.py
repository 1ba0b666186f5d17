"""Access that ends when it should, on several real processes: a partner removed by
`PUT /api/relationships/{id}` loses every socket of the relationship on every process
(4403) and every process's cached row at once; a socket whose token expires is closed
with 4401."""

import asyncio
import contextlib
import time
import uuid

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from service import auth
from service.bus import control_channel
from service.gestures import Gestures
from service.schemas import Relationship, RelationshipChanged, encoder

from .conftest import SECRET, Couple, InProcess, bearer, make_settings, token
from .support_helpers import OwnRedis, eventually
from .support_proxy import TcpProxy
from .support_ws import close_quietly, connect, send_http
from .wsclient import Client

pytestmark = [pytest.mark.anyio, pytest.mark.multiprocess]

# Long enough that only the change itself, never the TTL, can correct a cached row.
LONG_TTL = 300.0


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def replace_partner_b(
    http: httpx.AsyncClient, base_url: str, couple: Couple, new_b: str
) -> float:
    """PUT the relationship with `new_b` as partner_b; the monotonic time it was answered."""
    r = await http.put(
        f"{base_url}/api/relationships/{couple.id}",
        json={"partner_a_id": couple.a, "partner_b_id": new_b},
        headers=bearer(token(service=True)),
    )
    assert r.status_code == 200, r.text
    return time.monotonic()


async def pending_status(http: httpx.AsyncClient, base_url: str, couple: Couple, tok: str) -> int:
    r = await http.get(
        f"{base_url}/api/gestures/pending",
        params={"relationship_id": str(couple.id), "partner_id": "partner_b"},
        headers=bearer(tok),
    )
    return r.status_code


async def close_code_and_frames(client: Client, timeout: float) -> tuple[int, float, list[dict]]:
    """Read until the server closes: (code, monotonic time of the close, frames read)."""
    start = len(client.seen)
    code = await client.closed_with(timeout)
    return code, time.monotonic(), client.seen[start:]


# ---------------------------------------------------------------------------- removal


async def test_a_removed_partner_loses_every_socket_on_every_process_and_every_cache_at_once(
    processes, couple: Couple, http: httpx.AsyncClient
):
    p1, p2, p3 = await processes(3, relationship_cache_ttl=LONG_TTL)
    a = await connect(p1.ws_url, couple, "partner_a")
    b1 = await connect(p1.ws_url, couple, "partner_b")
    b2 = await connect(p2.ws_url, couple, "partner_b")
    # p3 holds no socket of the relationship, only its cached row (read by B's request).
    assert await pending_status(http, p3.url, couple, couple.b_token) == 200
    carol = f"user-c-{uuid.uuid4().hex[:8]}"
    closes = [asyncio.ensure_future(close_code_and_frames(b, 10)) for b in (b1, b2)]

    answered = await replace_partner_b(http, p3.url, couple, carol)
    sent = await send_http(http, p2.url, couple, "partner_a", message="after the change")

    for closed in closes:
        code, at, frames = await closed
        assert code == 4403
        assert at - answered < 2.0
        assert all(f["type"] != "gesture_received" for f in frames), frames

    # Every process's cache knows at once (its TTL is minutes): B is refused everywhere,
    # the new partner is let in everywhere.
    async def b_refused_everywhere() -> bool:
        codes = [await pending_status(http, p.url, couple, couple.b_token) for p in (p1, p2, p3)]
        return codes == [403, 403, 403]

    await eventually(b_refused_everywhere, timeout=2.0)
    for p in (p1, p2, p3):
        assert await pending_status(http, p.url, couple, token(carol)) == 200
    assert time.monotonic() - answered < 4.0
    # B cannot come back; the partner who stayed keeps its socket; the new partner gets
    # what is pending for partner_b.
    code, _ = await _refused(p2.ws_url, couple.id, couple.b_token)
    assert code == 4403
    await a.send(type="ping", request_id="still")
    await a.expect("pong", request_id="still")
    c = await Client.open(p3.ws_url, couple.id, token(carol))
    got = await c.expect("gesture_received")
    assert got["gesture"]["id"] == sent["gesture"]["id"]
    await close_quietly(a, c)


async def _refused(ws_url: str, relationship_id, tok: str) -> tuple[int, list[dict]]:
    client = await Client.open(ws_url, relationship_id, tok)
    return await client.closed_with(), client.seen


async def test_a_removed_partner_gets_no_frame_of_a_gesture_sent_after_the_change_is_answered(
    processes, couple: Couple, http: httpx.AsyncClient
):
    """Gestures stream from both processes while the change is made: whatever was sent
    after the PUT was answered never reaches the removed partner's sockets."""
    p1, p2 = await processes(2, relationship_cache_ttl=LONG_TTL, rate_limit_per_minute=10_000)
    b1 = await connect(p1.ws_url, couple, "partner_b")
    b2 = await connect(p2.ws_url, couple, "partner_b")
    a = await connect(p2.ws_url, couple, "partner_a")
    closes = [asyncio.ensure_future(close_code_and_frames(b, 15)) for b in (b1, b2)]
    started: dict[str, float] = {}  # gesture id -> when its send was started
    stop = asyncio.Event()

    async def stream(base_url: str) -> None:
        while not stop.is_set():
            at = time.monotonic()
            answer = await send_http(http, base_url, couple, "partner_a")
            started[answer["gesture"]["id"]] = at

    async def stream_ws() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            at = time.monotonic()
            await a.send(type="gesture", gesture_type="kiss", request_id=n)
            frame = await a.expect("gesture_sent", request_id=n)
            started[frame["gesture"]["id"]] = at

    streams = [asyncio.ensure_future(s) for s in (stream(p1.url), stream(p2.url), stream_ws())]
    await eventually(lambda: len(started) >= 20, timeout=10)
    answered = await replace_partner_b(http, p1.url, couple, f"user-c-{uuid.uuid4().hex[:8]}")
    await eventually(lambda: sum(1 for at in started.values() if at > answered) >= 20, timeout=10)
    stop.set()
    await asyncio.gather(*streams)

    for closed in closes:
        code, at, frames = await closed
        assert code == 4403 and at - answered < 2.0
        received = {f["gesture"]["id"] for f in frames if f["type"] == "gesture_received"}
        late = {g for g in received if started.get(g, 0.0) > answered}
        assert late == set()
    await close_quietly(a)


async def test_no_socket_of_a_removed_partner_survives_connecting_during_the_change(
    processes, couple: Couple, http: httpx.AsyncClient
):
    """B keeps opening sockets on two processes while the change is made: every one of
    them ends closed with 4403 (or refused), none stays open."""
    # Every connect reads the row: a read that began before the change and ends after it
    # is the window in which a change can miss a socket not yet registered.
    p1, p2 = await processes(2, relationship_cache_ttl=0)
    stop = asyncio.Event()
    outcomes: list[int] = []
    opened: list[Client] = []

    async def open_one(ws_url: str) -> None:
        client = await Client.open(ws_url, couple.id, couple.b_token)
        opened.append(client)
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            await client.recv(0.02)  # greeting, or the close

    async def keep_connecting(ws_url: str) -> None:
        while not stop.is_set():  # in bursts, so that some are always mid-handshake
            await asyncio.gather(*(open_one(ws_url) for _ in range(10)))

    connecting = [asyncio.ensure_future(keep_connecting(p.ws_url)) for p in (p1, p2)]
    await eventually(lambda: len(opened) >= 10, timeout=10)
    await replace_partner_b(http, p2.url, couple, f"user-c-{uuid.uuid4().hex[:8]}")
    count = len(opened)
    await eventually(lambda: len(opened) >= count + 10, timeout=10)
    stop.set()
    await asyncio.gather(*connecting)
    for client in opened:
        outcomes.append(await client.closed_with(timeout=3.0))
    assert set(outcomes) == {4403}


class HoldingProxy(TcpProxy):
    """Forwards to PostgreSQL; while `holding`, keeps its answers back until `release`."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.holding = False
        self.held: list[tuple[asyncio.StreamWriter, bytes]] = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        self._writers.update((writer, up_writer))
        for src, dst, answers in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._forward(src, dst, answers))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _forward(self, src, dst, answers: bool) -> None:
        try:
            while data := await src.read(65536):
                if answers and self.holding:
                    self.held.append((dst, data))
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    def release(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for dst, data in held:  # in order, before anything forwarded later
            dst.write(data)


async def test_a_socket_admitted_from_a_row_read_before_the_change_is_closed_once_registered(
    database_url: str, redis_url: str, prefix: str, couple: Couple, db
):
    """The race, made to happen: B's connect reads the row (B still a partner), the change
    commits and reaches the process, and only then does the read's answer arrive. The
    socket, registered too late for the change to find it, is checked again and closed."""
    proxy = HoldingProxy.for_dsn(database_url)
    await proxy.start()
    settings = make_settings(
        proxy.dsn(database_url), redis_url, prefix, relationship_cache_ttl=0, relay_interval=60
    )
    server = InProcess(settings)
    await server.start()
    redis = aioredis.Redis.from_url(redis_url)
    try:
        first = await connect(server.ws_url, couple, "partner_b")
        proxy.holding = True
        late = asyncio.ensure_future(Client.open(server.ws_url, couple.id, couple.b_token))
        # The connect's read has been answered (the row names B) and is held back.
        await eventually(lambda: any(couple.b.encode() in data for _, data in proxy.held))
        carol = f"user-c-{uuid.uuid4().hex[:8]}"
        row = await db.fetchrow(
            """UPDATE relationships SET partner_b_id = $2 WHERE id = $1
            RETURNING id, partner_a_id, partner_b_id, created_at""",
            couple.id,
            carol,
        )
        # Announced as the process that made the change would.
        change = RelationshipChanged(relationship=Relationship(**dict(row)))
        await redis.publish(control_channel(settings.presence_prefix), encoder.encode(change))
        assert await first.closed_with(5) == 4403  # the change has been applied
        proxy.release()
        client = await late
        assert await client.closed_with(5) == 4403
        assert client.seen == []
    finally:
        await redis.aclose()
        await server.stop()
        await proxy.close()


async def test_a_service_token_socket_acting_for_a_partner_is_not_closed_by_a_change(
    processes, couple: Couple, http: httpx.AsyncClient
):
    p1, p2 = await processes(2, relationship_cache_ttl=LONG_TTL)
    service = Client(
        await ws_connect(
            f"{p1.ws_url}?relationship_id={couple.id}&partner_id=partner_b"
            f"&token={token(service=True)}"
        )
    )
    await service.expect("presence")
    b = await connect(p2.ws_url, couple, "partner_b")
    await replace_partner_b(http, p2.url, couple, f"user-c-{uuid.uuid4().hex[:8]}")
    assert await b.closed_with(5) == 4403
    await service.send(type="ping", request_id="svc")
    await service.expect("pong", request_id="svc")
    await close_quietly(service)


async def test_a_partner_removed_while_redis_is_down_is_closed_once_the_processes_notice(
    processes, couple: Couple, http: httpx.AsyncClient, tmp_path
):
    """The change commits with Redis away (200); processes re-check their sockets against
    PostgreSQL while their subscription is down, and when it is back."""
    own = OwnRedis(tmp_path)
    await own.start()
    try:
        p1, p2 = await processes(2, redis_url=own.url, relationship_cache_ttl=LONG_TTL)
        b1 = await connect(p1.ws_url, couple, "partner_b")
        b2 = await connect(p2.ws_url, couple, "partner_b")
        a = await connect(p2.ws_url, couple, "partner_a")
        await own.shutdown()
        answered = await replace_partner_b(http, p1.url, couple, f"user-c-{uuid.uuid4().hex[:8]}")
        for b in (b1, b2):
            assert await b.closed_with(10) == 4403
        # Without Redis the processes have no news but PostgreSQL's, read once a second.
        assert time.monotonic() - answered < 3.0
        for p in (p1, p2):
            assert await pending_status(http, p.url, couple, couple.b_token) == 403
        await own.start()
        await a.send(type="ping", request_id="back")
        await a.expect("pong", request_id="back")
        await close_quietly(a)
    finally:
        await own.shutdown()


# ---------------------------------------------------------------------------- expiry


async def test_sockets_whose_token_expires_are_closed_with_4401_on_every_process(
    processes, couple: Couple
):
    p1, p2 = await processes(2)
    short = auth.issue(SECRET, sub=couple.b, ttl=2)
    exp = auth.verify(short, SECRET).expires
    b1 = await Client.open(p1.ws_url, couple.id, short)
    b2 = await Client.open(p2.ws_url, couple.id, short)
    a = await connect(p1.ws_url, couple, "partner_a")  # a token good for minutes
    for b in (b1, b2):
        assert await b.closed_with(10) == 4401
        assert time.time() - exp < 5.0
    await a.send(type="ping", request_id="alive")
    await a.expect("pong", request_id="alive")
    # Reconnecting with the expired token is refused too.
    assert (await _refused(p2.ws_url, couple.id, short))[0] == 4401
    await close_quietly(a)


async def test_a_frame_sent_after_the_token_expired_is_not_honoured(
    processes, couple: Couple, http: httpx.AsyncClient, db
):
    (p1,) = await processes(1)
    short = auth.issue(SECRET, sub=couple.a, ttl=1)
    exp = auth.verify(short, SECRET).expires
    a = await Client.open(p1.ws_url, couple.id, short)
    await a.expect("presence")
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.05)  # the moment, not a wait for it
    with contextlib.suppress(Exception):
        await a.send(type="gesture", gesture_type="hug", request_id="late")
    assert await a.closed_with(10) == 4401
    assert all(f["type"] != "gesture_sent" for f in a.seen)
    rows = await db.fetchval(
        "SELECT count(*) FROM connection_gestures WHERE relationship_id = $1", couple.id
    )
    assert rows == 0


# ---------------------------------------------------------------------------- the rule


def test_may_stay_keeps_the_partner_of_the_role_and_services_only():
    row = Relationship(id=uuid.uuid4(), partner_a_id="ann", partner_b_id="bob", created_at=None)
    assert Gestures.may_stay(row, "ann", "partner_a")
    assert Gestures.may_stay(row, "bob", "partner_b")
    assert not Gestures.may_stay(row, "ann", "partner_b")
    assert not Gestures.may_stay(row, "eve", "partner_a")
    assert not Gestures.may_stay(None, "ann", "partner_a")
    empty = Relationship(id=row.id, partner_a_id=None, partner_b_id=None, created_at=None)
    assert not Gestures.may_stay(empty, "ann", "partner_a")
    assert Gestures.may_stay(None, None, "partner_a")  # a service token acts for a role
