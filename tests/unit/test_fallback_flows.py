"""Flow logic of the userspace datapath on scapy-built packets: header insertion, seq/ack/SACK
translation, identical retransmissions, spans and their parent links, leave-alone cases."""

from __future__ import annotations

import dataclasses

import pytest
from scapy.layers.inet import IP, TCP

from obi import w3c
from obi.config import Config, PortRange
from obi.fallback import codec
from obi.fallback.flows import INSERT_LEN, SeqMap, Tracker
from obi.model import SpanKind, SpanRecord
from tests.helpers.fallback_fakes import Conn, FakeOwners

B, C, A = "198.18.0.2", "198.18.0.3", "198.18.0.1"
B6, C6 = "fd00:198:18:0::2", "fd00:198:18:0::3"
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def make_tracker(props=("headers",)):
    spans = []
    cfg = Config(context_propagation=frozenset(props), open_ports=(PortRange(8080, 8080),))
    return Tracker(cfg, spans.append, FakeOwners(), mark=0x2000000), spans


def handshake_client(t, c):
    v = t.handle(c.out("S", seq=c.lseq - 1, ack=0), outgoing=True)
    assert v.mark == 0x2000000 and v.payload is None
    assert t.handle(c.inn("SA", seq=c.pseq - 1), outgoing=False).payload is None


def send(t, raw, outgoing=True):
    v = t.handle(raw, outgoing)
    new = v.payload if v.payload is not None else raw
    assert codec.verify_checksums(new) or not v.payload
    return codec.parse(new)


def test_seqmap_translation():
    m = SeqMap()
    m.add(17, b"x" * 70)
    m.add(200, b"y" * 70)
    assert [m.delta(r) for r in (0, 17, 18, 200, 201)] == [0, 0, 70, 70, 140]
    assert m.within(0, 17) == [] and m.within(17, 18) == [(0, b"x" * 70)]
    assert m.within(10, 300) == [(7, b"x" * 70), (190, b"y" * 70)]
    # wire -> orig: before, inside and after each insertion
    assert [m.to_orig(w) for w in (10, 17, 50, 87, 270, 300, 340)] == [10, 17, 17, 17, 200, 200, 200]
    assert m.to_orig(341) == 201


@pytest.mark.parametrize("v6", [False, True])
def test_client_request_gets_header_and_stream_is_translated(v6):
    t, spans = make_tracker()
    c = Conn(B6 if v6 else B, 40000, C6 if v6 else C, 8080, v6=v6)
    handshake_client(t, c)
    req1 = b"GET /one HTTP/1.1\r\nHost: c\r\n\r\n"
    p = send(t, c.out(payload=req1))
    body = bytes(p.payload)
    assert p.seq == 1000 and len(body) == len(req1) + INSERT_LEN
    line, header, rest = body.split(b"\r\n", 2)
    assert line == b"GET /one HTTP/1.1" and rest == b"Host: c\r\n\r\n"
    name, _, value = header.partition(b": ")
    assert name == b"Traceparent"
    ctx = w3c.parse_traceparent(value)
    assert ctx is not None

    # A retransmission carries the identical bytes.
    again = send(t, c.out(payload=req1))
    assert again.data == p.data

    # The peer acks wire bytes; the stack sees its own numbers (also SACK edges).
    wire_end = 1000 + len(req1) + INSERT_LEN
    ack = send(t, c.inn(flags="A", ack=wire_end), outgoing=False)
    assert ack.ack == 1000 + len(req1)
    sack = send(t, c.inn(flags="A", ack=1000 + 10, options=[("SAck", (1000 + 20, wire_end))]), outgoing=False)
    assert sack.ack == 1010 and codec.sack_blocks(sack) == [(1000 + 17 + 2, 1000 + len(req1))]

    # The response ends the client span, linked to nothing (no server request in flight).
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    send(t, c.inn(payload=resp, ack=wire_end), outgoing=False)
    assert len(spans) == 1
    span = spans[0]
    assert span.kind is SpanKind.CLIENT and span.status == 200 and span.method == "GET" and span.path == "/one"
    assert (span.trace_id, span.span_id, span.parent_span_id) == (ctx.trace_id, ctx.span_id, "")

    # Second request on the keep-alive connection: seq shifted by one insertion, gets its own header.
    req2 = b"POST /two HTTP/1.1\r\nContent-Length: 26\r\n\r\nGET /body HTTP/1.1\r\n\r\nxxxx"
    p2 = send(t, c.out(payload=req2, seq=1000 + len(req1), ack=9000 + len(resp)))
    assert p2.seq == wire_end
    b2 = bytes(p2.payload)
    assert b2.count(b"Traceparent:") == 1 and b2.endswith(b"GET /body HTTP/1.1\r\n\r\nxxxx")
    # Pure ACK / FIN from the stack: seq translated too.
    fin = send(t, c.out(flags="FA", seq=1000 + len(req1) + len(req2)))
    assert fin.seq == 1000 + len(req1) + len(req2) + 2 * INSERT_LEN


