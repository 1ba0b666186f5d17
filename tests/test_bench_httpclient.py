"""The bench's lean HTTP client (`bench/httpclient.py`), against a server written here:
what the write step's generators rely on to count answers and time them."""

import asyncio
import socket

import pytest

from bench.httpclient import HttpClient

from .support_helpers import eventually

pytestmark = pytest.mark.anyio

HEADERS = b"Authorization: Bearer t0k\r\nContent-Type: application/json\r\n"


class Server:
    """Reads whole requests; answers each as `answer(n)` says, n counting from 0 over all
    connections: bytes to write (then the connection stays open), or None (it is closed)."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection, head, body)
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests.append((number, head, body))
                reply = self.answer(len(self.requests) - 1)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()


def ok(status: int = 200, body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


CHUNKED = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"


async def test_answers_come_back_in_order_on_one_kept_alive_connection() -> None:
    server = Server(lambda n: [ok(200), CHUNKED, ok(429, b"slow down")][n % 3])
    async with server as port:
        client = HttpClient()
        got = [await client.post(port, "/api/x", HEADERS, b'{"n":%d}' % i) for i in range(6)]
        await client.close()
    assert got == [200, 201, 429, 200, 201, 429]
    assert server.connections == 1
    head, body = server.requests[0][1], server.requests[0][2]
    assert head.startswith(b"POST /api/x HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % port in head
    assert b"\r\nAuthorization: Bearer t0k\r\n" in head
    assert body == b'{"n":0}'


async def test_concurrent_requests_each_get_their_own_connection() -> None:
    server = Server(lambda n: ok(210 + n))
    async with server as port:
        client = HttpClient()
        got = await asyncio.gather(*(client.post(port, "/", HEADERS, b"{}") for _ in range(5)))
        await client.close()
    assert sorted(got) == [210, 211, 212, 213, 214]
    assert server.connections == 5


async def test_a_connection_the_server_closes_is_not_used_again() -> None:
    # Answered with Connection: close; then closed without an answer; then closed while idle.
    server = Server(lambda n: [ok(200, extra=b"Connection: close\r\n"), None, ok(202)][n % 3])
    async with server as port:
        client = HttpClient()
        first = await client.post(port, "/", HEADERS, b"{}")
        dropped = await client.post(port, "/", HEADERS, b"{}")
        third = await client.post(port, "/", HEADERS, b"{}")
        for writer in server.writers:
            writer.close()  # the server's keep-alive timeout, say
        await eventually(lambda: client.idle(port) == 0)  # the client's side heard of it
        fourth = await client.post(port, "/", HEADERS, b"{}")
        await client.close()
    assert (first, dropped, third, fourth) == (200, 0, 202, 200)
    assert server.connections == 4


async def test_no_answer_in_time_is_a_zero_and_the_connection_is_dropped() -> None:
    server = Server(lambda n: b"" if n == 0 else ok(200))  # the first is never answered
    async with server as port:
        client = HttpClient(timeout=0.5)
        silent = await asyncio.wait_for(client.post(port, "/", HEADERS, b"{}"), 5)
        after = await client.post(port, "/", HEADERS, b"{}")
        await client.close()
    assert (silent, after) == (0, 200)
    assert server.connections == 2


async def test_a_refused_connection_and_a_garbled_answer_are_zeros() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # nothing listens here once closed
    client = HttpClient()
    assert await client.post(free, "/", HEADERS, b"{}") == 0
    async with Server(lambda n: b"NOT HTTP AT ALL\r\n\r\n") as port:
        assert await asyncio.wait_for(client.post(port, "/", HEADERS, b"{}"), 5) == 0
    await client.close()
