"""Faults the service survives (issue 5): the database going away, a worker
killed with SIGKILL in the middle of load, two `serve` instances on one database,
SIGTERM with a call in flight, and a client deadline that expires mid-call.

Load tests end with the same questions, asked of the database itself (see
`assert_invariants`): is every account bound to exactly one number and no
number to two accounts, is every completed change recorded once with its
notice, does every account's number follow its history, is nothing half-done
visible, and does the audit trail verify?

Slow calls are made on purpose by holding a lock from the test: a row lock
(`SELECT … FOR UPDATE`) on the rebind on PostgreSQL, the write lock
(`BEGIN IMMEDIATE`) on SQLite, where the server waits up to its busy_timeout
of 10 s.

The database outage is a PostgreSQL fault, made for one server only by a TCP
proxy between it and the shared PostgreSQL. SQLite has no analogue worth a
test: it is a file inside the server's own process, so it cannot become
unreachable while the server runs (open descriptors outlive permission
changes, and CI runs as root), and a write lock held past busy_timeout is
contention (STORE_UNAVAILABLE after 10 s), not an outage that health should
report.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import peewee
import psycopg
import pytest
from conftest import emptied, start_server
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from support import (
    HOLDER,
    ID_NUMBER,
    NEW,
    OLD,
    Api,
    Inbox,
    Serve,
    e164,
    error_details,
    free_port,
    held_lock,
    make_id_number,
    rows,
    serving,
    wait_until,
)

from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import resources_pb2 as res
from phonebind_client import PhonebindClient, PhonebindError
from phonebind_server.domain.context import CallContext
from phonebind_server.domain.errors import DomainError, Reason
from phonebind_server.domain.model import CodeTarget
from phonebind_server.domain.ports import DeadlinePassed, StoreUnavailable
from phonebind_server.store.engine import Answer
from phonebind_server.store.query import Query
from phonebind_server.store.store import Store, tx_read
from phonebind_server.store.unit import value

BIN = Path(sys.executable).parent
OPEN_STATES = ("PENDING", "AWAITING_REVIEW", "READY")


# -- a TCP proxy the test can cut: the database unreachable for one server only -------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `upstream` until cut.

    `cut()` closes every forwarded connection and the listening socket, so
    connecting is refused at once, as when the database host is down or
    partitioned away; `restore()` listens on the same port again. `freeze()`
    is the silent partition: connections stay open but nothing gets through
    (until `thaw()`).
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._frozen = threading.Event()
        self.accepted = 0
        self._listen()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._stop = threading.Event()
        self._listener = listener
        threading.Thread(
            target=self._accept, args=(listener, self._stop), name="proxy", daemon=True
        ).start()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            server.settimeout(None)
            with self._lock:
                if stop.is_set():
                    client.close()
                    server.close()
                    return
                self._sockets.update((client, server))
                self.accepted += 1
            for source, sink in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink), name="proxy-pump", daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self._frozen.is_set():
                    time.sleep(0.01)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._close(source)
            self._close(sink)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._sockets) // 2

    def cut(self) -> None:
        self._stop.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._close(sock)

    def restore(self) -> None:
        self._listen()

    def refuse_new(self) -> None:
        """New connections are refused; those already forwarded go on working
        (a database at its connection limit)."""
        self._stop.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def freeze(self) -> None:
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()


def via_proxy(url: str, port: int) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


def upstream_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


# -- small helpers ---------------------------------------------------------------------


def health(channel: grpc.Channel) -> str:
    """Health/Check of the whole server: SERVING, NOT_SERVING or the failure's code."""
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=1
        )
    except grpc.RpcError as error:
        return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def outcome(call: Callable[[], object]) -> str:
    """OK, or STATUS/REASON of the failure."""
    try:
        call()
    except grpc.RpcError as error:
        code, reason, _ = error_details(error)
        return f"{code.name}/{reason}"
    return "OK"


