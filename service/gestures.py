"""The rules of the domain. Both edges, HTTP and WebSocket, call this module; nothing else
decides who may do what.

* Roles: a user acts only as the partner whose id is their token's `sub`; a gesture of a
  relationship the caller is not part of is indistinguishable from one that does not exist.
* Sending: rate limited per sender (a sliding window in Redis, failing open when Redis is
  away, since the gesture still commits); deduplicated by `Idempotency-Key` per sender and
  relationship for `idempotency_hours`; committed in groups with other concurrent sends.
* Acknowledging: only by the recipient, at most once; the acknowledgement, the response
  gesture and their events are one transaction.
* Every committed change writes its event to the outbox in the same transaction; the
  `Publisher` puts it on Redis after commit.
* Access ends with the relationship: `PUT /api/relationships/{id}` is answered only after its
  `RelationshipChanged` went out on the control channel (or, Redis away, sits in the
  outbox for the relay). Every process drops its cached row on receipt, and `may_stay`
  says which of its sockets must close. Redis delivers in order, so every event published
  after the answer reaches a process after the change.
* Suggestions: rate limited per sender (the same sliding window, its own key); remembered
  in PostgreSQL for an hour, so a gesture sent with the `suggestion_id` by the same sender
  in the same relationship is stored with `ai_generated` and the context the service
  recorded, never JSON from the client.
* Statistics: computed in SQL over the relationship's index, never the whole table.
"""

import asyncio
import base64
import binascii
import functools
import json
import logging
import math
import re
import time
import uuid
import zoneinfo
from datetime import UTC, datetime, timedelta, tzinfo

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from . import errors, metrics, resp, store, suggestions
from .auth import Caller, role_of
from .bus import REDIS_ERRORS, SEND_TIMEOUT, Publisher, channel_for, control_channel
from .coalesce import Coalescer
from .config import Settings
from .presence import Presence
from .schemas import (
    AcknowledgeResult,
    EventPage,
    Gesture,
    GestureAcknowledged,
    GestureDelivered,
    GestureList,
    GestureSent,
    PerPartnerCounts,
    PerPartnerInt,
    PerPartnerSeconds,
    RecentPage,
    Relationship,
    RelationshipChanged,
    SendResult,
    Stats,
    Suggestion,
    TypeCounts,
    encoder,
    other_role,
    valid_idempotency_key,
)

log = logging.getLogger(__name__)

# Delivery marks are gathered for up to MARK_WINDOW seconds (or until MARK_BATCH are queued)
# and written in one statement: PostgreSQL's cost of a mark is per statement and commit far
# more than per row (docs/performance.md), and nobody watches a receipt to the millisecond.
MARK_WINDOW = 0.02
MARK_BATCH = 64

# Sliding window: at most ARGV[3] entries in the last ARGV[2] ms. Returns 0 when admitted,
# else the milliseconds until the oldest entry leaves the window.
_RATE_LIMIT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""


class _SendItem:
    __slots__ = ("fingerprint", "key", "new", "online")

    def __init__(
        self, new: store.NewGesture, key: str | None, fingerprint: bytes, online: bool | None
    ) -> None:
        self.new = new
        self.key = key
        self.fingerprint = fingerprint
        self.online = online


class _Window:
    """One request to count in a rate-limit window. Hashed by identity: each is its own key
    in the batch that counts it."""

    __slots__ = ("args", "key", "online")

    def __init__(self, key: str, args: tuple, online: str | None) -> None:
        self.key = key
        self.args = args
        self.online = online


class _Sent:
    """The outcome of one send inside a group commit."""

    __slots__ = ("fresh", "gesture", "outbox")

    def __init__(self, gesture: Gesture, fresh: bool, outbox: list[store.OutboxRow]) -> None:
        self.gesture = gesture
        self.fresh = fresh
        self.outbox = outbox


def _counted(send):
    """Count every send by its outcome (metrics.SENDS), whichever edge it came through."""

    @functools.wraps(send)
    async def counted(*args, **kwargs):
        try:
            result = await send(*args, **kwargs)
        except errors.ServiceError as exc:
            metrics.SEND_OUTCOME.get(exc.code, metrics.SEND_OUTCOME["invalid"]).inc()
            raise
        metrics.SEND_OUTCOME["ok" if result[1] else "replay"].inc()
        return result

    return counted


