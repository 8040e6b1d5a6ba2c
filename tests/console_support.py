"""What the console's tests share: phonebind with the console's credential, and
people using the console through Flask's test client or a browser."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import grpc
from conftest import start_server
from phonebind_console import ConsoleConfig, create_app
from support import ID_NUMBER, NEW, Api

from phonebind_client import PhonebindClient
from phonebind_server.rpc.auth import new_token, token_digest

TOKENS = {"app": new_token(), "console": new_token()}
CALLERS = f"""
[[caller]]
name = "app"
roles = ["kyc", "flow", "reader"]
token_sha256 = "{token_digest(TOKENS["app"])}"

[[caller]]
name = "console"
roles = ["reviewer", "auditor"]
token_sha256 = "{token_digest(TOKENS["console"])}"
delegate = true
"""
SECRET_KEY = b"k" * 32
_CSRF = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"')


class Bearer(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def intercept_unary_unary(self, continuation, details, request):
        metadata = (*(details.metadata or ()), *self._metadata)
        return continuation(details._replace(metadata=metadata), request)


def start_phonebind(database_url, tmp_path, clock, secrets_seen, **settings):
    """A real server whose callers are the app (kyc, flow, reader) and the console."""
    path = tmp_path / "callers.toml"
    path.write_text(CALLERS, encoding="utf-8")
    running = start_server(
        database_url, tmp_path, clock, secrets_seen, credentials_file=str(path), **settings
    )
    return running


def app_api(running, channel: grpc.Channel | None = None) -> Api:
    """BindingService as the app backend calls it."""
    channel = channel if channel is not None else running.channel
    return Api(
        grpc.intercept_channel(channel, Bearer(TOKENS["app"])), running.inbox, running.secrets
    )


def console_client(running) -> PhonebindClient:
    """What the console itself sees over gRPC (reviewer and auditor)."""
    return PhonebindClient(running.target, token=TOKENS["console"])


def dev_console(running, **settings):
    config = ConsoleConfig(
        target=running.target,
        token=TOKENS["console"],
        secret_key=SECRET_KEY,
        dev=True,
        **settings,
    )
    app = create_app(config)
    app.testing = True
    return app


def lost_phone(api: Api, account_id: str, old: str, new: str, *, customer_done: bool = True):
    """A lost-phone rebind: identity done, and (customer_done) the new number's code too."""
    api.register(account_id, old)
    rebind = api.start(account_id, new, lost=True)
    api.identity(account_id, rebind.rebind_id)
    if customer_done:
        api.send_and_verify(account_id, rebind.rebind_id, NEW, new)
    return rebind.rebind_id


def page_text(body: str) -> str:
    """The page's text as a person reads it: tags dropped, entities decoded, spaces folded."""
    text = re.sub(r"<[^>]+>", " ", body)
    return re.sub(r"\s+", " ", html.unescape(text))


@dataclass
class Person:
    """Someone using the console through Flask's test client; every page and
    address they were shown is kept, to search for full numbers afterwards."""

    client: object
    seen: list[str] = field(default_factory=list)
    referer: str | None = None
    # Sent as Accept-Language unless a request says otherwise.
    language: str | None = "en"

    def _headers(self, headers):
        headers = dict(headers or {})
        if self.language:
            headers.setdefault("Accept-Language", self.language)
        if self.referer:
            headers.setdefault("Referer", self.referer)
        return headers

    def get(self, path: str, headers=None, **kwargs):
        response = self.client.get(path, headers=self._headers(headers), **kwargs)
        self._keep(path, response)
        return response

    def post(self, path: str, data: dict, headers=None, **kwargs):
        response = self.client.post(path, data=data, headers=self._headers(headers), **kwargs)
        self._keep(path, response)
        return response

    def csrf(self, path: str = "/login", headers=None, **kwargs) -> str:
        """The CSRF token of the form on `path`, as this person's browser holds it."""
        body = self.get(path, headers=headers, **kwargs).get_data(as_text=True)
        match = _CSRF.search(body)
        assert match, f"no CSRF token on {path}"
        return match.group(1)

    def submit(self, page: str, action: str, fields: dict, headers=None, **kwargs):
        """Fills and sends the form of `page` that posts to `action`."""
        token = self.csrf(page, headers=headers, **kwargs)
        return self.post(action, {"csrf_token": token, **fields}, headers=headers, **kwargs)

    def _keep(self, path: str, response) -> None:
        self.seen.append(path)
        self.seen.append(response.headers.get("Location", ""))
        self.seen.append(response.get_data(as_text=True))

    def text(self, path: str, headers=None, **kwargs) -> str:
        response = self.get(path, headers=headers, **kwargs)
        assert response.status_code == 200, (path, response.status_code)
        return page_text(response.get_data(as_text=True))


def sign_in_dev(app, person: str) -> Person:
    someone = Person(app.test_client())
    answer = someone.submit("/login", "/login", {"person": person})
    assert answer.status_code == 303, answer.get_data(as_text=True)[:500]
    return someone


def assert_nothing_secret(texts: list[str], *numbers: str) -> None:
    """No full number (national, +86) nor the ID number in any page or address shown."""
    everything = "\n".join(texts)
    for number in numbers:
        for form in (number, "86" + number):
            assert form not in everything, "a full number reached a page or address"
    assert ID_NUMBER not in everything
