"""The rebind flow: every use case of BindingService, and the rules it enforces.

Read this file to know the whole policy. It talks to the outside only through
injected ports (store, clock, random source) and never imports grpc or SQL.
Each use case is one unit of work in the store (`_unit`), which also replays
calls that carry a known request_id and remembers new ones. Every unit of
work that changes an account locks the account's row first. A wrong answer
or a counted refusal is committed before it is raised, whether or not the
caller still waits: that is how the attempt counts.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from . import identity, messages, otp
from .audit import AuditEvent, AuditTrail
from .context import CallContext
from .errors import DomainError, QuotaViolation, Reason, invalid
from .model import (
    Account,
    BindingChange,
    Challenge,
    ChallengeState,
    CodeTarget,
    IdempotencyRecord,
    OutboundSms,
    Rebind,
    RebindState,
    RiskDecision,
    SealedPhone,
    Step,
)
from .phone import PhoneNumber, is_virtual_operator, parse_phone, province_code
from .pii import (
    ACCOUNT_PHONE,
    CHANGE_NEW_PHONE,
    CHANGE_OLD_PHONE,
    OUTBOX_PARAMS,
    OUTBOX_TEXT,
    OUTBOX_TO,
    REBIND_NEW_PHONE,
    SealPlace,
    Vault,
)
from .policy import Policy
from .ports import Clock, Read, Store, Tx
from .risk import RiskSignals, assess
from .unit_of_work import CommitThenRaise, Idempotency, run_unit

_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_REBIND_PREFIX = "rb_"
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 20
T = TypeVar("T")


@dataclass(frozen=True)
class CodeSent:
    expires_at: datetime
    resend_at: datetime
    attempts_left: int


@dataclass(frozen=True)
class Completion:
    rebind: Rebind
    account: Account


@dataclass(frozen=True)
class HistoryPage:
    changes: list[BindingChange]
    next_cursor: int | None


def check_account_id(value: str, field: str = "account_id") -> str:
    if not 1 <= len(value) <= 64 or any(c not in _ID_CHARS for c in value):
        raise invalid(
            Reason.INVALID_ARGUMENT, field, "account_id must be 1-64 of A-Z a-z 0-9 . _ : -"
        )
    return value


def check_rebind_id(value: str) -> str:
    body = value[len(_REBIND_PREFIX) :]
    if (
        not value.startswith(_REBIND_PREFIX)
        or not 1 <= len(body) <= 61
        or any(c not in _TOKEN_CHARS for c in body)
    ):
        raise invalid(
            Reason.INVALID_ARGUMENT, "rebind_id", "rebind_id is not a phonebind rebind id"
        )
    return value


def check_request_id(value: str) -> str:
    """An AIP-155 request id: empty (no idempotency) or 1-64 ID characters."""
    if value and (len(value) > 64 or any(c not in _ID_CHARS for c in value)):
        raise invalid(
            Reason.INVALID_ARGUMENT, "request_id", "request_id must be 1-64 of A-Z a-z 0-9 . _ : -"
        )
    return value


def effective(rebind: Rebind, now: datetime) -> Rebind:
    """The rebind as it stands now: an open rebind past its lifetime is EXPIRED."""
    if rebind.state.is_open and now >= rebind.expires_at:
        return rebind.with_changes(state=RebindState.EXPIRED)
    return rebind


def still_open(
    rebind: Rebind, now: datetime, max_failures: int, *, allow_locked: bool = False
) -> Rebind:
    """The rebind as it stands now, if it can still move on: not expired, not
    closed and (unless `allow_locked`) not locked by wrong answers."""
    rebind = effective(rebind, now)
    if rebind.state is RebindState.EXPIRED:
        raise DomainError(Reason.REBIND_EXPIRED, "the rebind has expired; start again")
    if not rebind.state.is_open:
        raise DomainError(
            Reason.REBIND_CLOSED,
            f"the rebind is {rebind.state.value.lower()}",
            metadata={"state": rebind.state.value},
        )
    if not allow_locked and rebind.locked(max_failures):
        raise DomainError(Reason.REBIND_LOCKED, "too many wrong answers; start a new rebind")
    return rebind


def state_for(required: tuple[Step, ...], completed: tuple[Step, ...]) -> RebindState:
    outstanding = [s for s in required if s not in completed]
    if not outstanding:
        return RebindState.READY
    if outstanding == [Step.REVIEW]:
        return RebindState.AWAITING_REVIEW
    return RebindState.PENDING


class RebindService:
    def __init__(
        self,
        store: Store,
        vault: Vault,
        policy: Policy,
        clock: Clock,
        audit: AuditTrail,
        randbelow: Callable[[int], int] = secrets.randbelow,
        *,
        test_codes: Mapping[str, str] | None = None,
    ) -> None:
        self._store = store
        # Test numbers (by blind index) and their fixed codes: staging's
        # automated flows finish without an SMS, and none is sent to them.
        self._test_codes = dict(test_codes or {})
        self._audit = audit
        self._vault = vault
        self._policy = policy
        self._clock = clock
        self._randbelow = randbelow

    @property
    def policy(self) -> Policy:
        return self._policy

    def now(self) -> datetime:
        return self._clock.now()

    # -- numbers under several index keys --------------------------------------------

    def _indexes_of(self, phone: SealedPhone, place: SealPlace) -> tuple[str, ...]:
        """The stored number's index under every configured index key (with one
        key: its stored index, nothing to open)."""
        if len(self._vault.index_key_ids) == 1 and self._vault.hashed_with_active_key(phone.index):
            return (phone.index,)
        return self._vault.phone_indexes(self._vault.unseal(phone.sealed, place))

    def _lock_number(self, tx: Tx, phone_indexes: Sequence[str]) -> None:
        """While index keys rotate, binding a number takes a lock named by its
        index under the first key id, so that two binds of one number under
        different keys run one after the other and the second one's lookup
        (by every key) sees the first's account. With one key the unique rule
        on accounts' indexes decides alone."""
        if len(phone_indexes) > 1:
            tx.limits.serialize("bind:" + phone_indexes[0])

    # -- the unit of work every use case runs in ------------------------------------

    def _unit(
        self,
        call: CallContext,
        work: Callable[..., tuple[T, Mapping[str, str]]],
        *,
        reads: Callable[[Tx], tuple[Read[Any], ...]] = lambda tx: (),
        key: Idempotency | None = None,
        replay: Callable[..., T] | None = None,
        conflicts: Mapping[str, Callable[[], DomainError]] | None = None,
    ) -> T:
        """`work` in the one wrapper of every use case (see `run_unit`)."""
        return run_unit(
            self._store,
            self._clock,
            call,
            work,
            reads=reads,
            key=key,
            replay=replay,
            conflicts=conflicts,
        )

    # -- accounts ---------------------------------------------------------------

    def register_account(
        self,
        call: CallContext,
        account_id: str,
        holder_name: str,
        id_number: str,
        phone: str,
        request_id: str = "",
    ) -> Account:
        now = self._clock.now()
        check_account_id(account_id)
        check_request_id(request_id)
        name = identity.normalize_name(holder_name)
        id_norm = identity.normalize_id_number(id_number, today=now.date())
        number = self._parse(phone, "phone")
        name_hash = self._vault.name_hash(name)
        id_hash = self._vault.id_number_hash(id_norm)
        phone_indexes = self._vault.phone_indexes(number.e164)
        # The request_id alone makes a replay, whatever the fields: were the
        # fields compared, a known request_id would tell (answer, or
        # REQUEST_ID_REUSED) whether a guessed name or ID number is the record's.
        key = Idempotency.of("RegisterAccount", account_id, request_id)

        def reads(tx: Tx) -> tuple[Read[Any], ...]:
            self._lock_number(tx, phone_indexes)  # sent before the reads
            return tx.accounts.get(account_id), tx.accounts.owner_of(phone_indexes)

        def work(
            tx: Tx, existing: Account | None, owner: str | None
        ) -> tuple[Account, dict[str, str]]:
            # Whatever the fields, so that the answer never tells whether a
            # guessed name or ID number matches the record.
            if existing is not None:
                raise DomainError(Reason.ACCOUNT_EXISTS, "the account is already registered")
            if owner is not None:
                raise _phone_in_use()
            account = Account(
                account_id=account_id,
                phone=self._vault.seal_phone(number, ACCOUNT_PHONE.at(account_id)),
                holder_name_hash=name_hash,
                holder_name_masked=identity.mask_name(name),
                id_number_hash=id_hash,
                id_number_masked=identity.mask_id_number(id_norm),
                id_province=identity.id_province(id_norm),
                bound_at=now,
                created_at=now,
            )
            tx.accounts.add(account)
            self._record(
                tx,
                now,
                "ACCOUNT_REGISTERED",
                account_id,
                phone=account.phone.masked,
                holder_name=account.holder_name_masked,
                id_number=account.id_number_masked,
            )
            return account, {}

        def replay(
            tx: Tx, record: IdempotencyRecord, existing: Account | None, _: object
        ) -> Account:
            return _found(existing)

        return self._unit(
            call,
            work,
            reads=reads,
            key=key if request_id else None,
            replay=replay,
        )

    def get_account(self, call: CallContext, account_id: str) -> Account:
        check_account_id(account_id)
        with self._store.transaction(call, write=False) as tx:
            return _found(tx.one(tx.accounts.get(account_id)))

    # -- starting ---------------------------------------------------------------

    def start_rebind(
        self,
        call: CallContext,
        account_id: str,
        new_phone: str,
        old_phone_lost: bool = False,
        request_id: str = "",
    ) -> Rebind:
        now = self._clock.now()
        check_account_id(account_id)
        check_request_id(request_id)
        number = self._parse(new_phone, "new_phone")
        new_index = self._vault.phone_index(number.e164)
        new_indexes = self._vault.phone_indexes(number.e164)
        key = Idempotency.of("StartRebind", account_id, request_id, new_index, old_phone_lost)
        p = self._policy

        def reads(tx: Tx) -> tuple[Read[Any], ...]:
            return (
                tx.accounts.get(account_id, lock=True),
                tx.limits.start_times(account_id, since=now - _DAY),
                tx.rebinds.open_of(account_id),
                tx.history.counts(
                    account_id, since=(now - p.review_change_window, now - p.deny_change_window)
                ),
                tx.history.released_by_other(
                    new_indexes, account_id=account_id, since=now - p.recycled_number_window
                ),
            )

        def work(
            tx: Tx,
            account: Account | None,
            starts: list[datetime],
            open_rebinds: list[Rebind],
            counts: tuple[int, int],
            released: bool,
        ) -> tuple[Rebind, dict[str, str]]:
            account = _found(account)
            _check_rate(
                starts,
                p.starts_per_account_day,
                _DAY,
                now,
                subject=f"account:{account_id}",
                description=f"{p.starts_per_account_day} rebind starts per account per day",
            )
            # From here every start counts towards the daily cap, refused or
            # not, so that no account can probe numbers or rules without limit.
            # Whether the number is bound elsewhere is told only once its code
            # proved possession (VerifyCode).
            refusal: DomainError | None = None
            if account.rebind_locked_at(now):
                refusal = _locked_error(account, now)
            elif self._vault.same_phone(account.phone.index, number.e164):
                refusal = DomainError(Reason.SAME_PHONE, "the new number is the bound number")
            if refusal is None:
                in_review_window, in_deny_window = counts
                risk = assess(
                    RiskSignals(
                        changes_in_review_window=in_review_window,
                        changes_in_deny_window=in_deny_window,
                        number_recently_released=released,
                        virtual_operator=is_virtual_operator(number, p.virtual_operator_prefixes),
                        old_phone_lost=old_phone_lost,
                        in_cool_off=account.hold_at(now) is not None,
                        province_mismatch=_province_mismatch(number, account.id_province),
                    ),
                    p,
                )
                if risk.decision is RiskDecision.DENY:
                    refusal = DomainError(
                        Reason.RISK_DENIED,
                        "the change is refused by risk policy",
                        metadata={"reasons": ",".join(risk.reasons)},
                    )
            if refusal is not None:
                tx.limits.refused_start(account_id, now)
                tx.commit_even_if_caller_gone()
                raise CommitThenRaise(refusal)

            for previous in open_rebinds:
                closed = effective(previous, now).state
                if closed is not RebindState.EXPIRED:
                    closed = RebindState.CANCELLED
                tx.rebinds.save(previous.with_changes(state=closed, updated_at=now))
                self._record(
                    tx,
                    now,
                    f"REBIND_{closed.value}",
                    account_id,
                    previous.rebind_id,
                    why="a new rebind started",
                )

            required = [Step.IDENTITY]
            if not old_phone_lost:
                required.append(Step.OLD_PHONE_CODE)
            required.append(Step.NEW_PHONE_CODE)
            if risk.decision is RiskDecision.REVIEW:
                required.append(Step.REVIEW)
            new_rebind_id = _REBIND_PREFIX + secrets.token_urlsafe(16)
            rebind = Rebind(
                rebind_id=new_rebind_id,
                account_id=account_id,
                state=RebindState.PENDING,
                new_phone=self._vault.seal_phone(number, REBIND_NEW_PHONE.at(new_rebind_id)),
                old_phone_lost=old_phone_lost,
                old_phone_masked=account.phone.masked,
                required=tuple(required),
                completed=(),
                risk=risk,
                failures=0,
                created_at=now,
                expires_at=now + p.rebind_ttl,
                updated_at=now,
            )
            tx.rebinds.add(rebind)
            self._record(
                tx,
                now,
                "REBIND_STARTED",
                account_id,
                rebind.rebind_id,
                new_phone=rebind.new_phone.masked,
                old_phone_lost=str(old_phone_lost).lower(),
                risk=f"{risk.decision.value}:{risk.score}:{','.join(risk.reasons)}",
                required=",".join(s.value for s in rebind.required),
            )
            return rebind, {"rebind_id": rebind.rebind_id}

        def replay(tx: Tx, record: IdempotencyRecord, *_: object) -> Rebind:
            return self._owned(tx.one(tx.rebinds.get(record.result["rebind_id"])), account_id, now)

        return self._unit(
            call,
            work,
            reads=reads,
            key=key if request_id else None,
            replay=replay,
            conflicts={"open_rebind": _concurrent_start},
        )

    # -- proving ----------------------------------------------------------------

    def verify_identity(
        self, call: CallContext, account_id: str, rebind_id: str, holder_name: str, id_number: str
    ) -> Rebind:
        now = self._clock.now()
        self._check_ids(account_id, rebind_id)
        name = identity.normalize_name(holder_name)
        id_norm = identity.normalize_id_number(id_number, today=now.date())
        p = self._policy

        def work(
            tx: Tx, account: Account | None, row: Rebind | None
        ) -> tuple[Rebind, dict[str, str]]:
            rebind = self._open(row, account_id, now)
            self._require_step(rebind, Step.IDENTITY)
            account = _found(account)
            # Each hash is checked under the key that made it (a rotation of the
            # index key cannot re-derive them: the name and ID number are not kept).
            matches = self._vault.identity_matches(
                account.holder_name_hash, account.id_number_hash, name, id_norm
            )
            if matches:
                if not (
                    self._vault.hashed_with_active_key(account.holder_name_hash)
                    and self._vault.hashed_with_active_key(account.id_number_hash)
                ):
                    # Proven now, so hashed again under the active key.
                    tx.accounts.rehash_identity(
                        account_id,
                        old=(account.holder_name_hash, account.id_number_hash),
                        new=(self._vault.name_hash(name), self._vault.id_number_hash(id_norm)),
                    )
                rebind = self._complete_step(tx, rebind, Step.IDENTITY, now)
                self._record(tx, now, "IDENTITY_VERIFIED", account_id, rebind_id)
                return rebind, {}
            # The account's daily cap may run out before the rebind's: the
            # caller is told the smaller of the two.
            failures_today = (
                len(tx.one(tx.limits.identity_failure_times(account_id, since=now - _DAY))) + 1
            )
            rebind, failure = self._count_failure(
                tx,
                rebind,
                now,
                Reason.IDENTITY_MISMATCH,
                "holder name or ID number mismatch",
                other_attempts_left=p.identity_failures_per_account_day - failures_today,
            )
            tx.limits.identity_failure(account_id, rebind_id, now)
            if failures_today >= p.identity_failures_per_account_day:
                failure = self._lock_rebinding(tx, account, rebind, now)
            raise CommitThenRaise(failure)

        return self._unit(
            call,
            work,
            reads=lambda tx: (tx.accounts.get(account_id, lock=True), tx.rebinds.get(rebind_id)),
        )

    def _lock_rebinding(
        self, tx: Tx, account: Account, rebind: Rebind, now: datetime
    ) -> DomainError:
        """Too many identity failures in a day lock the account's rebinding (not its binding)."""
        p = self._policy
        locked = account.with_changes(rebind_locked_until=now + p.identity_lockout)
        tx.accounts.save(locked)
        tx.rebinds.save(rebind.with_changes(failures=p.rebind_max_failures, updated_at=now))
        error = _locked_error(locked, now)
        self._record(
            tx,
            now,
            "ACCOUNT_LOCKED",
            account.account_id,
            rebind.rebind_id,
            outcome=error.reason.value,
            locked_until=error.metadata["locked_until"],
        )
        return error

    def send_code(
        self,
        call: CallContext,
        account_id: str,
        rebind_id: str,
        target: CodeTarget,
        request_id: str = "",
    ) -> CodeSent:
        now = self._clock.now()
        self._check_ids(account_id, rebind_id)
        check_request_id(request_id)
        p = self._policy
        key = Idempotency.of("SendCode", account_id, request_id, rebind_id, target.value)

        def work(
            tx: Tx,
            account: Account | None,
            row: Rebind | None,
            current: Challenge | None,
            *counted: Any,
        ) -> tuple[CodeSent, dict[str, str]]:
            rebind = self._open(row, account_id, now)
            self._require_step(rebind, target.step)
            if current is not None and now < current.resend_at:
                wait = current.resend_at - now
                raise DomainError(
                    Reason.RESEND_TOO_SOON,
                    "a code was sent to this number moments ago",
                    metadata={"retry_after_seconds": str(_ceil_seconds(wait))},
                    retry_after=wait,
                )
            if target is CodeTarget.OLD_PHONE:
                to, kept_at = _found(account).phone, ACCOUNT_PHONE.at(account_id)
            else:
                to, kept_at = rebind.new_phone, REBIND_NEW_PHONE.at(rebind_id)
            # Per-number caps hold across accounts, processes and hosts: counted
            # under a lock on the number. With one index key the lock and the
            # count went out with the rows (in `reads`, below); while index keys
            # rotate they find the number by its index under every key.
            to_indexes = self._indexes_of(to, kept_at)
            if len(to_indexes) > 1:
                tx.limits.serialize("sms-to:" + to_indexes[0])
                sent_today = tx.one(
                    tx.outbox.sent_times(to_indexes, messages.PURPOSE_REBIND_CODE, since=now - _DAY)
                )
            else:
                sent_today = counted[1]
            for limit, window, per in (
                (p.sends_per_number_hour, _HOUR, "hour"),
                (p.sends_per_number_day, _DAY, "day"),
            ):
                _check_rate(
                    [t for t in sent_today if t > now - window],
                    limit,
                    window,
                    now,
                    subject=f"phone:{to.masked}",
                    description=f"{limit} codes per number per {per}",
                )
            fixed = next((self._test_codes[i] for i in to_indexes if i in self._test_codes), None)
            code = fixed if fixed is not None else otp.new_code(p.code_length, self._randbelow)
            challenge = Challenge(
                rebind_id=rebind_id,
                target=target,
                code_mac=self._vault.code_mac(rebind_id, target.value, code),
                state=ChallengeState.LIVE,
                attempts=0,
                created_at=now,
                expires_at=now + p.code_ttl,
                resend_at=now + p.resend_cooldown,
            )
            tx.codes.save(challenge)
            if fixed is None:
                content = messages.code_message(
                    code, p.code_ttl, language=p.sms_language, signature=p.sms_signature
                )
                self._queue_sms(tx, to, kept_at, messages.PURPOSE_REBIND_CODE, content, now, rebind)
            self._record(
                tx,
                now,
                "CODE_SENT",
                account_id,
                rebind_id,
                target=target.value,
                to=to.masked,
                **({"test_number": "true"} if fixed is not None else {}),
            )
            sent = CodeSent(
                expires_at=challenge.expires_at,
                resend_at=challenge.resend_at,
                attempts_left=min(p.code_max_attempts, rebind.attempts_left(p.rebind_max_failures)),
            )
            return sent, {
                "expires_at": sent.expires_at.isoformat(),
                "resend_at": sent.resend_at.isoformat(),
                "attempts_left": str(sent.attempts_left),
            }

        def replay(tx: Tx, record: IdempotencyRecord, *_: object) -> CodeSent:
            return CodeSent(
                expires_at=datetime.fromisoformat(record.result["expires_at"]),
                resend_at=datetime.fromisoformat(record.result["resend_at"]),
                attempts_left=int(record.result["attempts_left"]),
            )

        return self._unit(
            call,
            work,
            reads=lambda tx: (
                tx.accounts.get(account_id, lock=True),
                tx.rebinds.get(rebind_id),
                tx.codes.get(rebind_id, target),
                # The number's lock and count go with the rows they are read
                # from: the count sees what earlier holders of the lock committed
                # (with one index key; with several, `work` takes them).
                *(
                    (
                        tx.limits.serialize_code_number(target, account_id, rebind_id),
                        tx.outbox.sent_times_to_code_number(
                            target,
                            account_id,
                            rebind_id,
                            messages.PURPOSE_REBIND_CODE,
                            since=now - _DAY,
                        ),
                    )
                    if len(self._vault.index_key_ids) == 1
                    else ()
                ),
            ),
            key=key if request_id else None,
            replay=replay,
        )

    def verify_code(
        self, call: CallContext, account_id: str, rebind_id: str, target: CodeTarget, code: str
    ) -> Rebind:
        now = self._clock.now()
        self._check_ids(account_id, rebind_id)
        p = self._policy
        otp.check_code_format(code, p.code_length)

        def reads(tx: Tx) -> tuple[Read[Any], ...]:
            return (
                tx.accounts.get(account_id, lock=True),
                tx.rebinds.get(rebind_id),
                tx.codes.get(rebind_id, target),
            )

        def work(
            tx: Tx, _account: Account | None, row: Rebind | None, challenge: Challenge | None
        ) -> tuple[Rebind, dict[str, str]]:
            rebind = self._open(row, account_id, now)
            self._require_step(rebind, target.step)
            if challenge is None or challenge.state is ChallengeState.USED:
                raise DomainError(Reason.NO_ACTIVE_CODE, "no code is waiting; send one first")
            if challenge.state is ChallengeState.BURNT or challenge.attempts >= p.code_max_attempts:
                raise DomainError(
                    Reason.CODE_ATTEMPTS_EXHAUSTED,
                    "this code took too many wrong tries; send a new one",
                )
            if now >= challenge.expires_at:
                raise DomainError(Reason.CODE_EXPIRED, "the code has expired; send a new one")
            # The attempt is counted before comparing, under the account's row
            # lock, so parallel guesses can never exceed the cap.
            attempts = challenge.attempts + 1
            # Under the key that MAC'd it: a code sent before a rotation of the
            # code key still verifies while its key stays configured.
            matches = self._vault.code_matches(challenge.code_mac, rebind_id, target.value, code)
            if matches is None:
                raise DomainError(Reason.CODE_EXPIRED, "the code has expired; send a new one")
            if not matches:
                burnt = attempts >= p.code_max_attempts
                tx.codes.save(
                    challenge.with_changes(
                        attempts=attempts,
                        state=ChallengeState.BURNT if burnt else ChallengeState.LIVE,
                    )
                )
                _, failure = self._count_failure(
                    tx,
                    rebind,
                    now,
                    Reason.CODE_MISMATCH,
                    "the code does not match",
                    other_attempts_left=p.code_max_attempts - attempts,
                )
                raise CommitThenRaise(failure)
            if target is CodeTarget.NEW_PHONE:
                # Possession is proven: only now may the caller learn that the
                # number is bound to another account. The code stays live (its
                # try counted), so a code is used exactly when its step is done.
                new_indexes = self._indexes_of(rebind.new_phone, REBIND_NEW_PHONE.at(rebind_id))
                self._lock_number(tx, new_indexes)
                owner = tx.one(tx.accounts.owner_of(new_indexes))
                if owner is not None and owner != account_id:
                    tx.codes.save(challenge.with_changes(attempts=attempts))
                    self._record(
                        tx, now, "CODE_VERIFIED", account_id, rebind_id,
                        outcome=Reason.PHONE_IN_USE.value, target=target.value,
                    )  # fmt: skip
                    error = _phone_in_use()
                    error.audited = True
                    raise CommitThenRaise(error)
            tx.codes.save(challenge.with_changes(attempts=attempts, state=ChallengeState.USED))
            rebind = self._complete_step(tx, rebind, target.step, now)
            self._record(tx, now, "CODE_VERIFIED", account_id, rebind_id, target=target.value)
            return rebind, {}

        return self._unit(call, work, reads=reads)

    # -- finishing --------------------------------------------------------------

    def complete_rebind(
        self, call: CallContext, account_id: str, rebind_id: str, request_id: str = ""
    ) -> Completion:
        now = self._clock.now()
        self._check_ids(account_id, rebind_id)
        check_request_id(request_id)
        p = self._policy
        key = Idempotency.of("CompleteRebind", account_id, request_id, rebind_id)

        def work(
            tx: Tx, account: Account | None, row: Rebind | None
        ) -> tuple[Completion, dict[str, str]]:
            rebind = self._open(row, account_id, now)
            if rebind.state is RebindState.AWAITING_REVIEW:
                raise DomainError(Reason.REVIEW_PENDING, "the change waits for a reviewer")
            if rebind.state is not RebindState.READY:
                missing = ",".join(s.value for s in rebind.outstanding)
                raise DomainError(
                    Reason.STEP_REQUIRED,
                    f"steps outstanding: {missing}",
                    metadata={"missing_steps": missing},
                )
            account = _found(account)
            new_at = REBIND_NEW_PHONE.at(rebind_id)
            new_number = self._vault.unseal(rebind.new_phone.sealed, new_at)
            if self._vault.same_phone(account.phone.index, new_number):
                raise DomainError(Reason.SAME_PHONE, "the new number is the bound number")
            if len(self._vault.index_key_ids) > 1:
                # The unique rule on numbers compares values under one key; while
                # index keys rotate the same number may be bound under another.
                new_indexes = self._vault.phone_indexes(new_number)
                self._lock_number(tx, new_indexes)
                owner = tx.one(tx.accounts.owner_of(new_indexes))
                if owner is not None and owner != account_id:
                    raise _phone_in_use()
            # A hold still running (72 h after a lost phone) is never shortened
            # by a later, ordinary change: its end is the later of the two. The
            # unique rule on numbers decides whether the number is still free.
            hold_until = max(now + p.hold_for(rebind.old_phone_lost), account.hold_until or now)
            # Each row keeps its own sealing of a number, bound to that row.
            old_at = ACCOUNT_PHONE.at(account_id)
            moved = account.with_changes(
                phone=self._vault.move_phone(rebind.new_phone, new_at, old_at),
                bound_at=now,
                hold_until=hold_until,
            )
            tx.accounts.save(moved)
            done = rebind.with_changes(
                state=RebindState.COMPLETED, completed_at=now, updated_at=now
            )
            tx.rebinds.save(done)
            tx.history.add(
                BindingChange(
                    rebind_id=rebind_id,
                    account_id=account_id,
                    old_phone=self._vault.move_phone(
                        account.phone, old_at, CHANGE_OLD_PHONE.at(rebind_id)
                    ),
                    new_phone=self._vault.move_phone(
                        rebind.new_phone, new_at, CHANGE_NEW_PHONE.at(rebind_id)
                    ),
                    old_phone_lost=rebind.old_phone_lost,
                    completed_at=now,
                )
            )
            notice = messages.change_notice(
                rebind.new_phone.masked, language=p.sms_language, signature=p.sms_signature
            )
            if not any(i in self._test_codes for i in self._indexes_of(account.phone, old_at)):
                self._queue_sms(
                    tx, account.phone, old_at, messages.PURPOSE_CHANGE_NOTICE, notice, now, rebind
                )
            self._record(
                tx,
                now,
                "REBIND_COMPLETED",
                account_id,
                rebind_id,
                old_phone=account.phone.masked,
                new_phone=rebind.new_phone.masked,
                hold_until=hold_until.isoformat(),
            )
            return Completion(rebind=done, account=moved), {}

        def replay(
            tx: Tx, record: IdempotencyRecord, account: Account | None, row: Rebind | None
        ) -> Completion:
            return Completion(rebind=self._owned(row, account_id, now), account=_found(account))

        return self._unit(
            call,
            work,
            reads=lambda tx: (tx.accounts.get(account_id, lock=True), tx.rebinds.get(rebind_id)),
            key=key if request_id else None,
            replay=replay,
            conflicts={"phone": _phone_in_use},
        )

    def cancel_rebind(self, call: CallContext, account_id: str, rebind_id: str) -> Rebind:
        now = self._clock.now()
        self._check_ids(account_id, rebind_id)

        def work(
            tx: Tx, _account: Account | None, row: Rebind | None
        ) -> tuple[Rebind, dict[str, str]]:
            # A locked rebind can still be cancelled: giving up is always allowed.
            rebind = self._open(row, account_id, now, allow_locked=True)
            cancelled = rebind.with_changes(state=RebindState.CANCELLED, updated_at=now)
            tx.rebinds.save(cancelled)
            self._record(tx, now, "REBIND_CANCELLED", account_id, rebind_id, why="caller")
            return cancelled, {}

        return self._unit(
            call,
            work,
            reads=lambda tx: (tx.accounts.get(account_id, lock=True), tx.rebinds.get(rebind_id)),
        )

    def get_rebind(self, call: CallContext, account_id: str, rebind_id: str) -> Rebind:
        now = self._clock.now()
        self._check_ids(account_id, rebind_id)
        with self._store.transaction(call, write=False) as tx:
            return self._owned(tx.one(tx.rebinds.get(rebind_id)), account_id, now)

    def list_history(
        self, call: CallContext, account_id: str, page_size: int, cursor: int | None
    ) -> HistoryPage:
        check_account_id(account_id)
        if page_size < 0:
            raise invalid(Reason.INVALID_ARGUMENT, "page_size", "page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        with self._store.transaction(call, write=False) as tx:
            account, rows = tx.read(
                tx.accounts.get(account_id),
                tx.history.page(account_id, before_seq=cursor, limit=size + 1),
            )
        _found(account)
        more = len(rows) > size
        rows = rows[:size]
        return HistoryPage(
            changes=[change for _, change in rows],
            next_cursor=rows[-1][0] if more and rows else None,
        )

    # -- helpers ----------------------------------------------------------------

    def _parse(self, raw: str, field: str) -> PhoneNumber:
        return parse_phone(raw, allowed_regions=self._policy.allowed_regions, field=field)

    def _check_ids(self, account_id: str, rebind_id: str) -> None:
        check_account_id(account_id)
        check_rebind_id(rebind_id)

    @staticmethod
    def _owned(rebind: Rebind | None, account_id: str, now: datetime) -> Rebind:
        # Another account's rebind answers exactly like a missing one.
        if rebind is None or rebind.account_id != account_id:
            raise DomainError(Reason.REBIND_NOT_FOUND, "no such rebind for this account")
        return effective(rebind, now)

    def _open(
        self, rebind: Rebind | None, account_id: str, now: datetime, *, allow_locked: bool = False
    ) -> Rebind:
        """The caller's rebind, if it can still move on."""
        if rebind is None or rebind.account_id != account_id:
            raise DomainError(Reason.REBIND_NOT_FOUND, "no such rebind for this account")
        return still_open(rebind, now, self._policy.rebind_max_failures, allow_locked=allow_locked)

    @staticmethod
    def _require_step(rebind: Rebind, step: Step) -> None:
        if step not in rebind.required:
            raise DomainError(
                Reason.STEP_NOT_REQUIRED,
                f"this rebind does not need {step.value}",
                metadata={"step": step.value},
            )
        if step in rebind.completed:
            raise DomainError(
                Reason.STEP_ALREADY_DONE,
                f"{step.value} is already done",
                metadata={"step": step.value},
            )

    def _complete_step(self, tx: Tx, rebind: Rebind, step: Step, now: datetime) -> Rebind:
        done = rebind.with_step_done(step, now)
        updated = done.with_changes(state=state_for(done.required, done.completed), updated_at=now)
        tx.rebinds.save(updated)
        return updated

    def _count_failure(
        self,
        tx: Tx,
        rebind: Rebind,
        now: datetime,
        reason: Reason,
        message: str,
        other_attempts_left: int | None = None,
    ) -> tuple[Rebind, DomainError]:
        """Counts a wrong answer against the rebind, committed whatever the
        caller's deadline. `other_attempts_left`: what a second limit (the
        code's, the account's) still allows, when it may be less."""
        updated = rebind.with_changes(failures=rebind.failures + 1, updated_at=now)
        tx.rebinds.save(updated)
        tx.commit_even_if_caller_gone()
        rebind_left = updated.attempts_left(self._policy.rebind_max_failures)
        if rebind_left == 0:
            error = DomainError(Reason.REBIND_LOCKED, "too many wrong answers; start a new rebind")
        else:
            left = (
                rebind_left
                if other_attempts_left is None
                else max(0, min(rebind_left, other_attempts_left))
            )
            error = DomainError(reason, message, metadata={"attempts_left": str(left)})
        self._record(
            tx,
            now,
            reason.value,
            rebind.account_id,
            rebind.rebind_id,
            outcome=error.reason.value,
            failures=str(updated.failures),
        )
        error.audited = True
        return updated, error

    def _record(
        self,
        tx: Tx,
        now: datetime,
        action: str,
        account_id: str,
        rebind_id: str = "",
        outcome: str = "OK",
        **details: str,
    ) -> None:
        """Appends an audit event to the account's chain, in this unit of work."""
        self._audit.append(tx, AuditEvent(action, outcome, account_id, rebind_id, details), now)

    def _queue_sms(
        self,
        tx: Tx,
        to: SealedPhone,
        kept_at: SealPlace,
        purpose: str,
        content: messages.SmsContent,
        now: datetime,
        rebind: Rebind,
    ) -> None:
        """Queues `content` to `to`, whose sealing is kept at `kept_at`: the
        message gets its own, bound to its row."""
        not_after = now + self._policy.code_ttl if purpose == messages.PURPOSE_REBIND_CODE else None
        message_id = str(uuid.uuid4())
        tx.outbox.enqueue(
            OutboundSms(
                message_id=message_id,
                to=self._vault.move_phone(to, kept_at, OUTBOX_TO.at(message_id)),
                purpose=purpose,
                sealed_text=self._vault.seal(content.text, OUTBOX_TEXT.at(message_id)),
                template=content.template,
                language=content.language,
                # Sealed like the text: the parameters may hold the code.
                sealed_params=self._vault.seal(
                    json.dumps(content.params, ensure_ascii=False, separators=(",", ":")),
                    OUTBOX_PARAMS.at(message_id),
                ),
                created_at=now,
                not_after=not_after,
                account_id=rebind.account_id,
                rebind_id=rebind.rebind_id,
            )
        )


_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)


