"""Manual review through ReviewService: approve, reject, and what a reviewer may not do."""

from __future__ import annotations

from datetime import UTC, timedelta

import grpc
import pytest
from conftest import start_server
from support import NEW, OLD, Api, error_details, make_id_number

from phonebind.v1 import audit_service_pb2 as aapi
from phonebind.v1 import audit_service_pb2_grpc as aapi_grpc
from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import resources_pb2 as res
from phonebind.v1 import review_service_pb2 as rapi
from phonebind.v1 import review_service_pb2_grpc as rapi_grpc
from phonebind_server.rpc.auth import new_token, token_digest


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


# -- the reviewer's desk: queue filters, the case to decide, who decided ------------


def ids(response) -> list[str]:
    return [case.rebind.rebind_id for case in response.reviews]


def test_a_lost_phone_rebind_is_not_ready_until_the_customer_steps_are_done(server, desk):
    pb = server.api
    rebind = lost_phone_rebind(server, "rv-r1", "13800138301", "13900139301", identity=False)
    ready = rapi.ListReviewsRequest(readiness=rapi.REVIEW_READINESS_READY)
    waiting = rapi.ListReviewsRequest(readiness=rapi.REVIEW_READINESS_WAITING_ON_CUSTOMER)
    assert ids(desk.ListReviews(ready)) == []
    listed = desk.ListReviews(waiting)
    assert ids(listed) == [rebind.rebind_id]
    assert [r.rebind_id for r in listed.rebinds] == [rebind.rebind_id]
    assert listed.reviews[0].readiness == rapi.REVIEW_READINESS_WAITING_ON_CUSTOMER

    pb.identity("rv-r1", rebind.rebind_id)
    assert ids(desk.ListReviews(ready)) == []  # the new number's code is still missing
    pb.send_and_verify("rv-r1", rebind.rebind_id, NEW, "13900139301")
    listed = desk.ListReviews(ready)
    assert ids(listed) == [rebind.rebind_id]
    assert listed.reviews[0].readiness == rapi.REVIEW_READINESS_READY
    assert ids(desk.ListReviews(waiting)) == []
    # Unfiltered, both kinds are listed.
    assert ids(desk.ListReviews(rapi.ListReviewsRequest())) == [rebind.rebind_id]

    # Readiness is a filter of pending reviews only.
    with pytest.raises(grpc.RpcError) as caught:
        desk.ListReviews(
            rapi.ListReviewsRequest(
                state=res.REVIEW_STATE_APPROVED, readiness=rapi.REVIEW_READINESS_READY
            )
        )
    code, reason, details = error_details(caught.value)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert [v.field for v in details["BadRequest"].field_violations] == ["readiness"]


