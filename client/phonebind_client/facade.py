"""What the blocking and the asyncio client share: settings, metadata, retry decisions."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, Self, TypeVar

import grpc

from .calls import ON_BEHALF_OF, Call, Method
from .errors import PhonebindError
from .retry import Backoff

__all__ = ["ClientBase", "as_method"]

_ChannelT = TypeVar("_ChannelT", bound="_Channel")
_SleepT = TypeVar("_SleepT")
_Function = TypeVar("_Function", bound=Callable[..., Any])

#: gRPC channel arguments, e.g. ``("grpc.ssl_target_name_override", "phonebind.internal")``.
ChannelOptions = Sequence[tuple[str, Any]]


class _Channel(Protocol):
    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
    ) -> Any: ...


class ClientBase(Generic[_ChannelT, _SleepT]):
    """Settings and retry decisions of a phonebind client; subclasses run the calls.

    ``token`` is sent as ``authorization: Bearer <token>`` on every call, after
    ``metadata``. ``timeout`` is the deadline in seconds of each attempt; every
    method takes a ``timeout=`` override. ``credentials`` make the channel a TLS
    one; ``options`` are gRPC channel arguments. When ``channel`` is given it is
    used as is (``target``, ``credentials`` and ``options`` are then not used)
    and ``close()`` leaves it open: it belongs to the caller.

    ``language`` is sent as ``accept-language`` (``"zh-CN"`` or ``"en"``): the
    language of notices, review texts and LocalizedMessage. ``on_behalf_of``
    names the signed-in person a delegating caller (a console) acts for, sent
    as ``x-phonebind-on-behalf-of``; phonebind then records ``<caller>:<person>``
    as the reviewer. ``with_options()`` makes a copy for one person's request.

    Retries (at most ``max_attempts`` attempts in total, waiting through ``sleep``):

    * UNAVAILABLE, DEADLINE_EXCEEDED and CANCELLED (from a server shutting down)
      are retried by the reads (get_account, get_rebind, list_binding_history,
      list_reviews, get_review, list_audit_events, verify_audit_chain)
      and by the calls that carry a request_id
      (register_account, start_rebind, send_code, complete_rebind), which send
      the same request_id on every attempt; a PhonebindError from such a call
      carries that ``request_id``, to retry it later with the same effect;
    * verify_identity, verify_code, cancel_rebind, approve_rebind and
      reject_rebind retry only UNAVAILABLE with ErrorInfo reason
      STORE_UNAVAILABLE from domain "phonebind.v1";
    * nothing else is ever retried.

    The wait before retry ``n`` (0-based) is the server's RetryInfo delay when
    present, else ``random.uniform(0, min(max_backoff, initial_backoff * 2**n))``;
    either is capped at ``max_backoff``.
    """

    def __init__(
        self,
        target: str,
        *,
        channel: _ChannelT | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float = 5.0,
        max_attempts: int = 4,
        initial_backoff: float = 0.1,
        max_backoff: float = 2.0,
        metadata: Sequence[tuple[str, str]] = (),
        options: ChannelOptions = (),
        sleep: _SleepT | None = None,
        language: str | None = None,
        on_behalf_of: str | None = None,
    ) -> None:
        if channel is not None and (credentials is not None or options):
            raise ValueError("pass either channel or credentials and options, not both")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._backoff = Backoff(max_attempts, initial_backoff, max_backoff)
        call_metadata = [(str(key), str(value)) for key, value in metadata]
        if token is not None:
            if any(key.lower() == "authorization" for key, _ in call_metadata):
                raise ValueError("pass the token either as token= or in metadata, not both")
            call_metadata.append(("authorization", f"Bearer {token}"))
        call_metadata = _with_options(call_metadata, language, on_behalf_of)

        self.target = target
        self._owns_channel = channel is None
        self._channel: _ChannelT = (
            channel if channel is not None else self._open_channel(target, credentials, options)
        )
        self._metadata = tuple(call_metadata)
        self._timeout = timeout
        self._sleep: _SleepT = sleep if sleep is not None else self._default_sleep()
        # Multicallables by method name, shared with with_metadata() copies.
        self._rpcs: dict[str, Any] = {}

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: ChannelOptions
    ) -> _ChannelT:
        raise NotImplementedError

    def _default_sleep(self) -> _SleepT:
        raise NotImplementedError

    @property
    def channel(self) -> _ChannelT:
        """The channel the calls go over, e.g. for a health check beside them."""
        return self._channel

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    def with_metadata(self, *pairs: tuple[str, str]) -> Self:
        """A client on this one's channel that also sends ``pairs`` with every call,
        e.g. ``pb.with_metadata(("accept-language", "en"))`` for one user's request,
        or ``("x-request-id", incoming_id)`` to follow a request through the logs.
        Closing it leaves the channel open."""
        added = [(str(key), str(value)) for key, value in pairs]
        keys = {key.lower() for key, _ in self._metadata}
        if "authorization" in keys and any(key.lower() == "authorization" for key, _ in added):
            raise ValueError("this client already sends authorization")
        other = copy.copy(self)
        other._metadata = (*self._metadata, *added)
        other._owns_channel = False
        return other

    def with_options(self, *, language: str | None = None, on_behalf_of: str | None = None) -> Self:
        """A client on this one's channel whose calls go in ``language``
        (accept-language) and/or on behalf of the person ``on_behalf_of``,
        replacing this client's own; e.g. a console's, per signed-in user::

            desk = pb.with_options(language="en", on_behalf_of="alice")
            desk.approve_rebind(rebind_id, note="called the customer back")

        Closing it leaves the channel open."""
        other = copy.copy(self)
        other._metadata = tuple(_with_options(list(self._metadata), language, on_behalf_of))
        other._owns_channel = False
        return other

    def _rpc(self, method: Method[Any, Any]) -> Any:
        """The channel's multicallable for ``method``, made once."""
        rpc = self._rpcs.get(method.name)
        if rpc is None:
            rpc = self._rpcs[method.name] = self._channel.unary_unary(
                method.path,
                request_serializer=method.request_type.SerializeToString,
                response_deserializer=method.response_type.FromString,
            )
        return rpc

    def _deadline(self, call: Call[Any, Any]) -> float:
        return self._timeout if call.timeout is None else call.timeout

    def _retry_delay(self, call: Call[Any, Any], err: grpc.RpcError, attempts_made: int) -> float:
        """How long to wait before sending ``call`` again after ``err``; raises the
        PhonebindError (carrying the call's request_id) when it must not be retried."""
        error = PhonebindError.from_rpc_error(err)
        error.request_id = call.request_id
        delay = self._backoff.delay(attempts_made, error, call.retry)
        if delay is None:
            raise error from err
        return delay


def _with_options(
    metadata: list[tuple[str, str]], language: str | None, on_behalf_of: str | None
) -> list[tuple[str, str]]:
    """``metadata`` with accept-language and the on-behalf-of header set (when given)."""
    replaced = {
        key
        for key, value in (("accept-language", language), (ON_BEHALF_OF, on_behalf_of))
        if value is not None
    }
    kept = [(key, value) for key, value in metadata if key.lower() not in replaced]
    if language is not None:
        kept.append(("accept-language", language))
    if on_behalf_of is not None:
        kept.append((ON_BEHALF_OF, on_behalf_of))
    return kept


def as_method(build: Callable[..., Call[Any, Any]], method: _Function) -> _Function:
    """``method``, named and documented as the call ``build`` describes, for help()."""
    method.__name__ = build.__name__
    method.__qualname__ = build.__name__
    method.__doc__ = build.__doc__
    signature = inspect.signature(build)
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self, *signature.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    return method
