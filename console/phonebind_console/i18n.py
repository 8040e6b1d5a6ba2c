"""The console's two languages: English and Simplified Chinese.

The texts are keyed by their English; zh-CN translates each. Two languages
and a few dozen strings fit a table that a test can check for completeness,
so no message catalogue build step is needed.
"""

from __future__ import annotations

from datetime import UTC, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from phonebind.v1 import resources_pb2, review_service_pb2

__all__ = ["DEFAULT_LANGUAGE", "LANGUAGES", "age", "enum_label", "translate", "when"]

LANGUAGES = ("zh-CN", "en")
DEFAULT_LANGUAGE = "zh-CN"

ZH_CN: dict[str, str] = {
    "phonebind review console": "phonebind 审核台",
    "Review queue": "审核队列",
    "Ready for a decision": "待决定",
    "Waiting on the customer": "等待客户操作",
    "All pending": "全部待审",
    "Account": "账户",
    "Filter": "筛选",
    "Show": "显示",
    "Clear": "清除",
    "Rebind": "换绑",
    "Number change": "号码变更",
    "Risk": "风险",
    "Signals": "风险信号",
    "Waiting": "已等待",
    "Approvals": "审批",
    "Nothing here.": "暂无。",
    "Open": "打开",
    "State": "状态",
    "Holder": "持有人",
    "ID number": "身份证号",
    "Bound number": "当前绑定号码",
    "Old phone lost": "原手机丢失",
    "Yes": "是",
    "No": "否",
    "Score": "评分",
    "Changes in the last 30 days": "近 30 天变更次数",
    "Changes in the last 365 days": "近 365 天变更次数",
    "Steps done": "已完成步骤",
    "Steps outstanding": "未完成步骤",
    "Review": "审核",
    "Started": "发起时间",
    "Expires": "过期时间",
    "Waiting since": "开始等待",
    "approved by": "批准人",
    "rejected by": "拒绝人",
    "Decision": "决定",
    "Approve": "批准",
    "Reject": "拒绝",
    "Note (optional)": "备注（可选）",
    "Why is the change refused? (required)": "拒绝原因（必填）",
    "Audit trail of the account": "账户审计记录",
    "Time": "时间",
    "Caller": "调用方",
    "Action": "操作",
    "Outcome": "结果",
    "Details": "详情",
    "Back to the queue": "返回队列",
    "Signed in as": "当前用户",
    "Sign out": "退出",
    "Sign in": "登录",
    "Sign in as": "登录为",
    "Sign in with single sign-on": "使用单点登录",
    "Your name": "姓名",
    "Development mode: anyone may sign in as anyone.": "开发模式：任何人都可以任意身份登录。",
    "Language": "语言",
    "Approved.": "已批准。",
    "Rejected.": "已拒绝。",
    "The note is required.": "必须填写备注。",
    "Use 1-64 of the letters A-Z a-z, digits and . _ @ -": "请使用 1-64 个字母、数字或 . _ @ -",
    "Write no full phone number or ID number in a note: use the masked form.": (
        "备注中不要写完整手机号或身份证号，请使用打码形式。"
    ),
    "At most 500 characters.": "最多 500 个字符。",
    "phonebind refused": "phonebind 拒绝了操作",
    "The form was not sent from this page, or it has expired. Reload the page and try again.": (
        "表单不是从本页提交的，或已过期。请刷新页面后重试。"
    ),
    "Not found.": "未找到。",
    "phonebind cannot be reached right now. Try again shortly.": (
        "暂时无法连接 phonebind，请稍后再试。"
    ),
    "Sign-in failed.": "登录失败。",
    "Please sign in.": "请先登录。",
    "The sign-in header came from an address that is not a trusted proxy.": (
        "登录头来自非受信任代理的地址。"
    ),
    "You approved this change; it waits for a second reviewer.": (
        "你已批准此变更，等待第二位审核人。"
    ),
    "This rebind is decided or closed; no decision is needed.": (
        "此换绑已决定或已关闭，无需再审核。"
    ),
    "no audit events": "无审计记录",
    "showing the latest": "仅显示最近",
    "d": "天",
    "h": "小时",
    "m": "分钟",
}

