"""A lean RFC 6455 WebSocket client for the load generators (`bench/gen.py`, mode `ws`).

Why not the `websockets` library's asyncio client: it costs about 2.3 ms of CPU per connect
and a task, a queue and several futures per socket, so a generator holding thousands of
sockets spent more of the shared 2 cores than the service it measured. This client is one
`asyncio.Protocol` per socket: the handshake written by hand, frames parsed by hand, every
message handed to a callback as it completes, no task per socket.

What it promises (the client side of RFC 6455):

* The opening handshake: a random `Sec-WebSocket-Key`; the answer must be `101` with
  `Upgrade: websocket`, `Connection: upgrade` and the matching `Sec-WebSocket-Accept`, or
  the connect fails with `HandshakeError`.
* `compression="deflate"` offers `permessage-deflate; client_max_window_bits`, as browsers
  do. If the server accepts, messages whose first frame has RSV1 set are inflated (one
  `zlib.decompressobj(-15)` per socket, `00 00 ff ff` appended to each message; a fresh one
  per message when the server said `server_no_context_takeover`). The client's own frames
  are sent uncompressed, as the extension allows. An answer naming an extension that was
  not offered fails the handshake. `compression=None` offers nothing.
* Every frame it sends is masked with a fresh random 4-byte key.
* Pings are answered with pongs carrying the same payload (the service closes sockets that
  leave its keepalive pings unanswered).
* Text and binary messages, fragmented or not, up to `max_size` bytes (else close 1009);
  text must be UTF-8 (else close 1007); a masked server frame, a reserved bit or opcode it
  did not negotiate, or a bad continuation closes with 1002.
* The closing handshake: a server's close frame is echoed and its code recorded in
  `close_code` (1005 when it carried none); `close()` sends one and waits for the server's
  answer and end of stream. A stream that ends without a close frame records 1006.
"""

import asyncio
import base64
import hashlib
import os
import struct
import zlib
from collections.abc import Callable


def xor_mask(data: bytes, mask: bytes) -> bytes:
    """`data` XOR the 4-byte `mask` repeated: pure Python, one big-integer XOR."""
    n = len(data)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


try:
    from websockets.speedups import apply_mask  # the same in C, where websockets is built
except ImportError:
    apply_mask = xor_mask


_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TAIL = b"\x00\x00\xff\xff"
_OFFER = "permessage-deflate; client_max_window_bits"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class HandshakeError(Exception):
    """The server's answer to the opening handshake was not a valid 101."""


class ConnectionClosed(ConnectionError):
    """Sending on a socket that is closing or closed (an OSError: callers catch those)."""


def _frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


def _parse_extensions(value: str) -> dict[str, str | None]:
    """`permessage-deflate; a=1; b` -> the parameters of permessage-deflate, or raise."""
    params: dict[str, str | None] = {}
    parts = [p.strip() for p in value.split(";")]
    if parts[0].lower() != "permessage-deflate" or "," in value:
        raise HandshakeError(f"unexpected extensions {value!r}")
    for p in parts[1:]:
        if not p:
            continue
        k, _, v = p.partition("=")
        params[k.strip().lower()] = v.strip().strip('"') or None
    known = {
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    }
    if not params.keys() <= known:
        raise HandshakeError(f"unknown permessage-deflate parameters in {value!r}")
    return params


