"""BindingService: phonebind.v1 requests in, domain calls, responses out.

No rules live here (they are in domain/rebind.py) and no SQL. Each use case
runs in the store (`run`); errors are raised as DomainError and turned into
statuses by the ErrorStatus interceptor.
"""

from __future__ import annotations

from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import resources_pb2

from ..domain.context import CallContext
from ..domain.model import Account, Rebind
from ..domain.rebind import RebindService
from ..domain.status import rebind_status
from . import convert
from .pagination import PageTokens
from .services import RunInStore


class BindingServicer:
    def __init__(self, service: RebindService, page_tokens: PageTokens, run: RunInStore) -> None:
        self._service = service
        self._tokens = page_tokens
        self._run = run

    def _account(self, entity: Account) -> resources_pb2.Account:
        return convert.account(entity, self._service.now())

    def _rebind(self, entity: Rebind, call: CallContext) -> resources_pb2.Rebind:
        return convert.rebind(entity, rebind_status(entity, self._service.policy), call.language)

    async def RegisterAccount(self, request: api.RegisterAccountRequest, call: CallContext):
        account = await self._run(
            self._service.register_account,
            call,
            request.account_id,
            request.holder_name,
            request.id_number,
            request.phone,
            request.request_id,
        )
        return api.RegisterAccountResponse(account=self._account(account))

    async def GetAccount(self, request: api.GetAccountRequest, call: CallContext):
        account = await self._run(self._service.get_account, call, request.account_id)
        return api.GetAccountResponse(account=self._account(account))

    async def StartRebind(self, request: api.StartRebindRequest, call: CallContext):
        rebind = await self._run(
            self._service.start_rebind,
            call,
            request.account_id,
            request.new_phone,
            request.old_phone_lost,
            request.request_id,
        )
        return api.StartRebindResponse(rebind=self._rebind(rebind, call))

    async def VerifyIdentity(self, request: api.VerifyIdentityRequest, call: CallContext):
        rebind = await self._run(
            self._service.verify_identity,
            call,
            request.account_id,
            request.rebind_id,
            request.holder_name,
            request.id_number,
        )
        return api.VerifyIdentityResponse(rebind=self._rebind(rebind, call))

    async def SendCode(self, request: api.SendCodeRequest, call: CallContext):
        sent = await self._run(
            self._service.send_code,
            call,
            request.account_id,
            request.rebind_id,
            convert.code_target(request.target),
            request.request_id,
        )
        return api.SendCodeResponse(
            expire_time=convert.timestamp(sent.expires_at),
            resend_time=convert.timestamp(sent.resend_at),
            attempts_left=sent.attempts_left,
        )

    async def VerifyCode(self, request: api.VerifyCodeRequest, call: CallContext):
        rebind = await self._run(
            self._service.verify_code,
            call,
            request.account_id,
            request.rebind_id,
            convert.code_target(request.target),
            request.code,
        )
        return api.VerifyCodeResponse(rebind=self._rebind(rebind, call))

    async def CompleteRebind(self, request: api.CompleteRebindRequest, call: CallContext):
        done = await self._run(
            self._service.complete_rebind,
            call,
            request.account_id,
            request.rebind_id,
            request.request_id,
        )
        return api.CompleteRebindResponse(
            rebind=self._rebind(done.rebind, call), account=self._account(done.account)
        )

    async def CancelRebind(self, request: api.CancelRebindRequest, call: CallContext):
        rebind = await self._run(
            self._service.cancel_rebind, call, request.account_id, request.rebind_id
        )
        return api.CancelRebindResponse(rebind=self._rebind(rebind, call))

    async def GetRebind(self, request: api.GetRebindRequest, call: CallContext):
        rebind = await self._run(
            self._service.get_rebind, call, request.account_id, request.rebind_id
        )
        return api.GetRebindResponse(rebind=self._rebind(rebind, call))

    async def ListBindingHistory(self, request: api.ListBindingHistoryRequest, call: CallContext):
        scope = "history:" + request.account_id
        cursor = self._tokens.decode(scope, request.page_token)
        page = await self._run(
            self._service.list_history,
            call,
            request.account_id,
            request.page_size,
            None if cursor is None else int(cursor),
        )
        token = (
            "" if page.next_cursor is None else self._tokens.encode(scope, str(page.next_cursor))
        )
        return api.ListBindingHistoryResponse(
            changes=[convert.binding_change(c) for c in page.changes], next_page_token=token
        )
