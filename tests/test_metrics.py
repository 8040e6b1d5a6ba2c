"""The Prometheus endpoint reports calls, failures, codes sent and the outbox."""

from __future__ import annotations

import urllib.request
from datetime import timedelta

import grpc
import pytest
from conftest import start_server
from support import NEW

METHOD = "/phonebind.v1.BindingService/VerifyCode"


@pytest.fixture
def measured(database_url, tmp_path, clock, secrets_seen):
    running = start_server(
        database_url, tmp_path, clock, secrets_seen, metrics_listen="127.0.0.1:0"
    )
    yield running
    running.stop()


def scrape(running) -> dict[str, float]:
    url = f"http://127.0.0.1:{running.app.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_count_calls_failures_codes_and_outbox(measured):
    pb = measured.api
    pb.register("m-1", "13800138901")
    rebind = pb.start("m-1", "13900139901")
    pb.send("m-1", rebind.rebind_id, NEW)
    code = pb.inbox.next_code("+8613900139901")
    wrong = "000000" if code != "000000" else "111111"
    with pytest.raises(grpc.RpcError):
        pb.verify("m-1", rebind.rebind_id, NEW, wrong)
    with pytest.raises(grpc.RpcError):
        pb.send("m-1", rebind.rebind_id, NEW)
    pb.verify("m-1", rebind.rebind_id, NEW, code)
    measured.snapshot()  # the outbox has delivered

    samples = scrape(measured)
    assert samples[f'phonebind_rpcs_total{{method="{METHOD}",outcome="OK"}}'] == 1
    assert samples[f'phonebind_rpcs_total{{method="{METHOD}",outcome="CODE_MISMATCH"}}'] == 1
    assert samples['phonebind_verification_failures_total{reason="CODE_MISMATCH"}'] == 1
    assert samples['phonebind_limit_refusals_total{reason="RESEND_TOO_SOON"}'] == 1
    assert samples['phonebind_sms_delivered_total{purpose="REBIND_CODE"}'] == 1
    assert samples["phonebind_outbox_pending"] == 0
    assert samples["phonebind_outbox_oldest_age_seconds"] == 0
    # The standard gRPC server metrics, as stock dashboards read them.
    labels = 'grpc_method="VerifyCode",grpc_service="phonebind.v1.BindingService",grpc_type="unary"'
    assert samples[f"grpc_server_handling_seconds_count{{{labels}}}"] == 2
    assert samples[f"grpc_server_started_total{{{labels}}}"] == 2
    assert samples[f'grpc_server_handled_total{{grpc_code="InvalidArgument",{labels}}}'] == 1
    assert samples[f'grpc_server_handled_total{{grpc_code="OK",{labels}}}'] == 1


def test_outbox_gauges_show_messages_waiting_for_a_provider_that_is_down(
    database_url, tmp_path, clock, secrets_seen
):
    running = start_server(
        database_url,
        tmp_path,
        clock,
        secrets_seen,
        metrics_listen="127.0.0.1:0",
        sms_gateway="http://127.0.0.1:9/sms",  # nothing listens there
    )
    try:
        pb = running.api
        pb.register("m-2", "13800138902")
        rebind = pb.start("m-2", "13900139902")
        pb.send("m-2", rebind.rebind_id, NEW)
        clock.advance(timedelta(seconds=30))
        samples = scrape(running)
        assert samples["phonebind_outbox_pending"] == 1
        assert samples["phonebind_outbox_oldest_age_seconds"] == 30
    finally:
        running.stop()


def test_scrapes_do_not_keep_database_connections(database_url, tmp_path, clock, secrets_seen):
    """Each scrape runs on a new thread; a connection it kept would never come back."""
    running = start_server(
        database_url,
        tmp_path,
        clock,
        secrets_seen,
        metrics_listen="127.0.0.1:0",
        store_connections=2,
    )
    try:
        pool_size = running.app.settings.store_connections
        for _ in range(pool_size + 5):
            assert "phonebind_outbox_pending" in scrape(running)
        assert running.api.register("m-3", "13800138903").phone_masked == "138****8903"
    finally:
        running.stop()


def test_store_statements_are_counted_per_call_while_calls_overlap(measured):
    """Each GetAccount is one statement, however many run at once: on PostgreSQL
    calls' units of work interleave on the loop, and none may count another's."""
    from concurrent.futures import ThreadPoolExecutor

    from phonebind.v1 import binding_service_pb2 as api

    pb = measured.api
    pb.register("m-2", "13800138902")
    request = api.GetAccountRequest(account_id="m-2")
    before = scrape(measured)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: pb.stub.GetAccount(request, timeout=10), range(400)))
    after = scrape(measured)
    method = "/phonebind.v1.BindingService/GetAccount"
    for counter in ("phonebind_store_statements_total", "phonebind_store_round_trips_total"):
        key = f'{counter}{{method="{method}"}}'
        assert after[key] - before.get(key, 0.0) == 400, counter
