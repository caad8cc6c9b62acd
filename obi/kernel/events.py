"""Ring buffer events -> SpanRecords.

Normally BPF sends one event per span (SERVER_SPAN from tc egress, CLIENT_SPAN from tc
ingress: the request's event, completed with the response's status and time in BPF), and
it becomes a SpanRecord at once. A connection with several requests waiting for answers
(pipelining) is reported in pairs instead (obi_abi.h): a request's headers seen (SERVER_REQ
on tc ingress, CLIENT_REQ in sk_msg) and a response's status line (SERVER_RESP on tc
egress, CLIENT_RESP on tc ingress); each response is paired with the oldest open request of the
same connection (HTTP/1.x answers in order). The ids are always chosen in BPF (they had to
be: the client's ids are written into the request as it leaves).

TLS connections (OBI_EVF_TLS) carry no HTTP: their spans are turns (tpinjector.bpf.c), with
method, path and status left empty/0 and extra {"tls": True}; "tcp_option" tells whether
the context went out in (client) or came from (server) TCP option kind 25.

Times: bpf_ktime_get_ns() is CLOCK_MONOTONIC; the offset to CLOCK_REALTIME is measured
once at start (and can be refreshed with `resync_clock`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from .. import w3c
from ..model import Datapath, SpanKind, SpanRecord
from .abi import (
    EVF_INJECTED,
    EVF_TCPOPT,
    EVF_THREAD_LINKED,
    EVF_TLS,
    EVF_TP_VALID,
    Event,
    EventKind,
    Tuple,
)

log = logging.getLogger("obi.kernel.events")

SpanSink = Callable[[SpanRecord], None]
MAX_OPEN_PER_CONN = 64  # open requests kept per connection (pipelining depth)
# Requests whose response has not come (all connections), and how long one is kept: a
# connection that ended without a response (or a spoofed request and FIN) must not hold
# memory until the agent stops. Beyond either bound the oldest go, counted in `evicted`.
MAX_OPEN_REQUESTS = 16384
MAX_OPEN_AGE_S = 300.0
_SERVER_SPAN, _CLIENT_SPAN = int(EventKind.SERVER_SPAN), int(EventKind.CLIENT_SPAN)  # plain ints: hot path


def monotonic_to_epoch_offset() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC in ns, read as close together as we can."""
    best = None
    for _ in range(3):
        a = time.monotonic_ns()
        r = time.time_ns()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, r - (a + b) // 2)
    assert best is not None
    return best[1]


def split_request_line(line: bytes) -> tuple[str, str]:
    """(method, target) of a request line prefix; the target may be cut at LINE_MAX."""
    method, _, rest = line.decode("latin-1").partition(" ")
    target, sep, _ = rest.rpartition(" HTTP/")
    return method, (target if sep else rest)


