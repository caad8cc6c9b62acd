"""Packet codec of the userspace datapath, checked against packets scapy builds and parses."""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt

from obi.fallback import codec


def _scapy_ok(raw: bytes, v6: bool) -> bool:
    """scapy recomputes the checksums from scratch; they must equal ours."""
    pkt = IPv6(raw) if v6 else IP(raw)
    fresh = pkt.copy()
    del fresh[TCP].chksum
    if not v6:
        del fresh[IP].chksum
        del fresh[IP].len
    else:
        del fresh[IPv6].plen
    rebuilt = fresh.__class__(bytes(fresh))
    same_tcp = rebuilt[TCP].chksum == pkt[TCP].chksum
    return same_tcp and (v6 or rebuilt[IP].chksum == pkt[IP].chksum)


def _v4(payload: bytes = b"", **tcp) -> bytes:
    tcp.setdefault("flags", "PA")
    return bytes(
        IP(src="198.18.0.2", dst="198.18.0.3") / TCP(sport=40000, dport=8080, seq=1000, ack=5000, **tcp) / payload
    )


def _v6(payload: bytes = b"", **tcp) -> bytes:
    tcp.setdefault("flags", "PA")
    return bytes(
        IPv6(src="fd00:198:18:0::2", dst="fd00:198:18:0::3")
        / TCP(sport=40000, dport=8080, seq=1000, ack=5000, **tcp)
        / payload
    )


@pytest.mark.parametrize("make,v6", [(_v4, False), (_v6, True)])
def test_parse_fields(make, v6):
    pkt = codec.parse(make(b"hello", options=[("Timestamp", (1, 2))]))
    assert pkt is not None and pkt.v6 is v6
    assert (pkt.sport, pkt.dport, pkt.seq, pkt.ack) == (40000, 8080, 1000, 5000)
    assert bytes(pkt.payload) == b"hello"
    assert pkt.flags & codec.ACK and pkt.flags & codec.PSH
    assert pkt.tcp_hlen == 32


def test_parse_rejects_non_tcp_and_fragments():
    from scapy.layers.inet import UDP

    assert codec.parse(bytes(IP(dst="198.18.0.3") / UDP() / b"x")) is None
    assert codec.parse(bytes(IP(dst="198.18.0.3", flags="MF") / TCP() / b"x")) is None
    assert codec.parse(b"\x45\x00") is None
    assert codec.parse(bytes(range(60))) is None


def test_parse_ipv6_extension_header():
    raw = bytes(IPv6(src="fd00:198:18:0::2", dst="fd00:198:18:0::3") / IPv6ExtHdrDestOpt() / TCP(seq=7) / b"abc")
    pkt = codec.parse(raw)
    assert pkt is not None and pkt.seq == 7 and bytes(pkt.payload) == b"abc"


@pytest.mark.parametrize("make,v6", [(_v4, False), (_v6, True)])
def test_rebuild_insert_and_seq_keeps_checksums_valid(make, v6):
    raw = make(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", options=[("Timestamp", (1, 2))])
    pkt = codec.parse(raw)
    new = codec.rebuild(pkt, seq=123456789, inserts=[(16, b"Traceparent: x\r\n")])
    assert codec.verify_checksums(new) and _scapy_ok(new, v6)
    out = codec.parse(new)
    assert out.seq == 123456789
    assert bytes(out.payload) == b"GET / HTTP/1.1\r\nTraceparent: x\r\nHost: x\r\n\r\n"
    assert out.options.tobytes() == pkt.options.tobytes()


@pytest.mark.parametrize("make,v6", [(_v4, False), (_v6, True)])
def test_rebuild_maps_ack_and_sack(make, v6):
    raw = make(b"", flags="A", options=[("NOP", None), ("NOP", None), ("SAck", (2000, 3000, 4000, 5000))])
    pkt = codec.parse(raw)
    new = codec.rebuild(pkt, ack=4930, map_sack=lambda s: s - 70)
    assert codec.verify_checksums(new) and _scapy_ok(new, v6)
    out = codec.parse(new)
    assert out.ack == 4930
    assert codec.sack_blocks(out) == [(1930, 2930), (3930, 4930)]


def test_trace_option_roundtrip_and_space():
    tid, sid = bytes(range(16)), bytes(range(100, 108))
    raw = _v4(b"\x16\x03\x01data", options=[("Timestamp", (1, 2))])
    new = codec.rebuild(codec.parse(raw), add_option=codec.trace_option(tid, sid, 1))
    assert new is not None and codec.verify_checksums(new) and _scapy_ok(new, False)
    out = codec.parse(new)
    assert out.tcp_hlen == 60  # 12 (timestamps) + 28 + 20
    assert codec.find_trace_option(out) == (tid, sid, 1)
    assert bytes(out.payload) == b"\x16\x03\x01data"
    assert TCP in IP(new) and IP(new)[TCP].dataofs == 15
    # Without flags: length 26.
    assert codec.trace_option(tid, sid, None)[2:4] == bytes((25, 26))
    # No room left: the option is refused, never a header longer than 60 bytes.
    full = _v4(b"x", options=[("Timestamp", (1, 2)), ("NOP", None), ("NOP", None), ("SAck", (1, 2, 3, 4))])
    assert codec.rebuild(codec.parse(full), add_option=codec.trace_option(tid, sid, 1)) is None


def test_checksum_matches_reference_on_random_data():
    rng = random.Random(7)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        words = data + b"\0" * (len(data) % 2)
        total = 0
        for i in range(0, len(words), 2):
            total += words[i] << 8 | words[i + 1]
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
        assert codec.checksum_sum(data) == total
