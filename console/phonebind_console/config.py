"""The console's settings, and the rules production holds them to."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["PERSON", "ConfigError", "ConsoleConfig", "OidcConfig", "check"]

# The person a delegating caller may name to phonebind (x-phonebind-on-behalf-of).
PERSON = re.compile(r"[A-Za-z0-9._@-]{1,64}")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """Settings the console refuses to start with."""


@dataclass(frozen=True)
class OidcConfig:
    """An OpenID Connect provider that signs people in (authorization code flow)."""

    # The issuer's discovery document, e.g. https://sso.example/.well-known/openid-configuration
    metadata_url: str
    client_id: str
    client_secret: str
    # The ID token claim that names the person (it must fit PERSON).
    username_claim: str = "preferred_username"
    scope: str = "openid profile email"


@dataclass(frozen=True)
class ConsoleConfig:
    # phonebind's gRPC address, HOST:PORT.
    target: str = "127.0.0.1:50051"
    # The console's own bearer token for phonebind (roles reviewer and auditor, delegate).
    token: str | None = None
    # TLS to phonebind: on when tls is set or any PEM is given.
    tls: bool = False
    ca_pem: bytes | None = None
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = None
    server_name: str | None = None
    grpc_timeout: float = 10.0

    # Signs the session cookie; random per start in development.
    secret_key: bytes = b""
    # Where people reach the console; an https:// URL turns on Secure and
    # __Host- cookies and HSTS.
    public_url: str = "http://127.0.0.1:8080"

    # Sign-in behind an authenticating reverse proxy: the header that names the
    # person, believed only from these addresses.
    proxy_header: str | None = None
    proxy_networks: tuple[Network, ...] = field(default_factory=tuple)
    oidc: OidcConfig | None = None
    # A plain "sign in as" form, for development only.
    dev: bool = False

    @property
    def secure(self) -> bool:
        return urlsplit(self.public_url).scheme == "https"

    @property
    def grpc_tls(self) -> bool:
        return self.tls or bool(self.ca_pem or self.client_cert_pem)


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma-separated addresses or CIDR blocks, e.g. "10.0.0.0/8, ::1"."""
    networks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"not an address or CIDR block: {part!r}") from None
    return tuple(networks)


def check(config: ConsoleConfig) -> None:
    """Refuses settings a production console must not run with (all problems at once)."""
    problems = []
    if config.proxy_header and not config.proxy_networks:
        problems.append("a proxy header needs the proxy addresses it is believed from")
    if config.proxy_networks and not config.proxy_header:
        problems.append("proxy addresses need the proxy header")
    if urlsplit(config.public_url).scheme not in ("http", "https"):
        problems.append("the public URL must be http:// or https://")
    if not config.dev:
        if not (config.proxy_header or config.oidc):
            problems.append("no way to sign in (set a proxy header or OpenID Connect)")
        if not config.token and not config.client_cert_pem:
            problems.append("no credential for phonebind (a token or a client certificate)")
        if not config.grpc_tls:
            problems.append("phonebind must be reached over TLS")
        if not config.secure:
            problems.append("the public URL must be https://")
        if len(config.secret_key) < 32:
            problems.append("the session secret key must be at least 32 bytes")
    if problems:
        raise ConfigError("; ".join(problems))
