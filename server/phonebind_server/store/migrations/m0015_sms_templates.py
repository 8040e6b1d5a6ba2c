"""Each outbox message keeps the template its text was rendered from.

Providers that send by registered template get the template id, its language
and its parameters besides the text. The parameters may hold the code, so they
are sealed like the text and erased with it; rows queued before this migration
have none, and go out with their text only.
"""

STATEMENTS = [
    "ALTER TABLE sms_outbox ADD COLUMN template VARCHAR(64) NOT NULL DEFAULT ''",
    "ALTER TABLE sms_outbox ADD COLUMN language VARCHAR(8) NOT NULL DEFAULT ''",
    "ALTER TABLE sms_outbox ADD COLUMN params TEXT NOT NULL DEFAULT ''",
]


def upgrade(db, dialect: str) -> None:
    for statement in STATEMENTS:
        db.execute_sql(statement)
