"""The WebSocket server protocol the project runs (service.wsserver.WSProtocol), on a real
uvicorn server, spoken to byte by byte: what RFC 6455 asks of a server, and the ASGI
messages an app sees. The app here is a small echo app; the service's own behaviour over
this protocol is what tests/test_gateway.py checks."""

import asyncio
import base64
import hashlib
import os
import struct

import pytest
import uvicorn

from service.wsserver import HeadWithBody, HttpProtocol, WSProtocol, WsprotoProtocol

from .conftest import InProcess

pytestmark = pytest.mark.anyio

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Echo:
    """Accepts /echo (echoing every message), denies /deny before accepting, and closes
    /bye with 4001 after its first message. Records each socket's disconnect message."""

    def __init__(self) -> None:
        self.disconnects: asyncio.Queue[dict] = asyncio.Queue()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] == "http":
            body = f"plain {scope['method']} {scope['path']}".encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        assert (await receive())["type"] == "websocket.connect"
        if scope["path"] == "/deny":
            await send({"type": "websocket.close"})
            return
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await self.disconnects.put(message)
                return
            if scope["path"] == "/bye":
                await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
                continue
            reply = {k: message[k] for k in ("text", "bytes") if message.get(k) is not None}
            await send({"type": "websocket.send", **reply})


class EchoServer(InProcess):
    """A uvicorn server running `Echo` over WSProtocol, on the test's loop."""

    def __init__(self) -> None:
        self.app = Echo()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=0,
            http=HttpProtocol,
            ws=WSProtocol,
            ws_max_size=1024,
            ws_per_message_deflate=False,
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.task = None
        self.port = 0


@pytest.fixture
async def server():
    s = EchoServer()
    await s.start()
    yield s.app, s.port
    await Raw.close_all()
    await s.stop()


class Raw:
    """A client that writes frames by hand, bad ones included. Every one opened is closed
    by `close_all` (the fixtures call it)."""

    opened: list["Raw"] = []

    def __init__(self, reader, writer, head: bytes) -> None:
        self.reader, self.writer, self.head = reader, writer, head

    @classmethod
    async def open(
        cls, port: int, path: str = "/echo", extra: str = "", version: str = "13", split=False
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: {version}\r\n"
            f"{extra}\r\n".encode()
        )
        if split:  # in two writes, the second only once the server has read the first
            writer.write(request[:20])
            await writer.drain()
            await asyncio.sleep(0.05)
            request = request[20:]
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        raw = cls(reader, writer, head)
        cls.opened.append(raw)
        if head.startswith(b"HTTP/1.1 101"):
            fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if line)
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            assert {k.lower(): v for k, v in fields.items()}[b"sec-websocket-accept"] == accept
        return raw

    def frame(self, opcode: int, payload: bytes, fin=True, masked=True, rsv=0) -> None:
        b0 = (0x80 if fin else 0) | rsv | opcode
        n = len(payload)
        mask_bit = 0x80 if masked else 0
        if n < 126:
            head = bytes((b0, mask_bit | n))
        else:
            head = struct.pack("!BBH", b0, mask_bit | 126, n)
        if masked:
            mask = os.urandom(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            head += mask
        self.writer.write(head + payload)

    @classmethod
    async def close_all(cls) -> None:
        for raw in cls.opened:
            raw.writer.close()
            try:
                await raw.writer.wait_closed()
            except OSError:
                pass
        cls.opened.clear()

    async def read(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload)."""
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), 5)
        assert not b1 & 0x80, "server frames are never masked"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        return b0 & 0x0F, await self.reader.readexactly(n)

    async def close_code(self) -> int:
        """Read up to the server's close frame; its code."""
        while True:
            opcode, payload = await self.read()
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0]


