"""phonebind-load: drive a phonebind server with real traffic and summarise it.

Scenarios (``--scenario``):

``health``
    ``grpc.health.v1.Health/Check``: the baseline every RPC is compared with.
``get-account``
    ``GetAccount`` on a pool of accounts registered before the run.
``flow``
    Complete number changes: StartRebind, VerifyIdentity, SendCode and
    VerifyCode for the old number, then for the new one, and CompleteRebind,
    each RPC timed on its own. Every flow moves a fresh account (registered
    before the measured window, reported under ``setup``) to a fresh number,
    because a second change of one account within the review window needs a
    reviewer. The codes are read as a handset would: from the file gateway's
    JSON lines (``--sms-file``) or from a small HTTP sink the tool runs itself
    for the ``http`` gateway (``--sms-sink HOST:PORT``; start the server with
    ``--sms-gateway http://HOST:PORT/sms``).

Each of ``--processes`` processes runs ``--concurrency`` threads, each on its
own connection, closed-loop, or paced to ``--rate`` operations per second in
all (an operation is one call, or one flow). The run lasts ``--duration``
seconds or ``--count`` operations, after ``--warmup`` seconds that are not
measured. The summary gives, per RPC, calls, throughput and p50/p95/p99/max
latency of the successful calls, and the errors by ErrorInfo reason (the
status code's name when there is none); ``--json`` prints it as JSON.

Send load only to a server you run yourself.
"""

from __future__ import annotations

import argparse
import array
import itertools
import json
import math
import multiprocessing
import os
import queue
import random
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from phonebind.v1 import binding_service_pb2 as pb
from phonebind.v1 import binding_service_pb2_grpc, resources_pb2

from .errors import PhonebindError

__all__ = ["main", "percentile", "summarize"]

PROG = "phonebind-load"
SCENARIOS = ("health", "get-account", "flow")

HEALTH = "Health/Check"
GET_ACCOUNT = "GetAccount"
REGISTER = "RegisterAccount"
FLOW_RPCS = ("StartRebind", "VerifyIdentity", "SendCode", "VerifyCode", "CompleteRebind")
FLOW = "flow"  # errors of the flow itself (no code arrived, review required, ...)
SMS_WAIT = "sms"  # from SendCode's answer to the code in the handset: not an RPC

# CN mobile ranges of the three network operators (never the virtual-operator
# ranges, which send a rebind to review).
MOBILE_PREFIXES = ("138", "139", "137", "136", "135", "150", "151", "152", "158", "159", "188")
NUMBER_SPACE = 10**8  # the 8 digits after the prefix
PROCESS_STRIDE = 10**6  # numbers each process may use in one run
# Region codes (GB/T 2260) the generated resident ID numbers start with.
ID_REGIONS = ("110105", "310104", "440305", "330106", "510107", "320102", "420102", "610103")
ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华"

_CODE = re.compile(r"(?<![0-9])([0-9]{6,10})(?![0-9])")
PURPOSE_CODE = "REBIND_CODE"

# Phases a process reports through its progress slot.
CONNECTING, SETUP, WARMUP, RUN, DONE = range(5)
_PHASE_NAMES = ("connecting", "setup", "warmup", "run", "done")
_SLOT = 5  # phase, ops done, ops failed, setup done, setup target


class LoadError(Exception):
    """The run cannot go on (no server, no accounts, a process died)."""


# -- options -------------------------------------------------------------------


