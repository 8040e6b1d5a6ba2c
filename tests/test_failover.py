"""Surviving a PostgreSQL failover.

The test builds what a highly available PostgreSQL is made of, on loopback: a
primary made by `initdb` and a streaming hot standby made from it by
`pg_basebackup`, each on a port of its own, with synchronous replication on
(`synchronous_standby_names`, `synchronous_commit = on`): a commit is answered
only once the standby has it on disk. A phonebind server (in this process, on
port 0) is given a URL naming both hosts with `target_session_attrs=read-write`,
so it connects to whichever of them accepts writes.

Client threads run complete rebind flows while the test SIGKILLs the primary
(its postmaster and every backend, as when its host dies), waits a moment, as
a failover manager would before deciding, and promotes the standby. The test
records every keyed request and every CompleteRebind that was acknowledged,
and asks:

- did calls during the switch answer UNAVAILABLE with STORE_UNAVAILABLE (never
  INTERNAL, never hanging until the client gave up), with health NOT_SERVING,
  and did the same server process serve again by itself once the standby was
  promoted?
- is every acknowledged completion on the new primary, nothing half-done there
  (`assert_invariants`: each completed rebind has its history row, notice and
  audit event; each account its number; the audit chains verify), and does a
  replay of each acknowledged request_id answer as the first time?

The PostgreSQL server binaries come from /usr/lib/postgresql/<version>/bin (or
PATH). Without them the test is skipped and says why, unless
PHONEBIND_REQUIRE_POSTGRES=1, when it fails. Run as root, the clusters run as
the `postgres` OS user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest
from conftest import start_server
from support import OLD, e164, error_details, free_port, rows, wait_until
from test_faults import Calls, Codes, Load, assert_invariants, health, tally

from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import binding_service_pb2_grpc as api_grpc
from phonebind.v1 import resources_pb2 as res
from phonebind_server.domain.ports import StoreUnavailable
from phonebind_server.store.engine import PostgresSession, SqliteSession

SERVER_TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
STANDBY_NAME = "phonebind_standby"
# How long the primary stays dead before the standby is promoted: the time a
# failover manager takes to decide (Patroni's ttl, a managed service's checks).
DECISION_SECONDS = 5.0
# A call refused during the switch must be answered within this, not hang.
REFUSAL_BOUND_SECONDS = 3.0
# The calls whose replay with the same request_id must answer as the first time.
KEYED = {"RegisterAccount", "StartRebind", "SendCode", "CompleteRebind"}


# -- the PostgreSQL server binaries ------------------------------------------------------


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding every server tool, or
    the directory on PATH that does."""

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for directory in candidates:
        if all(os.access(Path(directory) / tool, os.X_OK) for tool in SERVER_TOOLS):
            return Path(directory)
    return None


