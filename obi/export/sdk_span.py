"""`SpanRecord` -> the SDK's `ReadableSpan`, with the record's own ids, parent and times.

What the trace printer prints and what a caller-supplied SDK `SpanExporter` receives; also
the reference the wire encoder (`otlp_wire`) is tested against.
"""

from __future__ import annotations

from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import TraceFlags, TraceState

from ..model import FLAG_SAMPLED, SpanKind, SpanRecord
from .semconv import SCOPE, span_attributes, span_name, span_status

_OTEL_KIND = {SpanKind.SERVER: trace_api.SpanKind.SERVER, SpanKind.CLIENT: trace_api.SpanKind.CLIENT}


def parse_trace_state(raw: str) -> TraceState | None:
    if not raw:
        return None
    try:
        return TraceState.from_header([raw])
    except Exception:  # a malformed tracestate must not cost the span
        return None


def to_readable_span(rec: SpanRecord, resource: Resource) -> ReadableSpan:
    """The SDK span for a record, with its own IDs, parent, kind and times."""
    flags = TraceFlags(rec.flags & FLAG_SAMPLED)
    context = trace_api.SpanContext(
        trace_id=int(rec.trace_id, 16),
        span_id=int(rec.span_id, 16),
        is_remote=False,
        trace_flags=flags,
        trace_state=parse_trace_state(rec.tracestate),
    )
    parent = None
    if rec.parent_span_id:
        parent = trace_api.SpanContext(
            trace_id=int(rec.trace_id, 16),
            span_id=int(rec.parent_span_id, 16),
            is_remote=True,
            trace_flags=flags,
        )
    return ReadableSpan(
        name=span_name(rec),
        context=context,
        parent=parent,
        resource=resource,
        attributes=span_attributes(rec),
        kind=_OTEL_KIND[rec.kind],
        status=span_status(rec),
        start_time=rec.start_ns,
        end_time=max(rec.end_ns, rec.start_ns),
        instrumentation_scope=SCOPE,
    )
