"""The hash-chained audit trail and the head row of each chain."""

STATEMENTS = [
    """CREATE TABLE audit_events (
        seq {id},
        chain_id VARCHAR(80) NOT NULL,
        chain_seq BIGINT NOT NULL,
        at BIGINT NOT NULL,
        caller VARCHAR(128) NOT NULL,
        rpc VARCHAR(128) NOT NULL,
        request_id VARCHAR(64) NOT NULL,
        action VARCHAR(64) NOT NULL,
        outcome VARCHAR(64) NOT NULL,
        account_id VARCHAR(64) NOT NULL,
        rebind_id VARCHAR(64) NOT NULL,
        details TEXT NOT NULL,
        prev_mac VARCHAR(64) NOT NULL,
        mac VARCHAR(64) NOT NULL
    )""",
    "CREATE UNIQUE INDEX uq_audit_chain_seq ON audit_events (chain_id, chain_seq)",
    "CREATE INDEX ix_audit_account ON audit_events (account_id, seq)",
    "CREATE INDEX ix_audit_at ON audit_events (at)",
    """CREATE TABLE audit_heads (
        chain_id VARCHAR(80) NOT NULL PRIMARY KEY,
        chain_seq BIGINT NOT NULL,
        last_mac VARCHAR(64) NOT NULL,
        mac VARCHAR(64) NOT NULL
    )""",
]

DIALECT = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"id": "BIGSERIAL PRIMARY KEY"},
}


def upgrade(db, dialect: str) -> None:
    for statement in STATEMENTS:
        db.execute_sql(statement.format(**DIALECT[dialect]))
