"""Manual review of risky rebinds: what a reviewer may decide, and when.

A rebind needs review when its risk assessment said REVIEW (which includes a
lost old phone). Approval completes the REVIEW step; the rebind is READY once
its codes are verified too. Rejection closes it. Both need an open, unexpired
rebind, and approval needs the identity step done first: a reviewer vouches
for a person whose KYC answers already matched.
"""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import dataclass
from datetime import datetime

from .audit import AuditEvent, AuditTrail
from .context import CallContext
from .errors import DomainError, Reason, invalid
from .model import Rebind, RebindState, Step
from .policy import Policy
from .ports import Clock, Store, Tx
from .rebind import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    check_rebind_id,
    effective,
    state_for,
    still_open,
)


class ReviewFilter(enum.Enum):
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    # Shown on a rebind that ended undecided; no list is kept of these.
    ABANDONED = "ABANDONED"


@dataclass(frozen=True)
class ReviewPage:
    rebinds: list[Rebind]
    next_cursor: tuple[datetime, str] | None


def _check_text(value: str, field: str, *, required: bool, limit: int) -> str:
    value = unicodedata.normalize("NFC", value).strip()
    if required and not value:
        raise invalid(Reason.INVALID_ARGUMENT, field, f"{field} is required")
    if len(value) > limit or any(unicodedata.category(c).startswith("C") for c in value):
        raise invalid(
            Reason.INVALID_ARGUMENT,
            field,
            f"{field} must be at most {limit} printable characters",
        )
    return value


def review_state(rebind: Rebind, max_failures: int) -> ReviewFilter | None:
    """`rebind` as it stands now (see `effective`): expired when it is."""
    if Step.REVIEW not in rebind.required:
        return None
    if Step.REVIEW in rebind.completed:
        return ReviewFilter.APPROVED
    if rebind.state is RebindState.REJECTED:
        return ReviewFilter.REJECTED
    if not rebind.state.is_open or rebind.failures >= max_failures:
        return ReviewFilter.ABANDONED
    return ReviewFilter.PENDING


class ReviewDesk:
    def __init__(self, store: Store, policy: Policy, clock: Clock, audit: AuditTrail) -> None:
        self._store = store
        self._policy = policy
        self._clock = clock
        self._audit = audit

    def _record(self, tx: Tx, rebind: Rebind, action: str, now: datetime) -> None:
        event = AuditEvent(
            action, "OK", rebind.account_id, rebind.rebind_id, {"reviewer": rebind.reviewer}
        )
        self._audit.append(tx, event, now)

    def list(
        self,
        call: CallContext,
        state: ReviewFilter,
        page_size: int,
        cursor: tuple[datetime, str] | None,
    ) -> ReviewPage:
        if page_size < 0:
            raise invalid(Reason.INVALID_ARGUMENT, "page_size", "page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        now = self._clock.now()
        with self._store.transaction(call, write=False) as tx:
            rows = tx.one(
                tx.rebinds.reviews(
                    state.value,
                    now=now,
                    max_failures=self._policy.rebind_max_failures,
                    after=cursor,
                    limit=size + 1,
                )
            )
        more = len(rows) > size
        rows = [effective(r, now) for r in rows[:size]]
        last = rows[-1] if more and rows else None
        return ReviewPage(rows, None if last is None else (last.created_at, last.rebind_id))

    def get(self, call: CallContext, rebind_id: str) -> Rebind:
        """A rebind that needs (or needed) review, as it stands now."""
        check_rebind_id(rebind_id)
        now = self._clock.now()
        with self._store.transaction(call, write=False) as tx:
            rebind = tx.one(tx.rebinds.get(rebind_id))
        if rebind is None:
            raise DomainError(Reason.REBIND_NOT_FOUND, "no such rebind")
        if Step.REVIEW not in rebind.required:
            raise DomainError(
                Reason.STEP_NOT_REQUIRED,
                "this rebind does not need review",
                metadata={"step": Step.REVIEW.value},
            )
        return effective(rebind, now)

    def _locked(self, tx: Tx, rebind_id: str, now: datetime) -> Rebind:
        """The rebind, reviewable, with its account locked first (the lock order)."""
        _account, rebind = tx.read(
            tx.accounts.of_rebind(rebind_id, lock=True), tx.rebinds.get(rebind_id)
        )
        return self._reviewable(rebind, now)

    def approve(self, call: CallContext, rebind_id: str, reviewer: str, note: str) -> Rebind:
        check_rebind_id(rebind_id)
        reviewer = _check_text(reviewer, "reviewer", required=True, limit=64)
        note = _check_text(note, "note", required=False, limit=500)
        now = self._clock.now()
        with self._store.transaction(call) as tx:
            rebind = self._locked(tx, rebind_id, now)
            if Step.IDENTITY not in rebind.completed:
                raise DomainError(
                    Reason.STEP_REQUIRED,
                    "the identity step must be done before approval",
                    metadata={"missing_steps": Step.IDENTITY.value},
                )
            completed = tuple(
                s for s in rebind.required if s in rebind.completed or s is Step.REVIEW
            )
            approved = rebind.with_changes(
                completed=completed,
                state=state_for(rebind.required, completed),
                reviewer=reviewer,
                review_note=note,
                reviewed_at=now,
                updated_at=now,
            )
            tx.rebinds.save(approved)
            self._record(tx, approved, "REVIEW_APPROVED", now)
            return approved

    def reject(self, call: CallContext, rebind_id: str, reviewer: str, reason: str) -> Rebind:
        check_rebind_id(rebind_id)
        reviewer = _check_text(reviewer, "reviewer", required=True, limit=64)
        reason = _check_text(reason, "reason", required=True, limit=500)
        now = self._clock.now()
        with self._store.transaction(call) as tx:
            rebind = self._locked(tx, rebind_id, now)
            rejected = rebind.with_changes(
                state=RebindState.REJECTED,
                reviewer=reviewer,
                review_note=reason,
                reviewed_at=now,
                updated_at=now,
            )
            tx.rebinds.save(rejected)
            self._record(tx, rejected, "REVIEW_REJECTED", now)
            return rejected

    def _reviewable(self, rebind: Rebind | None, now: datetime) -> Rebind:
        if rebind is None:
            raise DomainError(Reason.REBIND_NOT_FOUND, "no such rebind")
        rebind = still_open(rebind, now, self._policy.rebind_max_failures)
        if Step.REVIEW not in rebind.required:
            raise DomainError(
                Reason.STEP_NOT_REQUIRED,
                "this rebind does not need review",
                metadata={"step": Step.REVIEW.value},
            )
        if Step.REVIEW in rebind.completed:
            raise DomainError(
                Reason.STEP_ALREADY_DONE,
                "this rebind is already approved",
                metadata={"step": Step.REVIEW.value},
            )
        return rebind
