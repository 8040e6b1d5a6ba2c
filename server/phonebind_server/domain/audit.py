"""The tamper-evident audit trail: what is recorded and how it is chained.

Every event belongs to one chain: an account's own chain for what happens to
that account, or one of a few shared chains for refused calls. Each event's
MAC covers its content, its global `seq` (the order ListAuditEvents shows),
its place in the chain and the previous event's MAC, keyed with the audit key
named by the event's key id, so editing, deleting, reordering or inserting an
event breaks the chain, and rewriting the chain needs the key. Chains are
independent, so accounts never wait on each other's audit writes. A head row
per chain (MAC'd too) records the last event, so deleting the newest events
is caught as well.

The set of chains is tamper-evident too: a chain's first event registers it
in the chain registry, whose rows are themselves MAC-chained in the order the
chains began, under a head of their own. Deleting a whole chain with its head
(a refusals chain, or an account with its row) leaves its registry row behind;
deleting that row too breaks the registry's chain or its head.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .ports import Tx

REFUSAL_SHARDS = 16
# The id of the chain registry's head among the heads of shared chains; no
# chain id has this form ("account:…", "refusals:NN").
REGISTRY = "registry"


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
    # The id of the audit key that made `mac` (and the head MAC while this is
    # the chain's last event).
    key_id: str = ""


@dataclass(frozen=True)
class RegisteredChain:
    """A chain's row in the registry: the `ordinal`th chain to begin."""

    ordinal: int
    chain_id: str
    key_id: str
    prev_mac: str
    mac: str


@dataclass
class AuditSnapshot:
    """What verifying reads, from one snapshot of the database."""

    # Each chain's events in chain order and its head (seq, last MAC, head MAC).
    chains: list[tuple[str, list[StoredEvent], tuple[int, str, str] | None]]
    account_ids: list[str]
    # The registry in ordinal order (one account's: only its chain's row).
    registry: list[RegisteredChain]
    registry_head: tuple[int, str, str] | None
    # Whether this is the whole trail (not one account's chain).
    whole: bool = True


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
            event.seq,
            event.key_id,
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
    return hmac.new(key, b"audit-event-v2\x00" + body.encode(), hashlib.sha256).hexdigest()


def head_mac(key: bytes, chain_id: str, chain_seq: int, last_mac: str) -> str:
    body = f"{chain_id}\x00{chain_seq}\x00{last_mac}".encode()
    return hmac.new(key, b"audit-head\x00" + body, hashlib.sha256).hexdigest()


def registry_mac(key: bytes, row: RegisteredChain) -> str:
    body = f"{row.ordinal}\x00{row.chain_id}\x00{row.key_id}\x00{row.prev_mac}".encode()
    return hmac.new(key, b"audit-chain\x00" + body, hashlib.sha256).hexdigest()


@dataclass
class ChainReport:
    chains: int = 0
    events: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(
    keys: Mapping[str, bytes],
    chain_id: str,
    events: list[StoredEvent],
    head: tuple[int, str, str] | None,
    report: ChainReport,
) -> None:
    """Checks one chain (events in chain_seq order) against its head row."""
    report.chains += 1
    report.events += len(events)
    prev = ""
    last_seq = 0
    key = b""
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
        if event.key_id not in keys:
            report.problems.append(
                f"{chain_id}: event #{expected_seq} was MAC'd with audit key"
                f" {event.key_id[:32]!r}, which is not configured"
            )
            return
        key = keys[event.key_id]
        if not hmac.compare_digest(event.mac, event_mac(key, event)):
            report.problems.append(f"{chain_id}: event #{expected_seq} was altered")
            return
        if event.seq <= last_seq:
            report.problems.append(f"{chain_id}: event #{expected_seq} is out of order (seq)")
            return
        prev, last_seq = event.mac, event.seq
    if head is None:
        report.problems.append(f"{chain_id}: the chain has no head")
        return
    head_seq, last_mac, mac = head
    if not events:
        report.problems.append(f"{chain_id}: the chain head says #{head_seq} but it has no events")
    elif not hmac.compare_digest(mac, head_mac(key, chain_id, head_seq, last_mac)):
        report.problems.append(f"{chain_id}: the chain head was altered")
    elif head_seq != len(events) or not hmac.compare_digest(last_mac, prev):
        report.problems.append(
            f"{chain_id}: the chain ends at #{len(events)} but its head says #{head_seq}"
        )


