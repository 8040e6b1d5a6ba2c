"""Mistakes on the command line or in the settings: one clear line on stderr and
exit code 2, never a traceback, for every command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import free_port

from phonebind_server.config import ConfigError, load

BINARY = os.path.join(os.path.dirname(sys.executable), "phonebind-server")


def run(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
    environment.update(env)
    return subprocess.run(
        [BINARY, *args],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def sqlite(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/cli.db"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("migrate", "--database-url", "mysql://db/pb"), {}, "database_url must be sqlite"),
        (("audit", "verify", "--dev", "--database-url", "db.sqlite"), {}, "database_url must be"),
        (("migrate", "--log-level", "verbose"), {}, "log_level must be one of DEBUG, INFO"),
        (("migrate",), {"PHONEBIND_LOG_LEVEL": "loud"}, "log_level must be one of"),
        (("serve", "--dev", "--listen", "127.0.0.1:abc"), {}, "listen must be HOST:PORT"),
        (("serve", "--dev", "--listen", "127.0.0.1:99999"), {}, "port from 0 to 65535"),
        (("serve", "--dev", "--listen", "50051"), {}, "listen must be HOST:PORT"),
        (("serve", "--dev", "--metrics-listen", "foo"), {}, "metrics_listen must be HOST:PORT"),
        (
            ("serve", "--dev", "--workers", "2", "--metrics-listen", "127.0.0.1:0"),
            {},
            "metrics_listen must be HOST:PORT with a port from 1 to 65535",
        ),
        (
            ("serve", "--dev", "--workers", "2", "--metrics-listen", "127.0.0.1:65535"),
            {},
            "metrics_listen: worker 1 would need port 65536",
        ),
        (
            ("serve", "--dev"),
            {"PHONEBIND_TLS_CERT": "junk.pem", "PHONEBIND_TLS_KEY": "junk.pem"},
            "tls_cert: junk.pem holds no PEM certificate",
        ),
        (
            ("serve", "--dev"),
            {"PHONEBIND_TLS_CERT": "missing.pem", "PHONEBIND_TLS_KEY": "junk.pem"},
            "tls_cert: cannot read missing.pem",
        ),
    ],
)
def test_a_mistake_is_one_line_and_exit_2(tmp_path, args, env, message):
    (tmp_path / "junk.pem").write_text("not a certificate\n", encoding="utf-8")
    if "--database-url" not in args:
        args = (*args, "--database-url", sqlite(tmp_path))
    if args[0] == "serve" and "--listen" not in args:
        args = (*args, "--listen", f"127.0.0.1:{free_port()}")
    result = run(tmp_path, *args, **env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("phonebind-server: ") and message in last, result.stderr


def test_a_log_level_in_lower_case_is_fine(tmp_path):
    result = run(tmp_path, "migrate", "--database-url", sqlite(tmp_path), "--log-level", "warning")
    assert result.returncode == 0, result.stderr
    assert load({"log_level": " debug "}, env={}, serving=False).log_level == "DEBUG"


def test_an_ipv6_listen_address_is_accepted():
    settings = load({"dev": True, "listen": "[::1]:50051"}, env={})
    assert settings.listen == "[::1]:50051"
    with pytest.raises(ConfigError, match="listen must be HOST:PORT"):
        load({"dev": True, "listen": "[::1]"}, env={})
