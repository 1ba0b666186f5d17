"""The HTTP edge: decode, call `gestures`, encode. Errors map to statuses here, once:

| raised                   | status |
|--------------------------|--------|
| body not JSON            | 400    |
| errors.Unauthenticated   | 401    |
| errors.Forbidden         | 403    |
| errors.NotFound          | 404    |
| errors.Gone              | 410    |
| body over 16 KiB         | 413    |
| errors.Invalid, bad field| 422    |
| errors.RateLimited       | 429 with Retry-After |
| errors.Unavailable       | 503    |
| anything else            | 500, logged with its traceback, never shown |

`ENDPOINTS` is the one description of the API: routing and `/openapi.json` are both made
from it, with the same Structs that validate requests.
"""

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import errors, metrics
from .auth import Caller, bearer
from .gestures import Gestures
from .schemas import (
    DECODE_ERRORS,
    MAX_BODY,
    AcknowledgeBody,
    AcknowledgeResult,
    ErrorBody,
    EventPage,
    EventsQuery,
    GenerateMessageBody,
    Gesture,
    GestureList,
    Health,
    PendingQuery,
    RecentPage,
    RecentQuery,
    Relationship,
    RelationshipBody,
    SendGestureBody,
    SendResult,
    Stats,
    StatsQuery,
    Suggestion,
    acknowledge_body_decoder,
    encoder,
    generate_body_decoder,
    relationship_body_decoder,
    send_body_decoder,
)
from .validation import describe

log = logging.getLogger(__name__)

DEMO = Path(__file__).resolve().parent / "demo"

_STATUS: dict[type[errors.ServiceError], int] = {
    errors.Invalid: 422,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Gone: 410,
    errors.RateLimited: 429,
    errors.Unavailable: 503,
}


class BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail


