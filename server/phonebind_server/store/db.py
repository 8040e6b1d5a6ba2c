"""Opening the database named by a URL, for SQLite (WAL) or PostgreSQL.

The models are declared without a database (deferred initialisation, as in
peewee's docs) and bound to the one opened here when the store starts.
"""

from __future__ import annotations

import logging

import peewee
from playhouse.db_url import connect

# Peewee logs each statement with its parameters at DEBUG; those include sealed
# numbers and outbox texts with codes, so its logger never goes below INFO.
logging.getLogger("peewee").setLevel(logging.INFO)

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "foreign_keys": 1,
    # Erased outbox texts (which held codes) are overwritten, not just unlinked.
    "secure_delete": 1,
}


def open_database(
    url: str,
    *,
    max_connections: int = 32,
    lock_timeout: float = 10.0,
    cursor_factory: type | None = None,
) -> peewee.Database:
    """`lock_timeout` (seconds) bounds a wait on a lock held by another session:
    SQLite's busy_timeout, and the wait for a free pooled PostgreSQL connection
    (PostgreSQL's own lock_timeout is set per transaction, see the store).
    `cursor_factory`: the psycopg2 cursor class of PostgreSQL connections."""
    lock_ms = max(1, round(lock_timeout * 1000))
    if url.startswith("sqlite:"):
        return connect(url, pragmas={**SQLITE_PRAGMAS, "busy_timeout": lock_ms})
    if is_postgres_url(url):
        url = url.replace("postgres://", "postgresql://", 1)
        pooled = "postgresql+pool://" + url[len("postgresql://") :]
        extra = {"cursor_factory": cursor_factory} if cursor_factory else {}
        return connect(
            pooled,
            **extra,
            max_connections=max_connections,
            stale_timeout=300,
            # Waiting for a free pooled connection counts as waiting on a lock.
            timeout=lock_timeout,
            # A database host that vanishes (dropped packets, no RST) is noticed
            # by the kernel within seconds instead of hanging calls for minutes.
            connect_timeout=3,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=2,
            tcp_user_timeout=5000,
        )
    raise ValueError("database URL must start with sqlite:/// or postgresql://")


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgres://", "postgresql://"))


def is_postgres(db: peewee.Database) -> bool:
    return isinstance(db, peewee.PostgresqlDatabase)


def describe(url: str) -> str:
    """The URL without a password or query parameters (which may hold one), for logs."""
    url = url.split("?", 1)[0]
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return url
