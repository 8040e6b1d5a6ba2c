"""The head of each account's audit chain moves onto the account's row.

Every unit of work that appends to an account's chain locks the account's row
first, so the head read there costs no statement of its own, and no second
row lock.
"""

STATEMENTS = [
    "ALTER TABLE accounts ADD COLUMN audit_seq BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE accounts ADD COLUMN audit_mac VARCHAR(64) NOT NULL DEFAULT ''",
    "ALTER TABLE accounts ADD COLUMN audit_head_mac VARCHAR(64) NOT NULL DEFAULT ''",
    """UPDATE accounts SET
        audit_seq = COALESCE((SELECT h.chain_seq FROM audit_heads h
                              WHERE h.chain_id = 'account:' || accounts.account_id), 0),
        audit_mac = COALESCE((SELECT h.last_mac FROM audit_heads h
                              WHERE h.chain_id = 'account:' || accounts.account_id), ''),
        audit_head_mac = COALESCE((SELECT h.mac FROM audit_heads h
                                   WHERE h.chain_id = 'account:' || accounts.account_id), '')""",
    # Only the heads now kept on an account row; any other stays for verification.
    """DELETE FROM audit_heads
        WHERE chain_id IN (SELECT 'account:' || account_id FROM accounts)""",
]


def upgrade(db, dialect: str) -> None:
    for statement in STATEMENTS:
        db.execute_sql(statement)
