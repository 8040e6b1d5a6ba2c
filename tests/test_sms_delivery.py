"""Real SMS delivery: the http gateway and the outbox against a provider on loopback.

The provider is a real `ThreadingHTTPServer` on 127.0.0.1 that verifies each
request's Standard Webhooks signature with the `standardwebhooks` library, sends
at most one SMS per Idempotency-Key (answering 200 again for a key it already
took) and can be scripted: fail the next N (with a Retry-After if asked), accept
and then hang past the gateway's timeout, answer slowly, go down and come back
on the same port.

Retries are scheduled on the server's FakeClock: a test waits until the outbox
row shows the failure, moves the clock to the retry time and wakes the
dispatcher, so no test sleeps through a backoff. Waiting is always for an
observable condition, with a bound.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import logging
import re
import sqlite3
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import grpc
import psycopg
import pytest
from conftest import Running, start_server
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from support import NEW, OLD, FakeClock, Secrets, Serve

from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import binding_service_pb2_grpc as api_grpc
from phonebind_server.config import DEV_KEYS, ConfigError, load
from phonebind_server.domain.pii import Vault
from phonebind_server.logs import JsonFormatter
from phonebind_server.sms.gateways import GatewayError, PermanentGatewayError, Sms
from phonebind_server.sms.http_gateway import HttpGateway, encode_body
from phonebind_server.sms.outbox import OutboxDispatcher
from phonebind_server.store.fields import to_micros

SECRET = hashlib.sha256(b"phonebind-test-provider").digest()
WHSEC = "whsec_" + base64.b64encode(SECRET).decode()  # the setting's form of SECRET
TIMEOUT = 1.0  # the gateway's timeout in these tests
LEASE = timedelta(seconds=60)  # the dispatcher's default lease
WAIT = 15.0  # the bound on every wait for something to happen
DEV_SECRET = DEV_KEYS["sms_http_secret"]  # what --dev signs with
_CODE = re.compile(r"(?<![0-9])([0-9]{6})(?![0-9])")


# -- the provider -------------------------------------------------------------------


@dataclass
class Received:
    key: str
    headers: dict[str, str]
    body: dict[str, object]
    raw: bytes
    signature_ok: bool
    at: float  # time.monotonic() on arrival
    status: int = 0  # what the provider answered (0: nothing, it hung up or hung)
    duplicate: bool = False


@dataclass
class _Step:
    kind: str  # "fail", "hang", "slow"
    value: float
    retry_after: str = ""  # a Retry-After header to answer a failure with


class Provider:
    """A fake SMS provider: records everything, sends at most once per key."""

    def __init__(self, secret: str) -> None:
        self.webhook = Webhook(secret)
        self.port = 0
        self.requests: list[Received] = []
        self.arrivals: list[tuple[str, str]] = []  # (method, path) of every request
        self.sent: dict[str, Received] = {}  # the one SMS per Idempotency-Key
        self._script: list[_Step] = []
        self._cond = threading.Condition()
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sms"

    # -- running

    def start(self) -> None:
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                provider._arrived(self)
                provider._handle(self)

            def do_GET(self) -> None:  # a followed 302 would come back as a GET
                provider._arrived(self)
                self.send_error(404)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Down: the port refuses connections until start() binds it again."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- scripting

    def fail_next(self, count: int, status: int = 500, retry_after: str = "") -> None:
        with self._cond:
            self._script += [_Step("fail", status, retry_after)] * count

    def hang_next(self, count: int, seconds: float) -> None:
        """Takes the message, then answers only after `seconds` (past the timeout)."""
        with self._cond:
            self._script += [_Step("hang", seconds)] * count

    def slow_next(self, count: int, seconds: float) -> None:
        with self._cond:
            self._script += [_Step("slow", seconds)] * count

    # -- observing

    def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def requests_for(self, key: str) -> list[Received]:
        with self._cond:
            return [r for r in self.requests if r.key == key]

    def wait_sent(self, keys: list[str], timeout: float = WAIT) -> None:
        assert self.wait_until(lambda: all(k in self.sent for k in keys), timeout), (
            f"only {sum(k in self.sent for k in keys)} of {len(keys)} messages arrived"
        )

    # -- the handler

    def _arrived(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        with self._cond:
            self.arrivals.append((handler.command, handler.path))

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        raw = handler.rfile.read(int(handler.headers.get("Content-Length", "0")))
        try:
            self.webhook.verify(raw, dict(handler.headers.items()))
            signature_ok = True
        except WebhookVerificationError:
            signature_ok = False
        received = Received(
            key=handler.headers.get("Idempotency-Key", ""),
            headers={name.lower(): value for name, value in handler.headers.items()},
            body=json.loads(raw.decode("utf-8")),
            raw=raw,
            signature_ok=signature_ok,
            at=time.monotonic(),
        )
        retry_after = ""
        with self._cond:
            self.requests.append(received)
            step = self._script.pop(0) if self._script else None
            if not signature_ok:
                received.status = 401
            elif step is not None and step.kind == "fail":
                received.status = int(step.value)
                retry_after = step.retry_after
            else:
                received.status = 200
                received.duplicate = received.key in self.sent
                self.sent.setdefault(received.key, received)
            self._cond.notify_all()
        if step is not None and step.kind in ("hang", "slow"):
            time.sleep(step.value)
        try:
            handler.send_response(received.status)
            if 300 <= received.status < 400:
                handler.send_header("Location", "/elsewhere")  # on this same provider
            if retry_after:
                handler.send_header("Retry-After", retry_after)
            handler.send_header("Content-Type", "application/json")
            handler.end_headers()
            handler.wfile.write(b'{"status":"ok"}' if received.status == 200 else b"{}")
        except OSError:
            pass  # the gateway gave up waiting


@pytest.fixture
def provider() -> Iterator[Provider]:
    running = Provider(WHSEC)
    running.start()
    yield running
    running.stop()


# -- the server ----------------------------------------------------------------------


def http_settings(provider: Provider, **extra: object) -> dict[str, object]:
    return {
        "sms_gateway": provider.url,
        "sms_http_secret": WHSEC,
        "sms_http_timeout_seconds": TIMEOUT,
        "sms_retry_max_seconds": 30,  # < the lease, so a scheduled retry is recognisable
        **extra,
    }


@pytest.fixture
def start_sms_server(
    database_url: str, tmp_path, clock: FakeClock, secrets_seen: Secrets, provider: Provider
) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(**extra: object) -> Running:
        running = start_server(
            database_url, tmp_path, clock, secrets_seen, **http_settings(provider, **extra)
        )
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def sms_server(start_sms_server) -> Running:
    return start_sms_server()


# -- the outbox table, read directly -------------------------------------------------


def outbox(database_url: str) -> dict[str, dict[str, object]]:
    """Every outbox row by message_id, read over a connection of the test's own."""
    query = (
        "SELECT message_id, account_id, purpose, state, attempts, text, last_error, "
        "next_attempt_at, template, language, params FROM sms_outbox"
    )
    if database_url.startswith("sqlite:"):
        connection = sqlite3.connect(database_url[len("sqlite:///") :], timeout=10)
    else:
        connection = psycopg.connect(database_url)
    try:
        cursor = connection.cursor()
        cursor.execute(query)
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        connection.close()
    return {row["message_id"]: row for row in rows}


