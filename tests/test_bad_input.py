"""Bad input through the real server: INVALID_ARGUMENT, the right reason, the field, no change.

Every case answers INVALID_ARGUMENT with reason INVALID_PHONE, INVALID_ID_NUMBER
or INVALID_ARGUMENT, a google.rpc.BadRequest naming the request field, a message
that does not repeat the input, and leaves the store exactly as it was.
"""

from __future__ import annotations

import base64
import itertools
from datetime import timedelta

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from support import (
    FLOW_RPCS,
    HOLDER,
    ID_NUMBER,
    NEW,
    OLD,
    FakeClock,
    e164,
    error_details,
    id_check_char,
    make_id_number,
)

from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import resources_pb2 as res
from phonebind_server.rpc.pagination import PageTokens

PHONE_A = "13800138000"
PHONE_B = "13900139000"
PHONE_C = "13700137000"
PHONE_D = "15800158000"

FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
EXTENDED_ARABIC_INDIC = str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹")

# A valid request may still be refused (not found, wrong state), but not as bad
# input, and not with a crash or an outage.
NOT_FOR_VALID_INPUT = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNAVAILABLE,
}

REASON_FOR_FIELD = {
    "phone": "INVALID_PHONE",
    "new_phone": "INVALID_PHONE",
    "id_number": "INVALID_ID_NUMBER",
}


# -- helpers ------------------------------------------------------------------------


def rejects(server, call, field: str, *, value: str = "", reason: str | None = None) -> str:
    """Runs a call that must be refused as bad input in `field`; the store must not change.

    Returns the message, which must not repeat the value.
    """
    reason = reason or REASON_FOR_FIELD.get(field, "INVALID_ARGUMENT")
    before = server.snapshot()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    code, got, details = error_details(error)
    shown = repr(value[:40])
    assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, reason), (
        f"{field}={shown}: {code} {got}: {error.details()}"
    )
    assert "BadRequest" in details, f"{field}={shown}: no BadRequest"
    violations = details["BadRequest"].field_violations
    assert [v.field for v in violations] == [field], f"{field}={shown}"
    message = error.details() or ""
    texts = [message, *(v.description for v in violations)]
    if "LocalizedMessage" in details:
        texts.append(details["LocalizedMessage"].message)
    for text in texts:
        assert len(text) < 200, f"{field}={shown}: message too long to be safe"
        if len(value) >= 4:
            assert value not in text, f"{field}={shown}: message repeats the input"
        for secret in server.secrets.values:
            assert secret not in text, f"{field}={shown}: message reveals a secret"
    assert server.snapshot() == before, f"{field}={shown}: bad input changed the store"
    return message


def register(pb, **fields):
    request = {
        "account_id": "loan-new",
        "holder_name": HOLDER,
        "id_number": ID_NUMBER,
        "phone": PHONE_C,
        **fields,
    }
    return lambda: pb.stub.RegisterAccount(api.RegisterAccountRequest(**request))


def verify_identity(pb, rebind_id: str, **fields):
    request = {
        "account_id": "loan-a",
        "rebind_id": rebind_id,
        "holder_name": HOLDER,
        "id_number": ID_NUMBER,
        **fields,
    }
    return lambda: pb.stub.VerifyIdentity(api.VerifyIdentityRequest(**request))


@pytest.fixture
def world(server):
    """loan-a on PHONE_A with an open rebind to PHONE_B and a live code to the old number."""
    pb = server.api
    pb.register("loan-a", PHONE_A)
    rebind = pb.start("loan-a", PHONE_B)
    pb.send("loan-a", rebind.rebind_id, OLD)
    code = pb.inbox.next_code(e164(PHONE_A))
    return server, rebind.rebind_id, code


