"""Coalescing reads: many callers' keys answered by one call.

`Coalescer(fetch)` serves `await get(key)` for every caller that asks while a batch is in
flight, or in the same turn of the event loop, with one `fetch(keys)`: a connect storm costs
one query or one Redis command per batch, not one per socket. It is the read-side twin of
`store.GroupCommit`: batches grow with load, and a lone caller waits for nobody (its batch
starts on the next turn of the loop).

Promises: each key is fetched once a batch however many callers ask for it; a failure of
`fetch` is raised to every caller of that batch, and the next batch starts afresh; a caller
that is cancelled does not cancel the batch for the others.
"""

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    def __init__(
        self,
        fetch: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        *,
        max_batch: int = 500,
    ) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._waiting: dict[K, asyncio.Future[V]] = {}
        self._runner: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V:
        future = self._waiting.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._waiting[key] = loop.create_future()
            if self._runner is None:
                self._runner = loop.create_task(self._run())
        return await asyncio.shield(future)

    async def _run(self) -> None:
        try:
            await asyncio.sleep(0)  # let the callers of this turn of the loop join in
            while self._waiting:
                keys = list(self._waiting)[: self._max_batch]
                batch = {key: self._waiting.pop(key) for key in keys}
                try:
                    found = await self._fetch(keys)
                except asyncio.CancelledError:
                    for future in batch.values():
                        future.cancel()
                    raise
                except Exception as exc:
                    for future in batch.values():
                        if not future.done():
                            future.set_exception(exc)
                            future.exception()  # retrieved: a caller may have gone
                    continue
                for key, future in batch.items():
                    if not future.done():
                        if key in found:
                            future.set_result(found[key])
                        else:
                            future.set_exception(KeyError(key))
                            future.exception()
        finally:
            self._runner = None
