"""service.consumer: the durable consumer of the event streams (CONTRACT section 6).

Each test counts the event ids the handler received against the event log in PostgreSQL:
none may be missing, whatever was killed, trimmed or flushed on the way."""

import asyncio
import fcntl
import json
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from service import bus
from service import consumer as consumer_module
from service.consumer import Consumer, Delivery

from .conftest import (
    ROOT,
    InProcess,
    Settings,
    make_couple,
    make_settings,
    settings_env,
    token,
)
from .support_helpers import OwnRedis, eventually, send

pytestmark = pytest.mark.anyio


class Seen:
    """A handler that records what it got; given `poison` (a relationship), it refuses that
    couple's events whose gesture's note is `poison`. Only that couple's: a catch-up reads a
    partition's events from the shared log, another test's poison among them.

    Other tests' events may come too, and rightly: the service under test takes over the
    outbox of an earlier test's process that died (it shares the database), and relays its
    events into this test's streams. `of(couples)` keeps a test's own."""

    def __init__(self, poison: uuid.UUID | None = None) -> None:
        self.poison = None if poison is None else str(poison)
        self.ids: list[str] = []
        self.relationship: dict[str, str] = {}
        self.sources: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    async def __call__(self, delivery: Delivery) -> None:
        event = json.loads(delivery.payload)
        if event["relationship_id"] == self.poison and event["gesture"]["message"] == "poison":
            self.refused[delivery.event_id] += 1
            raise RuntimeError("poison")
        self.ids.append(delivery.event_id)
        self.relationship[delivery.event_id] = event["relationship_id"]
        self.sources["stream" if delivery.entry_id else "api"] += 1

    def of(self, couples) -> list[str]:
        """The ids handled of these couples' events, in order, repeats kept."""
        ours = {str(c.id) for c in couples}
        return [i for i in self.ids if self.relationship[i] in ours]


