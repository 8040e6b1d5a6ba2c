"""Migration m0012 on a database that already holds an audit trail: the trail is
MAC'd again (covering seq, naming its key) and its chains are registered in the
order they began; a trail that does not verify is left alone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import test_review_migration
from test_review_migration import ACCOUNT, execute

from phonebind_server.cli import _in_store
from phonebind_server.config import load
from phonebind_server.domain.audit import AuditTrail, StoredEvent, account_chain, head_mac
from phonebind_server.store import migrate
from phonebind_server.store.fields import to_micros
from phonebind_server.store.migrate import MigrationError
from phonebind_server.store.migrations.m0012_audit_registry import _legacy_event_mac
from phonebind_server.store.store import Store

# A database with no tables at all (SQLite and PostgreSQL).
fresh_database = test_review_migration.fresh_database

EVENT = (
    "INSERT INTO audit_events (seq, chain_id, chain_seq, at, caller, rpc, request_id, action,"
    " outcome, account_id, rebind_id, details, prev_mac, mac)"
    " VALUES (%s, %s, %s, %s, 'kyc', '/rpc', 'r', %s, %s, %s, '', %s, %s, %s)"
)


def legacy_trail(url: str, keys, *, tamper: bool = False) -> None:
    """Schema 11 with an account's chain and a refusals chain, MAC'd as schema 11 did."""
    everything = migrate.available()
    migrate.available = lambda: [m for m in everything if m[0] <= 11]
    try:
        Store(url).migrate()
    finally:
        migrate.available = lambda: everything
    at = datetime(2026, 1, 1, tzinfo=UTC)
    statements = [(ACCOUNT, ("mg-1", "i1", "138****0001", to_micros(at), to_micros(at)))]
    heads = {}
    # (seq, chain, action, outcome): the refusals chain began first.
    events = [
        (1, "refusals:03", "CALL_REFUSED", "REBIND_NOT_FOUND"),
        (2, account_chain("mg-1"), "ACCOUNT_REGISTERED", "OK"),
        (3, account_chain("mg-1"), "REBIND_STARTED", "OK"),
        (4, "refusals:03", "CALL_REFUSED", "RESEND_TOO_SOON"),
    ]
    for seq, chain, action, outcome in events:
        chain_seq, prev = heads.get(chain, (0, ""))
        event = StoredEvent(
            seq,
            chain,
            chain_seq + 1,
            at + timedelta(seconds=seq),
            "kyc",
            "/rpc",
            "r",
            action,
            outcome,
            "mg-1",
            "",
            {"n": str(seq)},
            prev,
            "",
        )
        mac = _legacy_event_mac(keys.audit_key, event)
        details = json.dumps(event.details, separators=(",", ":"))
        if tamper and seq == 3:
            details = '{"n":"33"}'
        statements.append(
            (
                EVENT,
                (
                    seq,
                    chain,
                    chain_seq + 1,
                    to_micros(event.at),
                    action,
                    outcome,
                    "mg-1",
                    details,
                    prev,
                    mac,
                ),
            )
        )
        heads[chain] = (chain_seq + 1, mac)
    for chain, (chain_seq, last) in heads.items():
        mac = head_mac(keys.audit_key, chain, chain_seq, last)
        if chain.startswith("account:"):
            statements.append(
                (
                    "UPDATE accounts SET audit_seq = %s, audit_mac = %s, audit_head_mac = %s"
                    " WHERE account_id = 'mg-1'",
                    (chain_seq, last, mac),
                )
            )
        else:
            statements.append(
                (
                    "INSERT INTO audit_heads (chain_id, chain_seq, last_mac, mac)"
                    " VALUES (%s, %s, %s, %s)",
                    (chain, chain_seq, last, mac),
                )
            )
    execute(url, statements)


def verdict(url: str, keys):
    store = Store(url)
    trail = AuditTrail(keys.audit_keys, keys.audit_key_id)
    return _in_store(store, lambda: trail.verify(store.audit_snapshot()))


def registry(url: str) -> list[tuple[int, str]]:
    store = Store(url)
    snapshot = _in_store(store, store.audit_snapshot)
    return [(row.ordinal, row.chain_id) for row in snapshot.registry]


def dev_keys(url: str):
    return load({"dev": True, "database_url": url}, env={}, serving=False).keys()


def test_m0012_registers_and_macs_an_existing_trail_again(fresh_database):
    url = fresh_database
    keys = dev_keys(url)
    legacy_trail(url, keys)
    assert 12 in Store(url).migrate(lambda: (keys.audit_keys, keys.audit_key_id))
    report = verdict(url, keys)
    assert report.ok, report.problems
    assert (report.chains, report.events) == (2, 4)
    assert registry(url) == [(1, "refusals:03"), (2, "account:mg-1")]
    # Now seq is covered: swapping two events' seq is caught.
    execute(
        url,
        [
            ("UPDATE audit_events SET seq = -1 WHERE seq = 1", ()),
            ("UPDATE audit_events SET seq = 1 WHERE seq = 2", ()),
            ("UPDATE audit_events SET seq = 2 WHERE seq = -1", ()),
        ],
    )
    assert not verdict(url, keys).ok


def test_m0012_leaves_a_trail_that_does_not_verify_alone(fresh_database):
    url = fresh_database
    keys = dev_keys(url)
    legacy_trail(url, keys, tamper=True)
    with pytest.raises(MigrationError, match=r"does not verify under audit_key.*account:mg-1"):
        Store(url).migrate(lambda: (keys.audit_keys, keys.audit_key_id))
    assert 12 in Store(url).pending_migrations()


def test_m0012_on_an_existing_trail_needs_the_audit_key(fresh_database):
    url = fresh_database
    legacy_trail(url, dev_keys(url))
    with pytest.raises(MigrationError, match="needs audit_key"):
        Store(url).migrate()
    assert 12 in Store(url).pending_migrations()
