"""Cross-cutting concerns of every RPC: request ids, access logs, error mapping."""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf.message import DecodeError

from ..domain.audit import CallContext, current_call
from ..domain.errors import DomainError, Reason
from ..domain.messages import pick_language
from ..domain.ports import DeadlinePassed, StoreUnavailable, call_deadline
from ..logs import language_var, request_id_var, safe_header
from ..metrics import Metrics
from .auth import PUBLIC_PREFIXES, AuthError, Credentials, authenticate
from .errors import STATUS_FOR_REASON, plain_status, to_status

log = logging.getLogger("phonebind.rpc")


# (reason, account_id, rebind_id, caller, stranger): `stranger` is the source
# address of an unauthenticated call, empty for a known caller.
RefusalHook = Callable[[str, str, str, str, str], None]


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _tagged(status: grpc.Status, request_id: str) -> grpc.Status:
    """The status with the request id in its trailers: an abort replaces the
    trailers set earlier, and a failed call is the one whose id matters most."""
    return _Status(
        status.code,
        status.details,
        (*status.trailing_metadata, ("x-request-id", request_id)),
    )


# What a request that cannot be parsed becomes: the handler wrapper answers it
# after authentication, so a stranger's garbage gets UNAUTHENTICATED, and a
# caller's gets INVALID_ARGUMENT with ErrorInfo rather than INTERNAL.
_UNREADABLE = object()


def _source_address(peer: str) -> str:
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


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def read(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _UNREADABLE

    return read


def _plain_id(value: object) -> str:
    """An id from the request worth recording: short and plain, else nothing."""
    return value if isinstance(value, str) and safe_header(value) == value else ""


class ServerInterceptor(grpc.ServerInterceptor):
    """Wraps each unary handler: who is calling, request id, errors as rich statuses, a log line.

    Callers are authenticated and checked against the role table before the
    handler runs, so a refused caller never reaches a lookup. A refused call
    (a domain error whose effects were rolled back, or an auth refusal) is
    recorded in the audit trail through `on_refusal(reason, account_id,
    rebind_id, caller)`. Public methods (health, reflection) pass untouched.
    """

    def __init__(
        self,
        credentials: Credentials | None = None,
        on_refusal: RefusalHook | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._credentials = credentials
        self._on_refusal = on_refusal
        self._metrics = metrics
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler]] = {}
        # Only a server that asks for client certificates needs the peer's subject.
        self._read_subject = credentials is not None

    def _record_refusal(self, reason: str, request: Any, caller: str, stranger: str = "") -> None:
        if self._on_refusal is None:
            return
        # The refusal is answered whatever the deadline, so its record must not
        # be rolled back for a caller who stopped waiting.
        unbounded = call_deadline.set(None)
        try:
            self._on_refusal(
                reason,
                _plain_id(getattr(request, "account_id", "")),
                _plain_id(getattr(request, "rebind_id", "")),
                caller,
                stranger,
            )
        except StoreUnavailable:
            log.warning("refusal not audited: store unavailable")
        except Exception as error:  # noqa: BLE001 - the refusal is answered all the same
            log.error("refusal not audited", extra={"error": type(error).__name__})
        finally:
            call_deadline.reset(unbounded)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        # One wrapped handler per method, made on its first call: building
        # handler objects on every call showed up in the profile.
        wrapped = self._wrapped.get(method)
        if wrapped is None or wrapped[0] is not handler.unary_unary:
            wrapped = (handler.unary_unary, self._wrap(method, handler))
            self._wrapped[method] = wrapped
        return wrapped[1]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behaviour = handler.unary_unary

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            incoming = dict(context.invocation_metadata())
            request_id = safe_header(incoming.get("x-request-id", "")) or os.urandom(16).hex()
            language = pick_language(incoming.get("accept-language", ""))
            context.set_trailing_metadata((("x-request-id", request_id),))
            started = time.perf_counter()
            tokens = (request_id_var.set(request_id), language_var.set(language))
            caller = "unauthenticated"
            outcome = status = "OK"
            call_token = current_call.set(CallContext(caller, method, request_id))
            remaining = context.time_remaining()
            deadline_token = call_deadline.set(
                None if remaining is None else time.monotonic() + remaining
            )
            try:
                subject = ""
                if self._read_subject and "authorization" not in incoming:
                    subject = context.auth_context().get("x509_subject", [b""])[0].decode()
                who = authenticate(method, incoming, subject, self._credentials)
                caller = who.name if who is not None else "public"
                current_call.set(CallContext(caller, method, request_id))
                if request is _UNREADABLE:
                    raise DomainError(
                        Reason.INVALID_ARGUMENT,
                        f"the request is not a valid {method.rsplit('/', 1)[-1]} message",
                    )
                return behaviour(request, context)
            except AuthError as error:
                outcome = status = "PERMISSION_DENIED" if error.permission else "UNAUTHENTICATED"
                caller = error.caller
                current_call.set(CallContext(caller, method, request_id))
                stranger = "" if error.permission else _source_address(context.peer())
                self._record_refusal(outcome, request, caller, stranger)
                code = getattr(grpc.StatusCode, outcome)
                context.abort_with_status(
                    _tagged(plain_status(code, error.message, outcome), request_id)
                )
            except DomainError as error:
                outcome = error.reason.value
                status = STATUS_FOR_REASON[error.reason].name
                if not error.audited and error.reason is not Reason.STORE_UNAVAILABLE:
                    self._record_refusal(outcome, request, caller)
                context.abort_with_status(_tagged(to_status(error, language), request_id))
            except StoreUnavailable as error:
                # A caller who stopped waiting is not a store fault: its own label,
                # so that alerts on STORE_UNAVAILABLE see only the store.
                gone = isinstance(error, DeadlinePassed)
                outcome = "DEADLINE_EXCEEDED" if gone else Reason.STORE_UNAVAILABLE.value
                status = "DEADLINE_EXCEEDED" if gone else "UNAVAILABLE"
                context.abort_with_status(
                    _tagged(
                        to_status(
                            DomainError(
                                Reason.STORE_UNAVAILABLE,
                                "the store is unavailable; retry shortly",
                                retry_after=timedelta(seconds=1),
                            ),
                            language,
                        ),
                        request_id,
                    )
                )
            except Exception:
                if context.code() is not None:  # aborted by a handler on purpose
                    raise
                outcome = status = "INTERNAL"
                log.exception("unhandled error", extra={"method": method})
                context.abort_with_status(
                    _tagged(
                        plain_status(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL"),
                        request_id,
                    )
                )
            finally:
                elapsed = time.perf_counter() - started
                if self._metrics is not None:
                    self._metrics.observe_rpc(method, outcome, status, elapsed)
                level = logging.INFO if outcome == "OK" else logging.WARNING
                if log.isEnabledFor(level):
                    log.log(
                        level,
                        "rpc",
                        extra={
                            "method": method,
                            "caller": caller,
                            "outcome": outcome,
                            "duration_ms": round(elapsed * 1000, 3),
                        },
                    )
                request_id_var.reset(tokens[0])
                language_var.reset(tokens[1])
                current_call.reset(call_token)
                call_deadline.reset(deadline_token)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
