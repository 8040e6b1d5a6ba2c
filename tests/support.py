"""Helpers the tests share: a controllable clock, the SMS inbox, store snapshots."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
from google.protobuf import message_factory
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from phonebind.v1 import audit_service_pb2, review_service_pb2
from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import binding_service_pb2_grpc as api_grpc
from phonebind.v1 import resources_pb2 as res
from phonebind_server.logs import JsonFormatter

# Every RPC of the three services: path -> (request class, response class), in
# the order the protos declare them.
SERVICES = [
    api.DESCRIPTOR.services_by_name["BindingService"],
    review_service_pb2.DESCRIPTOR.services_by_name["ReviewService"],
    audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"],
]
RPCS = {
    f"/{service.full_name}/{method.name}": (
        message_factory.GetMessageClass(method.input_type),
        message_factory.GetMessageClass(method.output_type),
    )
    for service in SERVICES
    for method in service.methods
}

# The BindingService RPCs that act on one rebind of one account.
FLOW_RPCS = [
    "VerifyIdentity",
    "SendCode",
    "VerifyCode",
    "CompleteRebind",
    "CancelRebind",
    "GetRebind",
]
OLD = res.CODE_TARGET_OLD_PHONE
NEW = res.CODE_TARGET_NEW_PHONE

# A valid GB 11643 number (from the standard's own example) and the holder name.
ID_NUMBER = "11010519491231002X"
HOLDER = "张三"


def id_check_char(first17: str) -> str:
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    total = sum(int(d) * w for d, w in zip(first17, weights, strict=True))
    return "10X98765432"[total % 11]


def make_id_number(region: str = "440305", birth: str = "19900307", seq: str = "123") -> str:
    first17 = region + birth + seq
    return first17 + id_check_char(first17)


class FakeClock:
    """The server's clock in tests: starts at a fixed instant, moves only when told."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta


class LogLines(logging.Handler):
    """Collects log records as the service's JSON lines. The log gateway's
    logger, which prints SMS on purpose, is left out; with `service_only`, so is
    every library's output (e.g. peewee's SQL at DEBUG)."""

    def __init__(self, *, service_only: bool = False) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.service_only = service_only
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "phonebind.sms.dev":
            return
        if self.service_only and not record.name.startswith("phonebind"):
            return
        self.lines.append(self.format(record))


# A one-time code as the SMS text carries it.
_CODE = re.compile(r"(?<![0-9])([0-9]{6})(?![0-9])")


def sms_file_messages(path: str) -> list[dict[str, str]]:
    """What the file gateway wrote to `path`, one dict per message."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class Secrets:
    """Every code, full number and ID number a test used: none may reach a log.

    Besides what a test adds itself, every number and code in a watched SMS
    file counts, and the log files of server processes the test started are
    searched too: a secret the test never read is still checked.
    """

    def __init__(self) -> None:
        self.values: set[str] = set()
        self._sms_files: list[str] = []
        self._logs: list[Path] = []

    def add_phone(self, raw: str) -> None:
        digits = "".join(c for c in raw if c in "0123456789")
        national = digits[2:] if digits.startswith("86") and len(digits) == 13 else digits
        self.values.update({national, "+86" + national, "86" + national, "0086" + national})

    def add(self, value: str) -> None:
        if len(value) >= 6:
            self.values.add(value)

    def watch_sms(self, path: str) -> None:
        """A file gateway's file: its numbers and codes are secrets too."""
        if path not in self._sms_files:
            self._sms_files.append(path)

    def watch_log(self, path: Path) -> None:
        """A server process's log file, searched with the test's captured logs."""
        if path not in self._logs:
            self._logs.append(path)

    def _add_delivered(self) -> None:
        for path in self._sms_files:
            for message in sms_file_messages(path):
                self.add_phone(message["to"])
                for code in _CODE.findall(message["text"]):
                    self.add(code)

    def log_lines(self) -> list[str]:
        return [
            line
            for path in self._logs
            if path.exists()
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
        ]

    def leaked(self, lines: list[str]) -> list[str]:
        """The JSON log lines that hold one of the secrets.

        Random ids, hashes and timings hold arbitrary runs of digits, so a six-digit
        code turns up in them by chance; they are left out of the search.
        """
        self._add_delivered()
        if not self.values:
            return []
        alternatives = "|".join(map(re.escape, sorted(self.values)))
        secret = re.compile(rf"(?<![0-9])(?:{alternatives})(?![0-9])")
        found = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # a plain line (a process's own stdout) counts whole
                record = {"line": line}
            if not isinstance(record, dict):
                record = {"line": line}
            text = "\n".join(str(v) for k, v in record.items() if k not in _NOISE_FIELDS)
            if secret.search(_HEX_TOKEN.sub("", text)):
                found.append(line)
        return found


