"""Every Prometheus collector of the service, defined once, at import.

Callers only increment, set or observe. Each label takes its values from a small closed set
(a frame type, an outcome, a reason), never an id, a token or a note, so a scrape stays a
few kilobytes however many users there are. Collectors live in prometheus-client's default
registry, which also carries the client's `process_*` and `python_*` collectors; each process
serves its own figures at `GET /metrics` (`exposition()`), and Prometheus adds them up.

Hot paths use children bound once (`FRAMES_OUT_BY_TYPE`, `SEND_OUTCOME`): a dict lookup and
a locked add, no label parsing per frame.
"""

import gc
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# No `*_created` series beside every counter and histogram: they double a scrape and
# Prometheus's text format has no use for them.
disable_created_metrics()

# The frame types of CONTRACT section 5; anything else is counted as "other" (frames in
# that do not decode as "invalid").
CLIENT_FRAMES = ("gesture", "gesture_acknowledge", "ping")
SERVER_FRAMES = (
    "gesture_sent",
    "gesture_received",
    "gesture_delivered",
    "gesture_acknowledged",
    "gesture_acknowledged_confirm",
    "presence",
    "pong",
    "error",
)
SEND_OUTCOMES = ("ok", "replay", "rate_limited", "invalid", "forbidden", "unavailable")

CONNECTIONS = Gauge(
    "gesture_ws_connections",
    "WebSocket connections open on this process (accepted and authorized)",
)
FRAMES_IN = Counter(
    "gesture_ws_frames_received_total",
    "Frames received from clients, by type (invalid: did not decode)",
    ["type"],
)
FRAMES_OUT = Counter(
    "gesture_ws_frames_sent_total",
    "Frames written to client sockets, by type",
    ["type"],
)
SENDS = Counter(
    "gesture_sends_total",
    "Gesture sends (HTTP and WebSocket) by outcome",
    ["outcome"],
)
DELIVERY_SECONDS = Histogram(
    "gesture_delivery_seconds",
    "From a gesture's sent_at (its admission, just before commit) to its gesture_received "
    "frame written to a recipient socket connected at the time; first delivery on this "
    "process only",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
OUTBOX_WAITING = Gauge(
    "gesture_outbox_rows_waiting",
    "Events of the log that may not have reached Redis yet: the rows of processes whose "
    "published mark lags (Redis away, or the process dead and not yet taken over); shared "
    "by all processes, sampled at scrape",
)
OUTBOX_OLDEST_SECONDS = Gauge(
    "gesture_outbox_oldest_seconds",
    "Age of the oldest event that may not have reached Redis yet, 0 when none (sampled at scrape)",
)
# The event streams (CONTRACT section 6), read from Redis at scrape: the same figures from
# every process. `partition` is 0..EVENT_STREAMS-1; `group` names a consumer group, chosen
# by the operator of the consuming service, never a user's.
STREAM_LENGTH = Gauge(
    "gesture_event_stream_length",
    "Entries held by each event stream partition (sampled at scrape)",
    ["partition"],
)
GROUP_LAG = Gauge(
    "gesture_event_group_lag",
    "Entries of a partition not yet delivered to a consumer group (Redis 7 and later; "
    "sampled at scrape)",
    ["group", "partition"],
)
GROUP_PENDING = Gauge(
    "gesture_event_group_pending",
    "Entries delivered to a consumer group and not acknowledged yet (sampled at scrape)",
    ["group", "partition"],
)
DEAD_LETTERS = Gauge(
    "gesture_event_dead_letters",
    "Entries in a partition's dead-letter stream (sampled at scrape)",
    ["partition"],
)
GROUP_CATCHUPS = Gauge(
    "gesture_event_group_catchups",
    "Times the consumers of a group found their position gone and caught up from "
    "GET /api/events, as they recorded it in Redis (sampled at scrape)",
    ["group"],
)
GROUP_DEAD_LETTERED = Gauge(
    "gesture_event_group_dead_lettered",
    "Entries the consumers of a group moved to a dead-letter stream, as they recorded it "
    "in Redis (sampled at scrape)",
    ["group"],
)
SUBSCRIBER_RECONNECTS = Counter(
    "gesture_pubsub_reconnects_total",
    "Times this process's Redis pub/sub subscriber reconnected after losing its connection",
)
SLOW_CONSUMERS = Counter(
    "gesture_ws_slow_consumers_total",
    "Sockets closed (1008) because their client did not read its frames",
)
DB_POOL_IN_USE = Gauge(
    "gesture_db_pool_in_use",
    "PostgreSQL connections of this process's pool lent out (sampled at scrape)",
)
DB_POOL_SIZE = Gauge(
    "gesture_db_pool_size",
    "PostgreSQL connections this process's pool holds open (sampled at scrape)",
)
DB_POOL_MAX = Gauge(
    "gesture_db_pool_max",
    "The most PostgreSQL connections this process's pool may open (DB_POOL_MAX)",
)
# reason: timeout, error (transport), status (non-2xx), invalid (not a chat completion),
# empty (nothing left after cleaning), quoted (repeated the partner's note).
SUGGESTION_FALLBACKS = Counter(
    "gesture_suggestion_fallbacks_total",
    "Suggestions answered by the built-in composer because the configured provider failed",
    ["reason"],
)

GC_PAUSE_SECONDS = Histogram(
    "gesture_gc_pause_seconds",
    "Time the Python garbage collector held this process, one observation per collection, "
    "by generation (2: a full collection, whose length grows with the objects alive, i.e. "
    "with the sockets held)",
    ["generation"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
)
_GC_BY_GENERATION = [GC_PAUSE_SECONDS.labels(str(g)) for g in range(3)]
_gc_started = 0.0


def _time_gc(phase: str, info: dict) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        _GC_BY_GENERATION[info["generation"]].observe(time.perf_counter() - _gc_started)


gc.callbacks.append(_time_gc)

FRAMES_IN_BY_TYPE = {t: FRAMES_IN.labels(t) for t in (*CLIENT_FRAMES, "invalid")}
FRAMES_OUT_BY_TYPE = {t.encode(): FRAMES_OUT.labels(t) for t in SERVER_FRAMES}
FRAME_OUT_OTHER = FRAMES_OUT.labels("other")
SEND_OUTCOME = {o: SENDS.labels(o) for o in SEND_OUTCOMES}

# msgspec writes a tagged Struct's tag first: every frame starts with {"type":"<type>"
_TYPE_AT = len(b'{"type":"')


def frame_written(frame: bytes) -> None:
    """Count a frame written to a socket, by the type its encoded bytes start with."""
    end = frame.find(b'"', _TYPE_AT)
    FRAMES_OUT_BY_TYPE.get(frame[_TYPE_AT:end], FRAME_OUT_OTHER).inc()


def exposition() -> tuple[bytes, str]:
    """This process's metrics in Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
