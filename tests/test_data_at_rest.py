"""Personal data at rest: a copied database shows no number, name or ID number."""

from __future__ import annotations

import base64
import glob
import os
import subprocess
import sys

import psycopg
from conftest import TABLES, start_server
from support import NEW, OLD, e164, rows

from phonebind.v1 import review_service_pb2 as rapi
from phonebind.v1 import review_service_pb2_grpc as rapi_grpc

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
    assert "a value is sealed with an unknown key 'k1'; add that key to seal_keys" in (
        missing.stderr
    )
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
    assert "every sealed value now uses key k2" in rotate.stdout

    # With only the new key, the server still reaches the bound number.
    running = start_server(database_url, tmp_path, clock, secrets_seen, seal_keys=f"k2:{new_key}")
    try:
        sealed = database_text(running)
        assert "v1:k1:" not in sealed and "v1:k2:" in sealed
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
