"""Production refuses unsafe settings, each with a message naming it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
from support import Serve

from phonebind_server.config import ConfigError, load
from phonebind_server.devcerts import write_dev_certs
from phonebind_server.rpc.auth import new_token, token_digest
from phonebind_server.store import migrate


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def safe(tmp_path) -> dict[str, str]:
    """A complete production configuration, as environment variables."""
    write_dev_certs(str(tmp_path / "certs"))
    callers = tmp_path / "callers.toml"
    callers.write_text(
        '[[caller]]\nname = "app"\nroles = ["flow"]\n'
        f'token_sha256 = "{token_digest(new_token())}"\n',
        encoding="utf-8",
    )
    return {
        "PHONEBIND_LISTEN": "0.0.0.0:50051",
        "PHONEBIND_DATABASE_URL": f"sqlite:///{tmp_path}/p.db",
        "PHONEBIND_SMS_GATEWAY": "https://sms.provider.invalid/send",
        "PHONEBIND_SMS_HTTP_SECRET": "whsec_" + key(),
        "PHONEBIND_INDEX_KEY": key(),
        "PHONEBIND_CODE_KEY": key(),
        "PHONEBIND_SEAL_KEYS": f"k1:{key()}",
        "PHONEBIND_AUDIT_KEY": key(),
        "PHONEBIND_TLS_CERT": str(tmp_path / "certs" / "server.pem"),
        "PHONEBIND_TLS_KEY": str(tmp_path / "certs" / "server-key.pem"),
        "PHONEBIND_CREDENTIALS_FILE": str(callers),
    }


def test_a_complete_production_configuration_loads(safe):
    settings = load(env=safe)
    assert not settings.dev and not settings.reflection
    assert settings.keys().active_seal_key == "k1"


UNSAFE = {
    "development keys": {"PHONEBIND_CODE_KEY": None},
    "TLS is not configured": {"PHONEBIND_TLS_CERT": None, "PHONEBIND_TLS_KEY": None},
    "no caller credentials": {"PHONEBIND_CREDENTIALS_FILE": None},
    "file and log SMS gateways": {"PHONEBIND_SMS_GATEWAY": "log"},
    "needs https": {"PHONEBIND_SMS_GATEWAY": "http://sms.provider.invalid/send"},
    "reflection is on": {"PHONEBIND_REFLECTION": "true"},
    # A bare base64 key signs as well, but providers' tooling expects whsec_.
    "not a Standard Webhooks secret": {"PHONEBIND_SMS_HTTP_SECRET": key()},
}


@pytest.mark.parametrize("problem", sorted(UNSAFE))
def test_production_refuses_each_unsafe_setting(safe, problem):
    env = dict(safe)
    for name, value in UNSAFE[problem].items():
        if value is None:
            env.pop(name)
        else:
            env[name] = value
    if problem == "development keys":
        from phonebind_server.config import DEV_KEYS

        env["PHONEBIND_CODE_KEY"] = DEV_KEYS["code_key"]
    with pytest.raises(ConfigError) as caught:
        load(env=env)
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "spelling"),
    [
        ("PHONEBIND_SEAL_KEYS", lambda dev: "prod:" + dev["seal_keys"].partition(":")[2]),
        (
            "PHONEBIND_SEAL_KEYS",
            lambda dev: f"k1:{base64.b64encode(b'k' * 32).decode()}," + dev["seal_keys"],
        ),
        ("PHONEBIND_CODE_KEY", lambda dev: dev["index_key"]),
        ("PHONEBIND_AUDIT_KEY", lambda dev: dev["code_key"]),
        ("PHONEBIND_SMS_HTTP_SECRET", lambda dev: dev["sms_http_secret"]),
        ("PHONEBIND_SMS_HTTP_SECRET", lambda dev: "whsec_" + dev["audit_key"]),
    ],
    ids=[
        "renamed seal key",
        "dev seal key beside a real one",
        "index key as code key",
        "code key as audit key",
        "dev webhook secret",
        "audit key as webhook secret",
    ],
)
def test_production_refuses_a_development_key_in_any_slot_or_spelling(safe, variable, spelling):
    from phonebind_server.config import DEV_KEYS

    with pytest.raises(ConfigError, match="development keys") as caught:
        load(env={**safe, variable: spelling(DEV_KEYS)})
    assert variable.removeprefix("PHONEBIND_").lower() in str(caught.value)


def test_reflection_can_be_allowed_explicitly(safe):
    settings = load(env={**safe, "PHONEBIND_REFLECTION": "1", "PHONEBIND_ALLOW_REFLECTION": "1"})
    assert settings.reflection


def test_dev_mode_listens_on_loopback_only():
    with pytest.raises(ConfigError, match="loopback"):
        load({"dev": True, "listen": "0.0.0.0:50051"}, env={})
    assert load({"dev": True, "listen": "[::1]:0"}, env={}).dev


@pytest.mark.parametrize("value", ["1", "true", "0"])
def test_development_mode_is_never_read_from_the_environment(safe, value):
    """Only --dev turns it on; a variable that could reach a production host
    unseen is refused, whatever it says, instead of opening the service."""
    with pytest.raises(ConfigError) as caught:
        load(env={**safe, "PHONEBIND_DEV": value})
    assert str(caught.value) == (
        "PHONEBIND_DEV is set: development mode is turned on only by the --dev flag"
        " of the command line; unset it"
    )


def test_development_mode_is_never_read_from_the_config_file(safe, tmp_path):
    path = tmp_path / "phonebind.toml"
    path.write_text('[server]\ndev = true\nlisten = "127.0.0.1:50051"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="turned on only by the --dev flag") as caught:
        load(env={**safe, "PHONEBIND_CONFIG": str(path)})
    assert str(caught.value).startswith(f"{path}: ")
    assert "remove `dev` from [server]" in str(caught.value)
    # The flag, and only the flag, turns it on.
    assert load({"dev": True}, env={}).dev


def test_serve_refuses_dev_from_the_environment_and_says_why(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
    binary = os.path.join(os.path.dirname(sys.executable), "phonebind-server")
    run = subprocess.run(
        [binary, "serve", "--listen", "127.0.0.1:0"],
        env={**env, "PHONEBIND_DEV": "1", "PHONEBIND_DATABASE_URL": f"sqlite:///{tmp_path}/d.db"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "phonebind-server: PHONEBIND_DEV is set: development mode is turned on only by the"
        " --dev flag of the command line; unset it"
    )


def test_dev_mode_says_so_loudly_when_it_starts(tmp_path):
    server = Serve(f"sqlite:///{tmp_path}/d.db", tmp_path, str(tmp_path / "sms.jsonl")).start()
    try:
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    finally:
        assert server.stop() == 0
    loud = [line for line in lines if "DEVELOPMENT MODE (--dev)" in line["message"]]
    assert len(loud) == 1
    assert loud[0]["level"] == "WARNING"
    assert "ANYONE who reaches the port is a caller with every role" in loud[0]["message"]


def test_mutual_tls_needs_tls(safe):
    env = {**safe, "PHONEBIND_TLS_CLIENT_CA": "/x/ca.pem"}
    env.pop("PHONEBIND_TLS_CERT")
    env.pop("PHONEBIND_TLS_KEY")
    with pytest.raises(ConfigError, match="tls"):
        load(env=env)


def test_serve_refuses_to_start_with_a_clear_message(safe):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
    env.update(safe)
    env.pop("PHONEBIND_TLS_CERT")
    env.pop("PHONEBIND_TLS_KEY")
    binary = os.path.join(os.path.dirname(sys.executable), "phonebind-server")
    run = subprocess.run([binary, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "refusing to start outside --dev: TLS is not configured" in run.stderr


def test_migrate_needs_only_the_database(tmp_path):
    """Migrations run before any key, certificate or credential exists."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
    binary = os.path.join(os.path.dirname(sys.executable), "phonebind-server")
    run = subprocess.run(
        [binary, "migrate", "--database-url", f"sqlite:///{tmp_path}/m.db"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    every = [version for version, _ in migrate.available()]
    assert f"applied migrations: {every}" in run.stdout


WEAK_KEYS = {
    "all zeros": bytes(32),
    "one byte repeated": b"\xff" * 32,
    "a short pattern repeated": b"0123456789abcdef" * 2,
    "few distinct bytes": bytes([1, 2, 3, 4, 5, 6, 7, 8] * 3 + [8, 7, 6, 5, 4, 3, 2, 1]),
}


@pytest.mark.parametrize(
    "variable",
    [
        "PHONEBIND_INDEX_KEY",
        "PHONEBIND_CODE_KEY",
        "PHONEBIND_AUDIT_KEY",
        "PHONEBIND_SEAL_KEYS",
        "PHONEBIND_SMS_HTTP_SECRET",
        "PHONEBIND_INDEX_KEYS",
        "PHONEBIND_CODE_KEYS",
        "PHONEBIND_AUDIT_KEYS",
    ],
)
@pytest.mark.parametrize("weak", sorted(WEAK_KEYS))
def test_production_refuses_a_trivially_weak_key_naming_its_setting(safe, variable, weak):
    encoded = base64.b64encode(WEAK_KEYS[weak]).decode()
    prefix = {"PHONEBIND_SEAL_KEYS": "k1:", "PHONEBIND_SMS_HTTP_SECRET": "whsec_"}
    # A key with an id beside a strong one, as during a rotation.
    prefix.update({f"PHONEBIND_{p}_KEYS": "k2:" for p in ("INDEX", "CODE", "AUDIT")})
    value = prefix.get(variable, "") + encoded
    with pytest.raises(ConfigError) as caught:
        load(env={**safe, variable: value})
    name = variable.removeprefix("PHONEBIND_").lower()
    assert f"{name} is a trivially weak key" in str(caught.value)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("PHONEBIND_INDEX_KEY", "PHONEBIND_CODE_KEY"),
        ("PHONEBIND_INDEX_KEY", "PHONEBIND_AUDIT_KEY"),
        ("PHONEBIND_CODE_KEY", "PHONEBIND_AUDIT_KEY"),
        ("PHONEBIND_AUDIT_KEY", "PHONEBIND_SMS_HTTP_SECRET"),
        ("PHONEBIND_INDEX_KEY", "PHONEBIND_CODE_KEYS"),
        ("PHONEBIND_CODE_KEY", "PHONEBIND_AUDIT_KEYS"),
        # A rotation to the key already in use rotates nothing.
        ("PHONEBIND_INDEX_KEY", "PHONEBIND_INDEX_KEYS"),
    ],
)
def test_production_refuses_one_key_in_two_settings_naming_both(safe, first, second):
    # The webhook secret is the same base64 key behind its whsec_ prefix; a
    # further key by id behind its id.
    prefix = {"PHONEBIND_SMS_HTTP_SECRET": "whsec_"}.get(second, "")
    if second.endswith("_KEYS"):
        prefix = "k2:"
    value = prefix + safe[first]
    with pytest.raises(ConfigError) as caught:
        load(env={**safe, second: value})
    names = [v.removeprefix("PHONEBIND_").lower() for v in (first, second)]
    assert f"{names[0]} and {names[1]} hold the same key" in str(caught.value)


