"""phonebind's calls as data, shared by the blocking and the asyncio client.

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
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar, cast

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from phonebind.v1 import audit_service_pb2 as audit_pb
from phonebind.v1 import binding_service_pb2 as pb
from phonebind.v1 import resources_pb2
from phonebind.v1 import review_service_pb2 as review_pb

__all__ = [
    "AUDIT_SERVICE",
    "BINDING_SERVICE",
    "ON_BEHALF_OF",
    "REVIEW_SERVICE",
    "Call",
    "Method",
    "Retry",
    "code_target",
    "new_request_id",
    "next_page_token",
    "review_readiness",
    "review_state",
]

_Request = TypeVar("_Request", bound=Message)
_Response = TypeVar("_Response", bound=Message)
_Result = TypeVar("_Result")

BINDING_SERVICE = pb.DESCRIPTOR.services_by_name["BindingService"].full_name
REVIEW_SERVICE = review_pb.DESCRIPTOR.services_by_name["ReviewService"].full_name
AUDIT_SERVICE = audit_pb.DESCRIPTOR.services_by_name["AuditService"].full_name

#: The header in which a delegating caller (a console) names the person it acts for.
ON_BEHALF_OF = "x-phonebind-on-behalf-of"


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
    """One unary method of a phonebind service: its path and message types."""

    name: str
    request_type: type[_Request]
    response_type: type[_Response]
    service: str = BINDING_SERVICE

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


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
LIST_REVIEWS = Method(
    "ListReviews", review_pb.ListReviewsRequest, review_pb.ListReviewsResponse, REVIEW_SERVICE
)
GET_REVIEW = Method(
    "GetReview", review_pb.GetReviewRequest, review_pb.GetReviewResponse, REVIEW_SERVICE
)
APPROVE_REBIND = Method(
    "ApproveRebind",
    review_pb.ApproveRebindRequest,
    review_pb.ApproveRebindResponse,
    REVIEW_SERVICE,
)
REJECT_REBIND = Method(
    "RejectRebind", review_pb.RejectRebindRequest, review_pb.RejectRebindResponse, REVIEW_SERVICE
)
LIST_AUDIT_EVENTS = Method(
    "ListAuditEvents",
    audit_pb.ListAuditEventsRequest,
    audit_pb.ListAuditEventsResponse,
    AUDIT_SERVICE,
)
VERIFY_AUDIT_CHAIN = Method(
    "VerifyAuditChain",
    audit_pb.VerifyAuditChainRequest,
    audit_pb.VerifyAuditChainResponse,
    AUDIT_SERVICE,
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
    LIST_REVIEWS,
    GET_REVIEW,
    APPROVE_REBIND,
    REJECT_REBIND,
    LIST_AUDIT_EVENTS,
    VERIFY_AUDIT_CHAIN,
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


_STATES: dict[str, resources_pb2.ReviewState] = {
    "pending": resources_pb2.REVIEW_STATE_PENDING,
    "approved": resources_pb2.REVIEW_STATE_APPROVED,
    "rejected": resources_pb2.REVIEW_STATE_REJECTED,
}
_READINESS: dict[str, review_pb.ReviewReadiness] = {
    "any": review_pb.REVIEW_READINESS_UNSPECIFIED,
    "ready": review_pb.REVIEW_READINESS_READY,
    "waiting": review_pb.REVIEW_READINESS_WAITING_ON_CUSTOMER,
    "waiting_on_customer": review_pb.REVIEW_READINESS_WAITING_ON_CUSTOMER,
}


def _enum_value(value: int | str, names: dict[str, Any], prefix: str, what: str) -> Any:
    if isinstance(value, str):
        key = value.strip().lower().removeprefix(prefix)
        if key in names:
            return names[key]
    elif isinstance(value, int) and not isinstance(value, bool) and value in names.values():
        return value
    raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(names)}")


def review_state(state: int | str) -> resources_pb2.ReviewState:
    """ReviewState from an enum value or "pending"/"approved"/"rejected" (any case)."""
    return cast(
        "resources_pb2.ReviewState", _enum_value(state, _STATES, "review_state_", "review state")
    )


def review_readiness(readiness: int | str) -> review_pb.ReviewReadiness:
    """ReviewReadiness from an enum value or "any"/"ready"/"waiting" (any case)."""
    return cast(
        "review_pb.ReviewReadiness",
        _enum_value(readiness, _READINESS, "review_readiness_", "readiness"),
    )


def new_request_id() -> str:
    return str(uuid.uuid4())


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


def next_page_token(page: _Page, page_token: str) -> str | None:
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


# -- ReviewService: the reviewer's desk ---------------------------------------------------


def list_reviews(
    *,
    state: int | str = "pending",
    readiness: int | str = "any",
    account_id: str = "",
    page_size: int = 0,
    page_token: str = "",
    timeout: float | None = None,
) -> Call[review_pb.ListReviewsResponse, review_pb.ListReviewsResponse]:
    """One page of reviews, oldest first: ``state`` "pending", "approved" or "rejected";
    ``readiness`` (pending only) "ready" for a decision, "waiting" on the customer, or "any"."""
    request = review_pb.ListReviewsRequest(
        state=review_state(state),
        readiness=review_readiness(readiness),
        account_id=account_id,
        page_size=page_size,
        page_token=page_token,
    )
    return Call(LIST_REVIEWS, request, Retry.REPLAY_SAFE, _same, timeout)


def get_review(
    rebind_id: str, *, timeout: float | None = None
) -> Call[review_pb.GetReviewResponse, review_pb.ReviewCase]:
    """A rebind that needs (or needed) review, with the facts to decide it."""
    request = review_pb.GetReviewRequest(rebind_id=rebind_id)
    return Call(GET_REVIEW, request, Retry.REPLAY_SAFE, lambda r: r.review, timeout)


def approve_rebind(
    rebind_id: str, *, note: str = "", timeout: float | None = None
) -> Call[review_pb.ApproveRebindResponse, review_pb.ReviewCase]:
    """Approve as the calling reviewer (or the person given with ``on_behalf_of``)."""
    request = review_pb.ApproveRebindRequest(rebind_id=rebind_id, note=note)
    return Call(APPROVE_REBIND, request, Retry.STORE_UNAVAILABLE, lambda r: r.review, timeout)


def reject_rebind(
    rebind_id: str, reason: str, *, timeout: float | None = None
) -> Call[review_pb.RejectRebindResponse, review_pb.ReviewCase]:
    """Reject as the calling reviewer; ``reason`` (the note) is required."""
    request = review_pb.RejectRebindRequest(rebind_id=rebind_id, reason=reason)
    return Call(REJECT_REBIND, request, Retry.STORE_UNAVAILABLE, lambda r: r.review, timeout)


# -- AuditService: the trail ---------------------------------------------------------------


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def list_audit_events(
    *,
    account_id: str = "",
    rebind_id: str = "",
    action: str = "",
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    page_size: int = 0,
    page_token: str = "",
    timeout: float | None = None,
) -> Call[audit_pb.ListAuditEventsResponse, audit_pb.ListAuditEventsResponse]:
    """One page of audit events in the order they were written; empty filters match any."""
    request = audit_pb.ListAuditEventsRequest(
        account_id=account_id,
        rebind_id=rebind_id,
        action=action,
        start_time=_timestamp(start_time),
        end_time=_timestamp(end_time),
        page_size=page_size,
        page_token=page_token,
    )
    return Call(LIST_AUDIT_EVENTS, request, Retry.REPLAY_SAFE, _same, timeout)


def verify_audit_chain(
    *, account_id: str = "", timeout: float | None = None
) -> Call[audit_pb.VerifyAuditChainResponse, audit_pb.VerifyAuditChainResponse]:
    """Recompute the audit chains (one account's, or all) and report every break."""
    request = audit_pb.VerifyAuditChainRequest(account_id=account_id)
    return Call(VERIFY_AUDIT_CHAIN, request, Retry.REPLAY_SAFE, _same, timeout)
