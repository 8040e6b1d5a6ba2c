"""What the domain needs from the outside world, as interfaces.

The store is a unit of work (`Store.transaction`) whose transaction (`Tx`)
holds one repository per aggregate. Repository reads return a `Read`: a
statement not yet run. `Tx.read(a, b, c)` runs several in one round trip to
the database, in order, and returns their results; writes (`add`, `save`, …)
run in order with the next read or the commit. A use case therefore shows
its round trips: one per `read` call, and one to commit.

Adapters live in phonebind_server.store and run on SQLite and PostgreSQL
alike; tests/fake_store.py is an in-memory one for the service-level tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar, overload

from .audit import AuditSnapshot, RegisteredChain, StoredEvent
from .context import CallContext
from .model import (
    Account,
    BindingChange,
    Challenge,
    CodeTarget,
    IdempotencyRecord,
    OutboundSms,
    Rebind,
    ReviewFacts,
)

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")
C = TypeVar("C")
D = TypeVar("D")


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class Conflict(Exception):
    """A uniqueness rule of the store refused a write (a concurrent writer won).

    `constraint` names the rule: "account_id", "phone", "open_rebind",
    "idempotency", "binding_change", "message". The transaction that raised it
    is rolled back.
    """

    def __init__(self, constraint: str) -> None:
        super().__init__(constraint)
        self.constraint = constraint


class StoreUnavailable(Exception):
    """The store cannot be reached, or a lock could not be had in time;
    nothing was written."""


class DeadlinePassed(StoreUnavailable):
    """Nothing was written: the caller stopped waiting before the unit of work
    could commit (or while it waited on a lock)."""


class Read(Generic[T]):
    """A read not yet run; `Tx.read` runs it. Opaque to the domain."""

    __slots__ = ()


class AccountRepository(Protocol):
    def get(self, account_id: str, *, lock: bool = False) -> Read[Account | None]: ...
    def owner_of(self, phone_indexes: Sequence[str]) -> Read[str | None]:
        """The account the number is bound to, by its index under any configured key."""
        ...

    def rehash_identity(
        self, account_id: str, *, old: tuple[str, str], new: tuple[str, str]
    ) -> None:
        """The account's name and ID-number hashes replaced by `new`, if they are
        still `old` (it needs no lock: a concurrent change of them wins)."""
        ...

    def of_rebind(self, rebind_id: str, *, lock: bool = False) -> Read[Account | None]:
        """The account a rebind belongs to (to lock it first when only the
        rebind is named)."""
        ...

    def add(self, account: Account) -> None: ...
    def save(self, account: Account) -> None: ...


class RebindRepository(Protocol):
    def get(self, rebind_id: str) -> Read[Rebind | None]: ...
    def open_of(self, account_id: str) -> Read[list[Rebind]]:
        """The account's rebinds in an open state (at most one, by a unique rule)."""
        ...

    def add(self, rebind: Rebind) -> None: ...
    def save(self, rebind: Rebind) -> None: ...
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
        """Rebinds needing review in `state` (PENDING, APPROVED, REJECTED), oldest
        first, with their accounts and the accounts' changes completed since
        each of `windows` (30 and 365 days back).

        PENDING leaves out what no reviewer can act on: expired rebinds, and
        those locked by `max_failures` wrong answers; `readiness` READY keeps
        those whose other steps are all done, WAITING those still waiting on
        the customer. `account_id`: only that account's."""
        ...

    def review(
        self, rebind_id: str, *, windows: tuple[datetime, datetime]
    ) -> Read[ReviewFacts | None]:
        """One rebind with the facts `reviews` gives."""
        ...


class CodeRepository(Protocol):
    """The one live code of each rebind and target (only its MAC is kept)."""

    def get(self, rebind_id: str, target: CodeTarget) -> Read[Challenge | None]: ...
    def save(self, challenge: Challenge) -> None: ...


class OutboxRepository(Protocol):
    def enqueue(self, message: OutboundSms) -> None:
        """Queued with the unit of work; delivered once it commits."""
        ...

    def sent_times(
        self, phone_indexes: Sequence[str], purpose: str, *, since: datetime
    ) -> Read[list[datetime]]:
        """When messages of `purpose` to the number (by its index under any
        configured key) were queued after `since`, oldest first."""
        ...

    def sent_times_to_code_number(
        self, target: CodeTarget, account_id: str, rebind_id: str, purpose: str, *, since: datetime
    ) -> Read[list[datetime]]:
        """`sent_times` of the number a code for `target` goes to (the account's
        bound number, or the rebind's new number), found from their rows by the
        statement itself: read with the rows, in the same round trip."""
        ...


