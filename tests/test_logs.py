"""Logs: JSON lines in UTC, the caller's request id, nothing that could forge a line."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
from support import Secrets

from phonebind.v1 import binding_service_pb2 as api
from phonebind_server.logs import JsonFormatter
from phonebind_server.sms.gateways import LogGateway, Sms


def get_account(server, request_id: str):
    call = server.api.stub.GetAccount.with_call
    try:
        _, info = call(
            api.GetAccountRequest(account_id="nobody"), metadata=(("x-request-id", request_id),)
        )
    except grpc.RpcError as error:
        info = error
    return dict(info.trailing_metadata())["x-request-id"]


def test_request_id_is_taken_from_the_caller_or_made_and_returned(server, caplog):
    caplog.set_level(logging.INFO, logger="phonebind.rpc")
    assert get_account(server, "req-42") == "req-42"
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "phonebind.rpc"]
    assert any(json.loads(line).get("request_id") == "req-42" for line in lines)
    # An id that is not short and plain is not echoed: a fresh one replaces it.
    made = get_account(server, 'x", "level": "ERROR", "pad": "' + "a" * 80)
    assert len(made) == 32 and all(c in "0123456789abcdef" for c in made)


def test_json_lines_are_utc_and_control_characters_cannot_break_them():
    record = logging.makeLogRecord(
        {"name": "t", "levelname": "WARNING", "msg": "a\r\nforged: line\x1b[31m", "args": ()}
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    entry = json.loads(line)
    assert entry["message"] == "a\r\nforged: line\x1b[31m"
    assert entry["time"].endswith("+00:00")


@pytest.mark.parametrize("purpose", ["REBIND_CODE"])
def test_log_gateway_writes_the_message_to_its_own_development_logger(caplog, purpose):
    caplog.set_level(logging.WARNING, logger="phonebind.sms.dev")
    LogGateway().deliver(Sms("m-1", "+8613800138000", "code 123456", purpose))
    [record] = [r for r in caplog.records if r.name == "phonebind.sms.dev"]
    assert "code 123456" in record.getMessage() and purpose in record.getMessage()


def test_leak_check_finds_secrets_but_not_digits_inside_random_ids():
    secrets = Secrets()
    secrets.add("368298")
    secrets.add_phone("+86 138 0013 8000")

    def line(**fields):
        return json.dumps({"time": "2026-11-28T20:05:35.928+00:00", "message": "rpc", **fields})

    chance = [
        line(request_id="368298651a6bdc25ba754f743dc87aac"),
        line(detail="blind index a0368298ffe1c2d3e4f5a6b7"),
        line(duration_ms=368298.1),
    ]
    leaks = [
        line(detail="code 368298 sent"),
        line(detail="to +8613800138000"),
        line(detail="national 13800138000"),
        "a plain line with code 368298",
    ]
    assert secrets.leaked(chance) == []
    assert secrets.leaked(leaks) == leaks