async def logged_ids(database_url: str, relationship_ids) -> set[str]:
    """The event ids of these relationships in the event log, the source of truth."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT payload FROM gesture_events WHERE relationship_id = any($1::uuid[])",
            list(relationship_ids),
        )
    finally:
        await conn.close()
    return {json.loads(r["payload"])["event_id"] for r in rows}


@pytest.fixture
async def service(database_url, redis_url, prefix) -> AsyncIterator[InProcess]:
    s = InProcess(make_settings(database_url, redis_url, prefix, rate_limit_per_minute=100_000))
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def api(service) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        yield client


def make_consumer(s: Settings, api_url: str, group: str, **options) -> Consumer:
    options.setdefault("claim_idle", 0.3)
    options.setdefault("block", 0.2)
    return Consumer(
        s.redis_url,
        group=group,
        streams=s.event_streams,
        prefix=s.channel_prefix,
        api_url=api_url,
        api_token=token(service=True),
        cluster=s.redis_cluster,
        **options,
    )


class Running:
    """A consumer running its loop in a task of the test."""

    def __init__(self, consumer: Consumer, handler) -> None:
        self.consumer = consumer
        self.handler = handler
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "Running":
        await self.consumer.__aenter__()
        self.task = asyncio.create_task(self.consumer.run(self.handler))
        return self

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            stuck = await bus.cancel_until_done([self.task], timeout=10.0)
            assert not stuck, "the consumer did not stop within 10 s of being cancelled"
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        elif self.task is not None:
            self.task.result()  # a consumer that died: its error fails the test
        await self.consumer.aclose()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def send_many(api, couples, n: int, together: int = 1) -> None:
    """Send `n` gestures over the couples, `together` at a time."""
    for start in range(0, n, together):
        await asyncio.gather(
            *(
                send(api, couples[i % len(couples)].id, couples[i % len(couples)].a_headers)
                for i in range(start, min(start + together, n))
            )
        )


async def all_seen(handlers, database_url, couples, timeout: float = 15.0) -> set[str]:
    expected = await logged_ids(database_url, [c.id for c in couples])

    def done() -> bool:
        got = set().union(*(h.ids for h in handlers))
        return expected <= got

    try:
        await eventually(done, timeout=timeout)
    except TimeoutError:
        got = set().union(*(h.ids for h in handlers))
        missing = len(expected - got)
        raise AssertionError(f"{missing} of {len(expected)} events never handled") from None
    return expected


async def test_two_consumers_of_one_group_split_the_load(service, api, database_url):
    s = service.settings
    couples = [await make_couple(database_url) for _ in range(6)]
    one, two = Seen(), Seen()
    async with (
        Running(make_consumer(s, service.url, "split", consumer="one"), one),
        Running(make_consumer(s, service.url, "split", consumer="two"), two),
    ):
        await send_many(api, couples, 40)
        expected = await all_seen([one, two], database_url, couples)
    assert one.of(couples) and two.of(couples), "each consumer got a share"
    both = one.of(couples) + two.of(couples)
    assert set(both) == expected
    assert len(both) == len(set(both)), "an event was handled twice without a failure"


async def test_two_groups_each_see_every_event(service, api, database_url):
    s = service.settings
    couples = [await make_couple(database_url) for _ in range(3)]
    mail, push = Seen(), Seen()
    async with (
        Running(make_consumer(s, service.url, "mail"), mail) as m,
        Running(make_consumer(s, service.url, "push"), push),
    ):
        await send_many(api, couples, 12)
        expected = await all_seen([mail], database_url, couples)
        await all_seen([push], database_url, couples)

        async def settled() -> list:
            found = await m.consumer.lag()
            return found if all(p.lag == 0 and p.pending == 0 for p in found) else []

        lags = await eventually(settled, timeout=5)
        assert len(lags) == s.event_streams and all(p.lag_exact for p in lags)  # Redis 7
    assert set(mail.of(couples)) == set(push.of(couples)) == expected


async def test_a_poison_event_is_dead_lettered_and_the_rest_flows(
    service, api, database_url, redis_url
):
    s = service.settings
    couple = await make_couple(database_url)
    key = f"{s.channel_prefix}stream:{{{couple.id.int % s.event_streams}}}"
    handler = Seen(poison=couple.id)
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with Running(make_consumer(s, service.url, "dl", max_deliveries=3), handler) as r:
            await send(api, couple.id, couple.a_headers, message="poison")
            poison = (await logged_ids(database_url, [couple.id])).pop()
            await send_many(api, [couple], 5)
            expected = await logged_ids(database_url, [couple.id])

            async def dead() -> list:
                return await client.xrange(f"{key}:dead")

            entries = await eventually(dead, timeout=15)
            await eventually(lambda: expected - {poison} <= set(handler.ids), timeout=10)
            assert (await client.xpending(key, "dl"))["pending"] == 0
            assert r.consumer.stats["dead_letters"] == 1
        ((_, fields),) = entries
        assert json.loads(fields[b"event"])["event_id"] == poison
        assert fields[b"group"] == b"dl"
        assert fields[b"deliveries"] == b"3"
        assert b"poison" in fields[b"error"]
        assert handler.refused[poison] == 3
        assert poison not in handler.ids
        counts = await consumer_module.counts(client, s.channel_prefix, "dl")
        assert counts["dead_letters"] == 1
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------- the command


class Command:
    """`python -m service consume` in a process of its own, its stdout read line by line."""

    def __init__(self, s: Settings, api_url: str, group: str, *extra: str) -> None:
        self.args = [
            sys.executable,
            "-m",
            "service",
            "consume",
            "--group",
            group,
            "--report-every",
            "0.5",
            *extra,
        ]
        self.env = {**settings_env(s), "EVENTS_API_URL": api_url}
        self.lines: list[bytes] = []
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, pipe_size: int | None = None) -> None:
        read, write = os.pipe()
        if pipe_size is not None:
            # A small pipe: the command blocks writing while it holds a read batch.
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, pipe_size)
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, env=self.env, cwd=ROOT, stdout=write, stderr=asyncio.subprocess.PIPE
        )
        os.close(write)
        loop = asyncio.get_running_loop()
        # A small buffer too: reading pauses while it is full, as the pipe does.
        self.stdout = asyncio.StreamReader(limit=2048)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(self.stdout), os.fdopen(read, "rb")
        )
        assert self.proc.stderr is not None
        async with asyncio.timeout(20):
            while b"consuming as" not in await self.proc.stderr.readline():
                pass

    async def read(self, n: int, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.lines) < n:
                line = await self.stdout.readline()
                assert line.endswith(b"\n"), "the command's stdout ended"
                self.lines.append(line)

    async def read_until(self, done, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                await self.read(len(self.lines) + 1, timeout)

    def ids(self) -> set[str]:
        return {json.loads(line)["event_id"] for line in self.lines}

    def of(self, couples) -> list[str]:
        """The ids printed of these couples' events (see Seen), repeats kept."""
        ours = {str(c.id) for c in couples}
        events = (json.loads(line) for line in self.lines)
        return [e["event_id"] for e in events if e["relationship_id"] in ours]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()