def test_request_line_at_segment_end_inserts_into_next_segment():
    t, _ = make_tracker()
    c = Conn(B, 40001, C, 8080)
    handshake_client(t, c)
    line = b"GET /split HTTP/1.1\r\n"
    p1 = send(t, c.out(payload=line))
    assert bytes(p1.payload) == line and p1.seq == 1000
    p2 = send(t, c.out(payload=b"Host: c\r\n\r\n", seq=1000 + len(line)))
    assert p2.seq == 1000 + len(line)
    assert bytes(p2.payload).startswith(b"Traceparent: 00-") and bytes(p2.payload).endswith(b"Host: c\r\n\r\n")
    # A retransmission that merges both segments carries the header at the same wire place.
    merged = send(t, c.out(payload=line + b"Host: c\r\n\r\n"))
    assert bytes(merged.payload)[len(line) :].startswith(bytes(p2.payload)[:INSERT_LEN])
    assert bytes(merged.payload) == bytes(p1.payload) + bytes(p2.payload)


def test_existing_valid_header_is_adopted_and_invalid_or_duplicate_left_alone():
    t, spans = make_tracker()
    c = Conn(B, 40002, C, 8080)
    handshake_client(t, c)
    req = f"GET / HTTP/1.1\r\ntraceparent: {TP}\r\n\r\n".encode()
    assert t.handle(c.out(payload=req), True).payload is None
    seq = 1000 + len(req)
    bad = b"GET / HTTP/1.1\r\ntraceparent: 00-zz\r\n\r\n"
    assert t.handle(c.out(payload=bad, seq=seq), True).payload is None
    seq += len(bad)
    dup = f"GET / HTTP/1.1\r\ntraceparent: {TP}\r\nTraceparent: {TP}\r\n\r\n".encode()
    assert t.handle(c.out(payload=dup, seq=seq), True).payload is None
    resp = b"HTTP/1.1 204 No Content\r\n\r\n"
    for i in range(3):
        t.handle(c.inn(payload=resp, seq=9000 + i * len(resp)), False)
    assert len(spans) == 3
    assert (spans[0].trace_id, spans[0].span_id) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    assert spans[0].propagated and spans[0].status == 204
    assert t.stats["headers_inserted"] == 0 and t.stats["headers_present"] == 1 and t.stats["headers_invalid"] == 2


def test_chunked_body_and_pipelining_never_get_a_header_inside_a_body():
    t, _ = make_tracker()
    c = Conn(B, 40003, C, 8080)
    handshake_client(t, c)
    chunked = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n14\r\nGET /x HTTP/1.1\r\n\r\n\r\n0\r\n\r\n"
    pipelined = chunked + b"GET /p HTTP/1.1\r\n\r\n"
    p = send(t, c.out(payload=pipelined))
    out = bytes(p.payload)
    assert out.count(b"Traceparent: ") == 2
    assert b"14\r\nGET /x HTTP/1.1\r\n\r\n\r\n0\r\n\r\nGET /p HTTP/1.1\r\nTraceparent: " in out
    assert out.startswith(b"POST /c HTTP/1.1\r\nTraceparent: ")


@pytest.mark.parametrize(
    "payload",
    [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40),  # TLS ClientHello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # h2c prior knowledge
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
    ],
)
def test_non_http1_is_left_alone(payload):
    t, spans = make_tracker()
    c = Conn(B, 40004, C, 8080)
    handshake_client(t, c)
    assert t.handle(c.out(payload=payload), True).payload is None
    assert t.handle(c.out(payload=b"GET / HTTP/1.1\r\n\r\n", seq=1000 + len(payload)), True).payload is None
    assert spans == [] and t.stats["headers_inserted"] == 0


