"""Which way of running phonebind's database work from an asyncio event loop costs least.

The server moves to `grpc.aio` while its use cases stay synchronous code. This
measures, per backend, the drivers and bridges that could carry that code, on
tables created by phonebind's own migrations and seeded with 10 000 accounts:

  (R) a read: one account row by primary key, mapped to a dataclass;
  (W) a write shaped like VerifyCode: BEGIN (SQLite: BEGIN IMMEDIATE); the
      account FOR UPDATE; the rebind; the challenge; UPDATE the challenge;
      UPDATE the rebind; the audit head FOR UPDATE; INSERT the audit event;
      UPDATE the head; COMMIT. Ten statements; new values are computed from
      what was read, so a stale read would show as a lost update.

Each runs from one asyncio event loop with 1 and 32 concurrent tasks on random
accounts, for a fixed time after a warm-up. Reported per unit: throughput, this
process's CPU time (every thread, user + system), PostgreSQL's CPU time (its
backends serving this run, and every postgres process), and round trips: TCP
data segments PostgreSQL sent to this process (it flushes its output when it
waits for the client, so one segment is one wait of the client).

The greenlet bridge is also measured on its own (a spawn, an await_ of a
no-op) and over asyncpg and psycopg 3, native and bridged in alternating blocks.

Checks, all printed: the rows agree with the units counted; two tasks on one
account through the pipelined write lose no update (and the same test without
FOR UPDATE does see stale reads); an SQLite write held up by another
connection's lock backs off without stalling the loop.

    .venv/bin/python bench/drivers.py [--quick] [--only sqlite|postgresql]
        [--pg-url URL] [--json FILE]

PostgreSQL: a database of its own, created on --pg-url (default
$PHONEBIND_BENCH_DATABASE_URL or postgresql://postgres@127.0.0.1:5432/test)
and dropped afterwards. SQLite: a file in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import pathlib
import platform
import random
import secrets
import socket
import sqlite3
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiosqlite
import asyncpg
import peewee
import psycopg
import psycopg2
import psycopg2.extras
import psycopg_pool
from playhouse.db_url import connect as connect_url
from playhouse.pwasyncio import (
    AsyncPostgresqlDatabase,
    AsyncSqliteDatabase,
    await_,
    greenlet_spawn,
)

from phonebind_server.store.engine import SQLITE_PRAGMAS as PRAGMA_PAIRS
from phonebind_server.store.migrate import migrate

SQLITE_PRAGMAS = dict(PRAGMA_PAIRS)
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
ACCOUNTS = 10_000
POOL_SIZE = 4  # connections of every PostgreSQL pool, and of the aiosqlite pools
CONCURRENCY = (1, 32)
TARGET = "OLD_PHONE"

# -- rows ----------------------------------------------------------------------------

ACCOUNT_COLUMNS = (
    *"account_id phone_index phone_sealed phone_masked holder_name_hash".split(),
    *"holder_name_masked id_number_hash id_number_masked id_province".split(),
    *"bound_at hold_until created_at rebind_locked_until".split(),
)
REBIND_COLUMNS = (
    *"rebind_id account_id state new_phone_index new_phone_sealed new_phone_masked".split(),
    *"old_phone_lost required_steps completed_steps risk_decision risk_score".split(),
    *"risk_reasons failures created_at expires_at updated_at completed_at".split(),
    *"reviewer review_note reviewed_at".split(),
)
CHALLENGE_COLUMNS = (
    *"rebind_id target code_mac state attempts created_at expires_at resend_at".split(),
)
EVENT_COLUMNS = (
    *"chain_id chain_seq at caller rpc request_id action outcome account_id".split(),
    *"rebind_id details prev_mac mac".split(),
)

Account = dataclasses.make_dataclass("Account", ACCOUNT_COLUMNS, slots=True)
Rebind = dataclasses.make_dataclass("Rebind", REBIND_COLUMNS, slots=True)
Challenge = dataclasses.make_dataclass("Challenge", CHALLENGE_COLUMNS, slots=True)

# (account_id, rebind_id, audit chain_id) of one seeded account.
Ids = tuple[str, str, str]


def ids_of(prefix: str, number: int) -> Ids:
    account_id = f"{prefix}-{number:05d}"
    return account_id, f"rb-{account_id}", f"account:{account_id}"


BENCH_IDS = [ids_of("loan", i) for i in range(ACCOUNTS)]
# Accounts of the race test, kept out of the consistency sums of the bench accounts.
RACE_IDS = [ids_of("race", i) for i in range(2)]


def audit_event(ids: Ids, seq: int, now: int, prev_mac: str) -> tuple[tuple[Any, ...], str]:
    """The event row and its MAC (a stand-in: the chain's HMAC is the same cost everywhere)."""
    account_id, rebind_id, chain_id = ids
    mac = f"{chain_id}:{seq}"
    row = (
        chain_id,
        seq,
        now,
        "app-backend",
        "/phonebind.v1.RebindService/VerifyCode",
        f"req-{seq}",
        "code.verify",
        "WRONG_CODE",
        account_id,
        rebind_id,
        '{"target":"OLD_PHONE"}',
        prev_mac,
        mac,
    )
    return row, mac


# -- statements ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Statements:
    """The unit's SQL in one dialect and parameter style."""

    begin: str
    read_account: str
    lock_account: str
    select_rebind: str
    select_challenge: str
    update_challenge: str
    update_rebind: str
    lock_head: str
    insert_event: str
    update_head: str
    commit: str = "COMMIT"
    rollback: str = "ROLLBACK"

    @classmethod
    def build(cls, *, postgres: bool, style: str, row_locks: bool = True) -> Statements:
        """`style`: "qmark" (?), "format" (%s) or "numeric" ($1). `row_locks=False`
        drops FOR UPDATE: the control of the race test."""
        lock = " FOR UPDATE" if postgres and row_locks else ""
        read_account = f"SELECT {', '.join(ACCOUNT_COLUMNS)} FROM accounts WHERE account_id = ?"
        texts = {
            "begin": "BEGIN" if postgres else "BEGIN IMMEDIATE",
            "read_account": read_account,
            "lock_account": read_account + lock,
            "select_rebind": f"SELECT {', '.join(REBIND_COLUMNS)} FROM rebinds WHERE rebind_id = ?",
            "select_challenge": f"SELECT {', '.join(CHALLENGE_COLUMNS)} FROM challenges"
            " WHERE rebind_id = ? AND target = ?",
            "update_challenge": "UPDATE challenges SET attempts = ?, state = ?"
            " WHERE rebind_id = ? AND target = ?",
            "update_rebind": "UPDATE rebinds SET failures = ?, updated_at = ? WHERE rebind_id = ?",
            "lock_head": "SELECT chain_seq, last_mac FROM audit_heads WHERE chain_id = ?" + lock,
            "insert_event": f"INSERT INTO audit_events ({', '.join(EVENT_COLUMNS)})"
            f" VALUES ({', '.join('?' * len(EVENT_COLUMNS))})",
            "update_head": "UPDATE audit_heads SET chain_seq = ?, last_mac = ?, mac = ?"
            " WHERE chain_id = ?",
        }
        return cls(**{name: _placeholders(text, style) for name, text in texts.items()})


def _placeholders(text: str, style: str) -> str:
    if style == "qmark":
        return text
    if style == "format":
        return text.replace("?", "%s")
    parts = text.split("?")
    return "".join(f"{part}${n}" for n, part in enumerate(parts[:-1], 1)) + parts[-1]


def expect_one(rowcount: int) -> None:
    if rowcount != 1:
        raise RuntimeError(f"an UPDATE changed {rowcount} rows instead of 1")


# -- the units of work, as synchronous code and as coroutines ------------------------
#
# A session runs one statement: fetchone() returns a row or None, execute() the
# number of rows changed. Sync sessions wrap sqlite3, psycopg2, Peewee's async
# databases and the greenlet bridge; async sessions wrap aiosqlite, asyncpg and
# psycopg 3. The units are written once per style and run unchanged on each.


def read_unit(s: Any, ids: Ids) -> Any:
    return Account(*s.fetchone(s.q.read_account, (ids[0],)))


def write_unit(s: Any, ids: Ids) -> None:
    account_id, rebind_id, chain_id = ids
    q = s.q
    s.execute(q.begin, ())
    try:
        account = Account(*s.fetchone(q.lock_account, (account_id,)))
        rebind = Rebind(*s.fetchone(q.select_rebind, (rebind_id,)))
        challenge = Challenge(*s.fetchone(q.select_challenge, (rebind_id, TARGET)))
        now = time.time_ns() // 1000
        attempts = (challenge.attempts + 1, challenge.state, rebind_id, TARGET)
        expect_one(s.execute(q.update_challenge, attempts))
        expect_one(s.execute(q.update_rebind, (rebind.failures + 1, now, rebind_id)))
        seq, last_mac = s.fetchone(q.lock_head, (chain_id,))
        event, mac = audit_event((account.account_id, rebind_id, chain_id), seq + 1, now, last_mac)
        s.execute(q.insert_event, event)
        expect_one(s.execute(q.update_head, (seq + 1, mac, mac, chain_id)))
        s.execute(q.commit, ())
    except BaseException:
        s.rollback()
        raise


async def read_unit_async(s: Any, ids: Ids) -> Any:
    return Account(*await s.fetchone(s.q.read_account, (ids[0],)))


async def write_unit_async(s: Any, ids: Ids) -> None:
    account_id, rebind_id, chain_id = ids
    q = s.q
    await s.execute(q.begin, ())
    try:
        account = Account(*await s.fetchone(q.lock_account, (account_id,)))
        rebind = Rebind(*await s.fetchone(q.select_rebind, (rebind_id,)))
        challenge = Challenge(*await s.fetchone(q.select_challenge, (rebind_id, TARGET)))
        now = time.time_ns() // 1000
        attempts = (challenge.attempts + 1, challenge.state, rebind_id, TARGET)
        expect_one(await s.execute(q.update_challenge, attempts))
        expect_one(await s.execute(q.update_rebind, (rebind.failures + 1, now, rebind_id)))
        seq, last_mac = await s.fetchone(q.lock_head, (chain_id,))
        event, mac = audit_event((account.account_id, rebind_id, chain_id), seq + 1, now, last_mac)
        await s.execute(q.insert_event, event)
        expect_one(await s.execute(q.update_head, (seq + 1, mac, mac, chain_id)))
        await s.execute(q.commit, ())
    except BaseException:
        await s.rollback()
        raise


async def write_unit_pipelined(conn: psycopg.AsyncConnection, q: Statements, ids: Ids) -> None:
    """The write in two pipeline syncs: every read, then every change. PostgreSQL runs
    a pipeline's statements one after the other, and each (READ COMMITTED) reads from
    a snapshot taken when it starts, after the lock before it was granted."""
    account_id, rebind_id, chain_id = ids
    try:
        async with conn.pipeline() as pipeline:
            await conn.execute(q.begin)
            account_cursor = await conn.execute(q.lock_account, (account_id,))
            rebind_cursor = await conn.execute(q.select_rebind, (rebind_id,))
            challenge_cursor = await conn.execute(q.select_challenge, (rebind_id, TARGET))
            head_cursor = await conn.execute(q.lock_head, (chain_id,))
            await pipeline.sync()
            account = Account(*await account_cursor.fetchone())
            rebind = Rebind(*await rebind_cursor.fetchone())
            challenge = Challenge(*await challenge_cursor.fetchone())
            seq, last_mac = await head_cursor.fetchone()
            now = time.time_ns() // 1000
            event, mac = audit_event(
                (account.account_id, rebind_id, chain_id), seq + 1, now, last_mac
            )
            attempts = (challenge.attempts + 1, challenge.state, rebind_id, TARGET)
            changes = [
                await conn.execute(q.update_challenge, attempts),
                await conn.execute(q.update_rebind, (rebind.failures + 1, now, rebind_id)),
            ]
            await conn.execute(q.insert_event, event)
            changes.append(await conn.execute(q.update_head, (seq + 1, mac, mac, chain_id)))
            await conn.execute(q.commit)
    except BaseException:
        await conn.execute(q.rollback)
        raise
    for cursor in changes:
        expect_one(cursor.rowcount)


class Sqlite3Session:
    def __init__(self, conn: sqlite3.Connection, q: Statements) -> None:
        self.conn, self.q = conn, q

    def fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        return self.conn.execute(sql, params).fetchone()

    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return self.conn.execute(sql, params).rowcount

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


class Psycopg2Session:
    def __init__(self, conn: Any, q: Statements) -> None:
        self.conn, self.q = conn, q
        self.cursor = conn.cursor()

    def fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        self.cursor.execute(sql, params)
        return self.cursor.fetchone()

    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        self.cursor.execute(sql, params)
        return self.cursor.rowcount

    def rollback(self) -> None:
        with contextlib.suppress(psycopg2.Error):
            self.cursor.execute(self.q.rollback)


class PeeweeSession:
    """Raw SQL through a Peewee database; on the async ones each call goes through
    the greenlet bridge to the async driver."""

    def __init__(self, db: peewee.Database, q: Statements) -> None:
        self.db, self.q = db, q

    def fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        return self.db.execute_sql(sql, params).fetchone()

    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return self.db.execute_sql(sql, params).rowcount

    def rollback(self) -> None:
        with contextlib.suppress(peewee.DatabaseError):
            self.db.execute_sql(self.q.rollback)


class BridgedSession:
    """Synchronous calls on an async session: each statement switches from the
    greenlet running the unit to the event loop's, which awaits the driver."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.q = inner, inner.q

    def fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        return await_(self.inner.fetchone(sql, params))

    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return await_(self.inner.execute(sql, params))

    def rollback(self) -> None:
        await_(self.inner.rollback())


class AiosqliteSession:
    def __init__(self, conn: aiosqlite.Connection, q: Statements) -> None:
        self.conn, self.q = conn, q

    async def fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        rows = await self.conn.execute_fetchall(sql, params)
        return rows[0] if rows else None

    async def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return (await self.conn.execute(sql, params)).rowcount

    async def rollback(self) -> None:
        if self.conn.in_transaction:
            await self.conn.execute(self.q.rollback)


class AsyncpgSession:
    def __init__(self, conn: asyncpg.Connection, q: Statements) -> None:
        self.conn, self.q = conn, q

    async def fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        return await self.conn.fetchrow(sql, *params)

    async def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        status = await self.conn.execute(sql, *params)  # e.g. "UPDATE 1"
        count = status.rpartition(" ")[2]
        return int(count) if count.isdigit() else 0

    async def rollback(self) -> None:
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
            await self.conn.execute(self.q.rollback)


class PsycopgSession:
    def __init__(self, conn: psycopg.AsyncConnection, q: Statements) -> None:
        self.conn, self.q = conn, q
        self.cursor = conn.cursor()

    async def fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        await self.cursor.execute(sql, params or None)
        return await self.cursor.fetchone()

    async def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        await self.cursor.execute(sql, params or None)
        return self.cursor.rowcount

    async def rollback(self) -> None:
        with contextlib.suppress(psycopg.Error):
            await self.cursor.execute(self.q.rollback)


# -- pools ---------------------------------------------------------------------------


class QueuePool:
    """Idle connections in a queue: acquire and release send nothing to the server."""

    def __init__(self, connections: list[Any]) -> None:
        self.connections = connections
        self._idle: asyncio.Queue[Any] = asyncio.Queue()
        for conn in connections:
            self._idle.put_nowait(conn)

    async def acquire(self) -> Any:
        return await self._idle.get()

    async def release(self, conn: Any) -> None:
        self._idle.put_nowait(conn)


class AsyncpgPool:
    """asyncpg's own pool; `reset=False` replaces its reset on release
    (`Connection.reset()`: one more round trip) with nothing."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, dsn: str, *, cache: bool, reset: bool) -> AsyncpgPool:
        extra: dict[str, Any] = {} if reset else {"reset": _keep_session}
        pool = await asyncpg.create_pool(
            dsn,
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            statement_cache_size=100 if cache else 0,
            # Not replaced every 50 000 queries, as by default: a backend that exits
            # inside a measurement would take its CPU time with it.
            max_queries=10**9,
            **extra,
        )
        return cls(pool)

    async def acquire(self) -> Any:
        return await self.pool.acquire()

    async def release(self, conn: Any) -> None:
        await self.pool.release(conn)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A reset that leaves the session as it is."""


class PsycopgPool:
    def __init__(self, pool: psycopg_pool.AsyncConnectionPool) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, dsn: str, *, prepare_threshold: int | None) -> PsycopgPool:
        pool = psycopg_pool.AsyncConnectionPool(
            dsn,
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            kwargs={"autocommit": True, "prepare_threshold": prepare_threshold},
            open=False,
        )
        await pool.open(wait=True)
        return cls(pool)

    async def acquire(self) -> Any:
        return await self.pool.getconn()

    async def release(self, conn: Any) -> None:
        await self.pool.putconn(conn)


# -- variants ------------------------------------------------------------------------


class Variant:
    """One way of running the units from the event loop."""

    label = ""
    units = ("R", "W")

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def read(self, ids: Ids) -> Any:
        raise NotImplementedError

    async def write(self, ids: Ids) -> None:
        raise NotImplementedError

    retries = 0  # SQLite units retried after "database is locked"


class SqliteInline(Variant):
    """sqlite3 called straight from the coroutine. A busy database fails at once
    (busy_timeout=0) and the unit is retried after an asyncio.sleep back-off, so
    a lock held by another process never blocks the loop."""

    label = "(a) sqlite3 inline on the loop, busy_timeout=0 + async back-off"

    def __init__(self, path: str) -> None:
        self.path = path

    async def open(self) -> None:
        self.conn = sqlite_connect(self.path, busy_ms=0)
        self.session = Sqlite3Session(self.conn, Statements.build(postgres=False, style="qmark"))

    async def close(self) -> None:
        self.conn.close()

    async def read(self, ids: Ids) -> Any:
        return await self._retrying(read_unit, ids)

    async def write(self, ids: Ids) -> None:
        await self._retrying(write_unit, ids)

    longest_block = 0.0  # seconds: the longest the loop waited for one synchronous call

    async def _retrying(self, unit: Callable[[Any, Ids], Any], ids: Ids) -> Any:
        delay = 0.001
        while True:
            started = time.perf_counter()
            try:
                return unit(self.session, ids)
            except sqlite3.OperationalError as error:
                if getattr(error, "sqlite_errorcode", 0) & 0xFF not in (
                    sqlite3.SQLITE_BUSY,
                    sqlite3.SQLITE_LOCKED,
                ):
                    raise
            finally:
                self.longest_block = max(self.longest_block, time.perf_counter() - started)
            self.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)


class SqliteAiosqlite(Variant):
    """aiosqlite: each connection has a thread that runs its statements. Writers
    queue on an asyncio lock, as the server's threads queue on a lock today,
    rather than on SQLite's busy handler, which sleeps between retries."""

    label = f"(b) aiosqlite, {POOL_SIZE} connections, writers on an asyncio.Lock"

    def __init__(self, path: str) -> None:
        self.path = path

    async def open(self) -> None:
        q = Statements.build(postgres=False, style="qmark")
        connections = []
        for _ in range(POOL_SIZE):
            conn = await aiosqlite.connect(self.path, isolation_level=None)
            for name, value in {**SQLITE_PRAGMAS, "busy_timeout": 10_000}.items():
                await conn.execute(f"PRAGMA {name} = {value}")
            connections.append(conn)
        self.pool = QueuePool(connections)
        self.q = q
        self.writer = asyncio.Lock()

    async def close(self) -> None:
        for conn in self.pool.connections:
            await conn.close()

    async def read(self, ids: Ids) -> Any:
        conn = await self.pool.acquire()
        try:
            return await read_unit_async(AiosqliteSession(conn, self.q), ids)
        finally:
            await self.pool.release(conn)

    async def write(self, ids: Ids) -> None:
        async with self.writer:
            conn = await self.pool.acquire()
            try:
                await write_unit_async(AiosqliteSession(conn, self.q), ids)
            finally:
                await self.pool.release(conn)


class PeeweeAsync(Variant):
    """playhouse.pwasyncio: the synchronous unit runs in `await db.run(fn)`, which
    takes a pooled connection and gives it back (as a request's task would)."""

    def __init__(self, db: Any, q: Statements, label: str, serial_writes: bool) -> None:
        self.db, self.label = db, label
        self.session = PeeweeSession(db, q)
        self.writer = asyncio.Lock() if serial_writes else contextlib.nullcontext()

    async def close(self) -> None:
        await self.db.close_pool()

    def _connected(self, unit: Callable[[Any, Ids], Any], ids: Ids) -> Any:
        self.db.connect()
        try:
            return unit(self.session, ids)
        finally:
            self.db.close()

    async def read(self, ids: Ids) -> Any:
        return await self.db.run(self._connected, read_unit, ids)

    async def write(self, ids: Ids) -> None:
        async with self.writer:
            await self.db.run(self._connected, write_unit, ids)


class PooledAsync(Variant):
    """An async driver behind a pool; the unit runs natively as a coroutine, or as
    synchronous code in a greenlet whose every statement is awaited by the loop
    (`bridged`), or, for the write, in two pipeline syncs (`pipelined`)."""

    def __init__(
        self,
        label: str,
        open_pool: Callable[[], Awaitable[Any]],
        session: type,
        q: Statements,
        mode: str = "native",
    ) -> None:
        self.label, self._open_pool, self.session, self.q, self.mode = (
            label,
            open_pool,
            session,
            q,
            mode,
        )
        self.units = ("W",) if mode == "pipelined" else ("R", "W")

    async def open(self) -> None:
        self.pool = await self._open_pool()

    async def close(self) -> None:
        pool = self.pool
        if isinstance(pool, QueuePool):
            for conn in pool.connections:
                await conn.close()
        else:
            await pool.pool.close()

    async def read(self, ids: Ids) -> Any:
        conn = await self.pool.acquire()
        try:
            session = self.session(conn, self.q)
            if self.mode == "bridged":
                return await greenlet_spawn(read_unit, BridgedSession(session), ids)
            return await read_unit_async(session, ids)
        finally:
            await self.pool.release(conn)

    async def write(self, ids: Ids) -> None:
        conn = await self.pool.acquire()
        try:
            if self.mode == "pipelined":
                await write_unit_pipelined(conn, self.q, ids)
            elif self.mode == "bridged":
                await greenlet_spawn(write_unit, BridgedSession(self.session(conn, self.q)), ids)
            else:
                await write_unit_async(self.session(conn, self.q), ids)
        finally:
            await self.pool.release(conn)


class Psycopg2Threads(Variant):
    """psycopg2, the whole unit submitted to a thread pool; one connection per thread."""

    def __init__(self, dsn: str, threads: int) -> None:
        self.dsn, self.threads = dsn, threads
        self.label = f"(f) psycopg2 on a ThreadPoolExecutor of {threads}"
        self.q = Statements.build(postgres=True, style="format")
        self.local = threading.local()
        self.connections: list[Any] = []
        self.lock = threading.Lock()

    def _connect(self) -> None:
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True  # BEGIN and COMMIT are the unit's own statements
        self.local.session = Psycopg2Session(conn, self.q)
        with self.lock:
            self.connections.append(conn)

    async def open(self) -> None:
        self.local, self.connections = threading.local(), []
        self.executor = ThreadPoolExecutor(self.threads, initializer=self._connect)
        # Start every thread, and so every connection, before anything is measured.
        barrier = threading.Barrier(self.threads)
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self.executor, barrier.wait) for _ in range(self.threads))
        )

    async def close(self) -> None:
        self.executor.shutdown(wait=True)
        for conn in self.connections:
            conn.close()

    def _read(self, ids: Ids) -> Any:
        return read_unit(self.local.session, ids)

    def _write(self, ids: Ids) -> None:
        write_unit(self.local.session, ids)

    async def read(self, ids: Ids) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._read, ids)

    async def write(self, ids: Ids) -> None:
        await asyncio.get_running_loop().run_in_executor(self.executor, self._write, ids)


