"""The review desk's rules at the level of the use cases, on the in-memory store."""

from __future__ import annotations

from datetime import timedelta

from service_world import MORE_IDS, NEW, OTHER_ID, World, beijing, refused

from phonebind_server.domain.errors import Reason
from phonebind_server.domain.model import RebindState, Step
from phonebind_server.domain.policy import Policy
from phonebind_server.domain.review import Readiness, ReviewFilter


def lost_phone_rebind(w: World, account_id: str = "a-1", *, identity: bool = True):
    w.register(account_id, beijing(1))
    rebind = w.start(account_id, beijing(2), lost=True)
    if identity:
        w.identity(account_id, rebind.rebind_id)
    return rebind


def test_approval_needs_the_identity_step_first():
    w = World()
    rebind = lost_phone_rebind(w, identity=False)
    error = refused(
        Reason.STEP_REQUIRED, lambda: w.desk.approve(w.as_reviewer("rev-1"), rebind.rebind_id, "")
    )
    assert error.metadata["missing_steps"] == "IDENTITY"


def test_approval_before_the_code_leaves_the_customer_step_then_ready():
    w = World()
    rebind = lost_phone_rebind(w)
    case = w.desk.approve(w.as_reviewer("rev-1"), rebind.rebind_id, "called back")
    assert case.rebind.state is RebindState.PENDING  # the new number's code is outstanding
    assert case.rebind.reviewer == "rev-1" and case.rebind.review_note == "called back"
    assert Step.REVIEW in case.rebind.completed
    done = w.send_and_verify("a-1", rebind.rebind_id, NEW, beijing(2))
    assert done.state is RebindState.READY
    assert w.complete("a-1", rebind.rebind_id).rebind.state is RebindState.COMPLETED
    refused(
        Reason.REBIND_CLOSED,
        lambda: w.desk.approve(w.as_reviewer("rev-2"), rebind.rebind_id, ""),
    )


def test_two_reviewers_for_a_lost_phone_when_the_policy_says_so():
    w = World(Policy(lost_phone_reviewers=2))
    rebind = lost_phone_rebind(w)
    first = w.desk.approve(w.as_reviewer("rev-1"), rebind.rebind_id, "")
    assert first.approvals_required == 2
    assert Step.REVIEW not in first.rebind.completed and len(first.rebind.approvals) == 1
    error = refused(
        Reason.ALREADY_APPROVED_BY_YOU,
        lambda: w.desk.approve(w.as_reviewer("rev-1"), rebind.rebind_id, ""),
    )
    assert error.metadata["approvals_required"] == "2"
    second = w.desk.approve(w.as_reviewer("rev-2"), rebind.rebind_id, "")
    assert Step.REVIEW in second.rebind.completed
    assert [a.reviewer for a in second.rebind.approvals] == ["rev-1", "rev-2"]
    assert w.actions("a-1")[-2:] == ["REVIEW_APPROVAL_RECORDED", "REVIEW_APPROVED"]


def test_rejection_closes_the_rebind_and_needs_a_reason():
    w = World()
    rebind = lost_phone_rebind(w, identity=False)
    refused(
        Reason.INVALID_ARGUMENT,
        lambda: w.desk.reject(w.as_reviewer("rev-1"), rebind.rebind_id, "  "),
    )
    case = w.desk.reject(w.as_reviewer("rev-1"), rebind.rebind_id, "not the holder")
    assert case.rebind.state is RebindState.REJECTED and case.readiness is None
    refused(Reason.REBIND_CLOSED, lambda: w.identity("a-1", rebind.rebind_id))
    assert w.desk.get(w.call, rebind.rebind_id).rebind.state is RebindState.REJECTED


def test_a_rebind_without_review_cannot_be_reviewed():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    refused(
        Reason.STEP_NOT_REQUIRED,
        lambda: w.desk.approve(w.as_reviewer("rev-1"), rebind.rebind_id, ""),
    )
    refused(Reason.STEP_NOT_REQUIRED, lambda: w.desk.get(w.call, rebind.rebind_id))


