"""Verifying tokens and deriving the caller's role.

A token is an HS256 JWT signed with `JWT_SECRET`. A user token carries `sub` (the user id)
and `exp`; a service token carries `role: service_role` and `exp`, and acts for whichever
partner a request names. The role a user plays in a relationship is derived from the
relationship's row, never taken from the request.
"""

import math
import time

import jwt

from . import errors
from .schemas import ROLES, Relationship

_ALGORITHMS = ["HS256"]
SERVICE_ROLE = "service_role"


class Caller:
    """Who is calling: a user (`user_id`) or a service (`is_service`), until `expires`."""

    __slots__ = ("expires", "is_service", "user_id")

    def __init__(self, user_id: str | None, is_service: bool, expires: float = math.inf) -> None:
        self.user_id = user_id
        self.is_service = is_service
        self.expires = expires


def verify(token: str | None, secret: str) -> Caller:
    """Check a token; any defect (missing, malformed, unsigned, expired) is Unauthenticated."""
    if not token:
        raise errors.Unauthenticated("missing bearer token")
    try:
        claims = jwt.decode(token, secret, algorithms=_ALGORITHMS, options={"require": ["exp"]})
    except jwt.ExpiredSignatureError:
        raise errors.Unauthenticated("token expired") from None
    except jwt.PyJWTError:
        raise errors.Unauthenticated("invalid token") from None
    try:
        expires = float(claims["exp"])
    except (OverflowError, TypeError, ValueError):
        # PyJWT checks `exp` against now as an int; an int past float's range passes it.
        raise errors.Unauthenticated("invalid token") from None
    if claims.get("role") == SERVICE_ROLE:
        return Caller(None, True, expires)
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise errors.Unauthenticated("token has no subject")
    return Caller(sub, False, expires)


class Verifier:
    """`verify` with a bounded memory of tokens already verified.

    A client sends the same token on every request and every reconnect; checking its HMAC
    and parsing its JSON each time is most of an idle request's CPU. A remembered token is
    still refused once its `exp` has passed. Only valid tokens are remembered.
    """

    def __init__(self, secret: str, size: int = 50_000, clock=time.time) -> None:
        self._secret = secret
        self._clock = clock
        self._size = size
        self._known: dict[str, Caller] = {}

    def __call__(self, token: str | None) -> Caller:
        if token:
            caller = self._known.get(token)
            if caller is not None:
                if caller.expires > self._clock():
                    return caller
                del self._known[token]
                raise errors.Unauthenticated("token expired")
        caller = verify(token, self._secret)
        if len(self._known) >= self._size:
            del self._known[next(iter(self._known))]  # the oldest
        self._known[token] = caller  # type: ignore[index]
        return caller


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer ...` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def role_of(
    caller: Caller, relationship: Relationship | None, named: str | None, field: str = "sender_id"
) -> str:
    """The role the caller acts as in `relationship`.

    A user gets the partner whose id is their `sub`; a `named` role that differs is
    Forbidden. A service acts as `named`, which it must give. A relationship that does not
    exist and one the user is not part of get the same answer.
    """
    if relationship is None:
        raise errors.Forbidden("not a partner of this relationship")
    if named is not None and named not in ROLES:
        raise errors.Invalid(f"{field}: must be partner_a or partner_b")
    if caller.is_service:
        if named is None:
            raise errors.Invalid(f"{field}: a service token must name the partner it acts as")
        return named
    if relationship.partner_a_id == caller.user_id:
        role = "partner_a"
    elif relationship.partner_b_id == caller.user_id:
        role = "partner_b"
    else:
        raise errors.Forbidden("not a partner of this relationship")
    if named is not None and named != role:
        raise errors.Forbidden(f"{field}: you are {role} in this relationship, not {named}")
    return role


def issue(secret: str, *, sub: str | None = None, service: bool = False, ttl: int = 3600) -> str:
    """Sign a token (for `python -m service token`, the dev command and tests)."""
    claims: dict[str, object] = {"exp": int(time.time()) + ttl, "iat": int(time.time())}
    if service:
        claims["role"] = SERVICE_ROLE
    if sub is not None:
        claims["sub"] = sub
    return jwt.encode(claims, secret, algorithm="HS256")
