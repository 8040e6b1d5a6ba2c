"""SIGHUP reloads the callers and the TLS certificates of a production-mode
server (`serve`, and `serve --workers 2` whose supervisor passes the signal on),
without dropping calls; a bad file is refused and the old configuration stays."""

from __future__ import annotations

import base64
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from support import free_port, wait_serving, wait_until

from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import binding_service_pb2_grpc
from phonebind_server.devcerts import cert_pem, issue, key_pem, make_ca
from phonebind_server.rpc.auth import new_token, token_digest


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def caller_entry(name: str, token: str, roles: str = '"kyc", "reader"') -> str:
    return (
        f'[[caller]]\nname = "{name}"\nroles = [{roles}]\ntoken_sha256 = "{token_digest(token)}"\n'
    )


def replace_file(path: Path, content: bytes) -> None:
    """As an operator's tooling should: the new file renamed over the old one."""
    staged = path.with_suffix(".new")
    staged.write_bytes(content)
    os.replace(staged, path)


class ProductionServer:
    """`phonebind-server serve` in production mode (TLS, caller credentials,
    real keys) as a child process, its log in a file."""

    def __init__(self, tmp_path: Path, workers: int, *, mutual: bool = False) -> None:
        self.tmp_path = tmp_path
        self.workers = workers
        # With mutual TLS: the CA that client certificates must come from.
        self.client_ca = tmp_path / "client-ca.pem" if mutual else None
        self.port = free_port()
        self.health_port = free_port()
        self.database = tmp_path / "p.db"
        self.credentials = tmp_path / "callers.toml"
        self.cert = tmp_path / "server.pem"
        self.key = tmp_path / "server-key.pem"
        self.log_path = tmp_path / "serve.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> ProductionServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
        env.update(
            {
                "PHONEBIND_LISTEN": f"127.0.0.1:{self.port}",
                "PHONEBIND_HEALTH_LISTEN": f"127.0.0.1:{self.health_port}",
                "PHONEBIND_WORKERS": str(self.workers),
                "PHONEBIND_DATABASE_URL": f"sqlite:///{self.database}",
                # No message is sent by these tests; production needs an https gateway.
                "PHONEBIND_SMS_GATEWAY": "https://sms.provider.invalid/send",
                "PHONEBIND_SMS_HTTP_SECRET": "whsec_" + key(),
                "PHONEBIND_INDEX_KEY": key(),
                "PHONEBIND_CODE_KEY": key(),
                "PHONEBIND_SEAL_KEYS": f"k1:{key()}",
                "PHONEBIND_AUDIT_KEY": key(),
                "PHONEBIND_TLS_CERT": str(self.cert),
                "PHONEBIND_TLS_KEY": str(self.key),
                "PHONEBIND_CREDENTIALS_FILE": str(self.credentials),
                **({"PHONEBIND_TLS_CLIENT_CA": str(self.client_ca)} if self.client_ca else {}),
                # The call held across a reload waits on a lock this long at most.
                "PHONEBIND_STORE_LOCK_TIMEOUT_SECONDS": "60",
            }
        )
        binary = os.path.join(os.path.dirname(sys.executable), "phonebind-server")
        with open(self.log_path, "a", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                [binary, "serve", "--migrate"],
                cwd=self.tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_serving(f"127.0.0.1:{self.health_port}", self.process, lambda: self.log()[-2000:])
        wait_until(
            lambda: self.log().count("phonebind serving") == self.workers, 30, "every worker"
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def reload(self, outcome: str) -> None:
        """SIGHUP, then waits until every worker logged `outcome` for it."""
        assert self.process is not None
        before = self.log().count(outcome)
        self.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: self.log().count(outcome) >= before + self.workers,
            30,
            f"{self.workers} worker(s) to log {outcome!r}",
        )

    def stop(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, self.log()[-2000:]
        assert "Traceback" not in self.log()


@pytest.fixture
def pki():
    """Two CAs, each with a server certificate for localhost."""
    cas = [make_ca("first CA"), make_ca("second CA")]
    return [(cert_pem(ca[0]), issue(ca, "localhost", server=True)) for ca in cas]


def install_certificate(server: ProductionServer, issued) -> None:
    certificate, private_key = issued
    replace_file(server.key, key_pem(private_key))
    replace_file(server.cert, cert_pem(certificate))


def get_account(server: ProductionServer, ca_pem: bytes, token: str) -> grpc.StatusCode:
    """GetAccount of an unknown account over a new connection: NOT_FOUND once
    the caller is let in."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        try:
            binding_service_pb2_grpc.BindingServiceStub(channel).GetAccount(
                api.GetAccountRequest(account_id="nobody"),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


# Enough new connections to reach every worker of two.
CONNECTIONS = 6


def codes(server: ProductionServer, ca_pem: bytes, token: str) -> set[grpc.StatusCode]:
    return {get_account(server, ca_pem, token) for _ in range(CONNECTIONS)}


@pytest.fixture(params=[1, 2], ids=["one process", "two workers"])
def production(request, tmp_path, pki):
    server = ProductionServer(tmp_path, workers=request.param)
    install_certificate(server, pki[0][1])
    server.old_token = new_token()
    server.credentials.write_text(caller_entry("old-app", server.old_token), encoding="utf-8")
    server.start()
    yield server
    server.stop()


def test_sighup_swaps_the_callers_and_a_call_in_flight_completes(production, pki):
    ca_pem = pki[0][0]
    old_token, new_token_ = production.old_token, new_token()
    assert codes(production, ca_pem, old_token) == {grpc.StatusCode.NOT_FOUND}
    assert codes(production, ca_pem, new_token_) == {grpc.StatusCode.UNAUTHENTICATED}

    # A call by the old caller, held on the database's write lock while the
    # reload removes that caller.
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    lock = sqlite3.connect(production.database, isolation_level=None, timeout=10)
    with (
        grpc.secure_channel(f"localhost:{production.port}", credentials) as channel,
        futures.ThreadPoolExecutor(1) as pool,
    ):
        lock.execute("BEGIN IMMEDIATE")
        in_flight = pool.submit(
            binding_service_pb2_grpc.BindingServiceStub(channel).RegisterAccount,
            api.RegisterAccountRequest(
                account_id="acct-held",
                holder_name="张三",
                id_number="11010519491231002X",
                phone="+8613800138000",
            ),
            metadata=(("authorization", f"Bearer {old_token}"),),
            timeout=60,
        )
        time.sleep(0.5)  # for the call to reach the server, where it waits on the lock
        assert not in_flight.done()

        replace_file(production.credentials, caller_entry("new-app", new_token_).encode())
        production.reload("reloaded")
        assert not in_flight.done()
        lock.execute("ROLLBACK")
        lock.close()
        assert in_flight.result(timeout=60).account.account_id == "acct-held"

    assert codes(production, ca_pem, new_token_) == {grpc.StatusCode.NOT_FOUND}
    assert codes(production, ca_pem, old_token) == {grpc.StatusCode.UNAUTHENTICATED}


def test_sighup_swaps_the_certificate_for_new_connections(production, pki):
    (first_ca, _), (second_ca, second) = pki
    token = production.old_token
    credentials = grpc.ssl_channel_credentials(root_certificates=first_ca)
    with grpc.secure_channel(f"localhost:{production.port}", credentials) as kept:
        stub = binding_service_pb2_grpc.BindingServiceStub(kept)
        request = api.GetAccountRequest(account_id="nobody")
        bearer = (("authorization", f"Bearer {token}"),)
        with pytest.raises(grpc.RpcError) as before:
            stub.GetAccount(request, metadata=bearer, timeout=10)
        assert before.value.code() == grpc.StatusCode.NOT_FOUND
        assert codes(production, second_ca, token) == {grpc.StatusCode.UNAVAILABLE}

        install_certificate(production, second)
        production.reload("reloaded")

        assert codes(production, second_ca, token) == {grpc.StatusCode.NOT_FOUND}
        # A client that trusts only the first CA cannot connect anew...
        assert codes(production, first_ca, token) == {grpc.StatusCode.UNAVAILABLE}
        # ...while the connection it opened before the reload carries on.
        with pytest.raises(grpc.RpcError) as after:
            stub.GetAccount(request, metadata=bearer, timeout=10)
        assert after.value.code() == grpc.StatusCode.NOT_FOUND


BROKEN = {
    "unparseable credentials": lambda server, pki: server.credentials.write_text(
        "[[caller]\nname = ", encoding="utf-8"
    ),
    "a caller with an unknown role": lambda server, pki: server.credentials.write_text(
        caller_entry("new-app", new_token(), roles='"root"'), encoding="utf-8"
    ),
    "no certificate in the certificate file": lambda server, pki: server.cert.write_text(
        "not a certificate", encoding="utf-8"
    ),
    "a key that is not the certificate's": lambda server, pki: server.key.write_bytes(
        key_pem(pki[1][1][1])
    ),
}


@pytest.mark.parametrize("problem", sorted(BROKEN))
def test_a_bad_file_is_refused_and_the_old_configuration_stays(production, pki, problem):
    (first_ca, _), (second_ca, _) = pki
    token = production.old_token
    BROKEN[problem](production, pki)
    production.reload("reload refused")
    assert codes(production, first_ca, token) == {grpc.StatusCode.NOT_FOUND}
    assert codes(production, second_ca, token) == {grpc.StatusCode.UNAVAILABLE}
    assert production.log().count('"reloaded"') == 0


def test_nothing_changes_when_one_of_the_files_is_bad(production, pki):
    """Good new credentials beside a broken key: neither is taken."""
    (first_ca, _), _ = pki
    new_token_ = new_token()
    replace_file(production.credentials, caller_entry("new-app", new_token_).encode())
    production.key.write_text("broken", encoding="utf-8")
    production.reload("reload refused")
    assert codes(production, first_ca, new_token_) == {grpc.StatusCode.UNAUTHENTICATED}
    assert codes(production, first_ca, production.old_token) == {grpc.StatusCode.NOT_FOUND}


def test_sighup_swaps_the_client_ca_and_the_certificate_subjects(tmp_path, pki):
    """Mutual TLS: a client CA and its callers replaced together."""
    server_ca = pki[0][0]
    old_ca, new_ca = make_ca("old client CA"), make_ca("new client CA")
    server = ProductionServer(tmp_path, workers=1, mutual=True)
    install_certificate(server, pki[0][1])
    server.client_ca.write_bytes(cert_pem(old_ca[0]))
    entry = '[[caller]]\nname = "{0}"\nroles = ["reader"]\ncert_subject = "CN={0}"\n'
    server.credentials.write_text(entry.format("old-svc"), encoding="utf-8")
    server.start()

    def get_account(client) -> grpc.StatusCode:
        certificate, private_key = client
        credentials = grpc.ssl_channel_credentials(
            root_certificates=server_ca,
            private_key=key_pem(private_key),
            certificate_chain=cert_pem(certificate),
        )
        with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
            try:
                binding_service_pb2_grpc.BindingServiceStub(channel).GetAccount(
                    api.GetAccountRequest(account_id="nobody"), timeout=10
                )
            except grpc.RpcError as error:
                return error.code()
        return grpc.StatusCode.OK

    old_client = issue(old_ca, "old-svc", server=False)
    new_client = issue(new_ca, "new-svc", server=False)
    try:
        assert get_account(old_client) == grpc.StatusCode.NOT_FOUND
        assert get_account(new_client) == grpc.StatusCode.UNAVAILABLE  # an unknown CA
        replace_file(server.client_ca, cert_pem(new_ca[0]))
        replace_file(server.credentials, entry.format("new-svc").encode())
        server.reload("reloaded")
        assert get_account(new_client) == grpc.StatusCode.NOT_FOUND
        assert get_account(old_client) == grpc.StatusCode.UNAVAILABLE
        # A certificate of the trusted CA whose subject the file no longer names.
        assert get_account(issue(new_ca, "old-svc", server=False)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    finally:
        server.stop()
