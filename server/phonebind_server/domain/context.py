"""Who is calling, how, and until when: passed explicitly to every use case."""

from __future__ import annotations

import time
from typing import NamedTuple


class CallContext(NamedTuple):
    """One call as the rpc layer received it.

    `caller` is the authenticated caller's name (a delegate's is
    "<caller>:<person>"), `method` the RPC's full name, `deadline` the
    time.monotonic() instant when the caller stops waiting (None: it waits),
    `language` the caller's language for end-user text (zh-CN or en).
    """

    caller: str = "internal"
    method: str = ""
    request_id: str = ""
    deadline: float | None = None
    language: str = "zh-CN"

    def remaining(self) -> float | None:
        """Seconds until the deadline (negative once passed), None without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def gone(self, margin: float = 0.0) -> bool:
        """Whether the caller has stopped waiting (or will within `margin` seconds)."""
        return self.deadline is not None and time.monotonic() >= self.deadline - margin


# Work that no caller asked for: housekeeping, the outbox, command-line tools.
INTERNAL = CallContext()
