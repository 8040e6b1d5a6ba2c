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

Each of ``--processes`` processes runs one asyncio event loop with
``--concurrency`` tasks, each calling through its own
:class:`~phonebind_client.aio.AsyncPhonebindClient` on its own connection,
closed-loop, or paced to ``--rate`` operations per second in all (an
operation is one call, or one flow). The run lasts ``--duration`` seconds or
``--count`` operations, after ``--warmup`` seconds that are not measured. The
summary gives, per RPC, calls, throughput and p50/p95/p99/max latency of the
successful calls, the errors by ErrorInfo reason (the status code's name when
there is none), and the CPU time the tool itself spent in the measured window
(all its processes, user + system), per operation and per call; ``--json``
prints it as JSON. Calls are never retried: every failure is counted.

A production-mode server is reached with ``--tls`` (gRPC's default roots) or
``--ca-file``, ``--cert``/``--key`` for mutual TLS, ``--server-name`` when the
certificate names another host than ``--target``, and ``--token`` or
``--token-file`` (read once, never printed).

Send load only to a server you run yourself.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import itertools
import json
import math
import multiprocessing
import os
import queue
import random
import secrets
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from phonebind.v1 import resources_pb2

from .aio import AsyncPhonebindClient
from .errors import PhonebindError
from .load_codes import CodeBook, FileRelay, SmsFileReader, SmsSink, split_address

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

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
CONNECT_TIMEOUT = 10.0

# Phases a process reports through its progress slot.
CONNECTING, SETUP, WARMUP, RUN, DONE = range(5)
_PHASE_NAMES = ("connecting", "setup", "warmup", "run", "done")
_SLOT = 5  # phase, ops done, ops failed, setup done, setup target

_T = TypeVar("_T")


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
    # Secrets and key material, read once by the parent: never in a repr or the summary.
    token: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_pem: bytes | None = field(default=None, repr=False)
    cert_pem: bytes | None = field(default=None, repr=False)
    key_pem: bytes | None = field(default=None, repr=False)
    server_name: str | None = None
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

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What the health checks send; the clients add the same token themselves."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_options(self) -> list[tuple[str, Any]]:
        # A subchannel of its own per task's channel: each its own TCP connection,
        # so the kernel spreads them over the workers of a SO_REUSEPORT server.
        options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options


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
        "rebind flows, and summarise throughput, latency, errors and the tool's own CPU time.",
        epilog="Example: phonebind-load --scenario flow --sms-file var/sms.jsonl "
        "--concurrency 8 --duration 15",
    )
    parser.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
    parser.add_argument("--scenario", choices=SCENARIOS, default="health")
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=4,
        help="tasks per process, each on its own connection (default 4)",
    )
    parser.add_argument(
        "--processes", type=_positive_int, default=1, help="load processes, one event loop each"
    )
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
    security = parser.add_argument_group("TLS and credentials")
    security.add_argument(
        "--tls",
        action="store_true",
        help="speak TLS, trusting gRPC's default root certificates "
        "(GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names another bundle)",
    )
    security.add_argument("--ca-file", metavar="PEM", help="trust this CA instead (implies --tls)")
    security.add_argument(
        "--cert", metavar="PEM", help="client certificate chain for mutual TLS (with --key)"
    )
    security.add_argument("--key", metavar="PEM", help="the client certificate's private key")
    security.add_argument(
        "--server-name",
        metavar="NAME",
        help="the name the server's certificate must carry, when not the target's host",
    )
    token = security.add_mutually_exclusive_group()
    token.add_argument(
        "--token", help="sent as `authorization: Bearer TOKEN` (visible to ps: prefer a file)"
    )
    token.add_argument("--token-file", metavar="PATH", help="read the bearer token from PATH")
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


