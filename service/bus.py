"""Events on Redis: publishing the event log, one subscriber per process, stream reports.

Guarantees, and their limits:

* Publishing is at least once. An event is written to the log (`gesture_events`) in the same
  transaction as the change it announces and handed to `Publisher.publish` after commit,
  which sends it, in one pipeline, on its channel (PUBLISH) and, for a relationship's event,
  to its partition's stream (XADD, trimmed by age with MINID). Rows are never deleted one by
  one; progress is a mark per process (`gesture_nodes.published_through`). What Redis
  refused, the process publishes again from the log once Redis answers; what a process that
  died may not have published, a survivor does. An event can therefore arrive twice, or
  after a newer one: consumers dedupe by `event_id`.
* Channels are pub/sub, at most once to each subscriber: one that is disconnected misses
  what was published meanwhile. `Subscriber` reconnects with backoff and jitter, resubscribes,
  and then calls `on_resubscribed(since)` so the gateway can re-read from PostgreSQL, the
  source of truth, what its clients may have missed.
* Streams keep entries for EVENT_STREAM_RETENTION seconds; consumer groups read them at
  their own pace (`service.consumer`). All events of a relationship are in one partition,
  `uuid(relationship_id).int % EVENT_STREAMS`, in the order their processes published them.

Cluster mode (`REDIS_CLUSTER=true`): the bus alone knows which Redis a channel lives on.
`redis_client` returns a `RedisCluster`; events go out with SPUBLISH on the same channel
names, so each event reaches only the shard that owns its channel's slot instead of every
node. `ShardedSubscriber` holds one SSUBSCRIBE connection per shard master that owns a wanted
channel, routed by slot (`redis.crc.key_slot`). A shard that fails over or gives a slot away
unsubscribes its clients (Redis sends them `sunsubscribe`); an SSUBSCRIBE that reaches the
wrong node is answered MOVED. Either way, and on any broken or silent shard connection (a
node killed), the subscriber reloads the slot map, subscribes that connection's channels
again on the masters that own them now and calls `on_resubscribed(since)`: the same re-read
from PostgreSQL as after a Redis restart. The other shards' connections are not touched.
The outbox covers the publishing side: an SPUBLISH that fails during a failover is retried
by the relay until the new master takes it.

redis-py 8.1's `RedisCluster.pubsub()` does SSUBSCRIBE per node, but it reads by polling the
nodes in turn, leaves a channel unsubscribed after a server-side `sunsubscribe` until some
other command happens to refresh the slot map, reconnects behind the caller's back (a gap
nobody re-reads) and has no hook for a resync; hence the plain connections here.
"""

import asyncio
import contextlib
import logging
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from . import metrics, resp, store

log = logging.getLogger(__name__)

# The longest pause between two attempts to reach Redis again. Whatever was published while
# a subscription was down reaches its sockets only after the resync that follows the next
# successful attempt, so this pause is added to every outage: a recipient waited 7 s across
# a 2 s Redis restart when it grew to 5 s (bench chaos). One connection attempt a second
# per process costs a recovering Redis nothing.
MAX_BACKOFF = 1.0

# The longest a batch of events may take to reach Redis, as for any command (socket_timeout):
# past it the batch is left to the relay's replay.
SEND_TIMEOUT = 2.0

# A write whose outcome is unknown is published again from this long before it started:
# its rows carry PostgreSQL's clock (`now()` at the transaction's start), not this process's.
UNCERTAIN_MARGIN = timedelta(seconds=5)

# What a call to Redis or a Redis Cluster raises when the server is away, slow or moving.
# RuntimeError: uvloop's "unable to perform operation on <TCPTransport closed=True>", which
# redis-py lets through when a cluster node dies under a connection it is writing to.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, RuntimeError)

Client = aioredis.Redis | aioredis.RedisCluster


def redis_client(url: str, *, cluster: bool, max_connections: int) -> Client:
    """The one client for commands: a `Redis` on a blocking pool, or, in cluster mode, a
    `RedisCluster` that discovers the other nodes from the one `url` names."""
    if cluster:
        return aioredis.RedisCluster.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=2.0,
            socket_connect_timeout=1.0,
        )
    return aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=2.0,
            socket_timeout=2.0,
            socket_connect_timeout=1.0,
        )
    )


async def close_client(redis: Client) -> None:
    if isinstance(redis, aioredis.RedisCluster):
        await redis.aclose()
    else:
        # A client made on a pool passed in leaves that pool open unless told to close it.
        await redis.aclose(close_connection_pool=True)


