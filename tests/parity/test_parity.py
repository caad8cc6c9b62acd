"""Parity suite: the same traffic through the kernel and the userspace datapath.

Every scenario runs on both datapaths (the `env` fixture is parametrized) and asserts the
behaviour the issues require, on real things: the bytes C's socket received (the recorder
sends them back), SHA-256 of echoed bodies, and the spans each `obi run` agent printed.
`test_same_results_on_both_datapaths` then compares the two datapaths with each other:
header name/position/length, span names, kinds, attributes and parent structure.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import sys
import time

import pytest

from obi.w3c import parse_traceparent  # noqa: E402
from tests.helpers.parity_harness import PORT, RAW_PORT, Env, traceparents, well_formed  # noqa: E402

pytestmark = pytest.mark.root

TP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TP_SPAN = "00f067aa0ba902b7"
UPSTREAM = f"00-{TP_TRACE}-{TP_SPAN}-01"
HEADER_LEN = 70  # b"Traceparent: 00-<32>-<16>-<2>\r\n"


def _path(span: dict) -> str:
    return span["attributes"].get("url.path", "")


# -- A -> B -> C ------------------------------------------------------------------------


def run_flow(env: Env, upstream: str | None) -> dict:
    """One request A -> B -> C; returns what C received and the three spans of the request.

    Spans are found from the wire: B's CLIENT span is the one whose id C received as
    parent-id, C's SERVER span the one whose parent is that id."""
    agent_b, agent_c = env.agents["b"], env.agents["c"]
    mark_b, mark_c = agent_b.mark(), agent_c.mark()
    path = f"/work/{secrets.token_hex(4)}"
    answer = env.a_get(path, {"traceparent": upstream} if upstream else {})
    c_headers = answer["downstream"]["body"]["headers"]
    tps = traceparents(c_headers)
    assert len(tps) == 1, f"C received {len(tps)} traceparent headers, want 1: {c_headers}"
    got = parse_traceparent(tps[0][2])
    assert got is not None, f"C received an invalid traceparent {tps[0][2]!r}"

    b_server = agent_b.wait(lambda s: s["kind"] == "SERVER" and _path(s) == path, since=mark_b)
    b_client = agent_b.wait(lambda s: s["kind"] == "CLIENT" and s["span_id"] == got.span_id, since=mark_b)
    c_server = agent_c.wait(lambda s: s["kind"] == "SERVER" and s["parent_span_id"] == got.span_id, since=mark_c)
    assert len(b_server) == 1, f"B SERVER spans for {path}: {b_server}\n{env.logs()}"
    assert len(b_client) == 1, (
        f"no single B CLIENT span with the id C received as parent-id ({got.span_id}); "
        f"B spans: {agent_b.spans[mark_b:]}\n{env.logs()}"
    )
    assert len(c_server) == 1, f"no single C SERVER span child of {got.span_id}: {agent_c.spans[mark_c:]}"
    return {
        "path": path,
        "headers": c_headers,
        "tp": tps[0],
        "ctx": got,
        "b_server": b_server[0],
        "b_client": b_client[0],
        "c_server": c_server[0],
    }


def check_flow(env: Env, flow: dict, upstream: str | None) -> None:
    a, b, c = env.hosts
    pos, name, value = flow["tp"]
    ctx, bs, bc, cs = flow["ctx"], flow["b_server"], flow["b_client"], flow["c_server"]
    # The header: inserted right after the request line (first header), 70 bytes on the wire.
    assert pos == 0 and name == "Traceparent", flow["headers"]
    assert len(f"{name}: {value}\r\n") == HEADER_LEN
    # C got: trace-id == the trace's, parent-id == B's client span.
    assert ctx.trace_id == bs["trace_id"] == bc["trace_id"] == cs["trace_id"]
    assert ctx.span_id == bc["span_id"]
    # B's SERVER span continues A's context, or is a root.
    if upstream:
        assert bs["trace_id"] == TP_TRACE and bs["parent_span_id"] == TP_SPAN
    else:
        assert bs["parent_span_id"] == "" and bs["trace_id"] != TP_TRACE
    # B's CLIENT is B SERVER's child; C's SERVER is B CLIENT's child.
    assert bc["parent_span_id"] == bs["span_id"]
    assert cs["parent_span_id"] == bc["span_id"]
    for span in (bs, bc, cs):
        assert not well_formed(span), (well_formed(span), span)
    assert bs["attributes"]["url.path"] == flow["path"] and bs["attributes"]["http.response.status_code"] == 200
    assert bc["attributes"]["url.path"] == "/headers" and bc["attributes"]["server.address"] == c.addr
    assert cs["attributes"]["url.path"] == "/headers" and cs["attributes"]["client.address"] == b.addr
    assert bs["attributes"]["client.address"] == a.addr
    assert (
        bs["start_time_unix_nano"] <= bc["start_time_unix_nano"] <= bc["end_time_unix_nano"] <= bs["end_time_unix_nano"]
    )


