"""Mistakes on the command line or in the settings: one clear line on stderr and
exit code 2, never a traceback, for every command."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
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
            ("serve", "--dev", "--workers", "2", "--listen", "unix:pb.sock"),
            {},
            "several workers share a TCP port",
        ),
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


def test_addresses_and_levels_that_work_in_production_are_accepted():
    assert load({"log_level": "warn"}, env={}, serving=False).log_level == "WARNING"
    assert load({"log_level": "fatal"}, env={}, serving=False).log_level == "CRITICAL"
    for listen in ("0.0.0.0:50051", "[::]:50051", "phonebind.internal:50051", "unix:/run/pb.sock"):
        assert load({"dev": False, "listen": listen}, env={}, serving=False).listen == listen
    assert load({"dev": True, "metrics_listen": ":9464"}, env={}).metrics_listen == ":9464"


def test_a_server_on_a_unix_socket_answers_health(tmp_path):
    """A sidecar (Envoy, a mesh) may reach phonebind over a Unix socket."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    socket_path = tmp_path / "pb.sock"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
    server = subprocess.Popen(
        [
            *(BINARY, "serve", "--dev", "--listen", f"unix:{socket_path}"),
            *("--database-url", sqlite(tmp_path), "--log-level", "WARNING"),
        ],
        env=environment,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0
