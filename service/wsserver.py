"""The WebSocket server the project runs under uvicorn: `HttpProtocol` (uvicorn's `--http`)
in front, `WSProtocol` (its `--ws`) for the sockets, and one keepalive timer per server.

`WSProtocol` is an ASGI WebSocket protocol written for this service: the handshake read
once, frames read and written by hand, one slotted object a socket (its docstring says what
it promises). `HttpProtocol` hands a connection whose first bytes are a whole upgrade
request straight to it, and any other connection to uvicorn's httptools protocol.
`WsprotoProtocol` and `SansioWSProtocol` are uvicorn's two protocols with the same
keepalive: the first serves sockets when permessage-deflate is on, both are peers in the
bench.

The keepalive: uvicorn pings each socket from a timer of its own and arms a second timer for
the pong, so at 15,000 sockets and a ping every 30 s the event loop wakes a thousand times a
second. Here one timer ticks every second and visits the sockets whose turn it is (each
socket's turn comes every `--ws-ping-interval` seconds): it pings them all in one pass, so
their pongs come back together, and closes the sockets whose previous ping went unanswered
for `--ws-ping-timeout` seconds with 1011 "keepalive ping timeout", as uvicorn does. The
promise is uvicorn's: a peer that stops answering pings (gone without a close, behind a
proxy or not) is closed within interval + timeout seconds; a quiet one that answers stays
open. Nothing here knows the app beyond an optional `server_stopping` hook in its lifespan
state.

Run it as `uvicorn service.app:app --http service.wsserver:HttpProtocol --ws
service.wsserver:WSProtocol` (the project's commands do).
"""

import asyncio
import base64
import binascii
import codecs
import hashlib
import logging
import struct
import weakref
from collections import deque
from collections.abc import Callable
from urllib.parse import unquote

from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected, is_ssl
from uvicorn.protocols.websockets.websockets_sansio_impl import (
    WebSocketsSansIOProtocol as _SansioProtocol,
)
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol as _WsprotoProtocol
from websockets.protocol import State
from wsproto.connection import ConnectionState
from wsproto.events import Pong

log = logging.getLogger("uvicorn.error")


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


class WsprotoProtocol(_WheelKeepalive, _WsprotoProtocol):
    """`--ws wsproto` with the wheel's keepalive: what `WSProtocol` runs when
    permessage-deflate is on (WS_PER_MESSAGE_DEFLATE=true), and a peer in the bench."""

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


# ---------------------------------------------------------------------------- the lean one

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Seconds a socket failed for breaking the protocol waits for its peer to close (`_fail`).
FAIL_LINGER = 2.0
_CLOSE_OK = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))
_VERSION = (b"sec-websocket-version", b"13")
_MAX_PIECES = 1024  # frames one message may come in
_PLAIN = b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
_REASONS = {400: b"Bad Request", 403: b"Forbidden", 426: b"Upgrade Required", 500: b"Error"}

try:  # websockets (a dependency of uvicorn[standard]) ships the XOR in C
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover

    def _apply_mask(data: bytes, mask: bytes) -> bytes:
        n = len(data)
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


def _address(info) -> tuple[str, int] | None:
    """An ASGI address from a transport's sockname or peername (asked for directly: uvicorn's
    helpers make the transport build a socket object for it, kept as long as the socket)."""
    if isinstance(info, list | tuple) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


def _frame(opcode: int, payload: bytes) -> bytes:
    """A server frame (unmasked, unfragmented)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def _close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason cut to the 123 bytes a control frame leaves it, whole
    characters only (a peer must refuse a reason that is not UTF-8)."""
    cut = reason.encode()[:123].decode(errors="ignore").encode()
    return _frame(0x8, struct.pack("!H", code) + cut)


