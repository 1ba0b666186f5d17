"""Who is online, as Redis entries that heartbeats keep alive.

Each partner of each relationship has a sorted set `<prefix>{<relationship>}:<role>` whose
members are the processes holding one of that partner's connections, scored by when the
entry expires. A process refreshes its entries every `ttl / 3` seconds, so a process killed
with `kill -9` stops counting within `ttl` seconds. A partner is online while any unexpired
entry exists.

When a partner's first entry appears or last one goes, a `PresenceChange` is published on
`<prefix>{<relationship>}` from inside the same Lua script, so the change and its
announcement cannot be torn apart. A process announces the expiry of another process's
entries when its sweep finds them. The last local connection's entry is removed only after
`grace` seconds, so a phone that changes networks and reconnects does not flap.

The braces are literal: a hash tag, so that on a Redis Cluster a relationship's presence
keys, its presence channel and its rate-limit keys share one slot and each script touches
one shard. In cluster mode (`sharded=True`) the scripts announce with SPUBLISH; pipelines
split per shard, each script going to the shard its relationship lives on.
"""

import asyncio
import logging
import time
import uuid
from collections import Counter

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

log = logging.getLogger(__name__)

# RuntimeError: uvloop's "unable to perform operation on <TCPTransport closed=True>", which
# redis-py lets through when a cluster node dies under a connection it is writing to.
_ERRORS = (RedisError, RedisClusterException, OSError, RuntimeError)

# KEYS[1] the partner's set, KEYS[2] the presence channel.
# ARGV: node, now, expires_at, ttl_ms, partner
_JOIN = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local before = redis.call('ZCARD', KEYS[1])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if before == 0 then
  redis.call('PUBLISH', KEYS[2], '{"partner":"' .. ARGV[5] .. '","online":true}')
  return 1
end
return 0
"""
# ARGV: node (or '' for a sweep), now, partner
_LEAVE = """
local removed = 0
if ARGV[1] ~= '' then removed = redis.call('ZREM', KEYS[1], ARGV[1]) end
removed = removed + redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if removed > 0 and redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('PUBLISH', KEYS[2], '{"partner":"' .. ARGV[3] .. '","online":false}')
  return 1
