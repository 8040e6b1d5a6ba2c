"""`make bench`: what each call and each flow of phonebind costs, against a bare server.

For each configuration (SQLite; PostgreSQL with 1 worker and with 2; both
backends again in production mode, with TLS and bearer tokens) this starts a
fresh server on a fresh database (log level INFO, the default: every call
writes its access log line) and, in the same run:

1. the reference: a bare `grpc.aio` server serving only the standard health
   service (bench/reference_server.py), driven by h2load, before and after
   step 2;
2. `GetAccount` on that server, driven by h2load in the same way;
3. complete rebind flows with `phonebind-load`, closed loop (the peak), with
   the CPU time per flow of each process: the server's workers, the
   PostgreSQL backends of the bench database, PostgreSQL's shared processes,
   and the load tool; and statements and round trips per RPC, from the
   server's own counters (`phonebind_store_statements`, `..._round_trips`);
4. the same flows paced to half the peak rate, three runs in a row (p99 of
   each flow RPC in each run);
5. a soak: flows and GetAccount until the server has answered 100 000 RPCs,
   with each worker's RSS after every run.

GetAccount's rate is given as a ratio of the reference's in the same run. It
prints the targets and writes docs/benchmarks.md and docs/benchmarks.json.

Sends load only to servers it starts itself on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import importlib.metadata
import itertools
import json
import math
import os
import pathlib
import platform
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"

GET_ACCOUNT = "GetAccount"
FLOW_RPCS = ("StartRebind", "VerifyIdentity", "SendCode", "VerifyCode", "CompleteRebind")
HEALTH_PATH = "/grpc.health.v1.Health/Check"
GET_ACCOUNT_PATH = "/phonebind.v1.BindingService/GetAccount"

# The targets (issue 12).
GET_ACCOUNT_RATIO_SQLITE = 0.60
GET_ACCOUNT_RATIO_POSTGRES = 0.35
SERVER_CPU_MS_PER_FLOW = 5.0
POSTGRES_CPU_MS_PER_FLOW = 5.0
LOAD_CPU_MS_PER_FLOW = 1.5
FLOWS_PER_S = {"sqlite": 200.0, "postgresql": 100.0}
P99_AT_HALF_PEAK_MS = 25.0
HALF_RATE_RUNS = 3
RSS_PER_WORKER_MB = 150.0
SOAK_RPCS = 100_000
# "Flat": what RSS may still add during the soak, once every code path has
# run. A leak of a few hundred bytes per call adds tens of MB over it.
RSS_GROWTH_MB = 5.0
SOAK_ROUNDS_MAX = 12
SOAK_READS = 25_000  # GetAccount calls in each round of the soak, after its flows


@dataclass(frozen=True)
class Config:
    key: str
    name: str
    database: str  # "sqlite" or "postgresql"
    workers: int
    production: bool = False
    soak: bool = True


CONFIGS = (
    Config("sqlite", "SQLite, 1 worker", "sqlite", 1),
    Config("postgresql-1", "PostgreSQL, 1 worker", "postgresql", 1),
    Config("postgresql-2", "PostgreSQL, 2 workers", "postgresql", 2, soak=False),
    Config("sqlite-production", "SQLite, production mode", "sqlite", 1, True, soak=False),
    Config("postgresql-production", "PostgreSQL, production mode", "postgresql", 1, True, False),
)


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


def machine(pg_version: str | None, h2load: str) -> dict[str, Any]:
    mem_kb = _first("/proc/meminfo", "MemTotal").split()[0]
    os_name = _first("/etc/os-release", "PRETTY_NAME=").strip('"')
    version = subprocess.run(  # noqa: S603 - the h2load this run uses
        [h2load, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
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
        "h2load": version or "unknown",
    }


# -- processes and their CPU time ----------------------------------------------------

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports."""
    for _ in range(50):
        first = free_port()
        try:
            for offset in range(1, count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", first + offset))
            return first
        except OSError:
            continue
    raise Unavailable(f"no {count} consecutive free ports")


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


def _stat(pid: int) -> list[str] | None:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds process `pid` has used so far."""
    fields = _stat(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def worker_pids(process: subprocess.Popen[bytes], workers: int) -> dict[str, int]:
    """The server's worker processes by name (the supervisor of several does not serve)."""
    if workers == 1:
        return {"worker 1": process.pid}
    found = {}
    for pid in children(process.pid):
        with contextlib.suppress(OSError):
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:  # not e.g. multiprocessing's resource tracker
                found[f"worker {len(found) + 1}"] = pid
    return found


# PostgreSQL's processes that serve every database of the cluster.
POSTGRES_SHARED = (b"walwriter", b"checkpointer", b"background writer", b"autovacuum")


def postgres_pids(database: str) -> dict[str, list[int]]:
    """PostgreSQL's backends connected to `database` (by their process title),
    and its shared processes (WAL writer, checkpointer, ...), which also work
    for every other database of the cluster."""
    backends, shared = [], []
    title = f" {database} ".encode()
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_bytes().strip() != b"postgres":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if title in cmdline:
                backends.append(int(entry.name))
            elif any(name in cmdline for name in POSTGRES_SHARED):
                shared.append(int(entry.name))
    return {"postgresql backends": backends, "postgresql shared": shared}


class CpuSampler(threading.Thread):
    """CPU seconds used so far by groups of processes, sampled every `interval`
    seconds against time.monotonic(), so that the CPU of any window (such as
    the load tool's measured one) can be read off by interpolation. A process
    that appears is counted from its first sample, one that ends keeps its
    last value."""

    def __init__(self, groups: Callable[[], dict[str, list[int]]], interval: float = 0.05):
        super().__init__(name="cpu-sampler", daemon=True)
        self._groups = groups
        self._interval = interval
        self._halt = threading.Event()
        self._seen: dict[str, dict[int, float]] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []

    def run(self) -> None:
        members: dict[str, list[int]] = {}
        refreshed = 0.0
        while True:
            now = time.monotonic()
            if now - refreshed >= 1.0:
                members, refreshed = self._groups(), now
            self.sample(members)
            if self._halt.wait(self._interval):
                self.sample(self._groups())
                return

    def sample(self, members: dict[str, list[int]]) -> None:
        totals = {}
        for group, pids in members.items():
            seen = self._seen.setdefault(group, {})
            for pid in pids:
                value = process_cpu(pid)
                if value is not None:
                    seen[pid] = value
            totals[group] = sum(seen.values())
        self.samples.append((time.monotonic(), totals))

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def at(self, moment: float) -> dict[str, float]:
        samples = self.samples
        if not samples:
            return {}
        if moment <= samples[0][0]:
            return samples[0][1]
        for (t0, a), (t1, b) in itertools.pairwise(samples):
            if t0 <= moment <= t1:
                share = (moment - t0) / (t1 - t0) if t1 > t0 else 1.0
                return {k: a.get(k, 0.0) + share * (b[k] - a.get(k, 0.0)) for k in b}
        return samples[-1][1]

    def between(self, start: float, end: float) -> dict[str, float]:
        first, last = self.at(start), self.at(end)
        return {k: v - first.get(k, 0.0) for k, v in last.items()}


# -- servers -----------------------------------------------------------------------


def server_env() -> dict[str, str]:
    # The flags alone configure the server: no PHONEBIND_* setting leaks in.
    return {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}


@contextlib.contextmanager
def postgres_database(base: str) -> Iterator[tuple[str, str]]:
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
        yield urlunsplit(urlsplit(base)._replace(path="/" + name)), name
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
def database(config: Config, workdir: pathlib.Path, pg_base: str) -> Iterator[tuple[str, str]]:
    if config.database == "sqlite":
        yield f"sqlite:///{workdir}/phonebind.db", ""
    else:
        with postgres_database(pg_base) as (url, name):
            yield url, name


def wait_serving(address: str, process: subprocess.Popen[bytes], listening: int) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = int(address.rsplit(":", 1)[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return
        if listeners(port) >= listening:
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


@dataclass
class Server:
    address: str  # what clients dial (localhost:PORT in production mode, for TLS)
    process: subprocess.Popen[bytes]
    workers: int
    metrics_ports: list[int]
    sms: pathlib.Path | None = None  # the file gateway's output (development mode)
    sms_sink: str = ""  # where phonebind-load listens for the http gateway (production)
    token_file: str = ""
    ca_file: str = ""
    token: str = field(default="", repr=False)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def load_args(self) -> list[str]:
        """phonebind-load's options to reach this server (and read its codes)."""
        args = ["--target", self.address]
        if self.ca_file:
            args += ["--ca-file", self.ca_file, "--token-file", self.token_file]
        return args

    def code_args(self) -> list[str]:
        if self.sms is not None:
            return ["--sms-file", str(self.sms)]
        return ["--sms-sink", self.sms_sink]

    def pids(self) -> dict[str, int]:
        return worker_pids(self.process, self.workers)

    def memory(self) -> dict[str, float]:
        found = {}
        for role, pid in self.pids().items():
            value = rss_mb(pid)
            if value is not None:
                found[role] = value
        return found


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def production_env(workdir: pathlib.Path, token: str, sms_port: int) -> dict[str, str]:
    """A complete production configuration: TLS with a development CA, keys of
    its own, one caller holding `token`, codes posted to phonebind-load's sink."""
    from phonebind_server.devcerts import write_dev_certs
    from phonebind_server.rpc.auth import token_digest

    certs = workdir / "certs"
    write_dev_certs(str(certs))
    callers = workdir / "callers.toml"
    callers.write_text(
        '[[caller]]\nname = "bench"\nroles = ["kyc", "flow"]\n'
        f'token_sha256 = "{token_digest(token)}"\n',
        encoding="utf-8",
    )
    return {
        "PHONEBIND_SMS_GATEWAY": f"http://127.0.0.1:{sms_port}/sms",
        "PHONEBIND_SMS_HTTP_SECRET": f"whsec_{_key()}",  # a Standard Webhooks secret
        "PHONEBIND_INDEX_KEY": _key(),
        "PHONEBIND_CODE_KEY": _key(),
        "PHONEBIND_SEAL_KEYS": f"k1:{_key()}",
        "PHONEBIND_AUDIT_KEY": _key(),
        "PHONEBIND_TLS_CERT": str(certs / "server.pem"),
        "PHONEBIND_TLS_KEY": str(certs / "server-key.pem"),
        "PHONEBIND_CREDENTIALS_FILE": str(callers),
    }


@contextlib.contextmanager
def server(config: Config, url: str, workdir: pathlib.Path) -> Iterator[Server]:
    migrate = subprocess.run(  # noqa: S603 - the venv's own phonebind-server
        [str(BIN / "phonebind-server"), "migrate", "--dev", "--database-url", url],
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=120,
    )
    if migrate.returncode != 0:
        raise Unavailable(f"migrate failed: {migrate.stderr.strip()[-300:]}")
    port = free_port()
    metrics = free_ports(config.workers)
    command = [
        str(BIN / "phonebind-server"),
        "serve",
        *("--database-url", url),
        *("--metrics-listen", f"127.0.0.1:{metrics}"),
        *("--workers", str(config.workers)),
    ]
    env = server_env()
    found = Server(
        address=f"127.0.0.1:{port}",
        process=None,  # type: ignore[arg-type]
        workers=config.workers,
        metrics_ports=[metrics + i for i in range(config.workers)],
    )
    health = found.address
    if config.production:
        found.token = secrets.token_urlsafe(32)
        sms_port = free_port()
        env.update(production_env(workdir, found.token, sms_port))
        found.sms_sink = f"127.0.0.1:{sms_port}"
        found.token_file = str(workdir / "token")
        pathlib.Path(found.token_file).write_text(found.token + "\n", encoding="ascii")
        found.ca_file = str(workdir / "certs" / "ca.pem")
        found.address = f"localhost:{port}"  # the name the certificate carries
        health = f"127.0.0.1:{free_port()}"
        command += ["--listen", f"127.0.0.1:{port}", "--health-listen", health]
    else:
        found.sms = workdir / "sms.jsonl"
        command += ["--dev", "--listen", found.address, "--sms-gateway", f"file:{found.sms}"]
    stderr_path = workdir / "server.err"
    # The access log (INFO, one line per call) goes to a file, as under systemd's journal.
    with open(workdir / "server.out", "wb") as out, open(stderr_path, "wb") as err:
        found.process = subprocess.Popen(  # noqa: S603 - as above
            command, stdout=out, stderr=err, env=env, cwd=workdir
        )
    process = found.process
    try:
        wait_serving(health, process, config.workers if health == found.address else 1)
        if process.poll() is not None:
            stderr = stderr_path.read_text(errors="replace")
            raise Unavailable(
                f"the server exited with {process.returncode}: {stderr.strip()[-300:]}"
            )
        yield found
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def reference_server() -> Iterator[str]:
    process = subprocess.Popen(  # noqa: S603 - this directory's own script
        [sys.executable, str(ROOT / "bench" / "reference_server.py")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None  # noqa: S101 - set by stdout=PIPE
        address = process.stdout.readline().strip()
        if not address:
            raise Unavailable("the reference server did not start")
        wait_serving(address, process, 1)  # type: ignore[arg-type]
        yield address
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the server's own counters ---------------------------------------------------------


def scrape(server: Server) -> dict[str, dict[str, float]]:
    """Calls (every status), statements and round trips by method, summed over
    the workers."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, dict[str, float]] = {"calls": {}, "statements": {}, "round_trips": {}}
    wanted = {
        "grpc_server_handled": ("calls", "grpc_method"),
        "phonebind_store_statements": ("statements", "method"),
        "phonebind_store_round_trips": ("round_trips", "method"),
    }
    for port in server.metrics_ports:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name not in wanted:
                continue
            key, label = wanted[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                # The store's counters name the full method (/package.Service/Method).
                method = sample.labels.get(label, "").rsplit("/", 1)[-1]
                totals[key][method] = totals[key].get(method, 0.0) + sample.value
    return totals


def counted(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]):
    return {
        key: {m: v - before[key].get(m, 0.0) for m, v in values.items()}
        for key, values in after.items()
    }


def per_rpc(delta: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Statements and round trips per call of each method that ran."""
    rows: dict[str, dict[str, float | None]] = {}
    for method, calls in sorted(delta["calls"].items()):
        if calls <= 0:
            continue
        rows[method] = {
            "calls": calls,
            "statements": round(delta["statements"].get(method, 0.0) / calls, 2),
            "round_trips": round(delta["round_trips"].get(method, 0.0) / calls, 2),
        }
    return rows


# -- load generators ---------------------------------------------------------------


@dataclass
class Settings:
    duration: float
    warmup: float
    concurrency: int
    h2load_clients: int
    h2load_streams: int
    soak_rpcs: int = SOAK_RPCS


def h2load_path() -> str:
    found = BIN / "h2load"
    if found.exists():
        return str(found)
    on_path = shutil.which("h2load")
    if on_path:
        return on_path
    raise SystemExit(
        "h2load is missing: `make bench` installs it (scripts/install-h2load.sh .venv/bin/h2load)"
    )


def grpc_frame(message: bytes) -> bytes:
    """A gRPC message on the wire: uncompressed flag, 4-byte length, the bytes."""
    return b"\0" + len(message).to_bytes(4, "big") + message


_FINISHED = re.compile(r"finished in ([\d.]+)s, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed"
)
_LATENCY = re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)")


def _ms(text: str) -> float:
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def h2load(
    settings: Settings,
    url: str,
    body: pathlib.Path,
    *headers: str,
    count: int | None = None,
) -> dict[str, Any]:
    """Calls/s of one unary method at `url`, for the run's duration or `count`
    calls (h2load counts HTTP/2 answers, not gRPC statuses: the caller checks
    those)."""
    seconds = settings.duration
    command = [
        h2load_path(),
        *("-c", str(settings.h2load_clients), "-m", str(settings.h2load_streams)),
    ]
    if count is None:
        warmup = round(settings.warmup * 1000)
        command += ["-D", f"{round(seconds * 1000)}ms", f"--warm-up-time={warmup}ms"]
    else:
        command += ["-n", str(count)]
        seconds = 600
    command += [
        *("-d", str(body)),
        *("-H", "content-type: application/grpc", "-H", "te: trailers"),
    ]
    for header in headers:
        command += ["-H", header]
    done = subprocess.run(  # noqa: S603 - h2load at a local server
        [*command, url], capture_output=True, text=True, timeout=seconds + settings.warmup + 60
    )
    finished = _FINISHED.search(done.stdout)
    requests = _REQUESTS.search(done.stdout)
    if done.returncode != 0 or not finished or not requests:
        raise RuntimeError(f"h2load failed: {(done.stdout + done.stderr).strip()[-500:]}")
    latency = _LATENCY.search(done.stdout)
    return {
        "calls_per_s": float(finished.group(2)),
        "requests": int(requests.group(1)),
        "succeeded": int(requests.group(2)),
        "failed": int(requests.group(3)),
        "mean_ms": round(_ms(latency.group(3)), 3) if latency else None,
        "max_ms": round(_ms(latency.group(2)), 3) if latency else None,
    }


def load(
    server: Server,
    scenario: str,
    settings: Settings,
    *extra: str,
    duration: float | None = None,
) -> dict[str, Any]:
    seconds = duration or settings.duration
    command = [
        str(BIN / "phonebind-load"),
        *server.load_args(),
        *("--scenario", scenario, "--concurrency", str(settings.concurrency)),
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


def register_one(server: Server, workdir: pathlib.Path) -> str:
    """Registers one account and checks GetAccount answers it: h2load cannot see
    gRPC statuses. Returns the account id."""
    import grpc

    from phonebind_client import PhonebindClient
    from phonebind_client.load import Accounts, Numbers, Options

    opts = Options(run_id=secrets.token_hex(3), number_base=secrets.randbelow(10**8))
    account = Accounts(opts, 0, Numbers(opts, 0)).make()
    credentials = None
    if server.ca_file:
        credentials = grpc.ssl_channel_credentials(pathlib.Path(server.ca_file).read_bytes())
    with PhonebindClient(
        server.address, credentials=credentials, token=server.token or None, timeout=10
    ) as client:
        client.register_account(
            account.account_id, account.holder_name, account.id_number, account.phone
        )
        client.get_account(account.account_id)
    return account.account_id


# -- one configuration -----------------------------------------------------------------


@dataclass
class Result:
    config: Config
    available: bool = True
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def measure(config: Config, settings: Settings, pg_base: str, reference: str) -> Result:
    result = Result(config)
    started = time.monotonic()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"phonebind-bench-{config.key}-"))
    fig = result.figures
    try:
        with (
            database(config, workdir, pg_base) as (url, db_name),
            server(config, url, workdir) as srv,
        ):

            def groups() -> dict[str, list[int]]:
                found = {"server": list(srv.pids().values())}
                if db_name:
                    found.update(postgres_pids(db_name))
                return found

            sampler = CpuSampler(groups)
            sampler.start()
            try:
                measure_server(config, settings, srv, sampler, reference, workdir, fig)
            finally:
                sampler.stop()
    except (Unavailable, RuntimeError, subprocess.TimeoutExpired, OSError) as error:
        result.available = False
        result.reason = str(error)
        say(f"{config.name}: {error}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result.seconds = round(time.monotonic() - started, 1)
    return result


def measure_server(
    config: Config,
    settings: Settings,
    srv: Server,
    sampler: CpuSampler,
    reference: str,
    workdir: pathlib.Path,
    fig: dict[str, Any],
) -> None:
    from phonebind.v1 import binding_service_pb2
    from phonebind_client.load import FLOW_RPCS as LOAD_FLOW_RPCS

    assert LOAD_FLOW_RPCS == FLOW_RPCS  # noqa: S101 - the tool's names are the report's
    fig["rss_mb_start"] = srv.memory()
    checkpoints: list[tuple[int, dict[str, float]]] = []

    def answered() -> int:
        return int(sum(scrape(srv)["calls"].values()))

    def checkpoint() -> None:
        checkpoints.append((answered(), srv.memory()))

    # 1-2. The reference, GetAccount on this server, the reference again.
    account_id = register_one(srv, workdir)
    health_body = workdir / "health.grpc"
    health_body.write_bytes(grpc_frame(b""))
    get_body = workdir / "get_account.grpc"
    get_body.write_bytes(
        grpc_frame(binding_service_pb2.GetAccountRequest(account_id=account_id).SerializeToString())
    )
    scheme = "https" if srv.ca_file else "http"
    url = f"{scheme}://127.0.0.1:{srv.port}{GET_ACCOUNT_PATH}"
    auth = (f"authorization: Bearer {srv.token}",) if srv.token else ()
    say(f"{config.name}: reference Health/Check, GetAccount, reference again (h2load)")
    ref_before = h2load(settings, f"http://{reference}{HEALTH_PATH}", health_body)
    before, wall = scrape(srv), time.monotonic()
    got = h2load(settings, url, get_body, *auth)
    wall_end = time.monotonic()
    delta = counted(before, scrape(srv))
    ref_after = h2load(settings, f"http://{reference}{HEALTH_PATH}", health_body)
    reference_rate = (ref_before["calls_per_s"] + ref_after["calls_per_s"]) / 2
    calls = delta["calls"].get(GET_ACCOUNT, 0.0)
    ok = _handled_ok(srv, GET_ACCOUNT)
    cpu = sampler.between(wall, wall_end).get("server", 0.0)
    fig["get_account"] = {
        **got,
        "reference_calls_per_s": [ref_before["calls_per_s"], ref_after["calls_per_s"]],
        "ratio_to_reference": round(got["calls_per_s"] / reference_rate, 3)
        if reference_rate
        else None,
        "server_calls": calls,
        "server_ok": ok,
        # Warm-up calls included on both sides: the server's CPU over all it answered.
        "server_cpu_us_per_call": round(1e6 * cpu / calls, 1) if calls else None,
        "statements": per_rpc(delta).get(GET_ACCOUNT, {}),
    }
    checkpoint()

    # 3. Flows, closed loop.
    say(f"{config.name}: flows, closed loop")
    before = scrape(srv)
    flow = load(srv, "flow", settings, *srv.code_args())
    delta = counted(before, scrape(srv))
    fig["flow"] = flow_figures(flow, delta, sampler, config.workers)
    checkpoint()

    # 4. Half the peak, three runs in a row.
    peak = flow["operations"]["per_second"]
    fig["half_rate"] = []
    for run in range(HALF_RATE_RUNS if peak > 0 else 0):
        say(f"{config.name}: flows paced to {peak / 2:.1f}/s, run {run + 1} of {HALF_RATE_RUNS}")
        paced = load(srv, "flow", settings, *srv.code_args(), "--rate", f"{peak / 2:.3f}")
        fig["half_rate"].append(
            {
                "target_flows_per_s": round(peak / 2, 2),
                "flows_per_s": paced["operations"]["per_second"],
                "failed": paced["operations"]["failed"],
                "errors": paced["errors"],
                "p99_ms": {
                    rpc: paced["rpcs"].get(rpc, {}).get("latency_ms", {}).get("p99")
                    for rpc in FLOW_RPCS
                },
                "p50_ms": {
                    rpc: paced["rpcs"].get(rpc, {}).get("latency_ms", {}).get("p50")
                    for rpc in FLOW_RPCS
                },
            }
        )
        checkpoint()

    # 5. Memory: flows and reads until the server has answered SOAK_RPCS, and at
    # least one round after the measured runs (growth is measured from there).
    soak_from = len(checkpoints) - 1
    if config.soak and settings.soak_rpcs > 0:
        for round_ in range(SOAK_ROUNDS_MAX):
            if round_ and checkpoints[-1][0] >= settings.soak_rpcs:
                break
            say(f"{config.name}: soak, {checkpoints[-1][0]} RPCs answered so far")
            load(srv, "flow", settings, *srv.code_args())
            h2load(settings, url, get_body, *auth, count=SOAK_READS)
            checkpoint()
    fig["rss"] = soak(checkpoints, soak_from)


def _handled_ok(srv: Server, method: str) -> float:
    """GetAccount answered OK so far (h2load's "succeeded" is any HTTP answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for port in srv.metrics_ports:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "grpc_server_handled":
                total += sum(
                    s.value
                    for s in family.samples
                    if s.name.endswith("_total")
                    and s.labels.get("grpc_method") == method
                    and s.labels.get("grpc_code") == "OK"
                )
    return total


def flow_figures(
    flow: dict[str, Any], delta: dict[str, dict[str, float]], sampler: CpuSampler, workers: int
) -> dict[str, Any]:
    """Throughput, latency, CPU per process and statements of a closed-loop run."""
    flows = flow["operations"]["completed"]
    start, end = flow["window_monotonic"]
    cpu = sampler.between(start, end)

    def per_flow(seconds: float | None) -> float | None:
        return round(1000 * seconds / flows, 3) if flows and seconds is not None else None

    rpcs = per_rpc(delta)
    # Per flow, counted by the server over the whole run (warm-up included):
    # each completed flow ends with one CompleteRebind; "internal" is the
    # outbox dispatcher and other work outside any call.
    completes = delta["calls"].get("CompleteRebind", 0.0)
    statements = sum(delta["statements"].get(m, 0.0) for m in (*FLOW_RPCS, "internal"))
    trips = sum(delta["round_trips"].get(m, 0.0) for m in (*FLOW_RPCS, "internal"))
    internal = delta["statements"].get("internal", 0.0)
    return {
        "flows_per_s": flow["operations"]["per_second"],
        "completed": flows,
        "failed": flow["operations"]["failed"],
        "errors": flow["errors"],
        "elapsed_s": flow["elapsed_s"],
        "latency_ms": {rpc: flow["rpcs"].get(rpc, {}).get("latency_ms", {}) for rpc in FLOW_RPCS},
        "cpu_ms_per_flow": {
            "server": per_flow(cpu.get("server")),
            "server_per_worker": round((per_flow(cpu.get("server")) or 0.0) / max(workers, 1), 3),
            "postgresql backends": per_flow(cpu.get("postgresql backends")),
            "postgresql shared": per_flow(cpu.get("postgresql shared")),
            "load tool": flow.get("load_cpu_ms_per_op"),
        },
        "statements_per_rpc": {m: rpcs[m] for m in (*FLOW_RPCS, "RegisterAccount") if m in rpcs},
        "statements_per_flow": round(statements / completes, 2) if completes else None,
        "round_trips_per_flow": round(trips / completes, 2) if completes else None,
        "internal_statements_per_flow": round(internal / completes, 2) if completes else None,
    }


def soak(checkpoints: list[tuple[int, dict[str, float]]], start: int) -> dict[str, Any]:
    """RPCs answered in all, each worker's RSS at the end, and how much it grew
    from checkpoint `start` (every code path has run by then) to the last."""
    if not checkpoints:
        return {"rpcs": 0, "from_rpcs": 0, "mb_end": {}, "growth_mb": {}, "checkpoints": []}
    total, last = checkpoints[-1]
    since, first = checkpoints[start]
    growth = {
        role: round(mb - first[role], 1)
        for role, mb in last.items()
        if role in first and since < total
    }
    return {
        "rpcs": total,
        "from_rpcs": since,
        "mb_end": last,
        "growth_mb": growth,
        "checkpoints": [{"rpcs": n, "rss_mb": rss} for n, rss in checkpoints],
    }


# -- targets -------------------------------------------------------------------------


def targets(configs: dict[str, dict[str, Any]], soak_rpcs: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(target: str, where: str, value: Any, ok: bool | None) -> None:
        rows.append(
            {
                "target": target,
                "configuration": where,
                "value": value,
                "result": "n/a" if ok is None else ("met" if ok else "NOT MET"),
            }
        )

    def get(key: str) -> dict[str, Any] | None:
        fig = configs.get(key)
        return fig if fig and fig.get("available") else None

    for key, threshold in (
        ("sqlite", GET_ACCOUNT_RATIO_SQLITE),
        ("postgresql-1", GET_ACCOUNT_RATIO_POSTGRES),
    ):
        fig = get(key)
        value = fig["get_account"]["ratio_to_reference"] if fig else None
        add(f"GetAccount ÷ reference Health/Check ≥ {threshold}", key, value, _le(threshold, value))
    for key in ("sqlite", "postgresql-1"):
        fig = get(key)
        value = fig["flow"]["cpu_ms_per_flow"]["server"] if fig else None
        add(
            f"server CPU per flow ≤ {SERVER_CPU_MS_PER_FLOW:g} ms",
            key,
            value,
            _le(value, SERVER_CPU_MS_PER_FLOW),
        )
    fig = get("postgresql-1")
    value = fig["flow"]["cpu_ms_per_flow"]["postgresql backends"] if fig else None
    add(
        f"PostgreSQL backends' CPU per flow ≤ {POSTGRES_CPU_MS_PER_FLOW:g} ms",
        "postgresql-1",
        value,
        _le(value, POSTGRES_CPU_MS_PER_FLOW),
    )
    for key in ("sqlite", "postgresql-1"):
        fig = get(key)
        value = fig["flow"]["cpu_ms_per_flow"]["load tool"] if fig else None
        add(
            f"load tool CPU per flow ≤ {LOAD_CPU_MS_PER_FLOW:g} ms",
            key,
            value,
            _le(value, LOAD_CPU_MS_PER_FLOW),
        )
    for key, backend in (("sqlite", "sqlite"), ("postgresql-1", "postgresql")):
        fig = get(key)
        value = fig["flow"]["flows_per_s"] if fig else None
        add(
            f"flows/s closed loop ≥ {FLOWS_PER_S[backend]:g}",
            key,
            value,
            _le(FLOWS_PER_S[backend], value),
        )
    for key in ("sqlite", "postgresql-1"):
        fig = get(key)
        runs = fig["half_rate"] if fig else []
        worst = [
            max((v for v in r["p99_ms"].values() if v is not None), default=None) for r in runs
        ]
        ok = None
        if len(runs) == HALF_RATE_RUNS and all(w is not None for w in worst):
            ok = all(w <= P99_AT_HALF_PEAK_MS for w in worst)
        add(
            f"worst flow RPC p99 at ½ peak ≤ {P99_AT_HALF_PEAK_MS:g} ms, each of "
            f"{HALF_RATE_RUNS} runs",
            key,
            worst or None,
            ok,
        )
    for key in ("sqlite", "postgresql-1"):
        fig = get(key)
        label = f"RSS per worker after {soak_rpcs:,} RPCs ≤ {RSS_PER_WORKER_MB:g} MB, flat"
        rss = fig["rss"] if fig else None
        if not rss or not rss["growth_mb"] or soak_rpcs <= 0:
            add(label, key, "no soak run", None)
            continue
        top = max(rss["mb_end"].values())
        growth = max(rss["growth_mb"].values())
        ok = rss["rpcs"] >= soak_rpcs and top <= RSS_PER_WORKER_MB and growth <= RSS_GROWTH_MB
        add(
            label,
            key,
            f"{top:.0f} MB after {rss['rpcs']:,} RPCs, {growth:+.1f} MB "
            f"over the last {rss['rpcs'] - rss['from_rpcs']:,}",
            ok,
        )
    return rows


def _le(low: float | None, high: float | None) -> bool | None:
    return None if low is None or high is None else low <= high


# -- output ------------------------------------------------------------------------


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list):
        return " / ".join(_num(v, digits) for v in value)
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    m, s, names = report["machine"], report["settings"], report["names"]
    load_before, load_after = report["load_average"]
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run_bench.py`); do not edit by hand. "
        "The same figures are in [`benchmarks.json`](benchmarks.json); where the time "
        "goes is in [`bench/profile.md`](../bench/profile.md).",
        "",
        f"Run on {report['date']} in {report['total_seconds']:.0f} s. Load average "
        f"(1, 5, 15 min) before the run: {', '.join(str(v) for v in load_before)}; after: "
        f"{', '.join(str(v) for v in load_after)}, on {m['cores']} cores.",
        "",
        *busy_warning(report),
        "## Targets",
        "",
        "| target | configuration | measured | result |",
        "| --- | --- | ---: | --- |",
    ]
    for row in report["targets"]:
        out.append(
            f"| {row['target']} | {names.get(row['configuration'], row['configuration'])} "
            f"| {_num(row['value'], 3)} | {row['result']} |"
        )
    if any(row["result"] == "NOT MET" for row in report["targets"]):
        out += [
            "",
            "For each target not met, where the time goes (py-spy profiles of GetAccount "
            "and of flows on both backends, and of the reference) and the redesign that "
            "would meet it: [`bench/profile.md`](../bench/profile.md).",
        ]
    out += [
        "",
        "## Results",
        "",
        "| configuration | reference calls/s | GetAccount calls/s | ÷ reference "
        "| server µs CPU per GetAccount | flows/s | server ms CPU per flow "
        "| PostgreSQL backends ms/flow | PostgreSQL shared ms/flow | load tool ms/flow "
        "| statements / round trips per flow |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, fig in report["configurations"].items():
        if not fig["available"]:
            out.append(f"| {names[key]} | not measured: {fig['reason']} |" + " |" * 9)
            continue
        g, f = fig["get_account"], fig["flow"]
        c = f["cpu_ms_per_flow"]
        out.append(
            f"| {names[key]} | {_num(g['reference_calls_per_s'], 0)} | {_num(g['calls_per_s'], 0)} "
            f"| {_num(g['ratio_to_reference'], 3)} | {_num(g['server_cpu_us_per_call'], 0)} "
            f"| {_num(f['flows_per_s'], 1)} | {_num(c['server'])} "
            f"| {_num(c['postgresql backends'])} | {_num(c['postgresql shared'])} "
            f"| {_num(c['load tool'])} "
            f"| {_num(f['statements_per_flow'], 1)} / {_num(f['round_trips_per_flow'], 1)} |"
        )
    one, two = (
        report["configurations"].get("postgresql-1"),
        report["configurations"].get("postgresql-2"),
    )
    if one and two and one["available"] and two["available"]:
        a, b = one["flow"]["cpu_ms_per_flow"], two["flow"]["cpu_ms_per_flow"]
        out += [
            "",
            f"Two workers on PostgreSQL against one: server CPU per flow {_num(b['server'])} ms "
            f"against {_num(a['server'])} ms, PostgreSQL backends {_num(b['postgresql backends'])}"
            f" against {_num(a['postgresql backends'])} ms; flows/s "
            f"{_num(two['flow']['flows_per_s'], 1)} against {_num(one['flow']['flows_per_s'], 1)}.",
        ]
    out += [
        "",
        "### Statements and round trips per RPC",
        "",
        "| configuration | " + " | ".join((GET_ACCOUNT, *FLOW_RPCS)) + " | outbox etc. per flow |",
        "| --- |" + " ---: |" * (len(FLOW_RPCS) + 2),
    ]
    for key, fig in report["configurations"].items():
        if not fig["available"]:
            continue
        cells = [
            fig["get_account"]["statements"],
            *(fig["flow"]["statements_per_rpc"].get(rpc, {}) for rpc in FLOW_RPCS),
        ]
        out.append(
            f"| {names[key]} | "
            + " | ".join(
                f"{_num(c.get('statements'), 1)} / {_num(c.get('round_trips'), 1)}" for c in cells
            )
            + f" | {_num(fig['flow']['internal_statements_per_flow'], 1)} |"
        )
    out += [
        "",
        "### Latency of each flow RPC",
        "",
        "Closed loop (the peak), then paced to half the peak rate, "
        f"{HALF_RATE_RUNS} runs in a row (p99 of each run).",
        "",
        "| configuration | RPC | p50 ms at peak | p99 ms at peak | p99 ms at ½ peak, each run |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for key, fig in report["configurations"].items():
        if not fig["available"]:
            continue
        for rpc in FLOW_RPCS:
            lat = fig["flow"]["latency_ms"].get(rpc, {})
            half = [r["p99_ms"].get(rpc) for r in fig["half_rate"]]
            out.append(
                f"| {names[key]} | {rpc} | {_num(lat.get('p50'))} | {_num(lat.get('p99'))} "
                f"| {_num(half)} |"
            )
    out += [
        "",
        "### Memory",
        "",
        "| configuration | RSS at start | RSS at the end | RPCs answered "
        "| growth during the soak |",
        "| --- | --- | --- | ---: | --- |",
    ]
    for key, fig in report["configurations"].items():
        if not fig["available"]:
            continue
        rss = fig["rss"]

        def mb(values: dict[str, float], sign: str = "") -> str:
            return ", ".join(f"{k} {v:{sign}.1f} MB" for k, v in values.items()) or "–"

        out.append(
            f"| {names[key]} | {mb(fig['rss_mb_start'])} | {mb(rss['mb_end'])} "
            f"| {rss['rpcs']:,} | {mb(rss['growth_mb'], '+')} |"
        )
    errors = {
        key: {
            "flow": fig["flow"]["errors"],
            **{f"½ peak run {i + 1}": r["errors"] for i, r in enumerate(fig["half_rate"])},
        }
        for key, fig in report["configurations"].items()
        if fig["available"]
    }
    errors = {k: {r: e for r, e in v.items() if e} for k, v in errors.items()}
    errors = {k: v for k, v in errors.items() if v}
    if errors:
        out += ["", f"Errors by reason: `{json.dumps(errors, sort_keys=True)}`"]
    out += [
        "",
        "## How it is measured",
        "",
        "Everything runs on this one machine, whose cores the servers, PostgreSQL, the load "
        "tools and any other work share: throughputs move with the machine's load, ratios "
        "taken within one run much less, CPU time per flow least.",
        "",
        "- **Reference and GetAccount**: h2load "
        f"(`-c {s['h2load_clients']} -m {s['h2load_streams']}`, {s['duration_s']:g} s after "
        f"{s['warmup_s']:g} s of warm-up) on the bare `grpc.aio` health server "
        "(`bench/reference_server.py`), then on phonebind's GetAccount for one registered "
        "account, then on the reference again; the ratio is GetAccount's rate over the mean "
        "of the two reference runs. The server logs at INFO (one access log line per call, "
        "to a file). h2load sees HTTP/2 answers only: the server's own counters "
        "(`grpc_server_handled_total`) confirm that the calls were answered OK. In "
        "production mode h2load speaks TLS and sends the bearer token; the reference "
        "stays plaintext.",
        "- **Flows**: `phonebind-load --scenario flow` "
        f"({s['concurrency']} tasks, one connection each, closed loop, {s['duration_s']:g} s "
        "after the warm-up): StartRebind, VerifyIdentity, SendCode + VerifyCode for the old "
        "and the new number, CompleteRebind, each on a fresh account registered before the "
        "measured window; codes read from the SMS file (development mode) or the tool's own "
        "HTTP sink (production mode).",
        "- **CPU per flow**: user + system time from `/proc/PID/stat`, sampled every 50 ms "
        "and interpolated to the load tool's measured window, divided by the flows it "
        "completed: the server's workers; PostgreSQL's backends connected to the bench "
        "database (by their process title); PostgreSQL's shared processes (WAL writer, "
        "checkpointer, background writer, autovacuum), which also serve every other "
        "database of the cluster and so count other work on the machine; the load tool's "
        "own figure (`load_cpu_ms_per_op`).",
        "- **Statements and round trips** per RPC: the server's counters "
        "(`phonebind_store_statements_total`, `phonebind_store_round_trips_total` over "
        "`grpc_server_handled_total`, by method) before and after each run; per flow, "
        "those of the flow RPCs and the work outside calls (the outbox dispatcher) over "
        "the CompleteRebind calls.",
        f"- **p99 at ½ peak**: the flows paced (open loop) to half the closed-loop rate, "
        f"{HALF_RATE_RUNS} consecutive runs.",
        f"- **Memory**: `VmRSS` of each worker after every run; the soak repeats flows and "
        f"GetAccount until the server has answered {s['soak_rpcs']:,} RPCs (its own count); "
        f"*flat* means a worker grew by at most {RSS_GROWTH_MB:g} MB from the end of the "
        "half-peak runs to the end.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in m.items()),
        "",
        "## Running it",
        "",
        "```sh",
        "make bench                                  # every configuration",
        "make bench BENCH_ARGS=--quick               # a smoke run of a few seconds each",
        ".venv/bin/python bench/run_bench.py --help  # durations, concurrency, configurations",
        "```",
        "",
        "PostgreSQL runs use `PHONEBIND_BENCH_DATABASE_URL` (default "
        f"`{DEFAULT_PG}`): each configuration creates its own `phonebind_bench_*` database "
        "there and drops it afterwards. h2load comes from PATH or from Debian's "
        "`nghttp2-client` package (`scripts/install-h2load.sh`, which `make bench` runs).",
        "",
    ]
    return "\n".join(out)


def busy_warning(report: dict[str, Any]) -> list[str]:
    """A caveat when other work shared the machine when the run started (during
    it, the bench's own processes keep the cores busy)."""
    cores = report["machine"]["cores"] or 1
    if report["load_average"][0][0] <= cores / 2:
        return []
    return [
        f"**The machine was busy with other work when this run started** (load average "
        f"{report['load_average'][0][0]} on {cores} cores): throughputs are lower and "
        "latencies higher than on a quiet machine; the ratios within the run and CPU time "
        "per flow are the steadier figures.",
        "",
    ]


def text_summary(report: dict[str, Any]) -> str:
    lines = []
    for row in report["targets"]:
        lines.append(
            f"{row['result']:<8} {row['target']:<62} {row['configuration']:<22} "
            f"{_num(row['value'], 3)}"
        )
    return "\n".join(lines)


def write(report: dict[str, Any], out: pathlib.Path) -> None:
    print(text_summary(report))
    for line in busy_warning(report):
        print(line.replace("**", ""))
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "benchmarks.md").write_text(markdown(report), encoding="utf-8")
    print(f"\nwrote {out / 'benchmarks.md'} and benchmarks.json in {report['total_seconds']:.0f} s")


def figures(result: Result) -> dict[str, Any]:
    if not result.available:
        return {"available": False, "reason": result.reason, "seconds": result.seconds}
    return {"available": True, **result.figures, "seconds": result.seconds}


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


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
        help="phonebind-load tasks (env PHONEBIND_BENCH_CONCURRENCY, default 16)",
    )
    parser.add_argument("--h2load-clients", type=int, default=8, help="h2load -c (default 8)")
    parser.add_argument("--h2load-streams", type=int, default=4, help="h2load -m (default 4)")
    parser.add_argument(
        "--soak-rpcs",
        type=int,
        default=SOAK_RPCS,
        help=f"RPCs before the memory figures are taken (default {SOAK_RPCS}; 0: no soak)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 s per measurement, 0.5 s warm-up, no memory soak",
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
        args.duration, args.warmup, args.soak_rpcs = 2.0, 0.5, 0
    chosen = [k.strip() for k in args.configs.split(",") if k.strip()]
    unknown = sorted(set(chosen) - {c.key for c in CONFIGS})
    if unknown:
        parser.error(f"unknown configurations {unknown}")
    settings = Settings(
        args.duration,
        args.warmup,
        args.concurrency,
        args.h2load_clients,
        args.h2load_streams,
        args.soak_rpcs,
    )
    h2 = h2load_path()

    started = time.monotonic()
    load_before = [round(v, 2) for v in os.getloadavg()]
    with reference_server() as reference:
        results = [
            measure(c, settings, args.database_url, reference) for c in CONFIGS if c.key in chosen
        ]
    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(postgres_version(args.database_url), h2),
        "load_average": [load_before, [round(v, 2) for v in os.getloadavg()]],
        "settings": {
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "concurrency": settings.concurrency,
            "h2load_clients": settings.h2load_clients,
            "h2load_streams": settings.h2load_streams,
            "soak_rpcs": settings.soak_rpcs,
            "quick": args.quick,
        },
        "names": {r.config.key: r.config.name for r in results},
        "configurations": {r.config.key: figures(r) for r in results},
        "total_seconds": round(time.monotonic() - started, 1),
    }
    report["targets"] = targets(report["configurations"], settings.soak_rpcs)
    write(report, pathlib.Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
