"""service.bus.Subscriber against a real Redis: it stops when its task is cancelled once.

redis-py 8.2's `publish` can return normally after a cancel landed in it (the cancel is
then swallowed: the task goes on with `cancelling()` at 1). The subscriber's watchdog
publishes a beat every `heartbeat` seconds inside a task group, which cancels it once; a
watchdog that went on after that kept the process's shutdown waiting for its 2 s bound
(measured: 3.0 s instead of 1.0 s to stop a process holding 15,000 sockets, about one exit
in two). Before the fix, 17 or 18 of the 60 subscribers here went on after the cancel."""

import asyncio
import random

import pytest
import redis.asyncio as aioredis

from service.bus import Subscriber, cancel_until_done

pytestmark = pytest.mark.anyio


async def resynced(since: float) -> None:
    pass


async def test_a_subscriber_cancelled_once_stops_while_its_watchdog_publishes(redis_url, prefix):
    client = aioredis.Redis.from_url(redis_url)
    lingered = 0
    try:
        for _ in range(60):
            subscriber = Subscriber(
                client,
                node_channel=f"{prefix}node",
                on_message=lambda channel, data: None,
                on_resubscribed=resynced,
                # A beat every 2 ms: the cancel often lands inside a publish.
                heartbeat=0.002,
            )
            task = asyncio.create_task(subscriber.run())
            await asyncio.wait_for(subscriber.connected.wait(), 5)
            # Not a wait for anything: a random moment in the beat's cycle to cancel at.
            await asyncio.sleep(random.uniform(0.0, 0.003))
            task.cancel()  # once, as a task group cancels its children
            done, _ = await asyncio.wait([task], timeout=2.0)  # ends in ms when it ends
            if not done:
                lingered += 1
                await cancel_until_done([task], 0.5)
    finally:
        async with asyncio.timeout(5):
            await client.aclose()
    assert lingered == 0, f"{lingered} of 60 subscribers went on after being cancelled"
