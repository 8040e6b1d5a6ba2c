"""An in-memory store for the service-level tests: the domain's ports without a database.

`FakeStore` is a unit of work over plain dictionaries. A transaction works on
a copy of the committed state and swaps it in on commit, so a refusal that is
rolled back leaves nothing behind, exactly as in the SQL stores. Uniqueness
rules are checked on commit and raise the domain's `Conflict` with the same
constraint names; a caller whose deadline passed gets `DeadlinePassed` unless
the unit of work asked to commit anyway. Reads are thunks run in order by
`Tx.read`, after the writes queued before them (which here apply at once).

What it does not model: row locks and parallel transactions (every unit of
work here runs alone) and statement counts. The end-to-end suite covers those
on SQLite and PostgreSQL.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from phonebind_server.domain.audit import (
    REGISTRY,
    AuditSnapshot,
    RegisteredChain,
    StoredEvent,
    account_chain,
)
from phonebind_server.domain.context import CallContext
from phonebind_server.domain.model import (
    OPEN_STATES,
    Account,
    BindingChange,
    Challenge,
    CodeTarget,
    IdempotencyRecord,
    OutboundSms,
    Rebind,
    RebindState,
    ReviewFacts,
    Step,
)
from phonebind_server.domain.ports import (
    AccountRepository,
    AuditRepository,
    CodeRepository,
    Conflict,
    DeadlinePassed,
    HistoryRepository,
    LimitRepository,
    OutboxRepository,
    Read,
    RebindRepository,
    RequestRepository,
    Store,
    Tx,
)

T = TypeVar("T")


class Thunk(Read[T], Generic[T]):
    """A read of the fake store: a function of the transaction's state."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[], T]) -> None:
        self.run = run


@dataclass
class Tables:
    """Everything the store keeps; entities are frozen, so a shallow copy of
    each collection is a snapshot."""

    accounts: dict[str, Account] = field(default_factory=dict)
    rebinds: dict[str, Rebind] = field(default_factory=dict)
    codes: dict[tuple[str, CodeTarget], Challenge] = field(default_factory=dict)
    outbox: list[OutboundSms] = field(default_factory=list)
    changes: list[tuple[int, BindingChange]] = field(default_factory=list)
    refused_starts: list[tuple[str, datetime]] = field(default_factory=list)
    identity_failures: list[tuple[str, str, datetime]] = field(default_factory=list)
    events: list[StoredEvent] = field(default_factory=list)
    # chain id -> (last chain_seq, last MAC, head MAC)
    heads: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    # The chain registry, in ordinal order.
    registry: list[RegisteredChain] = field(default_factory=list)
    requests: dict[tuple[str, str, str], IdempotencyRecord] = field(default_factory=dict)

    def snapshot(self) -> Tables:
        return Tables(**{name: copy.copy(value) for name, value in vars(self).items()})


def _changes_since(t: Tables, account_id: str, since: datetime) -> int:
    return sum(1 for _, c in t.changes if c.account_id == account_id and c.completed_at >= since)


class _Accounts:
    def __init__(self, t: Tables) -> None:
        self._t = t

    def get(self, account_id: str, *, lock: bool = False) -> Read[Account | None]:
        return Thunk(lambda: self._t.accounts.get(account_id))

    def owner_of(self, phone_indexes: Sequence[str]) -> Read[str | None]:
        def owner() -> str | None:
            found = (
                a.account_id for a in self._t.accounts.values() if a.phone.index in phone_indexes
            )
            return next(found, None)

        return Thunk(owner)

    def rehash_identity(
        self, account_id: str, *, old: tuple[str, str], new: tuple[str, str]
    ) -> None:
        account = self._t.accounts.get(account_id)
        if account is not None and (account.holder_name_hash, account.id_number_hash) == old:
            self._t.accounts[account_id] = account.with_changes(
                holder_name_hash=new[0], id_number_hash=new[1]
            )

    def of_rebind(self, rebind_id: str, *, lock: bool = False) -> Read[Account | None]:
        def account() -> Account | None:
            rebind = self._t.rebinds.get(rebind_id)
            return None if rebind is None else self._t.accounts.get(rebind.account_id)

        return Thunk(account)

    def add(self, account: Account) -> None:
        if account.account_id in self._t.accounts:
            raise Conflict("account_id")
        self._t.accounts[account.account_id] = account

    def save(self, account: Account) -> None:
        self._t.accounts[account.account_id] = account


