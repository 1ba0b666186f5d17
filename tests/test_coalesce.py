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


async def _callers_apart(c: Coalescer, n: int, gap: float) -> list:
    futures = []
    for k in range(n):
        futures.append(c.future(k))
        await asyncio.sleep(gap)  # the callers' arrival times: what is under test
    return await asyncio.gather(*futures)


async def test_under_linger_callers_that_come_often_wait_for_each_other():
    batches: list[list[int]] = []

    async def fetch(keys: list[int]) -> dict[int, int]:
        batches.append(keys)
        return {k: k for k in keys}

    alone = Coalescer(fetch)
    assert await _callers_apart(alone, 100, 0.01) == list(range(100))
    assert max(len(b) for b in batches) == 1  # without linger: a batch each

    batches.clear()
    gathered = Coalescer(fetch, linger=0.05)
    assert await _callers_apart(gathered, 100, 0.01) == list(range(100))
    # The first ones come while the average gap is still long, and go alone; once it is
    # under 25 ms (half the linger), a batch waits for the callers behind it.
    assert len(batches) < 85
    assert max(len(b) for b in batches) >= 3


async def test_a_band_given_apart_from_the_linger_decides_when_callers_wait():
    batches: list[list[int]] = []

    async def fetch(keys: list[int]) -> dict[int, int]:
        batches.append(keys)
        return {k: k for k in keys}

    # 10 ms apart is a flood for a 200 ms linger's own band (25 to 100 ms apart), and
    # inside the band given here (5 to 20 ms): batches wait 200 ms, gathering about 20.
    c = Coalescer(fetch, linger=0.2, busy=(0.005, 0.02))
    assert await _callers_apart(c, 100, 0.01) == list(range(100))
    assert max(len(b) for b in batches) >= 10
    assert c.busy

    c = Coalescer(fetch, linger=0.2)  # its own band: by the end, a flood not to hold
    assert await _callers_apart(c, 100, 0.01) == list(range(100))
    assert not c.busy


async def test_under_linger_a_flood_of_callers_is_not_held():
    batches: list[list[int]] = []

    async def fetch(keys: list[int]) -> dict[int, int]:
        batches.append(keys)
        return {k: k for k in keys}

    # A millisecond apart is under an eighth of the linger: once the average says so (on
    # its way down it passes through the band that waits), no wait, a batch each.
    c = Coalescer(fetch, linger=0.05)
    assert await _callers_apart(c, 200, 0.001) == list(range(200))
    assert not c.busy
    assert [len(b) for b in batches[-50:]] == [1] * 50


async def test_under_linger_a_caller_alone_is_not_held():
    async def fetch(keys: list[str]) -> dict[str, str]:
        return {k: k for k in keys}

    c = Coalescer(fetch, linger=30.0)
    async with asyncio.timeout(5):  # a held caller would wait 30 s
        assert await c.get("a") == "a"
        await asyncio.sleep(0.01)
        assert await c.get("b") == "b"
    assert not c.busy


async def test_the_callers_of_a_batch_cancelled_while_it_lingers_are_cancelled_too():
    async def fetch(keys: list[str]) -> dict[str, str]:
        return {k: k for k in keys}

    c = Coalescer(fetch, linger=30.0)
    # As if callers had come 10 s apart: inside the band, so the next batch waits.
    c._gap, c._last = 10.0, asyncio.get_running_loop().time() - 10.0
    future = c.future("a")
    assert c.busy
    for _ in range(3):  # the runner's turns: into its wait for company
        await asyncio.sleep(0)
    assert c._runner is not None
    c._runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await future


async def test_under_linger_callers_who_await_their_answer_go_once_they_are_all_in():
    batches: list[int] = []

    async def fetch(keys: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
        batches.append(len(keys))
        return {k: k[1] for k in keys}

    c = Coalescer(fetch, linger=30.0, busy=(0.001, 60.0))
    # As if callers had come a second apart: inside the band, so batches wait for company.
    c._gap, c._last = 1.0, asyncio.get_running_loop().time() - 1.0

    async def caller(who: int) -> list[int]:
        # A closed loop: each asks again only once its answer is in.
        return [await c.get((who, turn)) for turn in range(5)]

    async with asyncio.timeout(10):  # a batch held for its whole linger would take 30 s
        answers = await asyncio.gather(*(caller(who) for who in range(8)))
    assert answers == [list(range(5))] * 8
    # Each batch waited for all eight, and went when nobody else came.
    assert batches == [8] * 5
