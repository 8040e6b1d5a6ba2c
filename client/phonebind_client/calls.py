"""BindingService calls as data, shared by the blocking and the asyncio client.

Each function here takes a facade method's arguments and returns a :class:`Call`:
the method to invoke, the request (with its AIP-155 ``request_id`` filled in
once, so every retry sends the same one), which failures may be retried, and
how to pick the result out of the response. ``PhonebindClient`` and
``AsyncPhonebindClient`` only execute calls, so both speak the same API with
the same semantics by construction.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from google.protobuf.message import Message

from phonebind.v1 import binding_service_pb2 as pb
from phonebind.v1 import resources_pb2

__all__ = [
    "BINDING_SERVICE",
    "Call",
    "Method",
    "Retry",
    "code_target",
    "new_request_id",
    "next_page_token",
]

_Request = TypeVar("_Request", bound=Message)
_Response = TypeVar("_Response", bound=Message)
_Result = TypeVar("_Result")

BINDING_SERVICE = pb.DESCRIPTOR.services_by_name["BindingService"].full_name


class Retry(enum.Enum):
    """Which failures a call may retry."""

    # Reads and request_id calls: any UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED
    # (the request either did not arrive, changes nothing, or is deduplicated by
    # its request_id, so a retry gets the first attempt's answer if it took
    # effect). CANCELLED comes from the server here (the clients never cancel):
    # a draining server's transport drops a few calls it had not yet started.
    REPLAY_SAFE = enum.auto()
    # Calls without request_id whose replay could count twice (an attempt, a
    # cancel): only UNAVAILABLE/STORE_UNAVAILABLE from phonebind itself, which
    # promises that nothing happened.
    STORE_UNAVAILABLE = enum.auto()


@dataclass(frozen=True, slots=True)
class Method(Generic[_Request, _Response]):
    """One unary BindingService method: its path and message types."""

    name: str
    request_type: type[_Request]
    response_type: type[_Response]

    @property
    def path(self) -> str:
        return f"/{BINDING_SERVICE}/{self.name}"


@dataclass(frozen=True, slots=True)
class Call(Generic[_Response, _Result]):
    """One facade call: what to send, what may be retried, what to return."""

    method: Method[Any, _Response]
    request: Message
    retry: Retry
    result: Callable[[_Response], _Result]
    timeout: float | None  # None: the client's own

    @property
    def request_id(self) -> str | None:
        """The request's AIP-155 request_id; None for calls without one."""
        return cast("str | None", getattr(self.request, "request_id", None)) or None


REGISTER_ACCOUNT = Method("RegisterAccount", pb.RegisterAccountRequest, pb.RegisterAccountResponse)
GET_ACCOUNT = Method("GetAccount", pb.GetAccountRequest, pb.GetAccountResponse)
START_REBIND = Method("StartRebind", pb.StartRebindRequest, pb.StartRebindResponse)
VERIFY_IDENTITY = Method("VerifyIdentity", pb.VerifyIdentityRequest, pb.VerifyIdentityResponse)
SEND_CODE = Method("SendCode", pb.SendCodeRequest, pb.SendCodeResponse)
VERIFY_CODE = Method("VerifyCode", pb.VerifyCodeRequest, pb.VerifyCodeResponse)
COMPLETE_REBIND = Method("CompleteRebind", pb.CompleteRebindRequest, pb.CompleteRebindResponse)
CANCEL_REBIND = Method("CancelRebind", pb.CancelRebindRequest, pb.CancelRebindResponse)
GET_REBIND = Method("GetRebind", pb.GetRebindRequest, pb.GetRebindResponse)
LIST_BINDING_HISTORY = Method(
    "ListBindingHistory", pb.ListBindingHistoryRequest, pb.ListBindingHistoryResponse
)
METHODS = (
    REGISTER_ACCOUNT,
    GET_ACCOUNT,
    START_REBIND,
    VERIFY_IDENTITY,
    SEND_CODE,
    VERIFY_CODE,
    COMPLETE_REBIND,
    CANCEL_REBIND,
    GET_REBIND,
    LIST_BINDING_HISTORY,
)

_TARGETS: dict[str, resources_pb2.CodeTarget] = {
    "old": resources_pb2.CODE_TARGET_OLD_PHONE,
    "old_phone": resources_pb2.CODE_TARGET_OLD_PHONE,
    "code_target_old_phone": resources_pb2.CODE_TARGET_OLD_PHONE,
    "new": resources_pb2.CODE_TARGET_NEW_PHONE,
    "new_phone": resources_pb2.CODE_TARGET_NEW_PHONE,
    "code_target_new_phone": resources_pb2.CODE_TARGET_NEW_PHONE,
}


def code_target(target: int | str) -> resources_pb2.CodeTarget:
    """CodeTarget from an enum value or "old"/"new"/"OLD_PHONE"/"NEW_PHONE" (any case)."""
    if isinstance(target, str):
        value = _TARGETS.get(target.strip().lower())
        if value is None:
            raise ValueError(f"unknown code target {target!r}; use 'old' or 'new'")
        return value
    if (
        isinstance(target, int)
        and not isinstance(target, bool)
        and target in (resources_pb2.CODE_TARGET_OLD_PHONE, resources_pb2.CODE_TARGET_NEW_PHONE)
    ):
        return cast("resources_pb2.CodeTarget", int(target))
    raise ValueError(f"unknown code target {target!r}; use CodeTarget.CODE_TARGET_OLD_PHONE/NEW")


def new_request_id() -> str:
    return str(uuid.uuid4())


