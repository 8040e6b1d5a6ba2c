"""The in-memory store of the fast tests answers as the real stores do.

One scripted sequence of calls, right and wrong, runs on tests/fake_store.py
and on the SQLite and PostgreSQL stores; every answer (outcome, state, steps,
counts, limits' metadata) must be the same on all three. The fast tests'
verdicts hold for the real stores only as far as this holds.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from service_world import NEW, OLD, OTHER_ID, World, beijing
from support import LoopThread

from phonebind_server.domain.errors import DomainError
from phonebind_server.domain.model import Account, Rebind
from phonebind_server.domain.policy import Policy
from phonebind_server.domain.rebind import CodeSent, Completion
from phonebind_server.domain.review import ReviewCase, ReviewFilter
from phonebind_server.store.store import Store

POLICY = Policy(starts_per_account_day=6, code_max_attempts=2, sends_per_number_hour=4)


def summary(result: object) -> str:
    if isinstance(result, Rebind):
        steps = ",".join(s.value for s in result.completed)
        risk = f"{result.risk.decision.value}:{','.join(result.risk.reasons)}"
        return f"{result.state.value} [{steps}] failures={result.failures} {risk}"
    if isinstance(result, CodeSent):
        return f"expires={result.expires_at.isoformat()} left={result.attempts_left}"
    if isinstance(result, Completion):
        hold = result.account.hold_until.isoformat() if result.account.hold_until else ""
        return f"{summary(result.rebind)} {result.account.phone.masked} hold={hold}"
    if isinstance(result, Account):
        return f"{result.phone.masked} {result.standing_at(result.bound_at).value}"
    if isinstance(result, ReviewCase):
        return f"{summary(result.rebind)} approvals={len(result.rebind.approvals)}"
    return repr(result)


def scenario(w: World) -> list[str]:
    """The answers to a fixed sequence of calls."""
    answers: list[str] = []

    def do(label: str, call: Callable[[], object]) -> object:
        try:
            result = call()
        except DomainError as error:
            answers.append(f"{label}: {error.reason.value} {sorted(error.metadata.items())}")
            return None
        answers.append(f"{label}: {summary(result)}")
        return result

    def code() -> str:
        return f"{w.drawn[-1]:06d}"

    def wrong() -> str:
        return f"{(w.drawn[-1] + 1) % 10**6:06d}"

    do("register a-1", lambda: w.register("a-1", beijing(1)))
    do("register a-2", lambda: w.register("a-2", beijing(5), OTHER_ID))
    do("register a-2 again", lambda: w.register("a-2", beijing(6), OTHER_ID))
    first = do("start to a-2's number", lambda: w.start("a-1", beijing(5)))
    assert isinstance(first, Rebind)
    rid = first.rebind_id
    do("identity wrong", lambda: w.identity("a-1", rid, "李四"))
    do("identity", lambda: w.identity("a-1", rid))
    do("send old", lambda: w.send("a-1", rid, OLD))
    do("verify old wrong", lambda: w.verify("a-1", rid, OLD, wrong()))
    do("verify old", lambda: w.verify("a-1", rid, OLD, code()))
    do("send new", lambda: w.send("a-1", rid, NEW, request_id="c-1"))
    w.advance(timedelta(seconds=10))
    do("send new replayed", lambda: w.send("a-1", rid, NEW, request_id="c-1"))
    do("send new too soon", lambda: w.send("a-1", rid, NEW))
    do("verify new: bound elsewhere", lambda: w.verify("a-1", rid, NEW, code()))
    do("complete too early", lambda: w.complete("a-1", rid))
    second = do("start again", lambda: w.start("a-1", beijing(2), request_id="s-1"))
    assert isinstance(second, Rebind)
    rid = second.rebind_id
    do("start replayed", lambda: w.start("a-1", beijing(2), request_id="s-1"))
    do("start request_id reused", lambda: w.start("a-1", beijing(3), request_id="s-1"))
    do("old rebind closed", lambda: w.identity("a-1", first.rebind_id))
    do("identity", lambda: w.identity("a-1", rid))
    w.advance(timedelta(minutes=1))
    do("send old", lambda: w.send("a-1", rid, OLD))
    w.advance(w.policy.code_ttl)
    do("verify old expired", lambda: w.verify("a-1", rid, OLD, code()))
    do("send old again", lambda: w.send("a-1", rid, OLD))
    do("verify old wrong", lambda: w.verify("a-1", rid, OLD, wrong()))
    do("verify old wrong again", lambda: w.verify("a-1", rid, OLD, wrong()))
    do("verify old burnt", lambda: w.verify("a-1", rid, OLD, code()))
    w.advance(w.policy.resend_cooldown)
    do("send old a third time", lambda: w.send("a-1", rid, OLD))
    w.advance(w.policy.resend_cooldown)
    do("send old: number capped", lambda: w.send("a-1", rid, OLD))
    do("verify old", lambda: w.verify("a-1", rid, OLD, code()))
    do("send new", lambda: w.send("a-1", rid, NEW))
    do("verify new", lambda: w.verify("a-1", rid, NEW, code()))
    do("complete", lambda: w.complete("a-1", rid, request_id="k-1"))
    do("complete replayed", lambda: w.complete("a-1", rid, request_id="k-1"))
    do("complete again", lambda: w.complete("a-1", rid))
    do("history", lambda: len(w.run(w.service.list_history, w.call, "a-1", 0, None).changes))
    w.advance(timedelta(hours=1))
    do("start in cool-off", lambda: w.start("a-1", beijing(3)))
    do("start to its own number", lambda: w.start("a-1", beijing(2)))
    do("start to a released number", lambda: w.start("a-2", beijing(1), lost=True))
    for n in range(3):
        do(f"start #{n}", lambda: w.start("a-1", beijing(3)))
    lost = do("lost phone", lambda: w.start("a-2", beijing(7), lost=True))
    assert isinstance(lost, Rebind)
    reviewer = w.as_reviewer("rev-1")
    do("approve before identity", lambda: w.run(w.desk.approve, reviewer, lost.rebind_id, ""))
    do("identity", lambda: w.identity("a-2", lost.rebind_id, id_number=OTHER_ID))
    do("approve", lambda: w.run(w.desk.approve, reviewer, lost.rebind_id, "ok"))
    do("approve twice", lambda: w.run(w.desk.approve, reviewer, lost.rebind_id, ""))
    do(
        "pending reviews",
        lambda: len(w.run(w.desk.list, w.call, ReviewFilter.PENDING, 0, None).cases),
    )
    w.advance(w.policy.rebind_ttl)
    do("expired", lambda: w.identity("a-2", lost.rebind_id, id_number=OTHER_ID))
    do("account", lambda: w.run(w.service.get_account, w.call, "a-1"))
    return answers


@pytest.fixture(scope="module")
def on_the_fake() -> list[str]:
    return scenario(World(POLICY))


def test_the_scenario_is_no_trivial_one(on_the_fake):
    refused = [a for a in on_the_fake if "[('" in a or a.endswith(" []")]
    assert len(on_the_fake) > 40 and len(refused) > 15, on_the_fake


def test_the_real_stores_answer_as_the_fake_does(database_url, on_the_fake):
    store = Store(database_url)
    store.migrate()
    loop = LoopThread()
    try:
        loop.run(store.open())

        def run(fn: Callable[..., object], *args: object, **kwargs: object) -> object:
            return loop.run(store.run(fn, *args, **kwargs))

        answers = scenario(World(POLICY, store=store, run=run))
    finally:
        loop.run(store.close())
        loop.close()
    assert answers == on_the_fake
