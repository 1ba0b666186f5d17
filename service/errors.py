"""Domain errors.

The rules raise these; they know nothing of HTTP or WebSockets. Each edge maps them in one
table: `api.py` to statuses, `gateway.py` to `error` frames and close codes.
"""


class ServiceError(Exception):
    """Base of every error the rules raise on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(ServiceError):
    """The input is well-formed but not acceptable (a field's value, a conflicting key)."""

    code = "invalid"


class Unauthenticated(ServiceError):
    """No credentials, or credentials that cannot be verified."""

    code = "unauthenticated"


class Forbidden(ServiceError):
    """The caller is known but may not do this."""

    code = "forbidden"


class NotFound(ServiceError):
    """The thing does not exist, or the caller may not know that it does."""

    code = "not_found"


class Gone(ServiceError):
    """What was asked for existed but is no longer kept (events past their retention)."""

    code = "gone"


class RateLimited(ServiceError):
    """Too many requests; `retry_after` is in whole seconds."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ServiceError):
    """A dependency (PostgreSQL) did not answer in time."""

    code = "unavailable"
