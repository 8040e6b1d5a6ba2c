"""Wiring: one phonebind server process, its store, dispatcher and health."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from phonebind.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    binding_service_pb2,
    binding_service_pb2_grpc,
    # errors.proto defines no service; loaded, reflection can describe ErrorReason.
    errors_pb2,  # noqa: F401
    review_service_pb2,
    review_service_pb2_grpc,
)

from .config import ConfigError, Settings
from .domain.audit import AuditTrail
from .domain.audit_log import AuditLog
from .domain.pii import Vault
from .domain.ports import Clock, StoreUnavailable
from .domain.rebind import RebindService
from .domain.review import ReviewDesk
from .metrics import Metrics
from .rpc.audit import AuditServicer
from .rpc.auth import Credentials
from .rpc.binding import BindingServicer
from .rpc.interceptors import ServerInterceptor
from .rpc.pagination import PageTokens
from .rpc.review import ReviewServicer
from .sms.gateways import SmsGateway, gateway_from_spec
from .sms.outbox import OutboxDispatcher
from .store.db import describe
from .store.repository import PeeweeStore

log = logging.getLogger(__name__)

# How often a process forgets request_ids past their lifetime.
HOUSEKEEPING_SECONDS = 600.0

SERVICE_NAMES = (
    binding_service_pb2.DESCRIPTOR.services_by_name["BindingService"].full_name,
    review_service_pb2.DESCRIPTOR.services_by_name["ReviewService"].full_name,
    audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
)


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class App:
    """A started server and what it owns; `stop()` drains and closes all of it."""

    server: grpc.Server
    port: int
    store: PeeweeStore
    dispatcher: OutboxDispatcher
    health: health.HealthServicer
    service: RebindService
    settings: Settings
    metrics: Metrics
    clock: Clock
    audit_log: AuditLog
    metrics_port: int = 0
    health_server: grpc.Server | None = None
    health_port: int = 0
    _stopped: threading.Event = field(default_factory=threading.Event)
    _watch: threading.Thread | None = None

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def housekeep(self) -> int:
        """Forgets request_ids older than the policy's idempotency_ttl; how many went."""
        cutoff = self.clock.now() - self.settings.policy.idempotency_ttl
        return self.store.prune_idempotency(cutoff)

    def _housekeep_quietly(self) -> None:
        try:
            self.housekeep()
        except StoreUnavailable:
            log.warning("housekeeping skipped: store unavailable")

    def _summarise_refusals_quietly(self, final: bool = False) -> None:
        try:
            self.audit_log.summarise_refusals(final=final)
        except StoreUnavailable:
            if final:  # no later try: the counts go to the log instead
                for source, refusals in self.audit_log.unsummarised_refusals():
                    log.error(
                        "refused calls not audited: store unavailable",
                        extra={"source": source, "refusals": refusals},
                    )
            else:
                log.warning("summary of refused calls not audited yet: store unavailable")

    def _watch_store(self, last: bool) -> None:
        # Pings run on one thread of their own (and its one connection); one that
        # hangs past the deadline counts as down, and later pings queue behind it
        # (on PostgreSQL the silence watch ends it a second later). Chores (pruning
        # request_ids, summarising refusals) run on another: one slowed by a lock
        # must not delay a ping and turn a healthy store NOT_SERVING.
        deadline = max(1.0, 2 * self.settings.health_interval_seconds)
        pinger = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ping")
        chores = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chores")
        pending: futures.Future[bool] | None = None
        chore: futures.Future[None] | None = None
        next_housekeeping = 0.0
        while not self._stopped.wait(self.settings.health_interval_seconds):
            if last and (chore is None or chore.done()):
                housekeeping = time.monotonic() >= next_housekeeping
                if housekeeping:
                    next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
                chore = chores.submit(self._chores, housekeeping)
            if pending is None or pending.done():
                pending = pinger.submit(self.store.ping, deadline)
            try:
                up = pending.result(timeout=deadline)
            except futures.TimeoutError:
                up = False
                self.store.reachable(False)  # silent: calls must not wait on it
            if up:
                self.store.reachable(True)
            if up != last:
                log.warning("store is %s", "reachable" if up else "unreachable")
                self.metrics.store_up.set(1 if up else 0)
                self.set_serving(up)
                last = up
        pinger.shutdown(wait=False, cancel_futures=True)
        chores.shutdown(wait=False, cancel_futures=True)

    def _chores(self, housekeeping: bool) -> None:
        if housekeeping:
            self._housekeep_quietly()
        self._summarise_refusals_quietly()

    def stop(self, grace: float | None = None) -> None:
        """Stops taking calls (health NOT_SERVING first), lets in-flight ones finish."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.settings.grace_seconds if grace is None else grace).wait()
        if self.health_server is not None:  # answered NOT_SERVING while the calls drained
            self.health_server.stop(0).wait()
        self._summarise_refusals_quietly(final=True)
        self.dispatcher.stop()
        self.store.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def _pem(name: str, path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ConfigError(f"{name}: cannot read {path}: {error.strerror}") from None


def _tls_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS; with a client CA, mutual TLS: a client certificate is required.

    The PEM files are checked here, so that a malformed one is named, instead of
    gRPC reporting a failure to bind the port."""
    certificate = _pem("tls_cert", settings.tls_cert)
    key = _pem("tls_key", settings.tls_key)
    client_ca = _pem("tls_client_ca", settings.tls_client_ca) if settings.tls_client_ca else None
    for name, path, pem in (
        ("tls_cert", settings.tls_cert, certificate),
        ("tls_client_ca", settings.tls_client_ca, client_ca),
    ):
        try:
            if pem is not None:
                x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise ConfigError(f"{name}: {path} holds no PEM certificate") from None
    try:
        serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"tls_key: {settings.tls_key} holds no unencrypted PEM private key"
        ) from None
    return grpc.ssl_server_credentials(
        [(key, certificate)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


# The health service name that answers SERVING from start until shutdown,
# whatever the store does: a liveness probe must not restart every server
# while the database is away (readiness, the name "", takes them out of
# service instead).
LIVENESS = "liveness"


def _serve_health(settings: Settings, servicer: health.HealthServicer) -> tuple[grpc.Server, int]:
    """A plaintext port serving only grpc.health.v1.Health.

    Kubernetes' gRPC probes speak neither TLS nor mutual TLS, so they cannot
    reach the service port; this port tells them the health status and nothing
    else."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
        options=[
            ("grpc.max_receive_message_length", 4096),
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ],
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(settings.health_listen)
    if port == 0:
        raise RuntimeError(f"cannot listen on {settings.health_listen}")
    server.start()
    return server, port


def create_server(
    settings: Settings,
    *,
    clock: Clock | None = None,
    gateway: SmsGateway | None = None,
    migrate: bool = False,
) -> App:
    """Builds and starts a server on settings.listen (port 0 picks a free one)."""
    clock = clock or SystemClock()
    # One connection per RPC thread, plus the SMS express threads (4), the outbox
    # loop, the health pinger and spares: a thread never waits for a connection.
    store = PeeweeStore(
        settings.database_url,
        max_connections=settings.threads + 10,
        lock_timeout=settings.store_lock_timeout_seconds,
        # A statement not waiting on a lock has no business running this long;
        # it is cut off rather than holding an RPC thread.
        statement_timeout=30.0,
    )
    if migrate:
        store.migrate()
    missing = store.pending_migrations()
    if missing:
        raise RuntimeError(
            f"the database lacks migrations {missing}; run `phonebind-server migrate`"
        )
    keys = settings.keys()
    vault = Vault(keys)
    metrics = Metrics()
    metrics.watch_outbox(lambda: store.outbox_stats(clock.now()))
    metrics.watch_connections_cut(lambda: store.silence.cut if store.silence else 0)
    dispatcher = OutboxDispatcher(
        store,
        vault,
        gateway
        or gateway_from_spec(
            settings.sms_gateway,
            http_secret=settings.http_secret(),
            http_timeout=settings.sms_http_timeout_seconds,
        ),
        clock,
        max_attempts=settings.sms_max_attempts,
        base_delay=timedelta(seconds=settings.sms_retry_base_seconds),
        max_delay=timedelta(seconds=settings.sms_retry_max_seconds),
        # A claimed batch must finish inside its 60 s lease even if every
        # delivery times out, or another dispatcher would take the rest again.
        batch=max(1, min(20, int(30 // settings.sms_http_timeout_seconds))),
        metrics=metrics,
    )
    credentials = Credentials.load(settings.credentials_file) if settings.credentials_file else None
    trail = AuditTrail(keys.audit_key)
    audit_log = AuditLog(
        store,
        trail,
        clock,
        stranger_events_per_minute=settings.unauthenticated_audit_per_minute,
    )
    service = RebindService(store, vault, settings.policy, clock, outbox=dispatcher, audit=trail)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="rpc"),
        interceptors=[
            ServerInterceptor(credentials, on_refusal=audit_log.refusal, metrics=metrics)
        ],
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_bytes),
            # Several worker processes share one port only when asked to.
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ],
    )
    page_tokens = PageTokens(keys.index_key)
    binding_service_pb2_grpc.add_BindingServiceServicer_to_server(
        BindingServicer(service, page_tokens), server
    )
    review_service_pb2_grpc.add_ReviewServiceServicer_to_server(
        ReviewServicer(
            ReviewDesk(store, settings.policy, clock, audit=trail), settings.policy, page_tokens
        ),
        server,
    )
    audit_service_pb2_grpc.add_AuditServiceServicer_to_server(
        AuditServicer(audit_log, page_tokens), server
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    if settings.tls_cert:
        port = server.add_secure_port(settings.listen, _tls_credentials(settings))
    else:
        port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise RuntimeError(f"cannot listen on {settings.listen}")
    app = App(
        server,
        port,
        store,
        dispatcher,
        health_servicer,
        service,
        settings,
        metrics,
        clock,
        audit_log,
    )
    if settings.metrics_listen:
        app.metrics_port = metrics.serve(settings.metrics_listen)
    store_up = store.ping()
    metrics.store_up.set(1 if store_up else 0)
    app.set_serving(store_up)
    health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    if settings.health_listen:
        app.health_server, app.health_port = _serve_health(settings, health_servicer)
    server.start()
    dispatcher.start()
    app._watch = threading.Thread(
        target=app._watch_store, args=(store_up,), name="health", daemon=True
    )
    app._watch.start()
    log.info(
        "phonebind serving",
        extra={
            "port": port,
            "database": describe(settings.database_url),
            "sms_gateway": settings.sms_gateway.split(":", 1)[0],
            "dev": settings.dev,
        },
    )
    return app
