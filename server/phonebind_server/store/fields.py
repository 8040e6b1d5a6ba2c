"""Column types shared by the models."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import peewee

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class UtcTimestampField(peewee.BigIntegerField):
    """A timezone-aware UTC datetime stored as integer microseconds since 1970.

    Integers compare and index the same way on SQLite and PostgreSQL, with no
    driver guessing at time zones.
    """

    def db_value(self, value: datetime | None) -> int | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC timestamp column")
        delta = value - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds

    def python_value(self, value: int | None) -> datetime | None:
        if value is None:
            return None
        return _EPOCH + timedelta(microseconds=value)


def to_micros(value: datetime) -> int:
    return UtcTimestampField().db_value(value)  # type: ignore[return-value]


def from_micros(value: int) -> datetime:
    return UtcTimestampField().python_value(value)  # type: ignore[return-value]
