"""The chaos run's load: couples that send, receive and acknowledge while servers break.

Runs as a generator process of its own (`python -m bench.chaos_load CONFIG.json`, mode
`chaos`, on the line protocol of `bench/genproc.py`) and speaks only the public protocol:
HTTP and WebSocket on 127.0.0.1. What it does, per couple:

* every partner has one to three devices (sockets), spread over the service processes so
  that the two partners sit on different ones; a device whose socket closes reconnects,
  to the next process when its own refuses;
* an "intermittent" partner is offline most of the time and comes online for a few seconds
  now and then: what was sent meanwhile must reach it in the greeting;
* each partner sends gestures, half over HTTP with an `Idempotency-Key` (retried with the
  same key on any failure, on another process), half as `gesture` frames with an
  `idempotency_key` (retried on another device or socket when no `gesture_sent` came back);
* a recipient acknowledges most of what it receives, over either edge, sometimes with a
  gesture sent back, and sometimes from two devices at once (only one may win).

Everything is recorded with time.time() (the orchestrator's clock is the same machine's) and
handed back in one `report` line at the end: what each send was answered, every HTTP status,
every acknowledgement's outcome, when each partner first received each gesture, and when
each partner had at least one socket up.

Commands: `go` starts the load, `stop` stops new sends and acknowledgements, lets pending
retries finish, connects every partner (intermittent ones too) and answers `drained`;
`report` answers with the records.
"""

import asyncio
import json
import random
import sys
import time
import uuid

from . import genproc
from .genproc import commands, emit

HOST = "127.0.0.1"
GESTURE_TYPES = ("hug", "kiss", "thinking_of_you")


class Records:
    def __init__(self) -> None:
        self.sends: list[dict] = []  # one per logical send
        self.http: list[list] = []  # [t_start, t_end, path, status, port]
        self.acks: list[dict] = []  # one per acknowledgement attempt that got an answer
        self.frames_foreign = 0  # frames of another relationship (must stay 0)
        self.ws_errors: dict[str, int] = {}
        self.closes: list[list] = []  # [t, close code or None]
        self.connect_failures = 0
        self.device_crashes: list[str] = []


class Device:
    def __init__(self, partner: "Partner", index: int, home: int) -> None:
        self.partner = partner
        self.index = index
        self.port_i = home
        self.ws = None
        self.waiting: dict[str, asyncio.Future] = {}
        self.task: asyncio.Task | None = None
        self.want = True  # should be connected


class Partner:
    def __init__(self, load: "Load", couple: dict, role: str, spec: dict) -> None:
        self.load = load
        self.rel = couple["rel"]
        self.role = role
        self.token = spec["token"]
        self.intermittent = spec.get("intermittent", False)
        self.devices = [
            Device(self, i, (spec["home"] + i) % len(load.ports)) for i in range(spec["devices"])
        ]
        self.received: dict[str, float] = {}  # gesture id -> first time any device had it
        self.handled: set[str] = set()  # gesture ids an acknowledgement was decided for
        self.up = 0
        self.timeline: list[list[float]] = [[time.time(), 0]]  # [t, sockets up]
        self.other: Partner | None = None

    def set_up(self, delta: int) -> None:
        self.up += delta
        self.timeline.append([time.time(), self.up])

    def live(self) -> list[Device]:
        return [d for d in self.devices if d.ws is not None]