_NOISE_FIELDS = frozenset({"time", "request_id", "message_id", "duration_ms"})
# Hex ids and digests (request ids, blind indexes, MACs) with at least one letter.
_HEX_TOKEN = re.compile(r"(?=[0-9a-f]*[a-f])[0-9a-f]{16,}")


@dataclass
class Inbox:
    """Reads what the file gateway delivered, as a handset would."""

    path: str
    secrets: Secrets
    _consumed: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.secrets.watch_sms(self.path)

    def messages(self) -> list[dict[str, str]]:
        return sms_file_messages(self.path)

    def to(self, e164: str, purpose: str | None = None) -> list[dict[str, str]]:
        return [
            m
            for m in self.messages()
            if m["to"] == e164 and (purpose is None or m["purpose"] == purpose)
        ]

    def wait_for(
        self, e164: str, count: int, purpose: str | None = None, timeout: float = 10.0
    ) -> list[dict[str, str]]:
        """Waits for the outbox dispatcher to deliver (it runs in the background)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.to(e164, purpose)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.01)

    def next_code(self, e164: str, timeout: float = 10.0) -> str:
        """The code of the next REBIND_CODE message to this number."""
        seen = self._consumed.get(e164, 0)
        found = self.wait_for(e164, seen + 1, "REBIND_CODE", timeout)
        assert len(found) > seen, f"no new code delivered to {e164[:5]}…"
        self._consumed[e164] = seen + 1
        match = _CODE.search(found[seen]["text"])
        assert match, "code message without a 6-digit code"
        self.secrets.add(match.group(1))
        return match.group(1)


def e164(national: str) -> str:
    return "+86" + national


def error_details(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, object]]:
    """(status, ErrorInfo reason, the other details) of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status on {error.code()}: {error.details()}"
    found: dict[str, object] = {}
    reason = ""
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
            error_details_pb2.LocalizedMessage,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    info = found.get("ErrorInfo")
    assert info is not None, "every error must carry ErrorInfo"
    assert info.domain == "phonebind.v1"
    reason = info.reason
    return error.code(), reason, found


class Api:
    """The generated stub with short helpers for the common steps."""

    def __init__(self, channel: grpc.Channel, inbox: Inbox, secrets: Secrets) -> None:
        self.stub = api_grpc.BindingServiceStub(channel)
        self.inbox = inbox
        self.secrets = secrets

    def register(
        self,
        account_id: str,
        phone: str,
        *,
        name: str = HOLDER,
        id_number: str = ID_NUMBER,
        request_id: str = "",
    ) -> res.Account:
        self.secrets.add_phone(phone)
        self.secrets.add(id_number)
        return self.stub.RegisterAccount(
            api.RegisterAccountRequest(
                account_id=account_id,
                holder_name=name,
                id_number=id_number,
                phone=phone,
                request_id=request_id,
            )
        ).account

    def start(self, account_id: str, new_phone: str, *, lost: bool = False, request_id: str = ""):
        self.secrets.add_phone(new_phone)
        return self.stub.StartRebind(
            api.StartRebindRequest(
                account_id=account_id,
                new_phone=new_phone,
                old_phone_lost=lost,
                request_id=request_id,
            )
        ).rebind

    def identity(
        self, account_id: str, rebind_id: str, name: str = HOLDER, id_number: str = ID_NUMBER
    ):
        self.secrets.add(id_number)
        return self.stub.VerifyIdentity(
            api.VerifyIdentityRequest(
                account_id=account_id, rebind_id=rebind_id, holder_name=name, id_number=id_number
            )
        ).rebind

    def send(self, account_id: str, rebind_id: str, target: int, request_id: str = ""):
        return self.stub.SendCode(
            api.SendCodeRequest(
                account_id=account_id, rebind_id=rebind_id, target=target, request_id=request_id
            )
        )

    def verify(self, account_id: str, rebind_id: str, target: int, code: str):
        self.secrets.add(code)
        return self.stub.VerifyCode(
            api.VerifyCodeRequest(
                account_id=account_id, rebind_id=rebind_id, target=target, code=code
            )
        ).rebind

    def complete(self, account_id: str, rebind_id: str, request_id: str = ""):
        return self.stub.CompleteRebind(
            api.CompleteRebindRequest(
                account_id=account_id, rebind_id=rebind_id, request_id=request_id
            )
        )

    def get_rebind(self, account_id: str, rebind_id: str):
        return self.stub.GetRebind(
            api.GetRebindRequest(account_id=account_id, rebind_id=rebind_id)
        ).rebind

    def get_account(self, account_id: str):
        return self.stub.GetAccount(api.GetAccountRequest(account_id=account_id)).account

    def send_and_verify(self, account_id: str, rebind_id: str, target: int, phone: str):
        self.send(account_id, rebind_id, target)
        return self.verify(account_id, rebind_id, target, self.inbox.next_code(e164(phone)))

    def ready_rebind(
        self, account_id: str, old_phone: str, new_phone: str, name: str = HOLDER
    ) -> res.Rebind:
        """Registers nothing; starts a rebind and does every step up to READY."""
        rebind = self.start(account_id, new_phone)
        self.identity(account_id, rebind.rebind_id, name=name)
        self.send_and_verify(account_id, rebind.rebind_id, OLD, old_phone)
        rebind = self.send_and_verify(account_id, rebind.rebind_id, NEW, new_phone)
        assert rebind.state == res.REBIND_STATE_READY
        return rebind


