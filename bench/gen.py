"""Load-generator processes: `python -m bench.gen CONFIG.json`.

Never imported by the measuring process for its loops; the orchestrator starts one process
per generator and talks to it over stdin/stdout, one JSON object per line:

* generator -> orchestrator: `{"event": "ready" | "done" | "report" | "allup" | "error", ...}`
* orchestrator -> generator: `{"cmd": "go" | "report" | "stop", ...}`

Every generator has a hard time limit (`deadline` in its config, enforced with SIGALRM, whose
default action ends the process), bounded loops, and talks to 127.0.0.1 only. That side of
the line protocol (`emit`, `commands`, the time limit) lives in `bench/genproc.py`, shared
with the chaos run's generator (`python -m bench.chaos_load`).

Modes:

* `ws`: WebSocket clients (senders, receivers, idle holders), on the lean client of
  `bench/wsclient.py` (offering permessage-deflate unless `compression` is null). Connect,
  wait for the first `presence` frame (sent once the server has subscribed and greeted),
  optionally reconnect when closed, send `gesture` frames at a given rate on `go`, record
  every `gesture_received` whose message carries a bench stamp.
* `http`: POST /api/gestures/send, closed loop (as fast as `concurrency` clients go) or open
  loop at a rate with stamped messages (stopping after `count` sends if given).
* `ceiling`: the bare loop: INSERT one row per transaction with asyncpg + Redis PUBLISH.
* `redis_pub`: publish `gesture.sent` events straight to Redis at a rate.

A stamp is the message `b|TAG|GEN.SEQ|EPOCH`: receivers compute latency as time.time() at
receipt minus EPOCH; all processes share the machine's clock.
"""

import asyncio
import gc
import math
import random
import time
import uuid
from datetime import UTC, datetime

import msgspec

from . import genproc
from .genproc import commands, emit

HOST = "127.0.0.1"


def stamp(tag: str, gen: int, seq: int) -> str:
    return f"b|{tag}|{gen}.{seq}|{time.time():.6f}"


class _G(msgspec.Struct, gc=False):
    message: str | None = None
    id: str | None = None


class _Frame(msgspec.Struct, gc=False):
    type: str
    gesture: _G | None = None


_frame_decoder = msgspec.json.Decoder(_Frame)


class Received:
    """Stamped gestures seen, per tag: unique keys and latencies (ms)."""

    def __init__(self) -> None:
        self.keys: dict[str, set[str]] = {}
        self.lat: dict[str, list[float]] = {}
        # Per tag, per second of arrival (epoch): how many arrived later than 50 ms, to
        # tell one stall from a tail spread over the whole window.
        self.slow: dict[str, dict[int, int]] = {}

    def note(self, message: str | None, now: float) -> None:
        if not message or not message.startswith("b|"):
            return
        try:
            _, tag, key, t = message.split("|", 3)
            sent = float(t)
        except ValueError:
            return
        keys = self.keys.setdefault(tag, set())
        if key in keys:
            return
        keys.add(key)
        ms = (now - sent) * 1000.0
        self.lat.setdefault(tag, []).append(round(ms, 3))
        if ms > 50.0:
            slow = self.slow.setdefault(tag, {})
            slow[int(now)] = slow.get(int(now), 0) + 1

    def report(self, tag: str, full: bool) -> dict:
        out = {"n": len(self.keys.get(tag, ()))}
        if full:
            out["lat"] = self.lat.get(tag, [])
            out["slow"] = self.slow.get(tag, {})
        return out


# ---------------------------------------------------------------------------- ws


class WsClient:
    __slots__ = ("acks", "errors", "port", "rel", "task", "token", "up", "ws")

    def __init__(self, port: int, rel: str, token: str) -> None:
        self.port = port
        self.rel = rel
        self.token = token
        self.ws = None
        self.up = asyncio.Event()
        self.task = None
        self.acks = 0
        self.errors = 0


