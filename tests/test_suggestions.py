"""Section 4a: suggested notes. The composer as pure functions; the provider against a real
local HTTP server speaking chat-completions; the endpoint and sending with a suggestion on
the real servers."""

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import suggestions
from service.suggestions import Context, Suggester, clean, compose, prompt

from .conftest import InProcess, bearer, make_couple, make_settings, token
from .support_helpers import assert_error, gesture_count, send
from .support_ws import send_http
from .wsclient import Client

pytestmark = pytest.mark.anyio

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
HOUR = 3600.0
DAY = 24 * HOUR
NOTE = "meet me under the old bridge at six, bring the red umbrella"


def assert_clean_note(message: str) -> None:
    assert 0 < len(message) <= 280, message
    assert not CONTROL.search(message), repr(message)


# ---------------------------------------------------------------------------- the composer

SITUATIONS = {
    "first ever, morning": Context(gesture_type="hug", local_hour=8),
    "partner kissed an hour ago, evening": Context(
        gesture_type="hug",
        local_hour=20,
        received_type="kiss",
        received_age=HOUR,
        sent_age=DAY,
    ),
    "silent for a week, night": Context(
        gesture_type="hug",
        local_hour=1,
        sent_age=7 * DAY,
        received_type="hug",
        received_age=9 * DAY,
    ),
    "on a streak, afternoon": Context(
        gesture_type="hug", local_hour=15, sent_age=5 * HOUR, streak_days=6, week_count=14
    ),
    "another one right away": Context(gesture_type="hug", local_hour=13, sent_age=60),
}


def test_composer_reads_differently_in_different_situations_and_names_what_it_used():
    composed = {name: compose(ctx, seed=7) for name, ctx in SITUATIONS.items()}
    messages = [c.message for c in composed.values()]
    assert len(set(messages)) == len(messages), messages
    used = {name: c.context_used for name, c in composed.items()}
    assert "last_received" in used["partner kissed an hour ago, evening"]
    assert "kiss" in composed["partner kissed an hour ago, evening"].message
    assert "last_received" not in used["silent for a week, night"]  # too long ago to mention
    assert "last_sent" in used["silent for a week, night"]
    assert "7 days" in composed["silent for a week, night"].message
    assert "streak" in used["on a streak, afternoon"]
    assert "6 days in a row" in composed["on a streak, afternoon"].message
    assert "last_sent" in used["first ever, morning"]
    for c in composed.values():
        assert "time_of_day" in c.context_used
        assert set(c.context_used) <= {
            "time_of_day",
            "last_received",
            "last_sent",
            "streak",
            "recent_gestures",
        }


def test_composer_follows_the_time_of_day_and_the_gesture_type():
    by_hour = {h: compose(Context(gesture_type="kiss", local_hour=h), 1).message for h in (8, 21)}
    assert by_hour[8] != by_hour[21]
    by_type = {
        t: compose(Context(gesture_type=t, local_hour=12), 3).message
        for t in ("hug", "kiss", "thinking_of_you")
    }
    assert len(set(by_type.values())) == 3


def test_composer_is_a_pure_function_of_context_and_seed():
    ctx = SITUATIONS["partner kissed an hour ago, evening"]
    assert compose(ctx, 42) == compose(ctx, 42)
    assert len({compose(ctx, seed).message for seed in range(30)}) > 1


def test_composer_never_repeats_the_partners_note():
    ctx = Context(
        gesture_type="kiss",
        local_hour=19,
        received_type="hug",
        received_age=600,
        received_has_note=True,
        received_note=NOTE,
    )
    for seed in range(50):
        message = compose(ctx, seed).message
        assert NOTE not in message and "umbrella" not in message


contexts = st.builds(
    Context,
    gesture_type=st.sampled_from(["hug", "kiss", "thinking_of_you"]),
    local_hour=st.integers(0, 23),
    received_type=st.none() | st.sampled_from(["hug", "kiss", "thinking_of_you"]),
    received_age=st.none() | st.floats(0, 10_000 * DAY),
    received_has_note=st.booleans(),
    sent_age=st.none() | st.floats(0, 10_000 * DAY),
    streak_days=st.integers(0, 100_000),
    week_count=st.integers(0, 50),
    received_note=st.none() | st.text(min_size=12),
)


