"""Audit use cases outside a rebind's own unit of work: refusals, reading, verifying."""

from __future__ import annotations

from datetime import datetime

from .audit import AuditEvent, AuditTrail, ChainReport, StoredEvent, refusal_chain
from .errors import Reason, invalid
from .ports import Clock, Store
from .rebind import check_account_id

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50


class AuditLog:
    def __init__(self, store: Store, trail: AuditTrail, clock: Clock) -> None:
        self._store = store
        self._trail = trail
        self._clock = clock

    def refusal(self, reason: str, account_id: str, rebind_id: str, caller: str) -> None:
        """Records a refused call in a shared chain, in its own transaction."""
        event = AuditEvent("CALL_REFUSED", reason, account_id, rebind_id)
        with self._store.transaction() as tx:
            self._trail.append(tx, event, self._clock.now(), refusal_chain(caller + account_id))

    def events(
        self,
        *,
        account_id: str,
        rebind_id: str,
        action: str,
        since: datetime | None,
        until: datetime | None,
        page_size: int,
        after_seq: int | None,
    ) -> tuple[list[StoredEvent], int | None]:
        if page_size < 0:
            raise invalid(Reason.INVALID_ARGUMENT, "page_size", "page_size must not be negative")
        if account_id:
            check_account_id(account_id)
        for name, value in (("rebind_id", rebind_id), ("action", action)):
            # Printable only: PostgreSQL refuses NUL in a string outright.
            if len(value) > 64 or not value.isprintable():
                raise invalid(
                    Reason.INVALID_ARGUMENT, name, f"{name} must be at most 64 printable characters"
                )
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        rows = self._store.audit_events(
            account_id=account_id,
            rebind_id=rebind_id,
            action=action,
            since=since,
            until=until,
            after_seq=after_seq,
            limit=size + 1,
        )
        more = len(rows) > size
        rows = rows[:size]
        return rows, rows[-1].seq if more and rows else None

    def verify(self, account_id: str = "") -> ChainReport:
        if account_id:
            check_account_id(account_id)
        chains, account_ids = self._store.audit_snapshot(account_id or None)
        return self._trail.verify(chains, account_ids)