class _Rebinds:
    def __init__(self, t: Tables) -> None:
        self._t = t

    def get(self, rebind_id: str) -> Read[Rebind | None]:
        return Thunk(lambda: self._t.rebinds.get(rebind_id))

    def open_of(self, account_id: str) -> Read[list[Rebind]]:
        return Thunk(
            lambda: [
                r
                for r in self._t.rebinds.values()
                if r.account_id == account_id and r.state in OPEN_STATES
            ]
        )

    def add(self, rebind: Rebind) -> None:
        if rebind.rebind_id in self._t.rebinds:
            raise Conflict("rebind_id")
        self._t.rebinds[rebind.rebind_id] = rebind

    def save(self, rebind: Rebind) -> None:
        self._t.rebinds[rebind.rebind_id] = rebind

    def _facts(self, rebind: Rebind, windows: tuple[datetime, datetime]) -> ReviewFacts:
        return ReviewFacts(
            rebind=rebind,
            account=self._t.accounts[rebind.account_id],
            changes_30_days=_changes_since(self._t, rebind.account_id, windows[0]),
            changes_365_days=_changes_since(self._t, rebind.account_id, windows[1]),
        )

    def reviews(
        self,
        state: str,
        *,
        readiness: str = "ANY",
        account_id: str = "",
        now: datetime,
        max_failures: int,
        windows: tuple[datetime, datetime],
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> Read[list[ReviewFacts]]:
        def wanted(r: Rebind) -> bool:
            if Step.REVIEW not in r.required:
                return False
            reviewed = Step.REVIEW in r.completed
            if state == "PENDING":
                ready = {
                    "ANY": r.state in OPEN_STATES,
                    "READY": r.state is RebindState.AWAITING_REVIEW,
                    "WAITING": r.state is RebindState.PENDING,
                }[readiness]
                keep = not reviewed and r.expires_at > now and r.failures < max_failures and ready
            elif state == "APPROVED":
                keep = reviewed
            else:
                keep = r.state is RebindState.REJECTED
            if account_id and r.account_id != account_id:
                return False
            return keep and (after is None or (r.created_at, r.rebind_id) > after)

        def run() -> list[ReviewFacts]:
            found = sorted(
                (r for r in self._t.rebinds.values() if wanted(r)),
                key=lambda r: (r.created_at, r.rebind_id),
            )
            return [self._facts(r, windows) for r in found[:limit]]

        return Thunk(run)

    def review(
        self, rebind_id: str, *, windows: tuple[datetime, datetime]
    ) -> Read[ReviewFacts | None]:
        def run() -> ReviewFacts | None:
            rebind = self._t.rebinds.get(rebind_id)
            return None if rebind is None else self._facts(rebind, windows)

        return Thunk(run)


class _Codes:
    def __init__(self, t: Tables) -> None:
        self._t = t

    def get(self, rebind_id: str, target: CodeTarget) -> Read[Challenge | None]:
        return Thunk(lambda: self._t.codes.get((rebind_id, target)))

    def save(self, challenge: Challenge) -> None:
        self._t.codes[(challenge.rebind_id, challenge.target)] = challenge


class _Outbox:
    def __init__(self, t: Tables) -> None:
        self._t = t

    def enqueue(self, message: OutboundSms) -> None:
        if any(m.message_id == message.message_id for m in self._t.outbox):
            raise Conflict("message")
        self._t.outbox.append(message)

    def sent_times(
        self, phone_indexes: Sequence[str], purpose: str, *, since: datetime
    ) -> Read[list[datetime]]:
        return Thunk(
            lambda: sorted(
                m.created_at
                for m in self._t.outbox
                if m.to.index in phone_indexes and m.purpose == purpose and m.created_at > since
            )
        )

    def sent_times_to_code_number(
        self, target: CodeTarget, account_id: str, rebind_id: str, purpose: str, *, since: datetime
    ) -> Read[list[datetime]]:
        def run() -> list[datetime]:
            index = _code_number(self._t, target, account_id, rebind_id)
            if index is None:
                return []
            return sorted(
                m.created_at
                for m in self._t.outbox
                if m.to.index == index and m.purpose == purpose and m.created_at > since
            )

        return Thunk(run)


def _code_number(t: Tables, target: CodeTarget, account_id: str, rebind_id: str) -> str | None:
    if target is CodeTarget.OLD_PHONE:
        account = t.accounts.get(account_id)
        return None if account is None else account.phone.index
    rebind = t.rebinds.get(rebind_id)
    return None if rebind is None else rebind.new_phone.index


class _History:
    def __init__(self, t: Tables) -> None:
        self._t = t

    def add(self, change: BindingChange) -> None:
        if any(c.rebind_id == change.rebind_id for _, c in self._t.changes):
            raise Conflict("binding_change")
        self._t.changes.append((len(self._t.changes) + 1, change))

    def page(
        self, account_id: str, *, before_seq: int | None, limit: int
    ) -> Read[list[tuple[int, BindingChange]]]:
        def run() -> list[tuple[int, BindingChange]]:
            mine = [
                (seq, c)
                for seq, c in reversed(self._t.changes)
                if c.account_id == account_id and (before_seq is None or seq < before_seq)
            ]
            return mine[:limit]

        return Thunk(run)

    def counts(self, account_id: str, *, since: Sequence[datetime]) -> Read[tuple[int, ...]]:
        return Thunk(lambda: tuple(_changes_since(self._t, account_id, s) for s in since))

    def released_by_other(
        self, phone_indexes: Sequence[str], *, account_id: str, since: datetime
    ) -> Read[bool]:
        return Thunk(
            lambda: any(
                c.old_phone.index in phone_indexes
                and c.account_id != account_id
                and c.completed_at >= since
                for _, c in self._t.changes
            )
        )


class _Limits:
    def __init__(self, t: Tables) -> None:
        self._t = t

    def start_times(self, account_id: str, *, since: datetime) -> Read[list[datetime]]:
        def run() -> list[datetime]:
            started = [
                r.created_at
                for r in self._t.rebinds.values()
                if r.account_id == account_id and r.created_at > since
            ]
            refused = [at for a, at in self._t.refused_starts if a == account_id and at > since]
            return sorted(started + refused)

        return Thunk(run)

    def refused_start(self, account_id: str, at: datetime) -> None:
        self._t.refused_starts.append((account_id, at))

    def identity_failure(self, account_id: str, rebind_id: str, at: datetime) -> None:
        self._t.identity_failures.append((account_id, rebind_id, at))

    def identity_failure_times(self, account_id: str, *, since: datetime) -> Read[list[datetime]]:
        return Thunk(
            lambda: sorted(
                at for a, _, at in self._t.identity_failures if a == account_id and at > since
            )
        )

    def serialize(self, key: str) -> None:
        """Units of work here run one at a time: nothing to wait for."""

    def serialize_code_number(
        self, target: CodeTarget, account_id: str, rebind_id: str
    ) -> Read[None]:
        return Thunk(lambda: None)


class _Audit:
    def __init__(self, t: Tables) -> None:
        self._t = t

    def head(self, chain_id: str) -> Read[tuple[int, str]]:
        def run() -> tuple[int, str]:
            seq, last, _ = self._t.heads.get(chain_id, (0, "", ""))
            return seq, last

        return Thunk(run)

    def next_seq(self, chain_id: str) -> Read[int]:
        return Thunk(lambda: len(self._t.events) + 1)

    def append(self, event: StoredEvent, head_mac: str) -> None:
        self._t.events.append(event)
        self._t.heads[event.chain_id] = (event.chain_seq, event.mac, head_mac)

    def register(self, row: RegisteredChain, head_mac: str) -> None:
        if any(r.ordinal == row.ordinal or r.chain_id == row.chain_id for r in self._t.registry):
            raise Conflict("audit_chains")
        self._t.registry.append(row)
        self._t.heads[REGISTRY] = (row.ordinal, row.mac, head_mac)


class _Requests:
    def __init__(self, t: Tables) -> None:
        self._t = t

    def get(
        self, operation: str, account_id: str, request_id: str
    ) -> Read[IdempotencyRecord | None]:
        return Thunk(lambda: self._t.requests.get((operation, account_id, request_id)))

    def put(self, record: IdempotencyRecord) -> None:
        key = (record.operation, record.account_id, record.request_id)
        if key in self._t.requests:
            raise Conflict("idempotency")
        self._t.requests[key] = record


class FakeTx:
    """One unit of work of the fake store. Implements domain.ports.Tx."""

    def __init__(self, call: CallContext, tables: Tables) -> None:
        self.call = call
        self.tables = tables
        self.keep_if_caller_gone = False
        self.accounts: AccountRepository = _Accounts(tables)
        self.rebinds: RebindRepository = _Rebinds(tables)
        self.codes: CodeRepository = _Codes(tables)
        self.outbox: OutboxRepository = _Outbox(tables)
        self.history: HistoryRepository = _History(tables)
        self.limits: LimitRepository = _Limits(tables)
        self.audit: AuditRepository = _Audit(tables)
        self.requests: RequestRepository = _Requests(tables)

    def read(self, *reads: Read[Any]) -> tuple[Any, ...]:
        results = []
        for read in reads:
            if not isinstance(read, Thunk):
                raise TypeError(f"not a read of this store: {read!r}")
            results.append(read.run())
        return tuple(results)

    def one(self, read: Read[T], /) -> T:
        return self.read(read)[0]  # type: ignore[no-any-return]

    def commit_even_if_caller_gone(self) -> None:
        self.keep_if_caller_gone = True


def _check_unique(t: Tables) -> None:
    """The uniqueness rules the SQL stores keep as constraints."""
    phones = [a.phone.index for a in t.accounts.values()]
    if len(phones) != len(set(phones)):
        raise Conflict("phone")
    open_accounts = [r.account_id for r in t.rebinds.values() if r.state in OPEN_STATES]
    if len(open_accounts) != len(set(open_accounts)):
        raise Conflict("open_rebind")


class FakeStore:
    """Implements domain.ports.Store in memory.

    `conflicts_before_commit` makes the next commits fail with those
    constraint names (a concurrent writer that won), one per commit.
    """

    def __init__(self) -> None:
        self.tables = Tables()
        self.commits = 0
        self.units: list[FakeTx] = []
        self.conflicts_before_commit: list[str] = []

    @contextmanager
    def transaction(self, call: CallContext, *, write: bool = True) -> Iterator[Tx]:
        tx = FakeTx(call, self.tables.snapshot())
        self.units.append(tx)
        # An exception out of the unit leaves self.tables as they were: a rollback.
        yield tx
        if write:
            if call.gone() and not tx.keep_if_caller_gone:
                raise DeadlinePassed("the caller stopped waiting before the commit")
            if self.conflicts_before_commit:
                raise Conflict(self.conflicts_before_commit.pop(0))
            _check_unique(tx.tables)
            self.tables = tx.tables
            self.commits += 1

    # -- the audit trail's reads ------------------------------------------------

    def audit_events(
        self,
        *,
        account_id: str = "",
        rebind_id: str = "",
        action: str = "",
        since: datetime | None = None,
        until: datetime | None = None,
        after_seq: int | None = None,
        limit: int = 100,
    ) -> list[StoredEvent]:
        found = [
            e
            for e in self.tables.events
            if (not account_id or e.account_id == account_id)
            and (not rebind_id or e.rebind_id == rebind_id)
            and (not action or e.action == action)
            and (since is None or e.at >= since)
            and (until is None or e.at < until)
            and (after_seq is None or e.seq > after_seq)
        ]
        return found[:limit]

    def audit_snapshot(self, account_id: str | None = None) -> AuditSnapshot:
        heads = dict(self.tables.heads)
        registry_head = heads.pop(REGISTRY, None)
        accounts = list(self.tables.accounts)
        registry = list(self.tables.registry)
        if account_id is not None:
            chain = account_chain(account_id)
            heads = {c: h for c, h in heads.items() if c == chain}
            accounts = [a for a in accounts if a == account_id]
            registry = [r for r in registry if r.chain_id == chain]
        chains: dict[str, list[StoredEvent]] = {c: [] for c in heads}
        for event in sorted(self.tables.events, key=lambda e: (e.chain_id, e.chain_seq)):
            if account_id is None or event.chain_id in chains:
                chains.setdefault(event.chain_id, []).append(event)
        return AuditSnapshot(
            chains=[(c, chains[c], heads.get(c)) for c in sorted(chains)],
            account_ids=accounts,
            registry=registry,
            registry_head=registry_head,
            whole=account_id is None,
        )


if TYPE_CHECKING:
    # `make lint` type-checks this file: the fake keeps up with the ports.
    def _implements_the_ports(store: FakeStore, tx: FakeTx) -> tuple[Store, Tx]:
        return store, tx
