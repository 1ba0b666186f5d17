"""Log format and redaction.

Our loggers log a fixed message with values as fields (`extra=`); the formatter appends
them as key=value. Tokens travel in the WebSocket URL's query string, which uvicorn prints
in its access and handshake lines: `Redact` masks them before any handler sees the record.
"""

import logging
import re

_TOKEN = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)
# Anything shaped like a JWT, wherever it stands (`%74oken=` decodes to `token=` too).
_JWT = re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]+")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message.lower() or "eyJ" in message:
            record.msg = _JWT.sub("[redacted]", _TOKEN.sub(r"\1[redacted]", message))
            record.args = None
        return True


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def configure() -> None:
    """Redact uvicorn's lines; give our package a handler if the host set none."""
    redact = Redact()
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, Redact) for f in logger.filters):
            logger.addFilter(redact)
        for handler in logger.handlers:
            if not any(isinstance(f, Redact) for f in handler.filters):
                handler.addFilter(redact)
    package = logging.getLogger("service")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(KeyValueFormatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(redact)
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False
