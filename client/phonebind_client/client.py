"""A typed, retrying facade over phonebind's services (BindingService,
ReviewService, AuditService).

A complete number change, with every code read from the user::

    with PhonebindClient("phonebind:50051", token=TOKEN) as pb:
        pb.register_account("loan-42", "张三", "11010519491231002X", "13800138000")
        rebind = pb.start_rebind("loan-42", "13900139000")
        pb.verify_identity("loan-42", rebind.rebind_id, "张三", "11010519491231002X")
        pb.send_code("loan-42", rebind.rebind_id, "old")
        pb.send_code("loan-42", rebind.rebind_id, "new")
        pb.verify_code("loan-42", rebind.rebind_id, "old", input("code sent to the old number: "))
        pb.verify_code("loan-42", rebind.rebind_id, "new", input("code sent to the new number: "))
        done = pb.complete_rebind("loan-42", rebind.rebind_id)
        print(done.account.phone_masked, done.account.hold_until.ToDatetime())

A reviewers' console acting for its signed-in person::

    pb = PhonebindClient("phonebind:50051", token=CONSOLE_TOKEN)
    desk = pb.with_options(language="en", on_behalf_of="alice")
    for case in desk.iter_reviews(readiness="ready"):
        print(case.rebind.rebind_id, case.waiting.ToTimedelta(), case.signals)
    desk.approve_rebind(rebind_id, note="called the customer back")

Every failure is raised as :class:`~phonebind_client.errors.PhonebindError`.
Retries: see :class:`PhonebindClient`. The asyncio twin is
:class:`phonebind_client.aio.AsyncPhonebindClient`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import grpc

from phonebind.v1 import audit_service_pb2, resources_pb2, review_service_pb2

from . import calls
from .calls import Call
from .facade import ChannelOptions, ClientBase, as_method
from .tracecontext import with_trace_context

__all__ = [
    "AccountState",
    "CodeTarget",
    "PhonebindClient",
    "RebindState",
    "RebindStep",
    "ReviewReadiness",
    "ReviewState",
    "RiskDecision",
]

AccountState = resources_pb2.AccountState
CodeTarget = resources_pb2.CodeTarget
RebindState = resources_pb2.RebindState
RebindStep = resources_pb2.RebindStep
RiskDecision = resources_pb2.RiskDecision
ReviewState = resources_pb2.ReviewState
ReviewReadiness = review_service_pb2.ReviewReadiness

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _blocking(
    build: Callable[_P, Call[Any, _T]],
) -> Callable[Concatenate[PhonebindClient, _P], _T]:
    """A PhonebindClient method that runs the call ``build`` describes."""

    def method(self: PhonebindClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._run(build(*args, **kwargs))

    return as_method(build, method)


class PhonebindClient(ClientBase[grpc.Channel, Callable[[float], object]]):
    __doc__ = f"""Blocking client for phonebind's services (``sleep``: time.sleep).

    {ClientBase.__doc__}"""

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: ChannelOptions
    ) -> grpc.Channel:
        if credentials is not None:
            return grpc.secure_channel(target, credentials, options=options)
        return grpc.insecure_channel(target, options=options)

    def _default_sleep(self) -> Callable[[float], object]:
        return time.sleep

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the channel if this client created it."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- BindingService --------------------------------------------------------

    register_account = _blocking(calls.register_account)
    get_account = _blocking(calls.get_account)
    start_rebind = _blocking(calls.start_rebind)
    verify_identity = _blocking(calls.verify_identity)
    send_code = _blocking(calls.send_code)
    verify_code = _blocking(calls.verify_code)
    complete_rebind = _blocking(calls.complete_rebind)
    cancel_rebind = _blocking(calls.cancel_rebind)
    get_rebind = _blocking(calls.get_rebind)
    list_binding_history = _blocking(calls.list_binding_history)

    # -- ReviewService ---------------------------------------------------------

    list_reviews = _blocking(calls.list_reviews)
    get_review = _blocking(calls.get_review)
    approve_rebind = _blocking(calls.approve_rebind)
    reject_rebind = _blocking(calls.reject_rebind)

    # -- AuditService ----------------------------------------------------------

    list_audit_events = _blocking(calls.list_audit_events)
    verify_audit_chain = _blocking(calls.verify_audit_chain)

    def iter_binding_history(
        self, account_id: str, *, page_size: int = 50, timeout: float | None = None
    ) -> Iterator[resources_pb2.BindingChange]:
        """Every completed number change, newest first, following next_page_token."""
        page_token: str | None = ""
        while page_token is not None:
            page = self.list_binding_history(
                account_id, page_size=page_size, page_token=page_token, timeout=timeout
            )
            yield from page.changes
            page_token = calls.next_page_token(page, page_token)

    def iter_reviews(
        self,
        *,
        state: int | str = "pending",
        readiness: int | str = "any",
        account_id: str = "",
        page_size: int = 50,
        timeout: float | None = None,
    ) -> Iterator[review_service_pb2.ReviewCase]:
        """Every review of the filters, oldest first, following next_page_token."""
        page_token: str | None = ""
        while page_token is not None:
            page = self.list_reviews(
                state=state,
                readiness=readiness,
                account_id=account_id,
                page_size=page_size,
                page_token=page_token,
                timeout=timeout,
            )
            yield from page.reviews
            page_token = calls.next_page_token(page, page_token)

    def iter_audit_events(
        self,
        *,
        account_id: str = "",
        rebind_id: str = "",
        action: str = "",
        page_size: int = 100,
        timeout: float | None = None,
    ) -> Iterator[audit_service_pb2.AuditEvent]:
        """Every audit event of the filters in write order, following next_page_token."""
        page_token: str | None = ""
        while page_token is not None:
            page = self.list_audit_events(
                account_id=account_id,
                rebind_id=rebind_id,
                action=action,
                page_size=page_size,
                page_token=page_token,
                timeout=timeout,
            )
            yield from page.events
            page_token = calls.next_page_token(page, page_token)

    # -- internals -------------------------------------------------------------

    def _run(self, call: Call[Any, _T]) -> _T:
        """Send ``call``, retrying as its rule allows; the request object is sent
        unchanged on every attempt, so its request_id stays the same."""
        rpc, timeout, attempts = self._rpc(call.method), self._deadline(call), 0
        metadata = with_trace_context(self._metadata)
        while True:
            attempts += 1
            try:
                return call.result(rpc(call.request, timeout=timeout, metadata=metadata))
            except grpc.RpcError as err:
                delay = self._retry_delay(call, err, attempts)
            self._sleep(delay)
