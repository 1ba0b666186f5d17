"""Events on Redis: publishing through the outbox, and one subscriber per process.

Guarantees, and their limits:

* Publishing is at least once. An event is written to `gesture_outbox` in the same
  transaction as the change it announces, handed to `Publisher.publish` after commit, and
  deleted once Redis has taken it. Whatever is left (Redis was down, the process died) is
  published by the relay that runs in every process, oldest first, once Redis answers. An
  event can therefore arrive twice, or after a newer one: consumers dedupe by `event_id`.
* Redis pub/sub itself is at most once: a subscriber that is disconnected misses what was
  published meanwhile. `Subscriber` reconnects with backoff and jitter, resubscribes, and then
  calls `on_resubscribed(since)` so the gateway can re-read from PostgreSQL, the source of
  truth, what its clients may have missed.
"""

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import metrics, store

log = logging.getLogger(__name__)


def channel_for(prefix: str, relationship_id: uuid.UUID | str) -> str:
    return f"{prefix}{relationship_id}"


def control_channel(presence_prefix: str) -> str:
    """The one channel every process subscribes to for as long as it runs: changes that
    concern every process (a relationship's partners changed). Low volume."""
    return f"{presence_prefix}control"


class Publisher:
    """Publishes committed outbox rows, deletes what Redis took, and relays the rest."""

    def __init__(
        self,
        redis: aioredis.Redis,
        pool: store.Pool,
        *,
        relay_interval: float,
        relay_min_age: float,
        idempotency_hours: int,
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._relay_interval = relay_interval
        self._relay_min_age = relay_min_age
        self._idempotency_hours = idempotency_hours
        self._queue: list[store.OutboxRow] = []
        self._ready = asyncio.Event()
        self._published: list[int] = []
        self.redis_ok = True

    def publish(self, rows: Iterable[store.OutboxRow]) -> None:
        """Queue committed rows for publishing; never blocks, never raises."""
        self._queue.extend(rows)
        self._ready.set()

    async def publish_now(self, rows: Sequence[store.OutboxRow]) -> bool:
        """Publish committed rows and wait until Redis took them, for a change whose caller
        is answered only once every subscriber can have heard of it. False when Redis did
        not take them: the rows stay in the outbox and the relay publishes them later."""
        return await self._send(rows)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._publish_loop())
            group.create_task(self._relay_loop())

    async def flush(self) -> None:
        """Publish what is queued and delete what was published (used at shutdown)."""
        if self._queue:
            rows, self._queue = self._queue, []
            await self._send(rows)
        await self._delete_published()

    async def _publish_loop(self) -> None:
        while True:
            _stop_if_cancelled()
            await self._ready.wait()
            self._ready.clear()
            rows, self._queue = self._queue, []
            if rows:
                await self._send(rows)

    async def _send(self, rows: Sequence[store.OutboxRow], *, record: bool = True) -> bool:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for row in rows:
                    pipe.publish(row.channel, row.payload)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            if self.redis_ok:
                log.warning("publish failed, the relay will retry", extra={"error": repr(exc)})
            self.redis_ok = False
            return False
        self.redis_ok = True
        if record:
            self._published.extend(row.id for row in rows)
        return True

    async def _delete_published(self) -> None:
        if not self._published:
            return
        ids, self._published = self._published, []
        try:
            async with store.connection(self._pool) as conn:
                await store.delete_outbox(conn, ids)
        except Exception:
            # Not deleted means published again by the relay later: a duplicate, not a loss.
            log.warning("could not delete published outbox rows", extra={"count": len(ids)})

    async def _relay_loop(self) -> None:
        last_cleanup = 0.0
        while True:
            _stop_if_cancelled()
            await asyncio.sleep(self._relay_interval)
            try:
                await self._delete_published()
                await self._relay_once()
                if time.monotonic() - last_cleanup > 300:
                    last_cleanup = time.monotonic()
                    async with store.connection(self._pool) as conn:
                        await store.forget_idempotency_keys(conn, self._idempotency_hours)
            except Exception as exc:
                log.warning("outbox relay pass failed", extra={"error": repr(exc)})

    async def _relay_once(self) -> None:
        """Publish rows left behind, in batches, deleting each batch once Redis took it."""
        while True:
            async with store.transaction(self._pool) as conn:
                rows = await store.take_outbox(conn, self._relay_min_age, 500)
                if not rows or not await self._send(rows, record=False):
                    return
                await store.delete_outbox(conn, [row.id for row in rows])
            log.info("relayed outbox events", extra={"count": len(rows)})


