"""service.heap: what is frozen still dies. A real server on this loop holds sockets while
the collector freezes them; once they are closed, a full collection finds no part of them
left in a reference cycle (which, frozen, would only be reclaimed at the next sweep)."""

import gc

import pytest

from service import heap
from service.gateway import Gateway
from service.hub import Connection
from service.wsserver import WSProtocol

from .conftest import Couple, make_couple
from .support_helpers import eventually
from .support_ws import close_quietly, connect

pytestmark = pytest.mark.anyio

SERVER_SIDE = (WSProtocol, Connection)
ROLES = ("partner_a", "partner_b")


async def test_closed_sockets_leave_nothing_frozen_in_a_cycle(server, database_url: str):
    gateway: Gateway = server.server.lifespan.state["gateway"]
    couples: list[Couple] = [await make_couple(database_url) for _ in range(10)]
    clients = [await connect(server.ws_url, c, r) for c in couples for r in ROLES]
    heap.sweep()  # everything alive now, the 20 sockets included, is frozen
    await close_quietly(*clients)
    await eventually(lambda: len(gateway.hub) == 0)
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what a collection finds unreachable, to look at it
    try:
        gc.unfreeze()
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, SERVER_SIDE)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.freeze()
    assert left == []
