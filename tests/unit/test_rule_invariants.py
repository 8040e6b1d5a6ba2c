"""Seeded random walks of calls, right and wrong, on the in-memory store:
whatever the order, the rules' invariants hold after every call.

Every refusal must be a DomainError other than STORE_UNAVAILABLE: that one
would mean a use case broke a uniqueness rule of the store by itself (the fake
store injects no conflicts here). A failure names the seed and the calls made.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from datetime import timedelta

from service_world import HOLDER, ID_NUMBER, NEW, OLD, OTHER_ID, World, beijing

from phonebind_server.domain.errors import DomainError, Reason
from phonebind_server.domain.messages import PURPOSE_REBIND_CODE
from phonebind_server.domain.model import ChallengeState, CodeTarget, RebindState, Step
from phonebind_server.domain.pii import OUTBOX_TEXT
from phonebind_server.domain.policy import Policy
from phonebind_server.domain.rebind import effective

CODE = re.compile(r"(?<!\d)\d{6}(?!\d)")
ACCOUNTS = {"a-1": (beijing(1), ID_NUMBER), "a-2": (beijing(2), OTHER_ID)}
# The other account's number among them: PHONE_IN_USE is reachable.
NUMBERS = [beijing(n) for n in range(1, 6)]
# Small caps, so that walks of a few dozen calls reach them.
POLICY = Policy(
    code_max_attempts=2,
    rebind_max_failures=2,
    resend_cooldown=timedelta(seconds=20),
    sends_per_number_hour=4,
    sends_per_number_day=8,
    starts_per_account_day=3,
    identity_failures_per_account_day=3,
    lost_phone_reviewers=2,
)
# Mostly short: a rebind lives 30 minutes.
WAITS = [timedelta(seconds=30)] * 4 + [timedelta(minutes=2)] * 3 + [timedelta(hours=25)]
SEEDS = range(10)
CALLS_PER_WALK = 60


class Walk:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.w = World(POLICY)
        self.calls: list[str] = []
        self.outcomes: dict[str, int] = {}
        for account_id, (phone, id_number) in ACCOUNTS.items():
            self.w.register(account_id, phone, id_number)

    def attempt(self, what: str, run: Callable[[], object]) -> None:
        self.calls.append(what)
        try:
            run()
            outcome = "OK"
        except DomainError as error:
            assert error.reason is not Reason.STORE_UNAVAILABLE, error
            outcome = error.reason.value
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def latest(self, account_id: str) -> str:
        # The newest is the last added (two may start in the same instant).
        mine = [r for r in self.w.store.tables.rebinds.values() if r.account_id == account_id]
        return mine[-1].rebind_id if mine else "rb_none"

    def code_for(self, account_id: str, to: CodeTarget, right: bool) -> str:
        t = self.w.store.tables
        rebind = t.rebinds.get(self.latest(account_id))
        code = "000000"
        if rebind is not None:
            phone = t.accounts[account_id].phone if to is OLD else rebind.new_phone
            texts = [
                self.w.vault.unseal(m.sealed_text, OUTBOX_TEXT.at(m.message_id))
                for m in t.outbox
                if m.to.index == phone.index and m.purpose == PURPOSE_REBIND_CODE
            ]
            found = CODE.search(texts[-1]) if texts else None
            code = found.group() if found else code
        return code if right else code[:-1] + str((int(code[-1]) + 1) % 10)

    # -- the calls ------------------------------------------------------------------

    def step(self) -> None:
        w, rng = self.w, self.rng
        account = rng.choice(sorted(ACCOUNTS))
        rebind_id = self.latest(account)
        id_number = ACCOUNTS[account][1]
        reviewer = w.as_reviewer(rng.choice(["rev-1", "rev-2"]))
        to = rng.choice([OLD, NEW])
        right = rng.random() < 0.5
        choice = rng.choices(
            ["next", "start", "identity", "send", "verify", "complete", "cancel", "review", "wait"],
            weights=[8, 0.5, 1, 1, 2, 1, 0.3, 1, 1.5],
        )[0]
        if choice == "next":
            self.next_step(account, reviewer)
        elif choice == "start":
            number, lost = rng.choice(NUMBERS), rng.random() < 0.3
            self.attempt(f"start {account}", lambda: w.start(account, number, lost=lost))
        elif choice == "identity":
            name = HOLDER if right else "李四"
            self.attempt(
                f"identity {account} right={right}",
                lambda: w.identity(account, rebind_id, name, id_number),
            )
        elif choice == "send":
            self.attempt(f"send {account} {to.value}", lambda: w.send(account, rebind_id, to))
        elif choice == "verify":
            code = self.code_for(account, to, right)
            self.attempt(
                f"verify {account} {to.value} right={right}",
                lambda: w.verify(account, rebind_id, to, code),
            )
        elif choice == "complete":
            self.attempt(f"complete {account}", lambda: w.complete(account, rebind_id))
        elif choice == "cancel":
            self.attempt(
                f"cancel {account}", lambda: w.service.cancel_rebind(w.call, account, rebind_id)
            )
        elif choice == "review" and right:
            self.attempt(f"approve {account}", lambda: w.desk.approve(reviewer, rebind_id, ""))
        elif choice == "review":
            self.attempt(f"reject {account}", lambda: w.desk.reject(reviewer, rebind_id, "no"))
        else:
            wait = rng.choice(WAITS)
            self.calls.append(f"wait {wait}")
            w.advance(wait)

    def next_step(self, account: str, reviewer) -> None:
        """The latest rebind's next outstanding step, mostly done right: random
        calls alone seldom finish a flow."""
        right = self.rng.random() < 0.8
        w = self.w
        rebind = w.store.tables.rebinds.get(self.latest(account))
        if (
            rebind is None
            or not effective(rebind, w.clock.now()).state.is_open
            # A locked rebind is tried on now and then: it must refuse.
            or (rebind.locked(POLICY.rebind_max_failures) and self.rng.random() < 0.5)
        ):
            number = self.rng.choice(NUMBERS)
            self.attempt(f"start {account}", lambda: w.start(account, number))
            return
        rebind_id, outstanding = rebind.rebind_id, rebind.outstanding
        id_number = ACCOUNTS[account][1]
        if Step.IDENTITY in outstanding:
            name = HOLDER if right else "李四"
            self.attempt(
                f"identity {account} right={right}",
                lambda: w.identity(account, rebind_id, name, id_number),
            )
        elif outstanding and outstanding[0] is not Step.REVIEW:
            to = OLD if outstanding[0] is Step.OLD_PHONE_CODE else NEW
            live = w.store.tables.codes.get((rebind_id, to))
            if live is None or live.state is not ChallengeState.LIVE:
                self.attempt(f"send {account} {to.value}", lambda: w.send(account, rebind_id, to))
            else:
                code = self.code_for(account, to, right)
                self.attempt(
                    f"verify {account} {to.value} right={right}",
                    lambda: w.verify(account, rebind_id, to, code),
                )
        elif Step.REVIEW in outstanding:
            self.attempt(f"approve {account}", lambda: w.desk.approve(reviewer, rebind_id, ""))
        else:
            self.attempt(f"complete {account}", lambda: w.complete(account, rebind_id))

    # -- what must hold after every call ---------------------------------------------

    def check(self) -> None:
        t = self.w.store.tables
        # Wrong answers never pass the caps.
        assert all(r.failures <= POLICY.rebind_max_failures for r in t.rebinds.values())
        assert all(c.attempts <= POLICY.code_max_attempts for c in t.codes.values())
        # The send and start limits hold in every window.
        sent: dict[str, list] = {}
        for message in t.outbox:
            if message.purpose == PURPOSE_REBIND_CODE:
                sent.setdefault(message.to.index, []).append(message.created_at)
        for times in sent.values():
            for at in times:
                in_hour = [x for x in times if at <= x < at + timedelta(hours=1)]
                in_day = [x for x in times if at <= x < at + timedelta(days=1)]
                assert len(in_hour) <= POLICY.sends_per_number_hour
                assert len(in_day) <= POLICY.sends_per_number_day
        for account_id, account in t.accounts.items():
            starts = [r.created_at for r in t.rebinds.values() if r.account_id == account_id]
            starts += [at for a, at in t.refused_starts if a == account_id]
            for at in starts:
                in_day = [x for x in starts if at <= x < at + timedelta(days=1)]
                assert len(in_day) <= POLICY.starts_per_account_day
            # A completed change moved the number and started its hold.
            changes = [c for _, c in t.changes if c.account_id == account_id]
            if changes:
                last = changes[-1]
                # The same number; each row keeps its own sealing, bound to it.
                assert (account.phone.index, account.phone.masked) == (
                    last.new_phone.index,
                    last.new_phone.masked,
                )
                assert account.hold_until is not None
                assert account.hold_until >= last.completed_at + POLICY.hold_for(
                    last.old_phone_lost
                )
        # A completed rebind had every step, and its reviewers.
        for rebind in t.rebinds.values():
            if rebind.state is RebindState.COMPLETED:
                assert set(rebind.completed) == set(rebind.required)
                if Step.REVIEW in rebind.required:
                    needed = POLICY.approvals_required(rebind.old_phone_lost)
                    assert len({a.reviewer for a in rebind.approvals}) >= needed


def test_the_rules_hold_on_random_walks():
    outcomes: dict[str, int] = {}
    completed = 0
    for seed in SEEDS:
        walk = Walk(seed)
        for _ in range(CALLS_PER_WALK):
            walk.step()
            try:
                walk.check()
            except AssertionError as error:
                raise AssertionError(f"seed {seed}, after {walk.calls}: {error}") from error
        # Chains only grow: one check at the end sees any break on the way.
        report = walk.w.audit_report()
        assert report.ok, (seed, report.problems)
        for outcome, n in walk.outcomes.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + n
        completed += len(walk.w.store.tables.changes)
    # The walks complete changes and run into the limits and locks, or the
    # invariants would hold for want of trying.
    assert completed >= len(SEEDS) // 2
    for reason in (
        "CODE_MISMATCH",
        "IDENTITY_MISMATCH",
        "REBIND_LOCKED",
        "PHONE_IN_USE",
        "RATE_LIMITED",
    ):
        assert outcomes.get(reason, 0) > 0, (reason, outcomes)
