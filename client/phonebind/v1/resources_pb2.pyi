import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AccountState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCOUNT_STATE_UNSPECIFIED: _ClassVar[AccountState]
    ACCOUNT_STATE_ACTIVE: _ClassVar[AccountState]
    ACCOUNT_STATE_COOL_OFF: _ClassVar[AccountState]
    ACCOUNT_STATE_REBIND_LOCKED: _ClassVar[AccountState]

class ReviewState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVIEW_STATE_UNSPECIFIED: _ClassVar[ReviewState]
    REVIEW_STATE_PENDING: _ClassVar[ReviewState]
    REVIEW_STATE_APPROVED: _ClassVar[ReviewState]
    REVIEW_STATE_REJECTED: _ClassVar[ReviewState]
    REVIEW_STATE_ABANDONED: _ClassVar[ReviewState]

class RebindState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REBIND_STATE_UNSPECIFIED: _ClassVar[RebindState]
    REBIND_STATE_PENDING: _ClassVar[RebindState]
    REBIND_STATE_AWAITING_REVIEW: _ClassVar[RebindState]
    REBIND_STATE_READY: _ClassVar[RebindState]
    REBIND_STATE_COMPLETED: _ClassVar[RebindState]
    REBIND_STATE_CANCELLED: _ClassVar[RebindState]
    REBIND_STATE_EXPIRED: _ClassVar[RebindState]
    REBIND_STATE_REJECTED: _ClassVar[RebindState]

