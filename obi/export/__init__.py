"""Span export: `SpanRecord` -> OTLP (through the OpenTelemetry SDK's exporters) and/or the
trace printer, split as OpenTelemetry's own packages are:

- `semconv`: span name, attributes, status and resource (HTTP semantic conventions);
- `sampling`: which spans are exported (`Sampler`);
- `sdk_span`: a record as the SDK's `ReadableSpan`;
- `printer`: the trace printer (text or JSON lines);
- `otlp_wire`: records encoded straight to OTLP protobuf;
- `otlp_transport`: the SDK's OTLP exporters, fed those bytes;
- `pipeline`: `Exporter`, the never-blocking hand-off from the datapaths to all of the above.
"""

from .pipeline import Exporter

__all__ = ["Exporter"]
