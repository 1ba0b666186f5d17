"""The WebSocket protocol the project runs under uvicorn: uvicorn's wsproto protocol, with its
keepalive pings sent by one timer per server instead of one per socket.

uvicorn pings each socket from a timer of its own and arms a second timer for the pong, so
at 15,000 sockets and a ping every 30 s the event loop wakes a thousand times a second, once
for each ping and once for each pong. Here one timer ticks every second and visits the
sockets whose turn it is (each socket's turn comes every `--ws-ping-interval` seconds): it
pings them all in one pass, so their pongs come back together, and closes the sockets whose
previous ping went unanswered for `--ws-ping-timeout` seconds with 1011 "keepalive ping
timeout", as uvicorn does. The promise is uvicorn's: a peer that stops answering pings (gone
without a close, behind a proxy or not) is closed within interval + timeout seconds; a
quiet one that answers stays open. Nothing here knows the app.

Run it as `uvicorn service.app:app --ws service.wsserver:WSProtocol` (the project's
commands do); everything but the keepalive is uvicorn's `--ws wsproto`.
`service.wsserver:SansioWSProtocol` is the same over `--ws websockets-sansio`.
"""

import asyncio
import struct
import weakref
from collections import deque

from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import (
    WebSocketsSansIOProtocol as _SansioProtocol,
)
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol as _WsprotoProtocol
from websockets.protocol import State
from wsproto.connection import ConnectionState
from wsproto.events import Pong


class Wheel:
    """The sockets of one server, in `interval` buckets of which one is pinged a tick."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, timeout: float | None):
        self._loop = loop
        self._buckets: list[set[WSProtocol]] = [set() for _ in range(max(1, round(interval)))]
        self._tick = interval / len(self._buckets)
        self._timeout = timeout
        self._give = 0  # the bucket the next socket joins
        self._visit = 0  # the bucket the next tick pings
        self._round = 0
        self._waiting: deque[tuple[float, list[WSProtocol]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, protocol: "WSProtocol") -> None:
        bucket = self._buckets[self._give]
        self._give = (self._give + 1) % len(self._buckets)
        bucket.add(protocol)
        protocol.keepalive_bucket = bucket
        if self._timer is None:
            self._timer = self._loop.call_later(self._tick, self._run)

    def _run(self) -> None:
        # The next tick first: a socket that fails below must not stop the pings of the rest.
        self._timer = self._loop.call_later(self._tick, self._run)
        now = self._loop.time()
        # Pings due for an answer: unanswered means a dead peer.
        while self._waiting and self._waiting[0][0] <= now:
            _, pinged = self._waiting.popleft()
            for protocol in pinged:
                if protocol.keepalive_bucket is not None and protocol.pending_ping_payload:
                    protocol.keepalive_timeout()
        self._round = (self._round + 1) & 0xFFFFFFFF
        payload = struct.pack("!I", self._round)
        # A ping from the server is unmasked: FIN + opcode 9, then the payload's length.
        frame = b"\x89" + bytes([len(payload)]) + payload
        bucket = self._buckets[self._visit]
        self._visit = (self._visit + 1) % len(self._buckets)
        pinged = [p for p in bucket if not p.pending_ping_payload and p.ping(payload, frame)]
        if pinged and self._timeout is not None:
            self._waiting.append((now + self._timeout, pinged))
        if not any(self._buckets) and not self._waiting:
            self._timer.cancel()  # no sockets: the next one starts the ticks again
            self._timer = None


# One wheel per server (its Config), so servers on one loop (tests) keep their own settings.
_wheels: "weakref.WeakKeyDictionary[Config, Wheel]" = weakref.WeakKeyDictionary()


class _WheelKeepalive:
    """The keepalive hooks of uvicorn's WebSocket protocols, given to the wheel."""

    keepalive_bucket: set | None = None

    def start_keepalive(self) -> None:
        if not self.ping_interval:
            return  # --ws-ping-interval 0: no pings
        wheel = _wheels.get(self.config)
        if wheel is None:
            wheel = _wheels[self.config] = Wheel(self.loop, self.ping_interval, self.ping_timeout)
        wheel.add(self)

    def stop_keepalive(self) -> None:
        if self.keepalive_bucket is not None:
            self.keepalive_bucket.discard(self)
            self.keepalive_bucket = None
        self.pending_ping_payload = None

    def ping(self, payload: bytes, frame: bytes) -> bool:
        """Send the tick's ping (`frame`, already encoded); False if the socket is closing."""
        if self.close_sent or self.transport.is_closing() or not self._open():
            return False
        self.pending_ping_payload = payload
        self._write_ping(payload, frame)
        return True

    def _answered(self, payload: bytes) -> None:
        # A pong of an earlier round (a late answer) does not count for this one.
        if self.pending_ping_payload is not None and payload == self.pending_ping_payload:
            self.pending_ping_payload = None


class WSProtocol(_WheelKeepalive, _WsprotoProtocol):
    """`--ws wsproto` with the wheel's keepalive: what the project runs."""

    def _open(self) -> bool:
        return self.conn.state == ConnectionState.OPEN

    def _write_ping(self, payload: bytes, frame: bytes) -> None:
        self.transport.write(frame)  # wsproto keeps no state for a ping it sends

    def handle_pong(self, event: Pong) -> None:
        self._answered(bytes(event.payload))


class SansioWSProtocol(_WheelKeepalive, _SansioProtocol):
    """`--ws websockets-sansio` with the wheel's keepalive, for comparing the two."""

    def _open(self) -> bool:
        return self.conn.state is State.OPEN

    def _write_ping(self, payload: bytes, frame: bytes) -> None:
        self.conn.send_ping(payload)
        self.transport.write(b"".join(self.conn.data_to_send()))

    def handle_pong(self, event) -> None:
        self._answered(bytes(event.data))