@settings(max_examples=200, deadline=None)
@given(contexts, st.integers())
def test_any_context_gives_a_clean_note_of_at_most_280_characters(ctx, seed):
    composed = compose(ctx, seed)
    assert_clean_note(composed.message)
    if ctx.received_note and len(ctx.received_note.strip()) >= 40:
        assert ctx.received_note not in composed.message


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2000))
def test_cleaning_leaves_no_control_character_and_at_most_280(text):
    out = clean(text)
    assert len(out) <= 280
    assert not CONTROL.search(out)
    assert out == out.strip()


def test_cleaning_keeps_newlines_and_tabs_trims_quotes_and_cuts_at_a_word():
    assert clean('  "Hi\tlove,\r\nsee you\x07 soon\x00"  ') == "Hi\tlove,\nsee you soon"
    long = clean("word " * 100)
    assert len(long) <= 280 and long.endswith("word…")


def test_prompt_carries_the_context_in_words_and_never_the_note():
    ctx = Context(
        gesture_type="kiss",
        local_hour=21,
        received_type="hug",
        received_age=2 * HOUR,
        received_has_note=True,
        received_note=NOTE,
        sent_age=3 * DAY,
        streak_days=4,
        week_count=9,
    )
    messages, used = prompt(ctx)
    text = json.dumps(messages)
    assert "umbrella" not in text and NOTE not in text
    assert "a kiss" in text and "evening" in text and "a hug with a note, 2 hours ago" in text
    assert "3 days ago" in text and "4 days in a row" in text
    assert used == ["time_of_day", "last_received", "last_sent", "streak", "recent_gestures"]


# ---------------------------------------------------------------------------- the provider


class FakeProvider:
    """A real HTTP server on 127.0.0.1 speaking chat-completions. The first path segment
    chooses its behaviour; every request is kept for the test to inspect."""

    LONG = "You are my sunshine. " * 40
    CONTROLS = "\x1b[31mThinking\x00 of you\x07,\r\n always\x7f.\u0085"

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict, dict]] = []
        self.release = asyncio.Event()
        app = Starlette(routes=[Route("/{mode}/chat/completions", self.answer, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task | None = None

    async def answer(self, request: Request) -> Response:
        mode = request.path_params["mode"]
        body = await request.json()
        self.requests.append((mode, dict(request.headers), body))
        match mode:
            case "good":
                return self._completion("Sending you a hug that lasts all evening.")
            case "slow":
                await self.release.wait()  # answers only once the test is over
                return self._completion("too late")
            case "error":
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
            case "long":
                return self._completion(self.LONG)
            case "controls":
                return self._completion(self.CONTROLS)
            case "empty":
                return self._completion("  \x00 \n ")
            case "garbage":
                return Response(b"<html>not json</html>", media_type="text/html")
            case "quotes":
                return self._completion(f"Like you said: {NOTE}")
        return JSONResponse({}, status_code=404)

    @staticmethod
    def _completion(content: str) -> JSONResponse:
        return JSONResponse(
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
            }
        )

    def url(self, mode: str) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/{mode}"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.release.set()
        self.server.should_exit = True
        if self.task is not None:
            await self.task


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    p = FakeProvider()
    await p.start()
    yield p
    await p.stop()


def fallbacks(reason: str) -> float:
    value = REGISTRY.get_sample_value("gesture_suggestion_fallbacks_total", {"reason": reason})
    return value or 0.0


CTX = Context(
    gesture_type="hug",
    local_hour=20,
    received_type="kiss",
    received_age=HOUR,
    received_has_note=True,
    received_note=NOTE,
    sent_age=DAY,
)


async def suggest_with(provider: FakeProvider, mode: str, timeout: float = 0.5):
    async with httpx.AsyncClient() as http:
        suggester = Suggester(
            http, url=provider.url(mode), model="test-model", key="sk-secret-key", timeout=timeout
        )
        return await suggester.suggest(CTX, seed=5)


async def test_a_good_answer_is_the_suggestion_and_the_request_is_the_documented_one(provider):
    composed = await suggest_with(provider, "good")
    assert composed.message == "Sending you a hug that lasts all evening."
    assert composed.source == "provider"
    assert composed.context_used == [
        "time_of_day",
        "last_received",
        "last_sent",
        "recent_gestures",
    ]
    [(_, headers, body)] = provider.requests
    assert headers["authorization"] == "Bearer sk-secret-key"
    assert body["model"] == "test-model"
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"] == prompt(CTX)[0]
    assert NOTE not in json.dumps(body) and "umbrella" not in json.dumps(body)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("slow", "timeout"),
        ("error", "status"),
        ("empty", "empty"),
        ("garbage", "invalid"),
        ("quotes", "quoted"),
    ],
)
async def test_a_failing_provider_falls_back_to_the_builtin_note_and_is_counted(
    provider, mode, reason
):
    before = fallbacks(reason)
    composed = await suggest_with(provider, mode)
    assert composed == compose(CTX, seed=5)
    assert composed.source == "builtin"
    assert fallbacks(reason) == before + 1


