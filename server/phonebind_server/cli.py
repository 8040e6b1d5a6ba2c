"""phonebind-server: the gRPC server and the commands that operate it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import logging
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

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
from .domain.pii import KeyMismatch
from .domain.policy import Policy
from .domain.ports import StoreUnavailable
from .rpc.auth import (
    ROLES,
    CredentialsError,
    check_caller_name,
    check_delegate_name,
    new_token,
    token_digest,
)
from .store.migrate import MigrationError

if TYPE_CHECKING:
    from .store.store import Store

log = logging.getLogger("phonebind.cli")
T = TypeVar("T")


# The keys, which a migration that reseals stored values reads.
_KEY_SETTINGS = (
    *("index_key", "index_keys", "active_index_key"),
    *("code_key", "code_keys", "active_code_key"),
    *("seal_keys", "active_seal_key"),
    *("audit_key", "audit_keys", "active_audit_key"),
)


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
            help="development mode, turned on only by this flag: anonymous callers with every role"
            " (without credentials_file), reflection, development keys, migrations on start;"
            " loopback only",
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
    token.add_argument(
        "--delegate",
        action="store_true",
        help="the caller (a console) may act for a signed-in person (x-phonebind-on-behalf-of)",
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
        help="re-encrypt every sealed value under active_seal_key and re-derive every phone"
        " index under active_index_key, in small transactions; every value is checked before"
        " and after, and exit 1 on any that does not check. Reports the name and ID-number"
        " hashes still under other index keys (re-hashed at each account's next identity"
        " check)",
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
            "migrate": (migrate, ("database_url", "log_level", *_KEY_SETTINGS)),
            "rotate-keys": (rotate, ("database_url", "log_level", *_KEY_SETTINGS)),
            "audit verify": (
                verify,
                ("database_url", "log_level", "audit_key", "audit_keys", "active_audit_key"),
            ),
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
        return _token(args.name, args.roles, args.delegate)
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
    except (ConfigError, MigrationError, KeyMismatch) as error:  # keys missing or not the data's
        print(f"phonebind-server: {error}", file=sys.stderr)
        return 2
    except StoreUnavailable as error:
        return _unreachable(error)


def _unreachable(error: StoreUnavailable) -> int:
    print(f"phonebind-server: the database is unreachable ({error})", file=sys.stderr)
    return 1


def _migrate(settings: Settings) -> int:
    from .domain.pii import Vault
    from .store.store import Store

    # The keys are read only if a migration has records to MAC or values to reseal.
    applied = Store(settings.database_url).migrate(
        settings.audit_keys_and_active, lambda: Vault(settings.keys())
    )
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
    # Development mode is a flag only (--dev), never a variable.
    server = [f.name for f in dataclasses.fields(Settings) if f.name not in ("policy", "dev")]
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
    from .store.store import Store

    path = settings.database_url.removeprefix("sqlite:///")
    if path != settings.database_url and not os.path.exists(path):  # opening would create it
        print(f"phonebind-server: no database at {path}", file=sys.stderr)
        return 1
    history = Store(settings.database_url).migration_history()
    applied = {version: (name, when) for version, name, when in history}
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
        if item.name == "dev":
            # A comment: the output stays a file `serve` reads, and a file never
            # turns development mode on.
            print(f"# dev = {_toml_value(settings.dev)}  # {sources['dev']}; only --dev sets it")
        elif item.name != "policy":
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


def _token(name: str, roles_text: str, delegate: bool = False) -> int:
    try:
        check_caller_name(name)
        if delegate:
            check_delegate_name(name)
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
    if delegate:
        print("delegate = true")
    return 0


def _rotate_keys(settings: Settings, batch: int) -> int:
    """Runs beside live servers: they read every configured key and write with the active one.

    Nothing is judged by a value's prefix. Every value is opened first, so a
    mistyped key (one that does not open what the servers sealed with it) or a
    missing one stops the run before anything is written; each new value is
    opened before it is written; and at the end every value is opened again."""
    from collections import Counter

    from .domain.pii import INDEXED_COLUMNS, SEALED_COLUMNS, Vault
    from .store.store import Store

    vault = Vault(settings.keys())
    store = Store(settings.database_url)
    active = vault.active_key

    def check_all() -> tuple[Counter[str], Counter[str]]:
        """How many values open under each key id ("v1:<id>" for unbound
        ones), and how many do not under each key id."""
        opened: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        for column in SEALED_COLUMNS:
            after, bad = "", []
            while True:
                last, ok, failures = store.check_sealed(column, vault, after=after, limit=batch)
                opened.update(ok)
                bad += failures
                if last == after:
                    break
                after = last
            failed.update(key_id for key_id, _ in bad)
            if bad:
                print(
                    f"phonebind-server: {column.table}.{column.column}: {len(bad)} values do"
                    f" not open, such as {bad[0][1]}",
                    file=sys.stderr,
                )
        return opened, failed

    def explain(failed: Counter[str]) -> None:
        for key_id, count in sorted(failed.items()):
            if key_id in vault.key_ids:
                print(
                    f"phonebind-server: key {key_id!r} does not open {count} values sealed"
                    " under it: it is not the key that sealed them (mistyped?), or they"
                    " were altered",
                    file=sys.stderr,
                )
            else:
                print(
                    f"phonebind-server: {count} values are sealed with an unknown key"
                    f" {key_id[:32]!r}; add that key to seal_keys and run again",
                    file=sys.stderr,
                )

    index_key = vault.active_index_key

    def check_indexes() -> tuple[Counter[str], list[str]]:
        """How many blind indexes match their row's number under each key id,
        and what is wrong with those that do not."""
        matched: Counter[str] = Counter()
        failures: list[str] = []
        for column in INDEXED_COLUMNS:
            after = ""
            while True:
                last, ok, bad = store.check_indexes(column, vault, after=after, limit=batch)
                matched.update(ok)
                failures += bad
                if last == after:
                    break
                after = last
        for failure in failures[:5]:
            print(f"phonebind-server: {failure}", file=sys.stderr)
        if failures:
            print(f"phonebind-server: {len(failures)} blind indexes do not check", file=sys.stderr)
        return matched, failures

    def identity_hashes() -> Counter[str]:
        made: Counter[str] = Counter()
        after = ""
        while True:
            last, found = store.identity_hash_keys(after=after, limit=batch)
            made.update(found)
            if last == after:
                return made
            after = last

    def rotate() -> int:
        # Only compared: a mistyped new key must not become the recorded one.
        refuse_other_keys(store, settings, record=False)
        _, failed = check_all()
        if failed:
            explain(failed)
        matched, index_failures = check_indexes()
        if failed or index_failures:
            print("phonebind-server: nothing was re-encrypted or re-derived", file=sys.stderr)
            return 1
        if any(key_id != index_key for key_id in matched) and (
            ("index", index_key) not in store.recorded_key_ids()
        ):
            # Servers record a key's check value when they start with it; one
            # no server has used may be mistyped here.
            print(
                f"phonebind-server: index key {index_key!r} (active_index_key) has no recorded"
                " check value: no server has started with it yet. Start every server with it"
                " as active_index_key first; nothing was re-derived",
                file=sys.stderr,
            )
            return 1
        for column in SEALED_COLUMNS:
            total = 0
            while done := store.reseal_batch(column, vault, batch):
                total += done
            print(f"{column.table}.{column.column}: {total} re-encrypted")
        for indexed in INDEXED_COLUMNS:
            total = 0
            while done := store.reindex_batch(indexed, vault, batch):
                total += done
            print(f"{indexed.table}.{indexed.column}: {total} re-derived under key {index_key}")
        opened, failed = check_all()
        if failed:
            explain(failed)
            return 1
        matched, index_failures = check_indexes()
        if index_failures:
            return 1
        others = {key_id: n for key_id, n in opened.items() if key_id != active}
        if others:
            # Sealed meanwhile by a server that still writes with another key.
            print(
                "phonebind-server: values are still sealed under other keys"
                f" ({', '.join(f'{k}: {n}' for k, n in sorted(others.items()))}): is every"
                f" server's active_seal_key {active!r}? Run again once it is",
                file=sys.stderr,
            )
            return 1
        index_others = {key_id: n for key_id, n in matched.items() if key_id != index_key}
        if index_others:
            print(
                "phonebind-server: blind indexes are still under other keys"
                f" ({', '.join(f'{k}: {n}' for k, n in sorted(index_others.items()))}): is"
                f" every server's active_index_key {index_key!r}? Run again once it is",
                file=sys.stderr,
            )
            return 1
        print(
            f"every sealed value now uses key {active} and opens with it ({opened[active]} checked)"
        )
        print(
            f"every blind index now uses index key {index_key} and matches its row's number"
            f" ({matched[index_key]} checked)"
        )
        hashes = identity_hashes()
        old_hashes = {key_id: n for key_id, n in hashes.items() if key_id != index_key}
        if old_hashes:
            # Not an error: they cannot be re-derived, only re-hashed when proven.
            print(
                "name and ID-number hashes still under other index keys:"
                f" {', '.join(f'{k}: {n}' for k, n in sorted(old_hashes.items()))}. They"
                " cannot be re-derived (the name and ID number are not stored); each"
                f" account's are re-hashed with key {index_key} at its next successful"
                " identity check. Keep those keys in index_key/index_keys until this count"
                " is 0 or those accounts are gone"
            )
        else:
            print(f"every name and ID-number hash uses index key {index_key}")
        return 0

    return _in_store(store, rotate)


def _audit_verify(settings: Settings, account_id: str) -> int:
    from .app import SystemClock
    from .domain.audit import AuditTrail
    from .domain.audit_log import AuditLog
    from .domain.context import INTERNAL
    from .store.store import Store

    store = Store(settings.database_url)
    keys = settings.keys()
    trail = AuditTrail(keys.audit_keys, keys.audit_key_id)

    def verify():
        # An auditor's read-only database role suffices: nothing is recorded.
        refuse_other_keys(store, settings, record=False)
        return AuditLog(store, trail, SystemClock()).verify(INTERNAL, account_id)

    report = _in_store(store, verify)
    for problem in report.problems:
        print(f"BROKEN {problem}")
    print(
        f"{'ok' if report.ok else 'TAMPERED'}: {report.chains} chains, {report.events} events"
        f", {len(report.problems)} problems"
    )
    return 0 if report.ok else 1


def refuse_other_keys(store: Store, settings: Settings, *, record: bool = True) -> None:
    """Raises KeyMismatch when a configured key is not the one the data was made
    with (store code: run it inside `_in_store`). `record=False` writes nothing:
    a key id not recorded yet is not judged."""
    from datetime import UTC, datetime

    from .domain.pii import key_checks

    checks = key_checks(settings.keys())
    mismatched = store.check_keys(checks, datetime.now(UTC), record=record)
    if mismatched:
        raise KeyMismatch(mismatched)


def _in_store(store: Store, fn: Callable[..., T], *args: object) -> T:
    """Runs `fn(*args)` as store code on a fresh event loop, then closes the store."""

    async def run() -> T:
        await store.open()
        try:
            return await store.run(fn, *args)
        finally:
            await store.close()

    return asyncio.run(run())


def _serve(settings: Settings, *, migrate: bool) -> int:
    if settings.workers < 1:
        print("phonebind-server: --workers must be at least 1", file=sys.stderr)
        return 2
    if settings.workers == 1:
        return serve_one(settings, migrate=migrate)
    from .supervisor import supervise

    return supervise(settings, migrate=migrate)


# A SIGHUP that comes while the server starts: the reload is done once it serves.
_reload_asked = threading.Event()


def hold_reloads() -> None:
    """Until the server serves, a SIGHUP is noted instead of ending the process
    (its default action); the files are read again once it serves."""
    signal.signal(signal.SIGHUP, lambda _signum, _frame: _reload_asked.set())


def serve_one(settings: Settings, *, migrate: bool) -> int:
    """One server process until SIGTERM or SIGINT; then it drains and exits.
    SIGHUP reloads the callers and the TLS certificates (App.reload)."""
    hold_reloads()
    return asyncio.run(_serve_until_signalled(settings, migrate=migrate))


async def _serve_until_signalled(settings: Settings, *, migrate: bool) -> int:
    from .app import create_server
    from .tracing import from_environment

    try:
        # The OTEL_* variables; tracing stays off unless they name an exporter.
        tracing = from_environment()
        app = await create_server(settings, migrate=migrate, tracing=tracing)
    except (RuntimeError, ValueError, OSError) as error:
        print(f"phonebind-server: {error}", file=sys.stderr)
        return 2
    except StoreUnavailable as error:
        return _unreachable(error)

    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()

    def drain(signum: int) -> None:
        log.info("draining", extra={"signal": signal.Signals(signum).name})
        signalled.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, drain, signum)
    # SIGHUP re-reads the credentials file and the TLS files (systemd's reload).
    loop.add_signal_handler(signal.SIGHUP, app.reload)
    if _reload_asked.is_set():
        app.reload()
    print(f"phonebind listening on port {app.port}", flush=True)
    await signalled.wait()
    limit = settings.grace_seconds + 5
    watchdog = threading.Timer(limit, _exit_stuck, args=(limit,))
    watchdog.daemon = True
    watchdog.start()
    if not await app.stop():
        _exit_stuck(settings.grace_seconds)
    watchdog.cancel()
    return 0


def _exit_stuck(seconds: float) -> None:
    """Ends a draining process whose calls still run `seconds` after the signal.

    grace_seconds bounds a drain: a call still running after it (blocked on a
    lock, or on a database that stopped answering) was already cut for its
    client, and it would keep the process and its transaction alive. Exiting
    closes the connection, so the database rolls that transaction back. The
    exit code is 1: the drain was not clean.
    """
    log.error("calls still running %s s after the signal; exiting", seconds)  # flushed at once
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
