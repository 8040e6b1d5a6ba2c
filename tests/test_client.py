"""The shipped client library against a real server."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from support import HOLDER, ID_NUMBER, e164, held_lock, rows

from phonebind_client import ErrorReason, PhonebindClient, PhonebindError, RebindState
from phonebind_client.calls import Retry
from phonebind_client.retry import retryable

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_facade_runs_a_complete_rebind(server):
    inbox = server.inbox
    server.secrets.add_phone("13800138100")
    server.secrets.add_phone("13900139100")
    with PhonebindClient(server.target) as pb:
        account = pb.register_account("loan-c1", HOLDER, ID_NUMBER, "13800138100")
        assert account.phone_masked == "138****8100"
        rebind = pb.start_rebind("loan-c1", "13900139100")
        pb.verify_identity("loan-c1", rebind.rebind_id, HOLDER, ID_NUMBER)
        pb.send_code("loan-c1", rebind.rebind_id, "old")
        pb.send_code("loan-c1", rebind.rebind_id, "new")
        pb.verify_code("loan-c1", rebind.rebind_id, "old", inbox.next_code(e164("13800138100")))
        ready = pb.verify_code(
            "loan-c1", rebind.rebind_id, "new", inbox.next_code(e164("13900139100"))
        )
        assert ready.state == RebindState.Value("REBIND_STATE_READY")
        done = pb.complete_rebind("loan-c1", rebind.rebind_id)
        assert done.account.phone_masked == "139****9100"
        history = list(pb.iter_binding_history("loan-c1", page_size=1))
        assert [c.rebind_id for c in history] == [rebind.rebind_id]


def test_facade_raises_errors_with_reason_and_attempts_left(server):
    server.secrets.add_phone("13800138101")
    with PhonebindClient(server.target) as pb:
        pb.register_account("loan-c2", HOLDER, ID_NUMBER, "13800138101")
        rebind = pb.start_rebind("loan-c2", "13900139101")
        pb.send_code("loan-c2", rebind.rebind_id, "new")
        code = server.inbox.next_code(e164("13900139101"))
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"  # well-formed, never the real one
        with pytest.raises(PhonebindError) as caught:
            pb.verify_code("loan-c2", rebind.rebind_id, "new", wrong)
        assert caught.value.reason == "CODE_MISMATCH"
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.attempts_left == 4
        with pytest.raises(PhonebindError) as again:
            pb.send_code("loan-c2", rebind.rebind_id, "new")
        assert again.value.reason == "RESEND_TOO_SOON"
        assert again.value.retry_delay is not None
        assert again.value.retry_delay.total_seconds() == 60
        with pytest.raises(PhonebindError) as bad:
            pb.start_rebind("loan-c2", "not a phone")
        assert bad.value.reason == "INVALID_PHONE"
        assert bad.value.field_violations[0][0] == "new_phone"


def test_facade_retries_unavailable_with_backoff_then_gives_up():
    delays: list[float] = []
    with (
        PhonebindClient("127.0.0.1:1", timeout=1.0, max_attempts=3, sleep=delays.append) as pb,
        pytest.raises(PhonebindError) as caught,
    ):
        pb.get_account("loan-none")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(delays) == 2
    assert all(0 <= d <= 2.0 for d in delays)


@pytest.mark.parametrize(
    ("code", "reason", "replay_safe", "others"),
    [
        (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE", True, True),
        (grpc.StatusCode.UNAVAILABLE, None, True, False),  # the transport: may have arrived
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, True, False),
        (grpc.StatusCode.CANCELLED, None, True, False),  # a draining server
        (grpc.StatusCode.INTERNAL, None, False, False),
        (grpc.StatusCode.FAILED_PRECONDITION, "CODE_EXPIRED", False, False),
    ],
)
def test_which_failures_each_kind_of_call_retries(code, reason, replay_safe, others):
    """Reads and request_id calls retry whatever cannot have taken effect twice;
    verify_code and the like only what phonebind says changed nothing."""
    error = PhonebindError(code, reason=reason, domain="phonebind.v1" if reason else None)
    assert retryable(error, Retry.REPLAY_SAFE) is replay_safe
    assert retryable(error, Retry.STORE_UNAVAILABLE) is others


def test_a_call_past_its_deadline_is_retried_with_the_same_request_id_to_one_effect(server):
    """The server finishes an attempt the client gave up on; the retry, with the
    same request_id, gets that attempt's answer instead of a second code."""
    server.secrets.add_phone("13800138104")
    waits: list[float] = []
    with PhonebindClient(server.target, timeout=0.4, max_attempts=20, sleep=waits.append) as pb:
        pb.register_account("loan-c4", HOLDER, ID_NUMBER, "13800138104")
        rebind = pb.start_rebind("loan-c4", "13900139104")
        with ThreadPoolExecutor(1) as pool:
            with held_lock(server.database_url, rebind.rebind_id):
                sending = pool.submit(
                    pb.send_code, "loan-c4", rebind.rebind_id, "old", request_id="send-c4"
                )
                time.sleep(1.2)  # the lock outlasts the deadlines of the first attempts
            sent = sending.result(timeout=30)
        assert len(waits) >= 2, waits  # it retried past DEADLINE_EXCEEDED
        assert codes_queued(server) == 1
        # The same request_id keeps answering the first send, and queues nothing more.
        assert pb.send_code("loan-c4", rebind.rebind_id, "old", request_id="send-c4") == sent
        assert codes_queued(server) == 1
    assert server.inbox.next_code(e164("13800138104"))


