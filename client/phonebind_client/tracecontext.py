"""The caller's trace context, sent with each call when OpenTelemetry is installed.

With opentelemetry-api installed, every call carries the context in force
where it is made (the configured propagators, by default W3C `traceparent`
and `baggage`), so that phonebind's server span joins the caller's trace.
Without it, or outside any span, nothing is added.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

Metadata = tuple[tuple[str, str], ...]

_inject: Callable[[MutableMapping[str, str]], None] | None
try:
    from opentelemetry.propagate import inject as _inject
except ImportError:  # opentelemetry is optional
    _inject = None


def with_trace_context(metadata: Metadata) -> Metadata:
    """`metadata` and the current trace context's headers."""
    if _inject is None:
        return metadata
    carrier: dict[str, str] = {}
    _inject(carrier)
    if not carrier:
        return metadata
    return (*metadata, *carrier.items())
