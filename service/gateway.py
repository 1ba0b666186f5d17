"""The WebSocket edge: `GET /ws?relationship_id=<uuid>&token=<jwt>`.

Each socket has one reader (this endpoint's task) and, while it has frames to write, one
writer (see `hub`). The reader decodes a frame, calls `gestures`, and encodes the answer;
events from Redis reach the socket through the hub. A process subscribes to a relationship's
channels while it holds a connection of that relationship.

How errors reach the client:

| what                                   | how                                      |
|----------------------------------------|------------------------------------------|
| bad or missing token (checked first)   | close 4401                               |
| relationship_id missing or not a UUID  | close 4400 (a bad token too: 4401)       |
| token expired while connected          | close 4401, within 2 s of `exp`          |
| not a partner, unknown relationship    | close 4403                               |
| partner removed by PUT /api/relationships | close 4403, on every process, at once |
| PostgreSQL down while connecting       | close 1013 (try again later)             |
| frame over 16 KiB                      | close 1009 (by the server, at once)      |
| client does not read its frames        | close 1008 (slow consumer)               |
| no pong to the server's ping in time   | close 1011 by the server (keepalive)     |
| process shutting down                  | close 1012 (service restart)             |
| frame not JSON, unknown type, bad field| `error` frame, code `invalid`            |
| errors.Forbidden / NotFound            | `error` frame, `forbidden` / `not_found` |
| errors.RateLimited                     | `error` frame, `rate_limited`            |
| errors.Unavailable                     | `error` frame, `unavailable`             |
| anything unexpected                    | logged once with its traceback, close 1011 |

Frames that carry a `request_id` get it back on every reply to them.

Access ends when it should. Every process subscribes to the control channel (see `bus`);
a `RelationshipChanged` on it closes, the moment it is read, each local socket whose user
`gestures.may_stay` no longer admits, dropping what was queued for it. A socket admitted
while a change was on its way is checked again once it is registered. After a broken
subscription (a change may have been missed) every held socket is checked against
PostgreSQL, and so are they once a second while the subscription is down. Once a second,
sockets whose token expired are closed.
"""

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime

from starlette.websockets import WebSocket, WebSocketState

from . import errors, metrics
from .auth import Verifier, bearer, role_of
from .bus import Subscriber, control_channel
from .coalesce import Coalescer
from .config import Settings
from .gestures import Gestures
from .hub import SLOW_CONSUMER, Connection, Dedupe, Hub
from .presence import Presence
from .schemas import (
    DECODE_ERRORS,
    AcknowledgeConfirmFrame,
    AcknowledgeFrame,
    ErrorFrame,
    Event,
    Gesture,
    GestureAcknowledged,
    GestureAcknowledgedFrame,
    GestureDelivered,
    GestureDeliveredFrame,
    GestureFrame,
    GestureReceivedFrame,
    GestureSent,
    GestureSentFrame,
    PingFrame,
    PongFrame,
    PresenceFrame,
    Relationship,
    control_decoder,
    encoder,
    envelope_decoder,
    event_decoder,
    frame_decoder,
    other_role,
    presence_decoder,
)
from .validation import describe
from .wsserver import direct_writer

log = logging.getLogger(__name__)

BAD_REQUEST = 4400
UNAUTHORIZED = 4401
FORBIDDEN = 4403
TRY_AGAIN_LATER = 1013
TOO_BIG = 1009
SERVICE_RESTART = 1012
INTERNAL = 1011
# Closes logged at INFO; the others (a client leaving, a refused token, a restart) at DEBUG.
_NOTABLE_CLOSES = frozenset({INTERNAL, TRY_AGAIN_LATER, TOO_BIG, SLOW_CONSUMER})
# Clock skew and commit-to-publish delay that a resync reaches back over.
_RESYNC_MARGIN = 10.0


