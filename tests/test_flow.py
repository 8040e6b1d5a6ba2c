"""The whole rebind flow through a real server, with the generated stubs."""

from __future__ import annotations

import itertools
from datetime import timedelta

import grpc
import pytest
from support import ID_NUMBER, NEW, OLD, e164, error_details

from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import resources_pb2 as res


def test_complete_rebind_moves_binding_records_history_and_notifies_old_number(server):
    pb = server.api
    account = pb.register("loan-1", "13800138000")
    assert account.phone_masked == "138****8000"
    assert account.id_number_masked == "110***********002X"
    assert account.holder_name_masked == "张*"
    assert account.state == res.ACCOUNT_STATE_ACTIVE
    assert not account.HasField("hold_until")

    rebind = pb.start("loan-1", "13900139000")
    assert rebind.state == res.REBIND_STATE_PENDING
    assert list(rebind.required_steps) == [
        res.REBIND_STEP_IDENTITY,
        res.REBIND_STEP_OLD_PHONE_CODE,
        res.REBIND_STEP_NEW_PHONE_CODE,
    ]
    assert rebind.new_phone_masked == "139****9000"
    assert rebind.risk.decision == res.RISK_DECISION_ALLOW
    assert rebind.expire_time.ToDatetime() - rebind.create_time.ToDatetime() == timedelta(
        minutes=30
    )

    rebind = pb.identity("loan-1", rebind.rebind_id)
    assert list(rebind.completed_steps) == [res.REBIND_STEP_IDENTITY]

    sent = pb.send("loan-1", rebind.rebind_id, OLD)
    assert sent.attempts_left == 5
    assert sent.expire_time.ToDatetime() - server.clock.now().replace(tzinfo=None) == timedelta(
        minutes=5
    )
    assert sent.resend_time.ToDatetime() - server.clock.now().replace(tzinfo=None) == timedelta(
        seconds=60
    )
    code = pb.inbox.next_code(e164("13800138000"))
    assert "5 分钟" in pb.inbox.to(e164("13800138000"))[0]["text"]
    rebind = pb.verify("loan-1", rebind.rebind_id, OLD, code)
    rebind = pb.send_and_verify("loan-1", rebind.rebind_id, NEW, "13900139000")
    assert rebind.state == res.REBIND_STATE_READY

    done = pb.complete("loan-1", rebind.rebind_id)
    assert done.rebind.state == res.REBIND_STATE_COMPLETED
    assert done.account.phone_masked == "139****9000"
    assert done.account.state == res.ACCOUNT_STATE_COOL_OFF
    now = server.clock.now().replace(tzinfo=None)
    assert done.account.hold_until.ToDatetime() - now == timedelta(hours=24)
    assert done.account.bound_time.ToDatetime() == now

    notice = pb.inbox.wait_for(e164("13800138000"), 1, "CHANGE_NOTICE")
    assert len(notice) == 1
    assert "139****9000" in notice[0]["text"] and "13900139000" not in notice[0]["text"]

    history = pb.stub.ListBindingHistory(api.ListBindingHistoryRequest(account_id="loan-1"))
    assert [(c.old_phone_masked, c.new_phone_masked) for c in history.changes] == [
        ("138****8000", "139****9000")
    ]
    assert history.next_page_token == ""
    assert pb.get_account("loan-1").phone_masked == "139****9000"


def test_old_phone_lost_needs_review_and_longer_hold(server):
    pb = server.api
    pb.register("loan-2", "13800138001")
    rebind = pb.start("loan-2", "13900139001", lost=True)
    assert list(rebind.required_steps) == [
        res.REBIND_STEP_IDENTITY,
        res.REBIND_STEP_NEW_PHONE_CODE,
        res.REBIND_STEP_REVIEW,
    ]
    assert rebind.risk.decision == res.RISK_DECISION_REVIEW
    assert "OLD_PHONE_LOST" in rebind.risk.reasons
    pb.identity("loan-2", rebind.rebind_id)
    rebind = pb.send_and_verify("loan-2", rebind.rebind_id, NEW, "13900139001")
    assert rebind.state == res.REBIND_STATE_AWAITING_REVIEW


def test_history_pages_newest_first(server, clock):
    pb = server.api
    phones = ["13800138010", "13900139010", "13700137010"]
    pb.register("loan-3", phones[0])
    for old, new in itertools.pairwise(phones):
        rebind = pb.ready_rebind("loan-3", old, new)
        pb.complete("loan-3", rebind.rebind_id)
        clock.advance(timedelta(days=40))
    first = pb.stub.ListBindingHistory(
        api.ListBindingHistoryRequest(account_id="loan-3", page_size=1)
    )
    assert [c.new_phone_masked for c in first.changes] == ["137****7010"]
    assert first.next_page_token
    second = pb.stub.ListBindingHistory(
        api.ListBindingHistoryRequest(
            account_id="loan-3", page_size=1, page_token=first.next_page_token
        )
    )
    assert [c.new_phone_masked for c in second.changes] == ["139****9010"]
    assert second.next_page_token == ""


def test_register_replays_only_by_request_id(server):
    pb = server.api
    first = pb.register("loan-4", "13800138004", request_id="req-1")
    # The same request in other spellings, under its request_id: the first answer.
    again = pb.register(
        "loan-4", "+86 138-0013-8004", id_number=ID_NUMBER.lower(), request_id="req-1"
    )
    assert first == again
    # Without it, even the same data is ACCOUNT_EXISTS: the answer never tells
    # whether a guessed name or ID number matches the record.
    with pytest.raises(grpc.RpcError) as same:
        pb.register("loan-4", "13800138004")
    assert error_details(same.value)[:2] == (grpc.StatusCode.ALREADY_EXISTS, "ACCOUNT_EXISTS")