def _valid_key(key: bytes | None) -> bool:
    """Whether a Sec-WebSocket-Key is base64 of 16 bytes (RFC 6455 4.2.1, item 5)."""
    if not key or len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class _ProtocolError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class WSProtocol(asyncio.Protocol):
    """What the project runs: an ASGI WebSocket server protocol for uvicorn, without
    wsproto or websockets underneath.

    uvicorn's own protocols hand the upgrade request, which uvicorn has already parsed,
    to a second HTTP parser (h11 inside wsproto), and keep per socket a parser, a queue, an
    event and buffers they rarely need: half of a connect's CPU and most of an idle socket's
    memory. Here the request is split once, the 101 answer is written from a template, and
    an idle socket is this object (slots only), its transport and the app's task.

    Promises, as uvicorn's `--ws wsproto` keeps them (tests/test_wsserver.py checks them):
    RFC 6455 framing for a server (client frames must be masked, else 1002; RSV bits,
    unknown opcodes, bad control frames and a 64-bit length with its top bit set: 1002;
    text that is not UTF-8: 1007, in a fragmented message at the fragment that holds the bad
    sequence; a message over `--ws-max-size` bytes: 1009, refused as soon as its header says
    so); the opening handshake of RFC 6455 4.2.1 (an HTTP/1.1 GET with Host, Connection:
    Upgrade and a key that is base64 of 16 bytes, else 400; a version other than 13: 426
    naming 13; bench/wsconformance.py holds the cases); ping answered
    with pong; a close answered with a close of the same code; the ASGI `websocket` scope and
    messages, incl. a denial (403, or the app's own `websocket.http.response`); reading is
    paused while the app has a message it has not taken, and `send` waits while the
    transport's buffer is over its high-water mark; keepalive pings by the wheel above;
    `shutdown()` closes with 1012. No extension is negotiated: with
    `--ws-per-message-deflate true` it is `WsprotoProtocol` that serves the socket.
    """

    __slots__ = (
        "app",
        "app_state",
        "buffer",
        "close_sent",
        "close_timer",
        "config",
        "connections",
        "default_headers",
        "disconnected",
        "failed",
        "fragments",
        "handshake_complete",
        "inbox",
        "keepalive_bucket",
        "key",
        "loop",
        "pending_ping_payload",
        "ping_interval",
        "ping_timeout",
        "read_paused",
        "response_started",
        "scope",
        "tasks",
        "transport",
        "waiter",
        "write_paused",
    )

    def __new__(cls, config: Config, *args, **kwargs):
        if config.ws_per_message_deflate:
            return WsprotoProtocol(config, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        config: Config,
        server_state,
        app_state: dict,
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()  # pragma: no cover
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.app_state = app_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.default_headers = server_state.default_headers
        self.ping_interval = config.ws_ping_interval
        self.ping_timeout = config.ws_ping_timeout
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.scope: dict | None = None
        self.key = b""  # Sec-WebSocket-Key, until the accept
        self.buffer = b""  # bytes of a frame not complete yet
        # [opcode, bytes (binary) or text (a list of str) so far, pieces, UTF-8 decoder (text
        # only), bytes received] of a fragmented message
        self.fragments: list | None = None
        self.inbox: deque = deque()  # ASGI messages the app has not taken yet
        self.waiter: asyncio.Future | None = None  # the app waiting in receive()
        self.write_paused: asyncio.Future | None = None
        self.handshake_complete = False
        self.response_started = False
        self.close_sent = False
        self.disconnected = False
        self.failed = False  # the peer broke the protocol: what it sends now is dropped
        self.read_paused = False
        self.close_timer: asyncio.TimerHandle | None = None
        self.keepalive_bucket: set | None = None
        self.pending_ping_payload: bytes | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.connections.add(self)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_keepalive()
        self.connections.discard(self)
        # The app learns the code of a close frame when it is read; here the peer is gone.
        self._deliver({"type": "websocket.disconnect", "code": 1006})
        self.handshake_complete = True
        self.disconnected = True
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None

    def eof_received(self) -> None:
        pass

    def pause_writing(self) -> None:
        if self.write_paused is None or self.write_paused.done():
            self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.scope is None:
            self._handshake(data)
            return
        if self.failed:
            return
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        try:
            self._frames(data)
        except _ProtocolError as exc:
            self._fail(exc.code, exc.reason)

    def shutdown(self) -> None:
        """The server is stopping: close with 1012 (service restart). First, once per
        server, the app's `server_stopping` hook (a callable in the lifespan state), if it
        has one: the app learns it before its sockets' disconnects arrive, not after."""
        hook = self.app_state.pop("server_stopping", None)
        if hook is not None:
            hook()
        self.stop_keepalive()
        if self.close_sent or self.transport.is_closing():
            self.transport.close()
            return
        if self.handshake_complete:
            self.close_sent = True
            self._deliver({"type": "websocket.disconnect", "code": 1012})
            self.transport.write(_close_frame(1012))
        else:
            self._respond(500, b"Internal Server Error")
        self.transport.close()

    # ------------------------------------------------------------------ the handshake

    def _handshake(self, data: bytes) -> None:
        # The request, whole: from `HttpProtocol` as the client wrote it (`_upgrade` checked
        # its shape), or from uvicorn's HTTP protocols written out again after parsing it.
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        method, _, target = lines[0].partition(b" ")
        target = target.rpartition(b" ")[0]
        headers = []
        key = version = None
        host = False
        upgrade = b""
        subprotocols: list[str] = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            headers.append((name, value))
            if name == b"sec-websocket-key":
                key = value
            elif name == b"sec-websocket-version":
                version = value
            elif name == b"connection":
                upgrade += b"," + value.lower()
            elif name == b"host":
                host = True
            elif name == b"sec-websocket-protocol":
                subprotocols += [p.strip() for p in value.decode("latin-1").split(",") if p.strip()]
        raw_path, _, query = target.partition(b"?")
        root_path = self.config.root_path
        self.scope = {
            "type": "websocket",
            "asgi": {"version": self.config.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if is_ssl(self.transport) else "ws",
            "server": _address(self.transport.get_extra_info("sockname")),
            "client": _address(self.transport.get_extra_info("peername")),
            "root_path": root_path,
            "path": root_path + unquote(raw_path.decode("ascii", "replace")),
            "raw_path": root_path.encode("ascii") + raw_path,
            "query_string": query,
            "headers": headers,
            "subprotocols": subprotocols,
            "state": self.app_state.copy(),
            "extensions": {"websocket.http.response": {}},
        }
        if version != b"13":
            self._respond(426, b"Unsupported WebSocket version", [_VERSION])
            self.transport.close()
            return
        tokens = [token.strip() for token in upgrade.split(b",")]
        # RFC 6455 4.2.1: an HTTP/1.1 GET with Host, Connection: Upgrade, and a key that is
        # base64 of 16 bytes; anything else is a 400 (4.2.2).
        if (
            method != b"GET"
            or not lines[0].endswith(b" HTTP/1.1")
            or not host
            or not _valid_key(key)
            or b"upgrade" not in tokens
        ):
            self._respond(400, b"Bad WebSocket upgrade request")
            self.transport.close()
            return
        self.key = key
        if rest:  # pragma: no cover (uvicorn hands over the request alone)
            self.loop.call_soon(self.data_received, rest)
        self.inbox.append({"type": "websocket.connect"})
        task = self.loop.create_task(self._run())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _respond(self, status: int, body: bytes, headers=(), more: bool = False) -> None:
        """An HTTP answer instead of the upgrade (a denial); `more`: a body follows."""
        self.handshake_complete = True
        self._log(logging.INFO, status)
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Denied"))]
        for name, value in [*self.default_headers, *headers]:
            lines += [name, b": ", value, b"\r\n"]
        if not more:
            lines.append(_PLAIN % len(body))
        lines += [b"connection: close\r\n\r\n", body]
        self.transport.write(b"".join(lines))

    # ------------------------------------------------------------------ frames in

    def _frames(self, data: bytes) -> None:
        end = len(data)
        at = 0
        limit = self.config.ws_max_size
        while end - at >= 2:
            b0 = data[at]
            b1 = data[at + 1]
            size = b1 & 0x7F
            head = 6
            if size == 126:
                if end - at < 8:
                    break
                size = int.from_bytes(data[at + 2 : at + 4], "big")
                head = 8
            elif size == 127:
                if end - at < 14:
                    break
                size = int.from_bytes(data[at + 2 : at + 10], "big")
                head = 14
                if size >> 63:  # RFC 6455 5.2: the most significant bit MUST be 0
                    raise _ProtocolError(1002, "64-bit length with the top bit set")
            opcode = b0 & 0x0F
            if b0 & 0x70:
                raise _ProtocolError(1002, "reserved bits set")
            if not b1 & 0x80:
                raise _ProtocolError(1002, "client frames must be masked")
            if opcode >= 0x8:
                if size > 125 or not b0 & 0x80:
                    raise _ProtocolError(1002, "bad control frame")
            elif size > limit or (self.fragments and self.fragments[4] + size > limit):
                raise _ProtocolError(1009, f"message over {limit} bytes")
            if end - at < head + size:
                break
            payload = data[at + head : at + head + size]
            if size:
                payload = _apply_mask(payload, data[at + head - 4 : at + head])
            at += head + size
            self._frame(b0 & 0x80, opcode, payload)
            if self.transport.is_closing():
                return
        if at < end:
            self.buffer = data[at:]

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == 0x8:
            return self._on_close(payload)
        if opcode == 0x9:
            # Not after our close, nor while the peer leaves our writes unread: a peer that
            # pings without reading its pongs must not grow this process's buffers.
            paused = self.write_paused is not None and not self.write_paused.done()
            if not self.close_sent and not paused:
                self.transport.write(_frame(0xA, payload))
            return
        if opcode == 0xA:
            if self.pending_ping_payload is not None and payload == self.pending_ping_payload:
                self.pending_ping_payload = None
            return
        text = None
        if opcode == 0x0:
            fragments = self.fragments
            if fragments is None:
                raise _ProtocolError(1002, "continuation without a message")
            # The pieces join as they come (memory: the bytes, whatever their number), and
            # their number is bounded too: empty pieces would otherwise never end a message.
            fragments[2] += 1
            fragments[4] += len(payload)
            if fragments[2] > _MAX_PIECES:
                raise _ProtocolError(1009, f"message in over {_MAX_PIECES} pieces")
            if fragments[3] is None:
                fragments[1] += payload
            else:
                # Text is checked piece by piece (RFC 6455 8.1: fail as soon as it is known
                # not to be UTF-8); a character split across two pieces waits in the decoder.
                try:
                    fragments[1].append(fragments[3].decode(payload, bool(fin)))
                except UnicodeDecodeError:
                    raise _ProtocolError(1007, "text frame that is not UTF-8") from None
            if not fin:
                return
            opcode = fragments[0]
            self.fragments = None
            if opcode == 0x1:
                text = "".join(fragments[1])
            else:
                payload = bytes(fragments[1])
        elif opcode in (0x1, 0x2):
            if self.fragments is not None:
                raise _ProtocolError(1002, "a new message inside a fragmented one")
            if not fin:
                # Only a fragmented message gets a decoder, and only while it lasts: a whole
                # text frame is decoded once, below.
                if opcode == 0x1:
                    decoder = _utf8_decoder()
                    try:
                        data = [decoder.decode(payload)]
                    except UnicodeDecodeError:
                        raise _ProtocolError(1007, "text frame that is not UTF-8") from None
                    self.fragments = [opcode, data, 1, decoder, len(payload)]
                else:
                    self.fragments = [opcode, bytearray(payload), 1, None, len(payload)]
                return
        else:
            raise _ProtocolError(1002, f"unknown opcode {opcode}")
        if self.close_sent:
            return  # closing: what arrives now is dropped, as after a close frame
        if text is not None:
            message = {"type": "websocket.receive", "text": text}
        elif opcode == 0x1:
            try:
                message = {"type": "websocket.receive", "text": payload.decode()}
            except UnicodeDecodeError:
                raise _ProtocolError(1007, "text frame that is not UTF-8") from None
        else:
            message = {"type": "websocket.receive", "bytes": payload}
        self._deliver(message)
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _on_close(self, payload: bytes) -> None:
        if self.close_sent:  # the answer to ours: the closing handshake is complete
            self.transport.close()
            return
        code, reason = 1005, ""
        if len(payload) == 1:
            raise _ProtocolError(1002, "close frame with a 1-byte payload")
        if payload:
            code = int.from_bytes(payload[:2], "big")
            if code not in _CLOSE_OK and not 3000 <= code <= 4999:
                raise _ProtocolError(1002, f"invalid close code {code}")
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError:
                raise _ProtocolError(1007, "close reason that is not UTF-8") from None
        self.close_sent = True
        self.transport.write(_frame(0x8, payload[:2]))
        self._deliver({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.close()

    def _fail(self, code: int, reason: str, wait: bool = True) -> None:
        """Close with `code`: the close frame, then our end of the stream. Closing the socket
        at once, with the peer's frames still unread in it, would make the kernel answer
        with a reset that can discard the close frame before the peer reads it; so what the
        peer still sends is dropped, and the socket closes when the peer closes its end (an
        RFC 6455 client does on the close frame), or FAIL_LINGER seconds on. Without
        `wait` (a peer that stopped answering), it closes at once."""
        self.failed = True
        self.buffer = b""
        if not self.close_sent:
            self.close_sent = True
            self.transport.write(_close_frame(code, reason))
            self._deliver({"type": "websocket.disconnect", "code": code, "reason": reason})
        if not wait:
            self.transport.close()
            return
        if self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        if self.close_timer is None:
            self.close_timer = self.loop.call_later(FAIL_LINGER, self.transport.close)

    def _deliver(self, message: dict) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            self.waiter = None
            waiter.set_result(message)
        else:
            self.inbox.append(message)

    # ------------------------------------------------------------------ ASGI

    async def _run(self) -> None:
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            log.exception("Exception in ASGI application")
            if not self.handshake_complete:
                self._respond(500, b"Internal Server Error")
        else:
            if not self.handshake_complete:
                log.error("ASGI callable returned without completing the handshake")
                self._respond(500, b"Internal Server Error")
            elif result is not None:
                log.error("ASGI callable returned %r, not None", result)
        if self.close_timer is None:
            self.transport.close()

    async def receive(self) -> dict:
        if self.inbox:
            message = self.inbox.popleft()
        else:
            self.waiter = self.loop.create_future()
            message = await self.waiter
        if self.read_paused and not self.inbox and not self.disconnected:
            self.read_paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message: dict) -> None:
        if self.write_paused is not None and not self.write_paused.done():
            await self.write_paused
        kind = message["type"]
        if self.disconnected or self.transport.is_closing():
            if kind == "websocket.accept":
                return  # too late: the peer went, or the server stopped it (as uvicorn)
            if self.disconnected or self.close_sent:
                raise ClientDisconnected()
        if not self.handshake_complete:
            if kind == "websocket.accept":
                self._accept(message)
            elif kind == "websocket.close":
                self._deliver({"type": "websocket.disconnect", "code": 1006})
                self.close_sent = True
                self._respond(403, b"")
                self.transport.close()
            elif kind == "websocket.http.response.start":
                if not 100 <= message["status"] < 600:
                    raise RuntimeError(f"Invalid HTTP status code {message['status']!r}")
                self.response_started = True
                self._respond(message["status"], b"", list(message.get("headers", [])), True)
            else:
                raise RuntimeError(f"Expected ASGI message 'websocket.accept', but got {kind!r}")
        elif self.response_started:
            if kind != "websocket.http.response.body":
                raise RuntimeError(f"Expected 'websocket.http.response.body', but got {kind!r}")
            self.transport.write(message.get("body", b""))
            if not message.get("more_body", False):
                self._deliver({"type": "websocket.disconnect", "code": 1006})
                self.close_sent = True
                self.transport.close()
        elif not self.close_sent:
            if kind == "websocket.send":
                data = message.get("bytes")
                if data is None:
                    frame = _frame(0x1, message["text"].encode())
                else:
                    frame = _frame(0x2, data)
                if not self.transport.is_closing():
                    self.transport.write(frame)
            elif kind == "websocket.close":
                self.close_sent = True
                code = message.get("code", 1000)
                reason = message.get("reason") or ""
                self._deliver({"type": "websocket.disconnect", "code": code, "reason": reason})
                if not self.transport.is_closing():
                    self.transport.write(_close_frame(code, reason))
                    if self.read_paused:
                        self.read_paused = False
                        self.transport.resume_reading()
                    self.close_timer = self.loop.call_later(10.0, self.transport.close)
            else:
                raise RuntimeError(f"Expected 'websocket.send' or 'websocket.close', got {kind!r}")
        else:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} after sending 'websocket.close'")

    def write_text(self, frame: bytes) -> bool:
        """Write `frame` (UTF-8) as a text frame now, if nothing stands in the way: the
        socket accepted and not closing, its transport under the high-water mark. False
        otherwise, and the caller sends it through ASGI `send`, which waits its turn. What
        the gateway pushes to a socket goes this way: no task, no await, no str round trip."""
        if self.close_sent or self.disconnected or not self.handshake_complete:
            return False
        if self.response_started or self.transport.is_closing():
            return False
        if self.write_paused is not None and not self.write_paused.done():
            return False
        self.transport.write(_frame(0x1, frame))
        return True

    def _accept(self, message: dict) -> None:
        if self.transport.is_closing():
            return
        accept = base64.b64encode(hashlib.sha1(self.key + _GUID).digest())
        self.key = b""
        self.handshake_complete = True
        lines = [
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: ",
            accept,
            b"\r\n",
        ]
        subprotocol = message.get("subprotocol")
        if subprotocol:
            lines += [b"sec-websocket-protocol: ", subprotocol.encode(), b"\r\n"]
        for name, value in [*self.default_headers, *message.get("headers", [])]:
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        self.transport.write(b"".join(lines))
        self.start_keepalive()
        self._log(logging.DEBUG, "[accepted]")

    def _log(self, level: int, outcome) -> None:
        """uvicorn's line for a handshake: a denial at INFO, an accept at DEBUG only (at
        thousands of connects a second, a line each is a cost; `gesture_ws_connections`
        counts them). The query string carries the token: `logs.Redact` masks it."""
        if log.isEnabledFor(level):
            scope = self.scope or {}
            client = scope.get("client")
            target = scope.get("path", "")
            if scope.get("query_string"):
                target += "?" + scope["query_string"].decode("latin-1")
            peer = f"{client[0]}:{client[1]}" if client else "-"
            log.log(level, '%s - "WebSocket %s" %s', peer, target, outcome)

    # ------------------------------------------------------------------ keepalive (the wheel)

    start_keepalive = _WheelKeepalive.start_keepalive
    stop_keepalive = _WheelKeepalive.stop_keepalive

    def ping(self, payload: bytes, frame: bytes) -> bool:
        if self.close_sent or self.transport.is_closing():
            return False
        self.pending_ping_payload = payload
        self.transport.write(frame)
        return True

    def keepalive_timeout(self) -> None:
        self.pending_ping_payload = None
        if self.close_sent or self.transport.is_closing():
            return
        self._fail(1011, "keepalive ping timeout", wait=False)  # a silent peer: gone


def direct_writer(receive) -> "Callable[[bytes], bool] | None":
    """The `write_text` of the WSProtocol whose ASGI `receive` this is; None under any other
    server (the caller then writes through ASGI `send` alone)."""
    protocol = getattr(receive, "__self__", None)
    return protocol.write_text if isinstance(protocol, WSProtocol) else None


# ---------------------------------------------------------------------------- the HTTP front

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpProtocol
except ImportError:  # pragma: no cover (httptools is part of uvicorn[standard])
    from uvicorn.protocols.http.h11_impl import H11Protocol as _HttpProtocol


class HeadWithBody:
    """The transport as one response sees it: the first write (the response's head) is held
    and goes out with the next (its body) in one system call, not two. uvicorn writes the
    two apart, and on a kept-alive connection answering small JSON bodies the second write
    was a tenth of the process's samples (`docs/performance.md`).

    Promises: bytes go out in the order written; a head whose body does not come in the
    same turn of the event loop (a streamed response) goes out at the end of that turn;
    `close` sends what is held first; anything else is the transport's own.
    """

    __slots__ = ("_flush", "_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None  # None until the first write; b"" once it has gone
        self._flush: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = data
            self._flush = asyncio.get_running_loop().call_soon(self._send_held)
        elif held:
            self._held = b""
            self._flush.cancel()
            self._transport.write(held + data)
        else:
            self._transport.write(data)

    def _send_held(self) -> None:
        held, self._held = self._held, b""
        if self._flush is not None:
            self._flush.cancel()
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._send_held()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class _UvicornHttp(_HttpProtocol):
    """uvicorn's HTTP protocol, but an upgrade it parsed from an HTTP/1.0 request is a 400
    (RFC 6455 4.2.1): uvicorn writes every request out again as HTTP/1.1 for `--ws`, which
    could then not tell; and each response goes out in one write (`HeadWithBody`)."""

    def handle_websocket_upgrade(self, *args) -> None:
        if self.scope.get("http_version") != "1.1":
            self.send_400_response("A WebSocket upgrade needs HTTP/1.1")
            return
        super().handle_websocket_upgrade(*args)

    if hasattr(_HttpProtocol, "on_headers_complete"):  # httptools' protocol, not h11's

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = self.cycle
            # A new request's cycle (not an upgrade's, which makes none) writes to the
            # transport itself until given its own view of it.
            if cycle is not None and cycle.transport is self.transport:
                cycle.transport = HeadWithBody(self.transport)


class HttpProtocol(asyncio.Protocol):
    """uvicorn's `--http`: what a connection is before its first request says what it is.

    A connection whose first bytes are a whole `GET ... HTTP/1.1` request asking to upgrade
    to a WebSocket goes straight to `--ws` (the project's `WSProtocol`, which reads the
    request itself); any other goes to uvicorn's httptools protocol, with the bytes read so
    far, and is served exactly as uvicorn serves it. A connect then skips an HTTP parser
    object, its callbacks for every header, a scope and the request written out again, which
    was a seventh of a connect's CPU. The WebSocket handshake's own checks (version, key,
    `Connection: Upgrade`) are `WSProtocol`'s; with `--limit-concurrency` set every
    connection takes uvicorn's path, which enforces it.
    """

    __slots__ = ("app_state", "config", "connections", "loop", "server_state", "transport")

    def __init__(self, config: Config, server_state, app_state: dict, _loop=None) -> None:
        if not config.loaded:
            config.load()  # pragma: no cover
        self.config = config
        self.server_state = server_state
        self.connections = server_state.connections
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.connections.add(self)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)

    def eof_received(self) -> None:
        pass

    def shutdown(self) -> None:
        self.transport.close()  # nothing was asked yet

    def data_received(self, data: bytes) -> None:
        self.connections.discard(self)
        ws_class = self.config.ws_protocol_class
        if ws_class is not None and self.config.limit_concurrency is None and _upgrade(data):
            protocol = ws_class(
                config=self.config, server_state=self.server_state, app_state=self.app_state
            )
            self.server_state.total_requests += 1
        else:
            protocol = _UvicornHttp(
                config=self.config,
                server_state=self.server_state,
                app_state=self.app_state,
                _loop=self.loop,
            )
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(data)


def _upgrade(data: bytes) -> bool:
    """Whether `data` is one whole HTTP/1.1 GET asking to upgrade to a WebSocket (and
    nothing after it: a client speaks next only once it has the 101)."""
    if not data.startswith(b"GET ") or not data.endswith(b"\r\n\r\n"):
        return False
    lines = data[:-4].split(b"\r\n")
    if not lines[0].endswith(b" HTTP/1.1") or lines[0].count(b" ") != 2:
        return False
    websocket = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b"\x00" in line:
            return False
        if name.lower() == b"upgrade" and value.strip().lower() == b"websocket":
            websocket = True
    return websocket