def wait_row(
    database_url: str, predicate: Callable[[dict[str, object]], bool], key: str
) -> dict[str, object]:
    deadline = time.monotonic() + WAIT
    while True:
        row = outbox(database_url).get(key)
        if row is not None and predicate(row):
            return row
        assert time.monotonic() < deadline, f"outbox row never got there: {row}"
        time.sleep(0.01)


def retry_scheduled(server: Running, key: str, attempts: int) -> dict[str, object]:
    """Waits until attempt number `attempts` has failed and its retry is scheduled."""
    leased_until = to_micros(server.clock.now() + LEASE)
    return wait_row(
        server.database_url,
        lambda r: (
            r["state"] == "PENDING"
            and r["attempts"] == attempts
            and r["last_error"] != ""
            and r["next_attempt_at"] < leased_until
        ),
        key,
    )


def run_retry(server: Running, key: str, attempts: int) -> dict[str, object]:
    """Waits for attempt `attempts` to fail, moves the clock to its retry, wakes the dispatcher."""
    row = retry_scheduled(server, key, attempts)
    due = row["next_attempt_at"] - to_micros(server.clock.now())
    server.clock.advance(timedelta(microseconds=max(0, due)))
    server.wake_outbox()
    return row


# -- the flow, as the app backend drives it -------------------------------------------


def phones(n: int) -> tuple[str, str]:
    return f"1380013{n:04d}", f"1390013{n:04d}"


def queue_code(server: Running, n: int) -> str:
    """Registers account n, starts a rebind, asks for the old-phone code; the message id."""
    old, new = phones(n)
    account_id = f"sms-{n}"
    server.api.register(account_id, old)
    rebind = server.api.start(account_id, new)
    server.api.send(account_id, rebind.rebind_id, OLD)
    return message_id_for(server.database_url, account_id)


def message_id_for(database_url: str, account_id: str) -> str:
    deadline = time.monotonic() + WAIT
    while True:
        found = [
            key
            for key, row in outbox(database_url).items()
            if row["account_id"] == account_id and row["purpose"] == "REBIND_CODE"
        ]
        if found:
            assert len(found) == 1
            return found[0]
        assert time.monotonic() < deadline, "SendCode queued no message"
        time.sleep(0.01)


def delivered_text(provider: Provider, key: str, secrets: Secrets) -> str:
    """The text of the one SMS sent for `key`; its code joins the secrets."""
    text = str(provider.sent[key].body["text"])
    match = _CODE.search(text)
    assert match, "the code message carries no 6-digit code"
    secrets.add(match.group(1))
    secrets.add(text)
    return text


