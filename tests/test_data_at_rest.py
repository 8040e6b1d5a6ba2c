"""Personal data at rest: a copied database shows no number, name or ID number."""

from __future__ import annotations

import base64
import glob
import os
import sqlite3
import subprocess
import sys

import grpc
import psycopg
import pytest
from conftest import TABLES, start_server
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from support import NEW, OLD, e164, error_details, rows

from phonebind.v1 import review_service_pb2 as rapi
from phonebind.v1 import review_service_pb2_grpc as rapi_grpc
from phonebind_server.domain.pii import OUTBOX_TEXT, OUTBOX_TO, SealError, Vault
from phonebind_server.store.migrations.m0014_bound_seals import SEALED_COLUMNS as M0014_COLUMNS

NAME = "欧阳娜娜"
PHONES = ["13800138801", "13900139801", "13700137801"]


def run_flows(running) -> list[str]:
    """Registers, completes one change and leaves one in review; returns the codes."""
    pb = running.api
    pb.register("rest-1", PHONES[0], name=NAME)
    rebind = pb.ready_rebind("rest-1", PHONES[0], PHONES[1], name=NAME)
    pb.complete("rest-1", rebind.rebind_id)
    lost = pb.start("rest-1", PHONES[2], lost=True)
    pb.identity("rest-1", lost.rebind_id, name=NAME)
    pb.send_and_verify("rest-1", lost.rebind_id, NEW, PHONES[2])
    rapi_grpc.ReviewServiceStub(running.channel).ApproveRebind(
        rapi.ApproveRebindRequest(rebind_id=lost.rebind_id, reviewer="ops")
    )
    running.inbox.wait_for(e164(PHONES[0]), 1, "CHANGE_NOTICE")
    running.snapshot()  # waits until the outbox has delivered everything
    return sorted(v for v in running.secrets.values if len(v) == 6)


def forbidden_values() -> list[str]:
    values = [NAME, "11010519491231002X", "110105194912310"]
    for phone in PHONES:
        values += [phone, "+86" + phone, phone[3:]]
    return values


def database_text(running) -> str:
    """Every row of every table, as text."""
    return repr([rows(running.database_url, f"SELECT * FROM {table}") for table in TABLES])


def table_names(running) -> set[str]:
    """The tables the database holds, but the migration ledger and SQLite's own."""
    if running.database_url.startswith("sqlite"):
        sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    else:
        sql = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    names = [row[0] for row in rows(running.database_url, sql)]
    return {n for n in names if n != "schema_migrations" and not n.startswith("sqlite_")}


