"""How statements reach the database, for each backend.

Use cases are plain synchronous code. The store runs each in a greenlet on the
event loop (peewee's asyncio bridge, `playhouse.pwasyncio`): where a statement
must wait for the database, the greenlet hands the wait to the loop
(`await_`) and other calls run meanwhile. A unit of work sends its statements
in batches, one round trip each: the reads it asks for together, with every
write queued before them, and at the end the queued writes with COMMIT.

SQLite runs inline on the loop, without a greenlet: a statement takes
microseconds and never waits on the network, and one connection serves the
whole process, since a unit of work never yields between BEGIN and COMMIT.
Waiting for the write lock of another process is the one wait: BEGIN IMMEDIATE
fails at once (busy_timeout 0), and the store's runner sleeps on the loop and
runs the store code again (WriteLockBusy), unless part of it already committed.

PostgreSQL runs on psycopg 3's asyncio connections from a psycopg_pool pool,
each batch in pipeline mode (one round trip for the whole batch, PostgreSQL
running the statements in order), as prepared statements unless the settings
say otherwise (PgBouncer before 1.21 in transaction pooling cannot keep them).
A batch that gets no answer by its caller's deadline (or the statement timeout,
plus a grace) has its connection shut: a silent database cannot hold a call.
A call waiting for a connection stops waiting as soon as the pool fails to open
one (every host refused, or none takes writes, as during a failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from playhouse.pwasyncio import await_

from ..domain.context import CallContext
from ..domain.ports import Conflict, DeadlinePassed, StoreUnavailable

log = logging.getLogger(__name__)

# A statement: (SQL text, argument list).
Statement = tuple[str, Sequence[Any]]

# PostgreSQL ended the statement because of other sessions (deadlock, lock or
# statement timeout, serialization failure, cancel): the database and the
# connection are fine; the call answers STORE_UNAVAILABLE, retryable.
CONTENTION_SQLSTATES = frozenset({"40P01", "40001", "55P03", "57014"})
# Unique constraint (SQLite: by the columns it names) -> the domain's name for it.
CONSTRAINTS = {
    "accounts_pkey": "account_id",
    "accounts.account_id": "account_id",
    "uq_accounts_phone": "phone",
    "accounts.phone_index": "phone",
    "uq_rebinds_open_account": "open_rebind",
    "rebinds.account_id": "open_rebind",
    "rebinds_pkey": "rebind_id",
    "rebinds.rebind_id": "rebind_id",
    "idempotency_keys_pkey": "idempotency",
    "idempotency_keys.operation, idempotency_keys.account_id, idempotency_keys.request_id": (
        "idempotency"
    ),
    "binding_changes_rebind_id_key": "binding_change",
    "binding_changes.rebind_id": "binding_change",
    "sms_outbox_message_id_key": "message",
    "sms_outbox.message_id": "message",
}
_SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %s, true)"
# Beyond a caller's deadline, how long a statement may go unanswered before its
# connection is shut (the database ends its own lock waits at the deadline, so
# a live one answers within it).
SILENCE_GRACE_SECONDS = 1.0


def conflict_name(constraint: str) -> str:
    return CONSTRAINTS.get(constraint, constraint or "unknown")


class Answer(enum.Enum):
    """How the database answered a health ping."""

    UP = "up"
    # It refused or failed at once: calls may still work on open connections.
    DOWN = "down"
    # No answer in time: calls must not wait on it.
    SILENT = "silent"


class Session:
    """One unit of work's hold on the database: a connection (PostgreSQL) or
    the process's one connection inside BEGIN (SQLite)."""

    # This unit of work's statements (BEGIN and COMMIT included) and round
    # trips (batches), for the per-RPC figures: counted on the session, since
    # other calls' units of work run meanwhile on PostgreSQL.
    statements: int
    round_trips: int

    def run(self, statements: Sequence[Statement], want: Sequence[int]) -> list[list[tuple]]:
        """Runs `statements` in order, in one round trip; the rows of those at
        the indices in `want`."""
        raise NotImplementedError

    def finish(self, statements: Sequence[Statement], commit: bool) -> None:
        """Runs what is left and commits, or rolls back (`statements` unrun)."""
        raise NotImplementedError


