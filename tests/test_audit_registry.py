"""The set of audit chains and the order of events are tamper-evident too:
deleting a whole chain (with its head, or with its account), or reordering the
global seq, is caught by VerifyAuditChain and `audit verify`."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from test_audit import completed_flow, execute

from phonebind.v1 import audit_service_pb2 as aapi
from phonebind.v1 import audit_service_pb2_grpc as aapi_grpc

BIN = os.path.dirname(sys.executable)


@pytest.fixture
def audit(server):
    return aapi_grpc.AuditServiceStub(server.channel)


def refused_call(server, account_id: str) -> None:
    with pytest.raises(grpc.RpcError):
        server.api.get_rebind(account_id, "rb_notmine")


def refusal_chains(audit) -> set[str]:
    events = audit.ListAuditEvents(aapi.ListAuditEventsRequest(action="CALL_REFUSED")).events
    return {e.chain_id for e in events}


def problems(audit) -> list[str]:
    verdict = audit.VerifyAuditChain(aapi.VerifyAuditChainRequest())
    assert verdict.ok == (not verdict.problems)
    return list(verdict.problems)


def command_verdict(server) -> subprocess.CompletedProcess:
    command = [os.path.join(BIN, "phonebind-server"), "audit", "verify", "--dev"]
    command += ["--database-url", server.database_url]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture
def trail(server, audit):
    """Two accounts' chains and a refusals chain, all verifying."""
    completed_flow(server, "ar-1", "13800138701", "13900139701")
    completed_flow(server, "ar-2", "13800138702", "13900139702")
    refused_call(server, "ar-1")
    assert problems(audit) == []
    (chain,) = refusal_chains(audit)
    return chain


def test_deleting_a_whole_refusals_chain_with_its_head_is_detected(server, audit, trail):
    execute(
        server,
        [
            f"DELETE FROM audit_events WHERE chain_id = '{trail}'",
            f"DELETE FROM audit_heads WHERE chain_id = '{trail}'",
        ],
    )
    found = problems(audit)
    assert any(p.startswith(f"{trail}: the chain is missing") for p in found), found
    result = command_verdict(server)
    assert result.returncode == 1
    assert f"BROKEN {trail}: the chain is missing" in result.stdout


def test_deleting_an_account_with_its_chain_is_detected(server, audit, trail):
    execute(
        server,
        [
            "DELETE FROM audit_events WHERE chain_id = 'account:ar-1'",
            "DELETE FROM accounts WHERE account_id = 'ar-1'",
        ],
    )
    found = problems(audit)
    assert any(p.startswith("account:ar-1: the chain is missing") for p in found), found
    # Asked about that account alone, the registry still names its chain.
    alone = audit.VerifyAuditChain(aapi.VerifyAuditChainRequest(account_id="ar-1"))
    assert not alone.ok
    assert audit.VerifyAuditChain(aapi.VerifyAuditChainRequest(account_id="ar-2")).ok


def test_deleting_a_chain_with_its_registry_row_breaks_the_registry(server, audit, trail):
    # ar-1's chain began first: its registry row is not the last one.
    execute(
        server,
        [
            "DELETE FROM audit_events WHERE chain_id = 'account:ar-1'",
            "DELETE FROM accounts WHERE account_id = 'ar-1'",
            "DELETE FROM audit_chains WHERE chain_id = 'account:ar-1'",
        ],
    )
    found = problems(audit)
    assert any(p.startswith("chain registry") for p in found), found


def test_deleting_the_newest_chain_with_its_registry_row_is_detected(server, audit, trail):
    # The refusals chain began last: deleting it and its row shortens the registry.
    execute(
        server,
        [
            f"DELETE FROM audit_events WHERE chain_id = '{trail}'",
            f"DELETE FROM audit_heads WHERE chain_id = '{trail}'",
            f"DELETE FROM audit_chains WHERE chain_id = '{trail}'",
        ],
    )
    assert "chain registry: it ends at #2 but its head says #3" in problems(audit)
    execute(server, "DELETE FROM audit_heads WHERE chain_id = 'registry'")
    assert "chain registry: it has no head" in problems(audit)


def test_reordering_seq_across_chains_is_detected(server, audit, trail):
    """Swapping the seq of two events of different chains keeps every chain's own
    order, but changes the order ListAuditEvents shows."""
    before = audit.ListAuditEvents(aapi.ListAuditEventsRequest(page_size=100)).events
    first = next(e for e in before if e.chain_id == "account:ar-1" and e.chain_seq == 8)
    second = next(e for e in before if e.chain_id == "account:ar-2" and e.chain_seq == 1)
    assert first.seq < second.seq
    execute(
        server,
        [
            f"UPDATE audit_events SET seq = -1 WHERE seq = {first.seq}",
            f"UPDATE audit_events SET seq = {first.seq} WHERE seq = {second.seq}",
            f"UPDATE audit_events SET seq = {second.seq} WHERE seq = -1",
        ],
    )
    after = audit.ListAuditEvents(aapi.ListAuditEventsRequest(page_size=100)).events
    assert [e.mac for e in after] != [e.mac for e in before]
    found = problems(audit)
    assert "account:ar-1: event #8 was altered" in found, found
    assert "account:ar-2: event #1 was altered" in found, found


def test_new_chains_after_deleting_the_registry_head_cannot_hide_it(server, audit, trail):
    """Without its head, the registry would start again at #1: the database refuses
    a second chain #1, so the tampering cannot be papered over by new chains."""
    execute(server, "DELETE FROM audit_heads WHERE chain_id = 'registry'")
    with pytest.raises(grpc.RpcError):
        server.api.register("ar-3", "13800138703")
    assert "chain registry: it has no head" in problems(audit)