def assert_sent_once(provider: Provider, keys: list[str], *, redelivered: tuple = ()) -> None:
    """Each key is one SMS, and once a 2xx answer reached the dispatcher it never
    asked again (only a key whose answer was lost may be seen twice)."""
    for key in keys:
        assert key in provider.sent, "a message never arrived"
        accepted = [r for r in provider.requests_for(key) if r.status == 200]
        if key not in redelivered:
            assert len(accepted) == 1, f"a message was delivered {len(accepted)} times"
    counts = Counter(r.key for r in provider.requests if r.status == 200)
    assert set(counts) == set(provider.sent)
    assert all(r.signature_ok for r in provider.requests)


# -- the gateway on its own -----------------------------------------------------------


def deliver(gateway: HttpGateway, key: str = "m-1") -> None:
    gateway.deliver(
        Sms(
            message_id=key,
            to="+8613800138000",
            text="【pb】验证码 123456，5 分钟内有效。",
            purpose="REBIND_CODE",
            template="phonebind.rebind_code.v1",
            language="zh-CN",
            params={"code": "123456", "minutes": "5"},
        )
    )


def test_gateway_request_is_compact_utf8_json_signed_with_standard_webhooks(provider):
    deliver(HttpGateway(provider.url, secret=SECRET, timeout=TIMEOUT), "m-sig")
    [received] = provider.requests
    assert received.signature_ok  # standardwebhooks.Webhook(WHSEC).verify accepted it
    assert received.key == "m-sig" == received.headers["webhook-id"]
    assert received.headers["content-type"] == "application/json"
    assert received.body == {
        "message_id": "m-sig",
        "to": "+8613800138000",
        "purpose": "REBIND_CODE",
        "template": "phonebind.rebind_code.v1",
        "language": "zh-CN",
        "params": {"code": "123456", "minutes": "5"},
        "text": "【pb】验证码 123456，5 分钟内有效。",
    }
    assert received.raw == json.dumps(
        received.body, ensure_ascii=False, separators=(",", ":")
    ).encode("utf-8")
    assert received.raw.startswith(b'{"message_id":"m-sig","to":"+8613800138000","purpose":')
    timestamp = received.headers["webhook-timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    assert received.headers["webhook-signature"].startswith("v1,")
    # The signature covers id, timestamp and body: a change to any one is refused.
    webhook = Webhook(WHSEC)
    for name, raw, headers in [
        ("body", received.raw.replace(b"123456", b"654321"), received.headers),
        ("id", received.raw, {**received.headers, "webhook-id": "m-other"}),
        (
            "timestamp",
            received.raw,
            {**received.headers, "webhook-timestamp": str(int(timestamp) + 1)},
        ),
    ]:
        with pytest.raises(WebhookVerificationError):
            webhook.verify(raw, headers)
            pytest.fail(f"a changed {name} verified")
    # And another secret does not verify it.
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(received.raw, received.headers)


def test_the_documented_example_request_is_what_the_gateway_sends():
    page = (Path(__file__).resolve().parent.parent / "docs" / "operating.md").read_text("utf-8")
    head, body = page.split("```http\n", 1)[1].split("```", 1)[0].split("\n\n", 1)
    body = body.strip()
    headers = dict(line.split(": ", 1) for line in head.splitlines()[1:])
    secret = re.search(r"example secret `(whsec_[^`]+)`", page).group(1)
    sent_at = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)
    signature = Webhook(secret).sign(headers["webhook-id"], sent_at, body)
    assert headers["webhook-signature"] == signature
    fields = json.loads(body)
    assert body.encode() == encode_body(Sms(**fields))
    assert headers["webhook-id"] == headers["Idempotency-Key"] == fields["message_id"]


def test_a_retried_request_keeps_its_id_and_is_signed_again(provider):
    gateway = HttpGateway(provider.url, secret=SECRET, timeout=TIMEOUT)
    provider.fail_next(1, 500)
    with pytest.raises(GatewayError):
        deliver(gateway, "m-again")
    deliver(gateway, "m-again")
    first, second = provider.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "m-again"
    assert first.signature_ok and second.signature_ok


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, PermanentGatewayError),
        (401, PermanentGatewayError),
        (404, PermanentGatewayError),
        (422, PermanentGatewayError),
        (302, GatewayError),  # redirects are not followed
        (408, GatewayError),
        (429, GatewayError),
        (500, GatewayError),
        (502, GatewayError),
        (503, GatewayError),
    ],
)
def test_gateway_classifies_answers(provider, status, error):
    provider.fail_next(1, status)
    with pytest.raises(error) as raised:
        deliver(HttpGateway(provider.url, secret=SECRET, timeout=TIMEOUT))
    assert str(raised.value) == f"HTTP {status}"
    if error is GatewayError:
        assert not isinstance(raised.value, PermanentGatewayError)
    # One request, so the 302's Location was not followed.
    assert provider.arrivals == [("POST", "/sms")]


