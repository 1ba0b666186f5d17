"""Who is online: entries that name their process, and one liveness beat per process.

Layout (all under `prefix`):

* `{prefix}{<relationship>}:<role>`: a set of the processes ("nodes") holding one of that
  partner's connections. A process adds itself when its first local connection of that
  partner opens and removes itself `grace` seconds after its last one closed, so a phone
  that changes networks and reconnects does not flap. Nothing refreshes these entries.
* `{prefix}nodes`: a sorted set of processes scored by when their liveness runs out. Each
  process beats every `ttl / 6` seconds, pushing its own score `2/3 · ttl` ahead and
  reading which processes ran out: the steady cost is one round trip a beat, however many
  sockets the process holds.
* `{prefix}entries:<node>`: the `<relationship>:<role>` entries a process holds, written
  with them, so that whoever finds the process dead knows what to remove.

A partner is online while its set is not empty. When the set goes from empty to not (or
back), a `PresenceChange` is published on `{prefix}{<relationship>}` from inside the same
Lua script, so the change and its announcement cannot be torn apart, and a change is
announced once however many processes attempt it (the script announces only the removal
that actually emptied the set).

A process killed with `kill -9` stops beating. The first survivor whose beat finds it run
out claims its clean-up (`SET NX` with an expiry: if the claimant dies too, another takes
over) and removes its entries, announcing each partner that goes offline: at most
`2/3 · ttl + ttl / 6` seconds after the last beat, plus the clean-up itself, so within
`ttl`. A process that was itself found dead (stalled past its liveness, or Redis lost its
data) notices on its next beat, when its own score was absent, and writes its entries again.

Joins and leaves of many connections at once (a reconnect storm) go out as one pipeline per
batch, as the write path groups commits. On a Redis Cluster each Lua call touches one
relationship's keys only, all carrying the `{<relationship>}` hash tag, channel included,
so the cluster can route it (the publish command is a parameter: SPUBLISH there). On a
single Redis, where any keys may meet in one script, a batch's joins and leaves are one
call of `_WRITE_MANY` (up to `_CHUNK` entries), and a batch of presence reads one call of
`_COUNT_MANY`: a command per entry costs the client more than the server (redis-py packs,
sends and parses each). The node keys are written outside the scripts.
"""

import asyncio
import hashlib
import logging
import time
import uuid
from collections import Counter

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from .coalesce import Coalescer

log = logging.getLogger(__name__)

# RuntimeError: uvloop's "unable to perform operation on <TCPTransport closed=True>", which
# redis-py lets through when a cluster node dies under a connection it is writing to.
_ERRORS = (RedisError, RedisClusterException, OSError, RuntimeError)

# KEYS[1] the partner's set of nodes, KEYS[2] the relationship's presence channel.
# ARGV: node, partner (role), the publish command (PUBLISH, or SPUBLISH on a cluster).
_JOIN = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 1 then
  redis.call(ARGV[3], KEYS[2], '{"partner":"' .. ARGV[2] .. '","online":true}')
  return 1
end
return 0
"""
_LEAVE = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 0 then
  redis.call(ARGV[3], KEYS[2], '{"partner":"' .. ARGV[2] .. '","online":false}')
  return 1
end
return 0
"""
# Single Redis only: _JOIN or _LEAVE for many entries, in order, in one call. KEYS: per entry
# its set of nodes and its presence channel. ARGV: node, the publish command, then per entry
# its role and "1" (join) or "0" (leave). Returns how many changes it announced.
_WRITE_MANY = """
local node, publish, announced = ARGV[1], ARGV[2], 0
for i = 1, #KEYS / 2 do
  local key, channel, role = KEYS[2 * i - 1], KEYS[2 * i], ARGV[2 * i + 1]
  if ARGV[2 * i + 2] == '1' then
    if redis.call('SADD', key, node) == 1 and redis.call('SCARD', key) == 1 then
      redis.call(publish, channel, '{"partner":"' .. role .. '","online":true}')
      announced = announced + 1
    end
  elseif redis.call('SREM', key, node) == 1 and redis.call('SCARD', key) == 0 then
    redis.call(publish, channel, '{"partner":"' .. role .. '","online":false}')
    announced = announced + 1
  end
end
return announced
"""
# Single Redis only: the SCARD of each key, in order.
_COUNT_MANY = """
local counts = {}
for i = 1, #KEYS do
  counts[i] = redis.call('SCARD', KEYS[i])
end
return counts
"""
_SCRIPTS = (_JOIN, _LEAVE, _WRITE_MANY, _COUNT_MANY)
_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in _SCRIPTS}
# Entries per pipeline: packing and parsing one of 15,000 would hold the event loop, and
# every socket's frames, for a good fraction of a second.
_CHUNK = 500

