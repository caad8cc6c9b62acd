"""Kernel path: a large write that the socket accepts only in part.

The kernel hands one sendmsg to sk_msg in pieces (~540 KiB each). When TCP takes only part
of a piece (a non-blocking socket - any Python socket with a timeout - whose send buffer
filled), the rest of the piece is freed, send() returns a short count and the verdict stays
"pass": the application's next sendmsg (the rest, again) goes out without sk_msg seeing it.
Before the fix the parser still expected those body bytes, took the next request on the
connection for body and gave it no header and no span (the parity suite's "bodies" flake
after bodies >= ~700 kB). Now sk_msg compares the socket's write_seq with what it saw.

C's server reads slowly so that B's send buffer really fills. Asserted on the bytes C
received (one Traceparent right after every request line), on B's client spans (every id C
received), and on the counters (unseen sends happened, nothing was given up).
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

PORT, CLIENT_PORT = 8080, 8081

# C: answers each request with the request head it received (JSON list of its lines),
# after reading the body (Content-Length or chunked) in small, slow reads.
SLOW_SERVER = r"""
import json, socket, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(16)
print("listening", flush=True)
class Conn:
    def __init__(self, c): self.c, self.buf = c, b""
    def fill(self, n=16384):
        d = self.c.recv(n)
        if not d: raise EOFError
        self.buf += d
        time.sleep(0.0005)  # slow reader: the sender's buffer fills meanwhile
    def until(self, mark):
        while mark not in self.buf: self.fill()
        i = self.buf.index(mark) + len(mark); out, self.buf = self.buf[:i], self.buf[i:]; return out
    def skip(self, n):
        while len(self.buf) < n: self.fill()
        self.buf = self.buf[n:]
def serve(c):
    conn = Conn(c)
    try:
        while True:
            lines = conn.until(b"\r\n\r\n").decode("latin-1").split("\r\n")[:-2]
            hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            time.sleep(0.2)
            if hdrs.get("transfer-encoding") == "chunked":
                while True:
                    n = int(conn.until(b"\r\n").split(b";")[0], 16)
                    conn.skip(n + 2) if n else conn.until(b"\r\n")
                    if not n: break
            else:
                conn.skip(int(hdrs.get("content-length", 0)))
            body = json.dumps(lines).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    except EOFError:
        c.close()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

# B: selected (listens on CLIENT_PORT). One keep-alive connection with a timeout (so the
# socket is non-blocking inside) and a small send buffer. Per size: a POST whose head and
# body go out in ONE sendall (Content-Length), or head + one chunk in one sendall and the
# last chunk in another (chunked); then a small GET. Prints the request heads C saw.
CLIENT = (
    READ_RESPONSE_SRC
    + r"""
import json, socket, sys
lst = socket.socket(); lst.bind(("0.0.0.0", 8081)); lst.listen(1)
sys.stdin.readline()
s = socket.create_connection((sys.argv[1], 8080), timeout=30)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
f = s.makefile("rb")
heads = []
for size in json.loads(sys.argv[2]):
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    s.sendall(b"POST /big/%d HTTP/1.1\r\nHost: c\r\nContent-Length: %d\r\n\r\n" % (size, size) + body)
    heads.append(read_response(f))
    s.sendall(b"POST /chunked/%d HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % (size, size)
              + body + b"\r\n")
    s.sendall(b"0\r\n\r\n")
    heads.append(read_response(f))
    s.sendall(b"GET /after/%d HTTP/1.1\r\nHost: c\r\n\r\n" % size)
    heads.append(read_response(f))
print(json.dumps(heads), flush=True)
"""
)

SIZES = [700_000, 1 << 20, 3 << 20]


def test_partial_sends_keep_the_framing(tmp_path):
    with Topology(["b", "c"], prefix="obik") as topo:
        b, c = topo["b"], topo["c"]
        p = c.popen([sys.executable, "-c", SLOW_SERVER], stdout=subprocess.PIPE, text=True)
        assert "listening" in p.stdout.readline()
        agent_b = Agent(b, tmp_path, ports=f"{PORT},{CLIENT_PORT}")
        try:
            proc = b.popen(
                [sys.executable, "-c", CLIENT, c.addr, json.dumps(SIZES)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 10
            while proc.pid not in agent_b.dp.selected_pids:
                assert time.monotonic() < deadline, "client never selected"
                time.sleep(0.05)
                agent_b.dp.scan_now()
            out, _ = proc.communicate("go\n", timeout=90)
            heads = json.loads(out)
            assert len(heads) == 3 * len(SIZES)
            missing = [
                h[0]
                for h in heads
                if not h[1].lower().startswith("traceparent:")
                or sum(x.lower().startswith("traceparent:") for x in h) != 1
            ]
            st = agent_b.dp.stats()
            assert not missing, f"requests without exactly one leading Traceparent: {missing} {st}"
            sent_ids = {h[1].split(":", 1)[1].strip().split("-")[2] for h in heads}
            clients = agent_b.wait_count(SpanKind.CLIENT, len(heads))
            assert sent_ids <= {s.span_id for s in clients}, (sent_ids, clients)
            assert st["parse_lost"] == 0 and st["headers_inserted"] == len(heads), st
            assert st["unseen_sends"] >= 1, f"no short send happened: the test did not test anything {st}"
        finally:
            agent_b.stop()
