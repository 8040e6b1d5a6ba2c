"""Tracing with OpenTelemetry: a real server exports over OTLP/HTTP to a
collector in the test process; the client facade sends the caller's context."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import Served
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import HOLDER, ID_NUMBER, OLD, LoopThread, Serve, e164, wait_until

from phonebind_client import AsyncPhonebindClient, PhonebindClient, PhonebindError
from phonebind_server.app import create_server
from phonebind_server.config import load
from phonebind_server.rpc.interceptors import Chain, ServerSpan
from phonebind_server.sms.gateways import GatewayError, Sms
from phonebind_server.tracing import Tracing, TracingError, exporters_from

BINDING = "phonebind.v1.BindingService/"


# -- a collector: OTLP over HTTP, protobuf ------------------------------------------


class Collector:
    """Receives ExportTraceServiceRequests on /v1/traces, as an OpenTelemetry
    collector does, and keeps their spans with their resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, str], Span]] = []
        self.requests = 0
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if (
                    self.path != "/v1/traces"
                    or self.headers.get("Content-Type") != "application/x-protobuf"
                ):
                    self.send_response(404)
                    self.end_headers()
                    return
                collector.receive(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def receive(self, request: ExportTraceServiceRequest) -> None:
        with self._lock:
            self.requests += 1
            for resource_spans in request.resource_spans:
                resource = {
                    attribute.key: attribute.value.string_value
                    for attribute in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((resource, span) for span in scope_spans.spans)

    def named(self, name: str) -> list[Span]:
        with self._lock:
            return [span for _, span in self.spans if span.name == name]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    running = Collector()
    yield running
    running.close()


def attributes(span) -> dict[str, object]:
    found: dict[str, object] = {}
    for attribute in span.attributes:
        value = attribute.value
        found[attribute.key] = getattr(value, value.WhichOneof("value"))
    return found


# -- end to end: a server process, the client facade, the collector ---------------


def test_a_callers_trace_reaches_the_collector_with_the_rpc_store_and_sms_spans(
    database_url, tmp_path, secrets_seen, collector
):
    server = Serve(
        database_url,
        tmp_path,
        sms_file=str(tmp_path / "sms.jsonl"),
        secrets=secrets_seen,
        env={
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_SERVICE_NAME": "phonebind-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        },
    ).start()
    phone, new_phone = e164("13800138000"), e164("13900139000")
    secrets_seen.add_phone(phone)
    secrets_seen.add_phone(new_phone)
    secrets_seen.add(ID_NUMBER)
    caller = TracerProvider().get_tracer("loan-app")
    try:
        with PhonebindClient(server.address) as pb:
            with caller.start_as_current_span("loan-app: change number") as outer:
                pb.register_account("acct-traced", HOLDER, ID_NUMBER, phone)
                rebind = pb.start_rebind("acct-traced", new_phone)
                pb.verify_identity("acct-traced", rebind.rebind_id, HOLDER, ID_NUMBER)
                pb.send_code("acct-traced", rebind.rebind_id, OLD)
            # Outside any span: a trace of its own; a malformed traceparent likewise.
            pb.get_account("acct-traced")
            pb.with_metadata(("traceparent", "00-not-a-trace-01")).get_rebind(
                "acct-traced", rebind.rebind_id
            )
        wait_until(
            lambda: (
                collector.named("sms.dispatch")
                and collector.named(BINDING + "GetRebind")
                and collector.named(BINDING + "GetAccount")
            ),
            30,
            "the spans at the collector",
        )
    finally:
        assert server.stop() == 0

    trace_id = outer.get_span_context().trace_id.to_bytes(16, "big")
    client_span_id = outer.get_span_context().span_id.to_bytes(8, "big")
    rpcs = {}
    for method in ("RegisterAccount", "StartRebind", "VerifyIdentity", "SendCode"):
        (span,) = collector.named(BINDING + method)
        assert span.trace_id == trace_id, method
        assert span.parent_span_id == client_span_id, method
        assert span.kind == Span.SPAN_KIND_SERVER
        described = attributes(span)
        assert described["rpc.system"] == "grpc"
        assert described["rpc.method"] == method
        assert described["rpc.grpc.status_code"] == 0
        rpcs[method] = span
    assert {resource["service.name"] for resource, _ in collector.spans} == {"phonebind-under-test"}

    # The store's transactions within SendCode are its children, in its trace.
    send = rpcs["SendCode"]
    transactions = [
        span for span in collector.named("store.transaction") if span.parent_span_id == send.span_id
    ]
    assert transactions
    assert all(span.trace_id == trace_id for span in transactions)
    assert any(attributes(span)["phonebind.committed"] for span in transactions)

    # The delivery is a trace of its own, linked to the RPC that queued it.
    (dispatch,) = collector.named("sms.dispatch")
    assert dispatch.trace_id != trace_id
    assert [(link.trace_id, link.span_id) for link in dispatch.links] == [(trace_id, send.span_id)]
    assert attributes(dispatch)["phonebind.sms.purpose"]

    for untraced in (BINDING + "GetAccount", BINDING + "GetRebind"):
        (span,) = collector.named(untraced)
        assert span.trace_id != trace_id and not span.parent_span_id

    # Every log line written within a span carries its trace id.
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    access = {
        line["method"].rsplit("/", 1)[-1]: line
        for line in lines
        if line["message"] == "rpc" and line["method"].startswith("/" + BINDING)
    }
    assert access["SendCode"]["trace_id"] == trace_id.hex()
    assert access["SendCode"]["span_id"] == send.span_id.hex()
    assert (
        access["GetAccount"]["trace_id"]
        == collector.named(BINDING + "GetAccount")[0].trace_id.hex()
    )
    (delivered,) = [line for line in lines if line["message"] == "sms delivered"]
    assert delivered["trace_id"] == dispatch.trace_id.hex()
    exported = {span.trace_id.hex() for _, span in collector.spans}
    assert all(line["trace_id"] in exported for line in access.values())


def test_the_asyncio_client_sends_the_context_in_force(tmp_path, clock, secrets_seen):
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    served = in_process_server(tmp_path, clock, Tracing(provider))
    caller = TracerProvider().get_tracer("loan-app")

    async def call() -> int:
        async with AsyncPhonebindClient(f"127.0.0.1:{served.app.port}") as pb:
            with caller.start_as_current_span("a user's request") as outer:
                with pytest.raises(PhonebindError) as refused:
                    await pb.get_account("nobody-here")
            assert refused.value.reason == "ACCOUNT_NOT_FOUND"
            return outer.get_span_context().trace_id

    try:
        trace_id = served.loop.run(call())
    finally:
        served.stop()
    (span,) = [span for span in exported.get_finished_spans() if span.name.endswith("GetAccount")]
    assert span.context.trace_id == trace_id
    # A refusal is the caller's doing, not a fault of the server.
    assert span.attributes["rpc.grpc.status_code"] == 5
    assert span.attributes["phonebind.outcome"] == "ACCOUNT_NOT_FOUND"
    assert span.status.is_ok


# -- a delivery retried by the outbox's pass links back too ------------------------


class FailingOnce:
    """An SMS gateway whose first delivery fails, so that the outbox's pass
    (which reads the message back from the store) delivers it."""

    blocking = False

    def __init__(self) -> None:
        self.delivered: list[str] = []
        self.failed = False

    def deliver(self, sms: Sms) -> None:
        if not self.failed:
            self.failed = True
            raise GatewayError("the provider is busy")
        self.delivered.append(sms.message_id)


def in_process_server(tmp_path, clock, tracing, gateway=None):
    settings = load(
        {
            "listen": "127.0.0.1:0",
            "database_url": f"sqlite:///{tmp_path}/traced.db",
            "sms_gateway": f"file:{tmp_path}/sms.jsonl",
            "dev": True,
        },
        env={},
    )
    loop = LoopThread()
    app = loop.run(
        create_server(settings, clock=clock, gateway=gateway, migrate=True, tracing=tracing)
    )
    return Served(app, loop)


def test_a_delivery_from_the_outbox_links_to_the_rpc_that_queued_it(tmp_path, clock, secrets_seen):
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    gateway = FailingOnce()
    served = in_process_server(tmp_path, clock, Tracing(provider), gateway)
    phone, new_phone = e164("13800138001"), e164("13900139001")
    secrets_seen.add_phone(phone)
    secrets_seen.add_phone(new_phone)
    try:
        with PhonebindClient(f"127.0.0.1:{served.app.port}") as pb:
            pb.register_account("acct-retried", HOLDER, ID_NUMBER, phone)
            rebind = pb.start_rebind("acct-retried", new_phone)
            pb.verify_identity("acct-retried", rebind.rebind_id, HOLDER, ID_NUMBER)
            pb.send_code("acct-retried", rebind.rebind_id, OLD)
        wait_until(lambda: gateway.failed, 10, "the first attempt")
        clock.advance(timedelta(minutes=1))
        served.loop.loop.call_soon_threadsafe(served.app.dispatcher.wake_loop)
        wait_until(lambda: gateway.delivered, 10, "the retry")
    finally:
        served.stop()
    spans = exported.get_finished_spans()
    (send,) = [span for span in spans if span.name == BINDING + "SendCode"]
    attempts = sorted(
        (span for span in spans if span.name == "sms.dispatch"),
        key=lambda span: span.attributes["phonebind.sms.attempt"],
    )
    assert [span.attributes["phonebind.sms.attempt"] for span in attempts] == [1, 2]
    assert not attempts[0].status.is_ok and attempts[1].status.is_ok
    for attempt in attempts:
        (link,) = attempt.links
        assert (link.context.trace_id, link.context.span_id) == (
            send.context.trace_id,
            send.context.span_id,
        )
    # The failed attempt's bookkeeping is a transaction within its span.
    assert any(
        span.name == "store.transaction" and span.parent.span_id == attempts[0].context.span_id
        for span in spans
    )


# -- configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}, []),
    ],
)
def test_the_otel_variables_turn_tracing_on_and_off(env, exporters):
    assert exporters_from(env) == exporters


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "none,otlp"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    ],
)
def test_settings_phonebind_cannot_honour_are_refused(env):
    with pytest.raises(TracingError):
        exporters_from(env)


def test_with_tracing_off_the_chain_has_no_span_interceptor():
    def chain(tracer):
        return Chain(credentials=None, audit_log=None, run=None, metrics=None, tracer=tracer)

    assert not any(isinstance(part, ServerSpan) for part in chain(None)._inner)
    tracer = TracerProvider().get_tracer("t")
    assert isinstance(chain(tracer)._inner[-1], ServerSpan)


def test_a_server_refuses_to_start_with_an_unknown_exporter(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHONEBIND_", "OTEL_"))}
    env["OTEL_TRACES_EXPORTER"] = "zipkin"
    run = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "phonebind-server"),
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            f"sqlite:///{tmp_path}/x.db",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'" in run.stderr