def verify_registry(
    keys: Mapping[str, bytes], snapshot: AuditSnapshot, report: ChainReport
) -> set[str]:
    """Checks the chain registry (the whole of it, or one account's row); the
    chain ids it vouches for."""
    registered: set[str] = set()
    prev = ""
    key = b""
    for position, row in enumerate(snapshot.registry, start=1):
        where = f"chain registry #{row.ordinal} ({row.chain_id})"
        if snapshot.whole and row.ordinal != position:
            report.problems.append(f"chain registry: chain #{position} is missing")
            return registered
        if snapshot.whole and not hmac.compare_digest(row.prev_mac, prev):
            report.problems.append(f"{where} does not follow its predecessor")
            return registered
        if row.key_id not in keys:
            report.problems.append(
                f"{where} was MAC'd with audit key {row.key_id[:32]!r}, which is not configured"
            )
            return registered
        key = keys[row.key_id]
        if not hmac.compare_digest(row.mac, registry_mac(key, row)):
            report.problems.append(f"{where} was altered")
            return registered
        registered.add(row.chain_id)
        prev = row.mac
    if not snapshot.whole:
        return registered
    head = snapshot.registry_head
    anything = snapshot.registry or snapshot.chains or snapshot.account_ids
    if head is None or head[0] == 0:
        if anything:
            report.problems.append("chain registry: it has no head")
        return registered
    count, last_mac, mac = head
    if not snapshot.registry:
        report.problems.append(f"chain registry: its head says {count} chains but it has none")
    elif not hmac.compare_digest(mac, head_mac(key, REGISTRY, count, last_mac)):
        report.problems.append("chain registry: its head was altered")
    elif count != len(snapshot.registry) or not hmac.compare_digest(last_mac, prev):
        report.problems.append(
            f"chain registry: it ends at #{len(snapshot.registry)} but its head says #{count}"
        )
    return registered


class AuditTrail:
    """Appends events inside the caller's transaction, and verifies chains.

    `keys`: the audit keys by id; new MACs use `active_key_id`'s, and every
    configured key is accepted when verifying."""

    def __init__(self, keys: Mapping[str, bytes], active_key_id: str) -> None:
        if active_key_id not in keys:
            raise ValueError("the active audit key id has no key")
        self._keys = dict(keys)
        self._key_id = active_key_id
        self._key = keys[active_key_id]

    def append(self, tx: Tx, event: AuditEvent, at: datetime, chain_id: str = "") -> None:
        """Appends `event`, by the unit of work's caller, to its account's chain
        (or to `chain_id`), in that unit of work. A chain's first event
        registers the chain."""
        call = tx.call
        chain = chain_id or account_chain(event.account_id)
        (last_seq, last_mac), seq = tx.read(tx.audit.head(chain), tx.audit.next_seq(chain))
        if last_seq == 0:
            self._register(tx, chain)
        stored = StoredEvent(
            seq=seq,
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
            key_id=self._key_id,
        )
        stored = replace(stored, mac=event_mac(self._key, stored))
        tx.audit.append(stored, head_mac(self._key, chain, stored.chain_seq, stored.mac))

    def _register(self, tx: Tx, chain_id: str) -> None:
        count, last_mac = tx.one(tx.audit.head(REGISTRY))
        row = RegisteredChain(count + 1, chain_id, self._key_id, last_mac, "")
        row = replace(row, mac=registry_mac(self._key, row))
        tx.audit.register(row, head_mac(self._key, REGISTRY, row.ordinal, row.mac))

    def verify(self, snapshot: AuditSnapshot) -> ChainReport:
        """Checks every chain and the registry: a registered chain that is gone,
        or an account without a chain, means one was deleted whole."""
        report = ChainReport()
        registered = verify_registry(self._keys, snapshot, report)
        # A broken registry is reported as such, not as every chain it no longer vouches for.
        registry_ok = not report.problems
        present = set()
        for chain_id, events, head in snapshot.chains:
            present.add(chain_id)
            verify_chain(self._keys, chain_id, events, head, report)
            if registry_ok and chain_id not in registered:
                report.problems.append(f"{chain_id}: the chain is not in the chain registry")
        for row in snapshot.registry:
            if row.chain_id not in present:
                report.problems.append(
                    f"{row.chain_id}: the chain is missing (registered as #{row.ordinal})"
                )
        for account_id in snapshot.account_ids:
            chain_id = account_chain(account_id)
            if chain_id not in present and chain_id not in registered:
                report.problems.append(f"{chain_id}: the chain is missing")
        return report
