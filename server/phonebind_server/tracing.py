"""OpenTelemetry tracing, configured by the standard OTEL_* variables; off by default.

Tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`: OTLP over
HTTP with protobuf; `console`: stdout) or an OTLP endpoint is set
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and
`OTEL_SDK_DISABLED` is not `true`. The SDK and its exporter read the other
variables themselves: `OTEL_SERVICE_NAME` (default `phonebind`),
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`(`_ARG`),
`OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`, `..._TIMEOUT`, `..._CERTIFICATE`,
`OTEL_BSP_*`.

Off, opentelemetry is not imported at all and a call does no tracing work: the
tracing interceptor is not in the chain, and the store and the outbox test one
attribute for None.

What is traced (names and attributes in docs/operating.md):
- each RPC, as a server span, the child of the caller's W3C `traceparent`;
- each store transaction made inside a traced span (an RPC's, a delivery's);
- each SMS delivery attempt, as the root of a trace of its own, linked to the
  span of the RPC that queued the message (its traceparent is kept with the
  message in the outbox).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import logs

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Link, Tracer

log = logging.getLogger(__name__)

EXPORTERS = ("otlp", "console")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

# Set once a Tracing exists in this process; until then nothing here imports
# opentelemetry.
_get_current_span: Any = None


class TracingError(ValueError):
    """The OTEL_* settings ask for something phonebind cannot do."""


def _true(value: str) -> bool:
    return value.strip().lower() == "true"


def exporters_from(env: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for; [] when tracing is off."""
    if _true(env.get("OTEL_SDK_DISABLED", "")):
        return []
    names = [
        name.strip().lower()
        for name in env.get("OTEL_TRACES_EXPORTER", "").split(",")
        if name.strip()
    ]
    if not names:
        # The specification's default exporter is otlp; phonebind assumes no
        # collector unless one is named, so that tracing is opt-in.
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    if "none" in names:
        if len(names) > 1:
            raise TracingError("OTEL_TRACES_EXPORTER: none cannot be combined with an exporter")
        return []
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown:
        raise TracingError(
            f"OTEL_TRACES_EXPORTER: unknown exporter {unknown[0]!r}"
            f" (phonebind has {', '.join(EXPORTERS)} and none)"
        )
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if "otlp" in names and protocol != "http/protobuf":
        raise TracingError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: phonebind exports OTLP as http/protobuf, not {protocol}"
        )
    return names


class Tracing:
    """The tracer provider of one server process and the tracer its parts use."""

    def __init__(self, provider: TracerProvider) -> None:
        global _get_current_span
        from opentelemetry import trace

        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("phonebind")
        _get_current_span = trace.get_current_span
        logs.trace_ids = _current_ids

    def shutdown(self) -> None:
        """Exports the spans still queued, then stops."""
        self.provider.shutdown()


def from_environment(env: Mapping[str, str] | None = None) -> Tracing | None:
    """A Tracing as the OTEL_* variables configure it, or None when they leave it off."""
    env = os.environ if env is None else env
    exporters = exporters_from(env)
    if not exporters:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes: dict[str, str] = {}
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = "phonebind"
    # The sampler comes from OTEL_TRACES_SAMPLER (parent-based, always on by default).
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter: Any = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing on", extra={"exporters": ",".join(exporters)})
    return Tracing(provider)


def _current_ids() -> tuple[str, str] | None:
    context = _get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def current_traceparent() -> str:
    """The W3C traceparent of the span in force; "" outside one, or with tracing off."""
    if _get_current_span is None:
        return ""
    context = _get_current_span().get_span_context()
    if not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def link_to(traceparent: str) -> list[Link]:
    """A link to the span a traceparent names; none when it names none."""
    match = _TRACEPARENT.match(traceparent)
    if match is None:
        return []
    from opentelemetry.trace import Link, SpanContext, TraceFlags

    trace_id, span_id, flags = (int(group, 16) for group in match.groups())
    context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return [Link(context)] if context.is_valid else []
