"""RFC 6455 conformance cases for a WebSocket server, on raw sockets, after Autobahn's
categories: each case names the section it holds the server to, runs against an echo
endpoint (`host`, `port`, `path`), and reports an outcome such as `close 1002`,
`http 400`, `echo` or `timeout`. `tests/test_ws_conformance.py` runs them all against the
project's protocol in CI; `python -m bench.wsconformance` runs them against ours and uvicorn's
`--ws wsproto` side by side and writes `bench/results/conformance.json`.

Where the RFC leaves the choice to the server (a non-minimal length encoding), every answer
it allows is listed in `expect`.
"""

import asyncio
import base64
import hashlib
import json
import os
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TIMEOUT = 2.0


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str = "/echo"


class Conn:
    """A client on a raw socket that writes frames by hand, bad ones included."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, target: Target) -> "Conn":
        reader, writer = await asyncio.open_connection(target.host, target.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {target.path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"no upgrade: {head[:40]!r}")
        return cls(reader, writer)

    def frame(
        self, opcode: int, payload: bytes = b"", fin=True, masked=True, rsv=0, length=None
    ) -> None:
        """One frame; `length`: force the 16- or 64-bit length form, or give a raw 64-bit
        value to announce."""
        b0 = (0x80 if fin else 0) | rsv | opcode
        n = len(payload)
        bit = 0x80 if masked else 0
        if length == 64 or (length is None and n >= 65536):
            head = struct.pack("!BBQ", b0, bit | 127, n)
        elif isinstance(length, int) and length not in (16, 64):
            head = struct.pack("!BBQ", b0, bit | 127, length)
        elif length == 16 or n >= 126:
            head = struct.pack("!BBH", b0, bit | 126, n)
        else:
            head = bytes((b0, bit | n))
        if masked:
            mask = os.urandom(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            head += mask
        self.writer.write(head + payload)

    async def read(self) -> tuple[int, bytes]:
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), TIMEOUT)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT)

    async def outcome(self, *expected: tuple[int, bytes]) -> str:
        """`echo` if the next frames are `expected` (pongs and messages in order), else
        what came instead: `close <code>`, `close none`, `eof`, `timeout`, `other`."""
        try:
            for want in expected:
                got = await self.read()
                if got != want:
                    return _close(got) if got[0] == 0x8 else "other"
            if not expected:  # nothing to echo: the server must close
                while True:
                    got = await self.read()
                    if got[0] == 0x8:
                        return _close(got)
            return "echo"
        except (asyncio.IncompleteReadError, ConnectionError):
            return "eof"
        except TimeoutError:
            return "timeout"
        finally:
            self.writer.close()


def _close(frame: tuple[int, bytes]) -> str:
    payload = frame[1]
    return f"close {struct.unpack('!H', payload[:2])[0]}" if len(payload) >= 2 else "close none"


@dataclass(frozen=True)
class Case:
    id: str
    section: str
    expect: tuple[str, ...]
    run: Callable[[Target], Awaitable[str]]

    def conforms(self, outcome: str) -> bool:
        return outcome in self.expect


CASES: list[Case] = []


def case(id: str, section: str, *expect: str):
    def register(fn):
        CASES.append(Case(id, section, expect, fn))
        return fn

    return register


def frames_case(id: str, section: str, expect: tuple[str, ...], sends, replies=()) -> None:
    """A case that opens a socket, writes `sends` (kwargs for `Conn.frame`), and reads."""

    async def run(target: Target) -> str:
        conn = await Conn.open(target)
        for send in sends:
            conn.frame(**send)
        return await conn.outcome(*replies)

    CASES.append(Case(id, section, expect, run))


def T(payload: bytes, **kw) -> dict:
    return {"opcode": 0x1, "payload": payload, **kw}


def C(opcode: int, payload: bytes = b"", **kw) -> dict:
    return {"opcode": opcode, "payload": payload, **kw}


CLOSE_1002 = ("close 1002",)
CLOSE_1007 = ("close 1007",)

# ---- framing: reserved bits, masking, opcodes (5.2, 5.3)
for bit, name in ((0x40, "rsv1"), (0x20, "rsv2"), (0x10, "rsv3")):
    frames_case(f"{name}-set-on-text", "5.2", CLOSE_1002, [T(b"x", rsv=bit)])
frames_case("rsv1-set-on-ping", "5.2", CLOSE_1002, [C(0x9, b"x", rsv=0x40)])
frames_case("unmasked-client-frame", "5.1, 5.3", CLOSE_1002, [T(b"x", masked=False)])
for op in (3, 4, 5, 6, 7):
    frames_case(f"reserved-data-opcode-{op}", "5.2", CLOSE_1002, [C(op, b"x")])
for op in (11, 12, 13, 14, 15):
    frames_case(f"reserved-control-opcode-{op}", "5.2", CLOSE_1002, [C(op, b"x")])

# ---- length encodings (5.2)
frames_case("length-7bit-125", "5.2", ("echo",), [T(b"a" * 125)], [(1, b"a" * 125)])
frames_case("length-16bit-126", "5.2", ("echo",), [T(b"a" * 126)], [(1, b"a" * 126)])
frames_case("length-16bit-16384", "5.2", ("echo",), [T(b"a" * 16384)], [(1, b"a" * 16384)])
# Non-minimal encodings: RFC 6455 5.2 says "the minimal number of bytes MUST be used", but
# names no answer; a server may accept them (ours does) or fail the connection.
frames_case(
    "length-16bit-non-minimal",
    "5.2",
    ("echo", "close 1002"),
    [T(b"abc", length=16)],
    [(1, b"abc")],
)
frames_case(
    "length-64bit-non-minimal",
    "5.2",
    ("echo", "close 1002"),
    [T(b"abc", length=64)],
    [(1, b"abc")],
)
frames_case("length-64bit-top-bit-set", "5.2", CLOSE_1002, [T(b"", length=1 << 63 | 3)])

# ---- size limit (the service's 16 KiB; 7.4.1 names 1009)
frames_case("size-over-16KiB", "7.4.1 (1009)", ("close 1009",), [T(b"a" * 16385)])
frames_case(
    "size-over-16KiB-64bit",
    "7.4.1 (1009)",
    ("close 1009",),
    # The header alone (a server refuses at the header; a client writing 70 kB into a
    # closed socket would get a reset that may swallow the close frame).
    [C(0x2, b"a" * 8, length=70000)],
)
frames_case(
    "size-over-16KiB-fragmented",
    "7.4.1 (1009)",
    ("close 1009",),
    [T(b"a" * 10000, fin=False), C(0x0, b"a" * 10000)],
)

# ---- ping and pong (5.5.2, 5.5.3, 5.4)
frames_case("ping-empty-answered", "5.5.2", ("echo",), [C(0x9)], [(0xA, b"")])
frames_case("ping-125-echoed", "5.5.2", ("echo",), [C(0x9, b"p" * 125)], [(0xA, b"p" * 125)])
frames_case("ping-126-too-long", "5.5", CLOSE_1002, [C(0x9, b"p" * 126)])
frames_case("close-126-too-long", "5.5", CLOSE_1002, [C(0x8, b"\x03\xe8" + b"r" * 124)])
frames_case("ping-fragmented", "5.4, 5.5", CLOSE_1002, [C(0x9, b"p", fin=False)])
frames_case(
    "pong-unsolicited-ignored", "5.5.3", ("echo",), [C(0xA, b"u"), T(b"after")], [(1, b"after")]
)

# ---- fragmentation (5.4)
frames_case(
    "fragments-joined",
    "5.4",
    ("echo",),
    [T(b"one ", fin=False), C(0x0, b"two ", fin=False), C(0x0, b"three")],
    [(1, b"one two three")],
)
frames_case(
    "fragments-binary-empty-pieces",
    "5.4",
    ("echo",),
    [C(0x2, b"", fin=False), C(0x0, b"", fin=False), C(0x0, b"x")],
    [(2, b"x")],
)
frames_case(
    "ping-between-fragments-answered",
    "5.4, 5.5.2",
    ("echo",),
    [T(b"a", fin=False), C(0x9, b"mid"), C(0x0, b"b")],
    [(0xA, b"mid"), (1, b"ab")],
)
frames_case("continuation-without-start", "5.4", CLOSE_1002, [C(0x0, b"x")])
frames_case(
    "new-message-inside-fragmented",
    "5.4",
    CLOSE_1002,
    [T(b"a", fin=False), T(b"b")],
)

# ---- UTF-8 (8.1, 5.6)
KOSME = "κόσμε".encode()
frames_case("utf8-valid-whole", "8.1", ("echo",), [T(KOSME)], [(1, KOSME)])
frames_case(
    "utf8-valid-split-in-a-character",
    "8.1, 5.4",
    ("echo",),
    [T(KOSME[:1], fin=False), C(0x0, KOSME[1:4], fin=False), C(0x0, KOSME[4:])],
    [(1, KOSME)],
)
frames_case(
    "utf8-valid-one-byte-a-fragment",
    "8.1, 5.4",
    ("echo",),
    [T(KOSME[:1], fin=False)]
    + [C(0x0, KOSME[i : i + 1], fin=False) for i in range(1, len(KOSME) - 1)]
    + [C(0x0, KOSME[-1:])],
    [(1, KOSME)],
)
frames_case("utf8-invalid-whole", "8.1", CLOSE_1007, [T(b"\xce\xba\xff")])
frames_case("utf8-overlong", "8.1", CLOSE_1007, [T(b"\xc0\xaf")])
frames_case("utf8-surrogate", "8.1", CLOSE_1007, [T(b"\xed\xa0\x80")])
frames_case("utf8-over-10FFFF", "8.1", CLOSE_1007, [T(b"\xf4\x90\x80\x80")])
frames_case(
    "utf8-truncated-at-message-end",
    "8.1",
    CLOSE_1007,
    [T(b"a", fin=False), C(0x0, KOSME[:3])],
)
# Fail fast: the final fragment never comes; the server must not wait for it.
frames_case(
    "utf8-invalid-first-fragment-fails-fast",
    "8.1 (fail fast)",
    CLOSE_1007,
    [T(KOSME + b"\xf4\x90\x80\x80", fin=False)],
)
frames_case(
    "utf8-invalid-later-fragment-fails-fast",
    "8.1 (fail fast)",
    CLOSE_1007,
    [T(KOSME, fin=False), C(0x0, b"\xf4\x90\x80\x80edited", fin=False)],
)
frames_case(
    "utf8-invalid-across-fragments-fails-fast",
    "8.1 (fail fast)",
    CLOSE_1007,
    [T(b"a\xce", fin=False), C(0x0, b"A", fin=False)],
)

# ---- close codes and reasons (5.5.1, 7.4)
for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999):
    frames_case(
        f"close-{code}-echoed",
        "5.5.1, 7.4.1",
        (f"close {code}",),
        [C(0x8, struct.pack("!H", code))],
    )
for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000):
    frames_case(
        f"close-{code}-invalid", "7.4.1, 7.4.2", CLOSE_1002, [C(0x8, struct.pack("!H", code))]
    )
frames_case("close-empty-answered", "5.5.1", ("close none", "close 1000"), [C(0x8)])
frames_case(
    "close-with-reason", "5.5.1", ("close 1000",), [C(0x8, struct.pack("!H", 1000) + KOSME)]
)
frames_case("close-1-byte-payload", "5.5.1", CLOSE_1002, [C(0x8, b"\x03")])
frames_case("close-reason-not-utf8", "5.5.1, 8.1", CLOSE_1007, [C(0x8, b"\x03\xe8\xff\xfe")])


# ---- the opening handshake (4.2.1, 4.2.2, 4.4)
async def _handshake(target: Target, request: str) -> str:
    """`upgraded` (101 with the right accept), `bad accept`, or `http <status>` (with
    `+version` when a 426 names Sec-WebSocket-Version), `eof`, `timeout`."""
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(request.replace("{path}", target.path).encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    except (asyncio.IncompleteReadError, ConnectionError):
        return "eof"
    except TimeoutError:
        return "timeout"
    finally:
        writer.close()
    status = head.split(b" ", 2)[1].decode()
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if status == "101":
        key = request.split("Sec-WebSocket-Key: ", 1)[1].split("\r\n", 1)[0].encode()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        return "upgraded" if fields.get(b"sec-websocket-accept") == accept else "bad accept"
    if status == "426" and fields.get(b"sec-websocket-version") == b"13":
        return "http 426+version"
    return f"http {status}"


KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def _request(
    first="GET {path} HTTP/1.1",
    host="Host: x\r\n",
    upgrade="Upgrade: websocket\r\n",
    connection="Connection: Upgrade\r\n",
    key=f"Sec-WebSocket-Key: {KEY}\r\n",
    version="Sec-WebSocket-Version: 13\r\n",
) -> str:
    return f"{first}\r\n{host}{upgrade}{connection}{key}{version}\r\n"


NOT_UPGRADED = ("http 400", "http 200", "http 404", "http 426")


def handshake_case(id: str, section: str, expect: tuple[str, ...], **parts: str) -> None:
    request = _request(**parts)
    if "Sec-WebSocket-Key: " not in request:
        request = request.replace("\r\n\r\n", f"\r\nX-Key: {KEY}\r\n\r\n")

    async def run(target: Target) -> str:
        return await _handshake(target, request)

    CASES.append(Case(id, section, expect, run))


handshake_case("handshake-valid", "4.2.1, 4.2.2", ("upgraded",))
handshake_case(
    "handshake-connection-token-list",
    "4.2.1",
    ("upgraded",),
    connection="Connection: keep-alive, Upgrade\r\n",
)
handshake_case(
    "handshake-key-not-base64",
    "4.2.1 (400)",
    ("http 400",),
    key="Sec-WebSocket-Key: not base64 at all!!!!\r\n",
)
handshake_case(
    "handshake-key-15-bytes",
    "4.2.1 (400)",
    ("http 400",),
    key=f"Sec-WebSocket-Key: {base64.b64encode(b'x' * 15).decode()}\r\n",
)
handshake_case(
    "handshake-key-17-bytes",
    "4.2.1 (400)",
    ("http 400",),
    key=f"Sec-WebSocket-Key: {base64.b64encode(b'x' * 17).decode()}\r\n",
)
handshake_case("handshake-key-missing", "4.2.1 (400)", ("http 400",), key="")
handshake_case("handshake-no-host", "4.2.1 (400)", ("http 400",), host="")
handshake_case("handshake-http-1.0", "4.2.1 (400)", ("http 400",), first="GET {path} HTTP/1.0")
handshake_case(
    "handshake-version-8",
    "4.2.2, 4.4 (426)",
    ("http 426+version",),
    version="Sec-WebSocket-Version: 8\r\n",
)
handshake_case(
    "handshake-version-missing", "4.2.1, 4.4", ("http 400", "http 426+version"), version=""
)
handshake_case("handshake-no-upgrade", "4.2.1", NOT_UPGRADED, upgrade="")
handshake_case("handshake-no-connection", "4.2.1", NOT_UPGRADED, connection="")
handshake_case("handshake-post", "4.2.1", ("http 400", "http 405"), first="POST {path} HTTP/1.1")


async def run_all(target: Target) -> dict[str, str]:
    """Every case against `target`: {case id: outcome}."""
    results = {}
    for c in CASES:
        try:
            results[c.id] = await c.run(target)
        except Exception as exc:  # a case that could not even connect
            results[c.id] = f"error {type(exc).__name__}"
    return results


# ---------------------------------------------------------------------------- side by side


async def echo_app(scope, receive, send) -> None:
    """Echoes every message; plain HTTP gets a 200."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"plain"})
        return
    await receive()
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        reply = {k: message[k] for k in ("text", "bytes") if message.get(k) is not None}
        await send({"type": "websocket.send", **reply})


