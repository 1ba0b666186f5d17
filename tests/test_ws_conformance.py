"""RFC 6455 conformance of the project's WebSocket protocol (service.wsserver, served as
`cli.uvicorn_command` serves the service: its HTTP front, its WS protocol, 16 KiB frames):
every case of `bench/wsconformance.py`, each named after the section it holds, on a real
uvicorn server with an echo app, over raw sockets."""

import asyncio
import time

import pytest
import uvicorn

from bench.wsconformance import CASES, Target, server_config

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def target():
    server = uvicorn.Server(server_config(ours=True))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 20
    while not server.started:
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "server did not start"
        await asyncio.sleep(0.01)
    yield Target("127.0.0.1", server.servers[0].sockets[0].getsockname()[1])
    server.should_exit = True
    await task


@pytest.mark.parametrize("case", CASES, ids=[f"{c.section} {c.id}" for c in CASES])
async def test_rfc6455(target: Target, case) -> None:
    outcome = await case.run(target)
    assert case.conforms(outcome), f"{case.id} (RFC 6455 {case.section}): {outcome}"
