"""One-time codes: drawn from the OS CSPRNG, stored only as an HMAC."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from .errors import Reason, invalid

_DIGITS = "0123456789"

RandomBelow = Callable[[int], int]


def new_code(length: int, randbelow: RandomBelow = secrets.randbelow) -> str:
    return "".join(_DIGITS[randbelow(10)] for _ in range(length))


def check_code_format(code: str, length: int) -> str:
    """Only ASCII digits of the configured length; Unicode digits are refused."""
    if len(code) != length or any(c not in _DIGITS for c in code):
        raise invalid(Reason.INVALID_ARGUMENT, "code", f"code must be {length} ASCII digits")
    return code
