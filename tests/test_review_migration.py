"""Migration m0009 on a database that already holds rebinds: the old number and
the approvals of earlier rebinds are filled in where they are known."""

from __future__ import annotations

import os
import secrets as pysecrets
import sqlite3
from datetime import UTC, timedelta
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
import pytest
from conftest import PG_ENV, start_server

from phonebind.v1 import review_service_pb2 as rapi
from phonebind.v1 import review_service_pb2_grpc as rapi_grpc
from phonebind_server.store import migrate
from phonebind_server.store.fields import to_micros
from phonebind_server.store.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_database(request, tmp_path):
    """A database with no tables at all."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/before.db"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"PostgreSQL tests skipped: {PG_ENV} is not set")
    name = f"phonebind_m0009_{os.getpid()}_{pysecrets.token_hex(4)}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield urlunsplit(urlsplit(base)._replace(path="/" + name))
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def execute(url: str, statements: list[tuple[str, tuple]]) -> None:
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            for sql, params in statements:
                connection.execute(sql.replace("%s", "?"), params)
        return
    with psycopg.connect(url, autocommit=True) as connection:
        for sql, params in statements:
            connection.execute(sql, params)


ACCOUNT = (
    "INSERT INTO accounts (account_id, phone_index, phone_sealed, phone_masked,"
    " holder_name_hash, holder_name_masked, id_number_hash, id_number_masked, id_province,"
    " bound_at, created_at) VALUES (%s, %s, 'sealed', %s, 'h', '张*', 'h',"
    " '110***********002X', '11', %s, %s)"
)
REBIND = (
    "INSERT INTO rebinds (rebind_id, account_id, state, new_phone_index, new_phone_sealed,"
    " new_phone_masked, old_phone_lost, required_steps, completed_steps, risk_decision,"
    " risk_score, risk_reasons, failures, created_at, expires_at, updated_at, reviewer,"
    " review_note, reviewed_at) VALUES (%s, %s, %s, %s, 'sealed', %s, TRUE,"
    " 'IDENTITY,NEW_PHONE_CODE,REVIEW', %s, 'REVIEW', 35, 'OLD_PHONE_LOST', 0, %s, %s, %s,"
    " %s, %s, %s)"
)
CHANGE = (
    "INSERT INTO binding_changes (rebind_id, account_id, old_phone_index, old_phone_sealed,"
    " old_phone_masked, new_phone_index, new_phone_sealed, new_phone_masked, old_phone_lost,"
    " completed_at) VALUES (%s, %s, 'i-old', 's', %s, 'i-new', 's', %s, TRUE, %s)"
)


def test_m0009_fills_in_what_earlier_rebinds_knew(
    fresh_database, tmp_path, clock, secrets_seen, monkeypatch
):
    url = fresh_database
    everything = migrate.available()
    monkeypatch.setattr(migrate, "available", lambda: [m for m in everything if m[0] <= 5])
    Store(url).migrate()
    monkeypatch.setattr(migrate, "available", lambda: everything)

    now = clock.now()
    t = to_micros(now - timedelta(minutes=5))
    later = to_micros(now + timedelta(minutes=25))
    execute(
        url,
        [
            (ACCOUNT, ("mg-open", "i1", "138****0001", t, t)),
            (ACCOUNT, ("mg-done", "i2", "139****0002", t, t)),
            # Open, approved by "ops-li" before approvals were kept.
            (
                REBIND,
                (
                    "rb_open",
                    "mg-open",
                    "READY",
                    "n1",
                    "139****0001",
                    "IDENTITY,NEW_PHONE_CODE,REVIEW",
                    t,
                    later,
                    t,
                    "ops-li",
                    "called back",
                    t,
                ),
            ),
            # Completed: its old number is the recorded change's.
            (
                REBIND,
                (
                    "rb_done",
                    "mg-done",
                    "COMPLETED",
                    "n2",
                    "139****0002",
                    "IDENTITY,NEW_PHONE_CODE,REVIEW",
                    t,
                    later,
                    t,
                    "ops-wu",
                    "",
                    t,
                ),
            ),
            (CHANGE, ("rb_done", "mg-done", "138****0002", "139****0002", t)),
            # Rejected, then the account moved on: no old number, no approval.
            (
                REBIND,
                (
                    "rb_gone",
                    "mg-done",
                    "REJECTED",
                    "n3",
                    "137****0003",
                    "IDENTITY",
                    t,
                    later,
                    t,
                    "ops-li",
                    "no",
                    t,
                ),
            ),
        ],
    )
    running = start_server(url, tmp_path, clock, secrets_seen)
    try:
        desk = rapi_grpc.ReviewServiceStub(running.channel)

        def case(rebind_id: str):
            return desk.GetReview(rapi.GetReviewRequest(rebind_id=rebind_id)).review

        opened = case("rb_open")
        assert opened.rebind.old_phone_masked == "138****0001"
        assert [(a.reviewer, a.note) for a in opened.rebind.review.approvals] == [
            ("ops-li", "called back")
        ]
        approved_at = opened.rebind.review.approvals[0].approve_time.ToDatetime(tzinfo=UTC)
        assert approved_at == now - timedelta(minutes=5)
        # Steps done before their times were kept have none.
        assert [s.HasField("complete_time") for s in opened.steps] == [False] * 3

        done = case("rb_done")
        assert done.rebind.old_phone_masked == "138****0002"
        assert [a.reviewer for a in done.rebind.review.approvals] == ["ops-wu"]

        gone = case("rb_gone")
        assert gone.rebind.old_phone_masked == ""
        assert list(gone.rebind.review.approvals) == []
        assert gone.rebind.review.reviewer == "ops-li"

        with pytest.raises(grpc.RpcError):
            case("rb_none")
    finally:
        running.stop()