def test_gateway_transport_errors_are_retryable_and_say_nothing_of_the_message(provider):
    gateway = HttpGateway(provider.url, secret=SECRET, timeout=0.3)
    provider.hang_next(1, 1.0)
    with pytest.raises(GatewayError) as timeout:
        deliver(gateway)
    assert str(timeout.value) == "timeout after 0.3s"
    provider.stop()
    with pytest.raises(GatewayError) as refused:
        deliver(gateway)
    assert str(refused.value) == "connection refused"
    for error in (timeout.value, refused.value):
        assert not isinstance(error, PermanentGatewayError)
        assert "138" not in str(error) and "123456" not in str(error)
        assert error.__cause__ is None  # raised `from None`: no URL error chained in logs


def test_gateway_refuses_bad_configuration():
    with pytest.raises(ValueError):
        HttpGateway("ftp://127.0.0.1/sms", secret=SECRET, timeout=1)
    with pytest.raises(ValueError):
        HttpGateway("http://127.0.0.1/sms", secret=b"", timeout=1)
    with pytest.raises(ValueError):
        HttpGateway("http://127.0.0.1/sms", secret=SECRET, timeout=0)


# -- through the server, on SQLite and PostgreSQL --------------------------------------


def test_code_is_delivered_signed_and_erased_from_the_outbox(sms_server, provider):
    key = queue_code(sms_server, 1)
    provider.wait_sent([key])
    received = provider.sent[key]
    assert received.signature_ok
    assert received.key == key == received.body["message_id"]
    assert received.body["to"] == "+8613800130001"
    assert received.body["purpose"] == "REBIND_CODE"
    assert "验证码" in delivered_text(provider, key, sms_server.secrets)
    row = wait_row(sms_server.database_url, lambda r: r["state"] == "SENT", key)
    assert row["text"] == "" and row["attempts"] == 1 and row["last_error"] == ""
    assert_sent_once(provider, [key])


def test_the_code_goes_out_with_its_template_and_parameters(sms_server, provider):
    key = queue_code(sms_server, 21)
    provider.wait_sent([key])
    body = provider.sent[key].body
    text = delivered_text(provider, key, sms_server.secrets)
    code = _CODE.search(text).group(1)
    assert body["template"] == "phonebind.rebind_code.v1"
    assert body["language"] == "zh-CN"
    assert body["params"] == {"code": code, "minutes": "5"}
    assert "5 分钟内有效" in text
    row = wait_row(sms_server.database_url, lambda r: r["state"] == "SENT", key)
    assert row["template"] == "phonebind.rebind_code.v1" and row["language"] == "zh-CN"
    assert row["params"] == ""  # erased with the text


def test_the_notice_to_the_old_number_carries_the_masked_new_number(sms_server, provider):
    old, new = phones(22)
    account_id = "sms-22"
    api = sms_server.api
    api.register(account_id, old)
    rebind = api.start(account_id, new).rebind_id
    api.identity(account_id, rebind)
    seen: frozenset[str] = frozenset()
    for target in (OLD, NEW):
        api.send(account_id, rebind, target)
        key = wait_message(sms_server.database_url, account_id, "REBIND_CODE", seen)
        seen |= {key}
        provider.wait_sent([key])
        api.verify(account_id, rebind, target, str(provider.sent[key].body["params"]["code"]))
    api.complete(account_id, rebind)
    key = wait_message(sms_server.database_url, account_id, "CHANGE_NOTICE")
    provider.wait_sent([key])
    body = provider.sent[key].body
    assert body["to"] == "+86" + old
    assert body["template"] == "phonebind.change_notice.v1"
    assert body["params"] == {"masked_number": "139****0022"}
    assert "139****0022" in str(body["text"]) and new not in str(body["text"])


def wait_message(
    database_url: str, account_id: str, purpose: str, seen: frozenset[str] = frozenset()
) -> str:
    """The id of the one message of `purpose` queued for the account that is not in `seen`."""
    deadline = time.monotonic() + WAIT
    while True:
        found = [
            key
            for key, row in outbox(database_url).items()
            if row["account_id"] == account_id and row["purpose"] == purpose and key not in seen
        ]
        if found:
            assert len(found) == 1
            return found[0]
        assert time.monotonic() < deadline, f"no {purpose} message queued"
        time.sleep(0.01)