def _freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's reach.

    A generator holds thousands of sockets, each a few long-lived objects; without this,
    every full collection walks all of them, and a pause of the generator's loop shows up in
    the bench as latency of the service (a frame read late is a frame stamped late). The
    sockets' objects are never garbage while held, so the collector has nothing to find
    there; gc.freeze() takes them out of every later collection."""
    gc.collect()
    gc.freeze()


async def run_ws(cfg: dict) -> None:
    from .wsclient import HandshakeError, connect

    gen = cfg["gen"]
    reconnect = cfg.get("reconnect", False)
    app_ping = cfg.get("app_ping", 0)
    # Offer permessage-deflate as browsers do unless told `null` (bench/wsclient.py).
    compression = cfg.get("compression", "deflate")
    clients = [WsClient(p, r, t) for p, r, t in cfg["clients"]]
    received = Received()
    sem = asyncio.Semaphore(cfg.get("connect_concurrency", 64))
    stopping = False
    state = {"down": 0, "epoch": 0, "closes": 0, "close_codes": {}, "connect_failures": 0}
    back: list[float] = []  # when each client of the current epoch came back
    connect_times: list[float] = []
    loop = asyncio.get_running_loop()

    async def open_one(c: WsClient) -> bool:
        resource = f"/ws?relationship_id={c.rel}&token={c.token}"
        first = loop.create_future()

        def on_message(raw: str | bytes) -> None:
            if not first.done():
                first.set_result(raw)
                return
            try:
                f = _frame_decoder.decode(raw)
            except msgspec.DecodeError:
                c.errors += 1
                return
            received_frame(c, f)

        def lost(_) -> None:
            if not first.done():
                first.set_exception(ConnectionError("closed before its first frame"))

        ws = None
        async with sem:
            try:
                async with asyncio.timeout(15):
                    ws = await connect(HOST, c.port, resource, on_message, compression, 2**20)
                    ws.closed.add_done_callback(lost)
                    f = _frame_decoder.decode(await first)
            except (OSError, TimeoutError, HandshakeError, msgspec.DecodeError):
                if ws is not None:
                    ws.abort()
                state["connect_failures"] += 1
                return False
        if f.type != "presence":
            received_frame(c, f)
        c.ws = ws
        connect_times.append(time.time())
        return True

    def received_frame(c: WsClient, f: _Frame) -> None:
        if f.type == "gesture_received" and f.gesture is not None:
            received.note(f.gesture.message, time.time())
        elif f.type == "gesture_sent":
            c.acks += 1
        elif f.type == "error":
            c.errors += 1

    def backoff(attempt: int) -> float:
        # As the project's client waits (service/demo/client.js): 0.5 s doubling to 30 s
        # after each failed try, each wait a random 50-100 % of that.
        return min(30.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)

    async def life(c: WsClient) -> None:
        delay = 0.0
        attempt = 0
        while not stopping:
            if delay:
                await asyncio.sleep(delay)
            if not await open_one(c):
                if not reconnect:
                    return
                attempt += 1
                delay = backoff(attempt)
                continue
            attempt = 0
            c.up.set()
            if state["down"] > 0:
                state["down"] -= 1
                back.append(time.time())
                if state["down"] == 0:
                    emit({"event": "allup", "t": back[-1], "epoch": state["epoch"], "back": back})
                    back.clear()
                    gc.freeze()  # the reconnected sockets' objects too (see _freeze_heap)
            ws = c.ws
            code = await asyncio.shield(ws.closed)  # frames go to on_message meanwhile
            c.up.clear()
            c.ws = None
            state["closes"] += 1
            state["close_codes"][str(code)] = state["close_codes"].get(str(code), 0) + 1
            if stopping or not reconnect:
                return
            if state["down"] == 0:
                state["epoch"] += 1
            state["down"] += 1
            delay = backoff(0)

    async def pinger() -> None:
        # `ping` frames, as a client may send them (the service needs none: it pings).
        while True:
            await asyncio.sleep(app_ping * random.uniform(0.8, 1.0))
            for c in clients:
                if c.ws is not None:
                    try:
                        c.ws.send('{"type":"ping"}')
                    except OSError:
                        pass

    async def send_at(rate: float, duration: float, tag: str) -> dict:
        live = [c for c in clients if c.ws is not None]
        if not live or rate <= 0:
            return {"sent": 0}
        sent = 0
        start = time.time()
        end = start + duration
        i = 0
        while True:
            now = time.time()
            if now >= end:
                break
            due = int((now - start) * rate) - sent
            for _ in range(min(due, 10_000)):
                c = live[i % len(live)]
                i += 1
                msg = stamp(tag, gen, sent)
                frame = '{"type":"gesture","gesture_type":"hug","message":"' + msg + '"}'
                try:
                    c.ws.send(frame)
                except (OSError, AttributeError):
                    continue
                sent += 1
            await asyncio.sleep(0.002)
        return {"sent": sent, "elapsed": time.time() - start}

    # Generators started one after another begin together, at `start_at` when given: the
    # connect rate is then the service's, not how fast the orchestrator spawned processes.
    if cfg.get("start_at"):
        await asyncio.sleep(max(0.0, cfg["start_at"] - time.time()))
    t_start = time.time()
    cpu_start = time.process_time()
    for c in clients:
        c.task = asyncio.create_task(life(c))
    ping_task = asyncio.create_task(pinger()) if app_ping else None
    # Wait until every client is up or has given up (non-reconnecting failures end the task).
    limit = time.time() + cfg.get("connect_deadline", 60)
    while time.time() < limit:
        if all(c.up.is_set() or c.task.done() for c in clients):
            break
        await asyncio.sleep(0.02)
    t_done = max(connect_times) if connect_times else time.time()
    cpu_connect = time.process_time() - cpu_start  # this process's CPU for the connects
    _freeze_heap()
    emit(
        {
            "event": "ready",
            "connected": sum(c.up.is_set() for c in clients),
            "total": len(clients),
            "failures": state["connect_failures"],
            # Sockets on which the server accepted permessage-deflate.
            "deflate": sum(1 for c in clients if c.ws is not None and c.ws.deflate),
            "t_start": t_start,
            "t_done": t_done,
            "cpu_s": round(cpu_connect, 3),
        }
    )
    async for cmd in commands():
        match cmd["cmd"]:
            case "go":
                res = await send_at(cmd["rate"], cmd["duration"], cmd["tag"])
                emit({"event": "done", **res})
            case "report":
                emit(
                    {
                        "event": "report",
                        **received.report(cmd["tag"], cmd.get("full", True)),
                        "acks": sum(c.acks for c in clients),
                        "errors": sum(c.errors for c in clients),
                        "up": sum(c.up.is_set() for c in clients),
                        "closes": state["closes"],
                        "close_codes": state["close_codes"],
                        "connect_failures": state["connect_failures"],
                    }
                )
            case "stop":
                break
    stopping = True
    if ping_task:
        ping_task.cancel()
    for c in clients:
        c.task.cancel()
    closing = [c.ws.close(timeout=2.0) for c in clients if c.ws is not None]
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*closing, return_exceptions=True)
    except TimeoutError:
        pass
    emit({"event": "stopped"})


# ---------------------------------------------------------------------------- http


async def run_http(cfg: dict) -> None:
    from .httpclient import HttpClient

    gen = cfg["gen"]
    targets = cfg["targets"]  # [port, rel, token, role]
    concurrency = cfg["concurrency"]
    warmup = cfg.get("warmup", 1.0)
    client = HttpClient(HOST, timeout=10)
    # Each target's headers, encoded once (the body is encoded per request).
    headers = {
        token: b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n" % token.encode()
        for _, _, token, _ in targets
    }
    statuses: dict[str, int] = {}
    emit({"event": "ready"})

    async def post(port, rel, token, role, message=None) -> tuple[float, int]:
        body = {"relationship_id": rel, "gesture_type": "hug", "sender_id": role}
        if message is not None:
            body["message"] = message
        t0 = time.perf_counter()
        status = await client.post(
            port, "/api/gestures/send", headers[token], msgspec.json.encode(body)
        )
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        return (time.perf_counter() - t0) * 1000.0, status

    async def closed_loop(duration: float) -> dict:
        lat: list[float] = []
        start = time.time()
        measure_from = start + warmup
        end = measure_from + duration
        counted = 0

        async def worker(w: int) -> None:
            nonlocal counted
            mine = targets[w::concurrency] or targets
            # Half of the clients talk to each service process: the port is per worker.
            i = 0
            while time.time() < end:
                port, rel, token, role = mine[i % len(mine)]
                port = cfg["ports"][(w + gen) % len(cfg["ports"])]
                i += 1
                ms, status = await post(port, rel, token, role)
                if status == 200 and time.time() >= measure_from:
                    lat.append(round(ms, 3))
                    counted += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return {"ok": counted, "window": duration, "lat": lat}

    async def open_loop(rate: float, duration: float, tag: str, count: int | None) -> dict:
        # `count`: stop after that many sends (each target once when it is len(targets)).
        limit = count if count is not None else math.inf
        lat: list[float] = []
        inflight = asyncio.Semaphore(concurrency)
        tasks = set()
        sent = 0
        start = time.time()
        end = start + duration

        async def one(seq: int) -> None:
            port, rel, token, role = targets[seq % len(targets)]
            try:
                ms, status = await post(port, rel, token, role, stamp(tag, gen, seq))
                if status == 200:
                    lat.append(round(ms, 3))
            finally:
                inflight.release()

        while time.time() < end and sent < limit:
            due = int((time.time() - start) * rate) - sent
            for _ in range(int(min(due, 1000, limit - sent))):
                await inflight.acquire()
                t = asyncio.create_task(one(sent))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.002)
        if tasks:
            await asyncio.wait(tasks, timeout=15)
        return {"sent": sent, "lat": lat}

    async for cmd in commands():
        match cmd["cmd"]:
            case "go":
                statuses.clear()
                if cmd.get("rate"):
                    res = await open_loop(
                        cmd["rate"], cmd["duration"], cmd["tag"], cmd.get("count")
                    )
                else:
                    res = await closed_loop(cmd["duration"])
                emit({"event": "done", "statuses": statuses, **res})
            case "stop":
                break
    await client.close()
    emit({"event": "stopped"})


# ---------------------------------------------------------------------------- ceiling

_INSERT = """INSERT INTO connection_gestures
    (id, relationship_id, gesture_type, sent_by, message, ai_generated, sent_at)
VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp())
RETURNING id, relationship_id, gesture_type, sent_by, message,
    coalesce(ai_generated, false) AS ai_generated, sent_at, delivered_at,
    acknowledged_at, acknowledged_by, response_gesture_id"""


async def run_ceiling(cfg: dict) -> None:
    """As lean as the generator that drives the service: a connection of its own for each
    client when PostgreSQL has enough to spare (no pool to go through a row), and PUBLISH
    encoded by hand as the service's hot paths do (`service.resp`)."""
    import asyncpg
    import redis.asyncio as aioredis

    from service import resp
    from service.schemas import Gesture, GestureSent, encoder

    concurrency = cfg["concurrency"]
    rels = [uuid.UUID(r) for r in cfg["rels"]]
    prefix = cfg["channel_prefix"].encode()
    own = cfg["pool"] >= concurrency
    if own:
        conns = [await asyncpg.connect(cfg["dsn"], command_timeout=10) for _ in range(concurrency)]
    else:
        pool = await asyncpg.create_pool(
            cfg["dsn"], min_size=cfg["pool"], max_size=cfg["pool"], command_timeout=10
        )
    redis = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            cfg["redis_url"], max_connections=concurrency, timeout=5
        )
    )
    await redis.ping()
    emit({"event": "ready"})

    async def insert(w: int, rel: uuid.UUID) -> asyncpg.Record:
        args = (_INSERT, uuid.uuid4(), rel, "hug", "partner_a", None, False)
        if own:
            return await conns[w].fetchrow(*args)
        async with pool.acquire() as conn:
            return await conn.fetchrow(*args)

    async def bare(duration: float, warmup: float) -> dict:
        lat: list[float] = []
        start = time.time()
        measure_from = start + warmup
        end = measure_from + duration
        errors = 0

        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while time.time() < end:
                rel = rels[i % len(rels)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    g = Gesture(**dict(await insert(w, rel)))
                    event = GestureSent(
                        event_id=uuid.uuid4(),
                        occurred_at=g.sent_at,
                        relationship_id=rel,
                        gesture=g,
                    )
                    channel = prefix + str(rel).encode()
                    await resp.execute(
                        redis, [resp.command(b"PUBLISH", channel, encoder.encode(event))], 5
                    )
                except Exception:
                    errors += 1
                    continue
                if time.time() >= measure_from:
                    lat.append(round((time.perf_counter() - t0) * 1000.0, 3))

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return {"ok": len(lat), "window": duration, "lat": lat, "errors": errors}

    async for cmd in commands():
        match cmd["cmd"]:
            case "go":
                emit({"event": "done", **await bare(cmd["duration"], cmd.get("warmup", 1.0))})
            case "stop":
                break
    if own:
        for conn in conns:
            await conn.close()
    else:
        await pool.close()
    await redis.aclose()
    emit({"event": "stopped"})


# ---------------------------------------------------------------------------- redis_pub


async def run_redis_pub(cfg: dict) -> None:
    import redis.asyncio as aioredis

    from service.schemas import Gesture, GestureSent, encoder

    gen = cfg["gen"]
    rels = [uuid.UUID(r) for r in cfg["rels"]]
    channels = [f"{cfg['channel_prefix']}{r}" for r in rels]
    sharded = bool(cfg.get("cluster"))  # a Redis Cluster: SPUBLISH, as the service does there
    if sharded:
        redis = aioredis.RedisCluster.from_url(cfg["redis_url"])
    else:
        redis = aioredis.Redis.from_url(cfg["redis_url"])
    await redis.ping()
    emit({"event": "ready"})

    def event(i: int, seq: int, tag: str) -> bytes:
        now = datetime.now(UTC)
        g = Gesture(
            id=uuid.uuid4(),
            relationship_id=rels[i],
            gesture_type="hug",
            sent_by="partner_a",
            message=stamp(tag, gen, seq),
            ai_generated=False,
            sent_at=now,
            delivered_at=None,
            acknowledged_at=None,
            acknowledged_by=None,
            response_gesture_id=None,
        )
        return encoder.encode(
            GestureSent(event_id=uuid.uuid4(), occurred_at=now, relationship_id=rels[i], gesture=g)
        )

    async def publish_at(rate: float, duration: float, tag: str) -> dict:
        sent = 0
        start = time.time()
        end = start + duration
        while True:
            now = time.time()
            if now >= end:
                break
            due = min(int((now - start) * rate) - sent, 5000)
            if due > 0:
                pipe = redis.pipeline(transaction=False)
                for k in range(due):
                    i = (sent + k) % len(rels)
                    if sharded:
                        pipe.spublish(channels[i], event(i, sent + k, tag))
                    else:
                        pipe.publish(channels[i], event(i, sent + k, tag))
                await pipe.execute()
                sent += due
            await asyncio.sleep(0.001)
        return {"sent": sent, "elapsed": time.time() - start}

    async for cmd in commands():
        match cmd["cmd"]:
            case "go":
                emit(
                    {"event": "done", **await publish_at(cmd["rate"], cmd["duration"], cmd["tag"])}
                )
            case "stop":
                break
    await redis.aclose()
    emit({"event": "stopped"})


MODES = {
    "ws": run_ws,
    "http": run_http,
    "ceiling": run_ceiling,
    "redis_pub": run_redis_pub,
}


if __name__ == "__main__":
    genproc.main(MODES)
