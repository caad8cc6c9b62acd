"""Userspace datapath end to end: A -> B -> C in namespaces, the datapath in B's and C's netns.

Everything asserted is real: the header C received, the spans the agents emitted (JSON
lines of `python3 -m obi.fallback`), bytes and SHA-256 of echoed bodies, iptables state.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from obi.demo.topology import Topology
from obi.fallback.socket_owners import MISS_REFRESH_S
from tests.helpers.skips import skip_module_unless_nfqueue

pytestmark = pytest.mark.root

PORT = 8080
CLIENT_PORT = 8081  # a selected "client" process in B listens here so its calls are instrumented
TP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TP_SPAN = "00f067aa0ba902b7"


skip_module_unless_nfqueue("NFQUEUE, connmark, TCPMSS targets")


class Agent:
    """`python3 -m obi.fallback` inside a host; collects its span lines."""

    def __init__(self, host, ports: str = f"{PORT},{CLIENT_PORT}", propagation: str = "headers", env=None):
        self.host = host
        self.proc = host.popen(
            [sys.executable, "-m", "obi.fallback", "--ports", ports, "--propagation", propagation],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.lines.get(timeout=0.5) == "ready":
                    break
            except queue.Empty:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("agent did not start: " + "".join(self.stderr))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def spans(self, wait: float = 0.5) -> list[dict]:
        time.sleep(wait)
        out = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return out
            if line.startswith("{") and '"span_id"' in line:
                out.append(json.loads(line))

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        stats = {}
        for span_or_stats in list(self.lines.queue):
            if span_or_stats.startswith('{"stats"'):
                stats = json.loads(span_or_stats)["stats"]
        return stats


def rules_of(host) -> str:
    out = ""
    for tool in ("iptables", "ip6tables"):
        out += host.run([tool, "-t", "mangle", "-S"]).stdout
    return out


def wait_port(host, addr: str, port: int, timeout: float = 10) -> None:
    script = f"""
import socket, time
deadline = time.monotonic() + {timeout}
while True:
    try:
        socket.create_connection(({addr!r}, {port}), timeout=1).close(); break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.1)
"""
    host.run([sys.executable, "-c", script], timeout=timeout + 5)


# C: the demo service's handler on a dual-stack socket (the demo binds IPv4 only).
DUAL_STACK_SERVER = f"""
import socket
from http.server import ThreadingHTTPServer
from obi.demo.app import _Handler
class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
Server(("::", {PORT}), _Handler).serve_forever()
"""


@pytest.fixture
def topo():
    with Topology(["a", "b", "c"], prefix="obiu") as t:
        c, b = t["c"], t["b"]
        c.popen([sys.executable, "-c", DUAL_STACK_SERVER], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        b.popen(
            [
                sys.executable,
                "-m",
                "obi.demo.app",
                "serve",
                "--port",
                str(PORT),
                "--downstream",
                f"http://{c.addr}:{PORT}",
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_port(t["a"], c.addr, PORT)
        wait_port(t["a"], b.addr, PORT)
        yield t


@pytest.fixture
def agents(topo):
    started = []
    try:
        for name in ("b", "c"):
            started.append(Agent(topo[name]))
        yield {"b": started[0], "c": started[1]}
    finally:
        for agent in started:
            agent.stop()


def run_py(host, script: str, timeout: float = 120) -> dict:
    r = host.run([sys.executable, "-c", script], timeout=timeout, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _get_script(url: str, tp: str | None, n: int = 1) -> str:
    hdr = {"traceparent": tp} if tp else {}
    return f"""
import json, urllib.request
out = []
for i in range({n}):
    req = urllib.request.Request({url!r}, headers={hdr!r})
    with urllib.request.urlopen(req, timeout=20) as r:
        out.append(json.loads(r.read()))