class Load:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.ports: list[int] = cfg["ports"]
        self.rec = Records()
        self.partners: list[Partner] = []
        for couple in cfg["couples"]:
            a = Partner(self, couple, "partner_a", couple["a"])
            b = Partner(self, couple, "partner_b", couple["b"])
            a.other, b.other = b, a
            self.partners += [a, b]
        self.sending = False
        self.stopping = False
        self.inflight: set[asyncio.Task] = set()
        self.session = None
        self.seq = 0

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        return task

    # ------------------------------------------------------------------ sockets

    async def device_life(self, d: Device) -> None:
        """Keep the device connected while it wants to be; a bug here must not leave a
        device silently offline, so anything unexpected is counted and the loop goes on."""
        while True:
            try:
                await self._device_life(d)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.rec.device_crashes.append(repr(exc))
                print(f"device loop failed: {exc!r}", file=sys.stderr, flush=True)
                await asyncio.sleep(0.2)

    async def _device_life(self, d: Device) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        p = d.partner
        while True:  # until cancelled at the end
            if not d.want:
                await asyncio.sleep(0.1)
                continue
            port = self.ports[d.port_i]
            url = f"ws://{HOST}:{port}/ws?relationship_id={p.rel}&token={p.token}"
            try:
                ws = await connect(url, open_timeout=5, close_timeout=2, ping_interval=None)
            except (OSError, TimeoutError, WebSocketException):
                self.rec.connect_failures += 1
                d.port_i = (d.port_i + 1) % len(self.ports)  # try another process
                await asyncio.sleep(random.uniform(0.1, 0.4))
                continue
            d.ws = ws
            p.set_up(+1)
            pinger = asyncio.ensure_future(self.pinger(ws))
            try:
                async for raw in ws:
                    self.on_frame(d, json.loads(raw))
                    if not d.want:
                        break
            except (WebSocketException, OSError):
                pass
            finally:
                pinger.cancel()
                d.ws = None
                p.set_up(-1)
                for fut in d.waiting.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("socket closed"))
                d.waiting.clear()
            code = ws.close_code
            self.rec.closes.append([time.time(), code, d.want])
            if not d.want:
                await ws.close()
                continue
            if code is None or code in (1011, 1013):  # dropped or refused: elsewhere
                d.port_i = (d.port_i + 1) % len(self.ports)
            await asyncio.sleep(random.uniform(0.05, 0.3))

    async def pinger(self, ws) -> None:
        while True:
            await asyncio.sleep(20)
            try:
                await ws.send('{"type":"ping"}')
            except Exception:
                return

    def on_frame(self, d: Device, f: dict) -> None:
        p = d.partner
        kind = f.get("type")
        rid = f.get("request_id")
        if rid is not None and rid in d.waiting:
            fut = d.waiting.pop(rid)
            if not fut.done():
                fut.set_result(f)
        if kind == "error":
            code = f.get("code", "?")
            self.rec.ws_errors[code] = self.rec.ws_errors.get(code, 0) + 1
        g = f.get("gesture")
        if kind == "gesture_received" and g:
            if g.get("relationship_id") != p.rel or g.get("sent_by") == p.role:
                self.rec.frames_foreign += 1
                return
            gid = g["id"]
            if gid not in p.received:
                p.received[gid] = time.time()
            if gid not in p.handled and self.sending:
                p.handled.add(gid)
                self.spawn(self.maybe_acknowledge(p, g))

    # ------------------------------------------------------------------ HTTP

    async def http(self, method: str, path: str, token: str, body=None, headers=None):
        """One request on a random process: (status, json or None); status 0 = no answer."""
        import aiohttp

        port = random.choice(self.ports)
        t0 = time.time()
        status, data = 0, None
        try:
            async with self.session.request(
                method,
                f"http://{HOST}:{port}{path}",
                data=None if body is None else json.dumps(body),
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/json",
                    **(headers or {}),
                },
            ) as resp:
                status = resp.status
                raw = await resp.read()
                try:
                    data = json.loads(raw)
                except ValueError:
                    data = None
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass
        self.rec.http.append([t0, time.time(), path, status, port])
        return status, data

    # ------------------------------------------------------------------ sending

    async def sender(self, p: Partner) -> None:
        interval = self.cfg["send_interval"]
        await asyncio.sleep(random.uniform(0, interval))
        while self.sending:
            if p.intermittent and not p.live():
                await asyncio.sleep(0.5)  # an offline partner sends nothing
                continue
            self.spawn(self.send_one(p))
            await asyncio.sleep(random.expovariate(1.0 / interval))

    async def send_one(self, p: Partner) -> None:
        self.seq += 1
        key = f"k{self.cfg['tag']}-{self.seq}-{uuid.uuid4().hex[:8]}"
        via = "ws" if random.random() < self.cfg["ws_share"] else "http"
        if via == "ws" and not p.live():
            via = "http"
        rec = {"key": key, "rel": p.rel, "role": p.role, "via": via, "t0": time.time()}
        rec.update(t_ok=None, gid=None, attempts=0, answers=[])
        self.rec.sends.append(rec)
        gesture_type = random.choice(GESTURE_TYPES)
        message = f"c|{key}"
        give_up = time.time() + self.cfg["retry_window"]
        while time.time() < give_up:
            rec["attempts"] += 1
            if via == "http":
                status, data = await self.http(
                    "POST",
                    "/api/gestures/send",
                    p.token,
                    {
                        "relationship_id": p.rel,
                        "gesture_type": gesture_type,
                        "sender_id": p.role,
                        "message": message,
                    },
                    {"Idempotency-Key": key},
                )
                if status == 200 and data:
                    gid = data["gesture"]["id"]
                    rec["answers"].append(gid)
                    if rec["gid"] is None:
                        rec["gid"], rec["t_ok"] = gid, time.time()
                    # Now and then the answer "got lost": send again, must get the same id.
                    if random.random() < self.cfg["resend_share"] and rec["attempts"] == 1:
                        continue
                    return
                if 400 <= status < 500 and status not in (408, 429):
                    rec["rejected"] = status
                    return
            else:
                frame = {
                    "type": "gesture",
                    "gesture_type": gesture_type,
                    "message": message,
                    "idempotency_key": key,
                }
                answer = await self.ws_request(p, frame, timeout=8.0)
                if answer is not None and answer.get("type") == "gesture_sent":
                    gid = answer["gesture"]["id"]
                    rec["answers"].append(gid)
                    if rec["gid"] is None:
                        rec["gid"], rec["t_ok"] = gid, time.time()
                    return
                if answer is not None and answer.get("code") not in ("unavailable", None):
                    rec["rejected"] = answer.get("code")
                    return
            await asyncio.sleep(random.uniform(0.2, 0.8))
        rec["gave_up"] = True

    async def ws_request(self, p: Partner, frame: dict, timeout: float) -> dict | None:
        """Send a frame on one of the partner's live sockets and wait for the reply that
        carries its request_id; None when no socket is up or it closed first."""
        live = p.live()
        if not live:
            await asyncio.sleep(0.3)
            return None
        d = random.choice(live)
        rid = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        d.waiting[rid] = fut
        try:
            await d.ws.send(json.dumps({**frame, "request_id": rid}))
            async with asyncio.timeout(timeout):
                return await fut
        except Exception:
            return None
        finally:
            d.waiting.pop(rid, None)

    # ------------------------------------------------------------------ acknowledging

    async def maybe_acknowledge(self, p: Partner, g: dict) -> None:
        response = (g.get("message") or "").startswith("r|")
        if random.random() >= self.cfg["ack_share"] * (0.6 if response else 1.0):
            return  # left pending: the greeting and /pending keep offering it
        await asyncio.sleep(random.uniform(0.1, 1.5))
        send_back = not response and random.random() < self.cfg["send_back_share"]
        racers = 2 if random.random() < self.cfg["race_share"] else 1
        await asyncio.gather(*(self.acknowledge(p, g["id"], send_back) for _ in range(racers)))

    async def acknowledge(self, p: Partner, gid: str, send_back: bool) -> None:
        give_up = time.time() + self.cfg["retry_window"]
        marker = f"r|{gid}"
        while time.time() < give_up:
            via = "ws" if p.live() and random.random() < 0.5 else "http"
            t0 = time.time()
            if via == "http":
                body = {"gesture_id": gid, "acknowledged_by": p.role, "send_back": send_back}
                if send_back:
                    body["send_back_message"] = marker
                status, data = await self.http("POST", "/api/gestures/acknowledge", p.token, body)
                if status == 200 and data is not None:
                    resp = data.get("response_gesture")
                    self.rec.acks.append(
                        {
                            "gid": gid,
                            "rel": p.rel,
                            "by": p.role,
                            "via": via,
                            "t0": t0,
                            "acknowledged": bool(data.get("acknowledged")),
                            "send_back": send_back,
                            "response": resp["id"] if resp else None,
                        }
                    )
                    return
                if 400 <= status < 500 and status not in (408, 429):
                    self.rec.acks.append({"gid": gid, "via": via, "rejected": status, "t0": t0})
                    return
            else:
                frame = {"type": "gesture_acknowledge", "gesture_id": gid, "send_back": send_back}
                if send_back:
                    frame["send_back_message"] = marker
                answer = await self.ws_request(p, frame, timeout=8.0)
                if answer is not None:
                    kind = answer.get("type")
                    if kind == "gesture_acknowledged_confirm" or (
                        kind == "error" and "already acknowledged" in answer.get("message", "")
                    ):
                        resp = answer.get("response_gesture")
                        self.rec.acks.append(
                            {
                                "gid": gid,
                                "rel": p.rel,
                                "by": p.role,
                                "via": via,
                                "t0": t0,
                                "acknowledged": kind == "gesture_acknowledged_confirm",
                                "send_back": send_back,
                                "response": resp["id"] if resp else None,
                            }
                        )
                        return
                    if kind == "error" and answer.get("code") != "unavailable":
                        self.rec.acks.append(
                            {"gid": gid, "via": via, "rejected": answer.get("code"), "t0": t0}
                        )
                        return
            await asyncio.sleep(random.uniform(0.2, 0.8))
        self.rec.acks.append({"gid": gid, "via": "gave_up", "t0": time.time()})

    # ------------------------------------------------------------------ comings and goings

    async def intermittent(self, p: Partner) -> None:
        lo, hi = self.cfg["offline_s"]
        while not self.stopping:
            for d in p.devices:
                d.want = False
                if d.ws is not None:
                    self.spawn(d.ws.close())
            await asyncio.sleep(random.uniform(lo, hi))
            if self.stopping:
                break
            for d in p.devices:
                d.want = True
            await asyncio.sleep(random.uniform(2.0, 5.0))

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10), skip_auto_headers=["User-Agent"]
        )
        for p in self.partners:
            for d in p.devices:
                d.want = not p.intermittent
                d.task = asyncio.ensure_future(self.device_life(d))
        await _until(
            lambda: all(p.up == len(p.devices) for p in self.partners if not p.intermittent), 30
        )
        emit({"event": "ready", "up": sum(p.up for p in self.partners)})
        background: list[asyncio.Task] = []
        async for cmd in commands():
            match cmd["cmd"]:
                case "go":
                    self.sending = True
                    for p in self.partners:
                        background.append(asyncio.ensure_future(self.sender(p)))
                        if p.intermittent:
                            background.append(asyncio.ensure_future(self.intermittent(p)))
                    emit({"event": "going", "t": time.time()})
                case "stop":
                    self.sending = False
                    self.stopping = True
                    for t in background:
                        t.cancel()
                    # Retries in flight finish (each is bounded by retry_window).
                    if self.inflight:
                        await asyncio.wait(
                            list(self.inflight), timeout=self.cfg["retry_window"] + 15
                        )
                    for p in self.partners:
                        for d in p.devices:
                            d.want = True
                    await _until(lambda: all(p.up == len(p.devices) for p in self.partners), 30)
                    emit(
                        {
                            "event": "drained",
                            "t": time.time(),
                            "up": sum(p.up for p in self.partners),
                            "devices": sum(len(p.devices) for p in self.partners),
                            "unfinished": len(self.inflight),
                        }
                    )
                case "report":
                    emit({"event": "report", **self.report()})
                case "quit":
                    break
        for p in self.partners:
            for d in p.devices:
                d.want = False
                if d.task:
                    d.task.cancel()
                if d.ws is not None:
                    try:
                        async with asyncio.timeout(2):
                            await d.ws.close()
                    except Exception:
                        pass
        await self.session.close()
        emit({"event": "stopped"})

    def report(self) -> dict:
        r = self.rec
        return {
            "sends": r.sends,
            "http": r.http,
            "acks": r.acks,
            "frames_foreign": r.frames_foreign,
            "ws_errors": r.ws_errors,
            "closes": r.closes,
            "connect_failures": r.connect_failures,
            "device_crashes": r.device_crashes,
            "partners": [
                {
                    "rel": p.rel,
                    "role": p.role,
                    "intermittent": p.intermittent,
                    "devices": len(p.devices),
                    "received": p.received,
                    "timeline": p.timeline,
                }
                for p in self.partners
            ],
        }


async def _until(predicate, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def run_chaos(cfg: dict) -> None:
    await Load(cfg).run()


if __name__ == "__main__":
    genproc.main({"chaos": run_chaos})