def codes_queued(server) -> int:
    sql = "SELECT count(*) FROM sms_outbox WHERE purpose = 'REBIND_CODE'"
    return rows(server.database_url, sql)[0][0]


def test_an_error_carries_the_request_id_to_retry_with_and_the_servers_call_id(server):
    with PhonebindClient(server.target) as pb, pytest.raises(PhonebindError) as caught:
        pb.start_rebind("loan-none", "13900139105", request_id="start-none")
    assert caught.value.reason == "ACCOUNT_NOT_FOUND"
    assert caught.value.request_id == "start-none"
    assert caught.value.x_request_id and len(caught.value.x_request_id) == 32
    with PhonebindClient(server.target) as pb, pytest.raises(PhonebindError) as read:
        pb.get_account("loan-none")
    assert read.value.request_id is None  # a read carries no request_id


def test_per_request_metadata_and_reasons_comparable_with_the_enum(server):
    with PhonebindClient(server.target) as pb:
        english = pb.with_metadata(("accept-language", "en"), ("x-request-id", "app-trace-1"))
        with pytest.raises(PhonebindError) as caught:
            english.get_account("loan-none")
        error = caught.value
        assert error.localized_message == "The account was not found."
        assert error.x_request_id == "app-trace-1"
        assert error.error_reason == ErrorReason.ERROR_REASON_ACCOUNT_NOT_FOUND
        assert str(error).startswith("ACCOUNT_NOT_FOUND (NOT_FOUND): ")
        english.close()  # the channel is pb's: it stays open
        with pytest.raises(PhonebindError) as chinese:
            pb.get_account("loan-none")
        assert chinese.value.localized_message == "账户不存在。"
        assert chinese.value.x_request_id != "app-trace-1"
    with (
        PhonebindClient(server.target, token="t") as tokened,
        pytest.raises(ValueError, match="already sends authorization"),
    ):
        tokened.with_metadata(("Authorization", "Bearer other"))
    plain = PhonebindError(grpc.StatusCode.INVALID_ARGUMENT, "bad", reason="INVALID_ARGUMENT")
    assert str(plain) == "INVALID_ARGUMENT: bad"
    assert plain.error_reason == ErrorReason.ERROR_REASON_UNSPECIFIED  # no phonebind domain


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_client_package_installs_and_works_on_its_own(server, tmp_path):
    """`pip install ./client` into an empty venv is all a caller needs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "-c",
            str(ROOT / "constraints.txt"),
            str(ROOT / "client"),
        ],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    server.api.register("loan-c3", "13800138102")
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        from phonebind_client import PhonebindClient
        assert importlib.util.find_spec("peewee") is None, "peewee must not be installed"
        assert importlib.util.find_spec("phonebind_server") is None
        with PhonebindClient("{server.target}") as pb:
            print(pb.get_account("loan-c3").phone_masked)
        """
    )
    out = subprocess.run(
        [str(python), "-c", script], check=True, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "138****8102"
