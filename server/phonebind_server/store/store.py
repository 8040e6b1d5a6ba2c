"""The store: opens the database named by a URL and hands out units of work.

`run(fn, *args)` runs synchronous store code (a use case, a tool's batch) on
the event loop; inside it, `transaction(call)` is the domain's unit of work.
Everything else here is what adapters outside the domain need: the outbox's
claims, the audit trail's reading, key rotation, housekeeping, health.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import peewee
from playhouse.pwasyncio import greenlet_spawn

from ..domain.audit import REGISTRY, AuditSnapshot, RegisteredChain, StoredEvent, account_chain
from ..domain.context import INTERNAL, CallContext
from ..domain.errors import DomainError
from ..domain.model import OutboundSms
from ..domain.pii import IndexedColumn, KeyCheck, SealedColumn, SealError, Vault
from ..domain.ports import DeadlinePassed, StoreUnavailable
from . import repositories  # noqa: F401 - the unit of work's repositories
from .engine import Answer, Engine, PostgresEngine, SqliteEngine, WriteLockBusy
from .migrate import AuditKeys, SealVault, history, migrate, pending
from .models import Tables, bind
from .query import Param, Query, values
from .unit import Compiler, SqlTx, every, value

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgres://", "postgresql://"))


def describe(url: str) -> str:
    """The URL without a password or query parameters (which may hold one), for logs."""
    url = url.split("?", 1)[0]
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return url


# The store's name (its Tables attribute) of each table that holds sealed values.
_SEALED_TABLES = {
    "accounts": "accounts",
    "rebinds": "rebinds",
    "binding_changes": "changes",
    "sms_outbox": "outbox",
}


def sqlite_path(url: str) -> str:
    return url[len("sqlite:///") :]


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    message_id: str
    to_sealed: str
    to_masked: str
    purpose: str
    sealed_text: str
    attempts: int
    # The W3C traceparent of the RPC that queued it, "" when untraced.
    trace_parent: str = ""
    # Its template, language and sealed parameters ("" when queued before templates).
    template: str = ""
    language: str = ""
    sealed_params: str = ""


def _claimed(o: Any) -> tuple[peewee.Field, ...]:
    """The outbox columns a claim returns, in OutboxItem's order."""
    return (
        o.seq,
        o.message_id,
        o.to_sealed,
        o.to_masked,
        o.purpose,
        o.text,
        o.attempts,
        o.trace_parent,
        o.template,
        o.language,
        o.params,
    )


def _item(row: tuple) -> OutboxItem:
    return OutboxItem(*row)