def valid_requests(rebind_id: str, code: str) -> dict[str, object]:
    """One valid request per RPC, against `world`."""
    return {
        "RegisterAccount": api.RegisterAccountRequest(
            account_id="loan-new",
            holder_name=HOLDER,
            id_number=ID_NUMBER,
            phone=PHONE_C,
            request_id="req-register",
        ),
        "GetAccount": api.GetAccountRequest(account_id="loan-a"),
        "StartRebind": api.StartRebindRequest(
            account_id="loan-a", new_phone=PHONE_D, request_id="req-start"
        ),
        "VerifyIdentity": api.VerifyIdentityRequest(
            account_id="loan-a", rebind_id=rebind_id, holder_name=HOLDER, id_number=ID_NUMBER
        ),
        "SendCode": api.SendCodeRequest(
            account_id="loan-a", rebind_id=rebind_id, target=NEW, request_id="req-send"
        ),
        "VerifyCode": api.VerifyCodeRequest(
            account_id="loan-a", rebind_id=rebind_id, target=OLD, code=code
        ),
        "CompleteRebind": api.CompleteRebindRequest(
            account_id="loan-a", rebind_id=rebind_id, request_id="req-complete"
        ),
        "CancelRebind": api.CancelRebindRequest(account_id="loan-a", rebind_id=rebind_id),
        "GetRebind": api.GetRebindRequest(account_id="loan-a", rebind_id=rebind_id),
        "ListBindingHistory": api.ListBindingHistoryRequest(account_id="loan-a"),
    }


RPCS = [
    "RegisterAccount",
    "GetAccount",
    "GetRebind",
    "ListBindingHistory",
    "VerifyIdentity",
    "VerifyCode",
    "SendCode",
    "CompleteRebind",
    "CancelRebind",
    "StartRebind",
]
REQUEST_ID_RPCS = ["RegisterAccount", "StartRebind", "SendCode", "CompleteRebind"]


def with_field(request, field: str, value):
    changed = type(request)()
    changed.CopyFrom(request)
    setattr(changed, field, value)
    return changed


def call(pb, rpc: str, request):
    return lambda: getattr(pb.stub, rpc)(request)


def history(pb, account_id: str, phones: list[str], clock) -> None:
    """Registers the account on phones[0] and moves it through the rest, 40 days apart."""
    pb.register(account_id, phones[0])
    for old, new in itertools.pairwise(phones):
        rebind = pb.ready_rebind(account_id, old, new)
        pb.complete(account_id, rebind.rebind_id)
        clock.advance(timedelta(days=40))


# -- NUL bytes and 10 000 characters in every string field of every request -----------------


