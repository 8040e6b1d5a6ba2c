"""The outbox dispatcher: delivers committed messages, at least once.

Messages are written to the outbox in the same transaction as the code or the
change that caused them, so none is lost to a crash. A message is queued
leased to the process that queued it (store/repositories.py): once its unit of
work commits, that process delivers it at once (`express`), without a claim.
If the process dies first, the lease runs out and any dispatcher's periodic
pass claims it. A failed delivery is retried with exponential backoff and
jitter, then dead-lettered (at once when the gateway says the message itself
is refused, PermanentGatewayError). A provider that says when to come back
(Retry-After) is asked again then, not sooner, and at most `max_delay` later.
The gateway receives the message id as its idempotency key, so a redelivery
after a crash is not a second SMS.

Everything runs on the server's event loop; a gateway that blocks (an HTTP
call) runs on a few threads of its own, one that does not (a file, the log)
inline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from concurrent import futures
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidTag

from ..domain.model import OutboundSms
from ..domain.pii import OUTBOX_PARAMS, OUTBOX_TEXT, OUTBOX_TO, SealError, Vault
from ..domain.ports import Clock, StoreUnavailable
from ..metrics import Metrics
from ..store.store import OutboxItem, Store
from ..tracing import current_traceparent, link_to
from .gateways import GatewayError, PermanentGatewayError, Sms, SmsGateway

log = logging.getLogger(__name__)


class OutboxDispatcher:
    def __init__(
        self,
        store: Store,
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
        gateway_threads: int = 4,
        tracer: Any = None,
    ) -> None:
        self._metrics = metrics
        # With tracing on, each delivery attempt is a span linked to the RPC that
        # queued the message.
        self._tracer = tracer
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
        self._inline = getattr(gateway, "blocking", True) is False
        self._threads = (
            None
            if self._inline
            else futures.ThreadPoolExecutor(max_workers=gateway_threads, thread_name_prefix="sms")
        )
        self._wake = asyncio.Event()
        # Ids of messages that may or may not have been committed (commit_unknown).
        self._unsure: set[str] = set()
        self._sent: list[str] = []
        self._sent_waiting = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._marker_task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- life -----------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._pass_loop(), name="outbox")
        self._marker_task = asyncio.create_task(self._mark_loop(), name="outbox-sent")

    async def stop(self, timeout: float = 5.0) -> None:
        """Lets deliveries under way (and the pass under way) finish, up to
        `timeout`, and marks what they delivered."""
        self._stopping = True
        self._wake.set()
        running = [t for t in (*self._tasks, self._loop_task) if t is not None and not t.done()]
        if running:
            await asyncio.wait(running, timeout=timeout)
        for task in (self._loop_task, self._marker_task):
            if task is not None:
                task.cancel()
        await self._flush_sent()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- express deliveries -------------------------------------------------------------

    def express(self, messages: list[OutboundSms]) -> None:
        """Messages a unit of work just committed: delivered now (store.on_commit)."""
        if not self._stopping:
            # Called as the unit of work commits, within the queuing RPC's span.
            trace_parent = current_traceparent()
            for message in messages:
                self._spawn(self._deliver_express(message, trace_parent))

    def commit_unknown(self, messages: list[OutboundSms]) -> None:
        """Messages of a unit of work whose COMMIT went unanswered (the database
        went away): if it was committed after all, they are leased to this
        process, so the next pass looks them up by id instead of waiting out the
        lease (store.on_commit_unknown)."""
        self._unsure.update(message.message_id for message in messages)

    async def _deliver_express(self, message: OutboundSms, trace_parent: str = "") -> None:
        item = OutboxItem(
            seq=0,
            message_id=message.message_id,
            to_sealed=message.to.sealed,
            to_masked=message.to.masked,
            purpose=message.purpose,
            sealed_text=message.sealed_text,
            attempts=1,
            trace_parent=trace_parent,
            template=message.template,
            language=message.language,
            sealed_params=message.sealed_params,
        )
        try:
            await self._deliver(item)
        except StoreUnavailable:
            pass  # the lease runs out and a pass delivers it once the store is back
        except Exception:
            log.exception("express delivery failed")

    # -- the periodic pass: expiry, retries, a dead process's messages ------------------

    def wake_loop(self) -> None:
        """Runs the pass (expiry, retries, backlog) now instead of at its next poll."""
        self._wake.set()

    async def _pass_loop(self) -> None:
        while not self._stopping:
            try:
                delivered = await self.run_once()
            except StoreUnavailable:
                delivered = 0
            except Exception:
                log.exception("outbox pass failed")
                delivered = 0
            if delivered < self._batch:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._poll)
                except TimeoutError:
                    pass
                self._wake.clear()

    async def run_once(self) -> int:
        """Claims and delivers one batch; returns how many were delivered."""
        items = []
        if self._unsure:
            unsure = sorted(self._unsure)
            items = await self._store.run(
                self._store.claim_sms_by_id, unsure, self._clock.now(), lease=self._lease
            )
            self._unsure.difference_update(unsure)
        items += await self._store.run(
            self._store.claim_sms, self._clock.now(), limit=self._batch, lease=self._lease
        )
        delivered = 0
        for item in items:
            if await self._deliver(item):
                delivered += 1
        return delivered

    # -- one delivery ---------------------------------------------------------------------

    async def _deliver(self, item: OutboxItem) -> bool:
        if self._tracer is None:
            return await self._attempt(item)
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, Status, StatusCode

        # A trace of its own (the delivery may come much later, in another
        # process), linked to the span of the RPC that queued the message.
        with self._tracer.start_as_current_span(
            "sms.dispatch",
            context=Context(),
            kind=SpanKind.CONSUMER,
            links=link_to(item.trace_parent),
            attributes={
                "phonebind.sms.message_id": item.message_id,
                "phonebind.sms.purpose": item.purpose,
                "phonebind.sms.attempt": item.attempts,
            },
            record_exception=False,
        ) as span:
            delivered = await self._attempt(item)
            if not delivered:
                span.set_status(Status(StatusCode.ERROR, "not delivered"))
            return delivered

    async def _attempt(self, item: OutboxItem) -> bool:
        try:
            to = self._vault.unseal(item.to_sealed, OUTBOX_TO.at(item.message_id))
            text = self._vault.unseal(item.sealed_text, OUTBOX_TEXT.at(item.message_id))
            params = self._params(item)
        except (ValueError, InvalidTag) as error:
            # A key no longer configured, or a damaged value: no retry can help.
            # A SealError names the place and the key id, never the value.
            why = str(error) if isinstance(error, SealError) else type(error).__name__
            reason = f"cannot open the sealed message: {why}"[:256]
            await self._failed(item, reason, permanent=True)
            return False
        sms = Sms(item.message_id, to, text, item.purpose, item.template, item.language, params)
        send: Callable[[], None] = lambda: self._gateway.deliver(sms)  # noqa: E731
        try:
            if self._threads is None:
                send()
            else:
                await asyncio.get_running_loop().run_in_executor(self._threads, send)
        except PermanentGatewayError as error:
            await self._failed(item, f"{type(error).__name__}: {error}", permanent=True)
            return False
        except GatewayError as error:
            reason = f"{type(error).__name__}: {error}"
            await self._failed(item, reason, retry_after=error.retry_after)
            return False
        except OSError as error:
            await self._failed(item, f"{type(error).__name__}: {error}")
            return False
        self._sent.append(item.message_id)
        self._sent_waiting.set()
        if self._metrics is not None:
            self._metrics.sms_sent.labels(item.purpose).inc()
        log.info(
            "sms delivered",
            extra={"message_id": item.message_id, "to": item.to_masked, "purpose": item.purpose},
        )
        return True

    async def _mark_loop(self) -> None:
        # Deliveries are marked SENT together: one unit of work for all those
        # done since the last one.
        while True:
            await self._sent_waiting.wait()
            self._sent_waiting.clear()
            try:
                await self._flush_sent()
            except StoreUnavailable:
                await asyncio.sleep(self._poll)
                self._sent_waiting.set()
            except Exception:
                log.exception("marking delivered messages failed")
                await asyncio.sleep(self._poll)

    async def _flush_sent(self) -> None:
        sent, self._sent = self._sent, []
        if not sent:
            return
        try:
            await self._store.run(self._store.mark_sms_sent, sent, self._clock.now())
        except BaseException:
            self._sent[:0] = sent  # marked on the next try
            raise

    def _params(self, item: OutboxItem) -> dict[str, str]:
        if not item.sealed_params:
            return {}  # queued before templates
        sealed = item.sealed_params
        params = json.loads(self._vault.unseal(sealed, OUTBOX_PARAMS.at(item.message_id)))
        if not isinstance(params, dict):
            raise ValueError("the template parameters are not an object")
        return {str(name): str(value) for name, value in params.items()}

    def _retry_delay(self, attempts: int, retry_after: timedelta | datetime | None) -> timedelta:
        """Exponential backoff with jitter; a provider's Retry-After, when it
        gave one, instead (never more than max_delay)."""
        if retry_after is not None:
            if isinstance(retry_after, datetime):
                retry_after = retry_after - self._clock.now()
            return max(timedelta(0), min(self._max_delay, retry_after))
        delay = min(self._max_delay, self._base_delay * 2 ** (attempts - 1))
        return delay * random.uniform(0.5, 1.0)  # noqa: S311  # nosec B311  # retry jitter, not a secret

    async def _failed(
        self,
        item: OutboxItem,
        error: str,
        *,
        permanent: bool = False,
        retry_after: timedelta | datetime | None = None,
    ) -> None:
        dead = permanent or item.attempts >= self._max_attempts
        if self._metrics is not None:
            self._metrics.sms_failed.labels(item.purpose, str(dead).lower()).inc()
        if dead:
            await self._store.run(
                self._store.mark_sms_failed, item.message_id, error, retry_at=None
            )
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
        delay = self._retry_delay(item.attempts, retry_after)
        await self._store.run(
            self._store.mark_sms_failed,
            item.message_id,
            error,
            retry_at=self._clock.now() + delay,
        )
        log.warning(
            "sms delivery failed, will retry",
            extra={"message_id": item.message_id, "to": item.to_masked, "error": error},
        )