def test_no_personal_data_in_clear_in_tables_or_files(server):
    codes = run_flows(server)
    assert codes, "the flow sent codes"
    text = database_text(server)
    for value in forbidden_values() + codes:
        assert value not in text, f"found {value[:3]}… in the tables"
    if server.database_url.startswith("sqlite"):
        path = server.database_url.removeprefix("sqlite:///")
        raw = b"".join(open(f, "rb").read() for f in glob.glob(path + "*"))
    else:
        connection = psycopg.connect(server.database_url)
        with connection.cursor() as cursor:
            raw = b""
            for table in TABLES:
                cursor.execute(f"SELECT row_to_json(t)::text FROM {table} t")
                raw += "".join(r[0] for r in cursor.fetchall()).encode()
        connection.close()
    for value in forbidden_values():
        assert value.encode() not in raw, f"found {value[:3]}… in the database files"
    # The scans read TABLES: a table missing from it would go unsearched.
    assert table_names(server) == set(TABLES)


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def test_rotate_keys_reencrypts_everything_and_the_old_key_can_go(
    database_url, tmp_path, clock, secrets_seen
):
    old_key, new_key = key(), key()
    running = start_server(database_url, tmp_path, clock, secrets_seen, seal_keys=f"k1:{old_key}")
    try:
        run_flows(running)
    finally:
        running.stop()

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")},
        "PHONEBIND_DATABASE_URL": database_url,
        "PHONEBIND_SEAL_KEYS": f"k1:{old_key},k2:{new_key}",
        "PHONEBIND_ACTIVE_SEAL_KEY": "k2",
    }
    binary = os.path.join(os.path.dirname(sys.executable), "phonebind-server")

    def refused(*args: str, **changes: str) -> subprocess.CompletedProcess:
        run = subprocess.run(
            [binary, "rotate-keys", "--dev", *args],
            env={**env, **changes},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "Traceback" not in run.stderr
        assert "every sealed value now uses" not in run.stdout
        return run

    # Without the old key nothing can be re-encrypted; it says which key is missing.
    missing = refused(PHONEBIND_SEAL_KEYS=f"k2:{new_key}")
    assert missing.returncode == 1
    assert "values are sealed with an unknown key 'k1'; add that key to seal_keys" in (
        missing.stderr
    )
    assert "nothing was re-encrypted" in missing.stderr
    for batch in ("0", "-1", "many"):
        assert refused("--batch", batch).returncode == 2

    rotate = subprocess.run(
        [binary, "rotate-keys", "--dev", "--batch", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rotate.returncode == 0, rotate.stderr
    assert "accounts.phone_sealed: 1 re-encrypted" in rotate.stdout
    assert "every sealed value now uses key k2 and opens with it" in rotate.stdout

    # With only the new key, the server still reaches the bound number.
    running = start_server(database_url, tmp_path, clock, secrets_seen, seal_keys=f"k2:{new_key}")
    try:
        sealed = database_text(running)
        assert "v2:k1:" not in sealed and "v2:k2:" in sealed and "v1:" not in sealed
        pb = running.api
        rebind = pb.start("rest-1", "13600136801")
        # The bound number is PHONES[1] (the lost-phone change was approved, never
        # completed). The first run's code to it is in the same inbox file: only
        # one more shows this server unsealed the number.
        bound = e164(PHONES[1])
        before = len(pb.inbox.to(bound, "REBIND_CODE"))
        pb.send("rest-1", rebind.rebind_id, OLD)  # needs the bound number unsealed
        assert len(pb.inbox.wait_for(bound, before + 1, "REBIND_CODE")) == before + 1
    finally:
        running.stop()


# -- sealed values are bound to their row (table, column, row key) ---------------------


def write(url: str, sql: str, *params: object) -> None:
    """One committed statement; `?` is the placeholder on both backends."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=10)
        try:
            with connection:
                connection.execute(sql, params)
        finally:
            connection.close()
        return
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(sql.replace("?", "%s"), params)


def test_a_number_copied_from_another_account_does_not_open(server, caplog):
    """Someone who can write to the database copies another account's sealed
    number into a victim's row: the victim's code must not go to that number."""
    pb = server.api
    pb.register("victim", PHONES[0])
    pb.register("other", PHONES[1])
    (others,) = rows(
        server.database_url, "SELECT phone_sealed FROM accounts WHERE account_id = ?", "other"
    )
    write(
        server.database_url,
        "UPDATE accounts SET phone_sealed = ? WHERE account_id = ?",
        others[0],
        "victim",
    )

    rebind = pb.start("victim", PHONES[2])
    before = server.snapshot()
    with pytest.raises(grpc.RpcError) as caught:
        pb.send("victim", rebind.rebind_id, OLD)
    code, reason, _ = error_details(caught.value)
    assert (code, reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    # Nothing was queued or counted, and the other account's number got nothing.
    assert server.snapshot() == before
    assert pb.inbox.to(e164(PHONES[1]), "REBIND_CODE") == []
    # The log says which value does not open, where, and why; never a number.
    logged = "\n".join(r.getMessage() + str(r.exc_info and r.exc_info[1]) for r in caplog.records)
    assert (
        "accounts.phone_sealed of row 'victim': does not open under key 'dev1': the value was"
        " altered or moved from another row" in logged
    )
    # The other account's own value still opens in its own row.
    other_rebind = pb.start("other", PHONES[2])
    pb.send("other", other_rebind.rebind_id, OLD)
    assert len(pb.inbox.wait_for(e164(PHONES[1]), 1, "REBIND_CODE")) == 1


def seal_v1(key_id: str, key: bytes, plaintext: str) -> str:
    """A value as sealed before values were bound to their row (the key id only)."""
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode(), key_id.encode())
    return f"v1:{key_id}:{base64.urlsafe_b64encode(nonce + sealed).decode()}"


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    binary = os.path.join(os.path.dirname(sys.executable), "phonebind-server")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
    run = subprocess.run(
        [binary, *args], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in run.stderr
    return run


def test_m0014_binds_every_earlier_sealed_value_to_its_row(
    database_url, tmp_path, clock, secrets_seen
):
    seal_key = os.urandom(32)
    keys = {
        "PHONEBIND_INDEX_KEY": key(),
        "PHONEBIND_CODE_KEY": key(),
        "PHONEBIND_AUDIT_KEY": key(),
        "PHONEBIND_SEAL_KEYS": f"k1:{base64.b64encode(seal_key).decode()}",
    }
    settings = {name.removeprefix("PHONEBIND_").lower(): value for name, value in keys.items()}
    running = start_server(database_url, tmp_path, clock, secrets_seen, **settings)
    try:
        run_flows(running)
        # One message waiting, its text still in clear as before texts were sealed.
        pb = running.api
        waiting = pb.start("rest-1", "13600136801")
        vault = Vault(running.app.settings.keys())
    finally:
        running.stop()

    # The database as the previous version left it: every value sealed as v1.
    plaintexts = {}
    for column in M0014_COLUMNS:
        select = f"SELECT {column.row_key}, {column.column} FROM {column.table}"
        for row, token in rows(database_url, select):
            if not token:
                continue  # an erased outbox text
            plaintext = vault.unseal(token, column.at(row))
            plaintexts[(column, row)] = plaintext
            write(
                database_url,
                f"UPDATE {column.table} SET {column.column} = ? WHERE {column.row_key} = ?",
                seal_v1("k1", seal_key, plaintext),
                row,
            )
    write(
        database_url,
        "INSERT INTO sms_outbox (message_id, to_index, to_sealed, to_masked, purpose, text,"
        " state, attempts, created_at, next_attempt_at, last_error, account_id, rebind_id)"
        " VALUES ('m-clear', 'i', ?, '136****6801', 'REBIND_CODE', ?, 'DEAD', 0, 0, 0, '',"
        " 'rest-1', ?)",
        seal_v1("k1", seal_key, "+8613600136801"),
        "【phonebind】a text queued in clear",
        waiting.rebind_id,
    )
    plaintexts[(OUTBOX_TO, "m-clear")] = "+8613600136801"
    plaintexts[(OUTBOX_TEXT, "m-clear")] = "【phonebind】a text queued in clear"
    write(database_url, "DELETE FROM schema_migrations WHERE version = 14")
    assert {column for column, _ in plaintexts} == set(M0014_COLUMNS)

    # Without the keys it says what it needs and changes nothing.
    refused = cli("migrate", env={"PHONEBIND_DATABASE_URL": database_url})
    assert refused.returncode == 2
    assert "migration 14 reseals the sealed values of accounts.phone_sealed and needs the keys" in (
        refused.stderr
    )
    assert all(
        token.startswith("v1:k1:")
        for (token,) in rows(database_url, "SELECT phone_sealed FROM accounts")
    )

    done = cli("migrate", env={"PHONEBIND_DATABASE_URL": database_url, **keys})
    assert done.returncode == 0, done.stderr
    assert "applied migrations: [14]" in done.stdout
    for (column, row), plaintext in plaintexts.items():
        select = f"SELECT {column.column} FROM {column.table} WHERE {column.row_key} = ?"
        ((token,),) = rows(database_url, select, row)
        assert token.startswith("v2:k1:")
        assert vault.unseal(token, column.at(row)) == plaintext
        # Bound to its own row: it opens nowhere else.
        with pytest.raises(SealError, match="moved from another row"):
            vault.unseal(token, column.at(row + "x"))
    assert "v1:" not in database_text_of(database_url)


def database_text_of(url: str) -> str:
    return repr([rows(url, f"SELECT * FROM {table}") for table in TABLES])


def test_rotate_keys_refuses_a_mistyped_key_and_writes_nothing(
    database_url, tmp_path, clock, secrets_seen
):
    old_key, new_key = key(), key()
    typo = base64.b64encode(bytes(a ^ (i == 0) for i, a in enumerate(base64.b64decode(new_key))))
    running = start_server(database_url, tmp_path, clock, secrets_seen, seal_keys=f"k1:{old_key}")
    try:
        run_flows(running)
    finally:
        running.stop()
    # The servers now seal with k2; one of them registers an account.
    both = {"seal_keys": f"k1:{old_key},k2:{new_key}", "active_seal_key": "k2"}
    running = start_server(database_url, tmp_path, clock, secrets_seen, **both)
    try:
        running.api.register("rest-2", "13500135801", name=NAME)
    finally:
        running.stop()
    before = database_text_of(database_url)
    assert "v2:k2:" in before and "v2:k1:" in before

    env = {
        "PHONEBIND_DATABASE_URL": database_url,
        "PHONEBIND_SEAL_KEYS": f"k1:{old_key},k2:{typo.decode()}",
        "PHONEBIND_ACTIVE_SEAL_KEY": "k2",
    }
    # The servers recorded k2's check value: the typo is refused by it at once.
    refused = cli("rotate-keys", "--dev", env=env)
    assert refused.returncode == 2, refused.stderr
    assert "seal_keys (key id k2) does not match the key" in refused.stderr
    assert database_text_of(database_url) == before
    # Were k2 not recorded yet, opening every value first finds the typo.
    write(database_url, "DELETE FROM key_checks WHERE purpose = 'seal' AND key_id = 'k2'")
    before = database_text_of(database_url)
    mistyped = cli("rotate-keys", "--dev", env=env)
    assert mistyped.returncode == 1
    assert "key 'k2' does not open 1 values sealed under it" in mistyped.stderr
    assert "nothing was re-encrypted" in mistyped.stderr
    assert "every sealed value" not in mistyped.stdout
    assert database_text_of(database_url) == before

    right = cli("rotate-keys", "--dev", env={**env, "PHONEBIND_SEAL_KEYS": both["seal_keys"]})
    assert right.returncode == 0, right.stderr
    assert "every sealed value now uses key k2 and opens with it" in right.stdout
    assert "v2:k1:" not in database_text_of(database_url)
