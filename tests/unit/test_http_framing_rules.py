"""Framing rules both datapaths share (no root): registered methods only, framing headers
that cannot be read whole give the stream up. The userspace parser is checked here; the
kernel parser's copy of the method list is compared with it (its behaviour on the wire is
in tests/parity/test_parity.py)."""

from __future__ import annotations

import os
import re

import pytest

from obi.fallback.http import HTTP_METHODS, Stream

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _packed(method: str) -> int:
    v = 0
    for c in method.encode()[-8:]:
        v = (v << 8) | c
    return v


def test_kernel_method_table_is_the_same_list():
    src = open(os.path.join(REPO, "bpf", "include", "obi_http.h")).read()
    body = src[src.index("static __always_inline int http_method(") :]
    body = body[: body.index("\n}\n")]
    table: dict[int, set[int]] = {}
    for case in re.split(r"\bcase ", body)[1:]:
        n = int(case.split(":", 1)[0])
        table[n] = {int(h, 16) for h in re.findall(r"m == 0x([0-9a-f]+)ULL", case)}
    want: dict[int, set[int]] = {}
    for m in HTTP_METHODS:
        want.setdefault(len(m), set()).add(_packed(m))
    assert table == want


@pytest.mark.parametrize(
    "line", [b"USER bob HTTP/1.1\r\n", b"NOTAMETHOD / HTTP/1.1\r\n", b"PRI * HTTP/1.1\r\n", b"get / HTTP/1.1\r\n"]
)
def test_unregistered_method_is_not_http(line):
    s = Stream(True)
    events = s.feed(line + b"Host: x\r\n\r\n", 0)
    assert s.dead and not [m for k, m in events if k == "line"]


@pytest.mark.parametrize("method", sorted(HTTP_METHODS))
def test_every_registered_method_is_http(method):
    s = Stream(True)
    events = s.feed(f"{method} /x HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 0)
    assert not s.dead and [m.method for k, m in events if k == "line"] == [method]


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length:\r\n 21\r\n",  # the value on an obs-fold line
        b"Content-Length: 2\r\n 1\r\n",  # the value continued on one
        b"Transfer-Encoding:\r\n chunked\r\n",
        b"Content-Length: 2 1\r\n",  # digits after OWS
        b"Content-Length: \r\n",  # no value
    ],
)
@pytest.mark.parametrize("step", [1, 4096])
def test_framing_header_that_cannot_be_read_whole_gives_up(head, step):
    data = b"POST /a HTTP/1.1\r\nHost: x\r\n" + head + b"\r\nGET /inbody HTTP/1.1\r\n\r\n"
    s = Stream(True)
    lines = []
    for i in range(0, len(data), step):
        lines += [m.target for k, m in s.feed(data[i : i + step], i) if k == "line"]
    assert s.dead and "/inbody" not in lines


def test_a_fold_elsewhere_does_not_kill():
    data = b"GET /a HTTP/1.1\r\nX-Long: one\r\n two\r\nContent-Length: 0\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
    s = Stream(True)
    assert [m.target for k, m in s.feed(data, 0) if k == "line"] == ["/a", "/b"] and not s.dead