class Engine:
    dialect: str
    row_locks: bool
    # Store code runs directly on the loop (no greenlet): it never awaits.
    inline = False
    # Statements and round trips sent, for the benchmark's per-RPC figures.
    statements = 0
    round_trips = 0
    # Called when a connection is shut because the database left it unanswered.
    on_cut: Callable[[], object] = staticmethod(lambda: None)

    def session(self, call: CallContext, *, write: bool, snapshot: bool) -> Session:
        raise NotImplementedError

    def release(self, session: Session) -> None:
        raise NotImplementedError

    async def ping(self, timeout: float) -> Answer:
        raise NotImplementedError

    async def recovered(self) -> None:
        pass

    async def close(self) -> None:
        raise NotImplementedError


# -- SQLite -------------------------------------------------------------------------

SQLITE_PRAGMAS = (
    ("journal_mode", "wal"),
    ("synchronous", "normal"),
    ("foreign_keys", "1"),
    # Erased outbox texts (which held codes) are overwritten, not just unlinked.
    ("secure_delete", "1"),
    # Never wait inside SQLite: a wait there would stop the event loop.
    ("busy_timeout", "0"),
)
_BUSY_FIRST_SLEEP = 0.001
_BUSY_LONGEST_SLEEP = 0.05


def _sqlite_conflict(error: sqlite3.IntegrityError) -> Conflict:
    # "UNIQUE constraint failed: accounts.phone_index"
    message = str(error)
    _, _, columns = message.partition(": ")
    return Conflict(conflict_name(columns.strip()))


def _busy(error: sqlite3.OperationalError) -> bool:
    return getattr(error, "sqlite_errorcode", None) in (
        sqlite3.SQLITE_BUSY,
        getattr(sqlite3, "SQLITE_BUSY_SNAPSHOT", -1),
        getattr(sqlite3, "SQLITE_LOCKED", -1),
    ) or "database is locked" in str(error)


class SqliteSession(Session):
    __slots__ = ("_connection", "_engine", "_open", "round_trips", "statements")

    def __init__(self, engine: SqliteEngine, connection: sqlite3.Connection, open_: bool) -> None:
        self._engine = engine
        self._connection = connection
        self._open = open_
        self.statements = 1 if open_ else 0  # BEGIN
        self.round_trips = 0

    def run(self, statements: Sequence[Statement], want: Sequence[int]) -> list[list[tuple]]:
        engine = self._engine
        engine.statements += len(statements)
        engine.round_trips += 1
        self.statements += len(statements)
        self.round_trips += 1
        execute = self._connection.execute
        rows: dict[int, list[tuple]] = {}
        try:
            for index, (sql, args) in enumerate(statements):
                cursor = execute(sql, args)
                if index in want:
                    rows[index] = cursor.fetchall()
        except sqlite3.IntegrityError as error:
            raise _sqlite_conflict(error) from error
        except sqlite3.OperationalError as error:
            raise StoreUnavailable(f"SQLite: {error.sqlite_errorname}") from error
        return [rows[index] for index in want]

    def finish(self, statements: Sequence[Statement], commit: bool) -> None:
        if not self._open:
            if statements:
                self.run(statements, ())
            return
        self._open = False
        try:
            if commit:
                if statements:
                    self.run(statements, ())
                self._connection.execute("COMMIT")
                self.statements += 1
                self._engine.commits += 1
        finally:
            if self._connection.in_transaction:
                self._connection.execute("ROLLBACK")


class WriteLockBusy(Exception):
    """Another process holds SQLite's write lock: run the store code again
    after `wait` seconds (nothing of this unit of work happened)."""

    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.wait = wait


