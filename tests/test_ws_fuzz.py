"""Random frames over a real socket: valid, malformed, oversized, wrong types, control
characters, deep nesting, binary. Each frame gets exactly one reply (an `error` frame for
what cannot be honoured) or, over 16 KiB, the close 1009; the connection goes on otherwise;
another socket of the process is served throughout; no row is written for a rejected frame."""

import json
import uuid

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from .conftest import Couple, InProcess, make_settings
from .support_helpers import gesture_count
from .support_ws import close_quietly, connect, gather_received
from .wsclient import Client

pytestmark = pytest.mark.anyio

LIMIT = 16 * 1024
REPLIES = {"pong", "gesture_sent", "gesture_acknowledged_confirm", "error"}
ERROR_CODES = {"invalid", "not_found", "forbidden"}
TYPES = ["hug", "kiss", "thinking_of_you"]

# Expectations: "ok" a reply that is not an error, "error" an error frame, "any" either,
# "close" the connection closed with 1009.
Frame = tuple[str | bytes, str]

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
clean = st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="\x7f")
controls = st.characters(min_codepoint=0, max_codepoint=0x1F).filter(lambda c: c not in "\t\n")
controls = controls | st.characters(min_codepoint=0x7F, max_codepoint=0x9F)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
request_ids = st.none() | st.text(clean, max_size=20) | st.integers(-(2**63), 2**63 - 1)


def dump(frame: dict) -> str:
    return json.dumps({k: v for k, v in frame.items() if v is not None})


@st.composite
def valid(draw) -> Frame:
    rid = draw(request_ids)
    if draw(st.booleans()):
        return dump({"type": "ping", "request_id": rid}), "ok"
    frame = {
        "type": "gesture",
        "gesture_type": draw(st.sampled_from(TYPES)),
        "message": draw(st.none() | st.text(clean | st.sampled_from("\t\n"), max_size=280)),
        "ai_generated": draw(st.none() | st.booleans()),
        "request_id": rid,
    }
    payload = dump(frame)
    return (payload.encode() if draw(st.booleans()) else payload), "ok"


