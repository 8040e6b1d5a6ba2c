"""Applies the numbered migrations in store/migrations, each once, in order.

Safe to run from several processes at once: PostgreSQL serialises runners with
an advisory lock, SQLite with an immediate (write-locking) transaction.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import peewee

from . import migrations
from .fields import from_micros, to_micros
from .models import is_postgres

if TYPE_CHECKING:
    from ..domain.pii import Vault

log = logging.getLogger(__name__)

_NAME = re.compile(r"^m(\d{4})_\w+$")
_LOCK_KEY = 0x70686F6E  # "phon"


def available() -> list[tuple[int, str]]:
    found = []
    for info in pkgutil.iter_modules(migrations.__path__):
        if match := _NAME.match(info.name):
            found.append((int(match.group(1)), info.name))
    return sorted(found)


def applied(db: peewee.Database) -> set[int]:
    if "schema_migrations" not in db.get_tables():
        return set()
    return {row[0] for row in db.execute_sql("SELECT version FROM schema_migrations")}


def pending(db: peewee.Database) -> list[int]:
    done = applied(db)
    return [version for version, _ in available() if version not in done]


AuditKeys = Callable[[], tuple[Mapping[str, bytes], str]]
SealVault = Callable[[], "Vault"]


def migrate(
    db: peewee.Database, audit_keys: AuditKeys | None = None, vault: SealVault | None = None
) -> list[int]:
    """Applies what is pending; returns the versions it applied. `audit_keys()`
    gives the audit keys by id and the active id to a migration that MACs
    existing audit records (one whose module sets NEEDS_AUDIT_KEY); `vault()`
    gives the seal keys to one that reseals stored values (NEEDS_SEAL_KEYS).
    Each asks only when there are such records, so a new database needs no key."""
    dialect = "postgresql" if is_postgres(db) else "sqlite"
    done: list[int] = []
    with db.atomic(**({} if is_postgres(db) else {"lock_type": "IMMEDIATE"})):
        if is_postgres(db):
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        db.execute_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name VARCHAR(128) NOT NULL, applied_at BIGINT NOT NULL)"
        )
        already = applied(db)
        for version, name in available():
            if version in already:
                continue
            module = importlib.import_module(f"{migrations.__name__}.{name}")
            if getattr(module, "NEEDS_AUDIT_KEY", False):
                module.upgrade(db, dialect, audit_keys or _no_keys)
            elif getattr(module, "NEEDS_SEAL_KEYS", False):
                module.upgrade(db, dialect, vault or _no_seal_keys)
            else:
                module.upgrade(db, dialect)
            db.execute_sql(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)"
                if is_postgres(db)
                else "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, to_micros(datetime.now(UTC))),
            )
            log.info("applied migration", extra={"version": version, "migration": name})
            done.append(version)
    return done


class MigrationError(RuntimeError):
    """A migration cannot run on this database; the message says why."""


def _no_keys() -> tuple[Mapping[str, bytes], str]:
    raise MigrationError("audit_key is not set")


def _no_seal_keys() -> Vault:
    raise MigrationError("seal_keys are not set")


def expected_version() -> int:
    """The schema version this code needs: its highest numbered migration."""
    return max((version for version, _ in available()), default=0)


def history(db: peewee.Database) -> list[tuple[int, str, datetime]]:
    """The migrations applied to `db`: version, name and when, oldest first."""
    if "schema_migrations" not in db.get_tables():
        return []
    rows = db.execute_sql(
        "SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
    ).fetchall()
    return [(version, name, from_micros(applied_at)) for version, name, applied_at in rows]
