"""The reviewer's desk: the old number on each rebind, when each step was
done, every approval, and room for a delegated reviewer's name.

`old_phone_masked` is filled for earlier rebinds from the recorded change
(completed ones) or the account's current number (open ones, whose account
still has the number the rebind moves from); closed, never completed rebinds
keep "" (their account may have changed number since).
"""

STATEMENTS = [
    "ALTER TABLE rebinds ADD COLUMN old_phone_masked VARCHAR(32) NOT NULL DEFAULT ''",
    # "STEP=<microseconds since 1970>,..." in the order the steps were done.
    "ALTER TABLE rebinds ADD COLUMN step_times VARCHAR(256) NOT NULL DEFAULT ''",
    # A JSON list of {"reviewer", "note", "at"}, oldest first.
    "ALTER TABLE rebinds ADD COLUMN approvals TEXT NOT NULL DEFAULT '[]'",
    """UPDATE rebinds SET old_phone_masked = COALESCE(
        (SELECT c.old_phone_masked FROM binding_changes c WHERE c.rebind_id = rebinds.rebind_id),
        CASE WHEN rebinds.state IN ('PENDING', 'AWAITING_REVIEW', 'READY')
             THEN (SELECT a.phone_masked FROM accounts a
                   WHERE a.account_id = rebinds.account_id) END,
        '')""",
    # Rebinds approved before approvals were kept: their one approval.
    """UPDATE rebinds SET approvals = '[{"reviewer": ' || {json_reviewer}
        || ', "note": ' || {json_note} || ', "at": ' || CAST(reviewed_at AS TEXT) || '}]'
        WHERE reviewed_at IS NOT NULL AND state <> 'REJECTED'""",
    # The ready-for-a-decision queue of one account, and of all (oldest first).
    "CREATE INDEX ix_rebinds_account_review ON rebinds (account_id, state, created_at)",
]

# A reviewer is "<caller>:<person>" for a delegating console: up to 128
# characters, as the audit trail's caller column.
WIDEN = {
    "postgresql": ["ALTER TABLE rebinds ALTER COLUMN reviewer TYPE VARCHAR(128)"],
    # SQLite does not enforce VARCHAR lengths.
    "sqlite": [],
}

JSON_TEXT = {
    "postgresql": {
        "json_reviewer": "to_json(reviewer)::text",
        "json_note": "to_json(review_note)::text",
    },
    "sqlite": {"json_reviewer": "json_quote(reviewer)", "json_note": "json_quote(review_note)"},
}


def upgrade(db, dialect: str) -> None:
    for statement in WIDEN[dialect]:
        db.execute_sql(statement)
    json_text = JSON_TEXT[dialect]
    for statement in STATEMENTS:
        for name, expression in json_text.items():
            statement = statement.replace("{" + name + "}", expression)
        db.execute_sql(statement)