_STATE = {
    resources_pb2.REBIND_STATE_PENDING: ("Steps outstanding", "步骤未完成"),
    resources_pb2.REBIND_STATE_AWAITING_REVIEW: ("Awaiting review", "等待审核"),
    resources_pb2.REBIND_STATE_READY: ("Ready to complete", "可完成"),
    resources_pb2.REBIND_STATE_COMPLETED: ("Completed", "已完成"),
    resources_pb2.REBIND_STATE_CANCELLED: ("Cancelled", "已取消"),
    resources_pb2.REBIND_STATE_EXPIRED: ("Expired", "已过期"),
    resources_pb2.REBIND_STATE_REJECTED: ("Rejected", "已拒绝"),
}
_STEP = {
    resources_pb2.REBIND_STEP_IDENTITY: (
        "Identity (name and ID number)",
        "身份核验（姓名与身份证号）",
    ),
    resources_pb2.REBIND_STEP_OLD_PHONE_CODE: ("Code to the old number", "原号码验证码"),
    resources_pb2.REBIND_STEP_NEW_PHONE_CODE: ("Code to the new number", "新号码验证码"),
    resources_pb2.REBIND_STEP_REVIEW: ("Reviewer approval", "人工审核"),
}
_DECISION = {
    resources_pb2.RISK_DECISION_ALLOW: ("Allow", "通过"),
    resources_pb2.RISK_DECISION_REVIEW: ("Review", "人工审核"),
    resources_pb2.RISK_DECISION_DENY: ("Deny", "拒绝"),
}
_REVIEW = {
    resources_pb2.REVIEW_STATE_PENDING: ("Pending", "待审核"),
    resources_pb2.REVIEW_STATE_APPROVED: ("Approved", "已批准"),
    resources_pb2.REVIEW_STATE_REJECTED: ("Rejected", "已拒绝"),
    resources_pb2.REVIEW_STATE_ABANDONED: ("Abandoned", "已终止"),
}
_READINESS = {
    review_service_pb2.REVIEW_READINESS_READY: ("Ready for a decision", "待决定"),
    review_service_pb2.REVIEW_READINESS_WAITING_ON_CUSTOMER: (
        "Waiting on the customer",
        "等待客户操作",
    ),
}
ENUMS = {
    "state": _STATE,
    "step": _STEP,
    "decision": _DECISION,
    "review": _REVIEW,
    "readiness": _READINESS,
}


def translate(text: str, language: str) -> str:
    """`text` (English) in `language`; English when no translation exists."""
    if language == "zh-CN":
        return ZH_CN.get(text, text)
    return text


def enum_label(kind: str, value: int, language: str) -> str:
    english, chinese = ENUMS[kind].get(value, ("-", "-"))
    return chinese if language == "zh-CN" else english


def when(stamp: timestamp_pb2.Timestamp) -> str:
    """A timestamp as "2026-03-01 09:00:00 UTC"; "-" when unset."""
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def age(duration: duration_pb2.Duration, language: str) -> str:
    """How long, as "1d 2h", "2h 05m" or "3m" (in zh-CN "1天2小时", …)."""
    left = int(duration.ToTimedelta() // timedelta(seconds=1))
    days, left = divmod(left, 86_400)
    hours, left = divmod(left, 3600)
    minutes = left // 60
    d, h, m = (translate(unit, language) for unit in ("d", "h", "m"))
    space = "" if language == "zh-CN" else " "
    if days:
        return f"{days}{d}{space}{hours}{h}"
    if hours:
        return f"{hours}{h}{space}{minutes:02d}{m}"
    return f"{minutes}{m}"