async def pending_of(redis_url: str, s: Settings, group: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        total = 0
        for n in range(s.event_streams):
            key = f"{s.channel_prefix}stream:{{{n}}}"
            total += (await client.xpending(key, group))["pending"]
        return total
    finally:
        await client.aclose()


async def test_a_consumer_killed_mid_batch_loses_nothing(service, api, database_url, redis_url):
    """kill -9 of `consume` while it holds a read batch: a second member claims the entries
    it had not acknowledged; together they printed / handled every event of the log."""
    s = service.settings
    couples = [await make_couple(database_url) for _ in range(4)]
    first = Command(s, service.url, "killed", "--consumer", "first", "--batch", "50")
    await first.start(pipe_size=4096)
    try:
        await send_many(api, couples, 60, together=12)
        await first.read(5)
        first.kill()
        await first.proc.wait()
    finally:
        if first.proc.returncode is None:
            first.kill()
    assert await pending_of(redis_url, s, "killed") > 0, "killed with nothing pending"
    first.lines += [  # what the pipe still held was printed before the kill
        line for line in (await first.stdout.read()).splitlines(True) if line.endswith(b"\n")
    ]
    second = Seen()
    async with Running(make_consumer(s, service.url, "killed", consumer="second"), second):
        expected = await logged_ids(database_url, [c.id for c in couples])
        await eventually(lambda: expected <= first.ids() | set(second.ids), timeout=15)

        async def none_pending() -> bool:
            return await pending_of(redis_url, s, "killed") == 0

        await eventually(none_pending, timeout=10)


async def test_consume_prints_each_event_and_stops_on_sigterm_with_all_acknowledged(
    service, api, database_url, redis_url
):
    s = service.settings
    couples = [await make_couple(database_url) for _ in range(2)]
    command = Command(s, service.url, "printer")
    await command.start()
    try:
        await send_many(api, couples, 8)
        expected = await logged_ids(database_url, [c.id for c in couples])
        await command.read_until(lambda: expected <= command.ids())
        printed = command.of(couples)
        assert set(printed) == expected
        assert len(printed) == len(expected), "an event was printed twice"
        assert command.proc.stderr is not None
        async with asyncio.timeout(10):
            while b"lag=" not in (report := await command.proc.stderr.readline()):
                pass
        assert b"group=printer" in report and b"pending=" in report
        command.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await command.proc.wait() == 0
        assert await pending_of(redis_url, s, "printer") == 0
    finally:
        if command.proc.returncode is None:
            command.kill()


# ---------------------------------------------------------------------------- lost positions


async def test_a_stream_trimmed_past_a_stopped_group_is_filled_from_the_api_once(
    service, api, database_url, redis_url
):
    """Entries trimmed before the group read them: one of the two members that start notices
    the gap (atomically with moving the group on) and catches up from GET /api/events."""
    s = service.settings
    couple = await make_couple(database_url)
    key = f"{s.channel_prefix}stream:{{{couple.id.int % s.event_streams}}}"
    before = Seen()
    async with Running(make_consumer(s, service.url, "trim"), before):
        await send_many(api, [couple], 2)
        await all_seen([before], database_url, [couple])
    await send_many(api, [couple], 5)  # while the group is stopped
    client = aioredis.Redis.from_url(redis_url)
    try:
        await eventually(lambda: client.xlen(key), timeout=5)
        ((last, _),) = await client.xrevrange(key, count=1)
        ms, seq = last.decode().split("-")
        await client.xtrim(key, minid=f"{ms}-{int(seq) + 1}")  # everything, as retention would
        await send_many(api, [couple], 2)
        one, two = Seen(), Seen()
        async with (
            Running(make_consumer(s, service.url, "trim", consumer="one"), one),
            Running(make_consumer(s, service.url, "trim", consumer="two"), two),
        ):
            await all_seen([before, one, two], database_url, [couple])
        counts = await consumer_module.counts(client, s.channel_prefix, "trim")
        assert counts == {"catchups": 1, "catchups:trimmed": 1}
        assert one.sources["api"] + two.sources["api"] >= 5
    finally:
        await client.aclose()


async def test_redis_restarted_empty_while_events_flow_loses_nothing(
    database_url, prefix, tmp_path
):
    own = OwnRedis(tmp_path)
    await own.start()
    svc = InProcess(make_settings(database_url, own.url, prefix, rate_limit_per_minute=100_000))
    await svc.start()
    try:
        s = svc.settings
        couples = [await make_couple(database_url) for _ in range(4)]
        seen = Seen()
        async with (
            httpx.AsyncClient(base_url=svc.url, timeout=10) as api,
            Running(make_consumer(s, svc.url, "restart"), seen),
        ):
            await send_many(api, couples, 12, together=4)
            await all_seen([seen], database_url, couples)
            own.stop()  # kill -9: it comes back empty
            await send_many(api, couples, 4)  # committed; published once Redis is back
            await own.start()
            await send_many(api, couples, 8, together=4)
            await all_seen([seen], database_url, couples, timeout=20)
            client = aioredis.Redis.from_url(own.url)
            try:
                counts = await consumer_module.counts(client, s.channel_prefix, "restart")
            finally:
                await client.aclose()
        assert counts.get("catchups:lost", 0) >= 1, counts
    finally:
        await svc.stop()
        own.stop()


@pytest.mark.multiprocess
async def test_a_cluster_master_killed_during_load_loses_nothing(
    database_url, prefix, redis_cluster
):
    """kill -9 of the master that holds some partitions while gestures flow: its replica
    takes over, and what it had not got is filled from the API."""
    s = make_settings(
        database_url,
        redis_cluster.url,
        prefix,
        redis_cluster=True,
        rate_limit_per_minute=100_000,
    )
    svc = InProcess(s)
    await svc.start()
    try:
        couples = [await make_couple(database_url) for _ in range(8)]
        seen = Seen()
        async with (
            httpx.AsyncClient(base_url=svc.url, timeout=10) as api,
            Running(make_consumer(s, svc.url, "failover"), seen),
        ):
            await send_many(api, couples, 16, together=4)
            await all_seen([seen], database_url, couples)
            # A master whose partitions carry the load and that still has a replica (the
            # session's cluster may have lost one to an earlier test's kill).
            owners = [
                redis_cluster.node_of(f"{s.channel_prefix}stream:{{{c.id.int % 16}}}")
                for c in couples
            ]
            victim = next(m for m in owners if redis_cluster.replicas_of(m))
            load = asyncio.create_task(send_many(api, couples, 24, together=2))
            await asyncio.to_thread(redis_cluster.kill, victim)
            await load
            await send_many(api, couples, 8, together=4)
            await all_seen([seen], database_url, couples, timeout=30)
    finally:
        await svc.stop()