async def test_the_handshake_answers_101_with_the_accept_key_and_no_extension(server):
    _, port = server
    raw = await Raw.open(port, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n")
    assert raw.head.startswith(b"HTTP/1.1 101")
    assert b"sec-websocket-extensions" not in raw.head.lower()


async def test_with_deflate_turned_on_the_socket_is_served_with_permessage_deflate():
    config = uvicorn.Config(Echo(), ws_per_message_deflate=True)
    config.load()

    class State:
        connections: set = set()
        tasks: set = set()
        default_headers: list = []

    assert isinstance(WSProtocol(config=config, server_state=State, app_state={}), WsprotoProtocol)


async def test_text_and_binary_are_echoed_and_fragments_arrive_as_one_message(server):
    _, port = server
    raw = await Raw.open(port)
    raw.frame(0x1, "héllo".encode())
    assert await raw.read() == (0x1, "héllo".encode())
    raw.frame(0x2, b"\x00\x01")
    assert await raw.read() == (0x2, b"\x00\x01")
    raw.frame(0x1, b"one ", fin=False)
    raw.frame(0x9, b"between")  # a control frame may come between fragments
    raw.frame(0x0, b"two ", fin=False)
    raw.frame(0x0, b"three")
    assert await raw.read() == (0xA, b"between")
    assert await raw.read() == (0x1, b"one two three")
    big = b"x" * 300  # a 16-bit length
    raw.frame(0x2, big)
    assert await raw.read() == (0x2, big)


async def test_a_close_is_answered_with_the_same_code_and_the_app_sees_it(server):
    app, port = server
    raw = await Raw.open(port)
    raw.frame(0x8, struct.pack("!H", 1000) + b"done")
    assert await raw.close_code() == 1000
    message = await asyncio.wait_for(app.disconnects.get(), 5)
    assert (message["code"], message["reason"]) == (1000, "done")
    assert await raw.reader.read() == b""  # and the server closes the TCP connection


@pytest.mark.parametrize(
    "bad, code",
    [
        ({"opcode": 0x1, "payload": b"hi", "masked": False}, 1002),
        ({"opcode": 0x1, "payload": b"hi", "rsv": 0x40}, 1002),
        ({"opcode": 0x3, "payload": b""}, 1002),
        ({"opcode": 0x0, "payload": b"orphan"}, 1002),
        ({"opcode": 0x9, "payload": b"p", "fin": False}, 1002),
        ({"opcode": 0x8, "payload": struct.pack("!H", 1005)}, 1002),
        ({"opcode": 0x1, "payload": b"\xff\xfe"}, 1007),
        ({"opcode": 0x1, "payload": b"x" * 1025}, 1009),
    ],
    ids=[
        "unmasked",
        "reserved-bit",
        "unknown-opcode",
        "orphan-continuation",
        "fragmented-ping",
        "invalid-close-code",
        "text-not-utf8",
        "over-max-size",
    ],
)
async def test_a_frame_that_breaks_the_protocol_is_closed_with_its_code(server, bad, code):
    app, port = server
    raw = await Raw.open(port)
    raw.frame(**bad)
    assert await raw.close_code() == code
    assert (await asyncio.wait_for(app.disconnects.get(), 5))["code"] == code


async def test_a_message_over_the_limit_in_fragments_is_closed_with_1009(server):
    _, port = server
    raw = await Raw.open(port)
    raw.frame(0x1, b"x" * 600, fin=False)
    raw.frame(0x0, b"x" * 600)
    assert await raw.close_code() == 1009


async def test_a_message_in_endless_empty_pieces_is_closed_with_1009(server):
    _, port = server
    raw = await Raw.open(port)
    raw.frame(0x1, b"x", fin=False)
    for _ in range(1100):  # over the 1,024 pieces a message may come in; no byte added
        raw.frame(0x0, b"", fin=False)
    assert await raw.close_code() == 1009


async def test_a_peer_that_breaks_the_protocol_and_goes_on_sending_still_reads_the_close(
    server,
):
    # The frames after the offending one are still arriving, unread, when the server gives
    # up: its close frame must reach the peer all the same, not be lost to a reset.
    _, port = server
    raw = await Raw.open(port)
    raw.frame(0x1, b"x" * 2000)  # over the 1,024-byte limit
    for _ in range(200):
        raw.frame(0x1, b"y" * 1000)
    assert await raw.close_code() == 1009
    assert await raw.reader.read() == b""  # then the server's end of the stream


async def test_the_app_closing_sends_its_code_and_reason(server):
    _, port = server
    raw = await Raw.open(port, "/bye")
    raw.frame(0x1, b"hello")
    opcode, payload = await raw.read()
    assert opcode == 0x8
    assert struct.unpack("!H", payload[:2])[0] == 4001 and payload[2:] == b"bye"


async def test_a_denial_before_accept_is_an_http_403(server):
    _, port = server
    raw = await Raw.open(port, "/deny")
    assert raw.head.startswith(b"HTTP/1.1 403")


async def test_an_unsupported_version_is_answered_426(server):
    _, port = server
    raw = await Raw.open(port, version="8")
    assert raw.head.startswith(b"HTTP/1.1 426")
    assert b"sec-websocket-version: 13" in raw.head.lower()


async def test_stopping_the_server_closes_sockets_with_1012():
    s = EchoServer()
    await s.start()
    raw = await Raw.open(s.port)
    s.server.should_exit = True
    assert await raw.close_code() == 1012
    assert (await asyncio.wait_for(s.app.disconnects.get(), 5))["code"] == 1012
    await Raw.close_all()
    await s.stop()


async def test_an_upgrade_that_arrives_in_pieces_still_opens_a_socket(server):
    _, port = server
    raw = await Raw.open(port, split=True)
    assert raw.head.startswith(b"HTTP/1.1 101")
    raw.frame(0x1, b"whole")
    assert await raw.read() == (0x1, b"whole")


async def test_plain_http_and_a_malformed_upgrade_are_served_as_uvicorn_serves_them(server):
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"plain GET /page" in await asyncio.wait_for(reader.read(100), 5)
    writer.close()
    raw = await Raw.open(port, extra="this line has no colon\r\n")
    assert raw.head.startswith(b"HTTP/1.1 400")


class Recorded:
    """A transport that records what is written and when it is closed."""

    def __init__(self) -> None:
        self.log: list = []

    def write(self, data: bytes) -> None:
        self.log.append(data)

    def close(self) -> None:
        self.log.append("close")

    def is_closing(self) -> bool:
        return "close" in self.log

    def get_extra_info(self, name: str):
        return ("127.0.0.1", 1) if name == "peername" else None


async def turn_of_the_loop() -> None:
    """Until every callback scheduled so far has run (the loop runs them in order)."""
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)
    await done


