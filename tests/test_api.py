"""Section 4: every endpoint, every status, on a real server."""

import asyncio
import base64
import uuid
from datetime import datetime

import httpx
import pytest
import redis.asyncio as aioredis

from service import store
from service.schemas import MAX_BODY

from .conftest import Couple, InProcess, bearer, make_settings, role_for, token
from .support_helpers import (
    Events,
    assert_error,
    assert_gesture_shape,
    assert_iso_utc,
    gesture_count,
    gesture_row,
    send,
    send_body,
)
from .wsclient import Client

pytestmark = pytest.mark.anyio


async def acknowledge(
    api, couple: Couple, gesture_id: str, headers=None, **fields
) -> httpx.Response:
    headers = headers or couple.b_headers
    fields.setdefault("acknowledged_by", role_for(headers))
    return await api.post(
        "/api/gestures/acknowledge", json={"gesture_id": gesture_id, **fields}, headers=headers
    )


async def pending(api, couple: Couple, headers, **params) -> dict:
    params.setdefault("partner_id", role_for(headers))
    r = await api.get(
        "/api/gestures/pending",
        params={"relationship_id": str(couple.id), **params},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    return r.json()


async def recent(api, couple: Couple, **params) -> httpx.Response:
    return await api.get(
        "/api/gestures/recent",
        params={"relationship_id": str(couple.id), **params},
        headers=couple.a_headers,
    )


# ---------------------------------------------------------------------------- send


async def test_send_answers_the_gesture_and_stores_it(api, couple, db):
    r = await api.post(
        "/api/gestures/send",
        json=send_body(couple.id, gesture_type="kiss", message="miss you", ai_generated=True),
        headers=couple.a_headers,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"gesture", "recipient_online"}
    assert body["recipient_online"] is False
    g = body["gesture"]
    assert_gesture_shape(g)
    assert g["relationship_id"] == str(couple.id)
    assert (g["gesture_type"], g["sent_by"], g["message"], g["ai_generated"]) == (
        "kiss",
        "partner_a",
        "miss you",
        True,
    )
    assert g["delivered_at"] is g["acknowledged_at"] is g["acknowledged_by"] is None
    assert g["response_gesture_id"] is None
    row = await gesture_row(db, g["id"])
    assert row["gesture_type"] == "kiss" and row["sent_by"] == "partner_a"
    assert row["message"] == "miss you" and row["ai_generated"] is True
    assert row["sent_at"] == assert_iso_utc(g["sent_at"])


async def test_send_defaults_message_to_null_and_ai_generated_to_false(api, couple):
    g = await send(api, couple.id, couple.a_headers, gesture_type="thinking_of_you")
    assert g["message"] is None and g["ai_generated"] is False


async def test_recipient_online_is_true_while_the_recipient_holds_a_websocket(api, server, couple):
    b = await Client.open(server.ws_url, couple.id, couple.b_token)
    try:
        await b.expect("presence")
        r = await api.post(
            "/api/gestures/send", json=send_body(couple.id), headers=couple.a_headers
        )
        assert r.status_code == 200 and r.json()["recipient_online"] is True
        # The sender's own connection does not make the recipient online.
        r = await api.post(
            "/api/gestures/send",
            json=send_body(couple.id, sender_id="partner_b"),
            headers=couple.b_headers,
        )
        assert r.status_code == 200 and r.json()["recipient_online"] is False
    finally:
        await b.close()


# ---------------------------------------------------------------------------- acknowledge


async def test_recipient_acknowledges_a_gesture(api, couple, db):
    g = await send(api, couple.id, couple.a_headers)
    r = await acknowledge(api, couple, g["id"])
    assert r.status_code == 200, r.text
    assert r.json() == {"acknowledged": True, "response_gesture": None}
    row = await gesture_row(db, g["id"])
    assert row["acknowledged_at"] is not None and row["acknowledged_by"] == "partner_b"
    assert row["response_gesture_id"] is None
    assert await gesture_count(db, couple.id) == 1
    got = (await api.get(f"/api/gestures/{g['id']}", headers=couple.a_headers)).json()
    assert got["acknowledged_by"] == "partner_b"
    assert assert_iso_utc(got["acknowledged_at"]) == row["acknowledged_at"]


async def test_send_back_creates_a_response_of_the_original_type_linked_to_it(api, couple, db):
    g = await send(api, couple.id, couple.a_headers, gesture_type="kiss")
    r = await acknowledge(api, couple, g["id"], send_back=True, send_back_message="you too")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["acknowledged"] is True
    response = body["response_gesture"]
    assert_gesture_shape(response)
    assert (response["gesture_type"], response["sent_by"], response["message"]) == (
        "kiss",
        "partner_b",
        "you too",
    )
    assert response["relationship_id"] == str(couple.id)
    row = await gesture_row(db, g["id"])
    assert row["response_gesture_id"] == uuid.UUID(response["id"])
    assert (await gesture_row(db, response["id"]))["sent_by"] == "partner_b"
    got = (await api.get(f"/api/gestures/{g['id']}", headers=couple.a_headers)).json()
    assert got["response_gesture_id"] == response["id"]
    # The response is pending for the original sender.
    waiting = await pending(api, couple, couple.a_headers)
    assert [x["id"] for x in waiting["gestures"]] == [response["id"]]


async def test_send_back_type_overrides_the_original_type(api, couple):
    g = await send(api, couple.id, couple.a_headers, gesture_type="kiss")
    r = await acknowledge(api, couple, g["id"], send_back=True, send_back_type="hug")
    assert r.json()["response_gesture"]["gesture_type"] == "hug"


async def test_second_acknowledgement_answers_false_and_sends_nothing_back(api, couple, db):
    g = await send(api, couple.id, couple.a_headers)
    first = await acknowledge(api, couple, g["id"], send_back=True)
    assert first.json()["acknowledged"] is True
    again = await acknowledge(api, couple, g["id"], send_back=True)
    assert again.status_code == 200
    assert again.json() == {"acknowledged": False, "response_gesture": None}
    assert await gesture_count(db, couple.id) == 2
    row = await gesture_row(db, g["id"])
    assert row["response_gesture_id"] == uuid.UUID(first.json()["response_gesture"]["id"])


async def test_sender_cannot_acknowledge_its_own_gesture(api, couple, db):
    g = await send(api, couple.id, couple.a_headers)
    r = await acknowledge(api, couple, g["id"], headers=couple.a_headers, send_back=True)
    assert_error(r, 403)
    row = await gesture_row(db, g["id"])
    assert row["acknowledged_at"] is None
    assert await gesture_count(db, couple.id) == 1


async def test_twenty_concurrent_acknowledgements_yield_one_and_one_response(api, couple, db):
    g = await send(api, couple.id, couple.a_headers)
    answers = await asyncio.gather(
        *(acknowledge(api, couple, g["id"], send_back=True) for _ in range(20))
    )
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    won = [r.json() for r in answers if r.json()["acknowledged"]]
    assert len(won) == 1
    assert all(
        r.json()["response_gesture"] is None for r in answers if not r.json()["acknowledged"]
    )
    responses = await db.fetch(
        "SELECT id FROM connection_gestures WHERE relationship_id = $1 AND sent_by = 'partner_b'",
        couple.id,
    )
    assert [r["id"] for r in responses] == [uuid.UUID(won[0]["response_gesture"]["id"])]
    assert (await gesture_row(db, g["id"]))["response_gesture_id"] == responses[0]["id"]


# ---------------------------------------------------------------------------- pending


async def test_pending_lists_unacknowledged_gestures_sent_to_the_partner_oldest_first(api, couple):
    to_b = [await send(api, couple.id, couple.a_headers, message=f"n{i}") for i in range(4)]
    to_a = await send(api, couple.id, couple.b_headers)
    assert (await acknowledge(api, couple, to_b[1]["id"])).json()["acknowledged"]
    for params in ({}, {"partner_id": "partner_b"}):
        for_b = await pending(api, couple, couple.b_headers, **params)
        assert [g["id"] for g in for_b["gestures"]] == [to_b[i]["id"] for i in (0, 2, 3)]
        assert for_b["count"] == 3
    for_a = await pending(api, couple, couple.a_headers)
    assert for_a == {"gestures": [to_a], "count": 1}


async def test_pending_is_empty_for_a_new_relationship(api, couple):
    assert await pending(api, couple, couple.a_headers) == {"gestures": [], "count": 0}


# ---------------------------------------------------------------------------- recent


async def test_recent_lists_newest_first_with_a_default_page_of_20(api, couple):
    sent = [await send(api, couple.id, couple.a_headers) for _ in range(22)]
    r = await recent(api, couple)
    assert r.status_code == 200
    body = r.json()
    assert [g["id"] for g in body["gestures"]] == [g["id"] for g in reversed(sent)][:20]
    assert body["count"] == 20 and isinstance(body["next_before"], str)


async def test_recent_pages_through_every_gesture_exactly_once(api, couple):
    sent = []
    for i in range(7):
        headers = couple.a_headers if i % 2 else couple.b_headers
        sent.append(await send(api, couple.id, headers))
    seen, before, pages = [], None, 0
    while True:
        params = {"limit": 3} if before is None else {"limit": 3, "before": before}
        body = (await recent(api, couple, **params)).json()
        pages += 1
        assert body["count"] == len(body["gestures"]) <= 3
        seen += [g["id"] for g in body["gestures"]]
        before = body["next_before"]
        if before is None:
            break
    assert seen == [g["id"] for g in reversed(sent)]
    assert pages == 3


async def test_recent_last_page_has_no_cursor(api, couple):
    for _ in range(3):
        await send(api, couple.id, couple.a_headers)
    body = (await recent(api, couple, limit=3)).json()
    assert body["count"] == 3 and body["next_before"] is None


async def test_recent_accepts_limits_of_1_and_100(api, couple):
    await send(api, couple.id, couple.a_headers)
    await send(api, couple.id, couple.a_headers)
    for limit in (1, 100):
        body = (await recent(api, couple, limit=limit)).json()
        assert body["count"] == min(limit, 2)


async def test_recent_rejects_a_limit_outside_1_to_100(api, couple):
    for limit in ("0", "101", "-1", "ten", "1.5", ""):
        assert_error(await recent(api, couple, limit=limit), 422, "limit", case=limit)


async def test_recent_rejects_a_cursor_it_did_not_make(api, couple):
    await send(api, couple.id, couple.a_headers)
    naive = base64.urlsafe_b64encode(f"2024-01-01T00:00:00|{uuid.uuid4()}".encode()).decode()
    for cursor in ("garbage", "!!!", "MjAyNA", "bm90LWEtZGF0ZXxub3QtYS11dWlk", naive, "x" * 300):
        assert_error(await recent(api, couple, before=cursor), 422, "before", case=cursor)


async def test_recent_rejects_a_cursor_whose_time_leaves_the_calendar_in_utc(api, couple):
    """Year 1 at +14:00 and year 9999 at -14:00 parse, but are no time PostgreSQL can hold."""
    for at in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
        raw = f"{at}|{uuid.uuid4()}".encode()
        cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        assert_error(await recent(api, couple, before=cursor), 422, "before", case=at)


# ---------------------------------------------------------------------------- get


async def test_get_answers_the_gesture(api, couple):
    g = await send(api, couple.id, couple.a_headers, message="hi")
    for headers in (couple.a_headers, couple.b_headers):
        r = await api.get(f"/api/gestures/{g['id']}", headers=headers)
        assert r.status_code == 200 and r.json() == g


async def test_get_of_a_missing_gesture_is_404(api, couple):
    assert_error(await api.get(f"/api/gestures/{uuid.uuid4()}", headers=couple.a_headers), 404)


async def test_get_with_a_non_uuid_id_is_422_naming_it(api, couple):
    r = await api.get("/api/gestures/not-a-uuid", headers=couple.a_headers)
    assert_error(r, 422, "gesture_id")


# ---------------------------------------------------------------------------- bad input

TOO_LONG = "x" * 281

BAD_SENDS = {
    "relationship_id not a uuid": ({"relationship_id": "not-a-uuid"}, "relationship_id"),
    "relationship_id a number": ({"relationship_id": 7}, "relationship_id"),
    "gesture_type unknown": ({"gesture_type": "slap"}, "gesture_type"),
    "gesture_type a number": ({"gesture_type": 3}, "gesture_type"),
    "gesture_type missing": ({"gesture_type": None}, "gesture_type"),
    "sender_id unknown": ({"sender_id": "partner_c"}, "sender_id"),
    "message too long": ({"message": TOO_LONG}, "message"),
    "message with NUL": ({"message": "a\x00b"}, "message"),
    "message with BEL": ({"message": "a\x07b"}, "message"),
    "message with ESC": ({"message": "\x1b[31m"}, "message"),
    "message with carriage return": ({"message": "a\rb"}, "message"),
    "message with DEL": ({"message": "a\x7fb"}, "message"),
    "message with NEL": ({"message": "a\u0085b"}, "message"),
    "message a number": ({"message": 5}, "message"),
    "ai_generated a string": ({"ai_generated": "yes"}, "ai_generated"),
}


async def test_bad_send_field_is_422_naming_it_and_writes_nothing(api, couple, db):
    for case, (change, field) in BAD_SENDS.items():
        body = send_body(couple.id)
        body.update(change)
        if change.get("gesture_type", "") is None:
            del body["gesture_type"]
        r = await api.post("/api/gestures/send", json=body, headers=couple.a_headers)
        assert_error(r, 422, field, case=case)
    assert await gesture_count(db, couple.id) == 0


async def test_message_with_newline_and_tab_is_accepted_as_written(api, couple, db):
    g = await send(api, couple.id, couple.a_headers, message="a\nb\tc")
    assert g["message"] == "a\nb\tc"
    assert (await gesture_row(db, g["id"]))["message"] == "a\nb\tc"


async def test_message_of_exactly_280_characters_is_accepted(api, couple):
    g = await send(api, couple.id, couple.a_headers, message="é" * 280)
    assert g["message"] == "é" * 280


BAD_ACKS = {
    "gesture_id not a uuid": ({"gesture_id": "nope"}, "gesture_id"),
    "acknowledged_by unknown": ({"acknowledged_by": "partner_c"}, "acknowledged_by"),
    "send_back a string": ({"send_back": "yes"}, "send_back"),
    "send_back_type unknown": ({"send_back_type": "slap"}, "send_back_type"),
    "send_back_message too long": ({"send_back_message": TOO_LONG}, "send_back_message"),
    "send_back_message with NUL": ({"send_back_message": "\x00"}, "send_back_message"),
    "send_back_message with a control": ({"send_back_message": "a\x0bb"}, "send_back_message"),
}


async def test_bad_acknowledge_field_is_422_naming_it_and_changes_nothing(api, couple, db):
    g = await send(api, couple.id, couple.a_headers)
    for case, (change, field) in BAD_ACKS.items():
        body = {"gesture_id": g["id"], "acknowledged_by": "partner_b", "send_back": True, **change}
        r = await api.post("/api/gestures/acknowledge", json=body, headers=couple.b_headers)
        assert_error(r, 422, field, case=case)
    assert (await gesture_row(db, g["id"]))["acknowledged_at"] is None
    assert await gesture_count(db, couple.id) == 1


BAD_QUERIES = {
    "pending relationship_id": (
        "/api/gestures/pending",
        {"relationship_id": "x"},
        "relationship_id",
    ),
    "pending missing relationship_id": ("/api/gestures/pending", {}, "relationship_id"),
    "pending partner_id": (
        "/api/gestures/pending",
        {"relationship_id": str(uuid.uuid4()), "partner_id": "me"},
        "partner_id",
    ),
    "recent relationship_id": ("/api/gestures/recent", {"relationship_id": "1"}, "relationship_id"),
}


async def test_bad_query_is_422_naming_the_parameter(api, couple):
    for case, (path, params, field) in BAD_QUERIES.items():
        r = await api.get(path, params=params, headers=couple.a_headers)
        assert_error(r, 422, field, case=case)


NOT_JSON = [
    b"[" * 10_000,
    b"",
    b"{",
    b"not json",
    b"\xff\xfe{}",
    b'{"a":1}x',
    b'{"gesture_type": 5',
    b"[1,",
]


async def test_body_that_is_not_json_is_400(api, couple, db):
    service = bearer(token(service=True))
    for method, path, headers in (
        ("POST", "/api/gestures/send", couple.a_headers),
        ("POST", "/api/gestures/acknowledge", couple.b_headers),
        ("PUT", f"/api/relationships/{couple.id}", service),
    ):
        for content in NOT_JSON:
            r = await api.request(method, path, content=content, headers=headers)
            assert_error(r, 400, case=f"{path} {content!r}")
    assert await gesture_count(db, couple.id) == 0


async def test_body_that_is_json_but_not_an_object_is_422(api, couple, db):
    for content in (b"[]", b"42", b'"hug"', b"null"):
        r = await api.post("/api/gestures/send", content=content, headers=couple.a_headers)
        assert_error(r, 422, case=repr(content))
    assert await gesture_count(db, couple.id) == 0


async def test_body_over_16_kib_is_413_with_or_without_a_length(api, couple, db):
    body = send_body(couple.id, message="x" * MAX_BODY)
    r = await api.post("/api/gestures/send", json=body, headers=couple.a_headers)
    assert_error(r, 413)

    async def chunks():
        for _ in range(40):
            yield b" " * 1024

    r = await api.post("/api/gestures/send", content=chunks(), headers=couple.a_headers)
    assert_error(r, 413)
    assert await gesture_count(db, couple.id) == 0


async def test_body_of_16_kib_exactly_is_read(api, couple):
    head = (
        b'{"relationship_id": "%s", "gesture_type": "hug", "sender_id": "partner_a"'
        % str(couple.id).encode()
    )
    content = head + b" " * (MAX_BODY - len(head) - 1) + b"}"
    assert len(content) == MAX_BODY
    r = await api.post("/api/gestures/send", content=content, headers=couple.a_headers)
    assert r.status_code == 200, r.text


async def test_unknown_route_is_404_in_the_error_shape(api, couple):
    assert_error(await api.get("/api/nothing-here", headers=couple.a_headers), 404)
    assert_error(await api.get("/nope"), 404)


async def test_wrong_method_is_405_in_the_error_shape(api, couple):
    assert_error(await api.delete("/api/gestures/send", headers=couple.a_headers), 405)


async def test_a_method_a_path_does_not_serve_is_405_with_allow(api, couple):
    """`GET /api/gestures/send` is not a request for a gesture whose id is "send"."""
    gesture_id = str(uuid.uuid4())
    cases = [
        ("GET", "/api/gestures/send", "POST"),
        ("HEAD", "/api/gestures/send", "POST"),
        ("GET", "/api/gestures/acknowledge", "POST"),
        ("GET", "/api/gestures/generate-message", "POST"),
        ("PUT", "/api/gestures/send", "POST"),
        ("DELETE", "/api/gestures/send", "POST"),
        ("POST", "/api/gestures/pending", "GET, HEAD"),
        ("POST", "/api/gestures/stats", "GET, HEAD"),
        ("POST", f"/api/gestures/{gesture_id}", "GET, HEAD"),
        ("DELETE", f"/api/gestures/{gesture_id}", "GET, HEAD"),
        ("GET", f"/api/relationships/{gesture_id}", "PUT"),
    ]
    for method, path, allow in cases:
        for headers in (couple.a_headers, {}):
            r = await api.request(method, path, headers=headers)
            assert r.status_code == 405, (method, path, r.status_code, r.text)
            # Starlette lists a route's methods in set order: compare them as a set.
            assert set(r.headers["allow"].split(", ")) == set(allow.split(", ")), (method, path)
            if method != "HEAD":
                assert_error(r, 405, case=f"{method} {path}")
    # A path that is not a known one is still read as a gesture id.
    assert_error(await api.get("/api/gestures/sendx", headers=couple.a_headers), 422, "gesture_id")


async def test_sender_id_acknowledged_by_and_partner_id_are_required(api, couple, db):
    body = send_body(couple.id, sender_id=None)
    r = await api.post("/api/gestures/send", json=body, headers=couple.a_headers)
    assert_error(r, 422, "sender_id")
    assert await gesture_count(db, couple.id) == 0
    g = await send(api, couple.id, couple.a_headers)
    r = await api.post(
        "/api/gestures/acknowledge",
        json={"gesture_id": g["id"], "send_back": True},
        headers=couple.b_headers,
    )
    assert_error(r, 422, "acknowledged_by")
    assert (await gesture_row(db, g["id"]))["acknowledged_at"] is None
    r = await api.get(
        "/api/gestures/pending",
        params={"relationship_id": str(couple.id)},
        headers=couple.b_headers,
    )
    assert_error(r, 422, "partner_id")


# ---------------------------------------------------------------------------- health, OpenAPI


async def test_healthz_answers_200(api):
    r = await api.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


async def test_readyz_answers_200_when_postgres_and_redis_answer(api):
    r = await api.get("/readyz")
    assert r.status_code == 200
    assert r.json()["checks"]["postgres"] == "ok" and r.json()["checks"]["redis"] == "ok"


SECTION_4 = {
    "/api/gestures/send": "post",
    "/api/gestures/acknowledge": "post",
    "/api/gestures/pending": "get",
    "/api/gestures/recent": "get",
    "/api/gestures/generate-message": "post",
    "/api/gestures/stats": "get",
    "/api/gestures/{gesture_id}": "get",
    "/api/relationships/{relationship_id}": "put",
    "/healthz": "get",
    "/readyz": "get",
}


async def test_openapi_describes_every_endpoint(api):
    r = await api.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    for path, method in SECTION_4.items():
        assert method in doc["paths"].get(path, {}), path
    send_op = doc["paths"]["/api/gestures/send"]["post"]
    assert {"200", "401", "403", "413", "422", "429", "503"} <= set(send_op["responses"])
    assert "Idempotency-Key" in [p["name"] for p in send_op["parameters"]]
    schemas = doc["components"]["schemas"]
    ref = send_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = schemas[ref.rsplit("/", 1)[1]]
    assert body["properties"]["gesture_type"]["enum"] == ["hug", "kiss", "thinking_of_you"]
    assert body["properties"]["message"]["anyOf"][0]["maxLength"] == 280
    recent_params = {
        p["name"]: p for p in doc["paths"]["/api/gestures/recent"]["get"]["parameters"]
    }
    assert recent_params["limit"]["schema"]["minimum"] == 1
    assert recent_params["limit"]["schema"]["maximum"] == 100
    assert {"relationship_id", "gesture_type", "sender_id"} <= set(body["required"])
    pending_params = {
        p["name"]: p for p in doc["paths"]["/api/gestures/pending"]["get"]["parameters"]
    }
    assert pending_params["partner_id"]["required"] is True


async def test_openapi_links_send_to_acknowledge_and_get_and_describes_the_new_endpoints(api):
    doc = (await api.get("/openapi.json")).json()
    ops = {
        op["operationId"]: (path, method)
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }
    assert len(ops) == sum(len(item) for item in doc["paths"].values())  # ids are unique
    links = doc["paths"]["/api/gestures/send"]["post"]["responses"]["200"]["links"]
    targets = {link["operationId"] for link in links.values()}
    assert ops[links["GetGesture"]["operationId"]] == ("/api/gestures/{gesture_id}", "get")
    assert ops[links["AcknowledgeGesture"]["operationId"]] == ("/api/gestures/acknowledge", "post")
    assert targets == {"getGesture", "acknowledgeGesture"}
    assert links["GetGesture"]["parameters"] == {"gesture_id": "$response.body#/gesture/id"}
    assert links["AcknowledgeGesture"]["requestBody"]["gesture_id"] == "$response.body#/gesture/id"
    schemas = doc["components"]["schemas"]
    generate = doc["paths"]["/api/gestures/generate-message"]["post"]
    ref = generate["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert set(schemas[ref.rsplit("/", 1)[1]]["required"]) == {
        "message",
        "context_used",
        "suggestion_id",
    }
    assert "429" in generate["responses"]
    stats = doc["paths"]["/api/gestures/stats"]["get"]
    days = {p["name"]: p for p in stats["parameters"]}["days"]["schema"]
    assert (days["minimum"], days["maximum"], days["default"]) == (1, 365, 30)
    send_body_schema = schemas["SendGestureBody"]["properties"]
    assert send_body_schema["suggestion_id"]["anyOf"][0]["format"] == "uuid"
    assert "ai_context_used" not in send_body_schema


# ---------------------------------------------------------------------------- idempotency


async def test_same_idempotency_key_and_body_returns_the_first_gesture_once(
    api, couple, db, settings, redis_url, database_url
):
    events = await Events.subscribe(redis_url, f"{settings.channel_prefix}{couple.id}")
    try:
        headers = {**couple.a_headers, "Idempotency-Key": "key-1"}
        body = send_body(couple.id, message="once")
        first = await api.post("/api/gestures/send", json=body, headers=headers)
        again = await api.post("/api/gestures/send", json=body, headers=headers)
        assert first.status_code == again.status_code == 200
        assert again.json()["gesture"] == first.json()["gesture"]
        assert await gesture_count(db, couple.id) == 1
        seen = await events.drain(database_url)
        assert [e["gesture"]["id"] for e in seen] == [first.json()["gesture"]["id"]]
    finally:
        await events.close()


async def test_same_idempotency_key_with_a_different_body_is_422(api, couple, db):
    headers = {**couple.a_headers, "Idempotency-Key": "key-2"}
    first = await api.post("/api/gestures/send", json=send_body(couple.id), headers=headers)
    assert first.status_code == 200
    other = send_body(couple.id, gesture_type="kiss")
    assert_error(
        await api.post("/api/gestures/send", json=other, headers=headers), 422, "Idempotency-Key"
    )
    assert await gesture_count(db, couple.id) == 1


async def test_idempotency_key_is_per_sender(api, couple, db):
    a = await api.post(
        "/api/gestures/send",
        json=send_body(couple.id),
        headers={**couple.a_headers, "Idempotency-Key": "shared"},
    )
    b = await api.post(
        "/api/gestures/send",
        json=send_body(couple.id, sender_id="partner_b"),
        headers={**couple.b_headers, "Idempotency-Key": "shared"},
    )
    assert a.json()["gesture"]["id"] != b.json()["gesture"]["id"]
    assert await gesture_count(db, couple.id) == 2


async def test_malformed_idempotency_key_is_422(api, couple, db):
    for key in ("", "x" * 201, "tab\there", "é"):
        r = await api.post(
            "/api/gestures/send",
            json=send_body(couple.id),
            headers=[*couple.a_headers.items(), ("Idempotency-Key", key.encode())],
        )
        assert_error(r, 422, "Idempotency-Key", case=key)
    assert await gesture_count(db, couple.id) == 0


@pytest.mark.multiprocess
async def test_concurrent_repeats_of_one_key_on_two_processes_make_one_gesture(
    processes, couple, db, settings, redis_url, database_url
):
    p1, p2 = await processes(2)
    events = await Events.subscribe(redis_url, f"{settings.channel_prefix}{couple.id}")
    try:
        headers = {**couple.a_headers, "Idempotency-Key": f"burst-{uuid.uuid4()}"}
        body = send_body(couple.id, message="just once")
        async with httpx.AsyncClient(timeout=15) as client:
            answers = await asyncio.gather(
                *(
                    client.post(f"{p.url}/api/gestures/send", json=body, headers=headers)
                    for p in [p1, p2] * 10
                )
            )
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        ids = {r.json()["gesture"]["id"] for r in answers}
        assert len(ids) == 1
        assert await gesture_count(db, couple.id) == 1
        seen = await events.drain(database_url)
        assert [e["gesture"]["id"] for e in seen] == list(ids)
    finally:
        await events.close()


# ---------------------------------------------------------------------------- rate limit


@pytest.fixture
async def limited_api(database_url, redis_url, prefix):
    server = InProcess(make_settings(database_url, redis_url, prefix, rate_limit_per_minute=3))
    await server.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client
    await server.stop()


async def test_sender_past_the_rate_limit_gets_429_with_retry_after_and_no_row(
    limited_api, couple, db
):
    for _ in range(3):
        await send(limited_api, couple.id, couple.a_headers)
    r = await limited_api.post(
        "/api/gestures/send", json=send_body(couple.id), headers=couple.a_headers
    )
    assert_error(r, 429)
    retry_after = r.headers["retry-after"]
    assert retry_after.isdigit() and 0 < int(retry_after) <= 60
    assert await gesture_count(db, couple.id) == 3
    # The limit is the sender's: the other partner still sends.
    await send(limited_api, couple.id, couple.b_headers)


async def test_the_rate_limit_holds_when_redis_forgets_its_script(
    limited_api, couple, db, redis_url
):
    await send(limited_api, couple.id, couple.a_headers)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.script_flush()  # as a Redis restart does
    finally:
        await client.aclose()
    for _ in range(2):
        await send(limited_api, couple.id, couple.a_headers)
    r = await limited_api.post(
        "/api/gestures/send", json=send_body(couple.id), headers=couple.a_headers
    )
    assert_error(r, 429)
    assert await gesture_count(db, couple.id) == 3


async def test_sends_gathered_by_the_linger_are_limited_exactly_and_each_is_answered(
    database_url, redis_url, prefix, couple, db
):
    # A long linger, and sends 10 ms apart: inside its band (here 6.25 to 25 ms apart), so
    # that once the average gap comes down they wait for each other in batches. The limit
    # still counts each send, and each gets its own answer.
    settings = make_settings(
        database_url,
        redis_url,
        prefix,
        rate_limit_per_minute=40,
        send_linger=0.05,
        send_linger_gaps=(0.00625, 0.025),
    )
    server = InProcess(settings)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            body = send_body(couple.id)
            sends = []
            for _ in range(100):
                sends.append(
                    asyncio.create_task(
                        client.post("/api/gestures/send", json=body, headers=couple.a_headers)
                    )
                )
                await asyncio.sleep(0.01)  # the sends' pace: what is under test
            answers = await asyncio.gather(*sends)
    finally:
        await server.stop()
    sent = [r.json()["gesture"]["id"] for r in answers if r.status_code == 200]
    assert sorted(r.status_code for r in answers) == [200] * 40 + [429] * 60
    assert len(set(sent)) == 40
    assert await gesture_count(db, couple.id) == 40


# ------------------------------------------------------------ store (the seed checklist)


async def test_store_saves_reads_and_marks_delivery(database_url, couple, db):
    new = store.NewGesture(couple.id, "hug", "partner_a", "hi", False)
    [saved] = await store.insert_gestures(db, [new])
    assert saved.id == new.id and saved.sent_by == "partner_a" and saved.delivered_at is None
    assert await store.get_gesture(db, saved.id) == saved
    assert await store.get_gesture(db, uuid.uuid4()) is None
    assert [g.id for g in await store.pending(db, couple.id, "partner_b")] == [saved.id]
    assert await store.pending(db, couple.id, "partner_a") == []
    [marked] = await store.mark_delivered(db, [saved.id])
    assert isinstance(marked.delivered_at, datetime)
    assert await store.mark_delivered(db, [saved.id]) == []
    assert (await store.get_gesture(db, saved.id)).delivered_at == marked.delivered_at
    acked = await store.acknowledge(db, saved.id, "partner_b")
    assert acked is not None and acked.acknowledged_by == "partner_b"
    assert await store.acknowledge(db, saved.id, "partner_b") is None
    assert await store.pending(db, couple.id, "partner_b") == []
