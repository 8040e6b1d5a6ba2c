"""Prometheus metrics: calls, latency, codes sent, failures, outbox, refusals.

RPCs are counted under the names stock gRPC dashboards read
(`grpc_server_started_total`, `grpc_server_handled_total`,
`grpc_server_handling_seconds`, labelled grpc_type, grpc_service, grpc_method
and grpc_code as go-grpc-prometheus and py-grpc-prometheus do), and by
phonebind's own outcome (the ErrorInfo reason) in `phonebind_rpcs_total`.
The standard process, platform and garbage-collector collectors are
registered too. Each server process has its own registry and endpoint
(`--metrics-listen`); with several workers, worker i serves on the configured
port + i, so every process can be scraped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

# Outcomes of a verification that failed, and refusals of rate and cooldown limits.
VERIFICATION_FAILURES = frozenset({"CODE_MISMATCH", "IDENTITY_MISMATCH", "REBIND_LOCKED"})
LIMIT_REFUSALS = frozenset({"RATE_LIMITED", "RESEND_TOO_SOON", "ACCOUNT_LOCKED"})

# grpc.StatusCode names as gRPC's own metrics spell them.
_GRPC_CODES = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}

Observer = Callable[[str, str, float], None]


class _OutboxCollector(Collector):
    """Reads the outbox depth and the age of its oldest message at scrape time only."""

    def __init__(self, read: Callable[[], tuple[int, float]]) -> None:
        self._read = read

    def describe(self):
        # Registration asks for the names here, not through collect(): no store read.
        yield GaugeMetricFamily("phonebind_outbox_pending", "")
        yield GaugeMetricFamily("phonebind_outbox_oldest_age_seconds", "")

    def collect(self):
        try:
            depth, age = self._read()
        except Exception:  # noqa: BLE001 - a scrape must not fail with the store down
            return
        yield GaugeMetricFamily(
            "phonebind_outbox_pending", "SMS waiting in the outbox for delivery", value=depth
        )
        yield GaugeMetricFamily(
            "phonebind_outbox_oldest_age_seconds",
            "Age of the oldest undelivered SMS (0 when none)",
            value=age,
        )


class _StoreCollector(Collector):
    """Statements and round trips to the database, by RPC (read at scrape time)."""

    def __init__(self, read: Callable[[], tuple[dict[str, int], dict[str, int]]]) -> None:
        self._read = read

    def describe(self):
        yield CounterMetricFamily("phonebind_store_statements", "", labels=["method"])
        yield CounterMetricFamily("phonebind_store_round_trips", "", labels=["method"])

    def collect(self):
        statements, round_trips = self._read()
        for name, counts, help_text in (
            ("phonebind_store_statements", statements, "SQL statements sent, by RPC"),
            ("phonebind_store_round_trips", round_trips, "Round trips to the database, by RPC"),
        ):
            family = CounterMetricFamily(name, help_text, labels=["method"])
            for method, value in sorted(counts.items()):
                family.add_metric([method or "internal"], value)
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        for standard in (ProcessCollector, PlatformCollector, GCCollector):
            standard(registry=self.registry)
        self.started = Counter(
            "grpc_server_started",
            "RPCs started on the server",
            ["grpc_type", "grpc_service", "grpc_method"],
            registry=self.registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by gRPC status code",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry=self.registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time the server took to handle an RPC, by method",
            ["grpc_type", "grpc_service", "grpc_method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.rpcs = Counter(
            "phonebind_rpcs",
            "RPCs handled, by method and outcome (OK or the error reason)",
            ["method", "outcome"],
            registry=self.registry,
        )
        self.verification_failures = Counter(
            "phonebind_verification_failures",
            "Wrong codes and identity answers, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.limit_refusals = Counter(
            "phonebind_limit_refusals",
            "Calls refused by a rate limit, cooldown or lockout, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.sms_sent = Counter(
            "phonebind_sms_delivered",
            "SMS handed to the gateway, by purpose (REBIND_CODE counts codes sent)",
            ["purpose"],
            registry=self.registry,
        )
        self.sms_failed = Counter(
            "phonebind_sms_failures",
            "Failed SMS deliveries, by purpose and whether the message was dead-lettered",
            ["purpose", "dead"],
            registry=self.registry,
        )
        self.store_up = Gauge(
            "phonebind_store_up",
            "1 while the health check reaches the database, 0 while it does not",
            registry=self.registry,
        )
        self.store_connections_cut = Counter(
            "phonebind_store_connections_cut",
            "Database connections shut because a statement went unanswered past its deadline",
            registry=self.registry,
        )

    def watch_outbox(self, read: Callable[[], tuple[int, float]]) -> None:
        self.registry.register(_OutboxCollector(read))

    def watch_store(self, read: Callable[[], tuple[dict[str, int], dict[str, int]]]) -> None:
        self.registry.register(_StoreCollector(read))

    def rpc_observer(self, method: str) -> Observer:
        """Records one RPC of `method` ("/pkg.Service/Method"): its outcome (OK or
        the ErrorInfo reason), its gRPC status name and how long it took."""
        service, _, name = method.strip("/").rpartition("/")
        labels = ("unary", service, name)
        started = self.started.labels(*labels)
        handling = self.handling.labels(*labels)
        children: dict[tuple[str, str], tuple[Any, Any]] = {}

        def observe(outcome: str, status: str, seconds: float) -> None:
            pair = children.get((outcome, status))
            if pair is None:  # labels() is a locked lookup: each child is kept once made
                pair = (
                    self.handled.labels(*labels, _GRPC_CODES.get(status, status)),
                    self.rpcs.labels(method, outcome),
                )
                children[(outcome, status)] = pair
            started.inc()
            handling.observe(seconds)
            pair[0].inc()
            pair[1].inc()
            if outcome in VERIFICATION_FAILURES:
                self.verification_failures.labels(outcome).inc()
            elif outcome in LIMIT_REFUSALS:
                self.limit_refusals.labels(outcome).inc()

        return observe

    def serve(self, address: str) -> int:
        """Starts the HTTP endpoint on HOST:PORT; returns the port."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry
        )
        return server.server_port
