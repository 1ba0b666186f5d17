"""All SQL, over one asyncpg pool.

Functions take a connection and return Structs from `schemas`; asyncpg Records never leave
this module. Every column is named. What spans rows runs in one transaction, opened by the
caller with `transaction(pool)`. Connection failures and timeouts become `errors.Unavailable`,
so a PostgreSQL outage answers 503 within `db_timeout` seconds instead of hanging.

`GroupCommit` runs the writes of many concurrent callers in one statement or transaction:
PostgreSQL spends most of a small write on the commit, so a batch of 50 costs little more
than one. A caller is answered only after the commit that holds its write.

Times: `sent_at` is set by the service when it admits a send, and `delivered_at` by the
process that wrote the frame to a recipient (so each event can be written in the same
statement as its row); `acknowledged_at` is the database's.
"""

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

import asyncpg
import msgspec

from . import errors
from .schemas import Gesture, Relationship

log = logging.getLogger(__name__)

Connection = asyncpg.Connection
Pool = asyncpg.Pool

GESTURE_COLUMNS = """id, relationship_id, gesture_type, sent_by, message,
    coalesce(ai_generated, false) AS ai_generated, sent_at, delivered_at,
    acknowledged_at, acknowledged_by, response_gesture_id,
    nullif(ai_context_used, '{}'::jsonb)::text AS ai_context_used"""

# Failures that mean "PostgreSQL is not there", as opposed to a bug or a constraint.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,
    asyncpg.AdminShutdownError,
)


def _gesture(r: asyncpg.Record) -> Gesture:
    return Gesture(
        id=r["id"],
        relationship_id=r["relationship_id"],
        gesture_type=r["gesture_type"],
        sent_by=r["sent_by"],
        message=r["message"],
        ai_generated=r["ai_generated"],
        sent_at=r["sent_at"],
        delivered_at=r["delivered_at"],
        acknowledged_at=r["acknowledged_at"],
        acknowledged_by=r["acknowledged_by"],
        response_gesture_id=r["response_gesture_id"],
        ai_context_used=_context(r["ai_context_used"]),
    )


def _context(text: str | None) -> dict | None:
    """The `ai_context_used` column as the gesture shows it: an object, or None."""
    if text is None:
        return None
    value = msgspec.json.decode(text)
    return value if isinstance(value, dict) and value else None


# ---------------------------------------------------------------------------- pool


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    timeout: float,
    command_timeout: float | None = -1.0,
) -> Pool:
    """The pool's one constructor. Raises Unavailable when PostgreSQL does not answer.
    Statements time out after `command_timeout` (default: `timeout`; None: never, for
    migrations that wait on a lock or build an index)."""
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            command_timeout=timeout if command_timeout == -1.0 else command_timeout,
            max_inactive_connection_lifetime=60.0,
            reset=_keep_session,
        )
    except _UNAVAILABLE as exc:
        raise errors.Unavailable(f"PostgreSQL did not answer: {type(exc).__name__}") from exc


async def _keep_session(conn: Connection) -> None:
    """Pool reset that sends nothing: this service keeps no session state (no LISTEN, no
    session advisory lock, no SET) on pooled connections, so asyncpg's default reset query
    would be a round trip per release for nothing."""


@contextlib.asynccontextmanager
async def connection(pool: Pool, timeout: float = 5.0) -> AsyncIterator[Connection]:
    """A pooled connection; PostgreSQL being away becomes Unavailable."""
    try:
        async with asyncio.timeout(timeout):
            conn = await pool.acquire()
    except _UNAVAILABLE as exc:
        raise errors.Unavailable("PostgreSQL is unavailable") from exc
    try:
        yield conn
    except (*_UNAVAILABLE, errors.Unavailable) as exc:
        # After a timeout asyncpg sends a CancelRequest and `release` waits for it: another
        # `timeout` against a PostgreSQL that does not answer. Drop the connection instead.
        _drop(conn)
        if isinstance(exc, errors.Unavailable):
            raise
        raise errors.Unavailable("PostgreSQL is unavailable") from exc
    finally:
        await pool.release(conn)


def _drop(conn: Connection) -> None:
    """Close a connection that PostgreSQL stopped answering on. One that was lost mid-query
    asyncpg has already closed and handed back to the pool, and its proxy then refuses every
    call, terminate included: that InterfaceError was a 500 (bench chaos, PostgreSQL cut)."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


@contextlib.asynccontextmanager
async def atomic(conn: Connection) -> AsyncIterator[Connection]:
    """A transaction on `conn`; PostgreSQL being away drops the connection instead of
    waiting for a ROLLBACK that would not come."""
    try:
        async with conn.transaction():
            try:
                yield conn
            except _UNAVAILABLE:
                _drop(conn)  # ROLLBACK would wait too; closing aborts the transaction
                raise
    except _UNAVAILABLE as exc:
        raise errors.Unavailable("PostgreSQL is unavailable") from exc


@contextlib.asynccontextmanager
async def transaction(pool: Pool, timeout: float = 5.0) -> AsyncIterator[Connection]:
    async with connection(pool, timeout) as conn, atomic(conn):
        yield conn


async def ping(pool: Pool) -> None:
    async with connection(pool, 2.0) as conn:
        await conn.fetchval("SELECT 1", timeout=2.0)


# ---------------------------------------------------------------------------- migrations

_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version TEXT PRIMARY KEY,
    checksum TEXT NOT NULL,
    applied_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW())"""
