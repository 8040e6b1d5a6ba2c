"""The asyncio twin of :class:`phonebind_client.PhonebindClient`, over ``grpc.aio``.

The same methods, arguments, results, errors and retries, awaited::

    async with AsyncPhonebindClient("phonebind:50051", token=TOKEN) as pb:
        rebind = await pb.start_rebind("loan-42", "13900139000")
        await pb.verify_identity("loan-42", rebind.rebind_id, "张三", "11010519491231002X")
        await pb.send_code("loan-42", rebind.rebind_id, "old")
        ...

Like every ``grpc.aio`` object, a client belongs to the event loop it was made
in: make it inside a coroutine (``async with`` does), and use it there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import grpc
import grpc.aio

from phonebind.v1 import audit_service_pb2, resources_pb2, review_service_pb2

from . import calls
from .calls import Call
from .facade import ChannelOptions, ClientBase, as_method
from .tracecontext import with_trace_context

__all__ = ["AsyncPhonebindClient"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

AsyncSleep = Callable[[float], Awaitable[object]]


def _awaitable(
    build: Callable[_P, Call[Any, _T]],
) -> Callable[Concatenate[AsyncPhonebindClient, _P], Coroutine[Any, Any, _T]]:
    """An AsyncPhonebindClient method that runs the call ``build`` describes."""

    async def method(self: AsyncPhonebindClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await self._run(build(*args, **kwargs))

    return as_method(build, method)


class AsyncPhonebindClient(ClientBase[grpc.aio.Channel, AsyncSleep]):
    __doc__ = f"""asyncio client for phonebind's services (``sleep``: asyncio.sleep).

    {ClientBase.__doc__}"""

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: ChannelOptions
    ) -> grpc.aio.Channel:
        if credentials is not None:
            return grpc.aio.secure_channel(target, credentials, options=options)
        return grpc.aio.insecure_channel(target, options=options)

    def _default_sleep(self) -> AsyncSleep:
        return asyncio.sleep

    # -- lifecycle -------------------------------------------------------------

    async def close(self) -> None:
        """Close the channel if this client created it."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- BindingService --------------------------------------------------------

    register_account = _awaitable(calls.register_account)
    get_account = _awaitable(calls.get_account)
    start_rebind = _awaitable(calls.start_rebind)
    verify_identity = _awaitable(calls.verify_identity)
    send_code = _awaitable(calls.send_code)
    verify_code = _awaitable(calls.verify_code)
    complete_rebind = _awaitable(calls.complete_rebind)
    cancel_rebind = _awaitable(calls.cancel_rebind)
    get_rebind = _awaitable(calls.get_rebind)
    list_binding_history = _awaitable(calls.list_binding_history)

    # -- ReviewService ---------------------------------------------------------

    list_reviews = _awaitable(calls.list_reviews)
    get_review = _awaitable(calls.get_review)
    approve_rebind = _awaitable(calls.approve_rebind)
    reject_rebind = _awaitable(calls.reject_rebind)

    # -- AuditService ----------------------------------------------------------

    list_audit_events = _awaitable(calls.list_audit_events)
    verify_audit_chain = _awaitable(calls.verify_audit_chain)

    async def iter_binding_history(
        self, account_id: str, *, page_size: int = 50, timeout: float | None = None
    ) -> AsyncIterator[resources_pb2.BindingChange]:
        """Every completed number change, newest first, following next_page_token."""
        page_token: str | None = ""
        while page_token is not None:
            page = await self.list_binding_history(
                account_id, page_size=page_size, page_token=page_token, timeout=timeout
            )
            for change in page.changes:
                yield change
            page_token = calls.next_page_token(page, page_token)

    async def iter_reviews(
        self,
        *,
        state: int | str = "pending",
        readiness: int | str = "any",
        account_id: str = "",
        page_size: int = 50,
        timeout: float | None = None,
    ) -> AsyncIterator[review_service_pb2.ReviewCase]:
        """Every review of the filters, oldest first, following next_page_token."""
        page_token: str | None = ""
        while page_token is not None:
            page = await self.list_reviews(
                state=state,
                readiness=readiness,
                account_id=account_id,
                page_size=page_size,
                page_token=page_token,
                timeout=timeout,
            )
            for case in page.reviews:
                yield case
            page_token = calls.next_page_token(page, page_token)

    async def iter_audit_events(
        self,
        *,
        account_id: str = "",
        rebind_id: str = "",
        action: str = "",
        page_size: int = 100,
        timeout: float | None = None,
    ) -> AsyncIterator[audit_service_pb2.AuditEvent]:
        """Every audit event of the filters in write order, following next_page_token."""
        page_token: str | None = ""
        while page_token is not None:
            page = await self.list_audit_events(
                account_id=account_id,
                rebind_id=rebind_id,
                action=action,
                page_size=page_size,
                page_token=page_token,
                timeout=timeout,
            )
            for event in page.events:
                yield event
            page_token = calls.next_page_token(page, page_token)

    # -- internals -------------------------------------------------------------

    async def _run(self, call: Call[Any, _T]) -> _T:
        """Send ``call``, retrying as its rule allows; the request object is sent
        unchanged on every attempt, so its request_id stays the same."""
        rpc, timeout, attempts = self._rpc(call.method), self._deadline(call), 0
        metadata = with_trace_context(self._metadata)
        while True:
            attempts += 1
            try:
                return call.result(await rpc(call.request, timeout=timeout, metadata=metadata))
            except grpc.RpcError as err:
                delay = self._retry_delay(call, err, attempts)
            await self._sleep(delay)
