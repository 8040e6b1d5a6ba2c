"""Manual review of risky rebinds: what a reviewer may decide, and when.

A rebind needs review when its risk assessment said REVIEW (which includes a
lost old phone). Approval completes the REVIEW step; the rebind is READY once
its codes are verified too. Rejection closes it. Both need an open, unexpired
rebind, and approval needs the identity step done first: a reviewer vouches
for a person whose KYC answers already matched.

The reviewer is always the authenticated caller of the call context (a
delegating console's is "<caller>:<person>"), never something a request says.
When the policy asks for two reviewers of a lost-phone rebind, the first
approval is kept and the REVIEW step stays outstanding until a different
reviewer approves.

The desk's lists and views carry what a reviewer needs to decide (`ReviewCase`):
the masked account, the risk signals, the account's recent changes, which
steps were done and when, and how long the review has waited.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from .audit import AuditEvent, AuditTrail
from .context import CallContext
from .errors import DomainError, Reason, invalid
from .model import Account, Approval, Rebind, RebindState, ReviewFacts, Step
from .policy import Policy
from .ports import Clock, Store, Tx
from .rebind import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    check_account_id,
    check_rebind_id,
    effective,
    state_for,
    still_open,
)
from .risk import signal_weight
from .unit_of_work import run_unit


class ReviewFilter(enum.Enum):
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    # Shown on a rebind that ended undecided; no list is kept of these.
    ABANDONED = "ABANDONED"


class Readiness(enum.Enum):
    """Where a pending review stands with respect to the customer's steps."""

    ANY = "ANY"
    # Every other required step is done: only the decision is missing.
    READY = "READY"
    # The customer still has steps to do.
    WAITING = "WAITING"


# The windows of the recent-changes counts a reviewer sees.
RECENT_WINDOWS = (timedelta(days=30), timedelta(days=365))

# How each step is done, as a stable code.
STEP_METHODS = {
    Step.IDENTITY: "KYC_MATCH",
    Step.OLD_PHONE_CODE: "SMS_CODE_OLD_NUMBER",
    Step.NEW_PHONE_CODE: "SMS_CODE_NEW_NUMBER",
    Step.REVIEW: "REVIEWER_APPROVAL",
}


@dataclass(frozen=True)
class StepDone:
    step: Step
    method: str
    at: datetime | None


@dataclass(frozen=True)
class ReviewCase:
    """A rebind needing review with what a reviewer needs to decide it."""

    rebind: Rebind
    account: Account
    readiness: Readiness | None  # None once no longer pending
    signals: tuple[tuple[str, int], ...]  # (code, weight)
    changes_30_days: int
    changes_365_days: int
    steps: tuple[StepDone, ...]
    waiting_since: datetime
    waiting: timedelta | None  # None once decided or closed
    approvals_required: int
    # The moment the case describes.
    as_of: datetime


@dataclass(frozen=True)
class ReviewPage:
    cases: list[ReviewCase]
    next_cursor: tuple[datetime, str] | None


