from phonebind.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListReviewsRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: _resources_pb2.ReviewState
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[_resources_pb2.ReviewState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListReviewsResponse(_message.Message):
    __slots__ = ("rebinds", "next_page_token")
    REBINDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rebinds: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Rebind]
    next_page_token: str
    def __init__(self, rebinds: _Optional[_Iterable[_Union[_resources_pb2.Rebind, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("rebind",)
    REBIND_FIELD_NUMBER: _ClassVar[int]
    rebind: _resources_pb2.Rebind
    def __init__(self, rebind: _Optional[_Union[_resources_pb2.Rebind, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("rebind",)
    REBIND_FIELD_NUMBER: _ClassVar[int]
    rebind: _resources_pb2.Rebind
    def __init__(self, rebind: _Optional[_Union[_resources_pb2.Rebind, _Mapping]] = ...) -> None: ...
