"""The entities of the rebind flow, as the domain sees them.

Personal data appears here only as keyed hashes, sealed (encrypted) numbers and
masked forms: the domain never holds a clear phone number longer than one call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any


class RebindState(enum.Enum):
    PENDING = "PENDING"
    AWAITING_REVIEW = "AWAITING_REVIEW"
    READY = "READY"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"
    REJECTED = "REJECTED"

    @property
    def is_open(self) -> bool:
        return self in OPEN_STATES


OPEN_STATES = frozenset({RebindState.PENDING, RebindState.AWAITING_REVIEW, RebindState.READY})


class Step(enum.Enum):
    IDENTITY = "IDENTITY"
    OLD_PHONE_CODE = "OLD_PHONE_CODE"
    NEW_PHONE_CODE = "NEW_PHONE_CODE"
    REVIEW = "REVIEW"


class CodeTarget(enum.Enum):
    OLD_PHONE = "OLD_PHONE"
    NEW_PHONE = "NEW_PHONE"

    @property
    def step(self) -> Step:
        return Step.OLD_PHONE_CODE if self is CodeTarget.OLD_PHONE else Step.NEW_PHONE_CODE


class RiskDecision(enum.Enum):
    ALLOW = "ALLOW"
    REVIEW = "REVIEW"
    DENY = "DENY"


class ChallengeState(enum.Enum):
    LIVE = "LIVE"
    USED = "USED"
    BURNT = "BURNT"


@dataclass(frozen=True)
class RiskAssessment:
    decision: RiskDecision
    score: int
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class SealedPhone:
    """A phone number as the store keeps it: blind index, ciphertext, mask."""

    index: str
    sealed: str
    masked: str


class Standing(enum.Enum):
    """How an account stands for lending services at a given moment."""

    ACTIVE = "ACTIVE"
    # Inside the cool-off hold after a number change.
    COOL_OFF = "COOL_OFF"
    # Rebinding locked after repeated identity failures (the binding works).
    REBIND_LOCKED = "REBIND_LOCKED"


@dataclass(frozen=True)
class Account:
    account_id: str
    phone: SealedPhone
    holder_name_hash: str
    holder_name_masked: str
    id_number_hash: str
    id_number_masked: str
    id_province: str
    bound_at: datetime
    created_at: datetime
    hold_until: datetime | None = None
    # Rebinding (not the binding) is locked until then after identity failures.
    rebind_locked_until: datetime | None = None

    def with_changes(self, **changes: Any) -> Account:
        return replace(self, **changes)

    def hold_at(self, now: datetime) -> datetime | None:
        """The end of the cool-off hold while it lasts, else None: the one field
        lending services read, set also while a rebind lock takes the standing."""
        return self.hold_until if self.hold_until is not None and self.hold_until > now else None

    def rebind_locked_at(self, now: datetime) -> bool:
        return self.rebind_locked_until is not None and now < self.rebind_locked_until

    def standing_at(self, now: datetime) -> Standing:
        if self.rebind_locked_at(now):
            return Standing.REBIND_LOCKED
        if self.hold_at(now) is not None:
            return Standing.COOL_OFF
        return Standing.ACTIVE


@dataclass(frozen=True)
class Approval:
    """One reviewer's approval of a rebind."""

    reviewer: str
    note: str
    at: datetime


@dataclass(frozen=True)
class Rebind:
    rebind_id: str
    account_id: str
    state: RebindState
    new_phone: SealedPhone
    old_phone_lost: bool
    required: tuple[Step, ...]
    completed: tuple[Step, ...]
    risk: RiskAssessment
    failures: int
    created_at: datetime
    expires_at: datetime
    updated_at: datetime
    completed_at: datetime | None = None
    # The decision: the reviewer who approved last or rejected, and when.
    reviewer: str = ""
    review_note: str = ""
    reviewed_at: datetime | None = None
    # The number bound when the rebind started, masked ("" for rebinds from
    # before it was recorded).
    old_phone_masked: str = ""
    # When each completed step was done (steps done before times were kept
    # have none).
    step_times: tuple[tuple[Step, datetime], ...] = ()
    # Every approval so far, oldest first (two for a two-reviewer rebind).
    approvals: tuple[Approval, ...] = ()

    def step_time(self, step: Step) -> datetime | None:
        return next((at for done, at in self.step_times if done is step), None)

    def with_step_done(self, step: Step, at: datetime) -> Rebind:
        """The rebind with `step` completed at `at` (its state to be set by the caller)."""
        completed = tuple(s for s in self.required if s in self.completed or s is step)
        times = (*((s, t) for s, t in self.step_times if s is not step), (step, at))
        return replace(self, completed=completed, step_times=times)

    @property
    def outstanding(self) -> tuple[Step, ...]:
        return tuple(s for s in self.required if s not in self.completed)

    @property
    def needs_review(self) -> bool:
        """A reviewer's approval is required and not given yet."""
        return Step.REVIEW in self.required and Step.REVIEW not in self.completed

    def attempts_left(self, max_failures: int) -> int:
        """Wrong codes and identity answers left before the rebind locks."""
        return max(0, max_failures - self.failures)

    def locked(self, max_failures: int) -> bool:
        return self.failures >= max_failures

    def with_changes(self, **changes: Any) -> Rebind:
        return replace(self, **changes)


@dataclass(frozen=True)
class ReviewFacts:
    """A rebind that needs review, its account and the account's recent
    completed changes, as one read gives them."""

    rebind: Rebind
    account: Account
    changes_30_days: int
    changes_365_days: int


@dataclass(frozen=True)
class Challenge:
    """The one live one-time code of a rebind and target (only its MAC is kept)."""

    rebind_id: str
    target: CodeTarget
    code_mac: str
    state: ChallengeState
    attempts: int
    created_at: datetime
    expires_at: datetime
    resend_at: datetime

    def with_changes(self, **changes: Any) -> Challenge:
        return replace(self, **changes)


@dataclass(frozen=True)
class BindingChange:
    rebind_id: str
    account_id: str
    old_phone: SealedPhone
    new_phone: SealedPhone
    old_phone_lost: bool
    completed_at: datetime


@dataclass(frozen=True)
class OutboundSms:
    """A message queued in the outbox in the same transaction as its cause."""

    message_id: str
    to: SealedPhone
    purpose: str
    # Sealed like a number: a code in it must not sit in the table in clear.
    sealed_text: str
    created_at: datetime
    not_after: datetime | None = None
    account_id: str = ""
    rebind_id: str = ""
    # The template the text was rendered from, its language, and its
    # parameters as a sealed JSON object of strings (they may hold the code).
    template: str = ""
    language: str = ""
    sealed_params: str = ""


@dataclass(frozen=True)
class IdempotencyRecord:
    """The remembered outcome of a mutating call, keyed by its request_id."""

    operation: str
    account_id: str
    request_id: str
    fingerprint: str
    result: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