print(json.dumps(out))
"""


def _by_kind(spans, kind):
    return [s for s in spans if s["kind"] == kind]


@pytest.mark.parametrize("incoming", [True, False])
def test_a_b_c_header_and_span_links(topo, agents, incoming):
    tp = f"00-{TP_TRACE}-{TP_SPAN}-01" if incoming else None
    (answer,) = run_py(topo["a"], _get_script(f"http://{topo['b'].addr}:{PORT}/work", tp))
    # What C received: exactly one Traceparent, right after the request line (first header).
    c_headers = answer["downstream"]["body"]["headers"]
    assert c_headers[0][0] == "Traceparent"
    assert sum(1 for k, _ in c_headers if k.lower() == "traceparent") == 1
    _, trace_id, parent_id, flags = c_headers[0][1].split("-")

    b_spans, c_spans = agents["b"].spans(), agents["c"].spans()
    (b_server,) = _by_kind(b_spans, "SERVER")
    (b_client,) = _by_kind(b_spans, "CLIENT")
    (c_server,) = _by_kind(c_spans, "SERVER")
    if incoming:
        assert b_server["trace_id"] == TP_TRACE and b_server["parent_span_id"] == TP_SPAN
    else:
        assert b_server["parent_span_id"] == "" and not b_server["propagated"]
    assert b_client["trace_id"] == b_server["trace_id"] == c_server["trace_id"] == trace_id
    assert b_client["parent_span_id"] == b_server["span_id"]
    assert parent_id == b_client["span_id"] and c_server["parent_span_id"] == b_client["span_id"]
    assert (b_server["method"], b_server["path"], b_server["status"]) == ("GET", "/work", 200)
    assert (b_client["path"], b_client["status"], c_server["path"]) == ("/headers", 200, "/headers")
    assert b_client["peer_addr"] == topo["c"].addr and b_client["peer_port"] == PORT
    assert c_server["peer_addr"] == topo["b"].addr and c_server["datapath"] == "userspace"


ECHO_CLIENT = """
import hashlib, http.client, json, socket, sys
# Listening on a watched port makes this process "selected": its calls get headers.
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {client_port})); srv.listen()
sizes = {sizes!r}
results = []
for family_addr in {addrs!r}:
    conn = http.client.HTTPConnection(family_addr, {port}, timeout=30)
    for n in sizes:
        body = bytes((i * 7 + n) & 0xFF for i in range(n))
        conn.request("POST", "/echo", body=body, headers={{"Content-Type": "application/octet-stream"}})
        r = conn.getresponse(); data = r.read()
        results.append([family_addr, n, r.status, hashlib.sha256(body).hexdigest(), r.getheader("X-Body-Sha256"),
                        hashlib.sha256(data).hexdigest()])
    # chunked request body
    chunks = [b"a" * 1000, b"GET /not-a-request HTTP/1.1\\r\\n\\r\\n", b"z" * 70000]
    conn.request("POST", "/echo", body=iter(chunks), encode_chunked=True)
    r = conn.getresponse(); data = r.read()
    whole = b"".join(chunks)
    results.append([family_addr, -1, r.status, hashlib.sha256(whole).hexdigest(), r.getheader("X-Body-Sha256"),
                    hashlib.sha256(data).hexdigest()])
    conn.close()
