"""TLS connections in the userspace tracker: request turns instead of HTTP messages (record
framing in `tls`), their spans, and the kind-25 options that carry their context."""

from __future__ import annotations

from obi.model import TraceContext

from . import codec
from .flow_state import (
    ClientCall,
    Flow,
    ServerSpan,
    TlsFlow,
    child,
    new_root,
)
from .http import Message


class TlsTurns:
    """Methods of `flows.Tracker` (a mixin: they work on the tracker's state)."""

    def _tls_in(self, flow: Flow, pkt: codec.Packet, r: int, n: int, opt_ctx: TraceContext | None) -> None:
        """Accepted incoming bytes [r, r+n) of a TLS connection."""
        if flow.server:
            if opt_ctx is not None:
                self._tls_option_in(flow, r, r + n, opt_ctx)
            off = pkt.payload_off
            self._in_data(flow, r, pkt.data[off : off + n])
        elif r + n > flow.in_next:
            flow.in_next = r + n
            self._tls_answer(flow)

    def _become_tls(self, flow: Flow) -> None:
        flow.tls = TlsFlow()
        flow.in_stream = flow.out_stream = None  # nothing to parse, nothing to insert
        self.stats["tls_flows"] += 1

    def _tls_request_bytes(self, flow: Flow, seg: int, data: bytes | memoryview, off: int) -> None:
        """Bytes of the requesting direction (client: outgoing, server: incoming), in order."""
        t = flow.tls
        assert t is not None
        if t.records.dead:
            return
        start = t.turns.segment(seg, t.records.feed(data, off))
        if start is None:
            return
        self._end_tls_turn(flow)
        now = self._now()
        msg = Message(True, start)  # method and target unknown: encrypted
        self.stats["tls_turns"] += 1
        t.turn_at, t.answered_ns = start, 0
        if flow.server:
            parent = next((ctx for lo, hi, ctx in t.options_in if lo <= start < hi), None)
            if parent is not None:
                span = ServerSpan(child(parent), parent.span_id, msg, flow.pid, now, True)
            else:
                span = ServerSpan(new_root(), "", msg, flow.pid, now, False)
            self.linker.add(span)
            t.turn = span
        else:
            call = self._client_call(flow, msg, now)
            flow.options_out.append((start, self._option(call.ctx)))
            t.turn = call

    def _client_call(self, flow: Flow, msg: Message, now: int) -> ClientCall:
        parent = self.linker.parent_for(flow.pid)
        if parent is not None:
            parent.children += 1
            self.stats["links_to_server"] += 1
            return ClientCall(child(parent.ctx), parent.ctx.span_id, msg, now, False)
        self.stats["roots"] += 1
        return ClientCall(new_root(), "", msg, now, False)

    def _tls_option_in(self, flow: Flow, lo: int, hi: int, ctx: TraceContext) -> None:
        """A server segment [lo, hi) carried kind 25. Kept for the turn that starts inside it;
        if that turn already started (the segment came late), it is adopted there."""
        t = flow.tls
        assert t is not None
        t.options_in.append((lo, hi, ctx))
        span = t.turn
        if isinstance(span, ServerSpan) and not span.propagated and span.children == 0 and lo <= t.turn_at < hi:
            span.ctx, span.parent, span.propagated = child(ctx), ctx.span_id, True

    def _tls_answer(self, flow: Flow) -> None:
        """New data from the answering side: the current turn is being answered."""
        t = flow.tls
        assert t is not None
        t.turns.answer()
        if t.turn is not None:
            t.answered_ns = self._now()
            if isinstance(t.turn, ServerSpan):
                self.linker.remove(t.turn)  # responding: no longer a parent for outgoing calls

    def _end_tls_turn(self, flow: Flow) -> None:
        t = flow.tls
        if t is None or t.turn is None:
            return
        turn, t.turn = t.turn, None
        end = t.answered_ns or self._now()
        if isinstance(turn, ServerSpan):
            self._finish_server(flow, turn, 0, end)
        else:
            self._finish_client(flow, turn, 0, end)