def json(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(encoder.encode(obj), status, headers, media_type="application/json")


def error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return json(ErrorBody(detail=detail), status, headers)


async def _body(request: Request, decoder: msgspec.json.Decoder):
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise BadRequest(413, f"body over {MAX_BODY} bytes")
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > MAX_BODY:
            raise BadRequest(413, f"body over {MAX_BODY} bytes")
    try:
        return decoder.decode(bytes(chunks))
    except msgspec.ValidationError as exc:
        # The typed decoder stops at the first bad field, before it sees that the rest is
        # not JSON (truncated, trailing garbage): such a body is 400, not 422.
        try:
            msgspec.json.decode(bytes(chunks))
        except DECODE_ERRORS as not_json:
            raise BadRequest(400, describe(not_json)) from None
        raise BadRequest(422, describe(exc)) from None
    except DECODE_ERRORS as exc:
        raise BadRequest(400, describe(exc)) from None


def _query(request: Request, kind: type):
    try:
        return msgspec.convert(dict(request.query_params), kind, strict=False)
    except msgspec.ValidationError as exc:
        raise BadRequest(422, describe(exc)) from None


def _path_uuid(request: Request, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params[name])
    except ValueError:
        raise BadRequest(422, f"{name}: not a UUID") from None


def _caller(request: Request) -> Caller:
    return request.state.verify(bearer(request.headers.get("authorization")))


# ---------------------------------------------------------------------------- handlers


async def send(request: Request, g: Gestures) -> Response:
    caller = _caller(request)
    body: SendGestureBody = await _body(request, send_body_decoder)
    result, _ = await g.send(
        caller,
        body.relationship_id,
        body.gesture_type,
        body.sender_id,
        body.message,
        body.ai_generated,
        request.headers.get("idempotency-key"),
        suggestion_id=body.suggestion_id,
    )
    return json(result)


async def acknowledge(request: Request, g: Gestures) -> Response:
    caller = _caller(request)
    body: AcknowledgeBody = await _body(request, acknowledge_body_decoder)
    result = await g.acknowledge(
        caller,
        body.gesture_id,
        body.acknowledged_by,
        body.send_back,
        body.send_back_type,
        body.send_back_message,
    )
    return json(result)


async def pending(request: Request, g: Gestures) -> Response:
    caller = _caller(request)
    query: PendingQuery = _query(request, PendingQuery)
    return json(await g.pending(caller, query.relationship_id, query.partner_id))


async def recent(request: Request, g: Gestures) -> Response:
    caller = _caller(request)
    query: RecentQuery = _query(request, RecentQuery)
    return json(await g.recent(caller, query.relationship_id, query.limit, query.before))


async def generate_message(request: Request, g: Gestures) -> Response:
    caller = _caller(request)
    body: GenerateMessageBody = await _body(request, generate_body_decoder)
    suggestion = await g.suggest(
        caller, body.relationship_id, body.sender_id, body.gesture_type, body.timezone
    )
    return json(suggestion)


async def stats(request: Request, g: Gestures) -> Response:
    caller = _caller(request)
    query: StatsQuery = _query(request, StatsQuery)
    return json(await g.stats(caller, query.relationship_id, query.days))


async def get_gesture(request: Request, g: Gestures) -> Response:
    # `/api/gestures/send` and its siblings match `/{gesture_id}` too: a method they do not
    # serve is 405 with their Allow, not a complaint that "send" is no UUID.
    allowed = _STATIC_METHODS.get(request.url.path)
    if allowed is not None:
        return error(405, "Method Not Allowed", {"Allow": allowed})
    caller = _caller(request)
    return json(await g.get(caller, _path_uuid(request, "gesture_id")))


async def put_relationship(request: Request, g: Gestures) -> Response:
    caller = _caller(request)
    relationship_id = _path_uuid(request, "relationship_id")
    body: RelationshipBody = await _body(request, relationship_body_decoder)
    found = await g.put_relationship(caller, relationship_id, body.partner_a_id, body.partner_b_id)
    return json(found)


async def events(request: Request, g: Gestures) -> Response:
    caller = _caller(request)
    query: EventsQuery = _query(request, EventsQuery)
    return json(await g.events(caller, query.since, query.after, query.limit))


async def healthz(request: Request, g: Gestures) -> Response:
    return json(Health(status="ok"))


async def readyz(request: Request, g: Gestures) -> Response:
    checks = await request.state.readiness()
    ok = all(v == "ok" for v in checks.values())
    return json(Health(status="ok" if ok else "unavailable", checks=checks), 200 if ok else 503)


# ---------------------------------------------------------------------------- the table

Handler = Callable[[Request, Gestures], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    response: type
    body: type | None = None
    query: type | None = None
    path_params: tuple[str, ...] = ()
    headers: tuple[str, ...] = ()
    errors: tuple[int, ...] = (400, 401, 403, 413, 422, 503)
    auth: bool = True
    operation_id: str = ""
    # OpenAPI links from the 200 answer: name -> (operationId, parameters, requestBody).
    links: dict = field(default_factory=dict)


ENDPOINTS = (
    Endpoint(
        "POST",
        "/api/gestures/send",
        send,
        "Send a gesture to your partner",
        SendResult,
        body=SendGestureBody,
        headers=("Idempotency-Key",),
        errors=(400, 401, 403, 413, 422, 429, 503),
        operation_id="sendGesture",
        links={
            "GetGesture": {
                "operationId": "getGesture",
                "parameters": {"gesture_id": "$response.body#/gesture/id"},
                "description": "The gesture just sent",
            },
            "AcknowledgeGesture": {
                "operationId": "acknowledgeGesture",
                "requestBody": {
                    "gesture_id": "$response.body#/gesture/id",
                    "acknowledged_by": "partner_b",
                },
                "description": "The recipient acknowledges the gesture just sent",
            },
        },
    ),
    Endpoint(
        "POST",
        "/api/gestures/acknowledge",
        acknowledge,
        "Acknowledge a gesture you received, optionally sending one back",
        AcknowledgeResult,
        body=AcknowledgeBody,
        errors=(400, 401, 403, 404, 413, 422, 429, 503),
        operation_id="acknowledgeGesture",
    ),
    Endpoint(
        "GET",
        "/api/gestures/pending",
        pending,
        "Unacknowledged gestures sent to a partner, oldest first",
        GestureList,
        query=PendingQuery,
        operation_id="pendingGestures",
    ),
    Endpoint(
        "GET",
        "/api/gestures/recent",
        recent,
        "A relationship's gestures, newest first, a page at a time",
        RecentPage,
        query=RecentQuery,
        operation_id="recentGestures",
    ),
    Endpoint(
        "POST",
        "/api/gestures/generate-message",
        generate_message,
        "Suggest a note for the gesture you are about to send",
        Suggestion,
        body=GenerateMessageBody,
        errors=(400, 401, 403, 413, 422, 429, 503),
        operation_id="generateMessage",
        links={
            "SendWithSuggestion": {
                "operationId": "sendGesture",
                "requestBody": {
                    "relationship_id": "$request.body#/relationship_id",
                    "sender_id": "$request.body#/sender_id",
                    "gesture_type": "$request.body#/gesture_type",
                    "message": "$response.body#/message",
                    "suggestion_id": "$response.body#/suggestion_id",
                },
                "description": "Send the gesture with the suggested note",
            }
        },
    ),
    Endpoint(
        "GET",
        "/api/gestures/stats",
        stats,
        "The couple's statistics over the last `days` days",
        Stats,
        query=StatsQuery,
        operation_id="gestureStats",
    ),
    Endpoint(
        "GET",
        "/api/gestures/{gesture_id}",
        get_gesture,
        "One gesture",
        Gesture,
        path_params=("gesture_id",),
        errors=(401, 404, 422, 503),
        operation_id="getGesture",
    ),
    Endpoint(
        "PUT",
        "/api/relationships/{relationship_id}",
        put_relationship,
        "Create or update a relationship (service token only)",
        Relationship,
        body=RelationshipBody,
        path_params=("relationship_id",),
        operation_id="putRelationship",
    ),
    Endpoint(
        "GET",
        "/api/events",
        events,
        "The event log, a page at a time, for other services (service token only)",
        EventPage,
        query=EventsQuery,
        errors=(401, 403, 410, 422, 503),
        operation_id="events",
    ),
    Endpoint(
        "GET",
        "/healthz",
        healthz,
        "Liveness",
        Health,
        errors=(),
        auth=False,
        operation_id="healthz",
    ),
    Endpoint(
        "GET",
        "/readyz",
        readyz,
        "Readiness: PostgreSQL and Redis answer",
        Health,
        errors=(503,),
        auth=False,
        operation_id="readyz",
    ),
)


def _allow(path: str) -> str:
    """The Allow header of `path`, as Starlette writes it (GET brings HEAD)."""
    methods = {e.method for e in ENDPOINTS if e.path == path}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


# Paths without a parameter, and the methods each serves.
_STATIC_METHODS = {e.path: _allow(e.path) for e in ENDPOINTS if "{" not in e.path}


def _wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request, request.state.gestures)
        except BadRequest as exc:
            return error(exc.status, exc.detail)
        except errors.RateLimited as exc:
            return error(429, exc.message, {"Retry-After": str(exc.retry_after)})
        except errors.ServiceError as exc:
            headers = (
                {"WWW-Authenticate": "Bearer"} if isinstance(exc, errors.Unauthenticated) else None
            )
            return error(_STATUS.get(type(exc), 400), exc.message, headers)
        except Exception:
            log.exception("request failed", extra={"path": request.url.path})
            return error(500, "internal error")

    return endpoint


def direct_routes() -> dict[tuple[str, str], Callable[[Request], Awaitable[Response]]]:
    """The endpoints without a path parameter, by (method, path): `service.app.App` serves
    a request that matches one exactly without Starlette's middleware and router, which do
    nothing for it (the endpoint maps every error itself): 3.6 µs a request saved, of about
    150 (docs/performance.md). Anything else (HEAD, a trailing slash, a method not served)
    goes the long way, through the same `routes()`."""
    return {(e.method, e.path): _wrap(e.handler) for e in ENDPOINTS if "{" not in e.path}


def routes() -> list[Route | Mount]:
    table: list[Route | Mount] = [
        Route(e.path, _wrap(e.handler), methods=[e.method]) for e in ENDPOINTS
    ]
    table.append(Route("/openapi.json", openapi_endpoint, methods=["GET"]))
    table.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    # The demo page at /demo, its scripts and styles under /demo/ (see docs/operations.md).
    table.append(Route("/demo", demo_page, methods=["GET"]))
    table.append(Mount("/demo", StaticFiles(directory=DEMO), name="demo"))
    return table


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 in the API's error shape."""
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, exc.detail, exc.headers)


