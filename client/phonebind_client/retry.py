"""When the clients retry a failed call, and how long they wait first."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from .calls import Retry
from .errors import ERROR_DOMAIN, PhonebindError

__all__ = ["Backoff", "retryable"]

_REPLAY_SAFE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


def retryable(error: PhonebindError, retry: Retry) -> bool:
    """Whether a call with rule ``retry`` may be sent again after ``error``."""
    if retry is Retry.REPLAY_SAFE:
        return error.code in _REPLAY_SAFE_CODES
    return (
        error.code is grpc.StatusCode.UNAVAILABLE
        and error.reason == "STORE_UNAVAILABLE"
        and error.domain == ERROR_DOMAIN
    )


@dataclass(frozen=True, slots=True)
class Backoff:
    """At most ``max_attempts`` attempts; before retry ``n`` (0-based) the server's
    RetryInfo delay, else full jitter up to ``initial * 2**n``; both capped at ``maximum``."""

    max_attempts: int = 4
    initial: float = 0.1
    maximum: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial < 0 or self.maximum < 0:
            raise ValueError("backoff must not be negative")

    def delay(self, attempts_made: int, error: PhonebindError, retry: Retry) -> float | None:
        """Seconds to wait before the next attempt, or None when the call must fail now."""
        if attempts_made >= self.max_attempts or not retryable(error, retry):
            return None
        if error.retry_delay is not None:
            return max(0.0, min(self.maximum, error.retry_delay.total_seconds()))
        # The exponent is bounded so a large max_attempts cannot overflow a float.
        ceiling = min(self.maximum, self.initial * 2 ** min(attempts_made - 1, 64))
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not a secret
