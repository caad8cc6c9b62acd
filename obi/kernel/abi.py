"""The one Python mirror of bpf/include/obi_abi.h (structs that cross from BPF to here).

Layouts are `struct` formats with explicit padding ('=' : native byte order, no implicit
alignment), so they match the C structs field by field. tests/unit/test_kernel_abi.py
checks every size and offset below against the BTF of the built objects.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

TP_LEN = 55
TP_HDR_LEN = 70  # "Traceparent: " + 55 + CRLF
LINE_MAX = 96
TP_MAX = 56
TRACESTATE_MAX = 512
HOST_MAX = 128

TCPOPT_KIND = 25
TCPOPT_LEN_SAMPLED = 26
TCPOPT_LEN_FLAGS = 27

# obi_cfg_flags
CFG_HDR_INSERT = 1 << 0
CFG_TCP = 1 << 1
CFG_HDR_READ = 1 << 2

AF_INET = 2
AF_INET6 = 10
_ZERO8 = bytes(8)


class EventKind(enum.IntEnum):
    SERVER_REQ = 1
    SERVER_RESP = 2
    CLIENT_REQ = 3
    CLIENT_RESP = 4
    SERVER_SPAN = 5
    CLIENT_SPAN = 6


# obi_event.flags
EVF_INJECTED = 1 << 0
EVF_TP_VALID = 1 << 1
EVF_HDRS_PARTIAL = 1 << 2
EVF_THREAD_LINKED = 1 << 3
EVF_TCPOPT = 1 << 4
EVF_INJECT_FAILED = 1 << 5
EVF_TLS = 1 << 6


class Counter(enum.IntEnum):
    """enum obi_counter; names become stats() keys."""

    EVENTS_LOST = 0
    HEADERS_INSERTED = 1
    INSERT_FAILED = 2
    CLIENT_REQS = 3
    SERVER_REQS = 4
    APP_TRACEPARENT = 5
    PARSE_LOST = 6
    SEQ_GAPS = 7
    TCPOPT_WRITTEN = 8
    TCPOPT_READ = 9
    THREAD_LINKS = 10
    SCRATCH_BUSY = 11
    UNSEEN_SENDS = 12
    SOCKS_RELEASED = 13
    TRACESTATE_INSERTED = 14
    TS_STATES_FULL = 15


COUNTER_MAX = 16

# struct obi_tuple: local_addr[16] peer_addr[16] local_port peer_port family _pad0
TUPLE_FMT = "=16s16sHHHH"
TUPLE_SIZE = struct.calcsize(TUPLE_FMT)  # 40

# struct obi_event, field by field (name, format); offsets are checked against BTF.
EVENT_FIELDS: tuple[tuple[str, str], ...] = (
    ("kind", "I"),
    ("flags", "I"),
    ("ts_ns", "Q"),
    ("end_ns", "Q"),
    ("pid_tgid", "Q"),
    ("tuple", f"{TUPLE_SIZE}s"),
    ("trace_id", "16s"),
    ("span_id", "8s"),
    ("parent_id", "8s"),
    ("trace_flags", "B"),
    ("tp_count", "B"),
    ("status", "H"),
    ("line_len", "H"),
    ("tracestate_len", "H"),
    ("line", f"{LINE_MAX}s"),
    ("tp", f"{TP_MAX}s"),
    ("tp_len", "H"),
    ("host_len", "H"),
    ("_pad1", "I"),
    ("tracestate", f"{TRACESTATE_MAX}s"),
    ("host", f"{HOST_MAX}s"),
)
EVENT_FMT = "=" + "".join(f for _, f in EVENT_FIELDS)
EVENT_SIZE = struct.calcsize(EVENT_FMT)  # 912
EVENT = struct.Struct(EVENT_FMT)  # precompiled: decoding is on the agent's hot path
_TUPLE = struct.Struct(TUPLE_FMT)
_TUPLE_CACHE: dict[bytes, "Tuple"] = {}  # raw tuple -> Tuple (ipaddress formatting is slow)
_TUPLE_CACHE_MAX = 65536


def field_offsets(fields: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """Offset of each field in a '='-packed layout (what the BTF must agree with)."""
    out, off = {}, 0
    for name, fmt in fields:
        out[name] = off
        off += struct.calcsize("=" + fmt)
    return out


@dataclass(frozen=True, slots=True)
class Tuple:
    """struct obi_tuple: a connection seen from the instrumented host."""

    local_addr: str
    peer_addr: str
    local_port: int
    peer_port: int
    family: int

    @classmethod
    def unpack(cls, raw: bytes) -> "Tuple":
        t = _TUPLE_CACHE.get(raw)
        if t is None:
            la, pa, lp, pp, fam, _ = _TUPLE.unpack(raw)
            t = cls(_addr(la, fam), _addr(pa, fam), lp, pp, fam)
            if len(_TUPLE_CACHE) >= _TUPLE_CACHE_MAX:
                _TUPLE_CACHE.clear()
            _TUPLE_CACHE[raw] = t
        return t

    def pack(self) -> bytes:
        return _TUPLE.pack(
            _addr_bytes(self.local_addr), _addr_bytes(self.peer_addr), self.local_port, self.peer_port, self.family, 0
        )


def _addr(raw: bytes, family: int) -> str:
    if family == AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def _addr_bytes(addr: str) -> bytes:
    ip = ipaddress.ip_address(addr)
    return ip.packed.ljust(16, b"\0")


@dataclass(slots=True)  # not frozen: a frozen __init__ costs a setattr call per field (hot path)
class Event:
    """struct obi_event, decoded."""

    kind: int  # an EventKind value
    flags: int
    ts_ns: int
    end_ns: int
    pid_tgid: int
    tuple: Tuple
    trace_id: str  # hex
    span_id: str
    parent_id: str  # "" when all zero
    trace_flags: int
    tp_count: int
    status: int
    line: bytes
    tp: bytes  # first traceparent value as received (significant bytes only)
    tracestate: bytes
    host: str  # first Host header value of the request ("" if none)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> "Event":
        (
            kind,
            flags,
            ts_ns,
            end_ns,
            pid_tgid,
            tup,
            trace_id,
            span_id,
            parent_id,
            trace_flags,
            tp_count,
            status,
            line_len,
            ts_len,
            line,
            tp,
            tp_len,
            host_len,
            _,
            tracestate,
            host,
        ) = EVENT.unpack_from(raw)
        # Positional, no enum lookup, no min(): BPF bounds the lengths and a slice past the
        # end is safe anyway (this runs once per span).
        return cls(
            kind,
            flags,
            ts_ns,
            end_ns,
            pid_tgid,
            Tuple.unpack(tup),
            trace_id.hex(),
            span_id.hex(),
            "" if parent_id == _ZERO8 else parent_id.hex(),
            trace_flags,
            tp_count,
            status,
            line[:line_len],
            tp[:tp_len],
            tracestate[:ts_len],
            host[:host_len].decode("latin-1"),
        )

    @property
    def pid(self) -> int:
        return self.pid_tgid >> 32

    @property
    def tid(self) -> int:
        return self.pid_tgid & 0xFFFFFFFF
