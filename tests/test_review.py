"""Manual review through ReviewService: approve, reject, and what a reviewer may not do."""

from __future__ import annotations

from datetime import UTC, timedelta

import grpc
import pytest
from support import NEW, OLD, error_details, make_id_number

from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import resources_pb2 as res
from phonebind.v1 import review_service_pb2 as rapi
from phonebind.v1 import review_service_pb2_grpc as rapi_grpc


@pytest.fixture
def desk(server):
    return rapi_grpc.ReviewServiceStub(server.channel)


def as_person(person: str):
    """Metadata of the development server's caller acting for `person`, whom
    the service then records as "dev-anonymous:<person>"."""
    return (("x-phonebind-on-behalf-of", person),)


def lost_phone_rebind(server, account_id: str, old: str, new: str, *, identity: bool = True):
    pb = server.api
    pb.register(account_id, old)
    rebind = pb.start(account_id, new, lost=True)
    if identity:
        pb.identity(account_id, rebind.rebind_id)
    return rebind


def test_approval_after_codes_makes_the_rebind_ready_and_completable(server, desk):
    pb = server.api
    rebind = lost_phone_rebind(server, "rv-1", "13800138201", "13900139201")
    rebind = pb.send_and_verify("rv-1", rebind.rebind_id, NEW, "13900139201")
    assert rebind.state == res.REBIND_STATE_AWAITING_REVIEW
    assert rebind.review.state == res.REVIEW_STATE_PENDING

    listed = desk.ListReviews(rapi.ListReviewsRequest())
    assert [r.rebind_id for r in listed.rebinds] == [rebind.rebind_id]

    approved = desk.ApproveRebind(
        # The request's reviewer field is ignored: the reviewer is the caller.
        rapi.ApproveRebindRequest(
            rebind_id=rebind.rebind_id, reviewer="ops-li", note="called back"
        ),
        metadata=as_person("li"),
    ).rebind
    assert approved.state == res.REBIND_STATE_READY
    assert approved.review.state == res.REVIEW_STATE_APPROVED
    assert approved.review.reviewer == "dev-anonymous:li"
    assert [a.reviewer for a in approved.review.approvals] == ["dev-anonymous:li"]
    assert approved.review.approvals_required == 1
    assert approved.review.note == "called back"
    assert res.REBIND_STEP_REVIEW in approved.completed_steps

    done = pb.complete("rv-1", rebind.rebind_id)
    assert done.account.phone_masked == "139****9201"
    # The old phone was lost: the hold is 72 h.
    hold = done.account.hold_until.ToDatetime() - server.clock.now().replace(tzinfo=None)
    assert hold == timedelta(hours=72)
    assert desk.ListReviews(rapi.ListReviewsRequest()).rebinds == []
    approved_list = desk.ListReviews(rapi.ListReviewsRequest(state=res.REVIEW_STATE_APPROVED))
    assert [r.rebind_id for r in approved_list.rebinds] == [rebind.rebind_id]


def prove(pb, account_id: str, rebind_id: str, old: str, new: str) -> None:
    """Every step but review: identity, then both codes."""
    pb.identity(account_id, rebind_id)
    pb.send_and_verify(account_id, rebind_id, OLD, old)
    pb.send_and_verify(account_id, rebind_id, NEW, new)


def test_a_later_change_never_shortens_a_running_hold(server, desk):
    """A 72 h lost-phone hold keeps its end when an ordinary change follows inside it;
    a hold that has run out is replaced by the new change's own."""
    pb, clock = server.api, server.clock
    first = lost_phone_rebind(server, "rv-hold", "13800138209", "13900139209")
    pb.send_and_verify("rv-hold", first.rebind_id, NEW, "13900139209")
    approve(desk, first.rebind_id)
    long_hold = pb.complete("rv-hold", first.rebind_id).account.hold_until

    clock.advance(timedelta(hours=1))
    second = pb.start("rv-hold", "13700137209")
    assert res.REBIND_STEP_REVIEW in second.required_steps  # a change inside a hold
    prove(pb, "rv-hold", second.rebind_id, "13900139209", "13700137209")
    approve(desk, second.rebind_id)
    done = pb.complete("rv-hold", second.rebind_id).account
    assert done.phone_masked == "137****7209"
    assert done.hold_until == long_hold  # not now + 24 h, which ends 47 h sooner
    assert pb.get_account("rv-hold").hold_until == long_hold

    clock.advance(long_hold.ToDatetime(tzinfo=UTC) - clock.now() + timedelta(days=40))
    third = pb.start("rv-hold", "13600136209")
    assert res.REBIND_STEP_REVIEW not in third.required_steps
    prove(pb, "rv-hold", third.rebind_id, "13700137209", "13600136209")
    done = pb.complete("rv-hold", third.rebind_id).account
    assert done.hold_until.ToDatetime(tzinfo=UTC) == clock.now() + timedelta(hours=24)