class Gateway:
    def __init__(
        self,
        settings: Settings,
        gestures: Gestures,
        presence: Presence,
        hub: Hub,
        subscriber_factory,
        verifier: Verifier,
    ) -> None:
        self._settings = settings
        self._verify = verifier
        self._gestures = gestures
        self._presence = presence
        self.hub = hub
        self._subscriptions: dict[uuid.UUID, asyncio.Future[bool]] = {}
        # Commit times of gestures pushed live and not yet written, for DELIVERY_SECONDS.
        self._committed: dict[uuid.UUID, float] = {}
        self.subscriber: Subscriber = subscriber_factory(self.on_message, self.resync)
        self._control = control_channel(settings.presence_prefix)
        self.subscriber.keep([self._control])
        self.closing = False
        # A connect storm's reads, one query or command for the sockets of the same moment.
        self._relationships = Coalescer(lambda ids: self._gestures.relationships(ids))
        self._subscribe = Coalescer(self._subscribe_many)
        self._pending = Coalescer(self._pending_many)

    # ------------------------------------------------------------------ events in

    def on_message(self, channel: str, data: bytes) -> None:
        """Route one message from Redis to the connections it concerns."""
        presence_prefix = self._settings.presence_prefix
        if channel == self._control:
            return self._on_control(data)
        try:
            if channel.startswith(presence_prefix):
                change = presence_decoder.decode(data)
                relationship_id = uuid.UUID(channel[len(presence_prefix) :])
                self._push_presence(relationship_id, change.partner, change.online)
                return
            event = event_decoder.decode(data)
        except (*DECODE_ERRORS, ValueError):
            log.debug(
                "ignoring a message this version does not understand", extra={"channel": channel}
            )
            return
        self._route(event)

    def _route(self, event: Event, response: Gesture | None = None) -> None:
        gesture = event.gesture
        match event:
            case GestureSent():
                self._push_received(gesture)
            case GestureDelivered():
                frame = GestureDeliveredFrame(
                    gesture_id=gesture.id, delivered_at=gesture.delivered_at
                )
                self.hub.push(
                    gesture.relationship_id,
                    gesture.sent_by,
                    encoder.encode(frame),
                    dedupe=("d", gesture.id),
                )
            case GestureAcknowledged():
                frame = GestureAcknowledgedFrame(
                    gesture_id=gesture.id,
                    acknowledged_by=gesture.acknowledged_by or other_role(gesture.sent_by),
                    response_gesture=event.response_gesture,
                )
                self.hub.push(
                    gesture.relationship_id,
                    gesture.sent_by,
                    encoder.encode(frame),
                    dedupe=("a", gesture.id),
                )

    def _received(self, gesture: Gesture) -> tuple[bytes, Gesture | None, Dedupe]:
        frame = encoder.encode(GestureReceivedFrame(gesture=gesture))
        return frame, gesture if gesture.delivered_at is None else None, ("r", gesture.id)

    def _push_received(self, gesture: Gesture) -> None:
        frame, delivered, dedupe = self._received(gesture)
        if delivered is not None:
            # Before the push: a socket that can take the frame at once is written to, and
            # `_delivered` called, inside it.
            if len(self._committed) > 10_000:  # written never (sockets gone): forget
                self._committed.clear()
            self._committed[gesture.id] = gesture.sent_at.timestamp()
        pushed = self.hub.push(
            gesture.relationship_id,
            other_role(gesture.sent_by),
            frame,
            delivered=delivered,
            dedupe=dedupe,
        )
        if not pushed and delivered is not None:
            self._committed.pop(gesture.id, None)

    def _delivered(self, gesture: Gesture) -> None:
        """A gesture_received frame handed `gesture` over: time it, mark it delivered."""
        committed = self._committed.pop(gesture.id, None)
        if committed is not None:
            metrics.DELIVERY_SECONDS.observe(time.time() - committed)
        self._gestures.delivered(gesture)

    def _push_presence(self, relationship_id: uuid.UUID, partner: str, online: bool) -> None:
        frame = encoder.encode(PresenceFrame(partner=partner, online=online))
        for conn in self.hub.of(relationship_id, other_role(partner)):
            if conn.other_online is not online:
                conn.other_online = online
                conn.push(frame)

    async def resync(self, since: float) -> None:
        """After a broken subscription: re-read from PostgreSQL what clients may have missed."""
        await self._revalidate()
        relationships = self.hub.relationships()
        if not relationships:
            return
        cutoff = datetime.fromtimestamp(since - _RESYNC_MARGIN, UTC)
        try:
            changed, responses = await self._gestures.missed(relationships, cutoff)
        except errors.Unavailable:
            log.warning("resync failed: PostgreSQL unavailable")
            return
        for gesture in changed:
            if gesture.acknowledged_at is None:
                self._push_received(gesture)
            if gesture.delivered_at is not None and gesture.delivered_at >= cutoff:
                self._route(_as_event(GestureDelivered, gesture))
            if gesture.acknowledged_at is not None and gesture.acknowledged_at >= cutoff:
                response = responses.get(gesture.response_gesture_id)
                self._route(_as_event(GestureAcknowledged, gesture, response))
        for relationship_id in relationships:
            for role in ("partner_a", "partner_b"):
                online = await self._presence.is_online(relationship_id, role)
                self._push_presence(relationship_id, role, online)
        log.info("resynced after pub/sub reconnect", extra={"gestures": len(changed)})

    # ------------------------------------------------------------------ access

    def _on_control(self, data: bytes) -> None:
        try:
            change = control_decoder.decode(data)
        except DECODE_ERRORS:
            log.debug("ignoring a control message this version does not understand")
            return
        relationship = change.relationship
        self._gestures.relationship_changed(relationship)
        self._close_removed(relationship.id, relationship)

    def _close_removed(self, relationship_id: uuid.UUID, relationship: Relationship | None) -> None:
        for conn in self.hub.of(relationship_id):
            if not conn.closed and not self._gestures.may_stay(
                relationship, conn.user_id, conn.role
            ):
                log.info("closing a socket of a removed partner", extra={"conn_id": conn.id})
                conn.end(FORBIDDEN, "no longer a partner of this relationship")

    async def _revalidate(self, quiet: bool = False) -> None:
        """Check every held socket against PostgreSQL (a change may have been missed)."""
        try:
            rows = await self._gestures.reload_relationships(self.hub.relationships())
        except errors.Unavailable:
            if not quiet:
                log.warning("could not re-check sockets' relationships: PostgreSQL unavailable")
            return
        for relationship_id, relationship in rows.items():
            self._close_removed(relationship_id, relationship)

    async def watch_access(self) -> None:
        """Once a second: close sockets whose token expired; and while the subscription is
        down (no change can reach this process), re-check held sockets against PostgreSQL,
        so a partner removed during a Redis outage is closed within a second or two too."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._expire())
            group.create_task(self._poll_while_unsubscribed())

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for conn in self.hub.expired(time.time()):
                conn.end(UNAUTHORIZED, "token expired")

    async def _poll_while_unsubscribed(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if not self.subscriber.connected.is_set():
                await self._revalidate(quiet=True)

    async def _recheck(self, ws: WebSocket, conn: Connection, changes: int) -> int | None:
        """After registering a socket admitted when `changes` changes had been applied: None
        if it may stay, else the code it was closed with. A change that arrived in between
        did not find it in the hub."""
        if changes != self._gestures.changes and not conn.closed:
            try:
                relationship = await self._gestures.relationship(conn.relationship_id)
            except errors.Unavailable:
                await _close(ws, TRY_AGAIN_LATER, "database unavailable")
                return TRY_AGAIN_LATER
            if not self._gestures.may_stay(relationship, conn.user_id, conn.role):
                conn.closed = True
        if conn.closed:  # by the check, or by a change while it was registering
            # Awaited here (a close already under way makes this a no-op): the endpoint
            # returns next, and a server drops a socket left unclosed without a close code.
            await _close(ws, FORBIDDEN, "not a partner of this relationship")
            return FORBIDDEN
        return None

    # ------------------------------------------------------------------ subscriptions

    async def _join(self, conn: Connection) -> None:
        rel = conn.relationship_id
        if self.hub.add(conn):
            self._subscriptions[rel] = self._subscribe.future(rel)
        subscribed = self._subscriptions[rel]
        if subscribed.done():
            subscribed.result()  # raises what the subscription raised
        else:
            # Shared by the relationship's sockets: one leaving must not cancel it.
            await asyncio.shield(subscribed)

    async def _subscribe_many(self, relationship_ids: list[uuid.UUID]) -> dict[uuid.UUID, bool]:
        """One SUBSCRIBE for the channels of every relationship joined at the same moment."""
        channels = []
        for rel in relationship_ids:
            channels += [self._gestures.channel(rel), self._presence.channel(rel)]
        ok = await self.subscriber.subscribe(channels)
        return dict.fromkeys(relationship_ids, ok)

    async def _pending_many(
        self, wanted: list[tuple[uuid.UUID, str]]
    ) -> dict[tuple[uuid.UUID, str], list[Gesture]]:
        return await self._gestures.pending_many(wanted, self._settings.ws_greeting_limit)

    async def _leave(self, conn: Connection) -> None:
        rel = conn.relationship_id
        if self.hub.remove(conn):
            self._subscriptions.pop(rel, None)
            self.subscriber.unsubscribe([self._gestures.channel(rel), self._presence.channel(rel)])

    # ------------------------------------------------------------------ the endpoint

    async def endpoint(self, ws: WebSocket) -> None:
        token = ws.query_params.get("token") or bearer(ws.headers.get("authorization"))
        # The token first: a caller who cannot say who they are learns nothing of the
        # rest of the request, as over HTTP (401 before 422).
        try:
            caller = self._verify(token)
        except errors.Unauthenticated as exc:
            return await _refuse(ws, UNAUTHORIZED, exc.message)
        try:
            relationship_id = uuid.UUID(ws.query_params.get("relationship_id", ""))
        except ValueError:
            return await _refuse(ws, BAD_REQUEST, "relationship_id must be a UUID")
        if self.closing:
            return await _refuse(ws, SERVICE_RESTART, "shutting down")
        changes = self._gestures.changes
        try:
            relationship = await self._relationships.get(relationship_id)
            role = role_of(caller, relationship, ws.query_params.get("partner_id"), "partner_id")
        except (errors.Forbidden, errors.Invalid) as exc:
            return await _refuse(ws, FORBIDDEN, exc.message)
        except errors.Unavailable:
            return await _refuse(ws, TRY_AGAIN_LATER, "database unavailable")

        await ws.accept()
        conn = Connection(
            relationship_id,
            role,
            send=lambda frame: ws.send_text(frame.decode()),
            close=lambda code, reason: _close(ws, code, reason),
            on_delivered=self._delivered,
            limit=self._settings.ws_queue_size,
            user_id=caller.user_id,
            expires=caller.expires,
            write_now=direct_writer(getattr(ws, "_receive", None)),
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "socket opened",
                extra={"conn_id": conn.id, "relationship_id": str(relationship_id), "role": role},
            )
        code = 1000
        present = False  # undo only what was done
        metrics.CONNECTIONS.inc()
        try:
            await self._join(conn)
            if refused := await self._recheck(ws, conn, changes):
                code = refused
                return
            present = True  # connected() counts us before its first await
            await self._presence.connected(relationship_id, role)
            try:
                await self._greet(conn)
            except errors.Unavailable:
                code = TRY_AGAIN_LATER
                await _close(ws, code, "database unavailable")
                return
            code = await self._read(ws, conn, caller)
        except Exception:
            log.exception("socket failed", extra={"conn_id": conn.id})
            code = INTERNAL
            await _close(ws, INTERNAL, "internal error")
        finally:
            conn.closed = True
            metrics.CONNECTIONS.dec()
            if not self.closing:  # at shutdown, presence and Redis are dropped wholesale
                if present:
                    self._presence.disconnected(relationship_id, role)
                await self._leave(conn)
            level = logging.INFO if code in _NOTABLE_CLOSES else logging.DEBUG
            log.log(level, "socket closed", extra={"conn_id": conn.id, "code": code})

    async def _greet(self, conn: Connection) -> None:
        """The other partner's presence, then the oldest `ws_greeting_limit` pending
        gestures, oldest first (the rest stay pending, readable over HTTP)."""
        other = other_role(conn.role)
        # Both reads join their batches now; each future is this socket's own.
        online_read = self._presence.online_future(conn.relationship_id, other)
        pending_read = self._pending.future((conn.relationship_id, conn.role))
        try:
            online = await online_read
            pending = await pending_read
        finally:
            pending_read.cancel()  # nothing, if it was read; else not waited for
        if conn.other_online is None:
            conn.other_online = online
        else:
            # A change arrived on the channel (subscribed before the read) meanwhile: it is
            # at least as new as the read, and taking the read would hide the next change.
            online = conn.other_online
        first = [(encoder.encode(PresenceFrame(partner=other, online=online)), None, None)]
        for gesture in pending:
            frame, delivered, dedupe = self._received(gesture)
            first.append((frame, delivered, dedupe))
        conn.open(first)

    async def _read(self, ws: WebSocket, conn: Connection, caller) -> int:
        limit = self._settings.ws_max_frame
        while True:
            # No idle timeout of our own: the server's pings find dead peers (WS_PING_INTERVAL).
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return message.get("code", 1000)
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            # The limit is in bytes; a text frame arrives as str, up to 4 bytes a character.
            if len(data) > limit or (
                isinstance(data, str) and len(data) * 4 > limit and len(data.encode()) > limit
            ):
                await self._too_big(ws, conn)
                return TOO_BIG
            if conn.closed:
                continue
            if conn.expires <= time.time():
                conn.end(UNAUTHORIZED, "token expired")
                continue
            await self._handle(conn, caller, data)

    async def _too_big(self, ws: WebSocket, conn: Connection) -> None:
        """Close with 1009, after the replies to the frames before it (a gesture_sent among
        them) are written: a client that is reading gets them within a second. Reached only
        under a server that lets such a frame through: `WSProtocol` closes with 1009 itself,
        as soon as the frame's header says how long it is."""
        try:
            async with asyncio.timeout(1.0):
                await conn.drained()
        except TimeoutError:
            pass
        conn.closed = True
        await _close(ws, TOO_BIG, "frame over 16 KiB")

    async def _handle(self, conn: Connection, caller, data: str | bytes) -> None:
        try:
            frame = frame_decoder.decode(data)
        except DECODE_ERRORS as exc:
            metrics.FRAMES_IN_BY_TYPE["invalid"].inc()
            conn.push(_error(errors.Invalid(describe(exc, "frame")), _request_id(data)))
            return
        metrics.FRAMES_IN_BY_TYPE[type(frame).__struct_config__.tag].inc()
        request_id = frame.request_id
        try:
            match frame:
                case PingFrame():
                    conn.push(encoder.encode(PongFrame(request_id=request_id)))
                case GestureFrame():
                    result, _ = await self._gestures.send(
                        caller,
                        conn.relationship_id,
                        frame.gesture_type,
                        conn.role,
                        frame.message,
                        frame.ai_generated,
                        frame.idempotency_key,
                        suggestion_id=frame.suggestion_id,
                    )
                    sent = GestureSentFrame(gesture=result.gesture, request_id=request_id)
                    conn.push(encoder.encode(sent))
                case AcknowledgeFrame():
                    result = await self._gestures.acknowledge(
                        caller,
                        frame.gesture_id,
                        conn.role,
                        frame.send_back,
                        frame.send_back_type,
                        frame.send_back_message,
                        within=conn.relationship_id,
                    )
                    if not result.acknowledged:
                        conn.push(
                            _error(errors.Invalid("gesture_id: already acknowledged"), request_id)
                        )
                        return
                    confirm = AcknowledgeConfirmFrame(
                        gesture_id=frame.gesture_id,
                        response_gesture=result.response_gesture,
                        request_id=request_id,
                    )
                    conn.push(encoder.encode(confirm))
        except errors.ServiceError as exc:
            conn.push(_error(exc, request_id))

    # ------------------------------------------------------------------ shutdown

    def stop_accepting(self) -> None:
        """The process is stopping: refuse new sockets, and let closing ones skip their
        presence and subscription clean-up (done for all of them at once at shutdown)."""
        self.closing = True

    async def shutdown(self) -> None:
        """Close every socket with 1012 so clients reconnect elsewhere."""
        self.closing = True
        writing = []
        for conn in self.hub:
            conn.closed = True
            if (flusher := conn.flusher()) is not None:
                writing.append(flusher)
        if writing:  # only the sockets with frames still queued: no task per socket
            await asyncio.wait(writing)


