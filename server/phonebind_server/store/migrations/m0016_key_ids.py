"""Blind indexes, identity hashes and code MACs name the key that made them.

Each such value becomes "<key id>:<hex>", so that the index, code and audit
keys rotate as the seal keys do (audit events carry their key id already).
Every existing value was made with the single key of its setting, whose id
is k1. The columns widen to hold a key id of up to 16 characters.
"""

# (table, column) of every value made with the index key or the code key.
KEYED_COLUMNS = [
    ("accounts", "phone_index"),
    ("accounts", "holder_name_hash"),
    ("accounts", "id_number_hash"),
    ("rebinds", "new_phone_index"),
    ("binding_changes", "old_phone_index"),
    ("binding_changes", "new_phone_index"),
    ("sms_outbox", "to_index"),
    ("challenges", "code_mac"),
]
# "k1:" and 64 hex digits, with room for a key id of 16 characters.
WIDTH = 81


def upgrade(db, dialect: str) -> None:
    for table, column in KEYED_COLUMNS:
        if dialect == "postgresql":  # SQLite does not enforce a VARCHAR's length
            # A longer VARCHAR rewrites neither the table nor its indexes.
            db.execute_sql(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE VARCHAR({WIDTH})")
        # Table and column names from the list above.
        update = f"UPDATE {table} SET {column} = 'k1:' || {column} WHERE {column} <> ''"  # noqa: S608  # nosec B608
        db.execute_sql(update)