print(json.dumps(results))
"""

SIZES = [0, 1, 100, 1300, 1460, 4096, 65536, 300000, 1 << 20]


def echo_check(topo, sizes=SIZES, timeout=120) -> list:
    c = topo["c"]
    script = ECHO_CLIENT.format(client_port=CLIENT_PORT, sizes=sizes, addrs=[c.addr, c.addr6], port=PORT)
    results = run_py(topo["b"], script, timeout=timeout)
    for addr, n, status, sent, c_saw, got in results:
        assert status == 200, (addr, n)
        assert sent == c_saw == got, f"body of {n} bytes via {addr} changed"
    return results


def test_bodies_0_to_1mib_echoed_ipv4_and_ipv6(topo, agents):
    results = echo_check(topo)
    assert len(results) == 2 * (len(SIZES) + 1)
    b_spans = agents["b"].spans()
    clients = [s for s in _by_kind(b_spans, "CLIENT") if s["local_port"] != PORT]
    # One client span per request, every one with status 200, v4 and v6.
    assert len(clients) == len(results) and {s["status"] for s in clients} == {200}
    assert {ipaddress.ip_address(s["peer_addr"]) for s in clients} == {
        ipaddress.ip_address(topo["c"].addr),
        ipaddress.ip_address(topo["c"].addr6),
    }
    stats = agents["b"].stop()
    assert stats["headers_inserted"] == len(results) and stats["handler_errors"] == 0


def test_loss_and_reordering_transfers_complete(topo, agents):
    """5% of segments dropped (both ways, inside B and C) + netem reordering: all bodies intact."""
    drop = ["-p", "tcp", "-m", "statistic", "--mode", "random", "--probability", "0.05", "-j", "DROP"]
    added = []
    try:
        for name in ("b", "c"):
            for tool in ("iptables", "ip6tables"):
                topo[name].run([tool, "-I", "INPUT", *drop])
                added.append((name, tool))
        topo["c"].run(
            ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "2ms", "reorder", "75%", "50%"], check=False
        )
        echo_check(topo, sizes=[0, 100, 65536, 1 << 20], timeout=240)
    finally:
        for name, tool in added:
            topo[name].run([tool, "-D", "INPUT", *drop], check=False)
        topo["c"].run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
    assert agents["b"].stop()["headers_inserted"] >= 10


def test_stop_removes_rules_and_cleanup_removes_leftovers(topo):
    b = topo["b"]
    agent = Agent(b)
    assert "obi-fallback" in rules_of(b)
    # A rule that is not ours must survive.
    b.run(
        [
            "iptables",
            "-t",
            "mangle",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "9",
            "-m",
            "comment",
            "--comment",
            "someone-else",
            "-j",
            "ACCEPT",
        ]
    )
    agent.stop()
    assert "obi-fallback" not in rules_of(b) and "someone-else" in rules_of(b)
    agent = Agent(b)
    agent.proc.kill()
    agent.proc.wait()
    assert "obi-fallback" in rules_of(b)
    out = b.run([sys.executable, "-m", "obi.fallback", "--cleanup"]).stdout
    assert "removed" in out
    assert "obi-fallback" not in rules_of(b) and "someone-else" in rules_of(b)


def test_kill_9_under_load_keeps_traffic_flowing(topo, agents):
    load = f"""
import json, threading, time, urllib.request
ok, fail, stop = [0], [0], time.monotonic() + 6
def worker():
    while time.monotonic() < stop:
        try:
            with urllib.request.urlopen("http://{topo["b"].addr}:{PORT}/work", timeout=15) as r:
                r.read(); ok[0] += 1
        except Exception:
            fail[0] += 1
ts = [threading.Thread(target=worker) for _ in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({{"ok": ok[0], "fail": fail[0]}}))
"""
    runner = topo["a"].popen([sys.executable, "-c", load], stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    for agent in agents.values():
        agent.proc.kill()
    out, _ = runner.communicate(timeout=60)
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["ok"] > 50
    # After the kill, new connections must work with no agent at all (rules left, bypassed).
    assert "obi-fallback" in rules_of(topo["b"])
    (answer,) = run_py(topo["a"], _get_script(f"http://{topo['b'].addr}:{PORT}/work", None))
    assert answer["downstream"]["status"] == 200
    for name in ("b", "c"):
        topo[name].run([sys.executable, "-m", "obi.fallback", "--cleanup"])
    assert "obi-fallback" not in rules_of(topo["b"]) + rules_of(topo["c"])
    # Report how many failed (connections that had inserted bytes when the agent died).
    print("kill -9 under load:", counts)


def test_random_payloads_on_watched_port(topo, agents):
    script = f"""