async def test_an_unreachable_provider_falls_back(provider):
    before = fallbacks("error")
    async with httpx.AsyncClient() as http:
        port = provider.url("good").split(":")[2].split("/")[0]
        await provider.stop()
        suggester = Suggester(http, url=f"http://127.0.0.1:{port}/v1", model="m", timeout=0.5)
        composed = await suggester.suggest(CTX, seed=5)
    assert composed == compose(CTX, seed=5)
    assert fallbacks("error") == before + 1


async def test_an_over_long_answer_is_cut_to_280_characters(provider):
    composed = await suggest_with(provider, "long")
    assert composed.source == "provider"
    assert_clean_note(composed.message)
    assert composed.message.startswith("You are my sunshine.")
    assert composed.message.endswith("…")


async def test_control_characters_are_taken_out_of_an_answer(provider):
    composed = await suggest_with(provider, "controls")
    assert composed.source == "provider"
    assert_clean_note(composed.message)
    assert composed.message == "[31mThinking of you,\n always."


def test_the_provider_url_may_be_a_base_url_or_the_full_endpoint():
    base = "https://api.example.com/v1"
    assert suggestions.endpoint_url(base) == f"{base}/chat/completions"
    assert suggestions.endpoint_url(f"{base}/") == f"{base}/chat/completions"
    assert suggestions.endpoint_url(f"{base}/chat/completions") == f"{base}/chat/completions"


# ---------------------------------------------------------------------------- the endpoint


async def generate(api, couple, headers=None, **fields) -> httpx.Response:
    body = {"relationship_id": str(couple.id), "sender_id": "partner_a", "gesture_type": "hug"}
    body.update(fields)
    return await api.post(
        "/api/gestures/generate-message", json=body, headers=headers or couple.a_headers
    )


async def test_generate_message_answers_a_clean_note_and_writes_no_gesture(api, couple, db):
    r = await generate(api, couple)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"message", "context_used", "suggestion_id"}
    assert_clean_note(body["message"])
    assert isinstance(body["context_used"], list)
    uuid.UUID(body["suggestion_id"])
    assert await gesture_count(db, couple.id) == 0


async def test_suggestions_follow_the_couples_history(api, couple):
    first = (await generate(api, couple)).json()
    assert "last_received" not in first["context_used"]
    await send(api, couple.id, couple.b_headers, gesture_type="kiss", message=NOTE)
    after = (await generate(api, couple)).json()
    assert "last_received" in after["context_used"]
    assert "kiss" in after["message"]
    assert after["message"] != first["message"]
    assert NOTE not in after["message"] and "umbrella" not in after["message"]


async def test_the_time_of_day_is_read_in_the_callers_time_zone(api, couple):
    answers = set()
    # 12 hours apart: no period of the day is that long, so the two always differ.
    for zone in ("UTC", "Etc/GMT-12"):
        r = await generate(api, couple, timezone=zone, gesture_type="kiss")
        assert r.status_code == 200, r.text
        answers.add(r.json()["message"])
    assert len(answers) == 2
    r = await generate(api, couple, timezone="Mars/Olympus_Mons")
    assert_error(r, 422, "timezone")


async def test_generate_message_has_the_same_roles_and_422s_as_sending(
    api, couple, database_url, db
):
    outsider = bearer(token("stranger-" + uuid.uuid4().hex[:8]))
    assert_error(await generate(api, couple, headers=outsider), 403)
    assert_error(await generate(api, couple, relationship_id=str(uuid.uuid4())), 403)
    assert_error(await generate(api, couple, sender_id="partner_b"), 403, "sender_id")
    for field, value in (
        ("sender_id", None),
        ("sender_id", "partner_c"),
        ("gesture_type", "slap"),
        ("gesture_type", None),
        ("relationship_id", "nope"),
    ):
        body = {"relationship_id": str(couple.id), "sender_id": "partner_a", "gesture_type": "hug"}
        if value is None:
            del body[field]
        else:
            body[field] = value
        r = await api.post("/api/gestures/generate-message", json=body, headers=couple.a_headers)
        assert_error(r, 422, field, case=f"{field}={value}")
    service = bearer(token(service=True))
    r = await generate(api, couple, headers=service, sender_id="partner_b")
    assert r.status_code == 200, r.text
    assert (
        await db.fetchval(
            "SELECT count(*) FROM gesture_suggestions WHERE relationship_id = $1", couple.id
        )
        == 1
    )


