"""The interceptors every RPC of phonebind's services passes through, one job each.

They are composed once per method when the server starts (`chain`), outermost
first:

1. `CallContextInterceptor` reads the metadata once: request id (the caller's,
   or a new one, returned in the trailers), language, deadline, peer;
   `ServerSpan` (only with tracing on) makes the call's server span, the child
   of the caller's W3C `traceparent`, current while the call runs;
2. `AccessLog` times the call, writes its log line and records its metrics;
3. `ErrorStatus` turns every failure into a gRPC status with ErrorInfo (sent
   by the first, once the others are done);
4. `RefusalAudit` records refused calls in the audit trail;
5. `Authentication` resolves the caller and checks the role table, before any
   lookup;

and the servicer method then receives the request and one explicit
`CallContext`. Health and reflection are not wrapped: they are public, and
probes should cost nothing.

Composing plain functions once, rather than grpc.aio's interceptor API, costs
no coroutine per interceptor per call, and the chain holds no state between
calls but the Exchange each call carries down.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from itertools import count
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf.message import DecodeError

from ..domain.audit_log import AuditLog
from ..domain.context import CallContext
from ..domain.errors import DomainError, Reason
from ..domain.messages import pick_language
from ..domain.ports import DeadlinePassed, StoreUnavailable
from ..logs import call_var, safe_header
from ..metrics import Metrics
from .auth import AuthError, Credentials, authenticate
from .errors import STATUS_FOR_REASON, plain_status, to_status

log = logging.getLogger("phonebind.rpc")


class Exchange:
    """One call as the chain sees it, filled in on the way down."""

    __slots__ = (
        "caller",
        "context",
        "deadline",
        "failure",
        "language",
        "metadata",
        "method",
        "outcome",
        "request_id",
        "status",
    )

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        self.caller = "unauthenticated"
        self.outcome = "OK"
        self.status = "OK"
        self.request_id = ""
        self.language = "zh-CN"
        self.deadline: float | None = None
        self.metadata: Sequence[tuple[str, str | bytes]] = ()
        # The status a failed call answers, sent once every interceptor is done.
        self.failure: grpc.Status | None = None

    def call(self) -> CallContext:
        return CallContext(
            caller=self.caller,
            method=self.method,
            request_id=self.request_id,
            deadline=self.deadline,
            language=self.language,
        )


Handler = Callable[[Any, Exchange], Awaitable[Any]]
Servicer = Callable[[Any, CallContext], Awaitable[Any]]


# What a request that cannot be parsed becomes: answered after authentication,
# so a stranger's garbage gets UNAUTHENTICATED, and a caller's INVALID_ARGUMENT
# with ErrorInfo rather than INTERNAL.
UNREADABLE = object()


def lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def read(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return UNREADABLE

    return read


# -- 1. the call context ------------------------------------------------------------


class RequestIds:
    """Request ids for calls that bring none: unique per process and cheap
    (a random prefix and a counter; the id is a label, not a secret)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._next = count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._next):016x}"