def test_the_queue_filters_by_account_and_its_tokens_keep_their_filters(server, desk, clock):
    mine = []
    for n in range(3):
        mine.append(
            lost_phone_rebind(server, f"rv-a{n}", f"1380013831{n}", f"1390013931{n}").rebind_id
        )
        clock.advance(timedelta(seconds=1))
    listed = desk.ListReviews(rapi.ListReviewsRequest(account_id="rv-a1"))
    assert ids(listed) == [mine[1]]
    assert listed.reviews[0].account.account_id == "rv-a1"
    assert ids(desk.ListReviews(rapi.ListReviewsRequest(account_id="rv-none"))) == []

    first = desk.ListReviews(rapi.ListReviewsRequest(page_size=1))
    assert ids(first) == [mine[0]] and first.next_page_token
    for other in (
        rapi.ListReviewsRequest(page_size=1, page_token=first.next_page_token, account_id="rv-a2"),
        rapi.ListReviewsRequest(
            page_size=1,
            page_token=first.next_page_token,
            readiness=rapi.REVIEW_READINESS_WAITING_ON_CUSTOMER,
        ),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            desk.ListReviews(other)
        code, reason, details = error_details(caught.value)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert [v.field for v in details["BadRequest"].field_violations] == ["page_token"]
    second = desk.ListReviews(
        rapi.ListReviewsRequest(page_size=1, page_token=first.next_page_token)
    )
    assert ids(second) == [mine[1]]

    with pytest.raises(grpc.RpcError) as caught:
        desk.ListReviews(rapi.ListReviewsRequest(account_id="bad id!"))
    assert error_details(caught.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


def test_a_review_carries_the_facts_to_decide_and_only_masks(server, desk, clock):
    pb = server.api
    # One earlier change, 40 days ago: in the last 365 days, not the last 30.
    pb.register("rv-c", "13800138320")
    earlier = pb.ready_rebind("rv-c", "13800138320", "13700137320")
    pb.complete("rv-c", earlier.rebind_id)
    clock.advance(timedelta(days=40))

    started_at = clock.now()
    rebind = pb.start("rv-c", "13900139320", lost=True)
    clock.advance(timedelta(minutes=2))
    pb.identity("rv-c", rebind.rebind_id)
    clock.advance(timedelta(minutes=3))
    pb.send_and_verify("rv-c", rebind.rebind_id, NEW, "13900139320")
    last_step_at = clock.now()
    clock.advance(timedelta(minutes=4))

    case = desk.GetReview(rapi.GetReviewRequest(rebind_id=rebind.rebind_id)).review
    assert case.rebind.old_phone_masked == "137****7320"
    assert case.rebind.new_phone_masked == "139****9320"
    assert case.account.phone_masked == "137****7320"
    assert case.account.id_number_masked == "110***********002X"
    assert case.account.holder_name_masked == "张*"
    assert case.rebind.risk.decision == res.RISK_DECISION_REVIEW
    # The score is the signals' weights added up; the ID card is from Beijing, the
    # new number is not.
    assert [(s.code, s.weight) for s in case.signals] == [
        ("OLD_PHONE_LOST", 35),
        ("REGION_MISMATCH", 10),
    ]
    assert case.rebind.risk.score == 45
    assert case.signals[0].explanation == "用户表示原手机号已丢失，无法用原手机号接收验证码。"
    assert case.signals[1].explanation == "新手机号归属地与身份证签发地所在省份不一致。"
    assert (case.changes_last_30_days, case.changes_last_365_days) == (0, 1)
    assert [(s.step, s.method) for s in case.steps] == [
        (res.REBIND_STEP_IDENTITY, "KYC_MATCH"),
        (res.REBIND_STEP_NEW_PHONE_CODE, "SMS_CODE_NEW_NUMBER"),
    ]
    assert case.steps[0].complete_time.ToDatetime(tzinfo=UTC) == started_at + timedelta(minutes=2)
    assert case.steps[1].complete_time.ToDatetime(tzinfo=UTC) == last_step_at
    assert "139****9320" in case.steps[1].description
    assert case.readiness == rapi.REVIEW_READINESS_READY
    # Ready since the customer's last step, four minutes ago.
    assert case.waiting_since.ToDatetime(tzinfo=UTC) == last_step_at
    assert case.waiting.ToTimedelta() == timedelta(minutes=4)
    assert case.rebind.review.approvals_required == 1

    # The same case in the queue; nothing in either answer is a full number or ID.
    listed = desk.ListReviews(rapi.ListReviewsRequest(account_id="rv-c"))
    assert listed.reviews[0] == case
    for answer in (case, listed):
        text = str(answer) + answer.SerializeToString().decode("utf-8", "replace")
        for secret in ("13800138320", "13700137320", "13900139320", "11010519491231002X"):
            assert secret not in text

    approved = approve(desk, rebind.rebind_id, person="li", note="called back").review
    assert approved.readiness == rapi.REVIEW_READINESS_UNSPECIFIED
    assert not approved.HasField("waiting")
    assert approved.steps[-1].method == "REVIEWER_APPROVAL"
    assert approved.steps[-1].description == "审核人 dev-anonymous:li 已批准。"
    assert approved.steps[-1].complete_time.ToDatetime(tzinfo=UTC) == clock.now()

    with pytest.raises(grpc.RpcError) as caught:
        desk.GetReview(rapi.GetReviewRequest(rebind_id=earlier.rebind_id))
    assert error_details(caught.value)[1] == "STEP_NOT_REQUIRED"
    with pytest.raises(grpc.RpcError) as caught:
        desk.GetReview(rapi.GetReviewRequest(rebind_id="rb_nosuchrebind"))
    assert error_details(caught.value)[:2] == (grpc.StatusCode.NOT_FOUND, "REBIND_NOT_FOUND")


def test_texts_follow_the_callers_language(server, desk):
    pb = server.api
    rebind = lost_phone_rebind(server, "rv-l", "13800138330", "13900139330")
    english = (("accept-language", "en-GB,en;q=0.9"),)
    case = desk.GetReview(rapi.GetReviewRequest(rebind_id=rebind.rebind_id), metadata=english)
    assert case.review.signals[0].explanation == (
        "The user says the old phone is lost, so no code could reach the old number."
    )
    assert case.review.steps[0].description == (
        "The holder name and ID number matched the KYC record."
    )
    assert case.review.rebind.notices[0].code == "REVIEW_IN_PROGRESS"
    assert case.review.rebind.notices[0].text.startswith("For your safety")

    chinese = (("accept-language", "zh-CN"),)
    case = desk.GetReview(rapi.GetReviewRequest(rebind_id=rebind.rebind_id), metadata=chinese)
    assert case.review.steps[0].description == "姓名和身份证号码与实名信息一致。"
    assert case.review.rebind.notices[0].text.startswith("为保障账户安全")

    # Error texts for the end user too.
    approve(desk, rebind.rebind_id)
    with pytest.raises(grpc.RpcError) as caught:
        desk.ApproveRebind(rapi.ApproveRebindRequest(rebind_id=rebind.rebind_id), metadata=english)
    assert error_details(caught.value)[2]["LocalizedMessage"].message == (
        "This check is already done."
    )
    assert pb.get_rebind("rv-l", rebind.rebind_id).review.state == res.REVIEW_STATE_APPROVED


# -- who decides: the authenticated caller, or the person a console acts for --------

TOKENS = {name: new_token() for name in ("app", "desk", "console", "auditor")}
CALLERS = f"""
[[caller]]
name = "app"
roles = ["kyc", "flow", "reader"]
token_sha256 = "{token_digest(TOKENS["app"])}"

[[caller]]
name = "desk"
roles = ["reviewer"]
token_sha256 = "{token_digest(TOKENS["desk"])}"

[[caller]]
name = "console"
roles = ["reviewer"]
token_sha256 = "{token_digest(TOKENS["console"])}"
delegate = true

[[caller]]
name = "auditor"
roles = ["auditor"]
token_sha256 = "{token_digest(TOKENS["auditor"])}"
"""


class Bearer(grpc.UnaryUnaryClientInterceptor):
    """Sends a caller's token (and any extra metadata) with every call."""

    def __init__(self, token: str, *extra: tuple[str, str]) -> None:
        self._metadata = (("authorization", f"Bearer {token}"), *extra)

    def intercept_unary_unary(self, continuation, details, request):
        metadata = (*(details.metadata or ()), *self._metadata)
        return continuation(details._replace(metadata=metadata), request)


@pytest.fixture
def guarded(database_url, tmp_path, clock, secrets_seen):
    path = tmp_path / "callers.toml"
    path.write_text(CALLERS, encoding="utf-8")
    running = start_server(database_url, tmp_path, clock, secrets_seen, credentials_file=str(path))
    running.api = Api(
        grpc.intercept_channel(running.channel, Bearer(TOKENS["app"])),
        running.inbox,
        running.secrets,
    )
    yield running
    running.stop()


def desk_of(running, caller: str, *extra: tuple[str, str]):
    channel = grpc.intercept_channel(running.channel, Bearer(TOKENS[caller], *extra))
    return rapi_grpc.ReviewServiceStub(channel)


def test_the_reviewer_is_the_caller_or_the_person_a_console_acts_for(guarded):
    pb = guarded.api
    first = lost_phone_rebind(guarded, "rv-w1", "13800138340", "13900139340")
    second = lost_phone_rebind(guarded, "rv-w2", "13800138341", "13900139341")

    # The request's reviewer field is ignored: the caller's name is recorded.
    approved = (
        desk_of(guarded, "desk")
        .ApproveRebind(rapi.ApproveRebindRequest(rebind_id=first.rebind_id, reviewer="mallory"))
        .rebind
    )
    assert approved.review.reviewer == "desk"
    assert [a.reviewer for a in approved.review.approvals] == ["desk"]

    console = desk_of(guarded, "console", ("x-phonebind-on-behalf-of", "alice"))
    rejected = console.RejectRebind(
        rapi.RejectRebindRequest(rebind_id=second.rebind_id, reviewer="bob", reason="no callback")
    ).rebind
    assert rejected.review.reviewer == "console:alice"
    assert pb.get_rebind("rv-w2", second.rebind_id).review.reviewer == "console:alice"

    # The decisions are audited under those names.
    audit = aapi_grpc.AuditServiceStub(
        grpc.intercept_channel(guarded.channel, Bearer(TOKENS["auditor"]))
    )
    decisions = {
        (e.action, e.caller, e.details["reviewer"])
        for account in ("rv-w1", "rv-w2")
        for e in audit.ListAuditEvents(aapi.ListAuditEventsRequest(account_id=account)).events
        if e.action.startswith("REVIEW_")
    }
    assert decisions == {
        ("REVIEW_APPROVED", "desk", "desk"),
        ("REVIEW_REJECTED", "console:alice", "console:alice"),
    }


@pytest.mark.parametrize(
    ("caller", "person", "status"),
    [
        # Only a credential marked delegate may act for someone.
        ("desk", "alice", grpc.StatusCode.PERMISSION_DENIED),
        ("console", "", grpc.StatusCode.UNAUTHENTICATED),
        ("console", "a" * 65, grpc.StatusCode.UNAUTHENTICATED),
        ("console", "alice:admin", grpc.StatusCode.UNAUTHENTICATED),
        ("console", "ali ce", grpc.StatusCode.UNAUTHENTICATED),
        ("console", "<alice>", grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_acting_for_someone_is_refused_unless_allowed_and_well_formed(
    guarded, caller, person, status
):
    rebind = lost_phone_rebind(guarded, "rv-d", "13800138350", "13900139350")
    before = guarded.snapshot()
    desk = desk_of(guarded, caller, ("x-phonebind-on-behalf-of", person))
    with pytest.raises(grpc.RpcError) as caught:
        desk.ApproveRebind(rapi.ApproveRebindRequest(rebind_id=rebind.rebind_id))
    code, reason, details = error_details(caught.value)
    assert (code, reason) == (status, status.name)
    assert dict(details["ErrorInfo"].metadata) == {"header": "x-phonebind-on-behalf-of"}
    assert guarded.snapshot() == before


def test_a_console_acting_for_two_people_at_once_is_refused(guarded):
    rebind = lost_phone_rebind(guarded, "rv-d2", "13800138351", "13900139351")
    desk = desk_of(
        guarded,
        "console",
        ("x-phonebind-on-behalf-of", "alice"),
        ("x-phonebind-on-behalf-of", "bob"),
    )
    with pytest.raises(grpc.RpcError) as caught:
        desk.ApproveRebind(rapi.ApproveRebindRequest(rebind_id=rebind.rebind_id))
    assert error_details(caught.value)[:2] == (
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )


@pytest.fixture
def two_reviewers(database_url, tmp_path, clock, secrets_seen):
    running = start_server(
        database_url,
        tmp_path,
        clock,
        secrets_seen,
        env={"PHONEBIND_POLICY_LOST_PHONE_REVIEWERS": "2"},
    )
    yield running
    running.stop()


def test_a_lost_phone_rebind_can_require_two_different_reviewers(two_reviewers):
    server = two_reviewers
    pb = server.api
    desk = rapi_grpc.ReviewServiceStub(server.channel)
    rebind = lost_phone_rebind(server, "rv-2r", "13800138360", "13900139360")
    pb.send_and_verify("rv-2r", rebind.rebind_id, NEW, "13900139360")

    once = approve(desk, rebind.rebind_id, person="alice", note="ID photo matches").review
    assert once.rebind.state == res.REBIND_STATE_AWAITING_REVIEW
    assert once.rebind.review.state == res.REVIEW_STATE_PENDING
    assert once.rebind.review.approvals_required == 2
    assert [(a.reviewer, a.note) for a in once.rebind.review.approvals] == [
        ("dev-anonymous:alice", "ID photo matches")
    ]
    assert once.readiness == rapi.REVIEW_READINESS_READY  # still in the queue
    assert ids(desk.ListReviews(rapi.ListReviewsRequest())) == [rebind.rebind_id]

    # The same reviewer again: refused, and nothing changes.
    before = server.snapshot()
    with pytest.raises(grpc.RpcError) as caught:
        approve(desk, rebind.rebind_id, person="alice")
    code, reason, details = error_details(caught.value)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_APPROVED_BY_YOU")
    assert details["ErrorInfo"].metadata["approvals_required"] == "2"
    assert server.snapshot() == before
    with pytest.raises(grpc.RpcError):
        pb.complete("rv-2r", rebind.rebind_id)

    twice = approve(desk, rebind.rebind_id, person="bob").review
    assert twice.rebind.state == res.REBIND_STATE_READY
    assert twice.rebind.review.state == res.REVIEW_STATE_APPROVED
    assert twice.rebind.review.reviewer == "dev-anonymous:bob"
    assert [a.reviewer for a in twice.rebind.review.approvals] == [
        "dev-anonymous:alice",
        "dev-anonymous:bob",
    ]
    assert pb.complete("rv-2r", rebind.rebind_id).account.phone_masked == "139****9360"

    # A rebind whose old phone is in hand still needs one reviewer.
    pb.register("rv-2r-b", "13800138361")
    virtual = pb.start("rv-2r-b", "17000170361")
    assert list(virtual.risk.reasons)[:1] == ["VIRTUAL_OPERATOR"]
    assert virtual.review.approvals_required == 1
    pb.identity("rv-2r-b", virtual.rebind_id)
    approved = approve(desk, virtual.rebind_id, person="alice").rebind
    assert approved.review.state == res.REVIEW_STATE_APPROVED
    assert res.REBIND_STEP_REVIEW in approved.completed_steps
