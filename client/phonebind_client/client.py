"""A typed, retrying facade over phonebind's BindingService.

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

Every failure is raised as :class:`~phonebind_client.errors.PhonebindError`.
Retries: see :class:`PhonebindClient`.
"""

from __future__ import annotations

import copy
import enum
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import grpc

from phonebind.v1 import binding_service_pb2 as pb
from phonebind.v1 import binding_service_pb2_grpc, resources_pb2

from .errors import ERROR_DOMAIN, PhonebindError

__all__ = [
    "AccountState",
    "CodeTarget",
    "PhonebindClient",
    "RebindState",
    "RebindStep",
    "RiskDecision",
]

AccountState = resources_pb2.AccountState
CodeTarget = resources_pb2.CodeTarget
RebindState = resources_pb2.RebindState
RebindStep = resources_pb2.RebindStep
RiskDecision = resources_pb2.RiskDecision

_Response = TypeVar("_Response")

_TARGETS: dict[str, int] = {
    "old": resources_pb2.CODE_TARGET_OLD_PHONE,
    "old_phone": resources_pb2.CODE_TARGET_OLD_PHONE,
    "code_target_old_phone": resources_pb2.CODE_TARGET_OLD_PHONE,
    "new": resources_pb2.CODE_TARGET_NEW_PHONE,
    "new_phone": resources_pb2.CODE_TARGET_NEW_PHONE,
    "code_target_new_phone": resources_pb2.CODE_TARGET_NEW_PHONE,
}


class _Retry(enum.Enum):
    """Which failures a method may retry."""

    # Reads and request_id calls: any UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED
    # (the request either did not arrive, changes nothing, or is deduplicated by
    # its request_id, so a retry gets the first attempt's answer if it took
    # effect). CANCELLED comes from the server here (this client never cancels):
    # a draining server's transport drops a few calls it had not yet started.
    REPLAY_SAFE = enum.auto()
    # Calls without request_id whose replay could count twice (an attempt, a
    # cancel): only UNAVAILABLE/STORE_UNAVAILABLE from phonebind itself, which
    # promises that nothing happened.
    STORE_UNAVAILABLE = enum.auto()


def _code_target(target: int | str) -> resources_pb2.CodeTarget:
    """CodeTarget from an enum value or "old"/"new"/"OLD_PHONE"/"NEW_PHONE" (any case)."""
    if isinstance(target, str):
        value = _TARGETS.get(target.strip().lower())
        if value is None:
            raise ValueError(f"unknown code target {target!r}; use 'old' or 'new'")
        return cast("resources_pb2.CodeTarget", value)
    if (
        isinstance(target, int)
        and not isinstance(target, bool)
        and target in (resources_pb2.CODE_TARGET_OLD_PHONE, resources_pb2.CODE_TARGET_NEW_PHONE)
    ):
        return cast("resources_pb2.CodeTarget", int(target))
    raise ValueError(f"unknown code target {target!r}; use CodeTarget.CODE_TARGET_OLD_PHONE/NEW")