def sqlite_connect(path: str, *, busy_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for name, value in {**SQLITE_PRAGMAS, "busy_timeout": busy_ms}.items():
        conn.execute(f"PRAGMA {name} = {value}")
    return conn


def sqlite_variants(path: str) -> list[Variant]:
    q = Statements.build(postgres=False, style="qmark")
    peewee_db = AsyncSqliteDatabase(
        path,
        pragmas={**SQLITE_PRAGMAS, "busy_timeout": 10_000},
        pool_size=POOL_SIZE,
    )
    return [
        SqliteInline(path),
        SqliteAiosqlite(path),
        PeeweeAsync(
            peewee_db,
            q,
            f"(c) peewee pwasyncio AsyncSqliteDatabase, {POOL_SIZE} connections, "
            "writers on an asyncio.Lock",
            serial_writes=True,
        ),
    ]


async def asyncpg_queue(dsn: str, *, cache: bool) -> QueuePool:
    size = 100 if cache else 0
    return QueuePool(
        [await asyncpg.connect(dsn, statement_cache_size=size) for _ in range(POOL_SIZE)]
    )


def postgres_variants(dsn: str) -> list[Variant]:
    numeric = Statements.build(postgres=True, style="numeric")
    fmt = Statements.build(postgres=True, style="format")

    def asyncpg_pool(cache: bool, reset: bool) -> Callable[[], Awaitable[Any]]:
        return lambda: AsyncpgPool.open(dsn, cache=cache, reset=reset)

    def psycopg_pool_of(threshold: int | None) -> Callable[[], Awaitable[Any]]:
        return lambda: PsycopgPool.open(dsn, prepare_threshold=threshold)

    P = POOL_SIZE
    return [
        PooledAsync(
            f"(d) asyncpg, its pool ({P}), reset on release, statement cache on",
            asyncpg_pool(True, True),
            AsyncpgSession,
            numeric,
        ),
        PooledAsync(
            f"(d) asyncpg, its pool ({P}), reset on release, statement cache off",
            asyncpg_pool(False, True),
            AsyncpgSession,
            numeric,
        ),
        PooledAsync(
            f"(d) asyncpg, its pool ({P}), reset=no-op, statement cache on",
            asyncpg_pool(True, False),
            AsyncpgSession,
            numeric,
        ),
        PooledAsync(
            f"(d) asyncpg, queue of {P} connections, statement cache on",
            lambda: asyncpg_queue(dsn, cache=True),
            AsyncpgSession,
            numeric,
        ),
        PooledAsync(
            f"(d) asyncpg, queue of {P} connections, statement cache off",
            lambda: asyncpg_queue(dsn, cache=False),
            AsyncpgSession,
            numeric,
        ),
        PooledAsync(
            f"(e) psycopg 3 async, psycopg_pool ({P}), prepare_threshold=0",
            psycopg_pool_of(0),
            PsycopgSession,
            fmt,
        ),
        PooledAsync(
            f"(e) psycopg 3 async, psycopg_pool ({P}), prepare_threshold=None",
            psycopg_pool_of(None),
            PsycopgSession,
            fmt,
        ),
        PooledAsync(
            f"(e) psycopg 3 async, pipeline (2 syncs), psycopg_pool ({P}), prepare_threshold=0",
            psycopg_pool_of(0),
            PsycopgSession,
            fmt,
            mode="pipelined",
        ),
        PooledAsync(
            f"(e) psycopg 3 async, pipeline (2 syncs), psycopg_pool ({P}), prepare_threshold=None",
            psycopg_pool_of(None),
            PsycopgSession,
            fmt,
            mode="pipelined",
        ),
        Psycopg2Threads(dsn, 2),
        Psycopg2Threads(dsn, 4),
        PooledAsync(
            f"(g) sync unit via greenlet bridge → asyncpg, queue of {P}, statement cache on",
            lambda: asyncpg_queue(dsn, cache=True),
            AsyncpgSession,
            numeric,
            mode="bridged",
        ),
        PooledAsync(
            f"(g) sync unit via greenlet bridge → psycopg 3, psycopg_pool ({P}), "
            "prepare_threshold=0",
            psycopg_pool_of(0),
            PsycopgSession,
            fmt,
            mode="bridged",
        ),
        PeeweeAsync(
            AsyncPostgresqlDatabase(dsn, pool_size=P, pool_min_size=P, max_queries=10**9),
            fmt,
            f"(h) peewee pwasyncio AsyncPostgresqlDatabase (asyncpg pool of {P}, as shipped)",
            serial_writes=False,
        ),
    ]


# -- measuring -----------------------------------------------------------------------


def postgres_cpu(database: str) -> tuple[float, float]:
    """CPU seconds (user + system) of every postgres process, counting exited
    children through their parent, and of the backends connected to `database`."""
    ticks = os.sysconf("SC_CLK_TCK")
    everything = own = 0
    marker = f" {database} ".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = pathlib.Path(f"/proc/{entry.name}/stat").read_text()
            if not stat[stat.index("(") + 1 :].startswith("postgres"):
                continue
            cmdline = pathlib.Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        used, children = int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
        everything += used + children
        if marker in cmdline:
            own += used
    return everything / ticks, own / ticks


def segments_to(port: int) -> tuple[int, int]:
    """TCP data segments (received, sent) on this process's sockets to `port`."""
    received = sent = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                if sock.getpeername()[1] != port:
                    continue
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            except OSError:
                continue
        # struct tcp_info: tcpi_data_segs_in, tcpi_data_segs_out (Linux 4.6+).
        segs_in, segs_out = struct.unpack_from("II", info, 152)
        received, sent = received + segs_in, sent + segs_out
    return received, sent


def host_busy() -> float:
    """CPU seconds the whole machine has spent busy, all cores, every process."""
    fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


async def drive(unit: Callable[[Ids], Awaitable[Any]], tasks: int, seconds: float) -> int:
    """Units done by `tasks` tasks, each on random accounts, until `seconds` pass.
    Each task yields to the loop after each unit, as a request's task would end."""
    deadline = time.perf_counter() + seconds

    async def task(seed: int) -> int:
        pick = random.Random(seed).randrange  # noqa: S311 - choosing rows, not secrets
        done = 0
        while time.perf_counter() < deadline:
            await unit(BENCH_IDS[pick(ACCOUNTS)])
            done += 1
            await asyncio.sleep(0)
        return done

    seeds = [random.getrandbits(32) for _ in range(tasks)]
    return sum(await asyncio.gather(*(task(seed) for seed in seeds)))


async def drive_count(unit: Callable[[Ids], Awaitable[Any]], tasks: int, each: int) -> None:
    """As drive(), for `each` units per task."""

    async def task(seed: int) -> None:
        pick = random.Random(seed).randrange  # noqa: S311 - choosing rows, not secrets
        for _ in range(each):
            await unit(BENCH_IDS[pick(ACCOUNTS)])
            await asyncio.sleep(0)

    seeds = [random.getrandbits(32) for _ in range(tasks)]
    await asyncio.gather(*(task(seed) for seed in seeds))


@dataclasses.dataclass
class Result:
    """One measurement window."""

    backend: str
    variant: str
    unit: str
    tasks: int
    units: int
    seconds: float
    cpu_us: float  # this process, per unit
    pg_own_us: float | None = None  # PostgreSQL backends of this run, per unit
    pg_all_us: float | None = None  # every postgres process, per unit
    round_trips: float | None = None  # segments PostgreSQL sent, per unit
    sends: float | None = None  # segments this process sent, per unit
    others_pct: float = 0.0  # CPU of everything else on the machine, % of all cores
    retries: int = 0
    longest_block_ms: float | None = None  # inline SQLite: the loop's longest wait on a unit

    @property
    def rate(self) -> float:
        return self.units / self.seconds

    @property
    def cell(self) -> tuple[str, str, str, int]:
        return self.backend, self.variant, self.unit, self.tasks


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        # Full runs measure each cell in several short windows, the variants taking
        # turns, and report the median: a burst of someone else's work on the
        # shared machine then spoils one window, not the figure.
        self.rounds = 1 if args.quick else 5
        self.warmup = 0.1 if args.quick else 0.15
        self.seconds = 0.3 if args.quick else 0.5
        self.results: list[Result] = []
        self.checks: list[tuple[str, bool, str]] = []
        self.committed = 0  # write units committed on the bench accounts of this database
        self.bridge_paired: list[dict[str, Any]] = []

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))
        print(f"  check {'OK  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    async def measure(
        self,
        backend: str,
        variant: Variant,
        unit: str,
        tasks: int,
        postgres: tuple[str, int] | None,
    ) -> Result:
        run = variant.read if unit == "R" else variant.write
        warm = await drive(run, tasks, self.warmup)
        pg_before = postgres_cpu(postgres[0]) if postgres else (0.0, 0.0)
        segs_before = segments_to(postgres[1]) if postgres else (0, 0)
        busy_before, retries_before = host_busy(), variant.retries
        if isinstance(variant, SqliteInline):
            variant.longest_block = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        units = await drive(run, tasks, self.seconds)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        busy = host_busy() - busy_before
        if unit == "W":
            self.committed += warm + units
        result = Result(
            backend,
            variant.label,
            unit,
            tasks,
            units,
            wall,
            cpu / units * 1e6,
            retries=variant.retries - retries_before,
        )
        if isinstance(variant, SqliteInline):
            result.longest_block_ms = variant.longest_block * 1000
        others = busy - cpu
        if postgres:
            segs_after = segments_to(postgres[1])
            pg_all, pg_own = (
                a - b for a, b in zip(postgres_cpu(postgres[0]), pg_before, strict=True)
            )
            others -= pg_all
            result.pg_all_us = pg_all / units * 1e6
            result.pg_own_us = pg_own / units * 1e6
            result.round_trips = (segs_after[0] - segs_before[0]) / units
            result.sends = (segs_after[1] - segs_before[1]) / units
        result.others_pct = max(0.0, 100 * others / wall / (os.cpu_count() or 1))
        self.results.append(result)
        print("  " + one_line(result), flush=True)
        return result

    async def run_variants(
        self, backend: str, variants: list[Variant], postgres: tuple[str, int] | None
    ) -> None:
        for round_number in range(1, self.rounds + 1):
            for variant in variants:
                print(f"{backend}, round {round_number}: {variant.label}", flush=True)
                await variant.open()
                try:
                    for unit in variant.units:
                        for tasks in CONCURRENCY:
                            await self.measure(backend, variant, unit, tasks, postgres)
                finally:
                    await variant.close()


