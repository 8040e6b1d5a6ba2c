"""Each risk rule at its threshold and just beyond it, on the injected clock."""

from __future__ import annotations

import itertools
from datetime import timedelta

import grpc
import pytest
from conftest import start_server
from support import error_details, make_id_number

from phonebind.v1 import resources_pb2 as res
from phonebind_server.domain.model import RiskDecision
from phonebind_server.domain.policy import Policy
from phonebind_server.domain.risk import RiskSignals, assess

TICK = timedelta(microseconds=1)


def change(pb, account_id: str, old: str, new: str) -> None:
    rebind = pb.ready_rebind(account_id, old, new)
    pb.complete(account_id, rebind.rebind_id)


def risk_of(pb, account_id: str, new: str):
    rebind = pb.start(account_id, new)
    return rebind.risk


def test_second_change_within_30_days_needs_review_and_not_after(server, clock):
    pb = server.api
    pb.register("r-1", "13800138111")
    change(pb, "r-1", "13800138111", "13900139111")
    clock.advance(timedelta(days=30))  # the change is exactly 30 days old: still inside
    risk = risk_of(pb, "r-1", "13700137111")
    assert "FREQUENT_CHANGES" in risk.reasons and risk.decision == res.RISK_DECISION_REVIEW
    clock.advance(TICK)
    risk = risk_of(pb, "r-1", "13700137111")
    assert "FREQUENT_CHANGES" not in risk.reasons
    assert risk.decision == res.RISK_DECISION_ALLOW


def test_fourth_change_within_a_year_is_denied_until_the_first_is_a_year_old(server, clock):
    """Both change windows come from one statement: the 30-day one is empty
    here (changes 31 days apart), the 365-day one holds three changes."""
    pb = server.api
    numbers = ["13800138121", "13900139121", "13700137121", "13600136121", "13500135121"]
    pb.register("r-4", numbers[0])
    for old, new in itertools.pairwise(numbers[:4]):
        change(pb, "r-4", old, new)
        clock.advance(timedelta(days=31))
    clock.advance(timedelta(days=365 - 3 * 31))  # the first change is exactly a year old
    with pytest.raises(grpc.RpcError) as caught:
        pb.start("r-4", numbers[4])
    assert error_details(caught.value)[:2] == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RISK_DENIED",
    )
    clock.advance(TICK)
    risk = risk_of(pb, "r-4", numbers[4])
    assert risk.decision == res.RISK_DECISION_ALLOW, risk


def test_number_released_by_another_account_within_90_days(server, clock):
    pb = server.api
    pb.register("r-2", "13800138112")
    pb.register("r-3", "13600136112", id_number=make_id_number(region="110105", seq="222"))
    change(pb, "r-2", "13800138112", "13900139112")  # r-2 releases 138 0013 8112
    clock.advance(timedelta(days=90))
    risk = risk_of(pb, "r-3", "13800138112")
    assert "NUMBER_RECENTLY_RELEASED" in risk.reasons
    assert risk.decision == res.RISK_DECISION_REVIEW
    clock.advance(TICK)
    risk = risk_of(pb, "r-3", "13800138112")
    assert "NUMBER_RECENTLY_RELEASED" not in risk.reasons


def test_rebind_started_during_the_hold(server, clock):
    pb = server.api
    pb.register("r-4", "13800138113")
    change(pb, "r-4", "13800138113", "13900139113")
    clock.advance(timedelta(hours=24) - TICK)
    assert "IN_COOL_OFF" in risk_of(pb, "r-4", "13700137113").reasons
    clock.advance(TICK)  # hold_until reached: the hold is over
    assert "IN_COOL_OFF" not in risk_of(pb, "r-4", "13700137113").reasons


def test_province_mismatch_scores_but_does_not_block(server):
    pb = server.api
    pb.register("r-5", "13800138114")  # ID number of Beijing (110105…)
    beijing = risk_of(pb, "r-5", "13800138115")  # a Beijing range
    assert "REGION_MISMATCH" not in beijing.reasons
    guangdong = risk_of(pb, "r-5", "13510000114")  # a Shenzhen range
    assert list(guangdong.reasons) == ["REGION_MISMATCH"]
    assert guangdong.decision == res.RISK_DECISION_ALLOW
    assert guangdong.score == beijing.score + 10


def test_thresholds_are_configurable(database_url, tmp_path, clock, secrets_seen):
    running = start_server(
        database_url,
        tmp_path,
        clock,
        secrets_seen,
        env={"PHONEBIND_POLICY_REVIEW_CHANGE_COUNT": "3", "PHONEBIND_POLICY_HOLD": "1h"},
    )
    try:
        pb = running.api
        pb.register("r-6", "13800138116")
        change(pb, "r-6", "13800138116", "13900139116")
        clock.advance(timedelta(hours=1))
        risk = risk_of(pb, "r-6", "13700137116")
        assert risk.decision == res.RISK_DECISION_ALLOW, risk
    finally:
        running.stop()


SIGNALS = RiskSignals(
    changes_in_review_window=0,
    changes_in_deny_window=0,
    number_recently_released=False,
    virtual_operator=False,
    old_phone_lost=False,
    in_cool_off=False,
    province_mismatch=False,
)


@pytest.mark.parametrize(
    ("review_window", "deny_window", "decision"),
    [
        (0, 0, RiskDecision.ALLOW),  # the first change
        (1, 1, RiskDecision.REVIEW),  # the 2nd within 30 days
        (0, 2, RiskDecision.ALLOW),  # the 3rd within a year, none within 30 days
        (0, 3, RiskDecision.DENY),  # the 4th within a year
        (1, 3, RiskDecision.DENY),
    ],
)
def test_change_frequency_thresholds(review_window, deny_window, decision):
    signals = RiskSignals(
        **{
            **SIGNALS.__dict__,
            "changes_in_review_window": review_window,
            "changes_in_deny_window": deny_window,
        }
    )
    assert assess(signals, Policy()).decision is decision
