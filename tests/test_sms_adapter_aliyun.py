"""examples/sms_adapter_aliyun.py between phonebind and a local fake of an
Aliyun-style SMS API, all over real HTTP on loopback.

The fake provider checks every SendSms request as the real API would: the RPC
signature (version 1.0, recomputed here on the request's own parameters), the
required parameters, a fresh nonce and a recent timestamp; it records each
templated send and can answer with a business error. The adapter's signer is
also held to the example the provider's documentation publishes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import importlib.util
import json
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import start_server
from support import NEW, OLD

from phonebind_server.sms.gateways import GatewayError, PermanentGatewayError, Sms
from phonebind_server.sms.http_gateway import HttpGateway

ROOT = Path(__file__).resolve().parent.parent
SECRET = hashlib.sha256(b"phonebind-aliyun-adapter-test").digest()
WHSEC = "whsec_" + base64.b64encode(SECRET).decode()
ACCESS_KEY_ID = "LTAI-test-id"
ACCESS_KEY_SECRET = "test-access-key-secret"
SIGN_NAME = "示例贷"
TEMPLATES = {
    ("phonebind.rebind_code.v1", "zh-CN"): "SMS_100001",
    ("phonebind.change_notice.v1", "zh-CN"): "SMS_100002",
}
WAIT = 15.0


def load_example():
    path = ROOT / "examples" / "sms_adapter_aliyun.py"
    spec = importlib.util.spec_from_file_location("sms_adapter_aliyun", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


example = load_example()


# -- the fake provider --------------------------------------------------------------


def expected_signature(method: str, params: dict[str, str], secret: str) -> str:
    """The RPC v1 signature, written out from the provider's documentation."""

    def enc(value: str) -> str:
        return urllib.parse.quote(value.encode("utf-8"), safe="~")

    query = "&".join(enc(k) + "=" + enc(v) for k, v in sorted(params.items()))
    to_sign = method + "&" + enc("/") + "&" + enc(query)
    mac = hmac.new(f"{secret}&".encode(), to_sign.encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


@dataclass
class FakeAliyun:
    port: int = 0
    sends: list[dict[str, str]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)  # why a request was refused
    replies: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # scripted
    nonces: set[str] = field(default_factory=set)
    cond: threading.Condition = field(default_factory=threading.Condition)
    _httpd: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, answer = fake.answer(self.command, raw.decode("ascii"))
                body = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def refuse(self, why: str) -> tuple[int, dict[str, str]]:
        self.refusals.append(why)
        return 400, {"Code": why, "Message": why, "RequestId": "r"}

    def answer(self, method: str, body: str) -> tuple[int, dict[str, str]]:
        params = dict(urllib.parse.parse_qsl(body, keep_blank_values=True, strict_parsing=True))
        with self.cond:
            try:
                signature = params.pop("Signature")
            except KeyError:
                return self.refuse("MissingSignature")
            if signature != expected_signature(method, params, ACCESS_KEY_SECRET):
                return self.refuse("SignatureDoesNotMatch")
            fixed = {
                "Action": "SendSms",
                "Version": "2017-05-25",
                "Format": "JSON",
                "SignatureMethod": "HMAC-SHA1",
                "SignatureVersion": "1.0",
                "AccessKeyId": ACCESS_KEY_ID,
            }
            if any(params.get(k) != v for k, v in fixed.items()):
                return self.refuse("InvalidParameter")
            if params["SignatureNonce"] in self.nonces:
                return self.refuse("SignatureNonceUsed")
            self.nonces.add(params["SignatureNonce"])
            sent_at = datetime.strptime(params["Timestamp"], "%Y-%m-%dT%H:%M:%SZ")
            if abs(sent_at.replace(tzinfo=UTC) - datetime.now(UTC)) > timedelta(minutes=15):
                return self.refuse("InvalidTimeStamp.Expired")
            for name in ("PhoneNumbers", "SignName", "TemplateCode", "TemplateParam"):
                if not params.get(name):
                    return self.refuse(f"MissingParameter.{name}")
            json.loads(params["TemplateParam"])
            if self.replies:
                return self.replies.pop(0)
            self.sends.append(params)
            self.cond.notify_all()
            return 200, {"Code": "OK", "Message": "OK", "BizId": f"biz-{len(self.sends)}"}

    def wait_sends(self, count: int) -> list[dict[str, str]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.sends) >= count, WAIT), self.sends
            return list(self.sends)


@pytest.fixture
def provider() -> Iterator[FakeAliyun]:
    fake = FakeAliyun()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def adapter_url(provider: FakeAliyun) -> Iterator[str]:
    config = example.Config(
        webhook_secret=WHSEC,
        access_key_id=ACCESS_KEY_ID,
        access_key_secret=ACCESS_KEY_SECRET,
        sign_name=SIGN_NAME,
        templates=dict(TEMPLATES),
        endpoint=provider.url,
        listen="127.0.0.1:0",
    )
    server = example.Adapter.create(config).server()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/sms"
    server.shutdown()
    server.server_close()


def gateway(url: str, secret: bytes = SECRET) -> HttpGateway:
    return HttpGateway(url, secret=secret, timeout=5)


def deliver(url: str, key: str = "m-1", template: str = "phonebind.rebind_code.v1", **kw) -> None:
    gateway(url, **kw).deliver(
        Sms(
            message_id=key,
            to="+8613800138000",
            text="【示例贷】验证码 482913，5 分钟内有效。",
            purpose="REBIND_CODE",
            template=template,
            language="zh-CN",
            params={"code": "482913", "minutes": "5"},
        )
    )