@dataclass
class Options:
    target: str = "127.0.0.1:50051"
    scenario: str = "health"
    concurrency: int = 4
    processes: int = 1
    duration: float | None = None
    count: int | None = None
    warmup: float = 0.0
    rate: float | None = None
    token: str | None = None
    sms_file: str | None = None
    sms_sink: str | None = None
    accounts: int | None = None
    timeout: float = 10.0
    code_timeout: float = 10.0
    json: bool = False
    progress: bool = False
    run_id: str = ""
    number_base: int = 0
    prefix: str = MOBILE_PREFIXES[0]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError("must be zero or more")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Load a phonebind server with health checks, account reads or complete "
        "rebind flows, and summarise throughput, latency and errors.",
        epilog="Example: phonebind-load --scenario flow --sms-file var/sms.jsonl "
        "--concurrency 8 --duration 15",
    )
    parser.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
    parser.add_argument("--scenario", choices=SCENARIOS, default="health")
    parser.add_argument(
        "--concurrency", type=_positive_int, default=4, help="threads per process (default 4)"
    )
    parser.add_argument("--processes", type=_positive_int, default=1, help="load processes")
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=_positive_float, help="seconds to measure (default 10)")
    stop.add_argument("--count", type=_positive_int, help="operations to measure")
    parser.add_argument(
        "--warmup",
        type=_non_negative_float,
        help="seconds of unmeasured load first (default 1 with --duration, 0 with --count); "
        "with --scenario flow it also sizes the account pool",
    )
    parser.add_argument(
        "--rate",
        type=_positive_float,
        help="open loop: start this many operations (calls, or flows) per second in all",
    )
    parser.add_argument("--token", help="sent as `authorization: Bearer TOKEN`")
    codes = parser.add_mutually_exclusive_group()
    codes.add_argument("--sms-file", help="the file gateway's JSON-lines file (flow)")
    codes.add_argument(
        "--sms-sink",
        metavar="HOST:PORT",
        help="receive the http gateway's POSTs here (flow; the server runs with "
        "--sms-gateway http://HOST:PORT/sms)",
    )
    parser.add_argument(
        "--accounts",
        type=_positive_int,
        help="accounts to register first: the GetAccount pool (default 100), or the flow "
        "pool in duration mode (default: sized from the warmup or the rate)",
    )
    parser.add_argument(
        "--timeout", type=_positive_float, default=10.0, help="deadline of each call, seconds"
    )
    parser.add_argument(
        "--code-timeout",
        type=_positive_float,
        default=10.0,
        help="how long a flow waits for its code to arrive, seconds",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    return parser


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.scenario == "flow" and not (args.sms_file or args.sms_sink):
        parser.error("--scenario flow needs --sms-file PATH or --sms-sink HOST:PORT")
    if args.scenario != "flow" and (args.sms_file or args.sms_sink):
        parser.error("--sms-file and --sms-sink are for --scenario flow")
    if args.sms_sink:
        try:
            _split_address(args.sms_sink)
        except ValueError as error:
            parser.error(f"--sms-sink: {error}")
    duration = args.duration
    if duration is None and args.count is None:
        duration = 10.0
    warmup = args.warmup
    if warmup is None:
        warmup = 1.0 if duration is not None else 0.0
    rng = random.SystemRandom()
    return Options(
        target=args.target,
        scenario=args.scenario,
        concurrency=args.concurrency,
        processes=args.processes,
        duration=duration,
        count=args.count,
        warmup=warmup,
        rate=args.rate,
        token=args.token,
        sms_file=os.path.abspath(args.sms_file) if args.sms_file else None,
        sms_sink=args.sms_sink,
        accounts=args.accounts,
        timeout=args.timeout,
        code_timeout=args.code_timeout,
        json=args.json,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
        run_id=secrets.token_hex(4),
        number_base=rng.randrange(NUMBER_SPACE),
        prefix=rng.choice(MOBILE_PREFIXES),
    )


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("must be HOST:PORT")
    return host.strip("[]"), int(port)


# -- test data -----------------------------------------------------------------


def id_check_character(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character of a resident ID number (GB 11643)."""
    total = sum(int(d) * w for d, w in zip(first17, ID_WEIGHTS, strict=True))
    return "10X98765432"[total % 11]


@dataclass(frozen=True)
class Account:
    account_id: str
    holder_name: str
    id_number: str
    phone: str  # national number


class Numbers:
    """Unique CN mobile numbers for one process of one run.

    The run picks a random prefix and base; process ``p`` takes its numbers
    from its own stride, so processes and (almost surely) runs never collide.
    """

    def __init__(self, opts: Options, process: int) -> None:
        self._prefix = opts.prefix
        self._base = opts.number_base + process * PROCESS_STRIDE
        self._next = itertools.count()

    def owns(self, e164: str) -> bool:
        """Whether ``e164`` is one of the numbers this process may hand out."""
        national = e164.removeprefix("+86")
        if len(national) != 11 or not national.startswith(self._prefix):
            return False
        digits = national[len(self._prefix) :]
        return digits.isdigit() and (int(digits) - self._base) % NUMBER_SPACE < PROCESS_STRIDE

    def next(self) -> str:
        index = next(self._next)
        if index >= PROCESS_STRIDE:
            raise LoadError("this process ran out of phone numbers for the run")
        return f"{self._prefix}{(self._base + index) % NUMBER_SPACE:08d}"


class Accounts:
    """Makes and holds the accounts of one process: a pool of registered ones."""

    def __init__(self, opts: Options, process: int, numbers: Numbers) -> None:
        self._prefix = f"load-{opts.run_id}-{process}-"
        self._numbers = numbers
        self._next = itertools.count()
        self._rng = random.Random(f"{opts.run_id}-{process}")  # noqa: S311 - test data
        self._lock = threading.Lock()
        self.pool: deque[Account] = deque()
        self.registered = 0
        self.registered_during_run = 0

    def make(self) -> Account:
        with self._lock:
            n = next(self._next)
            rng = self._rng
            name = rng.choice(SURNAMES) + "".join(rng.choices(GIVEN, k=rng.randint(1, 2)))
            birth = f"{rng.randint(1960, 2002)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
            first17 = rng.choice(ID_REGIONS) + birth + f"{rng.randrange(1000):03d}"
        return Account(
            account_id=f"{self._prefix}{n}",
            holder_name=name,
            id_number=first17 + id_check_character(first17),
            phone=self._numbers.next(),
        )


# -- measurements --------------------------------------------------------------


class Recorder:
    """One thread's measurements: latencies of successful calls, errors by reason."""

    def __init__(self) -> None:
        self.latencies: dict[str, array.array[float]] = {}
        self.errors: dict[str, Counter[str]] = {}
        self.ops = 0
        self.failed = 0
        self.busy = 0.0  # seconds spent registering accounts inline

    def ok(self, rpc: str, seconds: float) -> None:
        values = self.latencies.get(rpc)
        if values is None:
            values = self.latencies[rpc] = array.array("d")
        values.append(seconds)

    def error(self, rpc: str, reason: str) -> None:
        self.errors.setdefault(rpc, Counter())[reason] += 1

    @staticmethod
    def merge(recorders: Iterable[Recorder]) -> dict[str, Any]:
        latencies: dict[str, array.array[float]] = {}
        errors: dict[str, Counter[str]] = {}
        ops = failed = 0
        for rec in recorders:
            for rpc, values in rec.latencies.items():
                latencies.setdefault(rpc, array.array("d")).extend(values)
            for rpc, reasons in rec.errors.items():
                errors.setdefault(rpc, Counter()).update(reasons)
            ops += rec.ops
            failed += rec.failed
        return {
            "latencies": {rpc: values.tobytes() for rpc, values in latencies.items()},
            "errors": {rpc: dict(reasons) for rpc, reasons in errors.items()},
            "ops": ops,
            "failed": failed,
        }


def error_reason(err: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call, else its status code's name."""
    error = PhonebindError.from_rpc_error(err)
    return error.reason or error.code.name


class Plan:
    """Hands out operations to the threads of one process until the run is over."""

    def __init__(
        self,
        *,
        count: int | None,
        deadline: float | None,
        rate: float | None,
        start: float,
        offset: float = 0.0,
    ) -> None:
        self._count = count
        self._deadline = deadline
        self._rate = rate
        self._start = start + offset
        self._next = itertools.count()

    def take(self) -> float | None:
        """None when the run is over, else when to start (0: now)."""
        index = next(self._next)
        if self._count is not None and index >= self._count:
            return None
        if self._rate:
            at = self._start + index / self._rate
            if self._deadline is not None and at >= self._deadline:
                return None
            return at
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return None
        return 0.0


# -- codes: the handset side ---------------------------------------------------


class CodeBook:
    """Codes delivered to the numbers of this process, waited for by its flows."""

    def __init__(self, accept: Callable[[str], bool] = lambda to: True) -> None:
        self._accept = accept
        self._codes: dict[str, deque[str]] = {}
        self._seen: set[str] = set()  # message ids: a redelivery is not a second code
        self._cond = threading.Condition()
        self.received = 0  # codes a flow waited for and got

    def deliver(self, message: dict[str, Any]) -> None:
        if message.get("purpose") != PURPOSE_CODE:
            return
        to, text = message.get("to"), message.get("text")
        if not isinstance(to, str) or not isinstance(text, str) or not self._accept(to):
            return
        match = _CODE.search(text)
        if match is None:
            return
        message_id = message.get("message_id")
        with self._cond:
            if isinstance(message_id, str) and message_id:
                if message_id in self._seen:
                    return
                self._seen.add(message_id)
            self._codes.setdefault(to, deque()).append(match.group(1))
            self._cond.notify_all()

    def wait(self, to: str, timeout: float) -> str | None:
        """The next code sent to ``to`` (E.164), or None after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._codes.get(to)), timeout):
                return None
            codes = self._codes[to]
            code = codes.popleft()
            if not codes:
                del self._codes[to]
            self.received += 1
            return code


class FileTail(threading.Thread):
    """Follows a JSON-lines SMS file from its current end into a CodeBook."""

    def __init__(self, path: str, book: CodeBook, poll: float = 0.002) -> None:
        super().__init__(name="sms-file", daemon=True)
        self._path = path
        self._book = book
        self._poll = poll
        self._halt = threading.Event()
        try:
            self._offset = os.path.getsize(path)
        except OSError:
            self._offset = 0

    def run(self) -> None:
        handle = None
        rest = b""
        try:
            while not self._halt.is_set():
                if handle is None:
                    try:
                        handle = open(self._path, "rb")
                    except OSError:
                        self._halt.wait(self._poll * 10)
                        continue
                    handle.seek(self._offset)
                data = handle.read()
                if not data:
                    self._halt.wait(self._poll)
                    continue
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    self._line(line)
        finally:
            if handle is not None:
                handle.close()

    def _line(self, line: bytes) -> None:
        if b"REBIND_CODE" not in line:
            return
        try:
            message = json.loads(line)
        except ValueError:
            return
        if isinstance(message, dict):
            self._book.deliver(message)

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


class SmsSink:
    """A tiny HTTP server for the http gateway: every POSTed JSON message goes to ``deliver``."""

    def __init__(self, address: str, deliver: Callable[[dict[str, Any]], None]) -> None:
        host, port = _split_address(address)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    message = json.loads(self.rfile.read(length) or b"null")
                except ValueError:
                    message = None
                if not isinstance(message, dict):
                    self._answer(400, b'{"error": "expected a JSON object"}')
                    return
                deliver(message)
                self._answer(200, b"{}")

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="sms-sink", daemon=True
        )

    def start(self) -> SmsSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FileRelay:
    """Appends what the sink receives to a private JSON-lines file the processes tail."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="phonebind-load-")
        self.path = os.path.join(self.directory, "sms.jsonl")
        self._lock = threading.Lock()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab")

    def deliver(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, ensure_ascii=False).encode() + b"\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        self._file.close()
        shutil.rmtree(self.directory, ignore_errors=True)


# -- one load process ----------------------------------------------------------


class Worker:
    """One thread: its own connection, stubs and recorder."""

    def __init__(self, run: ProcessRun, channel: grpc.Channel) -> None:
        self.run = run
        self.health = health_pb2_grpc.HealthStub(channel)
        self.stub = binding_service_pb2_grpc.BindingServiceStub(channel)
        self.metadata = run.opts.metadata()
        self.timeout = run.opts.timeout
        self.rec = Recorder()
        self.setup = Recorder()
        self.rng = random.Random()  # noqa: S311 - picks accounts, not secrets

    def call(self, rec: Recorder, name: str, method: Callable[..., Any], request: Any) -> Any:
        started = time.perf_counter()
        try:
            response = method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            rec.error(name, error_reason(err))
            return None
        rec.ok(name, time.perf_counter() - started)
        return response

    # operations: True when it succeeded

    def register(self, account: Account) -> bool:
        request = pb.RegisterAccountRequest(
            account_id=account.account_id,
            holder_name=account.holder_name,
            id_number=account.id_number,
            phone=account.phone,
            request_id=uuid.uuid4().hex,
        )
        return self.call(self.setup, REGISTER, self.stub.RegisterAccount, request) is not None

    def health_check(self) -> bool:
        response = self.call(self.rec, HEALTH, self.health.Check, health_pb2.HealthCheckRequest())
        if response is None:
            return False
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            self.rec.error(HEALTH, "NOT_SERVING")
            return False
        return True

    def get_account(self) -> bool:
        pool = self.run.accounts.pool
        account = pool[self.rng.randrange(len(pool))]
        request = pb.GetAccountRequest(account_id=account.account_id)
        return self.call(self.rec, GET_ACCOUNT, self.stub.GetAccount, request) is not None

    def flow(self) -> bool:
        account = self.run.take_account(self)
        if account is None:
            self.rec.error(FLOW, "NO_ACCOUNT")
            return False
        rec, stub = self.rec, self.stub
        new_phone = self.run.numbers.next()
        started = self.call(
            rec,
            "StartRebind",
            stub.StartRebind,
            pb.StartRebindRequest(
                account_id=account.account_id, new_phone=new_phone, request_id=uuid.uuid4().hex
            ),
        )
        if started is None:
            return False
        rebind = started.rebind
        ids = {"account_id": account.account_id, "rebind_id": rebind.rebind_id}
        if (
            resources_pb2.REBIND_STEP_REVIEW in rebind.required_steps
            or rebind.risk.decision != resources_pb2.RISK_DECISION_ALLOW
        ):
            rec.error(FLOW, "REVIEW_REQUIRED")
            return self._cancel(ids)
        verified = self.call(
            rec,
            "VerifyIdentity",
            stub.VerifyIdentity,
            pb.VerifyIdentityRequest(
                **ids, holder_name=account.holder_name, id_number=account.id_number
            ),
        )
        if verified is None:
            return self._cancel(ids)
        for target, phone in (
            (resources_pb2.CODE_TARGET_OLD_PHONE, account.phone),
            (resources_pb2.CODE_TARGET_NEW_PHONE, new_phone),
        ):
            send = pb.SendCodeRequest(**ids, target=target, request_id=uuid.uuid4().hex)
            if self.call(rec, "SendCode", stub.SendCode, send) is None:
                return self._cancel(ids)
            sent = time.perf_counter()
            code = self.run.codes.wait("+86" + phone, self.run.opts.code_timeout)
            if code is None:
                rec.error(FLOW, "CODE_NOT_DELIVERED")
                return self._cancel(ids)
            rec.ok(SMS_WAIT, time.perf_counter() - sent)
            check = pb.VerifyCodeRequest(**ids, target=target, code=code)
            if self.call(rec, "VerifyCode", stub.VerifyCode, check) is None:
                return self._cancel(ids)
        done = self.call(
            rec,
            "CompleteRebind",
            stub.CompleteRebind,
            pb.CompleteRebindRequest(**ids, request_id=uuid.uuid4().hex),
        )
        if done is None:
            return self._cancel(ids)
        if done.rebind.state != resources_pb2.REBIND_STATE_COMPLETED:
            rec.error(FLOW, "NOT_COMPLETED")
            return False
        return True

    def _cancel(self, ids: dict[str, str]) -> bool:
        """Best effort: close a flow that failed, so it leaves no open rebind."""
        try:
            self.stub.CancelRebind(
                pb.CancelRebindRequest(**ids), timeout=self.timeout, metadata=self.metadata
            )
        except grpc.RpcError:
            pass
        return False


class ProcessRun:
    """Everything one load process does: connect, set up, warm up, measure."""

    def __init__(
        self,
        opts: Options,
        index: int,
        *,
        slot: Any,
        sync: Callable[[], None],
        codes: CodeBook | None = None,
    ) -> None:
        self.opts = opts
        self.index = index
        self.slot = slot  # a sequence of _SLOT floats this process writes its progress to
        self.sync = sync  # waits for every process at the start of a phase
        self.numbers = Numbers(opts, index)
        self.accounts = Accounts(opts, index, self.numbers)
        self.codes = codes or CodeBook(self.numbers.owns)
        self.channels: list[grpc.Channel] = []
        self.workers: list[Worker] = []
        self._tail: FileTail | None = None
        self._stop_progress = threading.Event()
        self._measuring = False

    # share of the run: the first `extra` processes take one more
    def share(self, total: int) -> int:
        base, extra = divmod(total, self.opts.processes)
        return base + (1 if self.index < extra else 0)

    def execute(self) -> dict[str, Any]:
        opts = self.opts
        progress = threading.Thread(target=self._report, name="progress", daemon=True)
        progress.start()
        try:
            self._connect()
            if opts.scenario == "flow" and opts.sms_file and self._tail is None:
                self._tail = FileTail(opts.sms_file, self.codes)
                self._tail.start()
            op = {
                "health": Worker.health_check,
                "get-account": Worker.get_account,
                "flow": Worker.flow,
            }[opts.scenario]
            rate = opts.rate / opts.processes if opts.rate else None

            if opts.scenario == "get-account":
                self._set_phase(SETUP)
                wanted = max(1, self.share(opts.accounts or 100))
                self._register(wanted)
                if not self.accounts.pool:
                    raise LoadError("no account could be registered for GetAccount")

            self.sync()
            warm: dict[str, Any] = {"flows": 0, "elapsed": 0.0, "busy": 0.0}
            if opts.warmup > 0:
                self._set_phase(WARMUP)
                warm = self._phase(op, count=None, duration=opts.warmup, rate=rate, keep=False)

            if opts.scenario == "flow":
                self._set_phase(SETUP)
                self._register(self._flow_accounts(warm, rate))

            self.sync()
            self._set_phase(RUN)
            count = self.share(opts.count) if opts.count is not None else None
            result = self._phase(op, count=count, duration=opts.duration, rate=rate, keep=True)
            self._set_phase(DONE)
            return result
        finally:
            self._stop_progress.set()
            progress.join(1)
            if self._tail is not None:
                self._tail.stop()
            for channel in self.channels:
                channel.close()

    def _connect(self) -> None:
        self._set_phase(CONNECTING)
        for _ in range(self.opts.concurrency):
            # A channel of its own per thread, each its own TCP connection, so
            # the kernel spreads them over the workers of a SO_REUSEPORT server.
            channel = grpc.insecure_channel(
                self.opts.target, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            self.channels.append(channel)
            self.workers.append(Worker(self, channel))
        for channel in self.channels:
            try:
                grpc.channel_ready_future(channel).result(timeout=10)
            except grpc.FutureTimeoutError:
                raise LoadError(f"cannot connect to {self.opts.target}") from None

    def _flow_accounts(self, warm: dict[str, Any], rate: float | None) -> int:
        opts = self.opts
        if opts.count is not None:
            return self.share(opts.count)
        duration = opts.duration or 0.0
        if opts.accounts:
            return self.share(opts.accounts)
        if rate:
            return math.ceil(rate * duration * 1.05) + opts.concurrency
        if warm["flows"] and warm["elapsed"] > 0:
            # Flows per second of this process in the warmup, not counting the
            # time its threads spent registering accounts inline.
            active = opts.concurrency * warm["elapsed"] - warm["busy"]
            per_second = warm["flows"] * opts.concurrency / max(active, 1e-3)
            return math.ceil(per_second * duration * 1.5) + 2 * opts.concurrency
        return 0  # registered inline during the run, reported as such

    def take_account(self, worker: Worker) -> Account | None:
        try:
            return self.accounts.pool.popleft()
        except IndexError:
            pass
        # The pool ran dry: register one now (timed under setup, not the flow).
        started = time.perf_counter()
        try:
            for _ in range(3):
                account = self.accounts.make()
                if worker.register(account):
                    self.accounts.registered += 1
                    if self._measuring:
                        self.accounts.registered_during_run += 1
                    return account
            return None
        finally:
            worker.rec.busy += time.perf_counter() - started

    def _register(self, wanted: int) -> None:
        """Registers ``wanted`` accounts into the pool with all threads."""
        if wanted <= 0:
            return
        self.slot[3], self.slot[4] = 0, wanted
        claimed = itertools.count()
        failures = itertools.count()
        limit = max(10, wanted // 10)

        def register(worker: Worker) -> None:
            while next(claimed) < wanted:
                account = self.accounts.make()
                if worker.register(account):
                    self.accounts.pool.append(account)
                    self.accounts.registered += 1
                    self.slot[3] = len(self.accounts.pool)
                elif next(failures) >= limit:
                    return

        self._threads(register)

    def _phase(
        self,
        op: Callable[[Worker], bool],
        *,
        count: int | None,
        duration: float | None,
        rate: float | None,
        keep: bool,
    ) -> dict[str, Any]:
        for worker in self.workers:
            worker.rec = Recorder()
        self._measuring = keep
        start = time.monotonic()
        offset = self.index / self.opts.rate if self.opts.rate else 0.0
        plan = Plan(
            count=count,
            deadline=start + duration if duration is not None else None,
            rate=rate,
            start=start,
            offset=offset,
        )

        def loop(worker: Worker) -> None:
            rec = worker.rec
            while (at := plan.take()) is not None:
                if at:
                    delay = at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                if op(worker):
                    rec.ops += 1
                else:
                    rec.failed += 1

        self._threads(loop)
        end = time.monotonic()
        if not keep:
            return {
                "flows": sum(w.rec.ops for w in self.workers),
                "elapsed": end - start,
                "busy": sum(w.rec.busy for w in self.workers),
            }
        merged = Recorder.merge(w.rec for w in self.workers)
        setup = Recorder.merge(w.setup for w in self.workers)
        return {
            "index": self.index,
            "start": start,
            "end": end,
            **merged,
            "setup": setup,
            "accounts_registered": self.accounts.registered,
            "registered_during_run": self.accounts.registered_during_run,
            "codes_received": self.codes.received,
        }

    def _threads(self, target: Callable[[Worker], None]) -> None:
        errors: list[BaseException] = []

        def guarded(worker: Worker) -> None:
            try:
                target(worker)
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller
                errors.append(error)

        threads = [
            threading.Thread(target=guarded, args=(w,), name=f"load-{i}", daemon=True)
            for i, w in enumerate(self.workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _set_phase(self, phase: int) -> None:
        self.slot[0] = phase
        if phase in (WARMUP, RUN):
            self.slot[1] = self.slot[2] = 0

    def _report(self) -> None:
        while not self._stop_progress.wait(0.1):
            if self.slot[0] in (WARMUP, RUN):
                self.slot[1] = sum(w.rec.ops for w in self.workers)
                self.slot[2] = sum(w.rec.failed for w in self.workers)


def _child(
    opts: Options, index: int, barrier: Any, slots: Any, results: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """Entry point of a spawned load process."""
    slot = _SlotView(slots, index)

    def sync() -> None:
        barrier.wait()

    try:
        results.put(ProcessRun(opts, index, slot=slot, sync=sync).execute())
    except threading.BrokenBarrierError:
        results.put({"index": index, "fatal": None})
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        barrier.abort()
        results.put({"index": index, "fatal": f"{type(error).__name__}: {error}"})


class _SlotView:
    """Process ``index``'s part of the shared progress array."""

    def __init__(self, slots: Any, index: int) -> None:
        self._slots = slots
        self._base = index * _SLOT

    def __getitem__(self, key: int) -> float:
        return self._slots[self._base + key]

    def __setitem__(self, key: int, value: float) -> None:
        self._slots[self._base + key] = value


# -- the parent: processes, progress, summary ----------------------------------


class Progress(threading.Thread):
    """A self-updating line on stderr: phase, share done, calls, rate, errors."""

    def __init__(self, opts: Options, slots: Any) -> None:
        super().__init__(name="progress-bar", daemon=True)
        self.opts = opts
        self.slots = slots
        self._halt = threading.Event()
        self._tty = sys.stderr.isatty()
        self._run_started: float | None = None

    def run(self) -> None:
        last_line = 0.0
        while not self._halt.wait(0.2):
            now = time.monotonic()
            if self._tty:
                sys.stderr.write("\r" + self.line(now) + "\x1b[K")
                sys.stderr.flush()
            elif now - last_line >= 1.0:
                sys.stderr.write(self.line(now) + "\n")
                last_line = now

    def line(self, now: float) -> str:
        opts = self.opts
        n = opts.processes
        values = [self.slots[i] for i in range(n * _SLOT)]
        phases = [int(values[i * _SLOT]) for i in range(n)]
        phase = min(phases)
        ops = sum(values[i * _SLOT + 1] for i in range(n))
        failed = sum(values[i * _SLOT + 2] for i in range(n))
        head = f"{PROG} {opts.scenario}"
        if phase in (CONNECTING, SETUP):
            done = sum(values[i * _SLOT + 3] for i in range(n))
            target = sum(values[i * _SLOT + 4] for i in range(n))
            if target:
                return f"{head}: registering accounts {int(done)}/{int(target)}"
            return f"{head}: {_PHASE_NAMES[phase]}"
        if phase == WARMUP:
            return f"{head}: warming up ({int(ops)} ops)"
        if self._run_started is None:
            self._run_started = now
        elapsed = now - self._run_started
        if opts.count is not None:
            fraction = ops / opts.count
            where = f"{int(ops)}/{opts.count}"
        else:
            fraction = elapsed / opts.duration if opts.duration else 0.0
            where = f"{min(elapsed, opts.duration or 0):.1f}/{opts.duration:.0f} s"
        fraction = min(1.0, max(0.0, fraction))
        filled = int(fraction * 24)
        bar = "#" * filled + "." * (24 - filled)
        rate = ops / elapsed if elapsed > 0 else 0.0
        unit = "flows" if opts.scenario == "flow" else "calls"
        return (
            f"{head} [{bar}] {fraction:4.0%} {where}  {int(ops)} {unit} "
            f"{rate:.0f}/s  {int(failed)} failed"
        )

    def stop(self) -> None:
        self._halt.set()
        self.join(1)
        if self._tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def run(opts: Options) -> dict[str, Any]:
    """Runs the load as ``opts`` say and returns the summary."""
    sink: SmsSink | None = None
    relay: FileRelay | None = None
    book = CodeBook()
    try:
        if opts.sms_sink:
            if opts.processes > 1:
                relay = FileRelay()
                sink = SmsSink(opts.sms_sink, relay.deliver).start()
                opts = Options(**{**asdict(opts), "sms_file": relay.path})
            else:
                sink = SmsSink(opts.sms_sink, book.deliver).start()
        if opts.processes == 1:
            results = _run_inline(opts, book)
        else:
            results = _run_processes(opts)
    finally:
        if sink is not None:
            sink.stop()
        if relay is not None:
            relay.close()
    return summarize(opts, results)


def _run_inline(opts: Options, book: CodeBook) -> list[dict[str, Any]]:
    slots = [0.0] * _SLOT
    progress = Progress(opts, slots) if opts.progress else None
    if progress:
        progress.start()
    try:
        return [ProcessRun(opts, 0, slot=slots, sync=lambda: None, codes=book).execute()]
    finally:
        if progress:
            progress.stop()


def _run_processes(opts: Options) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(opts.processes)
    slots = context.RawArray("d", opts.processes * _SLOT)
    results = context.Queue()
    processes = [
        context.Process(
            target=_child,
            args=(opts, index, barrier, slots, results),
            name=f"{PROG}-{index}",
            daemon=True,
        )
        for index in range(opts.processes)
    ]
    progress = Progress(opts, slots) if opts.progress else None
    for process in processes:
        process.start()
    if progress:
        progress.start()
    collected: dict[int, dict[str, Any]] = {}
    try:
        while len(collected) < len(processes):
            try:
                result = results.get(timeout=0.5)
            except queue.Empty:
                dead = [
                    i for i, p in enumerate(processes) if not p.is_alive() and i not in collected
                ]
                if dead:
                    # Give a result already on its way a moment to arrive.
                    try:
                        result = results.get(timeout=2)
                    except queue.Empty:
                        barrier.abort()
                        raise LoadError(f"load process {dead[0]} died") from None
                else:
                    continue
            collected[result["index"]] = result
            if "fatal" in result:
                barrier.abort()
        fatal = [r["fatal"] for r in collected.values() if r.get("fatal")]
        if fatal:
            raise LoadError(fatal[0])
        if any("fatal" in r for r in collected.values()):
            raise LoadError("a load process stopped")
    finally:
        if progress:
            progress.stop()
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
    return [collected[i] for i in sorted(collected)]


# -- summary -------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (q in 0..100)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _latency_ms(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def ms(seconds: float) -> float:
        return round(seconds * 1000, 3)

    return {
        "min": ms(ordered[0]),
        "mean": ms(sum(ordered) / len(ordered)),
        "p50": ms(percentile(ordered, 50)),
        "p95": ms(percentile(ordered, 95)),
        "p99": ms(percentile(ordered, 99)),
        "max": ms(ordered[-1]),
    }


def _rpc_table(
    parts: Iterable[dict[str, Any]], elapsed: float
) -> tuple[dict[str, Any], dict[str, dict[str, int]], list[float], array.array[float]]:
    latencies: dict[str, array.array[float]] = {}
    errors: dict[str, Counter[str]] = {}
    for part in parts:
        for rpc, raw in part["latencies"].items():
            values = array.array("d")
            values.frombytes(raw)
            latencies.setdefault(rpc, array.array("d")).extend(values)
        for rpc, reasons in part["errors"].items():
            errors.setdefault(rpc, Counter()).update(reasons)
    table: dict[str, Any] = {}
    everything: list[float] = []
    for rpc in _ordered((set(latencies) | set(errors)) - {FLOW, SMS_WAIT}):
        values = latencies.get(rpc, array.array("d"))
        everything.extend(values)
        table[rpc] = {
            "count": len(values),
            "errors": sum(errors.get(rpc, {}).values()),
            "throughput": round(len(values) / elapsed, 3) if elapsed > 0 else 0.0,
            "latency_ms": _latency_ms(values),
        }
    sms = latencies.get(SMS_WAIT, array.array("d"))
    return table, {rpc: dict(reasons) for rpc, reasons in errors.items()}, everything, sms


def _ordered(names: Iterable[str]) -> list[str]:
    order = [HEALTH, GET_ACCOUNT, REGISTER, *FLOW_RPCS]
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def summarize(opts: Options, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Merges the processes' results into the summary ``--json`` prints."""
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    elapsed = end - start
    rpcs, errors, everything, sms = _rpc_table(results, elapsed)
    setup_rpcs, setup_errors, _, _ = _rpc_table((r["setup"] for r in results), elapsed)
    ops = sum(r["ops"] for r in results)
    failed = sum(r["failed"] for r in results)
    error_count = sum(sum(reasons.values()) for reasons in errors.values())
    summary: dict[str, Any] = {
        "tool": PROG,
        "target": opts.target,
        "scenario": opts.scenario,
        "concurrency": opts.concurrency,
        "processes": opts.processes,
        "duration_s": opts.duration if opts.count is None else None,
        "count": opts.count,
        "warmup_s": opts.warmup,
        "rate": opts.rate,
        "elapsed_s": round(elapsed, 3),
        "operations": {
            "unit": "flow" if opts.scenario == "flow" else "call",
            "started": ops + failed,
            "completed": ops,
            "failed": failed,
            "per_second": round(ops / elapsed, 3) if elapsed > 0 else 0.0,
        },
        "rpcs": rpcs,
        "total": {
            "count": len(everything),
            "errors": sum(r["errors"] for r in rpcs.values()),
            "throughput": round(len(everything) / elapsed, 3) if elapsed > 0 else 0.0,
            "latency_ms": _latency_ms(everything),
        },
        "errors": errors,
        "error_count": error_count,
        "setup": {
            "rpcs": {
                rpc: {k: v for k, v in stats.items() if k != "throughput"}
                for rpc, stats in setup_rpcs.items()
            },
            "errors": setup_errors,
            "accounts_registered": sum(r["accounts_registered"] for r in results),
            "registered_during_run": sum(r["registered_during_run"] for r in results),
        },
    }
    if opts.scenario == "flow":
        summary["codes_received"] = sum(r["codes_received"] for r in results)
        # How long each code took from SendCode's answer to the handset: the
        # outbox dispatcher and gateway at work (and the tool's polling).
        summary["sms_delivery"] = {"count": len(sms), "latency_ms": _latency_ms(sms)}
    return summary


def render(summary: dict[str, Any]) -> str:
    """The summary as text for a terminal."""
    ops = summary["operations"]
    mode = (
        f"{summary['count']} {ops['unit']}s"
        if summary["count"] is not None
        else f"{summary['duration_s']:g} s"
    )
    rate = f", paced to {summary['rate']:g}/s" if summary["rate"] else ""
    lines = [
        f"{PROG}: {summary['scenario']} against {summary['target']}, "
        f"{summary['concurrency']} threads x {summary['processes']} process(es), "
        f"{mode}{rate}; measured {summary['elapsed_s']:.2f} s",
        "",
        f"{'rpc':<16} {'calls':>8} {'errors':>7} {'calls/s':>9} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]

    def row(name: str, stats: dict[str, Any]) -> str:
        lat = stats["latency_ms"]
        cells = [f"{lat.get(k, math.nan):8.2f}" for k in ("p50", "p95", "p99", "max")]
        return (
            f"{name:<16} {stats['count']:>8} {stats['errors']:>7} "
            f"{stats.get('throughput', 0.0):>9.1f} " + " ".join(cells)
        )

    for name, stats in summary["rpcs"].items():
        lines.append(row(name, stats))
    if len(summary["rpcs"]) > 1:
        lines.append(row("all", summary["total"]))
    lines.append("")
    lines.append(
        f"{ops['unit']}s: {ops['completed']} completed, {ops['failed']} failed, "
        f"{ops['per_second']:.1f}/s"
    )
    sms = summary.get("sms_delivery")
    if sms and sms["count"]:
        lat = sms["latency_ms"]
        lines.append(
            f"codes: {sms['count']} delivered, from SendCode's answer p50 {lat['p50']:.2f} ms, "
            f"p99 {lat['p99']:.2f} ms, max {lat['max']:.2f} ms"
        )
    setup = summary["setup"]
    if setup["accounts_registered"]:
        reg = setup["rpcs"].get(REGISTER)
        p50 = f", p50 {reg['latency_ms']['p50']:.2f} ms" if reg and reg["count"] else ""
        during = setup["registered_during_run"]
        lines.append(
            f"setup: {setup['accounts_registered']} accounts registered{p50}"
            + (f" ({during} during the measured run)" if during else "")
        )
    errors = [
        (rpc, reason, n)
        for group in (summary["errors"], setup["errors"])
        for rpc, reasons in group.items()
        for reason, n in reasons.items()
    ]
    if errors:
        lines.append("errors by reason:")
        errors.sort(key=lambda e: -e[2])
        lines.extend(f"  {rpc:<16} {reason:<28} {n}" for rpc, reason, n in errors)
    else:
        lines.append("errors: none")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    try:
        summary = run(opts)
    except LoadError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. the sink's port is taken
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if opts.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
