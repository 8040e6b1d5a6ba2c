"""Reviews on rebinds, the per-account identity lockout and its failure log."""

STATEMENTS = [
    "ALTER TABLE rebinds ADD COLUMN reviewer VARCHAR(64) NOT NULL DEFAULT ''",
    "ALTER TABLE rebinds ADD COLUMN review_note VARCHAR(512) NOT NULL DEFAULT ''",
    "ALTER TABLE rebinds ADD COLUMN reviewed_at BIGINT",
    # Rebinds that need a reviewer, in the order the console lists them.
    "CREATE INDEX ix_rebinds_review ON rebinds (state, created_at)",
    "ALTER TABLE accounts ADD COLUMN rebind_locked_until BIGINT",
    """CREATE TABLE identity_failures (
        seq {id},
        account_id VARCHAR(64) NOT NULL,
        rebind_id VARCHAR(64) NOT NULL,
        failed_at BIGINT NOT NULL
    )""",
    "CREATE INDEX ix_identity_failures_account ON identity_failures (account_id, failed_at)",
]

DIALECT = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"id": "BIGSERIAL PRIMARY KEY"},
}


def upgrade(db, dialect: str) -> None:
    for statement in STATEMENTS:
        db.execute_sql(statement.format(**DIALECT[dialect]))
