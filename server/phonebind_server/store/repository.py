"""The store adapter: the domain's Store and Tx ports on Peewee.

Each domain use case runs in one `transaction()`, which is `db.atomic()`:
on SQLite a write transaction begins IMMEDIATE (takes the write lock up front,
so read-check-write sequences cannot interleave); on PostgreSQL rows read with
`lock=True` are taken FOR UPDATE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import peewee
import psycopg2
from playhouse.pool import MaxConnectionsExceeded

from ..domain.audit import StoredEvent, account_chain, canonical_details
from ..domain.model import (
    Account,
    BindingChange,
    Challenge,
    ChallengeState,
    CodeTarget,
    IdempotencyRecord,
    OutboundSms,
    Rebind,
    RebindState,
    RiskAssessment,
    RiskDecision,
    SealedPhone,
    Step,
)
from ..domain.pii import Vault
from ..domain.ports import Conflict, DeadlinePassed, StoreUnavailable, call_deadline
from .db import is_postgres, is_postgres_url, open_database
from .fields import from_micros, to_micros
from .migrate import history, migrate, pending
from .models import (
    ALL_MODELS,
    AccountRow,
    AuditEventRow,
    AuditHeadRow,
    BindingChangeRow,
    ChallengeRow,
    IdempotencyRow,
    IdentityFailureRow,
    RebindRow,
    RefusedStartRow,
    SmsOutboxRow,
)
from .silence import SilenceWatch
from .statements import Statements

log = logging.getLogger(__name__)

_OPEN = [s.value for s in RebindState if s.is_open]
_HAS_OPEN_REBIND = (
    "SELECT 1 FROM rebinds WHERE account_id = ? AND state IN ("  # noqa: S608  # nosec B608  # constants
    + ", ".join(f"'{state}'" for state in _OPEN)
    + ") LIMIT 1"
)
_UNAVAILABLE = (peewee.OperationalError, peewee.InterfaceError)
# PostgreSQL ended the statement because of other sessions (deadlock, lock or
# statement timeout, serialization failure): the database and the connection
# are fine, so this is no outage; the call answers STORE_UNAVAILABLE, retryable.
_CONTENTION_CODES = frozenset({"40P01", "40001", "55P03", "57014"})


def _contention(error: Exception) -> bool:
    cause = error.__cause__ or error.__context__
    return getattr(cause, "pgcode", None) in _CONTENTION_CODES


def _caller_gone(margin: float = 0.0) -> bool:
    deadline = call_deadline.get()
    return deadline is not None and time.monotonic() >= deadline - margin


_EXPIRE_UNSENT = (
    "UPDATE sms_outbox SET state = 'EXPIRED', text = '' "
    "WHERE state = 'PENDING' AND not_after IS NOT NULL AND not_after <= ? RETURNING seq"
)
# Leases the due messages in one statement: their next attempt moves to the
# lease's end, so no other claim takes them until it runs out.
_CLAIM_DUE = (
    "UPDATE sms_outbox SET next_attempt_at = ?, attempts = attempts + 1 WHERE seq IN ("
    "SELECT seq FROM sms_outbox WHERE state = 'PENDING' AND next_attempt_at <= ? "
    "AND (not_after IS NULL OR not_after > ?) ORDER BY next_attempt_at LIMIT ?{lock}) "
    "RETURNING seq, message_id, to_sealed, to_masked, purpose, text, attempts"
)


def _conflict_name(error: peewee.IntegrityError) -> str:
    text = str(error)
    for needle, name in (
        ("uq_accounts_phone", "phone"),
        ("accounts.phone_index", "phone"),
        ("accounts", "account_id"),
        ("uq_rebinds_open_account", "open_rebind"),
        ("rebinds.account_id", "open_rebind"),
        ("idempotency_keys", "idempotency"),
        ("binding_changes", "binding_change"),
    ):
        if needle in text:
            return name
    return "unknown"


def _steps(text: str) -> tuple[Step, ...]:
    return tuple(Step(s) for s in text.split(",") if s)


class PeeweeTx:
    """The domain's Tx port over the tables of models.py."""

    def __init__(self, db: peewee.Database, statements: Statements) -> None:
        self._db = db
        self._lock_rows = is_postgres(db)
        self._sql = statements
        self.keep_if_caller_gone = False

    def commit_even_if_caller_gone(self) -> None:
        self.keep_if_caller_gone = True

    def _select(self, model: type[peewee.Model], lock: bool) -> peewee.ModelSelect:
        query = model.select()
        return query.for_update() if lock and self._lock_rows else query

    # accounts

    def get_account(self, account_id: str, *, lock: bool = False) -> Account | None:
        row = self._sql.select_one(AccountRow, ("account_id",), (account_id,), lock=lock)
        return None if row is None else _account(row)

    def account_id_for_phone(self, phone_index: str) -> str | None:
        row = self._sql.select_one(
            AccountRow, ("phone_index",), (phone_index,), columns=("account_id",)
        )
        return None if row is None else row.account_id

    def insert_account(self, account: Account) -> None:
        self._sql.insert(AccountRow, _account_columns(account))

    def update_account(self, account: Account) -> None:
        columns = _account_columns(account)
        columns.pop("account_id")
        self._sql.update(AccountRow, ("account_id",), (account.account_id,), columns)

    # rebinds

    def get_rebind(self, rebind_id: str, *, lock: bool = False) -> Rebind | None:
        row = self._sql.select_one(RebindRow, ("rebind_id",), (rebind_id,), lock=lock)
        return None if row is None else _rebind(row)

    def open_rebinds(self, account_id: str) -> list[Rebind]:
        # Most accounts have none: a cheap existence check first.
        if not self._sql.fetch(_HAS_OPEN_REBIND, (account_id,)):
            return []
        query = self._select(RebindRow, True).where(
            (RebindRow.account_id == account_id) & (RebindRow.state.in_(_OPEN))
        )
        return [_rebind(row) for row in query]

    def insert_rebind(self, rebind: Rebind) -> None:
        self._sql.insert(RebindRow, _rebind_columns(rebind))

    def update_rebind(self, rebind: Rebind) -> None:
        columns = _rebind_columns(rebind)
        columns.pop("rebind_id")
        self._sql.update(RebindRow, ("rebind_id",), (rebind.rebind_id,), columns)

    def list_reviews(
        self,
        state: str,
        *,
        now: datetime,
        max_failures: int,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Rebind]:
        needs_review = RebindRow.required_steps.contains(Step.REVIEW.value)
        reviewed = RebindRow.completed_steps.contains(Step.REVIEW.value)
        if state == "PENDING":
            where = (
                needs_review
                & ~reviewed
                & RebindRow.state.in_(_OPEN)
                & (RebindRow.expires_at > now)
                & (RebindRow.failures < max_failures)
            )
        elif state == "APPROVED":
            where = needs_review & reviewed
        else:
            where = needs_review & (RebindRow.state == RebindState.REJECTED.value)
        query = RebindRow.select().where(where)
        if after is not None:
            created, rebind_id = after
            query = query.where(
                (RebindRow.created_at > created)
                | ((RebindRow.created_at == created) & (RebindRow.rebind_id > rebind_id))
            )
        query = query.order_by(RebindRow.created_at, RebindRow.rebind_id).limit(limit)
        return [_rebind(row) for row in query]

    # challenges

    def get_challenge(self, rebind_id: str, target: CodeTarget) -> Challenge | None:
        row = self._sql.select_one(ChallengeRow, ("rebind_id", "target"), (rebind_id, target.value))
        if row is None:
            return None
        return Challenge(
            rebind_id=row.rebind_id,
            target=CodeTarget(row.target),
            code_mac=row.code_mac,
            state=ChallengeState(row.state),
            attempts=row.attempts,
            created_at=row.created_at,
            expires_at=row.expires_at,
            resend_at=row.resend_at,
        )

    def save_challenge(self, challenge: Challenge) -> None:
        columns = {
            "rebind_id": challenge.rebind_id,
            "target": challenge.target.value,
            "code_mac": challenge.code_mac,
            "state": challenge.state.value,
            "attempts": challenge.attempts,
            "created_at": challenge.created_at,
            "expires_at": challenge.expires_at,
            "resend_at": challenge.resend_at,
        }
        self._sql.upsert(ChallengeRow, ("rebind_id", "target"), columns)

    # history

    def insert_change(self, change: BindingChange) -> None:
        self._sql.insert(
            BindingChangeRow,
            {
                "rebind_id": change.rebind_id,
                "account_id": change.account_id,
                "old_phone_index": change.old_phone.index,
                "old_phone_sealed": change.old_phone.sealed,
                "old_phone_masked": change.old_phone.masked,
                "new_phone_index": change.new_phone.index,
                "new_phone_sealed": change.new_phone.sealed,
                "new_phone_masked": change.new_phone.masked,
                "old_phone_lost": change.old_phone_lost,
                "completed_at": change.completed_at,
            },
        )

    def list_changes(
        self, account_id: str, *, before_seq: int | None, limit: int
    ) -> list[tuple[int, BindingChange]]:
        query = BindingChangeRow.select().where(BindingChangeRow.account_id == account_id)
        if before_seq is not None:
            query = query.where(BindingChangeRow.seq < before_seq)
        rows = query.order_by(BindingChangeRow.seq.desc()).limit(limit)
        return [
            (
                row.seq,
                BindingChange(
                    rebind_id=row.rebind_id,
                    account_id=row.account_id,
                    old_phone=SealedPhone(
                        row.old_phone_index, row.old_phone_sealed, row.old_phone_masked
                    ),
                    new_phone=SealedPhone(
                        row.new_phone_index, row.new_phone_sealed, row.new_phone_masked
                    ),
                    old_phone_lost=bool(row.old_phone_lost),
                    completed_at=row.completed_at,
                ),
            )
            for row in rows
        ]

    def count_changes(self, account_id: str, *, since: Sequence[datetime]) -> tuple[int, ...]:
        # One statement for every window: one round trip instead of one per window.
        starts = [to_micros(start) for start in since]
        window = "COALESCE(SUM(CASE WHEN completed_at >= ? THEN 1 ELSE 0 END), 0)"
        counts = ", ".join([window] * len(starts))
        rows = self._sql.fetch(
            f"SELECT {counts} FROM binding_changes "  # noqa: S608  # nosec B608 - placeholders only
            "WHERE account_id = ? AND completed_at >= ?",
            (*starts, account_id, min(starts)),
        )
        return tuple(int(count) for count in rows[0])

    def phone_released_by_other(
        self, phone_index: str, *, account_id: str, since: datetime
    ) -> bool:
        return bool(
            self._sql.fetch(
                "SELECT 1 FROM binding_changes WHERE old_phone_index = ? AND account_id <> ? "
                "AND completed_at >= ? LIMIT 1",
                (phone_index, account_id, to_micros(since)),
            )
        )

    # outbox

    def enqueue_sms(self, message: OutboundSms) -> None:
        self._sql.insert(
            SmsOutboxRow,
            {
                "message_id": message.message_id,
                "to_index": message.to.index,
                "to_sealed": message.to.sealed,
                "to_masked": message.to.masked,
                "purpose": message.purpose,
                "text": message.sealed_text,
                "state": "PENDING",
                "attempts": 0,
                "created_at": message.created_at,
                "next_attempt_at": message.created_at,
                "not_after": message.not_after,
                "last_error": "",
                "account_id": message.account_id,
                "rebind_id": message.rebind_id,
            },
        )

    def _times(self, sql: str, params: tuple[object, ...]) -> list[datetime]:
        return [from_micros(row[0]) for row in self._sql.fetch(sql, params)]

    def sms_sent_times(self, phone_index: str, purpose: str, *, since: datetime) -> list[datetime]:
        return self._times(
            "SELECT created_at FROM sms_outbox WHERE to_index = ? AND purpose = ? "
            "AND created_at > ? ORDER BY created_at",
            (phone_index, purpose, to_micros(since)),
        )

    def start_times(self, account_id: str, *, since: datetime) -> list[datetime]:
        return self._times(
            "SELECT created_at AS at FROM rebinds WHERE account_id = ? AND created_at > ? "
            "UNION ALL "
            "SELECT refused_at FROM refused_starts WHERE account_id = ? AND refused_at > ? "
            "ORDER BY at",
            (account_id, to_micros(since), account_id, to_micros(since)),
        )

    def record_refused_start(self, account_id: str, at: datetime) -> None:
        self._sql.insert(RefusedStartRow, {"account_id": account_id, "refused_at": at})

    def record_identity_failure(self, account_id: str, rebind_id: str, at: datetime) -> None:
        self._sql.insert(
            IdentityFailureRow, {"account_id": account_id, "rebind_id": rebind_id, "failed_at": at}
        )

    def identity_failure_times(self, account_id: str, *, since: datetime) -> list[datetime]:
        return self._times(
            "SELECT failed_at FROM identity_failures WHERE account_id = ? AND failed_at > ? "
            "ORDER BY failed_at",
            (account_id, to_micros(since)),
        )

    def lock_audit_head(self, chain_id: str) -> tuple[int, str]:
        head = self._sql.select_one(AuditHeadRow, ("chain_id",), (chain_id,), lock=True)
        if head is None:  # a new chain: create its head, then lock it like any other
            self._sql.insert(
                AuditHeadRow,
                {"chain_id": chain_id, "chain_seq": 0, "last_mac": "", "mac": ""},
                ignore_conflict=True,
            )
            head = self._sql.select_one(AuditHeadRow, ("chain_id",), (chain_id,), lock=True)
        return head.chain_seq, head.last_mac

    def insert_audit(self, event: StoredEvent, head_mac: str) -> None:
        self._sql.insert_and_update(
            AuditEventRow,
            {
                "chain_id": event.chain_id,
                "chain_seq": event.chain_seq,
                "at": event.at,
                "caller": event.caller,
                "rpc": event.rpc,
                "request_id": event.request_id,
                "action": event.action,
                "outcome": event.outcome,
                "account_id": event.account_id,
                "rebind_id": event.rebind_id,
                "details": canonical_details(event.details),
                "prev_mac": event.prev_mac,
                "mac": event.mac,
            },
            AuditHeadRow,
            ("chain_id",),
            (event.chain_id,),
            {"chain_seq": event.chain_seq, "last_mac": event.mac, "mac": head_mac},
        )

    def serialize(self, key: str) -> None:
        # SQLite write transactions are already serial (BEGIN IMMEDIATE).
        if self._lock_rows:
            digest = hashlib.sha256(key.encode()).digest()
            self._db.execute_sql(
                "SELECT pg_advisory_xact_lock(%s)",
                (int.from_bytes(digest[:8], "big", signed=True),),
            )

    # idempotency

    def get_idempotency(
        self, operation: str, account_id: str, request_id: str
    ) -> IdempotencyRecord | None:
        row = self._sql.select_one(
            IdempotencyRow,
            ("operation", "account_id", "request_id"),
            (operation, account_id, request_id),
        )
        if row is None:
            return None
        return IdempotencyRecord(
            operation=row.operation,
            account_id=row.account_id,
            request_id=row.request_id,
            fingerprint=row.fingerprint,
            result=json.loads(row.result),
            created_at=row.created_at,
        )

    def put_idempotency(self, record: IdempotencyRecord) -> None:
        self._sql.insert(
            IdempotencyRow,
            {
                "operation": record.operation,
                "account_id": record.account_id,
                "request_id": record.request_id,
                "fingerprint": record.fingerprint,
                "result": json.dumps(record.result),
                "created_at": record.created_at,
            },
        )


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    message_id: str
    to_sealed: str
    to_masked: str
    purpose: str
    sealed_text: str
    attempts: int


