"""Cross-cutting concerns of every RPC: request ids, access logs, error mapping."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc

from ..domain.audit import CallContext, current_call
from ..domain.errors import DomainError, Reason
from ..domain.messages import pick_language
from ..domain.ports import StoreUnavailable
from ..logs import language_var, request_id_var, safe_header
from .errors import plain_status, to_status

log = logging.getLogger("phonebind.rpc")


RefusalHook = Callable[[str, str, str, str], None]


def _plain_id(value: object) -> str:
    """An id from the request worth recording: short and plain, else nothing."""
    return value if isinstance(value, str) and safe_header(value) == value else ""


class ServerInterceptor(grpc.ServerInterceptor):
    """Wraps each unary handler: request id in, errors out as rich statuses, one log line.

    A refused call (a domain error whose effects were rolled back) is recorded
    in the audit trail through `on_refusal(reason, account_id, rebind_id, caller)`.
    """

    def __init__(self, on_refusal: RefusalHook | None = None) -> None:
        self._on_refusal = on_refusal

    def _record_refusal(self, error: DomainError, request: Any, caller: str) -> None:
        if self._on_refusal is None or error.audited:
            return
        if error.reason is Reason.STORE_UNAVAILABLE:
            return
        try:
            self._on_refusal(
                error.reason.value,
                _plain_id(getattr(request, "account_id", "")),
                _plain_id(getattr(request, "rebind_id", "")),
                caller,
            )
        except StoreUnavailable:
            log.warning("refusal not audited: store unavailable")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        incoming = dict(handler_call_details.invocation_metadata or ())
        behaviour = handler.unary_unary

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            request_id = safe_header(incoming.get("x-request-id", "")) or uuid.uuid4().hex
            token = request_id_var.set(request_id)
            caller = "anonymous"
            call_token = current_call.set(CallContext(caller, method, request_id))
            language = pick_language(incoming.get("accept-language", ""))
            language_token = language_var.set(language)
            context.set_trailing_metadata((("x-request-id", request_id),))
            started = time.perf_counter()
            outcome = "OK"
            try:
                return behaviour(request, context)
            except DomainError as error:
                outcome = error.reason.value
                self._record_refusal(error, request, caller)
                context.abort_with_status(to_status(error, language))
            except StoreUnavailable:
                outcome = Reason.STORE_UNAVAILABLE.value
                context.abort_with_status(
                    to_status(
                        DomainError(
                            Reason.STORE_UNAVAILABLE,
                            "the store is unavailable; retry shortly",
                            retry_after=timedelta(seconds=1),
                        ),
                        language,
                    )
                )
            except Exception:
                if context.code() is not None:  # aborted by a handler on purpose
                    raise
                outcome = "INTERNAL"
                log.exception("unhandled error", extra={"method": method})
                context.abort_with_status(
                    plain_status(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL")
                )
            finally:
                log.info(
                    "rpc",
                    extra={
                        "method": method,
                        "outcome": outcome,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    },
                )
                request_id_var.reset(token)
                current_call.reset(call_token)
                language_var.reset(language_token)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
