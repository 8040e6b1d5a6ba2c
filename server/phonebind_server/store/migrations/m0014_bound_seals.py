"""Sealed values bound to their place: every "v1:" value (whose associated
data was the key id only) is resealed as "v2:", bound to its table, column
and row key, so that a value copied into another row no longer opens there.

Outbox texts queued before texts were sealed are sealed too: from now on a
message's text opens only from its own row. It needs the seal keys when there
is anything to reseal; a new database needs none.
"""

from __future__ import annotations

from collections.abc import Callable

from phonebind_server.domain.pii import (
    ACCOUNT_PHONE,
    CHANGE_NEW_PHONE,
    CHANGE_OLD_PHONE,
    OUTBOX_TEXT,
    OUTBOX_TO,
    REBIND_NEW_PHONE,
    SealedColumn,
    Vault,
)
from phonebind_server.store.migrate import MigrationError

# The sealed columns as this migration found them (later migrations add others,
# whose values are bound from the start).
SEALED_COLUMNS = (
    ACCOUNT_PHONE,
    REBIND_NEW_PHONE,
    CHANGE_OLD_PHONE,
    CHANGE_NEW_PHONE,
    OUTBOX_TO,
    OUTBOX_TEXT,
)

NEEDS_SEAL_KEYS = True


def _unbound(db, column: SealedColumn) -> list[tuple[str, str]]:
    """(row key, value) of the values of `column` that still need this migration."""
    # SUBSTR rather than LIKE: a "%" would be a placeholder to psycopg.
    where = f"SUBSTR({column.column}, 1, 3) = 'v1:'"
    if column == OUTBOX_TEXT:
        # Not yet sealed at all: a text queued before texts were sealed. An
        # erased ("") text stays erased.
        where += f" OR ({column.column} <> '' AND SUBSTR({column.column}, 1, 3) <> 'v2:')"
    # Table and column names are the schema's constants, never input.
    sql = f"SELECT {column.row_key}, {column.column} FROM {column.table} WHERE {where}"  # noqa: S608 # nosec B608
    return [(str(row), str(value)) for row, value in db.execute_sql(sql).fetchall()]


def upgrade(db, dialect: str, vault: Callable[[], Vault]) -> None:
    mark = "%s" if dialect == "postgresql" else "?"
    opened: Vault | None = None
    for column in SEALED_COLUMNS:
        rows = _unbound(db, column)
        if not rows:
            continue
        if opened is None:
            try:
                opened = vault()
            except ValueError as error:  # the settings lack a key
                raise MigrationError(
                    f"migration 14 reseals the sealed values of {column.table}.{column.column}"
                    f" and needs the keys: {error}"
                ) from None
        where = f"{column.row_key} = {mark} AND {column.column} = {mark}"
        update = f"UPDATE {column.table} SET {column.column} = {mark} WHERE {where}"  # noqa: S608 # nosec B608
        for row, value in rows:
            place = column.at(row)
            if value.startswith("v1:"):
                plaintext = opened.unseal(value, place, unbound_too=True)
            else:
                plaintext = value
            sealed = opened.seal(plaintext, place)
            if opened.unseal(sealed, place) != plaintext:  # pragma: no cover - AES-GCM
                raise RuntimeError(f"{place}: the resealed value does not open")
            db.execute_sql(update, (sealed, row, value))
