"""The hot statements, compiled once per database and run with fresh parameters.

Peewee builds the SQL text of every query anew; on the hot paths that costs
more than running the statement (profiled: about two thirds of GetAccount's
time in the store). These are the same statements the models describe,
generated from the models' metadata once and cached. Rows come back as plain
namespaces with each field's python_value applied, so the mapping code reads
them as it reads model instances.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import peewee

from .db import is_postgres

# Statements are built from the models' table and column names only; every
# value is a bound parameter (hence the nosec B608 / S608 markers).


def _quote(name: str) -> str:
    return f'"{name}"'


class Statements:
    def __init__(self, db: peewee.Database) -> None:
        self._db = db
        self._param = db.param
        self._postgres = is_postgres(db)
        self._sql: dict[tuple[Any, ...], str] = {}

    def _fields(self, model: type[peewee.Model], names: Sequence[str]) -> list[peewee.Field]:
        return [model._meta.fields[name] for name in names]

    def _where(self, model: type[peewee.Model], by: Sequence[str]) -> str:
        return " AND ".join(
            f"{_quote(model._meta.fields[n].column_name)} = {self._param}" for n in by
        )

    def select_one(
        self,
        model: type[peewee.Model],
        by: Sequence[str],
        values: Sequence[Any],
        *,
        lock: bool = False,
        columns: Sequence[str] | None = None,
    ) -> SimpleNamespace | None:
        """The row whose `by` fields equal `values`, FOR UPDATE when `lock` (PostgreSQL)."""
        lock = lock and self._postgres
        names = tuple(columns or (f.name for f in model._meta.sorted_fields))
        key = ("select", model, tuple(by), lock, names)
        sql = self._sql.get(key)
        if sql is None:
            selected = ", ".join(_quote(f.column_name) for f in self._fields(model, names))
            sql = (
                f"SELECT {selected} FROM {_quote(model._meta.table_name)} "  # nosec B608
                f"WHERE {self._where(model, by)} LIMIT 1" + (" FOR UPDATE" if lock else "")
            )
            self._sql[key] = sql
        params = [f.db_value(v) for f, v in zip(self._fields(model, by), values, strict=True)]
        row = self._db.execute_sql(sql, params).fetchone()
        if row is None:
            return None
        return SimpleNamespace(
            **{
                f.name: f.python_value(v)
                for f, v in zip(self._fields(model, names), row, strict=True)
            }
        )

    def fetch(self, sql: str, params: Sequence[Any], *, lock: bool = False) -> list[tuple]:
        """Rows of a fixed SQL text written with `?` placeholders (FOR UPDATE when
        `lock`, on PostgreSQL). Values must already be in their column form."""
        lock = lock and self._postgres
        key = ("fetch", sql, lock)
        text = self._sql.get(key)
        if text is None:
            text = sql.replace("?", self._param) + (" FOR UPDATE" if lock else "")
            self._sql[key] = text
        return self._db.execute_sql(text, list(params)).fetchall()

    def _insert(
        self, model: type[peewee.Model], values: Mapping[str, Any], ignore_conflict: bool
    ) -> tuple[str, list[Any]]:
        names = tuple(values)
        key = ("insert", model, names, ignore_conflict)
        sql = self._sql.get(key)
        if sql is None:
            fields = self._fields(model, names)
            sql = (
                f"INSERT INTO {_quote(model._meta.table_name)} "  # nosec B608
                f"({', '.join(_quote(f.column_name) for f in fields)}) "
                f"VALUES ({', '.join([self._param] * len(fields))})"
                + (" ON CONFLICT DO NOTHING" if ignore_conflict else "")
            )
            self._sql[key] = sql
        return sql, [f.db_value(values[f.name]) for f in self._fields(model, names)]

    def _update(
        self,
        model: type[peewee.Model],
        by: Sequence[str],
        key_values: Sequence[Any],
        values: Mapping[str, Any],
    ) -> tuple[str, list[Any]]:
        names = tuple(values)
        key = ("update", model, tuple(by), names)
        sql = self._sql.get(key)
        if sql is None:
            assignments = ", ".join(
                f"{_quote(f.column_name)} = {self._param}" for f in self._fields(model, names)
            )
            sql = (
                f"UPDATE {_quote(model._meta.table_name)} SET {assignments} "  # nosec B608
                f"WHERE {self._where(model, by)}"
            )
            self._sql[key] = sql
        params = [f.db_value(values[f.name]) for f in self._fields(model, names)]
        params += [f.db_value(v) for f, v in zip(self._fields(model, by), key_values, strict=True)]
        return sql, params

    def insert(
        self,
        model: type[peewee.Model],
        values: Mapping[str, Any],
        *,
        ignore_conflict: bool = False,
    ) -> None:
        """INSERT one row; with `ignore_conflict`, a clash with a unique key is no error."""
        self._db.execute_sql(*self._insert(model, values, ignore_conflict))

    def update(
        self,
        model: type[peewee.Model],
        by: Sequence[str],
        key_values: Sequence[Any],
        values: Mapping[str, Any],
    ) -> int:
        """Sets `values` on the rows whose `by` fields equal `key_values`; the row count."""
        return self._db.execute_sql(*self._update(model, by, key_values, values)).rowcount

    def insert_and_update(
        self,
        model: type[peewee.Model],
        row: Mapping[str, Any],
        update_model: type[peewee.Model],
        by: Sequence[str],
        key_values: Sequence[Any],
        values: Mapping[str, Any],
    ) -> None:
        """`insert(model, row)`, then `update(update_model, ...)`. On PostgreSQL
        both go in one statement (the INSERT in a WITH), so one round trip."""
        insert_sql, insert_params = self._insert(model, row, False)
        update_sql, update_params = self._update(update_model, by, key_values, values)
        if self._postgres:
            self._db.execute_sql(
                f"WITH inserted AS ({insert_sql}) {update_sql}", insert_params + update_params
            )
        else:
            self._db.execute_sql(insert_sql, insert_params)
            self._db.execute_sql(update_sql, update_params)

    def upsert(
        self, model: type[peewee.Model], conflict: Sequence[str], values: Mapping[str, Any]
    ) -> None:
        """INSERT, or on a `conflict` key clash UPDATE the other columns (both dialects)."""
        names = tuple(values)
        key = ("upsert", model, tuple(conflict), names)
        sql = self._sql.get(key)
        if sql is None:
            fields = self._fields(model, names)
            target = ", ".join(_quote(model._meta.fields[c].column_name) for c in conflict)
            updates = ", ".join(
                f"{_quote(f.column_name)} = EXCLUDED.{_quote(f.column_name)}"
                for f in fields
                if f.name not in conflict
            )
            sql = (
                f"INSERT INTO {_quote(model._meta.table_name)} "  # nosec B608
                f"({', '.join(_quote(f.column_name) for f in fields)}) "
                f"VALUES ({', '.join([self._param] * len(fields))}) "
                f"ON CONFLICT ({target}) "
                f"DO UPDATE SET {updates}"
            )
            self._sql[key] = sql
        params = [f.db_value(values[f.name]) for f in self._fields(model, names)]
        self._db.execute_sql(sql, params)
