"""Suggested notes: the built-in composer and the optional chat-completions provider.

The composer is a pure function of a `Context` (what the partner sent last and when, how
long since the sender's last gesture, the local time of day, the streak, how busy the last
week was) and a seed: no network, no model, no clock of its own. Different situations read
differently, and `context_used` names what the note drew on. It never repeats the partner's
note: it may say that there was one, not what it said.

An operator may configure an OpenAI-compatible chat-completions endpoint instead
(`SUGGESTION_PROVIDER_URL`, `_MODEL`, `_KEY`). It gets a short prompt built from the same
context, in words: the gesture type, the time of day, the types of the couple's last
gestures and how long ago they were, the streak. No note, no user or relationship id, no
token leaves the service. The call has `SUGGESTION_PROVIDER_TIMEOUT` seconds (3 by default)
in all; its answer is cleaned (control characters out, at most 280 characters). On an
error, a timeout, an empty answer or one that repeats the partner's note, the built-in
composer answers instead and `gesture_suggestion_fallbacks_total{reason}` counts it. The key
is sent only in the `Authorization` header and never logged.
"""

import asyncio
import logging
import random
import re
from dataclasses import dataclass
from datetime import datetime, tzinfo

import httpx

from .metrics import SUGGESTION_FALLBACKS
from .schemas import MAX_MESSAGE

log = logging.getLogger(__name__)

# Every name `context_used` may hold.
TIME_OF_DAY = "time_of_day"
LAST_RECEIVED = "last_received"
LAST_SENT = "last_sent"
STREAK = "streak"
RECENT_GESTURES = "recent_gestures"

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True)
class Context:
    """What a suggestion may draw on. Times are ages in seconds at the moment of asking."""

    gesture_type: str
    local_hour: int
    received_type: str | None = None
    received_age: float | None = None
    received_has_note: bool = False
    received_acknowledged: bool = False
    sent_age: float | None = None
    streak_days: int = 0
    week_count: int = 0
    # Only to make sure no suggestion repeats it; never put in a note or a prompt.
    received_note: str | None = None


def context_from(history, gesture_type: str, zone: tzinfo) -> Context:
    """A Context from `store.History` (taken at the database's `now`), read in `zone`."""
    now: datetime = history.now

    def age(at: datetime | None) -> float | None:
        return None if at is None else max(0.0, (now - at).total_seconds())

    return Context(
        gesture_type=gesture_type,
        local_hour=now.astimezone(zone).hour,
        received_type=history.received_type,
        received_age=age(history.received_at),
        received_has_note=bool(history.received_has_note),
        received_acknowledged=bool(history.received_acknowledged),
        sent_age=age(history.sent_at),
        streak_days=int(history.streak_days or 0),
        week_count=int(history.week_count or 0),
        received_note=history.received_note,
    )


@dataclass(frozen=True)
class Composed:
    message: str
    context_used: list[str]
    source: str  # "builtin" or "provider"


# ---------------------------------------------------------------------------- the composer


def period(hour: int) -> str:
    if 5 <= hour < 12:
        return "morning"
    if 12 <= hour < 18:
        return "afternoon"
    if 18 <= hour < 23:
        return "evening"
    return "night"


_CORE = {
    "hug": {
        "morning": [
            "A big warm hug to start your morning",
            "Good morning! Here's a hug to carry with you today",
        ],
        "afternoon": [
            "A hug to get you through the afternoon",
            "Sending you a squeeze in the middle of your day",
        ],
        "evening": [
            "Wrapping you in a hug this evening",
            "A cosy evening hug, just for you",
        ],
        "night": [
            "A sleepy hug before the night takes us",
            "Holding you close tonight, even from here",
        ],
    },
    "kiss": {
        "morning": ["A good-morning kiss for you", "Morning! A kiss to wake you up gently"],
        "afternoon": [
            "A little afternoon kiss, because why wait",
            "Blowing you a kiss across the afternoon",
        ],
        "evening": ["An evening kiss, warm and slow", "A kiss to end your day on a sweet note"],
        "night": ["A goodnight kiss from me to you", "One last kiss before sleep"],
    },
    "thinking_of_you": {
        "morning": [
            "First thing this morning: you",
            "Woke up with you on my mind",
        ],
        "afternoon": [
            "You crossed my mind this afternoon, and I smiled",
            "In the middle of everything, I'm thinking of you",
        ],
        "evening": [
            "This evening my thoughts keep drifting to you",
            "Winding down and thinking of you",
        ],
        "night": ["Still awake, and thinking of you", "You're the last thought of my day"],
    },
}