class SqliteEngine(Engine):
    """One connection per process, used from the event loop's thread only."""

    dialect = "sqlite"
    row_locks = False
    inline = True

    def __init__(self, path: str, *, lock_timeout: float) -> None:
        self.path = path
        self._lock_timeout = lock_timeout
        self._connection: sqlite3.Connection | None = None
        # While the runner waits for the write lock: since when, and its next sleep.
        self.busy_since: float | None = None
        self.busy_sleep = _BUSY_FIRST_SLEEP
        self.commits = 0

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, cached_statements=256
            )
            for name, value in SQLITE_PRAGMAS:
                connection.execute(f"PRAGMA {name} = {value}")
            self._connection = connection
        return self._connection

    def session(self, call: CallContext, *, write: bool, snapshot: bool) -> Session:
        connection = self._connect()
        if not (write or snapshot):
            return SqliteSession(self, connection, False)
        begin = "BEGIN IMMEDIATE" if write else "BEGIN"
        try:
            connection.execute(begin)
            return SqliteSession(self, connection, True)
        except sqlite3.OperationalError as error:
            if not _busy(error):
                raise StoreUnavailable(f"SQLite: {error.sqlite_errorname}") from error
        # Another process holds the write lock: wait on the loop, not in SQLite,
        # until the lock timeout (counted from the first try) or the deadline.
        now = time.monotonic()
        if self.busy_since is None:
            self.busy_since = now
        give_up = self.busy_since + self._lock_timeout
        if call.deadline is not None:
            give_up = min(give_up, call.deadline)
        if now >= give_up:
            gone = DeadlinePassed if call.gone() else StoreUnavailable
            raise gone("waited too long for the write lock")
        wait = min(self.busy_sleep, give_up - now)
        self.busy_sleep = min(self.busy_sleep * 2, _BUSY_LONGEST_SLEEP)
        raise WriteLockBusy(wait)

    def release(self, session: Session) -> None:
        pass

    async def ping(self, timeout: float) -> Answer:
        try:
            self._connect().execute("SELECT 1").fetchall()
            return Answer.UP
        except sqlite3.Error:
            return Answer.DOWN

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


# -- PostgreSQL ---------------------------------------------------------------------


class PostgresSession(Session):
    __slots__ = ("_begin", "_call", "_connection", "_engine", "broken", "round_trips", "statements")

    def __init__(self, engine: PostgresEngine, connection: Any, call: CallContext, begin: str):
        self._engine = engine
        self._connection = connection
        self._call = call
        self._begin = begin  # sent with the first batch ("" in autocommit)
        self.broken = False
        self.statements = 0
        self.round_trips = 0

    def _timeout(self) -> float:
        """How long a batch may go unanswered before its connection is shut:
        the database itself ends lock waits at the caller's deadline and any
        statement at statement_timeout, so a live one answers by then."""
        longest = self._engine.statement_timeout + SILENCE_GRACE_SECONDS
        remaining = self._call.remaining()
        if remaining is None:
            return longest
        return min(longest, max(remaining, 0.0) + SILENCE_GRACE_SECONDS)

    def run(self, statements: Sequence[Statement], want: Sequence[int]) -> list[list[tuple]]:
        if self._begin:
            opening: list[Statement] = [(self._begin, ())]
            lock_wait = self._engine.lock_wait(self._call)
            if lock_wait is not None:
                # Per transaction, so it follows each call's deadline (and works
                # behind a transaction-pooling PgBouncer); sent with the batch.
                opening.append((_SET_LOCK_TIMEOUT, (f"{lock_wait}ms",)))
            statements = [*opening, *statements]
            want = [index + len(opening) for index in want]
            self._begin = ""
        return await_(self._engine.batch(self, statements, want, self._timeout()))

    def finish(self, statements: Sequence[Statement], commit: bool) -> None:
        if self.broken:
            return
        if commit:
            if self._begin:  # nothing was sent: no transaction to end
                if statements:
                    self._begin_and_commit(statements)
                return
            if statements or self._engine.in_transaction(self._connection):
                self.run([*statements, ("COMMIT", ())], ())
            return
        if not self._begin and self._engine.in_transaction(self._connection):
            self.run([("ROLLBACK", ())], ())

    def _begin_and_commit(self, statements: Sequence[Statement]) -> None:
        self.run([*statements, ("COMMIT", ())], ())

    @property
    def connection(self) -> Any:
        return self._connection


