"""Adversarial input: arbitrary values in every field of every RPC, oversized
messages, and identity answers that give nothing away.

The property suite (hypothesis) throws generated requests at every method of
BindingService, ReviewService and AuditService on one server per backend,
seeded with accounts and rebinds in every open state. Whatever it sends, the
answer is OK or a defined refusal (never INTERNAL, UNKNOWN or UNAVAILABLE)
with ErrorInfo in domain phonebind.v1; afterwards the store still holds its
invariants and the audit chains verify. The budget is PHONEBIND_ADVERSARIAL_EXAMPLES
examples per RPC (default 100, and as many short mixed sequences), which keeps
each backend under a minute.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets as pysecrets
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
import pytest
from conftest import PG_ENV, Running, start_server
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    HOLDER,
    ID_NUMBER,
    NEW,
    OLD,
    RPCS,
    FakeClock,
    LogLines,
    Secrets,
    e164,
    error_details,
    make_id_number,
    rows,
)

from phonebind.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
)
from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import resources_pb2 as res
from phonebind_server.rpc.errors import STATUS_FOR_REASON, TRANSPORT_REASONS

METHODS = RPCS

EXAMPLES_PER_RPC = int(os.environ.get("PHONEBIND_ADVERSARIAL_EXAMPLES", "100"))

ALLOWED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
# The reason each status may carry: the domain's table, plus the auth refusals.
REASON_STATUS = {
    **{reason.value: code for reason, code in STATUS_FOR_REASON.items()},
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
}
assert TRANSPORT_REASONS - set(REASON_STATUS) == {"INTERNAL"}

PHONE_A, PHONE_B, PHONE_C = "13800138000", "13900139000", "13700137000"
# A second holder, for accounts whose KYC answers are not HOLDER's.
OTHER_ID = make_id_number()
OTHER_NAME = "欧阳娜娜"

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# google.protobuf.Timestamp's valid range: 0001-01-01 .. 9999-12-31.
TS_MIN, TS_MAX = -62_135_596_800, 253_402_300_799


# -- what the strategies draw from -------------------------------------------------------


@dataclass
class Pool:
    """Values worth trying, growing with what the server hands out during the run."""

    accounts: list[str] = field(default_factory=list)
    rebinds: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)
    # What belongs together: (account_id, rebind_id) of every rebind seen, each
    # account's KYC answers, and the live code of each (rebind_id, target).
    pairs: list[tuple[str, str]] = field(default_factory=list)
    identities: dict[str, tuple[str, str]] = field(default_factory=dict)
    codes_for: dict[tuple[str, int], str] = field(default_factory=dict)

    def add(self, kind: str, value) -> None:
        values = getattr(self, kind)
        if value and value not in values:
            values.append(value)


POOL = Pool()


def pooled(kind: str, fallback: str) -> st.SearchStrategy[str]:
    """A value from POOL's list, looked up when drawn (the pool grows during the run).

    Small indices are the newest values: the latest seeded round's open rebinds
    and live codes come up often, anything older now and then.
    """

    def pick(index: int) -> str:
        values = getattr(POOL, kind)
        return values[-1 - index % len(values)] if values else fallback

    return NEWEST_FIRST.map(pick)


NEWEST_FIRST = st.one_of(st.just(0), st.integers(0, 7), st.integers(0, 10_000))


def _spellings(national: str) -> st.SearchStrategy[str]:
    n = national
    return st.sampled_from(
        [n, "+86" + n, "0086" + n, f"+86 {n[:3]} {n[3:7]} {n[7:]}", f"{n[:3]}-{n[3:7]}-{n[7:]}"]
    )


def phones() -> st.SearchStrategy[str]:
    spelled = pooled("phones", PHONE_A).flatmap(_spellings)
    # Fresh mobile numbers, virtual-operator ranges (162, 165, 170, 171) among them.
    fresh = st.builds(
        lambda prefix, rest: f"{prefix}{rest:08d}",
        st.sampled_from(["130", "138", "150", "159", "162", "165", "170", "171", "186", "199"]),
        st.integers(0, 99_999_999),
    )
    return st.one_of(spelled, fresh)


ID_NUMBERS = st.sampled_from(
    [
        ID_NUMBER,
        ID_NUMBER[:17] + "x",
        ID_NUMBER[:17] + "1",  # wrong check character
        OTHER_ID,
        make_id_number(region="310101", birth="20000229", seq="001"),
    ]
)
NAMES = st.sampled_from([HOLDER, OTHER_NAME, "张 三", "李四", "Zhang San", "阿依古丽·买买提"])
CODES = st.one_of(
    pooled("codes", "000000"),
    st.integers(0, 999_999).map(lambda n: f"{n:06d}"),
)

# Any string field may get any of these, whatever it is called.
INTERESTING = st.one_of(
    pooled("accounts", "adv0-a"),
    pooled("rebinds", "rb_x"),
    phones(),
    ID_NUMBERS,
    NAMES,
    CODES,
    st.sampled_from(["", " ", "rb_", "adv0-a ", "ADV0-A", "a" * 64, "a" * 65, "req-1", "null"]),
)
# And these when the field's name says what it is.
BY_NAME: dict[str, st.SearchStrategy[str]] = {
    "account_id": pooled("accounts", "adv0-a"),
    "rebind_id": pooled("rebinds", "rb_x"),
    "phone": phones(),
    "new_phone": phones(),
    "id_number": ID_NUMBERS,
    "holder_name": NAMES,
    "code": CODES,
    "page_token": pooled("page_tokens", ""),
    "request_id": st.sampled_from(["", "req-1", "req-2", "r" * 64]),
    "reviewer": st.sampled_from(["alice", "risk-ops:bob", "审核员"]),
    "note": st.sampled_from(["", "checked by phone", "已核实"]),
    "reason": st.sampled_from(["documents do not match", "疑似盗号"]),
    "action": st.sampled_from(["REBIND_STARTED", "CODE_SENT", "CALL_REFUSED", "IDENTITY_MISMATCH"]),
}


def _repeat(piece: str, length: int) -> str:
    return (piece * (length // len(piece) + 1))[:length]


LONG = st.builds(_repeat, st.text(min_size=1, max_size=4), st.integers(65, 5_000))


def _insert(value: str, at: int, bad: str) -> str:
    at %= len(value) + 1
    return value[:at] + bad + value[at:]


def strings(name: str) -> st.SearchStrategy[str]:
    usual = BY_NAME.get(name, INTERESTING)
    # Surrogates cannot be sent at all (protobuf strings are UTF-8); anything else goes.
    return st.one_of(
        usual,
        usual,
        st.text(),
        INTERESTING,
        LONG,
        st.builds(
            _insert,
            usual,
            st.integers(0, 70),
            st.sampled_from(["\x00", "\u200b", "\u202e", "\ufeff", "０", "٣", "\n", "%s"]),
        ),
    )


TIMESTAMPS = st.builds(
    lambda seconds, nanos: timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
    st.one_of(
        st.integers(TS_MIN, TS_MAX),
        st.sampled_from([TS_MIN, TS_MAX, TS_MIN - 1, TS_MAX + 1, 0, -1, *INT64]),
        st.integers(*INT64),
    ),
    st.one_of(st.integers(0, 999_999_999), st.sampled_from([-1, 10**9, *INT32])),
)


def field_values(fd: FieldDescriptor) -> st.SearchStrategy[object]:
    if fd.type == FieldDescriptor.TYPE_STRING:
        values: st.SearchStrategy[object] = strings(fd.name)
    elif fd.type == FieldDescriptor.TYPE_BOOL:
        values = st.booleans()
    elif fd.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in fd.enum_type.values]
        # Proto3 enums are open: unknown and negative numbers arrive as they are.
        values = st.one_of(st.sampled_from(known), st.integers(-2, 10), st.integers(*INT32))
    elif fd.type == FieldDescriptor.TYPE_INT32:
        edges = [0, 1, -1, 20, 50, 100, 101, 500, 501, *INT32]
        values = st.one_of(st.sampled_from(edges), st.integers(*INT32))
    elif fd.type == FieldDescriptor.TYPE_INT64:
        values = st.one_of(st.sampled_from([0, 1, -1, *INT64]), st.integers(*INT64))
    elif fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Timestamp":
        values = st.none() | TIMESTAMPS
    else:  # pragma: no cover - a new field type needs a strategy here
        raise AssertionError(f"no strategy for {fd.full_name}")
    if fd.is_repeated:  # pragma: no cover - no request has one yet
        raise AssertionError(f"no strategy for repeated {fd.full_name}")
    return values


def build(request_class, values: dict[str, object]):
    request = request_class()
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, timestamp_pb2.Timestamp):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


FLOW_KEYS = ("holder_name", "id_number", "target", "code")


def _flow(drawn: tuple[int, frozenset[str], int]) -> dict[str, object]:
    """An account with one of its rebinds, and (some of) its right answers."""
    index, keys, target = drawn
    if not POOL.pairs:
        return {}
    account_id, rebind_id = POOL.pairs[-1 - index % len(POOL.pairs)]
    values: dict[str, object] = {"account_id": account_id, "rebind_id": rebind_id}
    name, id_number = POOL.identities.get(account_id, (None, None))
    if "target" in keys:
        values["target"] = target
    right = {
        "holder_name": name,
        "id_number": id_number,
        "code": POOL.codes_for.get((rebind_id, target)),
    }
    values.update({k: v for k, v in right.items() if k in keys and v is not None})
    return values


# Fields drawn one by one rarely fit together (the right rebind of the right account
# with its live code), so half the requests get such a fit laid over them.
FLOWS = st.none() | st.tuples(
    NEWEST_FIRST,
    st.just(frozenset(FLOW_KEYS)) | st.frozensets(st.sampled_from(FLOW_KEYS)),
    st.sampled_from([OLD, NEW]),
).map(_flow)


def requests_for(request_class) -> st.SearchStrategy[object]:
    fields = {fd.name: field_values(fd) for fd in request_class.DESCRIPTOR.fields}

    def merge(drawn: tuple[dict[str, object], dict[str, object] | None]):
        values, flow = drawn
        if flow and "rebind_id" in fields:
            values = {**values, **{k: v for k, v in flow.items() if k in fields}}
        return build(request_class, values)

    return st.tuples(st.fixed_dictionaries(fields), FLOWS).map(merge)


HEADER_TEXT = st.text(alphabet=string.ascii_letters + string.digits + " -_.,;=*/", max_size=80)
METADATA = st.lists(
    st.tuples(
        st.sampled_from(["accept-language", "x-request-id"]),
        st.one_of(st.sampled_from(["en", "zh-CN", "en;q=0.1, zh", "*", "xx-YY"]), HEADER_TEXT),
    ),
    max_size=2,
    unique_by=lambda pair: pair[0],
)
# Time moves on between calls now and then, so expiries, cool-offs and daily
# limits come and go during the run.
ADVANCE = st.sampled_from(
    [timedelta(0)] * 48
    + [timedelta(seconds=61)] * 8
    + [timedelta(minutes=6)] * 2
    + [timedelta(minutes=31), timedelta(days=1)]
)


# -- the world: one seeded server per backend for the whole run ------------------------------


@dataclass
class World:
    running: Running
    logs: LogLines
    calls: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, set[str]] = field(default_factory=dict)
    rounds: int = 0
    sent_keys: set[tuple[str, str]] = field(default_factory=set)

    def seed_round(self) -> None:
        seed_round(self.running, self.rounds)
        self.rounds += 1

    @property
    def clock(self) -> FakeClock:
        return self.running.clock

    def stub(self, method: str):
        request_class, response_class = METHODS[method]
        return self.running.channel.unary_unary(
            method,
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )

    def call(self, method: str, request, metadata=()) -> None:
        """One call; a refusal must be a defined one, a success feeds the pool."""
        self.calls[method] = self.calls.get(method, 0) + 1
        sent_before = len(self.running.inbox.messages())
        try:
            response = self.stub(method)(request, metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            self._check_refusal(method, request, error)
            return
        self.statuses.setdefault(method, set()).add("OK")
        self._harvest(response)
        if method.endswith("/RegisterAccount"):
            POOL.identities.setdefault(request.account_id, (request.holder_name, request.id_number))
        if method.endswith("/SendCode"):
            key = (request.account_id, request.request_id)
            if not request.request_id or key not in self.sent_keys:  # else a replay: no SMS
                self.sent_keys.add(key)
                self._harvest_code(sent_before, (request.rebind_id, request.target))

    def _check_refusal(self, method: str, request, error: grpc.RpcError) -> None:
        code = error.code()
        shown = f"{method} -> {code.name}: {error.details()!r}"
        self.statuses.setdefault(method, set()).add(code.name)
        if request.ByteSize() > self.running.app.settings.max_receive_bytes:
            # gRPC's own receive limit answers before the service sees the call.
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, shown
            return
        if code not in ALLOWED:  # the server's traceback says more than the status
            faults = [line for line in self.logs.lines if "unhandled error" in line]
            trace = json.loads(faults[-1]).get("exception", "") if faults else ""
            raise AssertionError(f"{shown}\n{trace[-3000:]}")
        status = rpc_status.from_call(error)
        assert status is not None, f"{shown}: no google.rpc.Status details"
        infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
        assert len(infos) == 1, f"{shown}: {len(infos)} ErrorInfo"
        info = error_details_pb2.ErrorInfo()
        infos[0].Unpack(info)
        assert info.domain == "phonebind.v1", shown
        assert REASON_STATUS.get(info.reason) == code, f"{shown}: reason {info.reason}"
        texts = [error.details() or "", *info.metadata.values()]
        for detail in status.details:
            if detail.Is(error_details_pb2.LocalizedMessage.DESCRIPTOR):
                localized = error_details_pb2.LocalizedMessage()
                detail.Unpack(localized)
                texts.append(localized.message)
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                texts.extend(v.description for v in bad.field_violations)
        # Safe to show an operator: short, and no number, ID number or code, neither
        # the seeded ones nor any run of 6+ digits the request carried.
        digit_runs = {
            run
            for fd in request.DESCRIPTOR.fields
            if fd.type == FieldDescriptor.TYPE_STRING
            for run in re.findall(r"[0-9]{6,}", getattr(request, fd.name))
        }
        for text in texts:
            assert len(text) < 300, f"{shown}: message too long"
            for value in self.running.secrets.values | digit_runs:
                assert value not in text, f"{shown}: the answer repeats {value[:3]}…"

    def _harvest(self, response) -> None:
        for fd, value in response.ListFields():
            if fd.name == "next_page_token":
                POOL.add("page_tokens", value)
            elif fd.name in ("rebind", "rebinds"):
                for rebind in [value] if fd.name == "rebind" else value:
                    POOL.add("rebinds", rebind.rebind_id)
                    POOL.add("pairs", (rebind.account_id, rebind.rebind_id))
            elif fd.name == "account":
                POOL.add("accounts", value.account_id)

    def _harvest_code(self, sent_before: int, challenge: tuple[str, int]) -> None:
        """The code SendCode just had delivered, as the handset would read it."""
        inbox = self.running.inbox
        deadline = time.monotonic() + 5  # the outbox delivers in the background
        while time.monotonic() < deadline:
            codes = [m for m in inbox.messages()[sent_before:] if m["purpose"] == "REBIND_CODE"]
            if codes:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("SendCode answered OK but no code was delivered")
        code = re.search(r"(?<![0-9])([0-9]{6})(?![0-9])", codes[-1]["text"])
        assert code, "code message without a 6-digit code"
        self.running.secrets.add(code.group(1))
        POOL.add("codes", code.group(1))
        POOL.codes_for[challenge] = code.group(1)

    def check_invariants(self) -> None:
        url = self.running.database_url
        unbound = rows(
            url,
            "SELECT account_id FROM accounts WHERE phone_index IS NULL OR phone_index = ''"
            " OR phone_sealed IS NULL OR phone_sealed = ''",
        )
        shared = rows(
            url,
            "SELECT phone_index, COUNT(*) FROM accounts GROUP BY phone_index HAVING COUNT(*) > 1",
        )
        open_twice = rows(
            url,
            "SELECT account_id, COUNT(*) FROM rebinds"
            " WHERE state IN ('PENDING', 'AWAITING_REVIEW', 'READY')"
            " GROUP BY account_id HAVING COUNT(*) > 1",
        )
        orphans = rows(
            url,
            "SELECT r.rebind_id FROM rebinds r LEFT JOIN accounts a"
            " ON a.account_id = r.account_id WHERE a.account_id IS NULL",
        )
        # The last completed change of an account moved it to the number it has now.
        moved_elsewhere = rows(
            url,
            "SELECT c.account_id FROM binding_changes c JOIN accounts a"
            " ON a.account_id = c.account_id"
            " WHERE c.seq = (SELECT MAX(seq) FROM binding_changes l"
            " WHERE l.account_id = c.account_id) AND c.new_phone_index <> a.phone_index",
        )
        assert not unbound, f"accounts without a number: {unbound}"
        assert not shared, f"a number on two accounts: {len(shared)}"
        assert not open_twice, f"accounts with two open rebinds: {open_twice}"
        assert not orphans, f"rebinds of no account: {orphans}"
        assert not moved_elsewhere, f"binding differs from the last change: {moved_elsewhere}"
        report = audit_service_pb2_grpc.AuditServiceStub(self.running.channel).VerifyAuditChain(
            audit_service_pb2.VerifyAuditChainRequest(), timeout=30
        )
        assert report.ok, list(report.problems)
        assert report.events_checked > 0
        lines, self.logs.lines = self.logs.lines, []
        internal = [line for line in lines if "unhandled error" in line]
        assert not internal, internal[0][:500]
        leaked = self.running.secrets.leaked(lines)
        assert not leaked, f"a secret reached the logs: {leaked[0][:200]}"


def round_phones(n: int) -> list[str]:
    """Six mobile numbers no other round uses."""
    return [
        f"{prefix}{n:04d}{tail}"
        for prefix, tail in zip(
            ("138", "139", "137", "158", "186", "187"),
            ("8000", "9000", "7000", "8001", "6000", "7001"),
            strict=True,
        )
    ]


def seed_round(running: Running, n: int) -> None:
    """Fresh accounts advN-a..d, so limits and locks of earlier rounds do not get in the way:

    advN-a PENDING with a live code to its number, advN-b AWAITING_REVIEW (old phone
    lost), advN-c READY, advN-d with one completed change.
    """
    pb = running.api
    a, b, c, d, e, f = round_phones(n)
    names = [f"adv{n}-{x}" for x in "abcd"]
    pb.register(names[0], a)
    pb.register(names[1], b, name=OTHER_NAME, id_number=OTHER_ID)
    pb.register(names[2], c, name=OTHER_NAME, id_number=OTHER_ID)
    pb.register(names[3], d)

    lost = pb.start(names[1], e, lost=True)
    pb.identity(names[1], lost.rebind_id, name=OTHER_NAME, id_number=OTHER_ID)
    review = pb.send_and_verify(names[1], lost.rebind_id, NEW, e)
    assert review.state == res.REBIND_STATE_AWAITING_REVIEW

    ready = pb.start(names[2], f)
    pb.identity(names[2], ready.rebind_id, name=OTHER_NAME, id_number=OTHER_ID)
    pb.send_and_verify(names[2], ready.rebind_id, OLD, c)
    assert pb.send_and_verify(names[2], ready.rebind_id, NEW, f).state == res.REBIND_STATE_READY

    moved = f"135{n:04d}5000"
    done = pb.ready_rebind(names[3], d, moved)
    pb.complete(names[3], done.rebind_id)

    # Last, so its rebind, its codes and its numbers are the newest in the pool.
    pending = pb.start(names[0], e)
    pb.send(names[0], pending.rebind_id, OLD)
    pb.send(names[0], pending.rebind_id, NEW)

    POOL.identities.update(
        {
            names[0]: (HOLDER, ID_NUMBER),
            names[1]: (OTHER_NAME, OTHER_ID),
            names[2]: (OTHER_NAME, OTHER_ID),
            names[3]: (HOLDER, ID_NUMBER),
        }
    )
    POOL.add("accounts", f"adv{n}-none")  # well-formed, never registered
    POOL.add("rebinds", "rb_" + pysecrets.token_urlsafe(16))  # well-formed, never issued
    for phone in (b, c, d, f, moved, a, e):
        POOL.add("phones", phone)
    for account_id in (names[3], names[1], names[2], names[0]):
        POOL.add("accounts", account_id)
    for rebind in (done, lost, ready, pending):
        POOL.add("rebinds", rebind.rebind_id)
        POOL.add("pairs", (rebind.account_id, rebind.rebind_id))
    for target, phone in ((OLD, a), (NEW, e)):
        code = pb.inbox.next_code(e164(phone))
        POOL.add("codes", code)
        POOL.codes_for[(pending.rebind_id, target)] = code


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[World]:
    """One seeded server per backend, shared by every RPC's run, on its own database."""
    tmp_path = tmp_path_factory.mktemp(f"adversarial-{request.param}")
    admin = name = running = None
    lines = LogLines(service_only=True)
    # Everything is set up inside the try: a server that fails to start still
    # drops its database and takes its log handler off.
    try:
        logging.getLogger().addHandler(lines)
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path}/phonebind.db"
        else:
            request.getfixturevalue("postgres_url")  # skips, or fails, as the other tests do
            base = os.environ[PG_ENV]
            name = f"phonebind_adversarial_{os.getpid()}_{pysecrets.token_hex(4)}"
            admin = psycopg.connect(base)
            admin.autocommit = True
            with admin.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
            url = urlunsplit(urlsplit(base)._replace(path="/" + name))
        running = start_server(url, tmp_path, FakeClock(), Secrets())
        POOL.__init__()
        world = World(running, lines)
        world.seed_round()
        yield world
    finally:
        if running is not None:
            running.stop()
        logging.getLogger().removeHandler(lines)
        if admin is not None:
            with admin.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()


