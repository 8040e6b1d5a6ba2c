"""Parallel calls against the real server (24 RPC threads) on SQLite and PostgreSQL.

Every use case is one unit of work that serialises on a row lock (PostgreSQL
FOR UPDATE) or the write lock (SQLite BEGIN IMMEDIATE). These tests fire the
same call from many threads at once, released together by a barrier, and check
that the caps, the state machine and the uniqueness rules hold both in the
answers and in the tables.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from support import ID_NUMBER, NEW, OLD, e164, error_details, rows

from phonebind.v1 import resources_pb2 as res

FP = grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class Outcome:
    """What one call answered: its value, or its status and ErrorInfo reason."""

    value: Any = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    reason: str = "OK"
    details: dict[str, object] | None = None

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def attempts_left(self) -> int:
        assert self.details is not None
        return int(self.details["ErrorInfo"].metadata["attempts_left"])


def attempt(call: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(value=call())
    except grpc.RpcError as error:
        code, reason, details = error_details(error)
        return Outcome(code=code, reason=reason, details=details)


def parallel(calls: list[Callable[[], Any]]) -> list[Outcome]:
    """Runs every call on its own thread, all released at the same moment."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Outcome:
        barrier.wait(timeout=30)
        return attempt(call)

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def reasons(outcomes: list[Outcome]) -> Counter[str]:
    return Counter(o.reason for o in outcomes)


def query(server, sql: str, *params: object) -> list[tuple]:
    """Rows straight from the store; `?` is the parameter placeholder on both backends."""
    return rows(server.database_url, sql, *params)


def challenge_row(server, rebind_id: str, target: str) -> tuple[str, int]:
    rows = query(
        server,
        "SELECT state, attempts FROM challenges WHERE rebind_id = ? AND target = ?",
        rebind_id,
        target,
    )
    assert len(rows) == 1
    return rows[0][0], rows[0][1]


def rebind_failures(server, rebind_id: str) -> int:
    return query(server, "SELECT failures FROM rebinds WHERE rebind_id = ?", rebind_id)[0][0]


def wrong_codes(right: str, count: int) -> list[str]:
    """`count` distinct 6-digit codes, none of them `right`."""
    return [f"{(int(right) + k) % 1_000_000:06d}" for k in range(1, count + 1)]


def started_with_old_code(server, account_id: str, old: str, new: str) -> tuple[str, str]:
    """A fresh rebind with identity done and a code sent to the old number."""
    pb = server.api
    pb.register(account_id, old)
    rebind_id = pb.start(account_id, new).rebind_id
    pb.identity(account_id, rebind_id)
    pb.send(account_id, rebind_id, OLD)
    return rebind_id, pb.inbox.next_code(e164(old))


# -- one-time codes -----------------------------------------------------------------


def test_parallel_right_code_completes_the_step_exactly_once(server):
    pb = server.api
    rebind_id, code = started_with_old_code(server, "cc-right", "13800138100", "13900139100")

    outcomes = parallel([lambda: pb.verify("cc-right", rebind_id, OLD, code)] * 20)

    winners = [o for o in outcomes if o.ok]
    assert len(winners) == 1
    assert list(winners[0].value.completed_steps) == [
        res.REBIND_STEP_IDENTITY,
        res.REBIND_STEP_OLD_PHONE_CODE,
    ]
    losers = [o for o in outcomes if not o.ok]
    assert len(losers) == 19
    assert {o.code for o in losers} == {FP}
    assert set(reasons(losers)) <= {"NO_ACTIVE_CODE", "STEP_ALREADY_DONE"}

    # The code was used once, by the winner; nobody's try counted as a failure.
    assert challenge_row(server, rebind_id, "OLD_PHONE") == ("USED", 1)
    assert rebind_failures(server, rebind_id) == 0
    rows = query(server, "SELECT completed_steps FROM rebinds WHERE rebind_id = ?", rebind_id)
    assert rows == [("IDENTITY,OLD_PHONE_CODE",)]
    rebind = pb.get_rebind("cc-right", rebind_id)
    assert list(rebind.completed_steps) == [
        res.REBIND_STEP_IDENTITY,
        res.REBIND_STEP_OLD_PHONE_CODE,
    ]
    assert rebind.attempts_left == 10


