"""AsyncPhonebindClient against a real server, and both clients' retries against
a small grpc.aio server that fails the first calls as told."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from support import HOLDER, ID_NUMBER, e164, held_lock, rows
from test_client import codes_queued

from phonebind.v1 import audit_service_pb2 as audit_pb
from phonebind.v1 import binding_service_pb2 as pb
from phonebind.v1 import resources_pb2
from phonebind.v1 import review_service_pb2 as review_pb
from phonebind_client import (
    AsyncPhonebindClient,
    ErrorReason,
    PhonebindClient,
    PhonebindError,
    RebindState,
)
from phonebind_client import calls as call_table

# -- against a real server ---------------------------------------------------------------


def test_aio_facade_runs_a_complete_rebind(server):
    inbox = server.inbox
    server.secrets.add_phone("13800138200")
    server.secrets.add_phone("13900139200")

    async def rebind() -> None:
        async with AsyncPhonebindClient(server.target) as pb:
            account = await pb.register_account("loan-a1", HOLDER, ID_NUMBER, "13800138200")
            assert account.phone_masked == "138****8200"
            rebind = await pb.start_rebind("loan-a1", "13900139200")
            assert rebind.state == RebindState.Value("REBIND_STATE_PENDING")
            await pb.verify_identity("loan-a1", rebind.rebind_id, HOLDER, ID_NUMBER)
            sent = await pb.send_code("loan-a1", rebind.rebind_id, "old")
            assert sent.attempts_left == 5
            await pb.send_code("loan-a1", rebind.rebind_id, resources_pb2.CODE_TARGET_NEW_PHONE)
            old = await asyncio.to_thread(inbox.next_code, e164("13800138200"))
            new = await asyncio.to_thread(inbox.next_code, e164("13900139200"))
            await pb.verify_code("loan-a1", rebind.rebind_id, "old", old)
            ready = await pb.verify_code("loan-a1", rebind.rebind_id, "NEW_PHONE", new)
            assert ready.state == RebindState.Value("REBIND_STATE_READY")
            done = await pb.complete_rebind("loan-a1", rebind.rebind_id)
            assert done.rebind.state == RebindState.Value("REBIND_STATE_COMPLETED")
            assert done.account.phone_masked == "139****9200"
            assert done.account.HasField("hold_until")
            fetched = await pb.get_rebind("loan-a1", rebind.rebind_id)
            assert fetched.state == RebindState.Value("REBIND_STATE_COMPLETED")
            assert (await pb.get_account("loan-a1")).phone_masked == "139****9200"
            history = [c async for c in pb.iter_binding_history("loan-a1", page_size=1)]
            assert [c.rebind_id for c in history] == [rebind.rebind_id]

    asyncio.run(rebind())
    states = rows(server.database_url, "SELECT state FROM rebinds WHERE account_id = 'loan-a1'")
    assert states == [("COMPLETED",)]


def test_aio_errors_carry_reason_details_and_ids(server):
    server.secrets.add_phone("13800138201")

    async def mistakes() -> None:
        async with AsyncPhonebindClient(server.target) as pb:
            await pb.register_account("loan-a2", HOLDER, ID_NUMBER, "13800138201")
            rebind = await pb.start_rebind("loan-a2", "13900139201")
            await pb.send_code("loan-a2", rebind.rebind_id, "new")
            code = await asyncio.to_thread(server.inbox.next_code, e164("13900139201"))
            wrong = f"{(int(code) + 1) % 1_000_000:06d}"  # well-formed, never the real one
            with pytest.raises(PhonebindError) as caught:
                await pb.verify_code("loan-a2", rebind.rebind_id, "new", wrong)
            assert caught.value.reason == "CODE_MISMATCH"
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.attempts_left == 4
            assert caught.value.request_id is None  # verify_code carries none
            with pytest.raises(PhonebindError) as again:
                await pb.send_code("loan-a2", rebind.rebind_id, "new", request_id="resend-a2")
            assert again.value.reason == "RESEND_TOO_SOON"
            assert again.value.retry_delay is not None
            assert again.value.retry_delay.total_seconds() == 60
            assert again.value.request_id == "resend-a2"
            with pytest.raises(PhonebindError) as bad:
                await pb.start_rebind("loan-a2", "not a phone")
            assert bad.value.reason == "INVALID_PHONE"
            assert bad.value.field_violations[0][0] == "new_phone"
            english = pb.with_metadata(("accept-language", "en"), ("x-request-id", "trace-a2"))
            with pytest.raises(PhonebindError) as missing:
                await english.get_account("loan-none")
            assert missing.value.error_reason == ErrorReason.ERROR_REASON_ACCOUNT_NOT_FOUND
            assert missing.value.localized_message == "The account was not found."
            assert missing.value.x_request_id == "trace-a2"
            await english.close()  # the channel is pb's: it stays open
            with pytest.raises(PhonebindError) as chinese:
                await pb.get_account("loan-none")
            assert chinese.value.localized_message == "账户不存在。"
            assert chinese.value.x_request_id and len(chinese.value.x_request_id) == 32

    asyncio.run(mistakes())


def test_aio_call_past_its_deadline_is_retried_with_the_same_request_id_to_one_effect(server):
    """The server finishes an attempt the client gave up on; the retry, with the
    same request_id, gets that attempt's answer instead of a second code."""
    server.secrets.add_phone("13800138204")
    waits: list[float] = []

    async def record_wait(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    async def send() -> tuple[pb.SendCodeResponse, pb.SendCodeResponse]:
        async with AsyncPhonebindClient(
            server.target, timeout=0.4, max_attempts=20, sleep=record_wait
        ) as client:
            await client.register_account("loan-a4", HOLDER, ID_NUMBER, "13800138204")
            rebind = await client.start_rebind("loan-a4", "13900139204")
            locked = threading.Event()

            def hold() -> None:
                with held_lock(server.database_url, rebind.rebind_id):
                    locked.set()
                    time.sleep(1.2)  # the lock outlasts the first attempts' deadlines

            holder = asyncio.ensure_future(asyncio.to_thread(hold))
            assert await asyncio.to_thread(locked.wait, 10)
            sent = await client.send_code("loan-a4", rebind.rebind_id, "old", request_id="send-a4")
            await holder
            again = await client.send_code("loan-a4", rebind.rebind_id, "old", request_id="send-a4")
            return sent, again

    sent, again = asyncio.run(send())
    assert len(waits) >= 2, waits  # it retried past DEADLINE_EXCEEDED
    assert again == sent  # the same request_id answers the first send
    assert codes_queued(server) == 1
    assert server.inbox.next_code(e164("13800138204"))


def test_aio_token_and_options_reach_the_server_and_channels_are_managed(server):
    async def check() -> None:
        with pytest.raises(ValueError, match="not both"):
            AsyncPhonebindClient(server.target, token="t", metadata=[("authorization", "x")])
        channel = grpc.aio.insecure_channel(server.target)
        with pytest.raises(ValueError, match="not both"):
            AsyncPhonebindClient(server.target, channel=channel, options=[("grpc.x", 1)])
        async with AsyncPhonebindClient(server.target, channel=channel) as borrowed:
            assert borrowed.channel is channel
            with pytest.raises(PhonebindError):
                await borrowed.get_account("loan-none")
        # The caller's channel outlives the client.
        assert channel.get_state() != grpc.ChannelConnectivity.SHUTDOWN
        await channel.close()
        async with AsyncPhonebindClient(
            server.target, options=[("grpc.primary_user_agent", "phonebind-test")]
        ) as own:
            with pytest.raises(PhonebindError):
                await own.get_account("loan-none")
            saved = own.channel
        assert saved.get_state() == grpc.ChannelConnectivity.SHUTDOWN

    asyncio.run(check())


# -- retries, against a server that fails as told ----------------------------------------


def rich_status(code: grpc.StatusCode, reason: str | None, retry_after: float | None) -> Any:
    """A google.rpc.Status as phonebind sends it, ready for context.abort."""
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=f"{code.name} for now")
    if reason is not None:
        info = error_details_pb2.ErrorInfo(reason=reason, domain="phonebind.v1")
        status.details.add().Pack(info)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