Entry = tuple[uuid.UUID, str]


class Presence:
    """This process's share of presence: local counts, grace timers, batched writes, the
    liveness beat and the clean-up of processes found dead."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str,
        node: str,
        ttl: float,
        grace: float,
        publish_command: str = "PUBLISH",
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._node = node
        self._ttl = ttl
        self._beat = ttl / 6
        self._liveness = ttl * 2 / 3
        self._grace = grace
        self._publish = publish_command
        # Keys of different relationships live on different shards of a cluster: a command
        # an entry there; one command a batch on a single Redis.
        self._cluster = isinstance(redis, aioredis.RedisCluster)
        self._nodes_key = f"{prefix}nodes"
        self._local: Counter[Entry] = Counter()
        self._leaving: dict[Entry, asyncio.TimerHandle] = {}
        self._written: set[Entry] = set()  # what Redis holds for us, as far as we know
        self._unsure: set[Entry] = set()  # a write failed: send the wanted state again
        self._dirty: set[Entry] = set()  # to write in the next batch
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._registered = False
        self._closed = False
        # A connect storm's greetings: the presence reads of one moment, one pipeline.
        self._reads: Coalescer[Entry, bool] = Coalescer(self._online_many)

    # ------------------------------------------------------------------ names

    def key(self, relationship_id: uuid.UUID, role: str) -> str:
        return f"{self._prefix}{{{relationship_id}}}:{role}"

    def channel(self, relationship_id: uuid.UUID) -> str:
        return f"{self._prefix}{{{relationship_id}}}"

    def _entries_key(self, node: str) -> str:
        return f"{self._prefix}entries:{node}"

    # ------------------------------------------------------------------ reads

    async def is_online(self, relationship_id: uuid.UUID, role: str) -> bool:
        """Whether `role` holds a connection on any live process; False if Redis is down.
        The reads of callers that ask at the same moment go out as one pipeline."""
        return await self._reads.get((relationship_id, role))

    def online_future(self, relationship_id: uuid.UUID, role: str) -> "asyncio.Future[bool]":
        """`is_online` as a future of the same batched read (no task of its own)."""
        return self._reads.future((relationship_id, role))

    async def _online_many(self, entries: list[Entry]) -> dict[Entry, bool]:
        """One SCARD an entry in a pipeline on a cluster, one `_COUNT_MANY` on a single
        Redis (the Coalescer's batches hold at most 500 entries); all False if Redis is down."""

        def fill(pipe) -> None:
            if self._cluster:
                for relationship_id, role in entries:
                    self.count_online(pipe, relationship_id, role)
            else:
                keys = [self.key(relationship_id, role) for relationship_id, role in entries]
                pipe.execute_command("EVALSHA", _SHA[_COUNT_MANY], len(keys), *keys)

        try:
            results = await self._pipeline(fill)
        except _ERRORS:
            return dict.fromkeys(entries, False)
        counts = results if self._cluster else results[0]
        return {entry: n > 0 for entry, n in zip(entries, counts, strict=True)}

    def count_online(self, pipe, relationship_id: uuid.UUID, role: str) -> None:
        """Queue, on a pipeline, the number of processes holding `role` (> 0: online)."""
        pipe.scard(self.key(relationship_id, role))

    # ------------------------------------------------------------------ local changes

    async def connected(self, relationship_id: uuid.UUID, role: str) -> None:
        """Count a connection; the first of a partner on this process is written to Redis
        in the next batch, which this waits for (Redis down: logged, retried each beat)."""
        entry = (relationship_id, role)
        self._local[entry] += 1
        timer = self._leaving.pop(entry, None)
        if timer is not None:
            timer.cancel()
            return  # our entry never went away
        if entry in self._written and entry not in self._dirty and entry not in self._unsure:
            return
        await self._write_soon(entry)

    def disconnected(self, relationship_id: uuid.UUID, role: str) -> None:
        entry = (relationship_id, role)
        self._local[entry] -= 1
        if self._local[entry] > 0:
            return
        del self._local[entry]
        loop = asyncio.get_running_loop()
        self._leaving[entry] = loop.call_later(self._grace, self._grace_over, entry)

    def _grace_over(self, entry: Entry) -> None:
        self._leaving.pop(entry, None)
        if entry not in self._local:
            self._write_soon(entry)

    def _wanted(self, entry: Entry) -> bool:
        return entry in self._local or entry in self._leaving

    # ------------------------------------------------------------------ batched writes

    def _write_soon(self, entry: Entry) -> asyncio.Future[None]:
        """Mark `entry` for the next batch; the future resolves once that batch is done."""
        loop = asyncio.get_running_loop()
        self._dirty.add(entry)
        future = loop.create_future()
        self._waiters.append(future)
        self._kick()
        return future

    def _kick(self) -> None:
        if self._dirty and not self._closed and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Write batches while entries are marked; what is marked during a batch's round
        trip goes in the next, as the write path groups its commits."""
        while self._dirty and not self._closed:
            await asyncio.sleep(0)  # the connects of this loop iteration join the batch
            entries, self._dirty = self._dirty, set()
            waiters, self._waiters = self._waiters, []
            try:
                await self._write(entries)
            except _ERRORS as exc:
                self._unsure |= entries
                log.warning("presence write failed", extra={"error": repr(exc)})
            except Exception:
                self._unsure |= entries  # and the next beat tries again
                log.exception("presence write failed")
            finally:
                for future in waiters:
                    if not future.done():
                        future.set_result(None)

    async def _write(self, entries: set[Entry]) -> None:
        ops = []
        for entry in entries:
            wanted = self._wanted(entry)
            if entry in self._unsure or wanted != (entry in self._written):
                ops.append((entry, wanted))
        members = self._entries_key(self._node)
        for start in range(0, len(ops), _CHUNK):
            chunk = ops[start : start + _CHUNK]

            def fill(pipe, chunk=chunk) -> None:
                # Registered before, or with, the first entry, and each entry listed before
                # it is joined and unlisted after it left: a process that dies holding
                # entries is always in the set that survivors read, with all of them.
                pipe.zadd(self._nodes_key, {self._node: time.time() + self._liveness})
                joins = [f"{rel}:{role}" for (rel, role), wanted in chunk if wanted]
                leaves = [f"{rel}:{role}" for (rel, role), wanted in chunk if not wanted]
                if joins:
                    pipe.sadd(members, *joins)
                if self._cluster:
                    for (relationship_id, role), wanted in chunk:
                        self._call(pipe, _JOIN if wanted else _LEAVE, relationship_id, role)
                else:
                    self._call_many(pipe, chunk, self._node)
                if leaves:
                    pipe.srem(members, *leaves)

            results = await self._pipeline(fill)
            self._registration(results[0])
            for entry, wanted in chunk:
                self._unsure.discard(entry)
                if wanted:
                    self._written.add(entry)
                else:
                    self._written.discard(entry)
                if self._wanted(entry) != wanted:
                    self._dirty.add(entry)  # changed during the round trip: the next batch

    def _call(self, pipe, script: str, relationship_id: uuid.UUID, role: str, node=None) -> None:
        # EVALSHA by hand: a pipeline holding a Script object asks SCRIPT EXISTS first; and
        # as a plain command, which a cluster pipeline routes by its first key (it refuses
        # `pipe.evalsha`).
        pipe.execute_command(
            "EVALSHA",
            _SHA[script],
            2,
            self.key(relationship_id, role),
            self.channel(relationship_id),
            node or self._node,
            role,
            self._publish,
        )

    def _call_many(self, pipe, ops: list[tuple[Entry, bool]], node: str) -> None:
        """Queue one `_WRITE_MANY` for `ops`, (entry, join?) pairs: a single Redis only."""
        keys: list[str] = []
        args: list[str] = [node, self._publish]
        for (relationship_id, role), join in ops:
            channel = self.channel(relationship_id)  # the key is the channel ":<role>"
            keys += (f"{channel}:{role}", channel)
            args += (role, "1" if join else "0")
        pipe.execute_command("EVALSHA", _SHA[_WRITE_MANY], len(keys), *keys, *args)

    async def _pipeline(self, fill) -> list:
        """Run the pipeline that `fill(pipe)` queues. Redis restarted or flushed its script
        cache: load the scripts and run it again (every command in it is idempotent)."""
        for attempt in (1, 2):
            async with self._redis.pipeline(transaction=False) as pipe:
                fill(pipe)
                try:
                    return await pipe.execute()
                except NoScriptError:
                    if attempt == 2:
                        raise
            for script in _SCRIPTS:
                await self._redis.script_load(script)
        raise AssertionError("unreachable")

    def _registration(self, added: int) -> None:
        """ZADD answers 1 when our liveness was absent: the first time, or because a
        survivor found us dead and removed our entries. Then every entry is written again."""
        if added and self._registered:
            log.warning(
                "presence: this process was found dead; writing its entries again",
                extra={"node": self._node},
            )
            self._unsure |= self._written
            self._written.clear()
            self._dirty |= self._unsure
        self._registered = True

    # ------------------------------------------------------------------ beats

    async def run(self) -> None:
        """Beat every ttl/6 seconds: our liveness, dead processes, writes to retry."""
        while True:
            try:
                await self.beat()
            except _ERRORS as exc:
                log.warning("presence heartbeat failed", extra={"error": repr(exc)})
            await asyncio.sleep(self._beat)

    async def beat(self) -> None:
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._nodes_key, {self._node: now + self._liveness})
            pipe.zrangebyscore(self._nodes_key, "-inf", now, start=0, num=20)
            added, dead = await pipe.execute()
        self._registration(added)
        self._dirty |= self._unsure  # writes that failed, tried again
        self._kick()
        for node in dead:
            node = node.decode() if isinstance(node, bytes) else node
            if node != self._node:
                await self._reap(node)

    async def _reap(self, node: str) -> None:
        """Remove the entries of a process found dead, announcing each partner that goes
        offline; one process claims the work, and the scripts announce each change once."""
        claim = f"{self._prefix}reaping:{node}"
        if not await self._redis.set(claim, self._node, nx=True, px=int(self._ttl * 1000)):
            return
        members_key = self._entries_key(node)
        batch: list[Entry] = []
        removed = offline = 0
        async for member in self._redis.sscan_iter(members_key, count=_CHUNK):
            member = member.decode() if isinstance(member, bytes) else member
            relationship, _, role = member.rpartition(":")
            try:
                batch.append((uuid.UUID(relationship), role))
            except ValueError:
                continue
            if len(batch) >= _CHUNK:
                offline += await self._leave_all(batch, node)
                removed += len(batch)
                batch = []
        if batch:
            offline += await self._leave_all(batch, node)
            removed += len(batch)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(members_key)
            pipe.zrem(self._nodes_key, node)
            pipe.delete(claim)
            await pipe.execute()
        log.info(
            "presence: removed a dead process's entries",
            extra={"node": node, "entries": removed, "offline": offline},
        )

    async def _leave_all(self, entries: list[Entry], node: str) -> int:
        """LEAVE for each entry of `node` in one pipeline (one command on a single Redis);
        how many went offline."""

        def fill(pipe) -> None:
            if self._cluster:
                for relationship_id, role in entries:
                    self._call(pipe, _LEAVE, relationship_id, role, node)
            else:
                self._call_many(pipe, [(entry, False) for entry in entries], node)

        return sum(await self._pipeline(fill))

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Drop every entry of this process now (shutdown), announcing what goes offline:
        a pipeline per 500 entries, however many connections the process held."""
        self._closed = True
        if self._flusher is not None and not self._flusher.done():
            # A batch in flight finishes first, so no join of ours lands after our leave.
            await asyncio.wait([self._flusher])
        for timer in self._leaving.values():
            timer.cancel()
        self._local.clear()
        self._leaving.clear()
        entries = list(self._written | self._unsure | self._dirty)
        self._written.clear()
        self._unsure.clear()
        self._dirty.clear()
        for future in self._waiters:
            if not future.done():
                future.set_result(None)
        try:
            for start in range(0, len(entries), _CHUNK):
                await self._leave_all(entries[start : start + _CHUNK], self._node)
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(self._entries_key(self._node))
                pipe.zrem(self._nodes_key, self._node)
                await pipe.execute()
        except _ERRORS as exc:
            log.warning("presence entries left for the survivors", extra={"error": repr(exc)})
