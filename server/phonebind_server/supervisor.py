"""`serve --workers N`: N server processes sharing one port (SO_REUSEPORT).

A supervisor process starts the workers, passes signals on, restarts a worker
that dies, and stops when one cannot start. Each worker is a fresh
interpreter (spawn) that builds its own event loop, server and database
connections after it starts, so no gRPC or database state crosses a fork.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time

from . import logs
from .config import Settings

log = logging.getLogger("phonebind.supervisor")


def supervise(settings: Settings, *, migrate: bool) -> int:
    """Checks the port, migrates if asked, then runs the workers until told to stop."""
    if settings.listen.rsplit(":", 1)[-1] == "0":
        print("phonebind-server: several workers need a fixed port", file=sys.stderr)
        return 2
    # Workers share the port with SO_REUSEPORT, which would also let them join
    # listeners already there (another deployment, perhaps on another database).
    if problem := _port_taken(settings.listen):
        print(f"phonebind-server: cannot listen on {settings.listen}: {problem}", file=sys.stderr)
        return 2
    if migrate:
        from .domain.pii import Vault
        from .store.store import Store

        Store(settings.database_url).migrate(
            settings.audit_keys_and_active, lambda: Vault(settings.keys())
        )
    return _supervise(settings)


def _port_taken(listen: str) -> str:
    """Why `listen` cannot be bound by this process alone, or "" when it can.

    Every address the host resolves to is probed, as gRPC binds them all. Like
    gRPC, the probe sets SO_REUSEADDR, so connections of a stopped server still
    in TIME_WAIT do not count; a socket listening there does.
    """
    host, _, port = listen.rpartition(":")
    # The probe binds where the server itself will.
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104  # nosec B104
    try:
        addresses = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        for family, kind, protocol, _, address in addresses:
            with socket.socket(family, kind, protocol) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
    except OSError as error:
        return error.strerror or str(error)
    return ""


def _worker(settings: Settings, index: int) -> None:
    from .cli import hold_reloads, serve_one

    # A reload passed on while the worker starts must not end it.
    hold_reloads()
    logs.configure(settings.log_level, worker=index, pid=os.getpid())
    parent = multiprocessing.parent_process()
    if parent is not None:
        # A worker outlives a supervisor killed with SIGKILL; it drains and exits.
        threading.Thread(
            target=_drain_when_gone, args=(parent.sentinel,), name="parent", daemon=True
        ).start()
    sys.exit(serve_one(settings, migrate=False))


def _drain_when_gone(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    log.error("the supervisor is gone; draining")
    os.kill(os.getpid(), signal.SIGTERM)


# A worker that ends within this many seconds of its start failed to start, and
# waits before its next start: twice as long after each such failure, at most the cap.
STARTUP_SECONDS = 10.0
RESTART_DELAY_SECONDS = 0.5
RESTART_DELAY_CAP_SECONDS = 30.0


def _supervise(settings: Settings) -> int:
    """Runs `workers` server processes on one port; restarts one that dies.

    Each worker is a fresh interpreter (spawn), so no gRPC or database state
    crosses a fork. SIGTERM is passed on, and the supervisor waits for every
    worker to drain. A worker that cannot start (exit code 2: its settings, the
    schema, a port) is not restarted: the supervisor stops the others and exits
    with that code, so that systemd or Kubernetes see the failure. A worker that
    dies otherwise is restarted, after a delay that doubles while it keeps
    failing at start (a database that refuses new connections), and the other
    workers go on serving meanwhile. SIGHUP is passed on to every worker, each
    of which re-reads the credentials and TLS files (App.reload).
    """
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    workers: list[multiprocessing.process.BaseProcess] = []
    started_at = [0.0] * settings.workers
    failed_starts = [0] * settings.workers
    restart_at: dict[int, float] = {}

    def spawn(index: int) -> multiprocessing.process.BaseProcess:
        own = settings
        if settings.metrics_listen:
            host, _, port = settings.metrics_listen.rpartition(":")
            own = dataclasses.replace(settings, metrics_listen=f"{host}:{int(port) + index}")
        process = context.Process(
            target=_worker, args=(own, index), name=f"phonebind-worker-{index}"
        )
        process.start()
        started_at[index] = time.monotonic()
        return process

    draining: list[multiprocessing.process.BaseProcess] = []

    def stop(signum: int, _frame: object) -> None:
        log.info("draining workers", extra={"signal": signal.Signals(signum).name})
        stopping.set()
        for process in workers:
            if process.is_alive() and process.pid is not None:
                draining.append(process)
                os.kill(process.pid, signal.SIGTERM)

    def reload(signum: int, _frame: object) -> None:
        log.info("reloading workers", extra={"signal": "SIGHUP"})
        for process in workers:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    workers.extend(spawn(index) for index in range(settings.workers))
    outcome = 0
    while not stopping.is_set():
        for index, process in enumerate(workers):
            if process.is_alive() or stopping.is_set():
                continue
            if process.exitcode == 2:
                log.error("worker cannot start; stopping", extra={"exitcode": 2})
                outcome = 2
                stop(signal.SIGTERM, None)
                break
            now = time.monotonic()
            if index not in restart_at:
                lived = now - started_at[index]
                failed_starts[index] = failed_starts[index] + 1 if lived < STARTUP_SECONDS else 0
                delay = min(
                    RESTART_DELAY_CAP_SECONDS,
                    RESTART_DELAY_SECONDS * 2 ** max(0, failed_starts[index] - 1),
                )
                restart_at[index] = now + (delay if failed_starts[index] else 0.0)
                log.error(
                    "worker died, restarting",
                    extra={
                        "worker": index,
                        "pid": process.pid,
                        "exitcode": process.exitcode,
                        "failed_starts": failed_starts[index],
                    },
                )
            if now >= restart_at[index]:
                del restart_at[index]
                workers[index] = spawn(index)
        stopping.wait(0.25)
    for process in workers:
        process.join(settings.grace_seconds + 5)
    # A worker told to drain that had to end with calls still running (or did not
    # end): systemd and Kubernetes should not see a clean stop. A worker that had
    # died before, and waited for its restart, was not draining.
    if outcome == 0 and any(process.exitcode != 0 for process in draining):
        log.error(
            "a worker did not drain cleanly",
            extra={"exitcodes": [process.exitcode for process in draining]},
        )
        outcome = 1
    return outcome