@dataclass
class Failing:
    """Answers every BindingService call, after failing the first ``failures`` of them
    with ``code`` (and an ErrorInfo ``reason`` and RetryInfo when given)."""

    failures: int
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    reason: str | None = None
    retry_after: float | None = None
    calls: list[tuple[str, Any, dict[str, str]]] = field(default_factory=list)

    def handler(self) -> grpc.GenericRpcHandler:
        def answer(method: call_table.Method[Any, Any]) -> Callable[..., Awaitable[Any]]:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                metadata = {key: value for key, value in context.invocation_metadata() or ()}
                self.calls.append((method.name, request, metadata))
                if len(self.calls) <= self.failures:
                    status = rich_status(self.code, self.reason, self.retry_after)
                    await context.abort(status.code, status.details, status.trailing_metadata)
                return method.response_type()

            return unary

        return grpc.method_handlers_generic_handler(
            call_table.BINDING_SERVICE,
            {
                method.name: grpc.unary_unary_rpc_method_handler(
                    answer(method),
                    request_deserializer=method.request_type.FromString,
                    response_serializer=method.response_type.SerializeToString,
                )
                for method in call_table.METHODS
            },
        )


@asynccontextmanager
async def failing_server(failing: Failing) -> AsyncIterator[str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([failing.handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


# Each facade method with arguments, by its retry rule.
REPLAY_SAFE = {
    "register_account": ("loan-r", HOLDER, ID_NUMBER, "13800138000"),
    "get_account": ("loan-r",),
    "start_rebind": ("loan-r", "13900139000"),
    "send_code": ("loan-r", "rebind-r", "old"),
    "complete_rebind": ("loan-r", "rebind-r"),
    "get_rebind": ("loan-r", "rebind-r"),
    "list_binding_history": ("loan-r",),
}
STORE_UNAVAILABLE_ONLY = {
    "verify_identity": ("loan-r", "rebind-r", HOLDER, ID_NUMBER),
    "verify_code": ("loan-r", "rebind-r", "old", "123456"),
    "cancel_rebind": ("loan-r", "rebind-r"),
}
WITH_REQUEST_ID = {"register_account", "start_rebind", "send_code", "complete_rebind"}


def call_through(
    kind: str,
    failing: Failing,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    **settings: Any,
) -> tuple[Any, list[float]]:
    """Calls ``method`` with the blocking or the asyncio client (made with ``settings``)
    against ``failing``; returns the result (or the PhonebindError raised) and the
    waits between attempts."""
    waits: list[float] = []
    kwargs = kwargs or {}

    async def run() -> Any:
        async with failing_server(failing) as target:
            if kind == "asyncio":

                async def sleep(seconds: float) -> None:
                    waits.append(seconds)

                async with AsyncPhonebindClient(target, sleep=sleep, **settings) as client:
                    try:
                        return await getattr(client, method)(*args, **kwargs)
                    except PhonebindError as error:
                        return error

            def blocking() -> Any:
                with PhonebindClient(target, sleep=waits.append, **settings) as client:
                    try:
                        return getattr(client, method)(*args, **kwargs)
                    except PhonebindError as error:
                        return error

            return await asyncio.to_thread(blocking)

    return asyncio.run(run()), waits


KINDS = ["asyncio", "blocking"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(REPLAY_SAFE))
@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED],
)
def test_reads_and_request_id_calls_retry_transport_failures(kind, method, code):
    failing = Failing(failures=2, code=code)
    result, waits = call_through(kind, failing, method, REPLAY_SAFE[method])
    assert not isinstance(result, PhonebindError), result
    assert len(failing.calls) == 3 and len(waits) == 2
    # Full jitter: up to 0.1 s before the first retry, 0.2 s before the second.
    assert 0 <= waits[0] <= 0.1 and 0 <= waits[1] <= 0.2
    requests = [request for _, request, _ in failing.calls]
    assert requests[0] == requests[1] == requests[2]  # the same request every time
    if method in WITH_REQUEST_ID:
        assert len(requests[0].request_id) == 36  # filled in once, a uuid4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(STORE_UNAVAILABLE_ONLY))
def test_attempting_calls_retry_only_what_phonebind_says_did_nothing(kind, method):
    args = STORE_UNAVAILABLE_ONLY[method]
    failing = Failing(failures=1, reason="STORE_UNAVAILABLE")
    result, waits = call_through(kind, failing, method, args)
    assert not isinstance(result, PhonebindError), result
    assert len(failing.calls) == 2 and len(waits) == 1
    # A bare UNAVAILABLE may come after the server counted the attempt: never retried.
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        failing = Failing(failures=1, code=code)
        result, waits = call_through(kind, failing, method, args)
        assert isinstance(result, PhonebindError) and result.code == code
        assert len(failing.calls) == 1 and waits == []


@pytest.mark.parametrize("kind", KINDS)
def test_retry_info_sets_the_wait_capped_at_max_backoff(kind):
    failing = Failing(failures=2, reason="STORE_UNAVAILABLE", retry_after=0.75)
    result, waits = call_through(
        kind, failing, "verify_code", STORE_UNAVAILABLE_ONLY["verify_code"]
    )
    assert not isinstance(result, PhonebindError), result
    assert waits == [0.75, 0.75]
    failing = Failing(failures=1, reason="STORE_UNAVAILABLE", retry_after=30)
    _, waits = call_through(kind, failing, "get_account", ("loan-r",), max_backoff=1.5)
    assert waits == [1.5]


@pytest.mark.parametrize("kind", KINDS)
def test_a_request_id_is_reused_on_every_attempt_and_carried_by_the_final_error(kind):
    failing = Failing(failures=10)
    error, waits = call_through(
        kind, failing, "start_rebind", ("loan-r", "13900139000"), max_attempts=3
    )
    assert isinstance(error, PhonebindError) and error.code == grpc.StatusCode.UNAVAILABLE
    ids = {request.request_id for _, request, _ in failing.calls}
    assert len(failing.calls) == 3 and len(waits) == 2
    assert ids == {error.request_id}
    mine = Failing(failures=1)
    call_through(
        kind, mine, "complete_rebind", ("loan-r", "rebind-r"), {"request_id": "complete-r"}
    )
    assert [request.request_id for _, request, _ in mine.calls] == ["complete-r"] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_else_is_retried(kind):
    for code, reason in [
        (grpc.StatusCode.INTERNAL, None),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESEND_TOO_SOON"),
        (grpc.StatusCode.FAILED_PRECONDITION, "CODE_EXPIRED"),
    ]:
        failing = Failing(failures=1, code=code, reason=reason, retry_after=1.0)
        error, waits = call_through(kind, failing, "send_code", REPLAY_SAFE["send_code"])
        assert isinstance(error, PhonebindError)
        assert (error.code, error.reason) == (code, reason)
        assert error.request_id == failing.calls[0][1].request_id
        assert len(failing.calls) == 1 and waits == []


@pytest.mark.parametrize("kind", KINDS)
def test_token_and_metadata_go_with_every_call(kind):
    failing = Failing(failures=1)
    call_through(
        kind,
        failing,
        "get_account",
        ("loan-r",),
        token="secret-token",
        metadata=[("accept-language", "en")],
    )
    for _, _, metadata in failing.calls:
        assert metadata["authorization"] == "Bearer secret-token"
        assert metadata["accept-language"] == "en"


def test_with_metadata_adds_pairs_and_shares_the_channel():
    failing = Failing(failures=0)

    async def run() -> None:
        async with (
            failing_server(failing) as target,
            AsyncPhonebindClient(target, token="t") as client,
        ):
            traced = client.with_metadata(("x-request-id", "trace-1"))
            with pytest.raises(ValueError, match="already sends authorization"):
                client.with_metadata(("Authorization", "Bearer other"))
            await traced.get_account("loan-r")
            await traced.close()
            assert traced.channel is client.channel
            await client.get_account("loan-r")  # still open

    asyncio.run(run())
    first, second = (metadata for _, _, metadata in failing.calls)
    assert first["x-request-id"] == "trace-1" and first["authorization"] == "Bearer t"
    assert "x-request-id" not in second


def test_the_asyncio_sleep_is_the_default_and_waits_for_real():
    failing = Failing(failures=1, reason="STORE_UNAVAILABLE", retry_after=0.2)

    async def run() -> float:
        async with (
            failing_server(failing) as target,
            AsyncPhonebindClient(target) as client,
        ):
            started = time.monotonic()
            # Another task runs while the client waits: the wait does not block the loop.
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticker = asyncio.ensure_future(tick())
            await client.cancel_rebind("loan-r", "rebind-r")
            ticker.cancel()
            assert ticks >= 2
            return time.monotonic() - started

    assert asyncio.run(run()) >= 0.2
    assert len(failing.calls) == 2


def test_every_call_names_a_method_of_the_contract():
    services = {
        s.full_name: s
        for s in (
            pb.DESCRIPTOR.services_by_name["BindingService"],
            review_pb.DESCRIPTOR.services_by_name["ReviewService"],
            audit_pb.DESCRIPTOR.services_by_name["AuditService"],
        )
    }
    for method in call_table.METHODS:
        described = services[method.service].methods_by_name[method.name]
        assert described.input_type.full_name == method.request_type.DESCRIPTOR.full_name
        assert described.output_type.full_name == method.response_type.DESCRIPTOR.full_name
    assert {m.path for m in call_table.METHODS} == {
        f"/{name}/{m}" for name, s in services.items() for m in s.methods_by_name
    }
