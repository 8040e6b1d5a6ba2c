"""Lifetimes at their exact edges, on the server's FakeClock (never by sleeping):
a code lives 5 minutes, a resend waits 60 seconds, a rebind lives 30 minutes,
the hold after a change lasts 24 hours. Each deadline is exclusive: at the
instant itself the thing is gone.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import grpc
import pytest
from support import NEW, OLD, e164, error_details, rows

from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import resources_pb2 as res

FP = grpc.StatusCode.FAILED_PRECONDITION


def refused(call) -> tuple[grpc.StatusCode, str, dict[str, object]]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return error_details(caught.value)


def naive(clock) -> datetime:
    """The clock's now as protobuf Timestamp.ToDatetime() gives it (naive UTC)."""
    return clock.now().replace(tzinfo=None)


def test_code_works_at_4_59_and_is_expired_at_5_00(server, clock):
    pb = server.api
    old, new = "13800138300", "13900139300"
    pb.register("exp-code", old)
    rebind_id = pb.start("exp-code", new).rebind_id
    pb.identity("exp-code", rebind_id)

    sent_at = naive(clock)
    for target in (OLD, NEW):
        sent = pb.send("exp-code", rebind_id, target)
        assert sent.expire_time.ToDatetime() == sent_at + timedelta(minutes=5)
    old_code = pb.inbox.next_code(e164(old))
    new_code = pb.inbox.next_code(e164(new))

    clock.advance(timedelta(minutes=4, seconds=59))
    rebind = pb.verify("exp-code", rebind_id, OLD, old_code)
    assert res.REBIND_STEP_OLD_PHONE_CODE in rebind.completed_steps

    clock.advance(timedelta(seconds=1))
    code, reason, _ = refused(lambda: pb.verify("exp-code", rebind_id, NEW, new_code))
    assert (code, reason) == (FP, "CODE_EXPIRED")
    # An expired code is not a wrong answer: nothing was counted against the rebind.
    rebind = pb.get_rebind("exp-code", rebind_id)
    assert rebind.attempts_left == 10
    assert res.REBIND_STEP_NEW_PHONE_CODE not in rebind.completed_steps

    # A fresh code for the same target works.
    pb.send("exp-code", rebind_id, NEW)
    rebind = pb.verify("exp-code", rebind_id, NEW, pb.inbox.next_code(e164(new)))
    assert rebind.state == res.REBIND_STATE_READY


def test_resend_waits_60_seconds_and_invalidates_the_previous_code(server, clock):
    pb = server.api
    old = "13800138301"
    pb.register("exp-resend", old)
    rebind_id = pb.start("exp-resend", "13900139301").rebind_id

    first_at = naive(clock)
    first = pb.send("exp-resend", rebind_id, OLD)
    assert first.resend_time.ToDatetime() == first_at + timedelta(seconds=60)
    first_code = pb.inbox.next_code(e164(old))

    clock.advance(timedelta(seconds=59))
    code, reason, details = refused(lambda: pb.send("exp-resend", rebind_id, OLD))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESEND_TOO_SOON")
    assert details["RetryInfo"].retry_delay.ToTimedelta() == timedelta(seconds=1)
    assert details["ErrorInfo"].metadata["retry_after_seconds"] == "1"

    clock.advance(timedelta(seconds=1))
    resent_at = naive(clock)
    again = pb.send("exp-resend", rebind_id, OLD)
    assert again.expire_time.ToDatetime() == resent_at + timedelta(minutes=5)
    assert again.resend_time.ToDatetime() == resent_at + timedelta(seconds=60)
    assert again.attempts_left == 5
    second_code = pb.inbox.next_code(e164(old))
    for _ in range(3):  # two random codes are equal once in a million; resend then
        if second_code != first_code:
            break
        clock.advance(timedelta(seconds=60))
        pb.send("exp-resend", rebind_id, OLD)
        second_code = pb.inbox.next_code(e164(old))
    assert second_code != first_code

    # The previous code, still inside its own 5 minutes, is dead: one live code per target.
    code, reason, details = refused(lambda: pb.verify("exp-resend", rebind_id, OLD, first_code))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CODE_MISMATCH")
    assert details["ErrorInfo"].metadata["attempts_left"] == "4"
    rebind = pb.verify("exp-resend", rebind_id, OLD, second_code)
    assert res.REBIND_STEP_OLD_PHONE_CODE in rebind.completed_steps
    assert rebind.attempts_left == 9  # the wrong try counts, across resends


