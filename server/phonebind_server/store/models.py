"""Peewee models of the tables that migrations create (store/migrations).

The models here are bound to no database. Each store binds its own copies
(`bind`), so two stores in one process (a server and a tool, two test servers)
never share or swap a binding.
"""

from __future__ import annotations

from dataclasses import dataclass

import peewee

from .fields import UtcTimestampField


class BaseModel(peewee.Model):
    class Meta:
        database = None


class AccountRow(BaseModel):
    account_id = peewee.CharField(max_length=64, primary_key=True)
    phone_index = peewee.CharField(max_length=81, unique=True)
    phone_sealed = peewee.TextField()
    phone_masked = peewee.CharField(max_length=32)
    holder_name_hash = peewee.CharField(max_length=81)
    holder_name_masked = peewee.CharField(max_length=256)
    id_number_hash = peewee.CharField(max_length=81)
    id_number_masked = peewee.CharField(max_length=32)
    id_province = peewee.CharField(max_length=2)
    bound_at = UtcTimestampField()
    hold_until = UtcTimestampField(null=True)
    created_at = UtcTimestampField()
    rebind_locked_until = UtcTimestampField(null=True)
    # The head of the account's audit chain: every unit of work that writes to
    # the chain holds this row's lock already.
    audit_seq = peewee.BigIntegerField(default=0)
    audit_mac = peewee.CharField(max_length=64, default="")
    audit_head_mac = peewee.CharField(max_length=64, default="")

    class Meta:
        table_name = "accounts"


class RebindRow(BaseModel):
    rebind_id = peewee.CharField(max_length=64, primary_key=True)
    account_id = peewee.CharField(max_length=64)
    state = peewee.CharField(max_length=16)
    new_phone_index = peewee.CharField(max_length=81)
    new_phone_sealed = peewee.TextField()
    new_phone_masked = peewee.CharField(max_length=32)
    old_phone_lost = peewee.BooleanField()
    required_steps = peewee.CharField(max_length=128)
    completed_steps = peewee.CharField(max_length=128)
    risk_decision = peewee.CharField(max_length=16)
    risk_score = peewee.IntegerField()
    risk_reasons = peewee.CharField(max_length=256)
    failures = peewee.IntegerField()
    created_at = UtcTimestampField()
    expires_at = UtcTimestampField()
    updated_at = UtcTimestampField()
    completed_at = UtcTimestampField(null=True)
    reviewer = peewee.CharField(max_length=128)
    review_note = peewee.CharField(max_length=512)
    reviewed_at = UtcTimestampField(null=True)
    old_phone_masked = peewee.CharField(max_length=32)
    step_times = peewee.CharField(max_length=256)
    approvals = peewee.TextField()

    class Meta:
        table_name = "rebinds"


class ChallengeRow(BaseModel):
    rebind_id = peewee.CharField(max_length=64)
    target = peewee.CharField(max_length=16)
    code_mac = peewee.CharField(max_length=81)
    state = peewee.CharField(max_length=8)
    attempts = peewee.IntegerField()
    created_at = UtcTimestampField()
    expires_at = UtcTimestampField()
    resend_at = UtcTimestampField()

    class Meta:
        table_name = "challenges"
        primary_key = peewee.CompositeKey("rebind_id", "target")


class BindingChangeRow(BaseModel):
    seq = peewee.BigAutoField()
    rebind_id = peewee.CharField(max_length=64, unique=True)
    account_id = peewee.CharField(max_length=64)
    old_phone_index = peewee.CharField(max_length=81)
    old_phone_sealed = peewee.TextField()
    old_phone_masked = peewee.CharField(max_length=32)
    new_phone_index = peewee.CharField(max_length=81)
    new_phone_sealed = peewee.TextField()
    new_phone_masked = peewee.CharField(max_length=32)
    old_phone_lost = peewee.BooleanField()
    completed_at = UtcTimestampField()

    class Meta:
        table_name = "binding_changes"


class SmsOutboxRow(BaseModel):
    seq = peewee.BigAutoField()
    message_id = peewee.CharField(max_length=36, unique=True)
    to_index = peewee.CharField(max_length=81)
    to_sealed = peewee.TextField()
    to_masked = peewee.CharField(max_length=32)
    purpose = peewee.CharField(max_length=32)
    # Sealed (it may hold a code); erased to "" once delivered or expired.
    text = peewee.TextField()
    state = peewee.CharField(max_length=8)
    attempts = peewee.IntegerField()
    created_at = UtcTimestampField()
    next_attempt_at = UtcTimestampField()
    not_after = UtcTimestampField(null=True)
    sent_at = UtcTimestampField(null=True)
    last_error = peewee.CharField(max_length=256)
    account_id = peewee.CharField(max_length=64)
    rebind_id = peewee.CharField(max_length=64)
    # The W3C traceparent of the RPC that queued it ("" with tracing off).
    trace_parent = peewee.CharField(max_length=55, default="")
    # The template of the text, its language, and its parameters (a sealed JSON
    # object, erased with the text; "" for rows queued before templates).
    template = peewee.CharField(max_length=64, default="")
    language = peewee.CharField(max_length=8, default="")
    params = peewee.TextField(default="")

    class Meta:
        table_name = "sms_outbox"


