"""The parity suite's world: A -> B -> C in namespaces, one `obi run` agent per service host.

Both datapaths run through the same mechanism, the agent as a subprocess
(`nsenter --net=<netns> python3 -m obi run`, JSON span printer on stdout), so any difference
in the results is a difference of the datapaths, not of the harness.

    A (clients) ──▶ B :8080 demoapp ──▶ C :8080 demoapp
                    B driver (listens :8081, selected)──▶ C :8082 recorder (raw bytes back)

Also imported by tests/integration/test_interop.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

from obi.demo import app as demo_service
from obi.demo.scenario import AgentProcess as DemoAgent
from obi.demo.topology import Host, Topology, have_netns_tools

PORT = 8080  # demo services on B and C
DRIVER_PORT = 8081  # the driver in B listens here: that selects it, so its requests are instrumented
RAW_PORT = 8082  # C's recorder
WATCHED = f"{PORT}-{RAW_PORT}"
PREFIX = "obiq"
DATAPATHS = ["kernel", "userspace"]
APPS = str(Path(__file__).with_name("parity_apps.py"))
HEX = set("0123456789abcdef")


def skip_reason(datapath: str) -> str:
    """ "" when `datapath` can run here, else why not (names the missing feature)."""
    why = have_netns_tools()
    if why:
        return why
    if subprocess.run(["which", "nsenter"], capture_output=True).returncode:
        return "needs nsenter (util-linux) to run the agent in a namespace"
    if datapath == "kernel":
        try:
            from obi.kernel.probes import probe_bpf_loop

            probe = probe_bpf_loop()
        except Exception as e:  # libbpf.so.1 missing, objects not built
            return f"kernel datapath unavailable: {e}"
        if not probe.ok:
            return f"kernel datapath needs bpf_loop (kernel >= 5.17): {probe.detail}"
        return ""
    try:
        from obi.fallback import _nfq  # noqa: F401
    except ImportError as e:
        return f"userspace datapath needs its NFQUEUE reader extension obi.fallback._nfq ({e}; run scripts/setup.sh)"
    if subprocess.run(["which", "iptables"], capture_output=True).returncode:
        return "userspace datapath needs iptables (NFQUEUE, connmark, TCPMSS targets)"
    return ""


class AgentProcess(DemoAgent):
    """`obi run` in one host's namespace watching the parity ports (obi.demo.AgentProcess)."""

    def __init__(self, host: Host, service: str, datapath: str, ports: str = WATCHED):
        super().__init__(host, service, datapath, ports)


