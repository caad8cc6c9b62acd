"""Span export: `SpanRecord` -> OTLP (through the OpenTelemetry SDK's exporters) and/or the
trace printer.

Pipeline (three hops, each bounded, so a datapath thread never waits on anything slow):

    Exporter.export(rec)        datapath thread: append to a bounded deque, else count a drop
      -> "obi-export" thread    sampling, SpanRecord -> encoded OTLP span (explicit IDs and
                                times), trace printer, hand-off to the sender's bounded buffer
      -> "obi-otlp" thread      batches -> one ExportTraceServiceRequest -> the SDK's OTLP
                                exporter (http/protobuf or grpc), which retries with backoff
                                within `otlp_timeout_s`

OTLP spans carry our own IDs, parents and times (the SDK `Tracer` would make its own). They
are encoded by `WireEncoder` into exactly the protobuf the SDK's encoder makes from
`to_readable_span(rec)` (tested), because that encoder is ~10x too slow for the export goal
(>= 20,000 spans/s on 2 cores); transport, TLS, headers, compression, retry and backoff stay
the SDK's (see "OTLP transport"). The printer and any caller-supplied SDK `SpanExporter` get
`ReadableSpan`s. Every span carries the Resource of the process it was seen in (cached per
pid/exe); a batch is grouped by Resource, so one pipeline serves every instrumented process.
Batching is done here rather than by `BatchSpanProcessor` so that every span lost to a full
buffer or a failed batch is counted and shutdown is bounded by `shutdown_timeout_s` (the SDK
processor waits up to 30 s and drops silently).
"""

from __future__ import annotations

import collections
import collections.abc
import datetime
import functools
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence, TextIO
from urllib.parse import urlsplit

from google.protobuf.descriptor import FieldDescriptor as _FD
from opentelemetry import trace as trace_api
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as _svc_pb2
from opentelemetry.proto.common.v1 import common_pb2 as _common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2 as _resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2 as _trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Status, StatusCode, TraceFlags, TraceState

from . import __version__
from .config import Config
from .errors import ConfigError
from .model import FLAG_SAMPLED, SpanKind, SpanRecord

log = logging.getLogger("obi.export")

SDK_NAME = "obi-py"
SCOPE = InstrumentationScope("obi", __version__)

# Methods the HTTP semantic conventions know (RFC 9110 + PATCH); case-sensitive.
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_OTEL_KIND = {SpanKind.SERVER: trace_api.SpanKind.SERVER, SpanKind.CLIENT: trace_api.SpanKind.CLIENT}


# --- span naming, attributes, status (pure) ------------------------------------------


def _known_method(method: str) -> bool:
    return method in KNOWN_METHODS


def is_tls(rec: SpanRecord) -> bool:
    """An encrypted exchange: linked by the TCP option, its HTTP fields unknown."""
    return bool(rec.extra.get("tls"))


def span_name(rec: SpanRecord) -> str:
    """`{method}` (routes are unknown on the wire); `HTTP` for a nonstandard method;
    `TLS` for an encrypted request, whose method the agent cannot see."""
    if is_tls(rec):
        return "TLS"
    return rec.method if _known_method(rec.method) else "HTTP"


def _split_target(target: str) -> tuple[str, str]:
    """Request target -> (path, query). Handles absolute-form targets (proxies)."""
    if "://" in target.split("?", 1)[0]:
        parts = urlsplit(target)
        return parts.path or "/", parts.query
    path, _, query = target.partition("?")
    path = path.partition("#")[0]
    return path, query.partition("#")[0]


def split_host(host: str) -> tuple[str, int | None]:
    """A Host header value -> (name, port or None). `[v6]:port` keeps no brackets."""
    host = host.strip()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    else:  # bare name, or an unbracketed IPv6 address
        name, port = host, ""
    return name, (int(port) if port.isdigit() and 0 < int(port) < 65536 else None)


def _url_host(name: str) -> str:
    return f"[{name}]" if ":" in name else name


def is_error(rec: SpanRecord) -> bool:
    """5xx is an error on both kinds; 4xx only on client spans (the server did its job)."""
    if rec.status >= 500:
        return True
    return rec.kind is SpanKind.CLIENT and 400 <= rec.status < 500


def span_status(rec: SpanRecord) -> Status:
    return Status(StatusCode.ERROR) if is_error(rec) else Status(StatusCode.UNSET)


