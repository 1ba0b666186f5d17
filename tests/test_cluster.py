"""Cluster mode on a real local Redis Cluster (three masters, three replicas): events as
sharded channels spread over the shards, presence, idempotency and the rate limit across
processes, a replica promoted while gestures flow, and `python -m service watch`."""

import asyncio
import subprocess
import sys
import threading
import uuid

import httpx
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from .conftest import ROOT, Couple, make_couple, settings_env
from .support_cluster import LocalCluster
from .support_helpers import eventually
from .support_ws import close_quietly, connect, gather_received, send_http
from .wsclient import Client

pytestmark = [pytest.mark.anyio, pytest.mark.multiprocess]


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
def on_cluster(processes, redis_cluster: LocalCluster):
    """A factory: `await on_cluster(2)` starts processes in cluster mode."""

    async def start(n: int = 2, **overrides):
        return await processes(n, redis_url=redis_cluster.url, redis_cluster=True, **overrides)

    return start


def gesture_channel(settings, couple: Couple) -> str:
    return f"{settings.channel_prefix}{couple.id}"


async def couples_on_every_shard(database_url: str, cluster: LocalCluster, settings) -> list:
    """One couple whose gesture channel lives on each master."""
    by_master: dict[int, Couple] = {}
    masters = set(cluster.masters())
    while set(by_master) != masters:
        couple = Couple()
        by_master.setdefault(cluster.node_of(gesture_channel(settings, couple)), couple)
    return [await make_couple(database_url, c) for c in by_master.values()]


async def shard_subscribers(cluster: LocalCluster, channel: str) -> int:
    """How many connections hold `channel` on the master that owns it (SSUBSCRIBE)."""
    port = cluster.node_of(channel)
    client = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        ((_, count),) = await client.pubsub_shardnumsub(channel)
        return int(count)
    finally:
        await client.aclose()


class ShardEvents:
    """The events of one channel, read as other services would: SSUBSCRIBE on its shard."""

    def __init__(self, cluster: LocalCluster, channel: str) -> None:
        self.client = aioredis.Redis(host="127.0.0.1", port=cluster.node_of(channel))
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.channel = channel

    async def __aenter__(self) -> "ShardEvents":
        await self.pubsub.ssubscribe(self.channel)
        await self.pubsub.get_message(timeout=2)  # the confirmation
        return self

    async def all(self, quiet: float = 1.0) -> list[bytes]:
        """What arrives until nothing more comes for `quiet` seconds."""
        out = []
        while (message := await self.pubsub.get_message(timeout=quiet)) is not None:
            if message["type"] == "smessage":
                out.append(message["data"])
        return out

    async def __aexit__(self, *exc) -> None:
        await self.pubsub.aclose()
        await self.client.aclose()


# ---------------------------------------------------------------------------- delivery


async def test_partners_on_different_processes_get_gestures_on_every_shard(
    on_cluster, settings, redis_cluster: LocalCluster, database_url: str, http
):
    p1, p2 = await on_cluster(2)
    couples = await couples_on_every_shard(database_url, redis_cluster, settings)
    assert len({redis_cluster.node_of(gesture_channel(settings, c)) for c in couples}) == 3
    clients = []
    for couple in couples:
        b = await connect(p2.ws_url, couple, "partner_b")
        a = await connect(p1.ws_url, couple, "partner_a")
        clients += [a, b]
        # Both processes hold the channel with SSUBSCRIBE on the master that owns its slot.
        channel = gesture_channel(settings, couple)
        assert await eventually(lambda ch=channel: _at_least(redis_cluster, ch, 2))
        sent = await send_http(http, p1.url, couple, message="over the shard")
        received = (await b.expect("gesture_received"))["gesture"]
        assert received["id"] == sent["gesture"]["id"]
        assert sent["recipient_online"] is True
        await a.expect("gesture_delivered", gesture_id=received["id"])
        # And back, through the other process.
        await b.send(type="gesture", gesture_type="kiss", request_id="k")
        back = (await b.expect("gesture_sent", request_id="k"))["gesture"]
        assert (await a.expect("gesture_received"))["gesture"]["id"] == back["id"]
    for client in clients:
        await close_quietly(client)


async def _at_least(cluster: LocalCluster, channel: str, n: int) -> bool:
    return await shard_subscribers(cluster, channel) >= n