def one_line(r: Result) -> str:
    text = f"{r.unit} N={r.tasks:<2} {r.rate:8.0f}/s  cpu {r.cpu_us:6.0f} µs"
    if r.pg_own_us is not None:
        text += (
            f"  pg {r.pg_own_us:5.0f} µs (all {r.pg_all_us:5.0f})"
            f"  rt {r.round_trips:5.2f} sends {r.sends:5.2f}"
        )
    if r.retries:
        text += f"  retries {r.retries}"
    if r.longest_block_ms is not None:
        text += f"  longest block {r.longest_block_ms:.1f} ms"
    return text + f"  others {r.others_pct:3.0f}%"


# -- databases -----------------------------------------------------------------------


def seed(db: peewee.Database, postgres: bool) -> None:
    """phonebind's schema by its own migrations, then the accounts, each with an open
    rebind, its two challenges and an audit chain of one event."""
    migrate(db)
    now = time.time_ns() // 1000
    accounts, rebinds, challenges, events, heads = [], [], [], [], []
    for number, ids in enumerate(BENCH_IDS + RACE_IDS):
        account_id, rebind_id, chain_id = ids
        account = {
            "account_id": account_id,
            "phone_index": f"{number:064x}",
            "phone_sealed": "sealed:" + "x" * 88,
            "phone_masked": f"+86 138****{number % 10_000:04d}",
            "holder_name_hash": "h" * 64,
            "holder_name_masked": "Z** S**",
            "id_number_hash": "i" * 64,
            "id_number_masked": "1101**********123X",
            "id_province": "11",
            "bound_at": now,
            "hold_until": None,
            "created_at": now,
            "rebind_locked_until": None,
        }
        rebind = {
            "rebind_id": rebind_id,
            "account_id": account_id,
            "state": "PENDING",
            "new_phone_index": f"{number + ACCOUNTS * 2:064x}",
            "new_phone_sealed": "sealed:" + "y" * 88,
            "new_phone_masked": "+86 139****0000",
            "old_phone_lost": False,
            "required_steps": "IDENTITY,OLD_PHONE_CODE,NEW_PHONE_CODE",
            "completed_steps": "IDENTITY",
            "risk_decision": "ALLOW",
            "risk_score": 10,
            "risk_reasons": "",
            "failures": 0,
            "created_at": now,
            "expires_at": now + 900_000_000,
            "updated_at": now,
            "completed_at": None,
            "reviewer": "",
            "review_note": "",
            "reviewed_at": None,
        }
        accounts.append(tuple(account[c] for c in ACCOUNT_COLUMNS))
        rebinds.append(tuple(rebind[c] for c in REBIND_COLUMNS))
        for target in (TARGET, "NEW_PHONE"):
            challenges.append((rebind_id, target, "m" * 64, "OPEN", 0, now, now + 300_000_000, now))
        event, mac = audit_event(ids, 1, now, "")
        events.append(event)
        heads.append((chain_id, 1, mac, mac))
    tables = [
        ("accounts", ACCOUNT_COLUMNS, accounts),
        ("rebinds", REBIND_COLUMNS, rebinds),
        ("challenges", CHALLENGE_COLUMNS, challenges),
        ("audit_events", EVENT_COLUMNS, events),
        ("audit_heads", ("chain_id", "chain_seq", "last_mac", "mac"), heads),
    ]
    with db.atomic():
        cursor = db.cursor()
        for table, columns, rows in tables:
            insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
            if postgres:
                psycopg2.extras.execute_values(cursor, insert + "%s", rows, page_size=1000)
            else:
                cursor.executemany(insert + f"({', '.join('?' * len(columns))})", rows)
    # Planner statistics, and on PostgreSQL the visibility map, as on a settled database.
    db.execute_sql("VACUUM ANALYZE" if postgres else "ANALYZE")
    if not postgres:
        db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")