class LoopThread:
    """An event loop on a thread of its own: the tests' servers run there, and
    the synchronous tests reach them through `run`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="server-loop", daemon=True
        )
        self._thread.start()

    def run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def rows(url: str, sql: str, *params: object) -> list[tuple]:
    """Rows straight from the database through the driver, so that the models of a
    server running in this process stay bound to its own store; `?` is the
    placeholder on both backends."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(sqlite_path(url), timeout=10)
        try:
            return connection.execute(sql, params).fetchall()
        finally:
            connection.close()
    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(sql.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []


def column_names(url: str, table: str) -> list[str]:
    """The columns of `table`, in order."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(sqlite_path(url), timeout=10)
        try:
            return [
                d[0] for d in connection.execute(f"SELECT * FROM {table} WHERE 1 = 0").description
            ]
        finally:
            connection.close()
    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(f"SELECT * FROM {table} WHERE 1 = 0")
        return [d.name for d in cursor.description]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls `predicate` until it holds; the seconds that took. Fails after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serving(address: str) -> bool:
    """Whether Health/Check on `address` answers SERVING now."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(address: str, process: subprocess.Popen, why=lambda: "") -> None:
    """Waits (30 s at most) until the server process answers SERVING."""
    deadline = time.monotonic() + 30
    while not serving(address):
        assert process.poll() is None, f"the server exited: {why()}"
        assert time.monotonic() < deadline, f"{address} did not become SERVING"
        time.sleep(0.05)


@dataclass
class Serve:
    """`phonebind-server serve --dev` as a child process, with its logs in a file
    (a pipe nobody reads would fill up and stall the server). The file gateway
    writes to `sms_file`, unless `gateway` names another. Restarting keeps the
    earlier runs' logs in the same file."""

    database_url: str
    tmp_path: Path
    sms_file: str = ""
    extra: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    gateway: str = ""
    # The test's secrets: the server's log file is searched for them, and the
    # numbers and codes in its SMS file count as secrets.
    secrets: Secrets | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.tmp_path / f"serve-{self.port}.log"

    def start(self) -> Serve:
        if self.secrets is not None:
            self.secrets.watch_log(self.log_path)
            if self.sms_file:
                self.secrets.watch_sms(self.sms_file)
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
        with open(self.log_path, "a", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                [
                    os.path.join(os.path.dirname(sys.executable), "phonebind-server"),
                    "serve",
                    "--dev",
                    "--listen",
                    self.address,
                    "--database-url",
                    self.database_url,
                    "--sms-gateway",
                    self.gateway or f"file:{self.sms_file}",
                    *self.extra,
                ],
                cwd=self.tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**environment, **self.env},
            )
        wait_serving(self.address, self.process, lambda: self.log()[-2000:])
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def sqlite_path(url: str) -> str:
    return url[len("sqlite:///") :]


@contextmanager
def held_lock(url: str, rebind_id: str) -> Iterator[None]:
    """Makes the next write to the rebind's account wait: the account's row (which
    every unit of work on the account locks first) locked FOR UPDATE on
    PostgreSQL, the database's write lock on SQLite."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(sqlite_path(url), isolation_level=None, timeout=10)
        try:
            connection.execute("BEGIN IMMEDIATE")
            yield
            connection.execute("ROLLBACK")
        finally:
            connection.close()
        return
    with psycopg.connect(url) as connection:
        found = connection.execute(
            "SELECT 1 FROM accounts WHERE account_id ="
            " (SELECT account_id FROM rebinds WHERE rebind_id = %s) FOR UPDATE",
            (rebind_id,),
        ).fetchone()
        assert found is not None
        yield
        connection.rollback()
