"""Incremental HTTP/1.x message framing for one direction of a TCP stream.

The datapath feeds the payload of each in-order segment with its stream offset and gets
back events: a message started, its request/status line ended (where a header may be
inserted), its head is complete, it ended. Bodies (Content-Length, chunked, until close)
are skipped by counting, never buffered, so an inserted header can never land in a body.
Anything that is not HTTP/1.x (TLS, HTTP/2 prior knowledge, binary, garbage) turns the
stream `dead` and it is left alone for the rest of the connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

MAX_LINE = 8192  # request/status line
MAX_HEAD = 65536  # whole head; longer means we stop understanding the stream
MAX_CHUNK_LINE = 1024

# Registered HTTP methods (IANA HTTP Method Registry, without PRI, the HTTP/2 preface). A
# text protocol whose first line happens to end in " HTTP/1.1" ("USER bob HTTP/1.1" on an
# FTP control connection) is not HTTP. The kernel path has the same list
# (bpf/include/obi_http.h, http_method; a unit test compares them).
HTTP_METHODS = frozenset(
    "ACL BASELINE-CONTROL BIND CHECKIN CHECKOUT CONNECT COPY DELETE GET HEAD LABEL LINK LOCK MERGE MKACTIVITY "
    "MKCALENDAR MKCOL MKREDIRECTREF MKWORKSPACE MOVE OPTIONS ORDERPATCH PATCH POST PROPFIND PROPPATCH PUT QUERY "
    "REBIND REPORT SEARCH TRACE UNBIND UNCHECKOUT UNLINK UNLOCK UPDATE UPDATEREDIRECTREF VERSION-CONTROL".split()
)
_METHOD = b"|".join(m.encode() for m in sorted(HTTP_METHODS, key=lambda m: (-len(m), m)))
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"(" + _METHOD + rb") (\S+) HTTP/1\.([01])")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: .*)?")
_H2_PREFACE = b"PRI * HTTP/2.0"
# In a lowercased head whose only "content-length" is here: CRLF, name, plain digits, CRLF.
_CONTENT_LENGTH_LINE = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)[ \t]*\r\n")

# States of the parser.
IDLE, HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, TRAILER, UNTIL_CLOSE, DEAD, RESYNC = range(9)
# What a segment that starts a message begins with (RESYNC waits for one): a whole request
# line, or a status line's start; a body that merely begins with a word does not qualify.
_REQUEST_START = re.compile(rb"(?:" + _METHOD + rb") [^ \r\n]+ HTTP/1\.[01]\r\n")
_RESPONSE_START = re.compile(rb"HTTP/1\.[01] [0-9]{3}[ \r]")


@dataclass(slots=True)
class Message:
    is_request: bool
    start: int  # stream offset of the first byte
    line_end: int = -1  # stream offset just after the first line's CRLF
    # The head: bytes when it came whole in one buffer, a bytearray while it grows piecewise.
    head: bytes | bytearray = b""
    head_done: bool = False
    method: str = ""
    target: str = ""
    status: int = 0
    end: int = -1  # stream offset just after the last byte, -1 while unknown
    ctx: object = None  # whatever the flow layer attaches (span state)
    _lines: list[tuple[bytes, bytes]] | None = None  # header_lines() once the head is complete
    _index: dict[bytes, list[bytes]] | None = None  # lowercased name -> values, once complete
    _low: bytes | None = None  # the complete head, lowercased (absent names need no parsing)

    def header_lines(self) -> list[tuple[bytes, bytes]]:
        """(name, value) of every complete header line seen so far."""
        if self._lines is not None:
            return self._lines
        text = bytes(self.head)
        first = text.find(b"\r\n")
        if first < 0:
            return []
        lines = text[first + 2 :].split(b"\r\n")
        if not self.head_done:
            lines = lines[:-1]  # the last piece may be a partial line
        out = []
        index: dict[bytes, list[bytes]] = {}
        append = out.append
        for line in lines:
            if not line:
                break
            name, sep, value = line.partition(b":")
            if sep:
                name, value = name.strip(), value.strip(b" \t")
                append((name, value))
                lname = name.lower()
                if lname in index:
                    index[lname].append(value)
                else:
                    index[lname] = [value]
        if self.head_done:  # parsed once: framing, extraction, Host and span building all ask
            self._lines, self._index = out, index
        return out

    def _lowered(self) -> bytes:
        """The complete head, lowercased (computed once)."""
        low = self._low
        if low is None:
            low = self._low = bytes(self.head).lower()
        return low

    def absent(self, lname: bytes) -> bool:
        """Cheap, conservative test on a complete head: True only if no header can have
        this lowercase name (the name is not even a substring of the head)."""
        # find(), not `in`: bytes.__contains__ first tries the needle as an int and builds a
        # TypeError for every bytes needle.
        return self._lowered().find(lname) < 0

    def _lookup(self, lname: bytes) -> list[bytes] | None:
        """header(lname) of a complete head without parsing every line, when the name
        occurs at most once in the head: only the line holding it can be that header.
        None = occurs more often, parse the head."""
        low = self._lowered()
        at = low.find(lname)
        if at < 0:
            return []
        if low.find(lname, at + 1) >= 0:
            return None
        start = low.rfind(b"\r\n", 0, at)
        if start < 0:
            return []  # in the request/status line
        end = low.find(b"\r\n", at)  # a complete head ends with CRLF CRLF
        name, sep, _ = low[start + 2 : end].partition(b":")
        if sep and name.strip() == lname:
            return [bytes(self.head[start + 3 + len(name) : end]).strip(b" \t")]  # value as sent
        return []

    def header(self, name: bytes) -> list[bytes]:
        lname = name.lower()
        if not self.head_done:
            return [v for n, v in self.header_lines() if n.lower() == lname]
        if self._index is None:
            values = self._lookup(lname)
            if values is not None:
                return values
            self.header_lines()
        return self._index.get(lname, [])  # type: ignore[union-attr]  # callers only read it

    def has_header(self, name: bytes) -> bool:
        """Whether a header with this (lowercase) name is present."""
        if not self.head_done:
            return any(n.lower() == name for n, _ in self.header_lines())
        if self._index is None:
            if self.absent(name):
                return False
            self.header_lines()
        return name in self._index  # type: ignore[operator]


Event = tuple[str, Message]  # ("start" | "line" | "head" | "end", message)


def _has_fold(low: bytes) -> bool:
    """Whether a head has an obs-fold line (one starting with SP or HTAB): rare, checked cheaply."""
    return low.find(b"\r\n ") >= 0 or low.find(b"\r\n\t") >= 0


def _framing_folded(low: bytes) -> bool:
    """Whether an obs-fold line continues a Content-Length or Transfer-Encoding header (a
    lowercased head). The kernel path gives such a stream up too (obi_http.h, byte_hdrs)."""
    prev = b""
    for line in low.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            if prev in (b"content-length", b"transfer-encoding"):
                return True
            continue
        prev = line.partition(b":")[0].strip()
    return False


class Stream:
    """Framing of one direction. `request_method()` (responses only) names the method of
    the request the next response answers, for HEAD; "" if unknown."""

    def __init__(self, is_request: bool, request_method: Callable[[], str] | None = None) -> None:
        self.is_request = is_request
        self.request_method = request_method or (lambda: "")
        self.state = IDLE
        self.msg: Message | None = None
        self.remaining = 0
        self.line = bytearray()  # chunk-size / trailer line being collected
        self.dead = False
        self.why_dead = ""
        self._chunk_crlf = False  # the next CHUNK_SIZE line is the CRLF closing chunk data

    def kill(self, why: str) -> None:
        self.state, self.dead, self.why_dead = DEAD, True, why

    def resync(self) -> None:
        """Bytes of this stream were lost: forget the message in progress and pick up again
        at the next segment that starts a message. A dead stream stays dead."""
        if self.dead:
            return
        self.state, self.msg, self.remaining, self._chunk_crlf = RESYNC, None, 0, False
        self.line.clear()

    def feed(self, data: bytes | memoryview, off: int) -> list[Event]:
        """Consume `data` that starts at stream offset `off` (must be the next in-order bytes)."""
        buf = data if data.__class__ is bytes else bytes(data)
        if self.state == RESYNC:
            if not (_REQUEST_START if self.is_request else _RESPONSE_START).match(buf):
                return []
            self.state = IDLE
        if self.state == IDLE and buf:
            events = self._whole(buf, off)
            if events is not None:
                return events
        events = []
        i, n = 0, len(buf)
        while i < n:
            st = self.state
            if st == DEAD or st == UNTIL_CLOSE:
                return events
            if st == BODY or st == CHUNK_DATA:
                take = min(self.remaining, n - i)
                i += take
                self.remaining -= take
                if self.remaining == 0:
                    if st == BODY:
                        self._end(off + i, events)
                    else:
                        self.state = CHUNK_SIZE  # the CRLF after the data is read as a line
                        self.line.clear()
                        self._chunk_crlf = True
            elif st == IDLE:
                if buf[i] in (13, 10):  # stray CRLF between messages (RFC 9112 2.2)
                    i += 1
                    continue
                self.msg = msg = Message(self.is_request, off + i)
                self.state = HEAD
                events.append(("start", msg))
                i = self._head(buf, i, off, events)
            elif st == HEAD:
                i = self._head(buf, i, off, events)
            else:  # CHUNK_SIZE or TRAILER: line oriented
                j = buf.find(b"\n", i)
                if j < 0:
                    self.line += buf[i:]
                    i = n
                    if len(self.line) > MAX_CHUNK_LINE:
                        self.kill("chunk line too long")
                    continue
                self.line += buf[i:j]
                i = j + 1
                line = bytes(self.line).rstrip(b"\r")
                self.line.clear()
                if st == CHUNK_SIZE:
                    if self._chunk_crlf:
                        self._chunk_crlf = False
                        if line:
                            self.kill("missing CRLF after chunk data")
                        continue
                    size_text = line.split(b";", 1)[0].strip()
                    try:
                        size = int(size_text, 16)
                    except ValueError:
                        self.kill("bad chunk size")
                        continue
                    if size == 0:
                        self.state = TRAILER
                    else:
                        self.state, self.remaining = CHUNK_DATA, size
                elif not line:  # TRAILER ends with an empty line
                    self._end(off + i, events)
        return events

    def _whole(self, buf: bytes, off: int) -> list[Event] | None:
        """Fast path for the usual segment: it starts a message whose head it holds whole and
        whose body, if any, has a plain Content-Length and ends exactly at the end of the
        segment or in a later one. Same events, Message and state as the general loop below
        would give; None, with nothing changed, for anything else (which that loop handles)."""
        end = buf.find(b"\r\n\r\n")
        if end < 0 or buf[0] in (13, 10):
            return None
        k = buf.find(b"\r\n")  # at or before `end`
        if self.is_request:
            m = _REQUEST_LINE.fullmatch(buf, 0, k)
            if m is None:
                return None
        else:
            m = _STATUS_LINE.fullmatch(buf, 0, k)
            if m is None:
                return None
            status = int(m.group(2))
            if status < 200 or status == 204 or status == 304 or self.request_method() in ("HEAD", "CONNECT"):
                return None
        head_end = end + 4
        head = buf[:head_end]
        low = head.lower()
        if low.find(b"transfer-encoding") >= 0 or _has_fold(low):
            return None
        at = low.find(b"content-length")
        if at < 0:
            if not self.is_request:
                return None  # body until close
            size = 0
        else:
            cl = _CONTENT_LENGTH_LINE.match(low, at - 2) if at >= 2 else None
            if cl is None or low.find(b"content-length", at + 1) >= 0:
                return None
            size = int(cl.group(1))
        body = len(buf) - head_end
        if body > size:
            return None  # another message follows in this segment
        msg = Message(self.is_request, off, off + k + 2, head, True)
        msg._low = low
        if self.is_request:
            method, target = m.group(1, 2)
            msg.method, msg.target = method.decode(), target.decode("latin-1")
        else:
            msg.status = status
        events: list[Event] = [("start", msg), ("line", msg), ("head", msg)]
        if body < size:
            self.msg, self.state, self.remaining = msg, BODY, size - body
        else:
            msg.end = off + head_end + size
            events.append(("end", msg))
        return events

    def _head(self, buf: bytes, i: int, off: int, events: list[Event]) -> int:
        msg = self.msg
        assert msg is not None
        prev = len(msg.head)
        if not prev:
            # Fast path, the usual case: the whole head is in this buffer. Same outcome as
            # the incremental code below, without growing msg.head piece by piece.
            end = buf.find(b"\r\n\r\n", i)
            if end >= 0:
                k = buf.find(b"\r\n", i)  # the first CRLF is at or before the end of the head
                if not self._first_line(buf, i, k):
                    return len(buf)
                msg.line_end = msg.start + k - i + 2
                events.append(("line", msg))
                msg.head = buf[i : end + 4]  # no copy when the buffer is exactly the head
                msg.head_done = True
                events.append(("head", msg))
                self._body(msg, off + end + 4, events)
                return end + 4
        head = msg.head
        if head.__class__ is not bytearray:
            head = msg.head = bytearray(head)
        head += buf[i:]
        if msg.line_end < 0:
            k = head.find(b"\r\n", max(0, prev - 1))
            if k < 0:
                if not self._plausible_start(head) or len(head) > MAX_LINE:
                    self.kill("not HTTP/1.x")
                return len(buf)
            if not self._first_line(bytes(head[:k]), 0, k):
                return len(buf)
            msg.line_end = msg.start + k + 2
            events.append(("line", msg))
        k = head.find(b"\r\n\r\n", max(0, prev - 3))
        if k < 0:
            if len(head) > MAX_HEAD:
                self.kill("head too long")
            return len(buf)
        used = k + 4 - prev  # bytes of buf that belong to the head
        del head[k + 4 :]
        msg.head_done = True
        events.append(("head", msg))
        self._body(msg, off + i + used, events)
        return i + used

    def _plausible_start(self, head: bytearray) -> bool:
        """Fail fast on TLS/binary: a request starts with a method token, a response with 'HTTP/'."""
        if self.is_request:
            first = bytes(head[:24])
            method = first.split(b" ", 1)[0]
            return bool(_TOKEN.fullmatch(method)) and (b" " in first or len(first) < 24)
        start = bytes(head[:5])
        return b"HTTP/".startswith(start)

    def _first_line(self, buf: bytes, i: int, k: int) -> bool:
        """Parse the request/status line buf[i:k] (without slicing it out)."""
        msg = self.msg
        assert msg is not None
        if self.is_request:
            if buf.startswith(_H2_PREFACE, i, k):
                self.kill("HTTP/2 prior knowledge")
                return False
            m = _REQUEST_LINE.fullmatch(buf, i, k)
            if m is None:
                self.kill("not an HTTP/1.x request line")
                return False
            method, target = m.group(1, 2)
            msg.method, msg.target = method.decode(), target.decode("latin-1")
        else:
            m = _STATUS_LINE.fullmatch(buf, i, k)
            if m is None:
                self.kill("not an HTTP/1.x status line")
                return False
            msg.status = int(m.group(2))
        return True

    def _body(self, msg: Message, at: int, events: list[Event]) -> None:
        """Choose the body framing once the head is complete (RFC 9112 section 6)."""
        if not msg.is_request:
            if 100 <= msg.status < 200:
                if msg.status == 101:
                    self.kill("protocol switched")
                    return
                self._end(at, events)  # interim response, no body
                return
            method = self.request_method()
            if msg.status in (204, 304) or method == "HEAD":
                self._end(at, events)
                return
            if method == "CONNECT" and 200 <= msg.status < 300:
                self.kill("tunnel")
                return
        # A name that is not in the head at all (the usual GET, a response without a length)
        # needs no lookup.
        low = msg._lowered()
        if _has_fold(low) and _framing_folded(low):
            self.kill("folded framing header")  # its value cannot be read whole: don't guess
            return
        te = b",".join(msg.header(b"transfer-encoding")).lower() if low.find(b"transfer-encoding") >= 0 else b""
        if te:
            if te.rsplit(b",", 1)[-1].strip() != b"chunked":
                if msg.is_request:
                    self.kill("unframed request body")
                else:
                    self.state = UNTIL_CLOSE
                return
            self.state = CHUNK_SIZE
            self._chunk_crlf = False
            self.line.clear()
            return
        lengths = msg.header(b"content-length") if low.find(b"content-length") >= 0 else None
        if lengths:
            size_text = lengths[0].strip()
            # Repeated Content-Length headers are fine only when they all agree.
            if not size_text.isdigit() or (len(lengths) > 1 and {v.strip() for v in lengths} != {size_text}):
                self.kill("bad Content-Length")
                return
            size = int(size_text)
            if size:
                self.state, self.remaining = BODY, size
                return
            self._end(at, events)
            return
        if msg.is_request:
            self._end(at, events)
        else:
            self.state = UNTIL_CLOSE

    def _end(self, at: int, events: list[Event]) -> None:
        msg = self.msg
        assert msg is not None
        msg.end = at
        events.append(("end", msg))
        self.msg = None
        self.state = IDLE
