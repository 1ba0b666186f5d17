"""This process's sockets and their bounded outgoing queues. Plain asyncio, no network.

A `Connection` wraps a socket's send and close functions. Frames pushed to it go into a
queue of at most `limit` frames; a writer task drains the queue and exists only while there
is something to write, so an idle connection costs no task. A connection whose queue is full
is a slow consumer: it is closed, its queue dropped, and the rest of the process carries on.

Until `open()` is called a connection holds what is pushed to it, so the frames it must see
first on connect (presence, pending gestures) go out before anything that arrived meanwhile.
Every gesture frame carries a dedupe key, so a frame that arrives twice (an event published
twice, a resync after a broken subscription) reaches the client once.

A connection remembers who opened it (`user_id`, None for a service token) and until when
its token is good (`expires`). The hub files connections by the second their token expires,
so finding the expired ones is a look at the earliest second, whatever the number of
sockets: a set entry a socket, no timer or task.
"""

import asyncio
import heapq
import itertools
import logging
import math
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator

from . import metrics
from .schemas import Gesture

log = logging.getLogger(__name__)

SLOW_CONSUMER = 1008
_SEEN_LIMIT = 256
_ids = itertools.count(1)

Dedupe = tuple[str, uuid.UUID]


class Connection:
    __slots__ = (
        "_close",
        "_closer",
        "_flusher",
        "_greeting",
        "_held",
        "_limit",
        "_on_delivered",
        "_queue",
        "_seen",
        "_send",
        "_write_now",
        "closed",
        "expires",
        "id",
        "other_online",
        "relationship_id",
        "role",
        "user_id",
    )

    def __init__(
        self,
        relationship_id: uuid.UUID,
        role: str,
        *,
        send: Callable[[bytes], Awaitable[None]],
        close: Callable[[int, str], Awaitable[None]],
        on_delivered: Callable[[Gesture], None],
        limit: int,
        user_id: str | None = None,
        expires: float = math.inf,
        write_now: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.relationship_id = relationship_id
        self.role = role
        self.user_id = user_id
        self.expires = expires
        self._send = send
        # Writes a frame at once when it can (False: it could not); frames queue otherwise.
        self._write_now = write_now
        self._close = close
        self._on_delivered = on_delivered
        self._limit = limit
        self._queue: deque[tuple[bytes, uuid.UUID | None]] = deque()
        self._held: list[tuple[bytes, uuid.UUID | None, Dedupe | None]] | None = []
        self._seen: dict[Dedupe, None] = {}
        self._flusher: asyncio.Task[None] | None = None
        # Frames of `first` still queued: the greeting is bounded by what PostgreSQL held,
        # not by `limit`, so a partner with many pending gestures is not cut off at connect.
        self._greeting = 0
        self._closer: asyncio.Task[None] | None = None
        self.closed = False
        self.other_online: bool | None = None

    def push(
        self, frame: bytes, *, delivered: Gesture | None = None, dedupe: Dedupe | None = None
    ) -> None:
        """Queue a frame. `delivered` is the gesture this frame hands to its recipient."""
        if self.closed:
            return
        if dedupe is not None:
            if dedupe in self._seen:
                return
            self._remember(dedupe)
        if self._held is not None:
            self._held.append((frame, delivered, dedupe))
            if len(self._held) > self._limit:
                self.overflow()
            return
        self._enqueue(frame, delivered)

    def open(self, first: list[tuple[bytes, Gesture | None, Dedupe | None]]) -> None:
        """Start sending: `first`, then what was pushed before `open` and is not in `first`."""
        held, self._held = self._held or [], None
        keys = set()
        self._greeting = len(first)
        for frame, delivered, dedupe in first:
            if dedupe is not None:
                keys.add(dedupe)
                self._remember(dedupe)
            self._enqueue(frame, delivered)
        for frame, delivered, dedupe in held:
            if dedupe is None or dedupe not in keys:
                self._enqueue(frame, delivered)

    def _remember(self, dedupe: Dedupe) -> None:
        self._seen[dedupe] = None
        if len(self._seen) > _SEEN_LIMIT:
            del self._seen[next(iter(self._seen))]

    def _enqueue(self, frame: bytes, delivered: Gesture | None) -> None:
        if self.closed:
            return
        # At once only when nothing is on its way: a flusher may hold a frame it popped and
        # waits to write (the socket paused), which must go out first.
        idle = self._flusher is None and not self._queue
        if idle and self._write_now is not None and self._write_now(frame):
            self._written(frame, delivered)
            return
        if len(self._queue) >= self._limit + self._greeting:
            self.overflow()
            return
        self._queue.append((frame, delivered))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._queue and not self.closed:
                frame, delivered = self._queue.popleft()
                await self._send(frame)
                self._written(frame, delivered)
        except Exception:
            self.closed = True  # the socket is gone; its reader sees the disconnect
        finally:
            self._flusher = None

    def _written(self, frame: bytes, delivered: Gesture | None) -> None:
        self._greeting = max(0, self._greeting - 1)
        metrics.frame_written(frame)
        if delivered is not None:
            self._on_delivered(delivered)

    def overflow(self) -> None:
        """Close as a slow consumer: drop its queue, keep the process's memory bounded."""
        if self.closed:
            return
        metrics.SLOW_CONSUMERS.inc()
        log.warning(
            "closing slow consumer",
            extra={"conn_id": self.id, "relationship_id": str(self.relationship_id)},
        )
        self.end(SLOW_CONSUMER, "slow consumer")

    def end(self, code: int, reason: str) -> None:
        """Close with `code` now: nothing queued or pushed from here on is written."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        # Held by the connection, since the loop holds tasks only weakly.
        self._closer = asyncio.get_running_loop().create_task(self._close(code, reason))

    def flusher(self) -> "asyncio.Task[None] | None":
        """The task writing what is queued, if any."""
        return self._flusher

    async def drained(self) -> None:
        """Wait until what is queued has been written (used at shutdown)."""
        flusher = self._flusher
        if flusher is not None:
            await asyncio.shield(flusher)


class Hub:
    """Connections by relationship."""

    def __init__(self) -> None:
        self._by_relationship: dict[uuid.UUID, list[Connection]] = {}
        self._expiring = _Deadlines()

    def add(self, conn: Connection) -> bool:
        """Register; True when it is this process's first connection of its relationship."""
        conns = self._by_relationship.setdefault(conn.relationship_id, [])
        conns.append(conn)
        self._expiring.add(conn)
        return len(conns) == 1

    def remove(self, conn: Connection) -> bool:
        """Unregister; True when it was this process's last connection of its relationship."""
        conns = self._by_relationship.get(conn.relationship_id)
        if conns is None or conn not in conns:
            return False
        conns.remove(conn)
        self._expiring.discard(conn)
        if conns:
            return False
        del self._by_relationship[conn.relationship_id]
        return True

    def of(self, relationship_id: uuid.UUID, role: str | None = None) -> list[Connection]:
        conns = self._by_relationship.get(relationship_id, ())
        return [c for c in conns if role is None or c.role == role]

    def push(
        self,
        relationship_id: uuid.UUID,
        role: str,
        frame: bytes,
        *,
        delivered: Gesture | None = None,
        dedupe: Dedupe | None = None,
    ) -> int:
        """Queue a frame for every connection of `role` in the relationship; how many."""
        n = 0
        for conn in self._by_relationship.get(relationship_id, ()):
            if conn.role == role:
                conn.push(frame, delivered=delivered, dedupe=dedupe)
                n += 1
        return n

    def relationships(self) -> list[uuid.UUID]:
        return list(self._by_relationship)

    def expired(self, now: float) -> list[Connection]:
        """Connections whose token expired by `now` (each returned once), still open."""
        return [conn for conn in self._expiring.due(now) if not conn.closed]

    def __iter__(self) -> Iterator[Connection]:
        for conns in list(self._by_relationship.values()):
            yield from conns

    def __len__(self) -> int:
        return sum(len(c) for c in self._by_relationship.values())


class _Deadlines:
    """Connections by the whole second their token expires (rounded up), and a heap of those
    seconds. A bucket that empties is deleted; its second stays in the heap until it is due,
    or until stale seconds outnumber live ones and the heap is rebuilt."""

    __slots__ = ("_buckets", "_heap")

    def __init__(self) -> None:
        self._buckets: dict[int, set[Connection]] = {}
        self._heap: list[int] = []

    def add(self, conn: Connection) -> None:
        if not math.isfinite(conn.expires):
            return
        second = math.ceil(conn.expires)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = set()
            heapq.heappush(self._heap, second)
            if len(self._heap) > 2 * len(self._buckets) + 64:
                self._heap = list(self._buckets)
                heapq.heapify(self._heap)
        bucket.add(conn)

    def discard(self, conn: Connection) -> None:
        if not math.isfinite(conn.expires):
            return
        second = math.ceil(conn.expires)
        bucket = self._buckets.get(second)
        if bucket is not None:
            bucket.discard(conn)
            if not bucket:
                del self._buckets[second]

    def due(self, now: float) -> list[Connection]:
        found: list[Connection] = []
        while self._heap and self._heap[0] <= now:
            bucket = self._buckets.pop(heapq.heappop(self._heap), None)
            if bucket:
                found.extend(bucket)
        return found

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())
