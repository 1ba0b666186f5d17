"""Every payload on the wire, as msgspec Structs, with decoders and encoders built once.

What clients send is frozen and bounded by `Meta` limits, so decoding *is* validation: a body
that decodes is a body the rules can act on. WebSocket frames and Redis events are tagged
unions on `type` and `event`. Events tolerate unknown fields and give every new field a
default, so two versions of the service can share Redis during a deploy.
"""

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

MAX_BODY = 16 * 1024
MAX_MESSAGE = 280

GestureType = Literal["hug", "kiss", "thinking_of_you"]
GESTURE_TYPES: tuple[str, ...] = ("hug", "kiss", "thinking_of_you")
Role = Literal["partner_a", "partner_b"]
ROLES: tuple[str, ...] = ("partner_a", "partner_b")

# No C0 or C1 control character but tab and newline; PostgreSQL rejects NUL outright.
_NO_CONTROLS = r"^[^\x00-\x08\x0b-\x1f\x7f-\x9f]*$"
Message = Annotated[
    str,
    Meta(
        max_length=MAX_MESSAGE,
        pattern=_NO_CONTROLS,
        description="At most 280 characters; no control character but newline and tab.",
    ),
]
_IDEMPOTENCY_KEY = r"^[\x21-\x7e]{1,200}$"
IdempotencyKey = Annotated[str, Meta(min_length=1, max_length=200, pattern=_IDEMPOTENCY_KEY)]
UserId = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$")]
RequestId = Annotated[str, Meta(max_length=128)] | int
Limit = Annotated[int, Meta(ge=1, le=100)]


def valid_idempotency_key(key: str) -> bool:
    """The rule of `IdempotencyKey`, for a key that arrives in a header."""
    return re.fullmatch(_IDEMPOTENCY_KEY[1:-1], key) is not None


def other_role(role: str) -> str:
    return "partner_b" if role == "partner_a" else "partner_a"


# ---------------------------------------------------------------------------- data


class Gesture(Struct, kw_only=True):
    """A gesture as clients and consumers see it; absent values are null."""

    id: uuid.UUID
    relationship_id: uuid.UUID
    gesture_type: str
    sent_by: str
    message: str | None
    ai_generated: bool
    sent_at: datetime
    delivered_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    response_gesture_id: uuid.UUID | None
    # What a suggested note drew on ({suggestion_id, source, context_used}) when the gesture
    # was sent with a `suggestion_id`; null otherwise. Written by the service only.
    ai_context_used: dict[str, Any] | None = None


class Relationship(Struct, kw_only=True):
    id: uuid.UUID
    partner_a_id: str | None
    partner_b_id: str | None
    created_at: datetime | None


# ---------------------------------------------------------------------------- HTTP


class SendGestureBody(Struct, frozen=True, kw_only=True):
    relationship_id: uuid.UUID
    gesture_type: GestureType
    sender_id: Role
    message: Message | None = None
    ai_generated: bool = False
    suggestion_id: uuid.UUID | None = None


class AcknowledgeBody(Struct, frozen=True, kw_only=True):
    gesture_id: uuid.UUID
    acknowledged_by: Role
    send_back: bool = False
    send_back_type: GestureType | None = None
    send_back_message: Message | None = None


class RelationshipBody(Struct, frozen=True, kw_only=True):
    partner_a_id: UserId | None
    partner_b_id: UserId | None


class PendingQuery(Struct, frozen=True, kw_only=True):
    relationship_id: uuid.UUID
    partner_id: Role


class RecentQuery(Struct, frozen=True, kw_only=True):
    relationship_id: uuid.UUID
    limit: Limit = 20
    before: Annotated[str, Meta(max_length=200)] | None = None