class Store:
    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 16,
        lock_timeout: float = 10.0,
        statement_timeout: float = 30.0,
        prepared_statements: bool = True,
        session_settings: bool = True,
    ) -> None:
        self.url = url
        self.engine: Engine
        if url.startswith("sqlite:///"):
            self.engine = SqliteEngine(sqlite_path(url), lock_timeout=lock_timeout)
            dialect_db: peewee.Database = peewee.SqliteDatabase(None)
        elif is_postgres_url(url):
            url = url.replace("postgres://", "postgresql://", 1)
            self.engine = PostgresEngine(
                url,
                max_connections=max_connections,
                lock_timeout=lock_timeout,
                statement_timeout=statement_timeout,
                prepared_statements=prepared_statements,
                session_settings=session_settings,
            )
            dialect_db = peewee.PostgresqlDatabase(None)
        else:
            raise ValueError("database URL must start with sqlite:/// or postgresql://")
        self.tables: Tables = bind(dialect_db)
        self._compile = Compiler(self.tables, row_locks=self.engine.row_locks)
        # False while the last health check found the database unreachable:
        # units of work then fail at once instead of each waiting on it.
        self._reachable = True
        # Messages committed by a unit of work, for the outbox to deliver.
        self.on_commit: Callable[[list[OutboundSms]], None] | None = None
        # Messages of a unit of work whose COMMIT got no answer (the database
        # went away meanwhile): they may have been committed, leased to this
        # process, which alone may deliver them before the lease runs out.
        self.on_commit_unknown: Callable[[list[OutboundSms]], None] | None = None
        # Told each time a connection is shut because the database went silent.
        self.on_connection_cut: Callable[[], None] | None = None
        self.engine.on_cut = lambda: self.on_connection_cut and self.on_connection_cut()
        # With tracing on: the tracer of store transactions' spans.
        self.tracer: Any = None
        # Statements and round trips by RPC, for the benchmark.
        self.statements: Counter[str] = Counter()
        self.round_trips: Counter[str] = Counter()

    @property
    def dialect(self) -> str:
        return self.engine.dialect

    # -- running store code ----------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs synchronous store code on the event loop (see engine.py)."""
        engine = self.engine
        if not isinstance(engine, SqliteEngine):
            return await greenlet_spawn(fn, *args, **kwargs)  # type: ignore[no-any-return]
        engine.busy_since = None
        engine.busy_sleep = 0.001
        while True:
            commits = engine.commits
            try:
                return fn(*args, **kwargs)
            except WriteLockBusy as busy:
                if engine.commits != commits:  # part of it is done: not twice
                    raise StoreUnavailable("waited too long for the write lock") from None
                await asyncio.sleep(busy.wait)

    def reachable(self, up: bool) -> None:
        """Told by the health check: False once a ping went unanswered past its
        deadline (a silent database), True once one is answered. A database
        that refuses new connections may still serve the open ones: calls try."""
        self._reachable = up

    def transaction(
        self, call: CallContext = INTERNAL, *, write: bool = True, snapshot: bool = False
    ) -> Transaction:
        """A unit of work (domain.ports.Store.transaction). Reads (`write=False`)
        run in autocommit, each statement seeing committed data; `snapshot`
        reads everything from one consistent snapshot instead. A unit of work
        whose caller's deadline passed before it could commit is rolled back."""
        return Transaction(self, call, write, snapshot)

    # -- schema ---------------------------------------------------------------------

    def _migration_database(self) -> peewee.Database:
        if isinstance(self.engine, SqliteEngine):
            database: peewee.Database = peewee.SqliteDatabase(
                self.engine.path, pragmas={"journal_mode": "wal", "busy_timeout": 60_000}
            )
        else:
            database = peewee.PostgresqlDatabase(
                self.url.replace("postgres://", "postgresql://", 1),
                prefer_psycopg3=True,
                connect_timeout=3,
            )
        return database

    def migrate(
        self, audit_keys: AuditKeys | None = None, vault: SealVault | None = None
    ) -> list[int]:
        """Applies pending migrations (on a connection of its own, synchronously:
        it runs at start and from the command line). `audit_keys()`: the audit
        keys by id and the active id, for a migration that MACs existing audit
        records; `vault()`: the seal keys, for one that reseals stored values."""
        database = self._migration_database()
        try:
            with _unreachable_as(StoreUnavailable):
                database.connect()
                return migrate(database, audit_keys, vault)
        finally:
            database.close()

    def pending_migrations(self) -> list[int]:
        database = self._migration_database()
        try:
            with _unreachable_as(StoreUnavailable):
                database.connect()
                return pending(database)
        finally:
            database.close()

    def migration_history(self) -> list[tuple[int, str, datetime]]:
        """(version, name, applied at) of every applied migration."""
        database = self._migration_database()
        try:
            with _unreachable_as(StoreUnavailable):
                database.connect()
                return history(database)
        finally:
            database.close()

    async def open(self) -> None:
        if isinstance(self.engine, PostgresEngine):
            await self.engine.open()

    async def close(self) -> None:
        await self.engine.close()

    async def ping(self, timeout: float) -> Answer:
        """How the database answers a ping within `timeout` seconds."""
        return await self.engine.ping(timeout)

    async def recovered(self) -> None:
        """The database answers again after an outage: connections kept from
        before it are tested before their next use."""
        await self.engine.recovered()

    # -- the outbox ------------------------------------------------------------------

    _EXPIRE = Query(
        "outbox.expire",
        lambda t: (
            t.outbox.update(
                {
                    t.outbox.state: Param("expired", t.outbox.state),
                    t.outbox.text: Param("erased", t.outbox.text),
                    t.outbox.params: Param("erased", t.outbox.params),
                }
            )
            .where(
                (t.outbox.state == "PENDING")
                & t.outbox.not_after.is_null(False)
                & (t.outbox.not_after <= Param("now"))
            )
            .returning(t.outbox.seq)
        ),
    )

    def _claim_query(self) -> Query:
        def build(t: Tables) -> peewee.Query:
            o = t.outbox
            due = (
                o.select(o.seq)
                .where(
                    (o.state == "PENDING")
                    & (o.next_attempt_at <= Param("now", o.next_attempt_at))
                    & (o.not_after.is_null() | (o.not_after > Param("now", o.not_after)))
                )
                .order_by(o.next_attempt_at)
                .limit(Param("limit"))
            )
            if self.engine.row_locks:
                due = due.for_update(skip_locked=True)
            return (
                o.update(
                    {
                        o.next_attempt_at: Param("lease_end", o.next_attempt_at),
                        o.attempts: o.attempts + 1,
                    }
                )
                .where(o.seq.in_(due))
                .returning(*_claimed(o))
            )

        return Query("outbox.claim", build)

    def _claim_one_query(self) -> Query:
        def build(t: Tables) -> peewee.Query:
            o = t.outbox
            return (
                o.update(
                    {
                        o.next_attempt_at: Param("lease_end", o.next_attempt_at),
                        o.attempts: o.attempts + 1,
                    }
                )
                .where(
                    (o.message_id == Param("message_id"))
                    & (o.state == "PENDING")
                    & (o.not_after.is_null() | (o.not_after > Param("now", o.not_after)))
                )
                .returning(*_claimed(o))
            )

        return Query("outbox.claim_one", build)

    def claim_sms_by_id(
        self, message_ids: Sequence[str], now: datetime, *, lease: timedelta
    ) -> list[OutboxItem]:
        """Takes the messages named, if they are in the outbox and still due,
        whatever their lease: for the process that queued them and holds it."""
        if not message_ids:
            return []
        query = self._claim_one_query()
        with self.transaction() as tx:
            found = tx.read(
                *(
                    tx_read(
                        query,
                        {"message_id": message_id, "now": now, "lease_end": now + lease},
                        every(_item),
                    )
                    for message_id in message_ids
                )
            )
        return sorted((item for items in found for item in items), key=lambda item: item.seq)

    def claim_sms(
        self, now: datetime, *, limit: int, lease: timedelta, expire: bool = True
    ) -> list[OutboxItem]:
        """Takes due messages for delivery by leasing them for `lease`.

        A code past its not_after is never taken; with `expire` such messages
        are also marked EXPIRED and their text erased. Concurrent dispatchers
        skip each other's rows (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite:
        the write lock serialises them)."""
        with self.transaction() as tx:
            reads = [
                tx_read(
                    self._claim_query(),
                    {"now": now, "limit": limit, "lease_end": now + lease},
                    every(_item),
                )
            ]
            if expire:
                reads.insert(
                    0,
                    tx_read(
                        self._EXPIRE,
                        {"now": now, "expired": "EXPIRED", "erased": ""},
                        every(lambda r: r),
                    ),
                )
            claimed = tx.read(*reads)[-1]
        # RETURNING gives no order: oldest first, as they were queued.
        return sorted(claimed, key=lambda item: item.seq)

    _MARK_SENT = Query(
        "outbox.mark_sent",
        lambda t: t.outbox.update(
            {
                t.outbox.state: Param("sent", t.outbox.state),
                t.outbox.sent_at: Param("sent_at", t.outbox.sent_at),
                t.outbox.text: Param("erased", t.outbox.text),
                t.outbox.params: Param("erased", t.outbox.params),
                t.outbox.last_error: Param("erased_error", t.outbox.last_error),
            }
        ).where(t.outbox.message_id == Param("message_id")),
    )
    _MARK_FAILED = Query(
        "outbox.mark_failed",
        lambda t: t.outbox.update(
            {
                t.outbox.next_attempt_at: Param("retry_at", t.outbox.next_attempt_at),
                t.outbox.last_error: Param("error", t.outbox.last_error),
            }
        ).where(t.outbox.message_id == Param("message_id")),
    )
    _MARK_DEAD = Query(
        "outbox.mark_dead",
        lambda t: t.outbox.update(
            {
                t.outbox.state: Param("dead", t.outbox.state),
                t.outbox.text: Param("erased", t.outbox.text),
                t.outbox.params: Param("erased", t.outbox.params),
                t.outbox.last_error: Param("error", t.outbox.last_error),
            }
        ).where(t.outbox.message_id == Param("message_id")),
    )

    def mark_sms_sent(self, message_ids: Sequence[str], now: datetime) -> None:
        """Delivered: the text (which may hold a code) is erased."""
        with self.transaction() as tx:
            for message_id in message_ids:
                tx.write(
                    self._MARK_SENT,
                    {
                        "sent": "SENT",
                        "sent_at": now,
                        "erased": "",
                        "erased_error": "",
                        "message_id": message_id,
                    },
                )

    def mark_sms_failed(self, message_id: str, error: str, *, retry_at: datetime | None) -> None:
        with self.transaction() as tx:
            if retry_at is None:
                tx.write(
                    self._MARK_DEAD,
                    {"dead": "DEAD", "erased": "", "error": error[:256], "message_id": message_id},
                )
            else:
                tx.write(
                    self._MARK_FAILED,
                    {"retry_at": retry_at, "error": error[:256], "message_id": message_id},
                )

    _STATS = Query(
        "outbox.stats",
        lambda t: t.outbox.select(
            peewee.fn.COUNT(t.outbox.seq), peewee.fn.MIN(t.outbox.created_at)
        ).where(t.outbox.state == "PENDING"),
    )

    def outbox_stats(self, now: datetime) -> tuple[int, float]:
        """(messages pending, age in seconds of the oldest of them)."""
        with self.transaction(write=False) as tx:
            count, oldest = tx.one(tx_read(self._STATS, {}, lambda c, rows: rows[0]))
        if not count:
            return 0, 0.0
        from .fields import from_micros

        return int(count), max(0.0, (now - from_micros(int(oldest))).total_seconds())

    def outbox_pending(self) -> int:
        return self.outbox_stats(datetime.now().astimezone())[0]

    # -- housekeeping ------------------------------------------------------------------

    _PRUNE = Query(
        "requests.prune",
        lambda t: t.requests.delete().where(t.requests.created_at < Param("before")),
    )

    def prune_idempotency(self, before: datetime) -> int:
        with self.transaction() as tx:
            found = tx.one(
                tx_read(
                    Query(
                        "requests.expired",
                        lambda t: t.requests.select(peewee.fn.COUNT(peewee.SQL("*"))).where(
                            t.requests.created_at < Param("before")
                        ),
                    ),
                    {"before": before},
                    value,
                )
            )
            tx.write(self._PRUNE, {"before": before})
        return int(found or 0)

    # -- key checks --------------------------------------------------------------------

    _RECORD_KEY_CHECK = Query(
        "key_checks.record",
        lambda t: t.key_checks.insert(
            values(t.key_checks, ("purpose", "key_id", "check_value", "created_at"))
        ).on_conflict_ignore(),
    )
    _KEY_CHECKS = Query(
        "key_checks.all",
        lambda t: t.key_checks.select(
            t.key_checks.purpose, t.key_checks.key_id, t.key_checks.check_value
        ),
    )

    def recorded_key_ids(self) -> set[tuple[str, str]]:
        """(purpose, key id) of every key whose check value is recorded."""
        with self.transaction(write=False) as tx:
            rows = tx.one(tx_read(self._KEY_CHECKS, {}, every(tuple)))
        return {(purpose, key_id) for purpose, key_id, _ in rows}

    def check_keys(
        self, checks: Sequence[KeyCheck], now: datetime, *, record: bool = True
    ) -> list[KeyCheck]:
        """The checks that differ from the value recorded for their key id;
        `record`: first records the value of each key id not seen before."""
        with self.transaction(write=record) as tx:
            for check in checks if record else ():
                tx.write(
                    self._RECORD_KEY_CHECK,
                    {
                        "purpose": check.purpose,
                        "key_id": check.key_id,
                        "check_value": check.value,
                        "created_at": now,
                    },
                )
            recorded = {
                (purpose, key_id): value
                for purpose, key_id, value in tx.one(tx_read(self._KEY_CHECKS, {}, every(tuple)))
            }
        return [c for c in checks if recorded.get((c.purpose, c.key_id), c.value) != c.value]

    # -- key rotation ------------------------------------------------------------------

    def _sealed_queries(self, column: SealedColumn, prefix: str) -> tuple[Query, Query, Query]:
        """Reading the sealed values of `column` (those not under `prefix`, and
        those under it, in row key order after a row key) and updating one."""
        sealed = Vault.SEALED_PREFIXES

        def model_of(t: Tables) -> Any:
            return getattr(t, _SEALED_TABLES[column.table])

        def is_sealed(field: Any) -> Any:
            # An erased outbox text is empty; nothing else is unsealed after m0014.
            return (peewee.fn.SUBSTR(field, 1, len(sealed[0])) == sealed[0]) | (
                peewee.fn.SUBSTR(field, 1, len(sealed[1])) == sealed[1]
            )

        def build_others(t: Tables) -> peewee.Query:
            model = model_of(t)
            field, key = getattr(model, column.column), getattr(model, column.row_key)
            return (
                model.select(key, field)
                .where(is_sealed(field) & (peewee.fn.SUBSTR(field, 1, len(prefix)) != prefix))
                .limit(Param("limit"))
            )

        def build_all(t: Tables) -> peewee.Query:
            model = model_of(t)
            field, key = getattr(model, column.column), getattr(model, column.row_key)
            return (
                model.select(key, field)
                .where(is_sealed(field) & (key > Param("after")))
                .order_by(key)
                .limit(Param("limit"))
            )

        def build_update(t: Tables) -> peewee.Query:
            model = model_of(t)
            field, key = getattr(model, column.column), getattr(model, column.row_key)
            return model.update({field: Param("new", field)}).where(
                (field == Param("old")) & (key == Param("row"))
            )

        name = f"{column.table}.{column.column}"
        return (
            Query(f"reseal.others.{name}.{prefix}", build_others),
            Query(f"reseal.all.{name}", build_all),
            Query(f"reseal.update.{name}", build_update),
        )

    def reseal_batch(self, column: SealedColumn, vault: Vault, limit: int) -> int:
        """Re-encrypts up to `limit` values of one column under the active key,
        each bound to its row; each new value is opened before it is written.

        Each row is updated only if it still holds the value read, so a server
        writing at the same time never loses its write. SealError when a value
        does not open (nothing of this batch is written then)."""
        others, _, update = self._sealed_queries(column, vault.active_prefix)
        with self.transaction() as tx:
            rows = tx.one(
                tx_read(others, {"limit": limit}, lambda c, rows: [c.row(r) for r in rows])
            )
            for row, old in rows:
                place = column.at(row)
                new, plaintext = vault.reseal(old, place)
                if vault.unseal(new, place) != plaintext:
                    raise SealError(f"{place}: the resealed value does not open")
                tx.write(update, {"row": row, "old": old, "new": new})
        return len(rows)

    def check_sealed(
        self, column: SealedColumn, vault: Vault, *, after: str, limit: int
    ) -> tuple[str, Counter[str], list[tuple[str, str]]]:
        """Opens up to `limit` sealed values of `column` after row key `after`:
        the last row key read, how many opened under each key id ("v1:<id>"
        for an unbound value), and (key id, error) of each that did not."""
        _, every, _ = self._sealed_queries(column, vault.active_prefix)
        with self.transaction(write=False) as tx:
            rows = tx.one(
                tx_read(
                    every,
                    {"after": after, "limit": limit},
                    lambda c, rows: [c.row(r) for r in rows],
                )
            )
        opened: Counter[str] = Counter()
        failed = []
        for row, token in rows:
            key_id = Vault.key_id(token)
            try:
                vault.unseal(token, column.at(row), unbound_too=True)
            except SealError as error:
                failed.append((key_id, str(error)))
                continue
            opened[key_id if token.startswith(Vault.SEALED_PREFIXES[0]) else "v1:" + key_id] += 1
        return (rows[-1][0] if rows else after), opened, failed

    # -- index key rotation ----------------------------------------------------------

    def _indexed_queries(self, column: IndexedColumn, prefix: str) -> tuple[Query, Query, Query]:
        """Reading the rows of `column` whose index is not under `prefix`, every
        row after a row key, and updating one row's index."""
        sealed = column.sealed

        def fields(t: Tables) -> tuple[Any, Any, Any, Any]:
            model = getattr(t, _SEALED_TABLES[column.table])
            return (
                model,
                getattr(model, sealed.row_key),
                getattr(model, column.column),
                getattr(model, sealed.column),
            )

        def build_others(t: Tables) -> peewee.Query:
            model, key, index, phone = fields(t)
            return (
                model.select(key, index, phone)
                .where((index != "") & (peewee.fn.SUBSTR(index, 1, len(prefix)) != prefix))
                .limit(Param("limit"))
            )

        def build_all(t: Tables) -> peewee.Query:
            model, key, index, phone = fields(t)
            return (
                model.select(key, index, phone)
                .where((index != "") & (key > Param("after")))
                .order_by(key)
                .limit(Param("limit"))
            )

        def build_update(t: Tables) -> peewee.Query:
            model, key, index, _ = fields(t)
            return model.update({index: Param("new", index)}).where(
                (index == Param("old")) & (key == Param("row"))
            )

        name = f"{column.table}.{column.column}"
        return (
            Query(f"reindex.others.{name}.{prefix}", build_others),
            Query(f"reindex.all.{name}", build_all),
            Query(f"reindex.update.{name}", build_update),
        )

    def reindex_batch(self, column: IndexedColumn, vault: Vault, limit: int) -> int:
        """Re-derives up to `limit` blind indexes of `column` that another key
        made, under the active index key, from the sealed number of their row.

        Each row is updated only if it still holds the index read, so a server
        writing at the same time never loses its write. An account's new index
        meets the unique rule on numbers: a number bound twice under two keys
        fails the batch (IntegrityError) instead of being merged."""
        others, _, update = self._indexed_queries(column, vault.active_index_key + ":")
        with self.transaction() as tx:
            rows = tx.one(
                tx_read(others, {"limit": limit}, lambda c, rows: [c.row(r) for r in rows])
            )
            for row, old, phone in rows:
                e164 = vault.unseal(phone, column.sealed.at(row), unbound_too=True)
                tx.write(update, {"row": row, "old": old, "new": vault.phone_index(e164)})
        return len(rows)

    def check_indexes(
        self, column: IndexedColumn, vault: Vault, *, after: str, limit: int
    ) -> tuple[str, Counter[str], list[str]]:
        """Checks up to `limit` blind indexes of `column` after row key `after`
        against the sealed number of their row, each under the key it names:
        the last row key read, how many match under each key id, and a
        description of each that does not (no personal data)."""
        _, every, _ = self._indexed_queries(column, vault.active_index_key + ":")
        with self.transaction(write=False) as tx:
            rows = tx.one(
                tx_read(
                    every,
                    {"after": after, "limit": limit},
                    lambda c, rows: [c.row(r) for r in rows],
                )
            )
        matched: Counter[str] = Counter()
        failed = []
        for row, index, phone in rows:
            place = column.sealed.at(row)
            key_id = Vault.key_id_of(index)
            try:
                e164 = vault.unseal(phone, place, unbound_too=True)
            except SealError as error:
                failed.append(str(error))
                continue
            if key_id not in vault.index_key_ids:
                failed.append(
                    f"{column.table}.{column.column} of row {row[:80]!r}: made with"
                    f" index key {key_id[:32]!r}, which is not configured"
                )
            elif not vault.same_phone(index, e164):
                failed.append(
                    f"{column.table}.{column.column} of row {row[:80]!r}: not the index of"
                    f" the row's number under key {key_id!r} (mistyped key, or altered)"
                )
            else:
                matched[key_id] += 1
        return (rows[-1][0] if rows else after), matched, failed

    _IDENTITY_HASHES = Query(
        "reindex.identity_hashes",
        lambda t: (
            t.accounts.select(
                t.accounts.account_id, t.accounts.holder_name_hash, t.accounts.id_number_hash
            )
            .where(t.accounts.account_id > Param("after"))
            .order_by(t.accounts.account_id)
            .limit(Param("limit"))
        ),
    )

    def identity_hash_keys(self, *, after: str, limit: int) -> tuple[str, Counter[str]]:
        """The key ids of up to `limit` accounts' name and ID-number hashes after
        account id `after`: the last account id read, and how many hashes
        (two per account) each key id made."""
        with self.transaction(write=False) as tx:
            rows = tx.one(
                tx_read(
                    self._IDENTITY_HASHES,
                    {"after": after, "limit": limit},
                    lambda c, rows: [c.row(r) for r in rows],
                )
            )
        made: Counter[str] = Counter()
        for _, name_hash, id_hash in rows:
            made[Vault.key_id_of(name_hash)] += 1
            made[Vault.key_id_of(id_hash)] += 1
        return (rows[-1][0] if rows else after), made

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
        filters = {
            "account_id": account_id or None,
            "rebind_id": rebind_id or None,
            "action": action or None,
            "since": since,
            "until": until,
            "after_seq": after_seq,
        }
        given = tuple(name for name, v in filters.items() if v is not None)

        def build(t: Tables) -> peewee.Query:
            e = t.audit_events
            query = e.select(*_EVENT_FIELDS(e))
            for name in given:
                if name == "since":
                    query = query.where(e.at >= Param("since"))
                elif name == "until":
                    query = query.where(e.at < Param("until"))
                elif name == "after_seq":
                    query = query.where(e.seq > Param("after_seq"))
                else:
                    query = query.where(getattr(e, name) == Param(name))
            return query.order_by(e.seq).limit(Param("limit"))

        query = Query("audit.events." + ".".join(given), build)
        params = {name: filters[name] for name in given}
        params["limit"] = limit
        with self.transaction(write=False) as tx:
            return tx.one(tx_read(query, params, every(_event)))

    def audit_snapshot(self, account_id: str | None = None) -> AuditSnapshot:
        """Every chain (or one account's) with its events in chain order and its head
        (seq, last MAC, head MAC), the account ids and the chain registry (one
        account's: its chain's row), all from one snapshot."""
        one = account_id is not None

        def accounts(t: Tables) -> peewee.Query:
            a = t.accounts
            query = a.select(a.account_id, a.audit_seq, a.audit_mac, a.audit_head_mac)
            return query.where(a.account_id == Param("account_id")) if one else query

        def shared_heads(t: Tables) -> peewee.Query:
            h = t.audit_heads
            query = h.select(h.chain_id, h.chain_seq, h.last_mac, h.mac)
            return query.where(h.chain_id == Param("chain_id")) if one else query

        def events(t: Tables) -> peewee.Query:
            e = t.audit_events
            query = e.select(*_EVENT_FIELDS(e)).order_by(e.chain_id, e.chain_seq)
            return query.where(e.chain_id == Param("chain_id")) if one else query

        def registry(t: Tables) -> peewee.Query:
            c = t.audit_chains
            query = c.select(c.ordinal, c.chain_id, c.key_id, c.prev_mac, c.mac).order_by(c.ordinal)
            return query.where(c.chain_id == Param("chain_id")) if one else query

        params: dict[str, Any] = {}
        if one:
            params = {"account_id": account_id, "chain_id": account_chain(account_id or "")}
        with self.transaction(write=False, snapshot=True) as tx:
            account_rows, head_rows, event_rows, registry_rows = tx.read(
                tx_read(Query(f"audit.snapshot.accounts.{one}", accounts), params, every(tuple)),
                tx_read(Query(f"audit.snapshot.heads.{one}", shared_heads), params, every(tuple)),
                tx_read(Query(f"audit.snapshot.events.{one}", events), params, every(_event)),
                tx_read(
                    Query(f"audit.snapshot.registry.{one}", registry),
                    params,
                    every(lambda row: RegisteredChain(int(row[0]), *row[1:])),
                ),
            )
        heads: dict[str, tuple[int, str, str]] = {
            chain: (int(seq), last, mac) for chain, seq, last, mac in head_rows
        }
        registry_head = heads.pop(REGISTRY, None)
        for account, seq, last, mac in account_rows:
            if seq:  # an account whose chain has events keeps its head on its row
                heads[account_chain(account)] = (int(seq), last, mac)
        chains: dict[str, list[StoredEvent]] = {chain: [] for chain in heads}
        for event in event_rows:
            chains.setdefault(event.chain_id, []).append(event)
        return AuditSnapshot(
            chains=[(chain, chains[chain], heads.get(chain)) for chain in sorted(chains)],
            account_ids=[row[0] for row in account_rows],
            registry=registry_rows,
            registry_head=registry_head,
            whole=not one,
        )


