"""phonebind-console: the reviewers' web console, served by waitress.

    phonebind-console --dev                       # beside `make run`'s server
    phonebind-console --target phonebind:50051 --ca-file ca.pem --token-file console.token \\
        --secret-key-file session.key --public-url https://review.example \\
        --proxy-header X-WEBAUTH-USER --trusted-proxies 10.0.0.0/24

Each option also reads PHONEBIND_CONSOLE_<OPTION> (e.g. PHONEBIND_CONSOLE_TARGET).
Without --dev it refuses to start without TLS to phonebind, a credential, a
session key, an https:// public URL and a way to sign in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from .config import ConfigError, ConsoleConfig, OidcConfig, parse_networks

__all__ = ["config_from_args", "main"]

_LOG_FIELDS = ("person", "method", "rebind_id", "decision", "reason", "remote_addr")


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message and the console's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _LOG_FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("PHONEBIND_CONSOLE_" + name.upper().replace("-", "_"), default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phonebind-console",
        description="The reviewers' web console for phonebind.",
    )
    parser.add_argument(
        "--dev",
        action="store_true",
        default=_env("dev") == "1",
        help="development: plaintext gRPC allowed, a 'sign in as' form, a random session key",
    )
    parser.add_argument(
        "--listen", default=_env("listen", "127.0.0.1:8080"), help="HOST:PORT to serve HTTP on"
    )
    parser.add_argument(
        "--public-url",
        default=_env("public-url"),
        help="where people reach the console (https:// turns on secure cookies)",
    )

    grpc_group = parser.add_argument_group("phonebind")
    grpc_group.add_argument(
        "--target", default=_env("target", "127.0.0.1:50051"), help="phonebind's HOST:PORT"
    )
    grpc_group.add_argument("--token-file", default=_env("token-file"), help="the bearer token")
    grpc_group.add_argument("--tls", action="store_true", help="TLS with the default root CAs")
    grpc_group.add_argument("--ca-file", default=_env("ca-file"), help="trust this CA (PEM)")
    grpc_group.add_argument("--cert", default=_env("cert"), help="client certificate (PEM)")
    grpc_group.add_argument("--key", default=_env("key"), help="its private key (PEM)")
    grpc_group.add_argument("--server-name", default=_env("server-name"))
    grpc_group.add_argument("--timeout", type=float, default=10.0, help="seconds per call")

    sign_in = parser.add_argument_group("signing in")
    sign_in.add_argument(
        "--secret-key-file",
        default=_env("secret-key-file"),
        help="signs session cookies (at least 32 bytes)",
    )
    sign_in.add_argument(
        "--proxy-header",
        default=_env("proxy-header"),
        help="the header an authenticating proxy names the person in, e.g. X-WEBAUTH-USER",
    )
    sign_in.add_argument(
        "--trusted-proxies",
        default=_env("trusted-proxies", ""),
        help="comma-separated addresses/CIDRs the proxy header is believed from",
    )
    sign_in.add_argument(
        "--oidc-metadata-url",
        default=_env("oidc-metadata-url"),
        help="the OpenID provider's .well-known/openid-configuration URL",
    )
    sign_in.add_argument("--oidc-client-id", default=_env("oidc-client-id"))
    sign_in.add_argument(
        "--oidc-client-secret-file",
        default=_env("oidc-client-secret-file"),
        help="file holding the client secret",
    )
    sign_in.add_argument(
        "--oidc-username-claim",
        default=_env("oidc-username-claim", "preferred_username"),
        help="the ID token claim that names the person",
    )
    return parser


def _read(parser: argparse.ArgumentParser, option: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        parser.error(f"{option}: cannot read {path}: {error.strerror}")


def config_from_args(argv: Sequence[str] | None = None) -> tuple[ConsoleConfig, str]:
    """The console's settings and its listen address from the command line."""
    parser = _parser()
    args = parser.parse_args(argv)
    token = _read(parser, "--token-file", args.token_file)
    secret = _read(parser, "--secret-key-file", args.secret_key_file)
    oidc = None
    if args.oidc_metadata_url:
        client_secret = _read(parser, "--oidc-client-secret-file", args.oidc_client_secret_file)
        if not args.oidc_client_id or client_secret is None:
            parser.error("OpenID Connect needs --oidc-client-id and --oidc-client-secret-file")
        oidc = OidcConfig(
            metadata_url=args.oidc_metadata_url,
            client_id=args.oidc_client_id,
            client_secret=client_secret.decode().strip(),
            username_claim=args.oidc_username_claim,
        )
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    try:
        networks = parse_networks(args.trusted_proxies or "")
    except ConfigError as error:
        parser.error(str(error))
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error("--listen takes HOST:PORT")
    public_url = args.public_url or f"http://{args.listen}"
    config = ConsoleConfig(
        target=args.target,
        token=token.decode().strip() if token else None,
        tls=args.tls,
        ca_pem=_read(parser, "--ca-file", args.ca_file),
        client_cert_pem=_read(parser, "--cert", args.cert),
        client_key_pem=_read(parser, "--key", args.key),
        server_name=args.server_name,
        grpc_timeout=args.timeout,
        secret_key=secret.strip() if secret else b"",
        public_url=public_url,
        proxy_header=args.proxy_header or None,
        proxy_networks=networks,
        oidc=oidc,
        dev=args.dev,
    )
    return config, args.listen


def main(argv: Sequence[str] | None = None) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    config, listen = config_from_args(argv)

    import waitress

    from .app import create_app

    try:
        app = create_app(config)
    except ConfigError as error:
        print(f"phonebind-console: refusing to start: {error}", file=sys.stderr)
        return 2
    host, _, port = listen.rpartition(":")
    logging.getLogger("phonebind.console").info(
        "serving on http://%s (phonebind at %s%s)",
        listen,
        config.target,
        ", development mode" if config.dev else "",
    )
    waitress.serve(
        app,
        host=host.strip("[]"),
        port=int(port),
        threads=8,
        url_scheme="https" if config.secure else "http",
        ident="phonebind-console",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
