"""A lean HTTP/1.1 client for the load generators (`bench/gen.py`, mode `http`).

Why not aiohttp's client, which the generators used before: it cost about 100 µs of CPU a
request on the AMD EPYC, nearly as much as the service spent answering it (about 130), on
the same two cores, so the write step measured the generator as much as the service. This
client is one `asyncio.Protocol` per keep-alive connection: the request written as one
buffer, the response parsed by httptools (the C parser that uvicorn uses on the other
side), no task or stream per request.

What it promises:

* One request at a time on a connection; a connection whose answer is complete and that
  the server keeps alive goes back to its port's idle list and is used again.
* `post` answers the status code, or 0 when no complete answer came: refused, reset,
  closed early, an answer httptools cannot parse, or none within `timeout` seconds (the
  connection is then aborted). A connection that failed is never used again.
* The body of an answer is read to its end and dropped.
"""

import asyncio
import time

import httptools


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.started = 0.0  # when the request in flight was written; 0 when idle
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[int] | None = None
        self._done = False
        self._status = 0
        self._keep_alive = False
        self.broken = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail()
            return
        if self._done:
            self._done = False
            waiter, self._waiter = self._waiter, None
            self.started = 0.0
            if not self._keep_alive:
                self.broken = True
                self.transport.close()
            if waiter is not None and not waiter.done():
                waiter.set_result(self._status)

    def on_message_complete(self) -> None:
        # Read here: once the parser returns it is reset for the next message. The waiter
        # is answered from data_received, after the parser has returned.
        self._status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()
        self._done = True

    def connection_lost(self, exc) -> None:
        self._fail(abort=False)

    def _fail(self, abort: bool = True) -> None:
        self.broken = True
        self.started = 0.0
        if abort and self.transport is not None:
            self.transport.abort()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(0)

    def send(self, raw: bytes) -> "asyncio.Future[int]":
        self._waiter = asyncio.get_running_loop().create_future()
        self.started = time.monotonic()
        self.transport.write(raw)
        return self._waiter

    def expire(self, before: float) -> None:
        if self.started and self.started < before:
            self._fail()


class HttpClient:
    """Keep-alive connections to 127.0.0.1, by port. `close()` when done."""

    def __init__(self, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self._host = host
        self._timeout = timeout
        self._idle: dict[int, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._sweeper: asyncio.Task | None = None

    async def post(self, port: int, path: str, headers: bytes, body: bytes) -> int:
        """POST `body` with `headers` (whole `Name: value\\r\\n` lines, Content-Length and
        Host added here); the status code, 0 for no complete answer."""
        raw = b"POST %s HTTP/1.1\r\nHost: %s:%d\r\n%sContent-Length: %d\r\n\r\n%s" % (
            path.encode(),
            self._host.encode(),
            port,
            headers,
            len(body),
            body,
        )
        idle = self._idle.get(port)
        conn = idle.pop() if idle else None
        while conn is not None and conn.broken:  # closed by the server while idle
            self._all.discard(conn)
            conn = idle.pop() if idle else None
        if conn is None:
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
            try:
                _, conn = await asyncio.get_running_loop().create_connection(
                    _Connection, self._host, port
                )
            except OSError:
                return 0
            self._all.add(conn)
        status = await conn.send(raw)
        if conn.broken:
            self._all.discard(conn)
        else:
            self._idle.setdefault(port, []).append(conn)
        return status

    def idle(self, port: int) -> int:
        """Connections to `port` open and waiting for a request."""
        return sum(not conn.broken for conn in self._idle.get(port, ()))

    async def _sweep(self) -> None:
        """Abort every connection whose answer is overdue, once a second: one timer for
        all of them rather than one a request."""
        while True:
            await asyncio.sleep(1.0)
            before = time.monotonic() - self._timeout
            for conn in list(self._all):
                conn.expire(before)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in self._all:
            if conn.transport is not None:
                conn.transport.close()
        self._all.clear()
        self._idle.clear()