class IdempotencyRow(BaseModel):
    operation = peewee.CharField(max_length=32)
    account_id = peewee.CharField(max_length=64)
    request_id = peewee.CharField(max_length=64)
    fingerprint = peewee.CharField(max_length=64)
    result = peewee.TextField()
    created_at = UtcTimestampField()

    class Meta:
        table_name = "idempotency_keys"
        primary_key = peewee.CompositeKey("operation", "account_id", "request_id")


class IdentityFailureRow(BaseModel):
    seq = peewee.BigAutoField()
    account_id = peewee.CharField(max_length=64)
    rebind_id = peewee.CharField(max_length=64)
    failed_at = UtcTimestampField()

    class Meta:
        table_name = "identity_failures"


class RefusedStartRow(BaseModel):
    seq = peewee.BigAutoField()
    account_id = peewee.CharField(max_length=64)
    refused_at = UtcTimestampField()

    class Meta:
        table_name = "refused_starts"


class AuditEventRow(BaseModel):
    seq = peewee.BigAutoField()
    chain_id = peewee.CharField(max_length=80)
    chain_seq = peewee.BigIntegerField()
    at = UtcTimestampField()
    caller = peewee.CharField(max_length=128)
    rpc = peewee.CharField(max_length=128)
    request_id = peewee.CharField(max_length=64)
    action = peewee.CharField(max_length=64)
    outcome = peewee.CharField(max_length=64)
    account_id = peewee.CharField(max_length=64)
    rebind_id = peewee.CharField(max_length=64)
    details = peewee.TextField()
    prev_mac = peewee.CharField(max_length=64)
    mac = peewee.CharField(max_length=64)
    key_id = peewee.CharField(max_length=32)

    class Meta:
        table_name = "audit_events"


class AuditChainRow(BaseModel):
    """The chain registry: one row per chain, MAC-chained in the order chains began."""

    ordinal = peewee.BigIntegerField(primary_key=True)
    chain_id = peewee.CharField(max_length=80, unique=True)
    key_id = peewee.CharField(max_length=32)
    prev_mac = peewee.CharField(max_length=64)
    mac = peewee.CharField(max_length=64)

    class Meta:
        table_name = "audit_chains"


class AuditHeadRow(BaseModel):
    chain_id = peewee.CharField(max_length=80, primary_key=True)
    chain_seq = peewee.BigIntegerField()
    last_mac = peewee.CharField(max_length=64)
    mac = peewee.CharField(max_length=64)

    class Meta:
        table_name = "audit_heads"


class KeyCheckRow(BaseModel):
    purpose = peewee.CharField(max_length=16)
    key_id = peewee.CharField(max_length=64)
    check_value = peewee.CharField(max_length=64)
    created_at = UtcTimestampField()

    class Meta:
        table_name = "key_checks"
        primary_key = peewee.CompositeKey("purpose", "key_id")


@dataclass(frozen=True)
class Tables:
    """One store's models, bound to its database."""

    database: peewee.Database
    accounts: type[AccountRow]
    rebinds: type[RebindRow]
    challenges: type[ChallengeRow]
    changes: type[BindingChangeRow]
    outbox: type[SmsOutboxRow]
    requests: type[IdempotencyRow]
    identity_failures: type[IdentityFailureRow]
    refused_starts: type[RefusedStartRow]
    audit_events: type[AuditEventRow]
    audit_heads: type[AuditHeadRow]
    audit_chains: type[AuditChainRow]
    key_checks: type[KeyCheckRow]


def bind(database: peewee.Database) -> Tables:
    """Copies of the models bound to `database` (peewee model inheritance)."""

    def bound(model: type[BaseModel]) -> type[BaseModel]:
        meta = type("Meta", (), {"database": database, "table_name": model._meta.table_name})
        return type(model.__name__, (model,), {"Meta": meta, "__module__": __name__})

    return Tables(
        database=database,
        accounts=bound(AccountRow),
        rebinds=bound(RebindRow),
        challenges=bound(ChallengeRow),
        changes=bound(BindingChangeRow),
        outbox=bound(SmsOutboxRow),
        requests=bound(IdempotencyRow),
        identity_failures=bound(IdentityFailureRow),
        refused_starts=bound(RefusedStartRow),
        audit_events=bound(AuditEventRow),
        audit_heads=bound(AuditHeadRow),
        audit_chains=bound(AuditChainRow),
        key_checks=bound(KeyCheckRow),
    )


ALL_MODELS: list[type[BaseModel]] = [
    AccountRow,
    RebindRow,
    ChallengeRow,
    BindingChangeRow,
    SmsOutboxRow,
    IdempotencyRow,
    IdentityFailureRow,
    RefusedStartRow,
    AuditEventRow,
    AuditHeadRow,
    AuditChainRow,
    KeyCheckRow,
]


def is_postgres(db: peewee.Database) -> bool:
    return isinstance(db, peewee.PostgresqlDatabase)
