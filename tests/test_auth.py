"""Callers and roles, bearer tokens, TLS and mutual TLS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from conftest import start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import RPCS, error_details, rows, wait_until

from phonebind.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    binding_service_pb2,
)
from phonebind_client import PhonebindClient, PhonebindError
from phonebind_server import cli
from phonebind_server.devcerts import cert_pem, issue, key_pem, make_ca
from phonebind_server.rpc.auth import (
    ROLES,
    RPC_ROLES,
    Credentials,
    CredentialsError,
    new_token,
    token_digest,
)

METHODS = {path: request for path, (request, _) in RPCS.items()}
TOKENS = {role: new_token() for role in sorted(ROLES)}


def credentials_file(tmp_path, extra: str = "") -> str:
    entries = [
        f'[[caller]]\nname = "svc-{role}"\nroles = ["{role}"]\n'
        f'token_sha256 = "{token_digest(token)}"\n'
        for role, token in TOKENS.items()
    ]
    path = tmp_path / "callers.toml"
    path.write_text("\n".join(entries) + extra, encoding="utf-8")
    return str(path)


@pytest.fixture
def guarded(database_url, tmp_path, clock, secrets_seen):
    running = start_server(
        database_url, tmp_path, clock, secrets_seen, credentials_file=credentials_file(tmp_path)
    )
    yield running
    running.stop()


def call(channel: grpc.Channel, method: str, metadata=()):
    request_class = METHODS[method]
    stub = channel.unary_unary(
        method,
        request_serializer=request_class.SerializeToString,
        response_deserializer=lambda raw: raw,
    )
    return stub(
        request_class(account_id="nobody")
        if "account_id" in request_class.DESCRIPTOR.fields_by_name
        else request_class(),
        metadata=metadata,
        timeout=10,
    )


def bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


def test_every_method_is_in_the_role_table():
    assert set(METHODS) == set(RPC_ROLES)


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_against_each_rpc(guarded, role):
    for method, allowed in RPC_ROLES.items():
        try:
            call(guarded.channel, method, bearer(TOKENS[role]))
            outcome = grpc.StatusCode.OK
        except grpc.RpcError as error:
            outcome = error.code()
        if role in allowed:
            # Past the door: the service itself answers (bad input, not found, or OK),
            # and never with a crash or an outage.
            assert outcome not in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.UNAVAILABLE,
            ), (method, outcome)
        else:
            assert outcome == grpc.StatusCode.PERMISSION_DENIED, method


def test_missing_wrong_and_malformed_tokens_are_unauthenticated(guarded):
    method = "/phonebind.v1.BindingService/GetAccount"
    for metadata in [(), bearer("pbt_not-a-real-token"), (("authorization", "Basic abc"),)]:
        with pytest.raises(grpc.RpcError) as caught:
            call(guarded.channel, method, metadata)
        code, reason, _ = error_details(caught.value)
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


def test_two_authorization_headers_are_unauthenticated_whatever_their_order(guarded):
    """A proxy that checks only the first header would disagree with a service
    that took the last: neither is taken."""
    method = "/phonebind.v1.BindingService/GetAccount"
    good, bad = bearer(TOKENS["reader"]), bearer("pbt_not-a-real-token")
    for metadata in [good + bad, bad + good, good + good]:
        with pytest.raises(grpc.RpcError) as caught:
            call(guarded.channel, method, metadata)
        code, reason, details = error_details(caught.value)
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        assert details["ErrorInfo"].domain == "phonebind.v1"
        assert "more than one authorization header" in caught.value.details()
    # One of them alone is let in (the account does not exist).
    with pytest.raises(grpc.RpcError) as caught:
        call(guarded.channel, method, good)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_certificate_subject_listed_twice_is_refused_like_a_token():
    entry = {"roles": ["reader"], "cert_subject": "CN=reader-svc,O=bank"}
    with pytest.raises(
        CredentialsError, match="cert_subject 'CN=reader-svc,O=bank' is listed twice"
    ):
        Credentials.from_document(
            {
                "caller": [
                    {**entry, "name": "reader-a"},
                    # The same subject, spelled with spaces, for another caller.
                    {**entry, "name": "reader-b", "cert_subject": "CN=reader-svc, O=bank"},
                ]
            }
        )
    token = {"roles": ["reader"], "token_sha256": token_digest(new_token())}
    with pytest.raises(CredentialsError, match="token used twice"):
        Credentials.from_document({"caller": [{**token, "name": "a"}, {**token, "name": "b"}]})


def test_a_cert_subject_needs_mutual_tls_at_start_and_on_reload(
    database_url, tmp_path, clock, secrets_seen, pki
):
    _, files = pki
    entry = (
        '\n[[caller]]\nname = "cert-reader"\nroles = ["reader"]\ncert_subject = "CN=reader-svc"\n'
    )
    with_subject = credentials_file(tmp_path, entry)
    for tls in ({}, {"tls_cert": files["cert"], "tls_key": files["key"]}):
        with pytest.raises(
            CredentialsError, match="cert-reader have a cert_subject, which needs tls_client_ca"
        ):
            start_server(
                database_url, tmp_path, clock, secrets_seen, credentials_file=with_subject, **tls
            )
    # A reload that brings in such a caller is refused; the callers in force stay.
    (tmp_path / "callers.toml").unlink()
    running = start_server(
        database_url, tmp_path, clock, secrets_seen, credentials_file=credentials_file(tmp_path)
    )
    try:
        credentials_file(tmp_path, entry)
        assert running.app.reload() is False
        with pytest.raises(grpc.RpcError) as caught:
            call(
                running.channel, "/phonebind.v1.BindingService/GetAccount", bearer(TOKENS["reader"])
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        running.stop()


def test_an_unparseable_request_from_a_stranger_is_unauthenticated(guarded):
    raw = guarded.channel.unary_unary("/phonebind.v1.BindingService/CompleteRebind")
    with pytest.raises(grpc.RpcError) as caught:
        raw(b"\x0a\x02\xc3\x28", timeout=10)  # account_id holding bad UTF-8
    code, reason, _ = error_details(caught.value)
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


def test_permission_is_checked_before_any_lookup(guarded):
    """A refused caller learns nothing: a real and a missing account answer alike."""
    guarded.api.stub.RegisterAccount(
        binding_service_pb2.RegisterAccountRequest(
            account_id="real",
            holder_name="张三",
            id_number="11010519491231002X",
            phone="13800138701",
        ),
        metadata=bearer(TOKENS["kyc"]),
    )
    guarded.secrets.add_phone("13800138701")
    answers = []
    for account in ["real", "missing"]:
        with pytest.raises(grpc.RpcError) as caught:
            guarded.api.stub.StartRebind(
                binding_service_pb2.StartRebindRequest(account_id=account, new_phone="13900139701"),
                metadata=bearer(TOKENS["reader"]),
            )
        answers.append((caught.value.code(), caught.value.details()))
    assert answers[0] == answers[1]
    assert answers[0][0] == grpc.StatusCode.PERMISSION_DENIED


def test_a_token_speaks_for_its_own_caller_only(guarded):
    audit = audit_service_pb2_grpc.AuditServiceStub(guarded.channel)
    with pytest.raises(grpc.RpcError) as caught:
        call(
            guarded.channel, "/phonebind.v1.BindingService/RegisterAccount", bearer(TOKENS["flow"])
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    refused = audit.ListAuditEvents(
        audit_service_pb2.ListAuditEventsRequest(action="CALL_REFUSED"),
        metadata=bearer(TOKENS["auditor"]),
    ).events
    assert [(e.caller, e.outcome) for e in refused] == [("svc-flow", "PERMISSION_DENIED")]


@pytest.mark.parametrize("name", ["s" * 129, "svc\nforged-line", "svc\x1b[31m"])
def test_a_caller_name_must_be_short_and_printable(name):
    entry = {"roles": ["reader"], "token_sha256": token_digest(new_token())}
    with pytest.raises(CredentialsError, match="at most 128 printable characters"):
        Credentials.from_document({"caller": [{**entry, "name": name}]})


def test_the_token_command_prints_an_entry_the_credentials_file_accepts(tmp_path, capsys):
    assert cli.main(["token", "--name", "loan-app-backend", "--roles", "flow,reader"]) == 0
    printed = capsys.readouterr().out
    token = printed.split("token: ", 1)[1].split("\n", 1)[0]
    (tmp_path / "callers.toml").write_text(printed.split("\n\n", 1)[1], encoding="utf-8")
    caller = Credentials.load(str(tmp_path / "callers.toml")).by_token(token)
    assert (caller.name, caller.roles) == ("loan-app-backend", frozenset({"flow", "reader"}))

    assert cli.main(["token", "--name", "s" * 129, "--roles", "flow"]) == 2
    assert "at most 128 printable characters" in capsys.readouterr().err


def test_a_delegate_token_entry_is_marked_and_leaves_room_for_a_person(tmp_path, capsys):
    assert cli.main(["token", "--name", "console", "--roles", "reviewer", "--delegate"]) == 0
    printed = capsys.readouterr().out
    token = printed.split("token: ", 1)[1].split("\n", 1)[0]
    assert "delegate = true" in printed
    (tmp_path / "callers.toml").write_text(printed.split("\n\n", 1)[1], encoding="utf-8")
    caller = Credentials.load(str(tmp_path / "callers.toml")).by_token(token)
    assert (caller.name, caller.delegate) == ("console", True)

    assert cli.main(["token", "--name", "c" * 64, "--roles", "reviewer", "--delegate"]) == 2
    assert "at most 63 characters" in capsys.readouterr().err
    entry = {"name": "console", "roles": ["reviewer"], "token_sha256": token_digest(token)}
    with pytest.raises(CredentialsError, match="delegate must be true or false"):
        Credentials.from_document({"caller": [{**entry, "delegate": "yes"}]})


def test_the_longest_caller_name_fits_the_audit_trail(database_url, tmp_path, clock, secrets_seen):
    """128 characters (not bytes: CJK here) is what the audit trail's caller column holds."""
    name, token = "录" * 128, new_token()
    extra = (
        f'\n[[caller]]\nname = "{name}"\nroles = ["kyc"]\ntoken_sha256 = "{token_digest(token)}"\n'
    )
    running = start_server(
        database_url,
        tmp_path,
        clock,
        secrets_seen,
        credentials_file=credentials_file(tmp_path, extra),
    )
    try:
        running.api.stub.RegisterAccount(
            binding_service_pb2.RegisterAccountRequest(
                account_id="long-name",
                holder_name="张三",
                id_number="11010519491231002X",
                phone="13800138702",
            ),
            metadata=bearer(token),
        )
        running.secrets.add_phone("13800138702")
        events = (
            audit_service_pb2_grpc.AuditServiceStub(running.channel)
            .ListAuditEvents(
                audit_service_pb2.ListAuditEventsRequest(account_id="long-name"),
                metadata=bearer(TOKENS["auditor"]),
            )
            .events
        )
        assert [(e.action, e.caller) for e in events] == [("ACCOUNT_REGISTERED", name)]
    finally:
        running.stop()