def test_parallel_wrong_codes_never_exceed_the_code_cap(server):
    pb = server.api
    rebind_id, code = started_with_old_code(server, "cc-wrong", "13800138101", "13900139101")

    guesses = wrong_codes(code, 50)
    outcomes = parallel([lambda g=g: pb.verify("cc-wrong", rebind_id, OLD, g) for g in guesses])

    counted = reasons(outcomes)
    assert not any(o.ok for o in outcomes)
    # Attempts are counted before comparing, under the rebind's lock: exactly
    # five guesses were compared, each saw one attempt fewer left.
    assert counted == {"CODE_MISMATCH": 5, "CODE_ATTEMPTS_EXHAUSTED": 45}
    mismatches = [o for o in outcomes if o.reason == "CODE_MISMATCH"]
    assert {o.code for o in mismatches} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert sorted(o.attempts_left for o in mismatches) == [0, 1, 2, 3, 4]
    assert {o.code for o in outcomes if o.reason != "CODE_MISMATCH"} == {FP}

    assert challenge_row(server, rebind_id, "OLD_PHONE") == ("BURNT", 5)
    assert rebind_failures(server, rebind_id) == 5

    # The burnt code stays burnt, even for the right code, and that try costs nothing.
    refused = attempt(lambda: pb.verify("cc-wrong", rebind_id, OLD, code))
    assert (refused.code, refused.reason) == (FP, "CODE_ATTEMPTS_EXHAUSTED")
    assert challenge_row(server, rebind_id, "OLD_PHONE") == ("BURNT", 5)
    assert rebind_failures(server, rebind_id) == 5
    rebind = pb.get_rebind("cc-wrong", rebind_id)
    assert list(rebind.completed_steps) == [res.REBIND_STEP_IDENTITY]
    assert rebind.attempts_left == 5


def test_parallel_wrong_codes_across_resends_lock_the_rebind_at_ten(server, clock):
    pb = server.api
    account, old = "cc-resend", "13800138102"
    rebind_id, code = started_with_old_code(server, account, old, "13900139102")

    all_outcomes: list[Outcome] = []
    per_round: list[Counter[str]] = []
    for round_no in range(5):
        if round_no:
            # A resend after the cooldown: a fresh code, but the rebind's count stays.
            clock.advance(timedelta(seconds=60))
            resent = attempt(lambda: pb.send(account, rebind_id, OLD))
            if resent.ok:
                code = pb.inbox.next_code(e164(old))
            else:
                assert (resent.code, resent.reason) == (FP, "REBIND_LOCKED")
        guesses = wrong_codes(code, 10)
        outcomes = parallel([lambda g=g: pb.verify(account, rebind_id, OLD, g) for g in guesses])
        all_outcomes += outcomes
        per_round.append(reasons(outcomes))
        _, attempts = challenge_row(server, rebind_id, "OLD_PHONE")
        assert attempts <= 5
        assert rebind_failures(server, rebind_id) <= 10

    assert len(all_outcomes) == 50
    assert not any(o.ok for o in all_outcomes)
    # Round 1: five compared, then the code is burnt. Round 2 (new code): four
    # more mismatches, the fifth is the rebind's tenth failure and locks it.
    assert per_round[0] == {"CODE_MISMATCH": 5, "CODE_ATTEMPTS_EXHAUSTED": 5}
    assert per_round[1] == {"CODE_MISMATCH": 4, "REBIND_LOCKED": 6}
    for later in per_round[2:]:
        assert later == {"REBIND_LOCKED": 10}
    assert sum(c["CODE_MISMATCH"] for c in per_round) == 9
    assert rebind_failures(server, rebind_id) == 10

    # Locked for good: no code, resend, identity answer or new target gets through.
    for call in (
        lambda: pb.verify(account, rebind_id, OLD, code),
        lambda: pb.send(account, rebind_id, OLD),
        lambda: pb.send(account, rebind_id, NEW),
        lambda: pb.identity(account, rebind_id),
    ):
        refused = attempt(call)
        assert (refused.code, refused.reason) == (FP, "REBIND_LOCKED")
    assert rebind_failures(server, rebind_id) == 10
    assert pb.get_rebind(account, rebind_id).attempts_left == 0