def test_server_span_parent_and_linked_client_call():
    t, spans = make_tracker()
    s = Conn(B, 8080, A, 50000)
    assert t.handle(s.inn("S", seq=8999, ack=0), False).payload is None
    assert t.handle(s.out("SA", seq=999, ack=9000), True).payload is None  # the local stack answers
    req = f"GET /work HTTP/1.1\r\nHost: b\r\nTRACEPARENT: {TP}\r\ntracestate: k=v\r\n\r\n".encode()
    assert t.handle(s.inn(payload=req, seq=9000), False).payload is None
    c = Conn(B, 40005, C, 8080)
    handshake_client(t, c)
    p = send(t, c.out(payload=b"GET /headers HTTP/1.1\r\n\r\n"))
    inserted = w3c.parse_traceparent(bytes(p.payload).split(b"\r\n")[1].split(b": ")[1])
    t.handle(c.inn(payload=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), False)
    # The response on the server connection ends the server span.
    assert t.handle(s.out(payload=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", seq=1000), True).payload is None
    client, server = spans
    assert server.kind is SpanKind.SERVER and client.kind is SpanKind.CLIENT
    assert server.trace_id == "0af7651916cd43dd8448eb211c80319c" and server.parent_span_id == "b7ad6b7169203331"
    assert server.tracestate == "k=v" and server.path == "/work" and server.host == "b" and server.status == 200
    assert client.trace_id == server.trace_id and client.parent_span_id == server.span_id
    assert inserted.trace_id == server.trace_id and inserted.span_id == client.span_id
    assert (server.peer_addr, server.peer_port, server.local_port) == (A, 50000, 8080)


@pytest.mark.parametrize(
    "props, track, continued",
    [
        (("headers",), False, True),
        ((), False, False),  # propagation off: the incoming header is not read...
        ((), True, True),  # ...unless track_request_headers (as in OBI and the kernel path)
        (("tcp",), True, True),
    ],
)
def test_incoming_header_read_with_headers_propagation_or_track_request_headers(props, track, continued):
    spans = []
    cfg = Config(context_propagation=frozenset(props), track_request_headers=track, open_ports=(PortRange(8080, 8080),))
    t = Tracker(cfg, spans.append, FakeOwners(), mark=0x2000000)
    s = Conn(B, 8080, A, 50002)
    t.handle(s.inn("S", seq=8999, ack=0), False)
    t.handle(s.out("SA", seq=999, ack=9000), True)
    t.handle(s.inn(payload=f"GET / HTTP/1.1\r\ntraceparent: {TP}\r\n\r\n".encode(), seq=9000), False)
    t.handle(s.out(payload=b"HTTP/1.1 204 No Content\r\n\r\n", seq=1000), True)
    (span,) = spans
    assert (span.trace_id == "0af7651916cd43dd8448eb211c80319c") is continued
    assert (span.parent_span_id == "b7ad6b7169203331") is continued


def test_server_request_without_header_starts_a_trace_and_incoming_gaps_are_reassembled():
    t, spans = make_tracker()
    s = Conn(B, 8080, A, 50001)
    t.handle(s.inn("S", seq=8999, ack=0), False)
    t.handle(s.out("SA", seq=999, ack=9000), True)
    req = b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    # second half arrives first (reordering)
    t.handle(s.inn(payload=req[20:], seq=9000 + 20), False)
    t.handle(s.inn(payload=req[:20], seq=9000), False)
    t.handle(s.out(payload=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", seq=1000), True)
    (span,) = spans
    assert span.parent_span_id == "" and span.method == "POST" and span.status == 200 and not span.propagated


def test_tcp_option_on_request_segment_and_read_on_server():
    t, _ = make_tracker(("headers", "tcp"))
    c = Conn(B, 40006, C, 8080)
    handshake_client(t, c)
    p = send(t, c.out(payload=b"GET / HTTP/1.1\r\n\r\n", options=[("Timestamp", (1, 2))]))
    opt = codec.find_trace_option(p)
    tp = w3c.parse_traceparent(bytes(p.payload).split(b"\r\n")[1].split(b": ")[1])
    assert opt == (bytes.fromhex(tp.trace_id), bytes.fromhex(tp.span_id), tp.flags)
    # only one segment per request carries it
    p2 = send(t, c.out(flags="A", seq=1000 + 18, options=[("Timestamp", (1, 2))]))
    assert codec.find_trace_option(p2) is None

    # Receiving side: an option and no header links the server span.
    t2, spans = make_tracker(("tcp",))
    s = Conn(C, 8080, B, 40006)
    t2.handle(s.inn("S", seq=8999, ack=0), False)
    t2.handle(s.out("SA", seq=999, ack=9000), True)
    raw = bytes(
        IP(src=B, dst=C) / TCP(sport=40006, dport=8080, flags="PA", seq=9000, ack=1000) / b"GET / HTTP/1.1\r\n\r\n"
    )
    tagged = codec.rebuild(codec.parse(raw), add_option=codec.trace_option(opt[0], opt[1], 1))
    t2.handle(tagged, False)
    t2.handle(s.out(payload=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), True)
    (span,) = spans
    assert span.trace_id == tp.trace_id and span.parent_span_id == tp.span_id
    # ... and ignored when tcp propagation is off.
    t3, spans3 = make_tracker(("headers",))
    t3.handle(s.inn("S", seq=8999, ack=0), False)
    t3.handle(s.out("SA", seq=999, ack=9000), True)
    t3.handle(tagged, False)
    t3.handle(s.out(payload=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), True)
    assert spans3[0].trace_id != tp.trace_id


def test_rst_ends_flow_and_random_payloads_never_raise(monkeypatch):
    import random

    from obi.fallback import flows

    t, spans = make_tracker(props=("tcp",))  # no header: nothing to translate after the RST
    c = Conn(B, 40007, C, 8080)
    handshake_client(t, c)
    send(t, c.out(payload=b"GET / HTTP/1.1\r\n\r\n"))
    t.handle(c.inn(flags="R"), False)
    assert not t.flows and len(spans) == 1 and spans[0].status == 0
    # With a header inserted, the flow keeps translating until its socket is gone (here: no
    # socket lookup, so once the RST is CLOSE_LINGER_S old).
    t, spans = make_tracker()
    handshake_client(t, c)
    send(t, c.out(payload=b"GET / HTTP/1.1\r\n\r\n"))
    t.handle(c.inn(flags="R"), False)
    assert t.flows
    later = flows._monotonic() + flows.CLOSE_LINGER_S + 1
    monkeypatch.setattr(flows, "_monotonic", lambda: later)
    t.gc()
    assert not t.flows and len(spans) == 1 and spans[0].status == 0
    rng = random.Random(1)
    for i in range(300):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
        t.handle(junk, bool(i % 2))  # not even IP
        c2 = Conn(B, 41000 + i, C, 8080)
        handshake_client(t, c2)
        assert t.handle(c2.out(payload=junk or b"\x00"), True).payload is None


def test_span_times_come_from_the_packet_receive_time_when_given():
    t, spans = make_tracker()
    t.now = lambda: 999  # the handling time: must not be used when ts_ns is given
    s = Conn(B, 8080, A, 50003)
    t.handle(s.inn("S", seq=8999, ack=0), False, ts_ns=100)
    t.handle(s.out("SA", seq=999, ack=9000), True, ts_ns=100)
    t.handle(s.inn(payload=b"GET /a HTTP/1.1\r\n", seq=9000), False, ts_ns=111)
    t.handle(s.inn(payload=b"Host: b\r\n\r\n", seq=9017), False, ts_ns=115)
    c = Conn(B, 40008, C, 8080)
    t.handle(c.out("S", seq=999, ack=0), True, ts_ns=120)
    t.handle(c.inn("SA", seq=8999), False, ts_ns=121)
    t.handle(c.out(payload=b"GET /c HTTP/1.1\r\n\r\n"), True, ts_ns=130)
    t.handle(c.inn(payload=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"), False, ts_ns=140)
    t.handle(c.inn(payload=b"ok", seq=9000 + 38), False, ts_ns=150)
    t.handle(s.out(payload=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", seq=1000), True, ts_ns=222)
    client, server = spans
    assert (server.start_ns, server.end_ns) == (111, 222)  # request start -> response end
    assert (client.start_ns, client.end_ns) == (130, 150) and client.parent_span_id == server.span_id
    # Without ts_ns (and between packets: a flow closed by close_all), now() is used.
    t.handle(s.inn(payload=b"GET /b HTTP/1.1\r\n\r\n", seq=9028), False)
    t.now = lambda: 1234
    t.close_all()
    assert (spans[2].start_ns, spans[2].end_ns) == (999, 1234) and spans[2].path == "/b"


def test_span_record_field_order_the_tracker_builds_positionally():
    assert [f.name for f in dataclasses.fields(SpanRecord)] == [
        "trace_id",
        "span_id",
        "parent_span_id",
        "kind",
        "start_ns",
        "end_ns",
        "method",
        "path",
        "status",
        "scheme",
        "host",
        "local_addr",
        "local_port",
        "peer_addr",
        "peer_port",
        "pid",
        "tid",
        "exe",
        "flags",
        "tracestate",
        "datapath",
        "propagated",
        "extra",
    ]


def test_pooled_ids_skip_all_zero_ids(monkeypatch):
    import os

    from obi.fallback import flow_state, flows
    from obi.model import IdPool, TraceContext

    chunk = b"\x05" * 8 + bytes(16) + b"\x01" * 16 + bytes(8) + b"\x02" * 8 + b"\x03" * 4040  # 4096 bytes
    monkeypatch.setattr(os, "urandom", lambda n: chunk[:n])
    monkeypatch.setattr(flow_state, "_ids", IdPool())  # the pool new_root() and child() draw from
    assert flows.child(TraceContext("ab" * 16, "cd" * 8)).span_id == "05" * 8
    root = flows.new_root()
    # The zero trace id (bytes 8-24) and the zero span id (40-48) are skipped.
    assert (root.trace_id, root.span_id) == ("01" * 16, "02" * 8)
    assert flows.new_root().trace_id == "03" * 16 and flows.child(root).span_id == "03" * 8


class Served:
    """A keep-alive connection served on B:8080: numbered requests and responses, any of
    which can be 'lost' (its copy never reaches the tracker, as when the queue reader drops
    it), with the tracker told of the loss before the next packet it gets."""

    def __init__(self, t):
        self.t, self.c = t, Conn(B, 8080, A, 50000, lseq=1000, pseq=9000)
        self.cseq, self.sseq, self.lost = 9000, 1000, 0
        t.handle(self.c.inn("S", seq=8999, ack=0), False)
        t.handle(self.c.out("SA", seq=999, ack=9000), True)

    def _deliver(self, raw, outgoing):
        if self.lost:
            self.t.copies_lost(self.lost)
            self.lost = 0
        self.t.handle(raw, outgoing)

    def request(self, i, lost=False):
        req = f"GET /{i} HTTP/1.1\r\nHost: b\r\n\r\n".encode()
        raw = self.c.inn(payload=req, seq=self.cseq, ack=self.sseq)
        self.cseq += len(req)
        if lost:
            self.lost += 1
        else:
            self._deliver(raw, False)

    def response(self, status, lost=False, body=b"ok"):
        resp = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        raw = self.c.out(payload=resp, seq=self.sseq, ack=self.cseq)
        self.sseq += len(resp)
        if lost:
            self.lost += 1
        else:
            self._deliver(raw, True)


def test_a_lost_request_copy_resyncs_the_served_connection_at_the_next_request():
    t, spans = make_tracker()
    s = Served(t)
    s.request(1), s.response(201)
    s.request(2, lost=True), s.response(202)  # the response answers nothing the tracker saw
    s.request(3), s.response(203)  # incoming gap: picked up again at this request
    s.request(4), s.response(204)
    assert [(x.path, x.status) for x in spans] == [("/1", 201), ("/3", 203), ("/4", 204)]
    assert t.stats["resyncs"] == 1 and t.stats["copies_lost"] == 1 and t.stats["spans_lost"] == 0


def test_a_lost_response_copy_never_pairs_a_later_response_with_the_wrong_request():
    t, spans = make_tracker()
    s = Served(t)
    s.request(1), s.response(201)
    s.request(2), s.response(202, lost=True)
    s.request(3), s.response(203)  # outgoing gap: /2 and /3 can no longer be paired
    s.request(4), s.response(204)
    assert [(x.path, x.status) for x in spans] == [("/1", 201), ("/4", 204)]
    assert t.stats["resyncs"] == 1 and t.stats["spans_lost"] == 2


def test_after_a_loss_the_stream_waits_for_a_segment_that_starts_a_message():
    t, spans = make_tracker()
    s = Served(t)
    s.request(1), s.response(201)
    # A request with a body: its head is lost, its body segment (not a message start)
    # arrives, then the response to it, then the next request is parsed again.
    head = b"POST /up HTTP/1.1\r\nHost: b\r\nContent-Length: 10\r\n\r\n"
    s.cseq += len(head)
    s.lost += 1
    s._deliver(s.c.inn(payload=b"GET x body", seq=s.cseq, ack=s.sseq), False)  # looks like a start, is not at one
    s.cseq += 10
    s.response(202)
    s.request(3), s.response(203)
    paths = [(x.path, x.status) for x in spans]
    assert paths[0] == ("/1", 201) and paths[-1] == ("/3", 203)
    assert ("/up", 202) not in paths


def test_a_gap_without_a_reported_loss_is_not_taken_as_one():
    t, spans = make_tracker()
    s = Served(t)
    s.request(1), s.response(201)
    s.sseq += 100  # outgoing bytes the tracker never saw, with no loss reported
    s.request(2), s.response(202)
    s.request(3), s.response(203)
    assert [(x.path, x.status) for x in spans] == [("/1", 201)]  # framing lost: no guessing
    assert t.stats["resyncs"] == 0
