"""Abuse limits: counted in the database, exact retry delays, a named quota."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, timedelta

import grpc
import pytest
from conftest import start_server
from support import (
    NEW,
    OLD,
    Api,
    Inbox,
    Serve,
    error_details,
    make_id_number,
)

from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import resources_pb2 as res


def refusal(call):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return error_details(caught.value)


def test_sends_per_number_per_hour_then_exact_retry(server, clock):
    pb = server.api
    pb.register("lim-1", "13800138301")
    rebind = pb.start("lim-1", "13900139301")
    first_send = clock.now()
    for _ in range(5):
        pb.send("lim-1", rebind.rebind_id, NEW)
        clock.advance(timedelta(seconds=60))
    before = server.snapshot()
    code, reason, details = refusal(lambda: pb.send("lim-1", rebind.rebind_id, NEW))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    wait = first_send + timedelta(hours=1) - clock.now()
    assert details["RetryInfo"].retry_delay.ToTimedelta() == wait
    quota = details["QuotaFailure"].violations[0]
    assert quota.subject == "phone:139****9301"
    assert "5 codes per number per hour" in quota.description
    assert server.snapshot() == before
    # The old number has its own budget.
    pb.send("lim-1", rebind.rebind_id, OLD)
    # The window slides: one microsecond before the first send leaves it, still refused.
    clock.advance(wait - timedelta(microseconds=1))
    rebind = pb.start("lim-1", "13900139301")
    assert refusal(lambda: pb.send("lim-1", rebind.rebind_id, NEW))[1] == "RATE_LIMITED"
    clock.advance(timedelta(microseconds=1))
    pb.send("lim-1", rebind.rebind_id, NEW)


def test_sends_per_number_per_day(database_url, tmp_path, clock, secrets_seen):
    # A day-long rebind, so one rebind can use the whole daily budget.
    running = start_server(
        database_url, tmp_path, clock, secrets_seen, env={"PHONEBIND_POLICY_REBIND_TTL": "1d"}
    )
    try:
        pb = running.api
        pb.register("lim-2", "13800138302")
        rebind = pb.start("lim-2", "13900139302")
        first = clock.now()
        for _ in range(10):
            pb.send("lim-2", rebind.rebind_id, NEW)
            clock.advance(timedelta(hours=2))
        code, reason, details = refusal(lambda: pb.send("lim-2", rebind.rebind_id, NEW))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert "10 codes per number per day" in details["QuotaFailure"].violations[0].description
        assert details["RetryInfo"].retry_delay.ToTimedelta() == first + timedelta(days=1) - (
            clock.now()
        )
    finally:
        running.stop()


def test_rebind_starts_per_account_per_day(server, clock):
    pb = server.api
    pb.register("lim-3", "13800138303")
    first = clock.now()
    for _ in range(5):
        pb.start("lim-3", "13900139303")
        clock.advance(timedelta(minutes=10))
    before = server.snapshot()
    code, reason, details = refusal(lambda: pb.start("lim-3", "13900139303"))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert details["RetryInfo"].retry_delay.ToTimedelta() == first + timedelta(days=1) - clock.now()
    assert details["QuotaFailure"].violations[0].subject == "account:lim-3"
    assert server.snapshot() == before
    clock.advance(first + timedelta(days=1) - clock.now())
    assert pb.start("lim-3", "13900139303").state == res.REBIND_STATE_PENDING


def test_identity_failures_lock_rebinding_but_not_the_binding(server, clock):
    pb = server.api
    pb.register("victim", "13800138304")
    rebind = pb.start("victim", "13900139304")
    wrong = make_id_number()
    # attempts_left counts down to the account's cap of 5 a day, which runs out
    # before the rebind's 10 wrong answers.
    for left in (4, 3, 2, 1):
        _, reason, details = refusal(
            lambda: pb.identity("victim", rebind.rebind_id, id_number=wrong)
        )
        assert reason == "IDENTITY_MISMATCH"
        assert details["ErrorInfo"].metadata["attempts_left"] == str(left)
    code, reason, details = refusal(
        lambda: pb.identity("victim", rebind.rebind_id, id_number=wrong)
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_LOCKED")
    assert details["RetryInfo"].retry_delay.ToTimedelta() == timedelta(hours=24)

    # The binding and GetAccount keep working; only rebinding is locked.
    account = pb.get_account("victim")
    assert account.phone_masked == "138****8304"
    assert account.state == res.ACCOUNT_STATE_REBIND_LOCKED
    assert refusal(lambda: pb.identity("victim", rebind.rebind_id))[1] == "REBIND_LOCKED"
    # Giving up stays possible on a locked rebind.
    cancelled = pb.stub.CancelRebind(
        api.CancelRebindRequest(account_id="victim", rebind_id=rebind.rebind_id)
    ).rebind
    assert cancelled.state == res.REBIND_STATE_CANCELLED
    clock.advance(timedelta(hours=23))
    code, reason, details = refusal(lambda: pb.start("victim", "13900139304"))
    assert reason == "ACCOUNT_LOCKED"
    assert details["RetryInfo"].retry_delay.ToTimedelta() == timedelta(hours=1)
    clock.advance(timedelta(hours=1))
    fresh = pb.start("victim", "13900139304")
    assert pb.identity("victim", fresh.rebind_id).completed_steps == [res.REBIND_STEP_IDENTITY]
    assert pb.get_account("victim").state == res.ACCOUNT_STATE_ACTIVE


def test_a_rebind_lock_during_a_hold_leaves_hold_until_set(server, clock):
    """The state can show only one of the two; hold_until still tells lenders of the hold."""
    pb = server.api
    pb.register("held", "13800138305")
    first = pb.ready_rebind("held", "13800138305", "13900139305")
    hold_until = pb.complete("held", first.rebind_id).account.hold_until
    clock.advance(timedelta(hours=1))
    second = pb.start("held", "13700137305")
    wrong = make_id_number()
    for _ in range(5):
        refusal(lambda: pb.identity("held", second.rebind_id, id_number=wrong))

    account = pb.get_account("held")
    assert account.state == res.ACCOUNT_STATE_REBIND_LOCKED
    assert account.HasField("hold_until")
    assert account.hold_until == hold_until

    clock.advance(hold_until.ToDatetime(tzinfo=UTC) - clock.now())
    account = pb.get_account("held")
    assert account.state == res.ACCOUNT_STATE_REBIND_LOCKED  # the 24 h lock outlasts the hold
    assert not account.HasField("hold_until")


@pytest.mark.parametrize("processes", [2])
def test_two_processes_never_exceed_the_per_number_cap(
    database_url, tmp_path, processes, secrets_seen
):
    """Ten accounts move towards one number through two server processes at once."""
    sms_file = str(tmp_path / "sms.jsonl")
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{tmp_path}/shared.db"
    servers = [
        Serve(database_url, tmp_path, sms_file, secrets=secrets_seen).start()
        for _ in range(processes)
    ]
    channels = [grpc.insecure_channel(server.address) for server in servers]
    try:
        apis = [Api(channel, Inbox(sms_file, secrets_seen), secrets_seen) for channel in channels]
        rebinds = []
        for n in range(10):
            account = f"cap-{n}"
            apis[0].register(account, f"1380013840{n}", id_number=make_id_number(seq=f"{n:03d}"))
            rebinds.append((account, apis[0].start(account, "13900139400").rebind_id))

        def send(item):
            index, (account, rebind_id) = item
            stub = apis[index % processes].stub
            try:
                stub.SendCode(
                    api.SendCodeRequest(account_id=account, rebind_id=rebind_id, target=NEW)
                )
                return "OK"
            except grpc.RpcError as error:
                return error_details(error)[1]

        with ThreadPoolExecutor(10) as pool:
            outcomes = list(pool.map(send, enumerate(rebinds)))
        assert outcomes.count("OK") == 5, outcomes
        assert set(outcomes) == {"OK", "RATE_LIMITED"}
        delivered = apis[0].inbox.wait_for("+8613900139400", 5, "REBIND_CODE")
        assert len(delivered) == 5
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.stop()
