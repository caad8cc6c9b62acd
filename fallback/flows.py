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

import bisect
import logging
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from obi import w3c
from obi.config import Config
from obi.model import FLAG_RANDOM, FLAG_SAMPLED, Datapath, IdPool, SpanKind, SpanRecord, TraceContext

from . import codec, tls
from .http import Message, Stream

log = logging.getLogger("obi.fallback")

_U32 = 0xFFFFFFFF
_SYN, _ACK, _RST, _FIN = codec.SYN, codec.ACK, codec.RST, codec.FIN
_IN, _OUT = 1, 2  # directions of a flow, as bits
_monotonic = time.monotonic
_USERSPACE = Datapath.USERSPACE
HEADER_NAME = b"Traceparent"
INSERT_LEN = len(HEADER_NAME) + 2 + w3c.TRACEPARENT_LEN + 2  # "Traceparent: <55>\r\n" = 70
TCP_OPTION_ROOM = 28  # the kind-25 option, padded
REASSEMBLY_LIMIT = 256 * 1024  # out-of-order bytes kept per incoming direction for parsing
BUFFER_LIMIT = 32 << 20  # ...and for all flows together
MAX_FLOWS = 16384  # connections tracked (handshake records included)
ACK_SLACK = 1 << 20  # how far an incoming ack may lag the highest one seen (reordering)
HANDSHAKE_TIMEOUT_S = 75.0  # a handshake record unused this long goes (SYN-ACK retries last ~63 s)
HOLD_MAX_S = 0.05  # how long segments of an incomplete request head are held
HOLD_BYTES_LIMIT = 4 << 20  # bytes of held segments, all flows together
GC_INTERVAL_S = 0.25  # expiry runs this often...
GC_SWEEP_S = 60.0  # ...over a slice of the table, so that the whole table is seen this often
GC_MIN_BATCH = 256
EVICT_SCAN = 32  # at most this many flows with inserted bytes are stepped over to find one to evict
SEQMAP_COMPACT_AT = 64  # insertions kept per connection before acknowledged ones are forgotten
SEQMAP_KEEP = 16  # ...always keeping the most recent ones
IDLE_TIMEOUT_S = 300.0
# A connection with inserted bytes breaks without translation, so its state is kept for as
# long as a pooled keep-alive connection may idle (the TCP keepalive default).
SHIFTED_IDLE_TIMEOUT_S = 7200.0
CLOSE_LINGER_S = 10.0  # after both FINs: keep translating the last ACKs/retransmissions
RECENT_OPTIONS = 8  # kind-25 options remembered per flow, for retransmissions / late segments


# The packet thread's own id pool (pools are not thread-safe).
_ids = IdPool()


def new_root() -> TraceContext:
    """TraceContext.new_root() (sampled, random flag set) with pooled randomness."""
    trace, span = _ids.pair()
    return TraceContext(trace, span, FLAG_RANDOM | FLAG_SAMPLED)


def child(ctx: TraceContext) -> TraceContext:
    """ctx.child() with pooled randomness."""
    return TraceContext(ctx.trace_id, _ids.hex(8), ctx.flags, ctx.tracestate)


def inserted_headers(ctx: TraceContext, tracestate: bool) -> bytes:
    """The bytes inserted after a request line: Traceparent, and (`tracestate`) the
    tracestate passed on, as the kernel path writes them (bpf/include/obi_w3c.h)."""
    blob = HEADER_NAME + b": " + w3c.format_traceparent(ctx).encode() + b"\r\n"
    if tracestate and ctx.tracestate:
        blob += b"tracestate: " + ctx.tracestate.encode() + b"\r\n"
    return blob


def rel(seq: int, base: int) -> int:
    """Signed distance seq - base in 32-bit sequence arithmetic."""
    return ((seq - base + 0x80000000) & _U32) - 0x80000000