CONSISTENCY = (
    # (what, SQL, pattern of the bench accounts' rows, value per account as seeded):
    # each grows by one per committed write unit.
    ("audit events", "SELECT count(*) FROM audit_events WHERE account_id LIKE ?", "loan-%", 1),
    (
        "challenge attempts",
        "SELECT sum(attempts) FROM challenges WHERE rebind_id LIKE ?",
        "rb-loan-%",
        0,
    ),
    ("rebind failures", "SELECT sum(failures) FROM rebinds WHERE rebind_id LIKE ?", "rb-loan-%", 0),
    (
        "audit head seqs",
        "SELECT sum(chain_seq) FROM audit_heads WHERE chain_id LIKE ?",
        "account:loan-%",
        1,
    ),
)


def check_consistency(bench: Bench, db: peewee.Database, backend: str) -> None:
    found = []
    for what, sql, pattern, per_account in CONSISTENCY:
        value = int(db.execute_sql(sql.replace("?", db.param), (pattern,)).fetchone()[0])
        found.append((what, value - per_account * ACCOUNTS))
    ok = all(grown == bench.committed for _, grown in found)
    detail = ", ".join(f"{what} +{grown}" for what, grown in found)
    bench.check(f"{backend} rows agree", ok, f"{bench.committed} write units counted; {detail}")