def next_page_token(page: pb.ListBindingHistoryResponse, page_token: str) -> str | None:
    """The token of the page after ``page`` (fetched with ``page_token``); None at the end."""
    if not page.next_page_token or page.next_page_token == page_token:
        return None
    return page.next_page_token


# -- the calls, one per facade method ----------------------------------------------------


def register_account(
    account_id: str,
    holder_name: str,
    id_number: str,
    phone: str,
    *,
    request_id: str | None = None,
    timeout: float | None = None,
) -> Call[pb.RegisterAccountResponse, resources_pb2.Account]:
    """Record an account's KYC data and first number (idempotent)."""
    request = pb.RegisterAccountRequest(
        account_id=account_id,
        holder_name=holder_name,
        id_number=id_number,
        phone=phone,
        request_id=request_id or new_request_id(),
    )
    return Call(REGISTER_ACCOUNT, request, Retry.REPLAY_SAFE, lambda r: r.account, timeout)


def get_account(
    account_id: str, *, timeout: float | None = None
) -> Call[pb.GetAccountResponse, resources_pb2.Account]:
    """The account, its masked binding and cool-off hold."""
    request = pb.GetAccountRequest(account_id=account_id)
    return Call(GET_ACCOUNT, request, Retry.REPLAY_SAFE, lambda r: r.account, timeout)


def start_rebind(
    account_id: str,
    new_phone: str,
    *,
    old_phone_lost: bool = False,
    request_id: str | None = None,
    timeout: float | None = None,
) -> Call[pb.StartRebindResponse, resources_pb2.Rebind]:
    """Start moving the account to ``new_phone``."""
    request = pb.StartRebindRequest(
        account_id=account_id,
        new_phone=new_phone,
        old_phone_lost=old_phone_lost,
        request_id=request_id or new_request_id(),
    )
    return Call(START_REBIND, request, Retry.REPLAY_SAFE, lambda r: r.rebind, timeout)


def verify_identity(
    account_id: str,
    rebind_id: str,
    holder_name: str,
    id_number: str,
    *,
    timeout: float | None = None,
) -> Call[pb.VerifyIdentityResponse, resources_pb2.Rebind]:
    """Check holder name and ID number against the KYC record."""
    request = pb.VerifyIdentityRequest(
        account_id=account_id, rebind_id=rebind_id, holder_name=holder_name, id_number=id_number
    )
    return Call(VERIFY_IDENTITY, request, Retry.STORE_UNAVAILABLE, lambda r: r.rebind, timeout)


def _same(response: _Response) -> _Response:
    return response


def send_code(
    account_id: str,
    rebind_id: str,
    target: int | str,
    *,
    request_id: str | None = None,
    timeout: float | None = None,
) -> Call[pb.SendCodeResponse, pb.SendCodeResponse]:
    """Send a one-time code to the old or new number (``"old"``/``"new"`` or a CodeTarget)."""
    request = pb.SendCodeRequest(
        account_id=account_id,
        rebind_id=rebind_id,
        target=code_target(target),
        request_id=request_id or new_request_id(),
    )
    return Call(SEND_CODE, request, Retry.REPLAY_SAFE, _same, timeout)


def verify_code(
    account_id: str,
    rebind_id: str,
    target: int | str,
    code: str,
    *,
    timeout: float | None = None,
) -> Call[pb.VerifyCodeResponse, resources_pb2.Rebind]:
    """Check a one-time code the user entered."""
    request = pb.VerifyCodeRequest(
        account_id=account_id, rebind_id=rebind_id, target=code_target(target), code=code
    )
    return Call(VERIFY_CODE, request, Retry.STORE_UNAVAILABLE, lambda r: r.rebind, timeout)


def complete_rebind(
    account_id: str,
    rebind_id: str,
    *,
    request_id: str | None = None,
    timeout: float | None = None,
) -> Call[pb.CompleteRebindResponse, pb.CompleteRebindResponse]:
    """Apply the change; the response has the closed rebind and the updated account."""
    request = pb.CompleteRebindRequest(
        account_id=account_id, rebind_id=rebind_id, request_id=request_id or new_request_id()
    )
    return Call(COMPLETE_REBIND, request, Retry.REPLAY_SAFE, _same, timeout)


def cancel_rebind(
    account_id: str, rebind_id: str, *, timeout: float | None = None
) -> Call[pb.CancelRebindResponse, resources_pb2.Rebind]:
    """Cancel an open rebind."""
    request = pb.CancelRebindRequest(account_id=account_id, rebind_id=rebind_id)
    return Call(CANCEL_REBIND, request, Retry.STORE_UNAVAILABLE, lambda r: r.rebind, timeout)


def get_rebind(
    account_id: str, rebind_id: str, *, timeout: float | None = None
) -> Call[pb.GetRebindResponse, resources_pb2.Rebind]:
    """The rebind with its state, required and completed steps."""
    request = pb.GetRebindRequest(account_id=account_id, rebind_id=rebind_id)
    return Call(GET_REBIND, request, Retry.REPLAY_SAFE, lambda r: r.rebind, timeout)


def list_binding_history(
    account_id: str,
    *,
    page_size: int = 0,
    page_token: str = "",
    timeout: float | None = None,
) -> Call[pb.ListBindingHistoryResponse, pb.ListBindingHistoryResponse]:
    """One page of completed number changes, newest first."""
    request = pb.ListBindingHistoryRequest(
        account_id=account_id, page_size=page_size, page_token=page_token
    )
    return Call(LIST_BINDING_HISTORY, request, Retry.REPLAY_SAFE, _same, timeout)