def _as_event(kind, gesture: Gesture, response: Gesture | None = None) -> Event:
    fields = {
        "event_id": uuid.uuid4(),
        "occurred_at": datetime.now(UTC),
        "relationship_id": gesture.relationship_id,
        "gesture": gesture,
    }
    if kind is GestureAcknowledged:
        fields["response_gesture"] = response
    return kind(**fields)


def _error(exc: errors.ServiceError, request_id) -> bytes:
    message = exc.message
    if isinstance(exc, errors.RateLimited):
        message = f"{message}; retry after {exc.retry_after} s"
    return encoder.encode(ErrorFrame(code=exc.code, message=message, request_id=request_id))


def _request_id(data: str | bytes):
    try:
        return envelope_decoder.decode(data).request_id
    except (*DECODE_ERRORS, ValueError):
        return None


async def _refuse(ws: WebSocket, code: int, reason: str) -> None:
    """Accept only to close with a code the client can read (a rejected handshake can't)."""
    await ws.accept()
    await ws.close(code, reason)


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    """Close with `code`; a client that stopped reading cannot take even the close frame,
    so after a second its transport is aborted."""
    if ws.application_state == WebSocketState.DISCONNECTED:
        return
    try:
        async with asyncio.timeout(1.0):
            await ws.close(code, reason)
            return
    except TimeoutError:
        pass
    except Exception:
        return
    _abort(ws)


def _abort(ws: WebSocket) -> None:
    """Drop the TCP connection under the ASGI server. The ASGI interface has no abort, but
    uvicorn's receive and send callables are methods of its protocol object, which owns the
    transport. Starlette wraps `send` in a closure, so `receive` is the one that still is."""
    for callable_ in (getattr(ws, "_receive", None), getattr(ws, "_send", None)):
        transport = getattr(getattr(callable_, "__self__", None), "transport", None)
        if transport is not None:
            transport.abort()
            return
    log.warning("cannot abort a stuck socket under this server")
