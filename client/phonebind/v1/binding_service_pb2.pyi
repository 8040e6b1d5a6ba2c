import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from phonebind.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterAccountRequest(_message.Message):
    __slots__ = ("account_id", "holder_name", "id_number", "phone", "request_id")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_NAME_FIELD_NUMBER: _ClassVar[int]
    ID_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PHONE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    holder_name: str
    id_number: str
    phone: str
    request_id: str
    def __init__(self, account_id: _Optional[str] = ..., holder_name: _Optional[str] = ..., id_number: _Optional[str] = ..., phone: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RegisterAccountResponse(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: _resources_pb2.Account
    def __init__(self, account: _Optional[_Union[_resources_pb2.Account, _Mapping]] = ...) -> None: ...

class GetAccountRequest(_message.Message):
    __slots__ = ("account_id",)
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    def __init__(self, account_id: _Optional[str] = ...) -> None: ...

class GetAccountResponse(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: _resources_pb2.Account
    def __init__(self, account: _Optional[_Union[_resources_pb2.Account, _Mapping]] = ...) -> None: ...

class StartRebindRequest(_message.Message):
    __slots__ = ("account_id", "new_phone", "old_phone_lost", "request_id")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_PHONE_FIELD_NUMBER: _ClassVar[int]
    OLD_PHONE_LOST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    new_phone: str
    old_phone_lost: bool
    request_id: str
    def __init__(self, account_id: _Optional[str] = ..., new_phone: _Optional[str] = ..., old_phone_lost: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class StartRebindResponse(_message.Message):
    __slots__ = ("rebind",)
    REBIND_FIELD_NUMBER: _ClassVar[int]
    rebind: _resources_pb2.Rebind
    def __init__(self, rebind: _Optional[_Union[_resources_pb2.Rebind, _Mapping]] = ...) -> None: ...

class VerifyIdentityRequest(_message.Message):
    __slots__ = ("account_id", "rebind_id", "holder_name", "id_number")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    REBIND_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_NAME_FIELD_NUMBER: _ClassVar[int]
    ID_NUMBER_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    rebind_id: str
    holder_name: str
    id_number: str
    def __init__(self, account_id: _Optional[str] = ..., rebind_id: _Optional[str] = ..., holder_name: _Optional[str] = ..., id_number: _Optional[str] = ...) -> None: ...

class VerifyIdentityResponse(_message.Message):
    __slots__ = ("rebind",)
    REBIND_FIELD_NUMBER: _ClassVar[int]
    rebind: _resources_pb2.Rebind
    def __init__(self, rebind: _Optional[_Union[_resources_pb2.Rebind, _Mapping]] = ...) -> None: ...

class SendCodeRequest(_message.Message):
    __slots__ = ("account_id", "rebind_id", "target", "request_id")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    REBIND_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    rebind_id: str
    target: _resources_pb2.CodeTarget
    request_id: str
    def __init__(self, account_id: _Optional[str] = ..., rebind_id: _Optional[str] = ..., target: _Optional[_Union[_resources_pb2.CodeTarget, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SendCodeResponse(_message.Message):
    __slots__ = ("expire_time", "resend_time", "attempts_left")
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESEND_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_LEFT_FIELD_NUMBER: _ClassVar[int]
    expire_time: _timestamp_pb2.Timestamp
    resend_time: _timestamp_pb2.Timestamp
    attempts_left: int
    def __init__(self, expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resend_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts_left: _Optional[int] = ...) -> None: ...

class VerifyCodeRequest(_message.Message):
    __slots__ = ("account_id", "rebind_id", "target", "code")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    REBIND_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    rebind_id: str
    target: _resources_pb2.CodeTarget
    code: str
    def __init__(self, account_id: _Optional[str] = ..., rebind_id: _Optional[str] = ..., target: _Optional[_Union[_resources_pb2.CodeTarget, str]] = ..., code: _Optional[str] = ...) -> None: ...

class VerifyCodeResponse(_message.Message):
    __slots__ = ("rebind",)
    REBIND_FIELD_NUMBER: _ClassVar[int]
    rebind: _resources_pb2.Rebind
    def __init__(self, rebind: _Optional[_Union[_resources_pb2.Rebind, _Mapping]] = ...) -> None: ...

class CompleteRebindRequest(_message.Message):
    __slots__ = ("account_id", "rebind_id", "request_id")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    REBIND_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    rebind_id: str
    request_id: str
    def __init__(self, account_id: _Optional[str] = ..., rebind_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CompleteRebindResponse(_message.Message):
    __slots__ = ("rebind", "account")
    REBIND_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    rebind: _resources_pb2.Rebind
    account: _resources_pb2.Account
    def __init__(self, rebind: _Optional[_Union[_resources_pb2.Rebind, _Mapping]] = ..., account: _Optional[_Union[_resources_pb2.Account, _Mapping]] = ...) -> None: ...

class CancelRebindRequest(_message.Message):
    __slots__ = ("account_id", "rebind_id")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    REBIND_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    rebind_id: str
    def __init__(self, account_id: _Optional[str] = ..., rebind_id: _Optional[str] = ...) -> None: ...

class CancelRebindResponse(_message.Message):
    __slots__ = ("rebind",)
    REBIND_FIELD_NUMBER: _ClassVar[int]
    rebind: _resources_pb2.Rebind
    def __init__(self, rebind: _Optional[_Union[_resources_pb2.Rebind, _Mapping]] = ...) -> None: ...

class GetRebindRequest(_message.Message):
    __slots__ = ("account_id", "rebind_id")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    REBIND_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    rebind_id: str
    def __init__(self, account_id: _Optional[str] = ..., rebind_id: _Optional[str] = ...) -> None: ...

class GetRebindResponse(_message.Message):
    __slots__ = ("rebind",)
    REBIND_FIELD_NUMBER: _ClassVar[int]
    rebind: _resources_pb2.Rebind
    def __init__(self, rebind: _Optional[_Union[_resources_pb2.Rebind, _Mapping]] = ...) -> None: ...

class ListBindingHistoryRequest(_message.Message):
    __slots__ = ("account_id", "page_size", "page_token")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    page_size: int
    page_token: str
    def __init__(self, account_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBindingHistoryResponse(_message.Message):
    __slots__ = ("changes", "next_page_token")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[_resources_pb2.BindingChange]
    next_page_token: str
    def __init__(self, changes: _Optional[_Iterable[_Union[_resources_pb2.BindingChange, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
