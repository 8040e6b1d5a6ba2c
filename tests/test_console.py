"""phonebind-console through Flask's test client against a real phonebind server
(SQLite and PostgreSQL): the queue, a case, decisions, sign-in, CSRF, cookies,
languages and the trusted-proxy rule."""

from __future__ import annotations

import ipaddress
import json
import pathlib
import re
import subprocess
import sys
from datetime import timedelta

import grpc
import pytest
import requests
from console_support import (
    SECRET_KEY,
    TOKENS,
    Person,
    app_api,
    assert_nothing_secret,
    console_client,
    dev_console,
    lost_phone,
    page_text,
    sign_in_dev,
    start_phonebind,
)
from fake_oidc import FakeOidcProvider
from phonebind_console import ConfigError, ConsoleConfig, OidcConfig, create_app, i18n
from phonebind_console.config import check
from support import Serve, free_port, wait_until

from phonebind_client import PhonebindClient, ReviewState
from phonebind_server.devcerts import write_dev_certs

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "console" / "phonebind_console" / "templates"
BIN = pathlib.Path(sys.executable).parent


@pytest.fixture
def phonebind(database_url, tmp_path, clock, secrets_seen):
    running = start_phonebind(database_url, tmp_path, clock, secrets_seen)
    running.api = app_api(running)
    yield running
    running.stop()


@pytest.fixture
def console(phonebind):
    return dev_console(phonebind)


def case_state(phonebind, rebind_id: str):
    with console_client(phonebind) as pb:
        return pb.get_review(rebind_id).rebind


# -- the queue, a case, a decision ------------------------------------------------------


def test_a_reviewer_finds_opens_and_approves_a_lost_phone_rebind(phonebind, console):
    api, clock = phonebind.api, phonebind.clock
    ready = lost_phone(api, "acct-ready", "13800138501", "13900139501")
    clock.advance(timedelta(minutes=12))
    waiting = lost_phone(api, "acct-waiting", "13800138502", "13900139502", customer_done=False)
    clock.advance(timedelta(minutes=8))  # a rebind lives 30 minutes

    alice = sign_in_dev(console, "alice")
    queue = alice.get("/queue").get_data(as_text=True)
    ready_list, waiting_list = queue.split('id="waiting"')
    assert ready in ready_list and waiting not in ready_list
    assert waiting in waiting_list
    text = page_text(queue)
    assert "Signed in as alice" in text
    assert "138****8501 → 139****9501 Old phone lost" in text
    assert re.search(r"Review · \d+ OLD_PHONE_LOST", text)
    assert "20m" in text and "8m" in text  # how long each has waited

    only = alice.get("/queue?account=acct-waiting&show=waiting").get_data(as_text=True)
    assert waiting in only and ready not in only
    assert 'id="waiting"' in only and 'id="ready"' not in only
    assert alice.text("/queue?account=acct-other").count("Nothing here.") == 2

    detail = alice.text(f"/reviews/{ready}")
    assert "The user says the old phone is lost" in detail
    assert "Holder 张*" in detail and "ID number 110***********002X" in detail
    assert "Bound number 138****8501" in detail
    assert "Identity (name and ID number)" in detail and "Code to the new number" in detail
    assert "Changes in the last 30 days 0" in detail
    assert "Waiting 20m" in detail
    assert "REBIND_STARTED" in detail and "IDENTITY_VERIFIED" in detail  # the audit trail

    done = alice.submit(f"/reviews/{ready}", f"/reviews/{ready}/approve", {"note": "called back"})
    assert done.status_code == 303 and done.headers["Location"] == f"/reviews/{ready}"
    after = alice.text(f"/reviews/{ready}")
    assert "Approved." in after
    assert "approved by console:alice" in after and "called back" in after
    assert "Ready to complete" in after
    assert "This rebind is decided or closed" in after

    # The app finishes the change over gRPC; the console shows it done.
    completed = api.complete("acct-ready", ready)
    assert completed.account.phone_masked == "139****9501"
    final = alice.text(f"/reviews/{ready}")
    assert "Completed" in final and "REBIND_COMPLETED" in final
    assert ready not in alice.text("/queue")

    # The trail names the person, through the console's caller.
    with console_client(phonebind) as pb:
        decisions = [
            (e.action, e.caller, e.details["reviewer"])
            for e in pb.iter_audit_events(account_id="acct-ready")
            if e.action.startswith("REVIEW_")
        ]
    assert decisions == [("REVIEW_APPROVED", "console:alice", "console:alice")]
    assert_nothing_secret(alice.seen, "13800138501", "13900139501", "13800138502", "13900139502")


