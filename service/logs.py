"""Log format, redaction, and uvicorn's per-socket line.

Our loggers log a fixed message with values as fields (`extra=`); the formatter appends
them as key=value. Tokens travel in the WebSocket URL's query string, which uvicorn prints
in its access and handshake lines: `Redact` masks them before any handler sees the record.
uvicorn's `"WebSocket /ws?..." [accepted]` line, one a socket, is DEBUG here (`QuietAccepts`):
at the default level a connect storm prints nothing per socket, and no URL at all.
"""

import errno
import logging
import re

_TOKEN = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)
# Anything shaped like a JWT, wherever it stands (`%74oken=` decodes to `token=` too).
_JWT = re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]+")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _redact(text: str) -> str:
    return _JWT.sub("[redacted]", _TOKEN.sub(r"\1[redacted]", text))


def _sensitive(text: str) -> bool:
    return "token=" in text.lower() or "eyJ" in text


class Redact(logging.Filter):
    """Masks tokens in the message and in its arguments, keeping `args` a tuple: uvicorn's
    access formatter unpacks them, and a record without them is a logging error (with a
    traceback on stderr) instead of an access line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _sensitive(record.getMessage()):
            return True
        if isinstance(record.msg, str):
            record.msg = _redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: _redact(v) if isinstance(v, str) else v for k, v in record.args.items()
            }
        message = record.getMessage()
        if _sensitive(message) and _redact(message) != message:
            # A token inside an argument that is no string: flatten, as the last resort.
            record.msg, record.args = _redact(message), None
        return True


# The message uvicorn's WebSocket protocols log, at INFO, for every socket they accept.
_ACCEPTED = '%s - "WebSocket %s" [accepted]'


class QuietAccepts(logging.Filter):
    """uvicorn's per-socket accept line as DEBUG: dropped unless `uvicorn.error` logs DEBUG
    (`--log-level debug`), then shown as DEBUG (and redacted). Placed before `Redact`, so a
    dropped line costs no regular expression."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _ACCEPTED or record.levelno != logging.INFO:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class PortInUse(logging.Filter):
    """uvicorn logs a port that is taken as the bare OSError (`[Errno 98] error while
    attempting to bind on address ...`); say which port and what to do instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.msg
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            address = re.search(r"\('?([^',]*)'?, (\d+)\)", str(exc))
            where = f"port {address[2]} on {address[1]}" if address else "the port"
            record.msg, record.args = (
                f"cannot start: {where} is in use by another process: stop that process, "
                "or choose another port (--port)",
                None,
            )
        return True


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _handled(exc: BaseException) -> bool:
    """An outage the service rides out (a server gone, a connection cut, a timeout), as
    opposed to a bug."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from .errors import Unavailable

    outage = (OSError, TimeoutError, Unavailable, RedisConnectionError, RedisTimeoutError)
    if isinstance(exc, outage):
        return True
    # asyncpg's own "the server went away" errors, without importing asyncpg here.
    names = {t.__name__ for t in type(exc).__mro__}
    return bool(
        names
        & {
            "PostgresConnectionError",
            "ConnectionDoesNotExistError",
            "CannotConnectNowError",
            "AdminShutdownError",
            "InterfaceError",
        }
    )


class OneLineFaults(logging.Filter):
    """A fault the service handles at run time (Redis restarting, PostgreSQL cut) is one
    warning line with its cause, not a traceback: asyncpg's pool logs one on every attempt
    to reconnect, and a failed resync carried one. Anything else keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None:
            return True
        leaves = _leaves(record.exc_info[1])
        if not all(_handled(leaf) for leaf in leaves):
            return True
        cause = "; ".join(f"{type(e).__name__}: {e}".rstrip(": ") for e in leaves)
        record.msg = f"{record.getMessage()}: {cause}"
        record.args = None
        record.exc_info = record.exc_text = None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def configure() -> None:
    """Redact uvicorn's lines, quiet its per-socket one; give our package a handler if the
    host set none."""
    redact = Redact()
    error = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, PortInUse) for f in error.filters):
        error.addFilter(PortInUse())
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietAccepts) for f in logger.filters):
            logger.filters.insert(0, QuietAccepts())
        if not any(isinstance(f, Redact) for f in logger.filters):
            logger.addFilter(redact)
        for handler in logger.handlers:
            if not any(isinstance(f, Redact) for f in handler.filters):
                handler.addFilter(redact)
    one_line = OneLineFaults()
    pool = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, OneLineFaults) for f in pool.filters):
        pool.addFilter(one_line)
    package = logging.getLogger("service")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(KeyValueFormatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(redact)
        handler.addFilter(one_line)  # a handler's filter sees the records of service.*
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False