@contextlib.contextmanager
def postgres_database(base: str) -> Iterator[str]:
    name = f"phonebind_drivers_{secrets.token_hex(4)}"
    admin = psycopg2.connect(base, connect_timeout=5)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(base)._replace(path="/" + name))
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# -- checks --------------------------------------------------------------------------


async def pipeline_race(bench: Bench, dsn: str, units: int) -> None:
    """Two tasks, two connections, one account, the pipelined write over and over.
    With FOR UPDATE no update may be lost; without it (the control) the reads
    after the first statement must be seen to be stale, or the test proves nothing."""
    # An aborted pipeline logs a warning for each statement it drops; the control
    # aborts on purpose, and counts each abort below.
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    for row_locks, ids in ((True, RACE_IDS[0]), (False, RACE_IDS[1])):
        q = Statements.build(postgres=True, style="format", row_locks=row_locks)
        _, rebind_id, chain_id = ids
        conns = [
            await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=0)
            for _ in range(2)
        ]
        stale = 0

        async def task(conn: psycopg.AsyncConnection, q: Statements, ids: Ids) -> int:
            nonlocal stale
            done = 0
            for _ in range(units):
                try:
                    await write_unit_pipelined(conn, q, ids)
                    done += 1
                except psycopg.errors.UniqueViolation:
                    stale += 1  # read a head another transaction had already moved on
            return done

        committed = sum(await asyncio.gather(*(task(conn, q, ids) for conn in conns)))
        conn = conns[0]
        cursor = await conn.execute(
            "SELECT (SELECT attempts FROM challenges WHERE rebind_id = %s AND target = %s),"
            " (SELECT failures FROM rebinds WHERE rebind_id = %s),"
            " (SELECT chain_seq - 1 FROM audit_heads WHERE chain_id = %s),"
            " (SELECT count(*) - 1 FROM audit_events WHERE chain_id = %s)",
            (rebind_id, TARGET, rebind_id, chain_id, chain_id),
        )
        attempts, failures, head, events = await cursor.fetchone()
        for c in conns:
            await c.close()
        lost = committed - min(attempts, failures, head, events)
        detail = (
            f"{committed} of {2 * units} units committed; lost updates {lost}; "
            f"duplicate chain seqs refused {stale}; attempts +{attempts}, failures +{failures},"
            f" head +{head}, events +{events}"
        )
        if row_locks:
            ok = lost == 0 and stale == 0 and attempts == failures == head == events == committed
            bench.check("pipelined write, FOR UPDATE, 2 tasks on 1 account", ok, detail)
        else:
            bench.check(
                "control: the same without FOR UPDATE sees stale reads", lost + stale > 0, detail
            )


