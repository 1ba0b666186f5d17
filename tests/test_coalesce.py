"""service.coalesce.Coalescer: its promises, with a plain function as the fetch."""

import asyncio

import pytest

from service.coalesce import Coalescer

pytestmark = pytest.mark.anyio


async def test_the_callers_of_one_moment_share_one_fetch_and_each_key_is_fetched_once():
    batches: list[list[int]] = []

    async def fetch(keys: list[int]) -> dict[int, int]:
        batches.append(sorted(keys))
        return {k: k * 10 for k in keys}

    c = Coalescer(fetch)
    answers = await asyncio.gather(*(c.get(k) for k in [1, 2, 2, 3, 1]))
    assert answers == [10, 20, 20, 30, 10]
    assert batches == [[1, 2, 3]]


async def test_a_failed_fetch_reaches_every_caller_of_its_batch_and_the_next_starts_afresh():
    calls = 0

    async def fetch(keys: list[str]) -> dict[str, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("down")
        return {k: k.upper() for k in keys}

    c = Coalescer(fetch)
    results = await asyncio.gather(c.get("a"), c.get("b"), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    assert await c.get("a") == "A"


async def test_a_key_the_fetch_does_not_answer_is_a_key_error():
    async def fetch(keys: list[str]) -> dict[str, str]:
        return {}

    with pytest.raises(KeyError):
        await Coalescer(fetch).get("missing")


async def test_a_caller_that_gives_up_changes_nothing_for_the_others_of_its_key():
    release = asyncio.Event()

    async def fetch(keys: list[str]) -> dict[str, str]:
        await release.wait()
        return {k: "ok" for k in keys}

    c = Coalescer(fetch)
    quitter, stayer = c.future("k"), c.future("k")
    quitter.cancel()
    release.set()
    assert await stayer == "ok"
    assert quitter.cancelled()
