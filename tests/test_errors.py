"""Every error reason of DESIGN §2 that BindingService produces, through the real server.

Each failure is checked for its gRPC status, its ErrorInfo reason and the
details it owes the caller, for a message free of numbers, ID numbers and codes,
and for what it did to the store: nothing at all, except for the failures that
by design count an attempt, where exactly that count moves.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from datetime import timedelta

import grpc
import pytest
from conftest import business_columns
from support import (
    FLOW_RPCS,
    HOLDER,
    ID_NUMBER,
    NEW,
    OLD,
    e164,
    error_details,
    make_id_number,
)

from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import resources_pb2 as res
from phonebind_server.store.fields import to_micros

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

PHONE_A = "13800138000"
PHONE_B = "13900139000"
PHONE_C = "13700137000"
PHONE_D = "15800158000"
PHONE_E = "18600186000"


# -- helpers ------------------------------------------------------------------------


def fails(
    server,
    call: Callable[[], object],
    status: grpc.StatusCode,
    reason: str,
    *,
    hidden: Iterable[str] = (),
) -> dict[str, object]:
    """Runs a call that must fail; checks status, reason and that nothing secret leaks."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    code, got, details = error_details(error)
    assert (code, got) == (status, reason), f"{code} {got}: {error.details()}"
    texts = [error.details() or ""]
    texts += list(details["ErrorInfo"].metadata.values())
    if "BadRequest" in details:
        texts += [v.description for v in details["BadRequest"].field_violations]
    if "LocalizedMessage" in details:
        texts.append(details["LocalizedMessage"].message)
    secrets = {s for s in (*server.secrets.values, *hidden) if s}
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"{reason} message reveals a secret: {text!r}"
    return details


def fails_unchanged(server, call, status, reason, *, hidden=()) -> dict[str, object]:
    """As `fails`, and the store is exactly as it was before the call."""
    before = server.snapshot()
    details = fails(server, call, status, reason, hidden=hidden)
    assert server.snapshot() == before, f"{reason} changed the store"
    return details


def columns(server, table: str) -> list[str]:
    return business_columns(server.database_url, table)


def row_changes(server, before, after) -> dict[str, dict[str, object]]:
    """What a call did to the store, table by table.

    A table where one row was updated gives {column: (old, new)} for the columns
    that changed; a table that only gained rows gives {"inserted": [row, ...]}
    with each row as a dict. Anything else fails.
    """
    changed: dict[str, dict[str, object]] = {}
    for table, rows in before.items():
        gone = [r for r in rows if r not in after[table]]
        added = [r for r in after[table] if r not in rows]
        if not gone and not added:
            continue
        names = columns(server, table)
        if not gone:
            changed[table] = {"inserted": [dict(zip(names, r, strict=True)) for r in added]}
            continue
        assert len(gone) == len(added) == 1, f"{table}: -{len(gone)} +{len(added)} rows"
        old, new = dict(zip(names, gone[0], strict=True)), dict(zip(names, added[0], strict=True))
        changed[table] = {c: (old[c], new[c]) for c in names if old[c] != new[c]}
    return changed


def field_violations(details) -> list[str]:
    return [v.field for v in details["BadRequest"].field_violations]


