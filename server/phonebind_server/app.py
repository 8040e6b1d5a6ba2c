"""Wiring: one phonebind server process on grpc.aio, its store, dispatcher and health."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from phonebind.v1 import (
    audit_service_pb2,
    binding_service_pb2,
    # errors.proto defines no service; loaded, reflection can describe ErrorReason.
    errors_pb2,  # noqa: F401
    review_service_pb2,
)

from .config import ConfigError, Settings, sms_test_numbers
from .domain.audit import AuditTrail
from .domain.audit_log import AuditLog
from .domain.pii import KeyMismatch, Vault, key_checks
from .domain.ports import Clock, StoreUnavailable
from .domain.rebind import RebindService
from .domain.review import ReviewDesk
from .metrics import Metrics
from .rpc.audit import AuditServicer
from .rpc.auth import Credentials, CredentialsError
from .rpc.binding import BindingServicer
from .rpc.interceptors import Chain
from .rpc.pagination import PageTokens
from .rpc.review import ReviewServicer
from .rpc.services import register
from .sms.gateways import SmsGateway, gateway_from_spec
from .sms.outbox import OutboxDispatcher
from .store.engine import Answer
from .store.store import Store, describe
from .tracing import Tracing

log = logging.getLogger(__name__)

# How often a process forgets request_ids past their lifetime.
HOUSEKEEPING_SECONDS = 600.0

SERVICES = (
    binding_service_pb2.DESCRIPTOR.services_by_name["BindingService"],
    review_service_pb2.DESCRIPTOR.services_by_name["ReviewService"],
    audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"],
)
SERVICE_NAMES = tuple(service.full_name for service in SERVICES)


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class App:
    """A started server and what it owns; `stop()` drains and closes all of it."""

    server: grpc.aio.Server
    port: int
    store: Store
    dispatcher: OutboxDispatcher
    health: health.aio.HealthServicer
    service: RebindService
    settings: Settings
    metrics: Metrics
    clock: Clock
    audit_log: AuditLog
    chain: Chain
    metrics_port: int = 0
    health_server: grpc.aio.Server | None = None
    health_port: int = 0
    tls: TlsFiles | None = None
    tracing: Tracing | None = None
    # False when calls were still running as the drain's grace ran out.
    drained: bool = True
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def housekeep(self) -> int:
        """Forgets request_ids older than the policy's idempotency_ttl; how many went."""
        cutoff = self.clock.now() - self.settings.policy.idempotency_ttl
        return await self.store.run(self.store.prune_idempotency, cutoff)

    async def _summarise_refusals(self, final: bool = False) -> None:
        try:
            await self.store.run(self.audit_log.summarise_refusals, final=final)
        except StoreUnavailable:
            if final:  # no later try: the counts go to the log instead
                for source, refusals in self.audit_log.unsummarised_refusals():
                    log.error(
                        "refused calls not audited: store unavailable",
                        extra={"source": source, "refusals": refusals},
                    )
            else:
                log.warning("summary of refused calls not audited yet: store unavailable")

    async def _watch_store(self, last: bool) -> None:
        # A ping unanswered by its deadline counts as down; meanwhile calls
        # answer STORE_UNAVAILABLE at once instead of waiting on the database.
        interval = self.settings.health_interval_seconds
        deadline = max(1.0, 2 * interval)
        while not self._stopped.is_set():
            try:
                await asyncio.wait_for(self._stopped.wait(), interval)
                return
            except TimeoutError:
                pass
            answer = await self.store.ping(deadline)
            up = answer is Answer.UP
            self.store.reachable(answer is not Answer.SILENT)
            if up != last:
                log.warning("store is %s", "reachable" if up else "unreachable")
                self.metrics.store_up.set(1 if up else 0)
                await self.set_serving(up)
                if up:
                    await self.store.recovered()
                last = up

    async def _chores(self) -> None:
        # Chores (pruning request_ids, summarising refusals) run beside the
        # health ping: one slowed by a lock must not delay a ping.
        next_housekeeping = 0.0
        while not self._stopped.is_set():
            try:
                await asyncio.wait_for(self._stopped.wait(), self.settings.health_interval_seconds)
                return
            except TimeoutError:
                pass
            if time.monotonic() >= next_housekeeping:
                next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
                try:
                    await self.housekeep()
                except StoreUnavailable:
                    log.warning("housekeeping skipped: store unavailable")
            await self._summarise_refusals()

    async def stop(self, grace: float | None = None) -> bool:
        """Stops taking calls (health NOT_SERVING first) and lets in-flight ones
        finish for `grace` seconds (grace_seconds); whether they all did. Calls
        still running then are cut for their callers; their work is left to
        the process's exit, which rolls it back."""
        if self._stopped.is_set():
            return self.drained
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_seconds if grace is None else grace)
        if self.health_server is not None:  # answered NOT_SERVING while the calls drained
            await self.health_server.stop(0)
        if self.chain.in_flight:  # a call cut at this very moment may still be ending
            await asyncio.sleep(0.1)
            self.drained = self.chain.in_flight == 0
        for task in self._tasks:
            task.cancel()
        await self._summarise_refusals(final=True)
        await self.dispatcher.stop()
        if self.drained:
            await self.store.close()
        if self.tracing is not None:
            # Exporting the last spans may wait on the collector: not on the loop.
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)
        return self.drained

    def reload(self) -> bool:
        """Re-reads the credentials file and the TLS files (on SIGHUP); whether
        the new ones are in force.

        Everything is read and checked before anything changes, so a bad file
        leaves the whole configuration in force as it was. Calls under way
        finish as they started; the next call is authenticated against the new
        callers, and the next connection gets the new certificate (connections
        already open keep theirs)."""
        settings = self.settings
        try:
            credentials = load_credentials(settings)
            tls = self.tls.read() if self.tls is not None else None
        except (CredentialsError, ConfigError) as error:
            log.error(
                "reload refused; the configuration in force stays", extra={"error": str(error)}
            )
            return False
        if credentials is not None:
            self.chain.credentials = credentials
        if tls is not None and self.tls is not None:
            self.tls.use(tls)
        log.warning(
            "reloaded",
            extra={
                "callers": credentials.callers if credentials is not None else 0,
                "tls": self.tls is not None,
            },
        )
        return True

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def _pem(name: str, path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ConfigError(f"{name}: cannot read {path}: {error.strerror}") from None


def load_credentials(settings: Settings) -> Credentials | None:
    """The callers of the credentials file (None without one: development mode).

    A caller known by its certificate's subject needs mutual TLS: without a
    client CA no client certificate is asked for, and such a caller could
    never be recognised."""
    if not settings.credentials_file:
        return None
    credentials = Credentials.load(settings.credentials_file)
    if credentials.certificate_callers and not settings.tls_client_ca:
        raise CredentialsError(
            f"callers {', '.join(credentials.certificate_callers)} have a cert_subject,"
            " which needs tls_client_ca (mutual TLS)"
        )
    return credentials


def tls_configuration(settings: Settings) -> tuple[grpc.ServerCertificateConfiguration, bool]:
    """The certificate, key and client CA read from their files, and whether a
    client certificate is required (with a client CA: mutual TLS).

    The PEM files are checked here, so that a malformed one is named, instead of
    gRPC reporting a failure to bind the port (or, on a reload, a failure of
    every later handshake)."""
    certificate = _pem("tls_cert", settings.tls_cert)
    key = _pem("tls_key", settings.tls_key)
    client_ca = _pem("tls_client_ca", settings.tls_client_ca) if settings.tls_client_ca else None
    chains = {}
    for name, path, pem in (
        ("tls_cert", settings.tls_cert, certificate),
        ("tls_client_ca", settings.tls_client_ca, client_ca),
    ):
        try:
            if pem is not None:
                chains[name] = x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise ConfigError(f"{name}: {path} holds no PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"tls_key: {settings.tls_key} holds no unencrypted PEM private key"
        ) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if chains["tls_cert"][0].public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != private_key.public_key().public_bytes(serialization.Encoding.DER, public):
        raise ConfigError(
            f"tls_key: {settings.tls_key} is not the key of the certificate in {settings.tls_cert}"
        )
    configuration = grpc.ssl_server_certificate_configuration(
        [(key, certificate)], root_certificates=client_ca
    )
    return configuration, client_ca is not None


class TlsFiles:
    """The server's TLS credentials, re-read from their files on a reload.

    gRPC asks `_fetch` for a new configuration before each handshake, from its
    own threads: a reload hands it one already read and checked, and
    connections made before keep theirs. Whether a client certificate is
    required is fixed when the server starts."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._initial, self.mutual = tls_configuration(settings)
        self._next: grpc.ServerCertificateConfiguration | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.mutual
        )

    def read(self) -> grpc.ServerCertificateConfiguration:
        """The files as they are now, checked; ConfigError when they are not usable."""
        configuration, mutual = tls_configuration(self._settings)
        if mutual != self.mutual:  # cannot happen while the paths stay the same
            raise ConfigError("a reload cannot switch mutual TLS on or off")
        return configuration

    def use(self, configuration: grpc.ServerCertificateConfiguration) -> None:
        """New handshakes use `configuration` from now on."""
        self._next = configuration

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # None keeps the configuration in use. Two threads asking at once may
        # both get the new one: installing it twice does no harm.
        configuration, self._next = self._next, None
        return configuration


# The health service name that answers SERVING from start until shutdown,
# whatever the store does: a liveness probe must not restart every server
# while the database is away (readiness, the name "", takes them out of
# service instead).
LIVENESS = "liveness"


async def _serve_health(
    settings: Settings, servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """A plaintext port serving only grpc.health.v1.Health.

    Kubernetes' gRPC probes speak neither TLS nor mutual TLS, so they cannot
    reach the service port; this port tells them the health status and nothing
    else."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 4096),
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ],
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(settings.health_listen)
    if port == 0:
        raise RuntimeError(f"cannot listen on {settings.health_listen}")
    await server.start()
    return server, port