@pytest.mark.parametrize("upstream", [None, UPSTREAM], ids=["no-traceparent", "with-traceparent"])
def test_a_b_c_header_and_links(env: Env, upstream):
    flow = run_flow(env, upstream)
    check_flow(env, flow, upstream)


# How A's header is written -> whether B's SERVER span must continue it.
INCOMING = {
    "upper-name": ("TRACEPARENT: {tp}", True),
    "mixed-case-ows": ("TraceParent:   {tp}  ", True),
    "tab-ows": ("traceparent:\t{tp}", True),
    "bad-version": ("traceparent: ff-{trace}-{span}-01", False),
    "zero-span-id": ("traceparent: 00-{trace}-0000000000000000-01", False),
    "other-header-named-like-it": ("X-Not-Traceparent: {tp}", False),
}


@pytest.mark.parametrize("case", INCOMING)
def test_incoming_traceparent_variants(env: Env, case):
    """The header name in any case with optional whitespace is continued; invalid values
    and other headers that merely contain the name start a new trace."""
    line, continued = INCOMING[case]
    line = line.format(tp=UPSTREAM, trace=TP_TRACE, span=TP_SPAN)
    path = f"/in/{case}/{secrets.token_hex(3)}"
    mark = env.agents["b"].mark()
    (answer,) = env.a_raw([f"GET {path} HTTP/1.1\r\nHost: b\r\nX-Before: 1\r\n{line}\r\nX-After: 2\r\n\r\n".encode()])
    servers = env.agents["b"].wait(lambda s: s["kind"] == "SERVER" and _path(s) == path, since=mark)
    assert len(servers) == 1, env.agents["b"].spans[mark:]
    bs = servers[0]
    if continued:
        assert (bs["trace_id"], bs["parent_span_id"]) == (TP_TRACE, TP_SPAN)
    else:
        assert bs["parent_span_id"] == "" and bs["trace_id"] != TP_TRACE
    c_tps = traceparents(answer["downstream"]["body"]["headers"])
    assert len(c_tps) == 1 and c_tps[0][2].split("-")[1] == bs["trace_id"]


def test_keepalive_no_stale_incoming_context(env: Env):
    """On one connection: a request with a traceparent, then requests without one (one of
    them carrying the header text in its body): those start new traces."""
    tag = secrets.token_hex(3)
    body = f"traceparent: {UPSTREAM}\r\n".encode()
    requests = [
        f"GET /stale/{tag}/1 HTTP/1.1\r\nHost: b\r\ntraceparent: {UPSTREAM}\r\n\r\n".encode(),
        f"GET /stale/{tag}/2 HTTP/1.1\r\nHost: b\r\n\r\n".encode(),
        f"POST /stale/{tag}/3 HTTP/1.1\r\nHost: b\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body,
        f"GET /stale/{tag}/4 HTTP/1.1\r\nHost: b\r\nX-Pad: {'p' * 60}\r\n\r\n".encode(),
    ]
    mark = env.agents["b"].mark()
    env.a_raw(requests)
    servers = env.agents["b"].wait(
        lambda s: s["kind"] == "SERVER" and _path(s).startswith(f"/stale/{tag}/"), n=4, since=mark
    )
    by_path = {_path(s): s for s in servers}
    assert len(by_path) == 4, servers
    first = by_path[f"/stale/{tag}/1"]
    assert (first["trace_id"], first["parent_span_id"]) == (TP_TRACE, TP_SPAN)
    for i in (2, 3, 4):
        later = by_path[f"/stale/{tag}/{i}"]
        assert later["parent_span_id"] == "" and later["trace_id"] != TP_TRACE, f"request {i} reused a stale context"


# -- byte-exact header insertion (driver in B -> recorder on C) --------------------------