def test_a_rejection_needs_a_note_and_records_the_person(phonebind, console):
    rebind_id = lost_phone(phonebind.api, "acct-r", "13800138511", "13900139511")
    bob = sign_in_dev(console, "bob")
    page, action = f"/reviews/{rebind_id}", f"/reviews/{rebind_id}/reject"

    blank = bob.submit(page, action, {"note": "  "})
    assert blank.status_code == 400
    assert "The note is required." in page_text(blank.get_data(as_text=True))
    pasted = bob.submit(page, action, {"note": "the customer's number is 139 0013 9511"})
    assert pasted.status_code == 400
    assert "Write no full phone number or ID number" in pasted.get_data(as_text=True)
    too_long = bob.submit(page, f"/reviews/{rebind_id}/approve", {"note": "x" * 501})
    assert too_long.status_code == 400
    # Nothing reached phonebind.
    assert case_state(phonebind, rebind_id).review.state == ReviewState.Value(
        "REVIEW_STATE_PENDING"
    )

    rejected = bob.submit(page, action, {"note": "no callback; masked 139****9511"})
    assert rejected.status_code == 303
    text = bob.text(page)
    assert "Rejected." in text and "rejected by console:bob" in text
    assert "no callback; masked 139****9511" in text
    decided = case_state(phonebind, rebind_id).review
    assert (decided.state, decided.reviewer) == (
        ReviewState.Value("REVIEW_STATE_REJECTED"),
        "console:bob",
    )
    assert_nothing_secret(bob.seen, "13800138511", "13900139511")


def test_a_second_reviewer_no_longer_sees_a_decided_rebind(phonebind, console):
    rebind_id = lost_phone(phonebind.api, "acct-2r", "13800138521", "13900139521")
    alice, bob = sign_in_dev(console, "alice"), sign_in_dev(console, "bob")
    assert rebind_id in bob.text("/queue")
    # Bob opened the case before Alice decided it: his form is stale.
    stale = bob.csrf(f"/reviews/{rebind_id}")

    alice.submit(f"/reviews/{rebind_id}", f"/reviews/{rebind_id}/approve", {"note": ""})
    assert rebind_id not in bob.text("/queue")
    late = bob.post(f"/reviews/{rebind_id}/reject", {"csrf_token": stale, "note": "fraud"})
    assert late.status_code == 303
    shown = bob.text(f"/reviews/{rebind_id}")
    assert "phonebind refused" in shown
    assert "approved by console:alice" in shown and "rejected by" not in shown
    assert "This rebind is decided or closed" in shown
    assert case_state(phonebind, rebind_id).review.reviewer == "console:alice"


def test_a_form_post_without_its_csrf_token_is_refused(phonebind, console):
    rebind_id = lost_phone(phonebind.api, "acct-c", "13800138531", "13900139531")
    alice, mallory = sign_in_dev(console, "alice"), sign_in_dev(console, "mallory")

    forged = alice.post(f"/reviews/{rebind_id}/approve", {"note": "forged"})
    assert forged.status_code == 400
    assert "The form was not sent from this page" in page_text(forged.get_data(as_text=True))
    # Another session's token is no good either.
    foreign = mallory.csrf(f"/reviews/{rebind_id}")
    borrowed = alice.post(f"/reviews/{rebind_id}/reject", {"csrf_token": foreign, "note": "x"})
    assert borrowed.status_code == 400
    assert alice.post("/logout", {}).status_code == 400
    assert alice.post("/language", {"language": "zh-CN", "next": "/queue"}).status_code == 400
    assert case_state(phonebind, rebind_id).review.state == ReviewState.Value(
        "REVIEW_STATE_PENDING"
    )
    assert "Signed in as alice" in alice.text("/queue")


