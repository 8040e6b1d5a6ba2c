"""phonebind-server: the gRPC server and the commands that operate it."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from datetime import timedelta

from . import logs
from .config import (
    FILE_SETTINGS,
    SECRET_SETTINGS,
    ConfigError,
    Settings,
    check,
    env_name,
    format_duration,
    load,
    origins,
    shown,
)
from .domain.policy import Policy
from .domain.ports import StoreUnavailable
from .rpc.auth import ROLES, CredentialsError, check_caller_name, new_token, token_digest

log = logging.getLogger("phonebind.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phonebind-server", description=__doc__)
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", help="TOML file with [server] and [policy] tables")
        sub.add_argument(
            "--database-url",
            dest="database_url",
            help="sqlite:////abs/path.db or postgresql://user@host:port/db",
        )
        sub.add_argument("--log-level", dest="log_level")
        sub.add_argument(
            "--dev",
            action="store_const",
            const=True,
            help="development mode: reflection on, development keys, file/log gateways",
        )

    migrate = commands.add_parser(
        "migrate",
        help="apply pending schema migrations; `migrate status` lists them",
        description="Applies pending schema migrations. `migrate status` lists applied and"
        " pending ones instead and exits 1 while any is pending, to gate a deployment.",
    )
    migrate.add_argument(
        "migrate_action", nargs="?", choices=("status",), help="only report, change nothing"
    )
    common(migrate)

    token = commands.add_parser(
        "token", help="make a caller token and print its credentials-file entry"
    )
    token.add_argument("--name", required=True, help="the caller's name")
    token.add_argument(
        "--roles", required=True, help="comma-separated: " + ", ".join(sorted(ROLES))
    )

    certs = commands.add_parser(
        "dev-certs", help="write a development CA, server and client certificates"
    )
    certs.add_argument("directory")
    certs.add_argument(
        "--clients", default="dev-client", help="comma-separated client certificate names"
    )

    rotate = commands.add_parser(
        "rotate-keys",
        help="re-encrypt every sealed number under active_seal_key, in small transactions",
    )
    common(rotate)
    rotate.add_argument("--batch", type=_positive, default=500, help="rows per transaction")

    audit = commands.add_parser("audit", help="the audit trail")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="recompute every audit chain; exit 1 when any is broken"
    )
    common(verify)
    verify.add_argument("--account-id", dest="account_id", help="only this account's chain")

    serve = commands.add_parser("serve", help="run the gRPC server")
    common(serve)
    _serve_options(serve)
    serve.add_argument(
        "--migrate",
        action="store_const",
        const=True,
        help="apply pending migrations before serving (always on with --dev)",
    )

    config = commands.add_parser("config", help="the effective settings")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser(
        "show",
        help="print the effective settings, secrets redacted, and where each came from",
        description="Prints the settings `serve` would run with, as TOML, secrets redacted,"
        " each with where it came from. Exits 1 when `serve` would refuse them.",
    )
    common(show)
    _serve_options(show)

    _describe_settings(
        {
            "migrate": (migrate, ("database_url", "log_level")),
            "rotate-keys": (rotate, ("database_url", "log_level", "seal_keys", "active_seal_key")),
            "audit verify": (verify, ("database_url", "log_level", "audit_key")),
            "serve": (serve, None),
            "config show": (show, None),
        }
    )
    return parser


def _serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--listen", help=f"HOST:PORT (default {Settings.listen})")
    serve.add_argument(
        "--sms-gateway", dest="sms_gateway", help="https://… (provider webhook), file:PATH or log"
    )
    serve.add_argument("--threads", type=int, help="RPC worker threads per process")
    serve.add_argument(
        "--workers", type=int, help="server processes sharing the port (SO_REUSEPORT)"
    )
    serve.add_argument(
        "--metrics-listen",
        dest="metrics_listen",
        help="HOST:PORT of the Prometheus endpoint (worker i uses PORT+i)",
    )
    serve.add_argument(
        "--reflection", action="store_const", const=True, help="enable server reflection"
    )
    serve.add_argument(
        "--health-listen",
        dest="health_listen",
        help="HOST:PORT of a plaintext port serving only the gRPC health service (probes)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "token":
        return _token(args.name, args.roles)
    if args.command == "dev-certs":
        from .devcerts import write_dev_certs

        for path in write_dev_certs(args.directory, tuple(args.clients.split(","))):
            print(path)
        return 0
    flags = {
        k: v
        for k, v in vars(args).items()
        if k
        not in (
            *("command", "migrate", "audit_command", "account_id", "batch"),
            *("migrate_action", "config_command"),
        )
    }
    try:
        settings = load(flags, serving=args.command == "serve")
    except ConfigError as error:
        print(f"phonebind-server: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    try:
        if args.command == "config":
            return _config_show(settings, flags)
        if args.command == "migrate" and args.migrate_action == "status":
            return _migrate_status(settings)
        if args.command == "migrate":
            return _migrate(settings)
        if args.command == "rotate-keys":
            return _rotate_keys(settings, args.batch)
        if args.command == "audit":
            return _audit_verify(settings, args.account_id or "")
        return _serve(settings, migrate=bool(getattr(args, "migrate", False) or settings.dev))
    except ConfigError as error:  # a tool that needs keys the settings lack
        print(f"phonebind-server: {error}", file=sys.stderr)
        return 2
    except StoreUnavailable as error:
        return _unreachable(error)


def _unreachable(error: StoreUnavailable) -> int:
    print(f"phonebind-server: the database is unreachable ({error})", file=sys.stderr)
    return 1


def _migrate(settings: Settings) -> int:
    from .store.repository import PeeweeStore

    store = PeeweeStore(settings.database_url)
    try:
        applied = store.migrate()
    finally:
        store.close()
    print(f"applied migrations: {applied or 'none pending'}")
    return 0


# -- operator commands: --version, migrate status, config show, settings in --help -----


def version_text() -> str:
    from .store.migrate import expected_version

    try:
        version = importlib.metadata.version("phonebind-server")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        version = "unknown"
    return f"phonebind-server {version} (database schema {expected_version()})"


class _Version(argparse.Action):
    """--version, worked out only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **_: object) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="print the version and the database schema version it needs, and exit",
        )

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit()


