"""phonebind-load, run for real against a real server (SQLite and PostgreSQL).

These check what the tool reports and what it did to the server, never how
fast anything was: benchmarks are `make bench`, not tests.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import socket
import subprocess
import sys
import urllib.request

import pytest
from conftest import start_server
from support import FakeClock, Secrets, rows

from phonebind_client import load
from phonebind_server.domain.identity import normalize_id_number
from phonebind_server.domain.phone import is_virtual_operator, parse_phone
from phonebind_server.sms.gateways import GatewayError

BIN = pathlib.Path(sys.executable).parent
FLOW_RPCS = ["StartRebind", "VerifyIdentity", "SendCode", "VerifyCode", "CompleteRebind"]
# Calls of each RPC in one complete flow.
PER_FLOW = {
    "StartRebind": 1,
    "VerifyIdentity": 1,
    "SendCode": 2,
    "VerifyCode": 2,
    "CompleteRebind": 1,
}


def run_load(target: str, *args: str, timeout: float = 120) -> dict:
    completed = subprocess.run(
        [str(BIN / "phonebind-load"), "--target", target, "--json", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout)


def count(server, sql: str) -> int:
    return rows(server.database_url, sql)[0][0]


def assert_percentiles_ordered(stats: dict) -> None:
    lat = stats["latency_ms"]
    assert 0 <= lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]
    assert stats["throughput"] > 0


def assert_flows_completed(server, summary: dict, flows: int) -> None:
    assert summary["operations"] == {
        "unit": "flow",
        "started": flows,
        "completed": flows,
        "failed": 0,
        "per_second": summary["operations"]["per_second"],
    }
    assert summary["errors"] == {} and summary["error_count"] == 0
    assert list(summary["rpcs"]) == FLOW_RPCS
    for rpc, stats in summary["rpcs"].items():
        assert stats["count"] == PER_FLOW[rpc] * flows, rpc
        assert stats["errors"] == 0
        assert_percentiles_ordered(stats)
    assert summary["total"]["count"] == 7 * flows
    # RegisterAccount is setup, reported on its own and never among the flow's RPCs.
    assert summary["setup"]["accounts_registered"] == flows
    assert summary["setup"]["rpcs"]["RegisterAccount"]["count"] == flows
    assert summary["codes_received"] == 2 * flows
    assert summary["sms_delivery"]["count"] == 2 * flows  # timed apart from every RPC
    # Every rebind the tool started was completed, each on a fresh account.
    assert count(server, "SELECT count(*) FROM binding_changes") == flows
    assert count(server, "SELECT count(*) FROM rebinds") == flows
    assert count(server, "SELECT count(*) FROM rebinds WHERE state = 'COMPLETED'") == flows
    assert count(server, "SELECT count(*) FROM accounts") == flows


def test_health_check_scenario(server):
    summary = run_load(
        server.target, "--scenario", "health", "--count", "200", "--concurrency", "4"
    )
    assert summary["scenario"] == "health"
    assert summary["operations"]["completed"] == 200
    assert summary["operations"]["failed"] == 0
    assert list(summary["rpcs"]) == ["Health/Check"]
    stats = summary["rpcs"]["Health/Check"]
    assert stats["count"] == 200 and stats["errors"] == 0
    assert_percentiles_ordered(stats)
    assert summary["error_count"] == 0
    assert summary["setup"]["accounts_registered"] == 0


def test_get_account_scenario_reads_a_registered_pool(server):
    summary = run_load(
        server.target,
        *("--scenario", "get-account", "--count", "150", "--concurrency", "4"),
        *("--accounts", "12"),
    )
    stats = summary["rpcs"]["GetAccount"]
    assert stats["count"] == 150 and stats["errors"] == 0
    assert_percentiles_ordered(stats)
    assert summary["error_count"] == 0
    assert summary["setup"]["accounts_registered"] == 12
    assert summary["setup"]["rpcs"]["RegisterAccount"]["count"] == 12
    assert count(server, "SELECT count(*) FROM accounts") == 12
    assert count(server, "SELECT count(*) FROM rebinds") == 0


def test_flow_scenario_completes_every_rebind(server):
    summary = run_load(
        server.target,
        *("--scenario", "flow", "--count", "12", "--concurrency", "4"),
        *("--sms-file", server.inbox.path),
    )
    assert_flows_completed(server, summary, 12)


def test_flow_over_two_processes(server):
    summary = run_load(
        server.target,
        *("--scenario", "flow", "--count", "10", "--concurrency", "4", "--processes", "2"),
        *("--sms-file", server.inbox.path),
    )
    assert summary["processes"] == 2
    assert_flows_completed(server, summary, 10)


def test_reads_over_two_processes(server):
    summary = run_load(
        server.target,
        *("--scenario", "get-account", "--count", "101", "--concurrency", "4"),
        *("--processes", "2", "--accounts", "6"),
    )
    assert summary["rpcs"]["GetAccount"]["count"] == 101
    assert summary["setup"]["accounts_registered"] == 6


def test_a_flow_whose_code_never_arrives_is_reported_by_reason(server, tmp_path):
    summary = run_load(
        server.target,
        *("--scenario", "flow", "--count", "3", "--concurrency", "4"),
        *("--sms-file", str(tmp_path / "nowhere.jsonl"), "--code-timeout", "0.3"),
    )
    assert summary["operations"]["completed"] == 0
    assert summary["operations"]["failed"] == 3
    assert summary["errors"] == {"flow": {"CODE_NOT_DELIVERED": 3}}
    assert summary["error_count"] == 3
    assert summary["rpcs"]["SendCode"]["count"] == 3
    assert "VerifyCode" not in summary["rpcs"]
    # The tool closes what it could not finish.
    assert count(server, "SELECT count(*) FROM rebinds WHERE state = 'CANCELLED'") == 3


def test_rate_paces_the_calls(server):
    summary = run_load(
        server.target,
        *("--scenario", "health", "--duration", "1", "--warmup", "0", "--rate", "40"),
    )
    # Open loop: no call starts before its slot, none after the end.
    assert 1 <= summary["rpcs"]["Health/Check"]["count"] <= 40
    assert summary["rate"] == 40


def test_text_summary_and_usage_errors(server):
    text = subprocess.run(
        [str(BIN / "phonebind-load"), "--target", server.target, "--count", "20"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 0, text.stderr
    assert "Health/Check" in text.stdout and "p99 ms" in text.stdout
    assert "errors: none" in text.stdout
    assert text.stderr == ""  # no progress bar when stderr is not a terminal

    no_codes = subprocess.run(
        [str(BIN / "phonebind-load"), "--scenario", "flow", "--count", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_codes.returncode == 2
    assert "--sms-file" in no_codes.stderr


def test_unreachable_server_fails_cleanly():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run(
        [str(BIN / "phonebind-load"), "--target", f"127.0.0.1:{port}", "--count", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot connect" in done.stderr


# -- the SMS sink, fed by an http gateway --------------------------------------


class HttpGateway:
    """Posts each message as JSON, as the server's http gateway does."""

    name = "http"

    def __init__(self, url: str) -> None:
        self.url = url

    def deliver(self, *, message_id: str, to: str, text: str, purpose: str) -> None:
        body = json.dumps(
            {"message_id": message_id, "to": to, "text": text, "purpose": purpose}
        ).encode()
        request = urllib.request.Request(  # noqa: S310 - the test's own http:// URL
            self.url, data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310 - as above
                if answer.status != 200:
                    raise GatewayError(f"status {answer.status}")
        except OSError as error:
            raise GatewayError(str(error)) from error


@pytest.mark.parametrize("processes", ["1", "2"])
def test_flow_reads_codes_from_its_own_sms_sink(database_url, tmp_path, processes):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sink_port = sock.getsockname()[1]
    running = start_server(
        database_url,
        tmp_path,
        FakeClock(),
        Secrets(),
        gateway=HttpGateway(f"http://127.0.0.1:{sink_port}/sms"),
    )
    try:
        summary = run_load(
            running.target,
            *("--scenario", "flow", "--count", "6", "--concurrency", "4"),
            *("--processes", processes, "--sms-sink", f"127.0.0.1:{sink_port}"),
        )
        assert summary["operations"]["completed"] == 6, summary["errors"]
        assert summary["error_count"] == 0
        assert summary["codes_received"] == 12
        assert count(running, "SELECT count(*) FROM binding_changes") == 6
    finally:
        running.stop()


# -- the test data it makes ------------------------------------------------------


def test_generated_accounts_pass_the_servers_validation():
    opts = load.parse_options(["--scenario", "get-account"])
    numbers = load.Numbers(opts, 1)
    accounts = load.Accounts(opts, 1, numbers)
    made = [accounts.make() for _ in range(300)]
    today = datetime.date(2026, 3, 1)
    phones = set()
    for account in made:
        assert normalize_id_number(account.id_number, today=today) == account.id_number
        phone = parse_phone(account.phone)
        assert not is_virtual_operator(phone)
        phones.add(phone.e164)
    phones.update(parse_phone(numbers.next()).e164 for _ in range(300))
    assert len(phones) == 600
    assert len({a.account_id for a in made}) == 300
    # Another process of the same run draws from its own numbers.
    other = load.Numbers(opts, 2)
    assert not {parse_phone(other.next()).e164 for _ in range(300)} & phones


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert load.percentile(values, 50) == 50
    assert load.percentile(values, 99) == 99
    assert load.percentile(values, 100) == 100
    assert load.percentile([7.0], 99) == 7.0
