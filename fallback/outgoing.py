"""The outgoing side of the userspace tracker: parsing what the local side sends, deciding
and recording header insertions (the sequence map), holding the segments of a request
head until it is complete, and translating outgoing segments (sequence number, inserted
bytes, kind-25 option). The kernel path does this with sockops + sk_msg (tpinjector)."""

from __future__ import annotations

import time

from obi import w3c
from obi.model import FLAG_SAMPLED, TraceContext

from . import codec, tls
from .flow_state import (
    _ACK,
    _FIN,
    _IN,
    _OUT,
    _RST,
    _SYN,
    _U32,
    ACCEPT,
    HOLD_BYTES_LIMIT,
    HOLD_MAX_S,
    INSERT_LEN,
    TCP_OPTION_ROOM,
    ClientCall,
    Flow,
    Verdict,
    child,
    inserted_headers,
    log,
    new_root,
)
from .http import Message


class OutgoingPath:
    """Methods of `flows.Tracker` (a mixin: they work on the tracker's state)."""

    def _outgoing(self, flow: Flow, pkt: codec.Packet) -> Verdict:
        flags = pkt.flags
        if flags & _SYN:
            flow.out_base = (pkt.seq + 1) & _U32
            return Verdict(None, 0 if flow.server else self.mark)
        base = flow.out_base
        if base is None:
            base = flow.out_base = pkt.seq  # joined mid-connection
        r = ((pkt.seq - base + 0x80000000) & _U32) - 0x80000000  # rel(pkt.seq, base), inlined
        n = pkt.payload_len
        end = r + n + (flags & _FIN)  # FIN is 1
        if end > flow.out_hi:
            flow.out_hi = end
        in_base = flow.in_base
        if in_base is not None and flags & _ACK:
            a = ((pkt.ack - in_base + 0x80000000) & _U32) - 0x80000000
            if a > flow.in_acked:
                flow.in_acked = a
        if n:
            expected = flow.out_next
            if r <= expected < r + n:  # new bytes, in order
                start = pkt.payload_off + expected - r
                self._feed_out(flow, pkt, r, pkt.data[start : pkt.payload_off + n], expected)
                flow.out_next = r + n
            elif r > expected and self._gap_is_loss(flow, _OUT):  # a copy was lost: pick up again here
                self._feed_out(flow, pkt, r, pkt.data[pkt.payload_off : pkt.payload_off + n], r)
                flow.out_next = r + n
            elif r > expected:  # a gap: framing is lost for this connection
                if flow.out_stream is not None:
                    flow.out_stream.kill("gap in outgoing stream")
                if flow.tls is not None:
                    flow.tls.records.dead = True
        if flags & (_RST | _FIN):
            self._end_out(flow, flags)
        if flow.server:
            return ACCEPT
        call = flow.undecided
        if call is not None:
            if flags & (_RST | _FIN) or (flow.out_stream is not None and flow.out_stream.dead):
                self._decide(flow, call, pkt, r, insert=False)  # the head cannot complete: pass it
            elif r + n > call.msg.line_end:
                return self._hold(flow, pkt, r, n)
        return self._out_verdict(flow, pkt, r, n)

    def _out_verdict(self, flow: Flow, pkt: codec.Packet, r: int, n: int) -> Verdict:
        """A client segment [r, r+n) with the insertions and kind-25 option it carries and its
        sequence number translated."""
        option = b""
        if n and flow.options_out:
            for at, opt in flow.options_out:  # one segment per request, also when retransmitted
                if r <= at < r + n:
                    option = opt
                    break
        fmap = flow.out_map
        if not fmap and not option:
            return ACCEPT
        inserts = fmap.within(r, r + n) if n else []
        seq = flow.out_base + r + fmap.delta(r)
        new = codec.rebuild(pkt, seq=seq, inserts=inserts, add_option=option) if option else None
        if option and (new is None or len(new) > self.mtu):
            # No room in the 40 option bytes (or the MTU): the segment goes without it.
            self.stats["tcp_option_no_room"] += 1
            new = None
        elif option:
            self.stats["tcp_options_written"] += 1
        if new is None:
            new = codec.rebuild(pkt, seq=seq, inserts=inserts) if fmap else None
        return Verdict(new, self.mark | self.shift_mark if fmap else 0)

    def _end_out(self, flow: Flow, flags: int) -> None:
        """Our FIN or RST (the local stack's own: believed)."""
        if flags & _RST:
            if not flow.out_map:
                self._close(flow.key, flow)
                return
            # The socket is gone; keep translating what is still in flight for a while.
            if self.journal is not None and not flow.ended:
                self.journal.end(flow.key)
            flow.ended = True
            flow.closed_at = flow.closed_at or flow.last_seen
            return
        flow.fin |= _OUT
        if flow.fin == _IN | _OUT and not flow.closed_at:
            flow.closed_at = flow.last_seen

    def _hold(self, flow: Flow, pkt: codec.Packet, r: int, n: int) -> Verdict:
        """Keep a segment of an incomplete request head until the head is complete (or
        HOLD_MAX_S passed): whether the header goes in depends on what follows."""
        self._hold_token += 1
        token = self._hold_token
        if not flow.held:
            flow.hold_until = flow.last_seen + HOLD_MAX_S
            self._holding[flow.key] = flow
        flow.held.append((token, pkt, r, n))
        self.held_bytes += len(pkt.data)
        self.stats["segments_held"] += 1
        if self.held_bytes > HOLD_BYTES_LIMIT and flow.undecided is not None:
            self._decide(flow, flow.undecided, pkt, r)  # no room to wait: decide with what we have
        return Verdict(hold=token)

    def _release(self, flow: Flow) -> None:
        """The held segments of this flow get their verdicts (in order), now that the
        decision is taken."""
        for token, pkt, r, n in flow.held:
            self.held_bytes -= len(pkt.data)
            try:
                verdict = self._out_verdict(flow, pkt, r, n)
            except Exception:  # never leave a packet without a verdict
                log.exception("held segment")
                verdict = ACCEPT
            self.released.append((token, verdict))
        flow.held.clear()
        self._holding.pop(flow.key, None)

    def take_released(self) -> list[tuple[int, Verdict]]:
        """(hold token, verdict) of held packets decided since the last call, in order."""
        out, self.released = self.released, []
        return out

    def tick(self, now: float | None = None) -> None:
        """Decide the heads that waited HOLD_MAX_S (between packets, from the queue loop)."""
        if not self._holding:
            return
        now = time.monotonic() if now is None else now
        for flow in list(self._holding.values()):
            if now >= flow.hold_until or self.draining:
                call = flow.undecided
                if call is not None:
                    self._decide(flow, call, None, 0)
                else:
                    self._release(flow)

    def _feed_out(self, flow: Flow, pkt: codec.Packet, r: int, data: bytes, off: int) -> None:
        """New in-order outgoing bytes `data` at orig offset `off` of a segment starting at r."""
        if off == 0 and not flow.server and flow.tls is None and self._tcp and tls.looks_like_tls(data[0]):
            self._become_tls(flow)
        if flow.tls is not None:
            if flow.server:
                self._tls_answer(flow)
            else:
                self._tls_request_bytes(flow, r, data, off)
            return
        stream = flow.out_stream
        if stream is not None and not stream.dead:
            events = stream.feed(data, off)
            if events:
                self._out_events(flow, events, pkt, r)

    def _out_events(self, flow: Flow, events, pkt: codec.Packet, r: int) -> None:
        now = self._ts_ns
        if now is None:
            now = self.now()
        if flow.server:
            for kind, msg in events:
                if kind == "end" and flow.pending and not 100 <= msg.status < 200:
                    self._finish_server(flow, flow.pending.popleft(), msg.status, now)
        else:
            for kind, msg in events:
                if kind == "line":
                    self._client_request(flow, msg, now)
                elif kind == "head" and isinstance(msg.ctx, ClientCall) and not msg.ctx.decided:
                    self._decide(flow, msg.ctx, pkt, r)

    def _client_request(self, flow: Flow, msg: Message, now: int) -> ClientCall:
        """A request line: the client span starts, linked to the request being served. Whether
        a header goes in is decided once the head is complete (`_decide`)."""
        parent = self.linker.parent_for(flow.pid)
        if parent is not None:
            parent.children += 1
            ctx = child(parent.ctx)
            parent_id = parent.ctx.span_id
            self.stats["links_to_server"] += 1
        else:
            ctx = new_root()
            parent_id = ""
            self.stats["roots"] += 1
        call = ClientCall(ctx, parent_id, msg, now, False, 0, parent.ctx.trace_id if parent is not None else "")
        msg.ctx = call
        flow.pending.append(call)
        if self._headers and not self.draining:
            flow.undecided = call  # segments past the request line wait for the decision
        return call

    def _decide(self, flow: Flow, call: ClientCall, pkt: codec.Packet | None, r: int, insert: bool = True) -> None:
        """The request's head is complete (or waited long enough): adopt the application's
        own traceparent, or insert ours right after the request line, once; `insert` False:
        the head will not complete (FIN, RST, not HTTP), pass it as it is. `pkt` is the
        segment being handled (starting at r), None from tick()."""
        if flow.undecided is call:
            flow.undecided = None
        call.decided = True
        msg = call.msg
        head = bytes(msg.head[msg.line_end - msg.start :])  # header lines only, not the target
        present = head.lower().count(b"traceparent")
        if present:
            values = msg.header(b"traceparent")
            found = w3c.parse_traceparent(values[0]) if len(values) == 1 and present == 1 else None
            if found is not None:
                # The app propagates itself: adopt its context, insert nothing.
                self.stats["headers_present"] += 1
                call.ctx = TraceContext(found.trace_id, found.span_id, found.flags, call.ctx.tracestate)
                call.parent = call.parent if call.parent_trace == found.trace_id else ""
                call.propagated = True
            else:
                self.stats["headers_invalid"] += 1
        elif insert and self._headers and not self.draining and flow.out_base is not None:
            # The app's own tracestate (with no traceparent): ours is not added to it.
            blob = inserted_headers(call.ctx, tracestate=not msg.has_header(b"tracestate"))
            pos = msg.line_end
            # The segment that carries it must still fit the MTU (the SYN's MSS was clamped for
            # one Traceparent): a tracestate that does not fit is left out, then the header.
            carrier = next(((p, pr, pn) for _, p, pr, pn in flow.held if pr <= pos < pr + pn), None)
            if carrier is None and pkt is not None and r <= pos < r + pkt.payload_len:
                carrier = (pkt, r, pkt.payload_len)
            room = len(blob)  # it goes at the start of a segment not seen yet: not checked
            if carrier is not None:
                cp, cr, cn = carrier
                room = self.mtu - len(cp.data) - TCP_OPTION_ROOM * self._tcp
                room -= sum(len(b) for _, b in flow.out_map.within(cr, cr + cn))
            if len(blob) > room and len(blob) > INSERT_LEN:
                blob = blob[:INSERT_LEN]
                self.stats["tracestate_skipped_mtu"] += 1
            if len(blob) > room:
                self.stats["insert_skipped_mtu"] += 1
            else:
                flow.out_map.add(pos, blob)
                self.stats["headers_inserted"] += 1
                if len(blob) > INSERT_LEN:
                    self.stats["tracestate_inserted"] += 1
                if self.journal is not None:
                    self.journal.insertion(flow.key, flow.out_base, pos, blob)
        if self._tcp:  # the segment where the header goes (or would) carries kind 25
            flow.options_out.append((msg.line_end, self._option(call.ctx)))
        if flow.held:
            self._release(flow)

    @staticmethod
    def _option(ctx: TraceContext) -> bytes:
        """Kind 25: len 26 when the flags are just `sampled`, else len 27 with the flags byte."""
        flags = None if ctx.flags == FLAG_SAMPLED else ctx.flags
        return codec.trace_option(bytes.fromhex(ctx.trace_id), bytes.fromhex(ctx.span_id), flags)