def _check_rate(
    times: list[datetime],
    limit: int,
    window: timedelta,
    now: datetime,
    *,
    subject: str,
    description: str,
) -> None:
    """Refuses one more event when `limit` of them already fall inside `window`.

    The retry delay is exact: when enough of the counted events leave the window.
    """
    if len(times) < limit:
        return
    wait = times[len(times) - limit] + window - now
    raise DomainError(
        Reason.RATE_LIMITED,
        f"limit reached: {description}",
        metadata={"limit": description, "retry_after_seconds": str(_ceil_seconds(wait))},
        retry_after=wait,
        quota=(QuotaViolation(subject, description),),
    )


def _found(account: Account | None) -> Account:
    if account is None:
        raise DomainError(Reason.ACCOUNT_NOT_FOUND, "no such account")
    return account


def _locked_error(account: Account, now: datetime) -> DomainError:
    until = account.rebind_locked_until or now
    return DomainError(
        Reason.ACCOUNT_LOCKED,
        "rebinding is locked after repeated identity failures; the binding itself is unchanged",
        metadata={"locked_until": until.isoformat()},
        retry_after=until - now,
    )


def _ceil_seconds(delta: timedelta) -> int:
    seconds = delta.total_seconds()
    return int(seconds) + (0 if seconds == int(seconds) else 1)


def _province_mismatch(number: PhoneNumber, id_province_code: str) -> bool:
    province = province_code(number)
    return province is not None and province != id_province_code


def _phone_in_use() -> DomainError:
    return DomainError(Reason.PHONE_IN_USE, "the number is bound to another account")


def _concurrent_start() -> DomainError:
    return DomainError(
        Reason.STORE_UNAVAILABLE,
        "another rebind of this account started at the same moment; retry",
        retry_after=timedelta(milliseconds=100),
    )