# -- 1. arbitrary values in every field of every RPC -----------------------------------------

# The examples share `world` on purpose: the server's state carries over from one to
# the next. So a failing example need not fail again on its own, and the example
# database (one key for every RPC, the inner functions being one source) would replay
# it into another RPC: it is off, and what the runs found is kept as plain tests below.
# Calls take milliseconds each, and 5 000-character strings are drawn on purpose.
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES_PER_RPC,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@pytest.mark.parametrize("method", list(METHODS), ids=lambda m: m.rsplit(".", 1)[-1])
def test_arbitrary_values_in_every_field(world, method):
    request_class, _ = METHODS[method]

    @PROPERTY_SETTINGS
    @given(request=requests_for(request_class), metadata=METADATA, advance=ADVANCE)
    def one_call(request, metadata, advance):
        world.clock.advance(advance)
        if advance >= timedelta(minutes=30):  # every rebind has expired: fresh ones
            world.seed_round()
        world.call(method, request, metadata)

    world.seed_round()
    one_call()
    world.check_invariants()


CALLS = st.sampled_from(list(METHODS)).flatmap(
    lambda method: st.tuples(st.just(method), requests_for(METHODS[method][0]), METADATA, ADVANCE)
)


def test_arbitrary_sequences_across_rpcs(world):
    """Short runs of calls to any RPC: a verify between a start and a complete, and so on."""
    world.seed_round()

    @PROPERTY_SETTINGS
    @given(calls=st.lists(CALLS, min_size=1, max_size=6))
    def some_calls(calls):
        for method, request, metadata, advance in calls:
            world.clock.advance(advance)
            if advance >= timedelta(minutes=30):
                world.seed_round()
            world.call(method, request, metadata)

    some_calls()
    world.check_invariants()