class PostgresEngine(Engine):
    dialect = "postgresql"
    row_locks = True

    def __init__(
        self,
        url: str,
        *,
        max_connections: int,
        lock_timeout: float,
        statement_timeout: float,
        prepared_statements: bool = True,
        session_settings: bool = True,
    ) -> None:
        from psycopg_pool import AsyncConnectionPool

        self.url = url
        self.statement_timeout = statement_timeout
        self._lock_timeout = lock_timeout
        self._prepare = True if prepared_statements else False
        options: dict[str, Any] = {
            "autocommit": True,
            "prepare_threshold": 0 if prepared_statements else None,
            # A database host that vanishes (dropped packets, no RST) is noticed
            # by the kernel within seconds instead of hanging calls for minutes.
            "connect_timeout": 3,
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 2,
            "tcp_user_timeout": 5000,
        }
        if session_settings:
            from psycopg.conninfo import conninfo_to_dict

            # Bounds the database applies itself, after the URL's own options; a
            # transaction-pooling PgBouncer refuses startup options: set them
            # on the role there instead (store_session_settings = false).
            options["options"] = " ".join(
                (
                    str(conninfo_to_dict(url).get("options") or ""),
                    f"-c lock_timeout={max(1, round(lock_timeout * 1000))}",
                    f"-c statement_timeout={max(1, round(statement_timeout * 1000))}",
                    # A backend whose client went away ends its statement.
                    "-c client_connection_check_interval=1000",
                    "-c idle_in_transaction_session_timeout=60000",
                )
            ).strip()
        self._options = options
        self._pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs=options,
            open=False,
            timeout=lock_timeout,
            max_idle=300,
            # One retry, then give up: the next call that needs a connection
            # tries again, so nothing waits on a backoff once a host takes writes.
            reconnect_timeout=0,
            reconnect_failed=_answer_waiting_calls,
            name="phonebind",
        )
        self._ping_connection: Any = None
        self._opened = False

    async def open(self) -> None:
        if not self._opened:
            await self._pool.open(wait=False)
            self._opened = True

    def lock_wait(self, call: CallContext) -> int | None:
        """The lock_timeout (ms) of a transaction for `call`, when its deadline
        comes before the store's lock timeout: waits on locks end with it."""
        remaining = call.remaining()
        if remaining is None or remaining >= self._lock_timeout:
            return None
        return max(1, round(remaining * 1000))

    @staticmethod
    def in_transaction(connection: Any) -> bool:
        from psycopg.pq import TransactionStatus

        return connection.info.transaction_status != TransactionStatus.IDLE

    def session(self, call: CallContext, *, write: bool, snapshot: bool) -> Session:
        wait = self._lock_timeout
        remaining = call.remaining()
        if remaining is not None:
            wait = max(0.001, min(wait, remaining))
        connection = await_(self._acquire(wait, call))
        begin = "BEGIN ISOLATION LEVEL REPEATABLE READ" if snapshot else ("BEGIN" if write else "")
        return PostgresSession(self, connection, call, begin)

    async def _acquire(self, wait: float, call: CallContext) -> Any:
        import psycopg_pool

        if not self._opened:
            await self.open()
        try:
            return await self._pool.getconn(timeout=wait)
        except psycopg_pool.PoolTimeout as error:
            gone = DeadlinePassed if call.gone() else StoreUnavailable
            raise gone("no database connection in time") from error

    def release(self, session: Session) -> None:
        if isinstance(session, PostgresSession):
            await_(self._pool.putconn(session.connection))

    async def batch(
        self,
        session: PostgresSession,
        statements: Sequence[Statement],
        want: Sequence[int],
        timeout: float,
    ) -> list[list[tuple]]:
        self.statements += len(statements)
        self.round_trips += 1
        session.statements += len(statements)
        session.round_trips += 1
        connection = session.connection
        work = asyncio.ensure_future(self._send(connection, statements, want))
        ends = time.monotonic() + timeout
        done: set[asyncio.Future[Any]] = set()
        while not done:
            try:
                done, _ = await asyncio.wait((work,), timeout=max(0.0, ends - time.monotonic()))
            except asyncio.CancelledError:
                # gRPC cancels a call's task when its caller goes. The batch is
                # let to end (the database ends lock waits at the deadline) and
                # the unit of work with it, which commits or rolls back by the
                # deadline's rule: a statement is never left half-answered.
                continue
            if not done:
                break
        if not done:
            # Unanswered: shut the connection (the waiting driver then fails
            # at once) and let the call go; the pool replaces the connection.
            session.broken = True
            connection.pgconn.finish()
            work.add_done_callback(_consume)
            self.on_cut()
            call_gone = session._call.gone()
            log.error("the database left a statement unanswered; connection shut")
            raise (DeadlinePassed if call_gone else StoreUnavailable)("no answer from the database")
        try:
            return work.result()
        except Exception as error:
            session.broken = _broken(connection)
            raise _translate(error, session._call, session.broken) from error

    async def _send(
        self, connection: Any, statements: Sequence[Statement], want: Sequence[int]
    ) -> list[list[tuple]]:
        prepare = self._prepare
        if len(statements) == 1:
            cursor = await connection.execute(statements[0][0], statements[0][1], prepare=prepare)
            return [await cursor.fetchall()] if want else []
        if _ONE_FLUSH:
            cursors = await _pipeline_one_flush(connection, statements, prepare)
        else:
            cursors = []
            async with connection.pipeline():
                for sql, args in statements:
                    cursors.append(await connection.execute(sql, args, prepare=prepare))
        return [await cursors[index].fetchall() for index in want]

    async def ping(self, timeout: float) -> Answer:
        """Whether the database answers within `timeout` seconds, on a connection
        of its own outside the pool: the pool's connections may all be busy,
        and the ping must not queue behind calls. A ping that gets no answer
        shuts its connection and lets the next one start afresh."""
        import psycopg

        deadline = time.monotonic() + timeout
        # The kept connection may have died alone (an idle-session timeout, a
        # pooler restart): then a fresh one decides.
        for _ in range(2):
            kept = self._ping_connection
            work = asyncio.ensure_future(
                self._ping_once(kept, max(0.1, deadline - time.monotonic()))
            )
            done, _ = await asyncio.wait((work,), timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                work.add_done_callback(_close_late_connection)
                self._drop_ping_connection()
                return Answer.SILENT
            try:
                self._ping_connection = work.result()
                return Answer.UP
            except (psycopg.Error, OSError):
                self._drop_ping_connection()
                if kept is None or time.monotonic() >= deadline:
                    return Answer.DOWN
        return Answer.DOWN

    async def _ping_once(self, connection: Any, connect_timeout: float) -> Any:
        import psycopg

        if connection is None or connection.closed:
            connection = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=max(1, round(connect_timeout))
            )
        await connection.execute("SELECT 1")
        return connection

    def _drop_ping_connection(self) -> None:
        connection, self._ping_connection = self._ping_connection, None
        if connection is not None and not connection.closed:
            connection.pgconn.finish()

    async def recovered(self) -> None:
        if self._opened:
            await self._pool.check()

    async def close(self) -> None:
        if self._ping_connection is not None and not self._ping_connection.closed:
            await self._ping_connection.close()
        if self._opened:
            await self._pool.close(timeout=1.0)
            self._opened = False


