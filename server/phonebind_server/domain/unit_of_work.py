"""The one wrapper every writing use case runs in: a unit of work in the store,
with idempotent replay and remember, committed refusals, and a bounded retry
when a concurrent writer wins a uniqueness race."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from .context import CallContext
from .errors import DomainError, Reason, invalid
from .model import IdempotencyRecord
from .ports import Clock, Conflict, Read, Store, Tx

# A unit of work that lost a race on a uniqueness rule runs again, this often
# at most; each run sees what the winner committed.
CONFLICT_RUNS = 3

T = TypeVar("T")


@dataclass(frozen=True)
class Idempotency:
    """A call's request_id, and what the call asked (AIP-155): a repeat with the
    same request_id answers as the first did; with other parameters it is refused."""

    operation: str
    account_id: str
    request_id: str
    fingerprint: str

    @classmethod
    def of(cls, operation: str, account_id: str, request_id: str, *parts: object) -> Idempotency:
        digest = hashlib.sha256(
            json.dumps([operation, account_id, *parts], ensure_ascii=True).encode()
        ).hexdigest()
        return cls(operation, account_id, request_id, digest)


class CommitThenRaise(Exception):
    """Raised by a unit of work whose refusal must be committed (a counted wrong
    answer, a counted start): the unit commits, then `error` reaches the caller."""

    def __init__(self, error: DomainError) -> None:
        super().__init__(error.reason.value)
        self.error = error


class _RecheckThenRefuse(Exception):
    """A keyed unit's refusal, rolled back; its request_id is read once more."""

    def __init__(self, error: DomainError) -> None:
        super().__init__(error.reason.value)
        self.error = error


def run_unit(
    store: Store,
    clock: Clock,
    call: CallContext,
    work: Callable[..., tuple[T, Mapping[str, str]]],
    *,
    reads: Callable[[Tx], tuple[Read[Any], ...]] = lambda tx: (),
    key: Idempotency | None = None,
    replay: Callable[..., T] | None = None,
    conflicts: Mapping[str, Callable[[], DomainError]] | None = None,
) -> T:
    """Runs `work(tx, *results of reads(tx))` in one transaction.

    With a `key` (a call that carried a request_id), its idempotency record
    is read in the same round trip as `reads`: a known request_id answers
    `replay(tx, record, *results)` instead (refused if it came with other
    parameters), and a new one is remembered with what `work` returns
    beside its answer. A uniqueness conflict named in `conflicts` becomes
    that error; any other runs the unit again, up to CONFLICT_RUNS times.

    A keyed call that `work` refuses reads its record once more before
    answering: a twin call with the same request_id may have committed
    while this one waited for its lock, and then this one is its replay.
    """
    refused: DomainError | None = None
    for _ in range(CONFLICT_RUNS + 1):
        refusal: DomainError | None = None
        try:
            with store.transaction(call) as tx:
                try:
                    if key is None:
                        return work(tx, *tx.read(*reads(tx)))[0]
                    loaded: list[Any]
                    record, *loaded = tx.read(
                        tx.requests.get(key.operation, key.account_id, key.request_id),
                        *reads(tx),
                    )
                    if record is not None:
                        if record.fingerprint != key.fingerprint:
                            raise invalid(
                                Reason.REQUEST_ID_REUSED,
                                "request_id",
                                "request_id was already used for a different request",
                            )
                        if replay is None:
                            raise TypeError("a unit of work with a key needs its replay")
                        return replay(tx, record, *loaded)
                    if refused is not None:
                        raise refused
                    try:
                        answer, remembered = work(tx, *loaded)
                    except DomainError as error:
                        raise _RecheckThenRefuse(error) from error  # rolls back
                    tx.requests.put(
                        IdempotencyRecord(
                            key.operation,
                            key.account_id,
                            key.request_id,
                            key.fingerprint,
                            dict(remembered),
                            clock.now(),
                        )
                    )
                    return answer
                except CommitThenRaise as committed:
                    refusal = committed.error
        except _RecheckThenRefuse as recheck:
            refused = recheck.error
            continue
        except Conflict as conflict:
            if conflicts and (named := conflicts.get(conflict.constraint)):
                raise named() from None
            continue
        if refusal is not None:
            raise refusal
    raise DomainError(
        Reason.STORE_UNAVAILABLE,
        "concurrent changes to this account kept conflicting; retry",
        retry_after=timedelta(milliseconds=100),
    )