def test_parameters_wait_sealed_like_the_text(sms_server, provider):
    provider.stop()
    key = queue_code(sms_server, 23)
    row = retry_scheduled(sms_server, key, 1)
    sealed = str(row["params"])
    assert sealed.startswith("v2:") and "code" not in sealed
    provider.start()
    run_retry(sms_server, key, 1)
    provider.wait_sent([key])
    code = provider.sent[key].body["params"]["code"]
    delivered_text(provider, key, sms_server.secrets)
    assert code not in sealed


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_in_seconds_sets_the_next_attempt(sms_server, provider, status):
    provider.fail_next(1, status, retry_after="7")
    before = to_micros(sms_server.clock.now())
    key = queue_code(sms_server, 30 + status % 10)
    row = retry_scheduled(sms_server, key, 1)
    assert row["last_error"] == f"GatewayError: HTTP {status}"
    # Exactly when the provider said (the backoff alone would be 0.5 to 1 s).
    assert row["next_attempt_at"] - before == 7_000_000
    run_retry(sms_server, key, 1)
    provider.wait_sent([key])
    delivered_text(provider, key, sms_server.secrets)
    assert_sent_once(provider, [key])


def test_retry_after_as_a_date_is_read_on_the_servers_clock(sms_server, provider):
    when = sms_server.clock.now() + timedelta(seconds=12)
    provider.fail_next(1, 503, retry_after=format_datetime(when.astimezone(UTC), usegmt=True))
    key = queue_code(sms_server, 40)
    row = retry_scheduled(sms_server, key, 1)
    assert row["next_attempt_at"] == to_micros(when.replace(microsecond=0))
    run_retry(sms_server, key, 1)
    provider.wait_sent([key])
    delivered_text(provider, key, sms_server.secrets)


def test_a_long_retry_after_is_capped(sms_server, provider):
    provider.fail_next(1, 429, retry_after="86400")
    before = to_micros(sms_server.clock.now())
    key = queue_code(sms_server, 41)
    row = retry_scheduled(sms_server, key, 1)
    assert row["next_attempt_at"] - before == 30_000_000  # sms_retry_max_seconds
    run_retry(sms_server, key, 1)
    provider.wait_sent([key])
    delivered_text(provider, key, sms_server.secrets)


def test_retry_after_on_another_status_is_not_followed(sms_server, provider):
    provider.fail_next(1, 500, retry_after="20")
    before = to_micros(sms_server.clock.now())
    key = queue_code(sms_server, 42)
    row = retry_scheduled(sms_server, key, 1)
    assert 500_000 <= row["next_attempt_at"] - before <= 1_000_000  # the backoff
    run_retry(sms_server, key, 1)
    provider.wait_sent([key])
    delivered_text(provider, key, sms_server.secrets)


def test_two_500s_then_success_delivers_once_on_the_third_attempt(sms_server, provider):
    provider.fail_next(2, 500)
    key = queue_code(sms_server, 2)
    row = run_retry(sms_server, key, 1)
    assert row["last_error"] == "GatewayError: HTTP 500"
    run_retry(sms_server, key, 2)
    provider.wait_sent([key])
    row = wait_row(sms_server.database_url, lambda r: r["state"] == "SENT", key)
    assert row["attempts"] == 3 and row["text"] == ""
    assert [r.status for r in provider.requests_for(key)] == [500, 500, 200]
    delivered_text(provider, key, sms_server.secrets)
    assert_sent_once(provider, [key])


def test_backoff_grows_exponentially_with_jitter(start_sms_server, provider):
    server = start_sms_server(sms_max_attempts=6)
    provider.fail_next(5, 503)
    key = queue_code(server, 3)
    for attempt in range(1, 6):
        before = to_micros(server.clock.now())
        row = run_retry(server, key, attempt)
        delay = (row["next_attempt_at"] - before) / 1e6
        assert 0.5 * 2 ** (attempt - 1) <= delay <= 2 ** (attempt - 1), (attempt, delay)
    provider.wait_sent([key])
    assert wait_row(server.database_url, lambda r: r["state"] == "SENT", key)["attempts"] == 6
    delivered_text(provider, key, server.secrets)


def test_timeout_then_success_is_one_sms_for_two_requests(sms_server, provider):
    provider.hang_next(1, TIMEOUT * 2)  # takes the message, answers too late
    key = queue_code(sms_server, 4)
    row = run_retry(sms_server, key, 1)
    assert row["last_error"] == f"GatewayError: timeout after {TIMEOUT}s"
    wait_row(sms_server.database_url, lambda r: r["state"] == "SENT", key)
    requests = provider.requests_for(key)
    assert len(requests) == 2 and requests[1].duplicate  # seen twice, accepted once
    delivered_text(provider, key, sms_server.secrets)
    assert_sent_once(provider, [key], redelivered=(key,))


def test_slow_answer_within_the_timeout_is_delivered_once(sms_server, provider):
    provider.slow_next(1, TIMEOUT / 2)
    key = queue_code(sms_server, 5)
    row = wait_row(sms_server.database_url, lambda r: r["state"] == "SENT", key)
    assert row["attempts"] == 1
    assert len(provider.requests_for(key)) == 1
    delivered_text(provider, key, sms_server.secrets)
    assert_sent_once(provider, [key])