def subscriber(
    redis: Client,
    url: str,
    *,
    node_channel: str,
    on_message: Callable[[str, bytes], None],
    on_resubscribed: Callable[[float], Awaitable[None]],
) -> "Subscriber | ShardedSubscriber":
    """The process's subscriber for `redis` (from `redis_client`): a plain one on a
    connection of its own, or the sharded one on a cluster."""
    if isinstance(redis, aioredis.RedisCluster):
        return ShardedSubscriber(redis, on_message=on_message, on_resubscribed=on_resubscribed)
    # Pub/sub waits for messages: its read timeout is longer than the subscriber's own
    # watchdog (3 missed heartbeats of 3 s), which is what notices a silent link.
    pubsub_redis = aioredis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=15.0)
    return Subscriber(
        pubsub_redis,
        node_channel=node_channel,
        on_message=on_message,
        on_resubscribed=on_resubscribed,
    )


def _expect(
    waiting: dict[str, list[asyncio.Future[None]]], channels: Sequence[str]
) -> list[asyncio.Future[None]]:
    """A future per channel, resolved when Redis confirms that channel's subscription."""
    loop = asyncio.get_running_loop()
    futures = []
    for channel in channels:
        future = loop.create_future()
        waiting.setdefault(channel, []).append(future)
        futures.append(future)
    return futures


async def _confirmed(
    waiting: dict[str, list[asyncio.Future[None]]],
    channels: Sequence[str],
    futures: list[asyncio.Future[None]],
    timeout: float,
) -> bool:
    """Whether every channel was confirmed within `timeout`; if not, its waiters go."""
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*futures)
        return True
    except TimeoutError:
        for channel, future in zip(channels, futures, strict=True):
            held = waiting.get(channel, [])
            if future in held:
                held.remove(future)
            if not held:
                waiting.pop(channel, None)
        return False


def channel_for(prefix: str, relationship_id: uuid.UUID | str) -> str:
    return f"{prefix}{relationship_id}"


def control_channel(presence_prefix: str) -> str:
    """The one channel every process subscribes to for as long as it runs: changes that
    concern every process (a relationship's partners changed). Low volume."""
    return f"{presence_prefix}control"


def stream_key(prefix: str, partition: int) -> str:
    """The stream of a partition: braces literal, so each partition is one hash slot."""
    return f"{prefix}stream:{{{partition}}}"


def partition_of(relationship_id: uuid.UUID, partitions: int) -> int:
    return relationship_id.int % partitions