def test_approval_before_codes_leaves_the_codes_outstanding(server, desk):
    rebind = lost_phone_rebind(server, "rv-2", "13800138202", "13900139202")
    approved = desk.ApproveRebind(rapi.ApproveRebindRequest(rebind_id=rebind.rebind_id)).rebind
    assert approved.state == res.REBIND_STATE_PENDING
    with pytest.raises(grpc.RpcError) as caught:
        server.api.complete("rv-2", rebind.rebind_id)
    code, reason, _ = error_details(caught.value)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "STEP_REQUIRED")


def test_rejection_closes_the_rebind(server, desk):
    pb = server.api
    rebind = lost_phone_rebind(server, "rv-3", "13800138203", "13900139203")
    rejected = desk.RejectRebind(
        rapi.RejectRebindRequest(
            rebind_id=rebind.rebind_id, reviewer="ops-wang", reason="caller failed callback"
        ),
        metadata=as_person("wang"),
    ).rebind
    assert rejected.state == res.REBIND_STATE_REJECTED
    assert rejected.review.reviewer == "dev-anonymous:wang"
    assert rejected.review.state == res.REVIEW_STATE_REJECTED
    assert rejected.review.note == "caller failed callback"
    with pytest.raises(grpc.RpcError) as caught:
        pb.send("rv-3", rebind.rebind_id, NEW)
    assert error_details(caught.value)[1] == "REBIND_CLOSED"
    assert pb.get_account("rv-3").phone_masked == "138****8203"
    rejected_list = desk.ListReviews(rapi.ListReviewsRequest(state=res.REVIEW_STATE_REJECTED))
    assert [r.rebind_id for r in rejected_list.rebinds] == [rebind.rebind_id]


def approve(desk, rebind_id: str, person: str = "x", note: str = ""):
    return desk.ApproveRebind(
        rapi.ApproveRebindRequest(rebind_id=rebind_id, note=note), metadata=as_person(person)
    )


def refused(call, expected_reason, server):
    before = server.snapshot()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert error_details(caught.value)[1] == expected_reason
    assert server.snapshot() == before


def test_reviewer_cannot_approve_without_identity(server, desk):
    rebind = lost_phone_rebind(server, "rv-4", "13800138204", "13900139204", identity=False)
    refused(
        lambda: desk.ApproveRebind(rapi.ApproveRebindRequest(rebind_id=rebind.rebind_id)),
        "STEP_REQUIRED",
        server,
    )


def test_reviewer_cannot_approve_expired_closed_or_unneeded(server, desk, clock):
    pb = server.api
    expired = lost_phone_rebind(server, "rv-5", "13800138205", "13900139205")
    clock.advance(timedelta(minutes=30))
    refused(
        lambda: desk.ApproveRebind(rapi.ApproveRebindRequest(rebind_id=expired.rebind_id)),
        "REBIND_EXPIRED",
        server,
    )
    # No decision will come: the review no longer shows as waiting.
    assert pb.get_rebind("rv-5", expired.rebind_id).review.state == res.REVIEW_STATE_ABANDONED

    cancelled = lost_phone_rebind(server, "rv-6", "13800138206", "13900139206")
    assert pb.get_rebind("rv-6", cancelled.rebind_id).review.state == res.REVIEW_STATE_PENDING
    pb.stub.CancelRebind(api.CancelRebindRequest(account_id="rv-6", rebind_id=cancelled.rebind_id))
    refused(
        lambda: desk.ApproveRebind(rapi.ApproveRebindRequest(rebind_id=cancelled.rebind_id)),
        "REBIND_CLOSED",
        server,
    )
    assert pb.get_rebind("rv-6", cancelled.rebind_id).review.state == res.REVIEW_STATE_ABANDONED

    pb.register("rv-7", "13800138207")
    plain = pb.start("rv-7", "13900139207")
    refused(
        lambda: desk.ApproveRebind(rapi.ApproveRebindRequest(rebind_id=plain.rebind_id)),
        "STEP_NOT_REQUIRED",
        server,
    )
    refused(
        lambda: desk.ApproveRebind(rapi.ApproveRebindRequest(rebind_id="rb_nosuchrebind")),
        "REBIND_NOT_FOUND",
        server,
    )


