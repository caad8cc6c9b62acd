"""Span export: `SpanRecord` -> OpenTelemetry SDK spans -> OTLP and/or the trace printer.

Pipeline (three hops, each bounded, so a datapath thread never waits on anything slow):

    Exporter.export(rec)        datapath thread: put_nowait on a bounded queue, else count a drop
      -> "obi-export" thread    sampling, SpanRecord -> ReadableSpan (explicit IDs and times),
                                trace printer, hand-off to the sender's bounded buffer
      -> "obi-otlp" thread      batches -> SDK OTLP exporter (http/protobuf or grpc), which
                                retries with backoff within `otlp_timeout_s`

Spans are built as `opentelemetry.sdk.trace.ReadableSpan` objects directly, because the
SDK `Tracer` would generate its own IDs and times; ours come from the wire. Every span
carries the Resource of the process it was seen in (cached per pid/exe); the SDK's OTLP
encoder groups a batch by Resource, so one pipeline serves every instrumented process.
Batching is done here rather than by `BatchSpanProcessor` so that every span lost to a
full buffer is counted and shutdown is bounded by `shutdown_timeout_s` (the SDK processor
waits up to 30 s and drops silently).
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from typing import Any, Callable, Sequence, TextIO
from urllib.parse import urlsplit

from opentelemetry import trace as trace_api
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


def span_name(rec: SpanRecord) -> str:
    """`{method}` (routes are unknown on the wire); `HTTP` for a nonstandard method."""
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
    if _known_method(rec.method):
        attrs["http.request.method"] = rec.method
    else:
        attrs["http.request.method"] = "_OTHER"
        attrs["http.request.method_original"] = rec.method
    path, query = _split_target(rec.path)
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
    attrs["network.protocol.name"] = "http"
    attrs["network.protocol.version"] = "1.1"
    if rec.kind is SpanKind.CLIENT and server_addr:
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
    for key, value in rec.extra.items():
        attrs.setdefault(key, value)
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
    """One `Resource` per (pid, exe), created lazily; bounded (LRU) so churn can't grow it."""

    def __init__(self, service_name: str = "", max_entries: int = 4096):
        self._service_name = service_name
        self._max = max_entries
        self._cache: collections.OrderedDict[tuple[int, str], Resource] = collections.OrderedDict()

    def get(self, rec: SpanRecord) -> Resource:
        key = (rec.pid, rec.exe)
        res = self._cache.get(key)
        if res is None:
            # Resource(...) rather than Resource.create(): no environment, no SDK defaults.
            res = Resource(resource_attributes(rec, self._service_name))
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


# --- OTLP -------------------------------------------------------------------------------


class CountingExporter(SpanExporter):
    """Wraps an SDK span exporter and counts what it reports (spans exported, failures)."""

    def __init__(self, inner: SpanExporter, on_result: Callable[[int, bool], None]):
        self.inner = inner
        self._on_result = on_result

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            log.exception("OTLP exporter raised")
            result = SpanExportResult.FAILURE
        self._on_result(len(spans), result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def make_otlp_exporter(cfg: Config) -> SpanExporter | None:
    """The SDK OTLP exporter the config asks for, or None when OTLP export is off."""
    endpoint = cfg.traces_endpoint
    if not endpoint:
        return None
    headers = dict(cfg.otlp_headers)
    if cfg.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, insecure=cfg.otlp_insecure, headers=headers, timeout=cfg.otlp_timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint, headers=headers, timeout=cfg.otlp_timeout_s)


class _BatchSender:
    """Bounded buffer + thread that hands batches to the (counting) OTLP exporter."""

    def __init__(self, exporter: CountingExporter, max_buffer: int, batch_size: int, delay_s: float,
                 on_drop: Callable[[int], None]):
        self.exporter = exporter
        self._buf: collections.deque[ReadableSpan] = collections.deque()
        self._max = max_buffer
        self._batch = batch_size
        self._delay = delay_s
        self._on_drop = on_drop
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="obi-otlp", daemon=True)
        self._thread.start()

    def add(self, span: ReadableSpan) -> None:
        with self._cond:
            if len(self._buf) >= self._max:
                self._on_drop(1)
                return
            self._buf.append(span)
            if len(self._buf) >= self._batch:
                self._cond.notify()

    def _take(self) -> list[ReadableSpan]:
        n = min(self._batch, len(self._buf))
        return [self._buf.popleft() for _ in range(n)]

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closing and len(self._buf) < self._batch:
                    self._cond.wait(self._delay)
                batch = self._take()
                done = self._closing and not self._buf and not batch
            if batch:
                self.exporter.export(batch)
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
        aborter = threading.Thread(target=self.exporter.shutdown, name="obi-otlp-shutdown", daemon=True)
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


_STOP = object()


class Exporter:
    """Consumes `SpanRecord`s from any datapath thread; exports them off-thread.

    `export(rec)` never blocks: it queues or, when the queue is full, drops and counts.
    `stats()` returns the counters; `shutdown(timeout_s)` flushes and stops within the
    timeout (default `config.shutdown_timeout_s`).
    """

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
        self._sender = None
        if inner is not None:
            self._sender = _BatchSender(
                CountingExporter(inner, self._on_export_result), queue_size, batch_size, schedule_delay_s,
                self._count_drop,
            )
        self._queue: queue.Queue[SpanRecord | object] = queue.Queue(queue_size)
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

    def _count_drop(self, n: int) -> None:
        self._add("dropped", n)

    def _on_export_result(self, n: int, ok: bool) -> None:
        with self._lock:
            if ok:
                self._counts["exported"] += n
            else:
                self._counts["export_errors"] += 1

    def stats(self) -> dict[str, int]:
        """received, exported, dropped, unsampled, export_errors (failed batches), printed, queued."""
        with self._lock:
            out = dict(self._counts)
        out["queued"] = self._queue.qsize()
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
        if self._closed:
            self._add("dropped")
            return
        try:
            self._queue.put_nowait(rec)
        except queue.Full:
            self._add("dropped")

    # -- worker ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._handle(item)  # type: ignore[arg-type]
            except Exception:  # one bad record must not stop the exporter
                log.exception("could not export span record %r", item)
                self._add("dropped")

    def _handle(self, rec: SpanRecord) -> None:
        self._add("received")
        if not self.sampler.should_export(rec):
            self._add("unsampled")
            return
        span = to_readable_span(rec, self.resources.get(rec))
        if self.printer is not None:
            self.printer.print(span)
            self._add("printed")
        if self._sender is not None:
            self._sender.add(span)

    # -- lifecycle ---------------------------------------------------------------------

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Flush queued spans and stop, within `timeout_s`. True if everything was flushed."""
        if self._closed:
            return True
        self._closed = True
        timeout = self.config.shutdown_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        flushed = True
        # The sentinel must get in even when the queue is full: wait for room, bounded.
        try:
            self._queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            flushed = False
        if flushed:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            flushed = not self._thread.is_alive()
        if not flushed:
            self._add("dropped", self._drain())
            try:  # let the worker exit whenever it gets unstuck
                self._queue.put_nowait(_STOP)
            except queue.Full:
                pass
        if self._sender is not None:
            flushed = self._sender.close(deadline) and flushed
        if not flushed:
            log.warning("exporter shutdown timed out after %.1fs; stats %s", timeout, self.stats())
        return flushed

    def _drain(self) -> int:
        """Empty the queue after a timed-out shutdown; returns how many records were lost."""
        lost = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return lost
            lost += item is not _STOP

    def __enter__(self) -> "Exporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
