"""The fast HS256 verification answers every token exactly as PyJWT does.

`auth._fast_claims` decides the tokens `issue` signs and leaves anything unusual to PyJWT
(`_Undecided`); wherever it decides, its answer (the claims, or the refusal's message) must
be PyJWT's. A corpus of valid, expired, not-yet-valid, tampered, alg-swapped, malformed and
hostile tokens, then the same with generated claims and random edits."""

import base64
import gc
import hashlib
import hmac
import json
import time

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import auth, errors

SECRET = "a-test-secret-that-is-long-enough-for-hs256-keys!"
KEY = SECRET.encode()
NOW = int(time.time())
PLAIN = b'{"alg":"HS256","typ":"JWT"}'


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def signed(payload: bytes, header: bytes = PLAIN, key: bytes = KEY, digest=hashlib.sha256) -> str:
    """A token over any bytes at all, signed as a JWT library would."""
    head = _b64(header) + b"." + _b64(payload)
    return (head + b"." + _b64(hmac.new(key, head, digest).digest())).decode()


def claims(**values) -> bytes:
    return json.dumps(values).encode()


def pyjwt(token: str):
    try:
        return ("ok", auth._pyjwt_claims(token, SECRET))
    except errors.Unauthenticated as exc:
        return ("refused", exc.message)


def fast(token: str):
    try:
        return ("ok", auth._fast_claims(token, auth._key(SECRET)))
    except errors.Unauthenticated as exc:
        return ("refused", exc.message)
    except auth._Undecided:
        return None


def assert_same(token: str) -> bool:
    """Whether the fast path decided `token`; where it did, it agrees with PyJWT."""
    answer = fast(token)
    if answer is not None:
        assert answer == pyjwt(token), token
    # And verify as a whole answers as PyJWT's path does.
    try:
        whole = ("ok", auth.verify(token, SECRET).user_id)
    except errors.Unauthenticated as exc:
        whole = ("refused", exc.message)
    reference = pyjwt(token)
    if reference[0] == "refused":
        assert whole == reference, token
    return answer is not None


VALID = auth.issue(SECRET, sub="alice")
HEADER, PAYLOAD, SIGNATURE = VALID.split(".")


def _flip(segment: str) -> str:
    return ("B" if segment[0] == "A" else "A") + segment[1:]


CORPUS = {
    "issued": VALID,
    "service": auth.issue(SECRET, service=True),
    "expired": auth.issue(SECRET, sub="alice", ttl=-10),
    "expiring this second": signed(claims(sub="a", exp=NOW - 1)),
    "iat in the future": signed(claims(sub="a", exp=NOW + 99, iat=NOW + 60)),
    "nbf in the future": signed(claims(sub="a", exp=NOW + 99, nbf=NOW + 60)),
    "nbf passed": signed(claims(sub="a", exp=NOW + 99, nbf=NOW - 60)),
    "iat future and expired": signed(claims(sub="a", exp=NOW - 99, iat=NOW + 60)),
    "no exp": signed(claims(sub="a")),
    "exp null": signed(claims(sub="a", exp=None)),
    "exp a string": signed(claims(sub="a", exp=str(NOW + 99))),
    "exp a float": signed(claims(sub="a", exp=NOW + 99.5)),
    "exp true": signed(claims(sub="a", exp=True)),
    "exp beyond floats": signed(b'{"sub":"a","exp":1' + b"0" * 400 + b"}"),
    "exp 1e400": signed(b'{"sub":"a","exp":1e400}'),
    "exp NaN": signed(b'{"sub":"a","exp":NaN}'),
    "iat a string": signed(claims(sub="a", exp=NOW + 99, iat="x")),
    "aud": signed(claims(sub="a", exp=NOW + 99, aud="x")),
    "aud empty": signed(claims(sub="a", exp=NOW + 99, aud="")),
    "sub a number": signed(claims(sub=7, exp=NOW + 99)),
    "sub empty": signed(claims(sub="", exp=NOW + 99)),
    "jti a number": signed(claims(sub="a", exp=NOW + 99, jti=7)),
    "duplicate exp": signed(b'{"sub":"a","exp":1,"exp":%d}' % (NOW + 99)),
    "payload a list": signed(b"[1,2]"),
    "payload a number": signed(b"3"),
    "payload not JSON": signed(b"{nope"),
    "payload not UTF-8": signed(b'{"sub":"\xff","exp":%d}' % (NOW + 99)),
    "payload with a BOM": signed(b'\xef\xbb\xbf{"sub":"a","exp":%d}' % (NOW + 99)),
    "payload a lone surrogate": signed(b'{"sub":"\\ud800","exp":%d}' % (NOW + 99)),
    "payload deeply nested": signed(b'{"sub":"a","exp":%d,"x":' % (NOW + 99) + b"[" * 100_000),
    "payload deeply nested, closed": signed(b"[" * 5000 + b"]" * 5000),
    "signature tampered": f"{HEADER}.{PAYLOAD}.{_flip(SIGNATURE)}",
    "payload tampered": f"{HEADER}.{_flip(PAYLOAD)}.{SIGNATURE}",
    "wrong key": auth.issue("another-secret-that-is-long-enough-for-hs256!", sub="a"),
    "alg none": _b64(b'{"alg":"none"}').decode() + f".{PAYLOAD}.",
    "alg none, signed": signed(claims(sub="a", exp=NOW + 99), b'{"alg":"none"}'),
    "alg HS512": signed(claims(sub="a", exp=NOW + 99), b'{"alg":"HS512"}', digest=hashlib.sha512),
    "alg HS384": signed(claims(sub="a", exp=NOW + 99), b'{"alg":"HS384"}', digest=hashlib.sha384),
    "alg RS256": signed(claims(sub="a", exp=NOW + 99), b'{"alg":"RS256","typ":"JWT"}'),
    "no alg": signed(claims(sub="a", exp=NOW + 99), b'{"typ":"JWT"}'),
    "kid": signed(claims(sub="a", exp=NOW + 99), b'{"alg":"HS256","kid":"k1"}'),
    "kid a number": signed(claims(sub="a", exp=NOW + 99), b'{"alg":"HS256","kid":1}'),
    "crit": signed(claims(sub="a", exp=NOW + 99), b'{"alg":"HS256","crit":["x"]}'),
    "b64 false": signed(claims(sub="a", exp=NOW + 99), b'{"alg":"HS256","b64":false}'),
    "duplicate alg": signed(claims(sub="a", exp=NOW + 99), b'{"alg":"none","alg":"HS256"}'),
    "header a list": signed(claims(sub="a", exp=NOW + 99), b"[]"),
    "padded payload": f"{HEADER}.{PAYLOAD}{'=' * (-len(PAYLOAD) % 4)}.{SIGNATURE}",
    "padded signature": f"{HEADER}.{PAYLOAD}.{SIGNATURE}=",
    "standard alphabet": f"{HEADER}.{PAYLOAD.replace('-', '+').replace('_', '/')}.{SIGNATURE}",
    "junk in the signature": f"{HEADER}.{PAYLOAD}.{SIGNATURE[:10]}!!{SIGNATURE[10:]}",
    "signature non-canonical": f"{HEADER}.{PAYLOAD}.{SIGNATURE[:-1]}" + chr(ord(SIGNATURE[-1]) + 1),
    "signature length 4n+1": f"{HEADER}.{PAYLOAD}.{SIGNATURE}A",
    "two segments": f"{HEADER}.{PAYLOAD}",
    "four segments": f"{VALID}.{SIGNATURE}",
    "empty segments": "..",
    "one word": "hello",
    "spaces": f" {VALID} ",
    "not ASCII": f"{VALID}é",
    "bearer inside": f"Bearer {VALID}",
}