import json, os, random, socket
rng = random.Random(5)
for i in range(60):
    s = socket.create_connection(({topo["c"].addr!r}, {PORT}), timeout=5)
    data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
    if i % 3 == 0: data = b"GET / HTTP/1.1\\r\\nContent-Length: zz\\r\\n\\r\\n" + data
    if i % 3 == 1: data = b"\\x16\\x03\\x01" + data
    try:
        s.sendall(data); s.shutdown(socket.SHUT_WR); s.settimeout(2)
        while s.recv(65536): pass
    except OSError: pass
    s.close()
print(json.dumps({{"done": True}}))
"""
    srv = "import socket; s=socket.socket(); s.bind(('0.0.0.0', %d)); s.listen(); " % CLIENT_PORT
    run_py(topo["b"], srv + script.replace("import json", "import json", 1))
    # The agents survived, inserted nothing into garbage, and still work.
    assert agents["b"].proc.poll() is None and agents["c"].proc.poll() is None
    (answer,) = run_py(topo["a"], _get_script(f"http://{topo['b'].addr}:{PORT}/work", None))
    assert answer["downstream"]["body"]["headers"][0][0] == "Traceparent"
    stats_b = agents["b"].stop()
    # 20 of the 60 start with a valid request line (then a bad Content-Length): those get a
    # header, like any request; random bytes and TLS-looking ones never do. +1 for /work.
    assert stats_b["headers_inserted"] == 20 + 1 and stats_b["handler_errors"] == 0


LINK_LOAD = """
import http.client, json, secrets, threading
B, PORT, THREADS, PER = {b!r}, {port}, {threads}, {per}
right, wrong, errors = [0], [0], [0]
lock = threading.Lock()
def worker():
    conn = http.client.HTTPConnection(B, PORT, timeout=30)  # keep-alive
    for _ in range(PER):
        trace = secrets.token_hex(16)
        try:
            conn.request("GET", "/work", headers={{"traceparent": f"00-{{trace}}-{{secrets.token_hex(8)}}-01"}})
            body = json.loads(conn.getresponse().read())
        except Exception:
            errors[0] += 1; conn.close(); conn = http.client.HTTPConnection(B, PORT, timeout=30); continue
        got = dict((k.lower(), v) for k, v in body["downstream"]["body"]["headers"]).get("traceparent", "")
        with lock:
            (right if got.split("-")[1:2] == [trace] else wrong)[0] += 1
ts = [threading.Thread(target=worker) for _ in range(THREADS)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({{"right": right[0], "wrong": wrong[0], "errors": errors[0]}}))
"""


@pytest.mark.parametrize("threads", [1, 8, 32])
def test_linking_accuracy_under_concurrency(topo, agents, threads):
    """Per-process linking: how often does B's outgoing call carry the trace of the request
    it serves? Ground truth: the traceparent C echoes back inside the answer of each request."""
    # ~300 requests under concurrency; 60 alone suffice for "always right" (each request takes
    # ~50 ms there, the demo's delayed ACKs, with or without the agent).
    per = 60 if threads == 1 else 300 // threads + 1
    counts = run_py(topo["a"], LINK_LOAD.format(b=topo["b"].addr, port=PORT, threads=threads, per=per), timeout=240)
    total = counts["right"] + counts["wrong"]
    accuracy = counts["right"] / total
    print(f"linking accuracy with {threads} concurrent clients: {accuracy:.3f} ({counts})")
    assert counts["errors"] == 0 and total == threads * per
    if threads == 1:
        assert accuracy == 1.0  # no concurrency: always right
    else:
        # A measurement of the per-process heuristic, not a guarantee. Seen here over repeated
        # runs: 0.70-0.92 at 8, 0.20-0.57 at 32 (scheduling decides at 32). The bounds sit
        # below those and at >= 3x what picking any in-flight request would give (~1/8, ~1/32).
        assert accuracy > {8: 0.45, 32: 0.1}[threads]


TLS_PORT = 8443
TLS_SERVER = """
import hashlib, socket, ssl, struct
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain({cert!r}, {key!r})
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {port})); srv.listen()
def exactly(s, n):
    buf = b""
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part: return None
        buf += part
    return buf
