"""Per-connection state of the userspace datapath: HTTP framing, spans, header insertion
and the sequence-number translation that insertion makes necessary.

`Tracker.handle(packet, outgoing)` is the whole datapath minus the queue: it takes the raw
IP packet and says what to do with it (`Verdict`). It has no I/O of its own: which
process owns a connection and which server request an outgoing call belongs to are asked
from the `Owners` and `Linker` objects it is given, so the logic is unit-testable with
packets built by scapy.

Sequence spaces. For a client connection into which we inserted bytes, "orig" is what
the local TCP stack thinks (its seq numbers), "wire" is what the peer sees. Insertions
are kept as positions in orig space relative to the first payload byte (`SeqMap`); each
outgoing segment [s, e) maps to wire seq s + (bytes inserted before s) and carries every
insertion whose position is in [s, e) (a retransmission gets the identical bytes, however
the stack re-segments); each incoming ack/SACK edge maps back.

Hostile and unlucky input (what the kernel's own checks would reject must not change the
agent's state either):
- Served connections are created from the local stack's SYN-ACK (a handshake record) or from
  its first outgoing data, never from incoming packets alone: a segment from a forged source
  is not a request. Incoming segments are parsed only when their ack number acknowledges
  data the local side sent (within ACK_SLACK of what it acknowledged before) and their
  sequence number lies within REASSEMBLY_LIMIT of the stream position; a gap is taken as
  lost copies only near what the local stack has acknowledged (`in_acked`).
- An RST is believed only when its sequence number is within what the local stack may
  accept, and a connection with inserted bytes keeps its translation until its socket is
  gone (asked from `Owners.socket_exists`), however it seemed to end (RST, both FINs, idle).
- FINs count once per direction.
- The table holds at most MAX_FLOWS connections (handshakes first out, then the least
  recently seen; never one with inserted bytes), out-of-order bytes kept for parsing are
  capped at BUFFER_LIMIT in all, and expiry runs a slice of the table at a time.
- An outgoing request whose head spans several segments has its segments held (at most
  HOLD_MAX_S) until the head is complete, so that the header goes right after the request
  line only when the application wrote none in a later segment.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict, deque
from typing import Callable

from obi.config import Config
from obi.model import SpanKind, SpanRecord, TraceContext

from . import codec
from .flow_state import (
    _ACK,
    _FIN,
    _IN,
    _OUT,
    _RST,
    _SYN,
    _U32,
    _USERSPACE,
    ACCEPT,
    ACK_SLACK,
    BUFFER_LIMIT,
    CLOSE_LINGER_S,
    EVICT_SCAN,
    GC_INTERVAL_S,
    GC_MIN_BATCH,
    GC_SWEEP_S,
    HANDSHAKE_TIMEOUT_S,
    HEADER_NAME,
    HOLD_BYTES_LIMIT,
    HOLD_MAX_S,
    IDLE_TIMEOUT_S,
    INSERT_LEN,
    MAX_FLOWS,
    REASSEMBLY_LIMIT,
    RECENT_OPTIONS,
    SEQMAP_COMPACT_AT,
    SHIFTED_IDLE_TIMEOUT_S,
    TCP_OPTION_ROOM,
    ClientCall,
    Flow,
    Handshake,
    Journal,
    Key,
    Linker,
    Owners,
    ServerSpan,
    TlsFlow,
    Verdict,
    _ids,
    child,
    inserted_headers,
    log,
    new_root,
    rel,
)
from .http import Message, Stream
from .incoming import IncomingPath
from .outgoing import OutgoingPath
from .seqmap import SEQMAP_KEEP, SeqMap
from .tls_flows import TlsTurns

# What importers of this module use (the tracker, its types and limits, split over
# flow_state, seqmap, outgoing, incoming and tls_flows).
__all__ = [
    "ACCEPT",
    "ACK_SLACK",
    "BUFFER_LIMIT",
    "CLOSE_LINGER_S",
    "EVICT_SCAN",
    "GC_INTERVAL_S",
    "GC_MIN_BATCH",
    "GC_SWEEP_S",
    "HANDSHAKE_TIMEOUT_S",
    "HEADER_NAME",
    "HOLD_BYTES_LIMIT",
    "HOLD_MAX_S",
    "IDLE_TIMEOUT_S",
    "INSERT_LEN",
    "MAX_FLOWS",
    "REASSEMBLY_LIMIT",
    "RECENT_OPTIONS",
    "SEQMAP_COMPACT_AT",
    "SEQMAP_KEEP",
    "SHIFTED_IDLE_TIMEOUT_S",
    "TCP_OPTION_ROOM",
    "ClientCall",
    "Flow",
    "Handshake",
    "Journal",
    "Key",
    "Linker",
    "Owners",
    "SeqMap",
    "ServerSpan",
    "TlsFlow",
    "Tracker",
    "Verdict",
    "child",
    "inserted_headers",
    "new_root",
    "rel",
    "_ids",
]

_monotonic = time.monotonic


class Tracker(OutgoingPath, IncomingPath, TlsTurns):
    """The userspace datapath minus the queue: `handle()` per packet, the flow table (creation,
    eviction, expiry, the journal of inserted bytes) and span records. The per-direction
    work is in `outgoing.OutgoingPath`, `incoming.IncomingPath` and `tls_flows.TlsTurns`."""

    def __init__(
        self,
        cfg: Config,
        sink: Callable[[SpanRecord], None],
        owners: Owners,
        mtu: int = 1500,
        mark: int = 0,
        shift_mark: int = 0,
        journal: Journal | None = None,
    ) -> None:
        self.cfg = cfg
        self.sink = sink
        self.owners = owners
        self.mtu = mtu
        self.mark = mark  # set on the SYN of a client connection we track (-> connmark)
        self.shift_mark = shift_mark  # added on packets of connections with inserted bytes (-> connmark)
        self.journal = journal
        self.draining = False  # stopping: no new flows, no new insertions, keep translating
        self.flows: dict[Key, Flow] = {}
        # Served connections between our SYN-ACK and their first data (oldest first).
        self.handshakes: OrderedDict[Key, Handshake] = OrderedDict()
        self._ring: deque = deque()  # (key, flow) in creation order: expiry and eviction walk it
        self.buffered = 0  # out-of-order bytes kept for parsing, all flows
        self.held_bytes = 0  # bytes of held segments, all flows
        self._holding: dict[Key, Flow] = {}  # flows with held segments
        self._hold_token = 0
        self.released: list[tuple[int, Verdict]] = []  # verdicts of held packets, for the queue loop
        self.linker = Linker()
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "packets",
                "packets_modified",
                "headers_inserted",
                "headers_present",
                "headers_invalid",
                "tcp_options_written",
                "tcp_options_read",
                "tcp_option_no_room",
                "spans",
                "flows",
                "errors",
                "insert_skipped_mtu",
                "tracestate_inserted",
                "tracestate_skipped_mtu",
                "links_to_server",
                "roots",
                "tls_flows",
                "tls_turns",
                "flows_resumed",
                "copies_lost",
                "resyncs",
                "spans_lost",
                "flows_evicted",
                "flows_refused",
                "segments_ignored",
                "rst_ignored",
                "buffer_full",
                "segments_held",
            ),
            0,
        )
        # Bumped each time the queue reader reports lost copies of observed packets: a gap
        # in a served connection after that is taken as loss, not reordering.
        self.loss_epoch = 0
        self.now = time.time_ns  # replaceable in tests
        self._ts_ns: int | None = None  # receive time of the packet being handled, if given
        self._last_gc = _monotonic()
        # Config is frozen: read its derived flags once, not on every packet.
        self._tcp = cfg.propagate_tcp
        self._headers = cfg.propagate_headers
        self._read_incoming = cfg.read_incoming_headers

    def handle(self, data: bytes, outgoing: bool, ts_ns: int | None = None) -> Verdict:
        """What to do with one packet. `ts_ns`: wall-clock time (time.time_ns scale) at which
        the kernel handed the packet over; span times taken from this packet use it, since
        the packet may be handled a while later (None: now). A verdict with `hold` set is
        given later, through take_released()."""
        stats = self.stats
        stats["packets"] += 1
        now = _monotonic()
        if now - self._last_gc > GC_INTERVAL_S:
            self.gc_step(now)
        pkt = codec.parse(data)
        if pkt is None:
            return ACCEPT
        flags = pkt.flags
        if outgoing:
            key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        else:
            key = (pkt.dst, pkt.dport, pkt.src, pkt.sport)
        flow = self.flows.get(key)
        self._ts_ns = ts_ns
        try:
            if flow is not None and outgoing and flags & _SYN and (flow.server or not flags & _ACK):
                # Our SYN or SYN-ACK on a known 4-tuple: the old connection is gone (the stack
                # would not reuse the tuple of a socket that exists), a new one starts.
                self._close(key, flow)
                flow = None
            if flow is None:
                flow = self._new_flow(key, pkt, outgoing)
                if flow is None:
                    return ACCEPT
                flow.in_epoch = flow.out_epoch = self.loss_epoch
            flow.last_seen = now
            if outgoing:
                verdict = self._outgoing(flow, pkt)
                flow.out_epoch = self.loss_epoch
            else:
                verdict = self._incoming(flow, pkt)
        finally:
            self._ts_ns = None  # gc() and close_all() between packets end spans at now()
        if verdict.payload is not None:
            stats["packets_modified"] += 1
        return verdict

    def _now(self) -> int:
        """Time for spans taken from the packet being handled: when it was received, if
        handle() was told, else now."""
        ts = self._ts_ns
        return self.now() if ts is None else ts

    def _new_flow(self, key: Key, pkt: codec.Packet, outgoing: bool) -> Flow | None:
        """A flow for the first packet of a 4-tuple, or None. Client connections start at our
        SYN; served ones at our SYN-ACK (a handshake record, made a flow by the first data)
        or, opened before we started, at our first data. Incoming packets alone never make
        one: a forged source would make requests."""
        if self.draining:
            return None
        local_port, flags = key[1], pkt.flags
        if outgoing:
            if flags & _SYN:
                if flags & _ACK:
                    pid = self.owners.server_pid(local_port)
                    if pid is not None and self._make_room():
                        self.handshakes[key] = ((pkt.seq + 1) & _U32, pkt.ack, pid, _monotonic())
                    return None
                pid = self.owners.client_pid(pkt)
                if pid is None or not self._make_room():
                    return None
                return self._add(Flow(key, False, pid, (pkt.addr(key[0]), key[1]), (pkt.addr(key[2]), key[3])))
            if flags & (_RST | _FIN) or not pkt.payload_len:
                return None
            hs = self.handshakes.pop(key, None)
            if hs is not None:  # a served connection whose server speaks first
                return self._served(key, pkt, hs)
            pid = self.owners.server_pid(local_port)  # a response on a connection older than us
            if pid is None or not self._make_room():
                return None
            flow = self._served(key, pkt, ((pkt.seq & _U32), pkt.ack, pid, 0.0))
            for stream in (flow.in_stream, flow.out_stream):
                stream.resync()  # joined mid-stream: wait for a message start
            return flow
        hs = self.handshakes.get(key)
        if hs is None:
            if pkt.payload_len or flags & _RST:
                self.stats["segments_ignored"] += 1
            return None
        if flags & _RST:
            if pkt.seq == hs[1]:  # the client aborted its handshake
                del self.handshakes[key]
            else:
                self.stats["rst_ignored"] += 1
            return None
        if not pkt.payload_len and not flags & _FIN:
            return None  # the handshake's last ACK: the record waits for data
        del self.handshakes[key]
        return self._served(key, pkt, hs)

    def _served(self, key: Key, pkt: codec.Packet, hs: Handshake) -> Flow:
        """A served connection whose sequence spaces start at out_base and in_base (the
        local stack acknowledged everything before in_base)."""
        out_base, in_base, pid, _ = hs
        flow = Flow(key, True, pid, (pkt.addr(key[0]), key[1]), (pkt.addr(key[2]), key[3]))
        flow.out_base, flow.in_base, flow.in_acked, flow.verified = out_base, in_base, 0, True
        flow.in_stream = Stream(True)
        flow.out_stream = Stream(False, flow.pending_method)
        return self._add(flow)

    def _add(self, flow: Flow) -> Flow:
        if not flow.server:
            flow.out_stream = Stream(True)
            flow.in_stream = Stream(False, flow.pending_method)
        self.flows[flow.key] = flow
        self._ring.append((flow.key, flow))
        self.stats["flows"] += 1
        return flow

    def _make_room(self) -> bool:
        """Room for one more connection: evict the oldest handshake record, else the oldest
        flow without inserted bytes (those are never evicted: their packets would pass
        untranslated); False if the table holds nothing else."""
        stats = self.stats
        while len(self.flows) + len(self.handshakes) >= MAX_FLOWS:
            if self.handshakes:
                self.handshakes.popitem(last=False)
                stats["flows_evicted"] += 1
                continue
            ring, flows = self._ring, self.flows
            victim = None
            for _ in range(min(EVICT_SCAN, len(ring))):
                key, flow = ring.popleft()
                if flows.get(key) is not flow:
                    continue  # an entry of a flow already gone
                if flow.out_map or flow.held:
                    ring.append((key, flow))
                    continue
                victim = flow
                break
            if victim is None:
                stats["flows_refused"] += 1
                return False
            self._close(victim.key, victim, ended=False)
            stats["flows_evicted"] += 1
        return True

    def _record(
        self,
        flow: Flow,
        kind: SpanKind,
        ctx: TraceContext,
        parent: str,
        msg: Message,
        start: int,
        end: int,
        status: int,
        propagated: bool,
    ) -> SpanRecord:
        host = msg.header(b"host")
        if flow.tls is None:
            extra: dict[str, str | int | bool] = {}
            scheme = "http"
        else:
            # As the kernel path: a TLS turn, and whether its context went out in (client)
            # or came from (server) TCP option kind 25.
            extra = {"tls": True, "tcp_option": propagated if kind is SpanKind.SERVER else self._tcp}
            scheme = "https"
        local, peer = flow.local, flow.peer
        # Positional (keywords cost about a microsecond per span), in SpanRecord's field
        # order, which a unit test pins down; tid 0: packets carry no thread.
        return SpanRecord(
            ctx.trace_id,
            ctx.span_id,
            parent,
            kind,
            start,
            end,
            msg.method,
            msg.target,
            status,
            scheme,
            host[0].decode("latin-1") if host else "",
            local[0],
            local[1],
            peer[0],
            peer[1],
            flow.pid,
            0,
            self.owners.exe(flow.pid),
            ctx.flags,
            ctx.tracestate,
            _USERSPACE,
            propagated,
            extra,
        )

    def _emit(self, record: SpanRecord) -> None:
        self.stats["spans"] += 1
        try:
            self.sink(record)
        except Exception:  # the sink must not break the datapath
            log.exception("span sink failed")

    def _finish_server(self, flow: Flow, span: ServerSpan, status: int, now: int) -> None:
        self.linker.remove(span)
        self._emit(
            self._record(
                flow, SpanKind.SERVER, span.ctx, span.parent, span.msg, span.start_ns, now, status, span.propagated
            )
        )

    def _finish_client(self, flow: Flow, call: ClientCall, status: int, now: int) -> None:
        self._emit(
            self._record(
                flow, SpanKind.CLIENT, call.ctx, call.parent, call.msg, call.start_ns, now, status, call.propagated
            )
        )

    def _close(self, key: Key, flow: Flow, ended: bool = True) -> None:
        """End a flow: unanswered requests become spans without a status. `ended`: the
        connection itself ended (not just our interest in it), so its journal entry goes."""
        if flow.held:
            flow.undecided = None
            self._release(flow)  # as they are: nothing was inserted for that head
        if ended and flow.out_map and self.journal is not None and not flow.ended:
            self.journal.end(key)
            flow.ended = True
        self._end_tls_turn(flow)
        now = self._now()
        while flow.pending:
            item = flow.pending.popleft()
            if isinstance(item, ServerSpan):
                self._finish_server(flow, item, 0, now)
            else:
                self._finish_client(flow, item, 0, now)
        self._drop_ooo(flow)
        if self.flows.get(key) is flow:
            del self.flows[key]

    def _expired(self, flow: Flow, now: float) -> bool:
        closed = flow.closed_at and now - flow.closed_at > CLOSE_LINGER_S
        if not flow.out_map:
            return bool(closed) or now - flow.last_seen > IDLE_TIMEOUT_S
        if not closed and now - flow.last_seen <= SHIFTED_IDLE_TIMEOUT_S:
            return False
        # Inserted bytes: its packets are wrong without us for as long as the socket lives
        # (TIME_WAIT included: a retransmitted FIN gets our ACK), however it seemed to end.
        return not self._socket_alive(flow.key)

    def _socket_alive(self, key: Key) -> bool:
        exists = getattr(self.owners, "socket_exists", None)
        if exists is None:
            return False
        try:
            return bool(exists(key))
        except Exception:
            log.exception("socket lookup failed")
            return True

    def gc_step(self, now: float | None = None) -> None:
        """Expire handshake records and one slice of the flows (every flow is seen at least
        every GC_SWEEP_S), so that no packet waits for a sweep of the whole table."""
        now = _monotonic() if now is None else now
        self._last_gc = now
        hs = self.handshakes
        while hs:
            key, rec = next(iter(hs.items()))
            if now - rec[3] <= HANDSHAKE_TIMEOUT_S:
                break
            del hs[key]
        ring, flows = self._ring, self.flows
        budget = min(len(ring), max(GC_MIN_BATCH, int(len(ring) * GC_INTERVAL_S / GC_SWEEP_S) + 1))
        for _ in range(budget):
            key, flow = ring.popleft()
            if flows.get(key) is not flow:
                continue
            if self._expired(flow, now):
                self._close(key, flow)
            else:
                ring.append((key, flow))

    def gc(self) -> None:
        """Expire everything that is due, in one go (tests, and stop)."""
        now = _monotonic()
        self._last_gc = now
        for key, rec in list(self.handshakes.items()):
            if now - rec[3] > HANDSHAKE_TIMEOUT_S:
                del self.handshakes[key]
        for key, flow in list(self.flows.items()):
            if self._expired(flow, now):
                self._close(key, flow)
        self._ring = deque((k, f) for k, f in self._ring if self.flows.get(k) is f)

    def close_all(self) -> None:
        """Emit what is pending; the journal keeps connections that are still open."""
        for key, flow in list(self.flows.items()):
            self._close(key, flow, ended=bool(flow.closed_at))
        self._ring.clear()
        self.handshakes.clear()

    def shifted(self, linger: float = 0.3) -> list[Flow]:
        """Open connections carrying inserted bytes. One that closed counts for `linger`
        seconds more (its last ACK); after FINs both ways it is done (TIME_WAIT carries no
        data), after an RST only once its socket is gone too (the RST may have been one the
        stack answered with a challenge ACK)."""
        now = _monotonic()
        return [
            f
            for f in self.flows.values()
            if f.out_map
            and not (
                f.closed_at and now - f.closed_at > linger and (f.fin == _IN | _OUT or not self._socket_alive(f.key))
            )
        ]

    def shift_state(self) -> list[tuple[Key, tuple[int, list[tuple[int, bytes]]]]]:
        """(key, (out_base, insertions)) of every connection with inserted bytes (journal compaction)."""
        return [
            (f.key, (f.out_base, f.out_map.entries()))
            for f in self.flows.values()
            if f.out_map and f.out_base is not None and not f.ended
        ]

    def resume(self, key: Key, base: int, inserts: list[tuple[int, bytes]]) -> None:
        """Translate a connection a previous agent inserted into. Its HTTP framing is unknown,
        so nothing more is parsed or inserted; seq/ack/SACK translation and retransmissions
        with the identical bytes go on as before."""
        v6 = len(key[0]) == 16
        fam = socket.AF_INET6 if v6 else socket.AF_INET
        flow = Flow(key, False, 0, (socket.inet_ntop(fam, key[0]), key[1]), (socket.inet_ntop(fam, key[2]), key[3]))
        flow.out_base = base
        for pos, blob in sorted(inserts, key=lambda pb: pb[0]):
            flow.out_map.add(pos, blob)
        flow.last_seen = _monotonic()
        self.flows[key] = flow
        self._ring.append((key, flow))
        self.stats["flows_resumed"] += 1
