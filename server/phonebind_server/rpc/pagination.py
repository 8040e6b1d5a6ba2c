"""Opaque, tamper-evident page tokens (AIP-158).

A token names the query it belongs to (its scope) and where the next page
starts; it is signed, so a caller can neither forge a position nor reuse a
token on another account's list.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from ..domain.errors import Reason, invalid

_MAC_BYTES = 12


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._key, b"page\x00" + payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, scope: str, cursor: str) -> str:
        payload = f"{scope}\x00{cursor}".encode()
        return base64.urlsafe_b64encode(self._sign(payload) + payload).decode().rstrip("=")

    def decode(self, scope: str, token: str) -> str | None:
        """The cursor in `token`, None for the first page; INVALID_ARGUMENT if forged."""
        if not token:
            return None
        if len(token) <= 512:
            try:
                raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
                mac, payload = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
                owner, cursor = payload.decode().split("\x00")
                # b64decode skips stray characters (NUL, "!", extra "="): only the exact
                # spelling of a token the server issued is one.
                canonical = base64.urlsafe_b64encode(raw).decode().rstrip("=") == token
                if canonical and hmac.compare_digest(mac, self._sign(payload)) and owner == scope:
                    return cursor
            except (ValueError, UnicodeDecodeError):
                pass
        raise invalid(
            Reason.INVALID_ARGUMENT, "page_token", "page_token is not valid for this request"
        )
