"""AIP-155 request ids: a retry with the same key answers the first result and
changes nothing; the same key with other parameters is REQUEST_ID_REUSED (but
for RegisterAccount, where the key alone makes a replay); keys are scoped per
account. Run on SQLite and PostgreSQL, sequentially and in parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import grpc
import pytest
from support import NEW, OLD, e164, error_details, rows

from phonebind.v1 import resources_pb2 as res

FP = grpc.StatusCode.FAILED_PRECONDITION


def refused(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code, reason, _ = error_details(caught.value)
    return code, reason


def parallel(calls: list[Callable[[], Any]]) -> list[tuple[str, Any]]:
    """Runs every call on its own thread, all released together: ("OK", value) or
    (reason, status) for each."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> tuple[str, Any]:
        barrier.wait(timeout=30)
        try:
            return "OK", call()
        except grpc.RpcError as error:
            code, reason, _ = error_details(error)
            return reason, code

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def query(server, sql: str, *params: object) -> list[tuple]:
    """Rows straight from the store; `?` is the parameter placeholder on both backends."""
    return rows(server.database_url, sql, *params)


def masked(phone: str) -> str:
    return phone[:3] + "****" + phone[-4:]


def code_rows(server, rebind_id: str, phone: str) -> int:
    rows = query(
        server,
        "SELECT COUNT(*) FROM sms_outbox"
        " WHERE rebind_id = ? AND to_masked = ? AND purpose = 'REBIND_CODE'",
        rebind_id,
        masked(phone),
    )
    return rows[0][0]


def notice_rows(server, account_id: str) -> list[tuple]:
    return query(
        server,
        "SELECT rebind_id, to_masked FROM sms_outbox"
        " WHERE account_id = ? AND purpose = 'CHANGE_NOTICE'",
        account_id,
    )


def history_rows(server, account_id: str) -> list[tuple]:
    return query(server, "SELECT rebind_id FROM binding_changes WHERE account_id = ?", account_id)


# -- StartRebind --------------------------------------------------------------------