# ---------------------------------------------------------------------------- sending one


async def test_a_gesture_sent_with_a_suggestion_is_ai_generated_with_its_context(api, couple, db):
    await send(api, couple.id, couple.b_headers, gesture_type="kiss")
    suggestion = (await generate(api, couple, gesture_type="hug")).json()
    g = await send(
        api,
        couple.id,
        couple.a_headers,
        message=suggestion["message"],
        suggestion_id=suggestion["suggestion_id"],
    )
    assert g["ai_generated"] is True and g["message"] == suggestion["message"]
    got = (await api.get(f"/api/gestures/{g['id']}", headers=couple.b_headers)).json()
    assert got["ai_generated"] is True
    stored = json.loads(
        await db.fetchval(
            "SELECT ai_context_used::text FROM connection_gestures WHERE id = $1",
            uuid.UUID(g["id"]),
        )
    )
    assert stored == {
        "suggestion_id": suggestion["suggestion_id"],
        "source": "builtin",
        "context_used": suggestion["context_used"],
    }
    # Both partners see it on the gesture, as sent and as stored.
    assert g["ai_context_used"] == stored and got["ai_context_used"] == stored
    plain = await send(api, couple.id, couple.a_headers, message="no suggestion")
    assert plain["ai_context_used"] is None


async def test_a_client_cannot_write_ai_context_used(api, couple, db):
    g = await send(
        api, couple.id, couple.a_headers, ai_generated=True, ai_context_used={"evil": "x" * 100}
    )
    stored = await db.fetchval(
        "SELECT ai_context_used::text FROM connection_gestures WHERE id = $1", uuid.UUID(g["id"])
    )
    assert json.loads(stored) == {}


async def test_unknown_foreign_or_expired_suggestion_ids_are_422(api, couple, database_url, db):
    other = await make_couple(database_url)
    mine = (await generate(api, couple)).json()["suggestion_id"]
    theirs = (await generate(api, other, headers=other.a_headers)).json()["suggestion_id"]
    partners = (
        await generate(api, couple, headers=couple.b_headers, sender_id="partner_b")
    ).json()["suggestion_id"]
    for case, suggestion_id in {
        "unknown": str(uuid.uuid4()),
        "another relationship's": theirs,
        "the other partner's": partners,
    }.items():
        r = await api.post(
            "/api/gestures/send",
            json={
                "relationship_id": str(couple.id),
                "gesture_type": "hug",
                "sender_id": "partner_a",
                "suggestion_id": suggestion_id,
            },
            headers=couple.a_headers,
        )
        assert_error(r, 422, "suggestion_id", case=case)
    # An hour later it has expired.
    await db.execute(
        "UPDATE gesture_suggestions SET created_at = created_at - $2::interval WHERE id = $1",
        uuid.UUID(mine),
        timedelta(minutes=61),
    )
    r = await api.post(
        "/api/gestures/send",
        json={
            "relationship_id": str(couple.id),
            "gesture_type": "hug",
            "sender_id": "partner_a",
            "suggestion_id": mine,
        },
        headers=couple.a_headers,
    )
    assert_error(r, 422, "suggestion_id", case="expired")
    assert await gesture_count(db, couple.id) == 0


async def test_a_gesture_frame_with_a_suggestion_id_is_ai_generated(api, server, couple, db):
    suggestion = (await generate(api, couple)).json()
    a = await Client.open(server.ws_url, couple.id, couple.a_token)
    try:
        await a.send(
            type="gesture",
            gesture_type="hug",
            message=suggestion["message"],
            suggestion_id=suggestion["suggestion_id"],
            request_id="s1",
        )
        sent = (await a.expect("gesture_sent", request_id="s1"))["gesture"]
        assert sent["ai_generated"] is True
        stored = await db.fetchval(
            "SELECT ai_context_used::text FROM connection_gestures WHERE id = $1",
            uuid.UUID(sent["id"]),
        )
        assert json.loads(stored)["suggestion_id"] == suggestion["suggestion_id"]
        await a.send(
            type="gesture", gesture_type="hug", suggestion_id=str(uuid.uuid4()), request_id="s2"
        )
        error = await a.expect("error", request_id="s2")
        assert error["code"] == "invalid" and "suggestion_id" in error["message"]
    finally:
        await a.close()


