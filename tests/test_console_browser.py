"""phonebind-console in a real browser: Debian's headless Chromium, driven by
selenium through chromedriver, against a real phonebind server (SQLite and
PostgreSQL) and the console served by waitress over HTTP.

Without chromium and chromedriver these tests fail, never skip:
scripts/install-browser.sh (run by `make test`) installs them.
PHONEBIND_CONSOLE_SCREENSHOTS=docs writes docs/console-queue.png and
docs/console-detail.png (`make console-screenshots`).
"""

from __future__ import annotations

import base64
import os
import pathlib
import shutil
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
import waitress
from console_support import (
    TOKENS,
    app_api,
    assert_nothing_secret,
    console_client,
    lost_phone,
    start_phonebind,
)
from phonebind_console import ConsoleConfig, create_app
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ready
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import make_server

from phonebind_client import ReviewState

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUMBERS = (
    "13800138601",
    "13900139601",
    "13800138602",
    "13900139602",
    "13800138603",
    "17000170603",
    "13800138604",
    "13900139604",
)


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver:"
            " run scripts/install-browser.sh (make test does)"
        )
    return chromium, driver


def start_chromium(language: str = "en") -> webdriver.Chrome:
    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace sandbox
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        # Nothing but this machine's loopback is ever resolved.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        f"--lang={language}",
    ):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"intl.accept_languages": language})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


class Browser:
    """One person's headless Chromium, pointed at the console."""

    def __init__(self, driver: webdriver.Chrome, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url
        self.pages: list[str] = []

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)
        self._keep()

    def _keep(self) -> None:
        self.pages += [self.driver.current_url, self.driver.page_source]

    def find(self, css: str):
        return WebDriverWait(self.driver, 10).until(
            ready.presence_of_element_located((By.CSS_SELECTOR, css))
        )

    def click(self, css: str) -> None:
        """Clicks and waits for the next page to load."""
        old = self.driver.find_element(By.TAG_NAME, "html")
        self.driver.find_element(By.CSS_SELECTOR, css).click()
        # While the old page goes, chromedriver may answer a question about its
        # node with an error other than "stale": asked again, it says stale.
        WebDriverWait(self.driver, 10, ignored_exceptions=(WebDriverException,)).until(
            ready.staleness_of(old)
        )
        self._keep()

    def text(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "body").text

    def sign_in(self, person: str) -> None:
        self.open("/queue")
        assert "/login" in self.driver.current_url
        self.find("#person").send_keys(person)
        self.click("#sign-in")
        assert self.find("#signed-in-as").text == person

    def screenshot(self, path: pathlib.Path) -> None:
        """The whole page, however long (Chrome DevTools' capture beyond the viewport)."""
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": 1280, "height": int(height), "scale": 1},
            },
        )
        path.write_bytes(base64.b64decode(shot["data"]))


class Served:
    """A WSGI application on a free loopback port, on a thread of its own."""

    def __init__(self, app, *, use_waitress: bool = True) -> None:
        if use_waitress:
            self.server = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
            port, self._stop = self.server.effective_port, self._close_waitress
            run = self.server.run
        else:
            self.server = make_server("127.0.0.1", 0, app, threaded=True)
            port, self._stop = self.server.server_port, self.server.shutdown
            run = self.server.serve_forever
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def _close_waitress(self) -> None:
        # The serving loop runs while any socket is open, browsers' idle
        # keep-alive connections too: close them all, on the loop's own thread.
        sockets = self.server._map

        def close_all() -> None:
            for channel in list(sockets.values()):
                channel.close()

        self.server.trigger.pull_trigger(close_all)
        self.server.task_dispatcher.shutdown()

    def stop(self) -> None:
        self._stop()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the server did not stop"


@pytest.fixture
def phonebind(database_url, tmp_path, clock, secrets_seen):
    running = start_phonebind(database_url, tmp_path, clock, secrets_seen)
    running.api = app_api(running)
    yield running
    running.stop()


@pytest.fixture
def console(phonebind) -> Iterator[Served]:
    config = ConsoleConfig(target=phonebind.target, token=TOKENS["console"], dev=True)
    served = Served(create_app(config))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def chromiums() -> Iterator[list[webdriver.Chrome]]:
    """Two browsers for the module's tests (starting one takes seconds)."""
    started = [start_chromium(), start_chromium()]
    yield started
    for driver in started:
        driver.quit()


@pytest.fixture
def browsers(console, chromiums) -> list[Browser]:
    """Two people's browsers, at the test's console, without an earlier test's
    cookies (a cookie is the host's, whatever the port)."""
    for driver in chromiums:
        driver.get(console.url + "/healthz")
        driver.delete_all_cookies()
    return [Browser(driver, console.url) for driver in chromiums]


def screenshot_dir(request, tmp_path) -> pathlib.Path:
    """docs/ when asked for (and on SQLite only), else the test's own folder."""
    wanted = os.environ.get("PHONEBIND_CONSOLE_SCREENSHOTS")
    if wanted and "sqlite" in request.node.name:
        return ROOT / wanted
    return tmp_path