def test_the_run_reached_past_validation(world):
    """The generated calls were not all refused at the door: each RPC got somewhere."""
    if len(world.calls) < len(METHODS):
        pytest.skip("run the whole module: this checks what the property runs reached")
    for method, count in world.calls.items():  # shown with -rP
        print(f"{method}: {count} calls, {sorted(world.statuses[method])}")
    assert all(count >= EXAMPLES_PER_RPC for count in world.calls.values()), world.calls
    answered = set().union(*world.statuses.values())
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"} <= answered, answered
    reached = [m for m, seen in world.statuses.items() if seen - {"INVALID_ARGUMENT"}]
    assert len(reached) >= len(METHODS) - 2, world.statuses
    world.check_invariants()


# -- what the property runs found, kept as plain regression tests ------------------------------

BAD_TIMES = {
    "after-9999": (TS_MAX + 1, 0),
    "before-0001": (TS_MIN - 1, 0),
    "int64-max": (INT64[1], 0),
    "int64-min": (INT64[0], 0),
    "negative-nanos": (0, -1),
    "a-second-of-nanos": (0, 10**9),
}


@pytest.mark.parametrize("name", ["start_time", "end_time"])
def test_audit_time_filters_outside_the_timestamp_range(server, name):
    """Were INTERNAL: Timestamp.ToJsonString/ToDatetime raise ValueError on them."""
    audit = audit_service_pb2_grpc.AuditServiceStub(server.channel)
    for seconds, nanos in BAD_TIMES.values():
        bad = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
        with pytest.raises(grpc.RpcError) as caught:
            audit.ListAuditEvents(audit_service_pb2.ListAuditEventsRequest(**{name: bad}))
        code, reason, details = error_details(caught.value)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), bad
        assert [v.field for v in details["BadRequest"].field_violations] == [name]
    # The ends of the range are times like any other.
    audit.ListAuditEvents(
        audit_service_pb2.ListAuditEventsRequest(
            start_time=timestamp_pb2.Timestamp(seconds=TS_MIN),
            end_time=timestamp_pb2.Timestamp(seconds=TS_MAX, nanos=999_999_999),
        )
    )