@st.composite
def rejected(draw) -> Frame:
    """Frames the service must answer with an error frame."""
    rid = draw(request_ids)
    kind = draw(st.integers(0, 8))
    if kind == 0:  # a gesture type that does not exist
        bad = draw(text.filter(lambda t: t not in TYPES))
        return dump({"type": "gesture", "gesture_type": bad, "request_id": rid}), "error"
    if kind == 1:  # a control character in the note (NUL included)
        head, tail = draw(st.text(clean, max_size=20)), draw(st.text(clean, max_size=20))
        message = head + draw(controls) + tail
        return dump({"type": "gesture", "gesture_type": "hug", "message": message}), "error"
    if kind == 2:  # a note over 280 characters
        message = draw(st.text(clean, min_size=281, max_size=400))
        return dump({"type": "gesture", "gesture_type": "kiss", "message": message}), "error"
    if kind == 3:  # acknowledging what does not exist, or is not an id
        gesture_id = draw(st.uuids().map(str) | text)
        return dump({"type": "gesture_acknowledge", "gesture_id": gesture_id}), "error"
    if kind == 4:  # a type no one knows, or none
        frame = {"type": draw(text.filter(lambda t: t not in ("ping", "gesture")))}
        if draw(st.booleans()):
            frame = {"kind": "ping"}
        return dump(frame), "error"
    if kind == 5:  # a known field with a value of the wrong type
        field = draw(st.sampled_from(["gesture_type", "message", "ai_generated"]))
        value = draw(json_values.filter(lambda v: not isinstance(v, str | bool | None)))
        return dump({"type": "gesture", "gesture_type": "hug", field: value}), "error"
    if kind == 6:  # deep nesting, at the top or where a field is expected
        depth = draw(st.integers(1, LIMIT // 2 - 64))
        nested = "[" * depth + "]" * depth
        if draw(st.booleans()):
            return nested, "error"
        return '{"type":"gesture","gesture_type":' + nested + "}", "error"
    if kind == 7:  # not JSON: cut short, or JSON that is not an object
        whole = dump({"type": "ping", "request_id": rid})
        cut = draw(st.integers(1, len(whole) - 1))
        return draw(st.sampled_from([whole[:cut], "null", "42", '"ping"', ""])), "error"
    # an escape that is not a character (a lone surrogate), in the note
    return '{"type":"gesture","gesture_type":"hug","message":"\\ud800"}', "error"


@st.composite
def anything(draw) -> Frame:
    """Frames whose answer the test does not predict, only its shape."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(text), "any"
    if kind == 1:
        return draw(st.binary(max_size=200)), "any"
    if kind == 2:  # unknown fields, nested or not, next to known ones
        frame = {"type": draw(st.sampled_from(["ping", "gesture", "gesture_acknowledge"]))}
        frame.update(draw(st.dictionaries(text, json_values, max_size=4)))
        return json.dumps(frame), "any"
    depth = draw(st.integers(1, LIMIT // 2 - 64))  # skipped as an unknown field, or too deep
    return '{"type":"ping","x":' + "[" * depth + "]" * depth + "}", "any"


@st.composite
def near_limit(draw) -> Frame:
    """A ping padded to around 16 KiB, in characters of 1 to 4 bytes: over 16 KiB of UTF-8
    closes the connection, whatever its length in characters."""
    char = draw(st.sampled_from(["x", "é", "€", "😀"]))
    head = '{"type":"ping","pad":"'
    room = LIMIT - len(head) - 2
    count = room // len(char.encode()) + draw(st.integers(-3, 3))
    payload = head + char * count + '"}'
    size = len(payload.encode())
    return payload, ("ok" if size <= LIMIT else "close")


oversized = st.builds(
    lambda n, binary: (b"x" * n if binary else "x" * n, "close"),
    st.integers(LIMIT + 1, 3 * LIMIT),
    st.booleans(),
)
frames = st.one_of(valid(), rejected(), anything(), near_limit(), oversized)

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture
async def fuzz_server(database_url: str, redis_url: str, prefix: str):
    server = InProcess(make_settings(database_url, redis_url, prefix, rate_limit_per_minute=10**6))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def observer(fuzz_server: InProcess, couple: Couple):
    """The other partner, connected to the same process for the whole test."""
    client = await connect(fuzz_server.ws_url, couple, "partner_b")
    yield client
    await close_quietly(client)


@FUZZ
@given(sequence=st.lists(frames, min_size=1, max_size=6))
async def test_random_frames_get_error_frames_or_documented_closes_and_write_nothing_rejected(
    fuzz_server: InProcess,
    observer: Client,
    couple: Couple,
    db: asyncpg.Connection,
    sequence: list[Frame],
):
    state = _state(couple)
    rows_before = await gesture_count(db, couple.id)
    ws = await ws_connect(
        f"{fuzz_server.ws_url}?relationship_id={couple.id}&token={couple.a_token}", max_size=None
    )
    client = Client(ws)
    sent = 0
    closes = False
    for payload, expect in sequence:
        await ws.send(payload)
        sent += 1
        if expect == "close":
            closes = True
            break
    replies: list[dict] = []
    if closes:
        assert await client.closed_with(10) == 1009
        replies = [f for f in client.seen if f["type"] in REPLIES]
        # Every frame before the oversized one was answered, the oversized one was not.
        assert len(replies) == sent - 1, (sequence, replies)
    else:
        await client.send(type="ping", request_id="end-of-sequence")
        await client.expect("pong", timeout=10, request_id="end-of-sequence")
        replies = [f for f in client.seen if f["type"] in REPLIES][:-1]
        assert len(replies) == sent, (sequence, replies)
        for (_, expect), reply in zip(sequence, replies, strict=True):
            if expect == "ok":
                assert reply["type"] != "error", reply
            elif expect == "error":
                assert reply["type"] == "error", reply
        await close_quietly(client)
    new: set[str] = set()
    for reply in replies:
        if reply["type"] == "error":
            assert set(reply) <= {"type", "code", "message", "request_id"}, reply
            assert reply["code"] in ERROR_CODES, reply
            assert reply["message"] and "Traceback" not in reply["message"]
        elif reply["type"] == "gesture_sent":
            new.add(reply["gesture"]["id"])
    new -= state["sent"]
    state["sent"] |= new
    # A row for every gesture answered with gesture_sent, and none for anything else.
    assert await gesture_count(db, couple.id) - rows_before == len(new), sequence
    # The other socket of the process is served all along.
    state["pings"] += 1
    await observer.send(type="ping", request_id=state["pings"])
    await observer.expect("pong", timeout=10, request_id=state["pings"])


_STATES: dict[uuid.UUID, dict] = {}


def _state(couple: Couple) -> dict:
    """What the examples of one test run share (they share its server and its couple)."""
    return _STATES.setdefault(couple.id, {"sent": set(), "pings": 0})


async def test_the_observer_received_every_gesture_the_fuzzed_socket_sent(
    fuzz_server: InProcess, observer: Client, couple: Couple
):
    """The same check at the end of a short run without Hypothesis: a valid frame after a
    burst of hostile ones still reaches the partner."""
    client = await connect(fuzz_server.ws_url, couple, "partner_a")
    for payload in ["[" * 8000 + "]" * 8000, b"\xff\xfe", '{"type":"gesture"', "\x00"]:
        await client.ws.send(payload)
        assert (await client.expect("error"))["code"] == "invalid"
    await client.send(type="gesture", gesture_type="hug", request_id="valid")
    sent = (await client.expect("gesture_sent", request_id="valid"))["gesture"]
    assert await gather_received(observer, {sent["id"]}) == [sent["id"]]
    try:
        await client.ws.send("x" * (LIMIT + 1))
        assert await client.closed_with() == 1009
    except ConnectionClosed:
        pass
