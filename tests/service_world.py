"""The service-level tests' world: the domain's use cases over the in-memory
store (tests/fake_store.py), an injected clock and fixed keys. No gRPC server,
no database."""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fake_store import FakeStore

from phonebind_server.domain import messages
from phonebind_server.domain.audit import AuditTrail, ChainReport
from phonebind_server.domain.context import CallContext
from phonebind_server.domain.errors import DomainError, Reason
from phonebind_server.domain.model import Account, CodeTarget, Rebind, RebindState
from phonebind_server.domain.phone import parse_phone
from phonebind_server.domain.pii import OUTBOX_TEXT, Keys, Vault
from phonebind_server.domain.policy import Policy
from phonebind_server.domain.rebind import Completion, RebindService
from phonebind_server.domain.review import ReviewDesk

OLD = CodeTarget.OLD_PHONE
NEW = CodeTarget.NEW_PHONE
KEYS = Keys.single(
    index_key=b"i" * 32,
    code_key=b"c" * 32,
    seal_keys={"k1": b"s" * 32},
    active_seal_key="k1",
    audit_key=b"a" * 32,
)
# Valid GB 11643 numbers of Beijing holders (the first from the standard's own example).
ID_NUMBER = "11010519491231002X"
OTHER_ID = "110105199003072223"
MORE_IDS = ("110105199003070009", "110105199003070017", "110105199003070025")
HOLDER = "张三"


def beijing(n: int) -> str:
    """A mobile number of a Beijing range, like the holder's ID number (no
    REGION_MISMATCH signal)."""
    return f"1381000{n:04d}"


class FakeClock:
    """The service's clock: starts at a fixed instant, moves only when told."""

    def __init__(self) -> None:
        self._now = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta


def _direct(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


class World:
    """The rebind service and the review desk over one fake store.

    With `store` and `run` (which runs store code as `Store.run` does), the
    same over a real store: what the helpers below do then goes through `run`.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        store: Any = None,
        run: Callable[..., Any] = _direct,
    ) -> None:
        self.policy = policy or Policy()
        self.clock = FakeClock()
        self.store: FakeStore = store if store is not None else FakeStore()
        self.run = run
        self.vault = Vault(KEYS)
        self.trail = AuditTrail(KEYS.audit_keys, KEYS.audit_key_id)
        # Codes from a seeded generator: the same codes every run.
        draws = random.Random(20260301)
        self.drawn: list[int] = []

        def draw(below: int) -> int:
            self.drawn.append(draws.randrange(below))
            return self.drawn[-1]

        self.service = RebindService(
            self.store, self.vault, self.policy, self.clock, self.trail, draw
        )
        self.desk = ReviewDesk(self.store, self.policy, self.clock, self.trail)
        self.call = CallContext(caller="lending-app", method="/phonebind.v1.BindingService/Test")

    def advance(self, delta: timedelta) -> None:
        self.clock.advance(delta)

    def as_reviewer(self, name: str) -> CallContext:
        return CallContext(caller=name, method="/phonebind.v1.ReviewService/Test")

    # -- the use cases, with the defaults of a well-behaved caller -----------------

    def register(self, account_id: str, phone: str, id_number: str = ID_NUMBER) -> Account:
        return self.run(
            self.service.register_account, self.call, account_id, HOLDER, id_number, phone
        )

    def start(self, account_id: str, new_phone: str, *, lost: bool = False, **kw: str) -> Rebind:
        return self.run(self.service.start_rebind, self.call, account_id, new_phone, lost, **kw)

    def identity(
        self, account_id: str, rebind_id: str, name: str = HOLDER, id_number: str = ID_NUMBER
    ) -> Rebind:
        return self.run(
            self.service.verify_identity, self.call, account_id, rebind_id, name, id_number
        )

    def send(self, account_id: str, rebind_id: str, target: CodeTarget, **kw: str):
        return self.run(self.service.send_code, self.call, account_id, rebind_id, target, **kw)

    def verify(self, account_id: str, rebind_id: str, target: CodeTarget, code: str) -> Rebind:
        return self.run(self.service.verify_code, self.call, account_id, rebind_id, target, code)

    def complete(self, account_id: str, rebind_id: str, **kw: str) -> Completion:
        return self.run(self.service.complete_rebind, self.call, account_id, rebind_id, **kw)

    # -- what reached the outbox ---------------------------------------------------

    def texts_to(self, phone: str, purpose: str = messages.PURPOSE_REBIND_CODE) -> list[str]:
        """The texts queued to a number (committed only), oldest first."""
        number = parse_phone(phone, allowed_regions=self.policy.allowed_regions, field="phone")
        index = self.vault.phone_index(number.e164)
        return [
            self.vault.unseal(m.sealed_text, OUTBOX_TEXT.at(m.message_id))
            for m in self.store.tables.outbox
            if m.to.index == index and m.purpose == purpose
        ]

    def last_code(self, phone: str) -> str:
        texts = self.texts_to(phone)
        assert texts, f"no code was queued to {phone}"
        found = re.search(rf"(?<!\d)\d{{{self.policy.code_length}}}(?!\d)", texts[-1])
        assert found, "the code text holds no code"
        return found.group()

    def send_and_verify(
        self, account_id: str, rebind_id: str, target: CodeTarget, phone: str
    ) -> Rebind:
        self.send(account_id, rebind_id, target)
        return self.verify(account_id, rebind_id, target, self.last_code(phone))

    def ready(self, account_id: str, old: str, new: str, *, lost: bool = False) -> Rebind:
        """Starts a rebind and does every customer step; READY unless it needs review."""
        rebind = self.start(account_id, new, lost=lost)
        self.identity(account_id, rebind.rebind_id)
        if not lost:
            self.send_and_verify(account_id, rebind.rebind_id, OLD, old)
        return self.send_and_verify(account_id, rebind.rebind_id, NEW, new)

    def change(self, account_id: str, old: str, new: str) -> Completion:
        rebind = self.ready(account_id, old, new)
        assert rebind.state is RebindState.READY, rebind.state
        return self.complete(account_id, rebind.rebind_id)

    def audit_report(self) -> ChainReport:
        return self.trail.verify(self.store.audit_snapshot())

    def actions(self, account_id: str) -> list[str]:
        return [e.action for e in self.store.audit_events(account_id=account_id, limit=1000)]


def refused(reason: Reason, run: Callable[[], object]) -> DomainError:
    """Runs `run`, which must be refused with `reason`; the error."""
    with pytest.raises(DomainError) as caught:
        run()
    assert caught.value.reason is reason, caught.value
    return caught.value
