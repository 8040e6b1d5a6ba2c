"""One repository per aggregate: the statements of each, and its rows as entities.

Every statement is a peewee query over the store's bound tables (`t`), with
`Param` for each value (query.py); each is compiled once per store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar

import peewee

from ..domain.audit import REGISTRY, RegisteredChain, StoredEvent, account_chain, canonical_details
from ..domain.model import (
    Account,
    Approval,
    BindingChange,
    Challenge,
    ChallengeState,
    CodeTarget,
    IdempotencyRecord,
    OutboundSms,
    Rebind,
    RebindState,
    ReviewFacts,
    RiskAssessment,
    RiskDecision,
    SealedPhone,
    Step,
)
from ..domain.ports import Read
from ..tracing import current_traceparent
from .fields import from_micros, to_micros
from .models import is_postgres
from .query import Compiled, Param, Query, compile_query, values
from .unit import REPOSITORIES, Known, SqlTx, StatementRead, every, exists, first, value

_OPEN = tuple(s.value for s in RebindState if s.is_open)
_ACCOUNT_CHAIN = account_chain("")
# How long a message queued by a call stays leased to the process that queued
# it, which delivers it at once; if that process dies first, any dispatcher
# takes it when the lease runs out.
EXPRESS_LEASE_SECONDS = 30


def _any_index(field: Any, count: int) -> Any:
    """`field` equal to any of `count` blind indexes (a number's under each
    configured index key): parameters index0, index1, …"""
    return functools.reduce(operator.or_, (field == Param(f"index{i}") for i in range(count)))


def _indexes(phone_indexes: Sequence[str]) -> dict[str, str]:
    return {f"index{i}": index for i, index in enumerate(phone_indexes)}


class _ByCount:
    """One query per number of blind indexes (the number of index keys, fixed
    for a process), each compiled once."""

    def __init__(self, name: str, build: Any) -> None:
        self._name = name
        self._build = build
        self._queries: dict[int, Query] = {}

    def __call__(self, count: int) -> Query:
        query = self._queries.get(count)
        if query is None:
            build = self._build
            query = Query(f"{self._name}.{count}", lambda t: build(t, count))
            self._queries[count] = query
        return query


def _steps(text: str) -> tuple[Step, ...]:
    return tuple(Step(s) for s in text.split(",") if s)


# -- accounts -----------------------------------------------------------------------

_ACCOUNT_COLUMNS = (
    "account_id",
    "phone_index",
    "phone_sealed",
    "phone_masked",
    "holder_name_hash",
    "holder_name_masked",
    "id_number_hash",
    "id_number_masked",
    "id_province",
    "bound_at",
    "hold_until",
    "created_at",
    "rebind_locked_until",
)
_ACCOUNT_AND_HEAD = (*_ACCOUNT_COLUMNS, "audit_seq", "audit_mac")


def _account_select(t: Any) -> peewee.ModelSelect:
    a = t.accounts
    return a.select(*(getattr(a, name) for name in _ACCOUNT_AND_HEAD))


def _account(row: tuple) -> Account:
    return Account(
        account_id=row[0],
        phone=SealedPhone(row[1], row[2], row[3]),
        holder_name_hash=row[4],
        holder_name_masked=row[5],
        id_number_hash=row[6],
        id_number_masked=row[7],
        id_province=row[8],
        bound_at=row[9],
        hold_until=row[10],
        created_at=row[11],
        rebind_locked_until=row[12],
    )


def _account_values(account: Account) -> dict[str, Any]:
    return {
        "account_id": account.account_id,
        "phone_index": account.phone.index,
        "phone_sealed": account.phone.sealed,
        "phone_masked": account.phone.masked,
        "holder_name_hash": account.holder_name_hash,
        "holder_name_masked": account.holder_name_masked,
        "id_number_hash": account.id_number_hash,
        "id_number_masked": account.id_number_masked,
        "id_province": account.id_province,
        "bound_at": account.bound_at,
        "hold_until": account.hold_until,
        "created_at": account.created_at,
        "rebind_locked_until": account.rebind_locked_until,
    }


class LockedWithAuditSeq(Query):
    """A select of one account row, locked, that also takes the global `seq`
    of the next audit event of the account's chain, so that an audited unit of
    work needs no statement (and no round trip) of its own for it.

    The seq is taken once the row is locked, as every seq of that chain is:
    on PostgreSQL `nextval` in an outer select over the locked one (a
    value taken before waiting for the lock could be lower than one another
    unit took for the same chain while holding it); on SQLite, whose write
    transactions are serial, the last event's seq + 1. A unit that appends no
    event leaves a gap in seq, as a rolled-back one always did on PostgreSQL.
    """

    __slots__ = ()

    def __init__(self, name: str, build: Any) -> None:
        super().__init__(name, build, locks=True)

    def compile(self, tables: Any, *, row_locks: bool) -> Compiled:
        inner = self.build(tables)
        if row_locks:
            inner = inner.for_update()
        locked = inner.alias("locked")
        events = tables.audit_events
        seq = (
            # The sequence BIGSERIAL made for audit_events.seq (m0003).
            peewee.SQL("nextval('audit_events_seq_seq')")
            if is_postgres(tables.database)
            else events.select(peewee.fn.COALESCE(peewee.fn.MAX(events.seq), 0) + 1)
        )
        columns = [getattr(locked.c, name) for name in _ACCOUNT_AND_HEAD]
        outer = peewee.Select(from_list=[locked], columns=[*columns, seq]).bind(tables.database)
        shape = compile_query(inner)
        return compile_query(
            outer,
            results=(*shape.results, None),
            columns=(*shape.columns, "audit_seq_reserved"),
        )


class AccountRows:
    GET = Query(
        "accounts.get",
        lambda t: _account_select(t).where(t.accounts.account_id == Param("account_id")),
    )
    LOCK = LockedWithAuditSeq(
        "accounts.lock",
        lambda t: _account_select(t).where(t.accounts.account_id == Param("account_id")),
    )
    OF_REBIND = Query(
        "accounts.of_rebind",
        lambda t: _account_select(t).where(
            t.accounts.account_id
            == t.rebinds.select(t.rebinds.account_id).where(
                t.rebinds.rebind_id == Param("rebind_id")
            )
        ),
    )
    LOCK_OF_REBIND = LockedWithAuditSeq(
        "accounts.lock_of_rebind",
        lambda t: _account_select(t).where(
            t.accounts.account_id
            == t.rebinds.select(t.rebinds.account_id).where(
                t.rebinds.rebind_id == Param("rebind_id")
            )
        ),
    )
    OWNER = _ByCount(
        "accounts.owner",
        lambda t, n: (
            t.accounts.select(t.accounts.account_id)
            .where(_any_index(t.accounts.phone_index, n))
            .limit(1)
        ),
    )
    REHASH = Query(
        "accounts.rehash_identity",
        lambda t: t.accounts.update(
            {
                t.accounts.holder_name_hash: Param("name_hash", t.accounts.holder_name_hash),
                t.accounts.id_number_hash: Param("id_hash", t.accounts.id_number_hash),
            }
        ).where(
            (t.accounts.account_id == Param("account_id"))
            & (t.accounts.holder_name_hash == Param("old_name_hash"))
            & (t.accounts.id_number_hash == Param("old_id_hash"))
        ),
    )
    ADD = Query(
        "accounts.add",
        lambda t: t.accounts.insert(values(t.accounts, _ACCOUNT_COLUMNS)),
    )
    SAVE = Query(
        "accounts.save",
        lambda t: t.accounts.update(values(t.accounts, _ACCOUNT_COLUMNS[1:])).where(
            t.accounts.account_id == Param("account_id")
        ),
    )

    def __init__(self, tx: SqlTx) -> None:
        self._tx = tx

    def _mapper(self, lock: bool) -> Any:
        if not lock:
            return first(_account)
        heads = self._tx.heads

        reserved = self._tx.reserved_seqs

        def locked(row: tuple) -> Account:
            # The account's audit chain head lives on its row, locked with it,
            # and the seq of the chain's next event comes with it.
            chain = _ACCOUNT_CHAIN + row[0]
            heads[chain] = (row[13], row[14])
            reserved[chain] = int(row[15])
            return _account(row)

        return first(locked)

    def get(self, account_id: str, *, lock: bool = False) -> Read[Account | None]:
        return StatementRead(
            self.LOCK if lock else self.GET, {"account_id": account_id}, self._mapper(lock)
        )

    def of_rebind(self, rebind_id: str, *, lock: bool = False) -> Read[Account | None]:
        return StatementRead(
            self.LOCK_OF_REBIND if lock else self.OF_REBIND,
            {"rebind_id": rebind_id},
            self._mapper(lock),
        )

    def owner_of(self, phone_indexes: Sequence[str]) -> Read[str | None]:
        return StatementRead(self.OWNER(len(phone_indexes)), _indexes(phone_indexes), value)

    def rehash_identity(
        self, account_id: str, *, old: tuple[str, str], new: tuple[str, str]
    ) -> None:
        self._tx.write(
            self.REHASH,
            {
                "account_id": account_id,
                "name_hash": new[0],
                "id_hash": new[1],
                "old_name_hash": old[0],
                "old_id_hash": old[1],
            },
        )

    def add(self, account: Account) -> None:
        self._tx.write(self.ADD, _account_values(account))
        # A new account's chain starts here (its row holds the head).
        self._tx.heads[account_chain(account.account_id)] = (0, "")

    def save(self, account: Account) -> None:
        self._tx.write(self.SAVE, _account_values(account))


# -- rebinds ------------------------------------------------------------------------

_REBIND_COLUMNS = (
    "rebind_id",
    "account_id",
    "state",
    "new_phone_index",
    "new_phone_sealed",
    "new_phone_masked",
    "old_phone_lost",
    "required_steps",
    "completed_steps",
    "risk_decision",
    "risk_score",
    "risk_reasons",
    "failures",
    "created_at",
    "expires_at",
    "updated_at",
    "completed_at",
    "reviewer",
    "review_note",
    "reviewed_at",
    "old_phone_masked",
    "step_times",
    "approvals",
)
_REBIND_WIDTH = len(_REBIND_COLUMNS)


def _step_times(text: str) -> tuple[tuple[Step, datetime], ...]:
    times = []
    for item in text.split(","):
        if item:
            step, _, micros = item.partition("=")
            times.append((Step(step), from_micros(int(micros))))
    return tuple(times)


def _step_times_text(times: tuple[tuple[Step, datetime], ...]) -> str:
    return ",".join(f"{step.value}={to_micros(at)}" for step, at in times)


def _approvals(text: str) -> tuple[Approval, ...]:
    return tuple(
        Approval(item["reviewer"], item["note"], from_micros(int(item["at"])))
        for item in json.loads(text or "[]")
    )


def _approvals_text(approvals: tuple[Approval, ...]) -> str:
    return json.dumps(
        [{"reviewer": a.reviewer, "note": a.note, "at": to_micros(a.at)} for a in approvals],
        ensure_ascii=False,
    )


def _rebind_select(t: Any) -> peewee.ModelSelect:
    r = t.rebinds
    return r.select(*(getattr(r, name) for name in _REBIND_COLUMNS))


def _rebind(row: tuple) -> Rebind:
    return Rebind(
        rebind_id=row[0],
        account_id=row[1],
        state=RebindState(row[2]),
        new_phone=SealedPhone(row[3], row[4], row[5]),
        old_phone_lost=bool(row[6]),
        required=_steps(row[7]),
        completed=_steps(row[8]),
        risk=RiskAssessment(
            decision=RiskDecision(row[9]),
            score=row[10],
            reasons=tuple(r for r in row[11].split(",") if r),
        ),
        failures=row[12],
        created_at=row[13],
        expires_at=row[14],
        updated_at=row[15],
        completed_at=row[16],
        reviewer=row[17],
        review_note=row[18],
        reviewed_at=row[19],
        old_phone_masked=row[20],
        step_times=_step_times(row[21]),
        approvals=_approvals(row[22]),
    )


def _rebind_values(rebind: Rebind) -> dict[str, Any]:
    return {
        "rebind_id": rebind.rebind_id,
        "account_id": rebind.account_id,
        "state": rebind.state.value,
        "new_phone_index": rebind.new_phone.index,
        "new_phone_sealed": rebind.new_phone.sealed,
        "new_phone_masked": rebind.new_phone.masked,
        "old_phone_lost": rebind.old_phone_lost,
        "required_steps": ",".join(s.value for s in rebind.required),
        "completed_steps": ",".join(s.value for s in rebind.completed),
        "risk_decision": rebind.risk.decision.value,
        "risk_score": rebind.risk.score,
        "risk_reasons": ",".join(rebind.risk.reasons),
        "failures": rebind.failures,
        "created_at": rebind.created_at,
        "expires_at": rebind.expires_at,
        "updated_at": rebind.updated_at,
        "completed_at": rebind.completed_at,
        "reviewer": rebind.reviewer,
        "review_note": rebind.review_note,
        "reviewed_at": rebind.reviewed_at,
        "old_phone_masked": rebind.old_phone_masked,
        "step_times": _step_times_text(rebind.step_times),
        "approvals": _approvals_text(rebind.approvals),
    }


def _review_facts_select(t: Any) -> peewee.ModelSelect:
    """A rebind's columns, its account's, and the account's completed changes
    since Param("since_30") and Param("since_365"), in one statement."""
    r, a = t.rebinds, t.accounts
    counts = []
    for window in ("since_30", "since_365"):
        c = t.changes.alias(f"c_{window}")
        counts.append(
            c.select(peewee.fn.COUNT(c.seq))
            .where((c.account_id == r.account_id) & (c.completed_at >= Param(window)))
            .alias(f"changes_{window}")
        )
    return r.select(
        *(getattr(r, name) for name in _REBIND_COLUMNS),
        *(getattr(a, name) for name in _ACCOUNT_COLUMNS),
        *counts,
    ).join(a, on=(a.account_id == r.account_id))


def _review_facts(row: tuple) -> ReviewFacts:
    width = _REBIND_WIDTH + len(_ACCOUNT_COLUMNS)
    return ReviewFacts(
        rebind=_rebind(row[:_REBIND_WIDTH]),
        account=_account(row[_REBIND_WIDTH:width]),
        changes_30_days=int(row[width]),
        changes_365_days=int(row[width + 1]),
    )


def _reviews_query(state: str, readiness: str, by_account: bool, paged: bool) -> Query:
    def build(t: Any) -> peewee.Query:
        r = t.rebinds
        needs_review = r.required_steps.contains(Step.REVIEW.value)
        reviewed = r.completed_steps.contains(Step.REVIEW.value)
        if state == "PENDING":
            where = (
                needs_review
                & ~reviewed
                & (r.expires_at > Param("now"))
                & (r.failures < Param("max_failures"))
            )
            # Every other step done: AWAITING_REVIEW; the customer's steps
            # outstanding: PENDING.
            where &= {
                "ANY": r.state.in_(_OPEN),
                "READY": r.state == RebindState.AWAITING_REVIEW.value,
                "WAITING": r.state == RebindState.PENDING.value,
            }[readiness]
        elif state == "APPROVED":
            where = needs_review & reviewed
        else:
            where = needs_review & (r.state == RebindState.REJECTED.value)
        if by_account:
            where &= r.account_id == Param("account_id")
        if paged:
            created = Param("after_created")
            where &= (r.created_at > created) | (
                (r.created_at == created) & (r.rebind_id > Param("after_id"))
            )
        return (
            _review_facts_select(t)
            .where(where)
            .order_by(r.created_at, r.rebind_id)
            .limit(Param("limit"))
        )

    return Query(f"rebinds.reviews.{state}.{readiness}.{by_account}.{paged}", build)


_REVIEWS = {
    (state, readiness, by_account, paged): _reviews_query(state, readiness, by_account, paged)
    for state, readiness in (
        ("PENDING", "ANY"),
        ("PENDING", "READY"),
        ("PENDING", "WAITING"),
        ("APPROVED", "ANY"),
        ("REJECTED", "ANY"),
    )
    for by_account in (False, True)
    for paged in (False, True)
}


class RebindRows:
    GET = Query(
        "rebinds.get",
        lambda t: _rebind_select(t).where(t.rebinds.rebind_id == Param("rebind_id")),
    )
    OPEN_OF = Query(
        "rebinds.open_of",
        lambda t: _rebind_select(t).where(
            (t.rebinds.account_id == Param("account_id")) & t.rebinds.state.in_(_OPEN)
        ),
    )
    REVIEW = Query(
        "rebinds.review",
        lambda t: _review_facts_select(t).where(t.rebinds.rebind_id == Param("rebind_id")),
    )
    ADD = Query("rebinds.add", lambda t: t.rebinds.insert(values(t.rebinds, _REBIND_COLUMNS)))
    SAVE = Query(
        "rebinds.save",
        lambda t: t.rebinds.update(values(t.rebinds, _REBIND_COLUMNS[1:])).where(
            t.rebinds.rebind_id == Param("rebind_id")
        ),
    )

    def __init__(self, tx: SqlTx) -> None:
        self._tx = tx

    def get(self, rebind_id: str) -> Read[Rebind | None]:
        return StatementRead(self.GET, {"rebind_id": rebind_id}, first(_rebind))

    def open_of(self, account_id: str) -> Read[list[Rebind]]:
        return StatementRead(self.OPEN_OF, {"account_id": account_id}, every(_rebind))

    def add(self, rebind: Rebind) -> None:
        self._tx.write(self.ADD, _rebind_values(rebind))

    def save(self, rebind: Rebind) -> None:
        self._tx.write(self.SAVE, _rebind_values(rebind))

    def reviews(
        self,
        state: str,
        *,
        readiness: str = "ANY",
        account_id: str = "",
        now: datetime,
        max_failures: int,
        windows: tuple[datetime, datetime],
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> Read[list[ReviewFacts]]:
        params: dict[str, Any] = {"now": now, "max_failures": max_failures, "limit": limit}
        params["since_30"], params["since_365"] = windows
        if account_id:
            params["account_id"] = account_id
        if after is not None:
            params["after_created"], params["after_id"] = after
        query = _REVIEWS[(state, readiness, bool(account_id), after is not None)]
        return StatementRead(query, params, every(_review_facts))

    def review(
        self, rebind_id: str, *, windows: tuple[datetime, datetime]
    ) -> Read[ReviewFacts | None]:
        params = {"rebind_id": rebind_id, "since_30": windows[0], "since_365": windows[1]}
        return StatementRead(self.REVIEW, params, first(_review_facts))


# -- challenges ---------------------------------------------------------------------

_CHALLENGE_COLUMNS = (
    "rebind_id",
    "target",
    "code_mac",
    "state",
    "attempts",
    "created_at",
    "expires_at",
    "resend_at",
)


def _challenge(row: tuple) -> Challenge:
    return Challenge(
        rebind_id=row[0],
        target=CodeTarget(row[1]),
        code_mac=row[2],
        state=ChallengeState(row[3]),
        attempts=row[4],
        created_at=row[5],
        expires_at=row[6],
        resend_at=row[7],
    )


class ChallengeRows:
    GET = Query(
        "challenges.get",
        lambda t: t.challenges.select(
            *(getattr(t.challenges, name) for name in _CHALLENGE_COLUMNS)
        ).where(
            (t.challenges.rebind_id == Param("rebind_id"))
            & (t.challenges.target == Param("target"))
        ),
    )
    SAVE = Query(
        "challenges.save",
        lambda t: t.challenges.insert(values(t.challenges, _CHALLENGE_COLUMNS)).on_conflict(
            conflict_target=[t.challenges.rebind_id, t.challenges.target],
            preserve=[getattr(t.challenges, name) for name in _CHALLENGE_COLUMNS[2:]],
        ),
    )

    def __init__(self, tx: SqlTx) -> None:
        self._tx = tx

    def get(self, rebind_id: str, target: CodeTarget) -> Read[Challenge | None]:
        return StatementRead(
            self.GET, {"rebind_id": rebind_id, "target": target.value}, first(_challenge)
        )

    def save(self, challenge: Challenge) -> None:
        self._tx.write(
            self.SAVE,
            {
                "rebind_id": challenge.rebind_id,
                "target": challenge.target.value,
                "code_mac": challenge.code_mac,
                "state": challenge.state.value,
                "attempts": challenge.attempts,
                "created_at": challenge.created_at,
                "expires_at": challenge.expires_at,
                "resend_at": challenge.resend_at,
            },
        )


# -- outbox -------------------------------------------------------------------------

_OUTBOX_COLUMNS = (
    "message_id",
    "to_index",
    "to_sealed",
    "to_masked",
    "purpose",
    "text",
    "state",
    "attempts",
    "created_at",
    "next_attempt_at",
    "not_after",
    "last_error",
    "account_id",
    "rebind_id",
    "trace_parent",
    "template",
    "language",
    "params",
)


def _code_number(t: Any, target: CodeTarget) -> peewee.Select:
    """The index of the number a code for `target` goes to, from its row."""
    if target is CodeTarget.OLD_PHONE:
        return t.accounts.select(t.accounts.phone_index).where(
            t.accounts.account_id == Param("account_id")
        )
    return t.rebinds.select(t.rebinds.new_phone_index).where(
        t.rebinds.rebind_id == Param("rebind_id")
    )


def _sent_times_to_code_number(target: CodeTarget) -> Query:
    return Query(
        f"outbox.sent_times_to_code_number.{target.value}",
        lambda t: (
            t.outbox.select(t.outbox.created_at)
            .where(
                (t.outbox.to_index == _code_number(t, target))
                & (t.outbox.purpose == Param("purpose"))
                & (t.outbox.created_at > Param("since"))
            )
            .order_by(t.outbox.created_at)
        ),
    )


def _serialize_code_number(target: CodeTarget) -> Query:
    # LimitRows.serialize's key, the first 8 bytes of SHA-256 as a signed
    # big-endian integer, computed by PostgreSQL from the number's row.
    def build(t: Any) -> peewee.Query:
        number = _code_number(t, target)
        column = number._returning[0]
        key = peewee.NodeList(
            (
                peewee.SQL("('x' || encode(substr(sha256(convert_to('sms-to:' || "),
                column,
                peewee.SQL(", 'UTF8')), 1, 8), 'hex'))::bit(64)::bigint"),
            ),
            glue="",
        )
        return number.select(peewee.fn.pg_advisory_xact_lock(key))

    return Query(f"limits.serialize_code_number.{target.value}", build)


class OutboxRows:
    ENQUEUE = Query("outbox.enqueue", lambda t: t.outbox.insert(values(t.outbox, _OUTBOX_COLUMNS)))
    SENT_TIMES_TO_CODE_NUMBER: ClassVar[dict[CodeTarget, Query]] = {
        target: _sent_times_to_code_number(target) for target in CodeTarget
    }
    SENT_TIMES = _ByCount(
        "outbox.sent_times",
        lambda t, n: (
            t.outbox.select(t.outbox.created_at)
            .where(
                _any_index(t.outbox.to_index, n)
                & (t.outbox.purpose == Param("purpose"))
                & (t.outbox.created_at > Param("since"))
            )
            .order_by(t.outbox.created_at)
        ),
    )

    def __init__(self, tx: SqlTx) -> None:
        self._tx = tx

    def enqueue(self, message: OutboundSms) -> None:
        from datetime import timedelta

        self._tx.write(
            self.ENQUEUE,
            {
                "message_id": message.message_id,
                "to_index": message.to.index,
                "to_sealed": message.to.sealed,
                "to_masked": message.to.masked,
                "purpose": message.purpose,
                "text": message.sealed_text,
                "state": "PENDING",
                # Leased at birth to this process, which delivers it once the
                # unit of work commits (one attempt).
                "attempts": 1,
                "created_at": message.created_at,
                "next_attempt_at": message.created_at + timedelta(seconds=EXPRESS_LEASE_SECONDS),
                "not_after": message.not_after,
                "last_error": "",
                "account_id": message.account_id,
                "rebind_id": message.rebind_id,
                # Its delivery's span links back to the span queuing it.
                "trace_parent": current_traceparent(),
                "template": message.template,
                "language": message.language,
                "params": message.sealed_params,
            },
        )
        self._tx.messages.append(message)

    def sent_times(
        self, phone_indexes: Sequence[str], purpose: str, *, since: datetime
    ) -> Read[list[datetime]]:
        return StatementRead(
            self.SENT_TIMES(len(phone_indexes)),
            {**_indexes(phone_indexes), "purpose": purpose, "since": since},
            every(lambda row: row[0]),
        )

    def sent_times_to_code_number(
        self, target: CodeTarget, account_id: str, rebind_id: str, purpose: str, *, since: datetime
    ) -> Read[list[datetime]]:
        number = (
            {"account_id": account_id}
            if target is CodeTarget.OLD_PHONE
            else {"rebind_id": rebind_id}
        )
        return StatementRead(
            self.SENT_TIMES_TO_CODE_NUMBER[target],
            {**number, "purpose": purpose, "since": since},
            every(lambda row: row[0]),
        )


# -- binding history ----------------------------------------------------------------

_CHANGE_COLUMNS = (
    "rebind_id",
    "account_id",
    "old_phone_index",
    "old_phone_sealed",
    "old_phone_masked",
    "new_phone_index",
    "new_phone_sealed",
    "new_phone_masked",
    "old_phone_lost",
    "completed_at",
)


def _change(row: tuple) -> tuple[int, BindingChange]:
    return row[0], BindingChange(
        rebind_id=row[1],
        account_id=row[2],
        old_phone=SealedPhone(row[3], row[4], row[5]),
        new_phone=SealedPhone(row[6], row[7], row[8]),
        old_phone_lost=bool(row[9]),
        completed_at=row[10],
    )


def _page_query(paged: bool) -> Query:
    def build(t: Any) -> peewee.Query:
        c = t.changes
        where = c.account_id == Param("account_id")
        if paged:
            where &= c.seq < Param("before_seq")
        return (
            c.select(c.seq, *(getattr(c, name) for name in _CHANGE_COLUMNS))
            .where(where)
            .order_by(c.seq.desc())
            .limit(Param("limit"))
        )

    return Query(f"changes.page.{paged}", build)


def _counts_query(windows: int) -> Query:
    def build(t: Any) -> peewee.Query:
        c = t.changes
        counts = [
            peewee.fn.COALESCE(
                peewee.fn.SUM(peewee.Case(None, [(c.completed_at >= Param(f"since{i}"), 1)], 0)),
                0,
            )
            for i in range(windows)
        ]
        return c.select(*counts).where(
            (c.account_id == Param("account_id")) & (c.completed_at >= Param("earliest"))
        )

    return Query(f"changes.counts.{windows}", build)


class ChangeRows:
    ADD = Query("changes.add", lambda t: t.changes.insert(values(t.changes, _CHANGE_COLUMNS)))
    PAGE: ClassVar[dict[bool, Query]] = {paged: _page_query(paged) for paged in (False, True)}
    RELEASED = _ByCount(
        "changes.released_by_other",
        lambda t, n: (
            t.changes.select(peewee.SQL("1"))
            .where(
                _any_index(t.changes.old_phone_index, n)
                & (t.changes.account_id != Param("account_id"))
                & (t.changes.completed_at >= Param("since"))
            )
            .limit(1)
        ),
    )

    def __init__(self, tx: SqlTx) -> None:
        self._tx = tx

    def add(self, change: BindingChange) -> None:
        self._tx.write(
            self.ADD,
            {
                "rebind_id": change.rebind_id,
                "account_id": change.account_id,
                "old_phone_index": change.old_phone.index,
                "old_phone_sealed": change.old_phone.sealed,
                "old_phone_masked": change.old_phone.masked,
                "new_phone_index": change.new_phone.index,
                "new_phone_sealed": change.new_phone.sealed,
                "new_phone_masked": change.new_phone.masked,
                "old_phone_lost": change.old_phone_lost,
                "completed_at": change.completed_at,
            },
        )

    def page(
        self, account_id: str, *, before_seq: int | None, limit: int
    ) -> Read[list[tuple[int, BindingChange]]]:
        params: dict[str, Any] = {"account_id": account_id, "limit": limit}
        if before_seq is not None:
            params["before_seq"] = before_seq
        return StatementRead(self.PAGE[before_seq is not None], params, every(_change))

    def counts(self, account_id: str, *, since: Sequence[datetime]) -> Read[tuple[int, ...]]:
        params: dict[str, Any] = {f"since{i}": start for i, start in enumerate(since)}
        params["account_id"] = account_id
        params["earliest"] = min(since)

        def shape(compiled: Any, rows: list[tuple]) -> tuple[int, ...]:
            return tuple(int(count) for count in rows[0])

        return StatementRead(_COUNTS[len(since)], params, shape)

    def released_by_other(
        self, phone_indexes: Sequence[str], *, account_id: str, since: datetime
    ) -> Read[bool]:
        return StatementRead(
            self.RELEASED(len(phone_indexes)),
            {**_indexes(phone_indexes), "account_id": account_id, "since": since},
            exists,
        )


_COUNTS = {windows: _counts_query(windows) for windows in (1, 2, 3)}


# -- limits -------------------------------------------------------------------------


class LimitRows:
    START_TIMES = Query(
        "limits.start_times",
        lambda t: (
            t.rebinds.select(t.rebinds.created_at.alias("at"))
            .where(
                (t.rebinds.account_id == Param("account_id"))
                & (t.rebinds.created_at > Param("since"))
            )
            .union_all(
                t.refused_starts.select(t.refused_starts.refused_at).where(
                    (t.refused_starts.account_id == Param("account_id"))
                    & (t.refused_starts.refused_at > Param("since"))
                )
            )
            .order_by(peewee.SQL("at"))
        ),
    )
    REFUSED_START = Query(
        "limits.refused_start",
        lambda t: t.refused_starts.insert(values(t.refused_starts, ("account_id", "refused_at"))),
    )
    IDENTITY_FAILURE = Query(
        "limits.identity_failure",
        lambda t: t.identity_failures.insert(
            values(t.identity_failures, ("account_id", "rebind_id", "failed_at"))
        ),
    )
    IDENTITY_FAILURE_TIMES = Query(
        "limits.identity_failure_times",
        lambda t: (
            t.identity_failures.select(t.identity_failures.failed_at)
            .where(
                (t.identity_failures.account_id == Param("account_id"))
                & (t.identity_failures.failed_at > Param("since"))
            )
            .order_by(t.identity_failures.failed_at)
        ),
    )
    SERIALIZE_CODE_NUMBER: ClassVar[dict[CodeTarget, Query]] = {
        target: _serialize_code_number(target) for target in CodeTarget
    }
    SERIALIZE = Query(
        "limits.serialize",
        lambda t: peewee.Select(columns=[peewee.fn.pg_advisory_xact_lock(Param("key"))]).bind(
            t.database
        ),
    )

    def __init__(self, tx: SqlTx) -> None:
        self._tx = tx

    def start_times(self, account_id: str, *, since: datetime) -> Read[list[datetime]]:
        from .fields import from_micros

        # A union's column takes no field conversion: the microseconds come back as they are.
        return StatementRead(
            self.START_TIMES,
            {"account_id": account_id, "since": since},
            every(lambda row: from_micros(row[0])),
        )

    def refused_start(self, account_id: str, at: datetime) -> None:
        self._tx.write(self.REFUSED_START, {"account_id": account_id, "refused_at": at})

    def identity_failure(self, account_id: str, rebind_id: str, at: datetime) -> None:
        self._tx.write(
            self.IDENTITY_FAILURE,
            {"account_id": account_id, "rebind_id": rebind_id, "failed_at": at},
        )

    def identity_failure_times(self, account_id: str, *, since: datetime) -> Read[list[datetime]]:
        return StatementRead(
            self.IDENTITY_FAILURE_TIMES,
            {"account_id": account_id, "since": since},
            every(lambda row: row[0]),
        )

    def serialize(self, key: str) -> None:
        # SQLite write transactions are serial already (BEGIN IMMEDIATE).
        if self._tx.row_locks:
            digest = hashlib.sha256(key.encode()).digest()
            self._tx.write(self.SERIALIZE, {"key": int.from_bytes(digest[:8], "big", signed=True)})

    def serialize_code_number(
        self, target: CodeTarget, account_id: str, rebind_id: str
    ) -> Read[None]:
        if not self._tx.row_locks:  # SQLite: serial already, as above
            return Known(None)
        number = (
            {"account_id": account_id}
            if target is CodeTarget.OLD_PHONE
            else {"rebind_id": rebind_id}
        )
        return StatementRead(
            self.SERIALIZE_CODE_NUMBER[target], number, lambda compiled, rows: None
        )


# -- audit --------------------------------------------------------------------------

_EVENT_COLUMNS = (
    "seq",
    "key_id",
    "chain_id",
    "chain_seq",
    "at",
    "caller",
    "rpc",
    "request_id",
    "action",
    "outcome",
    "account_id",
    "rebind_id",
    "details",
    "prev_mac",
    "mac",
)


class AuditRows:
    ACCOUNT_HEAD = Query(
        "audit.account_head",
        lambda t: t.accounts.select(t.accounts.audit_seq, t.accounts.audit_mac).where(
            t.accounts.account_id == Param("account_id")
        ),
        locks=True,
    )
    # Creates a shared chain's head the first time, and locks and reads it.
    SHARED_HEAD = Query(
        "audit.shared_head",
        lambda t: (
            t.audit_heads.insert(
                {
                    t.audit_heads.chain_id: Param("chain_id", t.audit_heads.chain_id),
                    t.audit_heads.chain_seq: Param("zero", t.audit_heads.chain_seq),
                    t.audit_heads.last_mac: Param("empty", t.audit_heads.last_mac),
                    t.audit_heads.mac: Param("empty_mac", t.audit_heads.mac),
                }
            )
            .on_conflict(
                conflict_target=[t.audit_heads.chain_id],
                update={t.audit_heads.chain_id: peewee.EXCLUDED.chain_id},
            )
            .returning(t.audit_heads.chain_seq, t.audit_heads.last_mac)
        ),
    )
    INSERT = Query(
        "audit.insert", lambda t: t.audit_events.insert(values(t.audit_events, _EVENT_COLUMNS))
    )
    # The seq is taken before the insert, for the event's MAC to cover it.
    NEXT_SEQ = Query(
        "audit.next_seq",
        lambda t: (
            peewee.Select(
                # The sequence BIGSERIAL made for audit_events.seq (m0003).
                columns=[peewee.SQL("nextval('audit_events_seq_seq')")]
            )
            if is_postgres(t.database)
            # SQLite's write transactions are serial: the next seq is the last one's + 1.
            else t.audit_events.select(peewee.fn.COALESCE(peewee.fn.MAX(t.audit_events.seq), 0) + 1)
        ),
    )
    REGISTER = Query(
        "audit.register",
        lambda t: t.audit_chains.insert(
            values(t.audit_chains, ("ordinal", "chain_id", "key_id", "prev_mac", "mac"))
        ),
    )
    MOVE_ACCOUNT_HEAD = Query(
        "audit.move_account_head",
        lambda t: t.accounts.update(
            values(t.accounts, ("audit_seq", "audit_mac", "audit_head_mac"))
        ).where(t.accounts.account_id == Param("account_id")),
    )
    MOVE_SHARED_HEAD = Query(
        "audit.move_shared_head",
        lambda t: t.audit_heads.update(
            {
                t.audit_heads.chain_seq: Param("audit_seq", t.audit_heads.chain_seq),
                t.audit_heads.last_mac: Param("audit_mac", t.audit_heads.last_mac),
                t.audit_heads.mac: Param("audit_head_mac", t.audit_heads.mac),
            }
        ).where(t.audit_heads.chain_id == Param("chain_id")),
    )

    def __init__(self, tx: SqlTx) -> None:
        self._tx = tx

    def head(self, chain_id: str) -> Read[tuple[int, str]]:
        known = self._tx.heads.get(chain_id)
        if known is not None:
            return Known(known)
        heads = self._tx.heads

        def remember(compiled: Any, rows: list[tuple]) -> tuple[int, str]:
            head = (int(rows[0][0]), rows[0][1]) if rows else (0, "")
            heads[chain_id] = head
            return head

        if chain_id.startswith(_ACCOUNT_CHAIN):
            return StatementRead(
                self.ACCOUNT_HEAD, {"account_id": chain_id[len(_ACCOUNT_CHAIN) :]}, remember
            )
        return StatementRead(
            self.SHARED_HEAD,
            {"chain_id": chain_id, "zero": 0, "empty": "", "empty_mac": ""},
            remember,
        )

    def next_seq(self, chain_id: str) -> Read[int]:
        reserved = self._tx.reserved_seqs.pop(chain_id, None)
        if reserved is not None:
            return Known(reserved)
        return StatementRead(self.NEXT_SEQ, {}, lambda c, rows: int(rows[0][0]))

    def register(self, row: RegisteredChain, head_mac: str) -> None:
        tx = self._tx
        tx.write(
            self.REGISTER,
            {
                "ordinal": row.ordinal,
                "chain_id": row.chain_id,
                "key_id": row.key_id,
                "prev_mac": row.prev_mac,
                "mac": row.mac,
            },
        )
        tx.write(
            self.MOVE_SHARED_HEAD,
            {
                "chain_id": REGISTRY,
                "audit_seq": row.ordinal,
                "audit_mac": row.mac,
                "audit_head_mac": head_mac,
            },
        )
        tx.heads[REGISTRY] = (row.ordinal, row.mac)

    def append(self, event: StoredEvent, head_mac: str) -> None:
        tx = self._tx
        tx.write(
            self.INSERT,
            {
                "seq": event.seq,
                "key_id": event.key_id,
                "chain_id": event.chain_id,
                "chain_seq": event.chain_seq,
                "at": event.at,
                "caller": event.caller,
                "rpc": event.rpc,
                "request_id": event.request_id,
                "action": event.action,
                "outcome": event.outcome,
                "account_id": event.account_id,
                "rebind_id": event.rebind_id,
                "details": canonical_details(event.details),
                "prev_mac": event.prev_mac,
                "mac": event.mac,
            },
        )
        if tx.reserved_seqs and not tx.row_locks:
            # On SQLite a seq reserved as the last one + 1 is this event's now.
            tx.reserved_seqs.clear()
        head = {"audit_seq": event.chain_seq, "audit_mac": event.mac, "audit_head_mac": head_mac}
        if event.chain_id.startswith(_ACCOUNT_CHAIN):
            head["account_id"] = event.chain_id[len(_ACCOUNT_CHAIN) :]
            tx.write(self.MOVE_ACCOUNT_HEAD, head)
        else:
            head["chain_id"] = event.chain_id
            tx.write(self.MOVE_SHARED_HEAD, head)
        tx.heads[event.chain_id] = (event.chain_seq, event.mac)


# -- idempotency --------------------------------------------------------------------


class RequestRows:
    GET = Query(
        "requests.get",
        lambda t: t.requests.select(
            t.requests.fingerprint, t.requests.result, t.requests.created_at
        ).where(
            (t.requests.operation == Param("operation"))
            & (t.requests.account_id == Param("account_id"))
            & (t.requests.request_id == Param("request_id"))
        ),
    )
    PUT = Query(
        "requests.put",
        lambda t: t.requests.insert(
            values(
                t.requests,
                ("operation", "account_id", "request_id", "fingerprint", "result", "created_at"),
            )
        ),
    )

    def __init__(self, tx: SqlTx) -> None:
        self._tx = tx

    def get(
        self, operation: str, account_id: str, request_id: str
    ) -> Read[IdempotencyRecord | None]:
        def record(row: tuple) -> IdempotencyRecord:
            return IdempotencyRecord(
                operation, account_id, request_id, row[0], json.loads(row[1]), row[2]
            )

        return StatementRead(
            self.GET,
            {"operation": operation, "account_id": account_id, "request_id": request_id},
            first(record),
        )

    def put(self, record: IdempotencyRecord) -> None:
        self._tx.write(
            self.PUT,
            {
                "operation": record.operation,
                "account_id": record.account_id,
                "request_id": record.request_id,
                "fingerprint": record.fingerprint,
                "result": json.dumps(record.result),
                "created_at": record.created_at,
            },
        )


REPOSITORIES.update(
    accounts=AccountRows,
    rebinds=RebindRows,
    codes=ChallengeRows,
    outbox=OutboxRows,
    history=ChangeRows,
    limits=LimitRows,
    audit=AuditRows,
    requests=RequestRows,
)
