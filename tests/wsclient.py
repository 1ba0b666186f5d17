"""A small WebSocket client for tests: frames as dicts, waits with deadlines."""

import asyncio
import json
import uuid

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen: list[dict] = []

    @classmethod
    async def open(cls, ws_url: str, relationship_id: uuid.UUID | str, tok: str) -> "Client":
        ws = await connect(f"{ws_url}?relationship_id={relationship_id}&token={tok}", max_size=None)
        return cls(ws)

    async def send(self, **frame) -> None:
        await self.ws.send(json.dumps(frame, default=str))

    async def recv(self, timeout: float = 5.0) -> dict:
        async with asyncio.timeout(timeout):
            frame = json.loads(await self.ws.recv())
        self.seen.append(frame)
        return frame

    async def expect(self, type_: str, timeout: float = 5.0, **match) -> dict:
        """Read until a frame of `type_` (whose fields equal `match`) arrives; return it."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame["type"] == type_ and all(frame.get(k) == v for k, v in match.items()):
                    return frame

    async def closed_with(self, timeout: float = 5.0) -> int:
        """Read until the server closes; the close code."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.recv(timeout)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else 1006

    async def close(self) -> None:
        await self.ws.close()