class Driver:
    """parity_apps.py driver in B; run() sends one JSON job and returns the JSON answer."""

    def __init__(self, host: Host):
        self.proc = host.popen(
            [sys.executable, APPS, "driver", "--listen", str(DRIVER_PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line

    def run(self, job: dict, timeout: float = 30) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        assert box and box[0], f"driver gave no answer to {job['op']} within {timeout}s"
        out = json.loads(box[0])
        assert "error" not in out, f"driver job {job['op']} failed: {out['error']}"
        return out


def start_service(host: Host, argv: Sequence[str], ready: str = "listening") -> subprocess.Popen:
    proc = host.popen(list(argv), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert ready in line, f"{argv} did not start: {line!r}"
    return proc


def demoapp(host: Host, downstream: str = "", listen: str = "0.0.0.0") -> subprocess.Popen:
    return demo_service.start(host, PORT, downstream, listen)


class Env:
    """The topology, its services and agents for one datapath. Context manager; close() is
    safe to call after a partial start."""

    def __init__(
        self,
        datapath: str,
        agents_on: Sequence[str] = ("b", "c"),
        c_service: Callable[[Host], object] | None = None,
        driver: bool = True,
    ):
        self.datapath = datapath
        self.agents_on = agents_on
        self.c_service = c_service
        self.want_driver = driver
        self.topo = Topology(["a", "b", "c"], prefix=PREFIX)
        self.agents: dict[str, AgentProcess] = {}
        self.driver: Driver | None = None

    def __enter__(self) -> "Env":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self.topo.__enter__()
        a, b, c = self.hosts
        if self.c_service is not None:
            self.c_service(c)
        else:
            demoapp(c, listen="::")  # dual stack: the IPv6 scenarios reach it too
            start_service(c, [sys.executable, APPS, "recorder", "--port", str(RAW_PORT)])
        demoapp(b, downstream=f"http://{c.addr}:{PORT}")
        if self.want_driver:
            self.driver = Driver(b)
        # Agents start after the services (they select processes by listening port); start
        # them together, then wait for both.
        for name in self.agents_on:
            self.agents[name] = AgentProcess(self.topo[name], name.upper(), self.datapath)
        for agent in self.agents.values():
            agent.wait_attached()
            # The datapath asked for is the one attached (never a silent fallback).
            assert agent.datapath == self.datapath, agent.tail()

    @property
    def hosts(self) -> tuple[Host, Host, Host]:
        return self.topo["a"], self.topo["b"], self.topo["c"]

    def healthy(self) -> bool:
        procs = [h_proc for h in self.topo.hosts.values() for h_proc in h.procs]
        return all(p.poll() is None for p in procs) and all(a.proc.poll() is None for a in self.agents.values())

    def logs(self) -> str:
        return "\n".join(a.tail() for a in self.agents.values())

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.agents.clear()
        self.topo.close()

    # -- traffic from A ------------------------------------------------------------------

    def a_python(self, code: str, *args: str, timeout: float = 60) -> dict:
        """Run a Python snippet in A; its last stdout line is JSON."""
        r = self.topo["a"].run([sys.executable, "-c", code, *args], timeout=timeout, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    def a_raw(self, requests: list[bytes]) -> list[dict]:
        """Send raw requests from A to B over one keep-alive connection; B's JSON answers."""
        return self.a_python(_A_RAW, self.topo["b"].addr, str(PORT), json.dumps([r.decode() for r in requests]))

    def a_get(self, path: str, headers: dict[str, str] | None = None) -> dict:
        """GET B<path> from A; B's JSON answer (it embeds what C received)."""
        return self.a_python(_A_GET, f"http://{self.topo['b'].addr}:{PORT}{path}", json.dumps(headers or {}))


_A_RAW = """
import http.client, json, socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
out = []
for raw in json.loads(sys.argv[3]):
    sock.sendall(raw.encode())
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    out.append(json.loads(resp.read()))
print(json.dumps(out))
"""

_A_GET = """
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers=json.loads(sys.argv[2]))
print(urllib.request.urlopen(req, timeout=20).read().decode())
"""


# -- span checks shared by the suites ----------------------------------------------------


def is_hex_id(value: str, length: int) -> bool:
    return len(value) == length and set(value) <= HEX and value != "0" * length


def well_formed(span: dict) -> list[str]:
    """Problems with one JSON span (empty list when it is well-formed)."""
    bad = []
    if not is_hex_id(span.get("trace_id", ""), 32):
        bad.append(f"trace_id {span.get('trace_id')!r}")
    if not is_hex_id(span.get("span_id", ""), 16):
        bad.append(f"span_id {span.get('span_id')!r}")
    parent = span.get("parent_span_id", "")
    if parent and not is_hex_id(parent, 16):
        bad.append(f"parent_span_id {parent!r}")
    if span.get("kind") not in ("SERVER", "CLIENT"):
        bad.append(f"kind {span.get('kind')!r}")
    if not (0 < span.get("start_time_unix_nano", 0) <= span.get("end_time_unix_nano", -1)):
        bad.append("start/end times")
    attrs = span.get("attributes", {})
    for key in ("http.request.method", "http.response.status_code", "url.path"):
        if key not in attrs:
            bad.append(f"missing {key}")
    return bad


def traceparents(headers: list[list[str]]) -> list[tuple[int, str, str]]:
    """(position, name as received, value) of every traceparent header in a header list."""
    return [(i, k, v) for i, (k, v) in enumerate(headers) if k.lower() == "traceparent"]
