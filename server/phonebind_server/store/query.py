"""Queries written once with peewee, compiled once per store, run many times.

Every statement of the store is a peewee query over the store's own bound
models, with `Param` nodes where values go. Peewee turns it into SQL for the
store's dialect once (quoting, placeholders, FOR UPDATE, ON CONFLICT); the
store keeps the text, the order and converters of its parameters and the
converters of its result columns, and the driver runs it as a prepared
statement with fresh values. Building SQL text anew for every call cost more
than running the statement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import peewee

from .fields import UtcTimestampField

Converter = Callable[[Any], Any]


class Param(peewee.Node):
    """A value supplied when the statement runs, by name. Its converter is the
    compared or assigned column's `db_value`, or `field`'s when given (INSERT
    and UPDATE values, where peewee supplies none)."""

    def __init__(self, name: str, field: peewee.Field | None = None) -> None:
        super().__init__()
        self.name = name
        self.field = field

    def __sql__(self, ctx: peewee.Context) -> peewee.Context:
        converter = self.field.db_value if self.field is not None else ctx.state.converter
        ctx._values.append(_Slot(self.name, converter))
        return ctx.literal(ctx.state.param or "?")


class _Slot:
    """Where a Param's value goes in the compiled statement's arguments."""

    __slots__ = ("converter", "name")

    def __init__(self, name: str, converter: Converter | None) -> None:
        self.name = name
        self.converter = converter


def values(model: type[peewee.Model], names: Sequence[str]) -> dict[peewee.Field, Param]:
    """{column: Param(column name)} for an INSERT or UPDATE of `names`."""
    fields = model._meta.fields
    return {fields[name]: Param(name, fields[name]) for name in names}


@dataclass(frozen=True)
class Compiled:
    sql: str
    # Per placeholder: (name, converter) of a Param, or (None, value) of a
    # constant written into the query.
    params: tuple[tuple[str | None, Any], ...]
    # One converter (or None) per result column, and the columns' names.
    results: tuple[Converter | None, ...]
    columns: tuple[str, ...]

    @property
    def _conversions(self) -> tuple[tuple[int, Converter], ...]:
        # (column index, converter) of the columns that need one.
        found = self.__dict__.get("_found")
        if found is None:
            found = tuple((i, c) for i, c in enumerate(self.results) if c is not None)
            object.__setattr__(self, "_found", found)
        return found

    def arguments(self, given: Mapping[str, Any]) -> list[Any]:
        return [
            constant
            if name is None
            else (constant(given[name]) if constant is not None else given[name])
            for name, constant in self.params
        ]

    def row(self, raw: Sequence[Any]) -> Sequence[Any]:
        conversions = self._conversions
        if not conversions:
            return raw
        row = list(raw)
        for index, convert in conversions:
            value = row[index]
            if value is not None:
                row[index] = convert(value)
        return row


class Query:
    """A statement of the store, built from the store's bound `Tables`.

    `build(tables)` returns a peewee query using `Param` for every value.
    `locks`: the query selects FOR UPDATE where the dialect has row locks
    (PostgreSQL); SQLite's write transactions hold the database's write lock.
    """

    __slots__ = ("build", "locks", "name")

    def __init__(self, name: str, build: Callable[[Any], peewee.Query], *, locks: bool = False):
        self.name = name
        self.build = build
        self.locks = locks

    def __repr__(self) -> str:
        return f"Query({self.name})"

    def compile(self, tables: Any, *, row_locks: bool) -> Compiled:
        query = self.build(tables)
        if self.locks and row_locks:
            query = query.for_update()
        if (
            isinstance(query, peewee.Insert | peewee.Update | peewee.Delete)
            and not query._returning
        ):
            query = query.returning()  # no implicit RETURNING of the primary key
        return compile_query(query)


def compile_query(
    query: peewee.Query,
    results: tuple[Converter | None, ...] | None = None,
    columns: tuple[str, ...] | None = None,
) -> Compiled:
    """`query`'s SQL and how to pass its values and read its rows (`results`
    and `columns`: the result columns' converters and names, when the query's
    own columns do not say)."""
    sql, params = query.sql()
    selected = _selected(query)
    return Compiled(
        sql=sql,
        params=tuple((p.name, p.converter) if isinstance(p, _Slot) else (None, p) for p in params),
        results=results
        if results is not None
        else tuple(
            getattr(column, "python_value", None) if _converts(column) else None
            for column in selected
        ),
        columns=columns
        if columns is not None
        else tuple(_column_name(column) for column in selected),
    )


def _selected(query: peewee.Query) -> list[Any]:
    if isinstance(query, peewee.CompoundSelectQuery):
        return _selected(query.lhs)
    if isinstance(query, peewee.Select):
        return list(query._returning)
    return list(getattr(query, "_returning", None) or ())


def _converts(column: Any) -> bool:
    # Plain text and integer columns come back as they are; skipping their
    # python_value saves a call per column per row.
    if not isinstance(column, peewee.Field):
        return False
    if isinstance(column, UtcTimestampField | peewee.BooleanField):
        return True
    return not isinstance(column, peewee.CharField | peewee.TextField | peewee.IntegerField)


def _column_name(column: Any) -> str:
    if isinstance(column, peewee.Field):
        return column.name
    return getattr(column, "_alias", None) or str(column)