while True:
    conn, _ = srv.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as s:
            while (head := exactly(s, 4)) is not None:
                data = exactly(s, struct.unpack("!I", head)[0])
                s.sendall(hashlib.sha256(data).digest() + struct.pack("!I", len(data)) + data)
    except (OSError, ssl.SSLError):
        pass
"""

TLS_CLIENT = """
import hashlib, json, os, socket, ssl, struct
# Listening on a watched port makes this process "selected": its connections are tagged.
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {client_port})); srv.listen()
ctx = ssl.create_default_context(cafile={cert!r}); ctx.check_hostname = False
results = []
with ctx.wrap_socket(socket.create_connection(({c!r}, {port}), timeout=20)) as s:
    for n in {sizes!r}:
        data = os.urandom(n)
        s.sendall(struct.pack("!I", n) + data)
        got, want = b"", 36 + n
        while len(got) < want:
            part = s.recv(want - len(got))
            assert part, "connection closed"
            got += part
        results.append([n, hashlib.sha256(data).hexdigest(), got[:32].hex(), hashlib.sha256(got[36:]).hexdigest()])
    version = s.version()
print(json.dumps({{"results": results, "version": version}}))
"""


def test_tls_kind25_option_links_server_span(topo, tmp_path):
    """B -> C over TLS, both agents with tcp propagation: C's span is a child of B's client
    span through TCP option kind 25, the encrypted stream is untouched (TLS would fail on a
    single changed byte, and the echoed SHA-256s match) and the connection serves every turn."""
    key, cert = str(tmp_path / "k"), str(tmp_path / "c")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=c",
            "-days",
            "1",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    b, c = topo["b"], topo["c"]
    c.popen(
        [sys.executable, "-c", TLS_SERVER.format(cert=cert, key=key, port=TLS_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(topo["a"], c.addr, TLS_PORT)
    ports = f"{PORT},{CLIENT_PORT},{TLS_PORT}"
    agent_b = Agent(b, ports=ports, propagation="headers,tcp")
    agent_c = Agent(c, ports=ports, propagation="headers,tcp")
    try:
        sizes = [100, 5000, 70000, 1, 3000, 200000]
        out = run_py(b, TLS_CLIENT.format(client_port=CLIENT_PORT, cert=cert, c=c.addr, port=TLS_PORT, sizes=sizes))
        assert [r[0] for r in out["results"]] == sizes
        for n, sent, c_saw, echoed in out["results"]:
            assert sent == c_saw == echoed, f"TLS payload of {n} bytes changed"
        time.sleep(0.5)  # let the close reach both agents
        b_spans = [s for s in agent_b.spans() if s["scheme"] == "https"]
        c_spans = [s for s in agent_c.spans() if s["scheme"] == "https"]
    finally:
        stats_b, stats_c = agent_b.stop(), agent_c.stop()
    clients, servers = _by_kind(b_spans, "CLIENT"), _by_kind(c_spans, "SERVER")
    # One span per request turn on each side (the handshake flights are not requests).
    assert len(clients) == len(servers) == len(sizes), (out["version"], b_spans, c_spans)
    by_trace = {s["trace_id"]: s for s in servers}
    for client in clients:
        server = by_trace[client["trace_id"]]
        assert server["parent_span_id"] == client["span_id"] and server["propagated"]
        # Same marks as the kernel path's TLS spans (exported as obi.tls / obi.tcp_option).
        assert server["extra"] == {"tls": True, "tcp_option": True}
        assert client["extra"] == {"tls": True, "tcp_option": True}
        assert client["method"] == server["method"] == "" and client["peer_port"] == TLS_PORT
        assert server["peer_addr"] == b.addr and server["start_ns"] <= server["end_ns"]
    assert stats_b["headers_inserted"] == 0 and stats_b["tcp_options_written"] >= len(sizes)
    assert stats_c["tcp_options_read"] >= len(sizes) and stats_b["handler_errors"] == stats_c["handler_errors"] == 0


# A selected client on B with one keep-alive connection to C; one request per line on stdin
# ("req <n>"), one JSON line per answer on stdout; C echoes the headers it received.
KEEPALIVE_CLIENT = """
import http.client, json, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {client_port})); srv.listen()
conn = http.client.HTTPConnection({c!r}, {port}, timeout={timeout})
for line in sys.stdin:
    n = line.split()[1]
    try:
        conn.request("GET", "/headers?n=" + n, headers={{"X-Seq": n}})
        r = conn.getresponse(); heads = json.loads(r.read())["headers"]
        out = {{"n": n, "status": r.status, "headers": heads}}
    except Exception as e:
        out = {{"n": n, "error": type(e).__name__ + ": " + str(e)}}
    print(json.dumps(out), flush=True)
