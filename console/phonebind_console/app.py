"""The reviewers' web console: a Flask application over phonebind's gRPC API.

Every page is rendered on the server and works without JavaScript. The
console reaches phonebind only through the client facade, with its own
credential (roles reviewer and auditor, marked delegate); each call names the
signed-in person (x-phonebind-on-behalf-of), so phonebind records decisions,
audit events and log lines as "<console caller>:<person>".

People sign in through an authenticating reverse proxy that names them in a
header (believed only from the configured proxy addresses), through OpenID
Connect, or, in development, with a plain "sign in as" form.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import secrets
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import grpc
import requests
from authlib.integrations.base_client import OAuthError
from flask import (
    Flask,
    abort,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf.csrf import CSRFError, CSRFProtect
from joserfc.errors import JoseError
from werkzeug.wrappers import Response

from phonebind.v1 import resources_pb2, review_service_pb2
from phonebind_client import PhonebindClient, PhonebindError

from . import i18n
from .config import PERSON, ConsoleConfig, check
from .forms import ApproveForm, LanguageForm, RejectForm, SignInForm, SignOutForm

__all__ = ["create_app", "grpc_client"]

log = logging.getLogger("phonebind.console")

LANGUAGE_COOKIE = "phonebind-console-language"
# At most this many reviews per list on the queue page, and audit events on a detail page.
QUEUE_LIMIT = 200
AUDIT_LIMIT = 100
_OPEN_PAGES = frozenset(
    {"sign_in", "oidc_sign_in", "oidc_callback", "language", "static", "health"}
)
_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def grpc_client(config: ConsoleConfig) -> PhonebindClient:
    """The console's own client of phonebind, shared by every request."""
    credentials = None
    if config.grpc_tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=config.ca_pem,
            private_key=config.client_key_pem,
            certificate_chain=config.client_cert_pem,
        )
    options = [("grpc.ssl_target_name_override", config.server_name)] if config.server_name else []
    return PhonebindClient(
        config.target,
        credentials=credentials,
        options=options,
        token=config.token,
        timeout=config.grpc_timeout,
    )


def _cookie_name(base: str, secure: bool) -> str:
    # __Host-: the browser keeps it only if Secure, Path=/ and without Domain.
    return f"__Host-{base}" if secure else base


