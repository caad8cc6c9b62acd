"""Kernel datapath end to end: A -> B -> C in namespaces, one KernelDatapath per service
host (B and C), each attached to that host's cgroup and netns, spans collected in lists.

Asserted on real things: the header C received (its JSON echo), the SpanRecords the agents
emitted (ids and parent links), SHA-256 of bodies echoed through instrumented sockets.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time

import pytest

from obi.model import SpanKind
from tests.helpers.kernel_agent import Agent
from tests.helpers.skips import skip_module_unless_kernel_path
from tests.helpers.traffic import (
    CLIENT_PORT,
    CONCURRENT_CODE,
    PORT,
    TP_SPAN,
    TP_TRACE,
    http_get,
    serve,
    traceparent_values,
)

pytestmark = pytest.mark.root


skip_module_unless_kernel_path()


# A client that runs inside B, selected because it listens on CLIENT_PORT. It reads one JSON
# job per line on stdin ({"method","path","body_len","chunked","headers"}), runs it over one
# keep-alive connection to C and prints {"status","sha","body_sha","headers"} per job.
CLIENT_CODE = r"""
import hashlib, http.client, json, socket, sys
lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("0.0.0.0", int(sys.argv[2]))); lst.listen(1)
print("ready", flush=True)
conn = None
def pattern(n):
    b = bytes(range(256)); return (b * (n // 256 + 1))[:n]
for line in sys.stdin:
    job = json.loads(line)
    if job.get("new_conn") or conn is None:
        conn = http.client.HTTPConnection(sys.argv[1], 8080, timeout=30)
    body = pattern(job.get("body_len", 0)) if job.get("body_len") is not None else None
    hdrs = dict(job.get("headers", {}))
    if job.get("chunked"):
        def gen(b=body):
            for i in range(0, len(b), 7000):
                yield b[i:i + 7000]
        conn.request(job["method"], job["path"], body=gen(), headers=hdrs, encode_chunked=True)
    else:
        conn.request(job["method"], job["path"], body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    out = {"status": resp.status, "sha": resp.getheader("X-Body-Sha256"),
           "body_sha": hashlib.sha256(data).hexdigest(), "sent_sha": hashlib.sha256(body or b"").hexdigest(),
           "len": len(data)}
    if job["path"].startswith("/headers"):
        out["headers"] = json.loads(data)["headers"]
    print(json.dumps(out), flush=True)
"""


class Client:
    def __init__(self, host, server_addr: str):
        self.proc = host.popen(
            [sys.executable, "-c", CLIENT_CODE, server_addr, str(CLIENT_PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, job: dict, timeout: float = 30.0) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        assert box and box[0], f"client got no answer for {job} within {timeout}s"
        return json.loads(box[0])


@pytest.fixture
def abc(three_hosts, tmp_path):
    """Services B (calling C) and C running, agents on B and C started after them."""
    b, c = three_hosts["b"], three_hosts["c"]
    serve(c)
    serve(b, downstream=f"http://{c.addr}:{PORT}")
    agent_c = Agent(c, tmp_path)
    agent_b = Agent(b, tmp_path)
    try:
        yield three_hosts, agent_b, agent_c
    finally:
        agent_b.stop()
        agent_c.stop()


@pytest.mark.parametrize("incoming", [False, True], ids=["no-traceparent", "with-traceparent"])
def test_a_b_c_linked(abc, incoming):
    topo, agent_b, agent_c = abc
    a, b, c = topo["a"], topo["b"], topo["c"]
    hdrs = {"traceparent": f"00-{TP_TRACE}-{TP_SPAN}-01"} if incoming else {}
    out = http_get(a, f"http://{b.addr}:{PORT}/work", hdrs)

    # What C received: exactly one Traceparent, inserted by B's agent; the other headers
    # are those http.client always sends.
    got = out["downstream"]["body"]["headers"]
    tps = traceparent_values(got)
    assert len(tps) == 1, got
    version, trace_id, parent_id, flags = tps[0].split("-")
    assert version == "00" and len(trace_id) == 32 and len(parent_id) == 16
    assert sorted(k.lower() for k, _ in got) == ["accept-encoding", "host", "traceparent"]
    assert got[0][0] == "Traceparent" and got[1][0] == "Host"  # inserted right after the request line
    if incoming:
        assert trace_id == TP_TRACE and flags == "01"
    else:
        assert trace_id != TP_TRACE

    b_server = agent_b.wait(lambda s: s.kind == SpanKind.SERVER and s.path == "/work")
    b_client = agent_b.wait(lambda s: s.kind == SpanKind.CLIENT and s.path == "/headers")
    c_server = agent_c.wait(lambda s: s.kind == SpanKind.SERVER and s.path == "/headers")
    assert len(b_server) == 1 and len(b_client) == 1 and len(c_server) == 1, (agent_b.spans, agent_c.spans)
    bs, bc, cs = b_server[0], b_client[0], c_server[0]

    # B's server span continues A's context (or starts the trace).
    assert bs.trace_id == trace_id
    assert bs.parent_span_id == (TP_SPAN if incoming else "")
    assert bs.method == "GET" and bs.status == 200 and bs.peer_addr == a.addr and bs.local_port == PORT
    # B's client span: child of B's server span; its id is what C received.
    assert bc.trace_id == trace_id and bc.parent_span_id == bs.span_id
    assert bc.span_id == parent_id
    assert bc.status == 200 and bc.peer_addr == c.addr and bc.peer_port == PORT
    assert bc.extra == {} and bs.extra == {} and cs.extra == {}  # same attributes as the userspace path
    # Host headers (OTel server.address): urllib in A and http.client in B write "addr:port".
    assert bs.host == f"{b.addr}:{PORT}" and bc.host == cs.host == f"{c.addr}:{PORT}"
    # C's server span: child of B's client span.
    assert cs.trace_id == trace_id and cs.parent_span_id == bc.span_id and cs.status == 200
    assert cs.propagated
    # Times are epoch ns and nested.
    now = time.time_ns()
    assert abs(bs.start_ns - now) < 60e9
    assert bs.start_ns <= bc.start_ns <= bc.end_ns <= bs.end_ns
    assert agent_b.dp.stats()["headers_inserted"] >= 1
    # Nothing was skipped: no lost events, and no program found its per-CPU scratch slot
    # taken by another one interrupting it on the same CPU (the cause of the old flake).
    for agent in (agent_b, agent_c):
        st = agent.dp.stats()
        assert st["events_lost"] == 0 and st["scratch_busy"] == 0 and st["parse_lost"] == 0, st


def test_bodies_unchanged_and_existing_traceparent_kept(abc):
    """A selected client in B posts bodies of many sizes (Content-Length and chunked) to C:
    every byte arrives (SHA-256), each request got one header, none went into a body."""
    topo, agent_b, agent_c = abc
    b, c = topo["b"], topo["c"]
    client = Client(b, c.addr)
    agent_b.dp.scan_now()  # select the client now instead of waiting for the next scan
    assert client.proc.pid in agent_b.dp.selected_pids or agent_b.dp.selected_pids
    sizes = [0, 1, 69, 70, 1000, 8191, 65536, 300_000, 1 << 20]
    n = 0
    for size in sizes:
        for chunked in (False, True):
            if chunked and size == 0:
                continue
            r = client.run({"method": "POST", "path": "/echo", "body_len": size, "chunked": chunked})
            n += 1
            assert r["status"] == 200
            assert r["sha"] == r["sent_sha"] == r["body_sha"], (size, chunked, r)
    # Body that looks like a request start must not get a header.
    r = client.run({"method": "POST", "path": "/echo", "body_len": None, "headers": {"Content-Type": "text/plain"}})
    # Existing traceparent: not modified, not duplicated.
    mine = f"00-{TP_TRACE}-{TP_SPAN}-01"
    r = client.run({"method": "GET", "path": "/headers", "headers": {"traceparent": mine}})
    assert traceparent_values(r["headers"]) == [mine], r["headers"]
    # And a request without one gets exactly one.
    r = client.run({"method": "GET", "path": "/headers"})
    assert len(traceparent_values(r["headers"])) == 1
    spans = agent_c.wait_count(SpanKind.SERVER, n + 3)
    mine_span = [s for s in spans if s.parent_span_id == TP_SPAN]
    assert len(mine_span) == 1 and mine_span[0].trace_id == TP_TRACE
    echo = [s for s in spans if s.path == "/echo"]
    assert len(echo) == n + 1 and all(s.status == 200 for s in echo)
    # Every echo on C is the child of a client span of B (the header went through intact).
    b_clients = {s.span_id: s for s in agent_b.wait_count(SpanKind.CLIENT, n + 3)}
    assert all(s.parent_span_id in b_clients for s in echo)


def test_host_header_parsed_both_sides(abc):
    """The first Host header's value (name in any case, OWS trimmed) becomes SpanRecord.host
    of B's CLIENT span (sk_msg parser) and of C's SERVER span (tc parser); names that only
    contain "host" are not taken; a value longer than the kernel keeps is dropped, not cut."""
    topo, agent_b, agent_c = abc
    b, c = topo["b"], topo["c"]
    client = Client(b, c.addr)
    agent_b.dp.scan_now()
    long_host = "h" * 200 + ".test"
    cases = {
        "/h/plain": ("Host", "svc.example:8443", "svc.example:8443"),
        "/h/upper-ows": ("HOST", " \t svc.example \t", "svc.example"),
        "/h/long": ("Host", long_host, ""),
    }
    for path, (name, value, _) in cases.items():
        r = client.run({"method": "GET", "path": path, "headers": {"X-Forwarded-Host": "not-me", name: value}})
        assert r["status"] == 200
    for path, (_, _, want) in cases.items():
        bc = agent_b.wait(lambda s: s.kind == SpanKind.CLIENT and s.path == path)
        cs = agent_c.wait(lambda s: s.kind == SpanKind.SERVER and s.path == path)
        assert len(bc) == 1 and len(cs) == 1, (path, agent_b.spans, agent_c.spans)
        assert bc[0].host == cs[0].host == want, (path, bc[0].host, cs[0].host)
        assert cs[0].parent_span_id == bc[0].span_id


def test_concurrent_keepalive_no_cross_links(abc):
    topo, agent_b, agent_c = abc
    a, b = topo["a"], topo["b"]
    n_clients, n_req = 32, 40
    r = a.run([sys.executable, "-c", CONCURRENT_CODE, b.addr, str(n_clients), str(n_req)], timeout=180)
    out = json.loads(r.stdout)
    total = n_clients * n_req

    def stats() -> str:  # full counters of both agents, for failure messages
        return f"B={agent_b.dp.stats()} C={agent_c.dp.stats()} dropped={agent_b.dp.correlator.dropped_requests}"

    assert out["done"] == total and out["n_bad"] == 0, f"{out} {stats()} {r.stderr[-3000:]}"
    servers = agent_b.wait_count(SpanKind.SERVER, total, timeout=30)
    clients = agent_b.wait_count(SpanKind.CLIENT, total, timeout=30)
    assert len(servers) == total and len(clients) == total, f"{len(servers)} {len(clients)} {stats()}"
    by_id = {s.span_id: s for s in servers}
    # Every client span is the child of exactly one server span of its own trace.
    children: dict[str, int] = {}
    for c in clients:
        parent = by_id.get(c.parent_span_id)
        assert parent is not None and parent.trace_id == c.trace_id, c
        children[parent.span_id] = children.get(parent.span_id, 0) + 1
    assert len(children) == total and set(children.values()) == {1}
    c_servers = agent_c.wait_count(SpanKind.SERVER, total, timeout=30)
    client_ids = {c.span_id: c for c in clients}
    assert all(
        s.parent_span_id in client_ids and client_ids[s.parent_span_id].trace_id == s.trace_id for s in c_servers
    )
    # Nothing was skipped: no lost events, and no program found its per-CPU scratch slot
    # taken by another one interrupting it on the same CPU (the cause of the old flake).
    for agent in (agent_b, agent_c):
        st = agent.dp.stats()
        assert st["events_lost"] == 0 and st["scratch_busy"] == 0 and st["parse_lost"] == 0, stats()


def test_large_headers_and_large_responses(abc):
    topo, agent_b, agent_c = abc
    a, b, c = topo["a"], topo["b"], topo["c"]
    # ~8 KiB of headers before the traceparent: B still finds it (several segments).
    hdrs = {f"X-Pad-{i}": "p" * 990 for i in range(8)}
    hdrs["traceparent"] = f"00-{TP_TRACE}-{TP_SPAN}-01"
    out = http_get(a, f"http://{b.addr}:{PORT}/big", hdrs)
    tps = traceparent_values(out["downstream"]["body"]["headers"])
    assert len(tps) == 1 and tps[0].split("-")[1] == TP_TRACE
    bs = agent_b.wait(lambda s: s.kind == SpanKind.SERVER and s.path == "/big")
    assert bs and bs[0].parent_span_id == TP_SPAN and bs[0].trace_id == TP_TRACE

    # 10 MiB responses through instrumented sockets, both directions of the kernel path:
    # C's server socket (sk_msg) -> B's selected client (tc ingress parses the response).
    client = Client(b, c.addr)
    agent_b.dp.scan_now()
    big = 10 << 20
    t0 = time.monotonic()
    r = client.run({"method": "GET", "path": f"/bytes?n={big}"}, timeout=30)
    assert r["status"] == 200 and r["len"] == big
    import obi.demo.app as demo

    assert r["body_sha"] == hashlib.sha256(demo.pattern_bytes(big)).hexdigest()
    assert time.monotonic() - t0 < 20
    # And B's server socket writing 10 MiB to A.
    code = (
        "import sys,urllib.request,hashlib;"
        "d=urllib.request.urlopen(sys.argv[1],timeout=20).read();print(len(d),hashlib.sha256(d).hexdigest())"
    )
    res = a.run([sys.executable, "-c", code, f"http://{b.addr}:{PORT}/bytes?n={big}"], timeout=40)
    n, sha = res.stdout.split()
    assert int(n) == big and sha == hashlib.sha256(demo.pattern_bytes(big)).hexdigest()
    spans = agent_b.wait(lambda s: s.kind == SpanKind.CLIENT and s.path.startswith("/bytes"))
    assert spans and spans[0].status == 200


def test_keepalive_connection_survives_a_10mib_response(abc):
    topo, agent_b, agent_c = abc
    b, c = topo["b"], topo["c"]
    client = Client(b, c.addr)
    agent_b.dp.scan_now()
    big = 10 << 20
    r = client.run({"method": "GET", "path": f"/bytes?n={big}"}, timeout=30)
    assert r["status"] == 200 and r["len"] == big
    # The same connection keeps working afterwards (framing kept in sync).
    r = client.run({"method": "GET", "path": "/headers"})
    assert r["status"] == 200 and len(traceparent_values(r["headers"])) == 1


# A blocking thread-per-connection server with plain recv/sendall: GET /big answers 10 MiB,
# anything else 2 bytes. A recv that fails with EAGAIN (impossible on a blocking socket,
# unless the kernel misbehaves) is reported on stdout and retried, so the client goes on.
BLOCKING_SERVER = r"""
import socket, threading
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", 8080)); ls.listen(64)
print("listening", flush=True)
BIG = bytes(range(256)) * (10 << 12)
def serve(s):
    buf = b""
    while True:
        try:
            d = s.recv(65536)
        except BlockingIOError:
            print("EAGAIN", flush=True)
            continue
        if not d:
            return
        buf += d
        while b"\r\n\r\n" in buf:
            head, _, buf = buf.partition(b"\r\n\r\n")
            body = BIG if head.startswith(b"GET /big ") else b"ok"
            s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
while True:
    threading.Thread(target=serve, args=(ls.accept()[0],), daemon=True).start()
"""

BIG_THEN_SMALL_CLIENT = r"""
import http.client, sys
ok = 0
for i in range(int(sys.argv[2])):
    conn = http.client.HTTPConnection(sys.argv[1], 8080, timeout=20)
    for path in ("/big", "/small", "/big", "/small"):
        conn.request("GET", path)
        resp = conn.getresponse()
        ok += resp.status == 200 and len(resp.read()) == (10 << 20 if path == "/big" else 2)
    conn.close()
print(ok)
"""


def test_blocking_server_reads_survive_large_responses(three_hosts, tmp_path):
    """Regression: server sockets used to join the agent's sock_hash, and a socket in a
    sockmap reads through the kernel's tcp_bpf_recvmsg, whose blocking wait returns EAGAIN
    when woken without data (the write-space wakeup while a large response drains). A
    blocking server then took the EAGAIN for the end of the connection: about one keep-alive
    connection in 5-10 ended right after a 10 MiB response. Server connections are now
    followed by tc on both directions, and their spans still close with the status."""
    b, c = three_hosts["b"], three_hosts["c"]
    server = c.popen([sys.executable, "-c", BLOCKING_SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    agent_c = Agent(c, tmp_path)
    rounds = 24
    try:
        r = b.run([sys.executable, "-c", BIG_THEN_SMALL_CLIENT, c.addr, str(rounds)], timeout=120)
        assert int(r.stdout) == 4 * rounds, r.stderr[-2000:]
        spans = agent_c.wait_count(SpanKind.SERVER, 4 * rounds)
    finally:
        server.kill()
        out = server.communicate()[0]
    assert "EAGAIN" not in out, f"blocking recv failed with EAGAIN {out.count('EAGAIN')} times"
    assert sorted(s.path for s in spans) == ["/big"] * 2 * rounds + ["/small"] * 2 * rounds
    assert all(s.status == 200 and s.end_ns >= s.start_ns for s in spans)


def test_stop_detaches_everything(three_hosts, tmp_path):
    b = three_hosts["b"]
    serve(b)
    agent = Agent(b, tmp_path)
    prog_ids = {p.info()["id"] for o in agent.dp._objs.values() for p in o.programs()}
    state_dir = tmp_path / b.name
    assert any(state_dir.iterdir())
    agent.stop()
    tool = "bpftool"
    cg = subprocess.run([tool, "cgroup", "show", b.cgroup], capture_output=True, text=True).stdout
    assert "obi_" not in cg
    net = b.run([tool, "net", "show"]).stdout
    assert "obi_" not in net
    left = subprocess.run([tool, "prog", "show"], capture_output=True, text=True).stdout
    for pid in prog_ids:
        assert not re.search(rf"^{pid}:", left, re.M), f"program {pid} still loaded"
    assert all(not f.read_text().strip() or f.read_text().strip() in ("[]", "{}") for f in state_dir.iterdir())
