"""The README's promises: the grpcurl walkthrough runs, the settings table is complete."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest
from support import Serve

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


@pytest.fixture
def cli_server(tmp_path, secrets_seen):
    """`phonebind-server serve --dev` as `make run` starts it, on a free port."""
    (tmp_path / "var").mkdir()
    server = Serve(
        f"sqlite:///{tmp_path}/var/phonebind.db",
        tmp_path,
        f"{tmp_path}/var/sms.jsonl",
        secrets=secrets_seen,
    ).start()
    try:
        yield server
    finally:
        server.kill()


def test_grpcurl_walkthrough_finishes_a_rebind(cli_server, tmp_path, secrets_seen):
    script = walkthrough().replace("ADDR=127.0.0.1:50051", f"ADDR={cli_server.address}")
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

    # SIGTERM drains and exits cleanly; the logs hold no number, ID number or code
    # (the SMS file's numbers and codes are among the secrets searched for).
    assert cli_server.stop() == 0
    assert len(re.findall(r"验证码 (\d{6})", "\n".join(sms))) == 2
    secrets_seen.add("11010519491231002X")
    leaked = secrets_seen.leaked(cli_server.log().splitlines())
    assert not leaked, f"a secret reached the logs: {leaked[0][:200]}"


def test_grpcurl_describes_the_error_reasons(cli_server):
    run = subprocess.run(
        [
            str(BIN / "grpcurl"),
            "-plaintext",
            cli_server.address,
            "describe",
            "phonebind.v1.ErrorReason",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "ERROR_REASON_CODE_MISMATCH = 10;" in run.stdout


def test_readme_lists_every_setting_and_policy():
    names = {f.name for f in dataclasses.fields(Settings)} - {"policy"}
    names |= {f.name for f in dataclasses.fields(Policy)}
    missing = sorted(n for n in names if f"| `{n}` |" not in README)
    assert not missing, f"README configuration table lacks {missing}"