def test_provider_down_then_back_delivers_when_it_returns(sms_server, provider):
    provider.stop()
    key = queue_code(sms_server, 6)
    row = run_retry(sms_server, key, 1)
    assert row["last_error"] == "GatewayError: connection refused"
    # While it waits, the text is sealed like a number: its code is not in the table.
    sealed = str(row["text"])
    assert sealed.startswith("v2:")
    run_retry(sms_server, key, 2)  # still down: a second refusal
    retry_scheduled(sms_server, key, 3)
    provider.start()  # the same port
    run_retry(sms_server, key, 3)
    provider.wait_sent([key])
    assert wait_row(sms_server.database_url, lambda r: r["state"] == "SENT", key)["attempts"] == 4
    assert len(provider.requests_for(key)) == 1
    text = delivered_text(provider, key, sms_server.secrets)
    code = re.search(r"\d{6}", text)
    assert code and code.group() not in sealed and "验证码" not in sealed


def dead_letter_lines(caplog: pytest.LogCaptureFixture, key: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.getMessage() == "sms dead-lettered" and getattr(r, "message_id", "") == key
    ]


def wait_dead_letter_log(caplog, key: str) -> logging.LogRecord:
    deadline = time.monotonic() + WAIT
    while not dead_letter_lines(caplog, key):
        assert time.monotonic() < deadline, "no 'sms dead-lettered' log line"
        time.sleep(0.01)
    [record] = dead_letter_lines(caplog, key)
    return record


def test_dead_letter_after_max_attempts_erases_text_and_logs_an_error(
    start_sms_server, provider, caplog
):
    server = start_sms_server(sms_max_attempts=3)
    provider.fail_next(10, 503)
    key = queue_code(server, 7)
    run_retry(server, key, 1)
    run_retry(server, key, 2)
    row = wait_row(server.database_url, lambda r: r["state"] == "DEAD", key)
    assert row["attempts"] == 3 and row["text"] == ""
    assert row["last_error"] == "GatewayError: HTTP 503"
    record = wait_dead_letter_log(caplog, key)
    assert record.levelno == logging.ERROR
    line = JsonFormatter().format(record)
    assert '"to": "138****0007"' in line and '"error": "GatewayError: HTTP 503"' in line
    text = provider.requests_for(key)[0].body["text"]
    server.secrets.add(text)
    server.secrets.add(_CODE.search(text).group(1))
    server.secrets.add_phone("13800130007")
    assert not server.secrets.leaked([line])
    # Nothing more is tried.
    server.clock.advance(timedelta(hours=1))
    server.on_loop(server.app.dispatcher.run_once())
    assert len(provider.requests_for(key)) == 3
    assert key not in provider.sent


def test_a_message_that_cannot_be_unsealed_is_dead_lettered_not_retried(sms_server, provider):
    """A key dropped too early, or a damaged value: the batch goes on without it."""
    provider.stop()
    key = queue_code(sms_server, 11)
    retry_scheduled(sms_server, key, 1)
    if sms_server.database_url.startswith("sqlite:"):
        connection = sqlite3.connect(sms_server.database_url[len("sqlite:///") :], timeout=10)
        damage = "UPDATE sms_outbox SET text = 'v2:k-gone:AAAA' WHERE message_id = ?"
    else:
        connection = psycopg.connect(sms_server.database_url)
        damage = "UPDATE sms_outbox SET text = 'v2:k-gone:AAAA' WHERE message_id = %s"
    with connection:
        connection.cursor().execute(damage, (key,))
    connection.close()
    provider.start()
    other = queue_code(sms_server, 12)
    run_retry(sms_server, key, 1)
    row = wait_row(sms_server.database_url, lambda r: r["state"] == "DEAD", key)
    assert row["last_error"] == (
        f"cannot open the sealed message: sms_outbox.text of row {key!r}:"
        " sealed with an unknown key 'k-gone'"
    )
    assert row["text"] == ""
    provider.wait_sent([other])
    assert provider.requests_for(key) == []


def test_permanent_refusal_dead_letters_at_once(sms_server, provider, caplog):
    provider.fail_next(1, 400)
    key = queue_code(sms_server, 8)
    row = wait_row(sms_server.database_url, lambda r: r["state"] == "DEAD", key)
    assert row["attempts"] == 1 and row["text"] == ""
    assert row["last_error"] == "PermanentGatewayError: HTTP 400"
    assert wait_dead_letter_log(caplog, key).levelno == logging.ERROR
    sms_server.secrets.add(provider.requests_for(key)[0].body["text"])


def test_rate_limited_answer_is_retried(sms_server, provider):
    provider.fail_next(1, 429)
    key = queue_code(sms_server, 9)
    assert run_retry(sms_server, key, 1)["last_error"] == "GatewayError: HTTP 429"
    provider.wait_sent([key])
    delivered_text(provider, key, sms_server.secrets)
    assert_sent_once(provider, [key])


