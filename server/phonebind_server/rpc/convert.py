"""Domain entities to and from phonebind.v1 messages. Nothing else."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from phonebind.v1 import resources_pb2 as pb

from ..domain import messages
from ..domain.errors import Reason, invalid
from ..domain.model import Account, BindingChange, CodeTarget, Rebind, RebindState, Step
from ..domain.policy import Policy
from ..domain.review import ReviewFilter, review_state
from ..logs import language_var


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def account(entity: Account, now: datetime) -> pb.Account:
    # hold_until is set exactly while the hold lasts, even when a rebind lock
    # takes the state: it is the one field lending services need to read.
    hold_until = entity.hold_until if entity.hold_until and entity.hold_until > now else None
    if entity.rebind_locked_until is not None and entity.rebind_locked_until > now:
        state = pb.ACCOUNT_STATE_REBIND_LOCKED
    elif hold_until is not None:
        state = pb.ACCOUNT_STATE_COOL_OFF
    else:
        state = pb.ACCOUNT_STATE_ACTIVE
    return pb.Account(
        account_id=entity.account_id,
        phone_masked=entity.phone.masked,
        holder_name_masked=entity.holder_name_masked,
        id_number_masked=entity.id_number_masked,
        state=state,
        bound_time=timestamp(entity.bound_at),
        hold_until=timestamp(hold_until),
        create_time=timestamp(entity.created_at),
    )


_STATE = {s: pb.RebindState.Value(f"REBIND_STATE_{s.value}") for s in RebindState}
_STEP = {s: pb.RebindStep.Value(f"REBIND_STEP_{s.value}") for s in Step}
_TARGET = {
    pb.CODE_TARGET_OLD_PHONE: CodeTarget.OLD_PHONE,
    pb.CODE_TARGET_NEW_PHONE: CodeTarget.NEW_PHONE,
}


def rebind(entity: Rebind, policy: Policy) -> pb.Rebind:
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
        attempts_left=max(0, policy.rebind_max_failures - entity.failures),
        review=_review(entity, policy.rebind_max_failures),
        update_time=timestamp(entity.updated_at),
        notices=[pb.Notice(code=code, text=text) for code, text in _notices(entity, policy)],
    )


def _notices(entity: Rebind, policy: Policy) -> list[tuple[str, str]]:
    hold = policy.hold_old_phone_lost if entity.old_phone_lost else policy.hold
    return messages.rebind_notices(
        is_open=entity.state.is_open,
        needs_review=Step.REVIEW in entity.required and Step.REVIEW not in entity.completed,
        hold_hours=int(hold.total_seconds() // 3600),
        language=language_var.get(),
    )


_REVIEW_STATE = {
    ReviewFilter.PENDING: pb.REVIEW_STATE_PENDING,
    ReviewFilter.APPROVED: pb.REVIEW_STATE_APPROVED,
    ReviewFilter.REJECTED: pb.REVIEW_STATE_REJECTED,
    ReviewFilter.ABANDONED: pb.REVIEW_STATE_ABANDONED,
}


def _review(entity: Rebind, max_failures: int) -> pb.Review | None:
    state = review_state(entity, max_failures)
    if state is None:
        return None
    return pb.Review(
        state=_REVIEW_STATE[state],
        reviewer=entity.reviewer,
        note=entity.review_note,
        decide_time=timestamp(entity.reviewed_at),
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
