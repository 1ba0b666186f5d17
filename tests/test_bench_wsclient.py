"""The bench's lean WebSocket client (`bench/wsclient.py`) against the `websockets` server:
what the load generators rely on to measure the service as browsers use it."""

import asyncio
import os

import pytest
from websockets.asyncio.server import serve

from bench.wsclient import HandshakeError, apply_mask, connect, xor_mask

pytestmark = pytest.mark.anyio


async def _session(compression: str | None, server_compression: str | None) -> dict:
    """The server greets, sends a long message in fragments, pings, echoes what the client
    sends, then closes with 4001; returns what each side saw."""
    seen: dict = {"server": []}

    async def handler(ws) -> None:
        seen["extensions"] = ws.request.headers.get("Sec-WebSocket-Extensions")
        await ws.send('{"type":"presence"}')
        await ws.send(["x" * 3000, "é" * 10, "end"])  # one message, three fragments
        pong = await ws.ping(b"beat")
        await asyncio.wait_for(pong, 5)
        seen["pong"] = True
        seen["server"].append(await ws.recv())
        await ws.close(4001, "bye")

    async with serve(handler, "127.0.0.1", 0, compression=server_compression) as server:
        port = server.sockets[0].getsockname()[1]
        got: list = []
        both = asyncio.Event()

        def on_message(m) -> None:
            got.append(m)
            if len(got) == 2:
                both.set()

        ws = await connect("127.0.0.1", port, "/ws?x=1", on_message, compression)
        await asyncio.wait_for(both.wait(), 5)
        ws.send("hello")
        code = await asyncio.wait_for(ws.closed, 5)
    seen.update(client=got, code=code, deflate=ws.deflate)
    return seen


@pytest.mark.parametrize("server_compression", ["deflate", None])
async def test_the_client_offers_deflate_inflates_answers_pings_and_records_the_close(
    server_compression,
) -> None:
    seen = await _session("deflate", server_compression)
    assert seen["extensions"].startswith("permessage-deflate")
    assert seen["deflate"] is (server_compression == "deflate")
    assert seen["client"] == ['{"type":"presence"}', "x" * 3000 + "é" * 10 + "end"]
    assert seen["pong"] is True
    assert seen["server"] == ["hello"]  # masked, or the server would have refused it
    assert seen["code"] == 4001


async def test_without_compression_nothing_is_offered() -> None:
    seen = await _session(None, "deflate")
    assert seen["extensions"] is None
    assert seen["deflate"] is False
    assert seen["code"] == 4001


async def test_a_refused_handshake_is_an_error_and_a_dropped_stream_is_1006() -> None:
    async def handler(ws) -> None:
        await ws.send('{"type":"presence"}')
        ws.transport.abort()

    async def refuse(connection, request):
        return connection.respond(403, "no\n")

    async with serve(handler, "127.0.0.1", 0, process_request=refuse) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(HandshakeError):
            await connect("127.0.0.1", port, "/ws", print)
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        ws = await connect("127.0.0.1", port, "/ws", lambda m: None)
        assert await asyncio.wait_for(ws.closed, 5) == 1006


def test_the_pure_python_mask_matches_the_c_one() -> None:
    for n in (0, 1, 3, 4, 5, 125, 1000):
        data, mask = os.urandom(n), os.urandom(4)
        assert xor_mask(data, mask) == apply_mask(data, mask)
        assert xor_mask(xor_mask(data, mask), mask) == data
