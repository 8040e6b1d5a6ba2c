"""The rebind rules at the level of the use cases: start, risk, identity, codes,
completion and holds, on the in-memory store and an injected clock."""

from __future__ import annotations

from datetime import timedelta

from service_world import NEW, OLD, OTHER_ID, World, beijing, refused

from phonebind_server.domain.errors import Reason
from phonebind_server.domain.model import RebindState, RiskDecision, Standing, Step
from phonebind_server.domain.policy import Policy
from phonebind_server.domain.review import ReviewFilter
from phonebind_server.domain.status import ReviewStatus, rebind_status

TICK = timedelta(microseconds=1)


# -- starting -----------------------------------------------------------------------


def test_a_plain_start_asks_for_identity_and_both_codes():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    assert rebind.state is RebindState.PENDING
    assert rebind.required == (Step.IDENTITY, Step.OLD_PHONE_CODE, Step.NEW_PHONE_CODE)
    assert rebind.risk.decision is RiskDecision.ALLOW and rebind.risk.reasons == ()
    assert rebind.expires_at == w.clock.now() + w.policy.rebind_ttl
    assert rebind.old_phone_masked == "138****0001"
    assert w.actions("a-1") == ["ACCOUNT_REGISTERED", "REBIND_STARTED"]


def test_a_lost_phone_skips_the_old_code_and_needs_review():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2), lost=True)
    assert rebind.required == (Step.IDENTITY, Step.NEW_PHONE_CODE, Step.REVIEW)
    assert rebind.risk.decision is RiskDecision.REVIEW
    assert rebind.risk.reasons == ("OLD_PHONE_LOST",)


def test_start_refusals_without_a_trace_in_the_state():
    w = World()
    refused(Reason.ACCOUNT_NOT_FOUND, lambda: w.start("nobody", beijing(2)))
    w.register("a-1", beijing(1))
    before = w.store.tables.rebinds.copy()
    refused(Reason.SAME_PHONE, lambda: w.start("a-1", "+86" + beijing(1)))
    assert w.store.tables.rebinds == before
    # ...but the refused start is counted towards the daily cap.
    assert len(w.store.tables.refused_starts) == 1


def test_a_new_start_closes_the_open_rebind():
    w = World()
    w.register("a-1", beijing(1))
    first = w.start("a-1", beijing(2))
    second = w.start("a-1", beijing(3))
    rebinds = w.store.tables.rebinds
    assert rebinds[first.rebind_id].state is RebindState.CANCELLED
    assert rebinds[second.rebind_id].state is RebindState.PENDING
    # An expired one is closed as EXPIRED, not CANCELLED.
    w.advance(w.policy.rebind_ttl)
    w.start("a-1", beijing(4))
    assert w.store.tables.rebinds[second.rebind_id].state is RebindState.EXPIRED
    assert "REBIND_CANCELLED" in w.actions("a-1") and "REBIND_EXPIRED" in w.actions("a-1")


def test_starts_per_account_day_count_refused_starts_and_free_up_exactly():
    w = World(Policy(starts_per_account_day=3))
    w.register("a-1", beijing(1))
    w.start("a-1", beijing(2))
    refused(Reason.SAME_PHONE, lambda: w.start("a-1", beijing(1)))  # counts too
    w.advance(timedelta(hours=1))
    w.start("a-1", beijing(3))
    error = refused(Reason.RATE_LIMITED, lambda: w.start("a-1", beijing(4)))
    # The first start leaves the 24 h window in 23 h.
    assert error.retry_after == timedelta(hours=23)
    assert error.metadata["retry_after_seconds"] == str(23 * 3600)
    w.advance(timedelta(hours=23) - TICK)
    refused(Reason.RATE_LIMITED, lambda: w.start("a-1", beijing(4)))
    w.advance(TICK)
    assert w.start("a-1", beijing(4)).state is RebindState.PENDING


# -- risk ---------------------------------------------------------------------------


def test_second_change_within_30_days_is_reviewed_and_not_after():
    w = World()
    w.register("a-1", beijing(1))
    w.change("a-1", beijing(1), beijing(2))
    w.advance(timedelta(days=30))
    risk = w.start("a-1", beijing(3)).risk
    assert risk.decision is RiskDecision.REVIEW and "FREQUENT_CHANGES" in risk.reasons
    w.advance(TICK)
    risk = w.start("a-1", beijing(3)).risk
    assert risk.decision is RiskDecision.ALLOW and risk.reasons == ()


