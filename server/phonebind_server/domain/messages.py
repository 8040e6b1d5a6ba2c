"""Text of the SMS the flow sends, in zh-CN (default) and en.

A code message names what the code is for and how long it lives (so a user
tricked into reading it out has a chance to notice); the notice to the old
number shows only the masked new number.
"""

from __future__ import annotations

from datetime import timedelta

_CODE = {
    "zh-CN": "【{sig}】验证码 {code}，用于更换账户绑定的手机号，{minutes} 分钟内有效。"
    "请勿将验证码告诉任何人，包括自称客服的人员。",
    "en": "[{sig}] {code} is your code to change the phone number of your account. "
    "It expires in {minutes} minutes. Never share it with anyone, including support staff.",
}

_CHANGED_NOTICE = {
    "zh-CN": "【{sig}】您账户绑定的手机号已更换为 {new_masked}。"
    "如非本人操作，请立即联系客服冻结账户。",
    "en": "[{sig}] The phone number of your account was changed to {new_masked}. "
    "If this was not you, contact support now to freeze the account.",
}

PURPOSE_REBIND_CODE = "REBIND_CODE"
PURPOSE_CHANGE_NOTICE = "CHANGE_NOTICE"


def code_text(code: str, ttl: timedelta, *, language: str, signature: str) -> str:
    minutes = max(1, int(ttl.total_seconds() // 60))
    return _CODE[language].format(sig=signature, code=code, minutes=minutes)


def change_notice_text(new_masked: str, *, language: str, signature: str) -> str:
    return _CHANGED_NOTICE[language].format(sig=signature, new_masked=new_masked)
