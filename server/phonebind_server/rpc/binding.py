"""BindingService: phonebind.v1 requests in, domain calls, responses out.

No rules live here (they are in domain/rebind.py) and no SQL. Errors are
raised as DomainError and turned into statuses by the error interceptor.
"""

from __future__ import annotations

import grpc

from phonebind.v1 import binding_service_pb2 as api
from phonebind.v1 import binding_service_pb2_grpc as api_grpc
from phonebind.v1 import resources_pb2

from ..domain.model import Account, Rebind
from ..domain.rebind import RebindService
from . import convert
from .pagination import PageTokens


class BindingServicer(api_grpc.BindingServiceServicer):
    def __init__(self, service: RebindService, page_tokens: PageTokens) -> None:
        self._service = service
        self._tokens = page_tokens

    def _account(self, entity: Account) -> resources_pb2.Account:
        return convert.account(entity, self._service.now())

    def _rebind(self, entity: Rebind) -> resources_pb2.Rebind:
        return convert.rebind(entity, self._service.policy)

    def RegisterAccount(self, request: api.RegisterAccountRequest, context: grpc.ServicerContext):
        account = self._service.register_account(
            request.account_id,
            request.holder_name,
            request.id_number,
            request.phone,
            request.request_id,
        )
        return api.RegisterAccountResponse(account=self._account(account))

    def GetAccount(self, request: api.GetAccountRequest, context: grpc.ServicerContext):
        return api.GetAccountResponse(
            account=self._account(self._service.get_account(request.account_id))
        )

    def StartRebind(self, request: api.StartRebindRequest, context: grpc.ServicerContext):
        rebind = self._service.start_rebind(
            request.account_id, request.new_phone, request.old_phone_lost, request.request_id
        )
        return api.StartRebindResponse(rebind=self._rebind(rebind))

    def VerifyIdentity(self, request: api.VerifyIdentityRequest, context: grpc.ServicerContext):
        rebind = self._service.verify_identity(
            request.account_id, request.rebind_id, request.holder_name, request.id_number
        )
        return api.VerifyIdentityResponse(rebind=self._rebind(rebind))

    def SendCode(self, request: api.SendCodeRequest, context: grpc.ServicerContext):
        sent = self._service.send_code(
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

    def VerifyCode(self, request: api.VerifyCodeRequest, context: grpc.ServicerContext):
        rebind = self._service.verify_code(
            request.account_id,
            request.rebind_id,
            convert.code_target(request.target),
            request.code,
        )
        return api.VerifyCodeResponse(rebind=self._rebind(rebind))

    def CompleteRebind(self, request: api.CompleteRebindRequest, context: grpc.ServicerContext):
        done = self._service.complete_rebind(
            request.account_id, request.rebind_id, request.request_id
        )
        return api.CompleteRebindResponse(
            rebind=self._rebind(done.rebind), account=self._account(done.account)
        )

    def CancelRebind(self, request: api.CancelRebindRequest, context: grpc.ServicerContext):
        rebind = self._service.cancel_rebind(request.account_id, request.rebind_id)
        return api.CancelRebindResponse(rebind=self._rebind(rebind))

    def GetRebind(self, request: api.GetRebindRequest, context: grpc.ServicerContext):
        rebind = self._service.get_rebind(request.account_id, request.rebind_id)
        return api.GetRebindResponse(rebind=self._rebind(rebind))

    def ListBindingHistory(
        self, request: api.ListBindingHistoryRequest, context: grpc.ServicerContext
    ):
        scope = "history:" + request.account_id
        cursor = self._tokens.decode(scope, request.page_token)
        page = self._service.list_history(
            request.account_id, request.page_size, None if cursor is None else int(cursor)
        )
        token = (
            "" if page.next_cursor is None else self._tokens.encode(scope, str(page.next_cursor))
        )
        return api.ListBindingHistoryResponse(
            changes=[convert.binding_change(c) for c in page.changes], next_page_token=token
        )