class Publisher:
    """Puts this process's committed events on Redis, and takes over those of dead processes.

    Every event row goes out in one pipeline: PUBLISH (SPUBLISH on a cluster) on its channel,
    then, for a relationship's event, XADD to its partition's stream, trimmed by age with
    MINID. A row is done when Redis took both. Nothing is deleted: the rows stay in the log
    for `GET /api/events` until their day's partition is emptied. What marks progress is the
    node's beat in `gesture_nodes`: `published_through` says that every row this process
    wrote in a transaction begun before it reached Redis.

    * Redis refused a batch: the rows are not kept in memory. The earliest `created_at` among
      them is remembered, `published_through` stops there, and the relay reads this node's
      rows from that time on from PostgreSQL and publishes them once Redis answers again
      (some twice: consumers dedupe by `event_id`).
    * The process died: its beat stops; after `node_ttl` seconds a survivor claims the node
      and publishes its rows from `published_through` less `TAKEOVER_MARGIN` (transactions
      in flight when it beat last), then deletes the node.
    """

    # Transactions that began before a node's last beat and committed after it: none of
    # this service's lasts this long (statements time out after DB_TIMEOUT).
    TAKEOVER_MARGIN = timedelta(seconds=60)

    def __init__(
        self,
        redis: Client,
        pool: store.Pool,
        *,
        channel_prefix: str,
        event_streams: int,
        stream_retention: int,
        relay_interval: float,
        node_ttl: float,
        idempotency_hours: int,
        log_retention_days: int,
        identity: tuple[str, int | None, str] = ("", None, ""),
        sockets: Callable[[], int] = lambda: 0,
    ) -> None:
        self._redis = redis
        self._sharded = isinstance(redis, aioredis.RedisCluster)
        self._pool = pool
        self._stream_prefix = channel_prefix
        self._partitions = event_streams
        self._stream_retention_ms = stream_retention * 1000
        self._relay_interval = relay_interval
        self._node_ttl = node_ttl
        self._idempotency_hours = idempotency_hours
        self._log_retention_days = log_retention_days
        self._identity = identity
        self._sockets = sockets
        self._queue: list[store.OutboxRow] = []
        self._ready = asyncio.Event()
        # Rows handed over and not yet on Redis: their earliest created_at bounds the beat.
        self._sending: dict[int, datetime] = {}
        self._batch = 0
        # The earliest created_at of a row Redis refused, until the replay has sent it.
        self._replay_since: datetime | None = None
        self._refusals = 0
        self.node = 0
        self.redis_ok = True

    async def register(self) -> int:
        """Announce this process in `gesture_nodes`; returns its node id (call before any
        event is written: rows carry it)."""
        host, port, version = self._identity
        async with store.connection(self._pool) as conn:
            self.node = await store.register_node(conn, host, port, os.getpid(), version)
        return self.node

    def stream(self, relationship_id: uuid.UUID) -> str:
        return stream_key(self._stream_prefix, partition_of(relationship_id, self._partitions))

    def publish(self, rows: Iterable[store.OutboxRow]) -> None:
        """Queue committed rows for publishing; never blocks, never raises."""
        self._queue.extend(rows)
        self._ready.set()

    async def publish_now(self, rows: Sequence[store.OutboxRow]) -> bool:
        """Publish committed rows and wait until Redis took them, for a change whose caller
        is answered only once every subscriber can have heard of it. False when Redis did
        not take them: the relay publishes them later."""
        return await self._send_tracked(rows)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._publish_loop())
            group.create_task(self._relay_loop())

    async def flush(self) -> None:
        """Publish what is queued; with nothing left behind, leave `gesture_nodes` (used at
        shutdown). Otherwise the node stays, and a survivor publishes the rest."""
        if self._queue:
            rows, self._queue = self._queue, []
            await self._send_tracked(rows)
        try:
            async with store.connection(self._pool) as conn:
                if self._replay_since is None and not self._sending:
                    await store.forget_node(conn, self.node)
                else:
                    await store.beat(conn, self.node, 0, self._published_through())
        except Exception as exc:
            log.warning("could not record the node's last beat", extra={"error": repr(exc)})

    async def _publish_loop(self) -> None:
        while True:
            _stop_if_cancelled()
            await self._ready.wait()
            self._ready.clear()
            rows, self._queue = self._queue, []
            if rows:
                await self._send_tracked(rows)

    async def _send_tracked(self, rows: Sequence[store.OutboxRow]) -> bool:
        """Send rows of this node; a refusal leaves them to the replay."""
        if not rows:
            return True
        self._batch += 1
        batch = self._batch
        self._sending[batch] = min(row.created_at for row in rows)
        try:
            if await self._send(rows):
                return True
            self._refused(rows)
            return False
        finally:
            del self._sending[batch]

    def _refused(self, rows: Sequence[store.OutboxRow]) -> None:
        self.uncertain(min(row.created_at for row in rows))

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Around a write of events whose rows are published once it returns: if it fails,
        it may still have committed (PostgreSQL cut between its commit and its reply), and
        nobody holds its rows, so the relay publishes this node's rows from its start on."""
        started = datetime.now(UTC) - UNCERTAIN_MARGIN
        try:
            yield
        except BaseException:
            self.uncertain(started)
            raise

    def uncertain(self, since: datetime) -> None:
        """Publish this node's rows from `since` on again (the relay's replay): after Redis
        refused them, or after a write of events failed in a way that may have committed
        (PostgreSQL cut between its commit and its reply), whose rows nobody was handed."""
        if self._replay_since is None or since < self._replay_since:
            self._replay_since = since
        self._refusals += 1

    async def _send(self, rows: Sequence[store.OutboxRow]) -> bool:
        if not rows:
            return True
        minid = int(time.time() * 1000) - self._stream_retention_ms
        try:
            if not self._sharded:
                await resp.execute(self._redis, self._commands(rows, minid), SEND_TIMEOUT)
                self.redis_ok = True
                return True
            # A cluster: redis-py's cluster pipeline sends each command to its slot's master.
            async with self._redis.pipeline(transaction=False) as pipe:
                for row in rows:
                    pipe.spublish(row.channel, row.payload)
                    if row.relationship_id is not None and self._partitions:
                        pipe.xadd(
                            self.stream(row.relationship_id),
                            {"event": row.payload},
                            minid=minid,
                            approximate=True,
                        )
                await pipe.execute()
        except REDIS_ERRORS as exc:
            if self.redis_ok:
                log.warning("publish failed, the relay will retry", extra={"error": repr(exc)})
            self.redis_ok = False
            return False
        self.redis_ok = True
        return True

    def _commands(self, rows: Sequence[store.OutboxRow], minid: int) -> list[bytes]:
        """PUBLISH, and XADD where the row goes to a stream, for each row in order."""
        out = []
        trim = b"%d" % minid
        for row in rows:
            channel = row.channel.encode()
            out.append(resp.command(b"PUBLISH", channel, row.payload))
            if row.relationship_id is not None and self._partitions:
                key = self.stream(row.relationship_id).encode()
                out.append(
                    resp.command(b"XADD", key, b"MINID", b"~", trim, b"*", b"event", row.payload)
                )
        return out

    def _published_through(self) -> datetime | None:
        """The beat's mark: the earliest row not known to be on Redis; None: now."""
        held = [*self._sending.values(), *(row.created_at for row in self._queue)]
        if self._replay_since is not None:
            held.append(self._replay_since)
        return min(held) if held else None

    async def _relay_loop(self) -> None:
        last_cleanup = 0.0
        while True:
            _stop_if_cancelled()
            await asyncio.sleep(self._relay_interval)
            try:
                await self._beat()
                if self._replay_since is not None:
                    await self._replay()
                await self._take_over()
                if time.monotonic() - last_cleanup > 300:
                    last_cleanup = time.monotonic()
                    await self._clean_up()
            except Exception as exc:
                log.warning("outbox relay pass failed", extra={"error": repr(exc)})

    async def _beat(self) -> None:
        through = self._published_through()
        async with store.connection(self._pool) as conn:
            if not await store.beat(conn, self.node, self._sockets(), through):
                # Taken over while this process could not beat: its rows were published
                # by the survivor up to now, and the node comes back under the same id.
                host, port, version = self._identity
                log.warning("node was taken over; registering again", extra={"node": self.node})
                await store.reregister_node(
                    conn, self.node, host, port, os.getpid(), version, through or _now()
                )

    async def _replay(self) -> None:
        """Publish this node's rows from the earliest refused one on, in log order."""
        refusals = self._refusals
        since = self._replay_since
        assert since is not None
        if await self._publish_rows_of(self.node, since):
            if refusals == self._refusals:  # nothing refused meanwhile
                self._replay_since = None
            log.info("outbox replayed after Redis came back", extra={"node": self.node})

    async def _take_over(self) -> None:
        """Publish the rows of nodes whose beat stopped, one node a pass."""
        async with store.connection(self._pool) as conn:
            claimed = await store.claim_dead_node(conn, self._node_ttl, 4 * self._node_ttl)
        if claimed is None:
            return
        node, through = claimed
        log.warning("taking over a dead node's events", extra={"dead_node": node})
        if await self._publish_rows_of(node, through - self.TAKEOVER_MARGIN):
            async with store.connection(self._pool) as conn:
                await store.forget_node(conn, node)

    async def _publish_rows_of(self, node: int, since: datetime) -> bool:
        after = None
        sent = 0
        while True:
            async with store.connection(self._pool) as conn:
                rows, after = await store.node_events(conn, node, since, after, 500)
            if not rows:
                if sent:
                    log.info("relayed outbox events", extra={"node": node, "count": sent})
                return True
            if not await self._send(rows):
                return False
            sent += len(rows)

    async def _clean_up(self) -> None:
        async with store.connection(self._pool) as conn:
            await store.forget_idempotency_keys(conn, self._idempotency_hours)
            await store.forget_suggestions(conn)
            emptied = await store.truncate_old_events(conn, self._log_retention_days)
        if emptied:
            log.info("event log partitions emptied", extra={"slots": emptied})


