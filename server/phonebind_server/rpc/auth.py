"""Who may call what: callers, their credentials and the role each RPC needs.

Callers authenticate with a bearer token (`authorization: Bearer <token>`)
whose SHA-256 is in the credentials file, or with a client certificate whose
subject the file names (mutual TLS). Tokens are random and long, so a plain
SHA-256 is enough to keep the file useless to a reader; they are looked up by
digest and compared in constant time.

The credentials file (TOML):

    [[caller]]
    name = "loan-app-backend"
    roles = ["flow"]
    token_sha256 = "<hex of sha256(token)>"

    [[caller]]
    name = "kyc-service"
    roles = ["kyc"]
    cert_subject = "CN=kyc-service"   # as the client certificate's subject;
                                      # needs tls_client_ca (mutual TLS)

    [[caller]]
    name = "console"
    roles = ["reviewer"]
    token_sha256 = "<hex>"
    delegate = true    # may act for a signed-in person (see below)

A caller marked `delegate` (the reviewers' web console) may name the person it
acts for in the header `x-phonebind-on-behalf-of: <person>` (1-64 of A-Z a-z
0-9 . _ @ -). The call's caller is then "<caller>:<person>", e.g.
"console:alice": the reviewer recorded for a decision, the caller of its
audit events and of its log line. The header from any other caller is
refused with PERMISSION_DENIED, a malformed one with UNAUTHENTICATED.

`phonebind-server token --name NAME --roles r1,r2` prints a new token and its entry.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ROLES = frozenset({"kyc", "flow", "reader", "reviewer", "auditor"})

_BINDING = "/phonebind.v1.BindingService/"
_REVIEW = "/phonebind.v1.ReviewService/"
_AUDIT = "/phonebind.v1.AuditService/"

# The one table of what each RPC needs (DESIGN §1). A method not listed here
# is refused to every authenticated caller.
RPC_ROLES: dict[str, frozenset[str]] = {
    _BINDING + "RegisterAccount": frozenset({"kyc"}),
    _BINDING + "GetAccount": frozenset({"flow", "reader"}),
    _BINDING + "ListBindingHistory": frozenset({"reader"}),
    **{
        _BINDING + name: frozenset({"flow"})
        for name in (
            "StartRebind",
            "VerifyIdentity",
            "SendCode",
            "VerifyCode",
            "CompleteRebind",
            "CancelRebind",
            "GetRebind",
        )
    },
    **{
        _REVIEW + name: frozenset({"reviewer"})
        for name in ("ListReviews", "GetReview", "ApproveRebind", "RejectRebind")
    },
    **{_AUDIT + name: frozenset({"auditor"}) for name in ("ListAuditEvents", "VerifyAuditChain")},
}

# Open to anyone who reaches the port: load balancers' health checks, and
# reflection when it is switched on (never by default in production).
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


# The audit trail's caller column holds this many characters.
MAX_CALLER_NAME = 128

# The header in which a delegating caller names the person it acts for.
ON_BEHALF_OF = "x-phonebind-on-behalf-of"
MAX_PERSON_NAME = 64
_PERSON = re.compile(rf"[A-Za-z0-9._@-]{{1,{MAX_PERSON_NAME}}}")


class CredentialsError(ValueError):
    """The credentials file is unreadable or inconsistent."""


def check_caller_name(name: str) -> None:
    """The name is the caller of every audit event (at most 128 characters there)
    and appears in logs: a short, printable label."""
    if len(name) > MAX_CALLER_NAME or not name.isprintable():
        raise CredentialsError(
            f"caller {name[:MAX_CALLER_NAME]!r}: the name must be at most"
            f" {MAX_CALLER_NAME} printable characters"
        )


def check_delegate_name(name: str) -> None:
    """A delegate's "<name>:<person>" must fit where a caller's name goes."""
    if len(name) + 1 + MAX_PERSON_NAME > MAX_CALLER_NAME:
        raise CredentialsError(
            f"caller {name[:MAX_CALLER_NAME]!r}: a delegate's name must leave room for a"
            f" person's (at most {MAX_CALLER_NAME - 1 - MAX_PERSON_NAME} characters)"
        )


@dataclass(frozen=True)
class Caller:
    name: str
    roles: frozenset[str]
    # May name the person it acts for (x-phonebind-on-behalf-of).
    delegate: bool = False

    def may_call(self, method: str) -> bool:
        return bool(RPC_ROLES.get(method, frozenset()) & self.roles)


# Development mode: anyone, with every role, and a console may act for people.
DEV_CALLER = Caller("dev-anonymous", ROLES, delegate=True)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "pbt_" + secrets.token_urlsafe(32)


class Credentials:
    def __init__(self, callers: Sequence[tuple[Caller, str, str]]) -> None:
        """`callers`: (caller, token_sha256 or "", cert_subject or "").

        Immutable once made: a reload makes a new one and swaps it in whole."""
        self._by_digest: dict[str, Caller] = {}
        self._by_subject: dict[str, Caller] = {}
        for caller, digest, subject in callers:
            if digest:
                if digest in self._by_digest:
                    raise CredentialsError(f"caller {caller.name}: token used twice")
                self._by_digest[digest] = caller
            if subject:
                normal = _normal_subject(subject)
                if normal in self._by_subject:
                    raise CredentialsError(
                        f"caller {caller.name}: cert_subject {normal!r} is listed twice"
                    )
                self._by_subject[normal] = caller
        self.callers = len({caller.name for caller, _, _ in callers})

    @classmethod
    def load(cls, path: str) -> Credentials:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise CredentialsError(f"cannot read credentials file {path}: {error}") from None
        return cls.from_document(document)

    @classmethod
    def from_document(cls, document: Mapping[str, object]) -> Credentials:
        entries = document.get("caller", [])
        if not isinstance(entries, list) or not entries:
            raise CredentialsError("the credentials file lists no [[caller]]")
        callers = []
        for entry in entries:
            name = str(entry.get("name", "")).strip()
            roles = frozenset(entry.get("roles", []))
            digest = str(entry.get("token_sha256", "")).lower()
            subject = str(entry.get("cert_subject", ""))
            delegate = entry.get("delegate", False)
            if not name:
                raise CredentialsError("a caller has no name")
            check_caller_name(name)
            if not roles or not roles <= ROLES:
                raise CredentialsError(
                    f"caller {name}: roles must be some of {', '.join(sorted(ROLES))}"
                )
            if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
                raise CredentialsError(f"caller {name}: token_sha256 must be 64 hex digits")
            if not digest and not subject:
                raise CredentialsError(f"caller {name}: needs token_sha256 or cert_subject")
            if not isinstance(delegate, bool):
                raise CredentialsError(f"caller {name}: delegate must be true or false")
            if delegate:
                check_delegate_name(name)
            callers.append((Caller(name, roles, delegate), digest, subject))
        return cls(callers)

    @property
    def certificate_callers(self) -> list[str]:
        """The callers known by a client certificate's subject."""
        return sorted({caller.name for caller in self._by_subject.values()})

    def by_token(self, token: str) -> Caller | None:
        # Looked up by digest: timing can at most hint at a digest's prefix, which
        # does not help anyone find a token that hashes to it.
        return self._by_digest.get(token_digest(token))

    def by_subject(self, subject: str) -> Caller | None:
        return self._by_subject.get(_normal_subject(subject))


