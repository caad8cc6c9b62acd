"""TLS connections in the userspace datapath: kind-25 option on the first segment of each
request turn (client), parent link from it (server), payload never changed, handshake
flights are not requests, and the 40-byte option space is respected."""

from __future__ import annotations

import os

from scapy.layers.inet import IP, TCP

from obi.config import Config, PortRange
from obi.fallback import codec
from obi.fallback.flows import Tracker
from obi.fallback.tls import Records, Turns

B, C = "198.18.0.2", "198.18.0.3"
PORT = 8443


class Owners:
    def server_pid(self, port):
        return 42 if port == PORT else None

    def client_pid(self, pkt):
        return 42

    def exe(self, pid):
        return "/usr/bin/python3"


def make_tracker(props):
    spans = []
    cfg = Config(context_propagation=frozenset(props), open_ports=(PortRange(PORT, PORT),))
    return Tracker(cfg, spans.append, Owners(), mark=0x2000000), spans


class Conn:
    """Packets of one TCP connection seen from `local`."""

    def __init__(self, local, lport, peer, pport):
        self.l, self.lp, self.p, self.pp = local, lport, peer, pport

    def out(self, flags="PA", payload=b"", seq=0, ack=0, **kw):
        return bytes(
            IP(src=self.l, dst=self.p)
            / TCP(sport=self.lp, dport=self.pp, flags=flags, seq=seq, ack=ack, **kw)
            / payload
        )


def rec(ctype: int, n: int) -> bytes:
    return bytes((ctype, 3, 3)) + n.to_bytes(2, "big") + os.urandom(n)


def test_record_framing_across_segments_and_garbage():
    r = Records()
    data = rec(22, 300) + rec(20, 1) + rec(23, 5000)
    starts = []
    for i in range(0, len(data), 7):  # header bytes split everywhere
        starts += r.feed(data[i : i + 7], i)
    assert starts == [(0, 22), (305, 20), (311, 23)] and not r.dead
    r.feed(b"GET / HTTP/1.1\r\n", len(data))
    assert r.dead


def test_turns_skip_handshake_flights():
    t = Turns()
    assert t.segment(0, [(0, 22)]) is None  # ClientHello
    t.answer()  # ServerHello ... Finished
    assert t.segment(300, [(300, 20), (306, 23)]) is None  # CCS + encrypted Finished (TLS 1.3)
    assert t.segment(400, [(400, 23)]) == 400  # the request, written right after Finished
    assert t.segment(500, [(500, 23)]) is None  # more of the same request
    t.answer()
    assert t.segment(600, [(600, 23)]) == 600  # next request on the connection


class Wire:
    """Client tracker (B) and server tracker (C) joined: what B sends is what C receives."""

    def __init__(self, props=("tcp",)):
        self.b, self.b_spans = make_tracker(props)
        self.c, self.c_spans = make_tracker(props)
        self.cb = Conn(B, 40100, C, PORT)  # B's view
        self.cc = Conn(C, PORT, B, 40100)  # C's view
        self.b_off = self.c_off = 0
        syn = self.cb.out("S", seq=999, ack=0)
        self.c.handle(self._through(self.b, syn, True), False)
        self.b.handle(self._through(self.c, self.cc.out("SA", seq=8999, ack=1000), True), False)

    @staticmethod
    def _through(t, raw, outgoing):
        v = t.handle(raw, outgoing)
        return v.payload if v.payload is not None else raw

    def request(self, payload: bytes, seq_off: int | None = None, **kw) -> codec.Packet:
        off = self.b_off if seq_off is None else seq_off
        wire = self._through(self.b, self.cb.out(payload=payload, seq=1000 + off, ack=9000 + self.c_off, **kw), True)
        self.c.handle(wire, False)
        if seq_off is None:
            self.b_off += len(payload)
        return codec.parse(wire)

    def answer(self, payload: bytes) -> None:
        wire = self._through(self.c, self.cc.out(payload=payload, seq=9000 + self.c_off, ack=1000 + self.b_off), True)
        self.b.handle(wire, False)
        self.c_off += len(payload)

    def close(self) -> None:
        for t in (self.b, self.c):
            t.close_all()


def test_tls_turns_carry_kind25_and_link_server_spans():
    w = Wire()
    hello = rec(22, 200)
    p = w.request(hello)
    assert codec.find_trace_option(p) is None and bytes(p.payload) == hello
    w.answer(rec(22, 90) + rec(20, 1) + rec(23, 900))  # ServerHello, CCS, encrypted flight
    assert codec.find_trace_option(w.request(rec(20, 1) + rec(23, 53))) is None  # CCS + Finished
    sent = []
    for i in range(3):
        req = rec(23, 120 + i)
        p = w.request(req, options=[("NOP", None), ("NOP", None), ("Timestamp", (i + 1, 7))])
        opt = codec.find_trace_option(p)
        assert opt is not None and bytes(p.payload) == req and codec.verify_checksums(p.data)
        # kind 25 is written as the kernel's helper does: len 27 (root contexts carry flags 0x03).
        assert b"\x19\x1b" + opt[0] + opt[1] + bytes((opt[2],)) in p.data
        sent.append(opt)
        # The same segment retransmitted carries the identical option; the next one none.
        again = w.request(req, seq_off=w.b_off - len(req), options=[("Timestamp", (9, 7))])
        assert codec.find_trace_option(again) == opt
        assert codec.find_trace_option(w.request(rec(23, 10))) is None
        w.answer(rec(23, 400))
    w.close()
    clients = [s for s in w.b_spans if s.kind.value == "CLIENT"]
    servers = [s for s in w.c_spans if s.kind.value == "SERVER"]
    assert len(clients) == len(servers) == 3  # the handshake flights made no spans
    for (tid, sid, _), client, server in zip(sent, clients, servers):
        assert (client.trace_id, client.span_id) == (tid.hex(), sid.hex())
        assert server.trace_id == client.trace_id and server.parent_span_id == client.span_id
        assert client.method == server.method == "" and client.scheme == server.scheme == "https"
        assert server.propagated and server.end_ns >= server.start_ns
    assert w.b.stats["headers_inserted"] == 0 and w.b.stats["tls_turns"] == 3


def test_tls_option_dropped_when_options_are_full():
    w = Wire()
    w.request(rec(22, 200))
    w.answer(rec(22, 90))
    req = rec(23, 100)
    # timestamps (12 with padding) + 3 SACK blocks (28): kind 25 (28 more) does not fit in 40.
    sack = ("SAck", (5000, 5100, 5200, 5300, 5400, 5500))
    p = w.request(
        req, options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2)), ("NOP", None), ("NOP", None), sack]
    )
    assert codec.find_trace_option(p) is None and bytes(p.payload) == req
    assert w.b.stats["tcp_option_no_room"] == 1 and w.b.stats["tcp_options_written"] == 0


def test_tls_untouched_without_tcp_propagation():
    w = Wire(props=("headers",))
    w.request(rec(22, 200))
    w.answer(rec(22, 90))
    p = w.request(rec(23, 100))
    assert codec.find_trace_option(p) is None
    w.close()
    assert w.b_spans == [] and w.c_spans == [] and w.b.stats["tls_flows"] == 0