@pytest.mark.parametrize("name", CORPUS)
def test_the_fast_path_answers_as_pyjwt(name):
    # Earlier tests' garbage is collected here, not by a collection that happens to start at
    # the bottom of a 100,000-deep parse, where a finalizer (an asyncio transport's, say)
    # has no stack left and its RecursionError fails this test as an unraisable exception.
    gc.collect()
    assert_same(CORPUS[name])


def test_the_tokens_we_issue_are_decided_by_the_fast_path():
    for name in ("issued", "service", "expired", "iat in the future", "signature tampered"):
        assert fast(CORPUS[name]) is not None, name
    assert fast(VALID) == ("ok", jwt.decode(VALID, SECRET, algorithms=["HS256"]))


def test_a_key_pyjwt_refuses_refuses_every_token():
    pem = "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----"
    with pytest.raises(errors.Unauthenticated, match="invalid token"):
        auth.verify(auth.issue(SECRET, sub="a"), pem)


_ints = st.one_of(
    st.integers(NOW - 10**7, NOW - 5),
    st.integers(NOW + 5, NOW + 10**7),
    st.integers(-(10**30), 10**30),
)
_values = st.one_of(
    _ints, st.floats(), st.text(max_size=5), st.booleans(), st.none(), st.lists(_ints, max_size=2)
)
_claims = st.dictionaries(
    st.sampled_from(["exp", "iat", "nbf", "sub", "aud", "jti", "role", "x"]), _values
)
_headers = st.sampled_from(
    [
        PLAIN,
        b'{"typ":"JWT","alg":"HS256"}',
        b'{"alg":"HS256"}',
        b'{"alg":"HS512"}',
        b'{"alg":"none"}',
        b'{"alg":"HS256","kid":"x"}',
    ]
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(values=_claims, header=_headers, right_key=st.booleans())
def test_generated_claims_are_answered_as_pyjwt_answers_them(values, header, right_key):
    payload = json.dumps(values).encode()
    key = KEY if right_key else b"another-key-that-is-long-enough-for-hs256!!"
    assert_same(signed(payload, header, key))


@settings(max_examples=400, deadline=None)
@given(
    at=st.integers(0, len(VALID)),
    cut=st.integers(0, 3),
    insert=st.text(alphabet="AZaz09-_=.+/ !é", max_size=3),
)
def test_edited_tokens_are_answered_as_pyjwt_answers_them(at, cut, insert):
    assert_same(VALID[:at] + insert + VALID[at + cut :])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_answered_as_pyjwt_answers_it(text):
    if text:
        assert_same(text)
