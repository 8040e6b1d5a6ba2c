"""ReviewService: the risk-operations desk's calls, mapped onto the domain.

The reviewer of a decision is the call context's caller, set by the
authentication interceptor (with a delegating console's person); the
requests' deprecated `reviewer` fields are ignored.
"""

from __future__ import annotations

from datetime import datetime

from phonebind.v1 import review_service_pb2 as api

from ..domain.context import CallContext
from ..domain.policy import Policy
from ..domain.review import ReviewCase, ReviewDesk
from ..domain.status import rebind_status
from . import convert
from .pagination import PageTokens
from .services import RunInStore


class ReviewServicer:
    def __init__(
        self,
        desk: ReviewDesk,
        policy: Policy,
        page_tokens: PageTokens,
        run: RunInStore,
    ) -> None:
        self._desk = desk
        self._policy = policy
        self._tokens = page_tokens
        self._run = run

    def _case(self, case: ReviewCase, call: CallContext) -> api.ReviewCase:
        status = rebind_status(case.rebind, self._policy)
        return convert.review_case(case, status, call.language)

    async def ListReviews(self, request: api.ListReviewsRequest, call: CallContext):
        state = convert.review_filter(request.state)
        readiness = convert.readiness(request.readiness)
        # A token is good only for the filters it was issued under.
        scope = f"reviews:{state.value}:{readiness.value}:{request.account_id}"
        cursor = self._tokens.decode(scope, request.page_token)
        after: tuple[datetime, str] | None = None
        if cursor is not None:
            created, rebind_id = cursor.split("|", 1)
            after = (datetime.fromisoformat(created), rebind_id)
        page = await self._run(
            self._desk.list,
            call,
            state,
            request.page_size,
            after,
            readiness=readiness,
            account_id=request.account_id,
        )
        token = ""  # nosec B105  # an empty page token marks the last page, not a credential
        if page.next_cursor is not None:
            created, rebind_id = page.next_cursor
            token = self._tokens.encode(scope, f"{created.isoformat()}|{rebind_id}")
        cases = [self._case(case, call) for case in page.cases]
        return api.ListReviewsResponse(
            rebinds=[case.rebind for case in cases], reviews=cases, next_page_token=token
        )

    async def GetReview(self, request: api.GetReviewRequest, call: CallContext):
        case = await self._run(self._desk.get, call, request.rebind_id)
        return api.GetReviewResponse(review=self._case(case, call))

    async def ApproveRebind(self, request: api.ApproveRebindRequest, call: CallContext):
        case = self._case(
            await self._run(self._desk.approve, call, request.rebind_id, request.note), call
        )
        return api.ApproveRebindResponse(rebind=case.rebind, review=case)

    async def RejectRebind(self, request: api.RejectRebindRequest, call: CallContext):
        case = self._case(
            await self._run(self._desk.reject, call, request.rebind_id, request.reason), call
        )
        return api.RejectRebindResponse(rebind=case.rebind, review=case)
