import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from phonebind.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReviewReadiness(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVIEW_READINESS_UNSPECIFIED: _ClassVar[ReviewReadiness]
    REVIEW_READINESS_READY: _ClassVar[ReviewReadiness]
    REVIEW_READINESS_WAITING_ON_CUSTOMER: _ClassVar[ReviewReadiness]
REVIEW_READINESS_UNSPECIFIED: ReviewReadiness
REVIEW_READINESS_READY: ReviewReadiness
REVIEW_READINESS_WAITING_ON_CUSTOMER: ReviewReadiness

class ListReviewsRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token", "readiness", "account_id")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    READINESS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    state: _resources_pb2.ReviewState
    page_size: int
    page_token: str
    readiness: ReviewReadiness
    account_id: str
    def __init__(self, state: _Optional[_Union[_resources_pb2.ReviewState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., readiness: _Optional[_Union[ReviewReadiness, str]] = ..., account_id: _Optional[str] = ...) -> None: ...

class ListReviewsResponse(_message.Message):
    __slots__ = ("rebinds", "next_page_token", "reviews")
    REBINDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REVIEWS_FIELD_NUMBER: _ClassVar[int]
    rebinds: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Rebind]
    next_page_token: str
    reviews: _containers.RepeatedCompositeFieldContainer[ReviewCase]
    def __init__(self, rebinds: _Optional[_Iterable[_Union[_resources_pb2.Rebind, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., reviews: _Optional[_Iterable[_Union[ReviewCase, _Mapping]]] = ...) -> None: ...

class GetReviewRequest(_message.Message):
    __slots__ = ("rebind_id",)
    REBIND_ID_FIELD_NUMBER: _ClassVar[int]
    rebind_id: str
    def __init__(self, rebind_id: _Optional[str] = ...) -> None: ...

class GetReviewResponse(_message.Message):
    __slots__ = ("review",)
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    review: ReviewCase
    def __init__(self, review: _Optional[_Union[ReviewCase, _Mapping]] = ...) -> None: ...

class ReviewCase(_message.Message):
    __slots__ = ("rebind", "account", "readiness", "signals", "changes_last_30_days", "changes_last_365_days", "steps", "waiting_since", "waiting")
    REBIND_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    READINESS_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_LAST_30_DAYS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_LAST_365_DAYS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WAITING_SINCE_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    rebind: _resources_pb2.Rebind
    account: _resources_pb2.Account
    readiness: ReviewReadiness
    signals: _containers.RepeatedCompositeFieldContainer[RiskSignal]
    changes_last_30_days: int
    changes_last_365_days: int
    steps: _containers.RepeatedCompositeFieldContainer[StepRecord]
    waiting_since: _timestamp_pb2.Timestamp
    waiting: _duration_pb2.Duration
    def __init__(self, rebind: _Optional[_Union[_resources_pb2.Rebind, _Mapping]] = ..., account: _Optional[_Union[_resources_pb2.Account, _Mapping]] = ..., readiness: _Optional[_Union[ReviewReadiness, str]] = ..., signals: _Optional[_Iterable[_Union[RiskSignal, _Mapping]]] = ..., changes_last_30_days: _Optional[int] = ..., changes_last_365_days: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[StepRecord, _Mapping]]] = ..., waiting_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., waiting: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RiskSignal(_message.Message):
    __slots__ = ("code", "weight", "explanation")
    CODE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    code: str
    weight: int
    explanation: str
    def __init__(self, code: _Optional[str] = ..., weight: _Optional[int] = ..., explanation: _Optional[str] = ...) -> None: ...

class StepRecord(_message.Message):
    __slots__ = ("step", "method", "description", "complete_time")
    STEP_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_TIME_FIELD_NUMBER: _ClassVar[int]
    step: _resources_pb2.RebindStep
    method: str
    description: str
    complete_time: _timestamp_pb2.Timestamp
    def __init__(self, step: _Optional[_Union[_resources_pb2.RebindStep, str]] = ..., method: _Optional[str] = ..., description: _Optional[str] = ..., complete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ApproveRebindRequest(_message.Message):
    __slots__ = ("rebind_id", "reviewer", "note")
    REBIND_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    rebind_id: str
    reviewer: str
    note: str
    def __init__(self, rebind_id: _Optional[str] = ..., reviewer: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class ApproveRebindResponse(_message.Message):
    __slots__ = ("rebind", "review")
    REBIND_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    rebind: _resources_pb2.Rebind
    review: ReviewCase
    def __init__(self, rebind: _Optional[_Union[_resources_pb2.Rebind, _Mapping]] = ..., review: _Optional[_Union[ReviewCase, _Mapping]] = ...) -> None: ...

class RejectRebindRequest(_message.Message):
    __slots__ = ("rebind_id", "reviewer", "reason")
    REBIND_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    rebind_id: str
    reviewer: str
    reason: str
    def __init__(self, rebind_id: _Optional[str] = ..., reviewer: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RejectRebindResponse(_message.Message):
    __slots__ = ("rebind", "review")
    REBIND_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    rebind: _resources_pb2.Rebind
    review: ReviewCase
    def __init__(self, rebind: _Optional[_Union[_resources_pb2.Rebind, _Mapping]] = ..., review: _Optional[_Union[ReviewCase, _Mapping]] = ...) -> None: ...
