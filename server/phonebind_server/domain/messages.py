"""Text of the SMS the flow sends, in zh-CN (default) and en, and the template
each text is rendered from.

A code message names what the code is for and how long it lives (so a user
tricked into reading it out has a chance to notice); the notice to the old
number shows only the masked new number.

Providers that send by template (Chinese carriers require registered
templates) get the template id, the language and its parameters besides the
rendered text. A template id names one wording: a changed wording is a new id.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
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

# Template ids, and the parameters each one takes (all strings).
TEMPLATE_REBIND_CODE = "phonebind.rebind_code.v1"  # code, minutes
TEMPLATE_CHANGE_NOTICE = "phonebind.change_notice.v1"  # masked_number


@dataclass(frozen=True)
class SmsContent:
    """One message: its rendered text, and the template and parameters it came from."""

    text: str
    template: str
    language: str
    params: dict[str, str] = field(default_factory=dict)


def code_message(code: str, ttl: timedelta, *, language: str, signature: str) -> SmsContent:
    minutes = str(max(1, int(ttl.total_seconds() // 60)))
    return SmsContent(
        text=_CODE[language].format(sig=signature, code=code, minutes=minutes),
        template=TEMPLATE_REBIND_CODE,
        language=language,
        params={"code": code, "minutes": minutes},
    )


def change_notice(new_masked: str, *, language: str, signature: str) -> SmsContent:
    return SmsContent(
        text=_CHANGED_NOTICE[language].format(sig=signature, new_masked=new_masked),
        template=TEMPLATE_CHANGE_NOTICE,
        language=language,
        params={"masked_number": new_masked},
    )


# -- what the app shows the end user ------------------------------------------------

LANGUAGES = ("zh-CN", "en")

# Per error reason, the sentence for the end user (not the operator message).
_USER_ERRORS: dict[str, dict[str, str]] = {
    "INVALID_ARGUMENT": {
        "zh-CN": "填写的信息格式不正确，请检查后重试。",
        "en": "Some details are not in the right format. Please check them and try again.",
    },
    "INVALID_PHONE": {
        "zh-CN": "请输入正确的中国大陆手机号。",
        "en": "Please enter a valid mobile number.",
    },
    "INVALID_ID_NUMBER": {
        "zh-CN": "请输入正确的 18 位身份证号码。",
        "en": "Please enter a valid 18-character ID number.",
    },
    "REQUEST_ID_REUSED": {
        "zh-CN": "请求重复，请刷新后重试。",
        "en": "This request was already made. Please refresh and try again.",
    },
    "CODE_MISMATCH": {
        "zh-CN": "验证码错误，还可尝试 {attempts_left} 次。",
        "en": "The code is wrong. {attempts_left} tries left.",
    },
    "CODE_MISMATCH attempts_left=0": {
        "zh-CN": "验证码错误，此验证码已失效。",
        "en": "The code is wrong and can no longer be used.",
    },
    "IDENTITY_MISMATCH": {
        "zh-CN": "姓名或身份证号码与实名信息不一致，还可尝试 {attempts_left} 次。",
        "en": "The name or ID number does not match our records. {attempts_left} tries left.",
    },
    "IDENTITY_MISMATCH attempts_left=0": {
        "zh-CN": "姓名或身份证号码与实名信息不一致，已没有剩余尝试次数。",
        "en": "The name or ID number does not match our records. No tries are left.",
    },
    "ACCOUNT_NOT_FOUND": {"zh-CN": "账户不存在。", "en": "The account was not found."},
    "REBIND_NOT_FOUND": {
        "zh-CN": "更换申请不存在，请重新发起。",
        "en": "This change request was not found. Please start again.",
    },
    "ACCOUNT_EXISTS": {"zh-CN": "该账户已登记。", "en": "This account is already registered."},
    "SAME_PHONE": {
        "zh-CN": "新手机号与当前绑定的手机号相同。",
        "en": "The new number is the same as the current one.",
    },
    "PHONE_IN_USE": {
        "zh-CN": "该手机号已绑定其他账户。",
        "en": "This number is already linked to another account.",
    },
    "STEP_REQUIRED": {
        "zh-CN": "请先完成全部验证步骤。",
        "en": "Please finish every verification step first.",
    },
    "STEP_NOT_REQUIRED": {
        "zh-CN": "本次更换无需此项验证。",
        "en": "This check is not needed for this change.",
    },
    "STEP_ALREADY_DONE": {"zh-CN": "此项验证已完成。", "en": "This check is already done."},
    "ALREADY_APPROVED_BY_YOU": {
        "zh-CN": "您已批准过此申请，需由另一位审核人批准。",
        "en": "You already approved this change; another reviewer must approve it.",
    },
    "NO_ACTIVE_CODE": {"zh-CN": "请先获取验证码。", "en": "Please request a code first."},
    "CODE_EXPIRED": {
        "zh-CN": "验证码已过期，请重新获取。",
        "en": "The code has expired. Please request a new one.",
    },
    "CODE_ATTEMPTS_EXHAUSTED": {
        "zh-CN": "验证码错误次数过多，请重新获取。",
        "en": "Too many wrong tries. Please request a new code.",
    },
    "REBIND_EXPIRED": {
        "zh-CN": "更换申请已超时，请重新发起。",
        "en": "This change request timed out. Please start again.",
    },
    "REBIND_CLOSED": {
        "zh-CN": "更换申请已结束，请重新发起。",
        "en": "This change request is closed. Please start again.",
    },
    # A retried CompleteRebind without its request_id: the change was made.
    "REBIND_CLOSED state=COMPLETED": {
        "zh-CN": "手机号已更换成功。",
        "en": "The phone number has already been changed.",
    },
    "REBIND_LOCKED": {
        "zh-CN": "错误次数过多，本次更换已锁定，请重新发起。",
        "en": "Too many wrong answers. This change is locked; please start again.",
    },
    "REVIEW_PENDING": {
        "zh-CN": "您的更换申请正在人工审核，审核通过后即可完成更换。",
        "en": "Your change is being reviewed by our team. You can finish it once approved.",
    },
    "RISK_DENIED": {
        "zh-CN": "为保障账户安全，暂不支持在线更换手机号，请联系客服。",
        "en": "For your account's safety this change cannot be made online. Please contact support.",
    },
    "ACCOUNT_LOCKED": {
        "zh-CN": "身份验证失败次数过多，更换手机号功能已暂时锁定，请稍后再试或联系客服。",
        "en": "Too many failed identity checks. Changing the number is locked for now; try again later or contact support.",
    },
    "RESEND_TOO_SOON": {
        "zh-CN": "验证码发送过于频繁，请 {retry_after_seconds} 秒后再试。",
        "en": "Please wait {retry_after_seconds} seconds before requesting another code.",
    },
    "RATE_LIMITED": {
        "zh-CN": "操作过于频繁，请稍后再试。",
        "en": "Too many attempts. Please try again later.",
    },
    "STORE_UNAVAILABLE": {
        "zh-CN": "系统繁忙，请稍后再试。",
        "en": "The service is busy. Please try again shortly.",
    },
}

_NOTICES: dict[str, dict[str, str]] = {
    "COOL_OFF_HOLD": {
        "zh-CN": "更换成功后，账户将进入 {hours} 小时安全冷静期：期间暂停借款提现、提额和修改收款账户。",
        "en": "After the change your account enters a {hours}-hour safety hold: no withdrawals, "
        "limit increases or payout-account changes until it ends.",
    },
    "REVIEW_IN_PROGRESS": {
        "zh-CN": "为保障账户安全，本次更换需人工审核，审核通过后方可完成。",
        "en": "For your safety this change needs a review by our team before it can finish.",
    },
    "OLD_NUMBER_NOTIFIED": {
        "zh-CN": "更换完成后，原手机号将收到更换通知，且不能再用于登录和接收验证码。",
        "en": "When the change is done, your old number gets a notice and can no longer be used "
        "to sign in or receive codes.",
    },
}


# -- what a reviewer reads --------------------------------------------------------

# Per risk signal, what it means for the change under review.
_SIGNALS: dict[str, dict[str, str]] = {
    "FREQUENT_CHANGES": {
        "zh-CN": "该账户近期已多次更换绑定手机号。",
        "en": "The account has changed its phone number several times recently.",
    },
    "NUMBER_RECENTLY_RELEASED": {
        "zh-CN": "新手机号近期曾绑定其他账户，可能是运营商回收后重新放号的号码。",
        "en": "The new number was bound to another account recently: it may be a recycled number.",
    },
    "VIRTUAL_OPERATOR": {
        "zh-CN": "新手机号属于虚拟运营商号段，实名要求较弱。",
        "en": "The new number is in a virtual operator's range, where identity checks are weaker.",
    },
    "OLD_PHONE_LOST": {
        "zh-CN": "用户表示原手机号已丢失，无法用原手机号接收验证码。",
        "en": "The user says the old phone is lost, so no code could reach the old number.",
    },
    "IN_COOL_OFF": {
        "zh-CN": "账户仍处于上次更换后的安全冷静期内。",
        "en": "The account is still inside the safety hold after its last change.",
    },
    "REGION_MISMATCH": {
        "zh-CN": "新手机号归属地与身份证签发地所在省份不一致。",
        "en": "The new number's region differs from the province that issued the ID card.",
    },
}

_UNKNOWN_SIGNAL = {
    "zh-CN": "风险信号 {code}。",
    "en": "Risk signal {code}.",
}

# Per step method, how the step was done (masked numbers only).
_STEP_METHODS: dict[str, dict[str, str]] = {
    "KYC_MATCH": {
        "zh-CN": "姓名和身份证号码与实名信息一致。",
        "en": "The holder name and ID number matched the KYC record.",
    },
    "SMS_CODE_OLD_NUMBER": {
        "zh-CN": "已输入发送至原手机号 {old_phone} 的验证码。",
        "en": "The code sent to the old number {old_phone} was entered.",
    },
    "SMS_CODE_NEW_NUMBER": {
        "zh-CN": "已输入发送至新手机号 {new_phone} 的验证码。",
        "en": "The code sent to the new number {new_phone} was entered.",
    },
    "REVIEWER_APPROVAL": {
        "zh-CN": "审核人 {reviewer} 已批准。",
        "en": "Approved by the reviewer {reviewer}.",
    },
}


def signal_explanation(code: str, language: str) -> str:
    texts = _SIGNALS.get(code)
    if texts is None:
        return _UNKNOWN_SIGNAL[language].format(code=code)
    return texts[language]


def step_description(method: str, language: str, **values: str) -> str:
    return _STEP_METHODS[method][language].format(**values)


def user_message(reason: str, metadata: dict[str, str], language: str) -> str:
    """The end user's sentence for an error; placeholders come from its metadata.

    A sentence for one metadata value ("REBIND_CLOSED state=COMPLETED") is
    preferred over the reason's own, where what the user should do differs."""
    for key, value in sorted(metadata.items()):
        if variant := _USER_ERRORS.get(f"{reason} {key}={value}"):
            return variant[language].format(**metadata)
    return _USER_ERRORS[reason][language].format(**metadata)


def notice_text(code: str, language: str, **values: object) -> str:
    return _NOTICES[code][language].format(**values)


@functools.lru_cache(maxsize=256)
def pick_language(accept_language: str) -> str:
    """The best supported language for an Accept-Language value (zh-CN by default)."""
    best, best_q = "zh-CN", -1.0
    for part in accept_language.split(",")[:16]:
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        primary = tag.strip().lower().split("-")[0]
        language = {"zh": "zh-CN", "en": "en"}.get(primary)
        if language is not None and q > best_q:
            best, best_q = language, q
    return best


@functools.lru_cache(maxsize=64)
def rebind_notices(
    *, is_open: bool, needs_review: bool, hold: timedelta, language: str
) -> tuple[tuple[str, str], ...]:
    """(code, text) of what the user must read before confirming an open rebind."""
    if not is_open:
        return ()
    codes = ["COOL_OFF_HOLD", "OLD_NUMBER_NOTIFIED"]
    if needs_review:
        codes.insert(0, "REVIEW_IN_PROGRESS")
    hours = int(hold.total_seconds() // 3600)
    return tuple((code, notice_text(code, language, hours=hours)) for code in codes)
