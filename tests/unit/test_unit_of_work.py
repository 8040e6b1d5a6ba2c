"""What every use case's unit of work guarantees: idempotent replay, the bounded
retry on conflicts, rollback of refusals and of calls whose caller left, and
counted wrong answers that stick. On the in-memory store."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta

import pytest
from service_world import HOLDER, ID_NUMBER, NEW, OLD, OTHER_ID, World, beijing, refused

from phonebind_server.domain.errors import Reason
from phonebind_server.domain.model import RebindState
from phonebind_server.domain.ports import DeadlinePassed
from phonebind_server.domain.unit_of_work import CONFLICT_RUNS

# -- idempotent replay --------------------------------------------------------------


def test_register_replays_by_request_id_alone():
    """Whatever the other fields: were they compared, the answer would tell
    whether a guessed name or ID number is the record's."""
    w = World()
    register = w.service.register_account
    first = register(w.call, "a-1", HOLDER, ID_NUMBER, beijing(1), request_id="r-1")
    events = len(w.store.tables.events)
    again = register(w.call, "a-1", HOLDER, ID_NUMBER, beijing(1), request_id="r-1")
    guessed = register(w.call, "a-1", "李四", OTHER_ID, beijing(2), request_id="r-1")
    assert again == first and guessed == first
    assert len(w.store.tables.events) == events and list(w.store.tables.accounts) == ["a-1"]
    # Without a request_id, or with another, the same call is a second registration.
    refused(Reason.ACCOUNT_EXISTS, lambda: register(w.call, "a-1", HOLDER, ID_NUMBER, beijing(1)))
    refused(
        Reason.ACCOUNT_EXISTS,
        lambda: register(w.call, "a-1", "李四", OTHER_ID, beijing(1), request_id="r-2"),
    )


def test_start_replays_the_same_rebind_as_it_stands_now():
    w = World()
    w.register("a-1", beijing(1))
    first = w.start("a-1", beijing(2), request_id="s-1")
    w.identity("a-1", first.rebind_id)
    again = w.start("a-1", beijing(2), request_id="s-1")
    assert again.rebind_id == first.rebind_id and len(w.store.tables.rebinds) == 1
    assert again.completed != first.completed  # the replay shows the rebind now
    w.advance(w.policy.rebind_ttl)
    assert w.start("a-1", beijing(2), request_id="s-1").state is RebindState.EXPIRED
    refused(Reason.REQUEST_ID_REUSED, lambda: w.start("a-1", beijing(3), request_id="s-1"))
    refused(
        Reason.REQUEST_ID_REUSED, lambda: w.start("a-1", beijing(2), lost=True, request_id="s-1")
    )


def test_send_code_replays_without_a_second_message_or_cooldown():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    sent = w.send("a-1", rebind.rebind_id, OLD, request_id="c-1")
    w.advance(timedelta(seconds=5))
    assert w.send("a-1", rebind.rebind_id, OLD, request_id="c-1") == sent
    assert len(w.texts_to(beijing(1))) == 1
    refused(Reason.RESEND_TOO_SOON, lambda: w.send("a-1", rebind.rebind_id, OLD))
    refused(
        Reason.REQUEST_ID_REUSED, lambda: w.send("a-1", rebind.rebind_id, NEW, request_id="c-1")
    )


def test_complete_replays_after_the_change():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.ready("a-1", beijing(1), beijing(2))
    done = w.complete("a-1", rebind.rebind_id, request_id="k-1")
    again = w.complete("a-1", rebind.rebind_id, request_id="k-1")
    assert again.rebind == done.rebind and again.account.phone == done.account.phone
    assert len(w.store.tables.changes) == 1
    assert len(w.texts_to(beijing(1), purpose="CHANGE_NOTICE")) == 1
    # Without the request_id it is a call on a closed rebind.
    refused(Reason.REBIND_CLOSED, lambda: w.complete("a-1", rebind.rebind_id))


def test_a_refused_keyed_call_is_not_remembered():
    w = World()
    w.register("a-1", beijing(1))
    refused(Reason.SAME_PHONE, lambda: w.start("a-1", beijing(1), request_id="s-1"))
    assert w.store.tables.requests == {}
    # The refusal counted towards the daily cap nonetheless, committed.
    assert len(w.store.tables.refused_starts) == 1
    # The same request_id with another number is a new call, not a reuse.
    assert w.start("a-1", beijing(2), request_id="s-1").state is RebindState.PENDING


# -- conflicts ----------------------------------------------------------------------


