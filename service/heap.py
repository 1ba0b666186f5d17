"""Short garbage-collector pauses however many sockets a process holds.

CPython's collector scans, in a full collection, every container object alive; it starts
one whenever the objects that survived younger collections grew by a quarter. Each held
socket is about sixty such objects (its protocol, task, coroutines, scope, connection), so
at 15,000 sockets a full collection scans a million objects and holds the event loop for
the better part of a second, and a connect storm sets off one every time the heap grows by
a quarter. Every gesture in flight waits meanwhile. (`gesture_gc_pause_seconds` shows it.)

`keep_pauses_short` moves what survived into the collector's permanent generation once a
`freeze_interval`, after a collection of the young generations (so the young cyclic garbage
is reclaimed, not frozen): full collections then scan only what was made since, a few
milliseconds. Objects that die once frozen are freed as ever, by reference counting; only
garbage held in a reference cycle waits for the next `sweep_interval`, when everything is
thawed and collected once. Measured: the sockets of a process, frozen and then all closed,
left no cycle behind (tests/test_heap.py checks it on a real server).

Promises: no object reachable from the program is ever freed early (freezing only stops
scanning); cyclic garbage is reclaimed within `sweep_interval`; with GC_FREEZE_INTERVAL=0 the
lifespan does not run it, and CPython's collector is left as it is.
"""

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)


def sweep() -> int:
    """Thaw, collect fully, freeze again; the unreachable objects found."""
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    return found


# Objects allocated (less those freed) between two collections of the youngest generation:
# CPython's default, 700, is a few requests' worth, so that every object a request holds
# across an await was scanned there and moved on to be scanned again by the middle
# generation's collections. Most of them die with their request, as reference counting
# frees them, before this many have come.
YOUNG_THRESHOLD = 10_000


async def keep_pauses_short(freeze_interval: float, sweep_interval: float) -> None:
    """Runs until cancelled (a background task of the lifespan)."""
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    swept = time.monotonic()
    sweep()
    while True:
        await asyncio.sleep(freeze_interval)
        if time.monotonic() - swept >= sweep_interval:
            started = time.perf_counter()
            found = sweep()
            swept = time.monotonic()
            log.info(
                "full garbage collection",
                extra={"unreachable": found, "seconds": round(time.perf_counter() - started, 3)},
            )
        else:
            gc.collect(1)
            gc.freeze()