def test_a_refusal_the_audit_trail_cannot_record_is_still_answered(guarded, caplog):
    """The audit insert fails for a reason other than an outage: the caller still
    gets UNAUTHENTICATED with its ErrorInfo, and the failure is logged."""
    url = guarded.database_url
    postgresql = guarded.app.store.dialect == "postgresql"
    if postgresql:
        rows(
            url,
            "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'audit refused'; END $$",
        )
        rows(
            url,
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events"
            " FOR EACH ROW EXECUTE FUNCTION refuse_audit()",
        )
    else:
        rows(
            url,
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events"
            " BEGIN SELECT RAISE(ABORT, 'audit refused'); END",
        )
    try:
        with pytest.raises(grpc.RpcError) as caught:
            call(guarded.channel, "/phonebind.v1.BindingService/GetAccount", bearer("pbt_forged"))
    finally:  # the PostgreSQL database outlives this test
        rows(url, "DROP TRIGGER refuse_audit" + (" ON audit_events" if postgresql else ""))
        if postgresql:
            rows(url, "DROP FUNCTION refuse_audit()")
    code, reason, _ = error_details(caught.value)
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    assert "refusal not audited" in [r.getMessage() for r in caplog.records]


def test_strangers_cannot_grow_the_audit_trail_at_will(database_url, tmp_path, clock, secrets_seen):
    """Unauthenticated refusals: 5 a minute per source address get an event each,
    the rest one CALLS_REFUSED event per source and minute (also for the minute
    still running when the server stops). Known callers' refusals all get one."""
    running = start_server(
        database_url,
        tmp_path,
        clock,
        secrets_seen,
        credentials_file=credentials_file(tmp_path),
        unauthenticated_audit_per_minute=5,
        health_interval_seconds=0.05,
    )
    url = running.database_url

    def events(action: str) -> list[tuple[str, str]]:
        return rows(
            url, "SELECT outcome, details FROM audit_events WHERE action = ? ORDER BY seq", action
        )

    def refuse(token: str, count: int, method: str = "GetAccount") -> None:
        for _ in range(count):
            with pytest.raises(grpc.RpcError) as caught:
                call(running.channel, f"/phonebind.v1.BindingService/{method}", bearer(token))
            assert error_details(caught.value)[0] in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            )

    try:
        refuse("pbt_forged", 12)
        refuse(TOKENS["reader"], 8, "RegisterAccount")  # a known caller: never summarised
        assert [o for o, _ in events("CALL_REFUSED")] == ["UNAUTHENTICATED"] * 5 + [
            "PERMISSION_DENIED"
        ] * 8
        assert events("CALLS_REFUSED") == []

        clock.advance(timedelta(seconds=60))
        wait_until(lambda: events("CALLS_REFUSED") != [], 10, "the minute's summary")
        ((outcome, details),) = events("CALLS_REFUSED")
        assert outcome == "UNAUTHENTICATED"
        assert json.loads(details) == {
            "refusals": "7",
            "since": (clock.now() - timedelta(seconds=60)).isoformat(),
            "source": "127.0.0.1",
        }

        refuse("pbt_forged", 9)  # a new minute: 5 events, 4 counted
        assert len(events("CALL_REFUSED")) == 5 + 8 + 5
    finally:
        running.stop()
    assert [json.loads(d)["refusals"] for _, d in events("CALLS_REFUSED")] == ["7", "4"]
    binary = os.path.join(os.path.dirname(sys.executable), "phonebind-server")
    verified = subprocess.run(
        [binary, "audit", "verify", "--dev", "--database-url", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_health_stays_open_and_the_client_sends_its_token(guarded):
    health = health_pb2_grpc.HealthStub(guarded.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == 1
    with PhonebindClient(guarded.target, token=TOKENS["reader"]) as client:
        with pytest.raises(PhonebindError) as caught:
            client.get_account("nobody")
        assert caught.value.reason == "ACCOUNT_NOT_FOUND"


# -- TLS and mutual TLS ------------------------------------------------------------


@pytest.fixture
def pki(tmp_path):
    ca = make_ca()
    server = issue(ca, "localhost", server=True)
    files = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server-key.pem",
    }
    files["ca"].write_bytes(cert_pem(ca[0]))
    files["cert"].write_bytes(cert_pem(server[0]))
    files["key"].write_bytes(key_pem(server[1]))
    return ca, {k: str(v) for k, v in files.items()}


def client_credentials(ca_pem: bytes, client=None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_pem)
    cert, key = client
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem(key), certificate_chain=cert_pem(cert)
    )


def test_tls_with_bearer_token(database_url, tmp_path, clock, secrets_seen, pki):
    ca, files = pki
    running = start_server(
        database_url,
        tmp_path,
        clock,
        secrets_seen,
        credentials_file=credentials_file(tmp_path),
        tls_cert=files["cert"],
        tls_key=files["key"],
    )
    try:
        target = f"localhost:{running.app.port}"
        with PhonebindClient(
            target, credentials=client_credentials(cert_pem(ca[0])), token=TOKENS["reader"]
        ) as client:
            with pytest.raises(PhonebindError) as caught:
                client.get_account("nobody")
            assert caught.value.reason == "ACCOUNT_NOT_FOUND"
        with grpc.insecure_channel(target) as plain, pytest.raises(grpc.RpcError) as caught:
            call(plain, "/phonebind.v1.BindingService/GetAccount", bearer(TOKENS["reader"]))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_mutual_tls_maps_the_certificate_to_a_caller(
    database_url, tmp_path, clock, secrets_seen, pki
):
    ca, files = pki
    extra = (
        '\n[[caller]]\nname = "cert-reader"\nroles = ["reader"]\ncert_subject = "CN=reader-svc"\n'
    )
    running = start_server(
        database_url,
        tmp_path,
        clock,
        secrets_seen,
        credentials_file=credentials_file(tmp_path, extra),
        tls_cert=files["cert"],
        tls_key=files["key"],
        tls_client_ca=files["ca"],
    )
    ca_pem = cert_pem(ca[0])
    target = f"localhost:{running.app.port}"
    now = datetime.now(UTC)

    def get_account(credentials) -> grpc.StatusCode:
        with grpc.secure_channel(target, credentials) as channel:
            try:
                call(channel, "/phonebind.v1.BindingService/GetAccount")
            except grpc.RpcError as error:
                return error.code()
        return grpc.StatusCode.OK

    try:
        good = issue(ca, "reader-svc", server=False)
        assert get_account(client_credentials(ca_pem, good)) == grpc.StatusCode.NOT_FOUND
        stranger = issue(ca, "someone-else", server=False)
        assert get_account(client_credentials(ca_pem, stranger)) == grpc.StatusCode.UNAUTHENTICATED
        # The handshake itself fails: no certificate, an untrusted CA, an expired certificate.
        assert get_account(client_credentials(ca_pem)) == grpc.StatusCode.UNAVAILABLE
        rogue = issue(make_ca("rogue CA"), "reader-svc", server=False)
        assert get_account(client_credentials(ca_pem, rogue)) == grpc.StatusCode.UNAVAILABLE
        expired = issue(
            ca,
            "reader-svc",
            server=False,
            not_before=now - timedelta(days=30),
            not_after=now - timedelta(days=1),
        )
        assert get_account(client_credentials(ca_pem, expired)) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()
