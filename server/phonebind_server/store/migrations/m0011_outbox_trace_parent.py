"""Each outbox message keeps the W3C traceparent of the RPC that queued it.

The span of its delivery, often in another process and later, links back to
that RPC's span. Empty when tracing was off as it was queued.
"""

STATEMENTS = [
    "ALTER TABLE sms_outbox ADD COLUMN trace_parent VARCHAR(55) NOT NULL DEFAULT ''",
]


def upgrade(db, dialect: str) -> None:
    for statement in STATEMENTS:
        db.execute_sql(statement)
