"""Section 3: who may call, and as whom."""

import base64
import hashlib
import hmac
import json
import time
import uuid

import jwt
import pytest

from .conftest import SECRET, Couple, bearer, make_couple, token
from .support_helpers import assert_error, gesture_count, gesture_row, send, send_body

pytestmark = pytest.mark.anyio


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def _unsigned(claims: dict) -> str:
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."


def _hs512(claims: dict) -> str:
    head = f"{_b64({'alg': 'HS512', 'typ': 'JWT'})}.{_b64(claims)}"
    mac = hmac.new(SECRET.encode(), head.encode(), hashlib.sha512).digest()
    return f"{head}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def _claims(**extra) -> dict:
    return {"sub": "someone", "exp": int(time.time()) + 600, **extra}


BAD_AUTHORIZATION = {
    "missing": None,
    "bearer without token": "Bearer",
    "not a bearer scheme": "Basic dXNlcjpwYXNz",
    "malformed": "Bearer not-a-jwt",
    "three garbage parts": "Bearer a.b.c",
    "bad signature": "Bearer " + jwt.encode(_claims(), "another-secret-of-enough-length!!"),
    "alg none": "Bearer " + _unsigned(_claims()),
    "alg none as service": "Bearer " + _unsigned(_claims(role="service_role")),
    "expired": "Bearer " + jwt.encode(_claims(exp=int(time.time()) - 60), SECRET),
    "no exp": "Bearer " + jwt.encode({"sub": "someone"}, SECRET),
    "no sub": "Bearer " + jwt.encode({"exp": int(time.time()) + 600}, SECRET),
    "empty sub": "Bearer " + jwt.encode(_claims(sub=""), SECRET),
    "service without exp": "Bearer " + jwt.encode({"role": "service_role"}, SECRET),
    "HS512 with the secret": "Bearer " + _hs512(_claims()),
}


def _requests(couple: Couple, gesture_id: str) -> list[tuple[str, str, dict]]:
    rel = str(couple.id)
    return [
        ("POST", "/api/gestures/send", {"json": send_body(couple.id)}),
        (
            "POST",
            "/api/gestures/acknowledge",
            {"json": {"gesture_id": gesture_id, "acknowledged_by": "partner_b"}},
        ),
        (
            "GET",
            "/api/gestures/pending",
            {"params": {"relationship_id": rel, "partner_id": "partner_a"}},
        ),
        ("GET", "/api/gestures/recent", {"params": {"relationship_id": rel}}),
        ("GET", "/api/gestures/stats", {"params": {"relationship_id": rel}}),
        (
            "POST",
            "/api/gestures/generate-message",
            {"json": {"relationship_id": rel, "sender_id": "partner_a", "gesture_type": "hug"}},
        ),
        ("GET", f"/api/gestures/{gesture_id}", {}),
        (
            "PUT",
            f"/api/relationships/{rel}",
            {"json": {"partner_a_id": "x", "partner_b_id": "y"}},
        ),
    ]


async def test_bad_or_missing_token_gets_401_on_every_endpoint_and_changes_nothing(api, couple, db):
    gesture = await send(api, couple.id, couple.a_headers)
    for case, header in BAD_AUTHORIZATION.items():
        headers = {} if header is None else {"Authorization": header}
        for method, path, kwargs in _requests(couple, gesture["id"]):
            r = await api.request(method, path, headers=headers, **kwargs)
            assert_error(r, 401, case=f"{case}: {method} {path}")
            assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), path
    assert await gesture_count(db, couple.id) == 1
    row = await gesture_row(db, gesture["id"])
    assert row["acknowledged_at"] is None
    partners = await db.fetchrow(
        "SELECT partner_a_id, partner_b_id FROM relationships WHERE id = $1", couple.id
    )
    assert tuple(partners) == (couple.a, couple.b)


async def test_health_endpoints_need_no_token(api):
    assert (await api.get("/healthz")).status_code == 200
    assert (await api.get("/readyz")).status_code == 200
    assert (await api.get("/openapi.json")).status_code == 200


