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

from phonebind.v1 import resources_pb2

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
    __doc__ = f"""asyncio client for phonebind's BindingService (``sleep``: asyncio.sleep).

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
