"""Test numbers (`sms_test_numbers`): fixed codes and no SMS, for development and
staging; production refuses them. Real servers on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import secrets

import grpc
import pytest
from conftest import start_server
from support import NEW, OLD, rows

from phonebind.v1 import resources_pb2 as res
from phonebind_server.config import ConfigError, load, sms_test_numbers

TEST_NUMBERS = "+8613800000001=246810, 13900000002=135790, 13900000003=975310"


@pytest.fixture
def staged(database_url, tmp_path, clock, secrets_seen):
    running = start_server(
        database_url, tmp_path, clock, secrets_seen, sms_test_numbers=TEST_NUMBERS
    )
    yield running
    running.stop()


def outbox_numbers(running) -> list[str]:
    return [row[0] for row in rows(running.database_url, "SELECT to_masked FROM sms_outbox")]


def test_a_whole_rebind_between_test_numbers_uses_the_fixed_codes_and_sends_nothing(staged):
    api = staged.api
    api.register("t-1", "13800000001")
    rebind = api.start("t-1", "13900000002").rebind_id
    api.identity("t-1", rebind)
    api.send("t-1", rebind, OLD)
    api.verify("t-1", rebind, OLD, "246810")
    api.send("t-1", rebind, NEW)
    # The rules still hold: a wrong code is refused and counted.
    with pytest.raises(grpc.RpcError) as wrong:
        api.verify("t-1", rebind, NEW, "000000")
    assert wrong.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert api.verify("t-1", rebind, NEW, "135790").state == res.REBIND_STATE_READY
    api.complete("t-1", rebind)
    assert api.get_account("t-1").phone_masked == "139****0002"
    staged.wake_outbox()
    assert staged.inbox.messages() == []  # no code and no notice went out
    assert outbox_numbers(staged) == []
    sent = rows(
        staged.database_url,
        "SELECT details FROM audit_events WHERE action = 'CODE_SENT' ORDER BY seq",
    )
    assert len(sent) == 2 and all(json.loads(row[0])["test_number"] == "true" for row in sent)


def test_a_real_number_beside_a_test_number_gets_a_random_code_by_sms(staged):
    api = staged.api
    api.register("t-2", "13800130701")
    rebind = api.start("t-2", "13900000003").rebind_id
    api.identity("t-2", rebind)
    api.send_and_verify("t-2", rebind, OLD, "13800130701")  # by SMS, from the inbox
    api.send("t-2", rebind, NEW)
    api.verify("t-2", rebind, NEW, "975310")
    api.complete("t-2", rebind)
    staged.inbox.wait_for("+8613800130701", 2)
    purposes = [m["purpose"] for m in staged.inbox.messages()]
    assert purposes == ["REBIND_CODE", "CHANGE_NOTICE"]  # both to the real number
    assert {m["to"] for m in staged.inbox.messages()} == {"+8613800130701"}


# -- settings ----------------------------------------------------------------------------


def key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def production(tmp_path, **extra: str) -> dict[str, str]:
    return {
        "PHONEBIND_LISTEN": "0.0.0.0:50051",
        "PHONEBIND_DATABASE_URL": f"sqlite:///{tmp_path}/p.db",
        "PHONEBIND_SMS_GATEWAY": "https://sms.provider.invalid/send",
        "PHONEBIND_SMS_HTTP_SECRET": "whsec_" + key(),
        "PHONEBIND_INDEX_KEY": key(),
        "PHONEBIND_CODE_KEY": key(),
        "PHONEBIND_SEAL_KEYS": f"k1:{key()}",
        "PHONEBIND_AUDIT_KEY": key(),
        "PHONEBIND_TLS_CERT": "/etc/phonebind/server.pem",
        "PHONEBIND_TLS_KEY": "/etc/phonebind/server-key.pem",
        "PHONEBIND_CREDENTIALS_FILE": "/etc/phonebind/callers.toml",
        **extra,
    }


def test_production_refuses_test_numbers_and_staging_takes_them(tmp_path):
    with pytest.raises(ConfigError, match="sms_test_numbers are for development and staging"):
        load(env=production(tmp_path, PHONEBIND_SMS_TEST_NUMBERS=TEST_NUMBERS))
    staging = load(
        env=production(tmp_path, PHONEBIND_SMS_TEST_NUMBERS=TEST_NUMBERS, PHONEBIND_STAGING="true")
    )
    assert sms_test_numbers(staging) == {
        "+8613800000001": "246810",
        "+8613900000002": "135790",
        "+8613900000003": "975310",
    }
    # Staging is production otherwise: it still wants TLS, callers and real keys.
    bare = production(tmp_path, PHONEBIND_STAGING="true")
    bare.pop("PHONEBIND_TLS_CERT")
    bare.pop("PHONEBIND_TLS_KEY")
    with pytest.raises(ConfigError, match="TLS is not configured"):
        load(env=bare)


@pytest.mark.parametrize(
    ("item", "complaint"),
    [
        ("+8613800000001", "write NUMBER=CODE"),
        ("+861380000=246810", "not a mobile number"),
        ("+85261234567=246810", "not a mobile number"),  # a region not allowed
        ("+8613800000001=24681", "6 ASCII digits"),
        ("+8613800000001=２４６８１０", "6 ASCII digits"),
        ("+8613800000001=24681a", "6 ASCII digits"),
    ],
)
def test_a_malformed_test_number_is_refused_without_showing_it(item, complaint):
    with pytest.raises(ConfigError, match=complaint) as caught:
        load({"dev": True, "sms_test_numbers": f"+8613900000002=135790,{item}"}, env={})
    assert "item 2" in str(caught.value)
    assert "1380000" not in str(caught.value)
