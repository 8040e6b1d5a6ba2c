"""Prometheus metrics: calls, latency, codes sent, failures, outbox, refusals.

Each server process has its own registry and endpoint (`--metrics-listen`);
with several workers, worker i serves on the configured port + i, so every
process can be scraped. Names are prefixed `phonebind_`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Outcomes of a verification that failed, and refusals of rate and cooldown limits.
VERIFICATION_FAILURES = frozenset({"CODE_MISMATCH", "IDENTITY_MISMATCH", "REBIND_LOCKED"})
LIMIT_REFUSALS = frozenset({"RATE_LIMITED", "RESEND_TOO_SOON", "ACCOUNT_LOCKED"})


class _OutboxCollector(Collector):
    """Reads the outbox depth and the age of its oldest message at scrape time only."""

    def __init__(self, read: Callable[[], tuple[int, float]]) -> None:
        self._read = read

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


class _ConnectionsCutCollector(Collector):
    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read

    def collect(self):
        yield CounterMetricFamily(
            "phonebind_store_connections_cut",
            "Database connections shut because a statement went unanswered past its deadline",
            value=self._read(),
        )


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpcs = Counter(
            "phonebind_rpcs",
            "RPCs handled, by method and outcome (OK or the error reason)",
            ["method", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "phonebind_rpc_duration_seconds",
            "RPC handling time, by method and gRPC status",
            ["method", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
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

    def watch_outbox(self, read: Callable[[], tuple[int, float]]) -> None:
        self.registry.register(_OutboxCollector(read))

    def watch_connections_cut(self, read: Callable[[], int]) -> None:
        self.registry.register(_ConnectionsCutCollector(read))

    def observe_rpc(self, method: str, outcome: str, status: str, seconds: float) -> None:
        key = (method, outcome, status)
        children = self._children.get(key)
        if children is None:  # labels() is a locked lookup; keep the children once made
            children = (self.rpcs.labels(method, outcome), self.latency.labels(method, status))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if outcome in VERIFICATION_FAILURES:
            self.verification_failures.labels(outcome).inc()
        elif outcome in LIMIT_REFUSALS:
            self.limit_refusals.labels(outcome).inc()

    def serve(self, address: str) -> int:
        """Starts the HTTP endpoint on HOST:PORT; returns the port."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry
        )
        return server.server_port
