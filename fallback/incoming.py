"""The incoming side of the userspace tracker: telling in-window segments from forged ones,
parsing what the peer sends (requests of served connections, responses of client
calls), RSTs and FINs, lost copies and resynchronisation, and translating incoming
acknowledgments (and SACK edges) back. The kernel path does this in tc ingress (tctracer)."""

from __future__ import annotations

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
    ACK_SLACK,
    BUFFER_LIMIT,
    REASSEMBLY_LIMIT,
    SEQMAP_COMPACT_AT,
    Flow,
    ServerSpan,
    Verdict,
    child,
    new_root,
    rel,
)
from .http import Message


class IncomingPath:
    """Methods of `flows.Tracker` (a mixin: they work on the tracker's state)."""

    def _incoming(self, flow: Flow, pkt: codec.Packet) -> Verdict:
        flags = pkt.flags
        if flags & _SYN:
            if not flow.server and flags & _ACK and pkt.ack == flow.out_base:
                if not flow.verified:  # the SYN-ACK that answers our SYN
                    flow.in_base = (pkt.seq + 1) & _U32
                    flow.in_acked, flow.verified = 0, True
            elif not flow.server:
                self.stats["segments_ignored"] += 1
            return ACCEPT
        fmap = flow.out_map
        # Whether the segment acknowledges what the local side sent: no more than it sent
        # (plus ACK_SLACK when copies of a served connection's outgoing packets may have been
        # lost since), no less than ACK_SLACK below what was acknowledged before. A segment
        # forged by a host that does not see the connection passes with a chance of about
        # 2 * ACK_SLACK / 2**32; only segments that pass are parsed. (Inline: every packet.)
        ok = False
        if flow.verified and flags & _ACK:
            a = ((pkt.ack - flow.out_base + 0x80000000) & _U32) - 0x80000000
            hi = flow.out_hi + fmap.total
            if flow.server and flow.out_epoch != self.loss_epoch:
                hi += ACK_SLACK
            ack_hi = flow.ack_hi
            if ack_hi - ACK_SLACK <= a <= hi:
                ok = True
                if a > ack_hi:
                    flow.ack_hi = a
        if flags & _RST:
            self._rst_in(flow, pkt, ok)
        elif ok:
            # An accepted segment: options, data (within REASSEMBLY_LIMIT of the stream
            # position, or near what the stack acknowledged after lost copies), FIN.
            opt_ctx = None
            if self._tcp and flow.server:
                opt_ctx = self._option_in(flow, pkt)
            n = pkt.payload_len
            r = ((pkt.seq - flow.in_base + 0x80000000) & _U32) - 0x80000000  # rel(pkt.seq, in_base)
            if r > flow.in_next + REASSEMBLY_LIMIT and not self._resync_in_window(flow, r):
                self.stats["segments_ignored"] += 1  # far beyond what the stack would take
            else:
                end = r + n + (flags & _FIN)
                if end > flow.in_hi:
                    flow.in_hi = end
                if n:
                    if flow.tls is not None:
                        self._tls_in(flow, pkt, r, n, opt_ctx)
                    elif flow.in_stream is not None and not flow.in_stream.dead:
                        off = pkt.payload_off
                        self._in_data(flow, r, pkt.data[off : off + n])
                if flags & _FIN:
                    flow.fin |= _IN
                    if flow.fin == _IN | _OUT and not flow.closed_at:
                        flow.closed_at = flow.last_seen
                flow.in_epoch = self.loss_epoch  # copies lost before this one are behind us
        elif pkt.payload_len or flags & _FIN:
            self.stats["segments_ignored"] += 1
        if not fmap or not flags & _ACK:
            return ACCEPT
        base = flow.out_base

        def back(seq: int) -> int:
            return base + fmap.to_orig(rel(seq, base))

        if ok and len(fmap.pos) > SEQMAP_COMPACT_AT:
            fmap.compact(fmap.to_orig(rel(pkt.ack, base)) - 1)
        return Verdict(codec.rebuild(pkt, ack=back(pkt.ack), map_sack=back))

    def _option_in(self, flow: Flow, pkt: codec.Packet) -> TraceContext | None:
        """The context of a kind-25 option on an accepted incoming segment of a served connection."""
        opt = codec.find_trace_option(pkt)
        if opt is None:
            return None
        tid, sid, oflags = opt
        if not any(tid) or not any(sid):
            return None
        ctx = TraceContext(tid.hex(), sid.hex(), FLAG_SAMPLED if oflags is None else oflags)
        flow.option_ctx = ctx
        self.stats["tcp_options_read"] += 1
        return ctx

    def _rst_in(self, flow: Flow, pkt: codec.Packet, ok: bool) -> None:
        """An incoming RST, believed only if the local stack could take it: in SYN-SENT, one
        that acknowledges our SYN; later, one whose sequence number lies between what the
        local side acknowledged and the end of what the peer sent (the kernel resets only on
        the exact next sequence number; anything else it ignores or answers with an ACK).
        Even then a connection with inserted bytes keeps its translation until its socket is
        gone (gc)."""
        if not flow.verified:
            believed = not flow.server and bool(pkt.flags & _ACK) and pkt.ack == flow.out_base
        else:
            r = rel(pkt.seq, flow.in_base)
            believed = flow.in_acked <= r <= flow.in_hi
        if not believed:
            self.stats["rst_ignored"] += 1
            return
        if not flow.out_map:
            self._close(flow.key, flow)
        elif not flow.closed_at:
            flow.closed_at = flow.last_seen

    def _resync_in_window(self, flow: Flow, r: int) -> bool:
        """Whether incoming offset r may start the stream again after lost copies: near what
        the local stack has acknowledged (a lost request's response acknowledges it)."""
        return flow.verified and 0 <= r - flow.in_acked <= REASSEMBLY_LIMIT

    def _in_data(self, flow: Flow, r: int, data: bytes) -> None:
        """Feed incoming payload to the parser in order, keeping a little out-of-order data."""
        if r > flow.in_next and self._resync_in_window(flow, r) and self._gap_is_loss(flow, _IN):
            flow.in_next = r  # a copy was lost, not reordered
        if r > flow.in_next:
            if r - flow.in_next > REASSEMBLY_LIMIT:
                self.stats["segments_ignored"] += 1
                return
            if sum(map(len, flow.in_ooo.values())) + len(data) > REASSEMBLY_LIMIT:
                self._stop_parsing_in(flow, "reassembly limit")
            elif self.buffered + len(data) > BUFFER_LIMIT:
                self.stats["buffer_full"] += 1
                self._stop_parsing_in(flow, "buffer limit")
            else:
                old = flow.in_ooo.get(r)
                if old is not None:
                    self.buffered -= len(old)
                flow.in_ooo[r] = data
                self.buffered += len(data)
            return
        while True:
            if r + len(data) > flow.in_next:
                data = data[flow.in_next - r :]
                if self._feed_in(flow, r, data, flow.in_next):
                    return
                flow.in_next += len(data)
            if not flow.in_ooo:
                return
            nxt = min(flow.in_ooo)
            if nxt > flow.in_next:
                return
            r, data = nxt, flow.in_ooo.pop(nxt)
            self.buffered -= len(data)

    def _stop_parsing_in(self, flow: Flow, why: str) -> None:
        if flow.tls is not None:
            flow.tls.records.dead = True
        if flow.in_stream is not None:
            flow.in_stream.kill(why)
        self._drop_ooo(flow)

    def _drop_ooo(self, flow: Flow) -> None:
        if flow.in_ooo:
            self.buffered -= sum(map(len, flow.in_ooo.values()))
            flow.in_ooo.clear()

    def copies_lost(self, n: int) -> None:
        """The queue reader lost n observed packets (it was behind): streams of served
        connections may have holes from here on."""
        self.loss_epoch += 1
        self.stats["copies_lost"] += n

    def _gap_is_loss(self, flow: Flow, direction: int) -> bool:
        """Whether a gap in this direction is a lost copy (then the flow is resynchronised
        and the caller goes on from the new segment): copies were lost since the flow's
        previous packet in this direction, and it is a served HTTP connection (only observed
        packets are ever lost); or a resync is waiting for this direction's first gap."""
        if flow.resync_gap & direction:
            flow.resync_gap &= ~direction
            return True
        epoch = flow.in_epoch if direction == _IN else flow.out_epoch
        if flow.server and epoch != self.loss_epoch and flow.tls is None:
            self._resync(flow)
            flow.resync_gap &= ~direction
            return True
        return False

    def _resync(self, flow: Flow) -> None:
        """Requests in flight on this connection can no longer be paired with their responses:
        drop them (counted), and let both directions start again at the next message."""
        for span in flow.pending:
            self.linker.remove(span)
        self.stats["spans_lost"] += len(flow.pending)
        self.stats["resyncs"] += 1
        flow.pending.clear()
        self._drop_ooo(flow)
        flow.resync_gap = _IN | _OUT  # the other direction may have lost bytes too
        for stream in (flow.in_stream, flow.out_stream):
            if stream is not None:
                stream.resync()

    def _feed_in(self, flow: Flow, r: int, data: bytes, off: int) -> bool:
        """New in-order incoming bytes at offset `off` (segment start r); True = stop parsing."""
        if off == 0 and flow.server and flow.tls is None and self._tcp and tls.looks_like_tls(data[0]):
            self._become_tls(flow)
        if flow.tls is not None:
            self._tls_request_bytes(flow, r, data, off)
            return flow.tls.records.dead
        stream = flow.in_stream
        if stream is None or stream.dead:
            return True
        events = stream.feed(data, off)
        if events:
            self._in_events(flow, events)
        return False

    def _in_events(self, flow: Flow, events) -> None:
        now = self._ts_ns
        if now is None:
            now = self.now()
        if flow.server:
            for kind, msg in events:
                if kind == "start":
                    msg.ctx = now
                elif kind == "head":
                    self._server_request(flow, msg, msg.ctx if isinstance(msg.ctx, int) else now)
        else:
            for kind, msg in events:
                if kind == "end" and flow.pending and not 100 <= msg.status < 200:
                    self._finish_client(flow, flow.pending.popleft(), msg.status, now)

    def _server_request(self, flow: Flow, msg: Message, start: int) -> None:
        # Most requests carry no traceparent: skip the general extraction for them.
        incoming = w3c.extract(msg.header_lines()) if self._read_incoming and msg.has_header(b"traceparent") else None
        propagated = incoming is not None
        if incoming is None and flow.option_ctx is not None:
            incoming = flow.option_ctx
            propagated = True
        flow.option_ctx = None
        if incoming is not None:
            ctx, parent = child(incoming), incoming.span_id
        else:
            ctx, parent = new_root(), ""
        span = ServerSpan(ctx, parent, msg, flow.pid, start, propagated)
        flow.pending.append(span)
        self.linker.add(span)
