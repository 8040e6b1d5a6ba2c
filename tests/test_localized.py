"""What the app shows the user: localized error messages and the rebind's notices."""

from __future__ import annotations

import grpc
import pytest
from support import NEW, error_details

from phonebind.v1 import binding_service_pb2 as api
from phonebind_server.domain import messages
from phonebind_server.domain.errors import Reason


def verify_wrong(server, rebind_id: str, language: str | None):
    metadata = () if language is None else (("accept-language", language),)
    with pytest.raises(grpc.RpcError) as caught:
        server.api.stub.VerifyCode(
            api.VerifyCodeRequest(
                account_id="loc-1", rebind_id=rebind_id, target=NEW, code="000000"
            ),
            metadata=metadata,
        )
    return error_details(caught.value)


def test_errors_carry_a_localized_message_in_the_callers_language(server):
    pb = server.api
    pb.register("loc-1", "13800138501")
    rebind = pb.start("loc-1", "13900139501")
    pb.send("loc-1", rebind.rebind_id, NEW)
    if pb.inbox.next_code("+8613900139501") == "000000":
        pytest.skip("the random code was 000000")
    expected = [
        (None, "zh-CN", "验证码错误，还可尝试 4 次。"),
        ("en-US,en;q=0.9", "en", "The code is wrong. 3 tries left."),
        ("fr-FR, en;q=0.5, zh;q=0.8", "zh-CN", "验证码错误，还可尝试 2 次。"),
    ]
    for accept, locale, text in expected:
        _, reason, details = verify_wrong(server, rebind.rebind_id, accept)
        assert reason == "CODE_MISMATCH"
        assert details["LocalizedMessage"].locale == locale
        assert details["LocalizedMessage"].message == text


def test_every_reason_has_a_sentence_in_each_language():
    placeholders = {"attempts_left": "3", "retry_after_seconds": "42"}
    for reason in Reason:
        for language in messages.LANGUAGES:
            text = messages.user_message(reason.value, placeholders, language)
            assert text and "{" not in text


@pytest.mark.parametrize(
    ("reason", "metadata", "text"),
    [
        ("REBIND_CLOSED", {"state": "COMPLETED"}, "The phone number has already been changed."),
        (
            "REBIND_CLOSED",
            {"state": "CANCELLED"},
            "This change request is closed. Please start again.",
        ),
        ("CODE_MISMATCH", {"attempts_left": "0"}, "The code is wrong and can no longer be used."),
        ("CODE_MISMATCH", {"attempts_left": "1"}, "The code is wrong. 1 tries left."),
        (
            "IDENTITY_MISMATCH",
            {"attempts_left": "0"},
            "The name or ID number does not match our records. No tries are left.",
        ),
    ],
)
def test_the_sentence_follows_what_the_user_can_still_do(reason, metadata, text):
    assert messages.user_message(reason, metadata, "en") == text
    assert "{" not in messages.user_message(reason, metadata, "zh-CN")


def test_a_completed_rebind_completed_again_tells_the_user_it_is_done(server):
    pb = server.api
    pb.register("loc-3", "13800138503")
    rebind = pb.ready_rebind("loc-3", "13800138503", "13900139503")
    pb.complete("loc-3", rebind.rebind_id)
    with pytest.raises(grpc.RpcError) as caught:
        pb.complete("loc-3", rebind.rebind_id)
    _, reason, details = error_details(caught.value)
    assert reason == "REBIND_CLOSED"
    assert details["ErrorInfo"].metadata["state"] == "COMPLETED"
    assert details["LocalizedMessage"].message == "手机号已更换成功。"


def test_open_rebind_lists_the_notices_to_show(server):
    pb = server.api
    pb.register("loc-2", "13800138502")
    rebind = pb.start("loc-2", "13900139502", lost=True)
    codes = [n.code for n in rebind.notices]
    assert codes == ["REVIEW_IN_PROGRESS", "COOL_OFF_HOLD", "OLD_NUMBER_NOTIFIED"]
    hold = next(n.text for n in rebind.notices if n.code == "COOL_OFF_HOLD")
    assert "72 小时" in hold
    english = pb.stub.GetRebind(
        api.GetRebindRequest(account_id="loc-2", rebind_id=rebind.rebind_id),
        metadata=(("accept-language", "en"),),
    ).rebind
    assert "72-hour safety hold" in next(
        n.text for n in english.notices if n.code == "COOL_OFF_HOLD"
    )
    cancelled = pb.stub.CancelRebind(
        api.CancelRebindRequest(account_id="loc-2", rebind_id=rebind.rebind_id)
    ).rebind
    assert list(cancelled.notices) == []
