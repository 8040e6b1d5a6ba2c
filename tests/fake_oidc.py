"""A small OpenID Connect provider for the console's tests, served over real HTTP.

It answers discovery, the authorization endpoint (which signs in whoever the
test named with `sign_in_as`, at once), the token endpoint (authorization
code grant with the client's secret, RS256 ID tokens) and the key set.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

from flask import Flask, abort, jsonify, redirect, request
from joserfc import jwt
from joserfc.jwk import RSAKey
from werkzeug.serving import make_server


@dataclass
class FakeOidcProvider:
    client_id: str = "phonebind-console"
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # The claims of the next person to sign in; None refuses sign-in.
    person: dict[str, str] | None = None
    # Tamper with the ID token: "wrong-audience" or "wrong-key".
    spoil: str | None = None
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    token_requests: int = 0

    def __post_init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "fake-1"})
        self.other_key = RSAKey.generate_key(2048, parameters={"kid": "fake-1"})
        self.app = self._app()
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.issuer = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def metadata_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def start(self) -> FakeOidcProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(10)

    def sign_in_as(self, **claims: str) -> None:
        self.person = claims

    def _id_token(self, nonce: str, claims: dict[str, str]) -> str:
        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "sub": claims.get("preferred_username", "someone"),
            "aud": "another-client" if self.spoil == "wrong-audience" else self.client_id,
            "iat": now,
            "exp": now + 300,
            "nonce": nonce,
            **claims,
        }
        key = self.other_key if self.spoil == "wrong-key" else self.key
        return jwt.encode({"alg": "RS256", "kid": "fake-1"}, payload, key)

    def _app(self) -> Flask:
        app = Flask("fake_oidc")

        @app.get("/.well-known/openid-configuration")
        def discovery():
            return jsonify(
                issuer=self.issuer,
                authorization_endpoint=f"{self.issuer}/authorize",
                token_endpoint=f"{self.issuer}/token",
                jwks_uri=f"{self.issuer}/jwks",
                response_types_supported=["code"],
                subject_types_supported=["public"],
                id_token_signing_alg_values_supported=["RS256"],
                token_endpoint_auth_methods_supported=["client_secret_basic"],
            )

        @app.get("/jwks")
        def jwks():
            return jsonify(keys=[self.key.as_dict(private=False)])

        @app.get("/authorize")
        def authorize():
            args = request.args
            if args.get("client_id") != self.client_id or args.get("response_type") != "code":
                abort(400)
            if self.person is None:
                query = urlencode({"error": "access_denied", "state": args["state"]})
                return redirect(f"{args['redirect_uri']}?{query}")
            code = secrets.token_urlsafe(16)
            self.codes[code] = {
                "nonce": args.get("nonce", ""),
                "redirect_uri": args["redirect_uri"],
                **{f"claim:{k}": v for k, v in self.person.items()},
            }
            query = urlencode({"code": code, "state": args["state"]})
            return redirect(f"{args['redirect_uri']}?{query}")

        @app.post("/token")
        def token():
            self.token_requests += 1
            auth = request.authorization
            if auth is None or (auth.username, auth.password) != (
                self.client_id,
                self.client_secret,
            ):
                return jsonify(error="invalid_client"), 401
            grant = self.codes.pop(request.form.get("code", ""), None)
            if grant is None or grant["redirect_uri"] != request.form.get("redirect_uri"):
                return jsonify(error="invalid_grant"), 400
            claims = {k[6:]: v for k, v in grant.items() if k.startswith("claim:")}
            return jsonify(
                access_token=secrets.token_urlsafe(16),
                token_type="Bearer",
                expires_in=300,
                id_token=self._id_token(grant["nonce"], claims),
            )

        return app