class Gestures:
    def __init__(
        self,
        settings: Settings,
        pool: store.Pool,
        redis: aioredis.Redis,
        publisher: Publisher,
        presence: Presence,
        relationship_ttl: float = 5.0,
        suggester: suggestions.Suggester | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self._sharded = isinstance(redis, aioredis.RedisCluster)
        self._publisher = publisher
        self._presence = presence
        self._suggester = suggester or suggestions.Suggester()
        self._timeout = settings.db_timeout
        self._rate_limit = redis.register_script(_RATE_LIMIT)
        # Every send's rate limit goes through here first: under load, the linger gathers
        # sends into batches that the group commit and the publisher then keep.
        self._windows: Coalescer[_Window, list] = Coalescer(
            self._count_windows, linger=settings.send_linger, busy=settings.send_linger_gaps
        )
        self._relationships: dict[uuid.UUID, tuple[float, Relationship]] = {}
        self._relationship_ttl = relationship_ttl
        self._relationship_reads: Coalescer[uuid.UUID, Relationship | None] = Coalescer(
            self._read_relationships
        )
        # Relationship changes applied so far: a row read while one arrived is not cached
        # (it may predate the change), and a socket admitted meanwhile is checked again.
        self.changes = 0
        self._sends: store.GroupCommit[_SendItem, _Sent | errors.ServiceError] = store.GroupCommit(
            pool,
            self._commit_sends,
            after_commit=self._publish_sends,
            timeout=self._timeout,
        )
        self._deliveries: dict[uuid.UUID, Gesture] = {}
        self._deliveries_ready = asyncio.Event()

    async def run(self) -> None:
        """The background work of the rules: group commits of sends and delivery marks."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._sends.run())
            group.create_task(self._delivery_loop())

    @property
    def _node(self) -> int:
        """The node id this process's event rows carry (`Publisher.register`)."""
        return self._publisher.node

    def channel(self, relationship_id: uuid.UUID) -> str:
        return channel_for(self._settings.channel_prefix, relationship_id)

    # ------------------------------------------------------------------ relationships

    async def relationship(self, relationship_id: uuid.UUID) -> Relationship | None:
        """The relationship, cached for a few seconds once both partners are set (never
        before, so a row another system just inserted or filled in is seen at once)."""
        hit = self._relationships.get(relationship_id)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return (await self.relationships([relationship_id]))[relationship_id]

    async def relationships(
        self, relationship_ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, Relationship | None]:
        """Many relationships at once: cached ones from the cache, the rest read with every
        other caller's of the same moment in one query (`_read_relationships`), cached by
        the rule of `relationship`. The entries of couples that sent together expire
        together: a send each read alone was a burst of queries that held up the sends
        queued behind them in the pool."""
        now = time.monotonic()
        found: dict[uuid.UUID, Relationship | None] = {}
        missing = []
        for rid in relationship_ids:
            hit = self._relationships.get(rid)
            if hit is not None and hit[0] > now:
                found[rid] = hit[1]
            else:
                missing.append(rid)
        if missing:
            changes = self.changes
            # A key's query starts after this: a batch in flight takes no new key.
            futures = [self._relationship_reads.future(rid) for rid in missing]
            rows = await asyncio.gather(*futures)
            cache = self._relationship_ttl > 0 and changes == self.changes
            if cache and len(self._relationships) > 100_000:
                self._relationships.clear()
            for rid, row in zip(missing, rows, strict=True):
                found[rid] = row
                if cache and row is not None and row.partner_a_id and row.partner_b_id:
                    self._relationships[rid] = (now + self._relationship_ttl, row)
        return found

    async def _read_relationships(
        self, relationship_ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, Relationship | None]:
        async with store.connection(self._pool, self._timeout) as conn:
            read = await store.get_relationships(conn, relationship_ids)
        return {rid: read.get(rid) for rid in relationship_ids}

    async def role_in(
        self, caller: Caller, relationship_id: uuid.UUID, named: str | None, field: str
    ) -> str:
        """The caller's role, `named` coming from the request's `field`."""
        return role_of(caller, await self.relationship(relationship_id), named, field)

    async def put_relationship(
        self, caller: Caller, relationship_id: uuid.UUID, a: str | None, b: str | None
    ) -> Relationship:
        if not caller.is_service:
            raise errors.Forbidden("only a service token may create or change relationships")
        if a is not None and a == b:
            raise errors.Invalid("partner_b_id: must differ from partner_a_id")
        async with store.transaction(self._pool, self._timeout) as conn:
            found = await store.put_relationship(conn, relationship_id, a, b)
            change = encoder.encode(RelationshipChanged(relationship=found))
            rows = await store.add_events(
                conn, [(control_channel(self._settings.presence_prefix), change, None)], self._node
            )
        self.relationship_changed(found)
        # Answered only once Redis took it: an event published after this answer reaches
        # every subscriber after the change. Redis away: the commit stands, the relay
        # publishes the change later, and each process re-checks its sockets when its
        # subscription comes back (`reload_relationships`).
        if not await self._publisher.publish_now(rows):
            log.warning(
                "relationship change not published yet; the outbox relay will",
                extra={"relationship_id": str(relationship_id)},
            )
        return found

    def relationship_changed(self, relationship: Relationship) -> None:
        """A relationship's row changed (here or on another process): forget the cached row
        now, not after its TTL; the next request reads the new one."""
        self._relationships.pop(relationship.id, None)
        self.changes += 1

    async def reload_relationships(
        self, relationship_ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, Relationship | None]:
        """After a broken subscription, changes may have been missed: forget every cached
        row, and read these relationships afresh."""
        self._relationships.clear()
        self.changes += 1
        if not relationship_ids:
            return {}
        async with store.connection(self._pool, self._timeout) as conn:
            found = await store.get_relationships(conn, relationship_ids)
        return {rid: found.get(rid) for rid in relationship_ids}

    @staticmethod
    def may_stay(relationship: Relationship | None, user_id: str | None, role: str) -> bool:
        """Whether a socket opened by `user_id` (None: a service token, which acts for a
        role and stays) as `role` may stay open in `relationship` as it now is."""
        if user_id is None:
            return True
        if relationship is None:
            return False
        held = relationship.partner_a_id if role == "partner_a" else relationship.partner_b_id
        return held == user_id

    # ------------------------------------------------------------------ sending

    @_counted
    async def send(
        self,
        caller: Caller,
        relationship_id: uuid.UUID,
        gesture_type: str,
        named: str | None,
        message: str | None,
        ai_generated: bool,
        idempotency_key: str | None,
        suggestion_id: uuid.UUID | None = None,
    ) -> tuple[SendResult, bool]:
        """Send a gesture; returns the result and whether it is new (False for a replay).

        `recipient_online` costs one command in the rate limit's round trip to Redis; the
        `gesture.sent` event carries it too, for services that notify an offline recipient.
        A `suggestion_id` of this sender's in this relationship, under an hour old, stores
        the gesture as AI-generated with the suggestion's context; any other is Invalid.
        """
        role = role_of(caller, await self.relationship(relationship_id), named)
        if idempotency_key is not None and not valid_idempotency_key(idempotency_key):
            raise errors.Invalid("Idempotency-Key: 1 to 200 printable ASCII characters, no space")
        context = None
        if suggestion_id is not None:
            async with store.connection(self._pool, self._timeout) as conn:
                context = await store.find_suggestion(conn, suggestion_id, relationship_id, role)
            ai_generated = True
            if context is None:
                # A retry of a send that went through keeps its key for the idempotency
                # window, longer than the suggestion's hour: it is answered, not refused.
                replay = await self._replay(
                    store.NewGesture(relationship_id, gesture_type, role, message, True),
                    idempotency_key,
                    store.fingerprint(gesture_type, message, True, suggestion_id),
                )
                if replay is None:
                    raise errors.Invalid(
                        "suggestion_id: unknown, expired (after an hour) or not yours"
                    )
                # Counted like any retry (docs/api.md); answered even past the limit.
                try:
                    online = await self._admit(relationship_id, role, other_role(role))
                except errors.RateLimited:
                    online = False
                return SendResult(gesture=replay, recipient_online=bool(online)), False
        new = store.NewGesture(relationship_id, gesture_type, role, message, ai_generated, context)
        fingerprint = b""
        if idempotency_key is not None:
            fingerprint = store.fingerprint(gesture_type, message, ai_generated, suggestion_id)
        try:
            online = await self._admit(relationship_id, role, other_role(role))
        except errors.RateLimited:
            # A retry of a send that went through is answered, not limited.
            replay = await self._replay(new, idempotency_key, fingerprint)
            if replay is None:
                raise
            return SendResult(gesture=replay, recipient_online=False), False
        outcome = await self._sends.submit(_SendItem(new, idempotency_key, fingerprint, online))
        if isinstance(outcome, errors.ServiceError):
            raise outcome
        return SendResult(gesture=outcome.gesture, recipient_online=bool(online)), outcome.fresh

    async def _admit(
        self, relationship_id: uuid.UUID, role: str, recipient: str | None
    ) -> bool | None:
        """Count one send against the sender's limit (RateLimited past it); and whether
        `recipient` is online, in the same round trip. Redis away: admitted, None (unknown)."""
        limit = self._settings.rate_limit_per_minute
        # Hash-tagged by relationship: on a cluster the key lives in the relationship's slot,
        # beside its presence keys, so this pipeline goes to one shard.
        key = f"{self._settings.channel_prefix}rate:{{{relationship_id}}}:{role}"

        online = None if recipient is None else self._presence.key(relationship_id, recipient)
        results = await self._window(key, limit, "gestures", online)
        if results is None or recipient is None:
            return None
        return int(results[1]) > 0

    async def _window(
        self, key: str, limit: int, what: str, online: str | None = None
    ) -> list | None:
        """Count one request in the sliding window `key` (RateLimited past `limit` a minute),
        and read the size of the presence set `online` in the same round trip; the replies,
        None when Redis is away (then the request is admitted)."""
        call = _Window(key, (int(time.time() * 1000), 60_000, limit, uuid.uuid4().hex), online)
        try:
            results = await self._windows.get(call)
        except REDIS_ERRORS as exc:
            log.warning("rate limit unavailable, admitting", extra={"error": repr(exc)})
            return None
        wait_ms = int(results[0])
        if wait_ms:
            raise errors.RateLimited(
                f"at most {limit} {what} a minute", retry_after=math.ceil(wait_ms / 1000)
            )
        return results

    async def _count_windows(self, calls: list["_Window"]) -> dict["_Window", list]:
        """The windows of every request that came in this turn of the loop (or while the
        previous batch was out), in one batch: one round trip to Redis, not one a send."""
        count = self._count_windows_cluster if self._sharded else self._count_windows_raw
        try:
            return await count(calls)
        except NoScriptError:
            await self._redis.script_load(_RATE_LIMIT)  # Redis restarted: once more
        return await count(calls)

    async def _count_windows_cluster(self, calls: list["_Window"]) -> dict["_Window", list]:
        """`_count_windows` on a cluster: redis-py's pipeline sends each command to its
        slot's master (one shard: the keys are hash-tagged by relationship)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            spans = []
            for call in calls:
                start = len(pipe)
                # EVALSHA by hand: a pipeline holding a Script object asks SCRIPT EXISTS
                # before every execute, a round trip per batch. And as a plain command:
                # on a cluster redis-py refuses `pipe.evalsha`, yet routes this by key.
                pipe.execute_command("EVALSHA", self._rate_limit.sha, 1, call.key, *call.args)
                if call.online is not None:
                    pipe.scard(call.online)
                spans.append((start, len(pipe)))
            results = await pipe.execute()
        return {call: results[a:b] for call, (a, b) in zip(calls, spans, strict=True)}

    async def _count_windows_raw(self, calls: list["_Window"]) -> dict["_Window", list]:
        """`_count_windows` on a single Redis: the same commands, encoded by hand
        (`service.resp`)."""
        sha = self._rate_limit.sha.encode()
        commands = []
        spans = []
        for call in calls:
            start = len(commands)
            now, window, limit, member = call.args
            commands.append(
                resp.command(
                    b"EVALSHA",
                    sha,
                    b"1",
                    call.key.encode(),
                    b"%d" % now,
                    b"%d" % window,
                    b"%d" % limit,
                    member.encode(),
                )
            )
            if call.online is not None:
                commands.append(resp.command(b"SCARD", call.online.encode()))
            spans.append((start, len(commands)))
        results = await resp.execute(self._redis, commands, SEND_TIMEOUT)
        return {call: results[a:b] for call, (a, b) in zip(calls, spans, strict=True)}

    async def _replay(
        self, new: store.NewGesture, key: str | None, fingerprint: bytes
    ) -> Gesture | None:
        if key is None:
            return None
        async with store.connection(self._pool, self._timeout) as conn:
            held = await store.find_idempotency_key(
                conn, new.relationship_id, new.sent_by, key, self._settings.idempotency_hours
            )
            if held is None or held[1] != fingerprint:
                return None
            return await store.get_gesture(conn, held[0])

    async def _commit_sends(
        self, conn: store.Connection, items: list[_SendItem]
    ) -> list[_Sent | errors.ServiceError]:
        async with self._publisher.writing():
            if all(item.key is None for item in items):
                # The common case: gestures and events in one statement, one round trip.
                return await self._insert(conn, items)  # type: ignore[return-value]
            async with store.atomic(conn):
                return await self._commit_keyed(conn, items)

    async def _commit_keyed(
        self, conn: store.Connection, items: list[_SendItem]
    ) -> list[_Sent | errors.ServiceError]:
        outcomes: list[_Sent | errors.ServiceError | None] = [None] * len(items)
        replays: dict[int, uuid.UUID] = {}
        fresh: list[int] = []
        for i, item in enumerate(items):
            if item.key is not None:
                held = await store.claim_idempotency_key(
                    conn, item.new, item.key, item.fingerprint, self._settings.idempotency_hours
                )
                if held is not None:
                    if held[1] != item.fingerprint:
                        outcomes[i] = errors.Invalid(
                            "Idempotency-Key: already used for a different gesture"
                        )
                    else:
                        replays[i] = held[0]
                    continue
            fresh.append(i)
        if fresh:
            inserted = await self._insert(conn, [items[i] for i in fresh])
            for i, sent in zip(fresh, inserted, strict=True):
                outcomes[i] = sent
        if replays:
            found = await store.get_gestures(conn, list(replays.values()))
            for i, gesture_id in replays.items():
                outcomes[i] = _Sent(found[gesture_id], False, [])
        return outcomes  # type: ignore[return-value]

    async def _insert(self, conn: store.Connection, items: list[_SendItem]) -> list[_Sent]:
        gestures = [item.new.gesture() for item in items]
        events = [self._sent_event(g, item.online) for g, item in zip(gestures, items, strict=True)]
        rows = await store.insert_sent(conn, [item.new for item in items], events, self._node)
        return [_Sent(g, True, [row]) for g, row in zip(gestures, rows, strict=True)]

    def _publish_sends(self, outcomes: list[_Sent | errors.ServiceError]) -> None:
        self._publisher.publish(row for o in outcomes if isinstance(o, _Sent) for row in o.outbox)

    def _sent_event(self, gesture: Gesture, online: bool | None) -> store.EventRow:
        return self._event_row(GestureSent, gesture, gesture.sent_at, recipient_online=online)

    def _event_row(self, kind: type, gesture: Gesture, at, **extra) -> store.EventRow:
        """(channel, payload, relationship) of an event announcing `gesture` after a change
        at `at`."""
        event = kind(
            event_id=uuid.uuid4(),
            occurred_at=at,
            relationship_id=gesture.relationship_id,
            gesture=gesture,
            **extra,
        )
        rel = gesture.relationship_id
        return self.channel(rel), encoder.encode(event), rel

    # ------------------------------------------------------------------ suggestions

    async def suggest(
        self,
        caller: Caller,
        relationship_id: uuid.UUID,
        named: str | None,
        gesture_type: str,
        timezone: str | None = None,
    ) -> Suggestion:
        """A note for the gesture the caller is about to send, drawn from the couple's
        history; remembered for an hour under its `suggestion_id`. Writes no gesture."""
        role = role_of(caller, await self.relationship(relationship_id), named)
        zone = _zone(timezone)
        # {relationship_id}: a hash tag, so a Redis Cluster keeps a couple's keys together.
        key = f"{self._settings.channel_prefix}suggestion-rate:{{{relationship_id}}}:{role}"
        await self._window(key, self._settings.suggestion_rate_limit_per_minute, "suggestions")
        async with store.connection(self._pool, self._timeout) as conn:
            history = await store.history(conn, relationship_id, role)
        context = suggestions.context_from(history, gesture_type, zone)
        suggestion_id = uuid.uuid4()
        composed = await self._suggester.suggest(context, suggestion_id.int)
        recorded = json.dumps(
            {
                "suggestion_id": str(suggestion_id),
                "source": composed.source,
                "context_used": composed.context_used,
            }
        )
        async with store.connection(self._pool, self._timeout) as conn:
            await store.insert_suggestion(
                conn, suggestion_id, relationship_id, role, gesture_type, recorded
            )
        return Suggestion(
            message=composed.message,
            context_used=composed.context_used,
            suggestion_id=suggestion_id,
        )

    # ------------------------------------------------------------------ statistics

    async def stats(self, caller: Caller, relationship_id: uuid.UUID, days: int) -> Stats:
        relationship = await self.relationship(relationship_id)
        if not caller.is_service or relationship is None:
            role_of(caller, relationship, None)
        async with store.connection(self._pool, self._timeout) as conn:
            since, per = await store.stats(conn, relationship_id, days)
            streak = await store.streak_days(conn, relationship_id)
        empty = store.SenderStats({}, 0, 0, 0, None)
        a, b = per.get("partner_a", empty), per.get("partner_b", empty)

        def counts(s: store.SenderStats) -> TypeCounts:
            return TypeCounts(**s.by_type, total=s.total)

        return Stats(
            relationship_id=relationship_id,
            days=days,
            since=since,
            sent=PerPartnerCounts(partner_a=counts(a), partner_b=counts(b)),
            acknowledged=PerPartnerInt(partner_a=a.acknowledged, partner_b=b.acknowledged),
            # A send-back answers the other partner's gesture.
            sent_back=PerPartnerInt(partner_a=b.answered, partner_b=a.answered),
            median_seconds_to_acknowledge=PerPartnerSeconds(partner_a=a.median, partner_b=b.median),
            streak_days=streak,
        )

    # ------------------------------------------------------------------ acknowledging

    async def visible_gesture(
        self, caller: Caller, gesture_id: uuid.UUID
    ) -> tuple[Gesture, str | None]:
        """The gesture and the caller's role in its relationship (None for a service);
        NotFound when it does not exist or belongs to a relationship not the caller's."""
        async with store.connection(self._pool, self._timeout) as conn:
            gesture = await store.get_gesture(conn, gesture_id)
        if gesture is None:
            raise errors.NotFound("gesture not found")
        if caller.is_service:
            return gesture, None
        relationship = await self.relationship(gesture.relationship_id)
        try:
            return gesture, role_of(caller, relationship, None)
        except errors.Forbidden:
            raise errors.NotFound("gesture not found") from None

    async def get(self, caller: Caller, gesture_id: uuid.UUID) -> Gesture:
        return (await self.visible_gesture(caller, gesture_id))[0]

    async def acknowledge(
        self,
        caller: Caller,
        gesture_id: uuid.UUID,
        named: str | None,
        send_back: bool,
        send_back_type: str | None,
        send_back_message: str | None,
        within: uuid.UUID | None = None,
    ) -> AcknowledgeResult:
        """Acknowledge as the recipient, at most once. `within` confines it to one
        relationship (a socket's): a gesture of another is not found there."""
        original, role = await self.visible_gesture(caller, gesture_id)
        if within is not None and original.relationship_id != within:
            raise errors.NotFound("gesture not found")
        if role is None:  # a service acts as the partner it names
            if named is None:
                raise errors.Invalid("acknowledged_by: a service token must name the partner")
            role = named
        elif named is not None and named != role:
            raise errors.Forbidden(f"acknowledged_by: you are {role}, not {named}")
        if role == original.sent_by:
            raise errors.Forbidden("only the recipient may acknowledge a gesture")
        if original.acknowledged_at is not None:
            return AcknowledgeResult(acknowledged=False, response_gesture=None)
        online = None
        if send_back:
            online = await self._admit(original.relationship_id, role, original.sent_by)
        async with self._publisher.writing():
            async with store.transaction(self._pool, self._timeout) as conn:
                acknowledged = await store.acknowledge(conn, gesture_id, role)
                if acknowledged is None:
                    return AcknowledgeResult(acknowledged=False, response_gesture=None)
                response = None
                events = []
                if send_back:
                    new = store.NewGesture(
                        original.relationship_id,
                        send_back_type or original.gesture_type,
                        role,
                        send_back_message,
                        False,
                    )
                    [response] = await store.insert_gestures(conn, [new])
                    acknowledged = await store.link_response(conn, gesture_id, response.id)
                events.append(
                    self._event_row(
                        GestureAcknowledged,
                        acknowledged,
                        acknowledged.acknowledged_at,
                        response_gesture=response,
                    )
                )
                if response is not None:
                    events.append(self._sent_event(response, online))
                rows = await store.add_events(conn, events, self._node)
        self._publisher.publish(rows)
        return AcknowledgeResult(acknowledged=True, response_gesture=response)

    # ------------------------------------------------------------------ reading

    async def pending(
        self, caller: Caller, relationship_id: uuid.UUID, named: str | None
    ) -> GestureList:
        role = role_of(caller, await self.relationship(relationship_id), named, "partner_id")
        gestures = await self.pending_for(relationship_id, role)
        return GestureList(gestures=gestures, count=len(gestures))

    async def pending_for(
        self, relationship_id: uuid.UUID, role: str, limit: int | None = None
    ) -> list[Gesture]:
        """What waits for `role`, oldest first: all of it, or the first `limit`."""
        async with store.connection(self._pool, self._timeout) as conn:
            return await store.pending(conn, relationship_id, role, limit)

    async def pending_many(
        self, wanted: list[tuple[uuid.UUID, str]], limit: int
    ) -> dict[tuple[uuid.UUID, str], list[Gesture]]:
        """The oldest `limit` pending gestures of many (relationship, recipient) pairs, in
        one query: the greetings of the sockets that connect at the same moment."""
        async with store.connection(self._pool, self._timeout) as conn:
            return await store.pending_many(conn, wanted, limit)

    async def recent(
        self, caller: Caller, relationship_id: uuid.UUID, limit: int, before: str | None
    ) -> RecentPage:
        relationship = await self.relationship(relationship_id)
        if not caller.is_service or relationship is None:
            role_of(caller, relationship, None)
        cursor = None if before is None else _decode_cursor(before)
        async with store.connection(self._pool, self._timeout) as conn:
            rows = await store.recent(conn, relationship_id, limit + 1, cursor)
        page, more = rows[:limit], len(rows) > limit
        next_before = _encode_cursor(page[-1]) if more else None
        return RecentPage(gestures=page, count=len(page), next_before=next_before)

    async def missed(
        self, relationship_ids: list[uuid.UUID], since: datetime
    ) -> tuple[list[Gesture], dict[uuid.UUID, Gesture]]:
        """What changed in these relationships since `since`, with the response gestures."""
        async with store.connection(self._pool, self._timeout) as conn:
            gestures = await store.changed_since(conn, relationship_ids, since)
            wanted = [g.response_gesture_id for g in gestures if g.response_gesture_id]
            responses = await store.get_gestures(conn, wanted) if wanted else {}
        return gestures, responses

    # ------------------------------------------------------------------ the event log

    async def events(
        self, caller: Caller, since: datetime | None, after: str | None, limit: int
    ) -> EventPage:
        """A page of the event log for another service (`GET /api/events`): from the cursor
        `after`, else from the events of transactions begun at `since` or later (less
        `EVENT_START_MARGIN`, for transactions that began before `since` and committed
        after it), else from the oldest kept."""
        if not caller.is_service:
            raise errors.Forbidden("only a service token may read the event log")
        retention = timedelta(days=self._settings.event_log_retention_days)
        async with store.connection(self._pool, self._timeout) as conn:
            horizon = await store.event_horizon(conn)
            oldest = datetime.now(UTC) - retention
            if horizon is not None and horizon.retained_from > oldest:
                oldest = horizon.retained_from
            if after is not None:
                cursor = _decode_event_cursor(after)
                if horizon is not None and _at_or_below(cursor, horizon):
                    raise errors.Gone(
                        f"after: events before {oldest.isoformat()} are no longer kept; "
                        "start again with since"
                    )
            elif since is not None:
                if since < oldest:
                    raise errors.Gone(
                        f"since: events before {oldest.isoformat()} are no longer kept"
                    )
                cursor = await store.event_start(conn, since - EVENT_START_MARGIN)
            else:
                cursor = (0, -1)
            payloads, cursor = await store.read_events(conn, cursor, limit)
        return EventPage(events=[msgspec.Raw(p) for p in payloads], next=f"{cursor[0]}.{cursor[1]}")

    # ------------------------------------------------------------------ delivery

    def delivered(self, gesture: Gesture) -> None:
        """A `gesture_received` reached a recipient connection; mark it soon, once. `gesture`
        is the copy the frame carried: its event is written from it (`_mark`)."""
        self._deliveries[gesture.id] = gesture
        self._deliveries_ready.set()

    async def _delivery_loop(self) -> None:
        while True:
            await self._deliveries_ready.wait()
            if len(self._deliveries) < MARK_BATCH:
                await asyncio.sleep(MARK_WINDOW)
            self._deliveries_ready.clear()
            try:
                await self.flush_deliveries()
            except Exception as exc:  # keep marking: a dead loop would mark nothing again
                log.error("delivery marks failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(1.0)
                self._deliveries_ready.set()

    async def flush_deliveries(self) -> None:
        """Mark what is queued in one transaction; on failure keep it for the next pass."""
        if not self._deliveries:
            return
        copies, self._deliveries = self._deliveries, {}
        try:
            await self._mark(list(copies.values()))
        except Exception:
            self._deliveries.update(copies)
            raise

    async def _mark(self, copies: list[Gesture]) -> None:
        """Mark delivered, with their events, in one statement: each event is written from
        the copy of the gesture this process holds, marked now, and counts only where the
        row still matches it (not delivered, not acknowledged: the fields that change). What
        changed meanwhile is marked from the row as it is now, in a transaction."""
        at = datetime.now(UTC)
        fresh = [g for g in copies if g.acknowledged_at is None]
        events = [
            self._event_row(GestureDelivered, g, at)
            for g in (msgspec.structs.replace(g, delivered_at=at) for g in fresh)
        ]
        async with self._publisher.writing(), store.connection(self._pool, self._timeout) as conn:
            marked, rows = await store.mark_delivered_from(
                conn, [g.id for g in fresh], at, events, self._node
            )
            self._publisher.publish(rows)
            rest = [g.id for g in copies if g.id not in marked]
            if not rest:
                return
            async with store.atomic(conn):
                now = await store.mark_delivered(conn, rest)
                rows = await store.add_events(
                    conn,
                    [self._event_row(GestureDelivered, g, g.delivered_at) for g in now],
                    self._node,
                )
        self._publisher.publish(rows)


# A transaction that began this long before `since` and committed after it is still found.
EVENT_START_MARGIN = timedelta(seconds=60)
_EVENT_CURSOR = re.compile(r"^(\d{1,20})\.(-1|\d{1,19})$")


def _decode_event_cursor(cursor: str) -> tuple[int, int]:
    found = _EVENT_CURSOR.match(cursor)
    if found is None or int(found.group(1)) >= 2**63:
        raise errors.Invalid("after: not a cursor from a previous page's next")
    return int(found.group(1)), int(found.group(2))


def _at_or_below(cursor: tuple[int, int], horizon: store.Horizon) -> bool:
    return cursor <= (horizon.txid, horizon.id)


def _zone(name: str | None) -> tzinfo:
    if name is None:
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise errors.Invalid("timezone: not a known IANA time zone, e.g. Europe/Paris") from None


def _encode_cursor(gesture: Gesture) -> str:
    raw = f"{gesture.sent_at.isoformat()}|{gesture.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, gesture_id = raw.partition("|")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("naive")
        # In UTC here: a time that only leaves the calendar there (year 1 at +14:00) is
        # refused now rather than by asyncpg's encoder, which would make it a 500.
        return when.astimezone(UTC), uuid.UUID(gesture_id)
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise errors.Invalid("before: not a cursor returned by this API") from None