def _local_path(target: str | None) -> str:
    """`target` if it is a path on this site, else the queue (no open redirects)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("queue")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return url_for("queue")
    return target


def create_app(config: ConsoleConfig, client: PhonebindClient | None = None) -> Flask:
    """The console's WSGI application; `client` defaults to one built from `config`."""
    check(config)
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=config.secret_key or secrets.token_bytes(32),
        SESSION_COOKIE_NAME=_cookie_name("phonebind-console", config.secure),
        SESSION_COOKIE_SECURE=config.secure,
        SESSION_COOKIE_HTTPONLY=True,
        # Lax, not Strict: the OpenID provider's redirect back must carry the session.
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=8 * 3600,
        PREFERRED_URL_SCHEME="https" if config.secure else "http",
        WTF_CSRF_TIME_LIMIT=8 * 3600,
    )
    pb = client if client is not None else grpc_client(config)
    language_cookie = _cookie_name(LANGUAGE_COOKIE, config.secure)
    networks = config.proxy_networks

    oauth_client: Any = None
    username_claim = config.oidc.username_claim if config.oidc else ""
    if config.oidc is not None:
        from authlib.integrations.flask_client import OAuth  # only with OpenID Connect

        oauth = OAuth(app)
        oauth_client = oauth.register(
            name="oidc",
            client_id=config.oidc.client_id,
            client_secret=config.oidc.client_secret,
            server_metadata_url=config.oidc.metadata_url,
            client_kwargs={"scope": config.oidc.scope},
        )

    # -- who is asking, in which language ------------------------------------------------

    def from_trusted_proxy() -> bool:
        try:
            address = ipaddress.ip_address(request.remote_addr or "")
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in networks)

    def language() -> str:
        chosen = request.cookies.get(language_cookie)
        if chosen in i18n.LANGUAGES:
            return chosen
        # Highest quality first; any Chinese is served in simplified Chinese.
        for tag, _quality in request.accept_languages:
            primary = tag.lower().split("-")[0]
            if primary in ("zh", "en"):
                return "zh-CN" if primary == "zh" else "en"
        return i18n.DEFAULT_LANGUAGE

    def forbidden(text: str) -> tuple[str, int]:
        return render_template("error.html", message=_(text)), 403

    def _(text: str) -> str:
        return i18n.translate(text, g.language)

    @app.before_request
    def identify() -> Any:
        g.language = language()
        g.user = None
        g.user_from_proxy = False
        if config.proxy_header and config.proxy_header in request.headers:
            if not from_trusted_proxy():
                log.warning(
                    "sign-in header refused from an untrusted address",
                    extra={"remote_addr": request.remote_addr},
                )
                return forbidden(
                    "The sign-in header came from an address that is not a trusted proxy."
                )
            person = request.headers[config.proxy_header].strip()
            if not PERSON.fullmatch(person):
                return forbidden("Use 1-64 of the letters A-Z a-z, digits and . _ @ -")
            if session.get("user") != person:
                session.clear()
                session["user"] = person
                log.info("signed in", extra={"person": person, "method": "proxy"})
            g.user, g.user_from_proxy = person, True
        else:
            g.user = session.get("user")
        if g.user is None and request.endpoint not in _OPEN_PAGES:
            if request.method == "GET":
                return redirect(url_for("sign_in", next=request.full_path))
            return redirect(url_for("sign_in"), 303)
        return None

    # After identify(): a refused form is answered in the person's language.
    CSRFProtect(app)

    @app.after_request
    def protect(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        # same-origin, not no-referrer: Flask-WTF checks the Referer on HTTPS.
        response.headers["Referrer-Policy"] = "same-origin"
        if request.endpoint != "static":
            response.headers["Cache-Control"] = "no-store"
        if config.secure:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        response.vary.add("Accept-Language")
        response.vary.add("Cookie")
        return response

    @app.context_processor
    def page_context() -> dict[str, Any]:
        return {
            "_": _,
            "language": g.get("language", i18n.DEFAULT_LANGUAGE),
            "user": g.get("user"),
            "user_from_proxy": g.get("user_from_proxy", False),
            "label": lambda kind, value: i18n.enum_label(kind, value, g.language),
            "when": i18n.when,
            "age": lambda duration: i18n.age(duration, g.language),
            "language_form": LanguageForm(),
            "sign_out_form": SignOutForm(),
            "dev": config.dev,
            "oidc": oauth_client is not None,
        }

    def desk() -> PhonebindClient:
        """The console's client acting for the signed-in person, in their language."""
        return pb.with_options(language=g.language, on_behalf_of=g.user)

    # -- errors --------------------------------------------------------------------------

    @app.errorhandler(CSRFError)
    def csrf_refused(error: CSRFError) -> tuple[str, int]:
        log.warning("form refused: %s", error.description, extra={"person": g.get("user")})
        message = _(
            "The form was not sent from this page, or it has expired. "
            "Reload the page and try again."
        )
        return render_template("error.html", message=message), 400

    @app.errorhandler(PhonebindError)
    def phonebind_refused(error: PhonebindError) -> tuple[str, int]:
        if error.code == grpc.StatusCode.NOT_FOUND:
            return render_template("error.html", message=_("Not found.")), 404
        if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.warning("phonebind unavailable: %s", error.code.name)
            message = _("phonebind cannot be reached right now. Try again shortly.")
            return render_template("error.html", message=message), 503
        log.warning("phonebind refused: %s %s", error.code.name, error.reason)
        return render_template("error.html", message=refusal(error)), 502

    def refusal(error: PhonebindError) -> str:
        text = error.localized_message or error.message
        return f"{_('phonebind refused')}: {error.reason or error.code.name} — {text}"

    @app.errorhandler(404)
    def not_found(_error: Exception) -> tuple[str, int]:
        return render_template("error.html", message=_("Not found.")), 404

    # -- sign in and out -----------------------------------------------------------------

    @app.route("/login", methods=["GET", "POST"])
    def sign_in() -> Any:
        if g.user is not None:
            return redirect(_local_path(request.args.get("next")))
        form = SignInForm() if config.dev else None
        if form is not None and form.validate_on_submit():
            session.clear()
            session["user"] = form.person.data
            log.info("signed in", extra={"person": form.person.data, "method": "dev"})
            return redirect(_local_path(request.args.get("next")), 303)
        status = 400 if form is not None and form.errors else 200
        if not config.dev and oauth_client is None:
            # Only the proxy signs people in; without its header, nobody is here.
            return render_template("error.html", message=_("Please sign in.")), 401
        return render_template("sign_in.html", form=form), status

    @app.route("/login/oidc")
    def oidc_sign_in() -> Any:
        if oauth_client is None:
            abort(404)
        session["next"] = _local_path(request.args.get("next"))
        redirect_uri = config.public_url.rstrip("/") + url_for("oidc_callback")
        return oauth_client.authorize_redirect(redirect_uri)

    @app.route("/oidc/callback")
    def oidc_callback() -> Any:
        if oauth_client is None:
            abort(404)
        try:
            token = oauth_client.authorize_access_token()
        except (OAuthError, JoseError, requests.RequestException) as error:
            log.warning("OpenID Connect sign-in failed: %s", type(error).__name__)
            return forbidden("Sign-in failed.")
        claims = token.get("userinfo") or {}
        person = str(claims.get(username_claim, ""))
        if not PERSON.fullmatch(person):
            log.warning("OpenID Connect sign-in without a usable name")
            return forbidden("Sign-in failed.")
        next_page = session.get("next")
        session.clear()
        session["user"] = person
        log.info("signed in", extra={"person": person, "method": "oidc"})
        return redirect(_local_path(next_page))

    @app.post("/logout")
    def sign_out() -> Any:
        if SignOutForm().validate_on_submit():
            log.info("signed out", extra={"person": g.user})
            session.clear()
        return redirect(url_for("sign_in"), 303)

    @app.post("/language", endpoint="language")
    def language_choice() -> Any:
        form = LanguageForm()
        response = redirect(_local_path(form.next.data), 303)
        if form.validate_on_submit() and form.language.data in i18n.LANGUAGES:
            response.set_cookie(
                language_cookie,
                form.language.data,
                max_age=365 * 86_400,
                secure=config.secure,
                httponly=True,
                samesite="Lax",
            )
        return response

    # -- the queue and the cases ---------------------------------------------------------

    @app.get("/")
    def home() -> Any:
        return redirect(url_for("queue"))

    @app.get("/queue")
    def queue() -> Any:
        account = request.args.get("account", "").strip()
        show = request.args.get("show", "all")
        if show not in ("all", "ready", "waiting"):
            show = "all"
        client = desk()
        lists = []
        for readiness in ("ready", "waiting"):
            if show not in ("all", readiness):
                continue
            cases = list(
                itertools.islice(
                    client.iter_reviews(readiness=readiness, account_id=account, page_size=100),
                    QUEUE_LIMIT,
                )
            )
            lists.append((readiness, cases))
        return render_template("queue.html", lists=lists, account=account, show=show)

    def case_page(rebind_id: str, approve: ApproveForm, reject: RejectForm, status: int = 200):
        client = desk()
        case = client.get_review(rebind_id)
        events: deque[Any] = deque(maxlen=AUDIT_LIMIT)
        events.extend(client.iter_audit_events(account_id=case.rebind.account_id, page_size=500))
        review = case.rebind.review
        pending = review.state == resources_pb2.REVIEW_STATE_PENDING
        mine = any(a.reviewer.endswith(f":{g.user}") for a in review.approvals)
        outstanding = [
            s for s in case.rebind.required_steps if s not in case.rebind.completed_steps
        ]
        page = render_template(
            "detail.html",
            case=case,
            events=list(reversed(events)),
            audit_limit=AUDIT_LIMIT,
            pending=pending,
            approved_by_me=mine,
            outstanding=outstanding,
            approve_form=approve,
            reject_form=reject,
            rejected=resources_pb2.REVIEW_STATE_REJECTED,
            ready=review_service_pb2.REVIEW_READINESS_READY,
        )
        return page, status

    @app.get("/reviews/<rebind_id>")
    def detail(rebind_id: str) -> Any:
        return case_page(rebind_id, ApproveForm(), RejectForm())

    def decided(rebind_id: str, decision: str, action: Any) -> Any:
        try:
            action()
        except PhonebindError as error:
            if error.code in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                log.info(
                    "decision refused",
                    extra={
                        "person": g.user,
                        "rebind_id": rebind_id,
                        "decision": decision,
                        "reason": error.reason or error.code.name,
                    },
                )
                flash(refusal(error), "error")
                return redirect(url_for("detail", rebind_id=rebind_id), 303)
            raise
        log.info(
            "decided",
            extra={"person": g.user, "rebind_id": rebind_id, "decision": decision},
        )
        flash(_("Approved.") if decision == "approve" else _("Rejected."), "done")
        return redirect(url_for("detail", rebind_id=rebind_id), 303)

    @app.post("/reviews/<rebind_id>/approve")
    def approve(rebind_id: str) -> Any:
        form = ApproveForm()
        if not form.validate_on_submit():
            return case_page(rebind_id, form, RejectForm(formdata=None), 400)
        note = (form.note.data or "").strip()
        return decided(rebind_id, "approve", lambda: desk().approve_rebind(rebind_id, note=note))

    @app.post("/reviews/<rebind_id>/reject")
    def reject(rebind_id: str) -> Any:
        form = RejectForm()
        if not form.validate_on_submit():
            return case_page(rebind_id, ApproveForm(formdata=None), form, 400)
        note = form.note.data.strip()
        return decided(rebind_id, "reject", lambda: desk().reject_rebind(rebind_id, note))

    @app.get("/healthz")
    def health() -> tuple[str, int, dict[str, str]]:
        return "ok\n", 200, {"Content-Type": "text/plain; charset=utf-8"}

    return app