async def create_server(
    settings: Settings,
    *,
    clock: Clock | None = None,
    gateway: SmsGateway | None = None,
    migrate: bool = False,
    tracing: Tracing | None = None,
) -> App:
    """Builds and starts a server on settings.listen (port 0 picks a free one).
    With `tracing`, calls, store transactions and SMS deliveries make spans;
    `stop()` exports the last ones and shuts it down."""
    clock = clock or SystemClock()
    credentials = load_credentials(settings)
    store = Store(
        settings.database_url,
        max_connections=settings.store_connections,
        lock_timeout=settings.store_lock_timeout_seconds,
        # A statement not waiting on a lock has no business running this long.
        statement_timeout=30.0,
        prepared_statements=settings.store_prepared_statements,
        session_settings=settings.store_session_settings,
    )
    if migrate:
        store.migrate(settings.audit_keys_and_active, lambda: Vault(settings.keys()))
    missing = store.pending_migrations()
    if missing:
        raise RuntimeError(
            f"the database lacks migrations {missing}; run `phonebind-server migrate`"
        )
    await store.open()
    keys = settings.keys()
    mismatched = await store.run(store.check_keys, key_checks(keys), clock.now())
    if mismatched:
        await store.close()
        raise KeyMismatch(mismatched)
    vault = Vault(keys)
    metrics = Metrics()
    loop = asyncio.get_running_loop()

    def outbox_stats() -> tuple[int, float]:
        # Scrapes come on the metrics server's own thread; the store lives on the loop.
        future = asyncio.run_coroutine_threadsafe(store.run(store.outbox_stats, clock.now()), loop)
        return future.result(timeout=5)

    metrics.watch_outbox(outbox_stats)
    metrics.watch_store(lambda: (dict(store.statements), dict(store.round_trips)))
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
        tracer=tracing.tracer if tracing is not None else None,
    )
    store.tracer = tracing.tracer if tracing is not None else None
    store.on_commit = dispatcher.express
    store.on_commit_unknown = dispatcher.commit_unknown
    store.on_connection_cut = metrics.store_connections_cut.inc
    trail = AuditTrail(keys.audit_keys, keys.audit_key_id)
    audit_log = AuditLog(
        store,
        trail,
        clock,
        stranger_events_per_minute=settings.unauthenticated_audit_per_minute,
    )
    test_numbers = sms_test_numbers(settings)
    if test_numbers:
        log.warning(
            "%d test numbers get fixed codes and no SMS (sms_test_numbers)", len(test_numbers)
        )
    service = RebindService(
        store,
        vault,
        settings.policy,
        clock,
        trail,
        test_codes={
            index: code
            for e164, code in test_numbers.items()
            for index in vault.phone_indexes(e164)
        },
    )
    page_tokens = PageTokens(keys.index_key)

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_bytes),
            # Several worker processes share one port only when asked to.
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ],
    )
    chain = Chain(
        credentials=credentials,
        audit_log=audit_log,
        run=store.run,
        metrics=metrics,
        tracer=tracing.tracer if tracing is not None else None,
    )
    binding, review, audit = SERVICES
    register(server, binding, BindingServicer(service, page_tokens, store.run), chain)
    register(
        server,
        review,
        ReviewServicer(
            ReviewDesk(store, settings.policy, clock, trail),
            settings.policy,
            page_tokens,
            store.run,
        ),
        chain,
    )
    register(server, audit, AuditServicer(audit_log, page_tokens, store.run), chain)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    tls = TlsFiles(settings) if settings.tls_cert else None
    if tls is not None:
        port = server.add_secure_port(settings.listen, tls.credentials())
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
        chain,
        tls=tls,
        tracing=tracing,
    )
    if settings.metrics_listen:
        app.metrics_port = metrics.serve(settings.metrics_listen)
    store_up = await store.ping(max(1.0, 2 * settings.health_interval_seconds)) is Answer.UP
    metrics.store_up.set(1 if store_up else 0)
    await app.set_serving(store_up)
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    if settings.health_listen:
        app.health_server, app.health_port = await _serve_health(settings, health_servicer)
    await server.start()
    dispatcher.start()
    app._tasks = [
        asyncio.create_task(app._watch_store(store_up), name="health"),
        asyncio.create_task(app._chores(), name="chores"),
    ]
    if settings.dev:
        log.warning(
            "DEVELOPMENT MODE (--dev): %s; development keys where none are set; reflection on;"
            " migrations on start. Never run it where anyone else can reach the port",
            "callers from credentials_file"
            if credentials is not None
            else "ANYONE who reaches the port is a caller with every role",
            extra={"dev": True},
        )
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