class RebindStep(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REBIND_STEP_UNSPECIFIED: _ClassVar[RebindStep]
    REBIND_STEP_IDENTITY: _ClassVar[RebindStep]
    REBIND_STEP_OLD_PHONE_CODE: _ClassVar[RebindStep]
    REBIND_STEP_NEW_PHONE_CODE: _ClassVar[RebindStep]
    REBIND_STEP_REVIEW: _ClassVar[RebindStep]

class RiskDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RISK_DECISION_UNSPECIFIED: _ClassVar[RiskDecision]
    RISK_DECISION_ALLOW: _ClassVar[RiskDecision]
    RISK_DECISION_REVIEW: _ClassVar[RiskDecision]
    RISK_DECISION_DENY: _ClassVar[RiskDecision]

class CodeTarget(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODE_TARGET_UNSPECIFIED: _ClassVar[CodeTarget]
    CODE_TARGET_OLD_PHONE: _ClassVar[CodeTarget]
    CODE_TARGET_NEW_PHONE: _ClassVar[CodeTarget]
ACCOUNT_STATE_UNSPECIFIED: AccountState
ACCOUNT_STATE_ACTIVE: AccountState
ACCOUNT_STATE_COOL_OFF: AccountState
ACCOUNT_STATE_REBIND_LOCKED: AccountState
REVIEW_STATE_UNSPECIFIED: ReviewState
REVIEW_STATE_PENDING: ReviewState
REVIEW_STATE_APPROVED: ReviewState
REVIEW_STATE_REJECTED: ReviewState
REVIEW_STATE_ABANDONED: ReviewState
REBIND_STATE_UNSPECIFIED: RebindState
REBIND_STATE_PENDING: RebindState
REBIND_STATE_AWAITING_REVIEW: RebindState
REBIND_STATE_READY: RebindState
REBIND_STATE_COMPLETED: RebindState
REBIND_STATE_CANCELLED: RebindState
REBIND_STATE_EXPIRED: RebindState
REBIND_STATE_REJECTED: RebindState
REBIND_STEP_UNSPECIFIED: RebindStep
REBIND_STEP_IDENTITY: RebindStep
REBIND_STEP_OLD_PHONE_CODE: RebindStep
REBIND_STEP_NEW_PHONE_CODE: RebindStep
REBIND_STEP_REVIEW: RebindStep
RISK_DECISION_UNSPECIFIED: RiskDecision
RISK_DECISION_ALLOW: RiskDecision
RISK_DECISION_REVIEW: RiskDecision
RISK_DECISION_DENY: RiskDecision
CODE_TARGET_UNSPECIFIED: CodeTarget
CODE_TARGET_OLD_PHONE: CodeTarget
CODE_TARGET_NEW_PHONE: CodeTarget

class Account(_message.Message):
    __slots__ = ("account_id", "phone_masked", "holder_name_masked", "id_number_masked", "state", "bound_time", "hold_until", "create_time")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PHONE_MASKED_FIELD_NUMBER: _ClassVar[int]
    HOLDER_NAME_MASKED_FIELD_NUMBER: _ClassVar[int]
    ID_NUMBER_MASKED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BOUND_TIME_FIELD_NUMBER: _ClassVar[int]
    HOLD_UNTIL_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    phone_masked: str
    holder_name_masked: str
    id_number_masked: str
    state: AccountState
    bound_time: _timestamp_pb2.Timestamp
    hold_until: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, account_id: _Optional[str] = ..., phone_masked: _Optional[str] = ..., holder_name_masked: _Optional[str] = ..., id_number_masked: _Optional[str] = ..., state: _Optional[_Union[AccountState, str]] = ..., bound_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., hold_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Rebind(_message.Message):
    __slots__ = ("rebind_id", "account_id", "state", "new_phone_masked", "required_steps", "completed_steps", "risk", "create_time", "expire_time", "complete_time", "old_phone_lost", "attempts_left", "review", "update_time", "notices", "old_phone_masked")
    REBIND_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NEW_PHONE_MASKED_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_STEPS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_TIME_FIELD_NUMBER: _ClassVar[int]
    OLD_PHONE_LOST_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_LEFT_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    NOTICES_FIELD_NUMBER: _ClassVar[int]
    OLD_PHONE_MASKED_FIELD_NUMBER: _ClassVar[int]
    rebind_id: str
    account_id: str
    state: RebindState
    new_phone_masked: str
    required_steps: _containers.RepeatedScalarFieldContainer[RebindStep]
    completed_steps: _containers.RepeatedScalarFieldContainer[RebindStep]
    risk: RiskAssessment
    create_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    complete_time: _timestamp_pb2.Timestamp
    old_phone_lost: bool
    attempts_left: int
    review: Review
    update_time: _timestamp_pb2.Timestamp
    notices: _containers.RepeatedCompositeFieldContainer[Notice]
    old_phone_masked: str
    def __init__(self, rebind_id: _Optional[str] = ..., account_id: _Optional[str] = ..., state: _Optional[_Union[RebindState, str]] = ..., new_phone_masked: _Optional[str] = ..., required_steps: _Optional[_Iterable[_Union[RebindStep, str]]] = ..., completed_steps: _Optional[_Iterable[_Union[RebindStep, str]]] = ..., risk: _Optional[_Union[RiskAssessment, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., complete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., old_phone_lost: _Optional[bool] = ..., attempts_left: _Optional[int] = ..., review: _Optional[_Union[Review, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., notices: _Optional[_Iterable[_Union[Notice, _Mapping]]] = ..., old_phone_masked: _Optional[str] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("code", "text")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    code: str
    text: str
    def __init__(self, code: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Review(_message.Message):
    __slots__ = ("state", "reviewer", "note", "decide_time", "approvals", "approvals_required")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    DECIDE_TIME_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    state: ReviewState
    reviewer: str
    note: str
    decide_time: _timestamp_pb2.Timestamp
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    approvals_required: int
    def __init__(self, state: _Optional[_Union[ReviewState, str]] = ..., reviewer: _Optional[str] = ..., note: _Optional[str] = ..., decide_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ..., approvals_required: _Optional[int] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("reviewer", "note", "approve_time")
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    APPROVE_TIME_FIELD_NUMBER: _ClassVar[int]
    reviewer: str
    note: str
    approve_time: _timestamp_pb2.Timestamp
    def __init__(self, reviewer: _Optional[str] = ..., note: _Optional[str] = ..., approve_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RiskAssessment(_message.Message):
    __slots__ = ("decision", "score", "reasons")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    decision: RiskDecision
    score: int
    reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, decision: _Optional[_Union[RiskDecision, str]] = ..., score: _Optional[int] = ..., reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class BindingChange(_message.Message):
    __slots__ = ("rebind_id", "old_phone_masked", "new_phone_masked", "complete_time", "old_phone_lost")
    REBIND_ID_FIELD_NUMBER: _ClassVar[int]
    OLD_PHONE_MASKED_FIELD_NUMBER: _ClassVar[int]
    NEW_PHONE_MASKED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_TIME_FIELD_NUMBER: _ClassVar[int]
    OLD_PHONE_LOST_FIELD_NUMBER: _ClassVar[int]
    rebind_id: str
    old_phone_masked: str
    new_phone_masked: str
    complete_time: _timestamp_pb2.Timestamp
    old_phone_lost: bool
    def __init__(self, rebind_id: _Optional[str] = ..., old_phone_masked: _Optional[str] = ..., new_phone_masked: _Optional[str] = ..., complete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., old_phone_lost: _Optional[bool] = ...) -> None: ...