def _now() -> datetime:
    return datetime.now(UTC)


async def cancel_until_done(tasks: Iterable[asyncio.Task], timeout: float) -> set[asyncio.Task]:
    """Cancel the tasks, again every 0.1 s while any runs, for at most `timeout`; return
    those still running. redis-py can swallow a cancel (one that lands while it connects, or
    as its own read timeout fires, which then uncancels the task): a loop that retries Redis
    errors then goes on after it was told to stop, and a single cancel waits for it forever."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(0.1, deadline - loop.time()))
    return pending


def _stop_if_cancelled() -> None:
    """Honour a cancel that a library swallowed (seen with redis-py's pipeline execute):
    without this a loop that catches errors would spin on after shutdown cancelled it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _together(*jobs: "asyncio.Task[None] | Coroutine[Any, Any, None]") -> None:
    """Run the jobs (coroutines become tasks) until one ends; then cancel the others, wait
    for them, and raise the error that one ended with, if any. A cancel of the caller is
    raised as a cancel, even when a job failed at the same moment. A task group on Python
    3.11 raises the job's error instead, and leaves the caller's `cancelling()` count set
    whenever a job fails, so the caller can tell neither case: a supervisor that retries
    errors went on after it was told to stop (tests/test_subscriber.py)."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        # A job that swallowed its cancel (redis-py can) honours it at its next turn.
        await asyncio.wait(tasks)
    ended_with = None
    for task in tasks:
        error = None if task.cancelled() else task.exception()  # retrieved, each of them
        if ended_with is None and task in done:
            ended_with = error
    if ended_with is not None:
        raise ended_with


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
        for channel in channels:
            self._channels.add(channel)
            self._dropping.discard(channel)
        futures = _expect(self._waiting, channels)
        pubsub = self._pubsub
        if pubsub is not None and self.connected.is_set():
            try:
                await pubsub.subscribe(*channels)
            except (RedisError, OSError):
                pass  # the supervisor reconnects and subscribes to every channel again
        return await _confirmed(self._waiting, channels, futures, timeout)

    def unsubscribe(self, channels: Sequence[str]) -> None:
        """Drop channels soon, in one UNSUBSCRIBE with whatever else is being dropped: a
        process closing thousands of sockets sends one command, not thousands."""
        for channel in channels:
            self._channels.discard(channel)
            self._dropping.add(channel)
        self._drop_ready.set()

    async def _drop(self, pubsub: aioredis.client.PubSub) -> None:
        while True:
            _stop_if_cancelled()  # as in `_watch`: a cancel swallowed by (un)subscribe
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

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def run(self) -> None:
        await _forever(self._session, lambda: self._last_seen, self.connected, "pub/sub")

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
            reader = asyncio.get_running_loop().create_task(self._read(pubsub, resync_since))
            await _together(reader, self._watch(reader), self._drop(pubsub))
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
            # redis-py's publish can return normally after a cancel landed in it: the task
            # group cancels its children once, so a beat that swallowed it would go on.
            _stop_if_cancelled()


class SlotMoved(ConnectionError):
    """A shard dropped our subscription (failover, slot migration) or answered MOVED."""


class ShardedSubscriber:
    """Cluster mode: one SSUBSCRIBE connection per shard master that owns a wanted channel.

    Same interface and promises as `Subscriber`. Each shard's connection is supervised on its
    own: whatever breaks it (a failover, a MOVED, a silent link, a dead node) ends that
    connection only; its channels go, once the slot map is reloaded, to whichever masters own
    them now, and once they are subscribed again `on_resubscribed(since)` is called. The other
    shards' subscriptions go on undisturbed.
    """

    def __init__(
        self,
        cluster: aioredis.RedisCluster,
        *,
        on_message: Callable[[str, bytes], None],
        on_resubscribed: Callable[[float], Awaitable[None]],
        heartbeat: float = 3.0,
    ) -> None:
        self._cluster = cluster
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._heartbeat = heartbeat
        self._channels: set[str] = set()
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._shards: dict[str, _Shard] = {}
        self._owner: dict[str, _Shard] = {}
        self._group: asyncio.TaskGroup | None = None
        self._broken = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._resync_since: float | None = None
        self._last_seen = time.time()
        self.connected = asyncio.Event()

    def keep(self, channels: Sequence[str]) -> None:
        """Channels to hold for the life of the process, from the first SSUBSCRIBE on (call
        before `run`); never dropped."""
        self._channels.update(channels)

    def shards(self) -> dict[str, int]:
        """Node name -> channels held there (for tests and the bench)."""
        return {name: len(shard.channels) for name, shard in self._shards.items()}

    async def subscribe(self, channels: Sequence[str], timeout: float = 5.0) -> bool:
        """Subscribe; True once every channel's shard confirmed, False if not in `timeout`."""
        self._channels.update(channels)
        futures = _expect(self._waiting, channels)
        if self._group is not None:
            self._route(channels)
        return await _confirmed(self._waiting, channels, futures, timeout)

    def unsubscribe(self, channels: Sequence[str]) -> None:
        for channel in channels:
            self._channels.discard(channel)
            shard = self._owner.pop(channel, None)
            if shard is not None:
                shard.drop(channel)

    async def aclose(self) -> None:
        """Nothing of its own to close: the shard connections end with `run`."""

    def _route(
        self, channels: Iterable[str], since: float | None = None, backoff: float = 0.1
    ) -> None:
        """Hand each channel to the connection of the master that owns its slot."""
        assert self._group is not None
        by_node: dict[str, list[str]] = defaultdict(list)
        try:
            for channel in channels:
                node = self._cluster.nodes_manager.get_node_from_slot(key_slot(channel.encode()))
                by_node[node.name].append(channel)
        except REDIS_ERRORS as exc:
            # A slot nobody serves right now (mid-failover): start over with a fresh map.
            log.warning("a channel's slot has no master", extra={"error": repr(exc)})
            self._broken.set()
            return
        for name, wanted in by_node.items():
            shard = self._shards.get(name)
            if shard is None:
                host, port = name.rsplit(":", 1)
                shard = _Shard(self, host, int(port), since=since)
                try:
                    self._group.create_task(self._supervise(shard, backoff), name=f"shard {name}")
                except RuntimeError:
                    return  # shutting down or starting over: every channel is routed again
                self._shards[name] = shard
            for channel in wanted:
                previous = self._owner.get(channel)
                if previous is not None and previous is not shard:
                    previous.drop(channel)
                self._owner[channel] = shard
            shard.add(wanted)

    async def _supervise(self, shard: "_Shard", backoff: float) -> None:
        """Run one shard's connection; when it breaks, give its channels to the masters that
        own them now, and resync once they are subscribed there."""
        started = time.monotonic()
        try:
            await shard.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "sharded pub/sub connection lost",
                extra={"shard": shard.name, "error": "; ".join(repr(e) for e in _leaves(exc))},
            )
        if self._shards.get(shard.name) is shard:
            del self._shards[shard.name]
        orphans = [channel for channel, owner in self._owner.items() if owner is shard]
        for channel in orphans:
            del self._owner[channel]
        since = shard.resync_from()
        if time.monotonic() - started > 30:
            backoff = 0.1  # that connection was healthy: the next break starts afresh
        await asyncio.sleep(backoff * (0.5 + random.random()))
        metrics.SUBSCRIBER_RECONNECTS.inc()
        await self._reload_slots()
        channels = [channel for channel in orphans if channel in self._channels]
        if not channels:
            return
        futures = _expect(self._waiting, channels)
        self._route(channels, since=since, backoff=min(backoff * 2, MAX_BACKOFF))
        if not await _confirmed(self._waiting, channels, futures, 15.0):
            return  # the new connection broke too; its own supervisor takes over, and resyncs
        log.info(
            "sharded pub/sub resubscribed", extra={"shard": shard.name, "channels": len(channels)}
        )
        self._resync(since)

    def _resync(self, since: float) -> None:
        """Resync from `since`; requests that arrive together (several supervisors whose
        channels came back at once) make one resync from the earliest."""
        if self._resync_since is not None:
            self._resync_since = min(self._resync_since, since)
            return
        self._resync_since = since
        task = asyncio.get_running_loop().create_task(self._run_resync())
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._resync_done)

    async def _run_resync(self) -> None:
        await asyncio.sleep(0)
        since, self._resync_since = self._resync_since, None
        assert since is not None
        await self._on_resubscribed(since)

    def _confirmed(self, channel: str) -> None:
        for future in self._waiting.pop(channel, ()):
            if not future.done():
                future.set_result(None)

    def _seen(self) -> None:
        self._last_seen = time.time()

    async def run(self) -> None:
        await _forever(
            self._epoch,
            lambda: self._last_seen,
            self.connected,
            "sharded pub/sub",
            before_retry=self._reload_slots,
        )

    async def _reload_slots(self) -> None:
        """The slot map as the cluster sees it now: after a failover the replica that took
        over is the master to subscribe on."""
        try:
            await self._cluster.nodes_manager.initialize()
        except REDIS_ERRORS as exc:
            log.warning("could not reload the cluster's slot map", extra={"error": repr(exc)})

    async def _epoch(self, resync_since: float | None) -> None:
        await self._cluster.initialize()
        self._broken.clear()
        self._shards.clear()
        self._owner.clear()
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._route(list(self._channels), since=resync_since)
                first = list(self._shards.values())
                group.create_task(self._until_broken())
                group.create_task(self._ready(first, resync_since))
        finally:
            self._group = None
            self._shards.clear()
            self._owner.clear()

    async def _until_broken(self) -> None:
        await self._broken.wait()
        raise SlotMoved("a channel's slot has no master in the slot map")

    async def _ready(self, shards: "list[_Shard]", resync_since: float | None) -> None:
        """Once the first shards each confirmed (or broke, and their supervisors took over):
        connected, and resync if this follows a broken start."""
        await asyncio.gather(*(shard.settled() for shard in shards))
        self.connected.set()
        if resync_since is not None:
            log.info(
                "sharded pub/sub reconnected",
                extra={"channels": len(self._channels), "shards": len(shards)},
            )
            self._resync(resync_since)

    def _resync_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("resync failed", exc_info=task.exception())


