"""The unit of work: the domain's `Tx` over an engine session.

Writes are queued and sent with the next batch of reads, or with COMMIT;
reads asked for together go in one round trip (see engine.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..domain.context import CallContext
from ..domain.model import OutboundSms
from ..domain.ports import Read
from .engine import Session, Statement
from .query import Compiled, Query

if TYPE_CHECKING:
    from .repositories import (
        AccountRows,
        AuditRows,
        ChallengeRows,
        ChangeRows,
        LimitRows,
        OutboxRows,
        RebindRows,
        RequestRows,
    )

T = TypeVar("T")
Shape = Callable[[Compiled, list[tuple]], Any]


class StatementRead(Read[T], Generic[T]):
    """Runs `query` with `params`; `shape` turns its rows into the result."""

    __slots__ = ("params", "query", "shape")

    def __init__(self, query: Query, params: Mapping[str, Any], shape: Shape) -> None:
        self.query = query
        self.params = params
        self.shape = shape


class Known(Read[T], Generic[T]):
    """A read this unit of work already knows the answer to: no statement."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


class Compiler:
    """Compiles each Query once for one store's tables and dialect."""

    def __init__(self, tables: Any, *, row_locks: bool) -> None:
        self._tables = tables
        self.row_locks = row_locks
        self._compiled: dict[str, Compiled] = {}

    def __call__(self, query: Query) -> Compiled:
        compiled = self._compiled.get(query.name)
        if compiled is None:
            compiled = query.compile(self._tables, row_locks=self.row_locks)
            self._compiled[query.name] = compiled
        return compiled


# The repository classes by Tx attribute (filled in by repositories.py).
REPOSITORIES: dict[str, Callable[[SqlTx], Any]] = {}


class SqlTx:
    """One unit of work. Implements domain.ports.Tx."""

    accounts: AccountRows
    rebinds: RebindRows
    codes: ChallengeRows
    outbox: OutboxRows
    history: ChangeRows
    limits: LimitRows
    audit: AuditRows
    requests: RequestRows

    def __init__(self, compile: Compiler, session: Session, call: CallContext) -> None:
        self.call = call
        self.row_locks = compile.row_locks
        self._compile = compile
        self._session = session
        self._pending: list[Statement] = []
        self.keep_if_caller_gone = False
        # Audit chain heads this unit knows (locked, or written by it).
        self.heads: dict[str, tuple[int, str]] = {}
        # The seq of each chain's next audit event, taken with its locked head.
        self.reserved_seqs: dict[str, int] = {}
        # Messages queued by this unit, handed to the outbox once it commits.
        self.messages: list[OutboundSms] = []

    def __getattr__(self, name: str) -> Any:
        # A repository is made the first time the unit of work asks for it: most
        # use only two or three of them.
        repository = REPOSITORIES.get(name)
        if repository is None:
            raise AttributeError(name)
        made = repository(self)
        setattr(self, name, made)
        return made

    def commit_even_if_caller_gone(self) -> None:
        self.keep_if_caller_gone = True

    def write(self, query: Query, params: Mapping[str, Any]) -> None:
        compiled = self._compile(query)
        self._pending.append((compiled.sql, compiled.arguments(params)))

    def read(self, *reads: Read[Any]) -> tuple[Any, ...]:
        if len(reads) == 1 and not self._pending:
            return (self.one(reads[0]),)
        if all(isinstance(read, Known) for read in reads):
            # Nothing to ask: the writes queued stay queued for the next batch.
            return tuple(read.value for read in reads)
        statements, self._pending = self._pending, []
        want: list[int] = []
        shapes: list[tuple[Compiled, Shape]] = []
        for read in reads:
            if isinstance(read, StatementRead):
                compiled = self._compile(read.query)
                want.append(len(statements))
                shapes.append((compiled, read.shape))
                statements.append((compiled.sql, compiled.arguments(read.params)))
        rows = self._session.run(statements, want) if statements else []
        results: list[Any] = []
        answered = iter(zip(shapes, rows, strict=True))
        for read in reads:
            if isinstance(read, Known):
                results.append(read.value)
            else:
                (compiled, shape), found = next(answered)
                results.append(shape(compiled, found))
        return tuple(results)

    def one(self, read: Read[T]) -> T:
        if isinstance(read, Known):
            return read.value  # type: ignore[no-any-return]
        if self._pending:
            return self.read(read, Known(None))[0]  # type: ignore[no-any-return]
        if not isinstance(read, StatementRead):
            raise TypeError(f"not a read: {read!r}")
        compiled = self._compile(read.query)
        rows = self._session.run(((compiled.sql, compiled.arguments(read.params)),), (0,))[0]
        return read.shape(compiled, rows)  # type: ignore[no-any-return]

    def take_pending(self) -> list[Statement]:
        pending, self._pending = self._pending, []
        return pending


# -- shapes: what a read's rows become ----------------------------------------------


def first(mapper: Callable[[tuple], T]) -> Shape:
    def shape(compiled: Compiled, rows: list[tuple]) -> T | None:
        return mapper(compiled.row(rows[0])) if rows else None

    return shape


def every(mapper: Callable[[tuple], T]) -> Shape:
    def shape(compiled: Compiled, rows: list[tuple]) -> list[T]:
        return [mapper(compiled.row(row)) for row in rows]

    return shape


def value(compiled: Compiled, rows: list[tuple]) -> Any:
    """The first column of the first row, None without rows."""
    return compiled.row(rows[0])[0] if rows else None


def exists(compiled: Compiled, rows: list[tuple]) -> bool:
    return bool(rows)