@pytest.fixture(scope="module")
def pg_bin() -> Path:
    found = postgres_bin()
    if found is None:
        reason = (
            "PostgreSQL failover test skipped: no directory with the server binaries"
            f" {', '.join(SERVER_TOOLS)} in /usr/lib/postgresql/*/bin or on PATH"
        )
        if os.environ.get("PHONEBIND_REQUIRE_POSTGRES"):
            pytest.fail(reason.replace("skipped", "cannot run") + " (PHONEBIND_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)
    return found


# -- a primary and its hot standby on loopback -------------------------------------------


def as_owner() -> list[str]:
    """The command prefix that runs PostgreSQL's tools as a user it accepts."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


@dataclass
class Node:
    """One PostgreSQL server: its data directory, port and log."""

    bin: Path
    root: Path
    name: str
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.root / self.name

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def tool(self, name: str, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [*as_owner(), str(self.bin / name), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )
        assert done.returncode == 0, f"{name} failed: {done.stdout}\n{done.stderr}\n{self.tail()}"
        return done.stdout

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def configure(self, **settings: object) -> None:
        """Appends to postgresql.auto.conf, which wins over postgresql.conf."""
        lines = "".join(f"{name} = '{value}'\n" for name, value in settings.items())
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            conf.write(lines)

    def start(self) -> None:
        self.tool("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def kill(self) -> None:
        """SIGKILL to the postmaster and all its backends at once, as when the host dies:
        no shutdown checkpoint, no goodbye to clients or to the standby."""
        postmaster = self.postmaster()
        # Stopped first, it forks no backend that the list below would miss.
        os.kill(postmaster, signal.SIGSTOP)
        doomed = (*processes_under(postmaster), postmaster)
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # SIGKILL is delivered asynchronously: the primary counts as dead once none of
        # its processes is left to answer a query.
        wait_until(
            lambda: not any(alive(pid) for pid in doomed), 10, "the primary's processes gone"
        )

    def promote(self) -> None:
        self.tool("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")

    def stop(self) -> None:
        subprocess.run(
            [
                *as_owner(),
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            timeout=60,
            cwd=self.root,
        )


def processes_under(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """True while the process can still run: it exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Cluster:
    primary: Node
    standby: Node
    database: str = "phonebind"

    @property
    def url(self) -> str:
        """What the server is given: both hosts, the one taking writes wins."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/{self.database}?target_session_attrs=read-write"


@pytest.fixture
def cluster(pg_bin: Path) -> Iterator[Cluster]:
    # Not under pytest's tmp_path: that is private to root, and the clusters run
    # as postgres.
    root = Path(tempfile.mkdtemp(prefix="phonebind-failover-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    primary = Node(pg_bin, root, "primary")
    standby = Node(pg_bin, root, "standby")
    try:
        primary.tool(
            "initdb", "-D", str(primary.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        primary.configure(
            port=primary.port,
            listen_addresses="127.0.0.1",
            unix_socket_directories=str(root),
            wal_level="replica",
            max_wal_senders=4,
            hot_standby="on",
            synchronous_commit="on",
            synchronous_standby_names=STANDBY_NAME,
            max_connections=60,
            shared_buffers="32MB",
        )
        primary.start()
        standby.tool(
            "pg_basebackup", "-D", str(standby.data), "-h", "127.0.0.1",
            "-p", str(primary.port), "-U", "postgres", "-X", "stream", "-R", "--no-sync",
        )  # fmt: skip
        standby.configure(
            port=standby.port,
            primary_conninfo=(
                f"host=127.0.0.1 port={primary.port} user=postgres application_name={STANDBY_NAME}"
            ),
            # Once promoted it has no standby of its own: waiting for one would
            # stop every commit (Patroni's synchronous_mode clears it likewise).
            synchronous_standby_names="",
        )
        standby.start()
        wait_until(
            lambda: (
                rows(
                    primary.url(),
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = ?",
                    STANDBY_NAME,
                )
                == [("sync",)]
            ),
            30,
            "the standby streaming as the synchronous standby",
        )
        with psycopg.connect(primary.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {Cluster.database}")
        yield Cluster(primary, standby)
    finally:
        for node in (primary, standby):
            if (node.data / "postmaster.pid").exists():
                node.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- what the clients were told ----------------------------------------------------------


class Recorder(Calls):
    """Calls, plus every keyed request that was answered OK and its answer."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: list[tuple[str, object, object]] = []
        # Steps a retry found done: their first attempt committed, its answer lost.
        self.already_done: list[tuple[str, object]] = []

    def intercept_unary_unary(self, continuation, client_call_details, request):
        call = super().intercept_unary_unary(continuation, client_call_details, request)
        method = client_call_details.method.rsplit("/", 1)[-1]
        code = call.code()
        if method in KEYED and code is grpc.StatusCode.OK:
            with self._lock:
                self.answered.append((method, request, call.result()))
        elif code is grpc.StatusCode.FAILED_PRECONDITION:
            if error_details(call)[1] == "STEP_ALREADY_DONE":
                with self._lock:
                    self.already_done.append((method, request))
        return call


@dataclass
class Probe:
    """GetAccount every 0.1 s without retries, as a monitor would: each call's
    start, how long it took and how it ended."""

    stub: api_grpc.BindingServiceStub
    account_id: str
    seen: list[tuple[float, float, str]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self.stub.GetAccount(api.GetAccountRequest(account_id=self.account_id), timeout=10)
                what = "OK"
            except grpc.RpcError as error:
                code, reason, details = error_details(error)
                what = f"{code.name}/{reason or '-'}"
                if reason == "STORE_UNAVAILABLE":
                    assert details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0
            self.seen.append((started, time.monotonic() - started, what))
            self.stopping.wait(0.1)

    def since(self, start: float) -> list[tuple[float, float, str]]:
        return [seen for seen in self.seen if seen[0] >= start]


def replay(stub: api_grpc.BindingServiceStub, method: str, request: object) -> object:
    return getattr(stub, method)(request, timeout=10)


def same_answer(method: str, first, again) -> bool:
    """A replay's answer matches the first: all of it for a completion or a sent
    code; the same account or rebind for the others, whose state has moved on."""
    if method in ("CompleteRebind", "SendCode"):
        return again == first
    if method == "RegisterAccount":
        return again.account.account_id == first.account.account_id
    return again.rebind.rebind_id == first.rebind.rebind_id


# -- the test ------------------------------------------------------------------------------


def test_a_failover_to_the_synchronous_standby_loses_no_acknowledged_change(
    cluster: Cluster, tmp_path, clock, secrets_seen
):
    running = start_server(cluster.url, tmp_path, clock, secrets_seen, health_interval_seconds=0.2)
    load = Load([running.target], Codes(str(tmp_path / "sms.jsonl")), "fo", 7, threads=4)
    load.calls = recorder = Recorder()
    probe_channel = grpc.insecure_channel(running.target)
    stub = api_grpc.BindingServiceStub(probe_channel)
    probe: Probe | None = None
    try:
        running.api.register("fo-probe", "13700137000")
        load.start()
        wait_until(lambda: load.completed_since(0) >= 8, 120, "8 flows completed before the kill")
        probe = Probe(stub, "fo-probe")
        threading.Thread(target=probe.run, name="probe", daemon=True).start()

        acknowledged_before = load.completed_since(0)
        cluster.primary.kill()
        # From here on no call can reach the old primary; one that started earlier
        # may still have been served by it.
        killed = time.monotonic()
        not_serving_in = wait_until(
            lambda: health(running.channel) == "NOT_SERVING", 15, "health NOT_SERVING"
        )
        time.sleep(max(0.0, killed + DECISION_SECONDS - time.monotonic()))
        promoted_at = time.monotonic()
        cluster.standby.promote()
        promoted_in = time.monotonic() - promoted_at

        # The same server process serves again by itself.
        recovered_in = wait_until(
            lambda: bool(probe.since(promoted_at)) and probe.seen[-1][2] == "OK",
            30,
            "the probe answered OK after the promotion",
        )
        recovered = time.monotonic()
        serving_in = wait_until(
            lambda: health(running.channel) == "SERVING", 5, "health SERVING again"
        )
        wait_until(
            lambda: load.completed_since(recovered) >= 4, 120, "flows completed after recovery"
        )
        probe.stopping.set()
        load.stop()
        # A replay of every acknowledged request_id answers as the first time.
        mismatched = [
            (method, request.request_id)
            for method, request, first in recorder.answered
            if not same_answer(method, first, replay(stub, method, request))
        ]
    finally:
        if probe is not None:
            probe.stopping.set()
        load.stopping.set()
        running.stop()
        probe_channel.close()

    # While the primary is dead and the standby not yet promoted, every call is
    # refused with STORE_UNAVAILABLE; until the probe sees OK again, every call
    # is answered (refused or served) soon, none held until the store is back.
    switch = [seen for seen in probe.seen if killed <= seen[0] < recovered]
    down = [seen for seen in switch if seen[0] + seen[1] < promoted_at]
    timeline = "; ".join(
        f"{at - killed:+.2f}s took {took:.2f}s {what}" for at, took, what in probe.seen
    )
    assert len(down) >= 3, f"too few calls while the store was down: {timeline}"
    assert {what for _, _, what in down} == {"UNAVAILABLE/STORE_UNAVAILABLE"}, tally(
        [what for _, _, what in down]
    )
    refusals = [seen for seen in switch if seen[2] != "OK"]
    slowest = max(took for _, took, _ in switch)
    assert slowest < REFUSAL_BOUND_SECONDS, f"a call in the switch took {slowest:.2f} s: {timeline}"
    failures = recorder.since(killed)
    odd = {
        what: n
        for what, n in failures.items()
        if "STORE_UNAVAILABLE" not in what and what not in STEP_DONE_BY_A_LOST_ANSWER
    }
    assert not odd, f"calls during the switch failed otherwise: {odd}"
    outcomes = load.outcomes()
    assert set(outcomes) <= {"COMPLETED", "STORE_UNAVAILABLE"} | AMBIGUOUS, outcomes

    # On the new primary: every acknowledged completion, nothing half-done.
    new_primary = cluster.standby.url(Cluster.database)
    assert rows(new_primary, "SELECT pg_is_in_recovery()") == [(False,)]
    completions = [
        (request, answer) for m, request, answer in recorder.answered if m == "CompleteRebind"
    ]
    assert len(completions) == sum(1 for f in load.flows if f.completed)
    completed_there = dict(rows(new_primary, "SELECT rebind_id, state FROM rebinds"))
    for request, answer in completions:
        assert answer.rebind.state == res.REBIND_STATE_COMPLETED
        assert completed_there.get(request.rebind_id) == "COMPLETED", request.rebind_id
    counts = assert_invariants(new_primary, load.flows)
    # A step a retry found done is done there: its first attempt did commit.
    steps = dict(rows(new_primary, "SELECT rebind_id, completed_steps FROM rebinds"))
    for method, request in recorder.already_done:
        step = "IDENTITY" if method == "VerifyIdentity" else f"{STEP_OF[request.target]}"
        assert step in steps[request.rebind_id].split(","), (method, request.rebind_id)
    assert not mismatched, mismatched

    print(
        f"\n[failover] acknowledged completions: {len(completions)}"
        f" ({acknowledged_before} before the kill); flows: {outcomes};"
        f" health NOT_SERVING {not_serving_in:.2f} s after the kill;"
        f" promotion took {promoted_in:.2f} s; probe OK {recovered_in:.2f} s after it"
        f" ({recovered - killed:.2f} s after the kill), health SERVING {serving_in:.2f} s later;"
        f" probe calls during the switch: {len(switch)}, refused {len(refusals)},"
        f" slowest {slowest:.3f} s;"
        f" load calls {failures}; keyed answers replayed: {len(recorder.answered)};"
        f" steps a retry found done: {len(recorder.already_done)};"
        f" database: {counts}"
    )


# A non-keyed call (VerifyIdentity, VerifyCode) whose commit reached the standby
# while its answer was lost with the primary: the client's retry finds the step
# done. The flow ends there (the test's clients do not read the rebind to settle
# it); the database stays whole.
AMBIGUOUS = {"STEP_ALREADY_DONE"}
STEP_DONE_BY_A_LOST_ANSWER = {
    "VerifyIdentity FAILED_PRECONDITION/STEP_ALREADY_DONE",
    "VerifyCode FAILED_PRECONDITION/STEP_ALREADY_DONE",
}
STEP_OF = {res.CODE_TARGET_OLD_PHONE: "OLD_PHONE_CODE", res.CODE_TARGET_NEW_PHONE: "NEW_PHONE_CODE"}


# -- a COMMIT whose answer is lost ----------------------------------------------------------


def test_a_code_whose_commit_went_unanswered_is_sent_once_the_store_answers(server, monkeypatch):
    """The database commits a SendCode but its answer is lost (the primary dies
    between its standby's acknowledgement and its reply): the call answers
    STORE_UNAVAILABLE, the client's retry finds its request_id done, and the
    code, leased to this process, is sent on the dispatcher's next pass rather
    than when the lease runs out (the clock does not move here)."""
    pb = server.api
    pb.register("lost-1", "13800138601")
    rebind = pb.start("lost-1", "13900139601")
    lost: list[str] = []
    queuing: set[int] = set()  # sessions that queued a message

    def noting_queued(run):
        def run_noting(session, statements, want):
            if any("INSERT INTO" in sql and "sms_outbox" in sql for sql, _ in statements):
                queuing.add(id(session))
            return run(session, statements, want)

        return run_noting

    def answer_lost(finish):
        def finish_then_fail(session, statements, commit):
            queued = any("INSERT INTO" in sql and "sms_outbox" in sql for sql, _ in statements)
            queued = queued or id(session) in queuing
            queuing.discard(id(session))
            finish(session, statements, commit)
            if commit and queued and not lost:
                lost.append("commit")
                raise StoreUnavailable("the connection was lost awaiting COMMIT's answer")

        return finish_then_fail

    for kind in (SqliteSession, PostgresSession):
        monkeypatch.setattr(kind, "run", noting_queued(kind.run))
        monkeypatch.setattr(kind, "finish", answer_lost(kind.finish))

    with pytest.raises(grpc.RpcError) as caught:
        pb.send("lost-1", rebind.rebind_id, OLD, request_id="send-lost")
    assert error_details(caught.value)[:2] == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    assert lost == ["commit"]
    again = pb.send("lost-1", rebind.rebind_id, OLD, request_id="send-lost")
    assert again.attempts_left > 0
    server.wake_outbox()
    [sent] = pb.inbox.wait_for(e164("13800138601"), 1, "REBIND_CODE", timeout=5)
    # Claimed by its id, the message keeps its template and parameters.
    assert sent["template"] == "phonebind.rebind_code.v1" and sent["language"] == "zh-CN"
    assert sent["params"]["code"] in sent["text"]
    pb.verify("lost-1", rebind.rebind_id, OLD, pb.inbox.next_code(e164("13800138601")))