def _normal_subject(subject: str) -> str:
    return ",".join(part.strip() for part in subject.split(",") if part.strip())


def bearer_token(value: str) -> str | None:
    """The token of an `authorization: Bearer <token>` header's value."""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip() or len(token) > 512:
        return None
    return token.strip()


class AuthError(Exception):
    def __init__(
        self,
        permission: bool,
        message: str,
        caller: str = "unauthenticated",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.permission = permission  # False: UNAUTHENTICATED, True: PERMISSION_DENIED
        self.message = message
        self.caller = caller
        # ErrorInfo metadata, e.g. {"header": "x-phonebind-on-behalf-of"}.
        self.metadata = dict(metadata or {})


def authenticate(
    method: str,
    metadata: Sequence[tuple[str, str | bytes]],
    cert_subject: str,
    credentials: Credentials | None,
) -> Caller | None:
    """The caller of `method`, None for public methods; AuthError when refused.

    Without credentials (development mode) everyone is DEV_CALLER. A delegate
    that names a person (ON_BEHALF_OF) is returned as "<caller>:<person>".
    """
    if method.startswith(PUBLIC_PREFIXES):
        return None
    if credentials is None:
        return on_behalf_of(DEV_CALLER, metadata)
    authorization = [value for key, value in metadata if key == "authorization"]
    if len(authorization) > 1:
        # A proxy that checks the first one would disagree with the service.
        raise AuthError(False, "more than one authorization header")
    caller = None
    if authorization:
        value = authorization[0]
        token = bearer_token(value) if isinstance(value, str) else None
        caller = credentials.by_token(token) if token else None
        if caller is None:
            raise AuthError(False, "the bearer token is not valid")
    elif cert_subject:
        caller = credentials.by_subject(cert_subject)
        if caller is None:
            raise AuthError(False, "the client certificate names no known caller")
    else:
        raise AuthError(False, "credentials are required: a bearer token or a client certificate")
    if not caller.may_call(method):
        raise AuthError(
            True, f"caller {caller.name} may not call {method.rsplit('/', 1)[-1]}", caller.name
        )
    return on_behalf_of(caller, metadata)


def on_behalf_of(caller: Caller, metadata: Sequence[tuple[str, str | bytes]]) -> Caller:
    """`caller`, or the person a delegate acts for as "<caller>:<person>"."""
    named = [value for key, value in metadata if key == ON_BEHALF_OF]
    if not named:
        return caller
    where = {"header": ON_BEHALF_OF}
    if not caller.delegate:
        raise AuthError(
            True, f"caller {caller.name} may not act on behalf of others", caller.name, where
        )
    person = named[0]
    if len(named) > 1 or not isinstance(person, str) or not _PERSON.fullmatch(person):
        raise AuthError(
            False,
            f"{ON_BEHALF_OF} must be one value of 1-64 of A-Z a-z 0-9 . _ @ -",
            caller.name,
            where,
        )
    return Caller(f"{caller.name}:{person}", caller.roles)