_RECEIVED = {
    "hug": ["Your hug {when} stayed with me", "I can still feel the hug you sent {when}"],
    "kiss": ["Still smiling about your kiss {when}", "Your kiss {when} made my heart skip"],
    "thinking_of_you": [
        "Knowing you thought of me {when} made my day",
        "You thinking of me {when} meant a lot",
    ],
}
_WITH_NOTE = ["and your sweet words", "and the note that came with it"]


def _when(age: float) -> str:
    if age < 15 * 60:
        return "just now"
    if age < HOUR:
        return "a little while ago"
    if age < DAY:
        return "earlier today"
    if age < 2 * DAY:
        return "yesterday"
    return "the other day"


def compose(ctx: Context, seed: int) -> Composed:
    """A note for `ctx`: a pure function of its arguments. `seed` picks among phrasings, so
    the same situation asked twice need not read the same."""
    rng = random.Random(seed)
    used: list[str] = []
    parts: list[str] = []

    if ctx.received_type in _RECEIVED and ctx.received_age is not None:
        if ctx.received_age < 3 * DAY:
            line = rng.choice(_RECEIVED[ctx.received_type]).format(when=_when(ctx.received_age))
            if ctx.received_has_note:  # that there was a note; never what it said
                line = f"{line} ({rng.choice(_WITH_NOTE)} too)"
            parts.append(line + ".")
            used.append(LAST_RECEIVED)

    moment = period(ctx.local_hour)
    core = rng.choice(_CORE.get(ctx.gesture_type, _CORE["hug"])[moment])
    parts.append(core + ("!" if rng.random() < 0.5 else "."))
    used.append(TIME_OF_DAY)

    if ctx.sent_age is None:
        parts.append("The first of many from me here.")
        used.append(LAST_SENT)
    elif ctx.sent_age > 3 * DAY:
        days = int(ctx.sent_age // DAY)
        parts.append(f"It's been {days} days since my last one; I've missed this.")
        used.append(LAST_SENT)
    elif ctx.sent_age < 10 * 60:
        parts.append("Yes, another one: one wasn't enough.")
        used.append(LAST_SENT)

    if ctx.streak_days >= 2:
        parts.append(f"{ctx.streak_days} days in a row of us!")
        used.append(STREAK)
    elif ctx.week_count >= 10:
        parts.append("We've been so close this week.")
        used.append(RECENT_GESTURES)

    return Composed(message=clean(" ".join(parts)), context_used=used, source="builtin")


# ---------------------------------------------------------------------------- cleaning

_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"


def clean(text: str, limit: int = MAX_MESSAGE) -> str:
    """No control character but newline and tab, no surrounding quotes or blank lines, at
    most `limit` characters (cut at a word when it can be, marked with an ellipsis)."""
    text = text.replace("\r\n", "\n")
    text = _CONTROLS.sub("", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    if len(text) > limit:
        cut = text[: limit - 1]
        space = cut.rfind(" ")
        if space > limit // 2:
            cut = cut[:space]
        text = cut.rstrip(" \t\n,;:-") + "…"
    return text


def _quotes(answer: str, note: str) -> bool:
    """Whether `answer` repeats the partner's note (a short note can't be told apart from
    an ordinary phrase, so only notes of some length count)."""
    note = " ".join(note.split()).casefold()
    return len(note) >= 12 and note in " ".join(answer.split()).casefold()


# ---------------------------------------------------------------------------- the provider


_SYSTEM = (
    "You write one short, warm, natural note (one or two sentences, under 200 characters) "
    "that a person sends to their partner along with a gesture in a couples app. Answer with "
    "the note only: no quotation marks, no preamble, no hashtags."
)
_GESTURE_WORDS = {"hug": "a hug", "kiss": "a kiss", "thinking_of_you": "a 'thinking of you'"}


def _ago(seconds: float) -> str:
    if seconds < HOUR:
        return f"{max(1, int(seconds // 60))} minutes ago"
    if seconds < 2 * DAY:
        return f"{int(seconds // HOUR)} hours ago"
    return f"{int(seconds // DAY)} days ago"


def prompt(ctx: Context) -> tuple[list[dict[str, str]], list[str]]:
    """The chat messages for `ctx` and the names of the context they carry. Exactly this
    leaves the service: no note, no id, no name."""
    used = [TIME_OF_DAY]
    facts = [
        f"I am sending {_GESTURE_WORDS.get(ctx.gesture_type, 'a gesture')}.",
        f"It is {period(ctx.local_hour)} where I am.",
    ]
    if ctx.received_type is not None and ctx.received_age is not None:
        note = " with a note" if ctx.received_has_note else ""
        facts.append(
            f"My partner's last gesture to me was {_GESTURE_WORDS.get(ctx.received_type)}"
            f"{note}, {_ago(ctx.received_age)}."
        )
        used.append(LAST_RECEIVED)
    if ctx.sent_age is None:
        facts.append("This is my first gesture in the app.")
    else:
        facts.append(f"My own last gesture was {_ago(ctx.sent_age)}.")
    used.append(LAST_SENT)
    if ctx.streak_days >= 2:
        facts.append(f"We have exchanged gestures {ctx.streak_days} days in a row.")
        used.append(STREAK)
    facts.append(f"We exchanged {ctx.week_count} gestures in the last week.")
    used.append(RECENT_GESTURES)
    messages = [
        {"role": "system", "content": _SYSTEM},
        {"role": "user", "content": " ".join(facts)},
    ]
    return messages, used


class ProviderFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def endpoint_url(url: str) -> str:
    """A base URL (`https://api.openai.com/v1`) or the full chat-completions URL."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


class Suggester:
    """Composes suggestions: the provider when one is configured, else (and whenever it
    fails) the built-in composer. Owns no client: the lifespan makes and closes `http`."""

    def __init__(
        self,
        http: httpx.AsyncClient | None = None,
        *,
        url: str = "",
        model: str = "",
        key: str = "",
        timeout: float = 3.0,
    ) -> None:
        self._http = http if url else None
        self._url = endpoint_url(url) if url else ""
        self._model = model
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._timeout = timeout

    async def suggest(self, ctx: Context, seed: int) -> Composed:
        fallback = compose(ctx, seed)
        if self._http is None:
            return fallback
        try:
            async with asyncio.timeout(self._timeout):
                return await self._ask(ctx)
        except TimeoutError:
            reason = "timeout"
        except ProviderFailed as exc:
            reason = exc.reason
        except (httpx.HTTPError, OSError):
            reason = "error"
        SUGGESTION_FALLBACKS.labels(reason).inc()
        log.warning("suggestion provider failed; built-in note used", extra={"reason": reason})
        return fallback

    async def _ask(self, ctx: Context) -> Composed:
        messages, used = prompt(ctx)
        body = {"model": self._model, "messages": messages, "max_tokens": 120, "n": 1}
        r = await self._http.post(  # type: ignore[union-attr]
            self._url, json=body, headers=self._headers, timeout=self._timeout
        )
        if r.status_code != 200:
            raise ProviderFailed("status")
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ProviderFailed("invalid") from None
        if not isinstance(content, str):
            raise ProviderFailed("invalid")
        message = clean(content)
        if not message:
            raise ProviderFailed("empty")
        if ctx.received_note and _quotes(message, ctx.received_note):
            raise ProviderFailed("quoted")
        return Composed(message=message, context_used=used, source="provider")
