"""Domain errors: one reason code each, free of any transport.

The rpc layer maps each Reason to a gRPC status (rpc/errors.py); the reason
names match phonebind.v1.ErrorReason without its prefix. Messages are shown to
operators, so they never contain a code, a full phone number or an ID number.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import timedelta


class Reason(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    INVALID_PHONE = "INVALID_PHONE"
    INVALID_ID_NUMBER = "INVALID_ID_NUMBER"
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    CODE_MISMATCH = "CODE_MISMATCH"
    IDENTITY_MISMATCH = "IDENTITY_MISMATCH"
    ACCOUNT_NOT_FOUND = "ACCOUNT_NOT_FOUND"
    REBIND_NOT_FOUND = "REBIND_NOT_FOUND"
    ACCOUNT_EXISTS = "ACCOUNT_EXISTS"
    SAME_PHONE = "SAME_PHONE"
    PHONE_IN_USE = "PHONE_IN_USE"
    STEP_REQUIRED = "STEP_REQUIRED"
    STEP_NOT_REQUIRED = "STEP_NOT_REQUIRED"
    STEP_ALREADY_DONE = "STEP_ALREADY_DONE"
    ALREADY_APPROVED_BY_YOU = "ALREADY_APPROVED_BY_YOU"
    NO_ACTIVE_CODE = "NO_ACTIVE_CODE"
    CODE_EXPIRED = "CODE_EXPIRED"
    CODE_ATTEMPTS_EXHAUSTED = "CODE_ATTEMPTS_EXHAUSTED"
    REBIND_EXPIRED = "REBIND_EXPIRED"
    REBIND_CLOSED = "REBIND_CLOSED"
    REBIND_LOCKED = "REBIND_LOCKED"
    REVIEW_PENDING = "REVIEW_PENDING"
    RISK_DENIED = "RISK_DENIED"
    ACCOUNT_LOCKED = "ACCOUNT_LOCKED"
    RESEND_TOO_SOON = "RESEND_TOO_SOON"
    RATE_LIMITED = "RATE_LIMITED"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    subject: str
    description: str


@dataclass
class DomainError(Exception):
    reason: Reason
    message: str
    metadata: dict[str, str] = field(default_factory=dict)
    violations: tuple[FieldViolation, ...] = ()
    retry_after: timedelta | None = None
    quota: tuple[QuotaViolation, ...] = ()
    # True when the failure was already written to the audit trail with its effect.
    audited: bool = False

    def __post_init__(self) -> None:
        super().__init__(f"{self.reason.value}: {self.message}")

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


def invalid(reason: Reason, field_name: str, description: str) -> DomainError:
    """A bad-input error naming the offending request field."""
    return DomainError(reason, description, violations=(FieldViolation(field_name, description),))