def _stop_if_cancelled() -> None:
    """Honour a cancel that a library swallowed (seen with redis-py's pipeline execute):
    without this a loop that catches errors would spin on after shutdown cancelled it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Subscriber:
    """One pub/sub connection per process, supervised forever.

    `subscribe` returns once Redis has confirmed the subscription, so a caller that then reads
    PostgreSQL misses nothing published after its read. A watchdog publishes to the process's
    own channel every few seconds and reconnects when nothing comes back, so a silently dead
    connection is noticed too.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        node_channel: str,
        on_message: Callable[[str, bytes], None],
        on_resubscribed: Callable[[float], Awaitable[None]],
        heartbeat: float = 3.0,
    ) -> None:
        self._redis = redis
        self._node_channel = node_channel
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._heartbeat = heartbeat
        self._channels: set[str] = set()
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._pubsub: aioredis.client.PubSub | None = None
        self.connected = asyncio.Event()
        self._last_seen = time.time()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dropping: set[str] = set()
        self._drop_ready = asyncio.Event()

    def keep(self, channels: Sequence[str]) -> None:
        """Channels to hold for the life of the process, from the first SUBSCRIBE on (call
        before `run`); never dropped."""
        self._channels.update(channels)

    async def subscribe(self, channels: Sequence[str], timeout: float = 5.0) -> bool:
        """Subscribe; True once Redis confirmed, False if it did not within `timeout`."""
        loop = asyncio.get_running_loop()
        futures = []
        for channel in channels:
            self._channels.add(channel)
            self._dropping.discard(channel)
            future = loop.create_future()
            self._waiting.setdefault(channel, []).append(future)
            futures.append(future)
        pubsub = self._pubsub
        if pubsub is not None and self.connected.is_set():
            try:
                await pubsub.subscribe(*channels)
            except (RedisError, OSError):
                pass  # the supervisor reconnects and subscribes to every channel again
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*futures)
            return True
        except TimeoutError:
            for channel, future in zip(channels, futures, strict=True):
                waiting = self._waiting.get(channel, [])
                if future in waiting:
                    waiting.remove(future)
                if not waiting:
                    self._waiting.pop(channel, None)
            return False

    def unsubscribe(self, channels: Sequence[str]) -> None:
        """Drop channels soon, in one UNSUBSCRIBE with whatever else is being dropped: a
        process closing thousands of sockets sends one command, not thousands."""
        for channel in channels:
            self._channels.discard(channel)
            self._dropping.add(channel)
        self._drop_ready.set()

    async def _drop(self, pubsub: aioredis.client.PubSub) -> None:
        while True:
            await self._drop_ready.wait()
            self._drop_ready.clear()
            # A channel subscribed again since it was dropped stays.
            channels = [c for c in self._dropping if c not in self._channels]
            self._dropping.clear()
            if channels:
                await pubsub.unsubscribe(*channels)
                # Wanted again while that was on its way: Redis may have seen the new
                # SUBSCRIBE first and the UNSUBSCRIBE last.
                if again := [c for c in channels if c in self._channels]:
                    await pubsub.subscribe(*again)

    async def run(self) -> None:
        backoff = 0.1
        first = True
        while True:
            since = self._last_seen
            started = time.monotonic()
            try:
                await self._session(resync_since=None if first else since)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pub/sub connection lost", extra={"error": repr(exc)})
            first = False
            self.connected.clear()
            if time.monotonic() - started > 30:
                backoff = 0.1  # that session was healthy: the next break starts afresh
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)
            metrics.SUBSCRIBER_RECONNECTS.inc()

    async def _session(self, resync_since: float | None) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=False)
        self._pubsub = pubsub
        try:
            # The node channel goes last: Redis confirms in order, so its confirmation means
            # every channel is subscribed and a resync can safely read PostgreSQL.
            sent = set(self._channels)
            await pubsub.subscribe(*sent, self._node_channel)
            self.connected.set()
            # Channels added while that SUBSCRIBE was in flight were not in it.
            while missing := self._channels - sent:
                sent |= missing
                await pubsub.subscribe(*missing)
            async with asyncio.TaskGroup() as group:
                reader = group.create_task(self._read(pubsub, resync_since))
                group.create_task(self._watch(reader))
                group.create_task(self._drop(pubsub))
        finally:
            self._pubsub = None
            try:
                await pubsub.aclose()
            except Exception:
                pass

    async def _read(self, pubsub: aioredis.client.PubSub, resync_since: float | None) -> None:
        resynced = resync_since is None
        async for message in pubsub.listen():
            self._last_seen = time.time()
            kind = message["type"]
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            if kind == b"message" or kind == "message":
                if channel != self._node_channel:
                    self._on_message(channel, message["data"])
            elif kind in (b"subscribe", "subscribe"):
                for future in self._waiting.pop(channel, ()):
                    if not future.done():
                        future.set_result(None)
                if channel == self._node_channel and not resynced:
                    resynced = True
                    log.info("pub/sub reconnected", extra={"channels": len(self._channels)})
                    task = asyncio.get_running_loop().create_task(
                        self._on_resubscribed(resync_since)
                    )
                    self._tasks.add(task)  # the loop holds tasks weakly
                    task.add_done_callback(self._resync_done)

    def _resync_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("resync failed", exc_info=task.exception())

    async def _watch(self, reader: asyncio.Task[None]) -> None:
        """Ping our own channel; no message of any kind for 3 beats means a dead link."""
        while True:
            await asyncio.sleep(self._heartbeat)
            if time.time() - self._last_seen > 3 * self._heartbeat:
                reader.cancel()
                raise ConnectionError("pub/sub connection silent")
            try:
                await self._redis.publish(self._node_channel, b"beat")
            except (RedisError, OSError):
                pass
