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
"""

import asyncio
import base64
import binascii
import logging
import math
import time
import uuid
from datetime import datetime

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from . import errors, store
from .auth import Caller, role_of
from .bus import Publisher, channel_for
from .config import Settings
from .presence import Presence
from .schemas import (
    AcknowledgeResult,
    Gesture,
    GestureAcknowledged,
    GestureDelivered,
    GestureList,
    GestureSent,
    RecentPage,
    Relationship,
    SendResult,
    encoder,
    other_role,
    valid_idempotency_key,
)

log = logging.getLogger(__name__)

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
    __slots__ = ("fingerprint", "key", "new")

    def __init__(self, new: store.NewGesture, key: str | None, fingerprint: bytes) -> None:
        self.new = new
        self.key = key
        self.fingerprint = fingerprint


class _Sent:
    """The outcome of one send inside a group commit."""

    __slots__ = ("fresh", "gesture", "outbox")

    def __init__(self, gesture: Gesture, fresh: bool, outbox: list[store.OutboxRow]) -> None:
        self.gesture = gesture
        self.fresh = fresh
        self.outbox = outbox


class Gestures:
    def __init__(
        self,
        settings: Settings,
        pool: store.Pool,
        redis: aioredis.Redis,
        publisher: Publisher,
        presence: Presence,
        relationship_ttl: float = 5.0,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self._publisher = publisher
        self._presence = presence
        self._timeout = settings.db_timeout
        self._rate_limit = redis.register_script(_RATE_LIMIT)
        self._relationships: dict[uuid.UUID, tuple[float, Relationship]] = {}
        self._relationship_ttl = relationship_ttl
        self._sends: store.GroupCommit[_SendItem, _Sent | errors.ServiceError] = store.GroupCommit(
            pool, self._commit_sends, after_commit=self._publish_sends, timeout=self._timeout
        )
        self._deliveries: set[uuid.UUID] = set()
        self._deliveries_ready = asyncio.Event()

    async def run(self) -> None:
        """The background work of the rules: group commits of sends and delivery marks."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._sends.run())
            group.create_task(self._delivery_loop())

    def channel(self, relationship_id: uuid.UUID) -> str:
        return channel_for(self._settings.channel_prefix, relationship_id)

    # ------------------------------------------------------------------ relationships

    async def relationship(self, relationship_id: uuid.UUID) -> Relationship | None:
        """The relationship, cached for a few seconds once both partners are set (never
        before, so a row another system just inserted or filled in is seen at once)."""
        hit = self._relationships.get(relationship_id)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        async with store.connection(self._pool, self._timeout) as conn:
            found = await store.get_relationship(conn, relationship_id)
        complete = found is not None and found.partner_a_id and found.partner_b_id
        if complete and self._relationship_ttl > 0:
            if len(self._relationships) > 100_000:
                self._relationships.clear()
            self._relationships[relationship_id] = (now + self._relationship_ttl, found)
        return found

    async def relationships(
        self, relationship_ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, Relationship | None]:
        """Many relationships at once (the gateway's connect storms): cached ones from the
        cache, the rest in one query, cached by the same rule as `relationship`."""
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
            async with store.connection(self._pool, self._timeout) as conn:
                read = await store.get_relationships(conn, missing)
            if len(self._relationships) > 100_000:
                self._relationships.clear()
            for rid in missing:
                row = found[rid] = read.get(rid)
                if row is not None and row.partner_a_id and row.partner_b_id:
                    if self._relationship_ttl > 0:
                        self._relationships[rid] = (now + self._relationship_ttl, row)
        return found

    async def role_in(self, caller: Caller, relationship_id: uuid.UUID, named: str | None) -> str:
        return role_of(caller, await self.relationship(relationship_id), named)

    async def put_relationship(
        self, caller: Caller, relationship_id: uuid.UUID, a: str | None, b: str | None
    ) -> Relationship:
        if not caller.is_service:
            raise errors.Forbidden("only a service token may create or change relationships")
        if a is not None and a == b:
            raise errors.Invalid("partner_b_id: must differ from partner_a_id")
        async with store.connection(self._pool, self._timeout) as conn:
            found = await store.put_relationship(conn, relationship_id, a, b)
        self._relationships.pop(relationship_id, None)
        return found

    # ------------------------------------------------------------------ sending

    async def send(
        self,
        caller: Caller,
        relationship_id: uuid.UUID,
        gesture_type: str,
        named: str | None,
        message: str | None,
        ai_generated: bool,
        idempotency_key: str | None,
        want_online: bool = True,
    ) -> tuple[SendResult, bool]:
        """Send a gesture; returns the result and whether it is new (False for a replay).

        `recipient_online` costs nothing extra: it rides in the rate limit's round trip to
        Redis. Callers that do not need it (the gateway) pass `want_online=False`.
        """
        role = role_of(caller, await self.relationship(relationship_id), named)
        if idempotency_key is not None and not valid_idempotency_key(idempotency_key):
            raise errors.Invalid("Idempotency-Key: 1 to 200 printable ASCII characters, no space")
        new = store.NewGesture(relationship_id, gesture_type, role, message, ai_generated)
        fingerprint = b""
        if idempotency_key is not None:
            fingerprint = store.fingerprint(gesture_type, message, ai_generated)
        recipient = other_role(role) if want_online else None
        try:
            online = await self._admit(relationship_id, role, recipient)
        except errors.RateLimited:
            # A retry of a send that went through is answered, not limited.
            replay = await self._replay(new, idempotency_key, fingerprint)
            if replay is None:
                raise
            return SendResult(gesture=replay, recipient_online=False), False
        outcome = await self._sends.submit(_SendItem(new, idempotency_key, fingerprint))
        if isinstance(outcome, errors.ServiceError):
            raise outcome
        return SendResult(gesture=outcome.gesture, recipient_online=online), outcome.fresh

    async def _admit(self, relationship_id: uuid.UUID, role: str, recipient: str | None) -> bool:
        """Count one send against the sender's limit (RateLimited past it); and whether
        `recipient` is online, in the same round trip. Redis away: admitted, offline."""
        limit = self._settings.rate_limit_per_minute
        key = f"{self._settings.channel_prefix}rate:{relationship_id}:{role}"
        args = (int(time.time() * 1000), 60_000, limit, uuid.uuid4().hex)
        try:
            for attempt in (1, 2):
                # EVALSHA by hand: a pipeline holding a Script object asks SCRIPT EXISTS
                # before every execute, a round trip per send.
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.evalsha(self._rate_limit.sha, 1, key, *args)
                    if recipient is not None:
                        self._presence.count_online(pipe, relationship_id, recipient)
                    try:
                        results = await pipe.execute()
                        break
                    except NoScriptError:
                        if attempt == 2:
                            raise
                        await self._redis.script_load(_RATE_LIMIT)  # Redis restarted
        except (RedisError, OSError) as exc:
            log.warning("rate limit unavailable, admitting", extra={"error": repr(exc)})
            return False
        wait_ms = int(results[0])
        if wait_ms:
            raise errors.RateLimited(
                f"at most {limit} gestures a minute", retry_after=math.ceil(wait_ms / 1000)
            )
        return recipient is not None and int(results[1]) > 0

    async def _replay(
        self, new: store.NewGesture, key: str | None, fingerprint: bytes
    ) -> Gesture | None:
        if key is None:
            return None
        async with store.connection(self._pool, self._timeout) as conn:
            held = await store.find_idempotency_key(conn, new.relationship_id, new.sent_by, key)
            if held is None or held[1] != fingerprint:
                return None
            return await store.get_gesture(conn, held[0])

    async def _commit_sends(
        self, conn: store.Connection, items: list[_SendItem]
    ) -> list[_Sent | errors.ServiceError]:
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
        events = [self._sent_event(g) for g in gestures]
        rows = await store.insert_sent(conn, [item.new for item in items], events)
        by_payload = {row.payload: row for row in rows}  # each payload has its own event_id
        return [
            _Sent(g, True, [by_payload[payload]])
            for g, (_, payload) in zip(gestures, events, strict=True)
        ]

    def _publish_sends(self, outcomes: list[_Sent | errors.ServiceError]) -> None:
        self._publisher.publish(row for o in outcomes if isinstance(o, _Sent) for row in o.outbox)

    def _sent_event(self, gesture: Gesture) -> tuple[str, bytes]:
        return self._event_row(GestureSent, gesture, gesture.sent_at)

    def _event_row(self, kind: type, gesture: Gesture, at, **extra) -> tuple[str, bytes]:
        """(channel, payload) of an event announcing `gesture` after a change at `at`."""
        event = kind(
            event_id=uuid.uuid4(),
            occurred_at=at,
            relationship_id=gesture.relationship_id,
            gesture=gesture,
            **extra,
        )
        return self.channel(gesture.relationship_id), encoder.encode(event)

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
        if send_back:
            await self._admit(original.relationship_id, role, None)
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
                events.append(self._sent_event(response))
            rows = await store.add_outbox(conn, events)
        self._publisher.publish(rows)
        return AcknowledgeResult(acknowledged=True, response_gesture=response)

    # ------------------------------------------------------------------ reading

    async def pending(
        self, caller: Caller, relationship_id: uuid.UUID, named: str | None
    ) -> GestureList:
        role = role_of(caller, await self.relationship(relationship_id), named, "partner_id")
        gestures = await self.pending_for(relationship_id, role)
        return GestureList(gestures=gestures, count=len(gestures))

    async def pending_for(self, relationship_id: uuid.UUID, role: str) -> list[Gesture]:
        async with store.connection(self._pool, self._timeout) as conn:
            return await store.pending(conn, relationship_id, role)

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

    # ------------------------------------------------------------------ delivery

    def delivered(self, gesture_id: uuid.UUID) -> None:
        """A `gesture_received` reached a recipient connection; mark it soon, once."""
        self._deliveries.add(gesture_id)
        self._deliveries_ready.set()

    async def _delivery_loop(self) -> None:
        while True:
            await self._deliveries_ready.wait()
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
        ids = list(self._deliveries)
        self._deliveries.clear()
        try:
            await self._mark(ids)
        except Exception:
            self._deliveries.update(ids)
            raise

    async def _mark(self, ids: list[uuid.UUID]) -> None:
        async with store.transaction(self._pool, self._timeout) as conn:
            marked = await store.mark_delivered(conn, ids)
            rows = await store.add_outbox(
                conn, [self._event_row(GestureDelivered, g, g.delivered_at) for g in marked]
            )
        self._publisher.publish(rows)


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
        return when, uuid.UUID(gesture_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise errors.Invalid("before: not a cursor returned by this API") from None