def _default_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, tuple):
        return ",".join(value)
    if value == "":
        return "unset"
    return str(value)


def settings_help(names: Sequence[str] | None) -> str:
    """The environment variables of `names` (None: every setting), with defaults."""
    defaults = Settings()
    server = [f.name for f in dataclasses.fields(Settings) if f.name != "policy"]
    rows = [("PHONEBIND_CONFIG", "TOML file of [server] and [policy] keys, as --config")]
    for name in server if names is None else names:
        variable = env_name(name)
        if name in FILE_SETTINGS:
            variable += "[_FILE]"
        default = _default_text(getattr(defaults, name))
        secret = " (secret)" if name in SECRET_SETTINGS else ""
        rows.append((variable, f"default {default}{secret}"))
    if names is None:
        for item in dataclasses.fields(Policy):
            default = _default_text(getattr(defaults.policy, item.name))
            rows.append((env_name(item.name, policy=True), f"default {default}"))
    width = max(len(variable) for variable, _ in rows) + 2
    lines = [
        *textwrap.wrap(
            "environment (a flag wins over it, and it over the --config file, whose [server]"
            " and [policy] keys are these names in lower case without PHONEBIND_ and"
            " POLICY_; NAME_FILE, or name_file in the file, reads a value from a file):",
            width=78,
        ),
        *(f"  {variable.ljust(width)}{text}" for variable, text in rows),
    ]
    return "\n".join(lines)