class SeqMap:
    """Bytes inserted into one direction, by position in orig space (relative offsets).

    Insertions the peer acknowledged can never be sent again: `compact()` forgets them,
    keeping their total (`base`, as if inserted at `base_pos`), so that a long keep-alive
    connection does not grow its map without bound."""

    __slots__ = ("pos", "blobs", "cum", "wire", "total", "base", "base_pos")

    def __init__(self) -> None:
        self.pos: list[int] = []
        self.blobs: list[bytes] = []
        self.cum: list[int] = []  # bytes inserted before insertion i
        self.wire: list[int] = []  # wire position of insertion i: pos + cum
        self.total = 0
        self.base = 0  # bytes of the insertions compact() forgot
        self.base_pos = 0  # position of the last of them

    def __bool__(self) -> bool:
        return self.total > 0

    def add(self, pos: int, blob: bytes) -> None:
        if self.pos and pos < self.pos[-1]:
            raise ValueError("insertions must be added in stream order")
        self.pos.append(pos)
        self.blobs.append(blob)
        self.cum.append(self.total)
        self.wire.append(pos + self.total)
        self.total += len(blob)

    def delta(self, r: int) -> int:
        """Bytes inserted strictly before orig offset r."""
        k = bisect.bisect_left(self.pos, r)
        return self.cum[k] if k < len(self.cum) else self.total

    def within(self, start: int, end: int) -> list[tuple[int, bytes]]:
        """Insertions carried by the segment [start, end): (offset in payload, bytes)."""
        lo = bisect.bisect_left(self.pos, start)
        hi = bisect.bisect_left(self.pos, end)
        return [(self.pos[i] - start, self.blobs[i]) for i in range(lo, hi)]

    def to_orig(self, w: int) -> int:
        """Orig offset for wire offset w; inside inserted bytes it maps to the insertion point."""
        k = bisect.bisect_right(self.wire, w) - 1
        if k < 0:
            # Before every kept insertion: at most `base` too low inside forgotten ones, which
            # were acknowledged long ago (the stack ignores acks that old).
            return w - self.base
        inside = w - self.wire[k]
        if inside < len(self.blobs[k]):
            return self.pos[k]
        return w - self.cum[k] - len(self.blobs[k])

    def compact(self, below: int) -> None:
        """Forget insertions at positions below `below` (the peer acknowledged the bytes after
        them), always keeping the SEQMAP_KEEP most recent ones."""
        k = min(bisect.bisect_left(self.pos, below), len(self.pos) - SEQMAP_KEEP)
        if k <= 0:
            return
        self.base, self.base_pos = self.cum[k], self.pos[k - 1]
        del self.pos[:k], self.blobs[:k], self.cum[:k], self.wire[:k]

    def entries(self) -> list[tuple[int, bytes]]:
        """(position, bytes) of every insertion, forgotten ones as one of their total length
        (what the journal keeps and `add` takes back)."""
        out = [(self.base_pos, bytes(self.base))] if self.base else []
        return out + list(zip(self.pos, self.blobs))


class Owners(Protocol):
    def server_pid(self, local_port: int) -> int | None:
        """pid of the selected process listening on local_port, None if not selected."""

    def client_pid(self, pkt: codec.Packet) -> int | None:
        """pid of the selected process owning the socket that sends this SYN, else None."""

    def exe(self, pid: int) -> str: ...

    def socket_exists(self, key: "Key") -> bool:
        """Whether a TCP socket with this 4-tuple still exists (TIME_WAIT included)."""


@dataclass(slots=True)
class ServerSpan:
    ctx: TraceContext  # span_id = this span's id
    parent: str
    msg: Message
    pid: int
    start_ns: int
    propagated: bool
    children: int = 0


class Linker:
    """In-flight server requests per process; picks the parent of an outgoing request.

    Packets carry no thread, so this links per process: the oldest in-flight request of
    the sending process that has no child yet, else the newest in-flight one.
    """

    def __init__(self) -> None:
        self.inflight: dict[int, OrderedDict[int, ServerSpan]] = {}

    def add(self, span: ServerSpan) -> None:
        spans = self.inflight.get(span.pid)
        if spans is None:
            spans = self.inflight[span.pid] = OrderedDict()
        spans[id(span)] = span

    def remove(self, span: ServerSpan) -> None:
        spans = self.inflight.get(span.pid)
        if spans is not None:
            spans.pop(id(span), None)
            if not spans:
                del self.inflight[span.pid]

    def parent_for(self, pid: int) -> ServerSpan | None:
        spans = self.inflight.get(pid)
        if not spans:
            return None
        for span in spans.values():
            if span.children == 0:
                return span
        return next(reversed(spans.values()))


@dataclass(slots=True)
class ClientCall:
    ctx: TraceContext
    parent: str
    msg: Message
    start_ns: int
    propagated: bool
    status: int = 0
    parent_trace: str = ""  # trace id of the server span it was linked to
    decided: bool = False  # whether to insert a header was decided (the head was complete)


@dataclass(slots=True)
class Verdict:
    payload: bytes | None = None  # new packet bytes, None = unchanged
    mark: int = 0  # packet mark to set (0 = leave)
    hold: int = 0  # nonzero: no verdict yet; it comes later from Tracker.take_released() under this token


ACCEPT = Verdict()


