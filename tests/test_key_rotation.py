"""The index, code and audit keys rotate with key ids, as the seal keys do.

Blind indexes are re-derived by `rotate-keys` from the sealed numbers; name and
ID-number hashes, which cannot be, are checked under their own key and hashed
again under the active one at the account's next successful identity check;
a code verifies under the key that MAC'd it; an audit event under its key id.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from datetime import timedelta

import grpc
import pytest
from conftest import start_server
from support import NEW, OLD, e164, error_details, rows

BIN = os.path.join(os.path.dirname(sys.executable), "phonebind-server")
# Every column holding a blind index, by table.
INDEX_COLUMNS = {
    "accounts": ["phone_index"],
    "rebinds": ["new_phone_index"],
    "binding_changes": ["old_phone_index", "new_phone_index"],
    "sms_outbox": ["to_index"],
}
PHONE_A, PHONE_B, PHONE_C, PHONE_D = "13800138811", "13900139811", "13700137811", "13600136811"


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
    run = subprocess.run(
        [BIN, *args], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in run.stderr, run.stderr
    return run


def as_env(settings: dict[str, str], database_url: str) -> dict[str, str]:
    return {
        "PHONEBIND_DATABASE_URL": database_url,
        **{f"PHONEBIND_{name.upper()}": value for name, value in settings.items()},
    }


def index_key_ids(database_url: str) -> dict[str, set[str]]:
    """The key ids the stored blind indexes name, by table.column."""
    found = {}
    for table, columns in INDEX_COLUMNS.items():
        for column in columns:
            values = rows(database_url, f"SELECT {column} FROM {table}")
            found[f"{table}.{column}"] = {value.partition(":")[0] for (value,) in values}
    return found


def identity_hashes(database_url: str, account_id: str) -> tuple[str, str]:
    [found] = rows(
        database_url,
        "SELECT holder_name_hash, id_number_hash FROM accounts WHERE account_id = ?",
        account_id,
    )
    return found


def phase(tmp_path, name: str):
    """A directory of its own for one server's SMS file: each server's inbox
    then holds only the codes it sent."""
    path = tmp_path / name
    path.mkdir()
    return path


def refused_reason(call) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return error_details(caught.value)[1]


@pytest.fixture
def index_keys() -> dict[str, dict[str, str]]:
    old, new = key(), key()
    return {
        "before": {"index_key": old},
        "during": {"index_key": old, "index_keys": f"k2:{new}", "active_index_key": "k2"},
        "only_new": {"index_keys": f"k2:{new}"},
    }


def bound_before_rotation(database_url, tmp_path, clock, secrets_seen, keys) -> None:
    """Under k1 alone: rot-1 changes from PHONE_A to PHONE_B (so every index
    column holds values), rot-2 is registered with PHONE_C."""
    running = start_server(
        database_url, phase(tmp_path, "server1"), clock, secrets_seen, **keys["before"]
    )
    try:
        pb = running.api
        pb.register("rot-1", PHONE_A)
        rebind = pb.ready_rebind("rot-1", PHONE_A, PHONE_B)
        pb.complete("rot-1", rebind.rebind_id)
        pb.register("rot-2", PHONE_C)
        running.inbox.wait_for(e164(PHONE_A), 1, "CHANGE_NOTICE")
        running.snapshot()
    finally:
        running.stop()
    assert set().union(*index_key_ids(database_url).values()) == {"k1"}


def test_rotating_the_index_key_keeps_numbers_unique_and_rederives_every_index(
    database_url, tmp_path, clock, secrets_seen, index_keys
):
    bound_before_rotation(database_url, tmp_path, clock, secrets_seen, index_keys)

    # Every server now makes indexes with k2; rotate-keys has not run yet.
    running = start_server(
        database_url, phase(tmp_path, "server2"), clock, secrets_seen, **index_keys["during"]
    )
    try:
        pb = running.api
        # PHONE_B is bound to rot-1 under k1: no second account gets it.
        assert refused_reason(lambda: pb.register("rot-3", PHONE_B)) == "PHONE_IN_USE"
        # Nor by a change: told once the new number's code proved possession.
        rebind = pb.start("rot-2", PHONE_B)
        pb.identity("rot-2", rebind.rebind_id)
        pb.send_and_verify("rot-2", rebind.rebind_id, OLD, PHONE_C)
        pb.send("rot-2", rebind.rebind_id, NEW)
        code = pb.inbox.next_code(e164(PHONE_B))
        assert (
            refused_reason(lambda: pb.verify("rot-2", rebind.rebind_id, NEW, code))
            == "PHONE_IN_USE"
        )
        # A number new to the service is indexed under k2.
        pb.register("rot-4", PHONE_D)
        running.snapshot()
    finally:
        running.stop()
    assert index_key_ids(database_url)["accounts.phone_index"] == {"k1", "k2"}

    env = as_env(index_keys["during"], database_url)
    rotate = cli("rotate-keys", "--dev", "--batch", "2", env=env)
    assert rotate.returncode == 0, rotate.stderr
    assert "accounts.phone_index: 2 re-derived under key k2" in rotate.stdout
    assert "every blind index now uses index key k2 and matches its row's number" in (rotate.stdout)
    # rot-1's name and ID-number hashes are still k1's (rot-2's identity check
    # hashed its own again): they are counted, not an error.
    assert "name and ID-number hashes still under other index keys: k1: 2." in rotate.stdout
    assert set().union(*index_key_ids(database_url).values()) == {"k2"}
    again = cli("rotate-keys", "--dev", env=env)
    assert again.returncode == 0, again.stderr
    assert "accounts.phone_index: 0 re-derived" in again.stdout

    # After the rotation, with the new index key alone, PHONE_B is still taken.
    running = start_server(
        database_url, phase(tmp_path, "server3"), clock, secrets_seen, **index_keys["only_new"]
    )
    try:
        assert refused_reason(lambda: running.api.register("rot-3", PHONE_B)) == "PHONE_IN_USE"
        assert refused_reason(lambda: running.api.register("rot-5", PHONE_D)) == "PHONE_IN_USE"
        assert running.api.get_account("rot-1").phone_masked.endswith(PHONE_B[-4:])
    finally:
        running.stop()


def test_an_identity_hashed_under_the_old_index_key_verifies_and_is_hashed_again(
    database_url, tmp_path, clock, secrets_seen, index_keys
):
    bound_before_rotation(database_url, tmp_path, clock, secrets_seen, index_keys)
    before = identity_hashes(database_url, "rot-2")
    assert [h.partition(":")[0] for h in before] == ["k1", "k1"]

    running = start_server(
        database_url, phase(tmp_path, "server4"), clock, secrets_seen, **index_keys["during"]
    )
    try:
        pb = running.api
        rebind = pb.start("rot-2", PHONE_D)
        # A wrong answer changes nothing.
        assert (
            refused_reason(lambda: pb.identity("rot-2", rebind.rebind_id, name="李四"))
            == "IDENTITY_MISMATCH"
        )
        assert identity_hashes(database_url, "rot-2") == before
        pb.identity("rot-2", rebind.rebind_id)
    finally:
        running.stop()
    after = identity_hashes(database_url, "rot-2")
    assert [h.partition(":")[0] for h in after] == ["k2", "k2"]
    # rot-1 proved nothing since: its hashes stay k1's.
    assert [h.partition(":")[0] for h in identity_hashes(database_url, "rot-1")] == ["k1", "k1"]

    # Under the new key alone the re-hashed identity still verifies.
    running = start_server(
        database_url, phase(tmp_path, "server5"), clock, secrets_seen, **index_keys["only_new"]
    )
    try:
        rebind = running.api.start("rot-2", PHONE_A)
        running.api.identity("rot-2", rebind.rebind_id)
    finally:
        running.stop()


def test_a_code_sent_under_the_old_code_key_verifies_after_a_restart_with_a_new_one(
    database_url, tmp_path, clock, secrets_seen
):
    old, new = key(), key()
    running = start_server(
        database_url, phase(tmp_path, "server6"), clock, secrets_seen, code_key=old
    )
    try:
        pb = running.api
        pb.register("code-1", PHONE_A)
        rebind = pb.start("code-1", PHONE_B)
        pb.identity("code-1", rebind.rebind_id)
        pb.send("code-1", rebind.rebind_id, OLD)
        code = pb.inbox.next_code(e164(PHONE_A))
    finally:
        running.stop()
    [(mac,)] = rows(database_url, "SELECT code_mac FROM challenges")
    assert mac.startswith("k1:")

    rotated = {"code_key": old, "code_keys": f"k2:{new}", "active_code_key": "k2"}
    running = start_server(database_url, phase(tmp_path, "server7"), clock, secrets_seen, **rotated)
    try:
        pb = running.api
        pb.verify("code-1", rebind.rebind_id, OLD, code)
        pb.send("code-1", rebind.rebind_id, NEW)
        new_code = pb.inbox.next_code(e164(PHONE_B))
    finally:
        running.stop()
    macs = dict(rows(database_url, "SELECT target, code_mac FROM challenges"))
    assert {target: mac.partition(":")[0] for target, mac in macs.items()} == {
        "OLD_PHONE": "k1",
        "NEW_PHONE": "k2",
    }

    # Once the old key is dropped, only codes MAC'd with the new one verify.
    running = start_server(
        database_url, phase(tmp_path, "server8"), clock, secrets_seen, code_keys=f"k2:{new}"
    )
    try:
        running.api.verify("code-1", rebind.rebind_id, NEW, new_code)
    finally:
        running.stop()


def test_audit_events_verify_under_the_key_they_name(database_url, tmp_path, clock, secrets_seen):
    old, new = key(), key()
    running = start_server(
        database_url, phase(tmp_path, "server9"), clock, secrets_seen, audit_key=old
    )
    try:
        running.api.register("audit-1", PHONE_A)
    finally:
        running.stop()
    rotated = {"audit_key": old, "audit_keys": f"k2:{new}", "active_audit_key": "k2"}
    running = start_server(
        database_url, phase(tmp_path, "server10"), clock, secrets_seen, **rotated
    )
    try:
        running.api.start("audit-1", PHONE_B)
        running.api.register("audit-2", PHONE_C)
    finally:
        running.stop()
    key_ids = rows(database_url, "SELECT DISTINCT key_id FROM audit_events")
    assert sorted(kid for (kid,) in key_ids) == ["k1", "k2"]

    verified = cli("audit", "verify", "--dev", env=as_env(rotated, database_url))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("ok:") or "\nok:" in verified.stdout

    # Without k1 the events it MAC'd cannot be verified: the report names the key.
    without_old = {"audit_keys": f"k2:{new}"}
    missing = cli("audit", "verify", "--dev", env=as_env(without_old, database_url))
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "audit key 'k1', which is not configured" in missing.stdout


def test_rotate_keys_rederives_indexes_only_under_the_servers_index_key(
    database_url, tmp_path, clock, secrets_seen, index_keys
):
    bound_before_rotation(database_url, tmp_path, clock, secrets_seen, index_keys)
    before = {name: rows(database_url, f"SELECT * FROM {name}") for name in INDEX_COLUMNS}
    env = as_env(index_keys["during"], database_url)

    # No server has started with k2: it may be mistyped here, so nothing is re-derived.
    unknown = cli("rotate-keys", "--dev", env=env)
    assert unknown.returncode == 1, unknown.stdout + unknown.stderr
    assert "index key 'k2' (active_index_key) has no recorded check value" in unknown.stderr
    assert {name: rows(database_url, f"SELECT * FROM {name}") for name in INDEX_COLUMNS} == before

    start_server(
        database_url, phase(tmp_path, "with-k2"), clock, secrets_seen, **index_keys["during"]
    ).stop()
    # A server recorded k2's check value: another key under that id is refused.
    mistyped = cli("rotate-keys", "--dev", env={**env, "PHONEBIND_INDEX_KEYS": f"k2:{key()}"})
    assert mistyped.returncode == 2, mistyped.stdout + mistyped.stderr
    assert "index_keys (key id k2) does not match the key" in mistyped.stderr
    assert {name: rows(database_url, f"SELECT * FROM {name}") for name in INDEX_COLUMNS} == before

    right = cli("rotate-keys", "--dev", env=env)
    assert right.returncode == 0, right.stderr
    assert set().union(*index_key_ids(database_url).values()) == {"k2"}


def test_codes_sent_to_a_number_count_against_its_cap_under_every_index_key(
    database_url, tmp_path, clock, secrets_seen, index_keys
):
    cap = {"PHONEBIND_POLICY_SENDS_PER_NUMBER_HOUR": "2"}
    running = start_server(
        database_url, phase(tmp_path, "k1"), clock, secrets_seen, env=cap, **index_keys["before"]
    )
    try:
        pb = running.api
        pb.register("cap-1", PHONE_A)
        rebind = pb.start("cap-1", PHONE_B)
        pb.identity("cap-1", rebind.rebind_id)
        pb.send("cap-1", rebind.rebind_id, NEW)
        clock.advance(timedelta(seconds=61))
        pb.send("cap-1", rebind.rebind_id, NEW)
        running.snapshot()
    finally:
        running.stop()

    running = start_server(
        database_url, phase(tmp_path, "k2"), clock, secrets_seen, env=cap, **index_keys["during"]
    )
    try:
        pb = running.api
        # A new rebind indexes PHONE_B under k2; its two codes went out under k1.
        rebind = pb.start("cap-1", PHONE_B)
        pb.identity("cap-1", rebind.rebind_id)
        assert refused_reason(lambda: pb.send("cap-1", rebind.rebind_id, NEW)) == "RATE_LIMITED"
    finally:
        running.stop()
    [(new_index,)] = rows(
        database_url, "SELECT new_phone_index FROM rebinds WHERE rebind_id = ?", rebind.rebind_id
    )
    assert new_index.startswith("k2:")
