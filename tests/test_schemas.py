"""Decoders turn any input into a Struct or a clean rejection; the note's limits hold."""

import json

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.schemas import (
    DECODE_ERRORS,
    MAX_MESSAGE,
    AcknowledgeBody,
    GestureFrame,
    SendGestureBody,
    acknowledge_body_decoder,
    event_decoder,
    frame_decoder,
    relationship_body_decoder,
    send_body_decoder,
)

DECODERS = {
    "send": send_body_decoder,
    "acknowledge": acknowledge_body_decoder,
    "relationship": relationship_body_decoder,
    "ws_frame": frame_decoder,
    "event": event_decoder,
}
FIELDS = sorted(
    {
        "type",
        "event",
        "relationship_id",
        "gesture_type",
        "sender_id",
        "message",
        "ai_generated",
        "gesture_id",
        "acknowledged_by",
        "send_back",
        "send_back_type",
        "send_back_message",
        "partner_a_id",
        "partner_b_id",
        "idempotency_key",
        "request_id",
    }
)
TAGS = ["gesture", "gesture_acknowledge", "ping", "gesture.sent", "hug", "partner_a"]
REL = "5b7d3b47-2a4e-4b7c-9d6a-0f1e2d3c4b5a"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.sampled_from([*TAGS, REL]),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=10,
)
# Objects shaped like the real ones: known keys, plausible and implausible values.
shaped = st.dictionaries(
    st.sampled_from(FIELDS), st.sampled_from([*TAGS, REL, None, True, 1]) | json_values
)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decodes_or_rejects(decoder: msgspec.json.Decoder, data: bytes) -> None:
    try:
        result = decoder.decode(data)
    except DECODE_ERRORS:
        return
    assert isinstance(result, msgspec.Struct)


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_become_a_struct_or_a_clean_rejection(name, data):
    _decodes_or_rejects(DECODERS[name], data)


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(value=json_values | shaped)
def test_arbitrary_json_becomes_a_struct_or_a_clean_rejection(name, value):
    _decodes_or_rejects(DECODERS[name], json.dumps(value).encode())


@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("data", [b"[" * 100_000, b'{"a":' * 50_000, b"\xff\xfe", b""])
def test_hostile_input_is_rejected_cleanly(name, data):
    with pytest.raises(DECODE_ERRORS):
        DECODERS[name].decode(data)


def _send(message: str) -> SendGestureBody:
    body = {
        "relationship_id": REL,
        "gesture_type": "hug",
        "sender_id": "partner_a",
        "message": message,
    }
    return send_body_decoder.decode(json.dumps(body).encode())


def test_note_of_exactly_280_characters_is_accepted():
    assert MAX_MESSAGE == 280
    assert _send("é" * 280).message == "é" * 280
    assert _send("🤗" * 280).message == "🤗" * 280


def test_note_of_281_characters_is_rejected_naming_message():
    with pytest.raises(msgspec.ValidationError, match="message"):
        _send("x" * 281)


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\r", "\x7f", "\x85", "\x9f"])
def test_note_with_a_control_character_is_rejected(char):
    with pytest.raises(msgspec.ValidationError, match="message"):
        _send(f"a{char}b")


def test_note_with_newline_and_tab_is_accepted():
    assert _send("a\nb\tc").message == "a\nb\tc"


def test_send_back_note_and_ws_note_follow_the_same_rules():
    ack = {"gesture_id": REL, "acknowledged_by": "partner_b", "send_back": True}
    ok = acknowledge_body_decoder.decode(json.dumps({**ack, "send_back_message": "a\nb"}))
    assert isinstance(ok, AcknowledgeBody)
    for bad in ("x" * 281, "\u0085"):
        with pytest.raises(msgspec.ValidationError, match="send_back_message"):
            acknowledge_body_decoder.decode(json.dumps({**ack, "send_back_message": bad}))
    frame = frame_decoder.decode(json.dumps({"type": "gesture", "gesture_type": "kiss"}))
    assert isinstance(frame, GestureFrame)
    with pytest.raises(msgspec.ValidationError, match="message"):
        frame_decoder.decode(
            json.dumps({"type": "gesture", "gesture_type": "kiss", "message": "\0"})
        )
