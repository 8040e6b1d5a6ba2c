"""Where SMS go: the provider's webhook (http_gateway.py), or for development
and tests a JSON-lines file or the log.

A gateway delivers one message or raises GatewayError; retries, backoff and
dead-lettering belong to the outbox dispatcher.

Each message comes with its rendered text and with the template it was
rendered from (domain/messages.py): the template id, its language and its
parameters, for providers that send by registered template.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol


class GatewayError(Exception):
    """Delivery failed; the message stays in the outbox for a retry.

    The message is logged: it must never contain the text or the number.
    `retry_after` is the provider's own word on when to try again (its
    Retry-After answer): a delay, or a moment in time.
    """

    def __init__(self, message: str, *, retry_after: timedelta | datetime | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentGatewayError(GatewayError):
    """The provider refused the message itself; the outbox dead-letters it at once."""


@dataclass(frozen=True)
class Sms:
    """One message to deliver: its rendered text, and the template it was
    rendered from (id, language, parameters) for providers that send by
    registered template. `message_id` is stable across retries."""

    message_id: str
    to: str
    text: str
    purpose: str
    template: str = ""
    language: str = ""
    params: Mapping[str, str] = field(default_factory=dict)

    def document(self) -> dict[str, object]:
        """The message as the gateways write and post it."""
        return {
            "message_id": self.message_id,
            "to": self.to,
            "purpose": self.purpose,
            "template": self.template,
            "language": self.language,
            "params": dict(self.params),
            "text": self.text,
        }


class SmsGateway(Protocol):
    name: str
    # False for a gateway whose delivery never waits on the network (a file,
    # the log): the dispatcher then calls it on the event loop itself.
    blocking: bool

    def deliver(self, sms: Sms) -> None: ...


class FileGateway:
    """Appends one JSON object per message, with the fields the http gateway posts:
    {"message_id", "to", "purpose", "template", "language", "params", "text"}.

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

    def deliver(self, sms: Sms) -> None:
        line = json.dumps(sms.document(), ensure_ascii=False)
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

    def deliver(self, sms: Sms) -> None:
        self._log.warning("DEV SMS to %s (%s): %s", sms.to, sms.purpose, sms.text)


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