async def sqlite_backoff(bench: Bench, path: str) -> None:
    """Another connection holds SQLite's write lock for 200 ms: the inline write
    must wait for it by backing off, reads must go on, the loop must not stall."""
    variant = SqliteInline(path)
    await variant.open()
    held, hold = threading.Event(), 0.2

    def hold_lock() -> None:
        other = sqlite_connect(path, busy_ms=0)
        other.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(hold)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    await asyncio.to_thread(held.wait)
    stall, reads, writing = 0.0, 0, True

    async def watch() -> None:
        nonlocal stall, reads
        last = time.perf_counter()
        while writing:
            await variant.read(BENCH_IDS[reads % ACCOUNTS])
            reads += 1
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall, last = max(stall, now - last), now

    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    await variant.write(BENCH_IDS[0])
    waited = time.perf_counter() - started
    writing = False
    await watcher
    holder.join()
    await variant.close()
    bench.committed += 1
    ok = variant.retries > 0 and waited >= hold * 0.5 and stall < 0.05 and reads > 10
    bench.check(
        "sqlite3 inline: a write behind another connection's lock backs off",
        ok,
        f"waited {waited * 1000:.0f} ms, {variant.retries} retries; {reads} reads meanwhile; "
        f"longest loop stall {stall * 1000:.1f} ms",
    )


