"""Helpers for the WebSocket tests: HTTP sends, polls with deadlines, a client that never
reads, and a Redis server of a test's own."""

import asyncio
import base64
import os
import socket
import uuid

import httpx
from websockets.exceptions import ConnectionClosed

from .conftest import Couple, bearer
from .wsclient import Client


def headers_of(couple: Couple, role: str) -> dict[str, str]:
    return bearer(couple.token_of(role))


async def send_http(
    http: httpx.AsyncClient,
    base_url: str,
    couple: Couple,
    role: str = "partner_a",
    **body,
) -> dict:
    """POST /api/gestures/send as `role`; the answer's JSON (asserting 200)."""
    payload = {
        "relationship_id": str(couple.id),
        "gesture_type": "hug",
        "sender_id": role,
        **body,
    }
    r = await http.post(
        f"{base_url}/api/gestures/send", json=payload, headers=headers_of(couple, role)
    )
    assert r.status_code == 200, r.text
    return r.json()


async def connect(ws_url: str, couple: Couple, role: str) -> Client:
    """Connect as `role` and read the greeting's presence frame."""
    client = await Client.open(ws_url, couple.id, couple.token_of(role))
    await client.expect("presence")
    return client


async def refused(ws_url: str, relationship_id, tok: str) -> tuple[int, list[dict]]:
    """Connect and read until the server closes: (close code, frames received before)."""
    client = await Client.open(ws_url, relationship_id, tok)
    code = await client.closed_with()
    return code, client.seen


async def gather_received(client: Client, ids: set[str], timeout: float = 15.0) -> list[str]:
    """Read until every gesture id in `ids` arrived as gesture_received; every received id,
    in order, duplicates included."""
    return await gather(client, "gesture_received", ids, timeout)


async def gather(
    client: Client, type_: str, ids: set[str], timeout: float = 15.0, since: int | None = None
) -> list[str]:
    """Read until a frame of `type_` arrived for every gesture id in `ids`; the ids of every
    such frame, in order, duplicates included. With `since`, frames the client already read
    from that index on count too (`expect` reads past frames it does not match)."""

    def gesture_id(frame: dict) -> str:
        return frame["gesture"]["id"] if "gesture" in frame else frame["gesture_id"]

    got = [gesture_id(f) for f in client.seen[since or 0 :] if f["type"] == type_]
    if since is None:
        got = []
    async with asyncio.timeout(timeout):
        while not ids <= set(got):
            frame = await client.recv(timeout)
            if frame["type"] == type_:
                got.append(gesture_id(frame))
    return got


async def no_frame(client: Client, window: float) -> list[dict]:
    """Frames that arrive within `window` seconds (for asserting that none of a kind does)."""
    frames = []
    try:
        async with asyncio.timeout(window):
            while True:
                frames.append(await client.recv(window + 1))
    except TimeoutError:
        pass
    return frames


async def close_quietly(*clients: Client) -> None:
    for c in clients:
        try:
            await c.close()
        except (ConnectionClosed, OSError):
            pass


class SilentClient:
    """A WebSocket client that does the handshake by hand and then never reads, with a small
    receive buffer so the server's writes back up quickly."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def open(cls, port: int, relationship_id: uuid.UUID, tok: str) -> "SilentClient":
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws?relationship_id={relationship_id}&token={tok} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        head = b""
        async with asyncio.timeout(5):
            while b"\r\n\r\n" not in head:
                chunk = await loop.sock_recv(sock, 1)  # byte by byte: read no frame
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(sock)

    async def dropped(self, timeout: float = 10.0) -> None:
        """Start reading: returns once the server has closed or reset the connection."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    if not await loop.sock_recv(self.sock, 65536):
                        return
                except (ConnectionResetError, BrokenPipeError):
                    return

    def close(self) -> None:
        self.sock.close()
