"""The export pipeline: `Exporter` takes finished `SpanRecord`s from any datapath thread
and hands them to OTLP and/or the trace printer.

Three hops, each bounded, so that a datapath thread never waits on anything slow:

    Exporter.export(rec)        datapath thread: append to a bounded deque, else count a drop
      -> "obi-export" thread    sampling, SpanRecord -> encoded OTLP span (explicit IDs and
                                times), trace printer, hand-off to the sender's bounded buffer
      -> "obi-otlp" thread      batches -> one ExportTraceServiceRequest -> the SDK's OTLP
                                exporter (http/protobuf or grpc), which retries with backoff
                                within `otlp_timeout_s`

OTLP spans carry our own IDs, parents and times (the SDK `Tracer` would make its own),
encoded by `otlp_wire` (which says why not by the SDK) and sent by the SDK's exporters
(`otlp_transport`: transport, TLS, headers, compression, retry and backoff). The printer
and any caller-supplied SDK `SpanExporter` get `ReadableSpan`s (`sdk_span`). Every span
carries the Resource of the process it was seen in (cached per pid/exe); a batch is grouped
by Resource, so one pipeline serves every instrumented process. Batching is done here
rather than by `BatchSpanProcessor` so that every span lost to a full buffer or a failed
batch is counted and shutdown is bounded by `shutdown_timeout_s` (the SDK processor waits
up to 30 s and drops silently).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, TextIO

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from ..config import Config
from ..model import SpanRecord
from .otlp_transport import Payload, make_otlp_exporter
from .otlp_wire import WireEncoder
from .printer import SpanPrinter
from .sampling import Sampler
from .sdk_span import to_readable_span
from .semconv import ResourceCache

log = logging.getLogger("obi.export")


class _BatchSender:
    """Bounded buffer + "obi-otlp" thread: batches of up to `batch_size` -> `send(batch)`."""

    def __init__(
        self,
        send: Callable[[list[Any]], bool],
        shutdown: Callable[[], None],
        max_buffer: int,
        batch_size: int,
        delay_s: float,
        on_drop: Callable[[int], None],
        on_result: Callable[[int, bool], None],
    ):
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
                items = items[: max(room, 0)]
            self._buf += items
            if len(self._buf) >= self._batch:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closing and len(self._buf) < self._batch:
                    self._cond.wait(self._delay)
                batch = self._buf[: self._batch]
                del self._buf[: self._batch]
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
            self._sender = _BatchSender(
                send, inner.shutdown, queue_size, batch_size, schedule_delay_s, self._count_drop, self._on_export_result
            )
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
        # The embedded default (docs/architecture.md, decision 8): nowhere to send spans and
        # no explicit printer setting -> print them as text.
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