class PhonebindClient:
    """Client for phonebind's BindingService.

    ``token`` is sent as ``authorization: Bearer <token>`` on every call, after
    ``metadata``. ``timeout`` is the deadline in seconds of each attempt; every
    method takes a ``timeout=`` override. When ``channel`` is given it is used
    as is (``target`` and ``credentials`` are then not used) and ``close()``
    leaves it open: it belongs to the caller.

    Retries (at most ``max_attempts`` attempts in total, sleeping through
    ``sleep``):

    * UNAVAILABLE, DEADLINE_EXCEEDED and CANCELLED (from a server shutting down)
      are retried by the reads (get_account, get_rebind, list_binding_history)
      and by the calls that carry a request_id
      (register_account, start_rebind, send_code, complete_rebind), which send
      the same request_id on every attempt; a PhonebindError from such a call
      carries that ``request_id``, to retry it later with the same effect;
    * verify_identity, verify_code and cancel_rebind retry only UNAVAILABLE with
      ErrorInfo reason STORE_UNAVAILABLE from domain "phonebind.v1";
    * nothing else is ever retried.

    The wait before retry ``n`` (0-based) is the server's RetryInfo delay when
    present, else ``random.uniform(0, min(max_backoff, initial_backoff * 2**n))``;
    either is capped at ``max_backoff``.
    """

    def __init__(
        self,
        target: str,
        *,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float = 5.0,
        max_attempts: int = 4,
        initial_backoff: float = 0.1,
        max_backoff: float = 2.0,
        metadata: Sequence[tuple[str, str]] = (),
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if channel is not None and credentials is not None:
            raise ValueError("pass either channel or credentials, not both")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if initial_backoff < 0 or max_backoff < 0:
            raise ValueError("backoff must not be negative")
        call_metadata = [(str(key), str(value)) for key, value in metadata]
        if token is not None:
            if any(key.lower() == "authorization" for key, _ in call_metadata):
                raise ValueError("pass the token either as token= or in metadata, not both")
            call_metadata.append(("authorization", f"Bearer {token}"))

        self.target = target
        self._owns_channel = channel is None
        if channel is None:
            if credentials is not None:
                channel = grpc.secure_channel(target, credentials)
            else:
                channel = grpc.insecure_channel(target)
        self._channel = channel
        self._stub = binding_service_pb2_grpc.BindingServiceStub(channel)
        self._metadata = tuple(call_metadata)
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._sleep = sleep

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

    def __repr__(self) -> str:
        return f"PhonebindClient({self.target!r})"

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

    # -- BindingService --------------------------------------------------------

    def register_account(
        self,
        account_id: str,
        holder_name: str,
        id_number: str,
        phone: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> resources_pb2.Account:
        """Record an account's KYC data and first number (idempotent)."""
        request = pb.RegisterAccountRequest(
            account_id=account_id,
            holder_name=holder_name,
            id_number=id_number,
            phone=phone,
            request_id=request_id or _new_request_id(),
        )
        response = self._call(self._stub.RegisterAccount, request, _Retry.REPLAY_SAFE, timeout)
        return response.account

    def get_account(
        self, account_id: str, *, timeout: float | None = None
    ) -> resources_pb2.Account:
        """The account, its masked binding and cool-off hold."""
        request = pb.GetAccountRequest(account_id=account_id)
        response = self._call(self._stub.GetAccount, request, _Retry.REPLAY_SAFE, timeout)
        return response.account

    def start_rebind(
        self,
        account_id: str,
        new_phone: str,
        *,
        old_phone_lost: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> resources_pb2.Rebind:
        """Start moving the account to ``new_phone``."""
        request = pb.StartRebindRequest(
            account_id=account_id,
            new_phone=new_phone,
            old_phone_lost=old_phone_lost,
            request_id=request_id or _new_request_id(),
        )
        response = self._call(self._stub.StartRebind, request, _Retry.REPLAY_SAFE, timeout)
        return response.rebind

    def verify_identity(
        self,
        account_id: str,
        rebind_id: str,
        holder_name: str,
        id_number: str,
        *,
        timeout: float | None = None,
    ) -> resources_pb2.Rebind:
        """Check holder name and ID number against the KYC record."""
        request = pb.VerifyIdentityRequest(
            account_id=account_id,
            rebind_id=rebind_id,
            holder_name=holder_name,
            id_number=id_number,
        )
        response = self._call(self._stub.VerifyIdentity, request, _Retry.STORE_UNAVAILABLE, timeout)
        return response.rebind

    def send_code(
        self,
        account_id: str,
        rebind_id: str,
        target: int | str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.SendCodeResponse:
        """Send a one-time code to the old or new number (``"old"``/``"new"`` or a CodeTarget)."""
        request = pb.SendCodeRequest(
            account_id=account_id,
            rebind_id=rebind_id,
            target=_code_target(target),
            request_id=request_id or _new_request_id(),
        )
        return self._call(self._stub.SendCode, request, _Retry.REPLAY_SAFE, timeout)

    def verify_code(
        self,
        account_id: str,
        rebind_id: str,
        target: int | str,
        code: str,
        *,
        timeout: float | None = None,
    ) -> resources_pb2.Rebind:
        """Check a one-time code the user entered."""
        request = pb.VerifyCodeRequest(
            account_id=account_id,
            rebind_id=rebind_id,
            target=_code_target(target),
            code=code,
        )
        response = self._call(self._stub.VerifyCode, request, _Retry.STORE_UNAVAILABLE, timeout)
        return response.rebind

    def complete_rebind(
        self,
        account_id: str,
        rebind_id: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.CompleteRebindResponse:
        """Apply the change; the response has the closed rebind and the updated account."""
        request = pb.CompleteRebindRequest(
            account_id=account_id,
            rebind_id=rebind_id,
            request_id=request_id or _new_request_id(),
        )
        return self._call(self._stub.CompleteRebind, request, _Retry.REPLAY_SAFE, timeout)

    def cancel_rebind(
        self, account_id: str, rebind_id: str, *, timeout: float | None = None
    ) -> resources_pb2.Rebind:
        """Cancel an open rebind."""
        request = pb.CancelRebindRequest(account_id=account_id, rebind_id=rebind_id)
        response = self._call(self._stub.CancelRebind, request, _Retry.STORE_UNAVAILABLE, timeout)
        return response.rebind

    def get_rebind(
        self, account_id: str, rebind_id: str, *, timeout: float | None = None
    ) -> resources_pb2.Rebind:
        """The rebind with its state, required and completed steps."""
        request = pb.GetRebindRequest(account_id=account_id, rebind_id=rebind_id)
        response = self._call(self._stub.GetRebind, request, _Retry.REPLAY_SAFE, timeout)
        return response.rebind

    def list_binding_history(
        self,
        account_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListBindingHistoryResponse:
        """One page of completed number changes, newest first."""
        request = pb.ListBindingHistoryRequest(
            account_id=account_id, page_size=page_size, page_token=page_token
        )
        return self._call(self._stub.ListBindingHistory, request, _Retry.REPLAY_SAFE, timeout)

    def iter_binding_history(
        self, account_id: str, *, page_size: int = 50, timeout: float | None = None
    ) -> Iterator[resources_pb2.BindingChange]:
        """Every completed number change, newest first, following next_page_token."""
        page_token = ""
        while True:
            page = self.list_binding_history(
                account_id, page_size=page_size, page_token=page_token, timeout=timeout
            )
            yield from page.changes
            if not page.next_page_token or page.next_page_token == page_token:
                return
            page_token = page.next_page_token

    # -- internals -------------------------------------------------------------

    def _call(
        self,
        rpc: Callable[..., _Response],
        request: Any,
        retry: _Retry,
        timeout: float | None,
    ) -> _Response:
        """Invoke ``rpc`` with deadline and metadata, retrying as ``retry`` allows.

        The request object is sent unchanged on every attempt, so a request_id
        stays the same across retries; the error raised carries it.
        """
        deadline = self._timeout if timeout is None else timeout
        attempt = 0
        while True:
            try:
                return rpc(request, timeout=deadline, metadata=self._metadata)
            except grpc.RpcError as err:
                error = PhonebindError.from_rpc_error(err)
                error.request_id = getattr(request, "request_id", None) or None
                attempt += 1
                if attempt >= self._max_attempts or not _retryable(error, retry):
                    raise error from err
                delay = self._backoff(attempt - 1, error)
            self._sleep(delay)

    def _backoff(self, retry_number: int, error: PhonebindError) -> float:
        if error.retry_delay is not None:
            return max(0.0, min(self._max_backoff, error.retry_delay.total_seconds()))
        # The exponent is bounded so a large max_attempts cannot overflow a float.
        ceiling = min(self._max_backoff, self._initial_backoff * 2 ** min(retry_number, 64))
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not a secret


_REPLAY_SAFE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


def _retryable(error: PhonebindError, retry: _Retry) -> bool:
    if retry is _Retry.REPLAY_SAFE:
        return error.code in _REPLAY_SAFE_CODES
    return (
        error.code is grpc.StatusCode.UNAVAILABLE
        and error.reason == "STORE_UNAVAILABLE"
        and error.domain == ERROR_DOMAIN
    )


def _new_request_id() -> str:
    return str(uuid.uuid4())