def _read(parser: argparse.ArgumentParser, option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        parser.error(f"{option}: cannot read {path}: {error.strerror}")


def _token_from_file(parser: argparse.ArgumentParser, path: str) -> str:
    raw = _read(parser, "--token-file", path)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    # What goes into a header: printable ASCII, one line. The token itself is
    # never part of a message.
    if not token or not all(" " < c <= "~" for c in token):
        parser.error(f"--token-file: {path} must hold one token of printable ASCII")
    return token


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.scenario == "flow" and not (args.sms_file or args.sms_sink):
        parser.error("--scenario flow needs --sms-file PATH or --sms-sink HOST:PORT")
    if args.scenario != "flow" and (args.sms_file or args.sms_sink):
        parser.error("--sms-file and --sms-sink are for --scenario flow")
    if args.sms_sink:
        try:
            split_address(args.sms_sink)
        except ValueError as error:
            parser.error(f"--sms-sink: {error}")
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    tls = bool(args.tls or args.ca_file or args.cert)
    if args.server_name and not tls:
        parser.error("--server-name needs TLS (--tls or --ca-file)")
    token = args.token
    if args.token_file:
        token = _token_from_file(parser, args.token_file)
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
        token=token,
        tls=tls,
        ca_pem=_read(parser, "--ca-file", args.ca_file) if args.ca_file else None,
        cert_pem=_read(parser, "--cert", args.cert) if args.cert else None,
        key_pem=_read(parser, "--key", args.key) if args.key else None,
        server_name=args.server_name,
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
        self.pool: deque[Account] = deque()
        self.registered = 0
        self.registered_during_run = 0

    def make(self) -> Account:
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
    """One process's measurements: latencies of successful calls (seconds, in
    arrays of doubles), errors by reason, operations done and failed."""

    def __init__(self) -> None:
        self.latencies: dict[str, array.array[float]] = {}
        self.errors: dict[str, Counter[str]] = {}
        self.ops = 0
        self.failed = 0
        self.busy = 0.0  # task-seconds spent registering accounts inline

    def series(self, rpc: str) -> array.array[float]:
        """The latencies of ``rpc``; append to it."""
        values = self.latencies.get(rpc)
        if values is None:
            values = self.latencies[rpc] = array.array("d")
        return values

    def error(self, rpc: str, reason: str) -> None:
        self.errors.setdefault(rpc, Counter())[reason] += 1

    def export(self) -> dict[str, Any]:
        return {
            "latencies": {rpc: values.tobytes() for rpc, values in self.latencies.items()},
            "errors": {rpc: dict(reasons) for rpc, reasons in self.errors.items()},
            "ops": self.ops,
            "failed": self.failed,
        }


class Plan:
    """Hands out the operations of one process until the run is over."""

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


@dataclass(frozen=True)
class PhaseResult:
    start: float  # time.monotonic()
    end: float
    ops: int
    busy: float  # task-seconds spent registering accounts inline

    @property
    def elapsed(self) -> float:
        return self.end - self.start


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all its threads (the
    accounting of os.times and getrusage, at the clock's full resolution)."""
    return time.process_time()


# -- one load process ----------------------------------------------------------


class Slot(Protocol):
    """Where a process reports its progress: phase, ops done, ops failed, setup
    done, setup target."""

    def __getitem__(self, key: int, /) -> float: ...

    def __setitem__(self, key: int, value: float, /) -> None: ...


class Worker:
    """One task: its own client, connection and operations."""

    def __init__(self, run: ProcessRun, client: AsyncPhonebindClient) -> None:
        self.run = run
        self.client = client
        self.rec = run.rec
        self.rng = random.Random()  # noqa: S311 - picks accounts, not secrets
        self.health = client.channel.unary_unary(
            HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        self.health_request = health_pb2.HealthCheckRequest()
        self.metadata = run.opts.metadata()

    async def timed(self, name: str, call: Awaitable[_T]) -> _T | None:
        """Awaits ``call``, recording its latency, or its error by reason."""
        started = time.perf_counter()
        try:
            result = await call
        except PhonebindError as error:
            self.rec.error(name, error.reason or error.code.name)
            return None
        finally:
            self.run.check_codes()  # the loop is awake: look for codes now
        self.rec.series(name).append(time.perf_counter() - started)
        return result

    # operations: True when it succeeded

    async def register(self, account: Account) -> bool:
        setup = self.run.setup
        started = time.perf_counter()
        try:
            await self.client.register_account(
                account.account_id, account.holder_name, account.id_number, account.phone
            )
        except PhonebindError as error:
            setup.error(REGISTER, error.reason or error.code.name)
            return False
        setup.series(REGISTER).append(time.perf_counter() - started)
        return True

    async def health_check(self) -> bool:
        rec = self.rec
        started = time.perf_counter()
        try:
            response = await self.health(
                self.health_request, timeout=self.run.opts.timeout, metadata=self.metadata
            )
        except grpc.RpcError as err:
            error = PhonebindError.from_rpc_error(err)
            rec.error(HEALTH, error.reason or error.code.name)
            return False
        rec.series(HEALTH).append(time.perf_counter() - started)
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            rec.error(HEALTH, "NOT_SERVING")
            return False
        return True

    async def get_account(self) -> bool:
        pool = self.run.accounts.pool
        account = pool[self.rng.randrange(len(pool))]
        return (
            await self.timed(GET_ACCOUNT, self.client.get_account(account.account_id)) is not None
        )

    async def flow(self) -> bool:
        run, client, timed = self.run, self.client, self.timed
        account = await run.take_account(self)
        if account is None:
            self.rec.error(FLOW, "NO_ACCOUNT")
            return False
        account_id = account.account_id
        new_phone = run.numbers.next()
        rebind = await timed("StartRebind", client.start_rebind(account_id, new_phone))
        if rebind is None:
            return False
        rebind_id = rebind.rebind_id
        if (
            resources_pb2.REBIND_STEP_REVIEW in rebind.required_steps
            or rebind.risk.decision != resources_pb2.RISK_DECISION_ALLOW
        ):
            self.rec.error(FLOW, "REVIEW_REQUIRED")
            return await self._cancel(account_id, rebind_id)
        if (
            await timed(
                "VerifyIdentity",
                client.verify_identity(
                    account_id, rebind_id, account.holder_name, account.id_number
                ),
            )
            is None
        ):
            return await self._cancel(account_id, rebind_id)
        codes, code_timeout = run.codes, run.opts.code_timeout
        for target, phone in (
            (resources_pb2.CODE_TARGET_OLD_PHONE, account.phone),
            (resources_pb2.CODE_TARGET_NEW_PHONE, new_phone),
        ):
            if await timed("SendCode", client.send_code(account_id, rebind_id, target)) is None:
                return await self._cancel(account_id, rebind_id)
            sent = time.perf_counter()
            code = await codes.wait("+86" + phone, code_timeout)
            if code is None:
                self.rec.error(FLOW, "CODE_NOT_DELIVERED")
                return await self._cancel(account_id, rebind_id)
            self.rec.series(SMS_WAIT).append(time.perf_counter() - sent)
            check = client.verify_code(account_id, rebind_id, target, code)
            if await timed("VerifyCode", check) is None:
                return await self._cancel(account_id, rebind_id)
        done = await timed("CompleteRebind", client.complete_rebind(account_id, rebind_id))
        if done is None:
            return await self._cancel(account_id, rebind_id)
        if done.rebind.state != resources_pb2.REBIND_STATE_COMPLETED:
            self.rec.error(FLOW, "NOT_COMPLETED")
            return False
        return True

    async def _cancel(self, account_id: str, rebind_id: str) -> bool:
        """Best effort: close a flow that failed, so it leaves no open rebind."""
        try:
            await self.client.cancel_rebind(account_id, rebind_id)
        except PhonebindError:
            pass
        return False


class ProcessRun:
    """Everything one load process does, on its event loop: connect, set up,
    warm up, measure."""

    def __init__(
        self,
        opts: Options,
        index: int,
        *,
        slot: Slot,
        sync: Callable[[], None],
        started: Callable[[], None] = lambda: None,
        codes: CodeBook | None = None,
    ) -> None:
        self.opts = opts
        self.index = index
        self.slot = slot  # _SLOT floats this process writes its progress to
        self.sync = sync  # blocks until every process is at the same point
        self.started = started  # told when the measured window opens
        self.numbers = Numbers(opts, index)
        self.accounts = Accounts(opts, index, self.numbers)
        self.codes = codes or CodeBook(self.numbers.owns)
        self.rec = Recorder()
        self.setup = Recorder()
        self.workers: list[Worker] = []
        self._measuring = False
        self._background: list[asyncio.Task[None]] = []
        self._reader: SmsFileReader | None = None
        # Reads the codes that arrived, if they come from a file: called after each RPC.
        self.check_codes: Callable[[], None] = lambda: None

    # share of the run: the first `extra` processes take one more
    def share(self, total: int) -> int:
        base, extra = divmod(total, self.opts.processes)
        return base + (1 if self.index < extra else 0)

    async def execute(self) -> dict[str, Any]:
        opts = self.opts
        try:
            await self._connect()
            if opts.scenario == "flow" and opts.sms_file:
                self._reader = SmsFileReader(opts.sms_file, self.codes).start()
                self.check_codes = self._reader.check
            if opts.progress:
                self._background.append(asyncio.create_task(self._report()))
            op = {
                "health": Worker.health_check,
                "get-account": Worker.get_account,
                "flow": Worker.flow,
            }[opts.scenario]
            rate = opts.rate / opts.processes if opts.rate else None

            if opts.scenario == "get-account":
                self._set_phase(SETUP)
                await self._register(max(1, self.share(opts.accounts or 100)))
                if not self.accounts.pool:
                    raise LoadError("no account could be registered for GetAccount")

            await self._sync()
            warm = PhaseResult(0.0, 0.0, 0, 0.0)
            if opts.warmup > 0:
                self._set_phase(WARMUP)
                warm = await self._phase(op, count=None, duration=opts.warmup, rate=rate)

            if opts.scenario == "flow":
                self._set_phase(SETUP)
                await self._register(self._flow_accounts(warm, rate))

            await self._sync()
            self._set_phase(RUN)
            self.started()
            count = self.share(opts.count) if opts.count is not None else None
            self._measuring = True
            cpu_before = cpu_seconds()
            measured = await self._phase(op, count=count, duration=opts.duration, rate=rate)
            cpu = cpu_seconds() - cpu_before
            self._measuring = False
            self._set_phase(DONE)
            return {
                "index": self.index,
                "start": measured.start,
                "end": measured.end,
                "cpu_seconds": cpu,
                **self.rec.export(),
                "setup": self.setup.export(),
                "accounts_registered": self.accounts.registered,
                "registered_during_run": self.accounts.registered_during_run,
                "codes_received": self.codes.received,
            }
        finally:
            if self._reader is not None:
                self._reader.close()
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            await asyncio.gather(*(w.client.channel.close() for w in self.workers))

    async def _sync(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.sync)

    async def _connect(self) -> None:
        opts = self.opts
        self._set_phase(CONNECTING)
        credentials = opts.credentials()
        for _ in range(opts.concurrency):
            if credentials is not None:
                channel = grpc.aio.secure_channel(
                    opts.target, credentials, options=opts.channel_options()
                )
            else:
                channel = grpc.aio.insecure_channel(opts.target, options=opts.channel_options())
            # The tool counts failures; it never retries them.
            client = AsyncPhonebindClient(
                opts.target, channel=channel, token=opts.token, timeout=opts.timeout, max_attempts=1
            )
            self.workers.append(Worker(self, client))
        ready = [w.client.channel.channel_ready() for w in self.workers]
        try:
            await asyncio.wait_for(asyncio.gather(*ready), CONNECT_TIMEOUT)
        except TimeoutError:
            raise LoadError(f"cannot connect to {opts.target}{await self._why()}") from None

    async def _why(self) -> str:
        """What one call says about a server the tool cannot reach (e.g. a TLS error)."""
        worker = self.workers[0]
        try:
            await worker.health(worker.health_request, timeout=2, metadata=worker.metadata)
        except grpc.RpcError as err:
            details = PhonebindError.from_rpc_error(err).message
            return f": {details}" if details else ""
        return ""

    def _flow_accounts(self, warm: PhaseResult, rate: float | None) -> int:
        opts = self.opts
        if opts.count is not None:
            return self.share(opts.count)
        duration = opts.duration or 0.0
        if opts.accounts:
            return self.share(opts.accounts)
        if rate:
            return math.ceil(rate * duration * 1.05) + opts.concurrency
        if warm.ops and warm.elapsed > 0:
            # Flows per second of this process in the warmup, not counting the
            # time its tasks spent registering accounts inline.
            active = opts.concurrency * warm.elapsed - warm.busy
            per_second = warm.ops * opts.concurrency / max(active, 1e-3)
            return math.ceil(per_second * duration * 1.5) + 2 * opts.concurrency
        return 0  # registered inline during the run, reported as such

    async def take_account(self, worker: Worker) -> Account | None:
        try:
            return self.accounts.pool.popleft()
        except IndexError:
            pass
        # The pool ran dry: register one now (timed under setup, not the flow).
        started = time.perf_counter()
        try:
            for _ in range(3):
                account = self.accounts.make()
                if await worker.register(account):
                    self.accounts.registered += 1
                    if self._measuring:
                        self.accounts.registered_during_run += 1
                    return account
            return None
        finally:
            self.rec.busy += time.perf_counter() - started

    async def _register(self, wanted: int) -> None:
        """Registers ``wanted`` accounts into the pool with all tasks."""
        if wanted <= 0:
            return
        self.slot[3], self.slot[4] = 0, wanted
        claimed = itertools.count()
        failures = itertools.count()
        limit = max(10, wanted // 10)

        async def register(worker: Worker) -> None:
            while next(claimed) < wanted:
                account = self.accounts.make()
                if await worker.register(account):
                    self.accounts.pool.append(account)
                    self.accounts.registered += 1
                    self.slot[3] = len(self.accounts.pool)
                elif next(failures) >= limit:
                    return

        await asyncio.gather(*(register(w) for w in self.workers))

    async def _phase(
        self,
        op: Callable[[Worker], Awaitable[bool]],
        *,
        count: int | None,
        duration: float | None,
        rate: float | None,
    ) -> PhaseResult:
        rec = self.rec = Recorder()
        for worker in self.workers:
            worker.rec = rec
        start = time.monotonic()
        offset = self.index / self.opts.rate if self.opts.rate else 0.0
        plan = Plan(
            count=count,
            deadline=start + duration if duration is not None else None,
            rate=rate,
            start=start,
            offset=offset,
        )

        async def loop(worker: Worker) -> None:
            take, sleep, monotonic = plan.take, asyncio.sleep, time.monotonic
            while (at := take()) is not None:
                if at:
                    delay = at - monotonic()
                    if delay > 0:
                        await sleep(delay)
                if await op(worker):
                    rec.ops += 1
                else:
                    rec.failed += 1

        await asyncio.gather(*(loop(w) for w in self.workers))
        return PhaseResult(start, time.monotonic(), rec.ops, rec.busy)

    def _set_phase(self, phase: int) -> None:
        self.slot[0] = phase
        if phase in (WARMUP, RUN):
            self.slot[1] = self.slot[2] = 0

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if self.slot[0] in (WARMUP, RUN):
                self.slot[1] = self.rec.ops
                self.slot[2] = self.rec.failed


def _child(
    opts: Options, index: int, barrier: Any, slots: Any, results: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """Entry point of a spawned load process."""
    slot = _SlotView(slots, index)

    def sync() -> None:
        barrier.wait()

    def started() -> None:
        results.put({"index": index, "started": True})

    try:
        run = ProcessRun(opts, index, slot=slot, sync=sync, started=started)
        result = asyncio.run(run.execute())
        result["cpu_seconds_total"] = cpu_seconds()  # the whole process, start-up included
        results.put(result)
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
        return float(self._slots[self._base + key])

    def __setitem__(self, key: int, value: float) -> None:
        self._slots[self._base + key] = value

    def __len__(self) -> int:
        return _SLOT


# -- the parent: processes, progress, summary ----------------------------------


class Progress(threading.Thread):
    """A self-updating line on stderr: phase, share done, operations, rate, errors."""

    def __init__(self, opts: Options, slots: Sequence[float]) -> None:
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
    if opts.processes == 1:
        results, parent_cpu = _run_inline(opts), 0.0
    else:
        relay: FileRelay | None = None
        sink: SmsSink | None = None
        try:
            if opts.sms_sink:
                relay = FileRelay()
                sink = SmsSink(opts.sms_sink, relay.deliver).start()
                opts = replace(opts, sms_file=relay.path)
            results, parent_cpu = _run_processes(opts)
        finally:
            if sink is not None:
                sink.stop()
            if relay is not None:
                relay.close()
    summary = summarize(opts, results, parent_cpu=parent_cpu)
    # Every process from start to end: start-up, setup and summary included.
    total = cpu_seconds() + sum(r["cpu_seconds_total"] for r in results)
    summary["load_cpu_total_seconds"] = round(total, 6)
    return summary


def _run_inline(opts: Options) -> list[dict[str, Any]]:
    slots = [0.0] * _SLOT
    progress = Progress(opts, slots) if opts.progress else None
    if progress:
        progress.start()
    try:
        return [asyncio.run(_inline(opts, slots))]
    finally:
        if progress:
            progress.stop()


async def _inline(opts: Options, slots: list[float]) -> dict[str, Any]:
    book: CodeBook | None = None
    sink: SmsSink | None = None
    if opts.sms_sink:
        book = CodeBook()
        sink = SmsSink.into_loop(opts.sms_sink, book, asyncio.get_running_loop()).start()
    try:
        result = await ProcessRun(opts, 0, slot=slots, sync=lambda: None, codes=book).execute()
    finally:
        if sink is not None:
            sink.stop()
    result["cpu_seconds_total"] = 0.0  # this process is the parent: counted there
    return result


def _run_processes(opts: Options) -> tuple[list[dict[str, Any]], float]:
    """Runs the load processes; returns their results and the CPU time this
    process spent while they measured (the sink's relay, the progress bar)."""
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
    measuring: set[int] = set()
    window_opened: float | None = None  # this process's CPU time when all were measuring
    window_cpu = 0.0
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
            if result.get("started"):
                measuring.add(result["index"])
                if len(measuring) == len(processes):
                    window_opened = cpu_seconds()
                continue
            collected[result["index"]] = result
            if "fatal" in result:
                barrier.abort()
        if window_opened is not None:
            window_cpu = cpu_seconds() - window_opened
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
    return [collected[i] for i in sorted(collected)], window_cpu


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
) -> tuple[dict[str, Any], dict[str, dict[str, int]], array.array[float], array.array[float]]:
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
    everything = array.array("d")
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


def summarize(
    opts: Options, results: list[dict[str, Any]], *, parent_cpu: float = 0.0
) -> dict[str, Any]:
    """Merges the processes' results into the summary ``--json`` prints.

    ``parent_cpu``: what the parent of several load processes spent while they
    measured (the SMS sink's relay, the progress bar).
    """
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    elapsed = end - start
    rpcs, errors, everything, sms = _rpc_table(results, elapsed)
    setup_rpcs, setup_errors, _, _ = _rpc_table((r["setup"] for r in results), elapsed)
    ops = sum(r["ops"] for r in results)
    failed = sum(r["failed"] for r in results)
    error_count = sum(sum(reasons.values()) for reasons in errors.values())
    calls = len(everything) + sum(stats["errors"] for stats in rpcs.values())
    # The tool's own CPU time in the measured window: every load process, user + system.
    cpu = sum(r["cpu_seconds"] for r in results) + parent_cpu
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
        # The measured window on the system's monotonic clock (time.monotonic()
        # of any process on this machine), to match other processes' samples.
        "window_monotonic": [round(start, 6), round(end, 6)],
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
        "load_cpu_seconds": round(cpu, 6),
        "load_cpu_ms_per_op": round(1000 * cpu / ops, 4) if ops else None,
        "load_cpu_ms_per_call": round(1000 * cpu / calls, 4) if calls else None,
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
        f"{summary['concurrency']} tasks x {summary['processes']} process(es), "
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
    cpu_per_op = summary["load_cpu_ms_per_op"]
    if cpu_per_op is not None:
        per_call = summary["load_cpu_ms_per_call"]
        lines.append(
            f"{PROG} CPU: {summary['load_cpu_seconds']:.3f} s in the measured window, "
            f"{cpu_per_op:.3f} ms per {ops['unit']}"
            + (f", {per_call:.3f} ms per call" if ops["unit"] != "call" else "")
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