def test_expired_code_is_never_delivered_and_its_text_erased(sms_server, provider):
    provider.stop()
    key = queue_code(sms_server, 10)
    retry_scheduled(sms_server, key, 1)
    sms_server.clock.advance(timedelta(minutes=5, seconds=1))  # past the code's not_after
    provider.start()
    sms_server.wake_outbox()
    row = wait_row(sms_server.database_url, lambda r: r["state"] == "EXPIRED", key)
    assert row["text"] == ""
    sms_server.on_loop(sms_server.app.dispatcher.run_once())
    assert provider.requests == []


def test_two_dispatchers_on_one_database_deliver_each_message_once(sms_server, provider):
    """A second dispatcher in the same process, sharing the store, races the first
    (the two-process test below is the deployment shape)."""
    provider.stop()  # let 30 messages pile up, then release both dispatchers at once
    app = sms_server.app
    second = OutboxDispatcher(
        app.store,
        Vault(app.settings.keys()),
        HttpGateway(provider.url, secret=SECRET, timeout=TIMEOUT),
        sms_server.clock,
    )
    keys = [queue_code(sms_server, 100 + n) for n in range(30)]
    for key in keys:
        retry_scheduled(sms_server, key, 1)
    provider.slow_next(30, 0.1)  # a batch takes longer than the idle dispatcher's poll
    provider.start()
    sms_server.clock.advance(timedelta(seconds=2))

    async def start() -> None:
        second.start()

    sms_server.on_loop(start())
    try:
        sms_server.wake_outbox()
        provider.wait_sent(keys)
    finally:
        sms_server.on_loop(second.stop())
    for key in keys:
        wait_row(sms_server.database_url, lambda r: r["state"] == "SENT", key)
        delivered_text(provider, key, sms_server.secrets)
    assert_sent_once(provider, keys)
    assert len(provider.requests) == 30


def test_delivery_latency_from_send_code_to_the_provider(sms_server, provider):
    """Prints the median and max time from SendCode's answer to the provider's receipt."""
    latencies = []
    for n in range(50):
        key = queue_code_timed(sms_server, 200 + n)
        provider.wait_sent([key.key])
        latencies.append(provider.sent[key.key].at - key.returned)
    median, worst = statistics.median(latencies), max(latencies)
    print(
        f"\n[{sms_server.app.store.dialect}] SendCode -> provider over 50 messages: "
        f"median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms"
    )
    # The dispatcher is woken by the commit, not by its 1 s poll.
    assert median < 0.5, latencies


@dataclass
class Timed:
    key: str
    returned: float


def queue_code_timed(server: Running, n: int) -> Timed:
    old, new = phones(n)
    account_id = f"sms-{n}"
    server.api.register(account_id, old)
    rebind = server.api.start(account_id, new)
    server.api.send(account_id, rebind.rebind_id, OLD)
    returned = time.monotonic()
    return Timed(message_id_for(server.database_url, account_id), returned)


# -- real processes: a crash between commit and delivery, and two servers ---------------


def delivered(server: Serve) -> set[str]:
    """Message ids the server process logged as delivered."""
    return {
        json.loads(line)["message_id"]
        for line in server.log().splitlines()
        if line.startswith("{") and '"sms delivered"' in line
    }


def rpc_queue_code(address: str, n: int, secrets: Secrets) -> None:
    old, new = phones(n)
    secrets.add_phone(old)
    secrets.add_phone(new)
    account_id = f"sms-{n}"
    with grpc.insecure_channel(address) as channel:
        stub = api_grpc.BindingServiceStub(channel)
        stub.RegisterAccount(
            api.RegisterAccountRequest(
                account_id=account_id,
                holder_name="张三",
                id_number="11010519491231002X",
                phone=old,
            ),
            timeout=10,
        )
        rebind = stub.StartRebind(
            api.StartRebindRequest(account_id=account_id, new_phone=new), timeout=10
        ).rebind
        stub.SendCode(
            api.SendCodeRequest(account_id=account_id, rebind_id=rebind.rebind_id, target=OLD),
            timeout=10,
        )


def test_server_killed_between_commit_and_delivery_delivers_after_restart(
    database_url, tmp_path, secrets_seen
):
    provider = Provider(DEV_SECRET)  # --dev signs with the development secret
    provider.start()
    provider.stop()  # down, but its port is known
    server = Serve(database_url, tmp_path, gateway=provider.url, secrets=secrets_seen).start()
    try:
        rpc_queue_code(server.address, 1, secrets_seen)
        key = message_id_for(database_url, "sms-1")
        # Committed; the first delivery was refused and a retry is scheduled (so the
        # row is not leased to the process we are about to kill).
        wait_row(
            database_url,
            lambda r: r["attempts"] >= 1 and r["last_error"] == "GatewayError: connection refused",
            key,
        )
        server.kill()
        assert outbox(database_url)[key]["state"] == "PENDING"

        provider.start()
        server.start()
        provider.wait_sent([key])
        row = wait_row(database_url, lambda r: r["state"] == "SENT", key)
        assert row["text"] == ""
        assert len(provider.requests_for(key)) == 1  # exactly once
        assert provider.requests_for(key)[0].signature_ok
        delivered_text(provider, key, secrets_seen)
    finally:
        server.stop()
        provider.stop()
    assert key in delivered(server)


