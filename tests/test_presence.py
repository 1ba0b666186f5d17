"""Presence on a Redis server of the test's own: entries that name their process, one beat
per process whatever it holds, a dead process's clean-up announced once, connect storms
written in a few round trips, and keys a Redis Cluster can serve."""

import asyncio
import json
import uuid
from collections import Counter

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from service.presence import Presence

from .support_helpers import OwnRedis, eventually

pytestmark = pytest.mark.anyio

PREFIX = "p:"


@pytest.fixture
async def redis(tmp_path):
    server = OwnRedis(tmp_path)
    await server.start()
    client = aioredis.Redis.from_url(server.url)
    yield client
    await client.aclose()
    server.stop()


def presence(client: aioredis.Redis, node: str, ttl: float = 1.2) -> Presence:
    return Presence(client, prefix=PREFIX, node=node, ttl=ttl, grace=0.1)


class Announcements:
    """Every presence change published under PREFIX, in order."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.seen: list[tuple[str, bytes]] = []

    async def __aenter__(self) -> "Announcements":
        await self.pubsub.psubscribe(f"{PREFIX}{{*}}")
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for message in self.pubsub.listen():
            self.seen.append((message["channel"].decode(), message["data"]))

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await self.pubsub.aclose()

    def offline(self) -> list[str]:
        return [channel for channel, data in self.seen if b'"online":false' in data]


async def commands(client: aioredis.Redis) -> int:
    """Commands the server has run, INFO itself left out."""
    stats = await client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")


async def script_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return stats.get("cmdstat_evalsha", {}).get("calls", 0)


async def test_a_killed_process_goes_offline_announced_once_and_its_entries_are_removed(redis):
    dead = presence(redis, "dead")
    rels = [uuid.uuid4() for _ in range(50)]
    for rel in rels:
        await dead.connected(rel, "partner_b")
    assert all([await dead.is_online(rel, "partner_b") for rel in rels])
    # `dead` never beats again and never closes: a kill -9. Two survivors race to notice.
    survivors = [presence(redis, "s1"), presence(redis, "s2")]
    async with Announcements(redis) as seen:
        beats = [asyncio.create_task(s.run()) for s in survivors]
        try:

            async def cleaned() -> bool:
                return (
                    await redis.zscore(f"{PREFIX}nodes", "dead") is None
                    and not await redis.exists(f"{PREFIX}entries:dead")
                    and len(seen.offline()) >= len(rels)
                )

            await eventually(cleaned, timeout=10)
            # Another beat of each survivor finds nothing more to announce.
            await asyncio.gather(*(s.beat() for s in survivors))
            await redis.publish(f"{PREFIX}{{barrier}}", b"{}")  # every earlier one is read
            await eventually(lambda: any(c.endswith("{barrier}") for c, _ in seen.seen))
        finally:
            for task in beats:
                task.cancel()
    assert sorted(seen.offline()) == sorted(f"{PREFIX}{{{rel}}}" for rel in rels)
    for rel in rels:
        assert not await survivors[0].is_online(rel, "partner_b")
    assert await redis.keys(f"{PREFIX}{{*") == []


async def test_a_process_found_dead_while_it_was_only_stalled_writes_its_entries_again(redis):
    stalled, other = presence(redis, "stalled"), presence(redis, "other")
    rel = uuid.uuid4()
    await stalled.connected(rel, "partner_a")
    async with Announcements(redis) as seen:
        beat = asyncio.create_task(other.run())
        try:

            async def gone() -> bool:
                return not await other.is_online(rel, "partner_a")

            await eventually(gone, timeout=10)
        finally:
            beat.cancel()
        # Its next beat finds its liveness gone and writes what it holds again.
        await stalled.beat()

        async def back() -> bool:
            return await other.is_online(rel, "partner_a") and any(
                b'"online":true' in data for _, data in seen.seen[1:]
            )

        await eventually(back, timeout=5)
    await stalled.close()
    assert not await other.is_online(rel, "partner_a")


async def test_a_reconnect_storm_is_written_in_a_few_round_trips(redis):
    p = presence(redis, "n", ttl=30)
    rels = [uuid.uuid4() for _ in range(3000)]
    reads_before = (await redis.info("stats"))["total_reads_processed"]
    await asyncio.gather(*(p.connected(rel, "partner_a") for rel in rels))
    reads = (await redis.info("stats"))["total_reads_processed"] - reads_before
    # One read a connect without batching; a pipeline of 500 entries takes a few reads.
    assert reads < len(rels) / 20
    async with redis.pipeline(transaction=False) as pipe:
        for rel in rels:
            p.count_online(pipe, rel, "partner_a")
        assert await pipe.execute() == [1] * len(rels)
    await p.close()


async def test_the_beat_costs_two_commands_however_many_sockets_are_held(redis):
    p = presence(redis, "n", ttl=30)
    for n in (10, 2000):
        await asyncio.gather(*(p.connected(uuid.uuid4(), "partner_b") for _ in range(n)))
        before = await commands(redis)
        await p.beat()
        assert await commands(redis) - before == 2
    await p.close()
    assert await redis.keys("*") == []  # shutdown leaves nothing behind


async def test_a_quick_reconnect_within_the_grace_writes_nothing(redis):
    p = presence(redis, "n", ttl=30)
    rel = uuid.uuid4()
    await p.connected(rel, "partner_a")
    before = await commands(redis)
    p.disconnected(rel, "partner_a")
    await p.connected(rel, "partner_a")
    await asyncio.sleep(0.3)  # past the grace of 0.1 s: a leave would have been written
    assert await commands(redis) == before
    assert await p.is_online(rel, "partner_a")
    await p.close()


async def test_the_presence_reads_of_a_connect_storm_go_out_in_a_few_round_trips(redis):
    p, reader = presence(redis, "n", ttl=30), presence(redis, "reader", ttl=30)
    rels = [uuid.uuid4() for _ in range(1000)]
    await asyncio.gather(*(p.connected(rel, "partner_a") for rel in rels))
    reads_before = (await redis.info("stats"))["total_reads_processed"]
    online = await asyncio.gather(
        *(reader.is_online(rel, role) for rel in rels for role in ("partner_a", "partner_b"))
    )
    reads = (await redis.info("stats"))["total_reads_processed"] - reads_before
    assert online == [True, False] * len(rels)
    assert reads < len(online) / 20  # one read a greeting without batching
    await p.close()


async def test_a_presence_read_without_redis_answers_offline():
    client = aioredis.Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.5)
    p = presence(client, "n")
    assert (
        await asyncio.gather(*(p.is_online(uuid.uuid4(), "partner_a") for _ in range(3)))
        == [False] * 3
    )
    await client.aclose()


def test_every_key_a_script_touches_is_in_the_relationship_slot():
    p = presence(None, "n")
    rel = uuid.uuid4()
    slots = {key_slot(k.encode()) for k in (p.key(rel, "partner_a"), p.key(rel, "partner_b"))}
    slots.add(key_slot(p.channel(rel).encode()))
    assert slots == {key_slot(str(rel).encode())}


async def test_a_batch_of_joins_and_leaves_announces_each_partner_once(redis):
    # More entries than one script call takes; `other` already holds some of the partners.
    p, other = presence(redis, "p", ttl=30), presence(redis, "other", ttl=30)
    rels = [uuid.uuid4() for _ in range(1200)]
    shared = rels[:300]
    await asyncio.gather(*(other.connected(rel, "partner_a") for rel in shared))

    async with Announcements(redis) as seen:

        async def barrier() -> None:
            """Every announcement published before this one has been read."""
            channel = f"{PREFIX}{{barrier-{uuid.uuid4()}}}"
            await redis.publish(channel, b"{}")
            await eventually(lambda: any(c == channel for c, _ in seen.seen))

        def announced() -> Counter:
            return Counter(
                (channel, json.loads(data)["partner"], json.loads(data)["online"])
                for channel, data in seen.seen
                if "barrier" not in channel
            )

        before = await script_calls(redis)
        await asyncio.gather(
            *(p.connected(rel, role) for rel in rels for role in ("partner_a", "partner_b"))
        )
        # One script call a batch of up to 500 entries, not one an entry.
        assert await script_calls(redis) - before < len(rels) / 100
        await barrier()
        assert announced() == Counter(
            {(p.channel(rel), role, True): 1 for rel in rels for role in ("partner_a", "partner_b")}
            | {(p.channel(rel), "partner_a", True): 0 for rel in shared}
        )

        seen.seen.clear()
        for rel in rels:
            for role in ("partner_a", "partner_b"):
                p.disconnected(rel, role)
        expected = Counter(
            {
                (p.channel(rel), role, False): 1
                for rel in rels
                for role in ("partner_a", "partner_b")
            }
            | {(p.channel(rel), "partner_a", False): 0 for rel in shared}
        )
        await eventually(lambda: announced() == +expected, timeout=10)
        await barrier()
        assert announced() == +expected  # and nothing more
        assert await redis.smembers(f"{PREFIX}entries:p") == set()

        # The last holder of the shared partners goes: offline once each, now.
        seen.seen.clear()
        await other.close()
        await barrier()
        assert announced() == Counter({(p.channel(rel), "partner_a", False): 1 for rel in shared})
    await p.close()
    assert await redis.keys(f"{PREFIX}{{*") == []


async def test_presence_survives_redis_forgetting_its_scripts(redis):
    p, reader = presence(redis, "p", ttl=30), presence(redis, "reader", ttl=30)
    rels = [uuid.uuid4() for _ in range(3)]
    await p.connected(rels[0], "partner_a")
    await redis.script_flush()
    await p.connected(rels[1], "partner_a")
    await redis.script_flush()
    online = await asyncio.gather(*(reader.is_online(rel, "partner_a") for rel in rels))
    assert online == [True, True, False]
    await p.close()
    assert await redis.keys("*") == []
