"""IPv4/IPv6 + TCP packet codec for the NFQUEUE hot path: parse and rebuild with struct.

`parse()` reads only what the datapath needs (addresses, ports, seq/ack, flags, where the
payload is, SACK blocks, our TCP option); `rebuild()` writes a new packet with a different
seq/ack, translated SACK blocks, bytes spliced into the payload and/or a TCP option added,
and recomputes every length and checksum it touched. Anything unexpected returns None and
the caller accepts the packet unchanged (fail open).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

IPPROTO_TCP = 6
# IPv6 extension headers we step over (hop-by-hop, routing, destination options).
_V6_EXT = (0, 43, 60)

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

# TCP option kinds.
OPT_EOL, OPT_NOP, OPT_MSS, OPT_SACK = 0, 1, 2, 5
# Trace context option (docs/architecture.md, decision 3): kind 25, len 26 = trace_id[16] span_id[8],
# len 27 adds flags[1].
OPT_TRACE = 25
OPT_TRACE_LEN = 26
OPT_TRACE_LEN_FLAGS = 27
_TRACE_KIND = bytes((OPT_TRACE,))
MAX_TCP_HEADER = 60

_U32 = 0xFFFFFFFF
# Only the fields parse() uses (pad bytes skip the rest): fewer objects per packet.
_V4 = struct.Struct("!BxHxxHxB2x4s4s")  # version/IHL, total length, frag, protocol, src, dst
_TCP = struct.Struct("!HHIIBB")  # ports, seq, ack, data offset, flags


@dataclass(slots=True)
class Packet:
    """A parsed IPv4/IPv6 TCP packet. Offsets index into `data`."""

    data: bytes
    v6: bool
    tcp_off: int  # start of the TCP header
    src: bytes  # packed address
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    tcp_hlen: int
    payload_off: int
    payload_len: int

    @property
    def payload(self) -> memoryview:
        return memoryview(self.data)[self.payload_off : self.payload_off + self.payload_len]

    @property
    def options(self) -> memoryview:
        return memoryview(self.data)[self.tcp_off + 20 : self.payload_off]

    def addr(self, which: bytes) -> str:
        return socket.inet_ntop(socket.AF_INET6 if self.v6 else socket.AF_INET, which)

    @property
    def seq_len(self) -> int:
        """Sequence space taken: payload plus one each for SYN and FIN."""
        return self.payload_len + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)


def parse(data: bytes) -> Packet | None:
    """Parse an IP packet carrying TCP; None for anything else (fragments, other protocols)."""
    if data.__class__ is not bytes:
        data = bytes(data)
    if len(data) < 20:
        return None
    version = data[0] >> 4
    if version == 4:
        ver_ihl, total, frag, proto, src, dst = _V4.unpack_from(data)
        ihl = (ver_ihl & 0x0F) * 4
        if proto != IPPROTO_TCP or ihl < 20 or frag & 0x3FFF or total > len(data):
            return None  # fragments (MF or offset) are not ours to touch
        tcp_off, end, v6 = ihl, total, False
    elif version == 6:
        if len(data) < 40:
            return None
        plen = int.from_bytes(data[4:6], "big")
        nxt = data[6]
        src, dst = data[8:24], data[24:40]
        off = 40
        while nxt in _V6_EXT:
            if off + 8 > len(data):
                return None
            nxt, hlen = data[off], (data[off + 1] + 1) * 8
            off += hlen
        if nxt != IPPROTO_TCP or 40 + plen > len(data):
            return None
        tcp_off, end, v6 = off, 40 + plen, True
    else:
        return None
    if tcp_off + 20 > end:
        return None
    sport, dport, seq, ack, doff, flags = _TCP.unpack_from(data, tcp_off)
    tcp_hlen = (doff >> 4) * 4
    if tcp_hlen < 20 or tcp_off + tcp_hlen > end:
        return None
    payload_off = tcp_off + tcp_hlen
    return Packet(data, v6, tcp_off, src, dst, sport, dport, seq, ack, flags, tcp_hlen, payload_off, end - payload_off)


def iter_options(opts: bytes | memoryview):
    """Yield (kind, offset, length) of each TCP option; stops at EOL or a malformed one."""
    i, n = 0, len(opts)
    while i < n:
        kind = opts[i]
        if kind == OPT_EOL:
            return
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            return
        length = opts[i + 1]
        if length < 2 or i + length > n:
            return
        yield kind, i, length
        i += length


def sack_blocks(pkt: Packet) -> list[tuple[int, int]]:
    opts = pkt.options
    for kind, off, length in iter_options(opts):
        if kind == OPT_SACK:
            return [struct.unpack_from("!II", opts, off + 2 + 8 * k) for k in range((length - 2) // 8)]
    return []


def find_trace_option(pkt: Packet) -> tuple[bytes, bytes, int | None] | None:
    """(trace_id, span_id, flags or None) from a kind-25 option, if the packet carries one."""
    if pkt.data.find(_TRACE_KIND, pkt.tcp_off + 20, pkt.payload_off) < 0:
        return None  # no byte 25 among the options: no kind-25 option (the usual case)
    opts = pkt.options
    for kind, off, length in iter_options(opts):
        if kind == OPT_TRACE and length in (OPT_TRACE_LEN, OPT_TRACE_LEN_FLAGS):
            body = bytes(opts[off + 2 : off + length])
            return body[:16], body[16:24], (body[24] if length == OPT_TRACE_LEN_FLAGS else None)
    return None


def trace_option(trace_id: bytes, span_id: bytes, flags: int | None) -> bytes:
    """The kind-25 option, NOP-padded to a multiple of 4 bytes (28 either way)."""
    if flags is None:
        body = bytes((OPT_TRACE, OPT_TRACE_LEN)) + trace_id + span_id
    else:
        body = bytes((OPT_TRACE, OPT_TRACE_LEN_FLAGS)) + trace_id + span_id + bytes((flags & 0xFF,))
    return bytes((OPT_NOP,)) * (-len(body) % 4) + body


def checksum_sum(data: bytes | bytearray | memoryview) -> int:
    """One's-complement sum of 16-bit big-endian words, folded (1..0xffff for nonzero data).

    The sum of words w_i * 2**(16 i) is congruent to the sum of w_i modulo 0xffff, so one
    big-int remainder (done in C) replaces a Python loop.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF
    return total or (0xFFFF if any(data) else 0)