def test_start_rebind_retry_answers_the_same_rebind_and_cancels_nothing(server, clock):
    pb = server.api
    pb.register("idem-start", "13800138200")
    first = pb.start("idem-start", "13900139200", request_id="start-1")
    clock.advance(timedelta(seconds=5))
    again = pb.start("idem-start", "13900139200", request_id="start-1")

    assert again == first
    assert again.state == res.REBIND_STATE_PENDING
    rows = query(server, "SELECT rebind_id, state FROM rebinds WHERE account_id = ?", "idem-start")
    assert rows == [(first.rebind_id, "PENDING")]
    assert pb.get_rebind("idem-start", first.rebind_id).state == res.REBIND_STATE_PENDING

    # The same key for another change is refused and writes nothing.
    assert refused(lambda: pb.start("idem-start", "13700137200", request_id="start-1")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    assert refused(
        lambda: pb.start("idem-start", "13900139200", lost=True, request_id="start-1")
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    rows = query(server, "SELECT rebind_id, state FROM rebinds WHERE account_id = ?", "idem-start")
    assert rows == [(first.rebind_id, "PENDING")]

    # A new key is a new start, which does cancel the open one.
    other = pb.start("idem-start", "13900139200", request_id="start-2")
    assert other.rebind_id != first.rebind_id
    assert pb.get_rebind("idem-start", first.rebind_id).state == res.REBIND_STATE_CANCELLED


def test_parallel_start_rebind_with_one_request_id_starts_one_rebind(server):
    pb = server.api
    pb.register("idem-pstart", "13800138201")

    outcomes = parallel(
        [lambda: pb.start("idem-pstart", "13900139201", request_id="pstart-1")] * 10
    )

    assert [reason for reason, _ in outcomes] == ["OK"] * 10
    ids = {value.rebind_id for _, value in outcomes}
    assert len(ids) == 1
    rows = query(server, "SELECT rebind_id, state FROM rebinds WHERE account_id = ?", "idem-pstart")
    assert rows == [(ids.pop(), "PENDING")]


# -- SendCode -----------------------------------------------------------------------


def test_send_code_retry_answers_the_same_and_sends_one_sms(server, clock):
    pb = server.api
    old = "13800138202"
    pb.register("idem-send", old)
    rebind_id = pb.start("idem-send", "13900139202").rebind_id

    first = pb.send("idem-send", rebind_id, OLD, request_id="send-1")
    delivered = pb.inbox.wait_for(e164(old), 1, "REBIND_CODE")
    assert len(delivered) == 1
    clock.advance(timedelta(seconds=10))
    again = pb.send("idem-send", rebind_id, OLD, request_id="send-1")

    # The first answer, not one computed now; and no RESEND_TOO_SOON.
    assert again.expire_time == first.expire_time
    assert again.resend_time == first.resend_time
    assert again.attempts_left == first.attempts_left == 5
    assert again == first
    assert code_rows(server, rebind_id, old) == 1

    # Without the key the same call is a resend, refused inside the cooldown.
    assert refused(lambda: pb.send("idem-send", rebind_id, OLD)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RESEND_TOO_SOON",
    )
    # The same key for the other target is a different request.
    assert refused(lambda: pb.send("idem-send", rebind_id, NEW, request_id="send-1")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    assert code_rows(server, rebind_id, old) == 1
    assert code_rows(server, rebind_id, "13900139202") == 0

    # The one code that was sent still works: the retry did not replace it.
    code = pb.inbox.next_code(e164(old))
    rebind = pb.verify("idem-send", rebind_id, OLD, code)
    assert res.REBIND_STEP_OLD_PHONE_CODE in rebind.completed_steps


def test_parallel_send_code_with_one_request_id_sends_one_sms(server):
    pb = server.api
    old = "13800138203"
    pb.register("idem-psend", old)
    rebind_id = pb.start("idem-psend", "13900139203").rebind_id

    outcomes = parallel([lambda: pb.send("idem-psend", rebind_id, OLD, request_id="psend-1")] * 10)

    assert [reason for reason, _ in outcomes] == ["OK"] * 10
    first = outcomes[0][1]
    assert all(value == first for _, value in outcomes)
    assert first.attempts_left == 5
    assert code_rows(server, rebind_id, old) == 1
    assert len(pb.inbox.wait_for(e164(old), 1, "REBIND_CODE")) == 1
    code = pb.inbox.next_code(e164(old))
    assert (
        res.REBIND_STEP_OLD_PHONE_CODE
        in pb.verify("idem-psend", rebind_id, OLD, code).completed_steps
    )


# -- CompleteRebind -----------------------------------------------------------------


def test_complete_rebind_retry_answers_the_same_change_once(server, clock):
    pb = server.api
    old, new = "13800138204", "13900139204"
    pb.register("idem-done", old)
    rebind_id = pb.ready_rebind("idem-done", old, new).rebind_id

    first = pb.complete("idem-done", rebind_id, request_id="done-1")
    assert first.rebind.state == res.REBIND_STATE_COMPLETED
    assert first.account.phone_masked == masked(new)
    again = pb.complete("idem-done", rebind_id, request_id="done-1")

    assert again == first
    assert history_rows(server, "idem-done") == [(rebind_id,)]
    assert notice_rows(server, "idem-done") == [(rebind_id, masked(old))]
    assert len(pb.inbox.wait_for(e164(old), 1, "CHANGE_NOTICE")) == 1

    # A retry later still answers the completed rebind and the (moved) account.
    clock.advance(timedelta(minutes=1))
    later = pb.complete("idem-done", rebind_id, request_id="done-1")
    assert later.rebind == first.rebind
    assert later.account.phone_masked == masked(new)
    assert later.account.hold_until == first.account.hold_until

    # Without the key it is a new completion of a closed rebind.
    assert refused(lambda: pb.complete("idem-done", rebind_id)) == (FP, "REBIND_CLOSED")
    assert refused(lambda: pb.complete("idem-done", rebind_id, request_id="done-2")) == (
        FP,
        "REBIND_CLOSED",
    )
    assert history_rows(server, "idem-done") == [(rebind_id,)]
    assert notice_rows(server, "idem-done") == [(rebind_id, masked(old))]


def test_parallel_complete_rebind_with_one_request_id_completes_once(server):
    pb = server.api
    old, new = "13800138205", "13900139205"
    pb.register("idem-pdone", old)
    rebind_id = pb.ready_rebind("idem-pdone", old, new).rebind_id

    outcomes = parallel([lambda: pb.complete("idem-pdone", rebind_id, request_id="pdone-1")] * 10)

    assert [reason for reason, _ in outcomes] == ["OK"] * 10
    first = outcomes[0][1]
    assert all(value == first for _, value in outcomes)
    assert first.rebind.state == res.REBIND_STATE_COMPLETED
    assert history_rows(server, "idem-pdone") == [(rebind_id,)]
    assert notice_rows(server, "idem-pdone") == [(rebind_id, masked(old))]


# -- RegisterAccount ----------------------------------------------------------------


def test_register_retry_answers_the_same_account_whatever_its_data(server, clock):
    pb = server.api
    first = pb.register("idem-reg", "13800138206", request_id="reg-1")
    clock.advance(timedelta(seconds=5))
    again = pb.register("idem-reg", "13800138206", request_id="reg-1")
    assert again == first
    assert query(server, "SELECT COUNT(*) FROM accounts") == [(1,)]

    # Unlike the other RPCs, other data under the same key is no REQUEST_ID_REUSED:
    # that answer would tell a guessed name or ID number from the record's.
    before = server.snapshot()
    assert pb.register("idem-reg", "13800138207", request_id="reg-1") == first
    assert pb.register("idem-reg", "13800138206", name="李四", request_id="reg-1") == first
    assert server.snapshot() == before
    assert pb.get_account("idem-reg") == first

    # The number the replayed call named is still free.
    other = pb.register("idem-reg-2", "13800138207", request_id="reg-1")
    assert other.phone_masked == "138****8207"


def test_request_ids_are_scoped_per_account(server):
    pb = server.api
    accounts = {"idem-a": ("13800138208", "13900139208"), "idem-b": ("13700137208", "13600136208")}

    registered = {a: pb.register(a, old, request_id="shared") for a, (old, _) in accounts.items()}
    assert registered["idem-a"].phone_masked == "138****8208"
    assert registered["idem-b"].phone_masked == "137****7208"

    started = {a: pb.start(a, new, request_id="shared") for a, (_, new) in accounts.items()}
    assert started["idem-a"].rebind_id != started["idem-b"].rebind_id
    for account_id, rebind in started.items():
        assert rebind.account_id == account_id
        assert pb.get_rebind(account_id, rebind.rebind_id).state == res.REBIND_STATE_PENDING

    for account_id, (old, _) in accounts.items():
        pb.send(account_id, started[account_id].rebind_id, OLD, request_id="shared")
        assert code_rows(server, started[account_id].rebind_id, old) == 1

    keys = query(
        server,
        "SELECT operation, account_id FROM idempotency_keys WHERE request_id = ?"
        " ORDER BY operation, account_id",
        "shared",
    )
    assert keys == [
        (operation, account_id)
        for operation in ("RegisterAccount", "SendCode", "StartRebind")
        for account_id in ("idem-a", "idem-b")
    ]


def test_request_ids_are_forgotten_after_their_lifetime(server, clock):
    """Housekeeping drops idempotency records older than idempotency_ttl (24 h)."""
    pb = server.api
    pb.register("idem-ttl", "13800138999", request_id="r-old")
    clock.advance(timedelta(hours=23))
    pb.register("idem-ttl-2", "13800138998", request_id="r-new")
    clock.advance(timedelta(hours=1, microseconds=1))
    assert server.on_loop(server.app.housekeep()) == 1
    kept = rows(server.database_url, "SELECT request_id FROM idempotency_keys")
    assert [r[0] for r in kept] == ["r-new"]
