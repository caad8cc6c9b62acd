"""Kernel path: what must pass untouched, and pipelining.

- Pipelined HTTP/1.1 requests written in one write each get their own Traceparent
  (inserted after each request line) and their own linked spans.
- Non-HTTP/1.x bytes on watched ports pass byte for byte (echo compared exactly):
  HTTP/2 prior knowledge (`PRI * HTTP/2.0` preface + frames), binary, and text that starts
  like a request line but is not HTTP/1.x. Nothing is inserted (counters), and the
  connections stay usable.
The sending process in B is selected (it listens on CLIENT_PORT), C's services listen on
watched ports, agents run on B and C.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from obi.demo.topology import Topology
from obi.model import SpanKind
from tests.helpers.kernel_agent import Agent
from tests.helpers.skips import skip_module_unless_kernel_path
from tests.helpers.traffic import READ_RESPONSE_SRC

pytestmark = pytest.mark.root


skip_module_unless_kernel_path()

HTTP_PORT, CLIENT_PORT, ECHO_PORT = 8080, 8081, 8082
PORTS = f"{HTTP_PORT},{CLIENT_PORT},{ECHO_PORT}"

ECHO = r"""
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8082)); s.listen(16)
print("listening", flush=True)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d:
            return c.close()
        c.sendall(d)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

# Runs in B (selected: listens on CLIENT_PORT). argv[1] = C's address.
CLIENT = (
    READ_RESPONSE_SRC
    + r"""
import json, os, socket, sys
lst = socket.socket(); lst.bind(("0.0.0.0", 8081)); lst.listen(1)
sys.stdin.readline()  # the test says go once the agent has selected us
c_addr = sys.argv[1]
out = {}

def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            break
        buf += d
    return buf

# Byte-exact echoes on one connection per payload kind, several rounds each.
h2 = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # SETTINGS
      + bytes.fromhex("0000080600000000000102030405060708"))                    # PING
payloads = {
    "h2c": [h2, bytes.fromhex("000005000100000001") + b"hello"],
    "binary": [os.urandom(5000), bytes(range(256)) * 8],
    "fake_request": [b"GET / HTTP/3.0\r\nX: y\r\n\r\n", b"HELLO WORLD\r\n\r\n", b"POST /x HTTP/1.1"],
}
for kind, chunks in payloads.items():
    s = socket.create_connection((c_addr, 8082), timeout=10)
    ok = True
    for rnd in range(3):
        for ch in chunks:
            s.sendall(ch)
            ok &= recv_exact(s, len(ch)) == ch
    s.close()
    out[kind] = ok

# Three pipelined requests in one write; responses parsed by Content-Length.
s = socket.create_connection((c_addr, 8080), timeout=10)
s.sendall(b"".join(f"GET /headers?p={i} HTTP/1.1\r\nHost: c\r\n\r\n".encode() for i in range(3)))
f = s.makefile("rb")
bodies = [read_response(f) for _ in range(3)]
out["pipelined"] = [b["headers"] for b in bodies]
print(json.dumps(out), flush=True)
"""
)


def test_untouched_and_pipelined(tmp_path):
    with Topology(["b", "c"], prefix="obik") as topo:
        b, c = topo["b"], topo["c"]
        for argv in (
            [sys.executable, "-m", "obi.demo.app", "serve", "--port", str(HTTP_PORT)],
            [sys.executable, "-c", ECHO],
        ):
            p = c.popen(argv, stdout=subprocess.PIPE, text=True)
            assert "listening" in p.stdout.readline()
        agent_c = Agent(c, tmp_path, propagation="all", ports=PORTS)
        agent_b = Agent(b, tmp_path, propagation="all", ports=PORTS)
        try:
            r = _run_selected_client(b, c.addr, agent_b)
            assert r["h2c"] and r["binary"] and r["fake_request"], r
            tps = [[v for k, v in hdrs if k.lower() == "traceparent"] for hdrs in r["pipelined"]]
            assert all(len(t) == 1 for t in tps), tps
            assert all(hdrs[0][0] == "Traceparent" for hdrs in r["pipelined"])  # right after the request line
            span_ids = [t[0].split("-")[2] for t in tps]
            assert len(set(span_ids)) == 3

            b_clients = {s.span_id: s for s in agent_b.wait_count(SpanKind.CLIENT, 3) if s.path.startswith("/headers")}
            assert set(span_ids) <= set(b_clients), (span_ids, b_clients)
            c_http = [s for s in agent_c.wait_count(SpanKind.SERVER, 3) if s.path.startswith("/headers")]
            assert sorted(s.path for s in c_http) == [f"/headers?p={i}" for i in range(3)]
            assert all(b_clients[s.parent_span_id].trace_id == s.trace_id for s in c_http)
            # Only the three pipelined requests got headers; the other streams were given up.
            sb, sc = agent_b.dp.stats(), agent_c.dp.stats()
            assert sb["headers_inserted"] == 3 and sb["insert_failed"] == 0, sb
            assert sb["parse_lost"] >= 3 and sc["parse_lost"] >= 3, (sb, sc)
            # No span was made of the non-HTTP connections.
            assert all(s.local_port != ECHO_PORT and s.peer_port != ECHO_PORT for s in agent_b.spans + agent_c.spans)
        finally:
            agent_b.stop()
            agent_c.stop()


