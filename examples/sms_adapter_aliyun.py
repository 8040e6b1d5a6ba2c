"""An SMS adapter: receives phonebind's SMS contract and sends each message by
template through an Aliyun-style SMS API (dysmsapi `SendSms`).

    phonebind --POST, Standard Webhooks--> this adapter --SendSms, RPC signature v1--> provider

It verifies each request's Standard Webhooks signature, maps phonebind's
template id and language to the provider's template code, and sends with the
sign name, the template code and the parameters as `TemplateParam` JSON, in a
request signed with the provider's RPC signature (version 1.0, HMAC-SHA1).
The provider's answer becomes the answer phonebind acts on:

- `Code` `OK`: 200, delivered;
- a flow limit (`isv.BUSINESS_LIMIT_CONTROL`, `Throttling…`), HTTP 429 or 503:
  429 with `Retry-After: 60`, and phonebind tries again in 60 s;
- the message itself refused (number, template, sign name, parameters): 422,
  and phonebind dead-letters it;
- anything else, a timeout, no connection: 502, retried with backoff.

A template it has no code for, or a request that is not signed with the
shared secret, is refused (422, 401) and never reaches the provider.
It answers 200 again, without sending, for a `webhook-id` it already sent (kept
in memory here: run one adapter, or keep the ids in a shared store). The
provider's API has no idempotency key: after a timeout the adapter cannot know
whether the SMS went out, and phonebind's retry may send it a second time.

Configuration (environment):

    PHONEBIND_SMS_HTTP_SECRET   the whsec_… secret phonebind signs with (its sms_http_secret)
    ALIYUN_ACCESS_KEY_ID, ALIYUN_ACCESS_KEY_SECRET
    ALIYUN_SIGN_NAME            the registered sign name (签名)
    ALIYUN_TEMPLATES            template:language=CODE, comma-separated, e.g.
                                phonebind.rebind_code.v1:zh-CN=SMS_100001,
                                phonebind.change_notice.v1:zh-CN=SMS_100002
    ALIYUN_ENDPOINT             default https://dysmsapi.aliyuncs.com/
    ADAPTER_LISTEN              default 127.0.0.1:8090
                                (phonebind: sms_gateway = "http://127.0.0.1:8090/sms")

Run it beside phonebind (a sidecar on loopback may speak plain http):

    python examples/sms_adapter_aliyun.py
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

log = logging.getLogger("sms_adapter_aliyun")

API_VERSION = "2017-05-25"
DEFAULT_ENDPOINT = "https://dysmsapi.aliyuncs.com/"
RETRY_AFTER_SECONDS = 60
_MAX_BODY = 64 * 1024
# Provider codes that refuse the message itself: sending it again cannot help.
_REFUSED = (
    "isv.MOBILE_NUMBER_ILLEGAL",
    "isv.MOBILE_COUNT_OVER_LIMIT",
    "isv.TEMPLATE_MISSING_PARAMETERS",
    "isv.TEMPLATE_PARAMS_ILLEGAL",
    "isv.SMS_TEMPLATE_ILLEGAL",
    "isv.SMS_SIGNATURE_ILLEGAL",
    "isv.INVALID_PARAMETERS",
    "isv.INVALID_JSON_PARAM",
    "isv.BLACK_KEY_CONTROL_LIMIT",
    "isv.PARAM_LENGTH_LIMIT",
    "isv.DENY_IP_RANGE",
)
_LIMITED = ("isv.BUSINESS_LIMIT_CONTROL", "Throttling")


# -- the provider's RPC signature, version 1.0 ---------------------------------------


def percent_encode(value: str) -> str:
    """RFC 3986 encoding as the signature wants it: only A-Z a-z 0-9 - _ . ~ stay."""
    return urllib.parse.quote(value, safe="-_.~")


def rpc_signature(method: str, params: dict[str, str], access_key_secret: str) -> str:
    """base64(HMAC-SHA1(secret + "&", METHOD&%2F&encode(sorted, encoded query)))."""
    canonical = "&".join(
        f"{percent_encode(name)}={percent_encode(params[name])}" for name in sorted(params)
    )
    string_to_sign = f"{method}&{percent_encode('/')}&{percent_encode(canonical)}"
    digest = hmac.new(
        (access_key_secret + "&").encode(), string_to_sign.encode(), hashlib.sha1
    ).digest()
    return base64.b64encode(digest).decode()


# -- configuration -------------------------------------------------------------------


@dataclass
class Config:
    webhook_secret: str
    access_key_id: str
    access_key_secret: str
    sign_name: str
    # (phonebind template id, language) -> the provider's template code
    templates: dict[tuple[str, str], str]
    endpoint: str = DEFAULT_ENDPOINT
    listen: str = "127.0.0.1:8090"
    timeout: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        return cls(
            webhook_secret=env["PHONEBIND_SMS_HTTP_SECRET"],
            access_key_id=env["ALIYUN_ACCESS_KEY_ID"],
            access_key_secret=env["ALIYUN_ACCESS_KEY_SECRET"],
            sign_name=env["ALIYUN_SIGN_NAME"],
            templates=parse_templates(env["ALIYUN_TEMPLATES"]),
            endpoint=env.get("ALIYUN_ENDPOINT", DEFAULT_ENDPOINT),
            listen=env.get("ADAPTER_LISTEN", "127.0.0.1:8090"),
        )


def parse_templates(spec: str) -> dict[tuple[str, str], str]:
    """`template:language=CODE,…` into {(template, language): CODE}."""
    templates = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, code = item.partition("=")
        template, _, language = key.partition(":")
        if not (template and language and code):
            raise ValueError(f"ALIYUN_TEMPLATES: {item!r} is not template:language=CODE")
        templates[(template, language)] = code
    return templates


# -- the provider call -----------------------------------------------------------------


@dataclass
class Outcome:
    status: int  # what the adapter answers phonebind
    detail: str  # for the adapter's log: the provider's code, never the message
    retry_after: int | None = None


def provider_number(e164: str) -> str:
    """Mainland numbers without +86, others as country code and number."""
    return e164[3:] if e164.startswith("+86") else e164.lstrip("+")


class AliyunSms:
    def __init__(self, config: Config) -> None:
        self.config = config

    def send(self, *, to: str, template_code: str, params: dict[str, str], out_id: str) -> Outcome:
        request_params = {
            "AccessKeyId": self.config.access_key_id,
            "Action": "SendSms",
            "Format": "JSON",
            "OutId": out_id,
            "PhoneNumbers": provider_number(to),
            "SignName": self.config.sign_name,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureNonce": str(uuid.uuid4()),
            "SignatureVersion": "1.0",
            "TemplateCode": template_code,
            "TemplateParam": json.dumps(params, ensure_ascii=False, separators=(",", ":")),
            "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Version": API_VERSION,
        }
        request_params["Signature"] = rpc_signature(
            "POST", request_params, self.config.access_key_secret
        )
        body = urllib.parse.urlencode(request_params, quote_via=urllib.parse.quote).encode()
        request = urllib.request.Request(  # noqa: S310 - the operator's configured endpoint
            self.config.endpoint,
            data=body,
            method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as answer:  # noqa: S310
                status, raw = answer.status, answer.read(_MAX_BODY)
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read(_MAX_BODY)
            error.close()
        except (OSError, urllib.error.URLError) as error:
            return Outcome(502, f"provider unreachable ({type(error).__name__})")
        try:
            code = str(json.loads(raw).get("Code", ""))
        except (ValueError, AttributeError):
            code = ""
        return classify(status, code)


def classify(status: int, code: str) -> Outcome:
    if status == 200 and code == "OK":
        return Outcome(200, "OK")
    if status in (429, 503) or code.startswith(_LIMITED):
        return Outcome(429, code or f"HTTP {status}", retry_after=RETRY_AFTER_SECONDS)
    if code in _REFUSED:
        return Outcome(422, code)
    return Outcome(502, code or f"HTTP {status}")


# -- the adapter's HTTP side -----------------------------------------------------------


@dataclass
class Adapter:
    config: Config
    provider: AliyunSms
    webhook: Webhook
    sent: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, config: Config) -> Adapter:
        return cls(config, AliyunSms(config), Webhook(config.webhook_secret))

    def handle(self, raw: bytes, headers: dict[str, str]) -> Outcome:
        try:
            message = self.webhook.verify(raw, headers)
        except WebhookVerificationError:
            return Outcome(401, "bad signature")
        message_id = str(message.get("message_id", ""))
        template = (str(message.get("template", "")), str(message.get("language", "")))
        code = self.config.templates.get(template)
        if code is None:
            return Outcome(422, f"no template code for {template[0] or '(none)'}:{template[1]}")
        with self._lock:
            if message_id in self.sent:
                return Outcome(200, "already sent")
        params = {str(k): str(v) for k, v in dict(message.get("params") or {}).items()}
        outcome = self.provider.send(
            to=str(message["to"]), template_code=code, params=params, out_id=message_id
        )
        if outcome.status == 200:
            with self._lock:
                self.sent.add(message_id)
        return outcome

    def server(self) -> http.server.ThreadingHTTPServer:
        adapter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > _MAX_BODY:
                    self._answer(Outcome(413, "too large"))
                    return
                raw = self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                self._answer(adapter.handle(raw, headers))

            def _answer(self, outcome: Outcome) -> None:
                log.info("sms %s: %s", outcome.status, outcome.detail)
                self.send_response(outcome.status)
                if outcome.retry_after is not None:
                    self.send_header("Retry-After", str(outcome.retry_after))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass  # the request line is logged by _answer, without the body

        host, _, port = self.config.listen.rpartition(":")
        return http.server.ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    adapter = Adapter.create(Config.from_env())
    server = adapter.server()
    log.info("listening on %s:%s", *server.server_address[:2])
    server.serve_forever()


if __name__ == "__main__":
    main()
