"""Where SMS go: the provider's webhook (http_gateway.py), or for development
and tests a JSON-lines file or the log.

A gateway delivers one message or raises GatewayError; retries, backoff and
dead-lettering belong to the outbox dispatcher.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Protocol


class GatewayError(Exception):
    """Delivery failed; the message stays in the outbox for a retry.

    The message is logged: it must never contain the text or the number.
    """


class PermanentGatewayError(GatewayError):
    """The provider refused the message itself; the outbox dead-letters it at once."""


class SmsGateway(Protocol):
    name: str
    # False for a gateway whose delivery never waits on the network (a file,
    # the log): the dispatcher then calls it on the event loop itself.
    blocking: bool

    def deliver(self, *, message_id: str, to: str, text: str, purpose: str) -> None: ...


class FileGateway:
    """Appends one JSON object per message: {"message_id", "to", "text", "purpose"}.

    The file stands in for the handset: it holds codes, so it belongs in a
    development directory only (production refuses this gateway).
    """

    name = "file"
    blocking = False

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)

    def deliver(self, *, message_id: str, to: str, text: str, purpose: str) -> None:
        line = json.dumps(
            {"message_id": message_id, "to": to, "text": text, "purpose": purpose},
            ensure_ascii=False,
        )
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)


class LogGateway:
    """Writes each message to the `phonebind.sms.dev` logger, codes included.

    For a developer's terminal only; production refuses it.
    """

    name = "log"
    blocking = False

    def __init__(self) -> None:
        self._log = logging.getLogger("phonebind.sms.dev")

    def deliver(self, *, message_id: str, to: str, text: str, purpose: str) -> None:
        self._log.warning("DEV SMS to %s (%s): %s", to, purpose, text)


def gateway_from_spec(
    spec: str, *, http_secret: bytes = b"", http_timeout: float = 5.0
) -> SmsGateway:
    """`http://…` or `https://…` (the provider's webhook), `file:PATH` or `log`."""
    if spec == "log":
        return LogGateway()
    if spec.startswith("file:") and len(spec) > len("file:"):
        return FileGateway(spec[len("file:") :])
    if spec.startswith(("http://", "https://")):
        from .http_gateway import HttpGateway

        return HttpGateway(spec, secret=http_secret, timeout=http_timeout)
    raise ValueError("sms gateway must be http(s)://…, file:PATH or log")