# -- the signer against the documentation ---------------------------------------------


def test_the_signer_reproduces_the_documented_example():
    params = {
        "AccessKeyId": "testid",
        "Action": "DescribeRegions",
        "Format": "XML",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
        "SignatureVersion": "1.0",
        "Timestamp": "2016-02-23T12:46:24Z",
        "Version": "2014-05-26",
    }
    assert example.rpc_signature("GET", params, "testsecret") == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="
    assert expected_signature("GET", params, "testsecret") == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="
    assert example.percent_encode("a b*c~d/中") == "a%20b%2Ac~d%2F%E4%B8%AD"


# -- phonebind's gateway -> the adapter -> the provider ------------------------------------


def test_a_code_becomes_one_templated_signed_send(adapter_url, provider):
    deliver(adapter_url, "m-1")
    [send] = provider.wait_sends(1)
    assert provider.refusals == []
    assert send["PhoneNumbers"] == "13800138000"
    assert send["SignName"] == SIGN_NAME
    assert send["TemplateCode"] == "SMS_100001"
    assert json.loads(send["TemplateParam"]) == {"code": "482913", "minutes": "5"}
    assert send["OutId"] == "m-1"


def test_a_redelivered_message_is_answered_without_a_second_send(adapter_url, provider):
    deliver(adapter_url, "m-2")
    deliver(adapter_url, "m-2")  # phonebind lost the first answer and asks again
    deliver(adapter_url, "m-3")
    # Each deliver returned after the adapter answered: the sends are all in.
    assert [s["OutId"] for s in provider.sends] == ["m-2", "m-3"]


def test_a_request_not_signed_with_the_shared_secret_is_refused_and_not_sent(adapter_url, provider):
    with pytest.raises(PermanentGatewayError, match="HTTP 401"):
        deliver(adapter_url, "m-4", secret=b"another secret of 32 bytes......")
    assert provider.sends == [] and provider.nonces == set()


def test_a_template_without_a_provider_code_is_refused_and_not_sent(adapter_url, provider):
    with pytest.raises(PermanentGatewayError, match="HTTP 422"):
        deliver(adapter_url, "m-5", template="phonebind.unknown.v1")
    with pytest.raises(PermanentGatewayError, match="HTTP 422"):
        deliver(adapter_url, "m-6", template="")  # queued before templates: text only
    assert provider.nonces == set()


def test_a_flow_limit_is_retried_after_the_adapters_retry_after(adapter_url, provider):
    provider.replies.append((200, {"Code": "isv.BUSINESS_LIMIT_CONTROL", "Message": "limit"}))
    with pytest.raises(GatewayError) as raised:
        deliver(adapter_url, "m-7")
    assert not isinstance(raised.value, PermanentGatewayError)
    assert str(raised.value) == "HTTP 429"
    assert raised.value.retry_after == timedelta(seconds=60)
    deliver(adapter_url, "m-7")  # the retry goes through
    assert [s["OutId"] for s in provider.wait_sends(1)] == ["m-7"]


def test_a_refused_number_is_dead_lettered(adapter_url, provider):
    provider.replies.append((200, {"Code": "isv.MOBILE_NUMBER_ILLEGAL", "Message": "bad"}))
    with pytest.raises(PermanentGatewayError, match="HTTP 422"):
        deliver(adapter_url, "m-8")


def test_a_provider_fault_is_retried_with_backoff(adapter_url, provider):
    provider.replies.append((500, {"Code": "InternalError", "Message": "oops"}))
    with pytest.raises(GatewayError) as raised:
        deliver(adapter_url, "m-9")
    assert str(raised.value) == "HTTP 502" and raised.value.retry_after is None
    provider.stop()
    with pytest.raises(GatewayError, match="HTTP 502"):
        deliver(adapter_url, "m-10")  # provider unreachable


# -- a real server, its outbox, the adapter and the provider, on both backends ---------


def test_a_whole_rebind_through_the_adapter(
    database_url, tmp_path, clock, secrets_seen, adapter_url, provider
):
    running = start_server(
        database_url,
        tmp_path,
        clock,
        secrets_seen,
        sms_gateway=adapter_url,
        sms_http_secret=WHSEC,
    )
    try:
        api = running.api
        old, new = "13800130501", "13900130501"
        secrets_seen.add_phone(old)
        secrets_seen.add_phone(new)
        api.register("ali-1", old)
        rebind = api.start("ali-1", new).rebind_id
        api.identity("ali-1", rebind)
        for count, (target, phone) in enumerate(((OLD, old), (NEW, new)), start=1):
            api.send("ali-1", rebind, target)
            send = provider.wait_sends(count)[-1]
            assert send["PhoneNumbers"] == phone and send["TemplateCode"] == "SMS_100001"
            params = json.loads(send["TemplateParam"])
            assert params["minutes"] == "5"
            api.verify("ali-1", rebind, target, params["code"])
        api.complete("ali-1", rebind)
        notice = provider.wait_sends(3)[-1]
        assert notice["PhoneNumbers"] == old and notice["TemplateCode"] == "SMS_100002"
        assert json.loads(notice["TemplateParam"]) == {"masked_number": "139****0501"}
        assert provider.refusals == []
    finally:
        running.stop()