end
return 0
"""


def _chunks(items: list, size: int = 500):
    """Pipelines of a bounded size: packing and parsing one of 15,000 commands would hold
    the event loop, and every socket's frames, for a good fraction of a second."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Presence:
    """This process's share of presence: local counts, grace timers, heartbeats."""

    def __init__(
        self,
        redis: aioredis.Redis | aioredis.RedisCluster,
        *,
        prefix: str,
        node: str,
        ttl: float,
        grace: float,
        sharded: bool = False,
    ):
        self._redis = redis
        self._prefix = prefix
        self._node = node
        self._ttl = ttl
        # The set outlives its entries, so a sweep still finds a dead process's expired entry
        # and announces the partner offline; were it to expire with the entry, nobody would.
        self._key_ttl_ms = int(ttl * 2000)
        self._grace = grace
        self._local: Counter[tuple[uuid.UUID, str]] = Counter()
        self._leaving: dict[tuple[uuid.UUID, str], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        publish = "'SPUBLISH'" if sharded else "'PUBLISH'"
        self._join = redis.register_script(_JOIN.replace("'PUBLISH'", publish))
        self._leave = redis.register_script(_LEAVE.replace("'PUBLISH'", publish))

    def key(self, relationship_id: uuid.UUID, role: str) -> str:
        return f"{self._prefix}{{{relationship_id}}}:{role}"

    def channel(self, relationship_id: uuid.UUID) -> str:
        return f"{self._prefix}{{{relationship_id}}}"

    async def is_online(self, relationship_id: uuid.UUID, role: str) -> bool:
        """Whether `role` holds a connection on any live process; False if Redis is down."""
        try:
            n = await self._redis.zcount(self.key(relationship_id, role), time.time(), "+inf")
        except _ERRORS:
            return False
        return n > 0

    def count_online(self, pipe, relationship_id: uuid.UUID, role: str) -> None:
        """Queue, on a pipeline, the count of `role`'s live entries (> 0: online)."""
        pipe.zcount(self.key(relationship_id, role), time.time(), "+inf")

    async def connected(self, relationship_id: uuid.UUID, role: str) -> None:
        entry = (relationship_id, role)
        self._local[entry] += 1
        timer = self._leaving.pop(entry, None)
        if timer is not None:
            timer.cancel()
            return  # our entry never went away
        if self._local[entry] == 1:
            await self._run_join(entry)

    def disconnected(self, relationship_id: uuid.UUID, role: str) -> None:
        entry = (relationship_id, role)
        self._local[entry] -= 1
        if self._local[entry] > 0:
            return
        del self._local[entry]
        loop = asyncio.get_running_loop()
        self._leaving[entry] = loop.call_later(self._grace, self._spawn_leave, entry)

    def _spawn_leave(self, entry: tuple[uuid.UUID, str]) -> None:
        task = asyncio.get_running_loop().create_task(self._run_leave(entry))
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    async def _run_join(self, entry: tuple[uuid.UUID, str]) -> None:
        now = time.time()
        try:
            await self._join(
                keys=[self.key(*entry), self.channel(entry[0])],
                args=[self._node, now, now + self._ttl, self._key_ttl_ms, entry[1]],
            )
        except _ERRORS as exc:
            log.warning("presence join failed", extra={"error": repr(exc)})

    async def _run_leave(self, entry: tuple[uuid.UUID, str], node: str | None = None) -> None:
        self._leaving.pop(entry, None)
        if entry in self._local and node is None:
            return  # came back between the timer firing and now
        try:
            await self._leave(
                keys=[self.key(*entry), self.channel(entry[0])],
                args=[self._node if node is None else node, time.time(), entry[1]],
            )
        except _ERRORS as exc:
            log.warning("presence leave failed", extra={"error": repr(exc)})

    async def run(self) -> None:
        """Refresh our entries every ttl/3 seconds; sweep our partners' every ttl/6."""
        beat = 0
        while True:
            await asyncio.sleep(self._ttl / 6)
            beat += 1
            try:
                if beat % 2 == 0:
                    await self._refresh()
                await self._sweep()
            except _ERRORS as exc:
                log.warning("presence heartbeat failed", extra={"error": repr(exc)})

    async def _refresh(self) -> None:
        entries = list(self._local) + list(self._leaving)
        expires = time.time() + self._ttl
        for chunk in _chunks(entries):
            async with self._redis.pipeline(transaction=False) as pipe:
                for entry in chunk:
                    key = self.key(*entry)
                    pipe.zadd(key, {self._node: expires})
                    pipe.pexpire(key, self._key_ttl_ms)
                await pipe.execute()

    async def _sweep(self) -> None:
        """Announce, for the partners of our connected users, entries that expired."""
        others = {
            (rel, "partner_b" if role == "partner_a" else "partner_a") for rel, role in self._local
        }
        now = time.time()
        for chunk in _chunks(list(others)):
            await self._leave_all(chunk, "", now)

    async def _leave_all(self, entries, node: str, now: float) -> None:
        """The leave script for each of `entries`, in one pipeline."""
        for attempt in (1, 2):
            async with self._redis.pipeline(transaction=False) as pipe:
                for entry in entries:
                    # EVALSHA by hand and as a plain command: a Script object on a pipeline
                    # asks SCRIPT EXISTS first, and on a cluster redis-py refuses
                    # `pipe.evalsha` yet routes this by its first key (the hash tag keeps
                    # both keys in one slot).
                    pipe.execute_command(
                        "EVALSHA",
                        self._leave.sha,
                        2,
                        self.key(*entry),
                        self.channel(entry[0]),
                        node,
                        now,
                        entry[1],
                    )
                try:
                    await pipe.execute()
                    return
                except NoScriptError:
                    if attempt == 2:
                        raise
                    await self._redis.script_load(self._leave.script)  # Redis restarted

    async def close(self) -> None:
        """Drop every entry of this process now (shutdown), announcing what goes offline:
        one pipeline, however many connections the process held."""
        for timer in self._leaving.values():
            timer.cancel()
        entries = set(self._local) | set(self._leaving)
        self._local.clear()
        self._leaving.clear()
        if not entries:
            return
        now = time.time()
        try:
            for chunk in _chunks(list(entries)):
                await self._leave_all(chunk, self._node, now)
        except _ERRORS as exc:
            log.warning("presence entries left to expire", extra={"error": repr(exc)})