class Transaction:
    """`with store.transaction(call) as tx:` (see Store.transaction).

    With tracing on, a transaction made within a traced span (an RPC's, an SMS
    delivery's) is a span of its own, its child."""

    __slots__ = ("_call", "_session", "_snapshot", "_span", "_store", "_tx", "_write")

    def __init__(self, store: Store, call: CallContext, write: bool, snapshot: bool) -> None:
        self._store = store
        self._call = call
        self._write = write
        self._snapshot = snapshot
        self._span: Any = None

    def __enter__(self) -> SqlTx:
        store = self._store
        if store.tracer is not None:
            self._span = _transaction_span(store, self._write)
        if not store._reachable:
            self._end_span(StoreUnavailable)
            raise StoreUnavailable("the database did not answer the last health check")
        engine = store.engine
        try:
            self._session = engine.session(self._call, write=self._write, snapshot=self._snapshot)
        except BaseException as error:
            self._end_span(type(error))
            raise
        self._tx = SqlTx(store._compile, self._session, self._call)
        return self._tx

    def __exit__(self, kind: type[BaseException] | None, error: object, trace: object) -> None:
        if self._span is None:
            self._finish(kind)
            return
        try:
            self._finish(kind)
        except BaseException as failure:
            self._end_span(type(failure))
            raise
        self._end_span(kind)

    def _end_span(self, failure: type[BaseException] | None) -> None:
        span = self._span
        if span is None:
            return
        self._span = None
        span.set_attribute("phonebind.committed", failure is None)
        if failure is not None:
            span.set_attribute("phonebind.outcome", failure.__name__)
            # A refusal rolls its work back by design, and SQLite's busy write
            # lock makes the unit of work wait and start again; anything else is
            # a fault.
            if not issubclass(failure, DomainError | WriteLockBusy):
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, failure.__name__))
        span.end()

    def _finish(self, kind: type[BaseException] | None) -> None:
        store, session, tx, call = self._store, self._session, self._tx, self._call
        engine = store.engine
        committed = False
        try:
            if kind is None:
                if self._write and call.gone() and not tx.keep_if_caller_gone:
                    raise DeadlinePassed("the caller stopped waiting; rolled back")
                try:
                    session.finish(tx.take_pending(), commit=True)
                except (StoreUnavailable, DeadlinePassed):
                    if tx.messages and store.on_commit_unknown is not None:
                        store.on_commit_unknown(tx.messages)
                    raise
                committed = True
        finally:
            try:
                if not committed:
                    session.finish((), commit=False)
            except StoreUnavailable:
                if kind is None:
                    raise
                # Else the connection is gone; nothing was committed.
            finally:
                engine.release(session)
                store.statements[call.method] += session.statements
                store.round_trips[call.method] += session.round_trips
        if committed and tx.messages and store.on_commit is not None:
            store.on_commit(tx.messages)


