"""AuditService: reading and verifying the audit trail."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from phonebind.v1 import audit_service_pb2 as api

from ..domain.audit_log import AuditLog
from ..domain.context import CallContext
from ..domain.errors import Reason, invalid
from . import convert
from .pagination import PageTokens
from .services import RunInStore


def _time(request: api.ListAuditEventsRequest, name: str) -> datetime | None:
    """The filter time, None when unset; INVALID_ARGUMENT outside Timestamp's range."""
    if not request.HasField(name):
        return None
    value: timestamp_pb2.Timestamp = getattr(request, name)
    try:
        return value.ToDatetime(tzinfo=UTC)
    except ValueError:  # seconds beyond 0001..9999, or nanos outside 0..999999999
        raise invalid(Reason.INVALID_ARGUMENT, name, f"{name} is not a valid time") from None


class AuditServicer:
    def __init__(self, log: AuditLog, page_tokens: PageTokens, run: RunInStore) -> None:
        self._log = log
        self._tokens = page_tokens
        self._run = run

    async def ListAuditEvents(self, request: api.ListAuditEventsRequest, call: CallContext):
        since, until = _time(request, "start_time"), _time(request, "end_time")
        filters = (
            request.account_id,
            request.rebind_id,
            request.action,
            request.start_time.ToJsonString() if request.HasField("start_time") else "",
            request.end_time.ToJsonString() if request.HasField("end_time") else "",
        )
        scope = "audit:" + "\x1f".join(filters)
        cursor = self._tokens.decode(scope, request.page_token)
        events, next_seq = await self._run(
            self._log.events,
            call,
            account_id=request.account_id,
            rebind_id=request.rebind_id,
            action=request.action,
            since=since,
            until=until,
            page_size=request.page_size,
            after_seq=None if cursor is None else int(cursor),
        )
        return api.ListAuditEventsResponse(
            events=[
                api.AuditEvent(
                    seq=e.seq,
                    chain_id=e.chain_id,
                    chain_seq=e.chain_seq,
                    event_time=convert.timestamp(e.at),
                    caller=e.caller,
                    rpc=e.rpc,
                    request_id=e.request_id,
                    action=e.action,
                    outcome=e.outcome,
                    account_id=e.account_id,
                    rebind_id=e.rebind_id,
                    details=e.details,
                    mac=e.mac,
                )
                for e in events
            ],
            next_page_token="" if next_seq is None else self._tokens.encode(scope, str(next_seq)),
        )

    async def VerifyAuditChain(self, request: api.VerifyAuditChainRequest, call: CallContext):
        report = await self._run(self._log.verify, call, request.account_id)
        return api.VerifyAuditChainResponse(
            ok=report.ok,
            chains_checked=report.chains,
            events_checked=report.events,
            problems=report.problems,
        )
