"""Settings from flags, environment and a TOML file, in that order of precedence.

Every server setting `name` is the flag `--name`, the variable PHONEBIND_NAME
and the key `name` of the file's [server] table; every policy value `name` is
PHONEBIND_POLICY_NAME and the key `name` of the [policy] table. Durations take
a number of seconds or a number with s, m, h or d ("90s", "5m", "24h", "90d").
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from .domain.pii import SINGLE_KEY_ID, Keys
from .domain.policy import Policy

ENV_PREFIX = "PHONEBIND_"
# The id of the key a single-key setting (index_key, code_key, audit_key) holds.
AUDIT_KEY_ID = SINGLE_KEY_ID
# The purposes whose keys rotate with ids: `<purpose>_key` is key k1,
# `<purpose>_keys` the others ("id:base64,…"), `active_<purpose>_key` the one
# that makes new values.
ROTATING_KEYS = ("index", "code", "audit")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(ValueError):
    """A setting is missing, malformed or unsafe; the message says which."""


# Development mode opens the service to anonymous callers with every role. A
# variable or a file key can reach a production host unseen (an inherited
# environment, a copied file), so only the command line turns it on.
_DEV_ONLY_BY_FLAG = "development mode is turned on only by the --dev flag of the command line"


def _dev_key(purpose: str) -> str:
    return base64.b64encode(hashlib.sha256(f"phonebind-dev-{purpose}".encode()).digest()).decode()


# Well-known development keys: anyone can read them here, so production refuses them.
DEV_KEYS = {
    "index_key": _dev_key("index"),
    "code_key": _dev_key("code"),
    "seal_keys": "dev1:" + _dev_key("seal"),
    "audit_key": _dev_key("audit"),
    "sms_http_secret": "whsec_" + _dev_key("sms-http"),
}
# Standard Webhooks secrets (the http SMS gateway's) are "whsec_" and base64;
# the prefix itself is no secret.
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105  # nosec B105


def _key_text(value: str) -> str:
    """The base64 part of a key setting's item: after an "id:" or "whsec_"."""
    return value.rpartition(":")[2].removeprefix(WEBHOOK_SECRET_PREFIX)


