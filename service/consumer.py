"""A consumer of the durable event streams (CONTRACT section 6), for other services.

    async with Consumer(redis_url, group="push", api_url=..., api_token=...) as consumer:
        await consumer.run(handler)      # async def handler(delivery: Delivery) -> None

What it promises, and how:

* **At least once.** Every event of a partition reaches `handler` at least once, as long as
  it is still in the stream or in the log behind `GET /api/events`. An entry is XACKed only
  after `handler` returned for it; an exception leaves it pending (one warning line with its
  `event_id`). Dedupe by `Delivery.event_id`: after a crash, a claim or a catch-up the same
  event comes again. `handler` is never called concurrently (one call at a time for the
  whole consumer); within a partition, stream entries come in stream order.
* **Claims.** Every `claim_idle / 2` seconds (at most 5) the consumer looks at its group's
  pending entries (XPENDING IDLE): those idle `claim_idle` seconds or more, its own failures
  and those of consumers that died, are XCLAIMed and handed to `handler` again.
* **Dead letters.** An entry delivered `max_deliveries` times or more is moved, atomically
  (one Lua script on the partition's slot), to `<prefix>stream:{<n>}:dead` with the fields
  `event` (as it was), `group`, `id` (the original entry id), `deliveries` and `error` (the
  last error this process saw for it), and XACKed; the rest flows on.
* **Its position gone, the hole filled from the API.** Before each read while the group is
  behind (at most once a `CHECK_EVERY` once it has caught up), one Lua script looks at the
  group on each partition, and the consumer catches up from
  `GET /api/events` (handing those events to the same `handler`, `entry_id` None) when:
  - `lost`: the stream or the group is gone (Redis restarted empty, a shard lost the key).
    The group is created again at `0` (whatever the stream holds now is read) and the
    consumer catches up from the lowest position it knew for the group (its last-delivered
    id and oldest pending entry, as last observed) less `margin`. A consumer that never
    observed that partition cannot know; it says so.
  - `trimmed`: entries after the group's last-delivered id were trimmed before it read them.
    The check is conservative: there is room for an id between the group's position and the
    first entry left (7.0's `max-deleted-entry-id` is not moved by trimming, so it cannot
    make this exact); a group at `0-0` has a gap when 7.0's `entries-added` exceeds the
    length, and never on 6.2. The
    script moves the group to just before the first entry in the same step, so exactly one
    consumer of the group sees the gap and catches up, over its time range plus `margin`.
  - `behind`: the group's last-delivered id went back below what this consumer observed (a
    failover promoted a replica that had not got the last entries, or an older state was
    restored): from the new position less `margin`, to now.
  - `trimmed_pending`: a pending entry was trimmed before anyone handled it.
  Each catch-up logs one warning line (partition, reason, range) and is counted, with the
  dead letters, in the Redis hash `<prefix>consumers:<group>` (fields `catchups`,
  `catchups:<reason>`, `dead_letters`), which the service's `/metrics` and `status` read.
  A catch-up runs beside the reading, retried with backoff while the API is away; it lives
  in memory only, so a consumer stopped in the middle of one leaves it undone (the log line
  names the range to replay with `--since`).
* **Batches.** A read takes up to `batch` entries; after a read that did not fill its batch
  (the group is caught up), the next waits `linger` seconds (default 0.01), so that events
  arriving one by one are read, handled and acknowledged a few at a time: two round trips
  to Redis a read, not two an event. It adds at most `linger` to an event's lag.
* **Stopping.** Cancel the task that runs `run`: the handler call in progress is abandoned
  (cancelled with it), nothing unfinished is acknowledged, and its entries stay pending
  for the next claim. `async with` closes the connections.

Only the keys are this module's own; it speaks to any Redis 6.2 or later, or a Redis Cluster
(`cluster=True`: one read per partition, since XREADGROUP cannot span slots).
"""

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import httpx
import msgspec
from redis.exceptions import ResponseError

from . import bus, schemas

log = logging.getLogger(__name__)


# Seconds between two position checks of a group that is caught up (see `_read_loop`).
CHECK_EVERY = 1.0
# How long `run` keeps cancelling its loops once it was told to stop.
STOP_TIMEOUT = 10.0