def tcp_checksum(v6: bool, src: bytes, dst: bytes, segment: bytes | bytearray) -> int:
    """TCP checksum over the pseudo-header and `segment` (whose checksum field must be 0)."""
    if v6:
        pseudo = src + dst + struct.pack("!IxxxB", len(segment), IPPROTO_TCP)
    else:
        pseudo = src + dst + struct.pack("!xBH", IPPROTO_TCP, len(segment))
    s = (checksum_sum(pseudo) + checksum_sum(segment)) % 0xFFFF or 0xFFFF
    return 0xFFFF - s


def rebuild(
    pkt: Packet,
    seq: int | None = None,
    ack: int | None = None,
    map_sack: Callable[[int], int] | None = None,
    inserts: Sequence[tuple[int, bytes]] = (),
    add_option: bytes = b"",
) -> bytes | None:
    """A new packet: seq/ack replaced, SACK edges mapped, `inserts` = [(payload offset,
    bytes)] spliced into the payload (ascending offsets), `add_option` appended to the TCP
    options. None if the option does not fit in the 40-byte option space."""
    data = pkt.data
    opts = bytearray(data[pkt.tcp_off + 20 : pkt.payload_off])
    if map_sack is not None:
        for kind, off, length in iter_options(opts):
            if kind == OPT_SACK:
                for k in range((length - 2) // 8):
                    o = off + 2 + 8 * k
                    left, right = struct.unpack_from("!II", opts, o)
                    struct.pack_into("!II", opts, o, map_sack(left) & _U32, map_sack(right) & _U32)
    if add_option:
        # Drop trailing EOL/NOP padding first, then append and re-pad to 4.
        used = 0
        for _kind, off, length in iter_options(opts):
            used = off + length
        opts = opts[:used] + add_option
        opts += bytes(-len(opts) % 4)
        if 20 + len(opts) > MAX_TCP_HEADER:
            return None
    payload = data[pkt.payload_off : pkt.payload_off + pkt.payload_len]
    if inserts:
        parts, last = [], 0
        for off, blob in inserts:
            parts.append(payload[last:off])
            parts.append(blob)
            last = off
        parts.append(payload[last:])
        payload = b"".join(parts)
    tcp = bytearray(data[pkt.tcp_off : pkt.tcp_off + 20])
    if seq is not None:
        struct.pack_into("!I", tcp, 4, seq & _U32)
    if ack is not None:
        struct.pack_into("!I", tcp, 8, ack & _U32)
    tcp[12] = ((20 + len(opts)) // 4) << 4 | (tcp[12] & 0x0F)
    tcp[16:18] = b"\0\0"
    segment = tcp + opts + payload
    struct.pack_into("!H", segment, 16, tcp_checksum(pkt.v6, pkt.src, pkt.dst, segment))
    ip = bytearray(data[: pkt.tcp_off])
    if pkt.v6:
        struct.pack_into("!H", ip, 4, len(ip) - 40 + len(segment))
    else:
        struct.pack_into("!H", ip, 2, len(ip) + len(segment))
        ip[10:12] = b"\0\0"
        struct.pack_into("!H", ip, 10, 0xFFFF - checksum_sum(ip))
    return bytes(ip + segment)


def verify_checksums(data: bytes) -> bool:
    """True when the IPv4 header checksum (if v4) and the TCP checksum are both valid."""
    pkt = parse(data)
    if pkt is None:
        return False
    if not pkt.v6 and checksum_sum(data[: pkt.tcp_off]) != 0xFFFF:
        return False
    end = pkt.payload_off + pkt.payload_len
    segment = data[pkt.tcp_off : end]
    if pkt.v6:
        pseudo = pkt.src + pkt.dst + struct.pack("!IxxxB", len(segment), IPPROTO_TCP)
    else:
        pseudo = pkt.src + pkt.dst + struct.pack("!xBH", IPPROTO_TCP, len(segment))
    return (checksum_sum(pseudo) + checksum_sum(segment)) % 0xFFFF == 0