class Correlator:
    """Pairs request and response events per connection and emits finished spans."""

    def __init__(
        self,
        sink: SpanSink,
        exe_of: Callable[[int], str] | None = None,
        max_open: int = MAX_OPEN_REQUESTS,
        max_age_s: float = MAX_OPEN_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._sink = sink
        self._exe_of = exe_of or (lambda pid: "")
        self._offset = monotonic_to_epoch_offset()
        self._lock = threading.Lock()
        self._server: dict[Tuple, collections.deque[Event]] = collections.defaultdict(collections.deque)
        self._client: dict[Tuple, collections.deque[Event]] = collections.defaultdict(collections.deque)
        # (table, tuple) of every connection with open requests, least recently added to
        # first, with the time of its last request: what eviction takes first.
        self._recent: collections.OrderedDict[tuple[int, Tuple], float] = collections.OrderedDict()
        self._open = 0
        self._max_open, self._max_age_s, self._clock = max_open, max_age_s, clock
        self.spans = 0
        self.unmatched_responses = 0
        self.dropped_requests = 0
        self.evicted = 0  # open requests dropped by the bounds above (no span)

    def resync_clock(self) -> None:
        self._offset = monotonic_to_epoch_offset()

    def epoch(self, mono_ns: int) -> int:
        return mono_ns + self._offset

    def on_raw(self, raw: bytes | memoryview) -> None:
        self.on_event(Event.unpack(raw))

    def on_event(self, ev: Event) -> None:
        kind = ev.kind
        if kind == _SERVER_SPAN:
            self._emit(self.server_span(ev, ev.end_ns, ev.status, ev.pid_tgid))
            return
        if kind == _CLIENT_SPAN:
            self._emit(self.client_span(ev, ev.end_ns, ev.status))
            return
        with self._lock:
            if ev.kind in (EventKind.SERVER_REQ, EventKind.CLIENT_REQ):
                server = ev.kind == EventKind.SERVER_REQ
                table = self._server if server else self._client
                q = table[ev.tuple]
                if len(q) >= MAX_OPEN_PER_CONN:
                    q.popleft()
                    self.dropped_requests += 1
                    self._open -= 1
                q.append(ev)
                self._open += 1
                key = (int(server), ev.tuple)
                self._recent[key] = self._clock()
                self._recent.move_to_end(key)
                if self._open > self._max_open:
                    self._evict_oldest()
                return
            server = ev.kind == EventKind.SERVER_RESP
            table = self._server if server else self._client
            q = table.get(ev.tuple)
            if not q:
                self.unmatched_responses += 1
                return
            req = q.popleft()
            self._open -= 1
            if not q:
                del table[ev.tuple]
                self._recent.pop((int(server), ev.tuple), None)
        if ev.kind == EventKind.SERVER_RESP:
            self._emit(self.server_span(req, ev.ts_ns, ev.status, ev.pid_tgid))
        else:
            self._emit(self.client_span(req, ev.ts_ns, ev.status))

    def _evict_oldest(self) -> None:
        """Drop the open requests of the connection least recently added to (lock held)."""
        (server, t), _ = self._recent.popitem(last=False)
        q = (self._server if server else self._client).pop(t, None) or ()
        self._open -= len(q)
        self.evicted += len(q)

    def expire(self) -> int:
        """Drop the open requests of connections with no new request for max_age_s (called
        periodically by the datapath). Returns how many went."""
        before = self.evicted
        limit = self._clock() - self._max_age_s
        with self._lock:
            while self._recent:
                key, last = next(iter(self._recent.items()))
                if last > limit:
                    break
                self._evict_oldest()
        return self.evicted - before

    @property
    def open_requests(self) -> int:
        return self._open

    def flush(self) -> None:
        """Emit spans for requests still open (status 0, zero duration): at stop."""
        with self._lock:
            pending = [(SpanKind.SERVER, e) for q in self._server.values() for e in q]
            pending += [(SpanKind.CLIENT, e) for q in self._client.values() for e in q]
            self._server.clear()
            self._client.clear()
            self._recent.clear()
            self._open = 0
        for kind, req in pending:
            if kind == SpanKind.SERVER:
                self._emit(self.server_span(req, req.ts_ns, 0, 0))
            else:
                self._emit(self.client_span(req, req.ts_ns, 0))

    def _emit(self, span: SpanRecord) -> None:
        self.spans += 1
        self._sink(span)

    def server_span(self, req: Event, end_ns: int, status: int, pid_tgid: int) -> SpanRecord:
        """req: the request's event; end_ns/status/pid_tgid: from the response (the
        responding thread), or req.ts_ns/0/0 when none was seen."""
        # BPF validated and normalized it (obi_tracestate.h), only with a valid traceparent.
        tracestate = req.tracestate.decode("ascii", "replace") if req.flags & EVF_TP_VALID else ""
        pid = pid_tgid >> 32
        return self._span(
            req,
            SpanKind.SERVER,
            end_ns,
            status,
            trace_id=req.trace_id,
            span_id=req.span_id,
            parent=req.parent_id,
            flags=req.trace_flags,
            tracestate=tracestate,
            pid=pid,
            tid=pid_tgid & 0xFFFFFFFF,
            exe=self._exe_of(pid) if pid_tgid else "",
            propagated=bool(req.flags & (EVF_TP_VALID | EVF_TCPOPT)),
        )

    def client_span(self, req: Event, end_ns: int, status: int) -> SpanRecord:
        trace_id, span_id, parent, flags = req.trace_id, req.span_id, req.parent_id, req.trace_flags
        if req.tp_count and not req.flags & EVF_INJECTED:
            # The application wrote its own traceparent (nothing was inserted; counted in
            # BPF as app_traceparent). One valid header: the span takes its ids, so that the
            # server it calls links to it. Invalid or duplicated: no usable context; keep ours.
            ctx = w3c.parse_traceparent(req.tp) if req.tp_count == 1 else None
            if ctx is not None:
                if ctx.trace_id != trace_id:
                    parent = ""
                trace_id, span_id, flags = ctx.trace_id, ctx.span_id, ctx.flags
        return self._span(
            req,
            SpanKind.CLIENT,
            end_ns,
            status,
            trace_id=trace_id,
            span_id=span_id,
            parent=parent,
            flags=flags,
            tracestate=req.tracestate.decode("ascii", "replace") if req.flags & EVF_INJECTED else "",
            pid=req.pid,
            tid=req.tid,
            exe=self._exe_of(req.pid),
            propagated=bool(req.flags & EVF_THREAD_LINKED),
        )

    def _span(
        self,
        req: Event,
        kind: SpanKind,
        end_ns: int,
        status: int,
        *,
        trace_id: str,
        span_id: str,
        parent: str,
        flags: int,
        tracestate: str,
        pid: int,
        tid: int,
        exe: str,
        propagated: bool,
    ) -> SpanRecord:
        """A span of either kind: start line, start time, host, connection and TLS come from
        the request's event; ids, process and propagation differ by kind (the callers)."""
        method, target = split_request_line(req.line)
        extra: dict[str, str | int | bool] = {}
        if req.flags & EVF_TLS:
            extra = {"tls": True, "tcp_option": bool(req.flags & EVF_TCPOPT)}
        t = req.tuple
        return SpanRecord(
            trace_id=trace_id,
            span_id=span_id,
            parent_span_id=parent,
            kind=kind,
            start_ns=self.epoch(req.ts_ns),
            end_ns=self.epoch(end_ns),
            method=method,
            path=target,
            status=status,
            host=req.host,
            local_addr=t.local_addr,
            local_port=t.local_port,
            peer_addr=t.peer_addr,
            peer_port=t.peer_port,
            pid=pid,
            tid=tid,
            exe=exe,
            flags=flags,
            tracestate=tracestate,
            datapath=Datapath.KERNEL,
            propagated=propagated,
            extra=extra,
        )