CORRUPTIONS = {
    "nul-inside": lambda v: v[: len(v) // 2] + "\x00" + v[len(v) // 2 :],
    "nul-prefix": lambda v: "\x00" * 4 + v,
    "10000-characters": lambda v: ((v or "A") * 10_000)[:10_000],
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_nul_and_oversized_values_in_every_string_field(world, corrupt):
    server, rebind_id, code = world
    pb = server.api
    requests = valid_requests(rebind_id, code)
    checked = 0
    for rpc, request in requests.items():
        for field in request.DESCRIPTOR.fields:
            if field.type != FieldDescriptor.TYPE_STRING:
                continue
            bad = corrupt(getattr(request, field.name))
            rejects(
                server, call(pb, rpc, with_field(request, field.name, bad)), field.name, value=bad
            )
            checked += 1
    assert checked >= 28  # every string field of every BindingService request
    # The untouched requests are not bad input: the field was the problem. (The
    # ones that close the rebind go last.)
    for rpc in RPCS:
        try:
            call(pb, rpc, requests[rpc])()
        except grpc.RpcError as error:
            assert error.code() not in NOT_FOR_VALID_INPUT, (rpc, error.code(), error.details())


# -- phone numbers --------------------------------------------------------------------------

BAD_PHONES = {
    "empty": "",
    "letters": "abc",
    "trailing-hyphen": "138-0013-8000-",
    "double-hyphen": "138--0013-8000",
    "leading-space": " 13800138000",
    "parentheses": "(138)00138000",
    "ten-digits": "1380013800",
    "twelve-digits": "138001380000",
    "unallocated": "12345678901",
    "landline-e164": "+86 10 6552 9988",
    "other-region": "+1 650 253 0000",
    "full-width": PHONE_A.translate(FULL_WIDTH),
    "one-full-width-digit": PHONE_A[:-1] + PHONE_A[-1].translate(FULL_WIDTH),
    "arabic-indic": PHONE_A.translate(ARABIC_INDIC),
    "extended-arabic-indic": PHONE_A.translate(EXTENDED_ARABIC_INDIC),
    "nul": PHONE_A + "\x00",
    "10000-digits": "1" * 10_000,
}


@pytest.mark.parametrize("value", BAD_PHONES.values(), ids=BAD_PHONES.keys())
def test_bad_phone_number(server, value):
    pb = server.api
    pb.register("loan-a", PHONE_B)
    rejects(server, register(pb, phone=value), "phone", value=value)
    rejects(
        server,
        lambda: pb.stub.StartRebind(api.StartRebindRequest(account_id="loan-a", new_phone=value)),
        "new_phone",
        value=value,
    )


def test_landline_is_refused_as_not_mobile(server):
    message = rejects(server, register(server.api, phone="+86 10 6552 9988"), "phone")
    assert "mobile" in message


# -- ID numbers -----------------------------------------------------------------------------

_TOMORROW = (FakeClock().now().date() + timedelta(days=1)).strftime("%Y%m%d")


def _wrong_check(first17: str) -> str:
    right = id_check_char(first17)
    return first17 + ("1" if right != "1" else "2")


BAD_ID_NUMBERS = {
    "empty": "",
    "wrong-check-character": ID_NUMBER[:-1] + "1",
    "wrong-check-digit": _wrong_check(make_id_number()[:17]),
    "feb-30": make_id_number(birth="19900230"),
    "month-13": make_id_number(birth="19901301"),
    # Future by the server's clock (the FakeClock, 2026-03-01), whatever the wall clock says.
    "born-tomorrow": make_id_number(birth=_TOMORROW),
    "born-before-1900": make_id_number(birth="18991231"),
    "unknown-region": make_id_number(region="000000"),
    "17-characters": ID_NUMBER[:17],
    "19-characters": ID_NUMBER + "1",
    "check-letter-not-x": ID_NUMBER[:17] + "Y",
    "full-width": ID_NUMBER.translate(FULL_WIDTH),
    "one-full-width-digit": ID_NUMBER[:5] + ID_NUMBER[5].translate(FULL_WIDTH) + ID_NUMBER[6:],
    "arabic-indic": make_id_number().translate(ARABIC_INDIC),
    "nul-as-check": ID_NUMBER[:17] + "\x00",
    "10000-characters": "1" * 10_000,
}


@pytest.mark.parametrize("value", BAD_ID_NUMBERS.values(), ids=BAD_ID_NUMBERS.keys())
def test_bad_id_number_is_refused_and_is_not_an_attempt(world, value):
    server, rebind_id, _ = world
    pb = server.api
    rejects(server, register(pb, id_number=value), "id_number", value=value)
    rejects(server, verify_identity(pb, rebind_id, id_number=value), "id_number", value=value)
    assert pb.get_rebind("loan-a", rebind_id).attempts_left == 10


def test_birth_date_today_is_accepted(server):
    today = server.clock.now().strftime("%Y%m%d")
    account = server.api.register("loan-new", PHONE_A, id_number=make_id_number(birth=today))
    assert account.account_id == "loan-new"


@pytest.mark.parametrize(("registered", "answered"), [("x", "X"), ("X", "x")])
def test_lowercase_x_is_the_same_id_number(server, registered, answered):
    pb = server.api
    account = pb.register("loan-a", PHONE_A, id_number=ID_NUMBER[:17] + registered)
    assert account.id_number_masked == "110***********002X"
    rebind = pb.start("loan-a", PHONE_B)
    done = pb.identity("loan-a", rebind.rebind_id, id_number=ID_NUMBER[:17] + answered)
    assert list(done.completed_steps) == [res.REBIND_STEP_IDENTITY]
    assert done.attempts_left == 10


# -- names ----------------------------------------------------------------------------------

BAD_NAMES = {
    "empty": "",
    "only-spaces": "   \u3000",
    "digits": "123",
    "nul": "张\x00三",
    "zero-width-space": "张\u200b三",
    "right-to-left-override": "张\u202e三",
    "markup": "<b>张三</b>",
    "65-characters": "张" * 65,
    "10000-characters": "张" * 10_000,
}


@pytest.mark.parametrize("rpc", ["RegisterAccount", "VerifyIdentity"])
def test_bad_holder_name(world, rpc):
    server, rebind_id, _ = world
    pb = server.api
    for value in BAD_NAMES.values():
        if rpc == "RegisterAccount":
            bad = register(pb, holder_name=value)
        else:
            bad = verify_identity(pb, rebind_id, holder_name=value)
        rejects(server, bad, "holder_name", value=value)
    assert pb.get_rebind("loan-a", rebind_id).attempts_left == 10


# -- ids of accounts, rebinds and requests ------------------------------------------------

BAD_ACCOUNT_IDS = {
    "empty": "",
    "space": "loan a",
    "slash": "loan/a",
    "65-characters": "a" * 65,
    "10000-characters": "a" * 10_000,
    "non-ascii": "账户-a",
    "full-width-digits": "loan-" + "123".translate(FULL_WIDTH),
    "arabic-indic-digits": "loan-" + "123".translate(ARABIC_INDIC),
    "nul": "loan-a\x00",
}


def test_bad_account_id_in_every_rpc(world):
    server, rebind_id, code = world
    pb = server.api
    for value in BAD_ACCOUNT_IDS.values():
        for rpc, request in valid_requests(rebind_id, code).items():
            bad = call(pb, rpc, with_field(request, "account_id", value))
            rejects(server, bad, "account_id", value=value)


def test_account_id_of_64_characters_is_accepted(server):
    long_id = "a" * 64
    assert server.api.register(long_id, PHONE_A).account_id == long_id


BAD_REBIND_IDS = {
    "empty": "",
    "no-prefix": "abcdef",
    "prefix-only": "rb_",
    "upper-case-prefix": "RB_abcdef",
    "slash": "rb_abc/def",
    "padding": "rb_abcdef==",
    "non-ascii": "rb_abcdé",
    "65-characters": "rb_" + "a" * 62,
    "10000-characters": "rb_" + "a" * 9_997,
    "nul": "rb_abc\x00def",
}


def test_malformed_rebind_id_in_every_flow_rpc(world):
    server, rebind_id, code = world
    pb = server.api
    for rpc in FLOW_RPCS:
        request = valid_requests(rebind_id, code)[rpc]
        for value in BAD_REBIND_IDS.values():
            bad = call(pb, rpc, with_field(request, "rebind_id", value))
            rejects(server, bad, "rebind_id", value=value)


def test_oversized_or_malformed_request_id(world):
    server, rebind_id, code = world
    pb = server.api
    requests = valid_requests(rebind_id, code)
    for rpc in REQUEST_ID_RPCS:
        for value in ("r" * 65, "r" * 10_000, "req 1", "req/1", "请求-1", "req-1\x00"):
            bad = call(pb, rpc, with_field(requests[rpc], "request_id", value))
            rejects(server, bad, "request_id", value=value)
    # 64 characters is the longest allowed.
    for rpc in REQUEST_ID_RPCS:
        try:
            call(pb, rpc, with_field(requests[rpc], "request_id", "r" * 64))()
        except grpc.RpcError as error:
            assert error.code() not in NOT_FOR_VALID_INPUT, (rpc, error.code(), error.details())


# -- codes and targets --------------------------------------------------------------------

BAD_CODES = {
    "empty": "",
    "five-digits": "12345",
    "seven-digits": "1234567",
    "letters": "abcdef",
    "digits-and-a-letter": "12345a",
    "full-width": "123456".translate(FULL_WIDTH),
    "arabic-indic": "123456".translate(ARABIC_INDIC),
    "superscript": "¹²³⁴⁵⁶",
    "signed": "+12345",
    "spaced": " 12345",
    "nul": "12345\x00",
    "10000-digits": "1" * 10_000,
}


def test_malformed_codes_are_refused_and_not_counted(world):
    server, rebind_id, code = world
    pb = server.api
    # More malformed codes than the code allows wrong tries (5): none of them counts.
    assert len(BAD_CODES) > 5
    for value in (*BAD_CODES.values(), code.translate(FULL_WIDTH), code + "0", code[:-1]):
        rejects(server, lambda v=value: pb.verify("loan-a", rebind_id, OLD, v), "code", value=value)
    assert pb.get_rebind("loan-a", rebind_id).attempts_left == 10
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    with pytest.raises(grpc.RpcError) as caught:
        pb.verify("loan-a", rebind_id, OLD, wrong)
    _, reason, details = error_details(caught.value)
    assert reason == "CODE_MISMATCH"
    assert details["ErrorInfo"].metadata["attempts_left"] == "4"
    assert pb.verify("loan-a", rebind_id, OLD, code).attempts_left == 9


@pytest.mark.parametrize("rpc", ["SendCode", "VerifyCode"])
def test_unspecified_or_unknown_code_target(world, rpc):
    server, rebind_id, code = world
    pb = server.api
    request = valid_requests(rebind_id, code)[rpc]
    for target in (res.CODE_TARGET_UNSPECIFIED, 3, 99, -1):
        rejects(server, call(pb, rpc, with_field(request, "target", target)), "target")
    assert pb.get_rebind("loan-a", rebind_id).attempts_left == 10
    # With a known target the same request is fine.
    call(pb, rpc, request)()


# -- paging ---------------------------------------------------------------------------------


def test_negative_page_size(server):
    pb = server.api
    pb.register("loan-a", PHONE_A)
    for size in (-1, -100, -(2**31)):
        rejects(
            server,
            lambda s=size: pb.stub.ListBindingHistory(
                api.ListBindingHistoryRequest(account_id="loan-a", page_size=s)
            ),
            "page_size",
        )
    # Zero means the default, and more than the maximum is capped, not refused.
    for size in (0, 1_000, 2**31 - 1):
        pb.stub.ListBindingHistory(
            api.ListBindingHistoryRequest(account_id="loan-a", page_size=size)
        )


def _garbled(token: str) -> dict[str, str]:
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    flipped = bytes([raw[0] ^ 1]) + raw[1:]
    return {
        "not-base64": "not a token!",
        "empty-payload": "AAAA",
        "one-bit-flipped": base64.urlsafe_b64encode(flipped).decode().rstrip("="),
        "truncated": token[:-2],
        "extended": token + "AA",
        "reversed": token[::-1],
        "padded": token + "====",
        "junk-inside": token[:4] + "!!!!" + token[4:],
        "nul-inside": token[:4] + "\x00\x00\x00\x00" + token[4:],
        "forged-with-another-key": PageTokens(b"not the server key").encode("history:loan-a", "1"),
        "10000-characters": (token * 10_000)[:10_000],
    }


def test_garbled_or_forged_page_token(server, clock):
    pb = server.api
    history(pb, "loan-a", [PHONE_A, PHONE_B, PHONE_C], clock)
    first = pb.stub.ListBindingHistory(
        api.ListBindingHistoryRequest(account_id="loan-a", page_size=1)
    )
    token = first.next_page_token
    assert token
    for bad in _garbled(token).values():
        rejects(
            server,
            lambda b=bad: pb.stub.ListBindingHistory(
                api.ListBindingHistoryRequest(account_id="loan-a", page_size=1, page_token=b)
            ),
            "page_token",
            value=bad,
        )
    # The real token still pages.
    second = pb.stub.ListBindingHistory(
        api.ListBindingHistoryRequest(account_id="loan-a", page_size=1, page_token=token)
    )
    assert [c.new_phone_masked for c in second.changes] == ["139****9000"]


def test_page_token_from_another_account(server, clock):
    pb = server.api
    history(pb, "loan-a", [PHONE_A, PHONE_B, PHONE_C], clock)
    # loan-b has a history too, so a foreign cursor would find rows to show.
    history(pb, "loan-b", [PHONE_D, "18600186000", "18700187000"], clock)
    theirs = pb.stub.ListBindingHistory(
        api.ListBindingHistoryRequest(account_id="loan-a", page_size=1)
    ).next_page_token
    assert theirs
    rejects(
        server,
        lambda: pb.stub.ListBindingHistory(
            api.ListBindingHistoryRequest(account_id="loan-b", page_size=1, page_token=theirs)
        ),
        "page_token",
        value=theirs,
    )
    # Each account's own token pages its own history.
    own = pb.stub.ListBindingHistory(
        api.ListBindingHistoryRequest(account_id="loan-b", page_size=1)
    ).next_page_token
    page = pb.stub.ListBindingHistory(
        api.ListBindingHistoryRequest(account_id="loan-b", page_size=1, page_token=own)
    )
    assert [c.new_phone_masked for c in page.changes] == ["186****6000"]