@dataclass(slots=True)
class Flow:
    key: "Key"
    server: bool
    pid: int
    local: tuple[str, int]
    peer: tuple[str, int]
    out_base: int | None = None  # orig seq of our first payload byte
    in_base: int | None = None
    out_next: int = 0  # next orig offset the outgoing parser expects
    in_next: int = 0
    out_map: SeqMap = field(default_factory=SeqMap)
    out_stream: Stream | None = None
    in_stream: Stream | None = None
    in_ooo: dict[int, bytes] = field(default_factory=dict)
    pending: deque = field(default_factory=deque)  # ServerSpan / ClientCall awaiting a response
    option_ctx: TraceContext | None = None  # kind-25 context seen on incoming segments
    # Client: (orig offset, option) of the segments that carry kind 25; a retransmission of
    # such a segment carries the identical option, however the stack re-segments.
    options_out: deque = field(default_factory=lambda: deque(maxlen=RECENT_OPTIONS))
    tls: "TlsFlow | None" = None
    fin: int = 0  # directions (_IN, _OUT) that sent a FIN
    last_seen: float = 0.0
    closed_at: float = 0.0  # when it seemed to end (both FINs, or an RST)
    ended: bool = False  # its journal entry was ended
    # What the local stack sent and acknowledged, to tell in-window incoming segments:
    verified: bool = False  # both sequence spaces known: incoming segments may be parsed
    out_hi: int = 0  # orig offset just past the last byte (or FIN) the local side sent
    ack_hi: int = 0  # highest wire offset an accepted incoming segment acknowledged
    in_hi: int = 0  # offset just past the last byte (or FIN) of accepted incoming segments
    in_acked: int = 0  # highest incoming offset the local side acknowledged
    # An outgoing request whose head is not complete yet, and the segments held for it
    undecided: "ClientCall | None" = None
    held: list = field(default_factory=list)  # (token, packet, r, n)
    hold_until: float = 0.0
    # Tracker.loss_epoch when this flow's previous packet in each direction was handled
    in_epoch: int = 0
    out_epoch: int = 0
    resync_gap: int = 0  # directions (_IN, _OUT) whose next gap is a lost copy, after a resync

    def pending_method(self) -> str:
        """Method of the oldest request awaiting a response (a response to HEAD has no body)."""
        return self.pending[0].msg.method if self.pending else ""


@dataclass(slots=True)
class TlsFlow:
    """A TLS connection (seen with `tcp` propagation): request turns instead of messages."""

    records: tls.Records = field(default_factory=tls.Records)  # requesting direction
    turns: tls.Turns = field(default_factory=tls.Turns)
    turn: "ServerSpan | ClientCall | None" = None  # the current request turn
    turn_at: int = 0  # stream offset (requesting direction) where it started
    answered_ns: int = 0  # last time the other side sent data in this turn
    # Server: (start, end, context) of incoming segments that carried kind 25.
    options_in: deque = field(default_factory=lambda: deque(maxlen=RECENT_OPTIONS))


Key = tuple[bytes, int, bytes, int]  # local addr, local port, peer addr, peer port


class Journal(Protocol):
    """Where insertions are recorded so they outlive the process (`shift_journal.Journal`)."""

    def insertion(self, key: Key, base: int, pos: int, blob: bytes) -> None: ...

    def end(self, key: Key) -> None: ...


Handshake = tuple[int, int, int, float]  # out_base, in_base, pid, when: a served connection's SYN-ACK


class Tracker:
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

    # --- entry point ------------------------------------------------------------------

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

    # --- outgoing ---------------------------------------------------------------------

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
            flow.closed_at = flow.closed_at or _monotonic()
            return
        flow.fin |= _OUT
        if flow.fin == _IN | _OUT and not flow.closed_at:
            flow.closed_at = _monotonic()

    def _hold(self, flow: Flow, pkt: codec.Packet, r: int, n: int) -> Verdict:
        """Keep a segment of an incomplete request head until the head is complete (or
        HOLD_MAX_S passed): whether the header goes in depends on what follows."""
        self._hold_token += 1
        token = self._hold_token
        if not flow.held:
            flow.hold_until = _monotonic() + HOLD_MAX_S
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
        now = _monotonic() if now is None else now
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

    # --- incoming ---------------------------------------------------------------------

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
                        flow.closed_at = _monotonic()
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
            flow.closed_at = _monotonic()

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

    # --- copies lost by the queue reader -------------------------------------------------

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

    # --- TLS: request turns ---------------------------------------------------------------

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

    # --- span records -------------------------------------------------------------------

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

    # --- lifetime -----------------------------------------------------------------------

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

    # --- connections with inserted bytes ----------------------------------------------------

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
