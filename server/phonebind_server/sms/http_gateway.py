"""The `http` gateway: POSTs each message to the SMS provider's webhook.

Request (one per delivery attempt)::

    POST <url>
    Content-Type: application/json
    Idempotency-Key: <message_id>
    X-Phonebind-Timestamp: <unix seconds, decimal integer>
    X-Phonebind-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>

    {"message_id":"…","to":"+8613800138000","text":"…","purpose":"REBIND_CODE"}

The body is compact JSON in UTF-8 (no spaces, non-ASCII characters as is).
`message_id` is stable across retries and redeliveries after a crash, so the
provider adapter must send at most one SMS per `Idempotency-Key` and answer
2xx again for a key it has already accepted.

To verify a request, the provider adapter takes the raw body bytes exactly as
received and the `X-Phonebind-Timestamp` header value, computes
`HMAC-SHA256(secret, timestamp_bytes + b"." + body_bytes)` with the shared
secret (the `sms_http_secret` setting, base64-decoded), compares its lowercase
hex form with the part of `X-Phonebind-Signature` after `sha256=` in constant
time, and rejects a timestamp more than a few minutes away from its own clock
(the timestamp is wall-clock time, so a captured request cannot be replayed
later). Each attempt carries a fresh timestamp and signature.

Answers: 2xx means delivered. 408, 429, 5xx, any other status, timeouts and
connection errors raise GatewayError and the outbox retries; any other 4xx
raises PermanentGatewayError and the message is dead-lettered at once (the
request itself is wrong, sending it again cannot help). Redirects are not
followed; the standard proxy variables (https_proxy, no_proxy, …) apply. The
timeout applies to connecting and to each read of the answer.

Error messages never carry the text, the number or the provider's answer:
they are logged ("HTTP 500", "timeout after 2.0s", "connection refused").
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from .gateways import GatewayError, PermanentGatewayError

_RETRYABLE_4XX = frozenset({408, 429})
_MAX_ANSWER_BYTES = 64 * 1024


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as an error: a signed POST is never replayed elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-Phonebind-Signature value for a body sent at `timestamp`."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def encode_body(*, message_id: str, to: str, text: str, purpose: str) -> bytes:
    document = {"message_id": message_id, "to": to, "text": text, "purpose": purpose}
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class HttpGateway:
    name = "http"
    blocking = True

    def __init__(self, url: str, *, secret: bytes, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the http sms gateway needs an http:// or https:// URL with a host")
        if not secret:
            raise ValueError("the http sms gateway needs a secret")
        if timeout <= 0:
            raise ValueError("the http sms gateway timeout must be positive")
        self.url = url
        self._secret = secret
        self._timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if parts.scheme == "https":
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context()))
        self._opener = urllib.request.build_opener(*handlers)

    def deliver(self, *, message_id: str, to: str, text: str, purpose: str) -> None:
        body = encode_body(message_id=message_id, to=to, text=text, purpose=purpose)
        timestamp = str(int(time.time()))
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            self.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": message_id,
                "X-Phonebind-Timestamp": timestamp,
                "X-Phonebind-Signature": sign(self._secret, timestamp, body),
                "User-Agent": "phonebind-sms/1",
            },
        )
        try:
            with self._opener.open(request, timeout=self._timeout) as answer:
                answer.read(_MAX_ANSWER_BYTES)
                status = answer.status
        except urllib.error.HTTPError as error:
            status = error.code
            error.close()
        except urllib.error.URLError as error:
            raise GatewayError(self._describe(error.reason)) from None
        except (OSError, http.client.HTTPException) as error:
            raise GatewayError(self._describe(error)) from None
        if 200 <= status < 300:
            return
        if 400 <= status < 500 and status not in _RETRYABLE_4XX:
            raise PermanentGatewayError(f"HTTP {status}")
        raise GatewayError(f"HTTP {status}")

    def _describe(self, reason: object) -> str:
        """A short, data-free description of a transport failure."""
        if isinstance(reason, TimeoutError | socket.timeout):
            return f"timeout after {self._timeout}s"
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused"
        if isinstance(reason, ConnectionResetError | http.client.RemoteDisconnected):
            return "connection reset"
        if isinstance(reason, socket.gaierror):
            return "name resolution failed"
        if isinstance(reason, ssl.SSLError):
            return f"TLS error ({type(reason).__name__})"
        if isinstance(reason, http.client.HTTPException):
            return f"bad HTTP answer ({type(reason).__name__})"
        if isinstance(reason, OSError) and reason.errno is not None:
            return f"network error (errno {reason.errno})"
        return f"network error ({type(reason).__name__})"
