"""TLS connections in the userspace datapath: record framing and request turns.

Encrypted streams get no header; with `tcp` propagation one segment per request carries TCP
option kind 25. Requests cannot be read, so they are counted as *turns*: a request starts
with the first application-data record (content type 23) the requesting side writes after
it has received data from the other side. Handshake flights are not requests: a flight
that starts with a handshake/change-cipher-spec/alert record is one, and so are
application-data records written in the same segment as such a record (TLS 1.3 sends its
encrypted Finished as type 23 right after a change_cipher_spec). The first type-23 record
in a *later* segment of that flight is a request (the client writes its request right
after Finished, before the server's tickets may have arrived).

Only the record headers are read (5 bytes: type, version, length); payload bytes are
skipped by counting, nothing is buffered.
"""

from __future__ import annotations

from dataclasses import dataclass

HANDSHAKE, APPLICATION_DATA = 22, 23
_CONTENT_TYPES = frozenset((20, 21, 22, 23, 24))  # ccs, alert, handshake, data, heartbeat
_MAX_RECORD = (1 << 14) + 2048  # TLSCiphertext limit


def looks_like_tls(first_byte: int) -> bool:
    """First payload byte of a connection: a handshake or application-data record."""
    return first_byte in (HANDSHAKE, APPLICATION_DATA)


class Records:
    """Record framing of one direction, fed in order; `dead` once it is not TLS."""

    __slots__ = ("hdr", "hdr_start", "remaining", "dead")

    def __init__(self) -> None:
        self.hdr = bytearray()
        self.hdr_start = 0
        self.remaining = 0
        self.dead = False

    def feed(self, data: bytes | memoryview, off: int) -> list[tuple[int, int]]:
        """(stream offset, content type) of each record header completed by `data`."""
        starts: list[tuple[int, int]] = []
        i, n = 0, len(data)
        while i < n and not self.dead:
            if self.remaining:
                take = min(self.remaining, n - i)
                i += take
                self.remaining -= take
                continue
            if not self.hdr:
                self.hdr_start = off + i
            take = min(5 - len(self.hdr), n - i)
            self.hdr += data[i : i + take]
            i += take
            if len(self.hdr) < 5:
                break
            ctype, major, length = self.hdr[0], self.hdr[1], int.from_bytes(self.hdr[3:5], "big")
            self.hdr.clear()
            if ctype not in _CONTENT_TYPES or major != 3 or length > _MAX_RECORD:
                self.dead = True
                break
            starts.append((self.hdr_start, ctype))
            self.remaining = length
        return starts


# Flight states of the requesting direction.
_NONE, _HANDSHAKE, _REQUEST = range(3)


@dataclass(slots=True)
class Turns:
    """Which record starts of the requesting direction begin a new request.

    `segment(seg_start, records)` is called with the records that begin in one segment
    (seg_start = stream offset of the segment) and returns the offset of the record that
    starts a request, or None. `answered()` is called for new data in the other direction.
    """

    state: int = _NONE
    answered: bool = False
    hs_segment: int = -1  # offset of the segment where the current handshake flight's last record began

    def segment(self, seg_start: int, records: list[tuple[int, int]]) -> int | None:
        found = None
        for off, ctype in records:
            if ctype != APPLICATION_DATA:
                if self.state != _HANDSHAKE or self.answered:
                    self.state, self.answered = _HANDSHAKE, False
                self.hs_segment = seg_start
            elif self.state == _NONE or self.answered or (self.state == _HANDSHAKE and seg_start != self.hs_segment):
                self.state, self.answered = _REQUEST, False
                if found is None:
                    found = off
        return found

    def answer(self) -> None:
        self.answered = True
