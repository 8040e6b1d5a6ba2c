"""The chain registry, and event MACs that cover the global seq and name their key.

Existing events are MAC'd again under the configured audit key, so their
`seq` (the order ListAuditEvents shows) is covered too, and their chains are
registered in the order they began. Only a trail that verifies as it stands
is MAC'd again: MAC'ing a tampered trail anew would hide the tampering. A
database without audit events needs no key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import replace

from ...domain.audit import (
    REGISTRY,
    RegisteredChain,
    StoredEvent,
    account_chain,
    canonical_details,
    event_mac,
    head_mac,
    registry_mac,
)
from ..fields import from_micros
from ..migrate import MigrationError

NEEDS_AUDIT_KEY = True

STATEMENTS = [
    "ALTER TABLE audit_events ADD COLUMN key_id VARCHAR(32) NOT NULL DEFAULT ''",
    """CREATE TABLE audit_chains (
        ordinal BIGINT NOT NULL PRIMARY KEY,
        chain_id VARCHAR(80) NOT NULL UNIQUE,
        key_id VARCHAR(32) NOT NULL,
        prev_mac VARCHAR(64) NOT NULL,
        mac VARCHAR(64) NOT NULL
    )""",
]

_EVENTS = (
    "SELECT seq, chain_id, chain_seq, at, caller, rpc, request_id, action, outcome,"
    " account_id, rebind_id, details, prev_mac, mac FROM audit_events"
    " ORDER BY chain_id, chain_seq"
)


def _legacy_event_mac(key: bytes, event: StoredEvent) -> str:
    """An event's MAC as schema 11 made it: without seq or key id."""
    body = json.dumps(
        [
            event.chain_id,
            event.chain_seq,
            event.at.isoformat(),
            event.caller,
            event.rpc,
            event.request_id,
            event.action,
            event.outcome,
            event.account_id,
            event.rebind_id,
            canonical_details(event.details),
            event.prev_mac,
        ],
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return hmac.new(key, b"audit-event\x00" + body.encode(), hashlib.sha256).hexdigest()


def _legacy_problems(
    key: bytes,
    chains: dict[str, list[StoredEvent]],
    heads: dict[str, tuple[int, str, str]],
) -> list[str]:
    problems = []
    for chain_id in sorted(chains.keys() | heads.keys()):
        events = chains.get(chain_id, [])
        prev = ""
        for expected, event in enumerate(events, start=1):
            if event.chain_seq != expected or not hmac.compare_digest(event.prev_mac, prev):
                problems.append(f"{chain_id}: event #{expected} is missing or out of order")
                break
            if not hmac.compare_digest(event.mac, _legacy_event_mac(key, event)):
                problems.append(f"{chain_id}: event #{expected} was altered")
                break
            prev = event.mac
        else:
            head = heads.get(chain_id)
            if head is None:
                problems.append(f"{chain_id}: the chain has no head")
            elif (
                not hmac.compare_digest(head[2], head_mac(key, chain_id, head[0], head[1]))
                or head[0] != len(events)
                or not hmac.compare_digest(head[1], prev)
            ):
                problems.append(f"{chain_id}: the chain head does not match its events")
    return problems


def upgrade(db, dialect: str, audit_keys: Callable) -> None:
    for statement in STATEMENTS:
        db.execute_sql(statement)

    def run(sql: str, params: tuple) -> None:
        db.execute_sql(sql.replace("?", db.param), params)

    chains: dict[str, list[StoredEvent]] = {}
    for row in db.execute_sql(_EVENTS).fetchall():
        event = StoredEvent(
            *row[:3], from_micros(row[3]), *row[4:11], json.loads(row[11]), row[12], row[13]
        )
        chains.setdefault(event.chain_id, []).append(event)
    heads = {
        chain_id: (int(seq), last, mac)
        for chain_id, seq, last, mac in db.execute_sql(
            "SELECT chain_id, chain_seq, last_mac, audit_heads.mac FROM audit_heads"
        ).fetchall()
    }
    accounts = db.execute_sql(
        "SELECT account_id, audit_seq, audit_mac, audit_head_mac FROM accounts WHERE audit_seq > 0"
    ).fetchall()
    for account_id, seq, last, mac in accounts:
        heads[account_chain(account_id)] = (int(seq), last, mac)
    if not chains and not heads:
        return
    try:
        keys, key_id = audit_keys()
    except (ValueError, MigrationError) as error:  # the settings lack the key
        raise MigrationError(
            f"migration 12 MACs the existing audit trail again and needs audit_key: {error}"
        ) from None
    key = keys[key_id]
    problems = _legacy_problems(key, chains, heads)
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise MigrationError(
            "the audit trail does not verify under audit_key, so migration 12 will not"
            f" MAC it again: {shown}{more}"
        )
    # Chains register in the order they began: by their first event's seq.
    begun = sorted(chains, key=lambda chain_id: chains[chain_id][0].seq)
    account_heads = {account_chain(row[0]) for row in accounts}
    registry_mac_so_far = ""
    for ordinal, chain_id in enumerate(begun, start=1):
        prev = ""
        for event in chains[chain_id]:
            event = replace(event, key_id=key_id, prev_mac=prev)
            event = replace(event, mac=event_mac(key, event))
            run(
                "UPDATE audit_events SET key_id = ?, prev_mac = ?, mac = ? WHERE seq = ?",
                (key_id, event.prev_mac, event.mac, event.seq),
            )
            prev = event.mac
        count = len(chains[chain_id])
        new_head = head_mac(key, chain_id, count, prev)
        if chain_id in account_heads:
            run(
                "UPDATE accounts SET audit_mac = ?, audit_head_mac = ? WHERE account_id = ?",
                (prev, new_head, chain_id.removeprefix(account_chain(""))),
            )
        else:
            run(
                "UPDATE audit_heads SET last_mac = ?, mac = ? WHERE chain_id = ?",
                (prev, new_head, chain_id),
            )
        row = RegisteredChain(ordinal, chain_id, key_id, registry_mac_so_far, "")
        row = replace(row, mac=registry_mac(key, row))
        run(
            "INSERT INTO audit_chains (ordinal, chain_id, key_id, prev_mac, mac)"
            " VALUES (?, ?, ?, ?, ?)",
            (row.ordinal, row.chain_id, row.key_id, row.prev_mac, row.mac),
        )
        registry_mac_so_far = row.mac
    run(
        "INSERT INTO audit_heads (chain_id, chain_seq, last_mac, mac) VALUES (?, ?, ?, ?)",
        (
            REGISTRY,
            len(begun),
            registry_mac_so_far,
            head_mac(key, REGISTRY, len(begun), registry_mac_so_far),
        ),
    )
