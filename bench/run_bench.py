"""`make bench`: phonebind's throughput and latency, measured against its own health check.

For each configuration (SQLite; PostgreSQL with 1 worker; PostgreSQL with 2
workers) this starts a fresh server, on a fresh database, as
`phonebind-server serve --dev` with the file SMS gateway, and runs
`phonebind-load` against it, one scenario after the other on the same server:

1. `grpc.health.v1.Health/Check`, the baseline;
2. `GetAccount` on registered accounts;
3. complete rebind flows, closed loop (the peak);
4. the same flows paced to half that peak rate (the latency figures);
5. flows and GetAccount again until the server has answered 100 000 RPCs,
   with each worker's RSS taken after every run (the memory figures).

Every RPC's throughput is given as a ratio of the health check's, at the same
client concurrency on the same server. It prints a table and writes
docs/benchmarks.md, docs/benchmarks.json and docs/benchmark-latency.png.

Sends load only to servers it starts itself on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"

HEALTH = "Health/Check"
GET_ACCOUNT = "GetAccount"
FLOW_RPCS = ("StartRebind", "VerifyIdentity", "SendCode", "VerifyCode", "CompleteRebind")

# The targets of issue 5.
GET_ACCOUNT_RATIO = 0.70
FLOW_RATIO = 0.35
P99_AT_HALF_PEAK_MS = 25.0
RSS_PER_WORKER_MB = 150.0
SOAK_RPCS = 100_000
# "Not growing": what RSS may still add during the soak, once every code path
# has run. A leak of a few hundred bytes per call adds tens of MB over it.
RSS_GROWTH_MB = 5.0
SOAK_ROUNDS_MAX = 12
PG_SCALING = 1.3


@dataclass
class Config:
    key: str
    name: str
    database: str  # "sqlite" or "postgresql"
    workers: int


CONFIGS = (
    Config("sqlite", "SQLite, 1 worker", "sqlite", 1),
    Config("postgresql-1", "PostgreSQL, 1 worker", "postgresql", 1),
    Config("postgresql-2", "PostgreSQL, 2 workers", "postgresql", 2),
)


@dataclass
class Result:
    config: Config
    available: bool = True
    reason: str = ""
    runs: dict[str, Any] = field(default_factory=dict)
    rss_before: dict[str, float] = field(default_factory=dict)
    rss_after: dict[str, float] = field(default_factory=dict)
    # (RPCs answered so far, RSS in MB of each server process) after each run.
    rss_checkpoints: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    soak_from: int = 0  # the checkpoint the soak starts from
    seconds: float = 0.0


class Unavailable(Exception):
    """This configuration cannot be measured here (and is reported as such)."""


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- the machine -----------------------------------------------------------------


def _first(path: str, prefix: str) -> str:
    with contextlib.suppress(OSError):
        for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip() if ":" in line else line[len(prefix) :]
    return "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(pg_version: str | None) -> dict[str, Any]:
    mem_kb = _first("/proc/meminfo", "MemTotal").split()[0]
    os_name = _first("/etc/os-release", "PRETTY_NAME=").strip('"')
    return {
        "cpu": _first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem_kb) / 1024 / 1024, 1) if mem_kb.isdigit() else None,
        "os": f"{os_name}, Linux {platform.release()}",
        "python": platform.python_version(),
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "peewee": _version("peewee"),
        "psycopg": _version("psycopg"),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": pg_version or "not available",
    }


# -- servers -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listeners(port: int) -> int:
    """How many sockets listen on ``port`` (one per SO_REUSEPORT worker)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in pathlib.Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    total += 1
    return total


def rss_mb(pid: int) -> float | None:
    value = _first(f"/proc/{pid}/status", "VmRSS")
    return round(int(value.split()[0]) / 1024, 1) if value != "unknown" else None


def children(pid: int) -> list[int]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append(int(entry.name))
    return sorted(found)


def server_processes(process: subprocess.Popen[bytes], workers: int) -> dict[str, int]:
    """The server's processes by role: its workers, and the supervisor of several."""
    if workers == 1:
        return {"worker 1": process.pid}
    found = {"supervisor": process.pid}
    for pid in children(process.pid):
        with contextlib.suppress(OSError):
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:  # not e.g. multiprocessing's resource tracker
                found[f"worker {len(found)}"] = pid
    return found


