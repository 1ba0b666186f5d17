"""The hub and its connections, without a network: fake send and close coroutines."""

import asyncio
import uuid

import pytest

from service.hub import SLOW_CONSUMER, Connection, Hub

pytestmark = pytest.mark.anyio


class FakeSocket:
    """Records what a connection writes; `gate` cleared means the peer stopped reading."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed: list[tuple[int, str]] = []
        self.delivered: list[tuple[uuid.UUID, int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False

    async def send(self, frame: bytes) -> None:
        await self.gate.wait()
        if self.fail:
            raise ConnectionResetError("peer gone")
        self.sent.append(frame)

    async def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def on_delivered(self, gesture_id: uuid.UUID) -> None:
        # How many frames had been written when the callback fired.
        self.delivered.append((gesture_id, len(self.sent)))

    def write_now(self, frame: bytes) -> bool:
        """The socket's direct write: only while the peer reads (`gate` set)."""
        if not self.gate.is_set():
            return False
        self.sent.append(frame)
        return True

    def connection(self, relationship_id=None, role="partner_b", limit=8, direct=False):
        return Connection(
            relationship_id or uuid.uuid4(),
            role,
            send=self.send,
            close=self.close,
            on_delivered=self.on_delivered,
            limit=limit,
            write_now=self.write_now if direct else None,
        )


def writers() -> list[asyncio.Task]:
    """The writer tasks alive on this loop."""
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and getattr(t.get_coro(), "__qualname__", "") == "Connection._flush"
    ]


