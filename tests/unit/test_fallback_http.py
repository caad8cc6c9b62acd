"""HTTP/1.x framing used by the userspace datapath: boundaries at every split point."""

from __future__ import annotations

import pytest

from obi.fallback.http import Stream

REQS = (
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    b"POST /b HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: t\r\n\r\n"
    b"PUT /c HTTP/1.0\r\nContent-Length: 21\r\n\r\nGET /inbody HTTP/1.1\n"
    b"\r\nDELETE /d HTTP/1.1\r\n\r\n"
)


def run(stream: Stream, data: bytes, step: int):
    out = []
    for i in range(0, len(data), step):
        out += [(kind, msg) for kind, msg in stream.feed(data[i : i + step], i)]
    return out


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 4096])
def test_request_boundaries_any_segmentation(step):
    events = run(Stream(True), REQS, step)
    lines = [(m.method, m.target, m.line_end) for k, m in events if k == "line"]
    assert [x[:2] for x in lines] == [("GET", "/a"), ("POST", "/b"), ("PUT", "/c"), ("DELETE", "/d")]
    # every insertion point is right after a request line in the original bytes
    for method, target, end in lines:
        assert REQS[:end].endswith(f"{method} {target} HTTP/1.{1 if method != 'PUT' else 0}\r\n".encode())
    ends = [m.end for k, m in events if k == "end"]
    assert ends[-1] == len(REQS)


def test_response_framing_head_204_1xx_and_until_close():
    methods = ["HEAD", "GET", "GET", "GET"]
    s = Stream(False, lambda: methods[0])
    data = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"  # HEAD: no body despite the length
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n"
    )
    ends = []
    for kind, msg in s.feed(data, 0):
        if kind == "end":
            ends.append(msg.status)
            if msg.status >= 200:
                methods.pop(0)
    assert ends == [200, 100, 204]
    s.feed(b"HTTP/1.0 200 OK\r\n\r\nbody until close", len(data))
    assert not s.dead and s.msg is not None and s.msg.end == -1


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x00",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/2\r\n",
        b"GET" + b"A" * 9000,
        b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    ],
)
def test_dead_on_non_http1(data):
    s = Stream(True)
    s.feed(data, 0)
    assert s.dead


# Heads where a lookup by one name must not be fooled: the name in the request line, in a
# value, inside a longer name, repeated, with spaces around it, with a bare LF.
TRICKY_HEADS = [
    b"GET /host HTTP/1.1\r\nX: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nhOsT :  a b \t\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-Host: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nReferer: http://host/\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost\r\n\r\n",
    b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length:  13 \r\nX-Content-Length: 4\r\n\r\n",
    b"HTTP/1.1 200 content-length\r\nServer: x\r\n\r\n",
    b"GET / HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: traceparent\r\n\r\n",
]
NAMES = [b"host", b"content-length", b"transfer-encoding", b"traceparent", b"x-host", b"server", b"x"]


@pytest.mark.parametrize("head", TRICKY_HEADS)
def test_header_lookup_without_full_parse_matches_the_parsed_index(head):
    """A complete head answers header()/has_header() from one line when the name occurs
    once; the answers must be those of the full parse, for every name."""
    is_request = not head.startswith(b"HTTP/")
    stream = Stream(is_request, lambda: "GET")
    msgs = [m for kind, m in stream.feed(head, 0) if kind == "head"]
    assert len(msgs) == 1 and msgs[0].head_done
    fast = msgs[0]
    expect = {}
    for name, value in fast.header_lines():  # reference: every line, parsed
        expect.setdefault(name.lower(), []).append(value)
    fresh = [m for kind, m in Stream(is_request, lambda: "GET").feed(head, 0) if kind == "head"][0]
    for name in NAMES:
        assert fresh.header(name) == expect.get(name, []), name
        assert fresh.header(name.upper()) == expect.get(name, []), name
    for name in NAMES:
        other = [m for kind, m in Stream(is_request, lambda: "GET").feed(head, 0) if kind == "head"][0]
        assert other.has_header(name) == (name in expect), name


# Segments that start a message: whole, with a body that continues, pipelined, and the
# framings the whole-segment fast path leaves to the general loop.
SEGMENTS = [
    (True, "GET", b"GET /a?b HTTP/1.1\r\nHost: h\r\nUser-Agent: wrk\r\n\r\n"),
    (True, "GET", b"POST /p HTTP/1.0\r\ncontent-length: 5\r\n\r\nhel"),
    (True, "GET", b"POST /p HTTP/1.1\r\nContent-Length:\t5 \r\n\r\nhello"),
    (True, "GET", b"POST /p HTTP/1.1\r\nContent-Length: 2\r\n\r\nokGET /q HTTP/1.1\r\n\r\n"),
    (True, "GET", b"POST /p HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"),
    (True, "GET", b"POST /p HTTP/1.1\r\nX-Content-Length: 1\r\nContent-Length: 2\r\n\r\nok"),
    (True, "GET", b"POST /p HTTP/1.1\r\nContent-Length: +2\r\n\r\nok"),
    (True, "GET", b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    (True, "GET", b"\r\nGET / HTTP/1.1\r\n\r\n"),
    (False, "GET", b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nServer: b\r\n\r\nHello, world!"),
    (False, "GET", b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nHello"),
    (False, "GET", b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
    (False, "GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 204 No Content\r\n\r\n"),
    (False, "HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n"),
    (False, "CONNECT", b"HTTP/1.1 200 OK\r\n\r\n"),
    (False, "GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
    (False, "GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"),
    (False, "GET", b"HTTP/1.1 200 OK\r\nServer: b\r\n\r\nuntil close"),
    (False, "GET", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy"),
]


@pytest.mark.parametrize("is_request, method, data", SEGMENTS)
def test_whole_segment_gives_what_byte_by_byte_parsing_gives(is_request, method, data):
    """A segment holding a whole head may take the fast path; fed one byte at a time the
    same bytes take the general loop. Events, messages and the stream's state must agree."""

    def run(step):
        s = Stream(is_request, lambda: method)
        seen = []
        for i in range(0, len(data), step):
            seen += [(kind, m) for kind, m in s.feed(data[i : i + step], 100 + i)]
        msgs = [
            (
                kind,
                m.start,
                m.line_end,
                bytes(m.head),
                m.head_done,
                m.method,
                m.target,
                m.status,
                m.end,
                m.header(b"host"),
                m.header(b"content-length"),
            )
            for kind, m in seen
        ]
        return msgs, s.state, s.dead, s.remaining, s.msg is not None

    assert run(len(data)) == run(1)