async def bridge_costs(iterations: int) -> dict[str, float]:
    """CPU µs of the greenlet bridge's two moves, best of three, against awaiting the
    same no-op coroutine natively."""

    async def nothing() -> None:
        return None

    def empty() -> None:
        return None

    def awaits(n: int) -> None:
        for _ in range(n):
            await_(nothing())

    async def native(n: int) -> None:
        for _ in range(n):
            await nothing()

    async def spawns(n: int) -> None:
        for _ in range(n):
            await greenlet_spawn(empty)

    async def bridged(n: int) -> None:
        await greenlet_spawn(awaits, n)

    costs = {}
    for name, run in (
        ("native await of a no-op coroutine", native),
        ("greenlet_spawn of a no-op function", spawns),
        ("await_ of a no-op coroutine through the bridge", bridged),
    ):
        best = float("inf")
        for _ in range(3):
            cpu = time.process_time()
            await run(iterations)
            best = min(best, time.process_time() - cpu)
        costs[name] = best / iterations * 1e6
    return costs


async def bridge_paired(bench: Bench, dsn: str, blocks: int) -> list[dict[str, Any]]:
    """The bridge's extra CPU on a real driver: the same units, native and through the
    greenlet bridge, in alternating blocks (so a change in the machine's load hits
    both), the median of the per-block differences. From R (one statement) and W
    (ten): the cost of one statement's round trip through the bridge, and the rest
    (the greenlet_spawn of the unit)."""
    numeric = Statements.build(postgres=True, style="numeric")
    fmt = Statements.build(postgres=True, style="format")
    drivers = (
        ("asyncpg, queue of 4, statement cache on", asyncpg_queue, {"cache": True}),
        ("psycopg 3, psycopg_pool (4), prepare_threshold=0", PsycopgPool.open, {}),
    )
    found = []
    for name, opener, options in drivers:
        if opener is asyncpg_queue:
            session, q = AsyncpgSession, numeric
        else:
            session, q, options = PsycopgSession, fmt, {"prepare_threshold": 0}

        def open_pool(opener: Any = opener, options: dict[str, Any] = options) -> Any:
            return opener(dsn, **options)

        native = PooledAsync(name, open_pool, session, q)
        bridged = PooledAsync(name, open_pool, session, q, mode="bridged")
        await native.open()
        await bridged.open()
        try:
            extra = {}
            for unit, per_block in (("R", 1600), ("W", 360)):
                for tasks in CONCURRENCY:
                    each = max(1, per_block // tasks // (4 if bench.quick else 1))
                    differences = []
                    for block in range(blocks):
                        cpu = {}
                        order = (native, bridged) if block % 2 == 0 else (bridged, native)
                        for variant in order:
                            run = variant.read if unit == "R" else variant.write
                            await drive_count(run, tasks, max(1, each // 10))  # warm
                            started = time.process_time()
                            await drive_count(run, tasks, each)
                            cpu[variant.mode] = (time.process_time() - started) / (each * tasks)
                            if unit == "W":
                                bench.committed += (each + max(1, each // 10)) * tasks
                        differences.append((cpu["bridged"] - cpu["native"]) * 1e6)
                    extra[unit, tasks] = statistics.median(differences)
                    print(
                        f"  bridge over {name}: {unit} N={tasks}: "
                        f"+{extra[unit, tasks]:.1f} µs/unit",
                        flush=True,
                    )
        finally:
            await native.close()
            await bridged.close()
        for tasks in CONCURRENCY:
            per_statement = (extra["W", tasks] - extra["R", tasks]) / 9
            found.append(
                {
                    "driver": name,
                    "tasks": tasks,
                    "read_us": extra["R", tasks],
                    "write_us": extra["W", tasks],
                    "per_statement_us": per_statement,
                    "per_unit_us": extra["R", tasks] - per_statement,
                }
            )
    return found


async def loop_floor(bench: Bench) -> None:
    """The driving loop with a unit that does nothing: part of every figure."""

    class Nothing(Variant):
        label = "no-op unit (the driving loop's own cost)"

        async def read(self, ids: Ids) -> None:
            return None

    for tasks in CONCURRENCY:
        await bench.measure("loop", Nothing(), "R", tasks, None)


# -- report --------------------------------------------------------------------------


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(pg_version: str | None) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": pg_version or "not measured",
        "libpq (psycopg 3)": str(psycopg.pq.version()),
        "psycopg 3 implementation": psycopg.pq.__impl__,
        **{
            name: version(name)
            for name in (
                "asyncpg",
                "psycopg",
                "psycopg-pool",
                "psycopg2-binary",
                "aiosqlite",
                "peewee",
                "greenlet",
            )
        },
    }


def spread(values: list[float], digits: int = 0) -> str:
    """The median, and the range when there are several windows."""
    text = f"{statistics.median(values):.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}–{max(values):.{digits}f})"
    return text


def markdown(results: list[Result]) -> str:
    cells: dict[tuple[str, str, str, int], list[Result]] = {}
    for r in results:
        cells.setdefault(r.cell, []).append(r)
    lines = []
    for backend in ("sqlite", "postgresql", "loop"):
        rows = [windows for cell, windows in cells.items() if cell[0] == backend]
        if not rows:
            continue
        pg = backend == "postgresql"
        head = ["variant", "unit", "N", "units/s", "bench CPU µs/unit"]
        if pg:
            head += ["PG CPU µs/unit (own backends)", "PG CPU µs/unit (all)", "round trips/unit"]
        if backend == "sqlite":
            head += ["longest loop block, ms"]
        head += ["others' CPU %"]
        lines += ["", f"#### {backend}", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "---|" * len(head))
        for windows in sorted(rows, key=lambda w: w[0].unit):
            r = windows[0]
            row = [r.variant, r.unit, str(r.tasks)]
            row += [spread([w.rate for w in windows]), spread([w.cpu_us for w in windows])]
            if pg:
                row += [
                    spread([w.pg_own_us or 0.0 for w in windows]),
                    f"{statistics.median(w.pg_all_us or 0.0 for w in windows):.0f}",
                    f"{statistics.median(w.round_trips or 0.0 for w in windows):.2f}",
                ]
            if backend == "sqlite":
                blocks = [w.longest_block_ms for w in windows if w.longest_block_ms is not None]
                row += [f"{max(blocks):.1f}" if blocks else "—"]
            row += [f"{statistics.median(w.others_pct for w in windows):.0f}"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------


async def run_sqlite(bench: Bench) -> None:
    with tempfile.TemporaryDirectory(prefix="phonebind-drivers-") as tmp:
        path = str(pathlib.Path(tmp) / "bench.db")
        setup = peewee.SqliteDatabase(path, pragmas=SQLITE_PRAGMAS)
        seed(setup, postgres=False)
        bench.committed = 0
        await bench.run_variants("sqlite", sqlite_variants(path), None)
        await sqlite_backoff(bench, path)
        check_consistency(bench, setup, "sqlite")
        setup.close()


async def run_postgres(bench: Bench, base: str) -> str:
    with postgres_database(base) as dsn:
        setup = connect_url(dsn)
        seed(setup, postgres=True)
        version_row = setup.execute_sql("SHOW server_version").fetchone()
        bench.committed = 0
        target = (urlsplit(dsn).path.lstrip("/"), urlsplit(dsn).port or 5432)
        await bench.run_variants("postgresql", postgres_variants(dsn), target)
        bench.bridge_paired = await bridge_paired(bench, dsn, 2 if bench.quick else 8)
        await pipeline_race(bench, dsn, 50 if bench.quick else 300)
        check_consistency(bench, setup, "postgresql")
        setup.close()
        return str(version_row[0])


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short windows: a smoke run")
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    parser.add_argument(
        "--pg-url", default=os.environ.get("PHONEBIND_BENCH_DATABASE_URL", DEFAULT_PG)
    )
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args()
    bench = Bench(args)
    load_start = os.getloadavg()
    started = time.perf_counter()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")

    bridge = await bridge_costs(20_000 if args.quick else 100_000)
    for name, us in bridge.items():
        print(f"  {name}: {us:.2f} µs")
    await loop_floor(bench)
    if args.only != "postgresql":
        await run_sqlite(bench)
    pg_version = None
    if args.only != "sqlite":
        try:
            pg_version = await run_postgres(bench, args.pg_url)
        except psycopg2.OperationalError as error:
            print(f"PostgreSQL skipped: {str(error).strip()}")

    load_end = os.getloadavg()
    info = machine(pg_version)
    print("\n" + "\n".join(f"- {k}: {v}" for k, v in info.items()))
    print(f"- load average at start / end: {load_start[0]:.2f} / {load_end[0]:.2f} (1 min)")
    print(f"- run took {time.perf_counter() - started:.0f} s")
    print("\ngreenlet bridge, CPU µs per operation:")
    for name, us in bridge.items():
        print(f"- {name}: {us:.2f}")
    if bench.bridge_paired:
        print("\ngreenlet bridge over a driver, extra bench CPU (median of paired blocks):\n")
        print("| driver | N | R: µs/unit | W: µs/unit | per statement, µs | per unit, µs |")
        print("|---|---|---|---|---|---|")
        for b in bench.bridge_paired:
            print(
                f"| {b['driver']} | {b['tasks']} | {b['read_us']:.1f} | {b['write_us']:.1f} |"
                f" {b['per_statement_us']:.1f} | {b['per_unit_us']:.1f} |"
            )
    print(markdown(bench.results))
    failed = [name for name, ok, _ in bench.checks if not ok]
    print("\nchecks: " + (f"FAILED: {', '.join(failed)}" if failed else "all passed"))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "load_average": {"start": load_start, "end": load_end},
                    "bridge_us": bridge,
                    "bridge_paired": bench.bridge_paired,
                    "results": [dataclasses.asdict(r) for r in bench.results],
                    "checks": bench.checks,
                },
                indent=2,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
