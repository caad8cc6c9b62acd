"""The userspace tracker against hostile and unlucky input (issue 12, findings 1, 3, 4, 6):
RSTs and FINs that must not end the translation of a connection with inserted bytes,
floods that must not grow the flow table without bound, spoofed segments that must not
become requests (nor parents of outgoing calls), and an application's own traceparent in
a later segment of the head than the request line."""

from __future__ import annotations

import random
import struct
import time

import pytest
from scapy.layers.inet import IP, TCP

from obi import w3c
from obi.config import Config, PortRange
from obi.fallback import codec, flows
from obi.fallback.flows import INSERT_LEN, Tracker
from tests.helpers.fallback_fakes import Conn

B, C, A = "198.18.0.2", "198.18.0.3", "198.18.0.1"

FOREIGN_TRACE, FOREIGN_SPAN = "f0" * 16, "e1" * 8
FOREIGN = f"00-{FOREIGN_TRACE}-{FOREIGN_SPAN}-01"


class Owners:
    """pid 42 listens on 8080 and owns every client socket; `gone` lists the 4-tuples
    whose socket no longer exists (as sock_diag would tell)."""

    def __init__(self):
        self.gone: set = set()

    def server_pid(self, port):
        return 42 if port == 8080 else None

    def client_pid(self, pkt):
        return 42

    def exe(self, pid):
        return "/usr/bin/python3"

    def socket_exists(self, key):
        return key not in self.gone


def handshake_client(t, c):
    v = t.handle(c.out("S", seq=c.lseq - 1, ack=0), outgoing=True)
    assert v.mark == 0x2000000 and v.payload is None
    assert t.handle(c.inn("SA", seq=c.pseq - 1), outgoing=False).payload is None


def send(t, raw, outgoing=True):
    v = t.handle(raw, outgoing)
    new = v.payload if v.payload is not None else raw
    assert codec.verify_checksums(new) or not v.payload
    return codec.parse(new)


def tracker(props=("headers",)):
    spans = []
    cfg = Config(context_propagation=frozenset(props), open_ports=(PortRange(8080, 8080),))
    owners = Owners()
    t = Tracker(cfg, spans.append, owners, mark=0x2000000, shift_mark=0x4000000)
    return t, spans, owners


@pytest.fixture
def clock(monkeypatch):
    """The tracker's monotonic clock, moved by hand."""
    now = [1000.0]
    monkeypatch.setattr(flows, "_monotonic", lambda: now[0])
    monkeypatch.setattr(flows.time, "monotonic", lambda: now[0])
    return now


def shifted_client(t, port=40100):
    """A client connection B:port -> C:8080 that got one inserted header; returns (conn, seq
    of the next request in the local stack's numbering)."""
    c = Conn(B, port, C, 8080)
    handshake_client(t, c)
    req = b"GET /one HTTP/1.1\r\nHost: c\r\n\r\n"
    p = send(t, c.out(payload=req))
    assert len(p.payload) == len(req) + INSERT_LEN
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    send(t, c.inn(payload=resp, ack=1000 + len(req) + INSERT_LEN), outgoing=False)
    c.pseq += len(resp)
    return c, 1000 + len(req)


def still_translated(t, c, seq):
    """The next request leaves with its sequence number shifted by the inserted header, and
    the peer's ACK of it comes back unshifted: the translation state is intact."""
    req = b"GET /two HTTP/1.1\r\nHost: c\r\n\r\n"
    v = t.handle(c.out(payload=req, seq=seq), True)
    if v.payload is None:
        return False
    p = codec.parse(v.payload)
    ack = t.handle(c.inn(flags="A", seq=c.pseq, ack=p.seq + len(p.payload)), False)
    return p.seq == seq + INSERT_LEN and ack.payload is not None and codec.parse(ack.payload).ack == seq + len(req)


# --- finding 1: RST and FIN ------------------------------------------------------------


@pytest.mark.parametrize("where", ["random", "ahead_in_window", "behind"])
def test_an_rst_the_kernel_would_not_act_on_keeps_the_translation(clock, where):
    """With nf_conntrack_tcp_be_liberal=1 an inexact RST reaches the agent, while the local
    stack ignores it (or answers with a challenge ACK): the connection goes on, so must its
    translation."""
    t, _, _ = tracker()
    c, seq = shifted_client(t)
    rst_seq = {"random": (c.pseq + 0x12345678) & 0xFFFFFFFF, "ahead_in_window": c.pseq + 1000, "behind": c.pseq - 5000}[
        where
    ]
    t.handle(c.inn(flags="R", seq=rst_seq, ack=0), False)
    clock[0] += 3600
    t.gc()
    assert still_translated(t, c, seq)
    assert t.stats["rst_ignored"] == 1


