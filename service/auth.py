"""Verifying tokens and deriving the caller's role.

A token is an HS256 JWT signed with `JWT_SECRET`. A user token carries `sub` (the user id)
and `exp`; a service token carries `role: service_role` and `exp`, and acts for whichever
partner a request names. The role a user plays in a relationship is derived from the
relationship's row, never taken from the request.

Verification has a fast path for the tokens `issue` signs (every connect of a storm carries
a token not seen before): the HMAC, base64url and JSON by hand, for a token whose header is
one of the plain HS256 headers and whose claims are plain. Anything else (another header,
padding, a non-canonical segment, JSON msgspec refuses, claims of another type) is decided
by PyJWT, so a token is accepted or refused, with the same message, exactly as PyJWT alone
would: the fast path only ever answers what PyJWT's rules give for the tokens it takes.
"""

import base64
import binascii
import functools
import hashlib
import hmac
import math
import time

import jwt
import msgspec
from jwt.algorithms import HMACAlgorithm

from . import errors
from .schemas import ROLES, Relationship

_ALGORITHMS = ["HS256"]
SERVICE_ROLE = "service_role"


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


# Headers that PyJWT accepts for HS256 as they are (no kid, crit or b64 to check): what
# `jwt.encode` writes, and the same in the other order or without `typ`.
_PLAIN_HEADERS = frozenset(
    _b64(h)
    for h in (b'{"alg":"HS256","typ":"JWT"}', b'{"typ":"JWT","alg":"HS256"}', b'{"alg":"HS256"}')
)
_claims_decoder = msgspec.json.Decoder()


class _Undecided(Exception):
    """The fast path leaves this token to PyJWT."""


@functools.lru_cache(maxsize=4)
def _key(secret: str) -> "hmac.HMAC | None":
    """An HMAC-SHA256 keyed as PyJWT prepares the key, to copy for each token; None if
    PyJWT refuses the key (then PyJWT decides every token, refusing them all as it does)."""
    try:
        key = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.PyJWTError:
        return None
    return hmac.new(key, digestmod=hashlib.sha256)


# base64url to the standard alphabet; `+`, `/` and `=` (which PyJWT's decoding refuses) to a
# character that strict decoding refuses too.
_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")
_PADDING = (b"", None, b"==", b"=")  # by length % 4; 1 can be no segment
# The value of each base64url character, for the bits a short last group leaves unused.
_VALUE = [0] * 256
for _i, _c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"):
    _VALUE[_c] = _i


def _segment(segment: bytes) -> bytes:
    """A base64url segment as PyJWT's strict decoding takes it: the alphabet only, no
    padding, canonical (the unused bits zero); anything else is left to PyJWT."""
    padding = _PADDING[len(segment) % 4]
    if padding is None:
        raise _Undecided
    try:
        raw = binascii.a2b_base64(segment.translate(_TO_STANDARD) + padding, strict_mode=True)
    except binascii.Error:
        raise _Undecided from None
    if padding and _VALUE[segment[-1]] & (0x0F if len(padding) == 2 else 0x03):
        raise _Undecided
    return raw


def _fast_claims(token: str, key: hmac.HMAC) -> dict:
    """The claims of a token, checked as `jwt.decode(token, secret, algorithms=["HS256"],
    options={"require": ["exp"]})` checks them; `_Undecided` for a token it leaves to PyJWT."""
    if not token.isascii():
        raise _Undecided
    raw = token.encode()
    header, _, rest = raw.partition(b".")
    payload_segment, dot, signature_segment = rest.partition(b".")
    if header not in _PLAIN_HEADERS or not dot or b"." in signature_segment:
        raise _Undecided
    payload, signature = _segment(payload_segment), _segment(signature_segment)
    signing_input = raw[: len(header) + 1 + len(payload_segment)]
    mac = key.copy()
    mac.update(signing_input)
    if not hmac.compare_digest(mac.digest(), signature):
        raise errors.Unauthenticated("invalid token")
    try:
        claims = _claims_decoder.decode(payload)
    except Exception:  # msgspec's errors, UnicodeDecodeError, RecursionError: PyJWT decides
        raise _Undecided from None
    if not isinstance(claims, dict):
        raise _Undecided
    exp, iat, nbf = claims.get("exp"), claims.get("iat", 0), claims.get("nbf", 0)
    if (
        type(exp) is not int
        or type(iat) is not int
        or type(nbf) is not int
        or "aud" in claims
        or not isinstance(claims.get("sub", ""), str)
        or not isinstance(claims.get("jti", ""), str)
    ):
        raise _Undecided
    # PyJWT's order and comparisons (leeway 0, now as a float): iat, nbf, then exp.
    now = time.time()
    if iat > now or nbf > now:
        raise errors.Unauthenticated("invalid token")
    if exp <= now:
        raise errors.Unauthenticated("token expired")
    return claims


def _pyjwt_claims(token: str, secret: str) -> dict:
    try:
        return jwt.decode(token, secret, algorithms=_ALGORITHMS, options={"require": ["exp"]})
    except jwt.ExpiredSignatureError:
        raise errors.Unauthenticated("token expired") from None
    except jwt.PyJWTError:
        raise errors.Unauthenticated("invalid token") from None


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
    key = _key(secret)
    try:
        if key is None:
            raise _Undecided
        claims = _fast_claims(token, key)
    except _Undecided:
        claims = _pyjwt_claims(token, secret)
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
