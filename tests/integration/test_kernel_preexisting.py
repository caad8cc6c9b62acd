"""Kernel datapath adopts connections established before it started (adopt.bpf.c).

A -> B -> C in namespaces. Before the agents start: A's keep-alive client has a connection
to B, B's demoapp thread serving it has its keep-alive connection to C, and a selected
client in B has its own keep-alive connection to C; one request went over each. Then the
agents on B and C start, and more requests go over those same connections (their ports are
taken from `ss` before the start): C receives one Traceparent per request, spans link as in
test_kernel_e2e.py, and bodies on adopted connections arrive unchanged (SHA-256).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from obi.demo.topology import Topology
from obi.model import SpanKind
from tests.helpers.kernel_agent import Agent
from tests.helpers.skips import skip_module_unless_kernel_path
from tests.helpers.traffic import CLIENT_PORT, PORT, serve, traceparent_values

pytestmark = pytest.mark.root


skip_module_unless_kernel_path()


# A keep-alive client: one JSON job per stdin line ({"method","path","body_len"}) over one
# connection to argv[1]:PORT; prints {"status","sha","sent_sha","body_sha","json"} per job.
# With argv[2], it first listens on that port (so that B's agent selects it).
KEEPALIVE_CODE = (
    r"""
import hashlib, http.client, json, socket, sys
if len(sys.argv) > 2:
    lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("0.0.0.0", int(sys.argv[2]))); lst.listen(1)
