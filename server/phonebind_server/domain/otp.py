"""One-time codes: drawn from the OS CSPRNG, stored only as an HMAC."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from .errors import Reason, invalid

_DIGITS = "0123456789"

RandomBelow = Callable[[int], int]


def new_code(length: int, randbelow: RandomBelow = secrets.randbelow) -> str:
    """A uniform code of `length` digits, leading zeros kept. One draw: each
    draw reads the OS random source, which releases the GIL."""
    return f"{randbelow(10**length):0{length}d}"


def check_code_format(code: str, length: int) -> str:
    """Only ASCII digits of the configured length; Unicode digits are refused."""
    if len(code) != length or any(c not in _DIGITS for c in code):
        raise invalid(Reason.INVALID_ARGUMENT, "code", f"code must be {length} ASCII digits")
    return code
