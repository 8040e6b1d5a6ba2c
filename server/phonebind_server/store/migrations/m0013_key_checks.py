"""A check value for every key the servers use (an HMAC of a fixed label under
the key), so that a server or a tool given another key than the one the data
was made with refuses to start instead of quietly going wrong. The first
process to start with a key id records its value."""

STATEMENTS = [
    """CREATE TABLE key_checks (
        purpose VARCHAR(16) NOT NULL,
        key_id VARCHAR(64) NOT NULL,
        check_value VARCHAR(64) NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (purpose, key_id)
    )""",
]


def upgrade(db, dialect: str) -> None:
    for statement in STATEMENTS:
        db.execute_sql(statement)