def span_attributes(rec: SpanRecord) -> dict[str, str | int | bool]:
    """Attributes per the stable OpenTelemetry HTTP semantic conventions, plus obi's own."""
    attrs: dict[str, str | int | bool] = {}
    tls = is_tls(rec)
    path, query = _split_target(rec.path)
    if not tls:  # encrypted: method, target and status are not visible on the wire
        if _known_method(rec.method):
            attrs["http.request.method"] = rec.method
        else:
            attrs["http.request.method"] = "_OTHER"
            attrs["http.request.method_original"] = rec.method
        attrs["url.path"] = path
        if query:
            attrs["url.query"] = query
        attrs["url.scheme"] = rec.scheme
    if rec.status > 0:
        attrs["http.response.status_code"] = rec.status

    host_name, host_port = split_host(rec.host) if rec.host else ("", None)
    if rec.kind is SpanKind.SERVER:
        server_addr, server_port = host_name or rec.local_addr, host_port or rec.local_port
    else:
        server_addr, server_port = host_name or rec.peer_addr, host_port or rec.peer_port
    if server_addr:
        attrs["server.address"] = server_addr
    if server_port:
        attrs["server.port"] = server_port
    if rec.kind is SpanKind.SERVER:
        if rec.peer_addr:
            attrs["client.address"] = rec.peer_addr
        if rec.peer_port:
            attrs["client.port"] = rec.peer_port
    if rec.peer_addr:
        attrs["network.peer.address"] = rec.peer_addr
    if rec.peer_port:
        attrs["network.peer.port"] = rec.peer_port
    attrs["network.transport"] = "tcp"
    if not tls:
        attrs["network.protocol.name"] = "http"
        attrs["network.protocol.version"] = "1.1"
    if rec.kind is SpanKind.CLIENT and server_addr and not tls:
        authority = _url_host(server_addr)
        if server_port and server_port != _DEFAULT_PORTS.get(rec.scheme):
            authority += f":{server_port}"
        attrs["url.full"] = f"{rec.scheme}://{authority}{path}" + (f"?{query}" if query else "")
    if is_error(rec):
        attrs["error.type"] = str(rec.status)
    attrs["obi.datapath"] = rec.datapath.value
    if rec.tid:
        attrs["thread.id"] = rec.tid
    if rec.pid:
        attrs["process.pid"] = rec.pid
    # Datapath-specific facts (e.g. tls, tcp_option) live in obi's own namespace.
    for key, value in rec.extra.items():
        attrs.setdefault(key if key.startswith("obi.") else f"obi.{key}", value)
    return attrs


# --- resource ---------------------------------------------------------------------------


def resource_attributes(rec: SpanRecord, service_name: str = "") -> dict[str, str | int]:
    """The Resource of the process the span was seen in."""
    exe_name = os.path.basename(rec.exe) if rec.exe else ""
    attrs: dict[str, str | int] = {
        "service.name": service_name or exe_name or "unknown_service",
        "telemetry.sdk.name": SDK_NAME,
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": __version__,
        "host.name": socket.gethostname(),
    }
    if rec.pid:
        attrs["process.pid"] = rec.pid
    if rec.exe:
        attrs["process.executable.path"] = rec.exe
        attrs["process.executable.name"] = exe_name
    return attrs


class ResourceCache:
    """One resource per (pid, exe), created lazily; bounded (LRU) so churn can't grow it.

    The resource is an SDK `Resource` by default, or what `build` makes of the attributes
    (the wire encoder keeps them encoded)."""

    def __init__(self, service_name: str = "", max_entries: int = 4096, build: Callable[[dict], Any] = Resource):
        self._service_name = service_name
        self._max = max_entries
        # Resource(...) rather than Resource.create(): no environment, no SDK defaults.
        self._build = build
        self._cache: collections.OrderedDict[tuple[int, str], Any] = collections.OrderedDict()

    def get(self, rec: SpanRecord) -> Any:
        key = (rec.pid, rec.exe)
        res = self._cache.get(key)
        if res is None:
            res = self._build(resource_attributes(rec, self._service_name))
            self._cache[key] = res
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return res


# --- sampling ---------------------------------------------------------------------------


class Sampler:
    """OTEL_TRACES_SAMPLER semantics applied to finished records.

    `always_on`/`always_off`/`traceidratio` decide on every span; `parentbased_*` follow the
    record's sampled flag for spans with a parent and use the named sampler for roots.
    `traceidratio` compares the low 64 bits of the trace id with ratio * 2^64, so every
    agent that sees a trace makes the same decision. Datapaths creating a new root can
    call `root_sampled(trace_id)` to set the sampled flag they put on the wire.
    """

    def __init__(self, name: str = "parentbased_always_on", arg: str = ""):
        self.name = name
        self.parent_based = name.startswith("parentbased_")
        self.root = name.removeprefix("parentbased_")
        self.ratio = 1.0
        if self.root == "traceidratio":
            try:
                self.ratio = float(arg) if arg else 1.0
            except ValueError:
                raise ConfigError("otel_traces_export.sampler.arg", arg, "a number between 0 and 1") from None
            if not 0.0 <= self.ratio <= 1.0:
                raise ConfigError("otel_traces_export.sampler.arg", arg, "a number between 0 and 1")
        self._bound = round(self.ratio * (1 << 64))

    def root_sampled(self, trace_id: str) -> bool:
        if self.root == "always_on":
            return True
        if self.root == "always_off":
            return False
        return int(trace_id[-16:], 16) < self._bound

    def should_export(self, rec: SpanRecord) -> bool:
        if self.parent_based and not rec.is_root:
            return bool(rec.flags & FLAG_SAMPLED)
        if self.parent_based:
            # A root the datapath marked unsampled on the wire stays unsampled here too.
            return bool(rec.flags & FLAG_SAMPLED) and self.root_sampled(rec.trace_id)
        return self.root_sampled(rec.trace_id)