class HistoryRepository(Protocol):
    """Completed number changes."""

    def add(self, change: BindingChange) -> None: ...
    def page(
        self, account_id: str, *, before_seq: int | None, limit: int
    ) -> Read[list[tuple[int, BindingChange]]]: ...
    def counts(self, account_id: str, *, since: Sequence[datetime]) -> Read[tuple[int, ...]]:
        """The account's changes completed at or after each of `since`, in one statement."""
        ...

    def released_by_other(
        self, phone_indexes: Sequence[str], *, account_id: str, since: datetime
    ) -> Read[bool]: ...


class LimitRepository(Protocol):
    """Counted events of the abuse limits."""

    def start_times(self, account_id: str, *, since: datetime) -> Read[list[datetime]]:
        """When the account's rebinds were started, or starts refused, after `since`."""
        ...

    def refused_start(self, account_id: str, at: datetime) -> None: ...
    def identity_failure(self, account_id: str, rebind_id: str, at: datetime) -> None: ...
    def identity_failure_times(
        self, account_id: str, *, since: datetime
    ) -> Read[list[datetime]]: ...
    def serialize(self, key: str) -> None:
        """Holds a lock on `key` until the transaction ends, across processes and
        hosts; reads after it see what earlier holders committed."""
        ...

    def serialize_code_number(
        self, target: CodeTarget, account_id: str, rebind_id: str
    ) -> Read[None]:
        """`serialize("sms-to:" + index)` of the number a code for `target` goes
        to (as `OutboxRepository.sent_times_to_code_number` finds it), as a read
        that goes out with the others: the reads after it see what earlier
        holders committed."""
        ...


class AuditRepository(Protocol):
    def head(self, chain_id: str) -> Read[tuple[int, str]]:
        """(last chain_seq, last MAC) of a chain, locked until the transaction
        ends; a new chain is (0, "")."""
        ...

    def next_seq(self, chain_id: str) -> Read[int]:
        """The global `seq` the next event appended to `chain_id` gets, taken
        while the chain's head is locked (so each chain's seqs only grow)."""
        ...

    def append(self, event: StoredEvent, head_mac: str) -> None:
        """Adds the event and moves its chain's head to it."""
        ...

    def register(self, row: RegisteredChain, head_mac: str) -> None:
        """Adds a chain to the chain registry and moves the registry's head to it
        (read and locked before with `head(REGISTRY)`)."""
        ...


class RequestRepository(Protocol):
    """Idempotency records of calls that carried a request_id (AIP-155)."""

    def get(
        self, operation: str, account_id: str, request_id: str
    ) -> Read[IdempotencyRecord | None]: ...
    def put(self, record: IdempotencyRecord) -> None: ...


class Tx(Protocol):
    """One unit of work: everything inside one database transaction.

    Row locks are taken in one order by every use case: the account first
    (every unit of work that writes anything of an account locks its row
    before anything else), then the audit chain's head. Another order can
    deadlock two use cases on one account on PostgreSQL.
    """

    call: CallContext
    accounts: AccountRepository
    rebinds: RebindRepository
    codes: CodeRepository
    outbox: OutboxRepository
    history: HistoryRepository
    limits: LimitRepository
    audit: AuditRepository
    requests: RequestRepository

    @overload
    def read(self, a: Read[A], /) -> tuple[A]: ...
    @overload
    def read(self, a: Read[A], b: Read[B], /) -> tuple[A, B]: ...
    @overload
    def read(self, a: Read[A], b: Read[B], c: Read[C], /) -> tuple[A, B, C]: ...
    @overload
    def read(self, a: Read[A], b: Read[B], c: Read[C], d: Read[D], /) -> tuple[A, B, C, D]: ...
    def read(self, *reads: Read[Any]) -> tuple[Any, ...]:
        """Runs the reads (and the writes queued before them) in one round trip."""
        ...

    def one(self, read: Read[T], /) -> T:
        """`read(r)[0]`."""
        ...

    def commit_even_if_caller_gone(self) -> None:
        """This unit of work commits although its caller stopped waiting: a
        counted wrong answer must stick, or a caller who gives up before the
        answer would guess for free. Without it, a unit of work whose caller's
        deadline passed before it could commit is rolled back (its caller
        cannot learn the outcome, so there must be none; a retry with the same
        request_id then does the work once)."""
        ...


class Store(Protocol):
    def transaction(self, call: CallContext, *, write: bool = True) -> AbstractContextManager[Tx]:
        """A unit of work: commits on normal exit, rolls back on an exception.
        A read-only one (`write=False`) sees committed data statement by statement."""
        ...

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
    ) -> list[StoredEvent]: ...

    def audit_snapshot(self, account_id: str | None = None) -> AuditSnapshot:
        """All chains (or one account's), the account ids and the chain registry,
        from one snapshot."""
        ...


class Outbox(Protocol):
    def wake(self) -> None:
        """New messages were committed: deliver them soon."""
        ...