def test_without_signing_in_nothing_is_shown(phonebind, console):
    rebind_id = lost_phone(phonebind.api, "acct-anon", "13800138541", "13900139541")
    nobody = Person(console.test_client())
    answer = nobody.get(f"/reviews/{rebind_id}")
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith("/login?next=")
    posted = nobody.submit("/login", f"/reviews/{rebind_id}/approve", {"note": ""})
    assert posted.status_code == 303 and posted.headers["Location"] == "/login"
    refused = nobody.submit("/login", "/login", {"person": "ali ce"})
    assert refused.status_code == 400
    assert case_state(phonebind, rebind_id).review.state == ReviewState.Value(
        "REVIEW_STATE_PENDING"
    )

    # Signing in returns to where the person was going, never to another site.
    alice = Person(console.test_client())
    token = alice.csrf("/login")
    back = alice.post(f"/login?next=/reviews/{rebind_id}", {"csrf_token": token, "person": "a"})
    assert back.headers["Location"] == f"/reviews/{rebind_id}"
    away = alice.submit("/queue", "/language", {"language": "en", "next": "//evil.example/"})
    assert away.headers["Location"] == "/queue"
    signed_out = alice.submit("/queue", "/logout", {})
    assert signed_out.headers["Location"] == "/login"
    assert alice.get("/queue").status_code == 302


# -- languages --------------------------------------------------------------------------


def test_pages_follow_accept_language_and_remember_the_choice(phonebind, console):
    rebind_id = lost_phone(phonebind.api, "acct-l", "13800138551", "13900139551")
    person = Person(console.test_client(), language=None)
    person.submit("/login", "/login", {"person": "lin"})

    chinese = person.get("/queue").get_data(as_text=True)  # no Accept-Language: zh-CN
    assert '<html lang="zh-CN">' in chinese and "审核队列" in page_text(chinese)
    english = person.text("/queue", headers={"Accept-Language": "en-GB,en;q=0.9"})
    assert "Review queue" in english and "审核队列" not in english
    assert "审核队列" in person.text("/queue", headers={"Accept-Language": "zh,en;q=0.5"})

    detail = person.text(f"/reviews/{rebind_id}", headers={"Accept-Language": "en"})
    assert "The user says the old phone is lost" in detail and "Approve" in detail
    token = person.csrf("/queue")
    chosen = person.post("/language", {"csrf_token": token, "language": "zh-CN", "next": "/queue"})
    assert chosen.status_code == 303 and chosen.headers["Location"] == "/queue"
    cookie = chosen.headers["Set-Cookie"]
    assert cookie.startswith("phonebind-console-language=zh-CN;")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie

    # The choice outweighs the browser's Accept-Language, in the console's texts
    # and in phonebind's.
    zh = person.text(f"/reviews/{rebind_id}", headers={"Accept-Language": "en"})
    assert "用户表示原手机号已丢失" in zh and "批准" in zh and "拒绝原因（必填）" in zh
    assert "身份核验（姓名与身份证号）" in zh
    refused = person.submit(f"/reviews/{rebind_id}", f"/reviews/{rebind_id}/reject", {"note": ""})
    assert "必须填写备注。" in page_text(refused.get_data(as_text=True))
    person.submit(f"/reviews/{rebind_id}", f"/reviews/{rebind_id}/approve", {"note": ""})
    assert "已批准。" in person.text(f"/reviews/{rebind_id}")


def test_every_text_of_the_pages_has_a_chinese_translation():
    used = set()
    for template in TEMPLATES.glob("*.html"):
        used |= set(re.findall(r'_\("([^"]+)"\)', template.read_text(encoding="utf-8")))
    forms = (ROOT / "console" / "phonebind_console" / "forms.py").read_text(encoding="utf-8")
    used |= set(re.findall(r'message="([^"]+)"', forms))
    used |= {"Approved.", "Rejected.", "Not found.", "Sign-in failed.", "phonebind refused"}
    missing = sorted(text for text in used if text not in i18n.ZH_CN)
    assert not missing, f"untranslated: {missing}"
    assert len(used) > 40
    for kind, labels in i18n.ENUMS.items():
        assert all(english and chinese for english, chinese in labels.values()), kind


