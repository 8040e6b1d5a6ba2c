"""The README's promises: the grpcurl walkthrough runs, the settings table is complete."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from phonebind_server.config import Settings
from phonebind_server.domain.policy import Policy

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = pathlib.Path(sys.executable).parent


def walkthrough() -> str:
    section = README.split("<!-- walkthrough:start -->")[1].split("<!-- walkthrough:end -->")[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert blocks, "the README has no walkthrough"
    return "\n".join(blocks)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(address: str, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, "the server exited"
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise AssertionError("the server did not become SERVING")


@pytest.fixture
def cli_server(tmp_path):
    """`phonebind-server serve --dev` as `make run` starts it, on a free port."""
    port = free_port()
    (tmp_path / "var").mkdir()
    process = subprocess.Popen(
        [
            str(BIN / "phonebind-server"),
            "serve",
            "--dev",
            "--listen",
            f"127.0.0.1:{port}",
            "--database-url",
            f"sqlite:///{tmp_path}/var/phonebind.db",
            "--sms-gateway",
            f"file:{tmp_path}/var/sms.jsonl",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        yield port, process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def test_grpcurl_walkthrough_finishes_a_rebind(cli_server, tmp_path):
    port, process = cli_server
    script = walkthrough().replace("ADDR=127.0.0.1:50051", f"ADDR=127.0.0.1:{port}")
    script = script.replace('export PATH="$PWD/.venv/bin:$PATH"', f'export PATH="{BIN}:$PATH"')
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "phonebind.v1.BindingService" in out
    assert '"state": "REBIND_STATE_COMPLETED"' in out
    assert '"phoneMasked": "139****9000"' in out or '"phone_masked": "139****9000"' in out
    assert "ACCOUNT_STATE_COOL_OFF" in out
    assert out.count("138****8000") >= 2  # registered, then in the history
    sms = (tmp_path / "var" / "sms.jsonl").read_text(encoding="utf-8").splitlines()
    assert '"CHANGE_NOTICE"' in sms[-1] and "+8613800138000" in sms[-1]

    # SIGTERM drains and exits cleanly; the logs hold no number, ID number or code.
    process.terminate()
    assert process.wait(timeout=30) == 0
    logs = process.stderr.read()
    codes = re.findall(r"验证码 (\d{6})", "\n".join(sms))
    assert len(codes) == 2
    for secret in ["13800138000", "13900139000", "11010519491231002X", *codes]:
        assert secret not in logs


def test_readme_lists_every_setting_and_policy():
    names = {f.name for f in dataclasses.fields(Settings)} - {"policy"}
    names |= {f.name for f in dataclasses.fields(Policy)}
    missing = sorted(n for n in names if f"| `{n}` |" not in README)
    assert not missing, f"README configuration table lacks {missing}"
