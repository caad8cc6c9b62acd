"""The trace printer: one line per finished span on stdout, as text or JSON."""

from __future__ import annotations

import datetime
import json
import sys
import threading
from typing import Any, TextIO

from opentelemetry.sdk.trace import ReadableSpan

from ..errors import ConfigError

_PRINT_LOCK = threading.Lock()  # one line at a time, whoever prints


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """The JSON printer's schema for one span."""
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else "",
        "trace_flags": f"{int(ctx.trace_flags):02x}",
        "trace_state": ctx.trace_state.to_header() if ctx.trace_state else "",
        "name": span.name,
        "kind": span.kind.name,
        "start_time_unix_nano": span.start_time,
        "end_time_unix_nano": span.end_time,
        "attributes": dict(span.attributes or {}),
        "resource": dict(span.resource.attributes),
        "status": {"code": span.status.status_code.name, "description": span.status.description or ""},
    }


def _fmt_time(ns: int) -> str:
    stamp = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def span_to_text(span: ReadableSpan) -> str:
    """One readable line: time, service, kind, name, path, status, duration, ids."""
    d = span_to_dict(span)
    attrs = d["attributes"]
    duration_ms = (d["end_time_unix_nano"] - d["start_time_unix_nano"]) / 1e6
    code = attrs.get("http.response.status_code", "-")
    error = " ERROR" if d["status"]["code"] == "ERROR" else ""
    return (
        f"{_fmt_time(d['start_time_unix_nano'])} {d['resource'].get('service.name')} {d['kind']:<6} "
        f"{d['name']} {attrs.get('url.path', '')} {code}{error} {duration_ms:.3f}ms "
        f"trace={d['trace_id']} span={d['span_id']} parent={d['parent_span_id'] or '-'}"
    )


class SpanPrinter:
    """`text` or `json` lines, one per finished span, flushed after each line."""

    def __init__(self, mode: str, stream: TextIO | None = None):
        if mode not in ("text", "json"):
            raise ConfigError("trace_printer", mode, "text or json")
        self.mode = mode
        self._stream = stream  # None: sys.stdout as it is at print time

    def format(self, span: ReadableSpan) -> str:
        if self.mode == "json":
            return json.dumps(span_to_dict(span), separators=(",", ":"), sort_keys=True)
        return span_to_text(span)

    def print(self, span: ReadableSpan) -> None:
        line = self.format(span) + "\n"
        stream = self._stream or sys.stdout
        with _PRINT_LOCK:
            stream.write(line)
            stream.flush()
