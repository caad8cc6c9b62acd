"""OTLP wire encoding: `SpanRecord`s straight to `ExportTraceServiceRequest` protobuf bytes.

Why not the SDK's encoder: `encode_spans` builds one protobuf object per span, attribute
and value. Measured on this project's 2-core test machine that is ~90 us per span (and
~110 us building opentelemetry-proto messages by hand), which caps export below 10,000
spans/s however the rest is tuned. So a span is written straight to protobuf wire bytes:
field numbers and wire types come from the opentelemetry-proto descriptors (not typed in
here), the Resource and Scope are encoded once per process, and the attribute key/value
pairs that repeat (method, addresses, ports, pid, datapath) are encoded once and reused.
The result is the message the SDK would build from `to_readable_span` (a unit test parses
both and compares them); it is sent by the SDK's own exporters, see `otlp_transport`.
"""

from __future__ import annotations

import collections.abc
import logging
import struct
from typing import Any, Sequence

from google.protobuf.descriptor import FieldDescriptor as _FD
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as _svc_pb2
from opentelemetry.proto.common.v1 import common_pb2 as _common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2 as _resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2 as _trace_pb2

from ..model import SpanKind, SpanRecord
from .sdk_span import parse_trace_state
from .semconv import SCOPE, ResourceCache, is_error, is_tls, span_attributes, span_name

log = logging.getLogger("obi.export")

_WIRE_TYPES = {
    _FD.TYPE_FIXED64: 1,
    _FD.TYPE_DOUBLE: 1,
    _FD.TYPE_FIXED32: 5,
    _FD.TYPE_STRING: 2,
    _FD.TYPE_BYTES: 2,
    _FD.TYPE_MESSAGE: 2,
}  # anything else: varint


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
    "<I", _HAS_IS_REMOTE | _trace_pb2.SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
)
_SCOPE = _len_field(
    _tag(_trace_pb2.ScopeSpans, "scope"),
    _len_field(_tag(_common_pb2.InstrumentationScope, "name"), SCOPE.name.encode())
    + _len_field(_tag(_common_pb2.InstrumentationScope, "version"), (SCOPE.version or "").encode()),
)
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
        return _len_field(
            _T_KVLIST, b"".join(_len_field(_T_KVLIST_VALUE, _key_value(str(k), v)) for k, v in value.items())
        )
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
            head = self._cached(
                self._heads, hk, _len_field(_T_NAME, span_name(rec).encode()) + _T_KIND + _varint(_PB_KIND[rec.kind])
            )
        parts += (head, _T_START, _U64(rec.start_ns), _T_END, _U64(max(rec.end_ns, rec.start_ns)))
        # Everything span_attributes() reads: spans of one keep-alive connection and route
        # repeat it, so their whole attribute block (and status) is encoded once.
        bk = (
            rec.kind,
            rec.method,
            rec.path,
            rec.status,
            rec.scheme,
            rec.host,
            rec.local_addr,
            rec.local_port,
            rec.peer_addr,
            rec.peer_port,
            rec.datapath,
            rec.tid,
            rec.pid,
            tuple(rec.extra.items()) if rec.extra else (),
        )
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
            state = parse_trace_state(raw)
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
