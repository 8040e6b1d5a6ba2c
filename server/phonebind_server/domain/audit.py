"""The tamper-evident audit trail: what is recorded and how it is chained.

Every event belongs to one chain: an account's own chain for what happens to
that account, or one of a few shared chains for refused calls. Each event's
MAC covers its content, its place in the chain and the previous event's MAC,
keyed with the audit key, so editing, deleting, reordering or inserting an
event breaks the chain, and rewriting the chain needs the key. Chains are
independent, so accounts never wait on each other's audit writes. A head row
per chain (MAC'd too) records the last event, so deleting the newest events
is caught as well.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .ports import Tx

REFUSAL_SHARDS = 16


@dataclass(frozen=True)
class AuditEvent:
    """One recorded fact. `details` hold masked values only."""

    action: str
    outcome: str = "OK"
    account_id: str = ""
    rebind_id: str = ""
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    chain_id: str
    chain_seq: int
    at: datetime
    caller: str
    rpc: str
    request_id: str
    action: str
    outcome: str
    account_id: str
    rebind_id: str
    details: dict[str, str]
    prev_mac: str
    mac: str


def account_chain(account_id: str) -> str:
    return f"account:{account_id}"


def refusal_chain(key: str) -> str:
    shard = int.from_bytes(hashlib.sha256(key.encode()).digest()[:2], "big") % REFUSAL_SHARDS
    return f"refusals:{shard:02d}"


def canonical_details(details: dict[str, str]) -> str:
    return json.dumps(details, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def event_mac(key: bytes, event: StoredEvent) -> str:
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


def head_mac(key: bytes, chain_id: str, chain_seq: int, last_mac: str) -> str:
    body = f"{chain_id}\x00{chain_seq}\x00{last_mac}".encode()
    return hmac.new(key, b"audit-head\x00" + body, hashlib.sha256).hexdigest()


@dataclass
class ChainReport:
    chains: int = 0
    events: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(
    key: bytes,
    chain_id: str,
    events: list[StoredEvent],
    head: tuple[int, str, str] | None,
    report: ChainReport,
) -> None:
    """Checks one chain (events in chain_seq order) against its head row."""
    report.chains += 1
    report.events += len(events)
    prev = ""
    for expected_seq, event in enumerate(events, start=1):
        if event.chain_seq != expected_seq:
            report.problems.append(
                f"{chain_id}: event #{expected_seq} is missing or out of order "
                f"(found #{event.chain_seq})"
            )
            return
        if not hmac.compare_digest(event.prev_mac, prev):
            report.problems.append(
                f"{chain_id}: event #{expected_seq} does not follow its predecessor"
            )
            return
        if not hmac.compare_digest(event.mac, event_mac(key, event)):
            report.problems.append(f"{chain_id}: event #{expected_seq} was altered")
            return
        prev = event.mac
    if head is None:
        report.problems.append(f"{chain_id}: the chain has no head")
        return
    head_seq, last_mac, mac = head
    if not hmac.compare_digest(mac, head_mac(key, chain_id, head_seq, last_mac)):
        report.problems.append(f"{chain_id}: the chain head was altered")
    elif head_seq != len(events) or not hmac.compare_digest(last_mac, prev):
        report.problems.append(
            f"{chain_id}: the chain ends at #{len(events)} but its head says #{head_seq}"
        )


class AuditTrail:
    """Appends events inside the caller's transaction, and verifies chains."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def append(self, tx: Tx, event: AuditEvent, at: datetime, chain_id: str = "") -> None:
        """Appends `event`, by the unit of work's caller, to its account's chain
        (or to `chain_id`), in that unit of work."""
        call = tx.call
        chain = chain_id or account_chain(event.account_id)
        last_seq, last_mac = tx.one(tx.audit.head(chain))
        stored = StoredEvent(
            seq=0,
            chain_id=chain,
            chain_seq=last_seq + 1,
            at=at,
            caller=call.caller,
            rpc=call.method,
            request_id=call.request_id,
            action=event.action,
            outcome=event.outcome,
            account_id=event.account_id,
            rebind_id=event.rebind_id,
            details=dict(event.details),
            prev_mac=last_mac,
            mac="",
        )
        stored = replace(stored, mac=event_mac(self._key, stored))
        tx.audit.append(stored, head_mac(self._key, chain, stored.chain_seq, stored.mac))

    def verify(
        self,
        chains: Iterable[tuple[str, list[StoredEvent], tuple[int, str, str] | None]],
        account_ids: Iterable[str] = (),
    ) -> ChainReport:
        """Checks every chain; an account without a chain means one was deleted whole."""
        report = ChainReport()
        seen = set()
        for chain_id, events, head in chains:
            seen.add(chain_id)
            verify_chain(self._key, chain_id, events, head, report)
        for account_id in account_ids:
            if account_chain(account_id) not in seen:
                report.problems.append(f"{account_chain(account_id)}: the chain is missing")
        return report