def test_an_exact_rst_on_a_live_socket_keeps_the_translation_until_the_socket_is_gone(clock):
    """Even an acceptable RST is only believed once the socket is gone: a spoofed one that
    hits the window exactly (or one the stack answered with a challenge ACK) must not cost
    the connection its translation."""
    t, _, owners = tracker()
    c, seq = shifted_client(t)
    t.handle(c.inn(flags="R", seq=c.pseq, ack=0), False)
    clock[0] += 60
    t.gc()
    assert still_translated(t, c, seq)
    owners.gone.add((codec.parse(c.out()).src, 40100, codec.parse(c.out()).dst, 8080))
    clock[0] += 60
    t.gc()
    assert not t.flows


def test_a_retransmitted_fin_on_a_half_closed_connection_keeps_the_translation(clock):
    """The local side half-closes (FIN, retransmitted twice) while the peer still sends: the
    flow must not count that as both directions closing."""
    t, _, _ = tracker()
    c, seq = shifted_client(t)
    for _ in range(3):
        t.handle(c.out(flags="FA", seq=seq), True)
    clock[0] += 3600
    t.gc()
    # The peer's data still comes, acking the FIN: ack translated back.
    v = t.handle(c.inn(flags="PA", payload=b"more", ack=seq + INSERT_LEN + 1), False)
    assert v.payload is not None and codec.parse(v.payload).ack == seq + 1


def test_after_both_fins_the_flow_goes_only_once_the_socket_is_gone(clock):
    t, _, owners = tracker()
    c, seq = shifted_client(t)
    t.handle(c.out(flags="FA", seq=seq), True)
    t.handle(c.inn(flags="FA", seq=c.pseq, ack=seq + INSERT_LEN + 1), False)
    clock[0] += 120
    t.gc()
    assert t.flows  # TIME_WAIT: the peer may retransmit its FIN, our ACK needs translating
    owners.gone.add(next(iter(t.flows)))
    clock[0] += 120
    t.gc()
    assert not t.flows


# --- finding 3: bounded memory -----------------------------------------------------------


def _template(flags, src, sport, dst, dport, seq=0, ack=0):
    return bytearray(bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)))


def _stamp(pkt: bytearray, sport=None, dport=None, seq=None, ack=None, src=None, dst=None):
    if src is not None:
        pkt[12:16] = src
    if dst is not None:
        pkt[16:20] = dst
    if sport is not None:
        struct.pack_into("!H", pkt, 20, sport)
    if dport is not None:
        struct.pack_into("!H", pkt, 22, dport)
    if seq is not None:
        struct.pack_into("!I", pkt, 24, seq)
    if ack is not None:
        struct.pack_into("!I", pkt, 28, ack)
    return bytes(pkt)


def test_a_syn_flood_does_not_grow_the_flow_table_without_bound():
    """100,000 SYNs from spoofed sources to the watched port, each answered by the local
    stack's SYN-ACK (what the agent would see of them): at most MAX_FLOWS flow records are
    kept, the oldest handshakes are evicted and counted, and a real connection opened
    during the flood is still traced."""
    t, spans, _ = tracker()
    rng = random.Random(3)
    syn = _template("S", A, 1, B, 8080)
    synack = _template("SA", B, 8080, A, 1)
    for i in range(100_000):
        src = struct.pack("!I", 0xC6120000 | rng.randrange(1 << 16))
        port, isn = 1024 + i % 60000, rng.randrange(1 << 32)
        t.handle(_stamp(syn, src=src, sport=port, seq=isn), False)
        t.handle(_stamp(synack, dst=src, dport=port, seq=rng.randrange(1 << 32), ack=isn + 1), True)
    limit = getattr(flows, "MAX_FLOWS", 16384)
    assert len(t.flows) + len(getattr(t, "handshakes", ())) <= limit
    assert t.stats["flows_evicted"] >= 100_000 - limit
    s = Conn(B, 8080, A, 50000)
    t.handle(s.inn("S", seq=8999, ack=0), False)
    t.handle(s.out("SA", seq=999, ack=9000), True)
    t.handle(s.inn(payload=b"GET /real HTTP/1.1\r\n\r\n", seq=9000, ack=1000), False)
    t.handle(s.out(payload=b"HTTP/1.1 204 No Content\r\n\r\n", seq=1000, ack=9022), True)
    assert [x.path for x in spans] == ["/real"]