def server_config(ours: bool):
    """The echo app, served as the service serves its app (`cli.uvicorn_command`: the
    project's HTTP and WS protocols, 16 KiB frames, no deflate), or with `--ws wsproto`."""
    import uvicorn

    from service import cli

    max_size = 16 * 1024  # `Settings.ws_max_frame`'s default, passed as --ws-max-size
    options = {"http": cli.HTTP_PROTOCOL, "ws": cli.WS_PROTOCOL} if ours else {"ws": "wsproto"}
    return uvicorn.Config(
        echo_app,
        host="127.0.0.1",
        port=0,
        ws_max_size=max_size,
        ws_per_message_deflate=False,
        ws_ping_interval=None,
        log_level="critical",
        lifespan="on",
        **options,
    )


async def _serve_and_run(ours: bool) -> dict[str, str]:
    import uvicorn

    server = uvicorn.Server(server_config(ours))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        return await run_all(Target("127.0.0.1", port))
    finally:
        server.should_exit = True
        await task


def main(out: str = "bench/results/conformance.json") -> int:
    ours = asyncio.run(_serve_and_run(True))
    theirs = asyncio.run(_serve_and_run(False))
    rows = []
    for c in CASES:
        rows.append(
            {
                "case": c.id,
                "section": c.section,
                "expect": list(c.expect),
                "ours": ours[c.id],
                "ours_ok": c.conforms(ours[c.id]),
                "wsproto": theirs[c.id],
                "wsproto_ok": c.conforms(theirs[c.id]),
            }
        )
    mark = {True: "", False: " ✗"}
    print("| case | RFC 6455 | ours | wsproto |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['section']} | {r['ours']}{mark[r['ours_ok']]} "
            f"| {r['wsproto']}{mark[r['wsproto_ok']]} |"
        )
    total = len(rows)
    summary = {
        "ours": sum(r["ours_ok"] for r in rows),
        "wsproto": sum(r["wsproto_ok"] for r in rows),
        "cases": total,
    }
    print(f"\nconforming: ours {summary['ours']}/{total}, wsproto {summary['wsproto']}/{total}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))
    return 0 if summary["ours"] == total else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