def other_code(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


def stub_calls(pb, account_id: str, rebind_id: str, code: str = "123456"):
    """Every flow RPC that acts on a rebind, as (name, call) pairs with valid inputs."""
    s = pb.stub
    return [
        (
            "VerifyIdentity",
            lambda: s.VerifyIdentity(
                api.VerifyIdentityRequest(
                    account_id=account_id,
                    rebind_id=rebind_id,
                    holder_name=HOLDER,
                    id_number=ID_NUMBER,
                )
            ),
        ),
        (
            "SendCode",
            lambda: s.SendCode(
                api.SendCodeRequest(account_id=account_id, rebind_id=rebind_id, target=NEW)
            ),
        ),
        (
            "VerifyCode",
            lambda: s.VerifyCode(
                api.VerifyCodeRequest(
                    account_id=account_id, rebind_id=rebind_id, target=OLD, code=code
                )
            ),
        ),
        (
            "CompleteRebind",
            lambda: s.CompleteRebind(
                api.CompleteRebindRequest(account_id=account_id, rebind_id=rebind_id)
            ),
        ),
        (
            "CancelRebind",
            lambda: s.CancelRebind(
                api.CancelRebindRequest(account_id=account_id, rebind_id=rebind_id)
            ),
        ),
        (
            "GetRebind",
            lambda: s.GetRebind(api.GetRebindRequest(account_id=account_id, rebind_id=rebind_id)),
        ),
    ]


def complete_change(pb, account_id: str, old: str, new: str) -> res.Rebind:
    rebind = pb.ready_rebind(account_id, old, new)
    return pb.complete(account_id, rebind.rebind_id).rebind


# -- bad input (more in test_bad_input.py) --------------------------------------------


def test_invalid_argument_names_the_field(server):
    pb = server.api
    details = fails_unchanged(
        server,
        lambda: pb.register("bad id!", PHONE_A),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert field_violations(details) == ["account_id"]


@pytest.mark.parametrize(
    "body", [b"\x0a\x02\xc3\x28", b"\xff\xff\xff"], ids=["bad-utf8", "corrupt-wire"]
)
def test_an_unparseable_request_is_invalid_argument_not_a_crash(server, body, caplog):
    raw = server.channel.unary_unary("/phonebind.v1.BindingService/CompleteRebind")
    fails_unchanged(server, lambda: raw(body), INVALID, "INVALID_ARGUMENT")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, f"logged as an error: {errors[0].getMessage()}"


def test_invalid_phone_names_the_field(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    details = fails_unchanged(
        server, lambda: pb.start("loan-1", "1380013800"), INVALID, "INVALID_PHONE"
    )
    assert field_violations(details) == ["new_phone"]
    details = fails_unchanged(
        server, lambda: pb.register("loan-2", "12345"), INVALID, "INVALID_PHONE"
    )
    assert field_violations(details) == ["phone"]


def test_invalid_id_number_names_the_field_and_is_not_an_attempt(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rebind = pb.start("loan-1", PHONE_B)
    bad = ID_NUMBER[:-1] + "1"  # wrong check character
    details = fails_unchanged(
        server,
        lambda: pb.identity("loan-1", rebind.rebind_id, id_number=bad),
        INVALID,
        "INVALID_ID_NUMBER",
        hidden=[bad],
    )
    assert field_violations(details) == ["id_number"]
    assert pb.get_rebind("loan-1", rebind.rebind_id).attempts_left == 10


# -- idempotency ------------------------------------------------------------------------


def test_register_is_no_identity_oracle(server):
    """Whatever a kyc caller guesses, the answer is the same: the first call's
    account under its request_id, ACCOUNT_EXISTS under any other (or none)."""
    pb = server.api
    first = pb.register("loan-1", PHONE_A, request_id="reg-1")
    before = server.snapshot()
    other_id = make_id_number()
    guesses = [
        {},  # the record's very name, ID number and number
        {"phone": PHONE_B},  # the record's name and ID number, another number
        {"name": "李四"},
        {"id_number": other_id},
        {"name": "李四", "id_number": other_id, "phone": PHONE_B},
    ]

    def register(guess: dict[str, str], request_id: str):
        args = {"name": HOLDER, "id_number": ID_NUMBER, "phone": PHONE_A, **guess}
        return pb.register("loan-1", args.pop("phone"), request_id=request_id, **args)

    # Under the first request_id: always the first answer, right guess or wrong.
    assert [register(guess, "reg-1") for guess in guesses] == [first] * len(guesses)
    # Under another request_id or none: always the same refusal.
    refusals = set()
    for guess in guesses:
        for request_id in ("reg-2", ""):
            with pytest.raises(grpc.RpcError) as caught:
                register(guess, request_id)
            code, reason, details = error_details(caught.value)
            refusals.add((code, reason, caught.value.details(), repr(details)))
    assert len(refusals) == 1
    assert next(iter(refusals))[:2] == (grpc.StatusCode.ALREADY_EXISTS, "ACCOUNT_EXISTS")
    assert server.snapshot() == before


@pytest.mark.parametrize(
    ("new_phone", "lost"), [(PHONE_C, False), (PHONE_B, True)], ids=["new_phone", "lost"]
)
def test_request_id_reused_at_start(server, new_phone, lost):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    first = pb.start("loan-1", PHONE_B, request_id="start-1")
    details = fails_unchanged(
        server,
        lambda: pb.start("loan-1", new_phone, lost=lost, request_id="start-1"),
        INVALID,
        "REQUEST_ID_REUSED",
    )
    assert field_violations(details) == ["request_id"]
    assert pb.start("loan-1", PHONE_B, request_id="start-1").rebind_id == first.rebind_id


def test_request_id_reused_at_send_code(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rebind = pb.start("loan-1", PHONE_B)
    pb.send("loan-1", rebind.rebind_id, OLD, request_id="send-1")
    details = fails_unchanged(
        server,
        lambda: pb.send("loan-1", rebind.rebind_id, NEW, request_id="send-1"),
        INVALID,
        "REQUEST_ID_REUSED",
    )
    assert field_violations(details) == ["request_id"]


def test_request_id_reused_at_complete(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rebind = pb.ready_rebind("loan-1", PHONE_A, PHONE_B)
    pb.complete("loan-1", rebind.rebind_id, request_id="done-1")
    details = fails_unchanged(
        server,
        lambda: pb.complete("loan-1", "rb_someotherrebind", request_id="done-1"),
        INVALID,
        "REQUEST_ID_REUSED",
    )
    assert field_violations(details) == ["request_id"]


# -- wrong answers: they count -------------------------------------------------------------


def test_code_mismatch_counts_one_attempt_on_code_and_rebind(server, clock):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rebind = pb.start("loan-1", PHONE_B)
    started = to_micros(clock.now())
    sent = pb.send("loan-1", rebind.rebind_id, OLD)
    assert sent.attempts_left == 5
    code = pb.inbox.next_code(e164(PHONE_A))

    for attempt, left in ((1, "4"), (2, "3")):
        clock.advance(timedelta(seconds=1))
        wrong = other_code(code)
        before = server.snapshot()
        details = fails(
            server,
            lambda w=wrong: pb.verify("loan-1", rebind.rebind_id, OLD, w),
            INVALID,
            "CODE_MISMATCH",
            hidden=[code, wrong],
        )
        assert dict(details["ErrorInfo"].metadata) == {"attempts_left": left}
        assert row_changes(server, before, server.snapshot()) == {
            "rebinds": {
                "failures": (attempt - 1, attempt),
                "updated_at": (started, to_micros(clock.now())),
            },
            "challenges": {"attempts": (attempt - 1, attempt)},
        }
        started = to_micros(clock.now())
        assert pb.get_rebind("loan-1", rebind.rebind_id).attempts_left == 10 - attempt

    # Two wrong tries do not burn the code.
    done = pb.verify("loan-1", rebind.rebind_id, OLD, code)
    assert list(done.completed_steps) == [res.REBIND_STEP_OLD_PHONE_CODE]


def test_identity_mismatch_counts_one_attempt_and_does_not_say_which_part(server, clock):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rebind = pb.start("loan-1", PHONE_B)
    started = to_micros(clock.now())
    other_id = make_id_number()
    messages = []
    for attempt, (name, id_number) in enumerate([("李四", ID_NUMBER), (HOLDER, other_id)], start=1):
        clock.advance(timedelta(seconds=1))
        before = server.snapshot()
        with pytest.raises(grpc.RpcError) as caught:
            pb.identity("loan-1", rebind.rebind_id, name=name, id_number=id_number)
        code, reason, details = error_details(caught.value)
        assert (code, reason) == (INVALID, "IDENTITY_MISMATCH")
        # The account's cap (5 identity failures a day) is the nearer limit.
        assert dict(details["ErrorInfo"].metadata) == {"attempts_left": str(5 - attempt)}
        assert "BadRequest" not in details
        message = caught.value.details()
        for secret in (ID_NUMBER, other_id, name, HOLDER, PHONE_A, PHONE_B):
            assert secret not in message
        messages.append(message)
        changes = row_changes(server, before, server.snapshot())
        recorded = changes.pop("identity_failures")["inserted"]
        # One more failure on the rebind, one more on the account's daily count.
        assert changes == {
            "rebinds": {
                "failures": (attempt - 1, attempt),
                "updated_at": (started, to_micros(clock.now())),
            }
        }
        assert [(r["account_id"], r["rebind_id"], r["failed_at"]) for r in recorded] == [
            ("loan-1", rebind.rebind_id, to_micros(clock.now()))
        ]
        started = to_micros(clock.now())
    assert messages[0] == messages[1], "the message must not tell which part was wrong"
    done = pb.identity("loan-1", rebind.rebind_id)
    assert list(done.completed_steps) == [res.REBIND_STEP_IDENTITY]
    assert done.attempts_left == 8


def test_code_attempts_exhausted_after_five_wrong_tries(server, clock):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rebind = pb.start("loan-1", PHONE_B)
    rid = rebind.rebind_id
    pb.send("loan-1", rid, OLD)
    code = pb.inbox.next_code(e164(PHONE_A))
    wrong = other_code(code)
    for left in ("4", "3", "2", "1"):
        details = fails(
            server, lambda: pb.verify("loan-1", rid, OLD, wrong), INVALID, "CODE_MISMATCH"
        )
        assert details["ErrorInfo"].metadata["attempts_left"] == left

    # The fifth wrong try is counted and burns the code.
    clock.advance(timedelta(seconds=1))
    before = server.snapshot()
    details = fails(
        server,
        lambda: pb.verify("loan-1", rid, OLD, wrong),
        INVALID,
        "CODE_MISMATCH",
        hidden=[code, wrong],
    )
    assert details["ErrorInfo"].metadata["attempts_left"] == "0"
    changes = row_changes(server, before, server.snapshot())
    assert changes["challenges"] == {"attempts": (4, 5), "state": ("LIVE", "BURNT")}
    assert changes["rebinds"]["failures"] == (4, 5)
    assert set(changes) == {"challenges", "rebinds"}
    assert set(changes["rebinds"]) == {"failures", "updated_at"}

    # Now even the right code is refused, and refusing it counts nothing.
    for guess in (code, wrong):
        fails_unchanged(
            server,
            lambda g=guess: pb.verify("loan-1", rid, OLD, g),
            PRECONDITION,
            "CODE_ATTEMPTS_EXHAUSTED",
            hidden=[code, wrong],
        )
    assert pb.get_rebind("loan-1", rid).attempts_left == 5

    # A new code (after the cooldown) works; the rebind's count was not reset.
    clock.advance(timedelta(seconds=60))
    assert pb.send("loan-1", rid, OLD).attempts_left == 5
    done = pb.verify("loan-1", rid, OLD, pb.inbox.next_code(e164(PHONE_A)))
    assert done.attempts_left == 5


def test_rebind_locked_after_ten_failures_across_resends(server, clock):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rid = pb.start("loan-1", PHONE_B).rebind_id

    # 2 identity failures (the account's daily cap of 5 is the nearer limit)...
    for left in ("4", "3"):
        details = fails(
            server,
            lambda: pb.identity("loan-1", rid, name="李四"),
            INVALID,
            "IDENTITY_MISMATCH",
        )
        assert details["ErrorInfo"].metadata["attempts_left"] == left
    # ...5 wrong codes on the first send (the code's own limit is lower here)...
    pb.send("loan-1", rid, OLD)
    first = pb.inbox.next_code(e164(PHONE_A))
    for left in ("4", "3", "2", "1", "0"):
        details = fails(
            server,
            lambda: pb.verify("loan-1", rid, OLD, other_code(first)),
            INVALID,
            "CODE_MISMATCH",
        )
        assert details["ErrorInfo"].metadata["attempts_left"] == left

    # ...a resend does not reset the rebind's count: 3 tries are left, not 5...
    clock.advance(timedelta(seconds=60))
    assert pb.send("loan-1", rid, OLD).attempts_left == 3
    second = pb.inbox.next_code(e164(PHONE_A))
    assert pb.get_rebind("loan-1", rid).attempts_left == 3
    for left in ("2", "1"):
        details = fails(
            server,
            lambda: pb.verify("loan-1", rid, OLD, other_code(second)),
            INVALID,
            "CODE_MISMATCH",
        )
        assert details["ErrorInfo"].metadata["attempts_left"] == left

    # ...and the tenth failure locks the rebind; it is counted like the others.
    clock.advance(timedelta(seconds=1))
    before = server.snapshot()
    updated = to_micros(clock.now())
    fails(
        server,
        lambda: pb.verify("loan-1", rid, OLD, other_code(second)),
        PRECONDITION,
        "REBIND_LOCKED",
        hidden=[first, second, other_code(second)],
    )
    changes = row_changes(server, before, server.snapshot())
    assert set(changes["rebinds"]) == {"failures", "updated_at"}
    assert changes["rebinds"]["failures"] == (9, 10)
    assert changes["rebinds"]["updated_at"][1] == updated
    assert changes["challenges"] == {"attempts": (2, 3)}
    assert set(changes) == {"rebinds", "challenges"}

    # After the lock even the right answers are refused, and nothing moves.
    locked = pb.get_rebind("loan-1", rid)
    assert locked.attempts_left == 0
    assert locked.state == res.REBIND_STATE_PENDING
    for call in (
        lambda: pb.verify("loan-1", rid, OLD, second),
        lambda: pb.identity("loan-1", rid),
        lambda: pb.send("loan-1", rid, NEW),
        lambda: pb.complete("loan-1", rid),
    ):
        fails_unchanged(server, call, PRECONDITION, "REBIND_LOCKED", hidden=[second])

    # A new rebind starts from a clean count and closes the locked one.
    fresh = pb.start("loan-1", PHONE_B)
    assert fresh.attempts_left == 10
    assert pb.get_rebind("loan-1", rid).state == res.REBIND_STATE_CANCELLED


# -- not found --------------------------------------------------------------------------


def test_account_not_found(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    for call in (
        lambda: pb.get_account("ghost"),
        lambda: pb.start("ghost", PHONE_B),
        lambda: pb.stub.ListBindingHistory(api.ListBindingHistoryRequest(account_id="ghost")),
    ):
        fails_unchanged(server, call, NOT_FOUND, "ACCOUNT_NOT_FOUND")


@pytest.mark.parametrize("rpc", FLOW_RPCS)
def test_rebind_of_another_account_is_not_found_like_a_missing_one(server, rpc):
    pb = server.api
    pb.register("loan-a", PHONE_A)
    pb.register("loan-b", PHONE_B)
    own = pb.start("loan-a", PHONE_C)
    theirs = pb.start("loan-b", PHONE_D)
    pb.send("loan-b", theirs.rebind_id, OLD)
    code = pb.inbox.next_code(e164(PHONE_B))

    answers = []
    for rebind_id in (theirs.rebind_id, "rb_doesnotexist0000000000"):
        call = dict(stub_calls(pb, "loan-a", rebind_id, code))[rpc]
        before = server.snapshot()
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert server.snapshot() == before, f"{rpc} on a foreign rebind changed the store"
        status, reason, details = error_details(caught.value)
        assert (status, reason) == (NOT_FOUND, "REBIND_NOT_FOUND")
        for secret in (theirs.rebind_id, code, *server.secrets.values):
            assert secret not in caught.value.details()
        answers.append(
            (status, reason, caught.value.details(), dict(details["ErrorInfo"].metadata))
        )
    assert answers[0] == answers[1], "a foreign rebind must answer exactly like a missing one"

    # The owner's rebind was not touched: its code still works, the caller's own too.
    rebind = pb.verify("loan-b", theirs.rebind_id, OLD, code)
    assert rebind.attempts_left == 10
    assert rebind.state == res.REBIND_STATE_PENDING
    assert pb.get_rebind("loan-a", own.rebind_id).state == res.REBIND_STATE_PENDING


# -- accounts and numbers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"name": "李四"},
        {"id_number": make_id_number()},
        {"phone": PHONE_B},
    ],
    ids=["holder_name", "id_number", "phone"],
)
def test_account_exists_with_other_data(server, change):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    args = {"name": HOLDER, "id_number": ID_NUMBER, "phone": PHONE_A, **change}
    phone = args.pop("phone")
    fails_unchanged(
        server,
        lambda: pb.register("loan-1", phone, request_id="other-req", **args),
        grpc.StatusCode.ALREADY_EXISTS,
        "ACCOUNT_EXISTS",
        hidden=[change.get("id_number", "")],
    )


@pytest.mark.parametrize(
    "spelling", [PHONE_A, "+86" + PHONE_A, "0086 138 0013 8000", "138-0013-8000"]
)
def test_same_phone_counts_as_a_start_and_the_open_rebind_survives(server, clock, spelling):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    open_rebind = pb.start("loan-1", PHONE_B)
    before = server.snapshot()
    fails(server, lambda: pb.start("loan-1", spelling), PRECONDITION, "SAME_PHONE")
    # Its one effect: a row that counts the refusal against the daily start cap.
    assert row_changes(server, before, server.snapshot()) == {
        "refused_starts": {
            "inserted": [{"seq": 1, "account_id": "loan-1", "refused_at": to_micros(clock.now())}]
        }
    }
    assert pb.get_rebind("loan-1", open_rebind.rebind_id).state == res.REBIND_STATE_PENDING


def test_a_number_bound_elsewhere_is_told_only_after_its_code_proves_possession(server):
    """A start to another account's number answers like any start; PHONE_IN_USE
    comes only from the right code sent to that number, so an account cannot
    learn which numbers are bound by starting rebinds."""
    pb = server.api
    pb.register("loan-1", PHONE_A)
    pb.register("loan-2", PHONE_B)
    rebind = pb.start("loan-1", "+86 139 0013 9000")
    assert rebind.state == res.REBIND_STATE_PENDING
    pb.identity("loan-1", rebind.rebind_id)
    pb.send_and_verify("loan-1", rebind.rebind_id, OLD, PHONE_A)
    pb.send("loan-1", rebind.rebind_id, NEW)
    code = pb.inbox.next_code(e164(PHONE_B))
    wrong = "000000" if code != "000000" else "111111"
    fails(
        server,
        lambda: pb.verify("loan-1", rebind.rebind_id, NEW, wrong),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CODE_MISMATCH",
    )
    fails(
        server,
        lambda: pb.verify("loan-1", rebind.rebind_id, NEW, code),
        PRECONDITION,
        "PHONE_IN_USE",
    )
    after = pb.get_rebind("loan-1", rebind.rebind_id)
    assert res.REBIND_STEP_NEW_PHONE_CODE not in after.completed_steps
    assert pb.get_account("loan-2").phone_masked == "139****9000"


def test_probing_bound_numbers_runs_into_the_daily_start_cap(server, clock):
    """Every start counts, refused or not, and a bound number starts like any
    other: refusals and starts share the 5 a day, and the cap tells nothing
    about which numbers are bound."""
    pb = server.api
    pb.register("loan-1", PHONE_A)
    taken = [PHONE_B, PHONE_C, PHONE_D]
    for n, phone in enumerate(taken):
        pb.register(f"other-{n}", phone)
    first = clock.now()
    fails(server, lambda: pb.start("loan-1", PHONE_A), PRECONDITION, "SAME_PHONE")
    for phone in taken:
        clock.advance(timedelta(minutes=1))
        assert pb.start("loan-1", phone).state == res.REBIND_STATE_PENDING
    clock.advance(timedelta(minutes=1))
    assert pb.start("loan-1", "15900159000").state == res.REBIND_STATE_PENDING
    details = fails_unchanged(
        server, lambda: pb.start("loan-1", "15900159001"), EXHAUSTED, "RATE_LIMITED"
    )
    assert details["RetryInfo"].retry_delay.ToTimedelta() == first + timedelta(days=1) - clock.now()
    fails_unchanged(server, lambda: pb.start("loan-1", PHONE_B), EXHAUSTED, "RATE_LIMITED")
    clock.advance(first + timedelta(days=1) - clock.now())
    assert pb.start("loan-1", "15900159001").state == res.REBIND_STATE_PENDING


def test_phone_in_use_at_register(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    fails_unchanged(
        server,
        lambda: pb.register("loan-2", "0086-138-0013-8000", request_id="r-2"),
        PRECONDITION,
        "PHONE_IN_USE",
    )
    fails_unchanged(server, lambda: pb.get_account("loan-2"), NOT_FOUND, "ACCOUNT_NOT_FOUND")


def test_phone_in_use_at_complete_when_taken_meanwhile(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rebind = pb.ready_rebind("loan-1", PHONE_A, PHONE_B)
    pb.register("loan-2", PHONE_B)
    fails_unchanged(
        server, lambda: pb.complete("loan-1", rebind.rebind_id), PRECONDITION, "PHONE_IN_USE"
    )
    assert pb.get_account("loan-1").phone_masked == "138****8000"
    assert pb.get_rebind("loan-1", rebind.rebind_id).state == res.REBIND_STATE_READY


# -- steps --------------------------------------------------------------------------------


def test_step_required_lists_missing_steps(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rid = pb.start("loan-1", PHONE_B).rebind_id

    def complete_fails(missing: str) -> None:
        details = fails_unchanged(
            server, lambda: pb.complete("loan-1", rid), PRECONDITION, "STEP_REQUIRED"
        )
        assert dict(details["ErrorInfo"].metadata) == {"missing_steps": missing}

    complete_fails("IDENTITY,OLD_PHONE_CODE,NEW_PHONE_CODE")
    pb.identity("loan-1", rid)
    complete_fails("OLD_PHONE_CODE,NEW_PHONE_CODE")
    pb.send_and_verify("loan-1", rid, OLD, PHONE_A)
    complete_fails("NEW_PHONE_CODE")
    pb.send_and_verify("loan-1", rid, NEW, PHONE_B)
    assert pb.complete("loan-1", rid).rebind.state == res.REBIND_STATE_COMPLETED


def test_step_required_with_old_phone_lost_includes_review(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rid = pb.start("loan-1", PHONE_B, lost=True).rebind_id
    pb.identity("loan-1", rid)
    details = fails_unchanged(
        server, lambda: pb.complete("loan-1", rid), PRECONDITION, "STEP_REQUIRED"
    )
    assert details["ErrorInfo"].metadata["missing_steps"] == "NEW_PHONE_CODE,REVIEW"


def test_step_not_required_old_phone_code_when_old_phone_lost(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rid = pb.start("loan-1", PHONE_B, lost=True).rebind_id
    for call in (
        lambda: pb.send("loan-1", rid, OLD),
        lambda: pb.verify("loan-1", rid, OLD, "123456"),
    ):
        details = fails_unchanged(server, call, PRECONDITION, "STEP_NOT_REQUIRED")
        assert dict(details["ErrorInfo"].metadata) == {"step": "OLD_PHONE_CODE"}
    assert pb.inbox.to(e164(PHONE_A)) == []


def test_step_already_done(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rid = pb.start("loan-1", PHONE_B).rebind_id
    pb.identity("loan-1", rid)
    pb.send("loan-1", rid, OLD)
    code = pb.inbox.next_code(e164(PHONE_A))
    pb.verify("loan-1", rid, OLD, code)

    cases = [
        ("IDENTITY", lambda: pb.identity("loan-1", rid)),
        # A wrong answer to a finished step is not a counted failure either.
        ("IDENTITY", lambda: pb.identity("loan-1", rid, name="李四")),
        ("OLD_PHONE_CODE", lambda: pb.send("loan-1", rid, OLD)),
        # Using the same code again: the step is done, nothing is counted.
        ("OLD_PHONE_CODE", lambda: pb.verify("loan-1", rid, OLD, code)),
        ("OLD_PHONE_CODE", lambda: pb.verify("loan-1", rid, OLD, other_code(code))),
    ]
    for step, call in cases:
        details = fails_unchanged(server, call, PRECONDITION, "STEP_ALREADY_DONE", hidden=[code])
        assert dict(details["ErrorInfo"].metadata) == {"step": step}
    assert pb.get_rebind("loan-1", rid).attempts_left == 10


# -- codes --------------------------------------------------------------------------------


def test_no_active_code(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rid = pb.start("loan-1", PHONE_B).rebind_id
    # Before any send.
    fails_unchanged(
        server, lambda: pb.verify("loan-1", rid, OLD, "123456"), PRECONDITION, "NO_ACTIVE_CODE"
    )
    # A code for one target is not a code for the other.
    pb.send("loan-1", rid, OLD)
    code = pb.inbox.next_code(e164(PHONE_A))
    fails_unchanged(
        server,
        lambda: pb.verify("loan-1", rid, NEW, code),
        PRECONDITION,
        "NO_ACTIVE_CODE",
    )
    # (A code used once is not "no active code" but STEP_ALREADY_DONE: the step it
    # proved is done; see test_step_already_done.)
    # A code of a superseded rebind is not a code of the new one.
    fresh = pb.start("loan-1", PHONE_C).rebind_id
    fails_unchanged(
        server,
        lambda: pb.verify("loan-1", fresh, OLD, code),
        PRECONDITION,
        "NO_ACTIVE_CODE",
    )
    assert pb.get_rebind("loan-1", fresh).attempts_left == 10


def test_code_expired_after_five_minutes(server, clock):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rid = pb.start("loan-1", PHONE_B).rebind_id
    pb.send("loan-1", rid, OLD)
    old_code = pb.inbox.next_code(e164(PHONE_A))
    pb.send("loan-1", rid, NEW)
    new_code = pb.inbox.next_code(e164(PHONE_B))

    clock.advance(timedelta(minutes=5) - timedelta(seconds=1))
    pb.verify("loan-1", rid, NEW, new_code)  # still good one second before the end
    clock.advance(timedelta(seconds=1))
    for guess in (old_code, other_code(old_code)):
        fails_unchanged(
            server,
            lambda g=guess: pb.verify("loan-1", rid, OLD, g),
            PRECONDITION,
            "CODE_EXPIRED",
            hidden=[old_code],
        )
    assert pb.get_rebind("loan-1", rid).attempts_left == 10
    # A new code works.
    rebind = pb.send_and_verify("loan-1", rid, OLD, PHONE_A)
    assert res.REBIND_STEP_OLD_PHONE_CODE in rebind.completed_steps


def test_resend_too_soon_tells_exactly_how_long_to_wait(server, clock):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rid = pb.start("loan-1", PHONE_B).rebind_id
    pb.send("loan-1", rid, OLD)
    clock.advance(timedelta(seconds=17.25))
    details = fails_unchanged(
        server, lambda: pb.send("loan-1", rid, OLD), EXHAUSTED, "RESEND_TOO_SOON"
    )
    assert details["RetryInfo"].retry_delay.ToTimedelta() == timedelta(seconds=42.75)
    assert dict(details["ErrorInfo"].metadata) == {"retry_after_seconds": "43"}
    # The cooldown is per target.
    pb.send("loan-1", rid, NEW)
    clock.advance(timedelta(seconds=42.75))
    pb.send("loan-1", rid, OLD)
    assert len(pb.inbox.wait_for(e164(PHONE_A), 2, "REBIND_CODE")) == 2


# -- the rebind's life --------------------------------------------------------------------


def test_rebind_expired_after_thirty_minutes(server, clock):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rid = pb.start("loan-1", PHONE_B).rebind_id
    pb.send("loan-1", rid, OLD)
    code = pb.inbox.next_code(e164(PHONE_A))
    clock.advance(timedelta(minutes=30) - timedelta(seconds=1))
    pb.identity("loan-1", rid)  # still open one second before the end
    clock.advance(timedelta(seconds=1))
    for name, call in stub_calls(pb, "loan-1", rid, code):
        if name == "GetRebind":
            continue
        fails_unchanged(server, call, PRECONDITION, "REBIND_EXPIRED", hidden=[code])
    assert pb.get_rebind("loan-1", rid).state == res.REBIND_STATE_EXPIRED


@pytest.mark.parametrize("how", ["cancelled", "completed", "superseded"])
def test_rebind_closed(server, how):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rid = pb.start("loan-1", PHONE_B).rebind_id
    if how == "completed":
        pb.identity("loan-1", rid)
        pb.send("loan-1", rid, OLD)
        code = pb.inbox.next_code(e164(PHONE_A))
        pb.verify("loan-1", rid, OLD, code)
        pb.send_and_verify("loan-1", rid, NEW, PHONE_B)
        pb.complete("loan-1", rid)
        state = "COMPLETED"
    else:
        pb.send("loan-1", rid, OLD)
        code = pb.inbox.next_code(e164(PHONE_A))
        if how == "cancelled":
            pb.stub.CancelRebind(api.CancelRebindRequest(account_id="loan-1", rebind_id=rid))
        else:
            pb.start("loan-1", PHONE_C)  # a new start cancels the open rebind
        state = "CANCELLED"
    assert pb.get_rebind("loan-1", rid).state == res.RebindState.Value(f"REBIND_STATE_{state}")

    for name, call in stub_calls(pb, "loan-1", rid, code):
        if name == "GetRebind":
            continue
        details = fails_unchanged(server, call, PRECONDITION, "REBIND_CLOSED", hidden=[code])
        assert dict(details["ErrorInfo"].metadata) == {"state": state}, name


def test_review_pending_when_old_phone_lost(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rid = pb.start("loan-1", PHONE_B, lost=True).rebind_id
    pb.identity("loan-1", rid)
    rebind = pb.send_and_verify("loan-1", rid, NEW, PHONE_B)
    assert rebind.state == res.REBIND_STATE_AWAITING_REVIEW
    fails_unchanged(server, lambda: pb.complete("loan-1", rid), PRECONDITION, "REVIEW_PENDING")
    assert pb.get_account("loan-1").phone_masked == "138****8000"


# -- risk ---------------------------------------------------------------------------------


def test_risk_denied_on_fourth_change_within_a_year(server, clock):
    pb = server.api
    phones = [PHONE_A, PHONE_B, PHONE_C, PHONE_D]
    pb.register("loan-1", PHONE_A)
    for old, new in itertools.pairwise(phones):
        rebind = pb.ready_rebind("loan-1", old, new)
        # 31 days apart: never the "2nd within 30 days" review.
        assert rebind.risk.decision == res.RISK_DECISION_ALLOW, rebind.risk.reasons
        assert res.REBIND_STEP_REVIEW not in rebind.required_steps
        pb.complete("loan-1", rebind.rebind_id)
        clock.advance(timedelta(days=31))

    before = server.snapshot()
    details = fails(server, lambda: pb.start("loan-1", PHONE_E), PRECONDITION, "RISK_DENIED")
    assert "FREQUENT_CHANGES" in details["ErrorInfo"].metadata["reasons"].split(",")
    # A denied start is counted against the daily cap, and is otherwise no trace.
    assert list(row_changes(server, before, server.snapshot())) == ["refused_starts"]

    # Once the first change is more than 365 days old, a change is allowed again.
    clock.advance(timedelta(days=365 - 3 * 31 + 1))
    assert pb.start("loan-1", PHONE_E).risk.decision == res.RISK_DECISION_ALLOW


def test_second_change_within_thirty_days_needs_review(server, clock):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    complete_change(pb, "loan-1", PHONE_A, PHONE_B)
    clock.advance(timedelta(days=2))  # past the cool-off hold, inside 30 days
    rebind = pb.start("loan-1", PHONE_C)
    assert rebind.risk.decision == res.RISK_DECISION_REVIEW
    assert "FREQUENT_CHANGES" in rebind.risk.reasons
    assert "IN_COOL_OFF" not in rebind.risk.reasons
    assert list(rebind.required_steps)[-1] == res.REBIND_STEP_REVIEW


def test_virtual_operator_number_needs_review(server):
    pb = server.api
    pb.register("loan-1", PHONE_A)
    rebind = pb.start("loan-1", "17012345678")
    assert rebind.risk.decision == res.RISK_DECISION_REVIEW
    assert "VIRTUAL_OPERATOR" in rebind.risk.reasons
    assert list(rebind.required_steps) == [
        res.REBIND_STEP_IDENTITY,
        res.REBIND_STEP_OLD_PHONE_CODE,
        res.REBIND_STEP_NEW_PHONE_CODE,
        res.REBIND_STEP_REVIEW,
    ]