def test_two_server_processes_on_one_database_deliver_each_message_once(
    database_url, tmp_path, secrets_seen
):
    provider = Provider(DEV_SECRET)
    provider.start()
    provider.stop()  # messages pile up while it is down, then both race for them
    servers = [
        Serve(database_url, tmp_path, gateway=provider.url, secrets=secrets_seen).start()
        for _ in range(2)
    ]
    try:
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda n: rpc_queue_code(servers[n % 2].address, 300 + n, secrets_seen),
                    range(30),
                )
            )
        keys = list(outbox(database_url))
        assert len(keys) == 30
        provider.slow_next(30, 0.02)
        provider.start()
        provider.wait_sent(keys, timeout=60)
        for key in keys:
            wait_row(database_url, lambda r: r["state"] == "SENT" and r["text"] == "", key)
            delivered_text(provider, key, secrets_seen)
    finally:
        for server in servers:
            server.stop()
        provider.stop()
    assert_sent_once(provider, keys)
    assert len(provider.requests) == 30
    first, second = (delivered(server) for server in servers)
    assert not first & second and first | second == set(keys)
    print(f"\n[{database_url.split(':')[0]}] deliveries per process: {len(first)}, {len(second)}")


# -- settings --------------------------------------------------------------------------


def production(**extra: str) -> dict[str, str]:
    """Settings that pass the production checks: a key of its own for every dev key."""
    keys = {
        name: ("p1:" if name == "seal_keys" else "")
        + base64.b64encode(hashlib.sha256(f"test-{name}".encode()).digest()).decode()
        for name in DEV_KEYS
        if name != "sms_http_secret"
    }
    return {
        **keys,
        "sms_gateway": "https://sms.example.internal/v1/send",
        # Checked for presence here; the server reads them when it starts.
        "tls_cert": "/etc/phonebind/server.pem",
        "tls_key": "/etc/phonebind/server-key.pem",
        "credentials_file": "/etc/phonebind/callers.toml",
        **extra,
    }


def test_http_gateway_settings_outside_dev():
    settings = load(production(sms_http_secret=WHSEC), env={})
    assert settings.http_secret() == SECRET
    assert settings.sms_http_timeout_seconds == 5.0
    assert (settings.sms_retry_base_seconds, settings.sms_retry_max_seconds) == (1.0, 300.0)
    from_env = load(
        production(),
        env={"PHONEBIND_SMS_HTTP_SECRET": WHSEC, "PHONEBIND_SMS_HTTP_TIMEOUT_SECONDS": "2.5"},
    )
    assert from_env.http_secret() == SECRET and from_env.sms_http_timeout_seconds == 2.5
    # A sidecar on loopback may speak plain http; anything else needs TLS.
    load(production(sms_gateway="http://127.0.0.1:8080/sms", sms_http_secret=WHSEC), env={})
    with pytest.raises(ConfigError, match="https"):
        load(production(sms_gateway="http://sms.example.internal/", sms_http_secret=WHSEC), env={})


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        ({}, "sms_http_secret must be set"),
        ({"sms_http_secret": "whsec_not base64!"}, "sms_http_secret must be base64"),
        (
            {"sms_http_secret": "whsec_" + base64.b64encode(b"short").decode()},
            "sms_http_secret must be set",
        ),
        ({"sms_http_secret": DEV_KEYS["sms_http_secret"]}, "development keys"),
        (
            {"sms_http_secret": base64.b64encode(SECRET).decode()},
            "not a Standard Webhooks secret",
        ),
        ({"sms_http_timeout_seconds": "0"}, "sms_http_timeout_seconds"),
        ({"sms_retry_base_seconds": "10", "sms_retry_max_seconds": "5"}, "sms_retry_base"),
        ({"sms_max_attempts": "0"}, "sms_max_attempts"),
    ],
)
def test_http_gateway_settings_are_refused_when_unsafe(extra, complaint):
    settings = {"sms_http_secret": WHSEC, **extra}
    if not extra:
        settings = {}
    with pytest.raises(ConfigError, match=complaint):
        load(production(**settings), env={})


def test_dev_mode_signs_with_the_development_secret():
    settings = load({"dev": True, "sms_gateway": "http://127.0.0.1:9/sms"}, env={})
    assert DEV_SECRET.startswith("whsec_")
    assert settings.http_secret() == base64.b64decode(DEV_SECRET.removeprefix("whsec_"))
    # In development a bare base64 key is taken as well.
    bare = load(
        {"dev": True, "sms_gateway": "http://127.0.0.1:9/sms"},
        env={"PHONEBIND_SMS_HTTP_SECRET": base64.b64encode(SECRET).decode()},
    )
    assert bare.http_secret() == SECRET