class _HelpFormatter(argparse.HelpFormatter):
    """Keeps the lines of a text that has several (the settings table); fills the rest."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _describe_settings(
    commands: dict[str, tuple[argparse.ArgumentParser, Sequence[str] | None]],
) -> None:
    for parser, names in commands.values():
        parser.epilog = settings_help(names)
        parser.formatter_class = _HelpFormatter


def _migrate_status(settings: Settings) -> int:
    from .store.migrate import available, expected_version
    from .store.repository import PeeweeStore

    path = settings.database_url.removeprefix("sqlite:///")
    if path != settings.database_url and not os.path.exists(path):  # opening would create it
        print(f"phonebind-server: no database at {path}", file=sys.stderr)
        return 1
    store = PeeweeStore(settings.database_url)
    try:
        applied = {version: (name, when) for version, name, when in store.migration_history()}
    finally:
        store.close()
    known = dict(available())
    pending = [version for version in known if version not in applied]
    for version in sorted(known.keys() | applied.keys()):
        if version in applied:
            name, when = applied[version]
            state = "applied" if version in known else "applied, unknown to this version"
            print(f"{version:04d} {name:32} {state} {when.isoformat(timespec='seconds')}")
        else:
            print(f"{version:04d} {known[version]:32} pending")
    newest = max(applied, default=0)
    print(
        f"database schema {newest}, this version needs {expected_version()}: {len(pending)} pending"
    )
    return 1 if pending else 0


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, timedelta):
        return json.dumps(format_duration(value))
    if isinstance(value, tuple):
        return json.dumps(list(value), ensure_ascii=False)
    return json.dumps(str(value), ensure_ascii=False)


def _config_show(settings: Settings, flags: dict[str, object]) -> int:
    sources = origins(settings, flags)
    print("# the settings `phonebind-server serve` would run with; secrets redacted")
    print("[server]")
    for item in dataclasses.fields(Settings):
        if item.name != "policy":
            value = shown(item.name, getattr(settings, item.name))
            print(f"{item.name} = {_toml_value(value)}  # {sources[item.name]}")
    print()
    print("[policy]")
    for item in dataclasses.fields(Policy):
        value = getattr(settings.policy, item.name)
        print(f"{item.name} = {_toml_value(value)}  # {sources['policy.' + item.name]}")
    try:
        check(settings)
    except ConfigError as error:
        print(f"phonebind-server: serve would refuse these settings: {error}", file=sys.stderr)
        return 1
    return 0


def _token(name: str, roles_text: str) -> int:
    try:
        check_caller_name(name)
    except CredentialsError as error:
        print(f"phonebind-server: {error}", file=sys.stderr)
        return 2
    roles = [r.strip() for r in roles_text.split(",") if r.strip()]
    unknown = sorted(set(roles) - ROLES)
    if not roles or unknown:
        print(f"phonebind-server: unknown roles {unknown}; use {sorted(ROLES)}", file=sys.stderr)
        return 2
    token = new_token()
    # The token goes to the caller once; the file keeps only its digest.
    print(f"token: {token}")
    print()
    print("[[caller]]")
    print(f"name = {json.dumps(name, ensure_ascii=False)}")
    print(f"roles = {json.dumps(roles)}")
    print(f'token_sha256 = "{token_digest(token)}"')
    return 0


def _rotate_keys(settings: Settings, batch: int) -> int:
    """Runs beside live servers: they read every configured key and write with the active one."""
    from .domain.pii import Vault
    from .store.repository import PeeweeStore

    vault = Vault(settings.keys())
    store = PeeweeStore(settings.database_url)
    try:
        for model, column in PeeweeStore.SEALED_COLUMNS:
            total = 0
            try:
                while done := store.reseal_batch(model, column, vault, batch):
                    total += done
            except ValueError as error:  # a value under a key the settings lack
                print(
                    f"phonebind-server: {model._meta.table_name}.{column}: a value is {error};"
                    f" add that key to seal_keys and run again ({total} re-encrypted so far)",
                    file=sys.stderr,
                )
                return 1
            print(f"{model._meta.table_name}.{column}: {total} re-encrypted")
    finally:
        store.close()
    print(f"every sealed value now uses key {settings.keys().active_seal_key}")
    return 0


def _audit_verify(settings: Settings, account_id: str) -> int:
    from .app import SystemClock
    from .domain.audit import AuditTrail
    from .domain.audit_log import AuditLog
    from .store.repository import PeeweeStore

    store = PeeweeStore(settings.database_url)
    try:
        trail = AuditTrail(settings.keys().audit_key)
        report = AuditLog(store, trail, SystemClock()).verify(account_id)
    finally:
        store.close()
    for problem in report.problems:
        print(f"BROKEN {problem}")
    print(
        f"{'ok' if report.ok else 'TAMPERED'}: {report.chains} chains, {report.events} events"
        f", {len(report.problems)} problems"
    )
    return 0 if report.ok else 1


def _serve(settings: Settings, *, migrate: bool) -> int:
    if settings.workers < 1:
        print("phonebind-server: --workers must be at least 1", file=sys.stderr)
        return 2
    if settings.workers == 1:
        return _serve_one(settings, migrate=migrate)
    if settings.listen.rsplit(":", 1)[-1] == "0":
        print("phonebind-server: several workers need a fixed port", file=sys.stderr)
        return 2
    # Workers share the port with SO_REUSEPORT, which would also let them join
    # listeners already there (another deployment, perhaps on another database).
    if problem := _port_taken(settings.listen):
        print(f"phonebind-server: cannot listen on {settings.listen}: {problem}", file=sys.stderr)
        return 2
    if migrate:
        _migrate(settings)
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


def _serve_one(settings: Settings, *, migrate: bool) -> int:
    from .app import create_server

    try:
        app = create_server(settings, migrate=migrate)
    except (RuntimeError, ValueError, OSError) as error:
        print(f"phonebind-server: {error}", file=sys.stderr)
        return 2
    except StoreUnavailable as error:
        return _unreachable(error)

    def drain(signum: int, _frame: object) -> None:
        log.info("draining", extra={"signal": signal.Signals(signum).name})
        threading.Thread(target=app.stop, name="drain").start()
        limit = settings.grace_seconds + 5
        deadline = threading.Timer(limit, _exit_stuck, args=(limit,))
        deadline.daemon = True
        deadline.start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    print(f"phonebind listening on port {app.port}", flush=True)
    app.wait()
    return 0


def _exit_stuck(seconds: float) -> None:
    """Ends a draining process that is still alive `seconds` after the signal.

    grace_seconds bounds a drain: a call still running after it (blocked on a
    lock, or on a database that stopped answering) was already cut for its
    client, and its thread would keep the process and its transaction alive.
    Exiting closes the connection, so the database rolls that transaction back.
    """
    log.error("calls still running %s s after the signal; exiting", seconds)  # flushed at once
    os._exit(1)


def _worker(settings: Settings, index: int) -> None:
    logs.configure(settings.log_level, worker=index, pid=os.getpid())
    parent = multiprocessing.parent_process()
    if parent is not None:
        # A worker outlives a supervisor killed with SIGKILL; it drains and exits.
        threading.Thread(
            target=_drain_when_gone, args=(parent.sentinel,), name="parent", daemon=True
        ).start()
    sys.exit(_serve_one(settings, migrate=False))


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
    workers go on serving meanwhile.
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

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
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


if __name__ == "__main__":
    sys.exit(main())