class Delivery(NamedTuple):
    """One event handed to the handler."""

    payload: bytes  # the event JSON of CONTRACT section 6, as published
    event_id: str  # "" if the payload carries none
    partition: int
    entry_id: str | None  # the stream entry; None for an event from GET /api/events
    deliveries: int  # times Redis delivered the entry (1 the first time); 0 from the API

    def event(self) -> schemas.Event:
        return schemas.event_decoder.decode(self.payload)


Handler = Callable[[Delivery], Awaitable[None]]


class PartitionLag(NamedTuple):
    partition: int
    lag: int | None  # entries not yet delivered to the group; None: unknown
    lag_exact: bool  # False: counted by hand, up to a cap (Redis before 7, or after a trim)
    pending: int  # delivered, not yet acknowledged
    last_delivered: str | None  # None: no such group on that partition (yet)


class _Head(msgspec.Struct):
    """What the consumer reads of an event: tolerant, the handler gets the whole payload."""

    event_id: str = ""
    relationship_id: str = ""
    occurred_at: str = ""


_head = msgspec.json.Decoder(_Head)

# Per partition (KEYS), the group (ARGV[1]): {status, last-delivered id, first id or gap end}.
# status: nokey, nogroup, ok, or gap, in which case the group was moved to just before the
# first entry (or to the last id the stream generated, when it is empty).
_CHECK = """
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), string.sub(id, dash + 1)
end
local function less(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  if ams ~= bms then return ams < bms end
  if #aseq ~= #bseq then return #aseq < #bseq end
  return aseq < bseq
end
local function pred(id)
  local ms, seq = parse(id)
  if seq == '0' then
    if ms == 0 then return '0-0' end
    return string.format('%.0f', ms - 1) .. '-18446744073709551615'
  end
  return string.format('%.0f', ms) .. '-' .. string.format('%.0f', tonumber(seq) - 1)
end
local function field(flat, name)
  for i = 1, #flat, 2 do
    if flat[i] == name then return flat[i + 1] end
  end
  return nil
end
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    out[i] = {'nokey', '', ''}
  else
    local last = nil
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
      if field(g, 'name') == ARGV[1] then last = field(g, 'last-delivered-id') end
    end
    if not last then
      out[i] = {'nogroup', '', ''}
    else
      local info = redis.call('XINFO', 'STREAM', key)
      local first = field(info, 'first-entry')
      local to
      if first then to = pred(first[1]) else to = field(info, 'last-generated-id') end
      local gap = less(last, to)
      if last == '0-0' then
        -- A group that reads from the start: on 7.0 a gap if anything was ever removed
        -- (entries-added above the length); 6.2 cannot tell, and says no.
        local added = field(info, 'entries-added')
        gap = gap and added ~= nil and added > field(info, 'length')
      end
      if gap then
        redis.call('XGROUP', 'SETID', key, ARGV[1], to)
        out[i] = {'gap', last, to}
      else
        out[i] = {'ok', last, first and first[1] or ''}
      end
    end
  end
end
return out
"""

# KEYS: the stream, its dead-letter stream. ARGV: group, entry id, min idle ms, max
# deliveries, error. Moves the entry if it is still pending, idle and failed often enough:
# 1 moved, 2 gone from the stream (acknowledged), 0 left alone (claimed meanwhile).
_DEAD_LETTER = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], ARGV[2], ARGV[2], 1)
if #p == 0 then return 0 end
local deliveries = p[1][4]
if deliveries < tonumber(ARGV[4]) then return 0 end
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if #entry == 0 then return 2 end
local fields = entry[1][2]
local event = ''
for i = 1, #fields, 2 do
  if fields[i] == 'event' then event = fields[i + 1] end
end
redis.call('XADD', KEYS[2], '*', 'event', event, 'group', ARGV[1], 'id', ARGV[2],
  'deliveries', deliveries, 'error', ARGV[5])