def _psycopg_queues_commands() -> bool:
    """Whether this psycopg has the internals `_pipeline_one_flush` uses (3.2, 3.3)."""
    try:
        from psycopg import AsyncCursor
        from psycopg._pipeline_base import BasePipeline
        from psycopg._preparing import PrepareManager
    except ImportError:
        return False
    return all(
        hasattr(owner, name)
        for owner, name in (
            (AsyncCursor, "_start_query"),
            (AsyncCursor, "_convert_query"),
            (AsyncCursor, "_maybe_prepare_gen"),
            (BasePipeline, "_enter_gen"),
            (BasePipeline, "_enqueue_sync"),
            (BasePipeline, "_communicate_gen"),
            (BasePipeline, "_fetch_gen"),
            (BasePipeline, "_exit"),
            (PrepareManager, "maintain_gen"),
        )
    )


_ONE_FLUSH = _psycopg_queues_commands()


async def _pipeline_one_flush(
    connection: Any, statements: Sequence[Statement], prepare: bool
) -> list[Any]:
    """A batch in pipeline mode: every statement and the closing Sync queued
    first, sent in one flush, then every result read.

    `AsyncConnection.execute` in pipeline mode sends and flushes each statement
    on its own, with a wait on the socket each, and the end of a `pipeline()`
    block sends the Sync, then a flush request, each in a send of its own: a
    batch of ten was twelve sends, as many event-loop turns and wake-ups of the
    backend. This is what `AsyncCursor.execute` and the block's end do, in one
    send and one wait for the answers; results, errors and the
    prepared-statement cache go through psycopg as before.
    """
    from psycopg import AsyncPipeline

    cursors: list[Any] = []
    async with connection.lock:
        connection._check_connection_ok()
        if connection._pipeline is not None:
            raise RuntimeError("a batch on a connection already in pipeline mode")
        pipeline = connection._pipeline = AsyncPipeline(connection)

        def batch() -> Any:
            yield from pipeline._enter_gen()
            for sql, args in statements:
                cursor = connection.cursor()
                yield from cursor._start_query(sql)
                query = cursor._convert_query(sql, args)
                yield from cursor._maybe_prepare_gen(query, prepare=prepare)
                cursor._last_query = sql
                cursors.append(cursor)
            # Statements the prepared cache drops are closed after their last use.
            yield from connection._prepared.maintain_gen(connection)
            pipeline._enqueue_sync()
            queue = pipeline.command_queue
            while queue:
                queue.popleft()()  # into libpq's output buffer
            try:
                yield from pipeline._communicate_gen()  # one flush
            except Exception:
                # The rest of the results still leave the connection clean; the
                # first error is the one that counts.
                with contextlib.suppress(Exception):
                    yield from pipeline._fetch_gen(flush=False)
                raise
            # Every result up to the Sync's (an error raised once all are read).
            yield from pipeline._fetch_gen(flush=False)

        failure: BaseException | None = None
        try:
            await connection.wait(batch())
        except BaseException as error:
            failure = error
            raise
        finally:
            try:
                if pipeline.level:
                    pipeline._exit(failure)
            finally:
                connection._pipeline = None
    return cursors