def test_pending_list_by_readiness_and_what_leaves_it():
    w = World(Policy(rebind_max_failures=1))
    waiting = lost_phone_rebind(w, "a-1")
    w.advance(timedelta(seconds=1))  # listed oldest first
    w.register("a-2", beijing(5), id_number=OTHER_ID)
    ready = w.start("a-2", beijing(6), lost=True)
    w.advance(timedelta(minutes=1))
    w.identity("a-2", ready.rebind_id, id_number=OTHER_ID)
    w.advance(timedelta(minutes=1))
    w.send_and_verify("a-2", ready.rebind_id, NEW, beijing(6))

    def listed(readiness: Readiness = Readiness.ANY) -> list[str]:
        page = w.desk.list(w.call, ReviewFilter.PENDING, 0, None, readiness=readiness)
        return [c.rebind.rebind_id for c in page.cases]

    assert listed() == [waiting.rebind_id, ready.rebind_id]
    assert listed(Readiness.READY) == [ready.rebind_id]
    assert listed(Readiness.WAITING) == [waiting.rebind_id]
    case = w.desk.get(w.call, ready.rebind_id)
    # Waiting since the customer's last step, not since the start.
    assert case.waiting_since == w.clock.now() and case.waiting == timedelta(0)
    assert case.signals == (("OLD_PHONE_LOST", 35),)
    # One wrong answer locks a-1's rebind (max 1): no reviewer can act on it.
    w.send("a-1", waiting.rebind_id, NEW)
    code = w.last_code(beijing(2))
    wrong = code[:-1] + str((int(code[-1]) + 1) % 10)
    refused(Reason.REBIND_LOCKED, lambda: w.verify("a-1", waiting.rebind_id, NEW, wrong))
    assert listed() == [ready.rebind_id]
    assert w.desk.get(w.call, waiting.rebind_id).rebind.state is RebindState.PENDING
    # Past its lifetime, the other leaves the list too.
    w.advance(w.policy.rebind_ttl)
    assert listed() == []


def test_decided_lists_and_paging():
    w = World()
    ids = []
    for n in range(3):
        w.register(f"a-{n}", beijing(10 + n), id_number=MORE_IDS[n])
        ids.append(w.start(f"a-{n}", beijing(20 + n), lost=True).rebind_id)
        w.advance(timedelta(seconds=1))
    for rebind_id in ids:
        w.desk.reject(w.as_reviewer("rev-1"), rebind_id, "no")
    first = w.desk.list(w.call, ReviewFilter.REJECTED, 2, None)
    assert [c.rebind.rebind_id for c in first.cases] == ids[:2]
    rest = w.desk.list(w.call, ReviewFilter.REJECTED, 2, first.next_cursor)
    assert [c.rebind.rebind_id for c in rest.cases] == ids[2:] and rest.next_cursor is None
    assert w.desk.list(w.call, ReviewFilter.APPROVED, 0, None).cases == []
    mine = w.desk.list(w.call, ReviewFilter.REJECTED, 0, None, account_id="a-1")
    assert [c.rebind.rebind_id for c in mine.cases] == [ids[1]]
    refused(
        Reason.INVALID_ARGUMENT,
        lambda: w.desk.list(w.call, ReviewFilter.REJECTED, 0, None, readiness=Readiness.READY),
    )


def test_a_decision_runs_in_the_unit_of_work_wrapper():
    """A decision that loses a race runs again; a refused one leaves nothing."""
    w = World()
    rebind = lost_phone_rebind(w)
    events = len(w.store.tables.events)
    w.store.conflicts_before_commit = ["unknown"]
    case = w.desk.approve(w.as_reviewer("rev-1"), rebind.rebind_id, "")
    assert Step.REVIEW in case.rebind.completed and w.store.conflicts_before_commit == []
    assert len(w.store.tables.events) == events + 1  # the first run's event was rolled back
    refused(
        Reason.STEP_ALREADY_DONE,
        lambda: w.desk.approve(w.as_reviewer("rev-2"), rebind.rebind_id, ""),
    )
    assert len(w.store.tables.events) == events + 1