async def test_a_response_head_goes_out_with_its_body_in_one_write():
    transport = Recorded()
    view = HeadWithBody(transport)
    view.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    view.write(b"{}")
    assert transport.log == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    await turn_of_the_loop()  # nothing held is sent again
    view.write(b"more")
    assert transport.log[1:] == [b"more"]
    assert view.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the transport's


async def test_a_head_whose_body_comes_later_goes_out_at_the_end_of_the_turn():
    transport = Recorded()
    view = HeadWithBody(transport)
    view.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert transport.log == []
    await turn_of_the_loop()
    view.write(b"5\r\nfirst\r\n")
    assert transport.log == [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        b"5\r\nfirst\r\n",
    ]


async def test_a_close_sends_the_held_head_first():
    transport = Recorded()
    view = HeadWithBody(transport)
    view.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    view.close()
    await turn_of_the_loop()
    assert transport.log == [b"HTTP/1.1 204 No Content\r\n\r\n", "close"]


async def test_kept_alive_requests_are_each_answered_whole(server):
    """Through uvicorn: answers in one write each, in order, on one connection."""
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for page in ("/one", "/two", "/three"):
        writer.write(f"GET {page} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding: chunked" in head  # the app gives no length
        body = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 5)
        expected = f"plain GET {page}".encode()
        assert body == b"%x\r\n%s\r\n0\r\n\r\n" % (len(expected), expected)
    writer.close()
