"""What the userspace tracker keeps per connection and hands around: the flow record, the
span states of requests in flight, the verdict, the protocols of its collaborators,
the limits, and the id helpers. Shared by `flows` (the Tracker and its table),
`outgoing`, `incoming` and `tls_flows`; no logic of its own."""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Protocol

from obi import w3c
from obi.model import FLAG_RANDOM, FLAG_SAMPLED, Datapath, IdPool, TraceContext

from . import codec, tls
from .http import Message, Stream
from .seqmap import SeqMap

log = logging.getLogger("obi.fallback")

_U32 = 0xFFFFFFFF
_SYN, _ACK, _RST, _FIN = codec.SYN, codec.ACK, codec.RST, codec.FIN
_IN, _OUT = 1, 2  # directions of a flow, as bits
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