# --- SpanRecord -> SDK span -----------------------------------------------------------


def _trace_state(raw: str) -> TraceState | None:
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
        trace_state=_trace_state(rec.tracestate),
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


# --- trace printer ----------------------------------------------------------------------

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


# --- OTLP wire encoding -------------------------------------------------------------------
#
# Why not the SDK's encoder: `encode_spans` builds one protobuf object per span, attribute
# and value. Measured on this project's 2-core test machine that is ~90 us per span (and
# ~110 us building opentelemetry-proto messages by hand), which caps export below 10,000
# spans/s however the rest is tuned. So a span is written straight to protobuf wire bytes:
# field numbers and wire types come from the opentelemetry-proto descriptors (not typed in
# here), the Resource and Scope are encoded once per process, and the attribute key/value
# pairs that repeat (method, addresses, ports, pid, datapath) are encoded once and reused.
# The result is the message the SDK would build from `to_readable_span` (a unit test parses
# both and compares them); it is sent by the SDK's own exporters, see "OTLP transport".

_WIRE_TYPES = {_FD.TYPE_FIXED64: 1, _FD.TYPE_DOUBLE: 1, _FD.TYPE_FIXED32: 5,
               _FD.TYPE_STRING: 2, _FD.TYPE_BYTES: 2, _FD.TYPE_MESSAGE: 2}  # anything else: varint


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_VARINTS = [_encode_varint(n) for n in range(4096)]  # every span/attribute length: a lookup