async def test_presence_reaches_the_partner_on_another_process(
    on_cluster, settings, redis_cluster: LocalCluster, database_url: str
):
    p1, p2 = await on_cluster(2)
    for couple in await couples_on_every_shard(database_url, redis_cluster, settings):
        b = await Client.open(p2.ws_url, couple.id, couple.b_token)
        assert await b.recv() == {"type": "presence", "partner": "partner_a", "online": False}
        a = await Client.open(p1.ws_url, couple.id, couple.a_token)
        assert await a.recv() == {"type": "presence", "partner": "partner_b", "online": True}
        await b.expect("presence", partner="partner_a", online=True)
        await a.close()
        await b.expect("presence", partner="partner_a", online=False, timeout=10)
        await b.close()


async def test_one_idempotency_key_sent_to_two_processes_at_once_makes_one_gesture_and_event(
    on_cluster, settings, redis_cluster: LocalCluster, couple: Couple, http
):
    p1, p2 = await on_cluster(2)
    async with ShardEvents(redis_cluster, gesture_channel(settings, couple)) as events:
        key = uuid.uuid4().hex
        answers = await asyncio.gather(
            *(
                http.post(
                    f"{p.url}/api/gestures/send",
                    json={
                        "relationship_id": str(couple.id),
                        "gesture_type": "hug",
                        "sender_id": "partner_a",
                    },
                    headers={**couple.a_headers, "Idempotency-Key": key},
                )
                for p in (p1, p2, p1, p2)
            )
        )
        assert [r.status_code for r in answers] == [200] * 4
        assert len({r.json()["gesture"]["id"] for r in answers}) == 1
        published = await events.all()
    sent = [e for e in published if b'"gesture.sent"' in e]
    assert len(sent) == 1


async def test_rate_limit_holds_across_processes_with_a_hash_tagged_key(
    on_cluster, settings, redis_cluster: LocalCluster, couple: Couple, http
):
    p1, p2 = await on_cluster(2, rate_limit_per_minute=3)
    for p in (p1, p2, p1):
        await send_http(http, p.url, couple)
    for p in (p1, p2):
        r = await http.post(
            f"{p.url}/api/gestures/send",
            json={
                "relationship_id": str(couple.id),
                "gesture_type": "hug",
                "sender_id": "partner_a",
            },
            headers=couple.a_headers,
        )
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
    # The other partner has a limit of their own.
    await send_http(http, p2.url, couple, role="partner_b")
    # The key names the relationship in braces, so it shares a slot with its other keys.
    key = f"{settings.channel_prefix}rate:{{{couple.id}}}:partner_a"
    assert key_slot(key.encode()) == key_slot(str(couple.id).encode())
    node = aioredis.Redis(host="127.0.0.1", port=redis_cluster.node_of(key))
    try:
        assert await node.zcard(key) == 3
    finally:
        await node.aclose()


# ---------------------------------------------------------------------------- failover


async def test_every_gesture_arrives_once_while_a_replica_is_promoted(
    on_cluster, settings, redis_cluster: LocalCluster, database_url: str, http
):
    p1, p2 = await on_cluster(2)
    couples = await couples_on_every_shard(database_url, redis_cluster, settings)
    recipients = {c.id: await connect(p2.ws_url, c, "partner_b") for c in couples}
    victim = couples[0]
    master = redis_cluster.node_of(gesture_channel(settings, victim))
    sent: dict[uuid.UUID, set[str]] = {c.id: set() for c in couples}

    async def send_some(n: int) -> None:
        for _ in range(n):
            for couple in couples:
                answer = await send_http(http, p1.url, couple)
                sent[couple.id].add(answer["gesture"]["id"])

    await send_some(3)
    failover = threading.Thread(target=redis_cluster.failover, args=(master,))
    failover.start()
    while failover.is_alive():
        await send_some(1)
    failover.join()
    await send_some(3)
    assert redis_cluster.node_of(gesture_channel(settings, victim)) != master
    for couple in couples:
        ids = await gather_received(recipients[couple.id], sent[couple.id], timeout=30)
        assert sorted(ids) == sorted(set(ids)), "a gesture arrived twice"
        assert set(ids) == sent[couple.id]
    # The gateway holds the moved channel on the new master.
    channel = gesture_channel(settings, victim)
    assert await eventually(lambda: _at_least(redis_cluster, channel, 1), timeout=15)
    for client in recipients.values():
        await close_quietly(client)