# -- cookies and headers ----------------------------------------------------------------


def test_cookies_are_host_only_secure_and_pages_carry_a_csp(phonebind):
    app = dev_console(phonebind, public_url="https://review.example")
    person = Person(app.test_client(), referer="https://review.example/login")
    person.client.environ_base["wsgi.url_scheme"] = "https"
    first = person.get("/login", base_url="https://review.example")
    session = first.headers["Set-Cookie"]
    assert session.startswith("__Host-phonebind-console=")
    for attribute in ("Secure", "HttpOnly", "Path=/", "SameSite=Lax"):
        assert attribute in session
    assert "Domain" not in session
    csp = first.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "form-action 'self'" in csp
    assert "script-src" not in csp  # no script may run at all
    assert "frame-ancestors 'none'" in csp
    assert first.headers["Strict-Transport-Security"].startswith("max-age=")
    assert first.headers["Cache-Control"] == "no-store"

    token = person.csrf("/login", base_url="https://review.example")
    signed_in = person.post(
        "/login", {"csrf_token": token, "person": "amy"}, base_url="https://review.example"
    )
    assert signed_in.status_code == 303
    language = person.submit(
        "/queue",
        "/language",
        {"language": "en", "next": "/queue"},
        base_url="https://review.example",
    )
    cookie = language.headers["Set-Cookie"]
    assert cookie.startswith("__Host-phonebind-console-language=en;")
    assert "Secure" in cookie and "HttpOnly" in cookie

    plain = Person(dev_console(phonebind).test_client())
    cookie = plain.get("/login").headers["Set-Cookie"]
    assert cookie.startswith("phonebind-console=") and "Secure" not in cookie


# -- production settings: TLS to phonebind, a proxy or OpenID Connect ---------------------


@pytest.fixture
def tls_phonebind(database_url, tmp_path, clock, secrets_seen):
    certs = tmp_path / "certs"
    write_dev_certs(str(certs))
    running = start_phonebind(
        database_url,
        tmp_path,
        clock,
        secrets_seen,
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server-key.pem"),
    )
    running.api = app_api(running, running.channel)
    running.ca_pem = (certs / "ca.pem").read_bytes()
    yield running
    running.stop()


def production(running, **settings) -> ConsoleConfig:
    return ConsoleConfig(
        target=f"localhost:{running.app.port}",
        token=TOKENS["console"],
        ca_pem=running.ca_pem,
        secret_key=SECRET_KEY,
        public_url="https://review.example",
        **settings,
    )