def test_the_same_key_for_index_code_and_audit_is_refused_once_per_pair(safe):
    shared = safe["PHONEBIND_INDEX_KEY"]
    with pytest.raises(ConfigError) as caught:
        load(env={**safe, "PHONEBIND_CODE_KEY": shared, "PHONEBIND_AUDIT_KEY": shared})
    message = str(caught.value)
    assert "index_key and code_key hold the same key" in message
    assert "index_key and audit_key hold the same key" in message
    assert "code_key and audit_key hold the same key" in message


def test_random_keys_are_never_judged_weak():
    from phonebind_server.config import weak_key

    assert not any(weak_key(os.urandom(32)) for _ in range(2000))


def test_index_code_and_audit_keys_take_further_keys_by_id(safe):
    other = key()
    loaded = load(env={**safe, "PHONEBIND_INDEX_KEYS": f"k2:{other}"}).keys()
    # Adding a key makes nothing with it until it is named active.
    assert loaded.active_index_key == "k1"
    assert set(loaded.index_keys) == {"k1", "k2"}
    rotated = load(
        env={**safe, "PHONEBIND_INDEX_KEYS": f"k2:{other}", "PHONEBIND_ACTIVE_INDEX_KEY": "k2"}
    ).keys()
    assert rotated.index_key == base64.b64decode(other)
    # Once the old key is dropped, the keys with ids alone suffice.
    alone = {k: v for k, v in safe.items() if k != "PHONEBIND_AUDIT_KEY"}
    assert load(env={**alone, "PHONEBIND_AUDIT_KEYS": f"k2:{other}"}).keys().audit_keys == {
        "k2": base64.b64decode(other)
    }
    for env, message in [
        ({"PHONEBIND_CODE_KEYS": f"k1:{other}"}, "code_keys: the id k1 is code_key's"),
        ({"PHONEBIND_CODE_KEYS": other}, "code_keys: write each key as ID:BASE64"),
        ({"PHONEBIND_ACTIVE_AUDIT_KEY": "k9"}, "active_audit_key 'k9' is not one of"),
        ({"PHONEBIND_INDEX_KEYS": f"k2:{other},k2:{key()}"}, "the id 'k2' is given twice"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load(env={**safe, **env})
        assert message in str(caught.value)