def test_fourth_change_within_a_year_is_denied_and_the_refusal_counts():
    w = World(Policy(review_change_count=10))  # only the deny rule in play
    w.register("a-1", beijing(1))
    for n in range(1, 4):
        w.change("a-1", beijing(n), beijing(n + 1))
        w.advance(timedelta(days=31))
    w.advance(timedelta(days=365 - 3 * 31))  # the first change is exactly a year old
    error = refused(Reason.RISK_DENIED, lambda: w.start("a-1", beijing(9)))
    assert error.metadata["reasons"] == "FREQUENT_CHANGES"
    assert w.store.tables.refused_starts[-1] == ("a-1", w.clock.now())
    w.advance(TICK)
    assert w.start("a-1", beijing(9)).risk.decision is RiskDecision.ALLOW


def test_number_released_by_another_account_within_90_days():
    w = World()
    w.register("a-1", beijing(1))
    w.register("a-2", beijing(5), id_number=OTHER_ID)
    w.change("a-1", beijing(1), beijing(2))  # a-1 releases beijing(1)
    w.advance(timedelta(days=90))
    risk = w.start("a-2", beijing(1)).risk
    assert risk.reasons == ("NUMBER_RECENTLY_RELEASED",)
    assert risk.decision is RiskDecision.REVIEW
    w.advance(TICK)
    assert w.start("a-2", beijing(1)).risk.reasons == ()


def test_a_number_the_account_released_itself_is_no_signal():
    w = World()
    w.register("a-1", beijing(1))
    w.change("a-1", beijing(1), beijing(2))
    w.advance(timedelta(days=31))
    assert "NUMBER_RECENTLY_RELEASED" not in w.start("a-1", beijing(1)).risk.reasons


def test_virtual_operator_cool_off_and_region_signals():
    w = World()
    w.register("a-1", beijing(1))
    risk = w.start("a-1", "17012345678").risk
    assert "VIRTUAL_OPERATOR" in risk.reasons and risk.decision is RiskDecision.REVIEW
    # Another province's range only adds to the score.
    risk = w.start("a-1", "13900139000").risk
    assert risk.reasons == ("REGION_MISMATCH",) and risk.decision is RiskDecision.ALLOW
    assert risk.score == 10
    w.change("a-1", beijing(1), beijing(2))
    w.advance(timedelta(days=31))  # past the 30-day window, inside no other
    assert w.start("a-1", beijing(3)).risk.reasons == ()
    w2 = World(Policy(review_change_count=10))
    w2.register("b-1", beijing(1))
    w2.change("b-1", beijing(1), beijing(2))
    w2.advance(w2.policy.hold - TICK)
    risk = w2.start("b-1", beijing(3)).risk
    assert risk.reasons == ("IN_COOL_OFF",) and risk.decision is RiskDecision.REVIEW


# -- identity -----------------------------------------------------------------------


def test_identity_matches_on_normalised_name_and_lowercase_x():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    done = w.identity("a-1", rebind.rebind_id, name=" 张三 ", id_number="11010519491231002x")
    assert done.completed == (Step.IDENTITY,)
    refused(Reason.STEP_ALREADY_DONE, lambda: w.identity("a-1", rebind.rebind_id))


def test_identity_mismatch_counts_and_tells_the_smaller_allowance():
    w = World(Policy(identity_failures_per_account_day=3, rebind_max_failures=10))
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    error = refused(Reason.IDENTITY_MISMATCH, lambda: w.identity("a-1", rebind.rebind_id, "李四"))
    assert error.metadata["attempts_left"] == "2"  # the account's daily cap, not the rebind's 9
    assert error.audited
    assert w.store.tables.rebinds[rebind.rebind_id].failures == 1
    # A wrong ID number with the right name is told apart no better.
    error = refused(
        Reason.IDENTITY_MISMATCH,
        lambda: w.identity("a-1", rebind.rebind_id, id_number=OTHER_ID),
    )
    assert error.metadata["attempts_left"] == "1"


def test_identity_failures_lock_rebinding_for_the_lockout_then_free_it():
    w = World(Policy(identity_failures_per_account_day=2))
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    refused(Reason.IDENTITY_MISMATCH, lambda: w.identity("a-1", rebind.rebind_id, "李四"))
    error = refused(Reason.ACCOUNT_LOCKED, lambda: w.identity("a-1", rebind.rebind_id, "李四"))
    until = w.clock.now() + w.policy.identity_lockout
    assert error.retry_after == w.policy.identity_lockout
    assert error.metadata["locked_until"] == until.isoformat()
    account = w.service.get_account(w.call, "a-1")
    assert account.standing_at(w.clock.now()) is Standing.REBIND_LOCKED
    # The rebind itself is locked for good; so is starting another, until the lockout ends.
    refused(Reason.REBIND_LOCKED, lambda: w.identity("a-1", rebind.rebind_id))
    refused(Reason.ACCOUNT_LOCKED, lambda: w.start("a-1", beijing(3)))
    assert "ACCOUNT_LOCKED" in w.actions("a-1")
    w.advance(w.policy.identity_lockout)
    assert w.start("a-1", beijing(3)).state is RebindState.PENDING