def test_the_proxy_header_is_believed_only_from_trusted_proxies(tls_phonebind, caplog):
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_phonebind.ca_pem)
    channel = grpc.secure_channel(f"localhost:{tls_phonebind.app.port}", credentials)
    api = app_api(tls_phonebind, channel)
    rebind_id = lost_phone(api, "acct-p", "13800138561", "13900139561")
    config = production(
        tls_phonebind,
        proxy_header="X-WEBAUTH-USER",
        proxy_networks=(ipaddress.ip_network("10.1.2.0/24"),),
    )
    app = create_app(config)
    app.testing = True
    https = {"base_url": "https://review.example"}
    proxy = {"REMOTE_ADDR": "10.1.2.3", "wsgi.url_scheme": "https"}
    carol = Person(app.test_client(), referer="https://review.example/queue")
    headers = {"X-WEBAUTH-USER": "carol"}

    page = carol.text("/queue", headers=headers, environ_base=proxy, **https)
    assert rebind_id in page and "Signed in as carol" in page
    assert "Sign out" not in page  # the proxy signs people out, not the console

    outsider = {"REMOTE_ADDR": "192.0.2.7", "wsgi.url_scheme": "https"}
    refused = carol.get("/queue", headers=headers, environ_base=outsider, **https)
    assert refused.status_code == 403
    assert "not a trusted proxy" in page_text(refused.get_data(as_text=True))
    assert any("untrusted address" in r.getMessage() for r in caplog.records)
    mapped = {"REMOTE_ADDR": "::ffff:10.1.2.9", "wsgi.url_scheme": "https"}
    assert carol.get("/queue", headers=headers, environ_base=mapped, **https).status_code == 200
    malformed = {"X-WEBAUTH-USER": "carol smith"}
    assert carol.get("/queue", headers=malformed, environ_base=proxy, **https).status_code == 403

    # Without the header (and without OpenID Connect) nobody is signed in.
    stranger = Person(app.test_client())
    away = stranger.get("/queue", environ_base=proxy, **https)
    assert away.status_code == 302
    assert stranger.get("/login", environ_base=proxy, **https).status_code == 401

    answer = carol.submit(
        f"/reviews/{rebind_id}",
        f"/reviews/{rebind_id}/approve",
        {"note": "video call"},
        headers=headers,
        environ_base=proxy,
        **https,
    )
    assert answer.status_code == 303, answer.get_data(as_text=True)[:300]
    with console_client_tls(tls_phonebind) as pb:
        assert pb.get_review(rebind_id).rebind.review.reviewer == "console:carol"
    channel.close()


def console_client_tls(running):
    credentials = grpc.ssl_channel_credentials(root_certificates=running.ca_pem)
    return PhonebindClient(
        f"localhost:{running.app.port}", credentials=credentials, token=TOKENS["console"]
    )


@pytest.fixture
def oidc():
    provider = FakeOidcProvider().start()
    yield provider
    provider.stop()


def oidc_sign_in(app, provider, **claims) -> tuple[Person, object]:
    """Follows the redirects a browser would: console -> provider -> console."""
    person = Person(app.test_client())
    provider.sign_in_as(**claims) if claims else setattr(provider, "person", None)
    https = {"base_url": "https://review.example"}
    start = person.get("/login/oidc?next=/queue", **https)
    assert start.status_code == 302
    assert start.headers["Location"].startswith(provider.issuer + "/authorize?")
    back = requests.get(start.headers["Location"], allow_redirects=False, timeout=10)
    assert back.status_code == 302
    callback = back.headers["Location"]
    assert callback.startswith("https://review.example/oidc/callback?")
    return person, person.get(callback.removeprefix("https://review.example"), **https)


def test_people_sign_in_with_openid_connect(tls_phonebind, oidc):
    config = production(
        tls_phonebind,
        oidc=OidcConfig(
            metadata_url=oidc.metadata_url,
            client_id=oidc.client_id,
            client_secret=oidc.client_secret,
        ),
    )
    app = create_app(config)
    app.testing = True
    https = {"base_url": "https://review.example"}

    page = Person(app.test_client()).text("/login", headers={"Accept-Language": "en"}, **https)
    assert "Sign in with single sign-on" in page and "Development mode" not in page

    dora, landed = oidc_sign_in(app, oidc, preferred_username="dora")
    assert landed.status_code == 302 and landed.headers["Location"] == "/queue"
    assert "Signed in as dora" in dora.text("/queue", **https)
    assert oidc.token_requests == 1

    for spoil in ("wrong-key", "wrong-audience"):
        oidc.spoil = spoil
        _, refused = oidc_sign_in(app, oidc, preferred_username="mallory")
        assert refused.status_code == 403, spoil
    oidc.spoil = None
    _, denied = oidc_sign_in(app, oidc)  # the provider said no
    assert denied.status_code == 403
    _, nameless = oidc_sign_in(app, oidc, preferred_username="not a name")
    assert nameless.status_code == 403
    # A callback nobody started (no state in the session) signs nobody in.
    forged = Person(app.test_client()).get("/oidc/callback?code=x&state=y", **https)
    assert forged.status_code == 403


# -- settings ---------------------------------------------------------------------------