class WsConnection(asyncio.Protocol):
    """One client socket. `on_message(data)` gets each complete message: `str` for text,
    `bytes` for binary. `opened` resolves once the handshake is valid; `closed` resolves
    (never fails) once the connection is gone, with `close_code` set."""

    def __init__(
        self,
        host: str,
        port: int,
        resource: str,
        on_message: Callable[[str | bytes], None],
        compression: str | None = "deflate",
        max_size: int = 2**20,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()
        self.close_code: int | None = None
        self.deflate = False  # negotiated
        self.on_message = on_message
        self._host = f"{host}:{port}"
        self._resource = resource
        self._offer = compression == "deflate"
        if compression not in (None, "deflate"):
            raise ValueError(f"compression must be None or 'deflate', not {compression!r}")
        self._max_size = max_size
        self._key = base64.b64encode(os.urandom(16))
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._handshaking = True
        self._close_sent = False
        self._inflate = None
        self._reset_inflate = False
        self._parts: list[bytes] = []  # fragments of the message being received
        self._in_message = False  # a fragmented message has begun
        self._got_close = False
        self._msg_op = 0
        self._msg_compressed = False
        self._msg_size = 0
        self._close_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport) -> None:
        self._transport = transport
        lines = [
            f"GET {self._resource} HTTP/1.1",
            f"Host: {self._host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self._key.decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        if self._offer:
            lines.append(f"Sec-WebSocket-Extensions: {_OFFER}")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._handshaking:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > 16384:
                    self._fail_handshake(HandshakeError("answer headers over 16 KiB"))
                return
            head = bytes(self._buf[:end])
            del self._buf[: end + 4]
            try:
                self._check_answer(head)
            except HandshakeError as exc:
                self._fail_handshake(exc)
                return
            self._handshaking = False
            if not self.opened.done():
                self.opened.set_result(None)
        self._parse_frames()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self.close_code is None:
            self.close_code = 1006
        if not self.opened.done():
            self.opened.set_exception(
                HandshakeError("closed during the handshake") if exc is None else exc
            )
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    # ------------------------------------------------------------------ handshake

    def _check_answer(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[0] != "HTTP/1.1" or status[1] != "101":
            raise HandshakeError(f"answer {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if not sep:
                raise HandshakeError(f"bad header line {line!r}")
            k = k.strip().lower()
            headers[k] = f"{headers[k]}, {v.strip()}" if k in headers else v.strip()
        if headers.get("upgrade", "").lower() != "websocket":
            raise HandshakeError("no Upgrade: websocket")
        if "upgrade" not in [t.strip().lower() for t in headers.get("connection", "").split(",")]:
            raise HandshakeError("no Connection: upgrade")
        accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise HandshakeError("wrong Sec-WebSocket-Accept")
        ext = headers.get("sec-websocket-extensions")
        if ext:
            if not self._offer:
                raise HandshakeError(f"extensions {ext!r} answered to no offer")
            params = _parse_extensions(ext)
            bits = params.get("server_max_window_bits")
            if bits is not None and not (bits.isdigit() and 8 <= int(bits) <= 15):
                raise HandshakeError(f"bad server_max_window_bits in {ext!r}")
            self.deflate = True
            # A window of 15 bits inflates any smaller one as well.
            self._reset_inflate = "server_no_context_takeover" in params
        if headers.get("sec-websocket-protocol"):
            raise HandshakeError("a subprotocol answered to no offer")

    def _fail_handshake(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        self._transport.abort()

    # ------------------------------------------------------------------ frames in

    def _parse_frames(self) -> None:
        buf = self._buf
        while True:
            n = len(buf)
            if n < 2:
                return
            b0, b1 = buf[0], buf[1]
            length = b1 & 0x7F
            pos = 2
            if length == 126:
                if n < 4:
                    return
                length = (buf[2] << 8) | buf[3]
                pos = 4
            elif length == 127:
                if n < 10:
                    return
                length = int.from_bytes(buf[2:10], "big")
                pos = 10
            if b1 & 0x80:
                return self._protocol_error(1002)  # servers must not mask
            if length > self._max_size:
                return self._protocol_error(1009)
            if n < pos + length:
                return
            payload = bytes(buf[pos : pos + length])
            del buf[: pos + length]
            if not self._frame_received(b0, payload) or self._got_close:
                return  # failed, or nothing may follow a close frame

    def _frame_received(self, b0: int, payload: bytes) -> bool:
        """Handle one frame; False when the connection is being failed."""
        fin = b0 & 0x80
        rsv1 = b0 & 0x40
        opcode = b0 & 0x0F
        if b0 & 0x30 or (rsv1 and (not self.deflate or opcode not in (OP_TEXT, OP_BINARY))):
            return self._protocol_error(1002)
        if opcode >= 0x8:  # control frames: final, at most 125 bytes, never compressed
            if not fin or len(payload) > 125:
                return self._protocol_error(1002)
            if opcode == OP_PING:
                if not self._close_sent:
                    self._transport.write(_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self._close_received(payload)
            elif opcode != OP_PONG:
                return self._protocol_error(1002)
            return True
        if opcode == OP_CONT:
            if not self._in_message:
                return self._protocol_error(1002)
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._in_message:
                return self._protocol_error(1002)
            self._msg_op = opcode
            self._msg_compressed = bool(rsv1)
            self._msg_size = 0
        else:
            return self._protocol_error(1002)
        self._msg_size += len(payload)
        if self._msg_size > self._max_size:
            return self._protocol_error(1009)
        if not fin:
            self._in_message = True
            self._parts.append(payload)
            return True
        self._in_message = False
        if self._parts:
            self._parts.append(payload)
            data = b"".join(self._parts)
            self._parts = []
        else:
            data = payload
        if self._msg_compressed:
            if self._inflate is None:
                self._inflate = zlib.decompressobj(-15)
            try:
                data = self._inflate.decompress(data + _TAIL, self._max_size + 1)
            except zlib.error:
                return self._protocol_error(1007)
            if len(data) > self._max_size or self._inflate.unconsumed_tail:
                return self._protocol_error(1009)
            if self._reset_inflate:
                self._inflate = None
        if self._msg_op == OP_TEXT:
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                return self._protocol_error(1007)
        self.on_message(data)
        return True

    def _close_received(self, payload: bytes) -> None:
        self._got_close = True
        if len(payload) >= 2:
            code = int.from_bytes(payload[:2], "big")
        elif not payload:
            code = 1005
        else:
            self._protocol_error(1002)
            return
        if self.close_code is None:
            self.close_code = code
        if not self._close_sent:
            self._close_sent = True
            echo = payload[:2] if code != 1005 else b""
            self._transport.write(_frame(OP_CLOSE, echo))
        # The server closes the TCP connection first (RFC 6455 7.1.1); wait a moment for it.
        self._arm_close_timer(2.0)

    def _protocol_error(self, code: int) -> bool:
        """Fail the connection: send a close frame with `code` and drop the stream."""
        if self.close_code is None:
            self.close_code = code
        if not self._close_sent and not self._transport.is_closing():
            self._close_sent = True
            self._transport.write(_frame(OP_CLOSE, code.to_bytes(2, "big")))
        self._transport.close()
        return False

    def _arm_close_timer(self, delay: float) -> None:
        if self._close_timer is None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(delay, self._transport.abort)

    # ------------------------------------------------------------------ out

    def send(self, data: str | bytes) -> None:
        """Queue one message (a text frame for `str`); raises ConnectionClosed once the
        closing handshake has begun. No back-pressure: the bench's frames are small."""
        if self._close_sent or self._transport is None or self._transport.is_closing():
            raise ConnectionClosed("connection closed")
        if isinstance(data, str):
            self._transport.write(_frame(OP_TEXT, data.encode()))
        else:
            self._transport.write(_frame(OP_BINARY, data))

    def abort(self) -> None:
        """Drop the connection without a closing handshake (recorded as 1006)."""
        if self._transport is not None:
            self._transport.abort()

    async def close(self, code: int = 1000, timeout: float = 2.0) -> int:
        """Start (or join) the closing handshake; returns `close_code` once the connection is
        gone, aborting it after `timeout` seconds."""
        if self._transport is not None and not self._close_sent:
            if not self._transport.is_closing():
                self._close_sent = True
                self._transport.write(_frame(OP_CLOSE, code.to_bytes(2, "big")))
            self._arm_close_timer(timeout)
        return await asyncio.shield(self.closed)


async def connect(
    host: str,
    port: int,
    resource: str,
    on_message: Callable[[str | bytes], None],
    compression: str | None = "deflate",
    max_size: int = 2**20,
) -> WsConnection:
    """Open a TCP connection and complete the opening handshake (the caller bounds the time
    with `asyncio.timeout`). Raises OSError or HandshakeError."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(
        lambda: WsConnection(host, port, resource, on_message, compression, max_size), host, port
    )
    try:
        await proto.opened
    except BaseException:
        transport.abort()
        raise
    return proto
