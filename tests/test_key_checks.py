"""A server or tool given another key than the one the data was made with
refuses to start, naming the setting; the database keeps only check values."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from conftest import start_server
from support import rows

from phonebind_server.config import DEV_KEYS
from phonebind_server.domain.pii import KeyMismatch

BIN = os.path.dirname(sys.executable)


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


OTHER_KEY = {
    "index_key": lambda: {"PHONEBIND_INDEX_KEY": key()},
    "code_key": lambda: {"PHONEBIND_CODE_KEY": key()},
    "audit_key": lambda: {"PHONEBIND_AUDIT_KEY": key()},
    # The same id as the development seal key, another key.
    "seal_keys": lambda: {"PHONEBIND_SEAL_KEYS": "dev1:" + key()},
}


def used_once(database_url, tmp_path, clock, secrets_seen) -> None:
    running = start_server(database_url, tmp_path, clock, secrets_seen)
    try:
        running.api.register("kc-1", "13800138801")
    finally:
        running.stop()


@pytest.mark.parametrize("setting", sorted(OTHER_KEY))
def test_a_server_refuses_to_start_with_another_key_naming_the_setting(
    database_url, tmp_path, clock, secrets_seen, setting
):
    used_once(database_url, tmp_path, clock, secrets_seen)
    with pytest.raises(KeyMismatch) as caught:
        start_server(database_url, tmp_path, clock, secrets_seen, env=OTHER_KEY[setting]())
    assert f"{setting} (key id " in str(caught.value)
    assert [c.setting for c in caught.value.mismatched] == [setting]
    # The right keys still start it.
    start_server(database_url, tmp_path, clock, secrets_seen).stop()


def test_the_database_holds_a_check_value_per_key_and_no_key(
    database_url, tmp_path, clock, secrets_seen
):
    used_once(database_url, tmp_path, clock, secrets_seen)
    # A new seal key id beside the old one is recorded at its first start.
    seal_keys = f"{DEV_KEYS['seal_keys']},k2:{key()}"
    start_server(
        database_url, tmp_path, clock, secrets_seen, env={"PHONEBIND_SEAL_KEYS": seal_keys}
    ).stop()
    recorded = rows(database_url, "SELECT purpose, key_id, check_value FROM key_checks")
    assert sorted((purpose, kid) for purpose, kid, _ in recorded) == [
        ("audit", "k1"),
        ("code", "k1"),
        ("index", "k1"),
        ("seal", "dev1"),
        ("seal", "k2"),
    ]
    keys = [base64.b64decode(v.rpartition(":")[2]) for v in DEV_KEYS.values()]
    for _, _, value in recorded:
        assert all(k.hex() != value and base64.b64encode(k).decode() != value for k in keys)


def command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
    return subprocess.run(
        [os.path.join(BIN, "phonebind-server"), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_and_the_key_commands_refuse_another_key(database_url, tmp_path, clock, secrets_seen):
    used_once(database_url, tmp_path, clock, secrets_seen)
    dev = ("--dev", "--database-url", database_url, "--log-level", "ERROR")
    serve = command("serve", *dev, "--listen", "127.0.0.1:0", env=OTHER_KEY["code_key"]())
    assert serve.returncode == 2, serve.stdout + serve.stderr
    assert "code_key (key id k1) does not match the key" in serve.stderr
    rotate = command("rotate-keys", *dev, env=OTHER_KEY["index_key"]())
    assert rotate.returncode == 2, rotate.stdout + rotate.stderr
    assert "index_key (key id k1) does not match the key" in rotate.stderr
    verify = command("audit", "verify", *dev, env=OTHER_KEY["audit_key"]())
    assert verify.returncode == 2, verify.stdout + verify.stderr
    assert "audit_key (key id k1) does not match the key" in verify.stderr
    assert command("audit", "verify", *dev, env={}).returncode == 0