def test_a_rebind_locked_by_wrong_answers_leaves_the_review_list(server, desk):
    """Nothing can move it on any more, approval included, so it is not listed as pending."""
    pb = server.api
    locked = lost_phone_rebind(server, "rv-lock", "13800138209", "13900139209", identity=False)
    waiting = lost_phone_rebind(server, "rv-wait", "13800138210", "13900139210", identity=False)
    listed = desk.ListReviews(rapi.ListReviewsRequest())
    assert {r.rebind_id for r in listed.rebinds} == {locked.rebind_id, waiting.rebind_id}

    for _ in range(5):  # the account's daily cap of identity failures locks the rebind
        with pytest.raises(grpc.RpcError):
            pb.identity("rv-lock", locked.rebind_id, id_number=make_id_number())
    with pytest.raises(grpc.RpcError) as caught:
        pb.identity("rv-lock", locked.rebind_id)
    assert error_details(caught.value)[1] == "REBIND_LOCKED"
    listed = desk.ListReviews(rapi.ListReviewsRequest())
    assert [r.rebind_id for r in listed.rebinds] == [waiting.rebind_id]
    assert listed.rebinds[0].review.state == res.REVIEW_STATE_PENDING
    assert pb.get_rebind("rv-lock", locked.rebind_id).review.state == res.REVIEW_STATE_ABANDONED


def test_abandoned_is_a_review_state_but_not_a_list(server, desk):
    with pytest.raises(grpc.RpcError) as caught:
        desk.ListReviews(rapi.ListReviewsRequest(state=res.REVIEW_STATE_ABANDONED))
    code, reason, details = error_details(caught.value)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert [v.field for v in details["BadRequest"].field_violations] == ["state"]


def test_approving_twice_and_bad_note_input(server, desk):
    rebind = lost_phone_rebind(server, "rv-8", "13800138208", "13900139208")
    for bad in ["a" * 501, "ok\x00no", "ok\nno"]:
        refused(
            lambda bad=bad: desk.ApproveRebind(
                rapi.ApproveRebindRequest(rebind_id=rebind.rebind_id, note=bad)
            ),
            "INVALID_ARGUMENT",
            server,
        )
    desk.ApproveRebind(rapi.ApproveRebindRequest(rebind_id=rebind.rebind_id))
    refused(
        lambda: desk.ApproveRebind(rapi.ApproveRebindRequest(rebind_id=rebind.rebind_id)),
        "STEP_ALREADY_DONE",
        server,
    )


def test_reject_needs_a_reason(server, desk):
    rebind = lost_phone_rebind(server, "rv-9", "13800138219", "13900139219")
    for blank in ["", "   "]:
        with pytest.raises(grpc.RpcError) as caught:
            desk.RejectRebind(rapi.RejectRebindRequest(rebind_id=rebind.rebind_id, reason=blank))
        code, reason, details = error_details(caught.value)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert [v.field for v in details["BadRequest"].field_violations] == ["reason"]
    assert server.api.get_rebind("rv-9", rebind.rebind_id).state == res.REBIND_STATE_PENDING


def test_review_list_pages_oldest_first(server, desk, clock):
    ids = []
    for n in range(5):
        ids.append(
            lost_phone_rebind(server, f"rv-p{n}", f"1380013830{n}", f"1390013930{n}").rebind_id
        )
        clock.advance(timedelta(seconds=1))
    seen, token = [], ""
    while True:
        page = desk.ListReviews(rapi.ListReviewsRequest(page_size=2, page_token=token))
        seen += [r.rebind_id for r in page.rebinds]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    with pytest.raises(grpc.RpcError) as caught:
        desk.ListReviews(
            rapi.ListReviewsRequest(
                state=res.REVIEW_STATE_APPROVED,
                page_token=desk.ListReviews(rapi.ListReviewsRequest(page_size=2)).next_page_token,
            )
        )
    assert error_details(caught.value)[1] == "INVALID_ARGUMENT"
