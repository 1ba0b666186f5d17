"""`python -m service migrate` builds the schema the seed describes, once, safely."""

import asyncio
import os
import sys

import asyncpg
import pytest

from service import store

from .conftest import ROOT, SECRET, make_settings, settings_env

pytestmark = pytest.mark.anyio

VERSIONS = [
    "010_relationships",
    "011_connection_gestures",
    "012_gesture_service",
    "013_gesture_suggestions",
    "014_event_log",
    "015_delivery_mark",
    "016_delivery_mark_ids",
]


async def run(*argv: str, env: dict[str, str], timeout: float = 60.0) -> tuple[int, str]:
    """Run a command in the checkout; its exit code and combined output."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace")


def migrate_env(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["DATABASE_URL"] = dsn
    return env


async def migrate(dsn: str) -> tuple[int, str]:
    return await run(sys.executable, "-m", "service", "migrate", env=migrate_env(dsn))


async def recorded(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY applied_at")
    finally:
        await conn.close()
    return [r["version"] for r in rows]


async def test_migrate_applies_every_migration_in_order_and_records_it(fresh_database):
    assert [v for v, _ in store.migration_files()] == VERSIONS
    code, out = await migrate(fresh_database)
    assert code == 0, out
    applying = [line.split()[1] for line in out.splitlines() if line.startswith("applying ")]
    assert applying == VERSIONS
    assert await recorded(fresh_database) == VERSIONS


async def test_second_migrate_applies_nothing(fresh_database):
    assert (await migrate(fresh_database))[0] == 0
    code, out = await migrate(fresh_database)
    assert code == 0, out
    assert "applying" not in out
    assert "0 applied" in out
    assert await recorded(fresh_database) == VERSIONS


async def test_concurrent_migrate_runs_both_succeed_and_apply_each_migration_once(
    fresh_database,
):
    results = await asyncio.gather(*(migrate(fresh_database) for _ in range(3)))
    assert all(code == 0 for code, _ in results), results
    applying = [
        line.split()[1]
        for _, out in results
        for line in out.splitlines()
        if line.startswith("applying ")
    ]
    assert sorted(applying) == VERSIONS
    assert await recorded(fresh_database) == VERSIONS


# ---------------------------------------------------------------------------- the seed schema

# column -> (data_type, nullable, default contains)
SEED_COLUMNS = {
    "id": ("uuid", "NO", "uuid_generate_v4()"),
    "relationship_id": ("uuid", "NO", None),
    "gesture_type": ("text", "NO", None),
    "sent_by": ("text", "NO", None),
    "message": ("text", "YES", None),
    "ai_generated": ("boolean", "YES", "false"),
    "ai_context_used": ("jsonb", "YES", "'{}'::jsonb"),
    "sent_at": ("timestamp with time zone", "YES", "now()"),
    "delivered_at": ("timestamp with time zone", "YES", None),
    "acknowledged_at": ("timestamp with time zone", "YES", None),
    "acknowledged_by": ("text", "YES", None),
    "response_gesture_id": ("uuid", "YES", None),
    "metadata": ("jsonb", "YES", "'{}'::jsonb"),
    "created_at": ("timestamp with time zone", "YES", "now()"),
}

SEED_INDEXES = {
    "idx_gestures_relationship": "(relationship_id)",
    "idx_gestures_sent_by": "(sent_by)",
    "idx_gestures_type": "(gesture_type)",
    "idx_gestures_sent_at": "(sent_at DESC)",
    "idx_gestures_unacknowledged": (
        "(relationship_id, sent_by, sent_at) WHERE (acknowledged_at IS NULL)"
    ),
    "idx_gestures_analytics": "(relationship_id, gesture_type, sent_at DESC)",
}


@pytest.fixture
async def migrated(fresh_database):
    assert (await migrate(fresh_database))[0] == 0
    conn = await asyncpg.connect(fresh_database)
    yield conn
    await conn.close()


async def test_connection_gestures_has_every_seed_column(migrated):
    rows = await migrated.fetch(
        """SELECT column_name, data_type, is_nullable, column_default
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name = 'connection_gestures'"""
    )
    columns = {r["column_name"]: r for r in rows}
    for name, (data_type, nullable, default) in SEED_COLUMNS.items():
        assert name in columns, name
        assert columns[name]["data_type"] == data_type, name
        assert columns[name]["is_nullable"] == nullable, name
        if default is None:
            assert columns[name]["column_default"] is None, name
        else:
            assert default in (columns[name]["column_default"] or ""), name


async def test_connection_gestures_has_the_seed_checks_and_keys(migrated):
    rows = await migrated.fetch(
        """SELECT contype::text AS contype, pg_get_constraintdef(oid) AS def FROM pg_constraint
        WHERE conrelid = 'connection_gestures'::regclass"""
    )
    checks = [r["def"] for r in rows if r["contype"] == "c"]
    foreign = [r["def"] for r in rows if r["contype"] == "f"]
    primary = [r["def"] for r in rows if r["contype"] == "p"]
    assert primary == ["PRIMARY KEY (id)"]

    def check_on(column: str) -> str:
        [found] = [c for c in checks if f"({column} = " in c or f"({column} IS" in c]
        return found

    for value in ("hug", "kiss", "thinking_of_you"):
        assert f"'{value}'" in check_on("gesture_type")
    for column in ("sent_by", "acknowledged_by"):
        assert "'partner_a'" in check_on(column) and "'partner_b'" in check_on(column)
    assert len(checks) == 3, checks
    assert any(
        d.startswith("FOREIGN KEY (relationship_id) REFERENCES relationships(id)")
        and "ON DELETE CASCADE" in d
        for d in foreign
    ), foreign
    assert any(
        d.startswith("FOREIGN KEY (response_gesture_id) REFERENCES connection_gestures(id)")
        for d in foreign
    ), foreign


async def test_checks_reject_bad_rows_at_the_database(migrated):
    rel = await migrated.fetchval(
        "INSERT INTO relationships (id) VALUES (gen_random_uuid()) RETURNING id"
    )
    insert = (
        "INSERT INTO connection_gestures (relationship_id, gesture_type, sent_by) "
        "VALUES ($1, $2, $3)"
    )
    await migrated.execute(insert, rel, "hug", "partner_a")
    with pytest.raises(asyncpg.CheckViolationError):
        await migrated.execute(insert, rel, "slap", "partner_a")
    with pytest.raises(asyncpg.CheckViolationError):
        await migrated.execute(insert, rel, "hug", "partner_c")


async def test_the_six_seed_indexes_exist(migrated):
    rows = await migrated.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'connection_gestures'"
    )
    indexes = {r["indexname"]: r["indexdef"] for r in rows}
    for name, shape in SEED_INDEXES.items():
        assert name in indexes, name
        assert indexes[name].endswith(f"USING btree {shape}"), indexes[name]


async def test_row_level_security_is_enabled_with_the_seed_policy(migrated):
    assert await migrated.fetchval(
        "SELECT relrowsecurity FROM pg_class WHERE oid = 'connection_gestures'::regclass"
    )
    policies = await migrated.fetch(
        "SELECT policyname, cmd, qual, permissive FROM pg_policies "
        "WHERE tablename = 'connection_gestures'"
    )
    assert [dict(p) for p in policies] == [
        {
            "policyname": "Allow public access to connection_gestures",
            "cmd": "ALL",
            "qual": "true",
            "permissive": "PERMISSIVE",
        }
    ]


async def test_relationships_accepts_a_row_with_id_alone(migrated):
    row = await migrated.fetchrow(
        "INSERT INTO relationships (id) VALUES (gen_random_uuid()) "
        "RETURNING id, partner_a_id, partner_b_id, created_at"
    )
    assert row["partner_a_id"] is None and row["partner_b_id"] is None
    assert row["created_at"] is not None


# ---------------------------------------------------------------------------- start-up


async def test_app_refuses_to_start_without_migrations_and_names_the_command(
    fresh_database, redis_url, prefix
):
    env = settings_env(make_settings(fresh_database, redis_url, prefix))
    assert env["JWT_SECRET"] == SECRET
    code, out = await run(
        sys.executable, "-m", "uvicorn", "service.app:app", "--port", "0", env=env, timeout=30
    )
    assert code != 0, out
    assert "python -m service migrate" in out
    assert "Application startup failed" in out


async def test_app_refuses_to_start_with_some_migrations_missing(fresh_database, redis_url, prefix):
    conn = await asyncpg.connect(fresh_database)
    try:
        await conn.execute(store._MIGRATIONS_TABLE)
        await conn.execute(
            "INSERT INTO schema_migrations (version, checksum) VALUES ('010_relationships', 'x')"
        )
    finally:
        await conn.close()
    env = settings_env(make_settings(fresh_database, redis_url, prefix))
    code, out = await run(
        sys.executable, "-m", "uvicorn", "service.app:app", "--port", "0", env=env, timeout=30
    )
    assert code != 0, out
    assert "011_connection_gestures" in out and "python -m service migrate" in out