# ---------------------------------------------------------------------------- limits


async def test_suggestions_are_rate_limited_per_sender_across_processes(
    database_url, redis_url, prefix, couple
):
    settings = make_settings(database_url, redis_url, prefix, suggestion_rate_limit_per_minute=3)
    one, two = InProcess(settings), InProcess(settings)
    await one.start()
    await two.start()
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            answers = []
            for server in (one, two, one, two):
                answers.append(
                    await http.post(
                        f"{server.url}/api/gestures/generate-message",
                        json={
                            "relationship_id": str(couple.id),
                            "sender_id": "partner_a",
                            "gesture_type": "hug",
                        },
                        headers=couple.a_headers,
                    )
                )
            assert [r.status_code for r in answers] == [200, 200, 200, 429]
            assert_error(answers[3], 429, "suggestions")
            assert int(answers[3].headers["retry-after"]) >= 1
            # The other partner has a limit of their own, and sending is not affected.
            r = await http.post(
                f"{two.url}/api/gestures/generate-message",
                json={
                    "relationship_id": str(couple.id),
                    "sender_id": "partner_b",
                    "gesture_type": "hug",
                },
                headers=couple.b_headers,
            )
            assert r.status_code == 200
            await send_http(http, one.url, couple)
    finally:
        await one.stop()
        await two.stop()


async def test_a_configured_provider_answers_through_the_endpoint_and_its_key_is_never_logged(
    database_url, redis_url, prefix, couple, provider, caplog
):
    caplog.set_level(logging.DEBUG)
    settings = make_settings(
        database_url,
        redis_url,
        prefix,
        suggestion_provider_url=provider.url("good"),
        suggestion_provider_model="test-model",
        suggestion_provider_key="sk-never-in-a-log",
        suggestion_provider_timeout=0.5,
    )
    server = InProcess(settings)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            r = await generate(http, couple)
            assert r.status_code == 200, r.text
            assert r.json()["message"] == "Sending you a hug that lasts all evening."
            g = await send(
                http, couple.id, couple.a_headers, suggestion_id=r.json()["suggestion_id"]
            )
            assert g["ai_generated"] is True
        settings_text = repr(settings)
    finally:
        await server.stop()
    assert "sk-never-in-a-log" not in caplog.text
    assert "sk-never-in-a-log" not in settings_text


async def test_a_retry_with_the_same_key_after_the_suggestion_expired_returns_the_first_gesture(
    api, couple, db
):
    """The idempotency window (24 h) outlasts the suggestion's hour: a retry of a send that
    went through is answered with its gesture, not refused for the expired suggestion."""
    suggestion = (await generate(api, couple)).json()
    body = {
        "relationship_id": str(couple.id),
        "gesture_type": "hug",
        "sender_id": "partner_a",
        "message": suggestion["message"],
        "suggestion_id": suggestion["suggestion_id"],
    }
    headers = {**couple.a_headers, "Idempotency-Key": f"retry-{uuid.uuid4()}"}
    first = await api.post("/api/gestures/send", json=body, headers=headers)
    assert first.status_code == 200, first.text
    await db.execute(
        "UPDATE gesture_suggestions SET created_at = created_at - $2::interval WHERE id = $1",
        uuid.UUID(suggestion["suggestion_id"]),
        timedelta(minutes=61),
    )
    again = await api.post("/api/gestures/send", json=body, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["gesture"] == first.json()["gesture"]
    assert (
        await db.fetchval(
            "SELECT count(*) FROM connection_gestures WHERE relationship_id = $1", couple.id
        )
        == 1
    )
    # Another body under the same key is still refused; so is the expired id without a key.
    other = await api.post("/api/gestures/send", json={**body, "message": "x"}, headers=headers)
    assert_error(other, 422, "suggestion_id")
    keyless = await api.post("/api/gestures/send", json=body, headers=couple.a_headers)
    assert_error(keyless, 422, "suggestion_id")
