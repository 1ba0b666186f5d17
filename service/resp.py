"""A batch of Redis commands sent as one write and read back in one pass, for the hot paths.

redis-py's pipeline costs about 20 µs of Python a command (an object per command, its
arguments encoded one by one, a timeout and a response callback per reply): as much as the
rest of a gesture's publishing. Here the commands are encoded once, into one buffer, and the
replies are read straight from the connection's parser, under one timeout for the batch:
about 5 µs a command (`docs/performance.md`). Only for a single Redis: on a cluster the
commands of a batch go to several nodes, and redis-py's cluster pipeline routes them.
"""

import asyncio
from collections.abc import Sequence

import redis.asyncio as aioredis


def command(*args: bytes) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


async def execute(redis: aioredis.Redis, commands: Sequence[bytes], timeout: float) -> list:
    """Send `commands` (from `command`) on one connection of `redis`'s pool, return their
    replies in order. Raises what redis-py raises when the server is away or slow, and the
    first error reply (a `ResponseError`) when Redis refused a command; the commands before
    and after it were still carried out, as in a pipeline."""
    pool = redis.connection_pool
    conn = await pool.get_connection()
    try:
        async with asyncio.timeout(timeout):
            await conn.send_packed_command(b"".join(commands), check_health=False)
            parser = conn._parser  # the connection's own reader: no per-reply wrapper
            replies = [await parser.read_response() for _ in commands]
    except BaseException:
        # A batch cut short leaves replies unread on the connection: never reuse it.
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)
    for reply in replies:
        if isinstance(reply, Exception):  # an error reply, as the parser hands it over
            raise reply
    return replies