def raw_request(env: Env, request: bytes, pieces: int = 1, new_conn: bool = True) -> bytes:
    """Send `request` from B's driver to C's recorder (in `pieces` writes); the bytes C got."""
    cut = [len(request) * i // pieces for i in range(pieces + 1)]
    parts = [base64.b64encode(request[cut[i] : cut[i + 1]]).decode() for i in range(pieces)]
    out = env.driver.run(
        {"op": "raw_http", "addr": env.hosts[2].addr, "port": RAW_PORT, "pieces_b64": parts, "new_conn": new_conn}
    )
    assert out["status"] == 200
    return base64.b64decode(out["body_b64"])


def request_bytes(
    target: str, headers: list[tuple[str, str]] = (), body: bytes = b"", method: str = "GET", host: str = "c"
) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def split_inserted(sent: bytes, received: bytes) -> bytes:
    """The header the agent inserted: received == request line + header + rest of sent."""
    line_end = sent.index(b"\r\n") + 2
    assert len(received) == len(sent) + HEADER_LEN, (sent[:200], received[:300])
    assert received[:line_end] == sent[:line_end], "request line changed"
    assert received[line_end + HEADER_LEN :] == sent[line_end:], "bytes after the inserted header changed"
    inserted = received[line_end : line_end + HEADER_LEN]
    assert inserted.startswith(b"Traceparent: 00-") and inserted.endswith(b"\r\n"), inserted
    assert parse_traceparent(inserted[len(b"Traceparent: ") : -2]) is not None, inserted
    return inserted


@pytest.mark.parametrize("pieces", [1, 3], ids=["one-write", "three-writes"])
def test_inserted_header_bytes(env: Env, pieces):
    """Exactly 70 bytes right after the request line, everything else byte-exact, also when
    the request is written in several pieces; the ids are the agent's CLIENT span."""
    tag = secrets.token_hex(4)
    sent = request_bytes(f"/raw/{tag}", [("User-Agent", "parity"), ("Accept", "*/*")], body=b"x" * 300, method="POST")
    mark_b, mark_c = env.agents["b"].mark(), env.agents["c"].mark()
    inserted = split_inserted(sent, raw_request(env, sent, pieces))
    ctx = parse_traceparent(inserted[13:-2])
    client = env.agents["b"].wait(lambda s: s["kind"] == "CLIENT" and s["span_id"] == ctx.span_id, since=mark_b)
    assert len(client) == 1, f"no CLIENT span {ctx.span_id} on B: {env.agents['b'].spans[mark_b:]}"
    assert client[0]["trace_id"] == ctx.trace_id and client[0]["parent_span_id"] == ""  # driver serves nothing
    assert client[0]["attributes"]["url.path"] == f"/raw/{tag}"
    server = env.agents["c"].wait(lambda s: s["kind"] == "SERVER" and s["parent_span_id"] == ctx.span_id, since=mark_c)
    assert len(server) == 1 and server[0]["trace_id"] == ctx.trace_id


def test_keepalive_each_request_gets_its_own_header(env: Env):
    """Several requests on one connection: each gets one header, with a different span id."""
    ids = set()
    for i in range(4):
        sent = request_bytes(f"/ka/{i}", [("X-I", str(i))])
        inserted = split_inserted(sent, raw_request(env, sent, new_conn=(i == 0)))
        ids.add(inserted[13 + 36 : 13 + 52])
    assert len(ids) == 4


def test_pipelined_requests_each_get_a_header(env: Env):
    """Two requests in one write: each gets its own header after its own request line."""
    first = request_bytes("/pipe/1", [("X-N", "1")], body=b"a" * 100, method="POST")
    second = request_bytes("/pipe/2", [("X-N", "2")])
    out = env.driver.run(
        {
            "op": "raw_http",
            "addr": env.hosts[2].addr,
            "port": RAW_PORT,
            "new_conn": True,
            "pieces_b64": [base64.b64encode(first + second).decode()],
            "responses": 2,
        }
    )
    got = [base64.b64decode(a["body_b64"]) for a in out["answers"]]
    ids = {split_inserted(first, got[0])[16:48], split_inserted(second, got[1])[16:48]}
    assert len(ids) == 2, "both pipelined requests got the same trace id"


def test_request_line_written_alone_gets_its_header(env: Env):
    """The application writes the request line by itself, then the rest: the header goes
    right after the line all the same (the kernel path inserts in front of the line's LF,
    inside that first write: a push at the very end of a message fails on older kernels)."""
    tag = secrets.token_hex(4)
    sent = request_bytes(f"/alone/{tag}", [("X-A", "1")], body=b"z" * 50, method="POST")
    line_end = sent.index(b"\r\n") + 2
    mark_b = env.agents["b"].mark()
    out = env.driver.run(
        {
            "op": "raw_http",
            "addr": env.hosts[2].addr,
            "port": RAW_PORT,
            "new_conn": True,
            "pieces_b64": [base64.b64encode(sent[:line_end]).decode(), base64.b64encode(sent[line_end:]).decode()],
        }
    )
    assert out["status"] == 200
    inserted = split_inserted(sent, base64.b64decode(out["body_b64"]))
    ctx = parse_traceparent(inserted[13:-2])
    client = env.agents["b"].wait(lambda s: s["kind"] == "CLIENT" and s["span_id"] == ctx.span_id, since=mark_b)
    assert len(client) == 1 and client[0]["attributes"]["url.path"] == f"/alone/{tag}", env.logs()


def test_head_response_with_a_length_has_no_body(env: Env):
    """A HEAD response carries Content-Length: N but no body; the next response on the
    connection must not be taken for that body (client side on B, server side on C)."""
    tag = secrets.token_hex(4)
    mark_b, mark_c = env.agents["b"].mark(), env.agents["c"].mark()
    head_req = request_bytes(f"/head/{tag}")
    head_req = b"HEAD" + head_req[3:]
    out = env.driver.run(
        {
            "op": "raw_http",
            "addr": env.hosts[2].addr,
            "port": RAW_PORT,
            "new_conn": True,
            "pieces_b64": [base64.b64encode(head_req).decode()],
        }
    )
    assert out["status"] == 200 and b"Content-Length: " in base64.b64decode(out["head_b64"])
    after = request_bytes(f"/after-head/{tag}")
    split_inserted(after, raw_request(env, after, new_conn=False))  # same connection
    paths = {f"/head/{tag}", f"/after-head/{tag}"}
    b = env.agents["b"].wait(lambda s: s["kind"] == "CLIENT" and _path(s) in paths, n=2, since=mark_b)
    c = env.agents["c"].wait(lambda s: s["kind"] == "SERVER" and _path(s) in paths, n=2, since=mark_c)
    for side, spans in (("B CLIENT", b), ("C SERVER", c)):
        assert {_path(s): s["attributes"].get("http.response.status_code") for s in spans} == {p: 200 for p in paths}, (
            f"{side}: {spans}\n{env.logs()}"
        )


def test_folded_content_length_never_gets_a_header_into_the_body(env: Env):
    """Content-Length on an obs-fold line: a parser that reads it as 0 takes the body for
    the next request and writes a header into it. Both datapaths give the connection up:
    the body, and the requests after it, arrive byte for byte."""
    tag = secrets.token_hex(4)
    body = f"GET /inner/{tag} HTTP/1.1\r\nHost: c\r\n\r\n".encode()
    sent = (f"POST /fold/{tag} HTTP/1.1\r\nHost: c\r\nContent-Length:\r\n {len(body)}\r\n\r\n").encode() + body
    got = raw_request(env, sent)
    line_end = sent.index(b"\r\n") + 2
    if got != sent:  # the header may go after the request line, never anywhere else
        assert got[:line_end] + got[line_end + HEADER_LEN :] == sent, got
        assert got[line_end : line_end + HEADER_LEN].startswith(b"Traceparent: ")
    assert got.endswith(body)
    nxt = request_bytes(f"/after-fold/{tag}", [("X-N", "1")])
    assert raw_request(env, nxt, new_conn=False) == nxt  # the connection was given up: untouched


def test_text_protocol_line_ending_in_http_version_is_left_alone(env: Env):
    """A first line that ends in " HTTP/1.1" but starts with no HTTP method (an FTP-like
    control connection) is not HTTP: nothing inserted, no span."""
    data = b"USER bob HTTP/1.1\r\nPASS secret HTTP/1.1\r\nRETR file HTTP/1.1\r\n\r\nQUIT\r\n"
    mark_b, mark_c = env.agents["b"].mark(), env.agents["c"].mark()
    assert raw_roundtrip(env, data) == data
    assert _spans_on_raw_port(env, mark_b, mark_c) == []


NOT_SELECTED = """
import base64, socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
sock.sendall(base64.b64decode(sys.argv[3]))
data = b""
while b"\\r\\n\\r\\n" not in data:
    data += sock.recv(65536)
head, _, body = data.partition(b"\\r\\n\\r\\n")
n = int(head.split(b"Content-Length: ")[1].split(b"\\r\\n")[0])
while len(body) < n:
    body += sock.recv(65536)
print(base64.b64encode(body).decode())
"""


def test_process_not_selected_untouched(env: Env):
    """A process in B that listens on no watched port is not instrumented: no header, no span."""
    sent = request_bytes("/not-selected", [("Accept", "*/*")])
    mark = env.agents["b"].mark()
    r = env.hosts[1].run(
        [sys.executable, "-c", NOT_SELECTED, env.hosts[2].addr, str(RAW_PORT), base64.b64encode(sent).decode()],
        timeout=30,
    )
    assert base64.b64decode(r.stdout.strip()) == sent
    time.sleep(0.5)
    assert not [s for s in env.agents["b"].spans[mark:] if _path(s) == "/not-selected"]


APP_TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
INVALID_TPS = {
    "bad-version": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "zero-trace": "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "upper-hex": "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
    "short": "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
}


def test_app_traceparent_not_modified(env: Env):
    """The app already wrote a valid traceparent: the request leaves byte-exact (no second
    header), and the CLIENT span adopts that context (C's SERVER span is its child)."""
    mark_b, mark_c = env.agents["b"].mark(), env.agents["c"].mark()
    sent = request_bytes("/app-tp", [("Accept", "*/*"), ("traceparent", APP_TP)])
    assert raw_request(env, sent) == sent
    _, trace, span, _ = APP_TP.split("-")
    client = env.agents["b"].wait(lambda s: s["kind"] == "CLIENT" and _path(s) == "/app-tp", since=mark_b)
    assert len(client) == 1 and client[0]["trace_id"] == trace, client
    server = env.agents["c"].wait(lambda s: s["kind"] == "SERVER" and _path(s) == "/app-tp", since=mark_c)
    assert len(server) == 1 and server[0]["trace_id"] == trace and server[0]["parent_span_id"] == span, server


@pytest.mark.parametrize("case", [*INVALID_TPS, "duplicated"])
def test_invalid_or_duplicated_app_traceparent_no_insertion(env: Env, case):
    if case == "duplicated":
        headers = [("traceparent", APP_TP), ("Accept", "*/*"), ("traceparent", APP_TP)]
    else:
        headers = [("Accept", "*/*"), ("traceparent", INVALID_TPS[case])]
    sent = request_bytes(f"/bad-tp/{case}", headers)
    assert raw_request(env, sent) == sent


# -- 8 KiB headers ----------------------------------------------------------------------

PAD = [(f"X-Pad-{i}", "p" * 1000) for i in range(8)]  # ~8 KiB before the traceparent


def test_8kib_headers(env: Env):
    """Incoming: the traceparent after 8 KiB of headers is found (several segments).
    Outgoing: a request with 8 KiB of headers gets its header right after the request line."""
    agent_b = env.agents["b"]
    mark = agent_b.mark()
    answer = env.a_get("/big-headers", dict(PAD + [("traceparent", UPSTREAM)]))
    tps = traceparents(answer["downstream"]["body"]["headers"])
    assert len(tps) == 1 and tps[0][2].split("-")[1] == TP_TRACE, tps
    server = agent_b.wait(lambda s: s["kind"] == "SERVER" and _path(s) == "/big-headers", since=mark)
    assert len(server) == 1 and server[0]["trace_id"] == TP_TRACE and server[0]["parent_span_id"] == TP_SPAN, server

    sent = request_bytes("/big-out", PAD)
    split_inserted(sent, raw_request(env, sent))


# -- bodies ------------------------------------------------------------------------------

SIZES = [0, 1, 1000, 65536, 1 << 20]


def test_bodies_echoed_with_matching_sha256(env: Env):
    """POST /echo from B's driver to C's demoapp over one keep-alive connection, Content-Length
    and chunked: every byte arrives (C's SHA-256) and comes back (ours); every request is
    a B CLIENT span whose id C received (C's SERVER span is its child)."""
    agent_b, agent_c = env.agents["b"], env.agents["c"]
    mark_b = agent_b.mark()
    c_addr = env.hosts[2].addr
    cases = [(size, chunked) for size in SIZES for chunked in (False, True) if size or not chunked]
    c_spans: list[tuple[tuple[int, bool], dict | None]] = []
    for i, (size, chunked) in enumerate(cases):
        mark_c = agent_c.mark()
        r = env.driver.run(
            {"op": "echo", "addr": c_addr, "port": PORT, "size": size, "chunked": chunked, "new_conn": i == 0},
            timeout=60,
        )
        assert r["status"] == 200 and r["len"] == size, (size, chunked, r)
        assert r["sent_sha"] == r["c_sha"] == r["back_sha"], f"body of {size} bytes (chunked={chunked}) changed"
        got = agent_c.wait(lambda s: s["kind"] == "SERVER" and _path(s) == "/echo", since=mark_c, timeout=5)
        c_spans.append(((size, chunked), got[0] if got else None))
    clients = {
        s["span_id"]: s
        for s in agent_b.wait(lambda s: s["kind"] == "CLIENT" and _path(s) == "/echo", n=len(cases), since=mark_b)
    }
    unlinked = []
    for i, (case, server) in enumerate(c_spans):
        if server is None or server["parent_span_id"] not in clients:
            after = f", after {c_spans[i - 1][0]} on the same connection" if i else ""
            unlinked.append(
                f"(size, chunked)={case}{after}: C SERVER parent "
                f"{server['parent_span_id'] if server else 'no span'!r} is no B CLIENT span"
            )
    assert not unlinked, "\n".join(unlinked) + f"\nB CLIENT /echo spans: {len(clients)} of {len(cases)}"
    assert all(clients[s["parent_span_id"]]["trace_id"] == s["trace_id"] for _, s in c_spans)


def test_ipv6_header_bodies_and_links(env: Env):
    """The same over IPv6 (B -> C on C's fd00:198:18::/64 address, a dual-stack service):
    every request gets its header, bodies arrive unchanged, C's spans are B's children."""
    agent_b, agent_c = env.agents["b"], env.agents["c"]
    mark_b, mark_c = agent_b.mark(), agent_c.mark()
    sizes = (0, 1000, 65536)
    for i, size in enumerate(sizes):
        r = env.driver.run(
            {
                "op": "echo",
                "addr": env.hosts[2].addr6,
                "port": PORT,
                "size": size,
                "chunked": False,
                "new_conn": i == 0,
            },
            timeout=60,
        )
        assert r["status"] == 200 and r["len"] == size, (size, r)
        assert r["sent_sha"] == r["c_sha"] == r["back_sha"], f"IPv6 body of {size} bytes changed"
    clients = agent_b.wait(lambda s: s["kind"] == "CLIENT" and _path(s) == "/echo", n=len(sizes), since=mark_b)
    servers = agent_c.wait(lambda s: s["kind"] == "SERVER" and _path(s) == "/echo", n=len(sizes), since=mark_c)
    assert len(clients) == len(servers) == len(sizes), (clients, servers, env.logs())
    by_id = {s["span_id"]: s for s in clients}
    for server in servers:
        client = by_id.get(server["parent_span_id"])
        assert client is not None, f"C SERVER span {server['span_id']} is no child of a B CLIENT span"
        assert client["trace_id"] == server["trace_id"]
        assert client["attributes"]["network.peer.address"] == env.hosts[2].addr6
        assert server["attributes"]["client.address"] == env.hosts[1].addr6


# -- traffic that must be left alone ----------------------------------------------------


def raw_roundtrip(env: Env, data: bytes) -> bytes:
    out = env.driver.run(
        {"op": "raw", "addr": env.hosts[2].addr, "port": RAW_PORT, "data_b64": base64.b64encode(data).decode()},
        timeout=30,
    )
    return base64.b64decode(out["data_b64"])


def _spans_on_raw_port(env: Env, mark_b: int, mark_c: int) -> list[dict]:
    time.sleep(0.5)  # spans, if any, are printed right after the connection's traffic
    b = [s for s in env.agents["b"].spans[mark_b:] if s["attributes"].get("server.port") == RAW_PORT]
    c = [s for s in env.agents["c"].spans[mark_c:] if s["attributes"].get("server.port") == RAW_PORT]
    return b + c


def test_non_http_bytes_untouched(env: Env):
    rng = random.Random(4242)
    noise = bytes(rng.getrandbits(8) for _ in range(100_000))
    # Random bytes, with things that look like HTTP in the middle (not at the start).
    data = b"\x16\x03\x01\x02\x00" + noise[:50_000] + b"GET /x HTTP/1.1\r\nHost: c\r\n\r\n" + noise[50_000:]
    mark_b, mark_c = env.agents["b"].mark(), env.agents["c"].mark()
    assert raw_roundtrip(env, data) == data
    assert raw_roundtrip(env, b"hello\n") == b"hello\n"
    assert _spans_on_raw_port(env, mark_b, mark_c) == []


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64"
# A HEADERS frame on stream 1 for GET / (HPACK static entries 2, 4, 6), END_STREAM|END_HEADERS.
H2_HEADERS = b"\x00\x00\x03\x01\x05\x00\x00\x00\x01\x82\x84\x86"


def test_http2_prior_knowledge_untouched(env: Env):
    data = H2_PREFACE + H2_SETTINGS + H2_HEADERS
    mark_b, mark_c = env.agents["b"].mark(), env.agents["c"].mark()
    assert raw_roundtrip(env, data) == data
    assert _spans_on_raw_port(env, mark_b, mark_c) == []


# -- concurrency ------------------------------------------------------------------------

# n_clients keep-alive clients in A, each request with its own trace id; B's answer embeds
# the traceparent(s) C received for that request.
CONCURRENT = r"""
import http.client, json, secrets, sys, threading
host, port, tag, n_clients, n_req = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
results, errors = [], []
def worker(k):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    for i in range(n_req):
        trace = secrets.token_hex(16)
        try:
            conn.request("GET", f"/c/{tag}/{k}/{i}", headers={"traceparent": f"00-{trace}-{secrets.token_hex(8)}-01"})
            body = json.loads(conn.getresponse().read())
        except Exception as e:
            errors.append(repr(e)); conn.close(); conn = http.client.HTTPConnection(host, port, timeout=30); continue
        tps = [v for k2, v in body["downstream"]["body"]["headers"] if k2.lower() == "traceparent"]
        results.append([trace, tps])
ts = [threading.Thread(target=worker, args=(k,)) for k in range(n_clients)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"results": results, "errors": errors[:5], "n_errors": len(errors)}))
"""
N_CLIENTS, N_REQ = 32, 100  # 3200 requests: "a few thousand" (issue 3)


def test_concurrent_keepalive_clients(env: Env):
    agent_b, agent_c = env.agents["b"], env.agents["c"]
    mark_b, mark_c = agent_b.mark(), agent_c.mark()
    tag = secrets.token_hex(3)
    t0 = time.monotonic()
    out = env.a_python(CONCURRENT, env.hosts[1].addr, str(PORT), tag, str(N_CLIENTS), str(N_REQ), timeout=150)
    elapsed = time.monotonic() - t0
    total = N_CLIENTS * N_REQ
    assert out["n_errors"] == 0 and len(out["results"]) == total, out["errors"]
    # The header was inserted into every request B sent: exactly one, valid.
    missing = [r for r in out["results"] if len(r[1]) != 1 or parse_traceparent(r[1][0]) is None]
    assert not missing, f"{len(missing)} requests reached C without exactly one valid traceparent: {missing[:3]}"
    right = sum(1 for trace, tps in out["results"] if parse_traceparent(tps[0]).trace_id == trace)
    ratio = right / total

    servers = agent_b.wait(
        lambda s: s["kind"] == "SERVER" and _path(s).startswith(f"/c/{tag}/"), n=total, since=mark_b, timeout=30
    )
    clients = agent_b.wait(lambda s: s["kind"] == "CLIENT", n=total, since=mark_b, timeout=30)
    c_servers = agent_c.wait(lambda s: s["kind"] == "SERVER", n=total, since=mark_c, timeout=30)
    print(
        f"\n[{env.datapath}] {N_CLIENTS} keep-alive clients x {N_REQ} requests in {elapsed:.1f}s: "
        f"linking accuracy {right}/{total} = {ratio:.2f}; spans B server {len(servers)}, B client {len(clients)}, "
        f"C server {len(c_servers)}"
    )
    assert len(servers) == total and len(clients) == total and len(c_servers) == total, env.logs()
    bad = [(s["span_id"], well_formed(s)) for s in servers + clients + c_servers if well_formed(s)]
    assert not bad, bad[:5]
    # The id C received as parent-id is always one of B's CLIENT spans, and C's SERVER span its child.
    client_ids = {s["span_id"]: s for s in clients}
    wire_parents = {parse_traceparent(tps[0]).span_id for _, tps in out["results"]}
    assert wire_parents <= client_ids.keys()
    assert all(
        client_ids[s["parent_span_id"]]["trace_id"] == s["trace_id"]
        for s in c_servers
        if s["parent_span_id"] in client_ids
    )
    assert {s["parent_span_id"] for s in c_servers} == wire_parents
    if env.datapath == "kernel":
        # Per-thread linking: zero cross-links.
        assert right == total, f"{total - right} requests carried another request's trace id"
        by_id = {s["span_id"]: s for s in servers}
        children: dict[str, int] = {}
        for c in clients:
            parent = by_id.get(c["parent_span_id"])
            assert parent is not None and parent["trace_id"] == c["trace_id"], c
            children[parent["span_id"]] = children.get(parent["span_id"], 0) + 1
        assert len(children) == total and set(children.values()) == {1}


# -- the two datapaths compared ---------------------------------------------------------

# Values that differ between any two runs (ids, times, ephemeral ports, pids), and the
# thread id, which only the kernel path can know (the userspace path links per process).
VOLATILE_ATTRS = {"process.pid", "thread.id", "client.port"}


def normalize_span(span: dict) -> dict:
    attrs = {k: v for k, v in span["attributes"].items() if k not in VOLATILE_ATTRS}
    if span["kind"] == "SERVER":
        attrs.pop("network.peer.port", None)  # the client's ephemeral port
    attrs["obi.datapath"] = "<datapath>" if "obi.datapath" in attrs else None
    if "url.path" in attrs and attrs["url.path"].startswith("/work/"):
        attrs["url.path"] = "/work/<tag>"
    resource = {k: ("<pid>" if k == "process.pid" else v) for k, v in span["resource"].items()}
    return {
        "name": span["name"],
        "kind": span["kind"],
        "attributes": attrs,
        "status": span["status"],
        "trace_flags": span["trace_flags"],
        "resource": resource,
    }


def normalize_flow(flow: dict, upstream: str | None) -> dict:
    bs, bc, cs = flow["b_server"], flow["b_client"], flow["c_server"]
    role = {
        bs["span_id"]: "B server",
        bc["span_id"]: "B client",
        cs["span_id"]: "C server",
        TP_SPAN if upstream else "": "A" if upstream else "root",
    }
    pos, name, value = flow["tp"]
    return {
        "header": {
            "name": name,
            "position": pos,
            "length": len(f"{name}: {value}\r\n"),
            "flags": value.split("-")[3],
            "headers_after": [k for k, _ in flow["headers"][pos + 1 :]],
        },
        "parents": {
            r: role.get(s["parent_span_id"], "other") for r, s in (("B server", bs), ("B client", bc), ("C server", cs))
        },
        "spans": {r: normalize_span(s) for r, s in (("B server", bs), ("B client", bc), ("C server", cs))},
    }


def wire_shape(env: Env) -> dict:
    """Bytes C received for a fixed request, with the inserted ids masked."""
    sent = request_bytes("/shape", [("Accept", "*/*")], body=b"0123456789", method="POST")
    received = raw_request(env, sent)
    inserted = split_inserted(sent, received)
    masked = inserted[:16] + b"T" * 32 + b"-" + b"S" * 16 + inserted[65:]
    return {"received": (received.replace(inserted, masked)).decode()}


def app_traceparent_shape(env: Env) -> dict:
    """Spans of a request whose app wrote its own valid traceparent (sent unmodified)."""
    agent_b, agent_c = env.agents["b"], env.agents["c"]
    mark_b, mark_c = agent_b.mark(), agent_c.mark()
    sent = request_bytes("/app-tp-shape", [("traceparent", APP_TP)])
    assert raw_request(env, sent) == sent
    bc = agent_b.wait(lambda s: s["kind"] == "CLIENT" and _path(s) == "/app-tp-shape", since=mark_b)
    cs = agent_c.wait(lambda s: s["kind"] == "SERVER" and _path(s) == "/app-tp-shape", since=mark_c)
    assert len(bc) == 1 and len(cs) == 1, (bc, cs)
    _, trace, span, _ = APP_TP.split("-")
    role = {span: "app's span id", "": "root", bc[0]["span_id"]: "B client"}
    return {
        "trace ids": ["app's" if s["trace_id"] == trace else "other" for s in (bc[0], cs[0])],
        "B client span id": "app's span id" if bc[0]["span_id"] == span else "own",
        "parents": {
            "B client": role.get(bc[0]["parent_span_id"], "other"),
            "C server": role.get(cs[0]["parent_span_id"], "other"),
        },
        "spans": {"B client": normalize_span(bc[0]), "C server": normalize_span(cs[0])},
    }


def test_same_results_on_both_datapaths(env_pool):
    """Same traffic, same results: header bytes and place, span names, kinds, attributes,
    resource and parent structure (ids, times, ports and pids aside)."""
    results = {}
    for datapath in ("kernel", "userspace"):
        env = env_pool.get(datapath)
        results[datapath] = {
            "wire": wire_shape(env),
            "app traceparent": app_traceparent_shape(env),
            **{
                f"flow {'with' if up else 'without'} traceparent": normalize_flow(run_flow(env, up), up)
                for up in (None, UPSTREAM)
            },
        }
    print("\n" + json.dumps(results["kernel"], indent=1, sort_keys=True))
    kernel, userspace = flatten(results["kernel"]), flatten(results["userspace"])
    diffs = [
        f"{key}: kernel={kernel.get(key, '<absent>')!r} userspace={userspace.get(key, '<absent>')!r}"
        for key in sorted(kernel.keys() | userspace.keys())
        if kernel.get(key, ()) != userspace.get(key, ())
    ]
    assert not diffs, "the datapaths differ:\n  " + "\n  ".join(diffs)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a / b": 1}: one line per difference in the report."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key} / "))
        else:
            out[f"{prefix}{key}"] = value
    return out