return 1
"""


def _ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(max(ms, 0) / 1000, UTC).isoformat()


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class _CatchUp(NamedTuple):
    partition: int
    reason: str
    start_ms: int
    end_ms: int | None  # None: until caught up


class Consumer:
    """A member of consumer group `group` over the `streams` partitions (see the module)."""

    def __init__(
        self,
        redis_url: str,
        *,
        group: str,
        consumer: str | None = None,
        streams: int = 16,
        prefix: str = "gestures:",
        api_url: str | None = None,
        api_token: str | Callable[[], str] | None = None,
        cluster: bool = False,
        since: datetime | None = None,
        claim_idle: float = 30.0,
        max_deliveries: int = 5,
        batch: int = 100,
        block: float = 1.0,
        linger: float = 0.01,
        margin: float = 5.0,
        lag_cap: int = 1000,
    ) -> None:
        if not group:
            raise ValueError("a consumer group needs a name")
        if block >= 2.0:
            raise ValueError("block must stay below the client's 2 s read timeout")
        self.group = group
        self.name = consumer or default_name()
        self._url = redis_url
        self._cluster = cluster
        self._streams = streams
        self._prefix = prefix
        self._api_url = api_url
        self._api_token = api_token
        self._since = since
        self._claim_idle_ms = int(claim_idle * 1000)
        self._claim_interval = max(min(claim_idle / 2, 5.0), 0.05)
        self._max_deliveries = max_deliveries
        self._batch = batch
        self._block_ms = int(block * 1000)
        self._linger = max(linger, 0.0)
        self._margin_ms = int(margin * 1000)
        self._lag_cap = lag_cap
        self._redis: bus.Client | None = None
        self._http: httpx.AsyncClient | None = None
        self._handler: Handler | None = None
        self._stopping = False  # set when `run` stops: its loops end at their next turn
        self._lock = asyncio.Lock()
        # What this process knows of the group, per partition: the highest last-delivered
        # id it observed, the same at the last claim pass, and the oldest pending entry then.
        self._known: dict[int, str] = {}
        self._known_at_pass: dict[int, str] = {}
        self._pending_min: dict[int, str | None] = {}
        self._errors: dict[tuple[int, str], str] = {}
        self._catchups: asyncio.Queue[_CatchUp] = asyncio.Queue()
        self.stats = {"handled": 0, "failed": 0, "from_api": 0, "catchups": 0, "dead_letters": 0}

    # ------------------------------------------------------------------ life

    async def __aenter__(self) -> "Consumer":
        self._redis = bus.redis_client(
            self._url, cluster=self._cluster, max_connections=self._streams + 8
        )
        self._check = self._redis.register_script(_CHECK)
        self._dead_letter = self._redis.register_script(_DEAD_LETTER)
        if self._api_url:
            self._http = httpx.AsyncClient(base_url=self._api_url, timeout=10)
        try:
            for n in range(self._streams):
                await self._create(n, "$")
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._redis is not None:
            await bus.close_client(self._redis)
            self._redis = None

    @property
    def redis(self) -> bus.Client:
        assert self._redis is not None, "use the consumer in `async with`"
        return self._redis

    def key(self, partition: int) -> str:
        return bus.stream_key(self._prefix, partition)

    def dead_key(self, partition: int) -> str:
        return f"{self.key(partition)}:dead"

    @property
    def counters_key(self) -> str:
        return f"{self._prefix}consumers:{self.group}"

    async def _create(self, partition: int, start: str) -> bool:
        """Create the group on a partition (and its stream); False if it was there."""
        try:
            await self.redis.xgroup_create(self.key(partition), self.group, start, mkstream=True)
            return True
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise

    async def run(self, handler: Handler) -> None:
        """Hand every event to `handler` until cancelled; raises only on a bug or a fatal
        error (Redis being away is retried, not fatal)."""
        self._handler = handler
        if self._since is not None:
            start = int(self._since.timestamp() * 1000)
            for n in range(self._streams):
                self._catchups.put_nowait(_CatchUp(n, "since", start + self._margin_ms, None))
        readers = (
            [[n] for n in range(self._streams)] if self._cluster else [list(range(self._streams))]
        )
        self._stopping = False
        loops = [
            asyncio.create_task(self._catch_up_loop()),
            asyncio.create_task(self._claim_loop()),
            *(asyncio.create_task(self._read_loop(partitions)) for partitions in readers),
        ]
        # Not a TaskGroup: it cancels its tasks once, and redis-py can swallow a cancel and
        # uncancel the task (one that lands as its own read timeout fires), after which a
        # loop that retries Redis errors would run on and `run` would never return. The
        # loops also stop at their next turn once `_stopping` is set.
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # the loops end only by raising: a bug or a fatal error
        finally:
            self._stopping = True
            stopper = asyncio.ensure_future(bus.cancel_until_done(loops, STOP_TIMEOUT))
            while not stopper.done():
                try:  # a second cancel of `run` must not leave its loops running
                    await asyncio.shield(stopper)
                except asyncio.CancelledError:
                    continue
            if stopper.result():
                log.error("a consumer loop did not stop", extra={"group": self.group})

    # ------------------------------------------------------------------ reading

    async def _read_loop(self, partitions: list[int]) -> None:
        by_key = {self.key(n): n for n in partitions}
        failing = False
        backoff = 0.1
        # The position check (XINFO on every partition) runs before each read while the
        # group is behind (the last read filled its batch: a trim can only overtake a group
        # that far back), and at most once a CHECK_EVERY seconds once it is caught up; a
        # NOGROUP answer checks at once.
        behind, checked = True, 0.0
        while not self._stopping:
            bus._stop_if_cancelled()
            try:
                if behind or time.monotonic() - checked >= CHECK_EVERY:
                    await self._check_position(partitions)
                    checked = time.monotonic()
                reply = await self.redis.xreadgroup(
                    self.group,
                    self.name,
                    {key: ">" for key in by_key},
                    count=self._batch,
                    block=self._block_ms,
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                behind = True
                await asyncio.sleep(0.05)  # lost between the check and the read: check again
                continue
            except bus.REDIS_ERRORS as exc:
                if not failing:
                    log.warning(
                        "reading the event streams failed; retrying",
                        extra={"group": self.group, "error": repr(exc)},
                    )
                failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, bus.MAX_BACKOFF)
                continue
            if failing:
                log.info("reading the event streams again", extra={"group": self.group})
                failing, backoff = False, 0.1
            # Each entry is acknowledged once the handler returned for it, a batch's in one
            # XACK a partition: one round trip a batch, not one an event.
            handled: dict[int, list[str]] = {}
            behind = any(len(entries) >= self._batch for _, entries in reply or ())
            for key, entries in reply or ():
                n = by_key[_s(key)]
                for entry_id, fields in entries:
                    entry = _s(entry_id)
                    if await self._deliver(n, entry, fields, 1, ack=False):
                        handled.setdefault(n, []).append(entry)
            if handled:
                await self._ack(handled)
            if not behind and reply and self._linger:
                # Caught up: let the next events gather rather than read them one by one.
                await asyncio.sleep(self._linger)

    async def _check_position(self, partitions: list[int]) -> None:
        """Run the position check on the partitions; recreate what is lost and queue the
        catch-ups that the answers call for."""
        found = await self._check(keys=[self.key(n) for n in partitions], args=[self.group])
        for n, (status, last, other) in zip(partitions, found, strict=True):
            status, last, other = _s(status), _s(last), _s(other)
            if status in ("nokey", "nogroup"):
                floor = self._floor(n)
                await self._create(n, "0")
                self._forget(n)
                if floor is None:
                    log.warning(
                        "position lost; this consumer never saw the partition and cannot "
                        "tell what was missed",
                        extra={"group": self.group, "partition": n, "reason": "lost"},
                    )
                    await self._count(n, "lost")
                else:
                    await self._request(_CatchUp(n, "lost", floor - self._margin_ms, None))
                continue
            known = self._known.get(n)
            if status == "gap":
                self._known[n] = other
                await self._request(
                    _CatchUp(
                        n, "trimmed", _ms(last) - self._margin_ms, _ms(other) + self._margin_ms
                    )
                )
            elif known is not None and _id_key(last) < _id_key(known):
                self._forget(n)
                self._known[n] = last
                if _ms(last) == 0:  # recreated empty by another consumer of the group
                    floor = self._floor_of(known, n)
                    await self._request(_CatchUp(n, "lost", floor - self._margin_ms, None))
                else:
                    await self._request(_CatchUp(n, "behind", _ms(last) - self._margin_ms, None))
            elif known is None or _id_key(last) > _id_key(known):
                self._known[n] = last

    def _floor(self, n: int) -> int | None:
        known = self._known_at_pass.get(n) or self._known.get(n)
        if known is None:
            return None
        return self._floor_of(known, n)

    def _floor_of(self, known: str, n: int) -> int:
        """The lowest position the group may still have needed: the known last-delivered id
        at the last claim pass (what was delivered after it may have failed since), and the
        oldest entry pending then."""
        marks = [_ms(known)]
        if (pending := self._pending_min.get(n)) is not None:
            marks.append(_ms(pending))
        if (at_pass := self._known_at_pass.get(n)) is not None:
            marks.append(_ms(at_pass))
        return min(marks)

    def _forget(self, n: int) -> None:
        self._known.pop(n, None)
        self._known_at_pass.pop(n, None)
        self._pending_min.pop(n, None)

    # ------------------------------------------------------------------ handing over

    async def _ack(self, handled: dict[int, list[str]]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for n, ids in handled.items():
                    pipe.xack(self.key(n), self.group, *ids)
                await pipe.execute()
        except bus.REDIS_ERRORS as exc:
            # Handled but not acknowledged: they come again, duplicates, not losses.
            log.warning(
                "could not acknowledge entries",
                extra={"count": sum(map(len, handled.values())), "error": repr(exc)},
            )

    async def _deliver(
        self, n: int, entry_id: str, fields: dict, deliveries: int, *, ack: bool = True
    ) -> bool:
        """Hand an entry over; acknowledge it once handled (`ack`), or say it was handled so
        that the caller acknowledges it with others."""
        if _id_key(entry_id) > _id_key(self._known.get(n, "0-0")):
            self._known[n] = entry_id
        payload = fields.get(b"event")
        if payload is None:
            await self._move_to_dead(n, entry_id, 0, "the entry has no event field")
            return False
        try:
            head = _head.decode(payload)
        except schemas.DECODE_ERRORS:
            head = _Head()
        delivery = Delivery(payload, head.event_id, n, entry_id, deliveries)
        if await self._hand(delivery):
            self._errors.pop((n, entry_id), None)
            if not ack:
                return True
            try:
                await self.redis.xack(self.key(n), self.group, entry_id)
            except bus.REDIS_ERRORS as exc:
                # Handled but not acknowledged: it comes again, a duplicate, not a loss.
                log.warning(
                    "could not acknowledge an entry",
                    extra={"partition": n, "entry_id": entry_id, "error": repr(exc)},
                )
        return False

    async def _hand(self, delivery: Delivery) -> bool:
        """Call the handler; True if it returned. Its failure is logged in one line."""
        assert self._handler is not None
        async with self._lock:
            try:
                await self._handler(delivery)
            except Exception as exc:
                self.stats["failed"] += 1
                if delivery.entry_id is not None:
                    if len(self._errors) > 10_000:
                        self._errors.pop(next(iter(self._errors)))
                    self._errors[(delivery.partition, delivery.entry_id)] = repr(exc)[:500]
                log.warning(
                    "handler failed; the event stays pending",
                    extra={
                        "group": self.group,
                        "event_id": delivery.event_id,
                        "partition": delivery.partition,
                        "entry_id": delivery.entry_id,
                        "deliveries": delivery.deliveries,
                        "error": repr(exc)[:200],
                    },
                )
                return False
        self.stats["handled"] += 1
        return True

    # ------------------------------------------------------------------ claims, dead letters

    async def _claim_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._claim_interval)
            for n in range(self._streams):
                try:
                    await self.claim(n)
                except bus.REDIS_ERRORS as exc:
                    log.debug("claim pass failed", extra={"partition": n, "error": repr(exc)})

    async def claim(self, n: int) -> None:
        """One claim pass over partition `n` (the loop runs it; tests may call it)."""
        key = self.key(n)
        if (known := self._known.get(n)) is not None:
            self._known_at_pass[n] = known
        summary = await self.redis.xpending(key, self.group)
        self._pending_min[n] = _s(summary["min"]) if summary["pending"] else None
        if not summary["pending"]:
            return
        rows = await self.redis.xpending_range(
            key, self.group, min="-", max="+", count=self._batch, idle=self._claim_idle_ms
        )
        retry: dict[str, int] = {}
        for row in rows:
            entry_id, times = _s(row["message_id"]), int(row["times_delivered"])
            if times >= self._max_deliveries:
                error = self._errors.pop((n, entry_id), "unknown (it failed in another consumer)")
                await self._move_to_dead(n, entry_id, self._claim_idle_ms, error)
            else:
                retry[entry_id] = times
        if not retry:
            return
        claimed = await self.redis.xclaim(
            key, self.group, self.name, self._claim_idle_ms, list(retry)
        )
        got = {}
        for entry_id, fields in claimed:
            if fields is not None:  # 6.2 answers a trimmed entry with nil fields
                got[_s(entry_id)] = fields
        for entry_id in retry.keys() - got.keys():
            # Not claimed: another consumer took it first, or it was trimmed unhandled.
            if not await self.redis.xrange(key, entry_id, entry_id):
                await self.redis.xack(key, self.group, entry_id)
                ms = _ms(entry_id)
                await self._request(
                    _CatchUp(n, "trimmed_pending", ms - self._margin_ms, ms + self._margin_ms)
                )
        for entry_id in sorted(got, key=_id_key):
            await self._deliver(n, entry_id, got[entry_id], retry[entry_id] + 1)

    async def _move_to_dead(self, n: int, entry_id: str, idle_ms: int, error: str) -> None:
        moved = await self._dead_letter(
            keys=[self.key(n), self.dead_key(n)],
            args=[
                self.group,
                entry_id,
                idle_ms,
                0 if idle_ms == 0 else self._max_deliveries,
                error,
            ],
        )
        if moved == 1:
            self.stats["dead_letters"] += 1
            log.warning(
                "entry moved to the dead-letter stream",
                extra={"group": self.group, "partition": n, "entry_id": entry_id, "error": error},
            )
            await self._hincr({"dead_letters": 1})

    async def _dead_letter_event(self, delivery: Delivery, error: str) -> None:
        """An event from the API that the handler kept refusing: to the dead letters too."""
        fields = {"event": delivery.payload, "group": self.group, "id": "", "deliveries": 0}
        fields["error"] = error
        await self.redis.xadd(self.dead_key(delivery.partition), fields)
        self.stats["dead_letters"] += 1
        await self._hincr({"dead_letters": 1})

    async def _hincr(self, fields: dict[str, int]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, by in fields.items():
                    pipe.hincrby(self.counters_key, name, by)
                await pipe.execute()
        except bus.REDIS_ERRORS as exc:
            log.warning("could not record a count", extra={"error": repr(exc)})

    # ------------------------------------------------------------------ catching up

    async def _count(self, n: int, reason: str) -> None:
        self.stats["catchups"] += 1
        await self._hincr({"catchups": 1, f"catchups:{reason}": 1})

    async def _request(self, catch_up: _CatchUp) -> None:
        until = "caught up" if catch_up.end_ms is None else _iso(catch_up.end_ms)
        log.warning(
            "position lost; catching up from the event log",
            extra={
                "group": self.group,
                "partition": catch_up.partition,
                "reason": catch_up.reason,
                "since": _iso(catch_up.start_ms),
                "until": until,
            },
        )
        await self._count(catch_up.partition, catch_up.reason)
        self._catchups.put_nowait(catch_up)

    async def _catch_up_loop(self) -> None:
        while not self._stopping:
            wanted = [await self._catchups.get()]
            while not self._catchups.empty():
                wanted.append(self._catchups.get_nowait())
            if self._http is None:
                log.error(
                    "cannot catch up: no API URL; replay the range by hand",
                    extra={
                        "group": self.group,
                        "partitions": sorted({c.partition for c in wanted}),
                    },
                )
                continue
            backoff = 0.2
            while not self._stopping:
                try:
                    await self._catch_up(wanted)
                    break
                except (httpx.HTTPError, ValueError) as exc:
                    log.warning(
                        "catching up from the event log failed; retrying",
                        extra={"group": self.group, "error": repr(exc)[:200]},
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)

    async def _catch_up(self, wanted: list[_CatchUp]) -> None:
        """Page through GET /api/events from the earliest start, handing the events of the
        wanted partitions to the handler, until caught up (or past every range's end)."""
        assert self._http is not None
        partitions = {c.partition for c in wanted}
        start = min(c.start_ms for c in wanted)
        ends = [c.end_ms for c in wanted]
        end = None if None in ends else max(e for e in ends if e is not None) + self._margin_ms
        params: dict[str, Any] = {"since": _iso(start), "limit": 500}
        handed = 0
        while True:
            r = await self._http.get("/api/events", params=params, headers=self._auth())
            if r.status_code == 410 and "since" in params:
                log.error(
                    "events before the log's retention are gone; catching up from its oldest",
                    extra={"group": self.group, "detail": r.text[:200]},
                )
                params = {"limit": 500}
                continue
            r.raise_for_status()
            page = msgspec.json.decode(r.content)
            events, cursor = page["events"], page["next"]
            last_at = None
            for event in events:
                payload = msgspec.json.encode(event)
                rid, event_id = event.get("relationship_id"), event.get("event_id", "")
                last_at = event.get("occurred_at") or last_at
                if not rid:
                    continue
                n = uuid.UUID(rid).int % self._streams
                if n not in partitions:
                    continue
                await self._hand_from_api(Delivery(payload, event_id, n, None, 0))
                handed += 1
            if not events:
                break
            if end is not None and last_at is not None:
                if datetime.fromisoformat(last_at).timestamp() * 1000 > end:
                    break
            params = {"after": cursor, "limit": 500}
        self.stats["from_api"] += handed
        log.info(
            "caught up from the event log",
            extra={"group": self.group, "partitions": sorted(partitions), "events": handed},
        )

    def _auth(self) -> dict[str, str]:
        """A service token: a fixed one, or a fresh one from a callable (a long-running
        consumer outlives any one token)."""
        token = self._api_token() if callable(self._api_token) else self._api_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _hand_from_api(self, delivery: Delivery) -> None:
        """An event from the API cannot stay pending: retried here, then dead-lettered."""
        for attempt in range(1, self._max_deliveries + 1):
            if await self._hand(delivery._replace(deliveries=attempt)):
                return
            if attempt < self._max_deliveries:
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
        try:
            await self._dead_letter_event(delivery, "handler failed on the event from the API")
        except bus.REDIS_ERRORS as exc:
            log.error(
                "could not dead-letter an event from the API",
                extra={"event_id": delivery.event_id, "error": repr(exc)},
            )

    # ------------------------------------------------------------------ lag

    async def lag(self) -> list[PartitionLag]:
        """The group's lag and pending entries on each partition. Redis 7 reports the lag;
        where it cannot (6.2, or after a trim) it is counted with XRANGE up to `lag_cap`."""
        report = await bus.stream_report(self.redis, self._prefix, self._streams)
        found = []
        for p in report:
            mine = next((g for g in p.groups if g.name == self.group), None)
            if mine is None:
                found.append(PartitionLag(p.partition, None, False, 0, None))
                continue
            lag, exact = mine.lag, True
            if lag is None:
                exact = False
                entries = await self.redis.xrange(
                    self.key(p.partition), f"({mine.last_delivered}", "+", count=self._lag_cap
                )
                lag = len(entries)
            found.append(PartitionLag(p.partition, lag, exact, mine.pending, mine.last_delivered))
        return found


async def counts(redis: bus.Client, prefix: str, group: str) -> dict[str, int]:
    """What the consumers of `group` recorded: catch-ups (in all and by reason) and dead
    letters, from `<prefix>consumers:<group>`."""
    found = await redis.hgetall(f"{prefix}consumers:{group}")
    return {_s(k): int(v) for k, v in found.items()}
