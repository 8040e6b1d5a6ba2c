"""ReviewService: the risk-operations console's calls, mapped onto the domain."""

from __future__ import annotations

from datetime import datetime

import grpc

from phonebind.v1 import review_service_pb2 as api
from phonebind.v1 import review_service_pb2_grpc as api_grpc

from ..domain.policy import Policy
from ..domain.review import ReviewDesk
from . import convert
from .pagination import PageTokens


class ReviewServicer(api_grpc.ReviewServiceServicer):
    def __init__(self, desk: ReviewDesk, policy: Policy, page_tokens: PageTokens) -> None:
        self._desk = desk
        self._policy = policy
        self._tokens = page_tokens

    def ListReviews(self, request: api.ListReviewsRequest, context: grpc.ServicerContext):
        state = convert.review_filter(request.state)
        scope = "reviews:" + state.value
        cursor = self._tokens.decode(scope, request.page_token)
        after: tuple[datetime, str] | None = None
        if cursor is not None:
            created, rebind_id = cursor.split("|", 1)
            after = (datetime.fromisoformat(created), rebind_id)
        page = self._desk.list(state, request.page_size, after)
        token = ""  # nosec B105  # an empty page token marks the last page, not a credential
        if page.next_cursor is not None:
            created, rebind_id = page.next_cursor
            token = self._tokens.encode(scope, f"{created.isoformat()}|{rebind_id}")
        return api.ListReviewsResponse(
            rebinds=[convert.rebind(r, self._policy) for r in page.rebinds],
            next_page_token=token,
        )

    def ApproveRebind(self, request: api.ApproveRebindRequest, context: grpc.ServicerContext):
        rebind = self._desk.approve(request.rebind_id, request.reviewer, request.note)
        return api.ApproveRebindResponse(rebind=convert.rebind(rebind, self._policy))

    def RejectRebind(self, request: api.RejectRebindRequest, context: grpc.ServicerContext):
        rebind = self._desk.reject(request.rebind_id, request.reviewer, request.reason)
        return api.RejectRebindResponse(rebind=convert.rebind(rebind, self._policy))