async def test_outsider_and_missing_relationship_get_the_same_403(api, couple, db):
    outsider = bearer(token("stranger-" + uuid.uuid4().hex[:8]))
    missing = uuid.uuid4()
    for rel, headers in ((couple.id, outsider), (missing, couple.a_headers)):
        answers = [
            await api.post("/api/gestures/send", json=send_body(rel), headers=headers),
            await api.get(
                "/api/gestures/pending",
                params={"relationship_id": str(rel), "partner_id": "partner_a"},
                headers=headers,
            ),
            await api.get(
                "/api/gestures/recent", params={"relationship_id": str(rel)}, headers=headers
            ),
        ]
        for r in answers:
            assert_error(r, 403)
        if rel == couple.id:
            first = [r.json() for r in answers]
        else:
            assert [r.json() for r in answers] == first
    assert await gesture_count(db, couple.id) == 0
    assert await gesture_count(db, missing) == 0


async def test_sender_id_of_the_other_partner_is_403_and_writes_nothing(api, couple, db):
    r = await api.post(
        "/api/gestures/send",
        json=send_body(couple.id, sender_id="partner_b"),
        headers=couple.a_headers,
    )
    assert_error(r, 403, "sender_id")
    assert await gesture_count(db, couple.id) == 0


async def test_sender_id_equal_to_own_role_is_accepted(api, couple):
    g = await send(api, couple.id, couple.b_headers, sender_id="partner_b")
    assert g["sent_by"] == "partner_b"


async def test_role_comes_from_the_token_not_the_body(api, couple):
    g = await send(api, couple.id, couple.b_headers)
    assert g["sent_by"] == "partner_b"


async def test_acknowledged_by_other_than_own_role_is_403_and_acknowledges_nothing(api, couple, db):
    g = await send(api, couple.id, couple.a_headers)
    r = await api.post(
        "/api/gestures/acknowledge",
        json={"gesture_id": g["id"], "acknowledged_by": "partner_a", "send_back": True},
        headers=couple.b_headers,
    )
    assert_error(r, 403, "acknowledged_by")
    assert (await gesture_row(db, g["id"]))["acknowledged_at"] is None
    assert await gesture_count(db, couple.id) == 1


async def test_partner_id_other_than_own_role_is_403(api, couple):
    await send(api, couple.id, couple.a_headers)
    r = await api.get(
        "/api/gestures/pending",
        params={"relationship_id": str(couple.id), "partner_id": "partner_b"},
        headers=couple.a_headers,
    )
    assert_error(r, 403, "partner_id")


