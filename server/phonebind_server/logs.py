"""Structured JSON logs in UTC, one object per line, with the request id.

Values are passed as `extra=`; control characters are escaped by JSON itself,
and messages carry no personal data (callers log masked forms only).

Every record written while a call is handled carries the call's request id:
the rpc layer sets `call_var` (the one context variable of a call) for that.
With tracing on, every record written within a span carries its `trace_id`
and `span_id`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

call_var: contextvars.ContextVar[Any] = contextvars.ContextVar("call", default=None)

# The ids (trace_id, span_id) of the span in force, None outside one: set by
# tracing.py once tracing is on; None while it is off, costing nothing then.
trace_ids: Callable[[], tuple[str, str] | None] | None = None

# Nothing reads the thread, process or source location of a record: skipping
# them is the logging module's own documented optimisation.
logging.logThreads = False
logging.logProcesses = False
logging.logMultiprocessing = False
logging._srcfile = None

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_HEADER_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


def safe_header(value: str) -> str:
    """A caller-supplied id, kept only if it is short and plain."""
    if 0 < len(value) <= 64 and all(c in _HEADER_CHARS for c in value):
        return value
    return ""


def _stamp_request_id(
    factory: Callable[..., logging.LogRecord],
) -> Callable[..., logging.LogRecord]:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        call = call_var.get()
        if call is not None and not hasattr(record, "request_id"):
            record.request_id = call.request_id
        if trace_ids is not None and (ids := trace_ids()) is not None:
            record.trace_id, record.span_id = ids
        return record

    return make


# Each record carries the request id of the call that logged it, whenever and
# wherever it is formatted.
logging.setLogRecordFactory(_stamp_request_id(logging.getLogRecordFactory()))


class JsonFormatter(logging.Formatter):
    """`fields` go into every line: which worker process wrote it, under --workers."""

    def __init__(self, fields: dict[str, object] | None = None) -> None:
        super().__init__()
        self._fields = dict(fields or {})
        # The time up to the second, formatted once per second: every access
        # log line needs it, and formatting a datetime costs more than the rest.
        self._second = -1
        self._stamp = ""

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._stamp}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self._time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._fields,
        }
        if request_id := getattr(record, "request_id", ""):
            entry["request_id"] = request_id
        if trace_id := getattr(record, "trace_id", ""):
            entry["trace_id"] = trace_id
        attributes = vars(record)
        for key in attributes.keys() - _STANDARD:
            if not key.startswith("_"):
                value = attributes[key]
                entry[key] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)


def configure(level: str = "INFO", **fields: object) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
