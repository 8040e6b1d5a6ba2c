"""Audit use cases outside a rebind's own unit of work: refusals, reading, verifying."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from .audit import AuditEvent, AuditTrail, ChainReport, StoredEvent, refusal_chain
from .context import INTERNAL, CallContext
from .errors import Reason, invalid
from .ports import Clock, Store
from .rebind import check_account_id

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50


@dataclass
class _Window:
    started: datetime
    recorded: int = 0
    unrecorded: int = 0


class StrangerWindows:
    """How many refusals of unauthenticated calls are recorded one by one: `limit`
    a minute per source, and ten times that from all sources together. The rest
    are counted, and recorded as one CALLS_REFUSED event per source and minute,
    so that anyone who reaches the port cannot grow the audit trail (and take
    the write lock) at will, and every refused call is still accounted for.
    Each server process keeps its own count."""

    WINDOW = timedelta(minutes=1)
    # Beyond this many sources, or this many minutes waiting for their summary
    # (the store down), newcomers share one window.
    MAX_SOURCES = 10_000
    OVERFLOW = "(other sources)"

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._all_limit = 10 * limit
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._all: _Window | None = None  # every source's individual events this minute
        self._ended: dict[tuple[str, datetime], _Window] = {}  # over, to summarise

    def admit(self, source: str, now: datetime) -> bool:
        """Whether this refusal gets an event of its own; if not, it is counted."""
        with self._lock:
            window = self._windows.get(source)
            if window is None and len(self._windows) >= self.MAX_SOURCES:
                source = self.OVERFLOW
                window = self._windows.get(source)
            if window is not None and now >= window.started + self.WINDOW:
                self._end(source)
                window = None
            if window is None:
                window = self._windows[source] = _Window(now)
            if self._all is None or now >= self._all.started + self.WINDOW:
                self._all = _Window(now)
            if window.recorded < self._limit and self._all.recorded < self._all_limit:
                window.recorded += 1
                self._all.recorded += 1
                return True
            window.unrecorded += 1
            return False

    def closed(self, now: datetime, *, every: bool = False) -> list[tuple[str, _Window]]:
        """The windows that are over (`every`: all of them), forgotten; those
        with unrecorded refusals are returned for their summary."""
        with self._lock:
            for source in [
                s for s, w in self._windows.items() if every or now >= w.started + self.WINDOW
            ]:
                self._end(source)
            ended, self._ended = self._ended, {}
        return [(source, window) for (source, _), window in ended.items()]

    def waiting(self) -> list[tuple[str, int]]:
        """(source, refusals) of the windows that are over and not yet summarised."""
        with self._lock:
            return [(source, window.unrecorded) for (source, _), window in self._ended.items()]

    def unsummarised(self, windows: list[tuple[str, _Window]]) -> None:
        """Windows whose summary could not be written: kept for the next try."""
        with self._lock:
            for source, window in windows:
                self._keep(source, window)

    def _end(self, source: str) -> None:
        window = self._windows.pop(source)
        if window.unrecorded:
            self._keep(source, window)

    def _keep(self, source: str, window: _Window) -> None:
        if (source, window.started) not in self._ended and len(self._ended) >= self.MAX_SOURCES:
            source = self.OVERFLOW
        kept = self._ended.setdefault((source, window.started), _Window(window.started))
        kept.unrecorded += window.unrecorded


class AuditLog:
    def __init__(
        self, store: Store, trail: AuditTrail, clock: Clock, *, stranger_events_per_minute: int = 60
    ) -> None:
        self._store = store
        self._trail = trail
        self._clock = clock
        self._strangers = StrangerWindows(stranger_events_per_minute)

    def refusal(
        self, call: CallContext, reason: str, account_id: str, rebind_id: str, stranger: str = ""
    ) -> None:
        """Records a refused call in a shared chain, in its own transaction, whatever
        the caller's deadline. `stranger`: where an unauthenticated call came from
        (its IP address)."""
        now = self._clock.now()
        if stranger and not self._strangers.admit(stranger, now):
            return
        event = AuditEvent("CALL_REFUSED", reason, account_id, rebind_id)
        with self._store.transaction(call._replace(deadline=None)) as tx:
            self._trail.append(tx, event, now, refusal_chain(call.caller + account_id))

    def summarise_refusals(self, *, final: bool = False) -> int:
        """Records one CALLS_REFUSED event for each source and minute whose
        unauthenticated refusals went beyond those recorded one by one; how many.
        `final` (the server stops): the minutes still running too."""
        now = self._clock.now()
        windows = self._strangers.closed(now, every=final)
        call = INTERNAL._replace(caller="unauthenticated")
        written = 0
        try:
            for source, window in windows:
                event = AuditEvent(
                    "CALLS_REFUSED",
                    "UNAUTHENTICATED",
                    details={
                        "source": source,
                        "refusals": str(window.unrecorded),
                        "since": window.started.isoformat(),
                    },
                )
                with self._store.transaction(call) as tx:
                    self._trail.append(tx, event, now, refusal_chain(source))
                written += 1
        finally:
            # Kept for the next try (the store down); with `final` there is none.
            self._strangers.unsummarised(windows[written:])
        return written

    def unsummarised_refusals(self) -> list[tuple[str, int]]:
        """(source, refusals) whose summary could not be written yet; after a
        `final` summary, every count not in the audit trail."""
        return self._strangers.waiting()

    def events(
        self,
        call: CallContext,
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

    def verify(self, call: CallContext, account_id: str = "") -> ChainReport:
        if account_id:
            check_account_id(account_id)
        return self._trail.verify(self._store.audit_snapshot(account_id or None))