def test_production_settings_are_checked():
    with pytest.raises(ConfigError) as caught:
        check(ConsoleConfig())
    problems = str(caught.value)
    for expected in ("no way to sign in", "no credential", "over TLS", "https://", "secret key"):
        assert expected in problems
    with pytest.raises(ConfigError, match="proxy addresses it is believed from"):
        check(ConsoleConfig(dev=True, proxy_header="X-WEBAUTH-USER"))
    check(ConsoleConfig(dev=True))  # development: anything goes


def test_the_command_refuses_to_start_in_production_without_settings(tmp_path):
    answer = subprocess.run(
        [str(BIN / "phonebind-console"), "--listen", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert answer.returncode == 2
    assert "refusing to start" in answer.stderr and "over TLS" in answer.stderr
    bad = subprocess.run(
        [str(BIN / "phonebind-console"), "--dev", "--trusted-proxies", "10.0.0.0/33"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert bad.returncode == 2 and "not an address or CIDR block" in bad.stderr


def test_two_reviewers_when_the_policy_asks_for_them(database_url, tmp_path, clock, secrets_seen):
    running = start_phonebind(
        database_url,
        tmp_path,
        clock,
        secrets_seen,
        env={"PHONEBIND_POLICY_LOST_PHONE_REVIEWERS": "2"},
    )
    running.api = app_api(running)
    try:
        rebind_id = lost_phone(running.api, "acct-two", "13800138571", "13900139571")
        app = dev_console(running)
        alice, bob = sign_in_dev(app, "alice"), sign_in_dev(app, "bob")
        page = f"/reviews/{rebind_id}"
        alice.submit(page, f"{page}/approve", {"note": "ID photo matches"})
        mine = alice.get(page).get_data(as_text=True)
        assert 'id="approved-by-me"' in mine and 'id="approve-form"' not in mine
        assert "Decision (1/2)" in page_text(mine)
        # Still in the queue, for someone else's approval.
        assert rebind_id in bob.text("/queue")
        again = alice.post(f"{page}/approve", {"csrf_token": alice.csrf(page), "note": ""})
        assert again.status_code == 303
        assert "ALREADY_APPROVED_BY_YOU" in alice.text(page)
        bob.submit(page, f"{page}/approve", {"note": ""})
        done = bob.text(page)
        assert "approved by console:alice" in done and "approved by console:bob" in done
        assert "Ready to complete" in done
        assert rebind_id not in alice.text("/queue")
    finally:
        running.stop()


def test_the_command_serves_the_console_beside_a_development_server(tmp_path, secrets_seen):
    """What `make console` starts: phonebind-console --dev against `make run`'s server."""
    (tmp_path / "var").mkdir()
    server = Serve(
        f"sqlite:///{tmp_path}/var/phonebind.db",
        tmp_path,
        f"{tmp_path}/var/sms.jsonl",
        secrets=secrets_seen,
    ).start()
    port = free_port()
    log_path = tmp_path / "console.log"
    secrets_seen.watch_log(log_path)
    with open(log_path, "w", encoding="utf-8") as log:
        console = subprocess.Popen(
            [
                str(BIN / "phonebind-console"),
                "--dev",
                "--target",
                server.address,
                "--listen",
                f"127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin"},
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return requests.get(url + "/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                assert console.poll() is None, log_path.read_text()
                return False

        wait_until(answers, 30, "the console answers")
        web = requests.Session()
        form = web.get(url + "/login", headers={"Accept-Language": "en"}, timeout=10)
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', form.text)
        assert token and "Development mode" in form.text
        queue = web.post(
            url + "/login",
            data={"csrf_token": token.group(1), "person": "dev"},
            headers={"Accept-Language": "en"},
            timeout=10,
        )
        assert queue.url == url + "/queue" and "Signed in as" in queue.text
        assert "Nothing here." in queue.text  # the queue came from phonebind
    finally:
        console.terminate()
        console.wait(30)
        server.kill()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    signed_in = [line for line in lines if line["message"] == "signed in"]
    assert [(line["person"], line["method"]) for line in signed_in] == [("dev", "dev")]
