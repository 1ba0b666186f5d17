"""`store.GroupCommit` against a real PostgreSQL pool: batches, and what a caller gets when
no writer takes its item in time."""

import asyncio

import asyncpg
import pytest

from service import errors, store

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pool(database_url):
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    yield p
    await p.close()


async def test_a_write_no_writer_takes_in_time_fails_and_is_never_written(pool):
    """One writer, held by the first batch: the item queued behind it is failed with
    Unavailable once its time is up, and is not written when the writer comes back."""
    written: list[list[str]] = []
    first_taken = asyncio.Event()
    release = asyncio.Event()

    async def work(conn, items: list[str]) -> list[str]:
        written.append(items)
        first_taken.set()
        await release.wait()
        return [await conn.fetchval("SELECT $1::text || ' done'", item) for item in items]

    commit = store.GroupCommit(pool, work, writers=1, timeout=0.3)
    runner = asyncio.create_task(commit.run())
    try:
        first = asyncio.create_task(commit.submit("first"))
        await first_taken.wait()
        with pytest.raises(errors.Unavailable, match="did not take the write in time"):
            await commit.submit("second")
        release.set()
        assert await first == "first done"
        assert await commit.submit("third") == "third done"  # the queue goes on
    finally:
        runner.cancel()
    assert written == [["first"], ["third"]]


async def test_callers_that_come_together_share_a_batch_and_each_gets_its_own_result(pool):
    batches: list[list[int]] = []

    async def work(conn, items: list[int]) -> list[int]:
        batches.append(items)
        doubled = await conn.fetchval("SELECT array(SELECT x * 2 FROM unnest($1::int[]) x)", items)
        return list(doubled)

    commit = store.GroupCommit(pool, work, writers=1)
    runner = asyncio.create_task(commit.run())
    try:
        results = await asyncio.gather(*(commit.submit(i) for i in range(10)))
    finally:
        runner.cancel()
    assert results == [i * 2 for i in range(10)]
    assert sorted(i for batch in batches for i in batch) == list(range(10))
    assert len(batches) < 10


async def test_a_caller_that_goes_leaves_its_item_to_be_written(pool):
    """A client that disconnects while its send is being written: the gesture is written
    all the same, and the writer goes on."""
    written: list[str] = []
    taken = asyncio.Event()
    release = asyncio.Event()

    async def work(conn, items: list[str]) -> list[str]:
        taken.set()
        await release.wait()
        written.extend(items)
        return items

    commit = store.GroupCommit(pool, work, writers=1)
    runner = asyncio.create_task(commit.run())
    try:
        gone = asyncio.create_task(commit.submit("gone"))
        await taken.wait()
        gone.cancel()
        release.set()
        assert await commit.submit("after") == "after"
    finally:
        runner.cancel()
    assert written == ["gone", "after"]
