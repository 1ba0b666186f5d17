"""Turning a decoder's complaint into a `detail` a person can act on; names the field."""

import re

import msgspec

_REGEX = re.compile(r"Expected `str` matching regex '.*' - at `\$\.(\w+)`")


def describe(exc: Exception, what: str = "body") -> str:
    if isinstance(exc, msgspec.ValidationError):
        text = str(exc)
        match = _REGEX.fullmatch(text)
        if match:
            field = match.group(1)
            return f"{field}: contains a character that is not allowed (control character?)"
        return text
    if isinstance(exc, RecursionError):
        return f"{what} is nested too deeply"
    return f"{what} is not valid JSON"
