"""Coalescing reads: many callers' keys answered by one call.

`Coalescer(fetch)` serves every caller that asks while a batch is in flight, or in the same
turn of the event loop, with one `fetch(keys)`: a connect storm costs one query or one Redis
command per batch, not one per socket. It is the read-side twin of `store.GroupCommit`:
batches grow with load, and a lone caller waits for nobody (its batch starts on the next
turn of the loop).

Under load a batch may wait a little for company: given `linger`, a batch that starts
while callers have been arriving between `busy`'s two gaps apart (a moving average; by
default an eighth and a half of a `linger`) waits `linger` before it goes, so that the
next callers share its round trip, and the work each caller sets off after it (a group
commit, a publish) goes in batches too. A caller alone, or one of a trickle, is never
held: its batch starts on the next turn of the loop, as without `linger`. Nor is one of a
flood: callers that come faster than that fill batches while the previous one is out, and
a wait would only add to their latency.

A wait also ends once callers stop coming: when none has come for `QUIET` times the mean
gap between the callers of a batch that waits (a moving average of those gaps). Callers who each
await their answer before they ask again (a closed loop) come back together when a batch
is answered, then nobody comes until the next answer: their batch goes once they are all
in, not at the end of the linger, which would only slow them down. Callers who come on
their own (an open loop) rarely leave such a pause, and their batch waits the linger.

`await get(key)` is the answer; `future(key)` is a future of it, for a caller that starts
several reads before awaiting any (no task per read).

Promises: each key is fetched once a batch however many callers ask for it; a failure of
`fetch` is raised to every caller of that batch, and the next batch starts afresh; each
caller has a future of its own, so one that is cancelled (or cancels its future) changes
nothing for the others.
"""

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# How much the newest gap between callers moves their average: about the last 16 count.
GAP_WEIGHT = 1 / 16
# A wait for company ends after a pause this many times the mean gap between its callers:
# callers coming on their own leave one that long once in 55 gaps (e**-4).
QUIET = 4


class Coalescer(Generic[K, V]):
    def __init__(
        self,
        fetch: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        *,
        max_batch: int = 500,
        linger: float = 0.0,
        busy: tuple[float, float] | None = None,
    ) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._linger = linger
        # Callers this far apart on average (seconds, at least and under) are worth waiting for.
        self._busy = busy or (linger / 8, linger / 2)
        # A moving average of the time between callers (seconds), each gap counted as at
        # most twenty times the busy band's top: one long pause ends a busy spell.
        self._longest_gap = 20 * self._busy[1]
        self._gap = self._longest_gap
        self._last = 0.0
        # When the batch being gathered got its first caller; callers counted so far (a
        # wait for company compares two readings: any change says that someone came).
        self._first = 0.0
        self._count = 0
        # Whether a batch is waiting for company, and the moving average of the gaps
        # between the callers that came while one was.
        self._gathering = False
        self._gap_within = self._busy[0]
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._runner: asyncio.Task[None] | None = None

    def future(self, key: K) -> "asyncio.Future[V]":
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._linger:
            now = loop.time()
            gap = min(now - self._last, self._longest_gap)
            self._gap += (gap - self._gap) * GAP_WEIGHT
            if self._gathering:
                self._gap_within += (gap - self._gap_within) * GAP_WEIGHT
            self._last = now
            self._count += 1
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = [future]
            if self._runner is None:
                self._first = self._last
                self._runner = loop.create_task(self._run())
        else:
            waiting.append(future)
        return future

    async def get(self, key: K) -> V:
        return await self.future(key)

    @property
    def busy(self) -> bool:
        """Whether callers come often enough to wait for (by default under half a `linger`
        apart, so that a wait gathers two more at least, on average), and not so often that
        batches fill by themselves (an eighth)."""
        return bool(self._linger) and self._busy[0] <= self._gap < self._busy[1]

    async def _wait_for_company(self) -> None:
        """Wait up to `linger` from the batch's first caller, until the batch is full, or
        until a pause says that callers have stopped coming."""
        loop = asyncio.get_running_loop()
        end = self._first + self._linger
        self._gathering = True
        try:
            while len(self._waiting) < self._max_batch:
                now = loop.time()
                if now >= end:
                    return
                count = self._count
                quiet_at = self._last + QUIET * self._gap_within
                if now < quiet_at:
                    await asyncio.sleep(min(end, quiet_at) - now)
                    continue
                # A pause. Callers whose requests this turn of the loop read are not here
                # yet: one more turn for them, and the wait goes on if any came.
                await asyncio.sleep(0)
                if self._count == count:
                    return
        finally:
            self._gathering = False

    async def _run(self) -> None:
        try:
            try:
                await asyncio.sleep(0)  # let the callers of this turn of the loop join in
                if self.busy:
                    await self._wait_for_company()  # and, under load, those of the next ms
            except asyncio.CancelledError:
                waiting, self._waiting = self._waiting, {}
                for futures in waiting.values():
                    for future in futures:
                        future.cancel()
                raise
            while self._waiting:
                keys = list(self._waiting)[: self._max_batch]
                batch = {key: self._waiting.pop(key) for key in keys}
                try:
                    found = await self._fetch(keys)
                except asyncio.CancelledError:
                    for futures in batch.values():
                        for future in futures:
                            future.cancel()
                    raise
                except Exception as exc:
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                                future.exception()  # retrieved: a caller may have gone
                    continue
                for key, futures in batch.items():
                    for future in futures:
                        if future.done():
                            continue
                        if key in found:
                            future.set_result(found[key])
                        else:
                            future.set_exception(KeyError(key))
                            future.exception()
        finally:
            self._runner = None