# -- the binding ------------------------------------------------------------------


def test_two_accounts_racing_for_one_new_number_exactly_one_wins(server):
    pb = server.api
    winners: Counter[str] = Counter()
    for race in range(5):
        new = f"1390013{race:04d}"
        olds = {f"race{race}-a": f"1380013{race:04d}", f"race{race}-b": f"1370013{race:04d}"}
        rebinds = {}
        for account_id, old in olds.items():
            pb.register(account_id, old)
            # PHONE_IN_USE at the start only looks at bound numbers: both may start.
            rebind = pb.ready_rebind(account_id, old, new)
            assert rebind.new_phone_masked == f"139****{race:04d}"
            rebinds[account_id] = rebind.rebind_id

        ids = list(olds)
        outcomes = dict(
            zip(
                ids,
                parallel([lambda a=a, r=rebinds[a]: pb.complete(a, r) for a in ids]),
                strict=True,
            )
        )

        won = [a for a in ids if outcomes[a].ok]
        assert len(won) == 1, {a: o.reason for a, o in outcomes.items()}
        winner = won[0]
        loser = next(a for a in ids if a != winner)
        winners[winner[-1]] += 1
        lost = outcomes[loser]
        assert (lost.code, lost.reason) == (FP, "PHONE_IN_USE")
        done = outcomes[winner].value
        assert done.rebind.state == res.REBIND_STATE_COMPLETED
        assert done.account.phone_masked == f"139****{race:04d}"

        # The number is bound to exactly one account (the unique index agrees).
        assert (
            query(
                server, "SELECT phone_index FROM accounts GROUP BY phone_index HAVING COUNT(*) > 1"
            )
            == []
        )
        bound = query(
            server,
            "SELECT account_id FROM accounts WHERE phone_masked = ?",
            f"139****{race:04d}",
        )
        assert bound == [(winner,)]
        assert pb.get_account(winner).phone_masked == f"139****{race:04d}"

        # The loser keeps its number, no hold, and its rebind is still READY.
        loser_account = pb.get_account(loser)
        assert loser_account.phone_masked == olds[loser][:3] + "****" + olds[loser][-4:]
        assert loser_account.state == res.ACCOUNT_STATE_ACTIVE
        assert not loser_account.HasField("hold_until")
        loser_rebind = pb.get_rebind(loser, rebinds[loser])
        assert loser_rebind.state == res.REBIND_STATE_READY
        assert not loser_rebind.HasField("complete_time")

        changes = query(
            server,
            "SELECT account_id, rebind_id FROM binding_changes WHERE account_id IN (?, ?)",
            *ids,
        )
        assert changes == [(winner, rebinds[winner])]
        notices = query(
            server,
            "SELECT account_id, rebind_id, to_masked FROM sms_outbox"
            " WHERE purpose = 'CHANGE_NOTICE' AND account_id IN (?, ?)",
            *ids,
        )
        old = olds[winner]
        assert notices == [(winner, rebinds[winner], old[:3] + "****" + old[-4:])]
    assert sum(winners.values()) == 5


def test_parallel_starts_on_one_account_leave_exactly_one_open_rebind(server):
    pb = server.api
    pb.register("cc-starts", "13800138103")
    news = [f"139001392{n:02d}" for n in range(10)]

    outcomes = parallel([lambda n=n: pb.start("cc-starts", n) for n in news])

    failed = [o for o in outcomes if not o.ok]
    assert not [o for o in failed if o.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)]
    # A start that lost a race may be told to retry, or be over the daily start limit.
    assert set(reasons(failed)) <= {"STORE_UNAVAILABLE", "RATE_LIMITED"}
    started = {o.value.rebind_id for o in outcomes if o.ok}
    assert started, "no start succeeded"
    assert len(started) == len([o for o in outcomes if o.ok])

    states = dict(
        query(server, "SELECT rebind_id, state FROM rebinds WHERE account_id = ?", "cc-starts")
    )
    assert set(states) == started
    open_ids = [r for r, s in states.items() if s in ("PENDING", "AWAITING_REVIEW", "READY")]
    assert len(open_ids) == 1
    assert Counter(states.values()) == {"PENDING": 1, "CANCELLED": len(started) - 1}

    for rebind_id in started:
        expected = (
            res.REBIND_STATE_PENDING if rebind_id == open_ids[0] else res.REBIND_STATE_CANCELLED
        )
        assert pb.get_rebind("cc-starts", rebind_id).state == expected
    # The open one is fully usable.
    assert pb.identity("cc-starts", open_ids[0]).completed_steps == [res.REBIND_STEP_IDENTITY]


