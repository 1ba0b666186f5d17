"""Redaction of tokens in log lines, uvicorn's included."""

import logging

from uvicorn.logging import AccessFormatter

from service import auth
from service.logs import QuietAccepts, Redact


def _access_record(path: str) -> logging.LogRecord:
    """A record as uvicorn's HTTP protocol logs a request to `uvicorn.access`."""
    return logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", path, "1.1", 200),
        None,
    )


def test_an_access_line_with_a_token_is_redacted_and_still_formats():
    """uvicorn's access formatter unpacks the record's args: redaction must keep them."""
    jwt = auth.issue("a-secret-long-enough-to-sign-with-hs256!", sub="alice")
    for path in (f"/healthz?token={jwt}", f"/healthz?x={jwt}", "/healthz?token=opaque"):
        record = _access_record(path)
        assert Redact().filter(record)
        line = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s').format(
            record
        )
        assert "[redacted]" in line and jwt not in line and "opaque" not in line
        assert line.endswith(" 200 OK"), line


def test_a_token_in_an_argument_that_is_no_string_is_redacted_too():
    class Url:
        def __str__(self) -> str:
            return "/ws?token=secret"

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "open %s", (Url(),), None)
    Redact().filter(record)
    assert record.getMessage() == "open /ws?token=[redacted]"


def test_uvicorn_accept_line_is_debug_and_redacted_when_shown():
    """One line a socket, with the URL (and so the token): shown only at DEBUG."""

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(f"{record.levelname} {record.getMessage()}")

    jwt = auth.issue("a-secret-long-enough-to-sign-with-hs256!", sub="alice")
    logger = logging.getLogger("test.uvicorn.error")
    logger.propagate = False
    logger.filters[:] = [QuietAccepts(), Redact()]
    keep = Keep()
    logger.addHandler(keep)
    try:
        for level in (logging.INFO, logging.DEBUG):
            logger.setLevel(level)
            logger.info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5000", f"/ws?token={jwt}")
            logger.info("Application startup complete.")
    finally:
        logger.removeHandler(keep)
    assert keep.lines == [
        "INFO Application startup complete.",
        'DEBUG 127.0.0.1:5000 - "WebSocket /ws?token=[redacted]" [accepted]',
        "INFO Application startup complete.",
    ]


def _format_through_filter(exc: BaseException, level: int = logging.ERROR) -> str:
    from service.logs import KeyValueFormatter, OneLineFaults

    try:
        raise exc
    except BaseException:
        import sys

        record = logging.LogRecord("service.bus", level, __file__, 1, "resync failed", (), None)
        record.exc_info = sys.exc_info()
    assert OneLineFaults().filter(record)
    return KeyValueFormatter("%(levelname)s %(name)s: %(message)s").format(record)


def test_a_handled_fault_is_one_warning_line_with_its_cause():
    """A PostgreSQL or Redis outage the service rides out: no traceback, the cause named."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from service.errors import Unavailable

    for exc in (
        ConnectionRefusedError(111, "Connect call failed"),
        RedisConnectionError("Error 111 connecting to 127.0.0.1:6379"),
        Unavailable("PostgreSQL did not answer: TimeoutError"),
        ExceptionGroup("session", [TimeoutError(), OSError("reset")]),
    ):
        line = _format_through_filter(exc)
        assert "\n" not in line and "Traceback" not in line, line
        assert line.startswith("WARNING service.bus: resync failed: "), line
        first = exc.exceptions[0] if isinstance(exc, ExceptionGroup) else exc
        assert type(first).__name__ in line


def test_an_unexpected_error_keeps_its_traceback():
    line = _format_through_filter(KeyError("bug"))
    assert line.startswith("ERROR service.bus: resync failed") and "Traceback" in line
    mixed = _format_through_filter(ExceptionGroup("session", [OSError(), ZeroDivisionError()]))
    assert "Traceback" in mixed
