"""Risk assessment of a number change, run when the rebind starts.

Pure: the flow gathers the signals from the store, this module decides. Rules
and their defaults are in DESIGN §3 and Policy; REVIEW adds a reviewer's
approval to the rebind's steps, DENY refuses to start it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import RiskAssessment, RiskDecision
from .policy import Policy


@dataclass(frozen=True)
class RiskSignals:
    # Completed changes of this account inside each window (before this one).
    changes_in_review_window: int
    changes_in_deny_window: int
    number_recently_released: bool
    virtual_operator: bool
    old_phone_lost: bool
    in_cool_off: bool
    province_mismatch: bool


# (reason, weight): the score is their sum, capped at 100.
_WEIGHTS = {
    "FREQUENT_CHANGES": 40,
    "NUMBER_RECENTLY_RELEASED": 30,
    "VIRTUAL_OPERATOR": 25,
    "OLD_PHONE_LOST": 35,
    "IN_COOL_OFF": 30,
    "REGION_MISMATCH": 10,
}
# Signals that only add to the score and never require review on their own.
_SCORE_ONLY = frozenset({"REGION_MISMATCH"})


def assess(signals: RiskSignals, policy: Policy) -> RiskAssessment:
    reasons: list[str] = []
    deny = signals.changes_in_deny_window + 1 >= policy.deny_change_count
    if deny or signals.changes_in_review_window + 1 >= policy.review_change_count:
        reasons.append("FREQUENT_CHANGES")
    if signals.number_recently_released:
        reasons.append("NUMBER_RECENTLY_RELEASED")
    if signals.virtual_operator:
        reasons.append("VIRTUAL_OPERATOR")
    if signals.old_phone_lost:
        reasons.append("OLD_PHONE_LOST")
    if signals.in_cool_off:
        reasons.append("IN_COOL_OFF")
    if signals.province_mismatch:
        reasons.append("REGION_MISMATCH")

    score = min(100, sum(_WEIGHTS[r] for r in reasons) + (30 if deny else 0))
    if deny:
        decision = RiskDecision.DENY
    elif any(r not in _SCORE_ONLY for r in reasons):
        decision = RiskDecision.REVIEW
    else:
        decision = RiskDecision.ALLOW
    return RiskAssessment(decision=decision, score=score, reasons=tuple(reasons))


def signal_weight(reason: str) -> int:
    """What a signal adds to the score (0 for a code this version does not know)."""
    return _WEIGHTS.get(reason, 0)
