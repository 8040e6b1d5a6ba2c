"""The outbox dispatcher: delivers committed messages, at least once.

Messages are written to the outbox in the same transaction as the code or the
change that caused them, so none is lost to a crash. Each server process runs
one dispatcher; several share the table safely because a claim leases rows
(SKIP LOCKED on PostgreSQL). A failed delivery is retried with exponential
backoff and jitter, then dead-lettered (at once when the gateway says the
message itself is refused, PermanentGatewayError). The gateway receives the
message id as its idempotency key, so a redelivery after a crash is not a
second SMS.
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent import futures
from datetime import timedelta

from cryptography.exceptions import InvalidTag

from ..domain.pii import Vault
from ..domain.ports import Clock, StoreUnavailable
from ..metrics import Metrics
from ..store.repository import OutboxItem, PeeweeStore
from .gateways import GatewayError, PermanentGatewayError, SmsGateway

log = logging.getLogger(__name__)


class OutboxDispatcher:
    def __init__(
        self,
        store: PeeweeStore,
        vault: Vault,
        gateway: SmsGateway,
        clock: Clock,
        *,
        max_attempts: int = 8,
        base_delay: timedelta = timedelta(seconds=1),
        max_delay: timedelta = timedelta(minutes=5),
        lease: timedelta = timedelta(seconds=60),
        batch: int = 20,
        poll_seconds: float = 1.0,
        metrics: Metrics | None = None,
        express_threads: int = 4,
    ) -> None:
        self._metrics = metrics
        self._store = store
        self._vault = vault
        self._gateway = gateway
        self._clock = clock
        self._max_attempts = max_attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._lease = lease
        self._batch = batch
        self._poll = poll_seconds
        self._wake = threading.Event()
        # A code is waited for by a person: a few threads deliver new messages
        # at once, so one slow provider call or one busy loop does not queue them.
        self._express = futures.ThreadPoolExecutor(
            max_workers=express_threads, thread_name_prefix="sms"
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._express.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """A new message was committed: deliver one at once on an express thread.

        Each committed message gets its own express delivery, so the loop is left
        to its poll: waking it too cost an empty claim per message (profiled: a
        tenth of the statements of a rebind flow)."""
        if not self._stop.is_set():
            try:
                self._express.submit(self._express_one)
            except RuntimeError:  # shut down meanwhile
                pass

    def wake_loop(self) -> None:
        """Runs the loop's pass (expiry, retries, backlog) now instead of at its next poll."""
        self._wake.set()

    def _express_one(self) -> None:
        try:
            now = self._clock.now()
            for item in self._store.claim_sms(now, limit=1, lease=self._lease, expire=False):
                self._deliver(item)
        except StoreUnavailable:
            pass  # the loop retries once the store is back
        except Exception:
            log.exception("express delivery failed")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                delivered = self.run_once()
            except StoreUnavailable:
                delivered = 0
            except Exception:
                log.exception("outbox pass failed")
                delivered = 0
            if delivered < self._batch:
                self._wake.wait(self._poll)
                self._wake.clear()

    def run_once(self) -> int:
        """Claims and delivers one batch; returns how many were delivered."""
        items = self._store.claim_sms(self._clock.now(), limit=self._batch, lease=self._lease)
        delivered = 0
        for item in items:
            if self._deliver(item):
                delivered += 1
        return delivered

    def _deliver(self, item: OutboxItem) -> bool:
        try:
            to, text = self._vault.unseal(item.to_sealed), self._text(item)
        except (ValueError, InvalidTag) as error:
            # A key no longer configured, or a damaged value: no retry can help.
            reason = f"cannot open the sealed message: {type(error).__name__}"
            self._failed(item, reason, permanent=True)
            return False
        try:
            self._gateway.deliver(
                message_id=item.message_id, to=to, text=text, purpose=item.purpose
            )
        except PermanentGatewayError as error:
            self._failed(item, f"{type(error).__name__}: {error}", permanent=True)
            return False
        except (GatewayError, OSError) as error:
            self._failed(item, f"{type(error).__name__}: {error}")
            return False
        self._store.mark_sms_sent(item.seq, self._clock.now())
        if self._metrics is not None:
            self._metrics.sms_sent.labels(item.purpose).inc()
        log.info(
            "sms delivered",
            extra={"message_id": item.message_id, "to": item.to_masked, "purpose": item.purpose},
        )
        return True

    def _text(self, item: OutboxItem) -> str:
        if item.sealed_text.startswith(self._vault.SEALED_PREFIX):
            return self._vault.unseal(item.sealed_text)
        return item.sealed_text  # queued before outbox texts were sealed

    def _failed(self, item: OutboxItem, error: str, *, permanent: bool = False) -> None:
        dead = permanent or item.attempts >= self._max_attempts
        if self._metrics is not None:
            self._metrics.sms_failed.labels(item.purpose, str(dead).lower()).inc()
        if dead:
            self._store.mark_sms_failed(item.seq, error, retry_at=None)
            log.error(
                "sms dead-lettered",
                extra={
                    "message_id": item.message_id,
                    "to": item.to_masked,
                    "purpose": item.purpose,
                    "attempts": item.attempts,
                    "error": error,
                },
            )
            return
        delay = min(self._max_delay, self._base_delay * 2 ** (item.attempts - 1))
        delay *= random.uniform(0.5, 1.0)  # noqa: S311  # nosec B311  # retry jitter, not a secret
        self._store.mark_sms_failed(item.seq, error, retry_at=self._clock.now() + delay)
        log.warning(
            "sms delivery failed, will retry",
            extra={"message_id": item.message_id, "to": item.to_masked, "error": error},
        )
