"""PhonebindError: a gRPC error decoded from its google.rpc.Status details (AIP-193)."""

from __future__ import annotations

import datetime
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from phonebind.v1 import errors_pb2

__all__ = ["ERROR_DOMAIN", "PhonebindError"]

#: The ErrorInfo.domain phonebind puts on its errors.
ERROR_DOMAIN = "phonebind.v1"


class PhonebindError(Exception):
    """A failed phonebind call, with the server's ErrorInfo, RetryInfo, BadRequest,
    QuotaFailure and LocalizedMessage details unpacked.

    ``reason`` is the ErrorInfo reason without the ``ERROR_REASON_`` prefix
    (e.g. ``"CODE_MISMATCH"``), or None when the error carried no ErrorInfo
    (transport failures, deadlines, errors from proxies).

    ``request_id`` is the AIP-155 request_id the call carried (set by
    PhonebindClient; None for calls without one): calling again with it
    answers what the first call did, if that took effect. ``x_request_id`` is
    the id the server logged the call under (its ``x-request-id`` trailer).
    """

    code: grpc.StatusCode
    message: str
    reason: str | None
    domain: str | None
    metadata: dict[str, str]
    retry_delay: datetime.timedelta | None
    field_violations: list[tuple[str, str]]
    quota_violations: list[tuple[str, str]]
    localized_message: str | None
    request_id: str | None
    x_request_id: str | None

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str = "",
        *,
        reason: str | None = None,
        domain: str | None = None,
        metadata: dict[str, str] | None = None,
        retry_delay: datetime.timedelta | None = None,
        field_violations: list[tuple[str, str]] | None = None,
        quota_violations: list[tuple[str, str]] | None = None,
        localized_message: str | None = None,
        request_id: str | None = None,
        x_request_id: str | None = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.retry_delay = retry_delay
        self.field_violations = list(field_violations or [])
        self.quota_violations = list(quota_violations or [])
        self.localized_message = localized_message
        self.request_id = request_id
        self.x_request_id = x_request_id

    @property
    def error_reason(self) -> errors_pb2.ErrorReason:
        """``reason`` as an ErrorReason value, to compare with the enum:
        ``err.error_reason == ErrorReason.ERROR_REASON_CODE_MISMATCH``.
        ERROR_REASON_UNSPECIFIED when there is none, or one this client does not know."""
        if self.reason and self.domain == ERROR_DOMAIN:
            name = "ERROR_REASON_" + self.reason
            if name in errors_pb2.ErrorReason.keys():
                return cast("errors_pb2.ErrorReason", errors_pb2.ErrorReason.Value(name))
        return errors_pb2.ERROR_REASON_UNSPECIFIED

    @property
    def attempts_left(self) -> int | None:
        """ErrorInfo metadata ``attempts_left`` as an int (CODE_MISMATCH, IDENTITY_MISMATCH)."""
        value = self.metadata.get("attempts_left")
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            return None

    def __str__(self) -> str:
        if self.reason and self.reason != self.code.name:
            return f"{self.reason} ({self.code.name}): {self.message}"
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"PhonebindError(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r})"
        )

    def __reduce__(self) -> Any:
        # Keep every attribute across pickling (e.g. multiprocessing), which the
        # default Exception pickling would drop.
        return (_rebuild, (self.code, self.message, self._details()))

    def _details(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "domain": self.domain,
            "metadata": self.metadata,
            "retry_delay": self.retry_delay,
            "field_violations": self.field_violations,
            "quota_violations": self.quota_violations,
            "localized_message": self.localized_message,
            "request_id": self.request_id,
            "x_request_id": self.x_request_id,
        }

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> PhonebindError:
        """Decode a grpc.RpcError (normally also a grpc.Call) into a PhonebindError.

        Never raises: an error without rich details, or with details that do not
        parse or do not match the call's status, becomes a PhonebindError with
        ``reason=None`` and the call's own code and message.
        """
        code_fn = getattr(err, "code", None)
        details_fn = getattr(err, "details", None)
        code = code_fn() if callable(code_fn) else None
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        message = details_fn() if callable(details_fn) else None
        error = cls(code, message if isinstance(message, str) else str(err))
        trailers_fn = getattr(err, "trailing_metadata", None)
        for key, value in (trailers_fn() if callable(trailers_fn) else None) or ():
            if key == "x-request-id" and isinstance(value, str):
                error.x_request_id = value

        status: status_pb2.Status | None = None
        if callable(getattr(err, "trailing_metadata", None)):
            try:
                # A blocking call's error is also a grpc.Call; an asyncio one
                # (AioRpcError) has the same synchronous accessors.
                status = rpc_status.from_call(cast("grpc.Call", err))
            except (ValueError, DecodeError):
                status = None
        if status is None:
            return error

        error.message = status.message
        for detail in status.details:
            try:
                _apply_detail(error, detail)
            except DecodeError:
                continue  # a malformed detail must not hide the status itself
        return error


def _rebuild(code: grpc.StatusCode, message: str, details: dict[str, Any]) -> PhonebindError:
    return PhonebindError(code, message, **details)


def _apply_detail(error: PhonebindError, detail: Any) -> None:
    """Fold one google.protobuf.Any detail into ``error``; unknown types are ignored."""
    if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
        info = error_details_pb2.ErrorInfo()
        if error.reason is None and detail.Unpack(info):
            error.reason = info.reason or None
            error.domain = info.domain or None
            error.metadata = dict(info.metadata)
    elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
        retry = error_details_pb2.RetryInfo()
        if error.retry_delay is None and detail.Unpack(retry):
            error.retry_delay = retry.retry_delay.ToTimedelta()
    elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            error.field_violations.extend((v.field, v.description) for v in bad.field_violations)
    elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
        quota = error_details_pb2.QuotaFailure()
        if detail.Unpack(quota):
            error.quota_violations.extend((v.subject, v.description) for v in quota.violations)
    elif detail.Is(error_details_pb2.LocalizedMessage.DESCRIPTOR):
        localized = error_details_pb2.LocalizedMessage()
        if error.localized_message is None and detail.Unpack(localized):
            error.localized_message = localized.message