def outcome_code(call: Callable[[], object]) -> str:
    """OK, or the failure's status code (for failures that carry no ErrorInfo)."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def tally(outcomes: list[str]) -> dict[str, int]:
    return dict(Counter(outcomes).most_common())


def wait_blocked(url: str) -> None:
    """Waits until a server session waits on the test's row lock (PostgreSQL);
    on SQLite, where a waiting writer cannot be seen, gives the call a moment."""
    if url.startswith("sqlite"):
        time.sleep(0.5)
        return
    connection = psycopg.connect(url)
    connection.autocommit = True

    def waiting() -> bool:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return cursor.fetchone()[0] > 0

    try:
        wait_until(waiting, 10, "a server call waiting on the test's lock")
    finally:
        connection.close()


@pytest.fixture
def postgres_db(postgres_url: str) -> str:
    """The per-run PostgreSQL database, emptied (for tests that only make sense there)."""
    return emptied(postgres_url)


# -- `phonebind-server serve` as a child process ----------------------------------------


def children(pid: int) -> list[int]:
    """Live child processes of `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


def worker_pids(supervisor: int) -> list[int]:
    """The `serve --workers N` supervisor's server processes (spawned interpreters;
    the multiprocessing resource tracker is a child too, but not a worker)."""
    workers = []
    for pid in children(supervisor):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"spawn_main" in handle.read():
                    workers.append(pid)
        except OSError:
            continue
    return workers


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(f"/proc/{pid}/fd/{descriptor}") in inodes:
                return True
        except OSError:
            continue
    return False


def wait_workers(supervisor: int, port: int, previous: set[int]) -> list[int]:
    """Waits until the supervisor runs two workers, both listening on `port` and one
    of them new when `previous` (the workers before one was killed) is given."""

    def ready() -> bool:
        pids = worker_pids(supervisor)
        fresh = set(pids) - previous
        return (
            len(pids) == 2
            and len(fresh) == (1 if previous else 2)
            and all(listening(pid, port) for pid in pids)
        )

    wait_until(ready, 30, "two workers listening")
    return worker_pids(supervisor)


# -- complete flows under load, and what the database must look like afterwards ---------


class Codes:
    """The codes the file gateway delivered, per number, read as the file grows."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._offset = 0
        self._codes: dict[str, list[str]] = {}

    def _read(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            message = json.loads(line)
            if message["purpose"] == "REBIND_CODE":
                code = re.search(r"(?<![0-9])[0-9]{6}(?![0-9])", message["text"])
                assert code is not None
                self._codes.setdefault(message["to"], []).append(code.group())

    def wait(self, to: str, exclude: set[str], timeout: float = 5.0) -> str | None:
        """The newest code sent to `to` that is not in `exclude`, or None in time."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._read()
                fresh = [c for c in self._codes.get(to, []) if c not in exclude]
            if fresh:
                return fresh[-1]
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)


class Calls(grpc.UnaryUnaryClientInterceptor):
    """Counts every attempt's outcome (retries included) as METHOD STATUS/REASON."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[tuple[float, str]] = []
        self.total = 0

    def intercept_unary_unary(self, continuation, client_call_details, request):
        call = continuation(client_call_details, request)
        code = call.code()
        with self._lock:
            self.total += 1
        if code is grpc.StatusCode.OK:
            return call
        reason = ""
        try:
            status = rpc_status.from_call(call)
        except ValueError:
            status = None
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
        method = client_call_details.method.rsplit("/", 1)[-1]
        with self._lock:
            self.seen.append((time.monotonic(), f"{method} {code.name}/{reason or '-'}"))
        return call

    def since(self, start: float, end: float = float("inf")) -> dict[str, int]:
        with self._lock:
            return tally([what for at, what in self.seen if start <= at < end])


@dataclass
class Flow:
    account_id: str
    old: str
    new: str
    rebind_id: str = ""
    completed: bool = False  # CompleteRebind answered COMPLETED to the client
    outcome: str = ""
    finished_at: float = 0.0


def masked(phone: str) -> str:
    return phone[:3] + "****" + phone[-4:]


def run_flow(clients: list[PhonebindClient], codes: Codes, flow: Flow) -> Flow:
    """One complete change: register, start, identity, both codes, complete. Each call
    goes to the next of `clients`. A call cut by a dying server (plain UNAVAILABLE,
    which the facade does not retry for calls without a request_id) is settled by
    reading the rebind: done, or tried once more."""
    turn = itertools.cycle(clients)

    def settle(step: int, call: Callable[[PhonebindClient], object]) -> None:
        try:
            call(next(turn))
        except PhonebindError as error:
            if error.code is not grpc.StatusCode.UNAVAILABLE:
                raise
            rebind = next(turn).get_rebind(flow.account_id, flow.rebind_id)
            if step not in rebind.completed_steps:
                call(next(turn))

    try:
        next(turn).register_account(flow.account_id, HOLDER, ID_NUMBER, flow.old)
        flow.rebind_id = next(turn).start_rebind(flow.account_id, flow.new).rebind_id
        settle(
            res.REBIND_STEP_IDENTITY,
            lambda c: c.verify_identity(flow.account_id, flow.rebind_id, HOLDER, ID_NUMBER),
        )
        for target, phone, step in (
            ("old", flow.old, res.REBIND_STEP_OLD_PHONE_CODE),
            ("new", flow.new, res.REBIND_STEP_NEW_PHONE_CODE),
        ):
            next(turn).send_code(flow.account_id, flow.rebind_id, target)
            tried: set[str] = set()
            while True:  # a number shared by two racing flows gets two codes
                code = codes.wait(e164(phone), tried)
                if code is None:
                    flow.outcome = f"NO_CODE_{target.upper()}"
                    return flow
                tried.add(code)
                try:
                    settle(
                        step,
                        lambda c, code=code, target=target: c.verify_code(
                            flow.account_id, flow.rebind_id, target, code
                        ),
                    )
                    break
                except PhonebindError as error:
                    if error.reason != "CODE_MISMATCH" or len(tried) > 2:
                        raise
        done = next(turn).complete_rebind(flow.account_id, flow.rebind_id)
        assert done.rebind.state == res.REBIND_STATE_COMPLETED
        assert done.account.phone_masked == masked(flow.new)
        flow.completed = True
        flow.outcome = "COMPLETED"
    except PhonebindError as error:
        flow.outcome = error.reason or error.code.name
    except Exception as error:  # noqa: BLE001 - reported with the outcomes, not lost in a thread
        flow.outcome = f"{type(error).__name__}: {error}"
    finally:
        flow.finished_at = time.monotonic()
    return flow


@contextmanager
def clients(addresses: list[str], calls: Calls) -> Iterator[list[PhonebindClient]]:
    """A facade per address, each on a connection of its own (a local subchannel
    pool), so that the clients of one test spread over the workers sharing a port."""
    channels = [
        grpc.intercept_channel(
            grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]),
            calls,
        )
        for address in addresses
    ]
    try:
        yield [
            PhonebindClient(address, channel=channel, timeout=10, max_attempts=6)
            for address, channel in zip(addresses, channels, strict=True)
        ]
    finally:
        for channel in channels:
            channel.close()


def assert_invariants(url: str, flows: list[Flow]) -> dict[str, int]:
    """What must hold in the database after any fault; returns a few counts."""
    accounts = dict(rows(url, "SELECT account_id, phone_index FROM accounts"))
    masks = dict(rows(url, "SELECT account_id, phone_masked FROM accounts"))
    rebinds = {
        r[0]: r[1:]
        for r in rows(
            url,
            "SELECT rebind_id, account_id, state, new_phone_index, completed_steps FROM rebinds",
        )
    }
    changes = rows(
        url,
        "SELECT seq, rebind_id, account_id, old_phone_index, new_phone_index"
        " FROM binding_changes ORDER BY seq",
    )
    notices = rows(
        url, "SELECT rebind_id, to_index FROM sms_outbox WHERE purpose = 'CHANGE_NOTICE'"
    )
    code_messages = rows(
        url, "SELECT rebind_id, to_index FROM sms_outbox WHERE purpose = 'REBIND_CODE'"
    )
    challenges = rows(url, "SELECT rebind_id, target, state FROM challenges")
    audited = Counter(
        r[0]
        for r in rows(
            url, "SELECT rebind_id FROM audit_events WHERE action = ?", "REBIND_COMPLETED"
        )
    )

    # Every account has exactly one number, and no number is on two accounts.
    assert all(accounts.values()), "an account without a number"
    bound = Counter(accounts.values())
    assert max(bound.values(), default=1) == 1, "a number bound to two accounts"

    # Every completed rebind has exactly one history row and one notice to the old
    # number; every history row belongs to a completed rebind.
    completed = {rid for rid, r in rebinds.items() if r[1] == "COMPLETED"}
    by_rebind = {c[1]: c for c in changes}
    assert len(by_rebind) == len(changes)
    assert set(by_rebind) == completed, "history rows and completed rebinds differ"
    notice_count = Counter(rid for rid, _ in notices)
    for rid in completed:
        _, _, account_id, old_index, new_index = by_rebind[rid]
        assert account_id == rebinds[rid][0]
        assert new_index == rebinds[rid][2]
        assert notice_count[rid] == 1, f"rebind {rid}: {notice_count[rid]} notices"
        assert (rid, old_index) in notices, "the notice did not go to the old number"
        assert audited[rid] == 1, f"rebind {rid}: {audited[rid]} completion audit events"
    assert set(notice_count) == completed, "a notice without a completed change"
    assert set(audited) == completed, "a completion audited but not applied"

    # Each account's number is its last change's new number, and its changes chain.
    history: dict[str, list[tuple]] = {}
    for change in changes:
        history.setdefault(change[2], []).append(change)
    for account_id, chain in history.items():
        assert accounts[account_id] == chain[-1][4], f"{account_id}: number differs from history"
        for before, after in itertools.pairwise(chain):
            assert after[3] == before[4]

    # At most one open rebind per account.
    open_per_account = Counter(r[0] for r in rebinds.values() if r[1] in OPEN_STATES)
    assert max(open_per_account.values(), default=1) == 1, "two open rebinds on one account"

    # Nothing half-done: a code step is completed exactly when its code was used, and
    # every code message has its challenge (and the other way round).
    used = {(rid, target) for rid, target, state in challenges if state == "USED"}
    for rid, (_, _, _, steps) in rebinds.items():
        done = set(filter(None, steps.split(",")))
        for target, step in (("OLD_PHONE", "OLD_PHONE_CODE"), ("NEW_PHONE", "NEW_PHONE_CODE")):
            assert ((rid, target) in used) == (step in done), f"rebind {rid}: {step} half-done"
    assert {rid for rid, _ in code_messages} == {rid for rid, _, _ in challenges}
    for rid, to_index in code_messages:
        account_id, _, new_index, _ = rebinds[rid]
        old_index = by_rebind[rid][3] if rid in by_rebind else accounts[account_id]
        assert to_index in (old_index, new_index), "a code to neither the old nor the new number"

    # What the clients were told agrees with the database.
    for flow in flows:
        if flow.completed:
            assert flow.rebind_id in completed
        if flow.account_id in masks:
            expected = flow.new if flow.rebind_id in completed else flow.old
            assert masks[flow.account_id] == masked(expected)

    verify = subprocess.run(
        [str(BIN / "phonebind-server"), "audit", "verify", "--dev", "--database-url", url],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")},
    )
    assert verify.returncode == 0 and verify.stdout.startswith("ok:"), verify.stdout
    return {
        "accounts": len(accounts),
        "completed": len(completed),
        "open": sum(open_per_account.values()),
    }


class Load:
    """Client threads running complete flows, one fresh account after another."""

    def __init__(
        self, addresses: list[str], codes: Codes, prefix: str, tag: int, threads: int
    ) -> None:
        self.addresses = addresses
        self.codes = codes
        self.prefix = prefix
        self.tag = tag
        self.calls = Calls()
        self.flows: list[Flow] = []
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"load-{n}", daemon=True)
            for n in range(threads)
        ]

    def _next(self) -> Flow:
        with self._lock:
            n = next(self._numbers)
            flow = Flow(f"{self.prefix}-{n}", f"138{self.tag}{n:07d}", f"139{self.tag}{n:07d}")
            self.flows.append(flow)
            return flow

    def _run(self) -> None:
        while not self.stopping.is_set():
            with clients(self.addresses, self.calls) as facades:
                run_flow(facades, self.codes, self._next())

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def completed_since(self, start: float) -> int:
        with self._lock:
            return sum(1 for f in self.flows if f.completed and f.finished_at >= start)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), "a load thread did not finish"

    def outcomes(self) -> dict[str, int]:
        return tally([f.outcome for f in self.flows])


# -- the database goes away ----------------------------------------------------------------


@contextmanager
def server_behind_proxy(postgres_db, tmp_path, clock, secrets_seen, **settings):
    """A server that reaches PostgreSQL through a TcpProxy the test can cut or
    freeze, with health pinging the store every 0.2 s."""
    proxy = TcpProxy(upstream_of(postgres_db))
    running = start_server(
        via_proxy(postgres_db, proxy.port),
        tmp_path,
        clock,
        secrets_seen,
        health_interval_seconds=0.2,
        **settings,
    )
    try:
        yield proxy, running
    finally:
        proxy.thaw()
        running.stop()
        proxy.cut()


@pytest.fixture
def proxied(postgres_db, tmp_path, clock, secrets_seen):
    with server_behind_proxy(postgres_db, tmp_path, clock, secrets_seen) as behind:
        yield behind


def test_database_outage_answers_store_unavailable_and_recovers_by_itself(proxied):
    """PostgreSQL unreachable for this server only (a proxy between them is cut)."""
    proxy, running = proxied
    pb = running.api
    pb.register("out-1", "13800138501")
    rebind = pb.start("out-1", "13900139501")
    # Many pooled connections, one per RPC thread, all of them about to die.
    with ThreadPoolExecutor(24) as pool:
        warm = list(pool.map(lambda _: outcome(lambda: pb.get_account("out-1")), range(200)))
    assert set(warm) == {"OK"}
    pooled = proxy.connections
    before = running.snapshot()

    proxy.cut()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        pb.identity("out-1", rebind.rebind_id)
    refused_in = time.monotonic() - started
    code, reason, details = error_details(caught.value)
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    assert details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0
    assert refused_in < 5, "a call during the outage must fail fast, not hang"
    not_serving_in = wait_until(
        lambda: health(running.channel) == "NOT_SERVING", 5, "health NOT_SERVING"
    )
    during = [
        outcome(call)
        for call in (
            lambda: pb.get_account("out-1"),
            lambda: pb.identity("out-1", rebind.rebind_id),
            lambda: pb.send("out-1", rebind.rebind_id, OLD, request_id="r-out"),
        )
        for _ in range(3)
    ]
    assert set(during) == {"UNAVAILABLE/STORE_UNAVAILABLE"}

    proxy.restore()
    serving_in = wait_until(lambda: health(running.channel) == "SERVING", 5, "health SERVING")
    # Every RPC thread's old connection died with the outage; none may fail a call.
    with ThreadPoolExecutor(24) as pool:
        after = list(pool.map(lambda _: outcome(lambda: pb.get_account("out-1")), range(200)))
    assert tally(after) == {"OK": 200}
    # Nothing the refused calls tried happened; the flow finishes on the same server.
    assert running.snapshot() == before
    pb.identity("out-1", rebind.rebind_id)
    pb.send_and_verify("out-1", rebind.rebind_id, OLD, "13800138501")
    pb.send_and_verify("out-1", rebind.rebind_id, NEW, "13900139501")
    done = pb.complete("out-1", rebind.rebind_id)
    assert done.rebind.state == res.REBIND_STATE_COMPLETED
    print(
        f"\n[outage] {pooled} pooled connections cut; a call refused in {refused_in:.3f} s;"
        f" NOT_SERVING after {not_serving_in:.2f} s; during: {tally(during)};"
        f" SERVING {serving_in:.2f} s after restore; after: {tally(after)}"
    )


def test_silent_partition_turns_health_not_serving(proxied):
    """The database stops answering without closing anything: health notices."""
    proxy, running = proxied
    running.api.register("part-0", "13800138510")
    proxy.freeze()
    # The ping gets no answer; after its deadline (1 s) health says NOT_SERVING.
    wait_until(lambda: health(running.channel) == "NOT_SERVING", 3, "health NOT_SERVING")
    proxy.thaw()
    wait_until(lambda: health(running.channel) == "SERVING", 5, "health SERVING again")


@pytest.fixture
def proxied_two_connections(postgres_db, tmp_path, clock, secrets_seen):
    """As `proxied`, with two pooled connections: two calls stuck on the database
    hold all of them."""
    with server_behind_proxy(
        postgres_db, tmp_path, clock, secrets_seen, store_connections=2
    ) as behind:
        yield behind


def registered_on_every_connection(pb: Api, account_id: str, phone: str) -> None:
    """Registers the account, then reads it many times in parallel, so that
    every pooled connection is open before the database misbehaves."""
    pb.register(account_id, phone)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: pb.get_account(account_id), range(40)))


def not_ok_get_accounts(running) -> float:
    """GetAccount calls the server has finished with another outcome than OK."""
    return sum(
        sample.value
        for family in running.app.metrics.registry.collect()
        if family.name == "phonebind_rpcs"
        for sample in family.samples
        if sample.name == "phonebind_rpcs_total"
        and sample.labels["method"].endswith("/GetAccount")
        and sample.labels["outcome"] != "OK"
    )


def test_a_silent_database_frees_waiting_calls_and_answers_store_unavailable(
    proxied_two_connections,
):
    """The database stops answering but every connection stays open (a hung
    server, or a proxy that accepts and holds): calls waiting on it are cut one
    second after their deadline and their connections shut, and while health
    says NOT_SERVING new calls answer STORE_UNAVAILABLE at once."""
    proxy, running = proxied_two_connections
    pb = running.api
    registered_on_every_connection(pb, "part-1", "13800138511")
    proxy.freeze()
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:  # as many calls as the server has connections
        stuck = list(
            pool.map(
                lambda _: outcome_code(
                    lambda: pb.stub.GetAccount(
                        api.GetAccountRequest(account_id="part-1"), timeout=1
                    )
                ),
                range(2),
            )
        )
    assert stuck == ["DEADLINE_EXCEEDED"] * 2
    wait_until(lambda: health(running.channel) == "NOT_SERVING", 8, "health NOT_SERVING")
    freed_in = time.monotonic() - started
    # Both stuck calls ended on the server (their statements cut, not waited out;
    # the health ping's may have been cut too): seconds, not the minutes TCP takes,
    # with room for a busy machine.
    wait_until(lambda: not_ok_get_accounts(running) == 2, 10, "both stuck calls to end")
    metric = running.app.metrics.registry.get_sample_value
    assert metric("phonebind_store_connections_cut_total") >= 2
    assert metric("phonebind_store_up") == 0

    asked = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        pb.stub.GetAccount(api.GetAccountRequest(account_id="part-1"), timeout=5)
    answered_in = time.monotonic() - asked
    code, reason, details = error_details(refused.value)
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    assert "RetryInfo" in details
    assert answered_in < 1, answered_in

    proxy.thaw()
    wait_until(lambda: health(running.channel) == "SERVING", 10, "health SERVING again")
    assert metric("phonebind_store_up") == 1
    assert pb.get_account("part-1").phone_masked == "138****8511"
    print(
        f"\n[postgresql] silent database: both calls ended {freed_in:.2f} s after two"
        f" 1 s calls began; a new call answered STORE_UNAVAILABLE in {answered_in * 1000:.0f} ms"
    )


def test_a_database_refusing_only_new_connections_still_serves_calls(proxied_two_connections):
    """At its connection limit the database refuses new connections but serves the
    open ones: health says NOT_SERVING (its ping needs a new connection here),
    while calls go on through the connections the server already holds."""
    proxy, running = proxied_two_connections
    pb = running.api
    registered_on_every_connection(pb, "lim-1", "13800138512")
    proxy.refuse_new()
    ping_pid = running.app.store.engine._ping_connection.info.backend_pid
    terminate(postgres_url_of(running, proxy), ping_pid)  # the ping must connect anew
    wait_until(lambda: health(running.channel) == "NOT_SERVING", 5, "health NOT_SERVING")
    answers = [pb.get_account("lim-1").phone_masked for _ in range(20)]
    assert answers == ["138****8512"] * 20
    proxy.restore()
    wait_until(lambda: health(running.channel) == "SERVING", 10, "health SERVING again")


def test_a_ping_connection_lost_alone_does_not_count_as_an_outage(postgres_db):
    """An idle-session timeout or a DBA ends the ping's own connection: the ping
    tries a fresh one before it calls the database unreachable."""

    async def ping_twice() -> None:
        store = Store(postgres_db)
        try:
            assert await store.ping(2) is Answer.UP
            first = store.engine._ping_connection.info.backend_pid
            terminate(postgres_db, first)
            assert await store.ping(2) is Answer.UP
            assert store.engine._ping_connection.info.backend_pid != first
        finally:
            await store.close()

    asyncio.run(ping_twice())


def terminate(url: str, pid: int) -> None:
    assert rows(url, "SELECT pg_terminate_backend(?)", pid) == [(True,)]


def postgres_url_of(running, proxy) -> str:
    """The server's database URL without the proxy in between."""
    host, port = proxy.upstream
    return running.database_url.replace(f"127.0.0.1:{proxy.port}", f"{host}:{port}")


def test_a_statement_without_a_deadline_is_cut_at_the_statement_timeout(postgres_db):
    """Background work (the outbox, housekeeping) has no caller's deadline: a
    silent database still gets no longer than the statement timeout and a grace."""
    proxy = TcpProxy(upstream_of(postgres_db))
    cut: list[int] = []

    def read() -> None:
        with store.transaction(write=False) as tx:
            assert tx.one(tx.accounts.get("nobody")) is None

    async def silent() -> float:
        await store.open()
        try:
            assert await store.ping(2) is Answer.UP
            await store.run(read)  # the pooled connection is open
            proxy.freeze()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.run(read)
            waited = time.monotonic() - started
            assert await store.ping(0.2) is Answer.SILENT
            return waited
        finally:
            proxy.thaw()
            await store.close()

    store = Store(via_proxy(postgres_db, proxy.port), statement_timeout=0.5, max_connections=1)
    store.on_connection_cut = lambda: cut.append(1)
    try:
        waited = asyncio.run(silent())
    finally:
        proxy.cut()
    assert 1.4 < waited < 3, waited  # 0.5 s and the 1 s grace
    assert cut == [1]


def test_housekeeping_blocked_on_a_lock_leaves_health_serving(
    postgres_db, tmp_path, clock, secrets_seen
):
    """Forgetting old request_ids waits here on rows another session holds: the
    pings run beside it, so health stays SERVING, as the store is fine."""
    first = start_server(postgres_db, tmp_path, clock, secrets_seen)
    try:
        first.api.register("hk-1", "13800138901", request_id="hk-register")
    finally:
        first.stop()
    clock.advance(timedelta(days=2))  # the request_id is past its 24 h
    holder = psycopg.connect(postgres_db)
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT 1 FROM idempotency_keys FOR UPDATE")
            assert cursor.fetchall() == [(1,)]
        # Pings every second, each given 2 s: a loaded machine cannot make one late.
        running = start_server(
            postgres_db, tmp_path, clock, secrets_seen, health_interval_seconds=1.0
        )
        try:
            # The prune starts at the first tick and waits on the lock (10 s).
            wait_until(
                lambda: (
                    rows(
                        postgres_db,
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND left(query, 6) = 'DELETE'",
                    )
                    == [(1,)]
                ),
                5,
                "the prune waiting on the lock",
            )
            seen = set()
            # Long enough for a ping queued behind the prune to miss its deadline.
            watched_until = time.monotonic() + 3.5
            while time.monotonic() < watched_until:
                seen.add(health(running.channel))
            assert seen == {"SERVING"}
            assert running.api.get_account("hk-1").phone_masked == "138****8901"
            holder.rollback()
            wait_until(
                lambda: rows(postgres_db, "SELECT count(*) FROM idempotency_keys") == [(0,)],
                10,
                "the prune to finish",
            )
        finally:
            running.stop()
    finally:
        holder.close()


# -- a worker killed with SIGKILL in the middle of load -------------------------------------


def test_worker_killed_mid_load_leaves_every_invariant(database_url, tmp_path, secrets_seen):
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{tmp_path}/shared.db"
    sms_file = str(tmp_path / "sms.jsonl")
    supervisor = Serve(
        database_url, tmp_path, sms_file, ("--workers", "2"), secrets=secrets_seen
    ).start()
    assert supervisor.process is not None
    load: Load | None = None
    try:
        port = supervisor.port
        first = wait_workers(supervisor.process.pid, port, set())
        load = Load([supervisor.address], Codes(sms_file), "kill", 1, threads=6).start()
        wait_until(lambda: load.completed_since(0) >= 10, 30, "flows completing")

        victim = first[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_workers(supervisor.process.pid, port, set(first))
        restarted_in = time.monotonic() - killed_at
        wait_until(lambda: load.completed_since(killed_at + restarted_in) >= 10, 30, "more flows")
        load.stop()
        quiet = time.monotonic()
        workers = worker_pids(supervisor.process.pid)
        assert supervisor.stop() == 0
        assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    finally:
        if load is not None:
            load.stopping.set()
        supervisor.kill()

    # Each worker's lines say which worker wrote them; the supervisor names the dead one.
    lines = [json.loads(line) for line in supervisor.log().splitlines() if line.startswith("{")]
    serving = {(e["worker"], e["pid"]) for e in lines if e["message"] == "phonebind serving"}
    assert {w for w, _ in serving} == {0, 1} and victim in {p for _, p in serving}
    (died,) = [e for e in lines if e["message"] == "worker died, restarting"]
    assert died["pid"] == victim and died["exitcode"] == -signal.SIGKILL
    assert (died["worker"], victim) in serving

    counts = assert_invariants(database_url, load.flows)
    assert load.outcomes().get("COMPLETED", 0) >= 20
    # Failures only around the kill: connection losses, and codes the dead worker had
    # claimed for delivery (they wait out their lease and arrive later).
    allowed = {"COMPLETED", "NO_CODE_OLD", "NO_CODE_NEW", "UNAVAILABLE"}
    assert set(load.outcomes()) <= allowed, load.outcomes()
    print(
        f"\n[{database_url.split(':')[0]} SIGKILL] a new worker listening {restarted_in:.2f} s"
        f" after the kill; flows: {load.outcomes()} ({load.calls.total} calls); failed"
        f" attempts before the kill:"
        f" {load.calls.since(0, killed_at)}, in the 5 s after: "
        f"{load.calls.since(killed_at, killed_at + 5)}, later: "
        f"{load.calls.since(killed_at + 5, quiet)}; database: {counts}"
    )


# -- two `serve` instances on one database ---------------------------------------------------


def test_two_instances_on_one_database_behave_as_one(database_url, tmp_path, secrets_seen):
    """Each flow's calls alternate between the two servers, and pairs of accounts race
    for the same new number: exactly one of each pair gets it."""
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{tmp_path}/shared.db"
    sms_file = str(tmp_path / "sms.jsonl")
    servers = [
        Serve(database_url, tmp_path, sms_file, secrets=secrets_seen).start() for _ in range(2)
    ]
    calls = Calls()
    codes = Codes(sms_file)
    flows = [
        Flow(f"two-{n}", f"1382{n:07d}", f"1392{n // 2:07d}")  # accounts 2k and 2k+1 race
        for n in range(40)
    ]

    def drive(flow: Flow) -> Flow:
        addresses = [s.address for s in servers]
        if int(flow.account_id.rsplit("-", 1)[1]) % 2:
            addresses.reverse()
        with clients(addresses, calls) as facades:
            return run_flow(facades, codes, flow)

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(drive, flows))
        took = time.monotonic() - started
        assert [s.stop() for s in servers] == [0, 0]
    finally:
        for s in servers:
            s.kill()
    counts = assert_invariants(database_url, flows)
    for pair in zip(flows[::2], flows[1::2], strict=True):
        assert sorted(f.outcome for f in pair) == ["COMPLETED", "PHONE_IN_USE"], pair
    assert counts["completed"] == 20
    print(
        f"\n[{database_url.split(':')[0]} two instances] {len(flows)} flows in {took:.2f} s:"
        f" {tally([f.outcome for f in flows])}; refusals: {calls.since(0)}; database: {counts}"
    )


# -- SIGTERM: NOT_SERVING, in-flight calls finish, new ones are refused ----------------------


def ready_for_old_code(pb: Api, account_id: str, old: str, new: str) -> tuple[str, str]:
    """A rebind waiting for its old-number code, and that code."""
    pb.register(account_id, old)
    rebind = pb.start(account_id, new)
    pb.identity(account_id, rebind.rebind_id)
    pb.send(account_id, rebind.rebind_id, OLD)
    return rebind.rebind_id, pb.inbox.next_code(e164(old))


def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(database_url, tmp_path, secrets_seen):
    sms_file = str(tmp_path / "sms.jsonl")
    server = Serve(
        database_url,
        tmp_path,
        sms_file,
        env={"PHONEBIND_GRACE_SECONDS": "30"},
        secrets=secrets_seen,
    )
    server.start()
    channel = grpc.insecure_channel(server.address)
    try:
        pb = Api(channel, Inbox(sms_file, secrets_seen), secrets_seen)
        rebind_id, code = ready_for_old_code(pb, "term-1", "13800138701", "13900139701")
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        with ThreadPoolExecutor(1) as pool, held_lock(database_url, rebind_id):
            in_flight = pool.submit(pb.verify, "term-1", rebind_id, OLD, code)
            wait_blocked(database_url)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            not_serving_in = time.monotonic() - signalled
            watch.cancel()
            # New calls are refused, on the open channel and on a new one.
            refused_in = wait_until(
                lambda: outcome_code(lambda: pb.get_account("term-1")) == "UNAVAILABLE",
                5,
                "new calls refused",
            )
            with grpc.insecure_channel(server.address) as fresh:
                assert health(fresh) in ("UNAVAILABLE", "NOT_SERVING")
            assert not in_flight.done() and server.alive()
            # The in-flight call stays blocked, and the server waits for it.
            with pytest.raises(subprocess.TimeoutExpired):
                server.process.wait(timeout=1)
            assert not in_flight.done()
        released = time.monotonic()
        rebind = in_flight.result(timeout=30)
        assert res.REBIND_STEP_OLD_PHONE_CODE in rebind.completed_steps
        assert server.process.wait(timeout=30) == 0
        exited_in = time.monotonic() - released
    finally:
        channel.close()
        server.kill()
    assert rows(database_url, "SELECT state FROM challenges WHERE rebind_id = ?", rebind_id) == [
        ("USED",)
    ]
    print(
        f"\n[{database_url.split(':')[0]} SIGTERM] NOT_SERVING {not_serving_in * 1000:.0f} ms"
        f" after the signal, new calls refused {refused_in * 1000:.0f} ms later; the held call"
        f" finished and the process exited 0"
        f" {exited_in:.2f} s after the lock was released"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_grace_seconds_bounds_a_stuck_call(postgres_db, tmp_path, secrets_seen, workers):
    """A call still stuck when grace_seconds run out is cut (the client is told
    UNAVAILABLE, nothing of it is applied), and the process exits anyway, and
    not with 0: with workers, the supervisor passes the failed drain on.

    PostgreSQL only: on SQLite a blocked write gives up by itself at busy_timeout.
    """
    sms_file = str(tmp_path / "sms.jsonl")
    server = Serve(
        postgres_db,
        tmp_path,
        sms_file,
        ("--workers", "2") if workers == 2 else (),
        env={"PHONEBIND_GRACE_SECONDS": "0.5"},
        secrets=secrets_seen,
    )
    server.start()
    channel = grpc.insecure_channel(server.address)
    try:
        pb = Api(channel, Inbox(sms_file, secrets_seen), secrets_seen)
        rebind_id, code = ready_for_old_code(pb, "term-2", "13800138702", "13900139702")
        with ThreadPoolExecutor(1) as pool, held_lock(postgres_db, rebind_id):
            in_flight = pool.submit(pb.verify, "term-2", rebind_id, OLD, code)
            wait_blocked(postgres_db)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as cut:
                in_flight.result(timeout=30)
            cut_in = time.monotonic() - signalled
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            # The lock is still held: the process must not wait for the stuck call.
            exit_code = server.process.wait(timeout=30)
            exited_in = time.monotonic() - signalled
        assert exit_code != 0  # a call did not drain
        assert "calls still running" in server.log()
    finally:
        channel.close()
        server.kill()
    assert cut_in < 0.5 + 2
    assert exited_in < 0.5 + 10
    # The cut call's transaction was rolled back with the process.
    assert rows(
        postgres_db, "SELECT state, attempts FROM challenges WHERE rebind_id = ?", rebind_id
    ) == [("LIVE", 0)]
    print(
        f"\n[postgresql SIGTERM, grace 0.5 s, {workers} worker(s)] the stuck call was cut"
        f" after {cut_in:.2f} s,"
        f" the process exited ({exit_code}) after {exited_in:.2f} s with the lock still held"
    )


# -- the supervisor of several workers -------------------------------------------------------


def serve_command(database_url: str, tmp_path, port: int, *extra: str) -> list[str]:
    return [
        str(BIN / "phonebind-server"),
        "serve",
        "--dev",
        "--listen",
        f"127.0.0.1:{port}",
        "--database-url",
        database_url,
        "--sms-gateway",
        f"file:{tmp_path}/sms.jsonl",
        *extra,
    ]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}


def two_workers(tmp_path, secrets_seen, port: int = 0) -> tuple[Serve, list[int]]:
    """`serve --workers 2` on a SQLite file (on `port`, or a free one); the
    supervisor and its two listening workers."""
    supervisor = Serve(
        f"sqlite:///{tmp_path}/first.db",
        tmp_path,
        str(tmp_path / "sms.jsonl"),
        ("--workers", "2"),
        secrets=secrets_seen,
        port=port or free_port(),
    ).start()
    assert supervisor.process is not None
    return supervisor, wait_workers(supervisor.process.pid, supervisor.port, set())


def test_workers_refuse_a_port_that_others_already_serve(tmp_path, secrets_seen):
    """SO_REUSEPORT would let a second deployment join the first one's port and
    take half its calls, perhaps onto another database."""
    first, _ = two_workers(tmp_path, secrets_seen)
    try:
        second = subprocess.run(
            serve_command(
                f"sqlite:///{tmp_path}/second.db", tmp_path, first.port, "--workers", "2"
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )
        assert second.returncode == 2
        assert f"cannot listen on 127.0.0.1:{first.port}" in second.stderr
        assert health(grpc.insecure_channel(first.address)) == "SERVING"
    finally:
        first.kill()


def test_workers_start_again_on_the_port_they_just_left(tmp_path, secrets_seen):
    """The connections of a stopped server linger in TIME_WAIT on its port; they
    must not make the port look taken, or a restart fails for a minute."""
    first, _ = two_workers(tmp_path, secrets_seen)
    channel = grpc.insecure_channel(first.address)
    try:
        assert health(channel) == "SERVING"  # a connection the server will close first
        assert first.stop() == 0
    finally:
        channel.close()
        first.kill()
    again, _ = two_workers(tmp_path, secrets_seen, first.port)
    try:
        assert health(grpc.insecure_channel(again.address)) == "SERVING"
    finally:
        again.kill()


def test_a_worker_failing_at_start_is_restarted_ever_slower_and_the_other_serves_on(
    tmp_path, secrets_seen
):
    """A worker that keeps dying soon after its start (here: killed each time)
    is restarted after 0.5, 1, 2 s...; the healthy worker is never touched."""
    supervisor, workers = two_workers(tmp_path, secrets_seen)
    try:
        assert supervisor.process is not None
        healthy, failing = workers
        took = []
        for _ in range(3):
            os.kill(failing, signal.SIGKILL)
            killed = time.monotonic()
            workers = wait_workers(supervisor.process.pid, supervisor.port, {healthy, failing})
            took.append(time.monotonic() - killed)
            assert healthy in workers
            failing = next(pid for pid in workers if pid != healthy)
        assert supervisor.alive()
        assert health(grpc.insecure_channel(supervisor.address)) == "SERVING"
    finally:
        supervisor.kill()
    assert took[2] > took[0] + 0.8, took  # 2 s of delay before the third, 0.5 s before the first
    print(f"\n[supervisor] a worker failing at start came back after {took}")


def test_workers_exit_when_their_supervisor_is_killed(tmp_path, secrets_seen):
    supervisor, workers = two_workers(tmp_path, secrets_seen)
    try:
        assert supervisor.process is not None
        supervisor.process.kill()
        supervisor.process.wait(timeout=10)
        gone_in = wait_until(
            lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers),
            30,
            "orphaned workers to exit",
        )
    finally:
        supervisor.kill()
    assert not serving(supervisor.address)
    print(f"\n[supervisor SIGKILL] both workers drained and exited {gone_in:.2f} s later")


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path):
    """Restarting it forever would hide the failure from systemd or Kubernetes."""
    port = free_port()
    with socket.socket() as taken:  # the first worker's metrics port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        started = time.monotonic()
        run = subprocess.run(
            serve_command(
                f"sqlite:///{tmp_path}/shared.db",
                tmp_path,
                port,
                "--workers",
                "2",
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
            ),
            capture_output=True,
            text=True,
            timeout=120,
            env=clean_env(),
        )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "worker cannot start" in run.stderr
    assert time.monotonic() - started < 60
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_an_unreachable_database_at_start_is_one_clear_line(tmp_path, command):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"  # nothing listens
    argv = (
        serve_command(url, tmp_path, free_port())
        if command == "serve"
        else [str(BIN / "phonebind-server"), "migrate", "--database-url", url]
    )
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=clean_env())
    assert run.returncode == 1
    assert "phonebind-server: the database is unreachable" in run.stderr
    assert "Traceback" not in run.stderr


# -- a lock held elsewhere for too long ----------------------------------------------------


def test_a_lock_held_past_the_lock_timeout_answers_store_unavailable_and_frees_the_thread(
    database_url, tmp_path, clock, secrets_seen
):
    """Another session holds the lock the call needs: after store_lock_timeout_seconds
    the call answers STORE_UNAVAILABLE (retryable) instead of holding its RPC thread,
    health stays SERVING (the database is up), and the retry succeeds."""
    running = start_server(
        database_url, tmp_path, clock, secrets_seen, store_lock_timeout_seconds=0.5
    )
    try:
        pb = running.api
        pb.register("lk-1", "13800138811")
        rebind_id = pb.start("lk-1", "13900139811").rebind_id
        with held_lock(database_url, rebind_id):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                pb.send("lk-1", rebind_id, NEW, request_id="lk-send")
            waited = time.monotonic() - started
            code, reason, details = error_details(refused.value)
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
            assert "RetryInfo" in details
            assert health(running.channel) == "SERVING"
        assert 0.4 < waited < 5, waited
        sent = pb.send("lk-1", rebind_id, NEW, request_id="lk-send")
        assert sent.attempts_left == 5
        assert len(pb.inbox.wait_for(e164("13900139811"), 1, "REBIND_CODE")) == 1
    finally:
        running.stop()
    print(f"\n[{database_url.split(':')[0]} lock timeout 0.5 s] refused after {waited:.2f} s")


# -- a client deadline that expires mid-call, retried with the same request_id ---------------


# A call behind a held lock ends at its deadline: the client's DEADLINE_EXCEEDED,
# or, on PostgreSQL whose lock wait is cut at the caller's deadline, the server's
# STORE_UNAVAILABLE, whichever comes first.
GAVE_UP = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_refusal_is_audited_even_after_its_caller_stopped_waiting(server):
    """The refusal's answer goes out at once; its audit event, written after, waits
    for the write lock. That record must stay, deadline or not."""
    pb = server.api
    pb.register("dl-4", "13800138804")
    events = "SELECT count(*) FROM audit_events WHERE outcome = 'REBIND_NOT_FOUND'"
    with held_lock(server.database_url, ""), pytest.raises(grpc.RpcError) as refused:
        pb.stub.GetRebind(
            api.GetRebindRequest(account_id="dl-4", rebind_id="rb_nosuchrebind"), timeout=0.3
        )
    assert refused.value.code() in (*GAVE_UP, grpc.StatusCode.NOT_FOUND)
    wait_until(lambda: rows(server.database_url, events) == [(1,)], 15, "the refusal's event")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_call_cancelled_while_it_waits_for_the_write_lock_is_counted_as_cancelled(server):
    """gRPC cancels a call whose caller went away; on SQLite that interrupts its wait
    for another process's write lock. The call did nothing, and its log line and
    metrics say CANCELLED (DEADLINE_EXCEEDED once its deadline passed), never OK."""
    pb = server.api
    pb.register("dl-7", "13800138807")
    rebind_id = pb.start("dl-7", "13900139807").rebind_id
    request = api.SendCodeRequest(account_id="dl-7", rebind_id=rebind_id, target=NEW)
    engine = server.app.store.engine

    def outcomes() -> dict[str, float]:
        return {
            sample.labels["outcome"]: sample.value
            for family in server.app.metrics.registry.collect()
            if family.name == "phonebind_rpcs"
            for sample in family.samples
            if sample.name == "phonebind_rpcs_total"
            and sample.labels["method"].endswith("/SendCode")
        }

    with held_lock(server.database_url, rebind_id):
        waiting = pb.stub.SendCode.future(request, timeout=30)
        wait_until(lambda: engine.busy_since is not None, 10, "the call waiting for the lock")
        waiting.cancel()
        wait_until(lambda: outcomes() != {}, 10, "the cancelled call to end")
    assert outcomes() == {"CANCELLED": 1.0}
    challenges = "SELECT count(*) FROM challenges WHERE rebind_id = ?"
    assert rows(server.database_url, challenges, rebind_id) == [(0,)]


def test_options_in_the_database_url_still_reach_postgresql(postgres_db):
    """The store's timeouts are startup options added to the URL's own libpq
    options (a search_path, an application_name), which are kept."""
    joiner = "&" if "?" in postgres_db else "?"
    store = Store(
        f"{postgres_db}{joiner}options=-c%20application_name%3Dpb-url-options",
        lock_timeout=2.5,
        statement_timeout=30,
    )
    settings = Query(
        "test.settings",
        lambda t: peewee.Select(
            columns=[
                peewee.fn.concat_ws(
                    " ",
                    peewee.fn.current_setting("application_name"),
                    peewee.fn.current_setting("lock_timeout"),
                    peewee.fn.current_setting("statement_timeout"),
                )
            ]
        ).bind(t.database),
    )

    def read() -> str:
        with store.transaction() as tx:
            return tx.one(tx_read(settings, {}, value))

    async def run() -> str:
        await store.open()
        try:
            return await store.run(read)
        finally:
            await store.close()

    assert asyncio.run(run()) == "pb-url-options 2500ms 30s"


def test_a_lock_wait_ends_at_the_callers_deadline(postgres_db, tmp_path, clock, secrets_seen):
    """PostgreSQL: the wait on a row lock ends at the caller's deadline, so a
    call its client gave up on does not hold its connection for the lock timeout.
    (SQLite's wait for the write lock ends there too.)"""
    running = start_server(postgres_db, tmp_path, clock, secrets_seen, store_connections=2)
    try:
        pb = running.api
        pb.register("dl-3", "13800138803")
        rebind_id = pb.start("dl-3", "13900139803").rebind_id
        with held_lock(postgres_db, rebind_id):
            started = time.monotonic()
            for _ in range(2):  # as many calls as the server has connections
                with pytest.raises(grpc.RpcError) as expired:
                    pb.stub.SendCode(
                        api.SendCodeRequest(account_id="dl-3", rebind_id=rebind_id, target=NEW),
                        timeout=0.5,
                    )
                assert expired.value.code() in GAVE_UP
            # Both connections are free again while the lock is still held.
            assert pb.get_account("dl-3").phone_masked == "138****8803"
            freed_in = time.monotonic() - started
        assert freed_in < 3, freed_in  # the lock timeout is 10 s
    finally:
        running.stop()
    print(f"\n[postgresql] two calls behind a held lock, both ended after {freed_in:.2f} s")


def test_a_code_checked_after_its_caller_gave_up_counts_for_nothing(server):
    """VerifyCode has no request_id: had the abandoned check been kept, the step
    would be done (or an attempt spent) without the user ever seeing the answer."""
    pb = server.api
    rebind_id, code = ready_for_old_code(pb, "dl-2", "13800138802", "13900139802")
    with held_lock(server.database_url, rebind_id), pytest.raises(grpc.RpcError) as expired:
        pb.stub.VerifyCode(
            api.VerifyCodeRequest(account_id="dl-2", rebind_id=rebind_id, target=OLD, code=code),
            timeout=0.5,
        )
    assert expired.value.code() in GAVE_UP, expired.value
    wait_until(
        lambda: (
            server.app.metrics.registry.get_sample_value(
                "phonebind_rpcs_total",
                {
                    "method": "/phonebind.v1.BindingService/VerifyCode",
                    "outcome": "DEADLINE_EXCEEDED",
                },
            )
            == 1
        ),
        15,
        "the abandoned check to end",
    )
    assert rows(
        server.database_url,
        "SELECT state, attempts FROM challenges WHERE rebind_id = ? AND target = 'OLD_PHONE'",
        rebind_id,
    ) == [("LIVE", 0)]
    checked = pb.verify("dl-2", rebind_id, OLD, code)
    assert res.REBIND_STEP_OLD_PHONE_CODE in checked.completed_steps


def test_wrong_answers_commit_past_the_deadline_and_right_ones_do_not(server):
    """The unit of work's rule, on both backends: with the caller's deadline already
    passed when it ends, a counted wrong code or identity answer is kept, and a
    right code is rolled back (its caller could not learn that it was used)."""
    pb, service = server.api, server.app.service
    rebind_id, code = ready_for_old_code(pb, "dl-6", "13800138806", "13900139806")
    pb.register("dl-6b", "13800138816")
    other = pb.start("dl-6b", "13900139816").rebind_id
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    gone = CallContext(caller="test", deadline=time.monotonic() - 1)
    with pytest.raises(DomainError) as mismatch:
        server.in_store(service.verify_code, gone, "dl-6", rebind_id, CodeTarget.OLD_PHONE, wrong)
    with pytest.raises(DomainError) as no_match:
        # Not dl-6b's ID number.
        server.in_store(service.verify_identity, gone, "dl-6b", other, HOLDER, make_id_number())
    with pytest.raises(DeadlinePassed):
        server.in_store(service.verify_code, gone, "dl-6", rebind_id, CodeTarget.OLD_PHONE, code)
    assert (mismatch.value.reason, no_match.value.reason) == (
        Reason.CODE_MISMATCH,
        Reason.IDENTITY_MISMATCH,
    )
    failures = "SELECT failures FROM rebinds WHERE rebind_id = ?"
    assert rows(server.database_url, failures, rebind_id) == [(1,)]
    assert rows(server.database_url, failures, other) == [(1,)]
    checked = pb.verify("dl-6", rebind_id, OLD, code)
    assert res.REBIND_STEP_OLD_PHONE_CODE in checked.completed_steps


@pytest.mark.parametrize("rpc", ["CompleteRebind", "SendCode"])
def test_deadline_expired_mid_call_then_retry_has_one_effect(server, rpc):
    pb = server.api
    url = server.database_url
    pb.register("dl-1", "13800138801")
    if rpc == "CompleteRebind":
        rebind_id = pb.ready_rebind("dl-1", "13800138801", "13900139801").rebind_id
        request = api.CompleteRebindRequest(
            account_id="dl-1", rebind_id=rebind_id, request_id="retry-1"
        )
        call = pb.stub.CompleteRebind
        effects = (
            "SELECT count(*) FROM binding_changes WHERE rebind_id = ?"
            " UNION ALL SELECT count(*) FROM sms_outbox"
            " WHERE rebind_id = ? AND purpose = 'CHANGE_NOTICE'"
        )
    else:
        rebind_id = pb.start("dl-1", "13900139801").rebind_id
        request = api.SendCodeRequest(
            account_id="dl-1", rebind_id=rebind_id, target=NEW, request_id="retry-1"
        )
        call = pb.stub.SendCode
        effects = (
            "SELECT count(*) FROM challenges WHERE rebind_id = ?"
            " UNION ALL SELECT count(*) FROM sms_outbox"
            " WHERE rebind_id = ? AND purpose = 'REBIND_CODE'"
        )

    def count() -> list[int]:
        return [n for (n,) in rows(url, effects, rebind_id, rebind_id)]

    def abandoned() -> float:
        value = server.app.metrics.registry.get_sample_value(
            "phonebind_rpcs_total",
            {"method": f"/phonebind.v1.BindingService/{rpc}", "outcome": "DEADLINE_EXCEEDED"},
        )
        return value or 0.0

    with held_lock(url, rebind_id):
        with pytest.raises(grpc.RpcError) as expired:
            call(request, timeout=0.5)
        assert expired.value.code() in GAVE_UP, expired.value
        assert count() == [0, 0]  # the server is still waiting for the lock
    # Once the lock is free the abandoned call runs on, finds its caller gone before
    # it commits, and rolls back: no one could learn its outcome, so it has none.
    ended_in = wait_until(lambda: abandoned() == 1, 15, "the abandoned call to end")
    assert count() == [0, 0]
    # The retry, later, makes the change once; another retry answers that change.
    server.clock.advance(timedelta(seconds=30))
    applied_at = server.clock.now()
    retry = call(request, timeout=10)
    again = call(request, timeout=10)
    assert retry == again
    assert count() == [1, 1]
    if rpc == "CompleteRebind":
        assert retry.rebind.state == res.REBIND_STATE_COMPLETED
        assert retry.account.phone_masked == "139****9801"
        assert retry.rebind.complete_time.ToDatetime(tzinfo=UTC) == applied_at
    else:
        assert retry.expire_time.ToDatetime(tzinfo=UTC) == (
            applied_at + server.app.settings.policy.code_ttl
        )
        assert len(server.inbox.wait_for(e164("13900139801"), 1, "REBIND_CODE")) == 1
    print(
        f"\n[{url.split(':')[0]} deadline {rpc}] the abandoned call ended, rolled back,"
        f" {ended_in:.2f} s after the lock was freed (0: while it was held); the retry"
        " applied it once"
    )
