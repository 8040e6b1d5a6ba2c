"""Fixtures: a real server on a free port, on SQLite and on PostgreSQL.

PostgreSQL tests need PHONEBIND_TEST_DATABASE_URL (e.g.
postgresql://postgres@127.0.0.1:5432/test). Each run creates its own database
from it and drops it at the end; without the variable those tests are skipped
and say so.
"""

from __future__ import annotations

import logging
import os
import secrets as pysecrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
import pytest
from support import Api, FakeClock, Inbox, LogLines, LoopThread, Secrets, column_names, rows

from phonebind_server.app import App, create_server
from phonebind_server.config import load
from phonebind_server.store.store import Store

PG_ENV = "PHONEBIND_TEST_DATABASE_URL"
# The business state: a refused call must leave all of it unchanged.
STATE_TABLES = [
    "accounts",
    "rebinds",
    "challenges",
    "binding_changes",
    "sms_outbox",
    "idempotency_keys",
    "identity_failures",
    "refused_starts",
]
# The audit trail records refusals too, so it is not part of the snapshot.
TABLES = [*STATE_TABLES, "audit_events", "audit_heads", "audit_chains", "key_checks"]


# -- log capture: nothing secret may be logged ------------------------------------


_capture = LogLines()


def pytest_configure(config: pytest.Config) -> None:
    root = logging.getLogger()
    root.addHandler(_capture)
    root.setLevel(logging.DEBUG)
    config.addinivalue_line("markers", "postgres_only: needs PostgreSQL")


@pytest.fixture
def secrets_seen() -> Iterator[Secrets]:
    """Collects the test's secrets; afterwards, no log line may contain one."""
    seen = Secrets()
    start = len(_capture.lines)
    yield seen
    leaked = seen.leaked(_capture.lines[start:] + seen.log_lines())
    assert not leaked, f"a secret reached the logs: {leaked[0][:200]}"


# -- databases --------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    base = os.environ.get(PG_ENV)
    if not base:
        if os.environ.get("PHONEBIND_REQUIRE_POSTGRES"):
            pytest.fail(f"{PG_ENV} must be set when PHONEBIND_REQUIRE_POSTGRES is")
        pytest.skip(f"PostgreSQL tests skipped: {PG_ENV} is not set")
    name = f"phonebind_test_{os.getpid()}_{pysecrets.token_hex(4)}"
    admin = psycopg.connect(base, autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(base)
    url = urlunsplit(parts._replace(path="/" + name))
    Store(url).migrate()
    yield url
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def business_columns(url: str, table: str) -> list[str]:
    """The table's columns but the audit chain's head an account's row keeps
    (the audit trail records refusals too, so it is not business state)."""
    return [name for name in column_names(url, table) if not name.startswith("audit_")]


def business_rows(url: str, table: str) -> list[tuple]:
    selected = ", ".join(business_columns(url, table))
    return sorted(map(tuple, rows(url, f"SELECT {selected} FROM {table}")), key=repr)


def emptied(url: str) -> str:
    """The per-run PostgreSQL database at `url`, with every table emptied."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/phonebind.db"
    return emptied(request.getfixturevalue("postgres_url"))


# -- the server -------------------------------------------------------------------


@dataclass
class Served:
    """A server started from complete settings, on a loop thread of its own."""

    app: App
    loop: LoopThread

    def stop(self) -> None:
        self.loop.run(self.app.stop(grace=0))
        self.loop.close()


def serve(config, clock: FakeClock, gateway=None) -> Served:
    loop = LoopThread()
    try:
        app = loop.run(create_server(config, clock=clock, gateway=gateway, migrate=True))
    except BaseException:
        loop.close()
        raise
    return Served(app, loop)


@dataclass
class Running:
    app: App
    loop: LoopThread
    target: str
    channel: grpc.Channel
    api: Api
    inbox: Inbox
    clock: FakeClock
    secrets: Secrets
    database_url: str

    def stop(self) -> None:
        # The server first: that spares the channel's reconnect attempts.
        self.loop.run(self.app.stop(grace=0))
        self.loop.close()
        self.channel.close()

    def in_store(self, fn, *args, **kwargs):
        """Runs store code (`fn(*args)`) on the server's event loop, as the server would."""
        return self.loop.run(self.app.store.run(fn, *args, **kwargs))

    def on_loop(self, coroutine):
        return self.loop.run(coroutine)

    def wake_outbox(self) -> None:
        """The dispatcher's pass now, instead of at its next poll."""
        self.loop.loop.call_soon_threadsafe(self.app.dispatcher.wake_loop)

    def snapshot(self) -> dict[str, list[tuple]]:
        """Every row of every table, once the outbox has delivered what it can."""
        deadline = time.monotonic() + 10
        while self.in_store(self.app.store.outbox_pending) and time.monotonic() < deadline:
            time.sleep(0.01)
        return {table: business_rows(self.database_url, table) for table in STATE_TABLES}


def start_server(
    database_url: str,
    tmp_path,
    clock: FakeClock,
    secrets_seen: Secrets,
    env: dict[str, str] | None = None,
    gateway=None,
    **settings,
) -> Running:
    sms_path = str(tmp_path / "sms.jsonl")
    config = load(
        {
            "listen": "127.0.0.1:0",
            "database_url": database_url,
            "sms_gateway": f"file:{sms_path}",
            "dev": True,
            **settings,
        },
        env=env or {},
    )
    served = serve(config, clock, gateway)
    app, loop = served.app, served.loop
    target = f"127.0.0.1:{app.port}"
    channel = grpc.insecure_channel(target)
    if not config.tls_cert:  # a TLS server's tests open their own channels
        grpc.channel_ready_future(channel).result(timeout=10)
    inbox = Inbox(sms_path, secrets_seen)
    return Running(
        app,
        loop,
        target,
        channel,
        Api(channel, inbox, secrets_seen),
        inbox,
        clock,
        secrets_seen,
        database_url,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(
    database_url: str, tmp_path, clock: FakeClock, secrets_seen: Secrets
) -> Iterator[Running]:
    running = start_server(database_url, tmp_path, clock, secrets_seen)
    yield running
    running.stop()