def test_rebind_is_usable_at_29_59(server, clock):
    pb = server.api
    old, new = "13800138302", "13900139302"
    pb.register("exp-live", old)
    started_at = naive(clock)
    rebind = pb.ready_rebind("exp-live", old, new)
    assert rebind.expire_time.ToDatetime() == started_at + timedelta(minutes=30)

    clock.advance(timedelta(minutes=29, seconds=59))
    assert pb.get_rebind("exp-live", rebind.rebind_id).state == res.REBIND_STATE_READY
    done = pb.complete("exp-live", rebind.rebind_id)
    assert done.rebind.state == res.REBIND_STATE_COMPLETED
    assert done.account.phone_masked == "139****9302"


def test_rebind_expires_at_30_00_and_stays_expired(server, clock):
    pb = server.api
    old, new = "13800138303", "13900139303"
    pb.register("exp-dead", old)
    rebind = pb.start("exp-dead", new)
    pb.identity("exp-dead", rebind.rebind_id)

    clock.advance(timedelta(minutes=29, seconds=59))
    assert pb.get_rebind("exp-dead", rebind.rebind_id).state == res.REBIND_STATE_PENDING

    clock.advance(timedelta(seconds=1))
    for call in (
        lambda: pb.send("exp-dead", rebind.rebind_id, OLD),
        lambda: pb.verify("exp-dead", rebind.rebind_id, OLD, "123456"),
        lambda: pb.complete("exp-dead", rebind.rebind_id),
    ):
        code, reason, _ = refused(call)
        assert (code, reason) == (FP, "REBIND_EXPIRED")
    expired = pb.get_rebind("exp-dead", rebind.rebind_id)
    assert expired.state == res.REBIND_STATE_EXPIRED
    assert list(expired.completed_steps) == [res.REBIND_STEP_IDENTITY]
    assert not expired.HasField("complete_time")

    # A new start works, and closes the old one as EXPIRED, not CANCELLED.
    fresh = pb.start("exp-dead", new)
    assert fresh.rebind_id != rebind.rebind_id
    assert fresh.state == res.REBIND_STATE_PENDING
    assert fresh.expire_time.ToDatetime() == naive(clock) + timedelta(minutes=30)
    assert pb.get_rebind("exp-dead", rebind.rebind_id).state == res.REBIND_STATE_EXPIRED
    found = rows(
        server.database_url, "SELECT state FROM rebinds WHERE rebind_id = ?", rebind.rebind_id
    )
    assert found == [("EXPIRED",)]
    # Cancelling the expired one is refused as expired, and touches nothing.
    cancel = api.CancelRebindRequest(account_id="exp-dead", rebind_id=rebind.rebind_id)
    code, reason, _ = refused(lambda: pb.stub.CancelRebind(cancel))
    assert (code, reason) == (FP, "REBIND_EXPIRED")
    assert pb.get_rebind("exp-dead", rebind.rebind_id).state == res.REBIND_STATE_EXPIRED
    assert pb.get_rebind("exp-dead", fresh.rebind_id).state == res.REBIND_STATE_PENDING


def test_hold_lasts_24_hours_after_completion(server, clock):
    pb = server.api
    old, new = "13800138304", "13900139304"
    pb.register("exp-hold", old)
    rebind = pb.ready_rebind("exp-hold", old, new)
    clock.advance(timedelta(minutes=7))
    completed_at = naive(clock)
    done = pb.complete("exp-hold", rebind.rebind_id)
    hold_until = completed_at + timedelta(hours=24)
    assert done.account.state == res.ACCOUNT_STATE_COOL_OFF
    assert done.account.hold_until.ToDatetime() == hold_until
    assert done.rebind.complete_time.ToDatetime() == completed_at

    for step in (timedelta(0), timedelta(hours=12), timedelta(hours=11, minutes=59, seconds=59)):
        clock.advance(step)
        account = pb.get_account("exp-hold")
        assert account.state == res.ACCOUNT_STATE_COOL_OFF
        assert account.hold_until.ToDatetime() == hold_until
        assert account.bound_time.ToDatetime() == completed_at

    clock.advance(timedelta(seconds=1))
    assert naive(clock) == hold_until
    account = pb.get_account("exp-hold")
    assert account.state == res.ACCOUNT_STATE_ACTIVE
    assert not account.HasField("hold_until")  # unset once the hold is over
    assert account.bound_time.ToDatetime() == completed_at
    assert account.phone_masked == "139****9304"

    clock.advance(timedelta(days=3))
    account = pb.get_account("exp-hold")
    assert account.state == res.ACCOUNT_STATE_ACTIVE
    assert not account.HasField("hold_until")
