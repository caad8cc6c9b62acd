"""Bytes inserted into one direction of a TCP stream, by position: the map that translates
sequence numbers between what the local stack sent ("orig") and what the peer sees ("wire").
See `flows` for the spaces and `outgoing` for its use."""

from __future__ import annotations

import bisect

SEQMAP_KEEP = 16  # compact() always keeps the most recent insertions


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