def test_wrong_answers_across_identity_and_codes_lock_the_rebind():
    w = World(Policy(rebind_max_failures=3, identity_failures_per_account_day=5))
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    refused(Reason.IDENTITY_MISMATCH, lambda: w.identity("a-1", rebind.rebind_id, "李四"))
    w.send("a-1", rebind.rebind_id, OLD)
    wrong = _wrong(w.last_code(beijing(1)))
    error = refused(Reason.CODE_MISMATCH, lambda: w.verify("a-1", rebind.rebind_id, OLD, wrong))
    assert error.metadata["attempts_left"] == "1"
    refused(Reason.REBIND_LOCKED, lambda: w.verify("a-1", rebind.rebind_id, OLD, wrong))
    # Locked: even the right answer is refused, but cancelling is allowed.
    refused(Reason.REBIND_LOCKED, lambda: w.identity("a-1", rebind.rebind_id))
    cancelled = w.service.cancel_rebind(w.call, "a-1", rebind.rebind_id)
    assert cancelled.state is RebindState.CANCELLED


# -- codes --------------------------------------------------------------------------


def _wrong(code: str) -> str:
    return code[:-1] + str((int(code[-1]) + 1) % 10)


def test_code_send_and_resend_cooldown_on_the_clock():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    sent = w.send("a-1", rebind.rebind_id, OLD)
    assert sent.expires_at == w.clock.now() + w.policy.code_ttl
    assert sent.resend_at == w.clock.now() + w.policy.resend_cooldown
    assert sent.attempts_left == w.policy.code_max_attempts
    assert len(w.texts_to(beijing(1))) == 1 and w.texts_to(beijing(2)) == []
    w.advance(w.policy.resend_cooldown - timedelta(seconds=1))
    error = refused(Reason.RESEND_TOO_SOON, lambda: w.send("a-1", rebind.rebind_id, OLD))
    assert error.metadata["retry_after_seconds"] == "1"
    w.advance(timedelta(seconds=1))
    first = w.last_code(beijing(1))
    w.send("a-1", rebind.rebind_id, OLD)
    # A new code replaces the old one: the old one no longer works.
    second = w.last_code(beijing(1))
    assert first != second
    refused(Reason.CODE_MISMATCH, lambda: w.verify("a-1", rebind.rebind_id, OLD, first))
    done = w.verify("a-1", rebind.rebind_id, OLD, second)
    assert Step.OLD_PHONE_CODE in done.completed


def test_a_code_expires_at_its_ttl():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    w.send("a-1", rebind.rebind_id, NEW)
    code = w.last_code(beijing(2))
    w.advance(w.policy.code_ttl)
    refused(Reason.CODE_EXPIRED, lambda: w.verify("a-1", rebind.rebind_id, NEW, code))
    # Nothing counted against the rebind for an expired code.
    assert w.store.tables.rebinds[rebind.rebind_id].failures == 0


def test_a_code_burns_after_its_attempts_and_a_new_one_works():
    w = World(Policy(code_max_attempts=2))
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    w.send("a-1", rebind.rebind_id, OLD)
    code = w.last_code(beijing(1))
    error = refused(
        Reason.CODE_MISMATCH, lambda: w.verify("a-1", rebind.rebind_id, OLD, _wrong(code))
    )
    assert error.metadata["attempts_left"] == "1"
    error = refused(
        Reason.CODE_MISMATCH, lambda: w.verify("a-1", rebind.rebind_id, OLD, _wrong(code))
    )
    assert error.metadata["attempts_left"] == "0"
    refused(Reason.CODE_ATTEMPTS_EXHAUSTED, lambda: w.verify("a-1", rebind.rebind_id, OLD, code))
    w.advance(w.policy.resend_cooldown)
    done = w.send_and_verify("a-1", rebind.rebind_id, OLD, beijing(1))
    assert done.failures == 2 and Step.OLD_PHONE_CODE in done.completed


