"""Kernel path, TLS between B and C with `tcp` propagation: TCP option kind 25.

A (plain HTTP, with a traceparent) -> B (tls_app front: HTTP server that calls C over TLS)
-> C (tls_app backend: HTTPS echo). Agents on B and C. Nothing can be written into the
encrypted stream, so B's agent puts the client span's context into TCP option kind 25 of
one segment per request and C's agent reads it back: C's TLS server span must be the
child of B's TLS client span, which is the child of B's HTTP server span. Bodies are
echoed and compared by SHA-256 (no byte changed), and each TLS connection keeps serving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from obi.demo.topology import Topology
from obi.model import SpanKind
from tests.helpers.kernel_agent import Agent
from tests.helpers.skips import skip_module_unless_kernel_path
from tests.helpers.tls_app import make_cert

pytestmark = pytest.mark.root


skip_module_unless_kernel_path({"openssl": "needs the openssl command to make a test certificate"})

APP = os.path.join(os.path.dirname(__file__), "..", "helpers", "tls_app.py")
FRONT, BACKEND = 8080, 8443
TP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SIZES = [0, 1, 1000, 1460, 20_000, 300_000]  # per request: bytes B posts to C over TLS

# A's client: one keep-alive connection to B, one request per size, each with its own
# traceparent (parent ids 1, 2, ...), prints B's JSON answers.
CLIENT = r"""
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], 8080, timeout=30)
out = []
for i, n in enumerate(json.loads(sys.argv[3]), start=1):
    conn.request("GET", f"/{n}", headers={"traceparent": f"00-{sys.argv[2]}-{i:016x}-01"})
    r = conn.getresponse()
    out.append(json.loads(r.read()))
print(json.dumps(out))
"""


def _start(host, argv: list[str]) -> subprocess.Popen:
    proc = host.popen([sys.executable, APP, *argv], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening" in line, line
    return proc


@pytest.fixture
def tls_abc(tmp_path, request):
    c_propagation = request.param
    with Topology(["a", "b", "c"], prefix="obik") as topo:
        b, c = topo["b"], topo["c"]
        cert, key = make_cert(str(tmp_path), c.addr)
        _start(c, ["backend", "--port", str(BACKEND), "--cert", cert, "--key", key])
        _start(b, ["front", "--port", str(FRONT), "--backend", f"{c.addr}:{BACKEND}", "--ca", cert])
        agent_c = Agent(c, tmp_path, propagation=c_propagation, ports=str(BACKEND))
        agent_b = Agent(b, tmp_path, propagation="all", ports=str(FRONT))
        try:
            yield topo, agent_b, agent_c
        finally:
            agent_b.stop()
            agent_c.stop()


def _run_client(topo, trace: str, sizes: list[int]) -> list[dict]:
    r = topo["a"].run([sys.executable, "-c", CLIENT, topo["b"].addr, trace, json.dumps(sizes)], timeout=60)
    return json.loads(r.stdout)


@pytest.mark.parametrize("tls_abc", ["all"], indirect=True)
def test_tls_linked_by_tcp_option(tls_abc):
    topo, agent_b, agent_c = tls_abc
    answers = _run_client(topo, TP_TRACE, SIZES)
    n = len(SIZES)
    # Bytes unchanged both ways through the tagged TLS connection, which stayed up.
    assert [a["status"] for a in answers] == [200] * n
    assert all(a["sent_sha"] == a["got_sha"] == a["echo_sha"] for a in answers), answers
    assert [a["conn_reused"] for a in answers] == [False] + [True] * (n - 1)

    b_servers = sorted(agent_b.wait_count(SpanKind.SERVER, n), key=lambda s: s.start_ns)
    b_clients = sorted(agent_b.wait_count(SpanKind.CLIENT, n), key=lambda s: s.start_ns)
    c_servers = sorted(agent_c.wait_count(SpanKind.SERVER, n), key=lambda s: s.start_ns)
    stats = f"B={agent_b.dp.stats()} C={agent_c.dp.stats()}"
    assert len(b_servers) == len(b_clients) == len(c_servers) == n, (b_servers, b_clients, c_servers, stats)
    for i, (bs, bc, cs) in enumerate(zip(b_servers, b_clients, c_servers), start=1):
        # B's HTTP server span continues A's header.
        assert bs.trace_id == TP_TRACE and bs.parent_span_id == f"{i:016x}" and bs.path == f"/{SIZES[i - 1]}"
        # B's TLS client span: child of that server span (same thread), context sent in kind 25.
        assert bc.extra.get("tls") is True and bc.extra.get("tcp_option") is True, bc
        assert bc.trace_id == TP_TRACE and bc.parent_span_id == bs.span_id, (bc, bs)
        assert bc.method == "" and bc.peer_addr == topo["c"].addr and bc.peer_port == BACKEND
        # C's TLS server span: its parent is the span id that travelled in the option.
        assert cs.extra.get("tls") is True and cs.extra.get("tcp_option") is True, (cs, stats)
        assert cs.trace_id == TP_TRACE and cs.parent_span_id == bc.span_id, (cs, bc, stats)
        assert cs.propagated and cs.local_port == BACKEND
        assert bs.start_ns <= bc.start_ns <= bc.end_ns <= bs.end_ns
    sb, sc = agent_b.dp.stats(), agent_c.dp.stats()
    # One option per request (the handshake got none), each read once; nothing inserted
    # into the encrypted stream.
    assert sb["tcpopt_written"] == n and sc["tcpopt_read"] == n, stats
    assert sb["headers_inserted"] == 0 and sc["headers_inserted"] == 0, stats
    assert sb["events_lost"] == sc["events_lost"] == 0


@pytest.mark.parametrize("tls_abc", ["headers"], indirect=True)
def test_tls_option_ignored_without_tcp(tls_abc):
    """C's agent runs with `headers` only: the option B writes is not read, C's TLS spans
    start their own traces; traffic is unaffected."""
    topo, agent_b, agent_c = tls_abc
    answers = _run_client(topo, TP_TRACE, SIZES[:3])
    assert all(a["status"] == 200 and a["sent_sha"] == a["got_sha"] == a["echo_sha"] for a in answers), answers
    c_servers = agent_c.wait_count(SpanKind.SERVER, 3)
    assert len(c_servers) == 3
    assert all(s.trace_id != TP_TRACE and s.parent_span_id == "" and not s.propagated for s in c_servers)
    assert agent_b.dp.stats()["tcpopt_written"] == 3
    assert agent_c.dp.stats()["tcpopt_read"] == 0