# Any constant: the key of the advisory lock that serialises concurrent `migrate` runs.
_MIGRATION_LOCK = 7_311_852_046


def migrations_dir() -> Path:
    """`sql/` beside the package in a checkout, or inside it in an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parent / "sql"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("no sql/ directory with the migrations was found")


def migration_files() -> list[tuple[str, str]]:
    """(version, SQL text) for every migration, in order."""
    return [(p.stem, p.read_text()) for p in sorted(migrations_dir().glob("*.sql"))]


async def apply_migrations(conn: Connection, progress: Callable[[str], None]) -> list[str]:
    """Apply what is missing, in order, each in its own transaction; returns what ran.

    Holds an advisory lock, so concurrent runs wait for each other and the second finds
    nothing left to do.
    """
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(_MIGRATIONS_TABLE)
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            progress(f"applying {version}")
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    version,
                    hashlib.sha256(sql.encode()).hexdigest(),
                )
            applied.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def missing_migrations(conn: Connection) -> list[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done: set[str] = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [version for version, _ in migration_files() if version not in done]


class OutboxRow:
    """An event row of the log, as the publisher needs it: where it goes (the channel, and
    the stream of its relationship; none for control events) and when its transaction
    began (`created_at`, the database's `now()`)."""

    __slots__ = ("channel", "created_at", "payload", "relationship_id")

    def __init__(
        self,
        channel: str,
        payload: bytes,
        relationship_id: uuid.UUID | None,
        created_at: datetime,
    ) -> None:
        self.channel = channel
        self.payload = payload
        self.relationship_id = relationship_id
        self.created_at = created_at


# (channel, payload, relationship id or None): an event to write with a change.
EventRow = tuple[str, bytes, uuid.UUID | None]


def _outbox_row(r: asyncpg.Record) -> OutboxRow:
    return OutboxRow(r["channel"], r["payload"], r["relationship_id"], r["created_at"])


# ---------------------------------------------------------------------------- relationships


async def get_relationships(
    conn: Connection, relationship_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Relationship]:
    rows = await conn.fetch(
        """SELECT id, partner_a_id, partner_b_id, created_at FROM relationships
        WHERE id = any($1::uuid[])""",
        relationship_ids,
    )
    return {r["id"]: Relationship(**dict(r)) for r in rows}


async def put_relationship(
    conn: Connection, relationship_id: uuid.UUID, partner_a_id: str | None, partner_b_id: str | None
) -> Relationship:
    r = await conn.fetchrow(
        """INSERT INTO relationships (id, partner_a_id, partner_b_id) VALUES ($1, $2, $3)
        ON CONFLICT (id) DO UPDATE
            SET partner_a_id = EXCLUDED.partner_a_id, partner_b_id = EXCLUDED.partner_b_id
        RETURNING id, partner_a_id, partner_b_id, created_at""",
        relationship_id,
        partner_a_id,
        partner_b_id,
    )
    return Relationship(**dict(r))


# ---------------------------------------------------------------------------- gestures


class NewGesture:
    """A gesture to insert. `id` is chosen before the insert, so an idempotency key can
    point at it, and `sent_at` when the send was admitted, so its event can be written in
    the same statement as the row (see `insert_sent`)."""

    __slots__ = (
        "ai_context_used",
        "ai_generated",
        "gesture_type",
        "id",
        "message",
        "relationship_id",
        "sent_at",
        "sent_by",
    )

    def __init__(
        self,
        relationship_id: uuid.UUID,
        gesture_type: str,
        sent_by: str,
        message: str | None,
        ai_generated: bool,
        ai_context_used: str | None = None,
    ) -> None:
        self.id = uuid.uuid4()
        self.relationship_id = relationship_id
        self.gesture_type = gesture_type
        self.sent_by = sent_by
        self.message = message
        self.ai_generated = ai_generated
        # JSON text the service composed (a suggestion's context); None: the column default.
        self.ai_context_used = ai_context_used
        self.sent_at = datetime.now(UTC)

    def gesture(self) -> Gesture:
        """The row as `insert_sent` writes it."""
        return Gesture(
            id=self.id,
            relationship_id=self.relationship_id,
            gesture_type=self.gesture_type,
            sent_by=self.sent_by,
            message=self.message,
            ai_generated=self.ai_generated,
            sent_at=self.sent_at,
            delivered_at=None,
            acknowledged_at=None,
            acknowledged_by=None,
            response_gesture_id=None,
            ai_context_used=_context(self.ai_context_used),
        )


_INSERT_COLUMNS = """(id, relationship_id, gesture_type, sent_by, message, ai_generated, sent_at,
    ai_context_used)"""
_INSERT_ROWS = """SELECT t_id, t_rel, t_type, t_by, t_message, t_ai, t_at,
        coalesce(t_ctx::jsonb, '{}'::jsonb)
    FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::bool[],
        $7::timestamptz[], $8::text[])
        AS t(t_id, t_rel, t_type, t_by, t_message, t_ai, t_at, t_ctx)"""


def _columns(new: Sequence[NewGesture]) -> list[list]:
    return [
        [g.id for g in new],
        [g.relationship_id for g in new],
        [g.gesture_type for g in new],
        [g.sent_by for g in new],
        [g.message for g in new],
        [g.ai_generated for g in new],
        [g.sent_at for g in new],
        [g.ai_context_used for g in new],
    ]


@contextlib.contextmanager
def _relationship_must_exist():
    """A relationship deleted after the caller's role was derived (a cached row) makes the
    insert break its foreign key: the same answer as for one that never existed."""
    try:
        yield
    except asyncpg.ForeignKeyViolationError as exc:
        if exc.constraint_name and "relationship" in exc.constraint_name:
            raise errors.Forbidden("not a partner of this relationship") from None
        raise


async def insert_sent(
    conn: Connection, new: Sequence[NewGesture], events: Sequence[EventRow], node: int
) -> list[OutboxRow]:
    """Insert gestures and their events in one statement: one round trip, atomic without a
    transaction (data-modifying WITH clauses run to completion, all or nothing)."""
    with _relationship_must_exist():
        created_at = await conn.fetchval(
            f"""WITH g AS (
            INSERT INTO connection_gestures {_INSERT_COLUMNS}
            {_INSERT_ROWS}),
        e AS ({_insert_events(9)})
        SELECT now()""",
            *_columns(new),
            *_event_columns(events, node),
        )
    return _outbox_rows(events, created_at)


async def insert_gestures(conn: Connection, new: Sequence[NewGesture]) -> list[Gesture]:
    """Insert many gestures in one statement; returned in the order given."""
    with _relationship_must_exist():
        rows = await conn.fetch(
            f"""INSERT INTO connection_gestures {_INSERT_COLUMNS}
            {_INSERT_ROWS}
            RETURNING {GESTURE_COLUMNS}""",
            *_columns(new),
        )
    by_id = {r["id"]: _gesture(r) for r in rows}
    return [by_id[g.id] for g in new]


async def claim_idempotency_key(
    conn: Connection,
    new: NewGesture,
    key: str,
    fingerprint: bytes,
    window_hours: int,
) -> tuple[uuid.UUID, bytes] | None:
    """Claim `key` for `new`; None when claimed, else the (gesture id, fingerprint) it holds.

    A concurrent claim of the same key waits on the primary key until the first commits,
    then finds it taken: the same key sent at once to two processes yields one gesture.
    """
    with _relationship_must_exist():
        claimed = await _claim(conn, new, key, fingerprint, window_hours)
    if claimed is not None:
        return None
    return await find_idempotency_key(conn, new.relationship_id, new.sent_by, key)


async def _claim(
    conn: Connection, new: NewGesture, key: str, fingerprint: bytes, window_hours: int
) -> uuid.UUID | None:
    return await conn.fetchval(
        """INSERT INTO gesture_idempotency
            (relationship_id, sent_by, key, fingerprint, gesture_id)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (relationship_id, sent_by, key) DO UPDATE
            SET fingerprint = EXCLUDED.fingerprint, gesture_id = EXCLUDED.gesture_id,
                created_at = now()
            WHERE gesture_idempotency.created_at < now() - make_interval(hours => $6)
        RETURNING gesture_id""",
        new.relationship_id,
        new.sent_by,
        key,
        fingerprint,
        new.id,
        window_hours,
    )


async def find_idempotency_key(
    conn: Connection,
    relationship_id: uuid.UUID,
    sent_by: str,
    key: str,
    window_hours: int | None = None,
) -> tuple[uuid.UUID, bytes] | None:
    """(gesture id, fingerprint) that `key` holds, if any: within the last `window_hours`
    when given, else expired or not."""
    r = await conn.fetchrow(
        """SELECT gesture_id, fingerprint FROM gesture_idempotency
        WHERE relationship_id = $1 AND sent_by = $2 AND key = $3
          AND ($4::int IS NULL OR created_at >= now() - make_interval(hours => $4::int))""",
        relationship_id,
        sent_by,
        key,
        window_hours,
    )
    return None if r is None else (r["gesture_id"], bytes(r["fingerprint"]))


async def forget_idempotency_keys(conn: Connection, window_hours: int) -> int:
    status = await conn.execute(
        "DELETE FROM gesture_idempotency WHERE created_at < now() - make_interval(hours => $1)",
        window_hours,
    )
    return int(status.split()[-1])


async def get_gesture(conn: Connection, gesture_id: uuid.UUID) -> Gesture | None:
    r = await conn.fetchrow(
        f"SELECT {GESTURE_COLUMNS} FROM connection_gestures WHERE id = $1", gesture_id
    )
    return None if r is None else _gesture(r)


async def get_gestures(conn: Connection, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Gesture]:
    rows = await conn.fetch(
        f"SELECT {GESTURE_COLUMNS} FROM connection_gestures WHERE id = any($1::uuid[])", ids
    )
    return {r["id"]: _gesture(r) for r in rows}


async def pending(
    conn: Connection, relationship_id: uuid.UUID, recipient: str, limit: int | None = None
) -> list[Gesture]:
    """Unacknowledged gestures sent to `recipient`, oldest first; the first `limit` of
    them when given (LIMIT NULL is no limit)."""
    rows = await conn.fetch(
        f"""SELECT {GESTURE_COLUMNS} FROM connection_gestures
        WHERE relationship_id = $1 AND sent_by <> $2 AND acknowledged_at IS NULL
        ORDER BY sent_at, id LIMIT $3""",
        relationship_id,
        recipient,
        limit,
    )
    return [_gesture(r) for r in rows]


async def pending_many(
    conn: Connection, wanted: Sequence[tuple[uuid.UUID, str]], limit: int
) -> dict[tuple[uuid.UUID, str], list[Gesture]]:
    """For many (relationship, recipient) pairs in one query: the oldest `limit`
    unacknowledged gestures sent to each recipient, oldest first."""
    wanted = list(dict.fromkeys(wanted))
    rows = await conn.fetch(
        f"""SELECT p.rid AS pair_relationship, p.recipient AS pair_recipient, g.*
        FROM unnest($1::uuid[], $2::text[]) AS p(rid, recipient)
        CROSS JOIN LATERAL (
            SELECT {GESTURE_COLUMNS} FROM connection_gestures c
            WHERE c.relationship_id = p.rid AND c.sent_by <> p.recipient
              AND c.acknowledged_at IS NULL
            ORDER BY c.sent_at, c.id LIMIT $3) g
        ORDER BY g.sent_at, g.id""",
        [rid for rid, _ in wanted],
        [role for _, role in wanted],
        limit,
    )
    found: dict[tuple[uuid.UUID, str], list[Gesture]] = {pair: [] for pair in wanted}
    for r in rows:
        found[(r["pair_relationship"], r["pair_recipient"])].append(_gesture(r))
    return found


async def recent(
    conn: Connection,
    relationship_id: uuid.UUID,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> list[Gesture]:
    """Newest first, strictly older than `before` (sent_at, id) when given."""
    if before is None:
        rows = await conn.fetch(
            f"""SELECT {GESTURE_COLUMNS} FROM connection_gestures WHERE relationship_id = $1
            ORDER BY sent_at DESC, id DESC LIMIT $2""",
            relationship_id,
            limit,
        )
    else:
        rows = await conn.fetch(
            f"""SELECT {GESTURE_COLUMNS} FROM connection_gestures
            WHERE relationship_id = $1 AND (sent_at, id) < ($3, $4)
            ORDER BY sent_at DESC, id DESC LIMIT $2""",
            relationship_id,
            limit,
            before[0],
            before[1],
        )
    return [_gesture(r) for r in rows]


async def acknowledge(conn: Connection, gesture_id: uuid.UUID, by: str) -> Gesture | None:
    """Mark acknowledged unless it already is; None when another acknowledgement won.

    Concurrent acknowledgements queue on the row lock; each re-checks `acknowledged_at IS
    NULL` after the winner commits, so exactly one gets the row.
    """
    r = await conn.fetchrow(
        f"""UPDATE connection_gestures
        SET acknowledged_at = clock_timestamp(), acknowledged_by = $2
        WHERE id = $1 AND acknowledged_at IS NULL
        RETURNING {GESTURE_COLUMNS}""",
        gesture_id,
        by,
    )
    return None if r is None else _gesture(r)


async def link_response(conn: Connection, gesture_id: uuid.UUID, response_id: uuid.UUID) -> Gesture:
    r = await conn.fetchrow(
        f"""UPDATE connection_gestures SET response_gesture_id = $2 WHERE id = $1
        RETURNING {GESTURE_COLUMNS}""",
        gesture_id,
        response_id,
    )
    return _gesture(r)


async def mark_delivered(conn: Connection, ids: Sequence[uuid.UUID]) -> list[Gesture]:
    """Set delivered_at where it is still null; returns only the gestures this call marked."""
    rows = await conn.fetch(
        f"""UPDATE connection_gestures SET delivered_at = clock_timestamp()
        WHERE id = any($1::uuid[]) AND delivered_at IS NULL
        RETURNING {GESTURE_COLUMNS}""",
        ids,
    )
    return [_gesture(r) for r in rows]


# The mark and its events in one statement, in a function (sql/015_delivery_mark.sql,
# answering with ids only since sql/016_delivery_mark_ids.sql) so that its plan is made
# with the table's current size: as a prepared statement, a generic plan cached while the
# table was tiny scanned all of it on every mark. Its condition is spelt
# `coalesce(acknowledged_at, delivered_at) IS NULL`, not `acknowledged_at IS NULL`, which on
# stale statistics had the planner read the whole partial index of unacknowledged gestures
# (12 ms a batch at 16,000 rows).
MARK_DELIVERED_FROM = """SELECT gesture_id, event_created_at
    FROM mark_gestures_delivered_ids($1, $2, $3, $4, $5, $6)"""


async def mark_delivered_from(
    conn: Connection,
    ids: Sequence[uuid.UUID],
    at: datetime,
    events: Sequence[EventRow],
    node: int,
) -> tuple[set[uuid.UUID], list[OutboxRow]]:
    """Set delivered_at to `at` where the gesture is neither delivered nor acknowledged,
    and write the event of each one marked (`events[i]` announces `ids[i]`), in one
    statement, atomic without a transaction. Returns the ids marked and their event rows."""
    if not ids:
        return set(), []
    rows = await conn.fetch(
        MARK_DELIVERED_FROM,
        ids,
        at,
        node,
        [e[0] for e in events],
        [e[1] for e in events],
        [e[2] for e in events],
    )
    if not rows:
        return set(), []
    marked = {r[0] for r in rows}
    created_at = rows[0][1]
    return marked, _outbox_rows(
        [e for i, e in zip(ids, events, strict=True) if i in marked], created_at
    )


async def changed_since(
    conn: Connection, relationship_ids: Sequence[uuid.UUID], since: datetime
) -> list[Gesture]:
    """What a subscriber that lost its connection at `since` may have missed."""
    rows = await conn.fetch(
        f"""SELECT {GESTURE_COLUMNS} FROM connection_gestures
        WHERE relationship_id = any($1::uuid[])
          AND (sent_at >= $2 OR delivered_at >= $2 OR acknowledged_at >= $2)
        ORDER BY sent_at, id""",
        relationship_ids,
        since,
    )
    return [_gesture(r) for r in rows]


# ---------------------------------------------------------------------------- suggestions

SUGGESTION_HOURS = 1


async def insert_suggestion(
    conn: Connection,
    suggestion_id: uuid.UUID,
    relationship_id: uuid.UUID,
    sent_by: str,
    gesture_type: str,
    context: str,
) -> None:
    """Remember a suggestion for an hour; `context` is the JSON the service composed."""
    with _relationship_must_exist():
        await conn.execute(
            """INSERT INTO gesture_suggestions
                (id, relationship_id, sent_by, gesture_type, context)
            VALUES ($1, $2, $3, $4, $5::jsonb)""",
            suggestion_id,
            relationship_id,
            sent_by,
            gesture_type,
            context,
        )


async def find_suggestion(
    conn: Connection, suggestion_id: uuid.UUID, relationship_id: uuid.UUID, sent_by: str
) -> str | None:
    """The context (JSON text) of a suggestion made for this sender in this relationship
    within the last hour; None for one unknown, expired or made for someone else."""
    return await conn.fetchval(
        """SELECT context::text FROM gesture_suggestions
        WHERE id = $1 AND relationship_id = $2 AND sent_by = $3
          AND created_at > now() - make_interval(hours => $4)""",
        suggestion_id,
        relationship_id,
        sent_by,
        SUGGESTION_HOURS,
    )


async def forget_suggestions(conn: Connection) -> int:
    status = await conn.execute(
        "DELETE FROM gesture_suggestions WHERE created_at < now() - make_interval(hours => $1)",
        SUGGESTION_HOURS,
    )
    return int(status.split()[-1])


class History:
    """What the composer may know of a couple: the other partner's last gesture, the
    sender's own last one, how many gestures the last week held (capped), the streak."""

    __slots__ = (
        "now",
        "received_acknowledged",
        "received_at",
        "received_has_note",
        "received_note",
        "received_type",
        "sent_at",
        "sent_type",
        "streak_days",
        "week_count",
    )

    def __init__(self, **fields: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, fields.get(name))


_HISTORY = """SELECT now() AS now,
    r.gesture_type AS r_type, r.sent_at AS r_at, r.message AS r_note,
    r.acknowledged_at IS NOT NULL AS r_ack,
    s.gesture_type AS s_type, s.sent_at AS s_at,
    (SELECT count(*) FROM (
        SELECT 1 FROM connection_gestures
        WHERE relationship_id = $1 AND sent_at > now() - interval '7 days' LIMIT 50) w
    ) AS week
FROM (SELECT 1) one
LEFT JOIN LATERAL (
    SELECT gesture_type, sent_at, message, acknowledged_at FROM connection_gestures
    WHERE relationship_id = $1 AND sent_by <> $2 ORDER BY sent_at DESC, id DESC LIMIT 1
) r ON true
LEFT JOIN LATERAL (
    SELECT gesture_type, sent_at FROM connection_gestures
    WHERE relationship_id = $1 AND sent_by = $2 ORDER BY sent_at DESC, id DESC LIMIT 1
) s ON true"""


async def history(conn: Connection, relationship_id: uuid.UUID, sender: str) -> History:
    """The composer's view of the couple: a few index probes, whatever their history's size."""
    r = await conn.fetchrow(_HISTORY, relationship_id, sender)
    return History(
        now=r["now"],
        received_type=r["r_type"],
        received_at=r["r_at"],
        received_note=r["r_note"],
        received_has_note=bool(r["r_note"]),
        received_acknowledged=r["r_ack"],
        sent_type=r["s_type"],
        sent_at=r["s_at"],
        week_count=r["week"],
        streak_days=await streak_days(conn, relationship_id),
    )


# ---------------------------------------------------------------------------- statistics

# Per sender, over the gestures sent since `now() - days`: counts by type, how many the
# other partner acknowledged and answered with a gesture, the median time to acknowledge.
# A range scan of idx_gestures_recent (or idx_gestures_analytics): never the whole table.
STATS_SQL = """WITH w AS (SELECT now() - make_interval(days => $2) AS since)
SELECT w.since, g.sent_by, g.hug, g.kiss, g.thinking_of_you, g.total, g.acknowledged,
    g.answered, g.median
FROM w LEFT JOIN LATERAL (
    SELECT sent_by,
        count(*) FILTER (WHERE gesture_type = 'hug') AS hug,
        count(*) FILTER (WHERE gesture_type = 'kiss') AS kiss,
        count(*) FILTER (WHERE gesture_type = 'thinking_of_you') AS thinking_of_you,
        count(*) AS total,
        count(acknowledged_at) AS acknowledged,
        count(response_gesture_id) AS answered,
        -- Of the acknowledged only: greatest(0, NULL) is 0, not NULL.
        percentile_cont(0.5) WITHIN GROUP (
            ORDER BY greatest(0, extract(epoch FROM acknowledged_at - sent_at))::float8
        ) FILTER (WHERE acknowledged_at IS NOT NULL) AS median
    FROM connection_gestures
    WHERE relationship_id = $1 AND sent_at >= w.since
    GROUP BY sent_by
) g ON true"""

# Consecutive UTC days with a gesture, ending today or yesterday: one index probe a day of
# the streak (each EXISTS is a range lookup on idx_gestures_recent), however long the
# history. `+ 24 hours`, not `+ 1 day`: a day is 24 hours in UTC whatever the session's zone.
STREAK_SQL = """WITH RECURSIVE today AS (
    SELECT date_bin('24 hours', now(), timestamptz '2000-01-01 00:00:00+00') AS d
), start AS (
    SELECT CASE
        WHEN EXISTS (SELECT 1 FROM connection_gestures WHERE relationship_id = $1
                     AND sent_at >= today.d AND sent_at < today.d + interval '24 hours')
            THEN today.d
        WHEN EXISTS (SELECT 1 FROM connection_gestures WHERE relationship_id = $1
                     AND sent_at >= today.d - interval '24 hours' AND sent_at < today.d)
            THEN today.d - interval '24 hours'
    END AS d
    FROM today
), streak(d) AS (
    SELECT d FROM start WHERE d IS NOT NULL
    UNION ALL
    SELECT streak.d - interval '24 hours' FROM streak
    WHERE EXISTS (SELECT 1 FROM connection_gestures WHERE relationship_id = $1
                  AND sent_at >= streak.d - interval '24 hours' AND sent_at < streak.d)
)
SELECT count(*) FROM streak"""


class SenderStats:
    __slots__ = ("acknowledged", "answered", "by_type", "median", "total")

    def __init__(
        self,
        by_type: dict[str, int],
        total: int,
        acknowledged: int,
        answered: int,
        median: float | None,
    ) -> None:
        self.by_type = by_type
        self.total = total
        self.acknowledged = acknowledged
        self.answered = answered
        self.median = median


async def stats(
    conn: Connection, relationship_id: uuid.UUID, days: int
) -> tuple[datetime, dict[str, SenderStats]]:
    """(since, per sender's role) for the gestures sent in the last `days` days."""
    rows = await conn.fetch(STATS_SQL, relationship_id, days)
    per: dict[str, SenderStats] = {}
    for r in rows:
        if r["sent_by"] is None:  # no gesture in the window
            continue
        per[r["sent_by"]] = SenderStats(
            {k: r[k] for k in ("hug", "kiss", "thinking_of_you")},
            r["total"],
            r["acknowledged"],
            r["answered"],
            r["median"],
        )
    return rows[0]["since"], per


async def streak_days(conn: Connection, relationship_id: uuid.UUID) -> int:
    return await conn.fetchval(STREAK_SQL, relationship_id)


# ---------------------------------------------------------------------------- event log


def _insert_events(first: int) -> str:
    """INSERT of events from four parameters numbered from `first`: the node, then arrays of
    channels, payloads and relationship ids. Nothing is returned: every row's `created_at`
    is the transaction's `now()`, which the statement around it reads once."""
    node, channels, payloads, rels = (f"${first + i}" for i in range(4))
    return f"""INSERT INTO gesture_events (node, channel, payload, relationship_id)
    SELECT {node}, e_channel, e_payload, e_rel
    FROM unnest({channels}::text[], {payloads}::bytea[], {rels}::uuid[])
        AS e(e_channel, e_payload, e_rel)"""


def _event_columns(events: Sequence[EventRow], node: int) -> list:
    return [node, [e[0] for e in events], [e[1] for e in events], [e[2] for e in events]]


def _outbox_rows(events: Sequence[EventRow], created_at: datetime) -> list[OutboxRow]:
    """The rows just written, from what was sent: reading them back would return each
    payload to the process that encoded it."""
    return [OutboxRow(channel, payload, rel, created_at) for channel, payload, rel in events]


_ADD_EVENTS = f"WITH e AS ({_insert_events(1)}) SELECT now()"


async def add_events(conn: Connection, events: Sequence[EventRow], node: int) -> list[OutboxRow]:
    """Write events to the log, in the caller's transaction."""
    if not events:
        return []
    created_at = await conn.fetchval(_ADD_EVENTS, *_event_columns(events, node))
    return _outbox_rows(events, created_at)


async def node_events(
    conn: Connection, node: int, since: datetime, after: tuple[int, int] | None, limit: int
) -> tuple[list[OutboxRow], tuple[int, int] | None]:
    """The rows `node` wrote in transactions that began at `since` or later, in log order,
    from after `after`; and the cursor to go on from (None when there were none)."""
    rows = await conn.fetch(
        """SELECT txid, id, channel, payload, relationship_id, created_at
        FROM gesture_events
        WHERE node = $1 AND created_at >= $2 AND (txid, id) > ($3::xid8, $4)
        ORDER BY txid, id LIMIT $5""",
        node,
        since,
        *(after or (0, -1)),
        limit,
    )
    if not rows:
        return [], None
    return [_outbox_row(r) for r in rows], (rows[-1]["txid"], rows[-1]["id"])


class Horizon(NamedTuple):
    """What the log no longer holds: cursors at or below (txid, id) lost events, and
    `retained_from` is the oldest time still kept."""

    txid: int
    id: int
    retained_from: datetime


async def event_horizon(conn: Connection) -> Horizon | None:
    row = await conn.fetchrow(
        "SELECT dropped_txid, dropped_id, retained_from FROM gesture_event_horizon"
    )
    return None if row is None else Horizon(*row.values())


async def event_start(conn: Connection, since: datetime) -> tuple[int, int]:
    """A cursor from which reading yields every event whose transaction began at `since` or
    later (and some older ones): just before the lowest transaction id among them, or, none
    yet, before every transaction still to end or to come."""
    txid = await conn.fetchval(
        """SELECT coalesce(
            (SELECT min(txid) FROM gesture_events WHERE created_at >= $1),
            pg_snapshot_xmin(pg_current_snapshot()))""",
        since,
    )
    return txid, -1


async def read_events(
    conn: Connection, after: tuple[int, int], limit: int
) -> tuple[list[bytes], tuple[int, int]]:
    """Up to `limit` events after the cursor `after`, in log order, and the cursor after the
    last one. Only transactions that have ended are read (below the oldest one still in
    progress), so a transaction that commits later cannot fall behind the cursor."""
    rows = await conn.fetch(
        """SELECT txid, id, payload FROM gesture_events
        WHERE (txid, id) > ($1::xid8, $2)
            AND txid < pg_snapshot_xmin(pg_current_snapshot())
            AND relationship_id IS NOT NULL
        ORDER BY txid, id LIMIT $3""",
        *after,
        limit,
    )
    if not rows:
        return [], after
    return [r["payload"] for r in rows], (rows[-1]["txid"], rows[-1]["id"])


async def truncate_old_events(conn: Connection, retention_days: int) -> list[int]:
    """Empty the day partitions that hold only days older than the retention, recording in
    the horizon what they held; returns the slots emptied. Waits for no lock: a slot that a
    reader holds is left for the next pass."""
    keep = await conn.fetch(
        """SELECT DISTINCT ((floor(extract(epoch FROM now()) / 86400))::bigint + d) % 32 AS slot
        FROM generate_series(-$1::int, 1) AS d""",
        retention_days,
    )
    kept = {r["slot"] for r in keep}
    emptied = []
    for slot in sorted(set(range(32)) - kept):
        table = f"gesture_events_{slot:02d}"
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '2s'")
            last = await conn.fetchrow(
                f"""SELECT txid, id FROM {table}
                ORDER BY txid DESC, id DESC LIMIT 1"""
            )
            if last is None:
                continue
            await conn.execute(f"TRUNCATE {table}")
            await conn.execute(
                """INSERT INTO gesture_event_horizon (dropped_txid, dropped_id, retained_from)
                VALUES ($1::xid8, $2,
                    to_timestamp(((floor(extract(epoch FROM now()) / 86400))::bigint
                        - $3) * 86400))
                ON CONFLICT (only_row) DO UPDATE SET
                    (dropped_txid, dropped_id) = (SELECT * FROM (VALUES
                        (EXCLUDED.dropped_txid, EXCLUDED.dropped_id),
                        (gesture_event_horizon.dropped_txid, gesture_event_horizon.dropped_id))
                        AS v(t, i) ORDER BY t DESC, i DESC LIMIT 1),
                    retained_from = greatest(gesture_event_horizon.retained_from,
                        EXCLUDED.retained_from)""",
                last["txid"],
                last["id"],
                retention_days,
            )
            emptied.append(slot)
    return emptied


# ---------------------------------------------------------------------------- nodes


class Node(NamedTuple):
    node: int
    host: str
    port: int | None
    pid: int | None
    version: str
    started_at: datetime
    seen_at: datetime
    published_through: datetime
    sockets: int
    alive: bool


async def register_node(
    conn: Connection, host: str, port: int | None, pid: int, version: str
) -> int:
    return await conn.fetchval(
        """INSERT INTO gesture_nodes (host, port, pid, version) VALUES ($1, $2, $3, $4)
        RETURNING node""",
        host,
        port,
        pid,
        version,
    )


async def beat(
    conn: Connection, node: int, sockets: int, published_through: datetime | None
) -> bool:
    """Record that `node` lives, holds `sockets` and has published everything of
    transactions begun before `published_through` (None: before now). False when its row is
    gone (a survivor took it over while this process could not beat): register again."""
    status = await conn.execute(
        """UPDATE gesture_nodes SET seen_at = now(), sockets = $2,
            published_through = coalesce($3, now())
        WHERE node = $1""",
        node,
        sockets,
        published_through,
    )
    return status != "UPDATE 0"


async def reregister_node(
    conn: Connection,
    node: int,
    host: str,
    port: int | None,
    pid: int,
    version: str,
    published_through: datetime,
) -> None:
    await conn.execute(
        """INSERT INTO gesture_nodes (node, host, port, pid, version, published_through)
        VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (node) DO NOTHING""",
        node,
        host,
        port,
        pid,
        version,
        published_through,
    )


async def claim_dead_node(conn: Connection, ttl: float, hold: float) -> tuple[int, datetime] | None:
    """Take over one node whose beat is older than `ttl` seconds: its beat is pushed `hold`
    seconds ahead so no other survivor takes it meanwhile. (node, published_through)."""
    row = await conn.fetchrow(
        """UPDATE gesture_nodes SET seen_at = now() + make_interval(secs => $2)
        WHERE node = (SELECT node FROM gesture_nodes
            WHERE seen_at < now() - make_interval(secs => $1)
            ORDER BY node LIMIT 1 FOR UPDATE SKIP LOCKED)
        RETURNING node, published_through""",
        ttl,
        hold,
    )
    return None if row is None else (row["node"], row["published_through"])


async def forget_node(conn: Connection, node: int) -> None:
    await conn.execute("DELETE FROM gesture_nodes WHERE node = $1", node)


async def nodes(conn: Connection, ttl: float) -> list[Node]:
    rows = await conn.fetch(
        """SELECT node, host, port, pid, version, started_at, seen_at, published_through,
            sockets, seen_at >= now() - make_interval(secs => $1) AS alive
        FROM gesture_nodes ORDER BY node""",
        ttl,
    )
    return [Node(*r.values()) for r in rows]


async def outbox_backlog(conn: Connection, grace: float = 5.0) -> tuple[int, float]:
    """Events that may not have reached Redis yet, and the age in seconds of the oldest (0
    when none): the rows of every node whose published mark lags its beat by more than
    `grace` seconds (Redis away, or the node dead and not yet taken over)."""
    row = await conn.fetchrow(
        """WITH behind AS (
            SELECT node, published_through FROM gesture_nodes
            WHERE published_through < seen_at - make_interval(secs => $1)
                OR seen_at < now() - make_interval(secs => $1))
        SELECT
            (SELECT count(*) FROM gesture_events e JOIN behind b ON e.node = b.node
                WHERE e.created_at >= b.published_through
                    AND e.created_at >= (SELECT min(published_through) FROM behind)) AS n,
            coalesce(extract(epoch FROM now() - (SELECT min(published_through) FROM behind)),
                0)::float8 AS oldest""",
        grace,
    )
    return row["n"], (row["oldest"] if row["n"] else 0.0)


def pool_usage(pool: Pool) -> tuple[int, int, int]:
    """(connections lent out, connections open, the most it may open) of the pool."""
    size = pool.get_size()
    return size - pool.get_idle_size(), size, pool.get_max_size()


# ---------------------------------------------------------------------------- group commit

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Runs `work(conn, items)` for many callers' items at once; `work` makes its writes
    atomic (one statement, or `atomic(conn)`).

    Writers take whatever has queued while the previous batch ran, so batches grow with
    load and a lone caller waits for nobody. `work` returns one result per item. If a batch
    fails, its items are retried one by one, so one bad item fails alone. When PostgreSQL is
    away, the batch and everything queued behind it fail at once with Unavailable; a caller
    still queued after `timeout` gets Unavailable and its item is never written; and past
    `max_queue` queued items, new ones are refused rather than let memory grow.
    """

    def __init__(
        self,
        pool: Pool,
        work: Callable[[Connection, list[T]], Awaitable[list[R]]],
        *,
        after_commit: Callable[[list[R]], None] | None = None,
        writers: int = 2,
        max_batch: int = 256,
        max_queue: int = 10_000,
        timeout: float = 5.0,
    ) -> None:
        self._pool = pool
        self._work = work
        self._after_commit = after_commit
        self._writers = writers
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._timeout = timeout
        # (item, its caller's future, when it stops waiting), oldest first.
        self._queue: list[tuple[T, asyncio.Future[R], float]] = []
        self._ready = asyncio.Event()
        # One timer for the whole queue, set for its oldest entry's end, rather than a
        # timeout (and a shield) for each caller.
        self._expiry: asyncio.TimerHandle | None = None

    async def submit(self, item: T) -> R:
        if len(self._queue) >= self._max_queue:
            raise errors.Unavailable("too many writes waiting for PostgreSQL")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((item, future, loop.time() + self._timeout))
        self._ready.set()
        if self._expiry is None:
            self._expiry = loop.call_at(self._queue[0][2], self._expire)
        # A caller that goes (cancelled) leaves its item to be written all the same.
        return await future

    def _expire(self) -> None:
        """Fail the entries still queued past their time (the oldest ones): never taken by a
        writer, they will not be written. Then wait for the next oldest."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        queue = self._queue
        now = loop.time()
        late = 0
        while late < len(queue) and queue[late][2] <= now:
            late += 1
        expired = queue[:late]
        del queue[:late]
        for _, future, _ in expired:
            if not future.done():
                future.set_exception(
                    errors.Unavailable("PostgreSQL did not take the write in time")
                )
        if queue:
            self._expiry = loop.call_at(queue[0][2], self._expire)

    async def run(self) -> None:
        """Run the writers until cancelled."""
        async with asyncio.TaskGroup() as group:
            for _ in range(self._writers):
                group.create_task(self._writer())

    async def _writer(self) -> None:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            batch = [(item, future) for item, future, _ in self._queue[: self._max_batch]]
            del self._queue[: self._max_batch]
            if self._queue:
                self._ready.set()
            await self._commit(batch)

    async def _commit(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            async with connection(self._pool, self._timeout) as conn:
                results = await self._work(conn, [item for item, _ in batch])
        except errors.Unavailable as exc:
            queued, self._queue = self._queue, []
            for _, future in batch + [(item, future) for item, future, _ in queued]:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception as exc:
            if len(batch) > 1:
                for one in batch:
                    await self._commit([one])
                return
            if not isinstance(exc, errors.ServiceError):
                log.error("write failed", extra={"error": type(exc).__name__})
                exc = errors.Unavailable("the write failed")
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
        if self._after_commit is not None:
            self._after_commit(results)


def fingerprint(*parts: Any) -> bytes:
    """A stable digest of a request's meaningful fields, to tell a replay from a reuse."""
    return hashlib.sha256(repr(parts).encode()).digest()
