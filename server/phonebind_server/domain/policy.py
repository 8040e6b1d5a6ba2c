"""Every rule of the rebind flow as one value object, defaults from the design.

Each field is configurable (config.py maps TOML keys and environment variables
onto these names); the comments give the standard behind each default.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Policy:
    # One-time codes (NIST 800-63B: >= 6 digits from a CSPRNG, <= 10 minutes).
    code_length: int = 6
    code_ttl: timedelta = timedelta(minutes=5)
    resend_cooldown: timedelta = timedelta(seconds=60)
    # Wrong tries per code, then it is burnt; wrong tries per rebind across
    # resends and identity answers, then the rebind locks.
    code_max_attempts: int = 5
    rebind_max_failures: int = 10
    rebind_ttl: timedelta = timedelta(minutes=30)

    # Abuse limits, counted in the store so they hold across processes.
    sends_per_number_hour: int = 5
    sends_per_number_day: int = 10
    starts_per_account_day: int = 5
    identity_failures_per_account_day: int = 5
    identity_lockout: timedelta = timedelta(hours=24)

    # Risk rules.
    review_change_window: timedelta = timedelta(days=30)
    review_change_count: int = 2  # the 2nd change within the window is reviewed
    deny_change_window: timedelta = timedelta(days=365)
    deny_change_count: int = 4  # the 4th change within the window is denied
    recycled_number_window: timedelta = timedelta(days=90)
    virtual_operator_prefixes: tuple[str, ...] = ("162", "165", "167", "170", "171")

    # Cool-off hold after a change (TRAI 24 h; longer when the old phone was lost).
    hold: timedelta = timedelta(hours=24)
    hold_old_phone_lost: timedelta = timedelta(hours=72)

    # Different reviewers who must approve a lost-phone rebind (1 or 2): the
    # four-eyes rule for the riskiest change, where no code reached the old number.
    lost_phone_reviewers: int = 1

    allowed_regions: tuple[str, ...] = ("CN",)
    sms_language: str = "zh-CN"
    sms_signature: str = "phonebind"

    # Idempotency records are kept this long.
    idempotency_ttl: timedelta = timedelta(hours=24)

    def hold_for(self, old_phone_lost: bool) -> timedelta:
        """The cool-off hold a completed change starts."""
        return self.hold_old_phone_lost if old_phone_lost else self.hold

    def approvals_required(self, old_phone_lost: bool) -> int:
        """How many different reviewers must approve a rebind that needs review."""
        return self.lost_phone_reviewers if old_phone_lost else 1

    def __post_init__(self) -> None:
        if self.lost_phone_reviewers not in (1, 2):
            raise ValueError("lost_phone_reviewers must be 1 or 2")
        if not 6 <= self.code_length <= 10:
            raise ValueError("code_length must be 6 to 10 digits")
        if self.code_ttl > timedelta(minutes=10) or self.code_ttl <= timedelta(0):
            raise ValueError("code_ttl must be more than 0 and at most 10 minutes")
        for name in ("code_max_attempts", "rebind_max_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.sms_language not in ("zh-CN", "en"):
            raise ValueError("sms_language must be zh-CN or en")