def test_verify_without_a_code_and_a_used_code():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    refused(Reason.NO_ACTIVE_CODE, lambda: w.verify("a-1", rebind.rebind_id, OLD, "123456"))
    w.send_and_verify("a-1", rebind.rebind_id, OLD, beijing(1))
    code = w.last_code(beijing(1))
    refused(Reason.STEP_ALREADY_DONE, lambda: w.verify("a-1", rebind.rebind_id, OLD, code))
    refused(Reason.STEP_ALREADY_DONE, lambda: w.send("a-1", rebind.rebind_id, OLD))


def test_sends_per_number_are_capped_per_hour_across_accounts():
    w = World(
        Policy(
            sends_per_number_hour=2,
            resend_cooldown=timedelta(seconds=1),
            rebind_ttl=timedelta(days=1),
        )
    )
    w.register("a-1", beijing(1))
    w.register("a-2", beijing(5), id_number=OTHER_ID)
    first = w.start("a-1", beijing(2))
    other = w.start("a-2", beijing(2))  # the same new number, another account
    w.send("a-1", first.rebind_id, NEW)
    w.advance(timedelta(minutes=10))
    w.send("a-2", other.rebind_id, NEW)
    w.advance(timedelta(minutes=10))
    error = refused(Reason.RATE_LIMITED, lambda: w.send("a-1", first.rebind_id, NEW))
    assert error.retry_after == timedelta(minutes=40)
    assert error.quota[0].subject == "phone:138****0002"
    w.advance(timedelta(minutes=40))
    w.send("a-1", first.rebind_id, NEW)


def test_sends_per_number_day():
    w = World(
        Policy(sends_per_number_hour=100, sends_per_number_day=3, rebind_ttl=timedelta(days=1))
    )
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    for _ in range(3):
        w.send("a-1", rebind.rebind_id, OLD)
        w.advance(timedelta(hours=2))
    error = refused(Reason.RATE_LIMITED, lambda: w.send("a-1", rebind.rebind_id, OLD))
    assert "per day" in error.metadata["limit"]


def test_a_bound_new_number_is_told_only_after_its_code():
    w = World()
    w.register("a-1", beijing(1))
    w.register("a-2", beijing(5), id_number=OTHER_ID)
    rebind = w.start("a-1", beijing(5))  # a-2's number: the start does not tell
    assert rebind.state is RebindState.PENDING
    w.send("a-1", rebind.rebind_id, NEW)
    code = w.last_code(beijing(5))
    error = refused(Reason.PHONE_IN_USE, lambda: w.verify("a-1", rebind.rebind_id, NEW, code))
    assert error.audited
    assert Step.NEW_PHONE_CODE not in w.store.tables.rebinds[rebind.rebind_id].completed


# -- expiry, ownership, cancelling ----------------------------------------------------


def test_an_open_rebind_expires_at_its_ttl():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    w.advance(w.policy.rebind_ttl - TICK)
    assert w.service.get_rebind(w.call, "a-1", rebind.rebind_id).state is RebindState.PENDING
    w.advance(TICK)
    assert w.service.get_rebind(w.call, "a-1", rebind.rebind_id).state is RebindState.EXPIRED
    refused(Reason.REBIND_EXPIRED, lambda: w.identity("a-1", rebind.rebind_id))
    refused(Reason.REBIND_EXPIRED, lambda: w.send("a-1", rebind.rebind_id, OLD))


def test_another_accounts_rebind_is_not_found():
    w = World()
    w.register("a-1", beijing(1))
    w.register("a-2", beijing(5), id_number=OTHER_ID)
    rebind = w.start("a-1", beijing(2))
    refused(Reason.REBIND_NOT_FOUND, lambda: w.service.get_rebind(w.call, "a-2", rebind.rebind_id))
    refused(Reason.REBIND_NOT_FOUND, lambda: w.identity("a-2", rebind.rebind_id))
    refused(Reason.REBIND_NOT_FOUND, lambda: w.service.get_rebind(w.call, "a-1", "rb_missing"))


def test_a_closed_rebind_takes_no_more_steps():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    w.service.cancel_rebind(w.call, "a-1", rebind.rebind_id)
    error = refused(Reason.REBIND_CLOSED, lambda: w.identity("a-1", rebind.rebind_id))
    assert error.metadata["state"] == "CANCELLED"


# -- completion and holds ------------------------------------------------------------


def test_complete_needs_every_step():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    w.identity("a-1", rebind.rebind_id)
    error = refused(Reason.STEP_REQUIRED, lambda: w.complete("a-1", rebind.rebind_id))
    assert error.metadata["missing_steps"] == "OLD_PHONE_CODE,NEW_PHONE_CODE"


