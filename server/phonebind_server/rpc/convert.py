"""Domain entities to and from phonebind.v1 messages. Nothing else."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from phonebind.v1 import resources_pb2 as pb
from phonebind.v1 import review_service_pb2 as review_pb

from ..domain import messages
from ..domain.errors import Reason, invalid
from ..domain.model import Account, BindingChange, CodeTarget, Rebind, RebindState, Standing, Step
from ..domain.review import Readiness, ReviewCase, ReviewFilter
from ..domain.status import RebindStatus

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    delta = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


_STANDING = {
    Standing.ACTIVE: pb.ACCOUNT_STATE_ACTIVE,
    Standing.COOL_OFF: pb.ACCOUNT_STATE_COOL_OFF,
    Standing.REBIND_LOCKED: pb.ACCOUNT_STATE_REBIND_LOCKED,
}


def account(entity: Account, now: datetime) -> pb.Account:
    return pb.Account(
        account_id=entity.account_id,
        phone_masked=entity.phone.masked,
        holder_name_masked=entity.holder_name_masked,
        id_number_masked=entity.id_number_masked,
        state=_STANDING[entity.standing_at(now)],
        bound_time=timestamp(entity.bound_at),
        hold_until=timestamp(entity.hold_at(now)),
        create_time=timestamp(entity.created_at),
    )


_STATE = {s: pb.RebindState.Value(f"REBIND_STATE_{s.value}") for s in RebindState}
_STEP = {s: pb.RebindStep.Value(f"REBIND_STEP_{s.value}") for s in Step}
_TARGET = {
    pb.CODE_TARGET_OLD_PHONE: CodeTarget.OLD_PHONE,
    pb.CODE_TARGET_NEW_PHONE: CodeTarget.NEW_PHONE,
}


def rebind(entity: Rebind, status: RebindStatus, language: str) -> pb.Rebind:
    """`status`: what the domain tells of it beyond its fields (`rebind_status`)."""
    return pb.Rebind(
        rebind_id=entity.rebind_id,
        account_id=entity.account_id,
        state=_STATE[entity.state],
        new_phone_masked=entity.new_phone.masked,
        required_steps=[_STEP[s] for s in entity.required],
        completed_steps=[_STEP[s] for s in entity.completed],
        risk=pb.RiskAssessment(
            decision=pb.RiskDecision.Value(f"RISK_DECISION_{entity.risk.decision.value}"),
            score=entity.risk.score,
            reasons=list(entity.risk.reasons),
        ),
        create_time=timestamp(entity.created_at),
        expire_time=timestamp(entity.expires_at),
        complete_time=timestamp(entity.completed_at),
        old_phone_lost=entity.old_phone_lost,
        attempts_left=status.attempts_left,
        review=_review(entity, status),
        update_time=timestamp(entity.updated_at),
        notices=[pb.Notice(code=code, text=text) for code, text in status.notices(language)],
        old_phone_masked=entity.old_phone_masked,
    )


_REVIEW_STATE = {
    ReviewFilter.PENDING: pb.REVIEW_STATE_PENDING,
    ReviewFilter.APPROVED: pb.REVIEW_STATE_APPROVED,
    ReviewFilter.REJECTED: pb.REVIEW_STATE_REJECTED,
    ReviewFilter.ABANDONED: pb.REVIEW_STATE_ABANDONED,
}


def _review(entity: Rebind, status: RebindStatus) -> pb.Review | None:
    if status.review is None:
        return None
    return pb.Review(
        state=_REVIEW_STATE[status.review.state],
        reviewer=entity.reviewer,
        note=entity.review_note,
        decide_time=timestamp(entity.reviewed_at),
        approvals=[
            pb.Approval(reviewer=a.reviewer, note=a.note, approve_time=timestamp(a.at))
            for a in entity.approvals
        ],
        approvals_required=status.review.approvals_required,
    )


def duration(value: timedelta | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    result = duration_pb2.Duration()
    result.FromTimedelta(value)
    return result


_READINESS = {
    Readiness.READY: review_pb.REVIEW_READINESS_READY,
    Readiness.WAITING: review_pb.REVIEW_READINESS_WAITING_ON_CUSTOMER,
}


def readiness(value: int) -> Readiness:
    if value == review_pb.REVIEW_READINESS_UNSPECIFIED:
        return Readiness.ANY
    for ready, number in _READINESS.items():
        if number == value:
            return ready
    raise invalid(
        Reason.INVALID_ARGUMENT,
        "readiness",
        "readiness must be REVIEW_READINESS_READY or REVIEW_READINESS_WAITING_ON_CUSTOMER",
    )


def review_case(case: ReviewCase, status: RebindStatus, language: str) -> review_pb.ReviewCase:
    """`status`: the case's rebind's (`rebind_status`)."""
    entity = case.rebind
    numbers = {
        "old_phone": entity.old_phone_masked or case.account.phone.masked,
        "new_phone": entity.new_phone.masked,
        "reviewer": ", ".join(a.reviewer for a in entity.approvals) or entity.reviewer,
    }
    return review_pb.ReviewCase(
        rebind=rebind(entity, status, language),
        account=account(case.account, case.as_of),
        readiness=(
            _READINESS[case.readiness]
            if case.readiness is not None
            else review_pb.REVIEW_READINESS_UNSPECIFIED
        ),
        signals=[
            review_pb.RiskSignal(
                code=code,
                weight=weight,
                explanation=messages.signal_explanation(code, language),
            )
            for code, weight in case.signals
        ],
        changes_last_30_days=case.changes_30_days,
        changes_last_365_days=case.changes_365_days,
        steps=[
            review_pb.StepRecord(
                step=_STEP[done.step],
                method=done.method,
                description=messages.step_description(done.method, language, **numbers),
                complete_time=timestamp(done.at),
            )
            for done in case.steps
        ],
        waiting_since=timestamp(case.waiting_since),
        waiting=duration(case.waiting),
    )


def review_filter(value: int) -> ReviewFilter:
    if value == pb.REVIEW_STATE_UNSPECIFIED:
        return ReviewFilter.PENDING
    for state, number in _REVIEW_STATE.items():
        if number == value and state is not ReviewFilter.ABANDONED:
            return state
    raise invalid(
        Reason.INVALID_ARGUMENT,
        "state",
        "state must be REVIEW_STATE_PENDING, REVIEW_STATE_APPROVED or REVIEW_STATE_REJECTED",
    )


def binding_change(entity: BindingChange) -> pb.BindingChange:
    return pb.BindingChange(
        rebind_id=entity.rebind_id,
        old_phone_masked=entity.old_phone.masked,
        new_phone_masked=entity.new_phone.masked,
        complete_time=timestamp(entity.completed_at),
        old_phone_lost=entity.old_phone_lost,
    )


def code_target(value: int) -> CodeTarget:
    try:
        return _TARGET[value]
    except KeyError:
        raise invalid(
            Reason.INVALID_ARGUMENT,
            "target",
            "target must be CODE_TARGET_OLD_PHONE or CODE_TARGET_NEW_PHONE",
        ) from None
