"""The `http` gateway: POSTs each message to the SMS provider's webhook, signed
with Standard Webhooks (https://www.standardwebhooks.com).

Request (one per delivery attempt)::

    POST <url>
    Content-Type: application/json
    Idempotency-Key: <message_id>
    webhook-id: <message_id>
    webhook-timestamp: <unix seconds, decimal integer>
    webhook-signature: v1,<base64 HMAC-SHA256(secret, id + "." + timestamp + "." + body)>

    {"message_id":"…","to":"+8613800138000","purpose":"REBIND_CODE",
     "template":"phonebind.rebind_code.v1","language":"zh-CN",
     "params":{"code":"123456","minutes":"5"},"text":"【phonebind】验证码 123456，…"}

The body is compact JSON in UTF-8 (no spaces, non-ASCII characters as is).
`template`, `language` and `params` name the wording the text was rendered
from (domain/messages.py), for providers that send by registered template:
`phonebind.rebind_code.v1` takes `code` and `minutes`,
`phonebind.change_notice.v1` takes `masked_number`; every value is a string.
A message queued before templates existed has `template` "" and `params` {}.

`message_id` (also `webhook-id`) is stable across retries and redeliveries
after a crash, so the provider adapter must send at most one SMS per id and
answer 2xx again for an id it has already accepted.

The secret is the `sms_http_secret` setting, `whsec_` followed by base64; the
adapter verifies with any Standard Webhooks library, for example in Python
`standardwebhooks.Webhook(secret).verify(raw_body, headers)`, which also
refuses a timestamp more than five minutes from its own clock. Each attempt
carries a fresh timestamp and signature.

Answers: 2xx means delivered. 408, 429, 5xx, any other status, timeouts and
connection errors raise GatewayError and the outbox retries; a 429 or 503 with
`Retry-After` (seconds, or an HTTP date) says when, and the outbox waits that
long (capped). Any other 4xx raises PermanentGatewayError and the message is
dead-lettered at once (the request itself is wrong, sending it again cannot
help). Redirects are not followed; the standard proxy variables (https_proxy,
no_proxy, …) apply. The timeout applies to connecting and to each read of the
answer.

Error messages never carry the text, the number or the provider's answer:
they are logged ("HTTP 500", "timeout after 2.0s", "connection refused").
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from email.message import Message
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from standardwebhooks.webhooks import Webhook

from .gateways import GatewayError, PermanentGatewayError, Sms

_RETRYABLE_4XX = frozenset({408, 429})
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_MAX_ANSWER_BYTES = 64 * 1024


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as an error: a signed POST is never replayed elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def encode_body(sms: Sms) -> bytes:
    return json.dumps(sms.document(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def retry_after(headers: Message | None) -> timedelta | datetime | None:
    """The Retry-After header: a delay (delta-seconds) or a moment (HTTP date);
    None when absent or unreadable."""
    value = (headers.get("Retry-After") if headers is not None else None) or ""
    value = value.strip()
    if value.isascii() and value.isdigit():
        return timedelta(seconds=int(value))
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


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
        self._webhook = Webhook(secret)
        self._timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if parts.scheme == "https":
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context()))
        self._opener = urllib.request.build_opener(*handlers)

    def signed_headers(self, message_id: str, body: bytes) -> dict[str, str]:
        """The Standard Webhooks headers of `body`, signed now (wall-clock time:
        the receiver compares it with its own clock)."""
        sent_at = datetime.now(UTC).replace(microsecond=0)
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": self._webhook.sign(message_id, sent_at, body.decode("utf-8")),
        }

    def deliver(self, sms: Sms) -> None:
        body = encode_body(sms)
        message_id = sms.message_id
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            self.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": message_id,
                **self.signed_headers(message_id, body),
                "User-Agent": "phonebind-sms/2",
            },
        )
        headers: Message | None = None
        try:
            with self._opener.open(request, timeout=self._timeout) as answer:
                answer.read(_MAX_ANSWER_BYTES)
                status = answer.status
        except urllib.error.HTTPError as error:
            status, headers = error.code, error.headers
            error.close()
        except urllib.error.URLError as error:
            raise GatewayError(self._describe(error.reason)) from None
        except (OSError, http.client.HTTPException) as error:
            raise GatewayError(self._describe(error)) from None
        if 200 <= status < 300:
            return
        if 400 <= status < 500 and status not in _RETRYABLE_4XX:
            raise PermanentGatewayError(f"HTTP {status}")
        later = retry_after(headers) if status in _RETRY_AFTER_STATUSES else None
        raise GatewayError(f"HTTP {status}", retry_after=later)

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