async def _answer_waiting_calls(pool: Any) -> None:
    """The pool could not open a connection (every host refused, or none of them
    takes writes, as between a primary's death and its standby's promotion).
    Once no connection is in use or being opened, none can come to the calls
    queued for one: they answer STORE_UNAVAILABLE now rather than at the end of
    their wait; the next call to need a connection tries again. While one is in
    use (a database refusing only new connections), they wait for it."""
    from psycopg_pool import PoolTimeout

    # The pool's own count and queue of waiting clients, failed as the pool
    # fails them when it closes (psycopg_pool has no public call for it).
    async with pool._lock:
        if pool._nconns > len(pool._pool) or not pool._waiting:
            return
        waiting = list(pool._waiting)
        pool._waiting.clear()
    for client in waiting:
        await client.fail(PoolTimeout("the database refused a new connection"))


def _consume(task: asyncio.Future[Any]) -> None:
    """Marks a task's failure as seen (its caller went on without it)."""
    if task.done() and not task.cancelled():
        task.exception()


def _close_late_connection(task: asyncio.Future[Any]) -> None:
    """A ping given up on that connected after all: its connection is not kept."""
    if not task.cancelled() and task.exception() is None:
        task.result().pgconn.finish()


def _broken(connection: Any) -> bool:
    from psycopg.pq import ConnStatus

    return connection.closed or connection.pgconn.status != ConnStatus.OK


def _translate(error: Exception, call: CallContext, broken: bool = False) -> Exception:
    import psycopg
    from psycopg import errors

    if isinstance(error, errors.UniqueViolation):
        return Conflict(conflict_name(error.diag.constraint_name or ""))
    if not isinstance(error, psycopg.Error):
        return error
    if broken:
        # The connection is gone, whatever libpq made of it (an error result
        # without SQLSTATE reads as a plain DatabaseError).
        return StoreUnavailable(type(error).__name__)
    if getattr(error, "sqlstate", None) in CONTENTION_SQLSTATES:
        if call.gone(margin=0.05):  # a lock wait cut at the caller's deadline
            return DeadlinePassed(type(error).__name__)
        return StoreUnavailable(type(error).__name__)
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
        return StoreUnavailable(type(error).__name__)
    return error  # a fault of the statement, not of the store