def test_flows_with_inserted_bytes_are_never_evicted(monkeypatch):
    monkeypatch.setattr(flows, "MAX_FLOWS", 50, raising=False)
    t, _, _ = tracker()
    kept = [shifted_client(t, port=41000 + i) for i in range(10)]
    for i in range(500):  # many other connections
        c = Conn(B, 20000 + i, C, 8080)
        handshake_client(t, c)
    assert len(t.flows) <= 50 and t.stats["flows_evicted"] > 0
    for c, seq in kept:
        assert still_translated(t, c, seq)


def test_gc_is_incremental(clock):
    """Many idle flows expire without any one packet paying for all of them (a full sweep of
    100,000 flows took 0.15-0.3 s while sync packets waited)."""
    t, _, _ = tracker()
    synack = _template("SA", B, 8080, A, 1, seq=999, ack=9000)
    req = bytearray(
        bytes(IP(src=A, dst=B) / TCP(sport=1, dport=8080, flags="PA", seq=9000, ack=1000) / b"GET / HTTP/1.1\r\n")
    )
    for i in range(100_000):
        peer = struct.pack("!I", 0xC6120100 + i // 60000 * 256 + i % 250)
        port = 1024 + i % 60000
        t.handle(_stamp(synack, dst=peer, dport=port), True)
        t.handle(_stamp(req, src=peer, sport=port), False)
    c = Conn(B, 40000, C, 8080)
    handshake_client(t, c)  # a tracked connection: its packets are the ones that would wait
    ack = c.inn(flags="A")
    n = len(t.flows) + len(getattr(t, "handshakes", ()))
    clock[0] += flows.IDLE_TIMEOUT_S + 1
    worst = 0.0
    for i in range(2000):
        t0 = time.perf_counter()
        t.handle(ack, False)
        worst = max(worst, time.perf_counter() - t0)
        clock[0] += 0.5
    assert worst < 0.02, f"one packet waited {worst * 1000:.0f} ms for gc"
    assert n > 1000 and len(t.flows) + len(getattr(t, "handshakes", ())) < n / 10  # yet they did expire


def test_out_of_order_bytes_kept_for_parsing_are_bounded_in_all():
    """Each served connection may keep REASSEMBLY_LIMIT bytes ahead of a hole; all of them
    together at most BUFFER_LIMIT (beyond it, a connection stops being parsed, not traced)."""
    t, _, _ = tracker()
    synack = _template("SA", B, 8080, A, 1, seq=999, ack=9000)
    req = bytearray(
        bytes(IP(src=A, dst=B) / TCP(sport=1, dport=8080, flags="PA", seq=9000, ack=1000) / b"GET / HTTP/1.1\r\n")
    )
    seg = bytearray(bytes(IP(src=A, dst=B) / TCP(sport=1, dport=8080, flags="PA", seq=0, ack=1000) / (b"x" * 4096)))
    for i in range(400):
        port = 30000 + i
        t.handle(_stamp(synack, dport=port), True)
        t.handle(_stamp(req, sport=port), False)
        for k in range(1, 30):  # a hole at 9016, then 29 segments of 4 KiB after it
            t.handle(_stamp(seg, sport=port, seq=9016 + 100 + k * 4096), False)
    held = sum(sum(map(len, f.in_ooo.values())) for f in t.flows.values())
    assert held <= getattr(flows, "BUFFER_LIMIT", 32 << 20)
    assert t.buffered == held and t.stats["buffer_full"] > 0


# --- finding 4: spoofed segments -----------------------------------------------------------


def _outgoing_call_parent(t):
    """pid 42 makes an outgoing call; the parent span id its header carries."""
    c = Conn(B, 42000 + len(t.flows), C, 8080)
    handshake_client(t, c)
    p = send(t, c.out(payload=b"GET /down HTTP/1.1\r\n\r\n"))
    value = bytes(p.payload).split(b"\r\n")[1].split(b": ")[1]
    return w3c.parse_traceparent(value)


def test_a_spoofed_segment_on_an_unknown_connection_is_not_a_request():
    """One data segment from a forged source, never answered by the local stack: it must
    not become an in-flight request (the per-process linker would make it the parent of
    the next outgoing call)."""
    t, spans, _ = tracker()
    spoof = Conn(B, 8080, "198.18.7.7", 4444)
    t.handle(
        spoof.inn(payload=f"GET /x HTTP/1.1\r\ntraceparent: {FOREIGN}\r\n\r\n".encode(), seq=123456, ack=654321), False
    )
    ctx = _outgoing_call_parent(t)
    assert ctx.trace_id != FOREIGN_TRACE
    t.close_all()
    assert all(s.trace_id != FOREIGN_TRACE and s.parent_span_id != FOREIGN_SPAN for s in spans)
    assert t.stats["segments_ignored"] >= 1


@pytest.mark.parametrize("lost", [False, True])
def test_spoofed_segments_out_of_window_on_a_live_connection_are_not_requests(lost):
    """A forged segment with the 4-tuple of a live served connection but guessed sequence
    and acknowledgment numbers, also right after the reader lost copies (when a gap is
    otherwise taken as loss and the stream picked up again at the next message start)."""
    t, spans, _ = tracker()
    s = Conn(B, 8080, A, 50000)
    t.handle(s.out("SA", seq=999, ack=9000), True)
    req = b"GET /real HTTP/1.1\r\n\r\n"
    t.handle(s.inn(payload=req, seq=9000, ack=1000), False)
    t.handle(s.out(payload=b"HTTP/1.1 204 No Content\r\n\r\n", seq=1000, ack=9000 + len(req)), True)
    if lost:
        t.copies_lost(3)
    rng = random.Random(7)
    evil = f"GET /evil HTTP/1.1\r\ntraceparent: {FOREIGN}\r\n\r\n".encode()
    for _ in range(2000):
        t.handle(s.inn(payload=evil, seq=rng.randrange(1 << 32), ack=rng.randrange(1 << 32)), False)
    ctx = _outgoing_call_parent(t)
    assert ctx.trace_id != FOREIGN_TRACE
    t.close_all()
    assert [x.path for x in spans if x.kind.name == "SERVER"] == ["/real"]
    assert all(x.trace_id != FOREIGN_TRACE for x in spans)
    assert t.stats["segments_ignored"] >= 1999


def test_the_real_next_request_after_a_loss_is_still_picked_up():
    t, spans, _ = tracker()
    s = Conn(B, 8080, A, 50000)
    t.handle(s.out("SA", seq=999, ack=9000), True)
    r1, r2, r3 = (f"GET /{i} HTTP/1.1\r\n\r\n".encode() for i in (1, 2, 3))
    t.handle(s.inn(payload=r1, seq=9000, ack=1000), False)
    t.handle(s.out(payload=b"HTTP/1.1 204 A\r\n\r\n", seq=1000, ack=9000 + len(r1)), True)
    t.copies_lost(1)  # r2's copy lost; its response seen, acking it
    t.handle(s.out(payload=b"HTTP/1.1 204 B\r\n\r\n", seq=1018, ack=9000 + len(r1) + len(r2)), True)
    t.handle(s.inn(payload=r3, seq=9000 + len(r1) + len(r2), ack=1036), False)
    t.handle(s.out(payload=b"HTTP/1.1 204 C\r\n\r\n", seq=1036, ack=9000 + len(r1) + len(r2) + len(r3)), True)
    assert [x.path for x in spans] == ["/1", "/3"]


# --- finding 6: the application's own traceparent in a later segment ------------------------


def _released(t):
    return t.take_released() if hasattr(t, "take_released") else []


def _wire_requests(t, c, segments):
    """Send the segments of one request head as the queue loop would (held segments get
    their verdicts later, in order); return the bytes the peer receives."""
    results, decided, seq = [], {}, c.lseq
    for seg in segments:
        raw = c.out(payload=seg, seq=seq)
        v = t.handle(raw, True)
        decided.update(_released(t))
        results.append((getattr(v, "hold", 0) or v, raw))
        seq += len(seg)
    if hasattr(t, "tick"):
        t.tick(float("inf"))  # anything still held waits no longer
    decided.update(_released(t))
    out = b""
    for v, raw in results:
        v = decided[v] if isinstance(v, int) else v
        new = v.payload if v.payload is not None else raw
        assert codec.verify_checksums(new)
        out += bytes(codec.parse(new).payload)
    return out


@pytest.mark.parametrize(
    "segments",
    [
        [b"GET /a HTTP/1.1\r\nHost: c\r\n", f"traceparent: {FOREIGN}\r\n\r\n".encode()],
        [b"GET /a HTTP/1.1\r\n", b"Host: c\r\n", f"Traceparent: {FOREIGN}\r\nAccept: */*\r\n\r\n".encode()],
        [b"GET /a HTTP/1.1\r\nHost: c\r\ntrace", f"parent: {FOREIGN}\r\n\r\n".encode()],
    ],
)
def test_the_apps_own_traceparent_in_a_later_segment_is_the_only_one(segments):
    t, spans, _ = tracker()
    c = Conn(B, 40200, C, 8080)
    handshake_client(t, c)
    wire = _wire_requests(t, c, segments)
    assert wire == b"".join(segments)  # nothing inserted: the app propagates itself
    assert wire.lower().count(b"traceparent:") == 1
    assert t.stats["headers_inserted"] == 0 and t.stats["headers_present"] == 1


@pytest.mark.parametrize(
    "segments",
    [
        [b"GET /a HTTP/1.1\r\nHost: c\r\n", b"Accept: */*\r\n\r\n"],
        [b"GET /a HTTP/1.1\r\n", b"Host: c\r\n\r\n"],
        [b"GET /a HTTP/1.1\r\nHost: c\r\n\r", b"\n"],  # the final CRLF split
        [b"GET /a HTTP/1.1\r", b"\n\r\n"],
        [b"GET /a HTTP/1.1\r\nHost: c\r\n\r\n"],
    ],
)
def test_without_the_apps_own_exactly_one_is_inserted_in_the_head(segments):
    t, spans, _ = tracker()
    c = Conn(B, 40201, C, 8080)
    handshake_client(t, c)
    wire = _wire_requests(t, c, segments)
    assert wire.lower().count(b"traceparent:") == 1 and len(wire) == len(b"".join(segments)) + INSERT_LEN
    head = wire.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /a HTTP/1.1" and any(line.startswith(b"Traceparent: 00-") for line in lines[1:])
    assert wire.endswith(b"\r\n\r\n")
    # A retransmission of the whole head (re-segmented) carries the identical bytes.
    again = send(t, c.out(payload=b"".join(segments), seq=c.lseq))
    assert bytes(again.payload) == wire


def test_a_long_keep_alive_connection_does_not_grow_its_insertion_map():
    """Each request on a keep-alive connection adds an insertion; those the peer acknowledged
    are forgotten (kept as their total), so 2,000 requests leave at most SEQMAP_COMPACT_AT
    entries, and the translation of the next request, its ACK and a resumed tracker (from
    what the journal would hold) are still exact."""
    t, _, _ = tracker()
    c = Conn(B, 40300, C, 8080)
    handshake_client(t, c)
    req = b"GET /k HTTP/1.1\r\nHost: c\r\n\r\n"
    resp = b"HTTP/1.1 204 No Content\r\n\r\n"
    seq = c.lseq
    for i in range(2000):
        p = send(t, c.out(payload=req, seq=seq))
        assert p.seq == seq + i * INSERT_LEN and len(p.payload) == len(req) + INSERT_LEN
        seq += len(req)
        back = send(t, c.inn(payload=resp, seq=c.pseq, ack=seq + (i + 1) * INSERT_LEN), outgoing=False)
        assert back.ack == seq
        c.pseq += len(resp)
    (flow,) = t.flows.values()
    assert len(flow.out_map.pos) <= getattr(flows, "SEQMAP_COMPACT_AT", 64) and flow.out_map.total == 2000 * INSERT_LEN
    # A resumed tracker, from the state the journal keeps, translates the same.
    ((key, (base, inserts)),) = t.shift_state()
    t2, _, _ = tracker()
    t2.resume(key, base, inserts)
    raw = c.out(payload=req, seq=seq)
    assert codec.parse(t2.handle(raw, True).payload).seq == seq + 2000 * INSERT_LEN
    ack = c.inn(flags="A", seq=c.pseq, ack=seq + 2000 * INSERT_LEN)
    assert codec.parse(t2.handle(ack, False).payload).ack == seq
