"""phonebind-load, run for real against a real server (SQLite and PostgreSQL).

These check what the tool reports and what it did to the server, never how
fast anything was: benchmarks are `make bench`, not tests.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import pathlib
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import deque

import pytest
from conftest import serve, start_server
from support import FakeClock, Secrets, free_port, rows
from test_production_mode import safe  # noqa: F401 - makes its fixture usable here

from phonebind_client import load
from phonebind_client.load_codes import CodeBook, SmsFileReader, SmsSink
from phonebind_server.config import load as load_settings
from phonebind_server.devcerts import cert_pem, issue, key_pem, make_ca
from phonebind_server.domain.identity import normalize_id_number
from phonebind_server.domain.phone import is_virtual_operator, parse_phone
from phonebind_server.rpc.auth import new_token, token_digest
from phonebind_server.sms.gateways import GatewayError, Sms

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


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "phonebind-load"), *args], capture_output=True, text=True, timeout=timeout
    )


def run_load(target: str, *args: str, timeout: float = 120) -> dict:
    completed = run_tool("--target", target, "--json", "--no-progress", *args, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-2000:]
    summary = json.loads(completed.stdout)
    assert_cpu_reported(summary)
    return summary


def assert_cpu_reported(summary: dict) -> None:
    """The tool's own CPU time in the measured window, per operation and per call."""
    cpu = summary["load_cpu_seconds"]
    assert cpu > 0
    assert summary["load_cpu_total_seconds"] >= cpu
    ops = summary["operations"]["completed"]
    calls = summary["total"]["count"] + summary["total"]["errors"]
    if ops:
        assert summary["load_cpu_ms_per_op"] == pytest.approx(1000 * cpu / ops, rel=1e-2)
    else:
        assert summary["load_cpu_ms_per_op"] is None
    assert summary["load_cpu_ms_per_call"] == pytest.approx(1000 * cpu / calls, rel=1e-2)


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
    assert "phonebind-load CPU: " in text.stdout and " ms per call" in text.stdout
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

    def deliver(self, sms: Sms) -> None:
        body = json.dumps(
            {"message_id": sms.message_id, "to": sms.to, "text": sms.text, "purpose": sms.purpose}
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


# -- production mode: TLS, mutual TLS, tokens --------------------------------------


def callers_file(tmp_path: pathlib.Path, token: str, extra: str = "") -> str:
    """One caller allowed to register accounts and run rebinds."""
    path = tmp_path / "callers.toml"
    path.write_text(
        f'[[caller]]\nname = "load-tool"\nroles = ["kyc", "flow"]\n'
        f'token_sha256 = "{token_digest(token)}"\n{extra}',
        encoding="utf-8",
    )
    return str(path)


def production_settings(
    complete: dict[str, str], tmp_path, database_url: str, token: str, sms: str
):
    """``complete``, test_production_mode's production configuration (no --dev:
    TLS, credentials, keys of its own), here on loopback with ``database_url``,
    a caller holding ``token`` and the http SMS gateway posting to ``sms``."""
    env = {
        **complete,
        "PHONEBIND_LISTEN": "127.0.0.1:0",
        "PHONEBIND_DATABASE_URL": database_url,
        "PHONEBIND_SMS_GATEWAY": sms,
        "PHONEBIND_CREDENTIALS_FILE": callers_file(tmp_path, token),
    }
    settings = load_settings(env=env)
    assert not settings.dev
    return settings


def test_flow_against_a_production_server_over_tls_with_a_token_file(
    database_url, tmp_path, request
):
    token = new_token()
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n", encoding="ascii")
    sink = free_port()
    complete = request.getfixturevalue("safe")
    settings = production_settings(
        complete, tmp_path, database_url, token, f"http://127.0.0.1:{sink}/sms"
    )
    served = serve(settings, FakeClock())
    target = f"localhost:{served.app.port}"
    ca = str(tmp_path / "certs" / "ca.pem")
    try:
        done = run_tool(
            *("--target", target, "--json", "--no-progress", "--scenario", "flow"),
            *("--count", "4", "--concurrency", "2", "--sms-sink", f"127.0.0.1:{sink}"),
            *("--ca-file", ca, "--token-file", str(token_file)),
        )
        assert done.returncode == 0, done.stderr[-2000:]
        summary = json.loads(done.stdout)
        assert summary["operations"]["completed"] == 4, summary["errors"]
        assert summary["error_count"] == 0 and summary["setup"]["errors"] == {}
        assert summary["codes_received"] == 8
        assert_cpu_reported(summary)
        assert token not in done.stdout + done.stderr
        assert rows(database_url, "SELECT count(*) FROM binding_changes") == [(4,)]

        # The same token on the command line reads the accounts it registered.
        reads = run_load(
            target,
            *("--scenario", "get-account", "--count", "10", "--accounts", "2"),
            *("--ca-file", ca, "--token", token),
        )
        assert reads["rpcs"]["GetAccount"]["count"] == 10 and reads["error_count"] == 0

        # Without a token every call is refused: no account, a clean exit 1.
        refused = run_tool("--target", target, "--scenario", "get-account", "--ca-file", ca)
        assert refused.returncode == 1
        assert "no account could be registered" in refused.stderr
        # Without TLS, or trusting another CA, there is no connection at all.
        plain = run_tool("--target", target, "--count", "1", "--token", token)
        assert plain.returncode == 1 and "cannot connect" in plain.stderr
        assert token not in plain.stdout + plain.stderr
        other_ca = tmp_path / "other-ca.pem"
        other_ca.write_bytes(cert_pem(make_ca("another CA")[0]))
        untrusted = run_tool("--target", target, "--count", "1", "--ca-file", str(other_ca))
        assert untrusted.returncode == 1 and "cannot connect" in untrusted.stderr
    finally:
        served.stop()


def test_mutual_tls_and_a_certificate_for_another_name(database_url, tmp_path, clock, secrets_seen):
    """A client certificate names the caller; --server-name checks the server's
    certificate against the name it carries, not the address dialled."""
    ca = make_ca()
    server_cert, server_key = issue(
        ca, "phonebind.internal", server=True, hosts=("phonebind.internal",)
    )
    client_cert, client_key = issue(ca, "load-svc", server=False)
    files = {
        "ca.pem": cert_pem(ca[0]),
        "server.pem": cert_pem(server_cert),
        "server-key.pem": key_pem(server_key),
        "client.pem": cert_pem(client_cert),
        "client-key.pem": key_pem(client_key),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    extra = (
        '\n[[caller]]\nname = "load-cert"\nroles = ["kyc", "flow"]\ncert_subject = "CN=load-svc"\n'
    )
    running = start_server(
        database_url,
        tmp_path,
        clock,
        secrets_seen,
        credentials_file=callers_file(tmp_path, new_token(), extra),
        tls_cert=str(tmp_path / "server.pem"),
        tls_key=str(tmp_path / "server-key.pem"),
        tls_client_ca=str(tmp_path / "ca.pem"),
    )
    target = f"127.0.0.1:{running.app.port}"
    mutual = ("--ca-file", str(tmp_path / "ca.pem"))
    mutual += ("--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client-key.pem"))
    try:
        summary = run_load(
            target,
            *("--scenario", "flow", "--count", "3", "--concurrency", "2"),
            *("--sms-file", running.inbox.path, "--server-name", "phonebind.internal", *mutual),
        )
        assert summary["operations"]["completed"] == 3, summary["errors"]
        assert summary["error_count"] == 0
        # The certificate does not name 127.0.0.1.
        wrong_name = run_tool("--target", target, "--count", "1", *mutual)
        assert wrong_name.returncode == 1 and "cannot connect" in wrong_name.stderr
    finally:
        running.stop()


def test_token_file_is_read_once_and_never_printed(tmp_path):
    secret = "s3cret-token-value"
    cases = {
        "missing": (tmp_path / "missing", "cannot read"),
        "two words": (tmp_path / "spaced", "one token of printable ASCII"),
        "empty": (tmp_path / "empty", "one token of printable ASCII"),
    }
    (tmp_path / "spaced").write_text(f"{secret} {secret}\n", encoding="ascii")
    (tmp_path / "empty").write_text("\n", encoding="ascii")
    for path, message in cases.values():
        done = run_tool("--target", "127.0.0.1:1", "--token-file", str(path))
        assert done.returncode == 2
        assert message in done.stderr and str(path) in done.stderr
        assert secret not in done.stderr + done.stdout
    both = run_tool("--token", secret, "--token-file", str(tmp_path / "spaced"))
    assert both.returncode == 2 and "not allowed with" in both.stderr
    good = tmp_path / "good"
    good.write_text(f"  {secret}\n", encoding="ascii")
    opts = load.parse_options(["--token-file", str(good), "--ca-file", str(good)])
    assert opts.token == secret and opts.tls and opts.ca_pem == good.read_bytes()
    assert secret not in repr(opts)
    for usage in (["--cert", str(good)], ["--server-name", "x"]):
        with pytest.raises(SystemExit):
            load.parse_options(usage)


# -- the codes: the file gateway's lines, read as they are appended ----------------


def sms_line(to: str, code: str, message_id: str, purpose: str = "REBIND_CODE") -> bytes:
    text = f"【phonebind】验证码 {code}，5分钟内有效。"
    message = {"message_id": message_id, "to": to, "text": text, "purpose": purpose}
    return json.dumps(message, ensure_ascii=False).encode() + b"\n"


def append(path: pathlib.Path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


def test_sms_reader_reads_only_what_is_appended_and_waits_for_a_partial_line(tmp_path):
    path = tmp_path / "sms.jsonl"
    # Before the reader starts: never delivered.
    path.write_bytes(sms_line("+8613800000001", "111111", "m0"))
    mine = {"+8613800000001", "+8613800000002"}

    async def scenario() -> None:
        book = CodeBook(accept=lambda to: to in mine)
        reader = SmsFileReader(str(path), book)
        assert reader.read_new() == 0  # starts at the end
        line = sms_line("+8613800000001", "222222", "m1")
        append(path, line[:20])  # the gateway's write, cut short
        assert reader.read_new() == 20
        assert book._codes == {}  # a partial line waits for its end
        append(path, line[20:] + sms_line("+8613900000009", "333333", "m2"))
        other = sms_line("+8613900000009", "333333", "m2")
        assert reader.read_new() == len(line) - 20 + len(other)
        # A redelivery, a notice and another process's number bring nothing.
        append(path, line + sms_line("+8613800000002", "444444", "m3", purpose="NOTICE"))
        reader.read_new()
        assert await book.wait("+8613800000001", 0.01) == "222222"
        assert await book.wait("+8613800000001", 0.01) is None
        assert await book.wait("+8613900000009", 0.01) is None
        assert book.received == 1
        reader.close()

    asyncio.run(scenario())


def test_sms_reader_wakes_the_waiting_flow_when_its_code_is_appended(tmp_path):
    """With no RPC to wake the loop, the reader's own timer finds the codes."""
    path = tmp_path / "sms.jsonl"  # created only after the reader started

    async def scenario() -> None:
        book = CodeBook()
        reader = SmsFileReader(str(path), book).start()
        waits = [asyncio.ensure_future(book.wait(f"+861380000000{i}", 10)) for i in range(1, 4)]
        await asyncio.sleep(0.05)
        assert book.waiting and not any(w.done() for w in waits)

        def gateway() -> None:  # another process, in effect: plain appends
            for i in (3, 1, 2):
                line = sms_line(f"+861380000000{i}", f"{i}00000", f"m{i}")
                append(path, line[:7])
                append(path, line[7:])

        await asyncio.to_thread(gateway)
        assert await asyncio.gather(*waits) == ["100000", "200000", "300000"]
        assert not book.waiting
        reader.close()

    asyncio.run(scenario())


def test_sms_reader_reads_after_each_rpc_only_while_a_flow_waits(tmp_path):
    """check(), called after every RPC, reads at once; without a waiting flow it
    reads nothing (the timer here never fires within the test)."""
    path = tmp_path / "sms.jsonl"
    path.write_bytes(b"")

    async def scenario() -> None:
        book = CodeBook()
        reader = SmsFileReader(str(path), book, poll=3600).start()
        append(path, sms_line("+8613800000008", "888888", "m8"))
        reader.check()
        assert book._codes == {}  # nobody waits: not even read
        waiting = asyncio.ensure_future(book.wait("+8613800000009", 10))
        await asyncio.sleep(0)  # the flow starts to wait: that reads once
        assert book._codes == {"+8613800000008": deque(["888888"])}
        append(path, sms_line("+8613800000009", "999999", "m9"))
        assert not waiting.done()
        reader.check()  # as after an RPC
        assert await asyncio.wait_for(waiting, 1) == "999999"
        reader.close()

    asyncio.run(scenario())


def test_sms_reader_starts_over_on_a_replaced_or_truncated_file(tmp_path):
    path = tmp_path / "sms.jsonl"
    path.write_bytes(sms_line("+8613800000001", "111111", "m0") * 3)

    async def scenario() -> None:
        book = CodeBook()
        reader = SmsFileReader(str(path), book)
        reader.read_new()
        path.write_bytes(sms_line("+8613800000005", "555555", "m5"))  # truncated, rewritten
        for _ in range(64):  # the reader looks at the path again while it finds nothing
            reader.read_new()
        assert await book.wait("+8613800000005", 0.01) == "555555"
        replaced = tmp_path / "new.jsonl"
        replaced.write_bytes(sms_line("+8613800000006", "666666", "m6"))
        os.replace(replaced, path)
        for _ in range(128):
            reader.read_new()
        assert await book.wait("+8613800000006", 0.01) == "666666"
        reader.close()

    asyncio.run(scenario())


def test_sms_sink_takes_json_posts_and_refuses_anything_else():
    port = free_port()

    async def scenario() -> None:
        book = CodeBook()
        sink = SmsSink.into_loop(f"127.0.0.1:{port}", book, asyncio.get_running_loop()).start()
        url = f"http://127.0.0.1:{port}/sms"

        def post(body: bytes) -> int:
            request = urllib.request.Request(url, data=body)
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310
                    return answer.status
            except urllib.error.HTTPError as error:
                return error.code

        try:
            statuses = await asyncio.to_thread(
                lambda: [
                    post(b"not json"),
                    post(b"[1]"),
                    post(sms_line("+8613800000007", "777777", "m7")),
                ]
            )
            assert statuses == [400, 400, 200]
            assert await book.wait("+8613800000007", 5) == "777777"
        finally:
            sink.stop()

    asyncio.run(scenario())