def _run_selected_client(b, c_addr: str, agent_b: Agent) -> dict:
    """Start CLIENT in B, wait until the agent selected it (its listening port makes it
    so), then let it run; returns its JSON output."""
    proc = b.popen([sys.executable, "-c", CLIENT, c_addr], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while proc.pid not in agent_b.dp.selected_pids:
        assert time.monotonic() < deadline, f"client {proc.pid} never selected: {agent_b.dp.selected_pids}"
        time.sleep(0.05)
        agent_b.dp.scan_now()
    out, _ = proc.communicate("go\n", timeout=60)
    return json.loads(out)


# Runs in B. argv: listen port (0: none, so the process is not selected), the bytes to
# send, then "connect HOST PORT" or "serve PORT". Sends the bytes twice, each time waiting
# for their echo, prints the socket cookie of its connection, then holds it open until
# stdin closes.
COOKIE_PROC = r"""
import socket, struct, sys
SO_COOKIE = 57
if int(sys.argv[1]):
    lst = socket.socket(); lst.bind(("0.0.0.0", int(sys.argv[1]))); lst.listen(1)
first = sys.argv[2].encode().decode("unicode_escape").encode("latin-1")
sys.stdin.readline()  # the test says go once the agent has scanned
if sys.argv[3] == "connect":
    s = socket.create_connection((sys.argv[4], int(sys.argv[5])), timeout=10)
else:
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[4]))); srv.listen(1)
    print("listening", flush=True)
    s = srv.accept()[0]
for _ in range(2):  # after a given-up write, tc releases the socket at the next packet
    s.sendall(first)
    got = b""
    while len(got) < len(first) or not got.endswith(first[-4:]):  # (a request: + header)
        got += s.recv(65536)
print(struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0], flush=True)
sys.stdin.read()
"""


def test_only_selected_client_sockets_join_the_sockhash(tmp_path):
    """A socket in a sockmap reads and writes through the kernel's tcp_bpf code (with its
    own bugs: a blocking read may fail with EAGAIN), so the agent keeps its sock_hash to
    what it must inject into: client sockets that a selected process connected, as long as
    they carry HTTP/1.x. Server sockets (followed by tc) and other processes' sockets never
    join it; a selected process's socket whose first write is not HTTP leaves it."""
    with Topology(["b", "c"], prefix="obis") as topo:
        b, c = topo["b"], topo["c"]
        echo = c.popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
        assert echo.stdout.readline().strip() == "listening"
        agent = Agent(b, tmp_path, ports=PORTS)
        request = r"GET /x HTTP/1.1\r\nHost: c\r\n\r\n"

        def proc(listen: int, first: str, *how: str) -> subprocess.Popen:
            return b.popen(
                [sys.executable, "-c", COOKIE_PROC, str(listen), first, *how],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )

        procs = {
            "selected_http_client": proc(CLIENT_PORT, request, "connect", c.addr, "8082"),
            "selected_binary_client": proc(ECHO_PORT, r"\x00\x01binary", "connect", c.addr, "8082"),
            "other_client": proc(0, request, "connect", c.addr, "8082"),
            "server": proc(0, "ping", "serve", str(HTTP_PORT)),
        }
        try:
            time.sleep(0.3)  # the processes bound their listening sockets
            agent.dp.scan_now()
            for p in procs.values():
                p.stdin.write("go\n")
                p.stdin.flush()
            assert procs["server"].stdout.readline().strip() == "listening"
            agent.dp.scan_now()  # the server's port is watched: its process is selected too
            c.popen(
                [
                    sys.executable,
                    "-c",
                    f"import socket;s=socket.create_connection(('{b.addr}',{HTTP_PORT}));"
                    "[s.sendall(s.recv(4)) for _ in range(2)];s.recv(1)",
                ]
            )
            cookies = {name: int(p.stdout.readline()) for name, p in procs.items()}
            in_hash = {int.from_bytes(k, "little") for k in agent.dp._objs["tpinjector"].map("sock_hash").keys()}
            assert cookies["selected_http_client"] in in_hash
            assert cookies["selected_binary_client"] not in in_hash
            assert agent.dp.stats()["socks_released"] == 1
            assert cookies["other_client"] not in in_hash
            assert cookies["server"] not in in_hash
        finally:
            for p in procs.values():
                p.kill()
            agent.stop()
            echo.kill()