# ---------------------------------------------------------------------------- OpenAPI

_ERROR_TEXT = {
    400: "Body is not JSON",
    401: "Missing, malformed or expired token",
    403: "Not a partner of this relationship, or acting as the other partner",
    404: "No such gesture (or not yours)",
    410: "Events past their retention (the oldest kept time is in detail)",
    413: "Body over 16 KiB",
    422: "A field is invalid; `detail` names it",
    405: "Method not served on this path; see Allow",
    429: "Rate limited; see Retry-After",
    503: "PostgreSQL or Redis unavailable",
}


def openapi() -> dict:
    types = [e.response for e in ENDPOINTS] + [e.body for e in ENDPOINTS if e.body]
    types.append(ErrorBody)
    (_, components) = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    paths: dict[str, dict] = {}
    for e in ENDPOINTS:
        op: dict = {"operationId": e.operation_id, "summary": e.summary, "responses": {}}
        params = [
            {
                "name": p,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "format": "uuid"},
            }
            for p in e.path_params
        ]
        if e.query is not None:
            _, defs = msgspec.json.schema_components([e.query])
            schema = defs[e.query.__name__]
            required = set(schema.get("required", ()))
            for name, prop in schema["properties"].items():
                params.append(
                    {"name": name, "in": "query", "required": name in required, "schema": prop}
                )
        params += [
            {"name": h, "in": "header", "required": False, "schema": {"type": "string"}}
            for h in e.headers
        ]
        if params:
            op["parameters"] = params
        if e.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{e.body.__name__}"}
                    }
                },
            }
        op["responses"]["200"] = {
            "description": "OK",
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{e.response.__name__}"}
                }
            },
        }
        if e.links:
            op["responses"]["200"]["links"] = e.links
        for status in e.errors:
            op["responses"][str(status)] = {
                "description": _ERROR_TEXT[status],
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                },
            }
        if e.auth:
            op["security"] = [{"bearer": []}]
        paths.setdefault(e.path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Gesture service", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


async def openapi_endpoint(request: Request) -> Response:
    return Response(request.state.openapi, media_type="application/json")


async def metrics_endpoint(request: Request) -> Response:
    """This process's metrics in Prometheus text format (see `metrics`)."""
    await request.state.sample_metrics()
    body, content_type = metrics.exposition()
    return Response(body, headers={"Content-Type": content_type})


async def demo_page(request: Request) -> Response:
    # The page's tokens travel in the URL's fragment, which no request carries; and the
    # page is told not to leak its address to the scripts' and styles' requests either.
    return FileResponse(
        DEMO / "index.html",
        headers={
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": (
                "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                "frame-ancestors 'none'"
            ),
        },
    )