def review_case(facts: ReviewFacts, policy: Policy, now: datetime) -> ReviewCase:
    """The case as it stands at `now`."""
    rebind = effective(facts.rebind, now)
    pending = review_state(rebind, policy.rebind_max_failures) is ReviewFilter.PENDING
    readiness = None
    if pending:
        ready = rebind.state is RebindState.AWAITING_REVIEW
        readiness = Readiness.READY if ready else Readiness.WAITING
    customer_times = [at for step, at in rebind.step_times if step is not Step.REVIEW]
    waiting_since = rebind.created_at
    if readiness is Readiness.READY and customer_times:
        waiting_since = max(customer_times)
    return ReviewCase(
        rebind=rebind,
        account=facts.account,
        readiness=readiness,
        signals=tuple((code, signal_weight(code)) for code in rebind.risk.reasons),
        changes_30_days=facts.changes_30_days,
        changes_365_days=facts.changes_365_days,
        steps=tuple(
            StepDone(step, STEP_METHODS[step], rebind.step_time(step))
            for step in rebind.required
            if step in rebind.completed
        ),
        waiting_since=waiting_since,
        waiting=max(timedelta(0), now - waiting_since) if pending else None,
        approvals_required=policy.approvals_required(rebind.old_phone_lost),
        as_of=now,
    )


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

    def _record(self, tx: Tx, rebind: Rebind, action: str, reviewer: str, now: datetime) -> None:
        details = {"reviewer": reviewer}
        if action != "REVIEW_REJECTED":
            details["approvals"] = (
                f"{len(rebind.approvals)}/{self._policy.approvals_required(rebind.old_phone_lost)}"
            )
        event = AuditEvent(action, "OK", rebind.account_id, rebind.rebind_id, details)
        self._audit.append(tx, event, now)

    def _windows(self, now: datetime) -> tuple[datetime, datetime]:
        return (now - RECENT_WINDOWS[0], now - RECENT_WINDOWS[1])

    def _case(self, tx: Tx, rebind_id: str, now: datetime) -> ReviewCase:
        facts = tx.one(tx.rebinds.review(rebind_id, windows=self._windows(now)))
        if facts is None:  # pragma: no cover - read in the transaction that found it
            raise DomainError(Reason.REBIND_NOT_FOUND, "no such rebind")
        return review_case(facts, self._policy, now)

    def list(
        self,
        call: CallContext,
        state: ReviewFilter,
        page_size: int,
        cursor: tuple[datetime, str] | None,
        *,
        readiness: Readiness = Readiness.ANY,
        account_id: str = "",
    ) -> ReviewPage:
        if page_size < 0:
            raise invalid(Reason.INVALID_ARGUMENT, "page_size", "page_size must not be negative")
        if readiness is not Readiness.ANY and state is not ReviewFilter.PENDING:
            raise invalid(
                Reason.INVALID_ARGUMENT,
                "readiness",
                "readiness filters only pending reviews",
            )
        if account_id:
            check_account_id(account_id)
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        now = self._clock.now()
        with self._store.transaction(call, write=False) as tx:
            rows = tx.one(
                tx.rebinds.reviews(
                    state.value,
                    readiness=readiness.value,
                    account_id=account_id,
                    now=now,
                    max_failures=self._policy.rebind_max_failures,
                    windows=self._windows(now),
                    after=cursor,
                    limit=size + 1,
                )
            )
        more = len(rows) > size
        cases = [review_case(r, self._policy, now) for r in rows[:size]]
        last = cases[-1].rebind if more and cases else None
        return ReviewPage(cases, None if last is None else (last.created_at, last.rebind_id))

    def get(self, call: CallContext, rebind_id: str) -> ReviewCase:
        """A rebind that needs (or needed) review, with its case as it stands now."""
        check_rebind_id(rebind_id)
        now = self._clock.now()
        with self._store.transaction(call, write=False) as tx:
            facts = tx.one(tx.rebinds.review(rebind_id, windows=self._windows(now)))
        if facts is None:
            raise DomainError(Reason.REBIND_NOT_FOUND, "no such rebind")
        if Step.REVIEW not in facts.rebind.required:
            raise DomainError(
                Reason.STEP_NOT_REQUIRED,
                "this rebind does not need review",
                metadata={"step": Step.REVIEW.value},
            )
        return review_case(facts, self._policy, now)

    def _decide(
        self,
        call: CallContext,
        rebind_id: str,
        decide: Callable[[Tx, Rebind, datetime], None],
    ) -> ReviewCase:
        """Runs `decide` on the reviewable rebind, with its account locked first
        (the lock order), in the wrapper every use case runs in, and answers
        the case as it then stands."""
        now = self._clock.now()

        def work(
            tx: Tx, _account: Account | None, row: Rebind | None
        ) -> tuple[ReviewCase, dict[str, str]]:
            decide(tx, self._reviewable(row, now), now)
            return self._case(tx, rebind_id, now), {}

        return run_unit(
            self._store,
            self._clock,
            call,
            work,
            reads=lambda tx: (
                tx.accounts.of_rebind(rebind_id, lock=True),
                tx.rebinds.get(rebind_id),
            ),
        )

    def approve(self, call: CallContext, rebind_id: str, note: str) -> ReviewCase:
        """Approves as the calling reviewer. With two reviewers required, the
        first approval is recorded and the REVIEW step stays outstanding."""
        check_rebind_id(rebind_id)
        note = _check_text(note, "note", required=False, limit=500)
        reviewer = call.caller

        def approve(tx: Tx, rebind: Rebind, now: datetime) -> None:
            if Step.IDENTITY not in rebind.completed:
                raise DomainError(
                    Reason.STEP_REQUIRED,
                    "the identity step must be done before approval",
                    metadata={"missing_steps": Step.IDENTITY.value},
                )
            if any(a.reviewer == reviewer for a in rebind.approvals):
                raise DomainError(
                    Reason.ALREADY_APPROVED_BY_YOU,
                    "this reviewer already approved; another reviewer must approve",
                    metadata={"approvals_required": str(self._required(rebind))},
                )
            approvals = (*rebind.approvals, Approval(reviewer, note, now))
            if len(approvals) < self._required(rebind):
                approved = rebind.with_changes(approvals=approvals, updated_at=now)
                action = "REVIEW_APPROVAL_RECORDED"
            else:
                done = rebind.with_step_done(Step.REVIEW, now)
                approved = done.with_changes(
                    state=state_for(done.required, done.completed),
                    approvals=approvals,
                    reviewer=reviewer,
                    review_note=note,
                    reviewed_at=now,
                    updated_at=now,
                )
                action = "REVIEW_APPROVED"
            tx.rebinds.save(approved)
            self._record(tx, approved, action, reviewer, now)

        return self._decide(call, rebind_id, approve)

    def reject(self, call: CallContext, rebind_id: str, reason: str) -> ReviewCase:
        """Rejects as the calling reviewer; the reason is required."""
        check_rebind_id(rebind_id)
        reason = _check_text(reason, "reason", required=True, limit=500)
        reviewer = call.caller

        def reject(tx: Tx, rebind: Rebind, now: datetime) -> None:
            rejected = rebind.with_changes(
                state=RebindState.REJECTED,
                reviewer=reviewer,
                review_note=reason,
                reviewed_at=now,
                updated_at=now,
            )
            tx.rebinds.save(rejected)
            self._record(tx, rejected, "REVIEW_REJECTED", reviewer, now)

        return self._decide(call, rebind_id, reject)

    def _required(self, rebind: Rebind) -> int:
        return self._policy.approvals_required(rebind.old_phone_lost)

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