async def test_service_token_creates_and_updates_a_relationship(api, db):
    service = bearer(token(service=True))
    rel = uuid.uuid4()
    r = await api.put(
        f"/api/relationships/{rel}",
        json={"partner_a_id": "ann", "partner_b_id": "bob"},
        headers=service,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == str(rel)
    assert (body["partner_a_id"], body["partner_b_id"]) == ("ann", "bob")
    assert body["created_at"] is not None
    r = await api.put(
        f"/api/relationships/{rel}",
        json={"partner_a_id": "ann", "partner_b_id": "cat"},
        headers=service,
    )
    assert r.status_code == 200 and r.json()["partner_b_id"] == "cat"
    row = await db.fetchrow(
        "SELECT partner_a_id, partner_b_id FROM relationships WHERE id = $1", rel
    )
    assert tuple(row) == ("ann", "cat")


async def test_relationship_made_by_the_service_is_usable_at_once_by_its_partners(api):
    rel = uuid.uuid4()
    r = await api.put(
        f"/api/relationships/{rel}",
        json={"partner_a_id": "ann-" + rel.hex, "partner_b_id": "bob-" + rel.hex},
        headers=bearer(token(service=True)),
    )
    assert r.status_code == 200
    g = await send(api, rel, bearer(token("bob-" + rel.hex)), sender_id="partner_b")
    assert g["sent_by"] == "partner_b"


async def test_user_token_cannot_put_a_relationship(api, couple, db):
    rel = uuid.uuid4()
    for target in (rel, couple.id):
        r = await api.put(
            f"/api/relationships/{target}",
            json={"partner_a_id": couple.a, "partner_b_id": "intruder"},
            headers=couple.a_headers,
        )
        assert_error(r, 403)
    assert await db.fetchval("SELECT count(*) FROM relationships WHERE id = $1", rel) == 0
    row = await db.fetchrow("SELECT partner_b_id FROM relationships WHERE id = $1", couple.id)
    assert row["partner_b_id"] == couple.b


async def test_service_token_acts_as_the_partner_the_body_names(api, couple, db):
    service = bearer(token(service=True))
    g = await send(api, couple.id, service, sender_id="partner_b", gesture_type="kiss")
    assert g["sent_by"] == "partner_b"
    r = await api.get(
        "/api/gestures/pending",
        params={"relationship_id": str(couple.id), "partner_id": "partner_a"},
        headers=service,
    )
    assert r.status_code == 200 and [x["id"] for x in r.json()["gestures"]] == [g["id"]]
    r = await api.post(
        "/api/gestures/acknowledge",
        json={"gesture_id": g["id"], "acknowledged_by": "partner_a"},
        headers=service,
    )
    assert r.status_code == 200 and r.json()["acknowledged"] is True
    assert (await gesture_row(db, g["id"]))["acknowledged_by"] == "partner_a"


async def test_service_token_must_name_the_partner_it_acts_as(api, couple, db):
    r = await api.post(
        "/api/gestures/send",
        json=send_body(couple.id, sender_id=None),
        headers=bearer(token(service=True)),
    )
    assert_error(r, 422, "sender_id")
    assert await gesture_count(db, couple.id) == 0


async def test_service_token_still_gets_403_for_a_missing_relationship(api):
    r = await api.post(
        "/api/gestures/send",
        json=send_body(uuid.uuid4(), sender_id="partner_a"),
        headers=bearer(token(service=True)),
    )
    assert_error(r, 403)


async def test_gesture_of_another_relationship_is_404_like_a_missing_one(
    api, couple, database_url, db
):
    other = await make_couple(database_url)
    theirs = await send(api, other.id, other.a_headers)
    missing = str(uuid.uuid4())
    got_theirs = await api.get(f"/api/gestures/{theirs['id']}", headers=couple.b_headers)
    got_missing = await api.get(f"/api/gestures/{missing}", headers=couple.b_headers)
    assert_error(got_theirs, 404)
    assert got_theirs.json() == got_missing.json()
    ack_theirs = await api.post(
        "/api/gestures/acknowledge",
        json={"gesture_id": theirs["id"], "acknowledged_by": "partner_b", "send_back": True},
        headers=couple.b_headers,
    )
    ack_missing = await api.post(
        "/api/gestures/acknowledge",
        json={"gesture_id": missing, "acknowledged_by": "partner_b", "send_back": True},
        headers=couple.b_headers,
    )
    assert_error(ack_theirs, 404)
    assert ack_theirs.json() == ack_missing.json()
    assert (await gesture_row(db, theirs["id"]))["acknowledged_at"] is None
    assert await gesture_count(db, other.id) == 1


def test_a_remembered_token_is_refused_once_it_expires():
    """The verifier's memory of good tokens never outlives their `exp`."""
    from service import auth, errors

    now = [time.time()]
    verifier = auth.Verifier(SECRET, clock=lambda: now[0])
    tok = auth.issue(SECRET, sub="alice", ttl=60)
    assert verifier(tok).user_id == "alice"
    assert verifier(tok).user_id == "alice"  # remembered
    now[0] += 120
    with pytest.raises(errors.Unauthenticated, match="expired"):
        verifier(tok)


def test_a_bad_token_is_never_remembered():
    from service import auth, errors

    verifier = auth.Verifier(SECRET, size=2)
    for _ in range(2):
        with pytest.raises(errors.Unauthenticated):
            verifier(auth.issue("another-secret-that-is-long-enough-to-sign!", sub="x"))
    tokens = [auth.issue(SECRET, sub=f"u{i}") for i in range(3)]
    assert [verifier(t).user_id for t in tokens] == ["u0", "u1", "u2"]