"""


class KeepAliveClient:
    def __init__(self, topo, timeout: float = 30):
        script = KEEPALIVE_CLIENT.format(client_port=CLIENT_PORT, c=topo["c"].addr, port=PORT, timeout=timeout)
        self.proc = topo["b"].popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.sent = 0
        wait_port(topo["b"], "127.0.0.1", CLIENT_PORT)
        # The agent looks for newly selected processes at most every MISS_REFRESH_S; past
        # that, the first SYN of this client finds it listening on a watched port.
        time.sleep(MISS_REFRESH_S + 0.1)

    def send(self) -> None:
        self.sent += 1
        self.proc.stdin.write(f"req {self.sent}\n")
        self.proc.stdin.flush()

    def answer(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "client died"
        out = json.loads(line)
        if "error" not in out:
            # The request arrived intact: its own header is there, exactly once, unshifted.
            heads = dict((k.lower(), v) for k, v in out["headers"])
            assert heads.get("x-seq") == out["n"], out
        return out

    def request(self) -> dict:
        self.send()
        return self.answer()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _has_traceparent(answer: dict) -> bool:
    return any(k.lower() == "traceparent" for k, _ in answer["headers"])


def test_keepalive_with_inserted_headers_survives_clean_stop(topo):
    """SIGTERM while a keep-alive connection that carries inserted headers is in use: the
    agent stops inserting but keeps translating until the connection closes."""
    agent = Agent(topo["b"])
    client = KeepAliveClient(topo)
    try:
        first = client.request()
        assert first["status"] == 200 and _has_traceparent(first)
        agent.proc.terminate()  # draining from here on
        time.sleep(0.3)
        later = [client.request() for _ in range(10)]
        assert all(a.get("status") == 200 for a in later), later
        assert not any(_has_traceparent(a) for a in later)  # draining: nothing more inserted
        assert agent.proc.poll() is None  # still translating for the open connection
        client.close()
        agent.proc.wait(timeout=10)  # the connection closed: the drain ends early
    finally:
        stats = agent.stop()
        if client.proc.poll() is None:
            client.proc.kill()
    assert stats["drain_left"] == 0 and stats["headers_inserted"] == 1
    assert "obi-fallback" not in rules_of(topo["b"])


def test_keepalive_with_inserted_headers_resumed_after_kill_9(topo):
    """kill -9 with a keep-alive connection that carries inserted headers: its packets are
    held (not passed untranslated, which would shift the peer's stream); a restarted agent
    resumes the translation from the shift journal and the same connection goes on."""
    agent = Agent(topo["b"])
    client = KeepAliveClient(topo)
    try:
        first = client.request()
        assert first["status"] == 200 and _has_traceparent(first)
        agent.proc.kill()
        agent.proc.wait()
        client.send()  # sent while no agent runs: held by the rules, retransmitted later
        time.sleep(1.0)
        agent = Agent(topo["b"])
        second = client.answer()
        assert second.get("status") == 200, second
        assert not _has_traceparent(second)  # the resumed connection's framing is unknown
        assert all(client.request()["status"] == 200 for _ in range(3))
        client.close()
    finally:
        stats = agent.stop()
        if client.proc.poll() is None:
            client.proc.kill()
    assert stats["flows_resumed"] == 1 and stats["handler_errors"] == 0
    assert "obi-fallback" not in rules_of(topo["b"])


def test_cleanup_after_kill_9_resets_connections_with_inserted_headers(topo):
    """No agent coming back: `cleanup` resets the held connection, so the application gets
    an error at once instead of a stall (and never a corrupted stream)."""
    agent = Agent(topo["b"])
    client = KeepAliveClient(topo, timeout=20)
    try:
        assert _has_traceparent(client.request())
        agent.proc.kill()
        agent.proc.wait()
        out = topo["b"].run([sys.executable, "-m", "obi.fallback", "--cleanup"]).stdout
        assert "reset connection" in out and "obi-fallback" not in rules_of(topo["b"])
        t0 = time.monotonic()
        answer = client.request()
        assert "error" in answer and time.monotonic() - t0 < 5, answer
        client.close()
    finally:
        if client.proc.poll() is None:
            client.proc.kill()


def _slow_iptables(tmp_path, delay: float) -> dict:
    """An environment whose iptables/ip6tables take `delay` seconds more for each rule they
    add or delete: what a busy node's iptables lock does. Makes the gap a restarting agent
    leaves between the old rules and its own seconds long instead of milliseconds."""
    import shutil as sh

    bindir = tmp_path / "slowbin"
    bindir.mkdir()
    for tool in ("iptables", "ip6tables"):
        real = sh.which(tool)
        script = bindir / tool
        script.write_text(
            f'#!/bin/sh\ncase " $* " in *" -A "*|*" -D "*|*" -I "*) sleep {delay};; esac\nexec {real} "$@"\n'
        )
        script.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


def test_restarted_agent_never_lets_a_shifted_connection_pass_untranslated(topo, tmp_path):
    """Issue 12, finding 2. kill -9 (an OOM kill, say) with a keep-alive connection that
    carries inserted headers, then a new agent starts while requests keep going on it. The
    new agent must bind the queues and add its rules before it removes the dead one's:
    in between, the connection's packets would pass untranslated and C would read requests
    at the wrong stream offset. Every request must come back intact."""
    agent = Agent(topo["b"])
    client = KeepAliveClient(topo, timeout=60)
    answers, stop = [], threading.Event()
    try:
        assert _has_traceparent(client.request())
        agent.proc.kill()
        agent.proc.wait()

        def keep_asking():
            while not stop.is_set():
                try:
                    answers.append(client.request())
                except (AssertionError, ValueError) as e:  # a changed request, or the client died
                    answers.append({"error": repr(e)})
                    return

        asker = threading.Thread(target=keep_asking, daemon=True)
        asker.start()
        agent = Agent(topo["b"], env=_slow_iptables(tmp_path, 0.25))
        time.sleep(1.0)
        stop.set()
        asker.join(90)
        client.close()
    finally:
        stats = agent.stop()
        if client.proc.poll() is None:
            client.proc.kill()
    failed = [a for a in answers if a.get("status") != 200]
    assert answers and not failed, failed[:3]
    assert stats["flows_resumed"] == 1 and stats["handler_errors"] == 0


def test_cleanup_leaves_a_running_agent_and_its_connections_alone(topo):
    """Issue 12, finding 11. `obi cleanup` (here `python -m obi.fallback --cleanup`) while an
    agent runs: its rules stay, and its connection with inserted headers is neither reset nor
    left untranslated (it keeps working)."""
    agent = Agent(topo["b"])
    client = KeepAliveClient(topo, timeout=20)
    try:
        assert _has_traceparent(client.request())
        before = rules_of(topo["b"])
        out = topo["b"].run([sys.executable, "-m", "obi.fallback", "--cleanup"]).stdout
        assert "reset connection" not in out and "removed" not in out, out
        assert rules_of(topo["b"]) == before
        later = [client.request() for _ in range(3)]
        assert all(a.get("status") == 200 for a in later), later
        client.close()
    finally:
        stats = agent.stop()
        if client.proc.poll() is None:
            client.proc.kill()
    assert stats["handler_errors"] == 0
    assert "obi-fallback" not in rules_of(topo["b"])


CONNECT = """
import socket, sys, time, json
t0 = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print(json.dumps({"ok": True, "s": time.monotonic() - t0}))
except OSError as e:
    print(json.dumps({"ok": False, "s": time.monotonic() - t0, "error": str(e)}))
"""


def test_syns_of_processes_nobody_selected_do_not_wait_for_the_agent(topo):
    """Issue 12, finding 5. With the agent stopped (SIGSTOP, as when it is stuck), a process
    in B's network namespace but outside the cgroups of the selected processes connects at
    once: its SYN is not queued. Before, every outgoing SYN of the namespace waited for the
    agent's verdict."""
    agent = Agent(topo["b"])
    try:
        os.kill(agent.proc.pid, signal.SIGSTOP)
        # `ip netns exec` directly, not topo["b"].run: this process stays in the test's cgroup.
        r = subprocess.run(
            ["ip", "netns", "exec", topo["b"].netns, sys.executable, "-c", CONNECT, topo["c"].addr, str(PORT), "5"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        out = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
        agent.stop()
    assert out["ok"] and out["s"] < 1.0, out


MANY_SYNS = """
import json, resource, select, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {client_port})); srv.listen()  # selected: listens on a watched port
print("ready", flush=True)
sys.stdin.readline()  # the agent is stopped now
socks = []
for _ in range({n}):
    s = socket.socket(); s.setblocking(False)
    s.connect_ex(({c!r}, {port}))
    socks.append(s)
poller = select.poll()
for s in socks:
    poller.register(s, select.POLLOUT)
deadline = time.monotonic() + 5
done = set()
while time.monotonic() < deadline and len(done) < len(socks):
    for fd, _ in poller.poll(200):
        poller.unregister(fd)
        s = socket.socket(fileno=fd)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            done.add(fd)
        s.detach()
print(json.dumps({{"connected": len(done)}}), flush=True)
"""

SINK = """
import socket, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {port})); srv.listen(8192)
conns = []
while True:
    conns.append(srv.accept()[0])
"""


def test_syns_of_selected_processes_pass_when_the_agent_is_behind(topo):
    """Issue 12, finding 5: fail open. The agent is stopped while a selected process opens
    more connections than the queue holds (4,096): the SYNs beyond it pass untraced
    instead of being dropped (the sync queue they used to go to is not fail-open)."""
    sink_port = 9097
    topo["c"].popen([sys.executable, "-c", SINK.format(port=sink_port)], stdout=subprocess.DEVNULL)
    wait_port(topo["a"], topo["c"].addr, sink_port)
    agent = Agent(topo["b"])
    client = topo["b"].popen(
        [sys.executable, "-c", MANY_SYNS.format(client_port=CLIENT_PORT, n=4400, c=topo["c"].addr, port=sink_port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # the rescan has seen it
        os.kill(agent.proc.pid, signal.SIGSTOP)
        client.stdin.write("go\n")
        client.stdin.flush()
        out = json.loads(client.stdout.readline())
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
        client.kill()
        agent.stop()
    assert out["connected"] >= 200, out
