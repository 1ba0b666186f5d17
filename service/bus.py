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
import logging
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from . import metrics, store

log = logging.getLogger(__name__)

# The longest pause between two attempts to reach Redis again. Whatever was published while
# a subscription was down reaches its sockets only after the resync that follows the next
# successful attempt, so this pause is added to every outage: a recipient waited 7 s across
# a 2 s Redis restart when it grew to 5 s (bench chaos). One connection attempt a second
# per process costs a recovering Redis nothing.
MAX_BACKOFF = 1.0

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


class Publisher:
    """Publishes committed outbox rows, deletes what Redis took, and relays the rest."""

    def __init__(
        self,
        redis: Client,
        pool: store.Pool,
        *,
        relay_interval: float,
        relay_min_age: float,
        idempotency_hours: int,
    ) -> None:
        self._redis = redis
        self._sharded = isinstance(redis, aioredis.RedisCluster)
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
                    if self._sharded:
                        pipe.spublish(row.channel, row.payload)
                    else:
                        pipe.publish(row.channel, row.payload)
                await pipe.execute()
        except REDIS_ERRORS as exc:
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
                        await store.forget_suggestions(conn)
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
            async with asyncio.TaskGroup() as group:
                reader = group.create_task(self._read(pubsub))
                group.create_task(self._write(pubsub))
                group.create_task(self._watch(pubsub, reader))
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