async def until(predicate, turns: int = 1000) -> None:
    """Let the loop run until `predicate()` holds; fail after `turns` turns of the loop."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_frames_pushed_before_open_wait_and_follow_the_greeting():
    """Frames pushed before open() go out after the greeting, in push order."""
    sock = FakeSocket()
    conn = sock.connection()
    conn.push(b"early-1")
    conn.push(b"early-2")
    await asyncio.sleep(0)
    assert sock.sent == []  # nothing goes out before the greeting
    conn.open([(b"presence", None, None), (b"pending", None, None)])
    await until(lambda: len(sock.sent) == 4)
    assert sock.sent == [b"presence", b"pending", b"early-1", b"early-2"]


async def test_a_gesture_both_pending_and_pushed_before_open_goes_out_once():
    sock = FakeSocket()
    conn = sock.connection()
    gid = uuid.uuid4()
    conn.push(b"event copy", delivered=gid, dedupe=("r", gid))
    conn.open([(b"presence", None, None), (b"pending copy", gid, ("r", gid))])
    conn.push(b"after open")
    await until(lambda: len(sock.sent) == 3)
    assert sock.sent == [b"presence", b"pending copy", b"after open"]


async def test_a_frame_with_a_seen_dedupe_key_goes_out_once():
    sock = FakeSocket()
    conn = sock.connection()
    conn.open([])
    gid = uuid.uuid4()
    conn.push(b"received", dedupe=("r", gid))
    conn.push(b"received again", dedupe=("r", gid))
    conn.push(b"delivered", dedupe=("d", gid))  # another kind of frame of the same gesture
    conn.push(b"no key")
    conn.push(b"no key")
    await until(lambda: len(sock.sent) == 4)
    await conn.drained()
    assert sock.sent == [b"received", b"delivered", b"no key", b"no key"]


async def test_a_full_queue_closes_that_socket_as_slow_consumer_and_others_keep_receiving():
    rel = uuid.uuid4()
    hub = Hub()
    slow, fast = FakeSocket(), FakeSocket()
    slow.gate.clear()  # this peer stopped reading
    slow_conn = slow.connection(rel, limit=4)
    fast_conn = fast.connection(rel, limit=4)
    for conn in (slow_conn, fast_conn):
        hub.add(conn)
        conn.open([])
    for i in range(20):
        hub.push(rel, "partner_b", f"frame-{i}".encode())
        await until(lambda i=i: len(fast.sent) == i + 1 or fast_conn.closed)
    assert slow.closed == [(SLOW_CONSUMER, "slow consumer")]
    assert slow_conn.closed
    assert fast.closed == [] and not fast_conn.closed
    assert fast.sent == [f"frame-{i}".encode() for i in range(20)]
    # The slow connection's queue is dropped: once its peer reads again, at most the frame
    # that was already being written goes out, never the backlog.
    slow.gate.set()
    await slow_conn.drained()
    assert len(slow.sent) <= 1
    slow_conn.push(b"after close")
    await asyncio.sleep(0)
    assert b"after close" not in slow.sent


async def test_more_frames_held_before_open_than_the_queue_holds_is_a_slow_consumer():
    sock = FakeSocket()
    conn = sock.connection(limit=3)
    for i in range(4):
        conn.push(f"held-{i}".encode())
    await until(lambda: bool(sock.closed))
    assert sock.closed == [(SLOW_CONSUMER, "slow consumer")]


async def test_a_greeting_longer_than_the_queue_still_goes_out_whole():
    """A partner with more pending gestures than the queue holds is not cut off at connect."""
    sock = FakeSocket()
    conn = sock.connection(limit=4)
    first = [(f"pending-{i}".encode(), None, None) for i in range(20)]
    conn.open(first)
    conn.push(b"live")
    await until(lambda: len(sock.sent) == 21 or bool(sock.closed))
    assert sock.closed == []
    assert sock.sent == [f for f, _, _ in first] + [b"live"]


async def test_the_writer_task_exists_only_while_frames_are_queued():
    sock = FakeSocket()
    conn = sock.connection()
    conn.open([])
    await asyncio.sleep(0)
    assert writers() == []  # an idle connection costs no task
    sock.gate.clear()
    conn.push(b"one")
    conn.push(b"two")
    assert len(writers()) == 1  # one writer, however many frames
    sock.gate.set()
    await conn.drained()
    await until(lambda: writers() == [])
    assert sock.sent == [b"one", b"two"]
    conn.push(b"three")
    assert len(writers()) == 1  # started again on demand
    await conn.drained()
    await until(lambda: writers() == [])


async def test_delivered_fires_only_after_the_frame_was_written():
    sock = FakeSocket()
    conn = sock.connection()
    conn.open([])
    gid = uuid.uuid4()
    sock.gate.clear()
    conn.push(b"before")
    conn.push(b"received", delivered=gid, dedupe=("r", gid))
    for _ in range(5):
        await asyncio.sleep(0)
    assert sock.delivered == []  # not written yet: not delivered
    sock.gate.set()
    await conn.drained()
    assert sock.delivered == [(gid, 2)]  # fired once both frames were written


async def test_greeting_frames_report_delivery_too():
    sock = FakeSocket()
    conn = sock.connection()
    gid = uuid.uuid4()
    conn.open([(b"presence", None, None), (b"pending", gid, ("r", gid))])
    await until(lambda: bool(sock.delivered))
    assert sock.delivered == [(gid, 2)]


async def test_a_failed_write_marks_the_connection_closed_and_reports_no_delivery():
    sock = FakeSocket()
    conn = sock.connection()
    conn.open([])
    sock.fail = True
    gid = uuid.uuid4()
    conn.push(b"received", delivered=gid)
    await until(lambda: conn.closed)
    assert sock.delivered == []
    conn.push(b"later")
    await asyncio.sleep(0)
    assert writers() == []


async def test_hub_pushes_to_one_role_of_one_relationship():
    hub = Hub()
    rel, other_rel = uuid.uuid4(), uuid.uuid4()
    a, b1, b2, elsewhere = FakeSocket(), FakeSocket(), FakeSocket(), FakeSocket()
    conns = [
        a.connection(rel, "partner_a"),
        b1.connection(rel, "partner_b"),
        b2.connection(rel, "partner_b"),
        elsewhere.connection(other_rel, "partner_b"),
    ]
    firsts = [hub.add(c) for c in conns]
    assert firsts == [True, False, False, True]
    for c in conns:
        c.open([])
    assert hub.push(rel, "partner_b", b"to b") == 2
    await until(lambda: len(b1.sent) == 1 and len(b2.sent) == 1)
    await asyncio.gather(*(c.drained() for c in conns))
    assert a.sent == [] and elsewhere.sent == []
    assert sorted(hub.relationships()) == sorted([rel, other_rel])
    assert len(hub) == 4


async def test_hub_reports_the_last_connection_of_a_relationship_leaving():
    hub = Hub()
    rel = uuid.uuid4()
    one, two = FakeSocket().connection(rel), FakeSocket().connection(rel)
    hub.add(one)
    hub.add(two)
    assert hub.remove(one) is False
    assert hub.remove(one) is False  # removing twice is harmless
    assert hub.remove(two) is True
    assert hub.relationships() == [] and len(hub) == 0
    assert hub.push(rel, "partner_b", b"x") == 0


# ---------------------------------------------------------------------------- access ends


def expiring(sock: FakeSocket, expires: float, relationship_id=None) -> Connection:
    return Connection(
        relationship_id or uuid.uuid4(),
        "partner_b",
        send=sock.send,
        close=sock.close,
        on_delivered=sock.on_delivered,
        limit=8,
        user_id="bob",
        expires=expires,
    )


async def test_expired_returns_each_connection_once_when_its_second_has_come():
    hub, sock = Hub(), FakeSocket()
    early, late = expiring(sock, 100.2), expiring(sock, 105.0)
    forever = sock.connection()  # a token without expiry is never due
    for conn in (early, late, forever):
        hub.add(conn)
    assert hub.expired(100.5) == []  # filed by the second rounded up: due at 101
    assert hub.expired(101.0) == [early]
    assert hub.expired(101.0) == []
    assert hub.expired(1e12) == [late]


async def test_a_removed_or_closed_connection_is_never_returned_as_expired():
    hub, sock = Hub(), FakeSocket()
    gone, closed = expiring(sock, 50.0), expiring(sock, 50.0)
    hub.add(gone)
    hub.add(closed)
    hub.remove(gone)
    closed.closed = True
    assert hub.expired(60.0) == []


async def test_the_deadline_heap_stays_bounded_under_churn():
    """A socket that reconnects over and over with the same token leaves no trail."""
    hub, sock = Hub(), FakeSocket()
    rel = uuid.uuid4()
    for i in range(10_000):
        conn = expiring(sock, 1_000.0 + i % 3_000, rel)
        hub.add(conn)
        hub.remove(conn)
    assert len(hub._expiring._heap) <= 64 + 1
    assert len(hub._expiring) == 0


async def test_end_closes_with_the_code_and_drops_what_was_queued():
    sock = FakeSocket()
    sock.gate.clear()  # the peer is not reading: frames stay queued
    conn = sock.connection()
    conn.open([(b"greeting", None, None)])
    conn.push(b"queued")
    conn.end(4403, "no longer a partner")
    conn.push(b"after")
    sock.gate.set()
    await until(lambda: sock.closed)
    assert sock.closed == [(4403, "no longer a partner")]
    await until(lambda: not writers())
    assert b"queued" not in sock.sent and b"after" not in sock.sent


async def test_frames_written_at_once_never_pass_one_waiting_to_be_written():
    """The socket paused: a frame waits in the writer; it resumes, and a frame pushed before
    the writer ran again must still go out after the waiting one."""
    sock = FakeSocket()
    conn = sock.connection(direct=True)
    conn.open([])
    conn.push(b"1")  # the socket takes it at once
    sock.gate.clear()
    conn.push(b"2")  # refused at once: queued, and its writer waits on the socket
    await until(lambda: writers() and not conn._queue)  # popped, waiting to be written
    sock.gate.set()  # writable again, the writer not yet run
    conn.push(b"3")
    await until(lambda: not writers())
    assert sock.sent == [b"1", b"2", b"3"]
