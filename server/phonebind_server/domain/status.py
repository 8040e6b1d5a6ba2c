"""What a rebind's reader is told beyond the rebind's own fields: the figures
that follow from the policy (attempts left, the hold its completion starts,
the review's standing and the approvals it needs) and the notices to show.

The rpc layer only translates this into messages; it derives no rule itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from . import messages
from .model import Rebind
from .policy import Policy
from .review import ReviewFilter, review_state


@dataclass(frozen=True)
class ReviewStatus:
    state: ReviewFilter
    approvals_required: int


@dataclass(frozen=True)
class RebindStatus:
    # Wrong codes and identity answers left before the rebind locks.
    attempts_left: int
    # The cool-off hold a completion of this rebind starts.
    hold: timedelta
    # None when the rebind needs no review.
    review: ReviewStatus | None
    is_open: bool
    needs_review: bool

    def notices(self, language: str) -> tuple[tuple[str, str], ...]:
        """(code, text) of what the user must read before confirming an open rebind."""
        return messages.rebind_notices(
            is_open=self.is_open, needs_review=self.needs_review, hold=self.hold, language=language
        )


def rebind_status(rebind: Rebind, policy: Policy) -> RebindStatus:
    """`rebind` (as it stands now: see `rebind.effective`) under `policy`."""
    review = review_state(rebind, policy.rebind_max_failures)
    return RebindStatus(
        attempts_left=rebind.attempts_left(policy.rebind_max_failures),
        hold=policy.hold_for(rebind.old_phone_lost),
        review=(
            None
            if review is None
            else ReviewStatus(review, policy.approvals_required(rebind.old_phone_lost))
        ),
        is_open=rebind.state.is_open,
        needs_review=rebind.needs_review,
    )