def server_memory(process: subprocess.Popen[bytes], workers: int) -> dict[str, float]:
    """RSS in MB of each server process."""
    memory = {}
    for role, pid in server_processes(process, workers).items():
        value = rss_mb(pid)
        if value is not None:
            memory[role] = value
    return memory


def cpu_seconds(process: subprocess.Popen[bytes], workers: int) -> dict[str, float]:
    """User and system CPU time each server process has used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for role, pid in server_processes(process, workers).items():
        with contextlib.suppress(OSError):
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            used[role] = (int(fields[11]) + int(fields[12])) / ticks
    return used


def machine_seconds() -> tuple[float, float]:
    """CPU time the whole machine has spent busy (all cores, every process) so far,
    and the time the hypervisor took from it (steal)."""
    fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def server_env() -> dict[str, str]:
    # The flags alone configure the server: no PHONEBIND_* setting leaks in.
    return {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}


@contextlib.contextmanager
def postgres_database(base: str) -> Iterator[str]:
    import psycopg

    name = f"phonebind_bench_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(base, connect_timeout=5)
    except psycopg.Error as error:
        raise Unavailable(f"PostgreSQL unreachable ({str(error).strip()})") from None
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(base)._replace(path="/" + name))
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def postgres_version(base: str) -> str | None:
    try:
        import psycopg

        connection = psycopg.connect(base, connect_timeout=5)
    except Exception:  # noqa: BLE001 - reported as "not available"
        return None
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            return str(cursor.fetchone()[0])
    finally:
        connection.close()


@contextlib.contextmanager
def database(config: Config, workdir: pathlib.Path, pg_base: str) -> Iterator[str]:
    if config.database == "sqlite":
        yield f"sqlite:///{workdir}/phonebind.db"
    else:
        with postgres_database(pg_base) as url:
            yield url


def wait_serving(address: str, process: subprocess.Popen[bytes], workers: int) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = int(address.rsplit(":", 1)[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return
        if listeners(port) >= workers:
            try:
                with grpc.insecure_channel(address) as channel:
                    answer = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    time.sleep(0.5)  # let every worker finish starting
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.1)
    raise Unavailable("the server did not become SERVING within 60 s")


@contextlib.contextmanager
def server(
    config: Config, url: str, workdir: pathlib.Path
) -> Iterator[tuple[str, subprocess.Popen[bytes], pathlib.Path]]:
    migrate = subprocess.run(  # noqa: S603 - the venv's own phonebind-server
        [
            str(BIN / "phonebind-server"),
            "migrate",
            "--dev",
            "--database-url",
            url,
            "--log-level",
            "WARNING",
        ],
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=120,
    )
    if migrate.returncode != 0:
        raise Unavailable(f"migrate failed: {migrate.stderr.strip()[-300:]}")
    port = free_port()
    address = f"127.0.0.1:{port}"
    sms = workdir / "sms.jsonl"
    command = [
        str(BIN / "phonebind-server"),
        "serve",
        "--dev",
        "--listen",
        address,
        "--database-url",
        url,
        "--sms-gateway",
        f"file:{sms}",
        "--log-level",
        "WARNING",
    ]
    if config.workers > 1:
        command += ["--workers", str(config.workers)]
    stderr_path = workdir / "server.err"
    with open(workdir / "server.out", "wb") as out, open(stderr_path, "wb") as err:
        process = subprocess.Popen(  # noqa: S603 - as above
            command, stdout=out, stderr=err, env=server_env(), cwd=workdir
        )
    try:
        wait_serving(address, process, config.workers)
        if process.poll() is not None:
            stderr = stderr_path.read_text(errors="replace")
            if process.returncode == 2 and (
                "unrecognized arguments" in stderr or "usage:" in stderr
            ):
                raise Unavailable(
                    f"not available: this phonebind-server does not accept "
                    f"--workers {config.workers}"
                )
            raise Unavailable(
                f"the server exited with {process.returncode}: {stderr.strip()[-300:]}"
            )
        yield address, process, sms
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- measuring ---------------------------------------------------------------------


@dataclass
class Settings:
    duration: float
    warmup: float
    concurrency: int
    processes: int
    soak_rpcs: int = SOAK_RPCS


def load(
    address: str, scenario: str, settings: Settings, *extra: str, duration: float | None = None
) -> dict[str, Any]:
    seconds = duration or settings.duration
    command = [
        str(BIN / "phonebind-load"),
        *("--target", address, "--scenario", scenario),
        *("--concurrency", str(settings.concurrency), "--processes", str(settings.processes)),
        *("--duration", f"{seconds:g}", "--warmup", f"{settings.warmup:g}"),
        "--json",
        "--no-progress",
        *extra,
    ]
    done = subprocess.run(  # noqa: S603 - the venv's own phonebind-load
        command, capture_output=True, text=True, timeout=seconds + settings.warmup + 300
    )
    if done.returncode != 0:
        raise RuntimeError(f"phonebind-load {scenario} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def measure(config: Config, settings: Settings, pg_base: str) -> Result:
    result = Result(config)
    started = time.monotonic()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"phonebind-bench-{config.key}-"))
    try:
        with (
            database(config, workdir, pg_base) as url,
            server(config, url, workdir) as (address, process, sms),
        ):

            def run(name: str, scenario: str, *extra: str) -> dict[str, Any]:
                before, wall = cpu_seconds(process, config.workers), time.monotonic()
                machine_before = machine_seconds()
                summary = load(address, scenario, settings, *extra)
                after, wall = cpu_seconds(process, config.workers), time.monotonic() - wall
                # The whole machine (servers, load tool, PostgreSQL): near the core
                # count, more workers have no CPU left to use.
                busy, steal = (
                    (b - a) / wall for a, b in zip(machine_before, machine_seconds(), strict=True)
                )
                summary["machine_cpu_cores"] = round(busy, 2)
                # A shared host may take CPU from this machine mid-run; the figures
                # of a run with much steal are low.
                summary["steal_cpu_cores"] = round(steal, 2)
                # Server CPU while the load tool ran (setup and warm-up included),
                # in cores: about 1 per worker means the workers were CPU-bound.
                cores = {k: round((v - before.get(k, 0.0)) / wall, 2) for k, v in after.items()}
                summary["server_cpu_cores"] = round(sum(cores.values()), 2)
                summary["server_cpu_cores_by_process"] = cores
                result.runs[name] = summary
                # Calls counted by the load tool; its warm-up calls are not, so the
                # server has answered at least this many.
                answered = sum(
                    stats["count"] + stats["errors"]
                    for group in (summary["rpcs"], summary["setup"]["rpcs"])
                    for stats in group.values()
                )
                rpcs = (result.rss_checkpoints[-1][0] if result.rss_checkpoints else 0) + answered
                result.rss_checkpoints.append((rpcs, server_memory(process, config.workers)))
                return summary

            result.rss_before = server_memory(process, config.workers)
            say(f"{config.name}: Health/Check")
            run("health", "health")
            say(f"{config.name}: GetAccount")
            run("get_account", "get-account", "--accounts", "200")
            say(f"{config.name}: flows, closed loop")
            peak = run("flow", "flow", "--sms-file", str(sms))["operations"]["per_second"]
            if peak > 0:
                half = peak / 2
                say(f"{config.name}: flows paced to {half:.1f}/s (half the peak)")
                run("flow_half_rate", "flow", "--sms-file", str(sms), "--rate", f"{half:.3f}")
            # Memory: flows and account reads until the server has answered SOAK_RPCS,
            # and at least one round after the measured runs (a fast machine passes
            # SOAK_RPCS before the soak), since growth is measured from there.
            result.soak_from = len(result.rss_checkpoints) - 1
            for round_ in range(SOAK_ROUNDS_MAX if settings.soak_rpcs > 0 else 0):
                if round_ and result.rss_checkpoints[-1][0] >= settings.soak_rpcs:
                    break
                say(f"{config.name}: memory soak, {result.rss_checkpoints[-1][0]} RPCs so far")
                run(f"soak_flow_{round_}", "flow", "--sms-file", str(sms))
                run(f"soak_get_account_{round_}", "get-account", "--accounts", "200")
            result.rss_after = result.rss_checkpoints[-1][1]
    except (Unavailable, RuntimeError, subprocess.TimeoutExpired) as error:
        result.available = False
        result.reason = str(error)
        say(f"{config.name}: {error}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result.seconds = round(time.monotonic() - started, 1)
    return result


# -- figures -----------------------------------------------------------------------


def figures(result: Result) -> dict[str, Any]:
    """The numbers of one configuration: per-RPC throughput, ratios, latency."""
    if not result.available:
        return {"available": False, "reason": result.reason}
    runs = result.runs
    health = runs["health"]["rpcs"][HEALTH]["throughput"]

    def ratio(value: float) -> float | None:
        return round(value / health, 3) if health else None

    def row(stats: dict[str, Any], half: dict[str, Any] | None = None) -> dict[str, Any]:
        lat = stats.get("latency_ms", {})
        return {
            "calls": stats["count"],
            "errors": stats["errors"],
            "calls_per_s": stats["throughput"],
            "ratio_to_health": ratio(stats["throughput"]),
            "p50_ms": lat.get("p50"),
            "p95_ms": lat.get("p95"),
            "p99_ms": lat.get("p99"),
            "max_ms": lat.get("max"),
            "half_rate_p50_ms": (half or {}).get("latency_ms", {}).get("p50"),
            "half_rate_p99_ms": (half or {}).get("latency_ms", {}).get("p99"),
        }

    flow = runs["flow"]
    half_run = runs.get("flow_half_rate", {})
    rpcs = {
        HEALTH: row(runs["health"]["rpcs"][HEALTH]),
        GET_ACCOUNT: row(runs["get_account"]["rpcs"].get(GET_ACCOUNT, _empty())),
        "flow RPCs (all)": row(flow["total"], half_run.get("total")),
    }
    for name in FLOW_RPCS:
        rpcs[name] = row(flow["rpcs"].get(name, _empty()), half_run.get("rpcs", {}).get(name))
    errors = {
        scenario: run["errors"] | {"setup": run["setup"]["errors"]}
        if run["setup"]["errors"]
        else run["errors"]
        for scenario, run in runs.items()
        if run["error_count"] or run["setup"]["errors"]
    }
    workers = [v for k, v in result.rss_after.items() if k.startswith("worker")]
    measured = {name: run for name, run in runs.items() if name in RUN_NAMES}
    return {
        "available": True,
        "rpcs": rpcs,
        "server_cpu_cores": {name: run.get("server_cpu_cores") for name, run in measured.items()},
        "machine_cpu_cores": {name: run.get("machine_cpu_cores") for name, run in measured.items()},
        "steal_cpu_cores": {name: run.get("steal_cpu_cores") for name, run in measured.items()},
        "server_cpu_cores_by_process": {
            name: run.get("server_cpu_cores_by_process") for name, run in measured.items()
        },
        "sms_delivery_ms": flow.get("sms_delivery", {}).get("latency_ms", {}),
        "flows_per_s": flow["operations"]["per_second"],
        "flows_completed": flow["operations"]["completed"],
        "flows_failed": flow["operations"]["failed"],
        "half_rate": {
            "target_flows_per_s": half_run.get("rate"),
            "flows_per_s": half_run.get("operations", {}).get("per_second"),
        },
        "errors": errors,
        "rss_mb_before": result.rss_before,
        "rss_mb_after": result.rss_after,
        "rss_mb_per_worker_max": max(workers) if workers else None,
        "soak": soak(result.rss_checkpoints, result.soak_from),
        "seconds": result.seconds,
    }


def soak(checkpoints: list[tuple[int, dict[str, float]]], start: int = 0) -> dict[str, Any]:
    """RPCs answered in all, and how much each worker's RSS grew during the soak:
    from checkpoint `start` (after the measured runs, so every code path has
    run and its caches are filled) to the last."""
    if not checkpoints:
        return {"rpcs": 0, "from_rpcs": 0, "rss_growth_mb": {}, "checkpoints": []}
    total, last = checkpoints[-1]
    since, first = checkpoints[start]
    # No soak run (--quick, --soak-rpcs 0): no growth to report, rather than +0.0.
    growth = {
        role: round(mb - first[role], 1)
        for role, mb in last.items()
        if role.startswith("worker") and role in first and since < total
    }
    return {
        "rpcs": total,
        "from_rpcs": since,
        "rss_growth_mb": growth,
        "checkpoints": [{"rpcs": n, "rss_mb": rss} for n, rss in checkpoints],
    }


def _empty() -> dict[str, Any]:
    return {"count": 0, "errors": 0, "throughput": 0.0, "latency_ms": {}}


def targets(configs: dict[str, dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(target: str, where: str, value: Any, threshold: float, ok: bool | None) -> None:
        rows.append(
            {
                "target": target,
                "configuration": where,
                "value": value,
                "threshold": threshold,
                "result": "n/a" if ok is None else ("pass" if ok else "FAIL"),
            }
        )

    for key, fig in configs.items():
        name = names[key]
        if not fig["available"]:
            add("all targets", name, "not available", 0, None)
            continue
        rpcs = fig["rpcs"]
        value = rpcs[GET_ACCOUNT]["ratio_to_health"]
        add("GetAccount / Health ≥ 0.70", name, value, GET_ACCOUNT_RATIO, _ge(value, 0.70))
        value = rpcs["flow RPCs (all)"]["ratio_to_health"]
        add("flow RPCs / Health ≥ 0.35", name, value, FLOW_RATIO, _ge(value, FLOW_RATIO))
        for rpc in FLOW_RPCS:
            value = rpcs[rpc]["half_rate_p99_ms"]
            ok = None if value is None else value <= P99_AT_HALF_PEAK_MS
            add(f"p99 of {rpc} at half the peak ≤ 25 ms", name, value, P99_AT_HALF_PEAK_MS, ok)
        value, soaked = fig["rss_mb_per_worker_max"], fig.get("soak") or soak([])
        growth = max(soaked["rss_growth_mb"].values(), default=None)
        label = "RSS per worker after ≥ 100 000 RPCs ≤ 150 MB, not growing"
        if value is None or growth is None:
            add(label, name, "no soak run", RSS_PER_WORKER_MB, None)
        elif soaked["rpcs"] < SOAK_RPCS:
            add(label, name, f"only {soaked['rpcs']} RPCs", RSS_PER_WORKER_MB, None)
        else:
            ok = value <= RSS_PER_WORKER_MB and growth <= RSS_GROWTH_MB
            last = soaked["rpcs"] - soaked["from_rpcs"]
            shown = f"{value:.0f} MB, {growth:+.1f} MB over the last {last} RPCs"
            add(label, name, shown, RSS_PER_WORKER_MB, ok)
    one, two = configs.get("postgresql-1"), configs.get("postgresql-2")
    where = "PostgreSQL 2 workers / 1 worker"
    if one and two and one["available"] and two["available"] and one["flows_per_s"]:
        value = round(two["flows_per_s"] / one["flows_per_s"], 3)
        add("flows/s, 2 workers / 1 worker ≥ 1.3", where, value, PG_SCALING, value >= PG_SCALING)
    else:
        add("flows/s, 2 workers / 1 worker ≥ 1.3", where, "not available", PG_SCALING, None)
    return rows


def _ge(value: float | None, threshold: float) -> bool | None:
    return None if value is None else value >= threshold


# -- output ------------------------------------------------------------------------


RUN_NAMES = {
    "health": "Health/Check",
    "get_account": "GetAccount",
    "flow": "flows",
    "flow_half_rate": "flows at ½ peak",
}


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def text_table(configs: dict[str, dict[str, Any]], names: dict[str, str]) -> str:
    head = (
        f"{'configuration':<22} {'rpc':<16} {'calls/s':>9} {'× health':>9} {'p50 ms':>8} "
        f"{'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p99 ms @½':>10}"
    )
    lines = [head, "-" * len(head)]
    for key, fig in configs.items():
        if not fig["available"]:
            lines.append(f"{names[key]:<22} {fig['reason']}")
            continue
        first = True
        for rpc, row in fig["rpcs"].items():
            label = names[key] if first else ""
            first = False
            lines.append(
                f"{label:<22} {rpc:<16} {_num(row['calls_per_s'], 1):>9} "
                f"{_num(row['ratio_to_health'], 3):>9} {_num(row['p50_ms']):>8} "
                f"{_num(row['p95_ms']):>8} {_num(row['p99_ms']):>8} {_num(row['max_ms']):>8} "
                f"{_num(row['half_rate_p99_ms']):>10}"
            )
        rss = ", ".join(f"{k} {v:.0f}" for k, v in fig["rss_mb_after"].items())
        lines.append(
            f"{'':<22} flows/s {fig['flows_per_s']:.1f} (half-peak run: "
            f"{_num(fig['half_rate']['flows_per_s'], 1)}/s); RSS MB after: {rss}"
        )
        lines.append(f"{'':<22} server CPU cores busy: {_per_run(fig, 'server_cpu_cores')}")
        lines.append(f"{'':<22} machine CPU cores busy: {_per_run(fig, 'machine_cpu_cores')}")
        lines.append(f"{'':<22} taken by the host (steal): {_per_run(fig, 'steal_cpu_cores')}")
    return "\n".join(lines)


def _per_run(fig: dict[str, Any], key: str) -> str:
    """`Health/Check 0.91, GetAccount 1.02, ...` from a per-run figure."""
    values = {k: v for k, v in fig.get(key, {}).items() if v is not None}
    return ", ".join(f"{RUN_NAMES.get(k, k)} {_num(v)}" for k, v in values.items()) or "n/a"


def markdown(report: dict[str, Any], names: dict[str, str]) -> str:
    m = report["machine"]
    s = report["settings"]
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run_bench.py`); do not edit by hand. "
        "The same figures are in [`benchmarks.json`](benchmarks.json).",
        "",
        f"Run on {report['date']} in {report['total_seconds']:.0f} s; 1-minute load average "
        f"{report['load_average'][0]} before, {report['load_average'][1]} after.",
        "",
        *busy_warning(report),
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        f"| CPU | {m['cpu']} |",
        f"| cores | {m['cores']} |",
        f"| memory | {m['memory_gib']} GiB |",
        f"| OS | {m['os']} |",
        f"| Python | {m['python']} |",
        f"| grpcio | {m['grpcio']} |",
        f"| protobuf | {m['protobuf']} |",
        f"| peewee | {m['peewee']} |",
        f"| psycopg | {m['psycopg']} |",
        f"| SQLite | {m['sqlite']} |",
        f"| PostgreSQL | {m['postgresql']} |",
        "",
        "## How it is measured",
        "",
        "Each configuration gets a fresh server (`phonebind-server serve --dev`, file SMS "
        "gateway, log level WARNING, the default RPC thread pool per worker) on a fresh "
        "database, "
        "on this same machine as the load tool and PostgreSQL, which share its cores. "
        f"`phonebind-load` runs {s['concurrency']} asyncio tasks in {s['processes']} "
        "process(es), each task on its own connection, closed loop, for "
        f"{s['duration_s']:g} s after {s['warmup_s']:g} s of warm-up, against, in turn:",
        "",
        "1. `grpc.health.v1.Health/Check`, the baseline;",
        "2. `GetAccount` on 200 registered accounts;",
        "3. complete rebind flows (StartRebind, VerifyIdentity, SendCode + VerifyCode for the "
        "old and the new number, CompleteRebind), each on a fresh account registered before "
        "the measured window, the codes read from the SMS file as a handset would;",
        "4. the same flows paced (open loop) to half the peak flow rate of step 3, for the "
        "latency column `p99 @ ½ peak`;",
        f"5. a memory soak: steps 3 and 2 again, at least once, until the load tool has "
        f"counted {s.get('soak_rpcs', SOAK_RPCS):,} answered RPCs (its warm-up calls "
        "uncounted, so the server has answered more).",
        "",
        "`× health` is an RPC's calls per second divided by the health check's, same "
        "concurrency, same server. In a flow every RPC runs once per flow (SendCode and "
        "VerifyCode twice), so each flow RPC's own rate is a share of the flow's; the row "
        "`flow RPCs (all)` is every flow RPC together, the figure the flow target is about. "
        "Latency is of successful calls, measured in the client (`time.perf_counter`) "
        "around the blocking call; percentiles are nearest-rank over every call. RSS is "
        "`VmRSS` of each server process, taken after every run; *not growing* means a "
        f"worker's RSS grew by at most {RSS_GROWTH_MB:g} MB during the soak (from the end "
        "of step 4, when every code path has run, to the last run).",
        "",
        "## Results",
        "",
    ]
    for key, fig in report["configurations"].items():
        out.append(f"### {names[key]}")
        out.append("")
        if not fig["available"]:
            out.append(f"Not measured: {fig['reason']}")
            out.append("")
            continue
        out += [
            "| RPC | calls/s | × health | p50 ms | p95 ms | p99 ms | max ms | p99 ms @ ½ peak |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for rpc, row in fig["rpcs"].items():
            out.append(
                f"| {rpc} | {_num(row['calls_per_s'], 1)} | {_num(row['ratio_to_health'], 3)} "
                f"| {_num(row['p50_ms'])} | {_num(row['p95_ms'])} | {_num(row['p99_ms'])} "
                f"| {_num(row['max_ms'])} | {_num(row['half_rate_p99_ms'])} |"
            )
        half = fig["half_rate"]
        rss_before = ", ".join(f"{k} {v:.0f} MB" for k, v in fig["rss_mb_before"].items())
        rss_after = ", ".join(f"{k} {v:.0f} MB" for k, v in fig["rss_mb_after"].items())
        soaked = fig.get("soak") or soak([])
        growth = ", ".join(f"{k} {v:+.1f} MB" for k, v in soaked["rss_growth_mb"].items())
        out += [
            "",
            f"Flows: {fig['flows_per_s']:.1f}/s closed loop ({fig['flows_completed']} completed, "
            f"{fig['flows_failed']} failed); paced to {_num(half['target_flows_per_s'], 1)}/s, "
            f"achieved {_num(half['flows_per_s'], 1)}/s. "
            f"RSS: {rss_before} at start; {rss_after} after {soaked['rpcs']:,} RPCs; "
            f"from {soaked['from_rpcs']:,} RPCs to the end: {growth or 'n/a'}.",
            "",
        ]
        sms = fig["sms_delivery_ms"]
        out += [
            f"Server CPU, in cores busy while each run lasted (setup and warm-up included): "
            f"{_per_run(fig, 'server_cpu_cores')}; the whole machine (servers, load tool, "
            f"PostgreSQL), of its {m['cores']}: {_per_run(fig, 'machine_cpu_cores')}; "
            f"taken from it by the host (steal): {_per_run(fig, 'steal_cpu_cores')}. "
            f"A code reached the handset (the SMS file) p50 {_num(sms.get('p50'))} ms, "
            f"p99 {_num(sms.get('p99'))} ms after SendCode answered (outbox dispatcher, "
            "file gateway and the tool's polling; not part of any RPC's latency).",
            "",
        ]
        if fig["errors"]:
            out.append(f"Errors by reason: `{json.dumps(fig['errors'], sort_keys=True)}`")
            out.append("")
    out += [
        "![Latency per RPC](benchmark-latency.png)",
        "",
        "## Targets (issue 5)",
        "",
        "| target | configuration | measured | result |",
        "| --- | --- | ---: | --- |",
    ]
    for row in report["targets"]:
        out.append(
            f"| {row['target']} | {row['configuration']} | {_num(row['value'], 3)} "
            f"| {row['result']} |"
        )
    out += [
        "",
        "## Running it",
        "",
        "```sh",
        "make bench                                   # all three configurations, ~9 minutes",
        ".venv/bin/python bench/run_bench.py --quick  # a smoke run of a few seconds each",
        ".venv/bin/python bench/run_bench.py --help   # durations, concurrency, configurations",
        "```",
        "",
        "PostgreSQL runs use `PHONEBIND_BENCH_DATABASE_URL` (default "
        f"`{DEFAULT_PG}`): each configuration creates its own `phonebind_bench_*` database "
        "there and drops it afterwards.",
        "",
    ]
    return "\n".join(out)


def busy_warning(report: dict[str, Any]) -> list[str]:
    """A caveat when other work shared the machine with the run.

    Only the load before the run counts: during it, the servers and load
    processes the bench starts keep the cores busy themselves."""
    cores = report["machine"]["cores"] or 1
    if report["load_average"][0] <= cores:
        return []
    return [
        f"**The machine was busy with other work when this run started** (load average "
        f"{report['load_average'][0]} on {cores} cores): its throughputs are lower, its "
        "latencies higher and all of it noisier than on a quiet machine. Run `make bench` "
        "again when the machine is idle.",
        "",
    ]


def write(report: dict[str, Any], out: pathlib.Path) -> None:
    """Prints the table and the targets, and writes the three files into ``out``."""
    names = report["names"]
    print(text_table(report["configurations"], names))
    print()
    for row in report["targets"]:
        print(
            f"{row['result']:<5} {row['target']:<44} {row['configuration']:<32} "
            f"{_num(row['value'], 3)}"
        )
    for line in busy_warning(report):
        print(line.replace("**", ""))
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "benchmarks.md").write_text(markdown(report, names), encoding="utf-8")
    plot(report, names, out / "benchmark-latency.png")
    print(
        f"\nwrote {out / 'benchmarks.md'}, benchmarks.json and benchmark-latency.png; "
        f"the run took {report['total_seconds']:.0f} s"
    )


def plot(report: dict[str, Any], names: dict[str, str], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(k, f) for k, f in report["configurations"].items() if f["available"]]
    if not shown:
        return
    labels = [HEALTH, GET_ACCOUNT, *FLOW_RPCS]
    fig, axes = plt.subplots(
        len(shown), 1, figsize=(10, 3.4 * len(shown)), squeeze=False, sharex=True
    )
    width = 0.2
    for (key, figs), axis in zip(shown, axes[:, 0], strict=True):
        rows = [figs["rpcs"][name] for name in labels]
        xs = range(len(labels))
        for offset, (column, label, colour) in enumerate(
            [
                ("p50_ms", "p50", "#9ecae1"),
                ("p95_ms", "p95", "#4292c6"),
                ("p99_ms", "p99", "#08519c"),
                ("half_rate_p99_ms", "p99 at ½ peak flow rate", "#e6550d"),
            ]
        ):
            values = [r[column] if r[column] is not None else 0 for r in rows]
            axis.bar(
                [x + (offset - 1.5) * width for x in xs], values, width, label=label, color=colour
            )
        axis.axhline(P99_AT_HALF_PEAK_MS, color="#e6550d", linestyle="--", linewidth=1)
        axis.set_yscale("log")
        axis.set_ylabel("latency, ms")
        axis.set_title(f"{names[key]}: closed loop ({figs['flows_per_s']:.1f} flows/s peak)")
        axis.grid(axis="y", which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")
    axes[-1, 0].set_xticks(range(len(labels)))
    axes[-1, 0].set_xticklabels(labels, rotation=15)
    fig.suptitle("phonebind latency per RPC (dashed: the 25 ms p99 target)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main --------------------------------------------------------------------------


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=_env_float("PHONEBIND_BENCH_DURATION", 15),
        help="seconds per measurement (env PHONEBIND_BENCH_DURATION, default 15)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=_env_float("PHONEBIND_BENCH_WARMUP", 2),
        help="seconds of warm-up before each (env PHONEBIND_BENCH_WARMUP, default 2)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=int(_env_float("PHONEBIND_BENCH_CONCURRENCY", 16)),
        help="load tasks per process (env PHONEBIND_BENCH_CONCURRENCY, default 16)",
    )
    parser.add_argument("--load-processes", type=int, default=1, help="load processes")
    parser.add_argument(
        "--soak-rpcs",
        type=int,
        default=SOAK_RPCS,
        help=f"RPCs before the memory figures are taken (default {SOAK_RPCS}; 0: no soak)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 s per measurement, 0.5 s warm-up, no memory soak",
    )
    parser.add_argument(
        "--configs",
        default=",".join(c.key for c in CONFIGS),
        help=f"comma-separated, of {', '.join(c.key for c in CONFIGS)}",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("PHONEBIND_BENCH_DATABASE_URL", DEFAULT_PG),
        help="PostgreSQL to create the bench databases on (env PHONEBIND_BENCH_DATABASE_URL)",
    )
    parser.add_argument("--out", default=str(ROOT / "docs"), help="where the report goes")
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        help="measure nothing: write the report again from a benchmarks.json",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        write(
            json.loads(pathlib.Path(args.from_json).read_text(encoding="utf-8")),
            pathlib.Path(args.out),
        )
        return 0
    if args.quick:
        args.duration, args.warmup, args.soak_rpcs = 3.0, 0.5, 0
    chosen = [k.strip() for k in args.configs.split(",") if k.strip()]
    unknown = sorted(set(chosen) - {c.key for c in CONFIGS})
    if unknown:
        parser.error(f"unknown configurations {unknown}")
    settings = Settings(
        args.duration, args.warmup, args.concurrency, args.load_processes, args.soak_rpcs
    )

    started = time.monotonic()
    load_before = os.getloadavg()
    results = [measure(c, settings, args.database_url) for c in CONFIGS if c.key in chosen]
    names = {r.config.key: r.config.name for r in results}
    configs = {r.config.key: figures(r) for r in results}
    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(postgres_version(args.database_url)),
        # Other work on the machine skews every figure: the 1-minute load average
        # before the first configuration and after the last.
        "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "settings": {
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "concurrency": settings.concurrency,
            "processes": settings.processes,
            "soak_rpcs": settings.soak_rpcs,
            "quick": args.quick,
        },
        "names": names,
        "configurations": configs,
        "targets": targets(configs, names),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    write(report, pathlib.Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