def test_completion_moves_the_number_records_history_and_notifies_the_old_number():
    w = World()
    w.register("a-1", beijing(1))
    done = w.change("a-1", beijing(1), beijing(2))
    now = w.clock.now()
    assert done.rebind.state is RebindState.COMPLETED and done.rebind.completed_at == now
    assert done.account.phone.masked == "138****0002" and done.account.bound_at == now
    assert done.account.hold_until == now + w.policy.hold
    assert done.account.standing_at(now) is Standing.COOL_OFF
    assert done.account.standing_at(now + w.policy.hold) is Standing.ACTIVE
    page = w.service.list_history(w.call, "a-1", 0, None)
    assert [(c.old_phone.masked, c.new_phone.masked) for c in page.changes] == [
        ("138****0001", "138****0002")
    ]
    notices = w.texts_to(beijing(1), purpose="CHANGE_NOTICE")
    assert len(notices) == 1 and "138****0002" in notices[0] and beijing(2) not in notices[0]
    # The old number is free for another account now.
    w.register("a-2", beijing(1), id_number=OTHER_ID)
    assert w.audit_report().ok


def test_a_lost_phone_hold_is_longer_and_never_shortened_by_a_later_change():
    w = World(Policy(review_change_count=10))
    w.register("a-1", beijing(1))
    rebind = w.ready("a-1", beijing(1), beijing(2), lost=True)
    assert rebind.state is RebindState.AWAITING_REVIEW
    refused(Reason.REVIEW_PENDING, lambda: w.complete("a-1", rebind.rebind_id))
    w.desk.approve(w.as_reviewer("rev-1"), rebind.rebind_id, "called the holder")
    first = w.complete("a-1", rebind.rebind_id)
    lost_hold_end = w.clock.now() + w.policy.hold_old_phone_lost
    assert first.account.hold_until == lost_hold_end
    w.advance(timedelta(hours=1))
    rebind = w.ready("a-1", beijing(2), beijing(3))
    assert rebind.state is RebindState.AWAITING_REVIEW  # IN_COOL_OFF needs review
    w.desk.approve(w.as_reviewer("rev-1"), rebind.rebind_id, "")
    second = w.complete("a-1", rebind.rebind_id)
    assert second.account.hold_until == lost_hold_end  # not now + 24 h


def test_history_pages_newest_first():
    w = World(Policy(review_change_count=10, deny_change_count=10))
    w.register("a-1", beijing(1))
    for n in range(1, 4):
        w.change("a-1", beijing(n), beijing(n + 1))
        w.advance(w.policy.hold)
    first = w.service.list_history(w.call, "a-1", 2, None)
    assert [c.new_phone.masked for c in first.changes] == ["138****0004", "138****0003"]
    assert first.next_cursor is not None
    rest = w.service.list_history(w.call, "a-1", 2, first.next_cursor)
    assert [c.new_phone.masked for c in rest.changes] == ["138****0002"]
    assert rest.next_cursor is None
    refused(Reason.INVALID_ARGUMENT, lambda: w.service.list_history(w.call, "a-1", -1, None))


# -- what a reader is told ----------------------------------------------------------


def test_a_rebinds_status_follows_from_the_policy():
    w = World(Policy(lost_phone_reviewers=2, rebind_max_failures=4))
    w.register("a-1", beijing(1))
    plain = w.start("a-1", beijing(2))
    status = rebind_status(plain, w.policy)
    assert (status.attempts_left, status.hold, status.review) == (4, w.policy.hold, None)
    assert [code for code, _ in status.notices("en")] == ["COOL_OFF_HOLD", "OLD_NUMBER_NOTIFIED"]
    assert "24" in status.notices("en")[0][1]
    lost = w.start("a-1", beijing(3), lost=True)
    refused(Reason.IDENTITY_MISMATCH, lambda: w.identity("a-1", lost.rebind_id, "李四"))
    status = rebind_status(w.service.get_rebind(w.call, "a-1", lost.rebind_id), w.policy)
    assert (status.attempts_left, status.hold) == (3, w.policy.hold_old_phone_lost)
    assert status.review == ReviewStatus(ReviewFilter.PENDING, 2)
    assert status.notices("en")[0][0] == "REVIEW_IN_PROGRESS"
    # Past its lifetime: no notices, and a review no one can decide any more.
    w.advance(w.policy.rebind_ttl)
    expired = w.service.get_rebind(w.call, "a-1", lost.rebind_id)
    status = rebind_status(expired, w.policy)
    assert status.notices("en") == () and status.review == ReviewStatus(ReviewFilter.ABANDONED, 2)