@pytest.mark.parametrize("name", ["rebind_id", "action"])
def test_audit_text_filters_with_nul_or_control_characters(server, name):
    """Were INTERNAL on PostgreSQL, which refuses NUL in a string parameter."""
    server.api.register("loan-a", PHONE_A)
    audit = audit_service_pb2_grpc.AuditServiceStub(server.channel)
    for value in ("\x00", "CODE\x00SENT", "rb_abc\x00", "ACCOUNT\nREGISTERED", "A" * 65):
        with pytest.raises(grpc.RpcError) as caught:
            audit.ListAuditEvents(audit_service_pb2.ListAuditEventsRequest(**{name: value}))
        code, reason, details = error_details(caught.value)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), value
        assert [v.field for v in details["BadRequest"].field_violations] == [name]
    found = audit.ListAuditEvents(
        audit_service_pb2.ListAuditEventsRequest(action="ACCOUNT_REGISTERED")
    ).events
    assert [e.account_id for e in found] == ["loan-a"]


# -- 2. oversized messages -----------------------------------------------------------------


def test_oversized_message_is_refused_and_the_server_stays_serving(
    database_url, tmp_path, clock, secrets_seen
):
    running = start_server(database_url, tmp_path, clock, secrets_seen, max_receive_bytes=4096)
    try:
        pb = running.api
        pb.register("loan-a", PHONE_A)
        before = running.snapshot()
        with pytest.raises(grpc.RpcError) as caught:
            pb.stub.RegisterAccount(
                api.RegisterAccountRequest(
                    account_id="loan-big",
                    holder_name="A" * 10_000,
                    id_number=ID_NUMBER,
                    phone=PHONE_B,
                ),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        # Every method has the same limit, whichever field carries the bulk.
        for method, (request_class, response_class) in METHODS.items():
            text = next(
                fd.name
                for fd in request_class.DESCRIPTOR.fields
                if fd.type == FieldDescriptor.TYPE_STRING
            )
            stub = running.channel.unary_unary(
                method,
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            with pytest.raises(grpc.RpcError) as caught:
                stub(request_class(**{text: "x" * 10_000}), timeout=10)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, method
        # Just under the limit the service itself answers (bad input, not too big).
        with pytest.raises(grpc.RpcError) as caught:
            pb.stub.GetAccount(api.GetAccountRequest(account_id="a" * 4000), timeout=10)
        code, reason, _ = error_details(caught.value)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert running.snapshot() == before
        health = health_pb2_grpc.HealthStub(running.channel)
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert pb.get_account("loan-a").phone_masked == "138****8000"
    finally:
        running.stop()


# -- 3. a wrong identity tells nothing about which part was wrong --------------------------


def _answer(error: grpc.RpcError) -> tuple[object, ...]:
    """Everything a caller sees of an identity refusal, attempts_left normalised."""
    code, reason, details = error_details(error)
    info = details["ErrorInfo"]
    left = info.metadata["attempts_left"]
    localized = details["LocalizedMessage"]
    trailing = sorted(key for key, _ in error.trailing_metadata() or () if key != "x-request-id")
    return (
        int(left),
        (
            code,
            reason,
            info.domain,
            error.details(),
            sorted(info.metadata),
            sorted(details),
            localized.locale,
            re.sub(rf"(?<![0-9]){left}(?![0-9])", "{n}", localized.message),
            trailing,
        ),
    )


def test_identity_mismatch_is_the_same_whichever_part_is_wrong(server):
    pb = server.api
    pb.register("loan-a", PHONE_A)
    # Another account's real KYC answers are no closer to loan-a's than made-up ones.
    pb.register("loan-b", PHONE_B, name=OTHER_NAME, id_number=OTHER_ID)
    rebind = pb.start("loan-a", PHONE_C)
    wrong_id = make_id_number(region="310101", birth="19800101", seq="456")
    server.secrets.add(wrong_id)
    answers = {}
    for case, (name, id_number) in {
        "wrong name": ("李四", ID_NUMBER),
        "wrong ID number": (HOLDER, wrong_id),
        "both wrong": ("李四", wrong_id),
        "another holder's identity": (OTHER_NAME, OTHER_ID),
    }.items():
        before = pb.get_rebind("loan-a", rebind.rebind_id)
        with pytest.raises(grpc.RpcError) as caught:
            pb.identity("loan-a", rebind.rebind_id, name=name, id_number=id_number)
        answers[case] = _answer(caught.value)
        after = pb.get_rebind("loan-a", rebind.rebind_id)
        assert after.attempts_left == before.attempts_left - 1, case
        # The answer counts down the nearer limit: the account's 5 identity failures a day.
        assert answers[case][0] == min(after.attempts_left, 5 - len(answers)), case
        assert list(after.completed_steps) == [], case
    lefts = [left for left, _ in answers.values()]
    assert lefts == [4, 3, 2, 1]
    first = answers["wrong name"][1]
    assert first[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "IDENTITY_MISMATCH")
    assert "BadRequest" not in first[5]  # no field is named as the wrong one
    for case, (_, seen) in answers.items():
        assert seen == first, case
