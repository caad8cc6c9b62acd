"""`obi demo`: the main job end to end on an embedded default.

Three hosts in network namespaces on one bridge (198.18.0.0/24):

    client ──HTTP──▶ service :8080 ──HTTP──▶ backend :8080

`service` and `backend` are the uninstrumented demo services of `obi.demo.app`. One agent
runs per instrumented host (as a per-node agent would), in that host's namespace, watching
port 8080 with context propagation `all` and printing spans as JSON. The client sends
requests without a trace context and with one (as an OpenTelemetry SDK would send). The
demo then prints each trace as a tree, shows the `traceparent` the backend really received
on the wire, and checks the links: it exits non-zero if a span or a link is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict

from ..agent import ATTACHED_RE
from ..model import new_span_id, new_trace_id
from ..w3c import parse_traceparent
from . import app as demoapp
from .topology import Topology, have_netns_tools

PORT = 8080


class AgentProcess:
    """`obi run` inside one host's namespace, attached to its cgroup, printing spans as
    JSON; collects them in `.spans` and its log in `.log`. (The parity and interop tests
    drive their agents through this class too.)"""

    def __init__(self, host, service_name: str, datapath: str, ports: str = str(PORT)):
        # Only what is set here: none of the caller's OTEL_* settings leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(
            OTEL_EBPF_OPEN_PORT=ports,
            OTEL_EBPF_BPF_CONTEXT_PROPAGATION="all",
            OTEL_EBPF_TRACE_PRINTER="json",
            OTEL_EBPF_DATAPATH=datapath,
            OTEL_EBPF_CGROUP_PATH=host.cgroup,
            OTEL_SERVICE_NAME=service_name,
            OTEL_EBPF_SHUTDOWN_TIMEOUT="5s",
        )
        self.name = service_name
        self.spans: list[dict] = []
        self.log: list[str] = []
        self.attached = threading.Event()
        # nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup2 mount
        # the sockops program attaches to.
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={host.netns_path}", sys.executable, "-m", "obi", "run"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read_spans, daemon=True).start()
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_spans(self) -> None:
        for line in self.proc.stdout:
            try:
                self.spans.append(json.loads(line))
            except ValueError:
                self.log.append(line.rstrip())

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            if ATTACHED_RE.search(line):
                self.attached.set()

    @property
    def datapath(self) -> str:
        """The datapath the agent attached ("kernel" or "userspace"), from its log; "" before."""
        m = next((m for m in map(ATTACHED_RE.search, self.log) if m), None)
        return m.group(1) if m else ""

    @property
    def datapath_line(self) -> str:
        """What the agent attached and why: its choice, or the fallback that followed."""
        why = ""
        for line in self.log:
            for marker in ("datapath chosen: ", "falling back"):
                if marker in line:
                    why = line.split("obi.agent: ", 1)[-1]
        return f"datapath {self.datapath or '(none attached)'}" + (f" -- {why}" if why else "")

    def wait_attached(self, timeout: float = 30) -> None:
        if not self.attached.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"agent {self.name} did not attach:\n" + "\n".join(self.log[-30:]))

    def mark(self) -> int:
        return len(self.spans)

    def wait(self, pred, n: int = 1, since: int = 0, timeout: float = 10) -> list[dict]:
        """Spans after `since` matching `pred`, once there are n of them (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            got = [s for s in self.spans[since:] if pred(s)]
            if len(got) >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def tail(self) -> str:
        return f"--- agent {self.name} log ---\n" + "\n".join(self.log[-20:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _curl(client, url: str, traceparent: str = "") -> dict:
    argv = ["curl", "-sS", "--max-time", "10", url]
    if traceparent:
        argv[1:1] = ["-H", f"traceparent: {traceparent}"]
    return json.loads(client.run(argv).stdout)


def _header(headers: list[list[str]], name: str) -> str:
    values = [v for k, v in headers if k.lower() == name]
    return values[0] if len(values) == 1 else ""


def print_tree(spans: list[dict], out=sys.stdout) -> None:
    by_trace: dict[str, list[dict]] = defaultdict(list)
    for s in spans:
        by_trace[s["trace_id"]].append(s)
    for trace_id, members in by_trace.items():
        ids = {s["span_id"] for s in members}
        children: dict[str, list[dict]] = defaultdict(list)
        for s in members:
            children[s["parent_span_id"] if s["parent_span_id"] in ids else "root"].append(s)
        print(f"trace {trace_id}", file=out)

        def walk(key: str, depth: int) -> None:
            for s in sorted(children.get(key, []), key=lambda s: s["start_time_unix_nano"]):
                a = s["attributes"]
                ms = (s["end_time_unix_nano"] - s["start_time_unix_nano"]) / 1e6
                parent = s["parent_span_id"] or "-"
                print(
                    f"{'  ' * depth}└─ {s['resource'].get('service.name', '?'):<8} {s['kind']:<6} "
                    f"{s['name']:<4} {a.get('url.path', ''):<10} {a.get('http.response.status_code', '')} "
                    f"{ms:7.2f} ms  span {s['span_id']} parent {parent}",
                    file=out,
                )
                walk(s["span_id"], depth + 1)

        walk("root", 1)


def check_links(spans: list[dict], wire: list[tuple[str, str]]) -> list[str]:
    """The demo's own verdict: every request made one linked trace of three spans."""
    problems = []
    by_id = {s["span_id"]: s for s in spans}
    for sent, received in wire:
        ctx = parse_traceparent(received)
        if ctx is None:
            problems.append(f"backend received no valid traceparent (got {received!r})")
            continue
        client = by_id.get(ctx.span_id)
        if client is None or client["kind"] != "CLIENT":
            problems.append(f"no CLIENT span {ctx.span_id} for the header the backend received")
            continue
        server = by_id.get(client["parent_span_id"])
        if server is None or server["kind"] != "SERVER":
            problems.append(f"CLIENT span {ctx.span_id} has no SERVER parent")
            continue
        up = parse_traceparent(sent) if sent else None
        if up and (server["trace_id"] != up.trace_id or server["parent_span_id"] != up.span_id):
            problems.append(f"service SERVER span did not continue the incoming {sent}")
        if not up and server["parent_span_id"]:
            problems.append("service SERVER span without incoming context is not a root")
        if not any(s["kind"] == "SERVER" and s["parent_span_id"] == ctx.span_id for s in spans):
            problems.append(f"no backend SERVER span is a child of CLIENT span {ctx.span_id}")
    return problems


def main(datapath: str = "auto", requests: int = 3, output: str = "text") -> int:
    reason = have_netns_tools()
    if reason:
        print(f"obi demo: {reason}", file=sys.stderr)
        return 2
    with Topology(["client", "service", "backend"], prefix="obidemo") as topo:
        client, service, backend = topo["client"], topo["service"], topo["backend"]
        demoapp.start(backend, PORT)
        demoapp.start(service, PORT, downstream=f"http://{backend.addr}:{PORT}")
        agents = [AgentProcess(service, "service", datapath), AgentProcess(backend, "backend", datapath)]
        try:
            for agent in agents:
                if not agent.attached.wait(30):
                    print(f"obi demo: the {agent.name} agent did not attach:", file=sys.stderr)
                    print("\n".join(agent.log[-20:]), file=sys.stderr)
                    return 1
            print(f"topology: client {client.addr} -> service {service.addr}:{PORT} -> backend {backend.addr}:{PORT}")
            for agent in agents:
                print(f"agent on {agent.name}: {agent.datapath_line}")
            if datapath != "auto":
                wrong = [a for a in agents if a.datapath != datapath]
                if wrong:
                    print(
                        f"demo FAILED: --datapath {datapath} was asked, but "
                        + ", ".join(f"the {a.name} agent attached {a.datapath or 'nothing'}" for a in wrong)
                    )
                    return 1
            wire: list[tuple[str, str]] = []
            for i in range(requests):
                # As an upstream OpenTelemetry SDK would send it: a fresh trace each time.
                upstream = f"00-{new_trace_id()}-{new_span_id()}-01"
                for sent in ("", upstream):
                    answer = _curl(client, f"http://{service.addr}:{PORT}/work/{i}", sent)
                    got = _header(answer["downstream"]["body"]["headers"], "traceparent")
                    wire.append((sent, got))
            expected = 3 * len(wire)
            deadline = time.monotonic() + 10
            while sum(len(a.spans) for a in agents) < expected and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            for agent in agents:
                agent.stop()
        spans = [s for a in agents for s in a.spans]
        if output == "json":
            for s in spans:
                print(json.dumps(s))
        else:
            print()
            for sent, got in wire:
                print(f"client sent traceparent {sent or '(none)':<55}  backend received {got or '(none)'}")
            print()
            print_tree(spans)
        problems = check_links(spans, wire)
        if len(spans) < expected:
            problems.append(f"expected {expected} spans, got {len(spans)}")
        print()
        if problems:
            print("demo FAILED:\n  " + "\n  ".join(problems))
            for agent in agents:
                print(f"--- {agent.name} agent log ---\n" + "\n".join(agent.log[-15:]))
            return 1
        print(
            f"demo ok: {len(wire)} requests, {len(spans)} spans, every trace linked "
            "client -> service SERVER -> service CLIENT -> backend SERVER"
        )
        return 0