def _transaction_span(store: Store, write: bool) -> Any:
    """A span for a transaction, when a traced span is in force (else None: the
    outbox's periodic claims would each start a trace of their own)."""
    from opentelemetry import trace

    if not trace.get_current_span().is_recording():
        return None
    return store.tracer.start_span(
        "store.transaction",
        attributes={"db.system.name": store.dialect, "phonebind.write": write},
    )


def _EVENT_FIELDS(e: Any) -> list[peewee.Field]:
    return [
        e.seq,
        e.chain_id,
        e.chain_seq,
        e.at,
        e.caller,
        e.rpc,
        e.request_id,
        e.action,
        e.outcome,
        e.account_id,
        e.rebind_id,
        e.details,
        e.prev_mac,
        e.mac,
        e.key_id,
    ]


def _event(row: tuple) -> StoredEvent:
    import json

    return StoredEvent(
        seq=row[0],
        chain_id=row[1],
        chain_seq=row[2],
        at=row[3],
        caller=row[4],
        rpc=row[5],
        request_id=row[6],
        action=row[7],
        outcome=row[8],
        account_id=row[9],
        rebind_id=row[10],
        details=json.loads(row[11]),
        prev_mac=row[12],
        mac=row[13],
        key_id=row[14],
    )


def tx_read(query: Query, params: dict[str, Any], shape: Any) -> Any:
    from .unit import StatementRead

    return StatementRead(query, params, shape)


@contextmanager
def _unreachable_as(kind: type[Exception]) -> Iterator[None]:
    try:
        yield
    except (peewee.OperationalError, peewee.InterfaceError) as error:
        raise kind(type(error.__cause__ or error).__name__) from error
