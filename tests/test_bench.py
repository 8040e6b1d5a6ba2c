"""`make bench` in its smoke mode (`--quick`): it runs end to end on both
backends, development and production mode, and reports every figure.

Only the report's structure and that its figures are real numbers are checked:
how fast anything is belongs to `make bench` itself, not to a test.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import PG_ENV

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent
FLOW_RPCS = ("StartRebind", "VerifyIdentity", "SendCode", "VerifyCode", "CompleteRebind")


def positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture
def postgres_base() -> str:
    base = os.environ.get(PG_ENV)
    if not base:
        if os.environ.get("PHONEBIND_REQUIRE_POSTGRES"):
            pytest.fail(f"{PG_ENV} must be set when PHONEBIND_REQUIRE_POSTGRES is")
        pytest.skip(f"PostgreSQL tests skipped: {PG_ENV} is not set")
    return base


def h2load_present() -> None:
    if not (BIN / "h2load").exists() and not shutil.which("h2load"):
        pytest.fail("h2load is missing: `make test` installs it (scripts/install-h2load.sh)")


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "backend, configs",
    [
        ("sqlite", ("sqlite", "sqlite-production")),
        ("postgresql", ("postgresql-1", "postgresql-2", "postgresql-production")),
    ],
)
def test_quick_bench_reports_every_figure(backend, configs, tmp_path, request):
    h2load_present()
    base = request.getfixturevalue("postgres_base") if backend == "postgresql" else "unused"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run_bench.py"),
            "--quick",
            *("--configs", ",".join(configs)),
            *("--database-url", base),
            *("--out", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=840,
        env={k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_BENCH")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "benchmarks.json").read_text(encoding="utf-8"))
    markdown = (tmp_path / "benchmarks.md").read_text(encoding="utf-8")

    assert report["settings"]["quick"] is True
    assert len(report["load_average"]) == 2 and all(len(v) == 3 for v in report["load_average"])
    assert "Load average" in markdown and "## Targets" in markdown
    assert list(report["configurations"]) == list(configs)
    for key, fig in report["configurations"].items():
        assert fig["available"], (key, fig.get("reason"))
        assert report["names"][key] in markdown

        got = fig["get_account"]
        assert positive(got["calls_per_s"]) and positive(got["ratio_to_reference"])
        assert all(positive(v) for v in got["reference_calls_per_s"])
        assert got["failed"] == 0
        # Every GetAccount h2load sent was answered OK (the server's own count).
        assert got["server_calls"] >= got["succeeded"] > 0
        assert got["server_ok"] >= got["server_calls"]
        assert positive(got["server_cpu_us_per_call"])
        assert got["statements"]["statements"] >= 1 and got["statements"]["round_trips"] >= 1

        flow = fig["flow"]
        assert flow["completed"] > 0 and flow["failed"] == 0, flow["errors"]
        assert positive(flow["flows_per_s"])
        cpu = flow["cpu_ms_per_flow"]
        assert positive(cpu["server"]) and positive(cpu["load tool"])
        if backend == "postgresql":
            assert positive(cpu["postgresql backends"])
            assert cpu["postgresql shared"] is not None and cpu["postgresql shared"] >= 0
        else:
            assert cpu["postgresql backends"] is None
        for rpc in FLOW_RPCS:
            counts = flow["statements_per_rpc"][rpc]
            assert counts["statements"] >= counts["round_trips"] >= 1, (key, rpc, counts)
        assert flow["statements_per_flow"] >= flow["round_trips_per_flow"] > 0

        assert len(fig["half_rate"]) == 3
        for run in fig["half_rate"]:
            assert all(positive(run["p99_ms"][rpc]) for rpc in FLOW_RPCS), run
            assert positive(run["flows_per_s"])

        workers = 2 if key == "postgresql-2" else 1
        assert len(fig["rss"]["mb_end"]) == workers
        assert all(positive(v) for v in fig["rss"]["mb_end"].values())
        assert fig["rss"]["rpcs"] > 0

    results = {row["result"] for row in report["targets"]}
    assert results <= {"met", "NOT MET", "n/a"}
    measured = [row for row in report["targets"] if row["configuration"] in configs]
    assert measured and all(
        row["result"] != "n/a" or "soak" in str(row["value"]) for row in measured
    )
