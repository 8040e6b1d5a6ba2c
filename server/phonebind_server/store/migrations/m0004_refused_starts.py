"""Starts refused because the new number is bound elsewhere: they count towards
the daily cap on rebind starts, so an account cannot probe numbers without limit."""

STATEMENTS = [
    """CREATE TABLE refused_starts (
        seq {id},
        account_id VARCHAR(64) NOT NULL,
        refused_at BIGINT NOT NULL
    )""",
    "CREATE INDEX ix_refused_starts_account ON refused_starts (account_id, refused_at)",
]

DIALECT = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"id": "BIGSERIAL PRIMARY KEY"},
}


def upgrade(db, dialect: str) -> None:
    for statement in STATEMENTS:
        db.execute_sql(statement.format(**DIALECT[dialect]))