async def test_gestures_keep_arriving_after_their_channel_slot_moves_to_another_master(
    on_cluster, settings, redis_cluster: LocalCluster, database_url: str, http
):
    p1, p2 = await on_cluster(2)
    # A couple whose gesture channel's slot holds no key, so it can move without MIGRATE.
    while True:
        couple = Couple()
        channel = gesture_channel(settings, couple)
        slot = key_slot(channel.encode())
        owner = redis_cluster.node_of(channel)
        if redis_cluster.client(owner).execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0:
            break
    await make_couple(database_url, couple)
    b = await connect(p2.ws_url, couple, "partner_b")
    first = await send_http(http, p1.url, couple)
    received = await b.expect("gesture_received")
    assert received["gesture"]["id"] == first["gesture"]["id"]
    to = next(p for p in redis_cluster.masters() if p != owner)
    await asyncio.to_thread(redis_cluster.move_slot, slot, to)
    # The gateway follows the slot to its new master...
    assert await eventually(lambda: _at_least(redis_cluster, channel, 1), timeout=15)
    # ...and what is sent now arrives, once.
    after = [(await send_http(http, p1.url, couple))["gesture"]["id"] for _ in range(3)]
    ids = await gather_received(b, set(after), timeout=20)
    assert sorted(ids) == sorted(after)
    await close_quietly(b)


# ---------------------------------------------------------------------------- watch


async def test_watch_prints_events_from_the_cluster(
    on_cluster, settings, redis_cluster: LocalCluster, couple: Couple, http
):
    (p1,) = await on_cluster(1)
    env = settings_env(settings)
    env.update(REDIS_URL=redis_cluster.url, REDIS_CLUSTER="true")
    one = await _watch(env, str(couple.id))
    every = await _watch(env)
    try:
        await _line(one, "watching")
        await _line(every, "watching")
        # Watching all: the channels a gateway subscribes to are found and followed.
        b = await connect(p1.ws_url, couple, "partner_b")
        await _line(every, f"following {gesture_channel(settings, couple)}", stderr=True)
        answer = await send_http(http, p1.url, couple, message="watched")
        gesture_id = answer["gesture"]["id"]
        for watcher in (one, every):
            line = await _line(watcher, gesture_id)
            assert line.startswith(gesture_channel(settings, couple) + " ")
            assert '"gesture.sent"' in line
        await close_quietly(b)
    finally:
        for watcher in (one, every):
            watcher.terminate()
            await watcher.wait()


async def _watch(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "watch",
        *args,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


async def _line(
    process: asyncio.subprocess.Process, needle: str, stderr: bool = False, timeout: float = 20
) -> str:
    stream = process.stderr if stderr else process.stdout
    assert stream is not None
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"watch exited before printing {needle!r}")
            if needle in line:
                return line


# ---------------------------------------------------------------------------- last: a node dies


async def test_every_gesture_arrives_once_when_a_master_is_killed(
    on_cluster, settings, redis_cluster: LocalCluster, database_url: str, http
):
    """kill -9 of a master while gestures flow: its replica takes over after the cluster's
    node timeout; what could not be published meanwhile waits in the outbox, what the
    gateway missed it re-reads. (Runs last: the killed node stays down.)"""
    p1, p2 = await on_cluster(2)
    couples = await couples_on_every_shard(database_url, redis_cluster, settings)
    recipients = {c.id: await connect(p2.ws_url, c, "partner_b") for c in couples}
    victim = redis_cluster.node_of(gesture_channel(settings, couples[0]))
    sent: dict[uuid.UUID, set[str]] = {c.id: set() for c in couples}

    async def send_some(n: int) -> None:
        for _ in range(n):
            for couple in couples:
                answer = await send_http(http, p1.url, couple)
                sent[couple.id].add(answer["gesture"]["id"])

    await send_some(2)
    killing = threading.Thread(target=redis_cluster.kill, args=(victim,))
    killing.start()
    while killing.is_alive():
        await send_some(1)
        # Paced (one a second while the master dies), so the sends stay under the 60 a
        # minute rate limit however long the fail-over takes on a loaded machine.
        await asyncio.to_thread(killing.join, 1.0)
    await send_some(2)
    for couple in couples:
        ids = await gather_received(recipients[couple.id], sent[couple.id], timeout=40)
        assert sorted(ids) == sorted(set(ids)), "a gesture arrived twice"
        assert set(ids) == sent[couple.id]
    # The receiving process's shard connection broke and came back, and its metrics say so.
    scrape = (await http.get(f"{p2.url}/metrics")).text
    reconnects = [line for line in scrape.splitlines() if line.startswith("gesture_pubsub_rec")]
    assert reconnects and float(reconnects[0].split()[-1]) >= 1, reconnects
    for client in recipients.values():
        await close_quietly(client)
