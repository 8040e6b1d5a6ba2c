"""The tamper-evident audit trail: what it records, and that tampering is caught."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from datetime import UTC, timedelta

import grpc
import psycopg
import pytest
from support import NEW, error_details, sqlite_path

from phonebind.v1 import audit_service_pb2 as aapi
from phonebind.v1 import audit_service_pb2_grpc as aapi_grpc

BIN = os.path.dirname(sys.executable)
FLOW = [
    "ACCOUNT_REGISTERED",
    "REBIND_STARTED",
    "IDENTITY_VERIFIED",
    "CODE_SENT",
    "CODE_VERIFIED",
    "CODE_SENT",
    "CODE_VERIFIED",
    "REBIND_COMPLETED",
]


@pytest.fixture
def audit(server):
    return aapi_grpc.AuditServiceStub(server.channel)


def completed_flow(server, account_id: str, old: str, new: str):
    pb = server.api
    pb.register(account_id, old)
    rebind = pb.ready_rebind(account_id, old, new)
    return pb.complete(account_id, rebind.rebind_id, request_id="req-complete")


def test_a_flow_leaves_one_chained_event_per_step(server, audit):
    done = completed_flow(server, "au-1", "13800138601", "13900139601")
    events = audit.ListAuditEvents(aapi.ListAuditEventsRequest(account_id="au-1")).events
    assert [e.action for e in events] == FLOW
    assert [e.chain_seq for e in events] == list(range(1, len(FLOW) + 1))
    assert {e.chain_id for e in events} == {"account:au-1"}
    completed = events[-1]
    assert completed.rpc == "/phonebind.v1.BindingService/CompleteRebind"
    assert completed.request_id
    assert completed.caller
    # The cool-off after a change with the old phone in hand is 24 hours.
    hold_until = done.rebind.complete_time.ToDatetime(tzinfo=UTC) + timedelta(hours=24)
    assert dict(completed.details) == {
        "old_phone": "138****8601",
        "new_phone": "139****9601",
        "hold_until": hold_until.isoformat(),
    }
    text = str(events)
    for secret in ["13800138601", "13900139601", "11010519491231002X"]:
        assert secret not in text
    verdict = audit.VerifyAuditChain(aapi.VerifyAuditChainRequest())
    assert verdict.ok and verdict.problems == []
    assert verdict.events_checked == len(FLOW)


def test_failures_and_refusals_are_recorded(server, audit):
    pb = server.api
    pb.register("au-2", "13800138602")
    rebind = pb.start("au-2", "13900139602")
    pb.send("au-2", rebind.rebind_id, NEW)
    if pb.inbox.next_code("+8613900139602") != "000000":
        with pytest.raises(grpc.RpcError):
            pb.verify("au-2", rebind.rebind_id, NEW, "000000")
    with pytest.raises(grpc.RpcError):
        pb.send("au-2", rebind.rebind_id, NEW)  # too soon
    with pytest.raises(grpc.RpcError):
        pb.get_rebind("au-2", "rb_notmine")
    mismatch = audit.ListAuditEvents(
        aapi.ListAuditEventsRequest(account_id="au-2", action="CODE_MISMATCH")
    ).events
    assert [(e.outcome, e.details["failures"]) for e in mismatch] == [("CODE_MISMATCH", "1")]
    refused = audit.ListAuditEvents(aapi.ListAuditEventsRequest(action="CALL_REFUSED")).events
    assert [(e.outcome, e.account_id) for e in refused] == [
        ("RESEND_TOO_SOON", "au-2"),
        ("REBIND_NOT_FOUND", "au-2"),
    ]
    assert all(e.chain_id.startswith("refusals:") for e in refused)
    assert audit.VerifyAuditChain(aapi.VerifyAuditChainRequest()).ok


def test_audit_list_pages_and_rejects_foreign_tokens(server, audit):
    completed_flow(server, "au-3", "13800138603", "13900139603")
    seen, token = [], ""
    while True:
        page = audit.ListAuditEvents(
            aapi.ListAuditEventsRequest(account_id="au-3", page_size=3, page_token=token)
        )
        seen += [e.action for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert seen == FLOW
    first = audit.ListAuditEvents(aapi.ListAuditEventsRequest(account_id="au-3", page_size=3))
    with pytest.raises(grpc.RpcError) as caught:
        audit.ListAuditEvents(
            aapi.ListAuditEventsRequest(account_id="au-9", page_token=first.next_page_token)
        )
    assert error_details(caught.value)[1] == "INVALID_ARGUMENT"


def execute(server, sql: str | list[str]) -> None:
    """Statements run straight on the database, in one transaction."""
    statements = [sql] if isinstance(sql, str) else sql
    url = server.database_url
    if url.startswith("sqlite"):
        connection = sqlite3.connect(sqlite_path(url), isolation_level=None, timeout=10)
        try:
            connection.execute("BEGIN IMMEDIATE")
            for statement in statements:
                connection.execute(statement)
            connection.execute("COMMIT")
        finally:
            connection.close()
        return
    with psycopg.connect(url) as connection:
        for statement in statements:
            connection.execute(statement)


TAMPERING = {
    "edit": 'UPDATE audit_events SET details = \'{"new_phone":"139****0000"}\' '
    "WHERE chain_id = 'account:au-4' AND action = 'REBIND_COMPLETED'",
    "delete": "DELETE FROM audit_events WHERE chain_id = 'account:au-4' AND chain_seq = 3",
    "reorder": [
        f"UPDATE audit_events SET chain_seq = {a} "
        f"WHERE chain_id = 'account:au-4' AND chain_seq = {b}"
        for b, a in ((4, 1000), (5, 4), (1000, 5))
    ],
    "insert": "INSERT INTO audit_events (chain_id, chain_seq, at, caller, rpc, request_id, action, "
    "outcome, account_id, rebind_id, details, prev_mac, mac) "
    "SELECT chain_id, 9, at, caller, rpc, request_id, 'REVIEW_APPROVED', outcome, account_id, "
    "rebind_id, details, mac, mac FROM audit_events "
    "WHERE chain_id = 'account:au-4' AND chain_seq = 8",
    "truncate-tail": "DELETE FROM audit_events WHERE chain_id = 'account:au-4' AND chain_seq = 8",
    "drop-chain": "DELETE FROM audit_events WHERE chain_id = 'account:au-4'",
}


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_tampering_by_sql_is_detected(server, audit, how):
    completed_flow(server, "au-4", "13800138604", "13900139604")
    completed_flow(server, "au-5", "13800138605", "13900139605")
    assert audit.VerifyAuditChain(aapi.VerifyAuditChainRequest()).ok
    if how == "drop-chain":
        execute(server, "DELETE FROM audit_heads WHERE chain_id = 'account:au-4'")
    execute(server, TAMPERING[how])
    verdict = audit.VerifyAuditChain(aapi.VerifyAuditChainRequest())
    assert not verdict.ok
    assert all(p.startswith("account:au-4") for p in verdict.problems), verdict.problems
    # The untouched account's chain still verifies on its own.
    assert audit.VerifyAuditChain(aapi.VerifyAuditChainRequest(account_id="au-5")).ok
    assert not audit.VerifyAuditChain(aapi.VerifyAuditChainRequest(account_id="au-4")).ok


def test_audit_verify_command_exits_non_zero_on_tampering(server):
    completed_flow(server, "au-6", "13800138606", "13900139606")
    command = [
        os.path.join(BIN, "phonebind-server"),
        "audit",
        "verify",
        "--dev",
        "--database-url",
        server.database_url,
    ]
    clean = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("ok:")
    execute(server, TAMPERING["edit"].replace("au-4", "au-6"))
    broken = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1
    assert "BROKEN account:au-6" in broken.stdout
