"""What an operator runs: --version, `migrate status`, `config show`, secrets
read from files (*_FILE), the settings in each command's --help, and the
plaintext health port for probes. Each drives the real command in a process."""

from __future__ import annotations

import base64
import dataclasses
import importlib.metadata
import os
import re
import secrets as pysecrets
import subprocess
import sys
import tomllib
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg2
import pytest
from conftest import PG_ENV, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import free_port, rows, wait_serving

from phonebind_server.config import FILE_SETTINGS, SECRET_SETTINGS, Settings, load
from phonebind_server.domain.policy import Policy

BINARY = os.path.join(os.path.dirname(sys.executable), "phonebind-server")
MIGRATIONS = os.path.join(
    os.path.dirname(importlib.import_module("phonebind_server.store").__file__), "migrations"
)


def run(*args: str, cwd=None, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
    environment.update(env)
    return subprocess.run(
        [BINARY, *args], env=environment, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def key() -> str:
    return base64.b64encode(pysecrets.token_bytes(32)).decode()


def one_line_error(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("phonebind-server: ") and message in lines[0], lines[0]


# -- --version ---------------------------------------------------------------------------


def test_version_names_the_package_and_the_schema_it_needs():
    numbers = [
        int(match.group(1))
        for name in os.listdir(MIGRATIONS)
        if (match := re.match(r"^m(\d{4})_\w+\.py$", name))
    ]
    result = run("--version")
    assert result.returncode == 0, result.stderr
    package = importlib.metadata.version("phonebind-server")
    assert result.stdout == f"phonebind-server {package} (database schema {max(numbers)})\n"


# -- migrate status ----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path):
    """The URL of a database with no tables at all (SQLite: no file yet)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/status.db"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        if os.environ.get("PHONEBIND_REQUIRE_POSTGRES"):
            pytest.fail(f"{PG_ENV} must be set when PHONEBIND_REQUIRE_POSTGRES is")
        pytest.skip(f"PostgreSQL tests skipped: {PG_ENV} is not set")
    name = f"phonebind_status_{os.getpid()}_{pysecrets.token_hex(4)}"
    admin = psycopg2.connect(base)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    yield urlunsplit(urlsplit(base)._replace(path="/" + name))
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def status_lines(result: subprocess.CompletedProcess) -> dict[int, str]:
    found = {}
    for line in result.stdout.splitlines():
        if match := re.match(r"^(\d{4}) (\w+)\s+(.*)$", line):
            found[int(match.group(1))] = match.group(3)
    return found


def test_migrate_status_lists_applied_and_pending_and_gates_on_pending(empty_database, tmp_path):
    url = empty_database
    available = sorted(
        int(name[1:5]) for name in os.listdir(MIGRATIONS) if re.match(r"^m\d{4}_", name)
    )

    if url.startswith("sqlite"):
        before = run("migrate", "status", "--database-url", url)
        one_line_error(before, 1, f"no database at {tmp_path}/status.db")
        assert not (tmp_path / "status.db").exists(), "a status check must not create the file"
    else:
        before = run("migrate", "status", "--database-url", url)
        assert before.returncode == 1, before.stderr
        assert status_lines(before) == dict.fromkeys(available, "pending")
        assert f"{len(available)} pending" in before.stdout.splitlines()[-1]
        assert rows(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == []

    assert run("migrate", "--database-url", url).returncode == 0
    after = run("migrate", "status", "--database-url", url)
    assert after.returncode == 0, after.stdout + after.stderr
    states = status_lines(after)
    assert sorted(states) == available
    for state in states.values():
        assert re.fullmatch(r"applied \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", state), state
    assert after.stdout.splitlines()[-1] == (
        f"database schema {available[-1]}, this version needs {available[-1]}: 0 pending"
    )

    # The newest migration's record taken out: pending again, and the gate shuts.
    (newest,) = rows(url, f"SELECT * FROM schema_migrations WHERE version = {available[-1]}")
    run_sql(url, f"DELETE FROM schema_migrations WHERE version = {available[-1]}")
    pending = run("migrate", "status", "--database-url", url)
    assert pending.returncode == 1
    assert status_lines(pending)[available[-1]] == "pending"
    assert pending.stdout.splitlines()[-1].endswith(": 1 pending")

    # A database migrated by a newer release (a rollback): its extra migration is
    # shown, and nothing is pending for this one.
    run_sql(url, f"INSERT INTO schema_migrations VALUES ({newest[0]}, '{newest[1]}', {newest[2]})")
    run_sql(url, "INSERT INTO schema_migrations VALUES (9999, 'm9999_from_the_future', 0)")
    newer = run("migrate", "status", "--database-url", url)
    assert newer.returncode == 0, newer.stdout
    assert status_lines(newer)[9999].startswith("applied, unknown to this version")


def run_sql(url: str, sql: str) -> None:
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            connection.execute(sql)
        return
    connection = psycopg2.connect(url)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(sql)
    connection.close()


def test_migrate_status_of_an_unreachable_database_is_one_line_and_exit_1():
    port = free_port()  # nothing listens there
    result = run("migrate", "status", "--database-url", f"postgresql://pb@127.0.0.1:{port}/pb")
    one_line_error(result, 1, "the database is unreachable")


# -- *_FILE settings ---------------------------------------------------------------------


@pytest.mark.parametrize("name", FILE_SETTINGS)
def test_every_secret_can_come_from_a_file_named_in_the_environment_or_the_config_file(
    tmp_path, name
):
    value = "sqlite:////var/lib/phonebind/pb.db" if name == "database_url" else "k1:" + key()
    path = tmp_path / name
    path.write_text(value + "\n", encoding="utf-8")  # as `echo` and editors write it
    variable = f"PHONEBIND_{name.upper()}_FILE"
    assert getattr(load({}, env={variable: str(path)}, serving=False), name) == value
    config = tmp_path / "pb.toml"
    config.write_text(f'[server]\n{name}_file = "{path}"\n', encoding="utf-8")
    assert getattr(load({"config": str(config)}, env={}, serving=False), name) == value


def test_secret_settings_are_the_keys_and_every_one_has_a_file_form():
    assert set(SECRET_SETTINGS) == {
        "index_key",
        "index_keys",
        "code_key",
        "code_keys",
        "seal_keys",
        "audit_key",
        "audit_keys",
        "sms_http_secret",
    }
    assert set(SECRET_SETTINGS) < set(FILE_SETTINGS)
    assert {f.name for f in dataclasses.fields(Settings)} >= set(FILE_SETTINGS)


def test_a_key_read_from_a_file_is_the_key_the_command_uses(
    database_url, tmp_path, clock, secrets_seen
):
    """The audit trail is written under a key; `audit verify` given that key
    through PHONEBIND_AUDIT_KEY_FILE (with a trailing newline) finds it intact,
    and given another key refuses to run, naming audit_key."""
    audit_key = key()
    running = start_server(
        database_url, tmp_path, clock, secrets_seen, env={"PHONEBIND_AUDIT_KEY": audit_key}
    )
    try:
        running.api.register("ops-1", "13800138601")
    finally:
        running.stop()
    right, wrong = tmp_path / "audit_key", tmp_path / "other_key"
    right.write_text(audit_key + "\n", encoding="utf-8")
    wrong.write_text(key() + "\n", encoding="utf-8")
    verify = ("audit", "verify", "--dev", "--database-url", database_url, "--log-level", "ERROR")

    intact = run(*verify, PHONEBIND_AUDIT_KEY_FILE=str(right))
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert intact.stdout.startswith("ok: ") and " 0 chains" not in intact.stdout
    other = run(*verify, PHONEBIND_AUDIT_KEY_FILE=str(wrong))
    assert other.returncode == 2, other.stdout + other.stderr
    assert "audit_key (key id k1) does not match the key" in other.stderr
    for result in (intact, other):
        assert audit_key not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            lambda d: {"PHONEBIND_CODE_KEY": key(), "PHONEBIND_CODE_KEY_FILE": str(d / "k")},
            "PHONEBIND_CODE_KEY and PHONEBIND_CODE_KEY_FILE are both set; give one of them",
        ),
        (
            lambda d: {"PHONEBIND_CONFIG": toml(d, f'code_key = "{key()}"\ncode_key_file = "k"')},
            "code_key and code_key_file are both set; give one of them",
        ),
        (
            lambda d: {"PHONEBIND_INDEX_KEY_FILE": str(d / "missing")},
            "PHONEBIND_INDEX_KEY_FILE: cannot read {d}/missing: No such file or directory",
        ),
        (
            lambda d: {"PHONEBIND_SEAL_KEYS_FILE": str(d)},
            "PHONEBIND_SEAL_KEYS_FILE: cannot read {d}: Is a directory",
        ),
        (
            lambda d: {"PHONEBIND_AUDIT_KEY_FILE": str(d / "empty")},
            "PHONEBIND_AUDIT_KEY_FILE: {d}/empty is empty",
        ),
        (
            lambda d: {"PHONEBIND_SMS_HTTP_SECRET_FILE": str(d / "binary")},
            "PHONEBIND_SMS_HTTP_SECRET_FILE: {d}/binary is not UTF-8 text",
        ),
        (
            lambda d: {"PHONEBIND_CONFIG": toml(d, 'audit_key_file = "missing"')},
            "audit_key_file in {d}/pb.toml: cannot read missing: No such file",
        ),
        (
            lambda d: {"PHONEBIND_CONFIG": toml(d, "audit_key_file = 7")},
            "{d}/pb.toml: audit_key_file must be the path of a file",
        ),
    ],
)
def test_a_bad_secret_file_is_one_clear_line_and_exit_2(tmp_path, setup, message):
    (tmp_path / "k").write_text(key(), encoding="utf-8")
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00key")
    env = setup(tmp_path)
    for command in (("migrate",), ("config", "show"), ("serve", "--dev")):
        result = run(*command, "--database-url", f"sqlite:///{tmp_path}/pb.db", cwd=tmp_path, **env)
        one_line_error(result, 2, message.format(d=tmp_path))
    assert not (tmp_path / "pb.db").exists()


def toml(directory, server_table: str) -> str:
    path = directory / "pb.toml"
    path.write_text("[server]\n" + server_table + "\n", encoding="utf-8")
    return str(path)


# -- config show -------------------------------------------------------------------------


def production_setup(tmp_path) -> tuple[dict[str, str], dict[str, str]]:
    """Settings a production server accepts, keys spread over every source
    config show names; returns the environment and the secret values."""
    secrets = {name: key() for name in ("index_key", "code_key", "audit_key")}
    secrets["sms_http_secret"] = "whsec_" + key()
    secrets["seal_keys"] = "k1:" + key()
    # A second index key, as during a rotation (not yet active).
    secrets["index_keys"] = "k2:" + key()
    (tmp_path / "index_key").write_text(secrets["index_key"] + "\n", encoding="utf-8")
    (tmp_path / "audit_key").write_text(secrets["audit_key"] + "\n", encoding="utf-8")
    password = pysecrets.token_hex(8)
    secrets["password"] = password
    config = toml(
        tmp_path,
        f'code_key = "{secrets["code_key"]}"\n'
        f'audit_key_file = "{tmp_path}/audit_key"\n'
        'listen = "0.0.0.0:50051"\n'
        'tls_cert = "/etc/phonebind/tls/tls.crt"\n'
        'tls_key = "/etc/phonebind/tls/tls.key"\n'
        "store_connections = 4\n"
        "\n[policy]\n"
        'code_ttl = "3m"\n'
        'allowed_regions = ["CN", "HK"]\n',
    )
    env = {
        "PHONEBIND_CONFIG": config,
        "PHONEBIND_INDEX_KEY_FILE": str(tmp_path / "index_key"),
        "PHONEBIND_SEAL_KEYS": secrets["seal_keys"],
        "PHONEBIND_INDEX_KEYS": secrets["index_keys"],
        "PHONEBIND_SMS_HTTP_SECRET": secrets["sms_http_secret"],
        "PHONEBIND_SMS_GATEWAY": "https://sms.provider.example/send",
        "PHONEBIND_CREDENTIALS_FILE": "/etc/phonebind/callers.toml",
        "PHONEBIND_DATABASE_URL": (
            f"postgresql://phonebind:{password}@db.internal:5432/pb"
            f"?sslmode=verify-full&password={password}"
        ),
        "PHONEBIND_POLICY_HOLD": "48h",
    }
    return env, secrets


def test_config_show_prints_every_setting_its_source_and_no_secret(tmp_path):
    env, secrets = production_setup(tmp_path)
    result = run("config", "show", "--workers", "3", "--log-level", "warning", **env)
    assert result.returncode == 0, result.stdout + result.stderr
    for value in secrets.values():
        assert value not in result.stdout + result.stderr
        assert value.rpartition(":")[2] not in result.stdout + result.stderr

    shown = tomllib.loads(result.stdout)
    sources = {
        (table, match.group(1)): match.group(2)
        for table, text in zip(("server", "policy"), result.stdout.split("[policy]"), strict=True)
        for match in re.finditer(r"^(\w+) = .*  # (.+)$", text, re.MULTILINE)
    }
    # Every setting but dev, which is shown as a comment: no file may set it.
    server_names = [f.name for f in dataclasses.fields(Settings) if f.name not in ("policy", "dev")]
    assert list(shown["server"]) == server_names
    assert "\n# dev = false  # default; only --dev sets it\n" in result.stdout
    assert list(shown["policy"]) == [f.name for f in dataclasses.fields(Policy)]

    config = env["PHONEBIND_CONFIG"]
    assert sources[("server", "workers")] == "flag --workers"
    assert sources[("server", "log_level")] == "flag --log-level"
    assert sources[("server", "listen")] == f"file {config}"
    assert sources[("server", "code_key")] == f"file {config}"
    assert sources[("server", "index_key")] == (
        f"file {tmp_path}/index_key via PHONEBIND_INDEX_KEY_FILE"
    )
    assert sources[("server", "audit_key")] == (
        f"file {tmp_path}/audit_key via audit_key_file in {config}"
    )
    assert sources[("server", "seal_keys")] == "environment PHONEBIND_SEAL_KEYS"
    assert sources[("server", "database_url")] == "environment PHONEBIND_DATABASE_URL"
    assert sources[("server", "grace_seconds")] == "default"
    assert sources[("policy", "code_ttl")] == f"file {config}"
    assert sources[("policy", "hold")] == "environment PHONEBIND_POLICY_HOLD"
    assert sources[("policy", "rebind_ttl")] == "default"

    for name in SECRET_SETTINGS:
        # The code and audit keys with ids are not set here.
        unset = name in ("code_keys", "audit_keys")
        assert shown["server"][name] == ("" if unset else "<redacted>"), name
    assert sources[("server", "index_keys")] == "environment PHONEBIND_INDEX_KEYS"
    assert shown["server"]["active_index_key"] == ""
    assert shown["server"]["database_url"] == (
        "postgresql://phonebind:<redacted>@db.internal:5432/pb"
        "?sslmode=verify-full&password=<redacted>"
    )
    assert shown["server"]["workers"] == 3
    assert shown["server"]["log_level"] == "WARNING"
    assert shown["policy"]["allowed_regions"] == ["CN", "HK"]

    # What it prints is a config file: fed back (with the secrets, which it never
    # prints, put back), it gives the very same settings.
    effective = load({"workers": 3, "log_level": "warning"}, env=env)
    again = dict(shown["server"])
    again.update({name: getattr(effective, name) for name in (*SECRET_SETTINGS, "database_url")})
    document = tmp_path / "again.toml"
    document.write_text(
        "[server]\n"
        + "".join(f"{name} = {toml_value(value)}\n" for name, value in again.items())
        + "[policy]\n"
        + "".join(f"{name} = {toml_value(value)}\n" for name, value in shown["policy"].items()),
        encoding="utf-8",
    )
    assert load({"config": str(document)}, env={}) == effective


def toml_value(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def test_config_show_exits_1_and_says_why_when_serve_would_refuse(tmp_path):
    env, _ = production_setup(tmp_path)
    del env["PHONEBIND_CREDENTIALS_FILE"]
    result = run("config", "show", **env)
    assert result.returncode == 1
    assert result.stdout.startswith("# the settings")
    assert result.stderr.strip() == (
        "phonebind-server: serve would refuse these settings: refusing to start outside"
        " --dev: no caller credentials (set credentials_file)"
    )


def test_config_show_names_the_development_keys_of_dev(tmp_path):
    result = run("config", "show", "--dev")
    assert result.returncode == 0, result.stderr
    for name in SECRET_SETTINGS:
        if name.endswith("_keys") and name != "seal_keys":
            # Further keys by id have no development key.
            assert f'{name} = ""  # default' in result.stdout
        else:
            assert f'{name} = "<redacted>"  # development key (--dev)' in result.stdout
    assert "reflection = true  # on with --dev" in result.stdout
    assert "dev = true  # flag --dev" in result.stdout


# -- --help ------------------------------------------------------------------------------


def help_of(*command: str) -> dict[str, str]:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("\nenvironment (", 1)[1]
    return dict(re.findall(r"^  (PHONEBIND_\w+(?:\[_FILE\])?)\s+(.+)$", table, re.MULTILINE))


def test_serve_and_config_show_help_list_every_variable_with_its_default():
    defaults = Settings()
    for command in (("serve",), ("config", "show")):
        listed = help_of(*command)
        for item in dataclasses.fields(Settings):
            if item.name in ("policy", "dev"):
                continue
            variable = "PHONEBIND_" + item.name.upper()
            if item.name in FILE_SETTINGS:
                variable += "[_FILE]"
            assert variable in listed, (command, variable)
        for item in dataclasses.fields(Policy):
            assert "PHONEBIND_POLICY_" + item.name.upper() in listed
        assert listed["PHONEBIND_LISTEN"] == f"default {defaults.listen}"
        assert listed["PHONEBIND_STORE_CONNECTIONS"] == f"default {defaults.store_connections}"
        # Development mode is the --dev flag only: no variable turns it on.
        assert "PHONEBIND_DEV" not in listed
        assert listed["PHONEBIND_INDEX_KEY[_FILE]"] == "default unset (secret)"
        assert listed["PHONEBIND_POLICY_CODE_TTL"] == "default 5m"
        assert listed["PHONEBIND_POLICY_VIRTUAL_OPERATOR_PREFIXES"] == (
            "default " + ",".join(defaults.policy.virtual_operator_prefixes)
        )


def test_each_tool_help_lists_the_variables_it_reads():
    assert help_of("migrate") == {
        "PHONEBIND_CONFIG": "TOML file of [server] and [policy] keys, as --config",
        "PHONEBIND_DATABASE_URL[_FILE]": f"default {Settings().database_url}",
        "PHONEBIND_LOG_LEVEL": "default INFO",
        # Read only when a migration reseals stored values (m0014).
        "PHONEBIND_INDEX_KEY[_FILE]": "default unset (secret)",
        "PHONEBIND_INDEX_KEYS[_FILE]": "default unset (secret)",
        "PHONEBIND_ACTIVE_INDEX_KEY": "default unset",
        "PHONEBIND_CODE_KEY[_FILE]": "default unset (secret)",
        "PHONEBIND_CODE_KEYS[_FILE]": "default unset (secret)",
        "PHONEBIND_ACTIVE_CODE_KEY": "default unset",
        "PHONEBIND_SEAL_KEYS[_FILE]": "default unset (secret)",
        "PHONEBIND_ACTIVE_SEAL_KEY": "default unset",
        "PHONEBIND_AUDIT_KEY[_FILE]": "default unset (secret)",
        "PHONEBIND_AUDIT_KEYS[_FILE]": "default unset (secret)",
        "PHONEBIND_ACTIVE_AUDIT_KEY": "default unset",
    }
    assert {
        "PHONEBIND_AUDIT_KEY[_FILE]",
        "PHONEBIND_AUDIT_KEYS[_FILE]",
        "PHONEBIND_ACTIVE_AUDIT_KEY",
    } <= set(help_of("audit", "verify"))
    rotate = help_of("rotate-keys")
    assert {
        "PHONEBIND_SEAL_KEYS[_FILE]",
        "PHONEBIND_ACTIVE_SEAL_KEY",
        "PHONEBIND_INDEX_KEYS[_FILE]",
        "PHONEBIND_ACTIVE_INDEX_KEY",
    } <= set(rotate)


# -- the health port -----------------------------------------------------------------------


def check(address: str, service: str) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def test_the_health_port_answers_health_only_in_plaintext_beside_a_tls_port(tmp_path):
    certs = tmp_path / "certs"
    made = run("dev-certs", str(certs))
    assert made.returncode == 0, made.stderr
    listen, health_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
    environment.update(
        PHONEBIND_TLS_CERT=str(certs / "server.pem"),
        PHONEBIND_TLS_KEY=str(certs / "server-key.pem"),
    )
    log = open(tmp_path / "server.log", "w", encoding="utf-8")
    server = subprocess.Popen(
        [
            *(BINARY, "serve", "--dev", "--listen", listen, "--health-listen", health_listen),
            *("--database-url", f"sqlite:///{tmp_path}/pb.db", "--log-level", "WARNING"),
        ],
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_serving(health_listen, server, lambda: (tmp_path / "server.log").read_text())
        assert check(health_listen, "") == "SERVING"
        assert check(health_listen, "liveness") == "SERVING"
        assert check(health_listen, "phonebind.v1.BindingService") == "SERVING"
        assert check(health_listen, "no.such.Service") == "NOT_FOUND"
        # Nothing but health on the plaintext port; the service port speaks TLS only.
        with grpc.insecure_channel(health_listen) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary("/phonebind.v1.BindingService/GetAccount")(b"", timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert check(listen, "") == "UNAVAILABLE"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert server.returncode == 0


def test_liveness_stays_serving_while_the_store_is_away(
    postgres_url, tmp_path, clock, secrets_seen
):
    """Readiness (the name "") turns NOT_SERVING with the database unreachable;
    liveness does not, so an orchestrator does not restart every server while
    the database is away."""
    from conftest import emptied
    from support import wait_until
    from test_faults import server_behind_proxy

    with server_behind_proxy(
        emptied(postgres_url), tmp_path, clock, secrets_seen, health_listen="127.0.0.1:0"
    ) as (proxy, running):
        address = f"127.0.0.1:{running.app.health_port}"
        assert running.app.health_port not in (0, running.app.port)
        assert (check(address, ""), check(address, "liveness")) == ("SERVING", "SERVING")
        proxy.cut()
        wait_until(lambda: check(address, "") == "NOT_SERVING", 5, "readiness NOT_SERVING")
        assert check(address, "liveness") == "SERVING"
        proxy.restore()
        wait_until(lambda: check(address, "") == "SERVING", 5, "readiness SERVING again")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--health-listen", "50052"), "health_listen must be HOST:PORT"),
        (("--listen", "127.0.0.1:50061", "--health-listen", "127.0.0.1:50061"), "port of its own"),
        (("--health-listen", "0.0.0.0:50052"), "--dev listens on loopback only"),
        (("--workers", "2", "--health-listen", "127.0.0.1:0"), "health_listen must be HOST:PORT"),
    ],
)
def test_a_bad_health_listen_is_one_line_and_exit_2(tmp_path, flags, message):
    result = run("serve", "--dev", "--database-url", f"sqlite:///{tmp_path}/pb.db", *flags)
    one_line_error(result, 2, message)