# An IANA zone name such as Europe/Paris; the suggestion's "time of day" is read in it.
TimeZone = Annotated[
    str, Meta(max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$")
]


class EventsQuery(Struct, frozen=True, kw_only=True):
    since: Annotated[datetime, Meta(tz=True)] | None = None
    after: Annotated[str, Meta(max_length=64)] | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 500


class EventPage(Struct, kw_only=True):
    """Events of the log, in log order (each the JSON of section 6 of the contract, as it
    went to the channels and streams), and the cursor to go on from."""

    events: list[msgspec.Raw]
    next: str


class GenerateMessageBody(Struct, frozen=True, kw_only=True):
    relationship_id: uuid.UUID
    sender_id: Role
    gesture_type: GestureType
    timezone: TimeZone | None = None


class StatsQuery(Struct, frozen=True, kw_only=True):
    relationship_id: uuid.UUID
    days: Annotated[int, Meta(ge=1, le=365)] = 30


class SendResult(Struct, kw_only=True):
    gesture: Gesture
    recipient_online: bool


class AcknowledgeResult(Struct, kw_only=True):
    acknowledged: bool
    response_gesture: Gesture | None


class GestureList(Struct, kw_only=True):
    gestures: list[Gesture]
    count: int


class RecentPage(Struct, kw_only=True):
    gestures: list[Gesture]
    count: int
    next_before: str | None


class Suggestion(Struct, kw_only=True):
    """A suggested note; send it (or an edit of it) with `suggestion_id` within an hour."""

    message: str
    context_used: list[str]
    suggestion_id: uuid.UUID


class TypeCounts(Struct, kw_only=True):
    hug: int = 0
    kiss: int = 0
    thinking_of_you: int = 0
    total: int = 0


class PerPartnerCounts(Struct, kw_only=True):
    partner_a: TypeCounts
    partner_b: TypeCounts


class PerPartnerInt(Struct, kw_only=True):
    partner_a: int = 0
    partner_b: int = 0


class PerPartnerSeconds(Struct, kw_only=True):
    partner_a: float | None = None
    partner_b: float | None = None


class Stats(Struct, kw_only=True):
    """The couple's statistics over the gestures sent in the last `days` days."""

    relationship_id: uuid.UUID
    days: int
    since: datetime
    sent: PerPartnerCounts
    acknowledged: PerPartnerInt
    sent_back: PerPartnerInt
    median_seconds_to_acknowledge: PerPartnerSeconds
    streak_days: int


class ErrorBody(Struct, kw_only=True):
    detail: str


class Health(Struct, kw_only=True):
    status: str
    checks: dict[str, str] = {}


# ---------------------------------------------------------------------------- WebSocket

_frame = {"tag_field": "type", "kw_only": True, "frozen": True, "omit_defaults": True}


class GestureFrame(Struct, tag="gesture", **_frame):
    gesture_type: GestureType
    message: Message | None = None
    ai_generated: bool = False
    idempotency_key: IdempotencyKey | None = None
    suggestion_id: uuid.UUID | None = None
    request_id: RequestId | None = None


class AcknowledgeFrame(Struct, tag="gesture_acknowledge", **_frame):
    gesture_id: uuid.UUID
    send_back: bool = False
    send_back_type: GestureType | None = None
    send_back_message: Message | None = None
    request_id: RequestId | None = None


class PingFrame(Struct, tag="ping", **_frame):
    request_id: RequestId | None = None


ClientFrame = GestureFrame | AcknowledgeFrame | PingFrame


class FrameEnvelope(Struct):
    """Read from a frame that failed to decode, to echo its request_id in the error."""

    request_id: RequestId | None = None


class GestureSentFrame(Struct, tag="gesture_sent", **_frame):
    gesture: Gesture
    request_id: RequestId | None = None


class GestureReceivedFrame(Struct, tag="gesture_received", **_frame):
    gesture: Gesture


class GestureDeliveredFrame(Struct, tag="gesture_delivered", **_frame):
    gesture_id: uuid.UUID
    delivered_at: datetime


class GestureAcknowledgedFrame(Struct, tag="gesture_acknowledged", **_frame):
    gesture_id: uuid.UUID
    acknowledged_by: str
    response_gesture: Gesture | None


class AcknowledgeConfirmFrame(Struct, tag="gesture_acknowledged_confirm", **_frame):
    gesture_id: uuid.UUID
    response_gesture: Gesture | None
    request_id: RequestId | None = None


class PresenceFrame(Struct, tag="presence", **_frame):
    partner: str
    online: bool


class PongFrame(Struct, tag="pong", **_frame):
    request_id: RequestId | None = None


class ErrorFrame(Struct, tag="error", **_frame):
    code: str
    message: str
    request_id: RequestId | None = None


# ---------------------------------------------------------------------------- Redis events


class _Event(Struct, tag_field="event", kw_only=True):
    """What every event carries; `gesture` is the gesture after the change."""

    v: int = 1
    event_id: uuid.UUID
    occurred_at: datetime
    relationship_id: uuid.UUID
    gesture: Gesture


class GestureSent(_Event, tag="gesture.sent"):
    # Whether the recipient held a WebSocket on any process when the gesture was admitted
    # (what a push-notification service wants); null where Redis could not say.
    recipient_online: bool | None = None


class GestureDelivered(_Event, tag="gesture.delivered"):
    pass


class GestureAcknowledged(_Event, tag="gesture.acknowledged"):
    response_gesture: Gesture | None = None


Event = GestureSent | GestureDelivered | GestureAcknowledged


class RelationshipChanged(Struct, tag_field="event", tag="relationship.changed", kw_only=True):
    """Internal, on the control channel: a relationship's row after `PUT /api/relationships`.
    Every process drops its cached row and closes the sockets of a partner who left."""

    v: int = 1
    relationship: Relationship


class PresenceChange(Struct, kw_only=True):
    """Internal, on the presence channel: a partner's first connection opened or last closed."""

    partner: str
    online: bool


# ---------------------------------------------------------------------------- codecs

encoder = msgspec.json.Encoder()
send_body_decoder = msgspec.json.Decoder(SendGestureBody)
acknowledge_body_decoder = msgspec.json.Decoder(AcknowledgeBody)
relationship_body_decoder = msgspec.json.Decoder(RelationshipBody)
generate_body_decoder = msgspec.json.Decoder(GenerateMessageBody)
frame_decoder = msgspec.json.Decoder(ClientFrame)
envelope_decoder = msgspec.json.Decoder(FrameEnvelope)
event_decoder = msgspec.json.Decoder(Event)
presence_decoder = msgspec.json.Decoder(PresenceChange)
control_decoder = msgspec.json.Decoder(RelationshipChanged)

# What hostile input can make a msgspec decoder raise besides its own errors.
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)


def event_schema() -> dict:
    """The JSON Schema of the Redis event payload, published as schemas/event.schema.json."""
    schema = msgspec.json.schema(Event)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Gesture service event"
    return schema
