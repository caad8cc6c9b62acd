"""The one data model both datapaths produce and the exporter consumes.

`TraceContext` is a parsed/generated W3C trace context (see `obi.w3c` for the codec).
`SpanRecord` is a finished HTTP span as seen on the wire, independent of how it was seen.
"""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import dataclass, field

# W3C trace-flags bits (Trace Context Level 1 `sampled`, Level 2 `random`).
FLAG_SAMPLED = 0x01
FLAG_RANDOM = 0x02


class IdPool:
    """Random trace/span ids from os.urandom (the kernel's CSPRNG), read 4 KiB at a time and
    kept as hex text: one syscall per ~170 root contexts instead of two per request, and no
    hex() per id. Never all-zero. Not thread-safe: one pool per thread (the functions below
    keep one per thread; the userspace datapath's packet thread has its own)."""

    __slots__ = ("text", "at")
    CHUNK = 4096

    def __init__(self) -> None:
        self.text = ""
        self.at = 0

    def hex(self, n: int) -> str:
        """n random bytes as 2n hex digits, not all zero."""
        width = 2 * n
        while True:
            at = self.at
            if at + width > len(self.text):
                self.text, at = os.urandom(self.CHUNK).hex(), 0
            self.at = at + width
            value = self.text[at : at + width]
            if value.strip("0"):
                return value

    def pair(self) -> tuple[str, str]:
        """hex(16), hex(8): the same ids from the same bytes, in one step when both fit."""
        at = self.at
        if at + 48 <= len(self.text):
            text = self.text
            trace, span = text[at : at + 32], text[at + 32 : at + 48]
            if trace.strip("0") and span.strip("0"):
                self.at = at + 48
                return trace, span
        return self.hex(16), self.hex(8)


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.pool = IdPool()


_pools = _PerThread()


def new_trace_id() -> str:
    """A random, never all-zero, 128-bit trace id as 32 lowercase hex chars (CSPRNG)."""
    return _pools.pool.hex(16)


def new_span_id() -> str:
    """A random, never all-zero, 64-bit span id as 16 lowercase hex chars (CSPRNG)."""
    return _pools.pool.hex(8)


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One W3C trace context: the position of a span in a trace.

    `span_id` is the id of the span this context points at (the `parent-id` field of a
    traceparent header). `tracestate` is carried verbatim (already validated by the codec).
    """

    trace_id: str
    span_id: str
    flags: int = FLAG_SAMPLED
    tracestate: str = ""

    @property
    def sampled(self) -> bool:
        return bool(self.flags & FLAG_SAMPLED)

    @property
    def random(self) -> bool:
        return bool(self.flags & FLAG_RANDOM)

    @classmethod
    def new_root(cls, sampled: bool = True) -> "TraceContext":
        """A fresh trace; ids are random so the Level 2 `random` flag is set."""
        flags = FLAG_RANDOM | (FLAG_SAMPLED if sampled else 0)
        trace_id, span_id = _pools.pool.pair()
        return cls(trace_id, span_id, flags)

    def child(self) -> "TraceContext":
        """Same trace, new span id, same flags and tracestate."""
        return TraceContext(self.trace_id, new_span_id(), self.flags, self.tracestate)


class SpanKind(enum.Enum):
    SERVER = "SERVER"
    CLIENT = "CLIENT"


class Datapath(enum.Enum):
    KERNEL = "kernel"
    USERSPACE = "userspace"


@dataclass(slots=True)
class SpanRecord:
    """A finished HTTP/1.x span, produced by a datapath, consumed by `obi.export`.

    Server spans: `local_*` is the service's listening address, `peer_*` the client.
    Client spans: `local_*` is the service's ephemeral address, `peer_*` the server.
    Times are Unix epoch nanoseconds. `parent_span_id` is "" for a root span.
    """

    trace_id: str
    span_id: str
    parent_span_id: str
    kind: SpanKind
    start_ns: int
    end_ns: int
    method: str
    path: str  # request target as sent (path + optional query)
    status: int = 0  # HTTP status code; 0 when no response was seen
    scheme: str = "http"
    host: str = ""  # Host header value, if seen
    local_addr: str = ""
    local_port: int = 0
    peer_addr: str = ""
    peer_port: int = 0
    pid: int = 0
    tid: int = 0
    exe: str = ""  # executable path of the instrumented process, if known
    flags: int = FLAG_SAMPLED
    tracestate: str = ""
    datapath: Datapath = Datapath.KERNEL
    # True when the trace context came over the wire (header or TCP option) rather than
    # being generated; kept for diagnostics only.
    propagated: bool = False
    extra: dict[str, str | int | bool] = field(default_factory=dict)

    @property
    def is_root(self) -> bool:
        return self.parent_span_id == ""

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)