def test_start_racing_identity_or_completion_on_one_account_never_deadlocks(server):
    """StartRebind locks the account, then its open rebinds; VerifyIdentity and
    CompleteRebind must take them in the same order, or PostgreSQL aborts one."""
    pb = server.api
    for n in range(6):
        account, old = f"cc-order-{n}", f"138001385{n:02d}"
        pb.register(account, old)
        first = pb.start(account, f"139001395{n:02d}")
        identity, started = parallel(
            [
                lambda a=account, r=first.rebind_id: pb.identity(a, r),
                lambda a=account, p=f"137001375{n:02d}": pb.start(a, p),
            ]
        )
        assert started.ok, started.reason
        # Either the identity check came first, or the new start had cancelled its rebind.
        assert identity.reason in ("OK", "REBIND_CLOSED"), identity.reason

        account, old = f"cc-order-done-{n}", f"138001386{n:02d}"
        pb.register(account, old)
        ready = pb.ready_rebind(account, old, f"139001396{n:02d}")
        completed, started = parallel(
            [
                lambda a=account, r=ready.rebind_id: pb.complete(a, r),
                lambda a=account, p=f"137001376{n:02d}": pb.start(a, p),
            ]
        )
        assert started.ok, started.reason
        assert completed.reason in ("OK", "REBIND_CLOSED"), completed.reason


# -- registration -----------------------------------------------------------------


def test_parallel_register_of_one_account_with_same_data_answers_one_account(server):
    """Ten registrations of one account race: one registers it. Under one request_id
    the other nine answer as it did; without one, they answer ACCOUNT_EXISTS."""
    pb = server.api
    for account_id, request_id in (("cc-reg-1", ""), ("cc-reg-2", "reg-same")):
        phone = "13800138104" if request_id == "" else "13800138105"
        outcomes = parallel(
            [lambda a=account_id, p=phone, r=request_id: pb.register(a, p, request_id=r)] * 10
        )
        if request_id:
            assert [o.reason for o in outcomes] == ["OK"] * 10
        else:
            assert sorted(o.reason for o in outcomes) == ["ACCOUNT_EXISTS"] * 9 + ["OK"]
        answers = [o.value for o in outcomes if o.reason == "OK"]
        first = answers[0]
        assert first.account_id == account_id
        assert first.phone_masked == phone[:3] + "****" + phone[-4:]
        assert all(answer == first for answer in answers)
        rows = query(server, "SELECT account_id FROM accounts WHERE account_id = ?", account_id)
        assert rows == [(account_id,)]
    keys = query(
        server,
        "SELECT account_id, request_id FROM idempotency_keys WHERE operation = ?",
        "RegisterAccount",
    )
    assert keys == [("cc-reg-2", "reg-same")]


def test_parallel_register_of_one_number_for_two_accounts_binds_it_once(server):
    pb = server.api
    for race in range(5):
        phone = f"1860013{race:04d}"
        ids = [f"cc-num{race}-a", f"cc-num{race}-b"]
        outcomes = parallel(
            [lambda a=a, p=phone: pb.register(a, p, id_number=ID_NUMBER) for a in ids]
        )
        won = [a for a, o in zip(ids, outcomes, strict=True) if o.ok]
        assert len(won) == 1, [o.reason for o in outcomes]
        lost = next(o for o in outcomes if not o.ok)
        assert (lost.code, lost.reason) == (FP, "PHONE_IN_USE")
        rows = query(server, "SELECT account_id FROM accounts WHERE account_id IN (?, ?)", *ids)
        assert rows == [(won[0],)]
        assert pb.get_account(won[0]).phone_masked == f"186****{race:04d}"
