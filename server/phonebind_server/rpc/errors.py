"""Domain errors as rich gRPC statuses (AIP-193).

Every error carries google.rpc.ErrorInfo (reason, domain "phonebind.v1",
metadata); bad input adds BadRequest, waiting adds RetryInfo.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..domain import messages
from ..domain.errors import DomainError, Reason

DOMAIN = "phonebind.v1"

STATUS_FOR_REASON: dict[Reason, grpc.StatusCode] = {
    Reason.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.INVALID_PHONE: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.INVALID_ID_NUMBER: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.REQUEST_ID_REUSED: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.CODE_MISMATCH: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.IDENTITY_MISMATCH: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.ACCOUNT_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.REBIND_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.ACCOUNT_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Reason.SAME_PHONE: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.PHONE_IN_USE: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.STEP_REQUIRED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.STEP_NOT_REQUIRED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.STEP_ALREADY_DONE: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.ALREADY_APPROVED_BY_YOU: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.NO_ACTIVE_CODE: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.CODE_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.CODE_ATTEMPTS_EXHAUSTED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.REBIND_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.REBIND_CLOSED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.REBIND_LOCKED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.REVIEW_PENDING: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.RISK_DENIED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.ACCOUNT_LOCKED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.RESEND_TOO_SOON: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.STORE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(max(0, int(seconds * 1000 + 0.999)))
    return duration


def to_status(error: DomainError, language: str = "zh-CN") -> grpc.Status:
    code: grpc.StatusCode = STATUS_FOR_REASON[error.reason]
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason.value, domain=DOMAIN, metadata=error.metadata
            )
        )
    ]
    if error.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    if error.quota:
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=q.subject, description=q.description
                        )
                        for q in error.quota
                    ]
                )
            )
        )
    if error.retry_after is not None:
        details.append(
            _pack(
                error_details_pb2.RetryInfo(
                    retry_delay=_duration(error.retry_after.total_seconds())
                )
            )
        )
    if text := messages.user_message(error.reason.value, error.metadata, language):
        details.append(_pack(error_details_pb2.LocalizedMessage(locale=language, message=text)))
    status = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


# Reasons of failures outside the domain: the caller's credentials, or a fault.
TRANSPORT_REASONS = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "INTERNAL"})


def plain_status(
    code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str] | None = None
) -> grpc.Status:
    """A status for failures outside the domain (internal errors, auth)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {})
    status = status_pb2.Status(code=code.value[0], message=message, details=[_pack(info)])
    return rpc_status.to_status(status)
