"""ReviewService: the risk-operations desk's calls, mapped onto the domain."""

from __future__ import annotations

from datetime import datetime

from phonebind.v1 import review_service_pb2 as api

from ..domain.context import CallContext
from ..domain.policy import Policy
from ..domain.review import ReviewDesk
from . import convert
from .pagination import PageTokens
from .services import RunInStore


class ReviewServicer:
    def __init__(
        self, desk: ReviewDesk, policy: Policy, page_tokens: PageTokens, run: RunInStore
    ) -> None:
        self._desk = desk
        self._policy = policy
        self._tokens = page_tokens
        self._run = run

    async def ListReviews(self, request: api.ListReviewsRequest, call: CallContext):
        state = convert.review_filter(request.state)
        scope = "reviews:" + state.value
        cursor = self._tokens.decode(scope, request.page_token)
        after: tuple[datetime, str] | None = None
        if cursor is not None:
            created, rebind_id = cursor.split("|", 1)
            after = (datetime.fromisoformat(created), rebind_id)
        page = await self._run(self._desk.list, call, state, request.page_size, after)
        token = ""  # nosec B105  # an empty page token marks the last page, not a credential
        if page.next_cursor is not None:
            created, rebind_id = page.next_cursor
            token = self._tokens.encode(scope, f"{created.isoformat()}|{rebind_id}")
        return api.ListReviewsResponse(
            rebinds=[convert.rebind(r, self._policy, call.language) for r in page.rebinds],
            next_page_token=token,
        )

    async def GetReview(self, request: api.GetReviewRequest, call: CallContext):
        rebind = await self._run(self._desk.get, call, request.rebind_id)
        return api.GetReviewResponse(
            review=api.ReviewCase(rebind=convert.rebind(rebind, self._policy, call.language))
        )

    async def ApproveRebind(self, request: api.ApproveRebindRequest, call: CallContext):
        rebind = await self._run(
            self._desk.approve, call, request.rebind_id, request.reviewer, request.note
        )
        return api.ApproveRebindResponse(rebind=convert.rebind(rebind, self._policy, call.language))

    async def RejectRebind(self, request: api.RejectRebindRequest, call: CallContext):
        rebind = await self._run(
            self._desk.reject, call, request.rebind_id, request.reviewer, request.reason
        )
        return api.RejectRebindResponse(rebind=convert.rebind(rebind, self._policy, call.language))