def _varint(n: int) -> bytes:
    """Unsigned protobuf varint."""
    if n < 4096:
        return _SMALL_VARINTS[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n < 0x20_0000:  # ports, batch lengths up to 2 MiB: no loop
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
    return _encode_varint(n)


def _tag(message: Any, field: str) -> bytes:
    """The key (field number + wire type) of `message.field`, from the .proto descriptor."""
    desc = message.DESCRIPTOR.fields_by_name[field]
    return _varint(desc.number << 3 | _WIRE_TYPES.get(desc.type, 0))


def _len_field(tag: bytes, body: bytes) -> bytes:
    return tag + _varint(len(body)) + body


_PbSpan, _PbStatus = _trace_pb2.Span, _trace_pb2.Status
_PbAny, _PbKV = _common_pb2.AnyValue, _common_pb2.KeyValue
_T_TRACE_ID = _tag(_PbSpan, "trace_id") + _varint(16)
_T_SPAN_ID = _tag(_PbSpan, "span_id") + _varint(8)
_T_PARENT_ID = _tag(_PbSpan, "parent_span_id") + _varint(8)
_T_TRACE_STATE = _tag(_PbSpan, "trace_state")
_T_NAME = _tag(_PbSpan, "name")
_T_KIND = _tag(_PbSpan, "kind")
_T_START = _tag(_PbSpan, "start_time_unix_nano")
_T_END = _tag(_PbSpan, "end_time_unix_nano")
_T_ATTRIBUTE = _tag(_PbSpan, "attributes")
_T_KEY, _T_VALUE = _tag(_PbKV, "key"), _tag(_PbKV, "value")
_T_STRING, _T_BOOL = _tag(_PbAny, "string_value"), _tag(_PbAny, "bool_value")
_T_INT, _T_DOUBLE = _tag(_PbAny, "int_value"), _tag(_PbAny, "double_value")
_T_BYTES, _T_ARRAY, _T_KVLIST = _tag(_PbAny, "bytes_value"), _tag(_PbAny, "array_value"), _tag(_PbAny, "kvlist_value")
_T_ARRAY_VALUE = _tag(_common_pb2.ArrayValue, "values")
_T_KVLIST_VALUE = _tag(_common_pb2.KeyValueList, "values")
_T_SPAN = _tag(_trace_pb2.ScopeSpans, "spans")
_T_SCOPE_SPANS = _tag(_trace_pb2.ResourceSpans, "scope_spans")
_T_RESOURCE_SPANS = _tag(_svc_pb2.ExportTraceServiceRequest, "resource_spans")
_PB_KIND = {SpanKind.SERVER: _PbSpan.SpanKind.SPAN_KIND_SERVER, SpanKind.CLIENT: _PbSpan.SpanKind.SPAN_KIND_CLIENT}
# The SDK always sends a Status (empty when unset) and, in `flags`, whether the parent is
# remote; `to_readable_span` marks every parent remote (it came from another span record).
_STATUS_UNSET = _len_field(_tag(_PbSpan, "status"), b"")
_STATUS_ERROR = _len_field(_tag(_PbSpan, "status"), _tag(_PbStatus, "code") + _varint(_PbStatus.STATUS_CODE_ERROR))
_HAS_IS_REMOTE = _trace_pb2.SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_ROOT = _tag(_PbSpan, "flags") + struct.pack("<I", _HAS_IS_REMOTE)
_FLAGS_REMOTE_PARENT = _tag(_PbSpan, "flags") + struct.pack(
    "<I", _HAS_IS_REMOTE | _trace_pb2.SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK)
_SCOPE = _len_field(_tag(_trace_pb2.ScopeSpans, "scope"),
                    _len_field(_tag(_common_pb2.InstrumentationScope, "name"), SCOPE.name.encode())
                    + _len_field(_tag(_common_pb2.InstrumentationScope, "version"), (SCOPE.version or "").encode()))
_U64 = struct.Struct("<Q").pack
_INT64_RANGE = range(-(1 << 63), 1 << 63)


def _any_value(value: object) -> bytes:
    """An AnyValue body, for the same types and in the same order as the SDK's encoder.
    Raises (TypeError, OverflowError) where the SDK would drop the attribute."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return _T_BOOL + (b"\x01" if value else b"\x00")
    if isinstance(value, str):
        return _len_field(_T_STRING, value.encode())
    if isinstance(value, int):
        if value not in _INT64_RANGE:
            raise OverflowError(f"{value} does not fit an int64")
        return _T_INT + _varint(value & 0xFFFF_FFFF_FFFF_FFFF)
    if isinstance(value, float):
        return _T_DOUBLE + struct.pack("<d", value)
    if isinstance(value, bytes):
        return _len_field(_T_BYTES, value)
    if isinstance(value, collections.abc.Sequence):
        return _len_field(_T_ARRAY, b"".join(_len_field(_T_ARRAY_VALUE, _any_value(v)) for v in value))
    if isinstance(value, collections.abc.Mapping):
        return _len_field(_T_KVLIST, b"".join(_len_field(_T_KVLIST_VALUE, _key_value(str(k), v)) for k, v in value.items()))
    raise TypeError(f"invalid attribute value type {type(value).__name__}")


def _key_value(key: str, value: object) -> bytes:
    """A KeyValue body."""
    return _len_field(_T_KEY, key.encode()) + _len_field(_T_VALUE, _any_value(value))


def _encode_resource(attrs: dict[str, str | int]) -> bytes:
    """The `ResourceSpans.resource` field for a process's resource attributes."""
    tag = _tag(_resource_pb2.Resource, "attributes")
    body = b"".join(_len_field(tag, _key_value(k, v)) for k, v in attrs.items())
    return _len_field(_tag(_trace_pb2.ResourceSpans, "resource"), body)


class WireEncoder:
    """`SpanRecord` -> one encoded OTLP `Span`, and batches of those -> one request body.

    Used by one thread (the exporter's worker; `request` keeps no state). A span's whole
    attribute block is cached per combination of the record fields it comes from (the
    spans of one connection and route share it); single attribute
    encodings are cached per (key, value) until a key shows more than `per_key` distinct
    values (client ports, paths with ids): such keys are encoded afresh each time rather
    than flushing the useful entries. Every cache is bounded (cleared when full).
    """

    def __init__(self, service_name: str = "", max_cached: int = 16384, per_key: int = 1024):
        self.resources = ResourceCache(service_name, build=_encode_resource)
        self._max = max_cached
        self._per_key = per_key
        self._attrs: dict[tuple[str, object, type], bytes] = {}
        self._seen: dict[str, int] = {}  # key -> distinct values cached so far
        self._keys: dict[str, bytes] = {}  # key -> encoded KeyValue.key field
        self._heads: dict[tuple[str, SpanKind, bool], bytes] = {}  # name + kind fields
        self._states: dict[str, bytes] = {}  # raw tracestate -> trace_state field
        self._blocks: dict[tuple, bytes] = {}  # attribute-relevant record fields -> attributes + status

    def resource(self, rec: SpanRecord) -> bytes:
        return self.resources.get(rec)

    def span(self, rec: SpanRecord) -> bytes:
        """The `ScopeSpans.spans` field for one record. Raises ValueError on malformed ids."""
        trace_id, span_id = bytes.fromhex(rec.trace_id), bytes.fromhex(rec.span_id)
        if len(trace_id) != 16 or len(span_id) != 8:
            raise ValueError(f"bad trace/span id {rec.trace_id!r}/{rec.span_id!r}")
        parts = [_T_TRACE_ID, trace_id, _T_SPAN_ID, span_id]
        if rec.tracestate:
            parts.append(self._trace_state(rec.tracestate))
        if rec.parent_span_id:
            parent = bytes.fromhex(rec.parent_span_id)
            if len(parent) != 8:
                raise ValueError(f"bad parent span id {rec.parent_span_id!r}")
            parts += (_T_PARENT_ID, parent)
        hk = (rec.method, rec.kind, is_tls(rec))  # what span_name() and the kind field read
        head = self._heads.get(hk)
        if head is None:
            head = self._cached(self._heads, hk,
                                _len_field(_T_NAME, span_name(rec).encode()) + _T_KIND + _varint(_PB_KIND[rec.kind]))
        parts += (head, _T_START, _U64(rec.start_ns), _T_END, _U64(max(rec.end_ns, rec.start_ns)))
        # Everything span_attributes() reads: spans of one keep-alive connection and route
        # repeat it, so their whole attribute block (and status) is encoded once.
        bk = (rec.kind, rec.method, rec.path, rec.status, rec.scheme, rec.host, rec.local_addr, rec.local_port,
              rec.peer_addr, rec.peer_port, rec.datapath, rec.tid, rec.pid,
              tuple(rec.extra.items()) if rec.extra else ())
        try:
            block = self._blocks.get(bk)
        except TypeError:  # an unhashable value in `extra`
            bk, block = None, None
        if block is None:
            block = self._attribute_block(rec)
            if bk is not None:
                self._cached(self._blocks, bk, block)
        parts.append(block)
        parts.append(_FLAGS_REMOTE_PARENT if rec.parent_span_id else _FLAGS_ROOT)
        body = b"".join(parts)
        return _T_SPAN + _varint(len(body)) + body

    def _attribute_block(self, rec: SpanRecord) -> bytes:
        """The `Span.attributes` fields and the status of a record."""
        parts = []
        cache = self._attrs
        for key, value in span_attributes(rec).items():
            ck = (key, value, value.__class__)  # the type too: True == 1 must not share an entry
            try:
                field = cache.get(ck)
            except TypeError:  # an unhashable value (a list in `extra`): encode, don't cache
                field = self._encode_attribute(key, value)
            if field is None:
                field = self._attribute(ck)
            parts.append(field)
        parts.append(_STATUS_ERROR if is_error(rec) else _STATUS_UNSET)
        return b"".join(parts)

    def _attribute(self, ck: tuple[str, object, type]) -> bytes:
        """Encode one attribute; cache it unless its key has proved high-cardinality."""
        key = ck[0]
        field = self._encode_attribute(key, ck[1])
        seen = self._seen.get(key, 0)
        if seen < self._per_key:
            if len(self._attrs) >= self._max:
                self._attrs.clear()
                self._seen.clear()
                seen = 0
            self._attrs[ck] = field
            self._seen[key] = seen + 1
        return field

    def _encode_attribute(self, key: str, value: object) -> bytes:
        """One `Span.attributes` field; b"" for a value the SDK's encoder would drop too."""
        key_field = self._keys.get(key)
        if key_field is None:
            key_field = self._cached(self._keys, key, _len_field(_T_KEY, key.encode()))
        if value.__class__ is str:
            raw = value.encode()  # type: ignore[attr-defined]
            any_value = _T_STRING + _varint(len(raw)) + raw
        elif value.__class__ is int and 0 <= value < 0x20_0000:  # type: ignore[operator]
            any_value = _T_INT + _varint(value)  # type: ignore[arg-type]
        else:
            try:
                any_value = _any_value(value)
            except (TypeError, OverflowError) as e:
                log.debug("attribute %s not exported: %s", key, e)
                return b""
        kv = key_field + _T_VALUE + _varint(len(any_value)) + any_value
        return _T_ATTRIBUTE + _varint(len(kv)) + kv

    def _trace_state(self, raw: str) -> bytes:
        field = self._states.get(raw)
        if field is None:
            # Normalized exactly as the SDK does: parsed by TraceState, re-joined.
            state = _trace_state(raw)
            text = ",".join(f"{k}={v}" for k, v in state.items()) if state is not None else ""
            field = self._cached(self._states, raw, _len_field(_T_TRACE_STATE, text.encode()) if text else b"")
        return field

    def _cached(self, cache: dict, key: Any, value: bytes) -> bytes:
        if len(cache) >= self._max:
            cache.clear()
        cache[key] = value
        return value

    @staticmethod
    def request(batch: Sequence[tuple[bytes, bytes]]) -> bytes:
        """An `ExportTraceServiceRequest` body for (resource, span) pairs, grouped by
        resource in first-seen order, one ScopeSpans each (like the SDK's encoder)."""
        groups: dict[bytes, list[bytes]] = {}
        for resource, span in batch:
            spans = groups.get(resource)
            if spans is None:
                groups[resource] = spans = [_SCOPE]
            spans.append(span)
        out = []
        for resource, spans in groups.items():
            resource_spans = resource + _len_field(_T_SCOPE_SPANS, b"".join(spans))
            out.append(_len_field(_T_RESOURCE_SPANS, resource_spans))
        return b"".join(out)


# --- OTLP transport: the SDK's exporters, fed encoded requests ------------------------------
#
# The one place that relies on SDK internals (checked with opentelemetry-exporter-otlp-proto-
# http/grpc 1.45; `test_sdk_transport_internals` in tests/unit/test_export.py fails loudly
# if they move, and at run time a mismatch falls back to the SDK's own, slower encoding):
# - http: `OTLPSpanExporter.export(spans)` is `encode_spans(spans)` followed by
#   `self._client.export(bytes)` (an `_OTLPHTTPClient`: compression, headers, TLS session,
#   retry with backoff, abort on shutdown). We call that second step with our bytes.
# - grpc: `OTLPExporterMixin._export(data)` runs retry/backoff/reconnect around
#   `self._client.Export(request=self._translate_data(data), ...)`, `_client` being
#   `self._stub(channel)`. We supply a stub whose serializer passes bytes through and a
#   `_translate_data` that returns them.


class SdkInternalsChanged(RuntimeError):
    """The installed OTLP exporter no longer has what `send_payload` relies on."""


class Payload(NamedTuple):
    """An encoded ExportTraceServiceRequest and how many spans it holds."""

    data: bytes
    spans: int


def _serialize_request(request: Any) -> bytes:
    """gRPC request serializer: our encoded bytes as they are, SDK messages serialized."""
    return request if isinstance(request, bytes) else request.SerializeToString()


class _PayloadTraceStub:
    """TraceService client stub (as generated by grpc) that also accepts encoded bytes."""

    def __init__(self, channel: Any):
        method = _svc_pb2.DESCRIPTOR.services_by_name["TraceService"].methods_by_name["Export"]
        self.Export = channel.unary_unary(  # noqa: N815 (grpc naming)
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=_serialize_request,
            response_deserializer=_svc_pb2.ExportTraceServiceResponse.FromString,
        )


@functools.cache
def _payload_exporter_classes() -> dict[str, type]:
    """SDK exporter subclasses with `send_payload(Payload) -> bool` (imported lazily: grpc is heavy)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    class HttpPayloadExporter(HttpExporter):
        def __init__(self, **kw: Any):
            super().__init__(**kw)
            if not callable(getattr(getattr(self, "_client", None), "export", None)) or not hasattr(self, "_shutdown"):
                super().shutdown()
                raise SdkInternalsChanged("http OTLPSpanExporter has no _client.export(bytes)")

        def send_payload(self, payload: Payload) -> bool:
            if self._shutdown:
                return False
            limit = getattr(self, "_max_request_size", 0) or 0
            if 0 < limit < len(payload.data):  # what the SDK's export() would refuse too
                log.warning("OTLP request of %d bytes exceeds max_request_size %d; dropped", len(payload.data), limit)
                return False
            return bool(self._client.export(payload.data).success)

    class GrpcPayloadExporter(GrpcExporter):
        def __init__(self, **kw: Any):
            super().__init__(**kw)
            needed = ("_export", "_stub", "_client", "_channel", "_initialize_channel_and_stub")
            if not all(hasattr(self, name) for name in needed):
                super().shutdown()
                raise SdkInternalsChanged("grpc OTLPExporterMixin lacks " + ", ".join(needed))
            self._stub = _PayloadTraceStub  # used again whenever the SDK rebuilds the channel
            self._client = _PayloadTraceStub(self._channel)

        def _translate_data(self, data: Any) -> Any:
            return data.data if isinstance(data, Payload) else super()._translate_data(data)

        def _count_data(self, data: Any) -> int:
            return data.spans if isinstance(data, Payload) else super()._count_data(data)

        def send_payload(self, payload: Payload) -> bool:
            return self._export(payload) is SpanExportResult.SUCCESS

    return {"http/protobuf": HttpPayloadExporter, "grpc": GrpcPayloadExporter}


def make_otlp_exporter(cfg: Config) -> SpanExporter | None:
    """The SDK OTLP exporter the config asks for (able to `send_payload`), or None when
    OTLP export is off."""
    endpoint = cfg.traces_endpoint
    if not endpoint:
        return None
    kw: dict[str, Any] = {"endpoint": endpoint, "headers": dict(cfg.otlp_headers), "timeout": cfg.otlp_timeout_s}
    protocol = "grpc" if cfg.otlp_protocol == "grpc" else "http/protobuf"
    if protocol == "grpc":
        kw["insecure"] = cfg.otlp_insecure
    cls = _payload_exporter_classes()[protocol]
    try:
        return cls(**kw)
    except SdkInternalsChanged as e:
        log.warning("OTLP exporter internals changed (%s): using the SDK's own span encoding (slower)", e)
        return cls.__mro__[1](**kw)


class _BatchSender:
    """Bounded buffer + "obi-otlp" thread: batches of up to `batch_size` -> `send(batch)`."""

    def __init__(self, send: Callable[[list[Any]], bool], shutdown: Callable[[], None], max_buffer: int,
                 batch_size: int, delay_s: float, on_drop: Callable[[int], None],
                 on_result: Callable[[int, bool], None]):
        self._send = send
        self._shutdown = shutdown
        self._buf: list[Any] = []
        self._max = max_buffer
        self._batch = batch_size
        self._delay = delay_s
        self._on_drop = on_drop
        self._on_result = on_result
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="obi-otlp", daemon=True)
        self._thread.start()

    def add(self, items: list[Any]) -> None:
        """Buffer what fits; count the rest (and anything arriving after close) as dropped."""
        with self._cond:
            room = 0 if self._closing else self._max - len(self._buf)
            if room < len(items):
                self._on_drop(len(items) - max(room, 0))
                items = items[:max(room, 0)]
            self._buf += items
            if len(self._buf) >= self._batch:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closing and len(self._buf) < self._batch:
                    self._cond.wait(self._delay)
                batch = self._buf[:self._batch]
                del self._buf[:self._batch]
                done = self._closing and not self._buf and not batch
            if batch:
                try:
                    ok = self._send(batch)
                except Exception:
                    log.exception("OTLP export raised")
                    ok = False
                self._on_result(len(batch), ok)
            if done:
                return

    def close(self, deadline: float) -> bool:
        """Flush what is buffered until `deadline` (monotonic), then stop. True if flushed."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        # Keep a slice of the budget for aborting: the SDK's shutdown (which stops its
        # retry backoff) can itself take a while when a gRPC channel is mid-connect.
        remaining = max(0.0, deadline - time.monotonic())
        reserve = min(0.5, remaining * 0.25)
        self._thread.join(remaining - reserve)
        flushed = not self._thread.is_alive()
        # Run the SDK shutdown off-thread so a slow channel close cannot overrun the bound.
        aborter = threading.Thread(target=self._shutdown, name="obi-otlp-shutdown", daemon=True)
        aborter.start()
        aborter.join(max(0.0, deadline - time.monotonic()))
        if not flushed:
            # Whatever the sender still held after the abort was not exported.
            self._thread.join(max(0.0, deadline - time.monotonic()))
            with self._cond:
                lost = len(self._buf)
                self._buf.clear()
            if lost:
                self._on_drop(lost)
        return flushed


class Exporter:
    """Consumes `SpanRecord`s from any datapath thread; exports them off-thread.

    `export(rec)` never blocks: it appends to a bounded deque or, when that is full (or the
    exporter is shut down), drops and counts. `stats()` returns the counters;
    `shutdown(timeout_s)` flushes and stops within the timeout (default
    `config.shutdown_timeout_s`). `otlp_exporter` may be any SDK `SpanExporter` (it then
    gets ReadableSpans); by default the config's OTLP exporter is fed encoded requests.
    """

    _HANDOFF = 256  # records the worker encodes before handing them to the sender at once

    def __init__(
        self,
        config: Config,
        *,
        stream: TextIO | None = None,
        otlp_exporter: SpanExporter | None = None,
        queue_size: int = 8192,
        batch_size: int = 512,
        schedule_delay_s: float = 0.5,
    ):
        self.config = config
        self.sampler = Sampler(config.traces_sampler, config.traces_sampler_arg)
        self.resources = ResourceCache(config.service_name)
        self.printer = self._make_printer(config, stream)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("received", "exported", "dropped", "unsampled", "export_errors", "printed"), 0)
        inner = otlp_exporter if otlp_exporter is not None else make_otlp_exporter(config)
        self.encoder: WireEncoder | None = None
        self._sender: _BatchSender | None = None
        if inner is not None:
            send: Callable[[list[Any]], bool]
            if callable(getattr(inner, "send_payload", None)):
                self.encoder = WireEncoder(config.service_name)
                encoder, send_payload = self.encoder, inner.send_payload  # type: ignore[attr-defined]
                send = lambda batch: send_payload(Payload(encoder.request(batch), len(batch)))  # noqa: E731
            else:
                send = lambda batch: inner.export(batch) is SpanExportResult.SUCCESS  # noqa: E731
            self._sender = _BatchSender(send, inner.shutdown, queue_size, batch_size, schedule_delay_s,
                                        self._count_drop, self._on_export_result)
        # A deque, not queue.Queue: append/popleft are atomic under the GIL and cost a
        # fraction of Queue.put_nowait (no lock, no condition). The bound is checked before
        # the append; concurrent producers can overshoot it by at most one record each.
        self._pending: collections.deque[SpanRecord] = collections.deque()
        self._max_pending = queue_size
        self._wake = threading.Event()
        self._idle = False  # the worker is (about to be) waiting on _wake
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="obi-export", daemon=True)
        self._thread.start()

    @staticmethod
    def _make_printer(config: Config, stream: TextIO | None) -> SpanPrinter | None:
        mode = config.trace_printer
        # The embedded default (DESIGN 8): nowhere to send spans and no explicit printer
        # setting -> print them as text.
        if mode == "disabled" and not config.traces_endpoint and "trace_printer" not in config.sources:
            mode = "text"
        return SpanPrinter(mode, stream) if mode != "disabled" else None

    # -- counters ----------------------------------------------------------------------

    def _add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _add_all(self, counts: dict[str, int]) -> None:
        with self._lock:
            for key, n in counts.items():
                self._counts[key] += n

    def _count_drop(self, n: int) -> None:
        self._add("dropped", n)

    def _on_export_result(self, n: int, ok: bool) -> None:
        with self._lock:
            if ok:
                self._counts["exported"] += n
            else:  # the SDK gave up on the batch (after its retries): those spans are lost
                self._counts["export_errors"] += 1
                self._counts["dropped"] += n

    def stats(self) -> dict[str, int]:
        """received, exported, dropped (queue full, failed batch, shutdown), unsampled,
        export_errors (failed batches), printed, queued."""
        with self._lock:
            out = dict(self._counts)
        out["queued"] = len(self._pending)
        return out

    @property
    def exported(self) -> int:
        return self.stats()["exported"]

    @property
    def dropped(self) -> int:
        return self.stats()["dropped"]

    @property
    def unsampled(self) -> int:
        return self.stats()["unsampled"]

    @property
    def export_errors(self) -> int:
        return self.stats()["export_errors"]

    # -- datapath side -----------------------------------------------------------------

    def export(self, rec: SpanRecord) -> None:
        """Hand a finished span over. Never blocks; drops (and counts) when full or closed."""
        pending = self._pending
        if self._closed or len(pending) >= self._max_pending:
            self._add("dropped")
            return
        pending.append(rec)
        if self._idle:  # only then is a wake-up needed (Event.set costs a lock round)
            self._wake.set()

    # -- worker ------------------------------------------------------------------------

    def _run(self) -> None:
        pending = self._pending
        counts = dict.fromkeys(("received", "unsampled", "printed", "dropped"), 0)
        out: list[Any] = []
        while True:
            try:
                rec = pending.popleft()
            except IndexError:
                self._flush(counts, out)
                if self._stopping:
                    return
                time.sleep(0.002)  # let records gather, so producers rarely need to wake us
                if pending or self._stopping:
                    continue
                self._idle = True
                if not pending and not self._stopping:  # re-check after announcing idle
                    self._wake.wait(1.0)
                self._idle = False
                self._wake.clear()
                continue
            counts["received"] += 1
            try:
                self._handle(rec, counts, out)
            except Exception:  # one bad record must not stop the exporter
                log.exception("could not export span record %r", rec)
                counts["dropped"] += 1
            if len(out) >= self._HANDOFF or counts["received"] >= self._HANDOFF:
                self._flush(counts, out)

    def _flush(self, counts: dict[str, int], out: list[Any]) -> None:
        """Publish the worker's local counters and hand its encoded spans to the sender."""
        if any(counts.values()):
            self._add_all(counts)
            for key in counts:
                counts[key] = 0
        if out:
            if self._sender is not None:
                self._sender.add(out[:])
            out.clear()

    def _handle(self, rec: SpanRecord, counts: dict[str, int], out: list[Any]) -> None:
        if not self.sampler.should_export(rec):
            counts["unsampled"] += 1
            return
        item: Any = None
        if self.encoder is not None:
            item = (self.encoder.resource(rec), self.encoder.span(rec))
        if self.printer is not None or (self._sender is not None and item is None):
            span = to_readable_span(rec, self.resources.get(rec))
            if self.printer is not None:
                self.printer.print(span)
                counts["printed"] += 1
            if item is None:
                item = span
        if self._sender is not None:
            out.append(item)

    # -- lifecycle ---------------------------------------------------------------------

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Flush queued spans and stop, within `timeout_s`. True if everything was flushed."""
        if self._closed:
            return True
        self._closed = True
        timeout = self.config.shutdown_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        self._stopping = True
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        flushed = not self._thread.is_alive()
        # Records still pending (the worker is stuck, or a producer raced the close) are lost.
        lost = self._drain()
        if lost:
            self._add("dropped", lost)
        if self._sender is not None:
            flushed = self._sender.close(deadline) and flushed
        if not flushed:
            log.warning("exporter shutdown timed out after %.1fs; stats %s", timeout, self.stats())
        return flushed

    def _drain(self) -> int:
        """Empty the pending deque; returns how many records were in it."""
        lost = 0
        while True:
            try:
                self._pending.popleft()
            except IndexError:
                return lost
            lost += 1

    def __enter__(self) -> "Exporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
