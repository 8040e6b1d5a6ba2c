"""The initial schema.

Written as DDL rather than from the models, so it stays what it was when the
models change; later migrations alter what this one creates. `{id}` is the
dialect's auto-increment primary key, `{bool}` its boolean.
"""

STATEMENTS = [
    """CREATE TABLE accounts (
        account_id VARCHAR(64) NOT NULL PRIMARY KEY,
        phone_index VARCHAR(64) NOT NULL,
        phone_sealed TEXT NOT NULL,
        phone_masked VARCHAR(32) NOT NULL,
        holder_name_hash VARCHAR(64) NOT NULL,
        holder_name_masked VARCHAR(256) NOT NULL,
        id_number_hash VARCHAR(64) NOT NULL,
        id_number_masked VARCHAR(32) NOT NULL,
        id_province VARCHAR(2) NOT NULL,
        bound_at BIGINT NOT NULL,
        hold_until BIGINT,
        created_at BIGINT NOT NULL
    )""",
    # A number binds to at most one account.
    "CREATE UNIQUE INDEX uq_accounts_phone ON accounts (phone_index)",
    """CREATE TABLE rebinds (
        rebind_id VARCHAR(64) NOT NULL PRIMARY KEY,
        account_id VARCHAR(64) NOT NULL,
        state VARCHAR(16) NOT NULL,
        new_phone_index VARCHAR(64) NOT NULL,
        new_phone_sealed TEXT NOT NULL,
        new_phone_masked VARCHAR(32) NOT NULL,
        old_phone_lost {bool} NOT NULL,
        required_steps VARCHAR(128) NOT NULL,
        completed_steps VARCHAR(128) NOT NULL,
        risk_decision VARCHAR(16) NOT NULL,
        risk_score INTEGER NOT NULL,
        risk_reasons VARCHAR(256) NOT NULL,
        failures INTEGER NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        completed_at BIGINT
    )""",
    "CREATE INDEX ix_rebinds_account ON rebinds (account_id, created_at)",
    # At most one open rebind per account.
    """CREATE UNIQUE INDEX uq_rebinds_open_account ON rebinds (account_id)
        WHERE state IN ('PENDING', 'AWAITING_REVIEW', 'READY')""",
    """CREATE TABLE challenges (
        rebind_id VARCHAR(64) NOT NULL,
        target VARCHAR(16) NOT NULL,
        code_mac VARCHAR(64) NOT NULL,
        state VARCHAR(8) NOT NULL,
        attempts INTEGER NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        resend_at BIGINT NOT NULL,
        PRIMARY KEY (rebind_id, target)
    )""",
    """CREATE TABLE binding_changes (
        seq {id},
        rebind_id VARCHAR(64) NOT NULL UNIQUE,
        account_id VARCHAR(64) NOT NULL,
        old_phone_index VARCHAR(64) NOT NULL,
        old_phone_sealed TEXT NOT NULL,
        old_phone_masked VARCHAR(32) NOT NULL,
        new_phone_index VARCHAR(64) NOT NULL,
        new_phone_sealed TEXT NOT NULL,
        new_phone_masked VARCHAR(32) NOT NULL,
        old_phone_lost {bool} NOT NULL,
        completed_at BIGINT NOT NULL
    )""",
    "CREATE INDEX ix_changes_account ON binding_changes (account_id, seq)",
    "CREATE INDEX ix_changes_old_phone ON binding_changes (old_phone_index, completed_at)",
    """CREATE TABLE sms_outbox (
        seq {id},
        message_id VARCHAR(36) NOT NULL UNIQUE,
        to_index VARCHAR(64) NOT NULL,
        to_sealed TEXT NOT NULL,
        to_masked VARCHAR(32) NOT NULL,
        purpose VARCHAR(32) NOT NULL,
        text TEXT NOT NULL,
        state VARCHAR(8) NOT NULL,
        attempts INTEGER NOT NULL,
        created_at BIGINT NOT NULL,
        next_attempt_at BIGINT NOT NULL,
        not_after BIGINT,
        sent_at BIGINT,
        last_error VARCHAR(256) NOT NULL,
        account_id VARCHAR(64) NOT NULL,
        rebind_id VARCHAR(64) NOT NULL
    )""",
    "CREATE INDEX ix_outbox_due ON sms_outbox (state, next_attempt_at)",
    "CREATE INDEX ix_outbox_to ON sms_outbox (to_index, created_at)",
    """CREATE TABLE idempotency_keys (
        operation VARCHAR(32) NOT NULL,
        account_id VARCHAR(64) NOT NULL,
        request_id VARCHAR(64) NOT NULL,
        fingerprint VARCHAR(64) NOT NULL,
        result TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (operation, account_id, request_id)
    )""",
    "CREATE INDEX ix_idempotency_created ON idempotency_keys (created_at)",
]

DIALECT = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "bool": "INTEGER"},
    "postgresql": {"id": "BIGSERIAL PRIMARY KEY", "bool": "BOOLEAN"},
}


def upgrade(db, dialect: str) -> None:
    for statement in STATEMENTS:
        db.execute_sql(statement.format(**DIALECT[dialect]))