class CallContextInterceptor:
    def __init__(self) -> None:
        self._ids = RequestIds()
        # Calls under way: a drain that ends with some is not clean.
        self.in_flight = 0

    def wrap(
        self, method: str, inner: Handler
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        new_id = self._ids
        self_ = self

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            exchange = Exchange(method, context)
            metadata = context.invocation_metadata() or ()
            exchange.metadata = metadata
            request_id = language = ""
            for key, value in metadata:
                if key == "x-request-id" and isinstance(value, str):
                    request_id = value
                elif key == "accept-language" and isinstance(value, str):
                    language = value
            exchange.request_id = safe_header(request_id) or new_id()
            if language:
                exchange.language = pick_language(language)
            remaining = context.time_remaining()
            if remaining is not None:
                exchange.deadline = time.monotonic() + remaining
            context.set_trailing_metadata((("x-request-id", exchange.request_id),))
            # The one context variable: log lines written during the call carry its ids.
            token = call_var.set(exchange)
            self_.in_flight += 1
            try:
                response = await inner(request, exchange)
            finally:
                self_.in_flight -= 1
                call_var.reset(token)
            if context.cancelled():
                # Its caller went away (gRPC cancelled the call, whose work the
                # store let end): there is no one left to answer.
                raise asyncio.CancelledError
            failure = exchange.failure
            if failure is not None:
                # An abort replaces the trailers set earlier, and a failed call is
                # the one whose request id matters most. Sent last, so that the
                # call's log line and metrics are written before the caller knows.
                await context.abort(
                    failure.code,
                    failure.details,
                    (*failure.trailing_metadata, ("x-request-id", exchange.request_id)),
                )
            return response

        return handle


# -- tracing (on only when configured) ----------------------------------------------

# Answers that are the server's fault, not the caller's (OpenTelemetry's RPC
# conventions): the span's status is then ERROR.
SERVER_FAULTS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
_TRACE_HEADERS = ("traceparent", "tracestate")


class ServerSpan:
    """A server span per call, named and described as OpenTelemetry's RPC
    conventions say; the caller's `traceparent` (when well formed) is its parent,
    else it starts a trace. Current while the call runs, so that store
    transactions are its children and log lines carry its trace id."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._propagator = TraceContextTextMapPropagator()
        self._root = Context
        self._kind = SpanKind.SERVER
        self._error = lambda outcome: Status(StatusCode.ERROR, outcome)

    def wrap(self, method: str, inner: Handler) -> Handler:
        service, _, name = method[1:].rpartition("/")
        span_name = method[1:]
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        tracer, propagator, root, kind, error = (
            self._tracer,
            self._propagator,
            self._root,
            self._kind,
            self._error,
        )

        async def handle(request: Any, exchange: Exchange) -> Any:
            carrier = {
                key: value
                for key, value in exchange.metadata
                if key in _TRACE_HEADERS and isinstance(value, str)
            }
            parent = propagator.extract(carrier) if carrier else root()
            with tracer.start_as_current_span(
                span_name,
                context=parent,
                kind=kind,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                status = "CANCELLED"
                try:
                    response = await inner(request, exchange)
                    status = exchange.status
                    return response
                finally:
                    code = getattr(grpc.StatusCode, status, grpc.StatusCode.UNKNOWN)
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    span.set_attribute("phonebind.request_id", exchange.request_id)
                    span.set_attribute("phonebind.caller", exchange.caller)
                    if exchange.outcome != "OK":
                        span.set_attribute("phonebind.outcome", exchange.outcome)
                    if status in SERVER_FAULTS:
                        span.set_status(error(exchange.outcome))

        return handle


# -- 2. access log and metrics ------------------------------------------------------


class AccessLog:
    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    def wrap(self, method: str, inner: Handler) -> Handler:
        metrics = self._metrics
        observe = metrics.rpc_observer(method) if metrics is not None else None

        async def handle(request: Any, exchange: Exchange) -> Any:
            started = time.perf_counter()
            try:
                return await inner(request, exchange)
            except asyncio.CancelledError:
                # gRPC cancelled the call before it had an outcome of its own
                # (on SQLite, while it waited for another process's write lock).
                if exchange.outcome == "OK":
                    late = exchange.deadline is not None and time.monotonic() >= exchange.deadline
                    exchange.outcome = exchange.status = (
                        "DEADLINE_EXCEEDED" if late else "CANCELLED"
                    )
                raise
            finally:
                elapsed = time.perf_counter() - started
                if observe is not None:
                    observe(exchange.outcome, exchange.status, elapsed)
                level = logging.INFO if exchange.outcome == "OK" else logging.WARNING
                if log.isEnabledFor(level):
                    log.log(
                        level,
                        "rpc",
                        extra={
                            "method": method,
                            "caller": exchange.caller,
                            "outcome": exchange.outcome,
                            "duration_ms": round(elapsed * 1000, 3),
                        },
                    )

        return handle


# -- 3. errors as statuses ----------------------------------------------------------


class ErrorStatus:
    def wrap(self, method: str, inner: Handler) -> Handler:
        async def handle(request: Any, exchange: Exchange) -> Any:
            try:
                return await inner(request, exchange)
            except AuthError as error:
                outcome = "PERMISSION_DENIED" if error.permission else "UNAUTHENTICATED"
                exchange.outcome = exchange.status = outcome
                status = plain_status(
                    getattr(grpc.StatusCode, outcome), error.message, outcome, error.metadata
                )
            except DomainError as error:
                exchange.outcome = error.reason.value
                exchange.status = STATUS_FOR_REASON[error.reason].name
                status = to_status(error, exchange.language)
            except StoreUnavailable as error:
                # A caller who stopped waiting is not a store fault: its own
                # label, so that alerts on STORE_UNAVAILABLE see only the store.
                gone = isinstance(error, DeadlinePassed)
                exchange.outcome = "DEADLINE_EXCEEDED" if gone else Reason.STORE_UNAVAILABLE.value
                exchange.status = "DEADLINE_EXCEEDED" if gone else "UNAVAILABLE"
                status = to_status(
                    DomainError(
                        Reason.STORE_UNAVAILABLE,
                        "the store is unavailable; retry shortly",
                        retry_after=timedelta(seconds=1),
                    ),
                    exchange.language,
                )
            except Exception:
                exchange.outcome = exchange.status = "INTERNAL"
                log.exception("unhandled error", extra={"method": method})
                status = plain_status(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL")
            exchange.failure = status
            return None

        return handle


# -- 4. refused calls in the audit trail --------------------------------------------

RunInStore = Callable[..., Awaitable[Any]]


class RefusalAudit:
    """A refused call (an authentication or role refusal, or a domain refusal
    whose effects were rolled back) is recorded in the audit trail, whatever
    the caller's deadline; a failure to record it never changes the answer."""

    def __init__(self, audit_log: AuditLog, run: RunInStore) -> None:
        self._audit_log = audit_log
        self._run = run
        # Records whose call was cancelled (its deadline passed) while they
        # waited for the store: held here until written.
        self._unfinished: set[asyncio.Task[None]] = set()

    def wrap(self, method: str, inner: Handler) -> Handler:
        async def handle(request: Any, exchange: Exchange) -> Any:
            try:
                return await inner(request, exchange)
            except AuthError as error:
                reason = "PERMISSION_DENIED" if error.permission else "UNAUTHENTICATED"
                exchange.caller = error.caller
                stranger = "" if error.permission else source_address(exchange.context.peer())
                await self._record(reason, request, exchange, stranger)
                raise
            except DomainError as error:
                if not error.audited and error.reason is not Reason.STORE_UNAVAILABLE:
                    await self._record(error.reason.value, request, exchange, "")
                raise

        return handle

    async def _record(self, reason: str, request: Any, exchange: Exchange, stranger: str) -> None:
        # Shielded: gRPC cancels the handler when the caller's deadline passes,
        # and the record must outlive that.
        record = asyncio.ensure_future(self._write(reason, request, exchange, stranger))
        self._unfinished.add(record)
        record.add_done_callback(self._unfinished.discard)
        await asyncio.shield(record)

    async def _write(self, reason: str, request: Any, exchange: Exchange, stranger: str) -> None:
        try:
            await self._run(
                self._audit_log.refusal,
                exchange.call(),
                reason,
                _plain_id(getattr(request, "account_id", "")),
                _plain_id(getattr(request, "rebind_id", "")),
                stranger,
            )
        except StoreUnavailable:
            log.warning("refusal not audited: store unavailable")
        except Exception as error:  # noqa: BLE001 - the refusal is answered all the same
            log.error("refusal not audited", extra={"error": type(error).__name__})


def _plain_id(value: object) -> str:
    """An id from the request worth recording: short and plain, else nothing."""
    return value if isinstance(value, str) and safe_header(value) == value else ""


def source_address(peer: str) -> str:
    """Where an unauthenticated call came from, as one counted source: the IPv4
    address of gRPC's peer string (`ipv4:10.0.0.7:5123`), or the /64 network of
    an IPv6 one (`ipv6:%5B2001:db8::7%5D:5123`, percent-encoded by gRPC), as a
    single host holds a whole /64; other transports (`unix:`) by their kind."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]") or rest
        try:
            address = ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return host[:64]
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address.is_loopback:
            return str(address)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return kind or "unknown"


# -- 5. authentication --------------------------------------------------------------


class Authentication:
    """Callers are authenticated and checked against the role table before
    the servicer runs, so a refused caller never reaches a lookup."""

    def __init__(self, credentials: Credentials | None) -> None:
        # Replaced whole by a reload; each call reads the one in force as it starts.
        self.credentials = credentials
        # Only a server that knows callers reads the peer's certificate subject.
        self._read_subject = credentials is not None

    def wrap(self, method: str, inner: Handler) -> Handler:
        read_subject = self._read_subject
        self_ = self

        async def handle(request: Any, exchange: Exchange) -> Any:
            subject = ""
            if read_subject:
                subject = exchange.context.auth_context().get("x509_subject", [b""])[0].decode()
            who = authenticate(method, exchange.metadata, subject, self_.credentials)
            exchange.caller = who.name if who is not None else "public"
            return await inner(request, exchange)

        return handle


# -- the servicer at the end of the chain ------------------------------------------


def servicer_call(method: str, servicer: Servicer) -> Handler:
    name = method.rsplit("/", 1)[-1]

    async def handle(request: Any, exchange: Exchange) -> Any:
        if request is UNREADABLE:
            raise DomainError(Reason.INVALID_ARGUMENT, f"the request is not a valid {name} message")
        return await servicer(request, exchange.call())

    return handle


class Chain:
    """The interceptors, in order; `handler` puts one servicer method behind them."""

    def __init__(
        self,
        *,
        credentials: Credentials | None,
        audit_log: AuditLog,
        run: RunInStore,
        metrics: Metrics | None,
        tracer: Any = None,
    ) -> None:
        self._context = CallContextInterceptor()
        self._authentication = Authentication(credentials)
        # Innermost first. Without a tracer there is no span work at all.
        self._inner: tuple[Any, ...] = (
            self._authentication,
            RefusalAudit(audit_log, run),
            ErrorStatus(),
            AccessLog(metrics),
        )
        if tracer is not None:
            self._inner = (*self._inner, ServerSpan(tracer))

    @property
    def in_flight(self) -> int:
        return self._context.in_flight

    @property
    def credentials(self) -> Credentials | None:
        return self._authentication.credentials

    @credentials.setter
    def credentials(self, credentials: Credentials) -> None:
        """Calls that start from now on are authenticated against `credentials`."""
        if self._authentication.credentials is None:
            raise ValueError("a server started without credentials (--dev) keeps none")
        self._authentication.credentials = credentials

    def handler(
        self, method: str, servicer: Servicer
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        handler = servicer_call(method, servicer)
        for interceptor in self._inner:
            handler = interceptor.wrap(method, handler)
        return self._context.wrap(method, handler)