def test_a_reviewer_signs_in_finds_opens_and_approves_and_the_flow_completes(
    phonebind, console, browsers, request, tmp_path
):
    api, clock = phonebind.api, phonebind.clock
    # A queue as a morning might hold it.
    rebind_id = lost_phone(api, "loan-20260301-0042", "13800138601", "13900139601")
    clock.advance(timedelta(minutes=7))
    waiting = lost_phone(
        api, "loan-20260301-0107", "13800138602", "13900139602", customer_done=False
    )
    clock.advance(timedelta(minutes=4))
    api.register("loan-20260228-0991", "13800138603")
    virtual = api.start("loan-20260228-0991", "17000170603")  # a virtual operator's range
    api.identity("loan-20260228-0991", virtual.rebind_id)
    clock.advance(timedelta(minutes=2))

    alice = browsers[0]
    alice.sign_in("alice")
    row = alice.find(f'#ready tr[data-rebind="{rebind_id}"]')
    assert "138****8601 → 139****9601" in row.text
    assert "OLD_PHONE_LOST" in row.text and "13m" in row.text
    assert alice.driver.find_elements(By.CSS_SELECTOR, f'#waiting tr[data-rebind="{waiting}"]')
    shots = screenshot_dir(request, tmp_path)
    alice.screenshot(shots / "console-queue.png")

    alice.click(f'#ready tr[data-rebind="{rebind_id}"] a')
    page = alice.text()
    assert "The user says the old phone is lost" in page
    assert "110***********002X" in page and "张*" in page
    assert "REBIND_STARTED" in page and "Code to the new number" in page
    alice.screenshot(shots / "console-detail.png")

    alice.find("#approve-note").send_keys("Called the customer back on the registered landline")
    alice.click("#approve")
    assert alice.find(".flash.done").text == "Approved."
    assert "approved by console:alice" in alice.find("#decision").text
    assert alice.find("#rebind-state").text == "Ready to complete"

    # The app completes the change over gRPC; the console shows it done.
    done = api.complete("loan-20260301-0042", rebind_id)
    assert done.account.phone_masked == "139****9601"
    alice.open(f"/reviews/{rebind_id}")
    assert alice.find("#rebind-state").text == "Completed"
    assert "REBIND_COMPLETED" in alice.find("#audit").text
    alice.open("/queue")
    assert rebind_id not in alice.text() and waiting in alice.text()
    assert_nothing_secret(alice.pages, *NUMBERS)


def test_a_rejection_with_a_note_and_the_second_reviewer_no_longer_sees_it(
    phonebind, console, browsers
):
    rebind_id = lost_phone(phonebind.api, "loan-r", "13800138604", "13900139604")
    alice, bob = browsers
    bob.sign_in("bob")
    bob.click(f'#ready tr[data-rebind="{rebind_id}"] a')  # bob has the case open

    alice.sign_in("alice")
    # Alice works in Chinese: the choice outlasts the page it was made on.
    alice.click('button[name="language"][value="zh-CN"]')
    assert "审核队列" in alice.text()
    alice.click(f'#ready tr[data-rebind="{rebind_id}"] a')
    assert "用户表示原手机号已丢失" in alice.text()
    alice.find("#reject-note").send_keys("客户无法说明借款用途")
    alice.click("#reject")
    assert alice.find(".flash.done").text == "已拒绝。"
    assert "拒绝人 console:alice" in alice.find("#decision").text
    assert "客户无法说明借款用途" in alice.find("#decision").text

    # Bob's open page is stale: approving it is refused, and the queue no longer has it.
    bob.click("#approve")
    assert "phonebind refused" in bob.find(".flash.error").text
    assert "rejected by console:alice" in bob.find("#decision").text
    assert bob.driver.find_elements(By.CSS_SELECTOR, "#approve-form") == []
    bob.open("/queue")
    assert bob.driver.find_elements(By.CSS_SELECTOR, f'tr[data-rebind="{rebind_id}"]') == []
    with console_client(phonebind) as pb:
        review = pb.get_review(rebind_id).rebind.review
    assert (review.state, review.reviewer, review.note) == (
        ReviewState.Value("REVIEW_STATE_REJECTED"),
        "console:alice",
        "客户无法说明借款用途",
    )
    assert_nothing_secret(alice.pages + bob.pages, *NUMBERS)


def forged_page(target: str):
    """Another site's page whose form posts to the console, without a CSRF token."""
    body = (
        "<!doctype html><title>win a prize</title>"
        f'<form method="post" action="{target}">'
        '<input type="hidden" name="note" value="forged">'
        '<button id="go" type="submit">claim</button></form>'
    ).encode()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [body]

    return app


def test_a_forged_form_post_without_the_csrf_token_is_refused(phonebind, console, browsers):
    rebind_id = lost_phone(phonebind.api, "loan-f", "13800138601", "13900139601")
    alice = browsers[0]
    alice.sign_in("alice")

    attacker = Served(forged_page(f"{console.url}/reviews/{rebind_id}/approve"), use_waitress=False)
    try:
        alice.driver.get(attacker.url)
        alice.click("#go")
    finally:
        attacker.stop()
    assert "The form was not sent from this page" in alice.find("#error").text

    # The console's own form with its token taken out is refused too.
    alice.open(f"/reviews/{rebind_id}")
    alice.driver.execute_script(
        "document.querySelector('#approve-form input[name=csrf_token]').remove()"
    )
    alice.click("#approve")
    assert "The form was not sent from this page" in alice.find("#error").text

    with console_client(phonebind) as pb:
        state = pb.get_review(rebind_id).rebind.review.state
    assert state == ReviewState.Value("REVIEW_STATE_PENDING")
    # With its token the same form goes through.
    alice.open(f"/reviews/{rebind_id}")
    alice.click("#approve")
    assert alice.find(".flash.done").text == "Approved."