class _Shard:
    """One plain connection to one shard master, holding the SSUBSCRIBEs routed to it."""

    def __init__(
        self, owner: ShardedSubscriber, host: str, port: int, since: float | None = None
    ) -> None:
        self._owner = owner
        self.name = f"{host}:{port}"
        # When messages may first have been missed: inherited from the connection this one
        # replaces until it is subscribed, then the time of the last reply read.
        self._since = since
        self._seen_at = time.time()
        self.ended = asyncio.Event()
        # No retries: a connection that redis-py quietly re-established would hide the gap
        # in which messages were lost; a broken link must end the epoch and resync.
        self._redis = aioredis.Redis(
            host=host,
            port=port,
            socket_connect_timeout=1.0,
            socket_timeout=15.0,
            retry=Retry(NoBackoff(), 0),
        )
        self.channels: set[str] = set()
        self._to_subscribe: set[str] = set()
        self._to_drop: set[str] = set()
        self._dropping: Counter[str] = Counter()
        self._work = asyncio.Event()
        self._last_seen = time.monotonic()
        self.confirmed = asyncio.Event()

    async def settled(self) -> None:
        """Until subscribed, or broken."""
        confirmed = asyncio.ensure_future(self.confirmed.wait())
        ended = asyncio.ensure_future(self.ended.wait())
        try:
            await asyncio.wait([confirmed, ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            confirmed.cancel()
            ended.cancel()

    def resync_from(self) -> float:
        return self._seen_at if self._since is None else min(self._since, self._seen_at)

    def add(self, channels: Iterable[str]) -> None:
        for channel in channels:
            self.channels.add(channel)
            self._to_subscribe.add(channel)
            self._to_drop.discard(channel)
        self._work.set()

    def drop(self, channel: str) -> None:
        self.channels.discard(channel)
        self._to_subscribe.discard(channel)
        self._to_drop.add(channel)
        self._work.set()

    async def run(self) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=False)
        try:
            await self._send(pubsub)
            # Replies come in order: the PONG means every SSUBSCRIBE before it was answered.
            await pubsub.ping()
            # redis-py can swallow a cancel that lands while it connects or writes (seen when
            # a node is killed): the epoch would then wait forever for this shard.
            _stop_if_cancelled()
            reader = asyncio.get_running_loop().create_task(self._read(pubsub))
            await _together(reader, self._write(pubsub), self._watch(pubsub, reader))
        finally:
            self.ended.set()
            try:
                await pubsub.aclose()
            finally:
                await self._redis.aclose()

    async def _send(self, pubsub: aioredis.client.PubSub) -> None:
        """SSUBSCRIBE / SUNSUBSCRIBE what changed; one command per slot, since a sharded
        command's channels must share one slot."""
        drop, self._to_drop = self._to_drop, set()
        add, self._to_subscribe = self._to_subscribe, set()
        for channels in _by_slot(drop).values():
            self._dropping.update(channels)
            await pubsub.sunsubscribe(*channels)
        for channels in _by_slot(add).values():
            await pubsub.ssubscribe(*channels)

    async def _write(self, pubsub: aioredis.client.PubSub) -> None:
        while True:
            _stop_if_cancelled()
            await self._work.wait()
            self._work.clear()
            await self._send(pubsub)

    async def _read(self, pubsub: aioredis.client.PubSub) -> None:
        while True:
            _stop_if_cancelled()
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            self._owner._seen()
            self._last_seen = time.monotonic()
            self._seen_at = time.time()
            kind = message["type"]
            if kind == "smessage":
                self._owner._on_message(message["channel"].decode(), message["data"])
            elif kind == "ssubscribe":
                self._owner._confirmed(message["channel"].decode())
            elif kind == "sunsubscribe":
                channel = message["channel"].decode()
                if self._dropping[channel] > 0:
                    self._dropping[channel] -= 1
                    if not self._dropping[channel]:
                        del self._dropping[channel]
                elif channel in self.channels:
                    # Not ours: the shard lost the slot (failover, migration).
                    raise SlotMoved(f"{self.name} unsubscribed {channel}")
            elif kind == "pong":
                self.confirmed.set()
                self._since = None

    async def _watch(self, pubsub: aioredis.client.PubSub, reader: asyncio.Task[None]) -> None:
        """PING on the subscribed connection; no reply of any kind for 3 beats: dead link."""
        heartbeat = self._owner._heartbeat
        self._last_seen = time.monotonic()
        while True:
            await asyncio.sleep(heartbeat)
            if time.monotonic() - self._last_seen > 3 * heartbeat:
                reader.cancel()
                raise ConnectionError(f"sharded pub/sub connection to {self.name} silent")
            await pubsub.ping()
            _stop_if_cancelled()


async def _forever(
    session: Callable[[float | None], Awaitable[None]],
    last_seen: Callable[[], float],
    connected: asyncio.Event,
    what: str,
    before_retry: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run a subscriber's `session` again whenever it breaks: with None the first time, then
    with the time of the last message seen before the break, so it resyncs from there. Backoff
    with jitter up to MAX_BACKOFF, afresh after a session that lasted 30 s; each break is
    counted in `SUBSCRIBER_RECONNECTS`."""
    backoff = 0.1
    first = True
    while True:
        since = last_seen()
        started = time.monotonic()
        try:
            await session(None if first else since)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "subscriber connection lost",
                extra={"subscriber": what, "error": "; ".join(repr(e) for e in _leaves(exc))},
            )
        first = False
        connected.clear()
        if time.monotonic() - started > 30:
            backoff = 0.1  # that session was healthy: the next break starts afresh
        await asyncio.sleep(backoff * (0.5 + random.random()))
        backoff = min(backoff * 2, MAX_BACKOFF)
        metrics.SUBSCRIBER_RECONNECTS.inc()
        if before_retry is not None:
            await before_retry()


def _leaves(exc: BaseException) -> list[BaseException]:
    """The errors inside (nested) task-group exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _by_slot(channels: Iterable[str]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for channel in channels:
        groups[key_slot(channel.encode())].append(channel)
    return groups


class GroupState(NamedTuple):
    name: str
    # Entries not yet delivered to the group (None where Redis cannot say: before 7.0, or
    # after a trim it cannot count across), and entries delivered but not acknowledged.
    lag: int | None
    pending: int
    last_delivered: str


class PartitionState(NamedTuple):
    partition: int
    length: int
    first_id: str | None
    last_id: str | None
    groups: list[GroupState]
    dead_letters: int


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def stream_report(redis: Client, prefix: str, partitions: int) -> list[PartitionState]:
    """Each partition's stream and its consumer groups, as Redis reports them (XINFO), and
    the length of its dead-letter stream. A stream that does not exist reads as empty."""
    keys = [stream_key(prefix, n) for n in range(partitions)]
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.xinfo_stream(key)
            pipe.xinfo_groups(key)
            pipe.xlen(f"{key}:dead")
        answers = await pipe.execute(raise_on_error=False)
    report = []
    for n in range(partitions):
        info, groups, dead = answers[3 * n : 3 * n + 3]
        if isinstance(info, Exception):  # no such key
            info, groups = {}, []
        if isinstance(dead, Exception):
            dead = 0
        first = info.get("first-entry") if info else None
        last = info.get("last-entry") if info else None
        report.append(
            PartitionState(
                partition=n,
                length=int(info.get("length", 0)) if info else 0,
                first_id=_s(first[0]) if first else None,
                last_id=_s(last[0]) if last else None,
                groups=[
                    GroupState(
                        name=_s(g["name"]),
                        lag=None if g.get("lag") is None else int(g["lag"]),
                        pending=int(g["pending"]),
                        last_delivered=_s(g["last-delivered-id"]),
                    )
                    for g in groups
                ],
                dead_letters=int(dead),
            )
        )
    return report


async def consumer_counts(redis: Client, prefix: str, groups: Iterable[str]) -> dict[str, dict]:
    """What the consumers of each group recorded (`service.consumer`): catch-ups and dead
    letters, from the hash `<prefix>consumers:<group>`."""
    names = sorted(set(groups))
    if not names:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(f"{prefix}consumers:{name}")
        answers = await pipe.execute(raise_on_error=False)
    return {
        name: {} if isinstance(found, Exception) else {_s(k): int(v) for k, v in found.items()}
        for name, found in zip(names, answers, strict=True)
    }