print("ready", flush=True)
conn = http.client.HTTPConnection(sys.argv[1], %d, timeout=30)
for line in sys.stdin:
    job = json.loads(line)
    n = job.get("body_len")
    body = (bytes(range(256)) * (n // 256 + 1))[:n] if n is not None else None
    conn.request(job["method"], job["path"], body=body)
    resp = conn.getresponse()
    data = resp.read()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    print(json.dumps({"status": resp.status, "sha": resp.getheader("X-Body-Sha256"),
                      "sent_sha": hashlib.sha256(body or b"").hexdigest(),
                      "body_sha": hashlib.sha256(data).hexdigest(), "json": parsed}), flush=True)
"""
    % PORT
)


class KeepAlive:
    def __init__(self, host, server_addr: str, listen_port: int | None = None):
        argv = [sys.executable, "-c", KEEPALIVE_CODE, server_addr]
        if listen_port:
            argv.append(str(listen_port))
        self.proc = host.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, method: str, path: str, body_len: int | None = None, timeout: float = 30.0) -> dict:
        self.proc.stdin.write(json.dumps({"method": method, "path": path, "body_len": body_len}) + "\n")
        self.proc.stdin.flush()
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        assert box and box[0], f"no answer for {method} {path} within {timeout}s"
        return json.loads(box[0])


def peer_ports(host, server_addr: str) -> set[int]:
    """Local ports of `host`'s established TCP connections to server_addr:PORT."""
    out = host.run(["ss", "-Htn", "state", "established", "dst", f"{server_addr}:{PORT}"]).stdout
    return {int(line.split()[-2].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def test_connections_from_before_start_are_adopted(three_hosts, tmp_path):
    a, b, c = three_hosts["a"], three_hosts["b"], three_hosts["c"]
    serve(c)
    serve(b, downstream=f"http://{c.addr}:{PORT}")
    client_a = KeepAlive(a, b.addr)
    client_b = KeepAlive(b, c.addr, CLIENT_PORT)

    # Before the agents: one request over each connection, nothing inserted.
    out = client_a.run("GET", "/work")
    assert out["status"] == 200 and traceparent_values(out["json"]["downstream"]["body"]["headers"]) == []
    out = client_b.run("GET", "/headers")
    assert out["status"] == 200 and traceparent_values(out["json"]["headers"]) == []
    a_ports, b_ports = peer_ports(a, b.addr), peer_ports(b, c.addr)
    assert len(a_ports) == 1 and len(b_ports) == 2, (a_ports, b_ports)

    agent_c = Agent(c, tmp_path)
    agent_b = Agent(b, tmp_path)
    try:
        if not agent_b.dp.adopted:
            pytest.skip("kernel feature missing: BPF TCP iterator (iter/tcp) with sock_hash updates")
        # B: its server side of A's connection, its two client connections to C; C: the two
        # server sides. (Both agents' netns hold only these, plus the listening sockets.)
        assert agent_b.dp.adopted["server"] == 1 and agent_b.dp.adopted["client"] == 2, agent_b.dp.adopted
        assert agent_c.dp.adopted["server"] == 2 and agent_c.dp.adopted["failed"] == 0, agent_c.dp.adopted
        agent_b.dp.scan_now()  # the client in B is selected now, not at the next scan

        # Requests on A's adopted connection: B's demoapp thread calls C over its adopted one.
        n = 3
        received = []
        for _ in range(n):
            out = client_a.run("GET", "/work")
            assert out["status"] == 200
            tps = traceparent_values(out["json"]["downstream"]["body"]["headers"])
            assert len(tps) == 1, out
            received.append(tps[0].split("-"))
        b_server = agent_b.wait_count(SpanKind.SERVER, n)
        c_server = agent_c.wait_count(SpanKind.SERVER, n)
        b_client = agent_b.wait_count(SpanKind.CLIENT, n)
        assert len(b_server) == len(b_client) == len(c_server) == n, (agent_b.spans, agent_c.spans)
        by_id = {s.span_id: s for s in b_server}
        clients = {s.span_id: s for s in b_client}
        for s in b_server:
            assert s.path == "/work" and s.status == 200 and s.peer_port in a_ports
        for (_, trace_id, parent_id, _), cs in zip(received, c_server):
            bc = clients[parent_id]  # what C received is B's client span id
            assert bc.trace_id == trace_id and bc.path == "/headers" and bc.status == 200
            assert by_id[bc.parent_span_id].trace_id == trace_id  # child of B's server span
            assert cs.trace_id == trace_id and cs.parent_span_id == parent_id and cs.propagated
            assert cs.peer_port in b_ports and bc.local_port in b_ports

        # Bodies through adopted sockets: B's server side (echoing A's posts) and the
        # selected client in B (posting to C). Every byte arrives; C's echo spans are the
        # children of B's client spans (one header per request, none in a body), B's
        # server spans end with its responses.
        sizes = [0, 1, 70, 1000, 65536, 300_000]
        for size in sizes:
            for client in (client_a, client_b):
                r = client.run("POST", "/echo", size)
                assert r["status"] == 200 and r["sha"] == r["sent_sha"] == r["body_sha"], (size, r)
        c_echo = [s for s in agent_c.wait_count(SpanKind.SERVER, n + len(sizes)) if s.path == "/echo"]
        b_clients = {s.span_id for s in agent_b.wait_count(SpanKind.CLIENT, n + len(sizes))}
        assert len(c_echo) == len(sizes), agent_c.spans
        assert all(s.status == 200 and s.parent_span_id in b_clients and s.peer_port in b_ports for s in c_echo)
        b_echo = [s for s in agent_b.wait_count(SpanKind.SERVER, n + len(sizes)) if s.path == "/echo"]
        assert len(b_echo) == len(sizes) and all(s.status == 200 and s.peer_port in a_ports for s in b_echo)
        for agent in (agent_b, agent_c):
            st = agent.dp.stats()
            assert st["events_lost"] == 0 and st["parse_lost"] == 0, st
    finally:
        agent_b.stop()
        agent_c.stop()


# In C: answers every request with its own head (so the test sees what arrived), after
# three seconds for paths starting with /slow.
HEAD_ECHO_SERVER = (
    r"""
import socket, threading, time
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", %d)); ls.listen(16)
print("listening", flush=True)
def serve(s):
    buf = b""
    while True:
        d = s.recv(65536)
        if not d:
            return
        buf += d
        while b"\r\n\r\n" in buf:
            head, _, buf = buf.partition(b"\r\n\r\n")
            if head.split(b" ")[1].startswith(b"/slow"):
                time.sleep(3)
            s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %%d\r\n\r\n" %% len(head) + head)
while True:
    threading.Thread(target=serve, args=(ls.accept()[0],), daemon=True).start()
"""
    % PORT
)

# In B, selected (listens on argv[2]): one connection to argv[1]:PORT; stdin lines
# "send PATH" write a request, "recv" reads one response and prints its body (the head C
# got) as JSON, "new" opens a new connection.
HEAD_CLIENT = (
    r"""
import json, socket, sys
lst = socket.socket(); lst.bind(("0.0.0.0", int(sys.argv[2]))); lst.listen(1)
def connect():
    return socket.create_connection((sys.argv[1], %d), timeout=20)
s = connect(); f = s.makefile("rb")
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "new":
        s.close(); s = connect(); f = s.makefile("rb")
    elif cmd[0] == "send":
        s.sendall(b"GET %%s HTTP/1.1\r\nHost: c\r\n\r\n" %% cmd[1].encode())
    else:
        assert f.readline().startswith(b"HTTP/1.1 200")
        n = 0
        while (h := f.readline()) != b"\r\n":
            if h.lower().startswith(b"content-length:"):
                n = int(h.split(b":")[1])
        print(json.dumps(f.read(n).decode()), flush=True)
"""
    % PORT
)


def test_client_with_a_request_in_flight_at_start_is_left_alone(tmp_path):
    """A client socket whose request is still unanswered when the agent starts could be
    mid-body or mid-exchange: the adoption iterator skips it ('in_flight'). It keeps
    working, untouched (no header on its later requests either), while a new connection
    of the same process is instrumented."""
    with Topology(["b", "c"], prefix="obip") as topo:
        b, c = topo["b"], topo["c"]
        server = c.popen([sys.executable, "-c", HEAD_ECHO_SERVER], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "listening"
        client = b.popen(
            [sys.executable, "-c", HEAD_CLIENT, c.addr, str(CLIENT_PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout.readline().strip() == "ready"

        def say(cmd: str) -> str | None:
            client.stdin.write(cmd + "\n")
            client.stdin.flush()
            return json.loads(client.stdout.readline()) if cmd == "recv" else None

        agent = None
        try:
            say("send /before")
            assert "traceparent" not in say("recv").lower()
            say("send /slow")  # answered in 3 s: in flight while the agent starts
            agent = Agent(b, tmp_path)
            if not agent.dp.adopted:
                pytest.skip("kernel feature missing: BPF TCP iterator (iter/tcp) with sock_hash updates")
            assert agent.dp.adopted["in_flight"] == 1 and agent.dp.adopted["client"] == 0, agent.dp.adopted
            assert say("recv").startswith("GET /slow HTTP/1.1\r\nHost: c")
            say("send /after")
            got = say("recv")
            assert got == "GET /after HTTP/1.1\r\nHost: c", got  # byte for byte, no header
            say("new")
            say("send /fresh")
            got = say("recv")
            assert got.startswith("GET /fresh HTTP/1.1\r\nTraceparent: 00-"), got
            spans = agent.wait(lambda s: s.kind == SpanKind.CLIENT)
            assert [s.path for s in spans] == ["/fresh"]
        finally:
            if agent:
                agent.stop()
            client.kill()
            server.kill()
