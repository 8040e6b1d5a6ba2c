"""What the domain needs from the outside world, as interfaces.

The store and the clock are injected; adapters live in phonebind_server.store
and are tested against these protocols on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Protocol

from .audit import StoredEvent
from .model import (
    Account,
    BindingChange,
    Challenge,
    CodeTarget,
    IdempotencyRecord,
    OutboundSms,
    Rebind,
)


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class Conflict(Exception):
    """A uniqueness rule of the store refused a write (a concurrent writer won).

    `constraint` names the rule: "account_id", "phone", "open_rebind",
    "idempotency". The transaction that raised it is rolled back.
    """

    def __init__(self, constraint: str) -> None:
        super().__init__(constraint)
        self.constraint = constraint


class StoreUnavailable(Exception):
    """The store cannot be reached; nothing was written."""


class DeadlinePassed(StoreUnavailable):
    """Nothing was written: the caller stopped waiting before the unit of work
    could commit (or while it waited on a lock)."""


# When the caller stops waiting (time.monotonic()), set by the rpc layer for each
# call that has a deadline. A unit of work not committed by then is rolled back:
# the caller cannot learn its outcome, so it must have none (a retry with the
# same request_id then does the work once). The exception: see
# Tx.commit_even_if_caller_gone.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "call_deadline", default=None
)


class Tx(Protocol):
    """One unit of work: every call inside one database transaction.

    Row locks (`lock=True`) are taken in one order by every use case: the
    account, then its rebinds, then the audit chain's head. Another order
    deadlocks against StartRebind on PostgreSQL.
    """

    def commit_even_if_caller_gone(self) -> None:
        """This unit of work commits although its caller stopped waiting (see
        call_deadline): a counted wrong answer must stick, or a caller who gives
        up before the answer would guess for free."""
        ...

    def get_account(self, account_id: str, *, lock: bool = False) -> Account | None: ...
    def account_id_for_phone(self, phone_index: str) -> str | None: ...
    def insert_account(self, account: Account) -> None: ...
    def update_account(self, account: Account) -> None: ...

    def get_rebind(self, rebind_id: str, *, lock: bool = False) -> Rebind | None: ...
    def open_rebinds(self, account_id: str) -> list[Rebind]: ...
    def insert_rebind(self, rebind: Rebind) -> None: ...
    def update_rebind(self, rebind: Rebind) -> None: ...
    def list_reviews(
        self,
        state: str,
        *,
        now: datetime,
        max_failures: int,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Rebind]:
        """Rebinds needing review in `state` (PENDING, APPROVED, REJECTED), oldest first.

        PENDING leaves out what no reviewer can act on: expired rebinds, and
        those locked by `max_failures` wrong answers."""
        ...

    def get_challenge(self, rebind_id: str, target: CodeTarget) -> Challenge | None: ...
    def save_challenge(self, challenge: Challenge) -> None: ...

    def insert_change(self, change: BindingChange) -> None: ...
    def list_changes(
        self, account_id: str, *, before_seq: int | None, limit: int
    ) -> list[tuple[int, BindingChange]]: ...
    def count_changes(self, account_id: str, *, since: Sequence[datetime]) -> tuple[int, ...]: ...
    def phone_released_by_other(
        self, phone_index: str, *, account_id: str, since: datetime
    ) -> bool: ...

    def enqueue_sms(self, message: OutboundSms) -> None: ...
    def sms_sent_times(self, phone_index: str, purpose: str, *, since: datetime) -> list[datetime]:
        """When messages of `purpose` to the number were queued since `since`, oldest first."""
        ...

    def start_times(self, account_id: str, *, since: datetime) -> list[datetime]:
        """When the account's rebinds were started, or refused as PHONE_IN_USE, since `since`."""
        ...

    def record_refused_start(self, account_id: str, at: datetime) -> None: ...
    def record_identity_failure(self, account_id: str, rebind_id: str, at: datetime) -> None: ...
    def identity_failure_times(self, account_id: str, *, since: datetime) -> list[datetime]: ...

    def lock_audit_head(self, chain_id: str) -> tuple[int, str]:
        """(last chain_seq, last MAC) of a chain, locked until the transaction ends."""
        ...

    def insert_audit(self, event: StoredEvent, head_mac: str) -> None: ...

    def serialize(self, key: str) -> None:
        """Holds a lock on `key` until the transaction ends, across processes and hosts."""
        ...

    def get_idempotency(
        self, operation: str, account_id: str, request_id: str
    ) -> IdempotencyRecord | None: ...
    def put_idempotency(self, record: IdempotencyRecord) -> None: ...


class Store(Protocol):
    def transaction(self, *, write: bool = True) -> AbstractContextManager[Tx]:
        """A unit of work; commits on normal exit, rolls back on an exception."""
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

    def audit_snapshot(
        self, account_id: str | None = None
    ) -> tuple[list[tuple[str, list[StoredEvent], tuple[int, str, str] | None]], list[str]]:
        """All chains (or one account's) and the account ids, from one snapshot."""
        ...


class Outbox(Protocol):
    def wake(self) -> None:
        """New messages were committed: deliver them soon."""
        ...