def test_a_conflict_runs_the_unit_again_a_bounded_number_of_times():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    w.store.conflicts_before_commit = ["unknown"] * CONFLICT_RUNS
    done = w.identity("a-1", rebind.rebind_id)
    assert done.completed and w.store.conflicts_before_commit == []
    w.send("a-1", rebind.rebind_id, OLD)
    commits = w.store.commits
    w.store.conflicts_before_commit = ["unknown"] * (CONFLICT_RUNS + 2)
    error = refused(
        Reason.STORE_UNAVAILABLE, lambda: w.verify("a-1", rebind.rebind_id, OLD, "0" * 6)
    )
    assert error.retry_after is not None
    # One first run and CONFLICT_RUNS more, each rolled back; nothing counted.
    assert len(w.store.conflicts_before_commit) == 1 and w.store.commits == commits
    assert w.store.tables.rebinds[rebind.rebind_id].failures == 0


def test_named_conflicts_become_their_errors_at_once():
    w = World()
    w.register("a-1", beijing(1))
    w.store.conflicts_before_commit = ["open_rebind", "open_rebind"]
    error = refused(Reason.STORE_UNAVAILABLE, lambda: w.start("a-1", beijing(2)))
    assert "another rebind" in error.message
    assert w.store.conflicts_before_commit == ["open_rebind"]  # not run again
    w.store.conflicts_before_commit = []
    rebind = w.ready("a-1", beijing(1), beijing(2))
    w.store.conflicts_before_commit = ["phone"]
    refused(Reason.PHONE_IN_USE, lambda: w.complete("a-1", rebind.rebind_id))
    assert w.store.tables.accounts["a-1"].phone.masked == "138****0001"


def test_the_store_refuses_a_second_owner_of_a_number():
    """Registration checks the owner first; the store's rule holds behind it."""
    w = World()
    w.register("a-1", beijing(1))
    refused(
        Reason.PHONE_IN_USE,
        lambda: w.service.register_account(w.call, "a-2", HOLDER, OTHER_ID, beijing(1)),
    )
    assert list(w.store.tables.accounts) == ["a-1"]


# -- a caller who stopped waiting -----------------------------------------------------


def test_work_whose_caller_left_is_rolled_back_but_a_wrong_answer_sticks():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    gone = w.call._replace(deadline=time.monotonic() - 1)
    with pytest.raises(DeadlinePassed):
        w.service.verify_identity(gone, "a-1", rebind.rebind_id, HOLDER, ID_NUMBER)
    assert w.store.tables.rebinds[rebind.rebind_id].completed == ()
    error = refused(
        Reason.IDENTITY_MISMATCH,
        lambda: w.service.verify_identity(gone, "a-1", rebind.rebind_id, "李四", ID_NUMBER),
    )
    assert error.audited and w.store.tables.rebinds[rebind.rebind_id].failures == 1
    assert len(w.store.tables.identity_failures) == 1
    assert w.actions("a-1")[-1] == "IDENTITY_MISMATCH"


# -- bad input touches nothing ------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda w: w.start("bad id!", beijing(2)), "account_id"),
        (lambda w: w.start("a-1", beijing(2), request_id="x" * 65), "request_id"),
        (lambda w: w.identity("a-1", "not-a-rebind"), "rebind_id"),
        (lambda w: w.verify("a-1", "rb_abc", OLD, "１２３４５６"), "code"),
        (lambda w: w.verify("a-1", "rb_abc", OLD, "12345"), "code"),
        (lambda w: w.start("a-1", "12345"), "new_phone"),
        (lambda w: w.identity("a-1", "rb_abc", id_number="110105194912310021"), "id_number"),
    ],
)
def test_bad_input_is_refused_before_any_unit_of_work(call, field):
    w = World()
    with pytest.raises(Exception) as caught:
        call(w)
    assert caught.value.violations[0].field == field
    assert w.store.units == []


# -- the audit trail ----------------------------------------------------------------


def test_every_step_and_refusal_is_chained_and_the_chain_verifies():
    w = World()
    w.register("a-1", beijing(1))
    rebind = w.start("a-1", beijing(2))
    refused(Reason.IDENTITY_MISMATCH, lambda: w.identity("a-1", rebind.rebind_id, "李四"))
    w.identity("a-1", rebind.rebind_id)
    w.send_and_verify("a-1", rebind.rebind_id, OLD, beijing(1))
    w.send_and_verify("a-1", rebind.rebind_id, NEW, beijing(2))
    w.complete("a-1", rebind.rebind_id)
    assert w.actions("a-1") == [
        "ACCOUNT_REGISTERED",
        "REBIND_STARTED",
        "IDENTITY_MISMATCH",
        "IDENTITY_VERIFIED",
        "CODE_SENT",
        "CODE_VERIFIED",
        "CODE_SENT",
        "CODE_VERIFIED",
        "REBIND_COMPLETED",
    ]
    events = w.store.audit_events(account_id="a-1")
    assert {e.caller for e in events} == {"lending-app"}
    assert [e.chain_seq for e in events] == list(range(1, 10))
    assert w.audit_report().ok
    # An edited event breaks the chain.
    w.store.tables.events[2] = replace(w.store.tables.events[2], outcome="OK")
    assert not w.audit_report().ok