class PeeweeStore:
    """Opens the database, binds the models and hands out units of work."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 32,
        lock_timeout: float = 10.0,
        statement_timeout: float | None = None,
    ) -> None:
        self.url = url
        self._lock_timeout = lock_timeout
        # 0: no limit (the command-line tools read whole tables).
        self._statement_timeout_ms = round((statement_timeout or 0) * 1000)
        # A server's statements are bounded on the client side too (see silence.py);
        # the command-line tools' long reads are not.
        self.silence = (
            SilenceWatch(statement_timeout) if statement_timeout and is_postgres_url(url) else None
        )
        self.db = open_database(
            url,
            max_connections=max_connections,
            lock_timeout=lock_timeout,
            cursor_factory=self.silence.cursor_factory() if self.silence else None,
        )
        self.db.bind(ALL_MODELS, bind_refs=False, bind_backrefs=False)
        self._postgres = is_postgres(self.db)
        self._statements = Statements(self.db)
        self._sqlite_writer = threading.Lock()
        # How often the store was found unreachable, and per thread the count its
        # connection has seen (see _connected).
        self._outages = 0
        self._seen = threading.local()
        # False while the last health check found the database unreachable: units
        # of work then fail at once instead of each waiting on it (see reachable).
        self._reachable = True
        self._ping_lock = threading.Lock()
        self._ping_connection: Any = None

    @property
    def dialect(self) -> str:
        return "postgresql" if self._postgres else "sqlite"

    def migrate(self) -> list[int]:
        with self._connected():
            return migrate(self.db)

    def pending_migrations(self) -> list[int]:
        with self._connected():
            return pending(self.db)

    def migration_history(self) -> list[tuple[int, str, datetime]]:
        with self._connected():
            return history(self.db)

    def close(self) -> None:
        if self.silence is not None:
            self.silence.stop()
        with self._ping_lock:
            self._close_ping_connection()
        if not self.db.is_closed():
            self.db.close()
        close_all = getattr(self.db, "close_all", None)
        if close_all is not None:
            close_all()

    def reachable(self, up: bool) -> None:
        """Told by the health check: False once a ping went unanswered past its
        deadline, True once one is answered. Meanwhile units of work answer
        STORE_UNAVAILABLE at once: a silent database would otherwise hold each
        call until its deadline, and its RPC thread with it. (A database that
        refuses connections fails calls at once by itself, and one that refuses
        only new ones still serves the connections the pool holds.)"""
        self._reachable = up

    @contextmanager
    def _connected(self, *, probe: bool = False) -> Iterator[None]:
        if not (probe or self._reachable):
            raise StoreUnavailable("the database did not answer the last health check")
        try:
            if self._postgres and getattr(self._seen, "outages", self._outages) != self._outages:
                # The database was unreachable since this thread's pooled connection
                # was last used, so it may be dead: check it in, and the pool tests it
                # (SELECT 1) before handing it out, instead of a call failing on it.
                self._drop_connection()
            self.db.connect(reuse_if_open=True)
            self._seen.outages = self._outages
            yield
        except MaxConnectionsExceeded as error:
            raise StoreUnavailable("no free database connection") from error
        except _UNAVAILABLE as error:
            if not _contention(error):
                self._outages += 1
                self._drop_connection()
            elif _caller_gone(margin=0.05):  # a lock wait cut at the caller's deadline
                raise DeadlinePassed(type(error).__name__) from error
            raise StoreUnavailable(type(error).__name__) from error

    def _drop_connection(self) -> None:
        try:
            if not self.db.is_closed():
                self.db.close()
        except Exception:
            log.debug("closing a broken connection failed", exc_info=True)

    @contextmanager
    def transaction(self, *, write: bool = True, snapshot: bool = False) -> Iterator[PeeweeTx]:
        """A unit of work. Reads (`write=False`) run in autocommit: each of their
        statements sees committed data, and they skip BEGIN/COMMIT round trips;
        `snapshot=True` reads everything from one consistent snapshot instead."""
        with self._connected():
            if not write and not snapshot:
                yield PeeweeTx(self.db, self._statements)
                return
            if snapshot:
                options = {"isolation_level": "REPEATABLE READ"} if self._postgres else {}
            else:
                options = {} if self._postgres else {"lock_type": "IMMEDIATE"}
            # SQLite has one writer at a time. Threads of this process queue on a
            # lock, which hands over at once, instead of on SQLite's busy handler,
            # which sleeps in growing steps (1 ms ... 100 ms) between retries.
            serial = self._serial_writer() if write and not self._postgres else nullcontext()
            try:
                with serial, self.db.atomic(**options):
                    if self._postgres:
                        self._bound_waits()
                    tx = PeeweeTx(self.db, self._statements)
                    yield tx
                    if _caller_gone() and not tx.keep_if_caller_gone:
                        raise DeadlinePassed("the caller stopped waiting; rolled back")
            except peewee.IntegrityError as error:
                raise Conflict(_conflict_name(error)) from error

    def _lock_wait(self) -> float:
        """How long this unit of work may wait on a lock, in seconds: the lock
        timeout, or less when the caller stops waiting sooner."""
        deadline = call_deadline.get()
        if deadline is None:
            return self._lock_timeout
        return max(0.001, min(self._lock_timeout, deadline - time.monotonic()))

    def _bound_waits(self) -> None:
        # Per transaction (SET LOCAL), not per connection: it follows each
        # call's deadline, and works behind a transaction-pooling PgBouncer.
        self.db.execute_sql(
            "SELECT set_config('lock_timeout', %s, true),"
            " set_config('statement_timeout', %s, true)",
            (f"{max(1, round(self._lock_wait() * 1000))}ms", f"{self._statement_timeout_ms}ms"),
        )

    @contextmanager
    def _serial_writer(self) -> Iterator[None]:
        # Bounded like the wait on SQLite's own lock: a writer stuck behind a
        # lock held elsewhere must not hold every other writer forever.
        if not self._sqlite_writer.acquire(timeout=self._lock_wait()):
            gone = DeadlinePassed if _caller_gone() else StoreUnavailable
            raise gone("waited too long for the write lock")
        try:
            yield
        finally:
            self._sqlite_writer.release()

    def ping(self, timeout: float | None = None) -> bool:
        """Whether the database answers, within `timeout` seconds (and the
        silence watch's grace) when given."""
        bound = call_deadline.set(None if timeout is None else time.monotonic() + timeout)
        try:
            if self._postgres:
                return self._ping_postgresql()
            with self._connected(probe=True):
                self.db.execute_sql("SELECT 1")
            return True
        except StoreUnavailable:
            return False
        finally:
            call_deadline.reset(bound)

    def _ping_postgresql(self) -> bool:
        # On a connection of its own, outside the pool: peewee opens pooled
        # connections one at a time under a lock, and a ping connecting to a
        # database that does not answer would hold that lock for connect_timeout
        # against every RPC thread, again and again while the outage lasts.
        with self._ping_lock:
            # The kept connection may have died alone (an idle-session timeout, a
            # pooler restart): then a fresh one decides.
            for _ in range(1 if self._ping_connection is None else 2):
                try:
                    if self._ping_connection is None or self._ping_connection.closed:
                        self._ping_connection = psycopg2.connect(
                            dbname=self.db.database, **self.db.connect_params
                        )
                        self._ping_connection.autocommit = True
                    with self._ping_connection.cursor() as cursor:
                        cursor.execute("SELECT 1")
                    return True
                except psycopg2.Error:
                    self._close_ping_connection()
                    if _caller_gone():  # it did not answer in time: no second try
                        break
        self._outages += 1  # pooled connections are tested before their next use
        return False

    def _close_ping_connection(self) -> None:
        connection, self._ping_connection = self._ping_connection, None
        if connection is not None and not connection.closed:
            connection.close()

    # -- outbox dispatcher --------------------------------------------------------

    def claim_sms(
        self, now: datetime, *, limit: int, lease: timedelta, expire: bool = True
    ) -> list[OutboxItem]:
        """Takes due messages for delivery by leasing them for `lease`.

        A code past its not_after is never taken; with `expire` such messages are
        also marked EXPIRED and their text erased (the loop does this; the express
        deliveries of fresh messages skip the extra statement).

        On PostgreSQL concurrent dispatchers skip each other's rows (FOR UPDATE
        SKIP LOCKED); on SQLite the immediate transaction serialises them.
        """
        micros = to_micros(now)
        with self.transaction() as tx:
            sql = tx._sql
            if expire:
                sql.fetch(_EXPIRE_UNSENT, (micros,))
            rows = sql.fetch(
                _CLAIM_DUE.format(lock=" FOR UPDATE SKIP LOCKED" if self._postgres else ""),
                (to_micros(now + lease), micros, micros, limit),
            )
            # RETURNING gives no order: oldest first, as they were queued.
            return [OutboxItem(*row) for row in sorted(rows)]

    def mark_sms_sent(self, seq: int, now: datetime) -> None:
        with self.transaction() as tx:
            # The text (which may hold a code) is erased once delivered.
            tx._sql.update(
                SmsOutboxRow,
                ("seq",),
                (seq,),
                {"state": "SENT", "sent_at": now, "text": "", "last_error": ""},
            )

    def mark_sms_failed(self, seq: int, error: str, *, retry_at: datetime | None) -> None:
        with self.transaction():
            if retry_at is None:
                SmsOutboxRow.update(state="DEAD", text="", last_error=error[:256]).where(
                    SmsOutboxRow.seq == seq
                ).execute()
            else:
                SmsOutboxRow.update(next_attempt_at=retry_at, last_error=error[:256]).where(
                    SmsOutboxRow.seq == seq
                ).execute()

    def outbox_pending(self) -> int:
        with self.transaction(write=False):
            return SmsOutboxRow.select().where(SmsOutboxRow.state == "PENDING").count()

    def outbox_stats(self, now: datetime) -> tuple[int, float]:
        """(messages pending, age in seconds of the oldest of them).

        For the metrics endpoint, whose every scrape runs on a new thread: the
        connection goes back to the pool at once, or each scrape would keep one.
        """
        try:
            with self.transaction(write=False):
                count, oldest = (
                    SmsOutboxRow.select(
                        peewee.fn.COUNT(SmsOutboxRow.seq), peewee.fn.MIN(SmsOutboxRow.created_at)
                    )
                    .where(SmsOutboxRow.state == "PENDING")
                    .tuples()
                    .get()
                )
        finally:
            self._drop_connection()
        if not count:
            return 0, 0.0
        # MIN() of the column comes back converted by the column's own field.
        return count, max(0.0, (now - oldest).total_seconds())

    # -- key rotation ------------------------------------------------------------------

    SEALED_COLUMNS = (
        (AccountRow, "phone_sealed"),
        (RebindRow, "new_phone_sealed"),
        (BindingChangeRow, "old_phone_sealed"),
        (BindingChangeRow, "new_phone_sealed"),
        (SmsOutboxRow, "to_sealed"),
        (SmsOutboxRow, "text"),
    )

    def reseal_batch(self, model: type[peewee.Model], column: str, vault: Vault, limit: int) -> int:
        """Re-encrypts up to `limit` values of one column under the active key.

        Each row is updated only if it still holds the value read, so a server
        writing at the same time never loses its write.
        """
        field = getattr(model, column)
        key = model._meta.primary_key
        prefix = vault.active_prefix
        with self.transaction():
            rows = list(
                model.select(key, field)
                # Sealed values under another key only: an erased outbox text is
                # empty, and one queued before texts were sealed is not sealed.
                .where(
                    (peewee.fn.SUBSTR(field, 1, len(vault.SEALED_PREFIX)) == vault.SEALED_PREFIX)
                    & (peewee.fn.SUBSTR(field, 1, len(prefix)) != prefix)
                )
                .order_by(key)
                .limit(limit)
                .tuples()
            )
            for row_key, value in rows:
                model.update({field: vault.reseal(value)}).where(
                    (key == row_key) & (field == value)
                ).execute()
        return len(rows)

    # -- audit reading (AuditService, `audit verify`) ------------------------------

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
        query = AuditEventRow.select()
        if account_id:
            query = query.where(AuditEventRow.account_id == account_id)
        if rebind_id:
            query = query.where(AuditEventRow.rebind_id == rebind_id)
        if action:
            query = query.where(AuditEventRow.action == action)
        if since is not None:
            query = query.where(AuditEventRow.at >= since)
        if until is not None:
            query = query.where(AuditEventRow.at < until)
        if after_seq is not None:
            query = query.where(AuditEventRow.seq > after_seq)
        with self.transaction(write=False):
            return [_audit(row) for row in query.order_by(AuditEventRow.seq).limit(limit)]

    def audit_snapshot(
        self, account_id: str | None = None
    ) -> tuple[list[tuple[str, list[StoredEvent], tuple[int, str, str] | None]], list[str]]:
        """Every chain (or one account's) with its events in chain order and its head
        (seq, last MAC, head MAC), and the account ids, all from one snapshot."""
        chain_ids = None if account_id is None else [account_chain(account_id)]
        accounts = AccountRow.select(AccountRow.account_id)
        if account_id is not None:
            accounts = accounts.where(AccountRow.account_id == account_id)
        with self.transaction(write=False, snapshot=True):
            account_ids = [row[0] for row in accounts.tuples()]
            heads_query = AuditHeadRow.select()
            events_query = AuditEventRow.select().order_by(
                AuditEventRow.chain_id, AuditEventRow.chain_seq
            )
            if chain_ids is not None:
                heads_query = heads_query.where(AuditHeadRow.chain_id.in_(chain_ids))
                events_query = events_query.where(AuditEventRow.chain_id.in_(chain_ids))
            heads = {h.chain_id: (h.chain_seq, h.last_mac, h.mac) for h in heads_query}
            chains: dict[str, list[StoredEvent]] = {chain: [] for chain in heads}
            for row in events_query:
                chains.setdefault(row.chain_id, []).append(_audit(row))
        ordered = [(chain, chains[chain], heads.get(chain)) for chain in sorted(chains)]
        return ordered, account_ids

    def prune_idempotency(self, before: datetime) -> int:
        with self.transaction():
            return IdempotencyRow.delete().where(IdempotencyRow.created_at < before).execute()


def _account_columns(account: Account) -> dict[str, object]:
    return {
        "account_id": account.account_id,
        "phone_index": account.phone.index,
        "phone_sealed": account.phone.sealed,
        "phone_masked": account.phone.masked,
        "holder_name_hash": account.holder_name_hash,
        "holder_name_masked": account.holder_name_masked,
        "id_number_hash": account.id_number_hash,
        "id_number_masked": account.id_number_masked,
        "id_province": account.id_province,
        "bound_at": account.bound_at,
        "hold_until": account.hold_until,
        "created_at": account.created_at,
        "rebind_locked_until": account.rebind_locked_until,
    }


def _account(row: AccountRow) -> Account:
    return Account(
        account_id=row.account_id,
        phone=SealedPhone(row.phone_index, row.phone_sealed, row.phone_masked),
        holder_name_hash=row.holder_name_hash,
        holder_name_masked=row.holder_name_masked,
        id_number_hash=row.id_number_hash,
        id_number_masked=row.id_number_masked,
        id_province=row.id_province,
        bound_at=row.bound_at,
        hold_until=row.hold_until,
        created_at=row.created_at,
        rebind_locked_until=row.rebind_locked_until,
    )


def _rebind_columns(rebind: Rebind) -> dict[str, object]:
    return {
        "rebind_id": rebind.rebind_id,
        "account_id": rebind.account_id,
        "state": rebind.state.value,
        "new_phone_index": rebind.new_phone.index,
        "new_phone_sealed": rebind.new_phone.sealed,
        "new_phone_masked": rebind.new_phone.masked,
        "old_phone_lost": rebind.old_phone_lost,
        "required_steps": ",".join(s.value for s in rebind.required),
        "completed_steps": ",".join(s.value for s in rebind.completed),
        "risk_decision": rebind.risk.decision.value,
        "risk_score": rebind.risk.score,
        "risk_reasons": ",".join(rebind.risk.reasons),
        "failures": rebind.failures,
        "created_at": rebind.created_at,
        "expires_at": rebind.expires_at,
        "updated_at": rebind.updated_at,
        "completed_at": rebind.completed_at,
        "reviewer": rebind.reviewer,
        "review_note": rebind.review_note,
        "reviewed_at": rebind.reviewed_at,
    }


def _rebind(row: RebindRow) -> Rebind:
    return Rebind(
        rebind_id=row.rebind_id,
        account_id=row.account_id,
        state=RebindState(row.state),
        new_phone=SealedPhone(row.new_phone_index, row.new_phone_sealed, row.new_phone_masked),
        old_phone_lost=bool(row.old_phone_lost),
        required=_steps(row.required_steps),
        completed=_steps(row.completed_steps),
        risk=RiskAssessment(
            decision=RiskDecision(row.risk_decision),
            score=row.risk_score,
            reasons=tuple(r for r in row.risk_reasons.split(",") if r),
        ),
        failures=row.failures,
        created_at=row.created_at,
        expires_at=row.expires_at,
        updated_at=row.updated_at,
        completed_at=row.completed_at,
        reviewer=row.reviewer,
        review_note=row.review_note,
        reviewed_at=row.reviewed_at,
    )


def _audit(row: AuditEventRow) -> StoredEvent:
    return StoredEvent(
        seq=row.seq,
        chain_id=row.chain_id,
        chain_seq=row.chain_seq,
        at=row.at,
        caller=row.caller,
        rpc=row.rpc,
        request_id=row.request_id,
        action=row.action,
        outcome=row.outcome,
        account_id=row.account_id,
        rebind_id=row.rebind_id,
        details=json.loads(row.details),
        prev_mac=row.prev_mac,
        mac=row.mac,
    )