# The same keys as bytes: a development key is refused in any slot and any
# spelling, such as "prod:<dev seal key>" or the dev index key as code_key.
_DEV_KEY_BYTES = frozenset(base64.b64decode(_key_text(value)) for value in DEV_KEYS.values())


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    database_url: str = "sqlite:///phonebind.db"
    sms_gateway: str = "log"
    dev: bool = False
    reflection: bool = False
    allow_reflection: bool = False
    credentials_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    log_level: str = "INFO"
    # PostgreSQL connections each process may hold (calls wait on the event
    # loop for one; SQLite needs a single connection).
    store_connections: int = 10
    # PostgreSQL: prepared statements (off behind PgBouncer before 1.21 in
    # transaction pooling), and lock/statement timeouts as startup options
    # (off behind a transaction-pooling PgBouncer: set them on the role).
    store_prepared_statements: bool = True
    store_session_settings: bool = True
    workers: int = 1
    metrics_listen: str = ""
    # A plaintext port serving only the gRPC health service, for probes that
    # speak no TLS (Kubernetes' gRPC probes).
    health_listen: str = ""
    grace_seconds: float = 10.0
    max_receive_bytes: int = 64 * 1024
    health_interval_seconds: float = 2.0
    # How long a call waits on a database lock before it answers STORE_UNAVAILABLE.
    store_lock_timeout_seconds: float = 10.0
    # Refusals of unauthenticated calls recorded one by one, per source address
    # and minute; the rest are counted in one audit event.
    unauthenticated_audit_per_minute: int = 60
    sms_max_attempts: int = 8
    sms_http_secret: str = ""
    sms_http_timeout_seconds: float = 5.0
    sms_retry_base_seconds: float = 1.0
    sms_retry_max_seconds: float = 300.0
    # NUMBER=CODE pairs, for development and staging: SendCode to such a
    # number always gives that code, and no SMS is sent to it.
    sms_test_numbers: tuple[str, ...] = ()
    # A staging deployment: every production check applies, and
    # sms_test_numbers are allowed.
    staging: bool = False
    # Each key is base64 of 32 random bytes or more. index_key, code_key and
    # audit_key are each key k1; index_keys, code_keys and audit_keys are
    # further keys as "id:base64,…" (to rotate), and active_*_key names the
    # one that makes new values (default: k1 when the single key is set, else
    # the first listed).
    index_key: str = ""
    index_keys: str = ""
    active_index_key: str = ""
    code_key: str = ""
    code_keys: str = ""
    active_code_key: str = ""
    seal_keys: str = ""
    active_seal_key: str = ""
    audit_key: str = ""
    audit_keys: str = ""
    active_audit_key: str = ""
    policy: Policy = field(default_factory=Policy)

    def keys(self) -> Keys:
        seal: dict[str, bytes] = {}
        for item in filter(None, (s.strip() for s in self.seal_keys.split(","))):
            kid, _, encoded = item.partition(":")
            seal[kid] = _key_bytes(f"seal key {kid}", encoded)
        active = self.active_seal_key or (next(iter(seal)) if seal else "")
        index, active_index = self.rotating_keys("index")
        code, active_code = self.rotating_keys("code")
        audit, active_audit = self.rotating_keys("audit")
        try:
            return Keys(
                index_keys=index,
                active_index_key=active_index,
                code_keys=code,
                active_code_key=active_code,
                seal_keys=seal,
                active_seal_key=active,
                audit_keys=audit,
                active_audit_key=active_audit,
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def rotating_keys(self, purpose: str) -> tuple[dict[str, bytes], str]:
        """The `purpose` keys (index, code or audit) by id, and the active id."""
        single_name, many_name, active_name = (
            f"{purpose}_key",
            f"{purpose}_keys",
            f"active_{purpose}_key",
        )
        single: str = getattr(self, single_name)
        keys: dict[str, bytes] = {}
        if single:
            keys[SINGLE_KEY_ID] = _key_bytes(single_name, single)
        many: str = getattr(self, many_name)
        for item in filter(None, (s.strip() for s in many.split(","))):
            kid, colon, encoded = item.partition(":")
            kid = kid.strip()
            if not colon or not kid:
                raise ConfigError(f"{many_name}: write each key as ID:BASE64")
            if kid == SINGLE_KEY_ID:
                raise ConfigError(
                    f"{many_name}: the id {SINGLE_KEY_ID} is {single_name}'s; give the others"
                    " other ids"
                )
            if kid in keys:
                raise ConfigError(f"{many_name}: the id {kid[:16]!r} is given twice")
            keys[kid] = _key_bytes(f"{many_name} key {kid[:16]}", encoded.strip())
        if not keys:
            raise ConfigError(f"{single_name} is not set")
        active: str = getattr(self, active_name) or next(iter(keys))
        if active not in keys:
            raise ConfigError(
                f"{active_name} {active[:16]!r} is not one of the configured ids"
                f" ({', '.join(keys)})"
            )
        return keys, active

    def audit_keys_and_active(self) -> tuple[dict[str, bytes], str]:
        """The audit keys by id and the id of the one that MACs new records; what
        `migrate` needs to MAC an existing audit trail again."""
        return self.rotating_keys("audit")

    def http_secret(self) -> bytes:
        """The http SMS gateway's signing secret (empty when unset): `whsec_`
        and base64, or (with --dev) plain base64."""
        if not self.sms_http_secret:
            return b""
        return _key_bytes(
            "sms_http_secret", self.sms_http_secret.removeprefix(WEBHOOK_SECRET_PREFIX)
        )

    def dev_keys_in_use(self) -> list[str]:
        """The key settings that hold a well-known development key."""
        found = []
        for name in SECRET_SETTINGS:
            value: str = getattr(self, name)
            items = value.split(",") if name in _KEY_LIST_SETTINGS else [value]
            if any(_is_dev_key(_key_text(item.strip())) for item in items):
                found.append(name)
        return found

    def uses_dev_keys(self) -> bool:
        return bool(self.dev_keys_in_use())


def _is_dev_key(encoded: str) -> bool:
    try:
        return base64.b64decode(encoded, validate=True) in _DEV_KEY_BYTES
    except ValueError:
        return False


def _key_bytes(name: str, encoded: str) -> bytes:
    if not encoded:
        raise ConfigError(f"{name} is not set")
    try:
        return base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ConfigError(f"{name} must be base64") from None


def parse_duration(value: Any) -> timedelta:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    match = _DURATION.match(str(value))
    if not match:
        raise ConfigError(f"not a duration: {value!r} (use e.g. 90s, 5m, 24h, 90d)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _coerce(name: str, current: Any, value: Any) -> Any:
    try:
        if isinstance(current, bool):
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(current, timedelta):
            return parse_duration(value)
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            items = value if isinstance(value, list) else str(value).split(",")
            return tuple(str(item).strip() for item in items if str(item).strip())
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot use {value!r}") from None


def _apply(target: Any, values: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(target) if f.name != "policy"}
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown setting {key!r} in {where}")
        changes[key] = _coerce(key, getattr(target, key), value)
    try:
        return dataclasses.replace(target, **changes)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def load(
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
    serving: bool = True,
) -> Settings:
    """The settings; `serving=False` (migrations, tools) skips the checks that
    only a running server needs: keys, TLS, credentials, gateways."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    settings = Settings()
    policy = Policy()
    path = flags.get("config") or env.get(ENV_PREFIX + "CONFIG") or config_file
    if path:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from None
        server_table = document.get("server", {})
        if isinstance(server_table, Mapping) and "dev" in server_table:
            raise ConfigError(f"{path}: {_DEV_ONLY_BY_FLAG}; remove `dev` from [server]")
        settings = _apply(settings, with_setting_files(server_table, path), path)
        policy = _apply(policy, document.get("policy", {}), path)

    if ENV_PREFIX + "DEV" in env:
        raise ConfigError(f"{ENV_PREFIX}DEV is set: {_DEV_ONLY_BY_FLAG}; unset it")
    server_names = {f.name for f in dataclasses.fields(Settings)} - {"policy", "dev"}
    policy_names = {f.name for f in dataclasses.fields(Policy)}
    from_env = {
        name: env[ENV_PREFIX + name.upper()]
        for name in server_names
        if ENV_PREFIX + name.upper() in env
    }
    from_env.update(setting_files_from_env(env))
    settings = _apply(settings, from_env, "environment")
    policy_env = {
        name: env[ENV_PREFIX + "POLICY_" + name.upper()]
        for name in policy_names
        if ENV_PREFIX + "POLICY_" + name.upper() in env
    }
    policy = _apply(policy, policy_env, "environment")
    settings = _apply(
        settings, {k: v for k, v in flags.items() if k in server_names | {"dev"}}, "flags"
    )

    if settings.dev:
        settings = dataclasses.replace(
            settings,
            reflection=True,
            **{
                name: getattr(settings, name) or value
                for name, value in DEV_KEYS.items()
                # A purpose given keys with ids gets no development key k1.
                if not getattr(settings, name + "s", "")
            },
        )
    level = settings.log_level.strip().upper()
    settings = dataclasses.replace(
        settings, policy=policy, log_level=_LOG_LEVEL_ALIASES.get(level, level)
    )
    _check_common(settings)
    if serving:
        check(settings)
    return settings


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}


def _check_common(settings: Settings) -> None:
    """What every command needs: its log level and a database it can open."""
    if settings.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    if not settings.database_url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(
            "database_url must be sqlite:////abs/path.db or postgresql://user@host:port/db"
        )


def _port_of(name: str, address: str, *, allow_zero: bool, need_host: bool = True) -> int:
    host, colon, port = address.rpartition(":")
    lowest = 0 if allow_zero else 1
    if (
        not colon
        or (need_host and not host)
        or not port.isdigit()
        or not lowest <= int(port) <= 65535
    ):
        raise ConfigError(f"{name} must be HOST:PORT with a port from {lowest} to 65535")
    return int(port)


UNIX_SOCKET_PREFIXES = ("unix:", "unix-abstract:")


def _check_addresses(settings: Settings) -> None:
    if settings.listen.startswith(UNIX_SOCKET_PREFIXES):  # gRPC serves a Unix socket too
        if settings.workers > 1:
            raise ConfigError("several workers share a TCP port; listen on HOST:PORT")
    else:
        _port_of("listen", settings.listen, allow_zero=True)
    if settings.metrics_listen:
        # Port 0 (any free one) only for one process: workers count up from the port.
        port = _port_of(
            "metrics_listen",
            settings.metrics_listen,
            allow_zero=settings.workers == 1,
            need_host=False,  # ":9464" is 127.0.0.1:9464
        )
        if port + settings.workers - 1 > 65535:
            raise ConfigError(
                f"metrics_listen: worker {settings.workers - 1} would need port"
                f" {port + settings.workers - 1}; choose a lower port"
            )


def check(settings: Settings) -> None:
    """Refuses settings that would be unsafe outside a developer's machine."""
    settings.keys()
    if settings.store_connections < 1:
        raise ConfigError("store_connections must be at least 1")
    if settings.store_lock_timeout_seconds <= 0:
        raise ConfigError("store_lock_timeout_seconds must be positive")
    if settings.unauthenticated_audit_per_minute < 1:
        raise ConfigError("unauthenticated_audit_per_minute must be at least 1")
    _check_sms(settings)
    _check_addresses(settings)
    _check_health_listen(settings)
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("tls_cert and tls_key go together")
    if settings.tls_client_ca and not settings.tls_cert:
        raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
    if settings.dev:
        local = settings.listen.startswith(UNIX_SOCKET_PREFIXES) or _loopback_host(
            settings.listen.rsplit(":", 1)[0].strip("[]")
        )
        if not local:
            raise ConfigError("--dev listens on loopback only (127.0.0.1, ::1 or localhost)")
        return
    problems = []
    if not settings.tls_cert:
        problems.append("TLS is not configured (set tls_cert and tls_key)")
    if not settings.credentials_file:
        problems.append("no caller credentials (set credentials_file)")
    if settings.reflection and not settings.allow_reflection:
        problems.append("reflection is on (set allow_reflection to keep it in production)")
    if settings.uses_dev_keys():
        names = ", ".join(settings.dev_keys_in_use())
        problems.append(f"development keys are configured (set {names})")
    problems.extend(_weak_key_problems(settings))
    if settings.sms_gateway == "log" or settings.sms_gateway.startswith("file:"):
        problems.append("the file and log SMS gateways are for development only")
    if settings.sms_test_numbers and not settings.staging:
        problems.append(
            "sms_test_numbers are for development and staging only"
            " (set staging on a staging deployment)"
        )
    if settings.sms_gateway.startswith("http://") and not _loopback(settings.sms_gateway):
        problems.append("the http SMS gateway needs https:// unless the provider is on loopback")
    if _http_gateway(settings) and not settings.sms_http_secret.startswith(WEBHOOK_SECRET_PREFIX):
        problems.append(
            "sms_http_secret is not a Standard Webhooks secret (whsec_ followed by base64)"
        )
    if problems:
        raise ConfigError("refusing to start outside --dev: " + "; ".join(problems))


def _key_values(settings: Settings) -> dict[str, list[bytes]]:
    """Each key setting's keys as bytes (every id of a setting that has ids)."""
    found: dict[str, list[bytes]] = {}
    for name in SECRET_SETTINGS:
        value: str = getattr(settings, name)
        for item in filter(None, (item.strip() for item in value.split(","))):
            try:
                key = base64.b64decode(_key_text(item), validate=True)
            except ValueError:
                continue  # reported as not base64 where the key is used
            found.setdefault(name, []).append(key)
    return found


def weak_key(key: bytes) -> bool:
    """A key no random generator would make: a byte pattern of at most 16 bytes
    repeated (all zeros, "abcabc…"), or at most 8 distinct byte values."""
    periodic = any(key == (key[:period] * len(key))[: len(key)] for period in range(1, 17))
    return periodic or len(set(key)) <= 8


def _weak_key_problems(settings: Settings) -> list[str]:
    """Trivially weak keys, and one key in two settings: a key shared by the
    blind index, the code MACs and the audit MACs makes one leak expose all three."""
    keys = _key_values(settings)
    problems = [
        f"{name} is a trivially weak key (make one with: head -c 32 /dev/urandom | base64)"
        for name, values in keys.items()
        if any(weak_key(key) for key in values)
    ]
    names = list(keys)
    for i, name in enumerate(names):
        for other in names[i + 1 :]:
            if set(keys[name]) & set(keys[other]):
                problems.append(f"{name} and {other} hold the same key; give each its own")
    return problems


def _check_health_listen(settings: Settings) -> None:
    if not settings.health_listen:
        return
    port = _port_of("health_listen", settings.health_listen, allow_zero=settings.workers == 1)
    if port and settings.listen.rpartition(":")[2] == str(port):
        raise ConfigError("health_listen needs a port of its own, not the port of listen")
    host = settings.health_listen.rpartition(":")[0].strip("[]")
    if settings.dev and not _loopback_host(host):
        raise ConfigError("--dev listens on loopback only (127.0.0.1, ::1 or localhost)")


def _http_gateway(settings: Settings) -> bool:
    return settings.sms_gateway.startswith(("http://", "https://"))


def _loopback(url: str) -> bool:
    return _loopback_host(urlsplit(url).hostname or "")


def _loopback_host(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sms_test_numbers(settings: Settings) -> dict[str, str]:
    """The sms_test_numbers setting as {E.164 number: code}. Errors name the
    item by its position, never the number."""
    from .domain.errors import DomainError
    from .domain.phone import parse_phone

    found: dict[str, str] = {}
    length = settings.policy.code_length
    for position, item in enumerate(settings.sms_test_numbers, start=1):
        where = f"sms_test_numbers item {position}"
        number, equals, code = item.partition("=")
        if not equals:
            raise ConfigError(f"{where}: write NUMBER=CODE")
        try:
            phone = parse_phone(number.strip(), allowed_regions=settings.policy.allowed_regions)
        except (DomainError, ValueError):
            raise ConfigError(f"{where}: not a mobile number of an allowed region") from None
        code = code.strip()
        if len(code) != length or any(c not in "0123456789" for c in code):
            raise ConfigError(f"{where}: the code must be {length} ASCII digits (code_length)")
        found[phone.e164] = code
    return found


def _check_sms(settings: Settings) -> None:
    sms_test_numbers(settings)
    if settings.sms_max_attempts < 1:
        raise ConfigError("sms_max_attempts must be at least 1")
    if settings.sms_http_timeout_seconds <= 0:
        raise ConfigError("sms_http_timeout_seconds must be positive")
    if not 0 < settings.sms_retry_base_seconds <= settings.sms_retry_max_seconds:
        raise ConfigError("sms_retry_base_seconds must be positive and <= sms_retry_max_seconds")
    if _http_gateway(settings) and len(settings.http_secret()) < 32:
        raise ConfigError("sms_http_secret must be set (base64, >= 32 bytes) for the http gateway")


# -- secrets in files, and where each setting came from -----------------------------

# Settings that hold several keys, as "id:base64,…".
_KEY_LIST_SETTINGS = ("seal_keys", *(f"{purpose}_keys" for purpose in ROTATING_KEYS))
# The further keys by id, set only while a key rotates (deployments hand them
# over as files then, like the other keys).
ROTATION_KEY_SETTINGS: tuple[str, ...] = tuple(f"{purpose}_keys" for purpose in ROTATING_KEYS)
# Settings that hold a secret: never printed, only said to be set.
SECRET_SETTINGS: tuple[str, ...] = (*DEV_KEYS, *ROTATION_KEY_SETTINGS)
# Settings that may also be given as a file holding the value, as Kubernetes
# Secrets and systemd credentials provide them: the variable PHONEBIND_NAME_FILE
# or the key `name_file` of the file's [server] table. The database URL may
# carry a password, so it is one of them.
FILE_SETTINGS: tuple[str, ...] = (*SECRET_SETTINGS, "database_url")
# Settings that are URLs: shown with any password in them redacted.
URL_SETTINGS: tuple[str, ...] = ("database_url", "sms_gateway")
REDACTED = "<redacted>"
_SETTING_FILE_MAX_BYTES = 64 * 1024
_URL_SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def env_name(name: str, *, policy: bool = False) -> str:
    """The environment variable of a server setting (or of a policy value)."""
    return ENV_PREFIX + ("POLICY_" if policy else "") + name.upper()


def read_setting_file(label: str, path: str) -> str:
    """A setting's value from the file at `path`, less its trailing newline."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(_SETTING_FILE_MAX_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{label}: cannot read {path}: {error.strerror or error}") from None
    if len(data) > _SETTING_FILE_MAX_BYTES:
        raise ConfigError(f"{label}: {path} is larger than {_SETTING_FILE_MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: {path} is not UTF-8 text") from None
    text = text.rstrip("\r\n")
    if not text.strip():
        raise ConfigError(f"{label}: {path} is empty")
    return text


def setting_files_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """The values of the settings that `env` gives as PHONEBIND_NAME_FILE."""
    found = {}
    for name in FILE_SETTINGS:
        variable = env_name(name)
        if variable + "_FILE" not in env:
            continue
        if variable in env:
            raise ConfigError(f"{variable} and {variable}_FILE are both set; give one of them")
        found[name] = read_setting_file(variable + "_FILE", env[variable + "_FILE"])
    return found


def with_setting_files(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A [server] table with each `name_file` key replaced by `name` and the file's value."""
    result = dict(table)
    for name in FILE_SETTINGS:
        key = name + "_file"
        if key not in result:
            continue
        path = result.pop(key)
        if name in result:
            raise ConfigError(f"{where}: {name} and {key} are both set; give one of them")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}: {key} must be the path of a file")
        result[name] = read_setting_file(f"{key} in {where}", path)
    return result


def origins(
    settings: Settings,
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> dict[str, str]:
    """Where each value of `settings` (as `load` made them from the same flags,
    environment and file) came from. Policy values are keyed `policy.NAME`."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    path = flags.get("config") or env.get(ENV_PREFIX + "CONFIG") or config_file
    document: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from None
    server_table = document.get("server", {})
    found: dict[str, str] = {}
    for item in dataclasses.fields(Settings):
        name = item.name
        if name == "policy":
            continue
        variable = env_name(name)
        if name in flags:
            found[name] = "flag --" + name.replace("_", "-")
        elif variable in env:
            found[name] = f"environment {variable}"
        elif name in FILE_SETTINGS and variable + "_FILE" in env:
            found[name] = f"file {env[variable + '_FILE']} via {variable}_FILE"
        elif name in server_table:
            found[name] = f"file {path}"
        elif name in FILE_SETTINGS and name + "_file" in server_table:
            found[name] = f"file {server_table[name + '_file']} via {name}_file in {path}"
        else:
            found[name] = "default"
    if settings.dev:
        for name in DEV_KEYS:
            if found[name] == "default" and getattr(settings, name):
                found[name] = "development key (--dev)"
        if found["reflection"] == "default":
            found["reflection"] = "on with --dev"
    policy_table = document.get("policy", {})
    for item in dataclasses.fields(Policy):
        variable = env_name(item.name, policy=True)
        if variable in env:
            found["policy." + item.name] = f"environment {variable}"
        elif item.name in policy_table:
            found["policy." + item.name] = f"file {path}"
        else:
            found["policy." + item.name] = "default"
    return found


def redact_url(url: str) -> str:
    """`url` with the password in it, and password parameters, replaced by REDACTED."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        credentials, _, host = netloc.rpartition("@")
        user, colon, _password = credentials.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if colon else netloc
    query = "&".join(
        f"{key}={REDACTED}" if key.lower() in _URL_SECRET_PARAMETERS else pair
        for pair in parts.query.split("&")
        if pair
        for key in [pair.partition("=")[0]]
    )
    return parts._replace(netloc=netloc, query=query).geturl()


def shown(name: str, value: Any) -> Any:
    """A setting's value as it may be printed: secrets redacted."""
    if name in SECRET_SETTINGS:
        return REDACTED if value else ""
    if name in URL_SETTINGS and isinstance(value, str):
        return redact_url(value)
    return value


def format_duration(value: timedelta) -> str:
    """A spelling `parse_duration` reads back, in the unit people use for it:
    60s, 5m, 72h, 90d (days from a week on, hours from two hours on)."""
    seconds = value.total_seconds()
    for unit, least in (("d", 7 * 86400), ("h", 7200), ("m", 120)):
        if seconds >= least and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"
