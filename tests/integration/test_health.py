"""Health and self-metrics endpoints while spans flow, over real loopback sockets.

`test_counters_follow_the_backend`: a real `obi.export.Exporter` sends spans to a real
loopback OTLP http/protobuf receiver; `HealthServer` serves /healthz and the Prometheus
endpoint on two ports from the exporter's counters. The test scrapes both while spans
flow, takes the receiver down (export errors and drops rise, /healthz turns 503) and
brings it back (/healthz 200 again), and checks the exported counter equals the spans
that crossed the wire. No root needed.

`test_agent_serves_health`: the same endpoints from `obi run` itself, kernel datapath, in
a namespace with its own cgroup. It skips until the kernel datapath exists and the agent
starts the HealthServer.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator

import pytest

from bench.otlp_receiver import HttpReceiver, free_port  # noqa: E402
from obi.config import Config  # noqa: E402
from obi.export import Exporter  # noqa: E402
from obi.health import HealthServer  # noqa: E402
from obi.model import Datapath, SpanKind, SpanRecord, TraceContext  # noqa: E402

pytestmark = pytest.mark.timeout(60)

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(url: str) -> dict[str, float]:
    """Sample name (with its labels) -> value. The format itself is checked in tests/unit."""
    code, body = get(url)
    assert code == 200, body
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            m = SAMPLE.match(line)
            assert m, line
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def server_span() -> SpanRecord:
    parent = TraceContext.new_root()
    ctx = parent.child()
    now = time.time_ns()
    return SpanRecord(
        ctx.trace_id,
        ctx.span_id,
        parent.span_id,
        SpanKind.SERVER,
        now - 2_000_000,
        now,
        "GET",
        "/items",
        200,
        local_addr="127.0.0.1",
        local_port=8080,
        peer_addr="127.0.0.1",
        peer_port=41000,
        pid=os.getpid(),
        flags=ctx.flags,
        datapath=Datapath.USERSPACE,
        propagated=True,
    )


class Traffic:
    """A stand-in datapath: hands spans to the exporter at a steady rate from a thread."""

    def __init__(self, exporter: Exporter, per_second: int = 200):
        self.exporter = exporter
        self.interval = 1.0 / per_second
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.exporter.export(server_span())
            self.sent += 1

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class Gate:
    """A TCP forwarder in front of the receiver: closing it is "the backend is down".

    (Stopping the receiver itself is not enough: its handler threads keep serving the
    exporter's pooled keep-alive connection.) `open()` listens again on the same port.
    """

    def __init__(self, port: int, upstream: int):
        self.port, self.upstream = port, upstream
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def open(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(16)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                down, _ = lst.accept()
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                return
            with self._lock:
                self._socks += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        if self._listener is not None:
            try:  # wakes the accept() blocked in the other thread; close() alone does not
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture
def ports() -> Iterator[tuple[int, ...]]:
    """(gate, health, metrics, receiver): distinct free loopback ports."""
    chosen: set[int] = set()
    while len(chosen) < 4:
        chosen.add(free_port())
    yield tuple(chosen)  # type: ignore[misc]


def test_counters_follow_the_backend(ports: tuple[int, ...]) -> None:
    gate_port, health_port, metrics_port, rx_port = ports
    cfg = Config(
        otlp_traces_endpoint=f"http://127.0.0.1:{gate_port}/v1/traces",
        otlp_timeout_s=1.0,  # a dead backend fails a batch within ~1 s
        health_check_port=health_port,
        internal_metrics_port=metrics_port,
        sources={"trace_printer": "test"},  # no stdout printer
    )
    healthz = f"http://127.0.0.1:{health_port}/healthz"
    metrics = f"http://127.0.0.1:{metrics_port}/internal/metrics"
    exporter = Exporter(cfg, queue_size=64, batch_size=16, schedule_delay_s=0.05)
    status = {"datapath": "userspace", "attached": True}
    health = HealthServer(cfg, lambda: status, exporter.stats, host="127.0.0.1")
    gate = Gate(gate_port, rx_port)
    try:
        with HttpReceiver(rx_port) as rx:
            gate.open()
            health.start()
            with Traffic(exporter):
                # 1. Backend up: spans flow, the exported counter moves, healthy.
                first = until(
                    lambda: (m := scrape(metrics))["obi_spans_exported_total"] >= 16 and m, 10, "spans exported"
                )
                second = until(
                    lambda: (
                        (m := scrape(metrics))["obi_spans_exported_total"] > first["obi_spans_exported_total"] and m
                    ),
                    10,
                    "the exported counter to move",
                )
                assert second["obi_export_errors_total"] == 0
                assert second['obi_datapath_info{datapath="userspace"}'] == 1
                code, body = get(healthz)
                assert code == 200, body
                assert json.loads(body) == {
                    "status": "ok",
                    "datapath": "userspace",
                    "attached": True,
                    "exporting": True,
                    "reason": "",
                    "datapath_reason": "",
                }

                # 2. Backend down: batches fail, the buffer overflows, /healthz turns 503.
                gate.close()
                before = scrape(metrics)
                until(
                    lambda: scrape(metrics)["obi_export_errors_total"] > before["obi_export_errors_total"],
                    15,
                    "export errors to rise",
                )
                until(
                    lambda: scrape(metrics)["obi_spans_dropped_total"] > before["obi_spans_dropped_total"],
                    15,
                    "dropped spans to rise while the backend is down",
                )
                code, body = until(lambda: (r := get(healthz))[0] == 503 and r, 5, "/healthz 503")
                doc = json.loads(body)
                assert doc["status"] == "unavailable" and doc["exporting"] is False and doc["attached"] is True
                assert "OTLP export failing" in doc["reason"]
                assert get(f"http://127.0.0.1:{health_port}/livez")[0] == 200  # alive all the same
                stuck = scrape(metrics)["obi_spans_exported_total"]
                time.sleep(1.0)
                assert scrape(metrics)["obi_spans_exported_total"] == stuck

                # 3. Backend back: a batch gets through, healthy again.
                gate.open()
                until(lambda: get(healthz)[0] == 200, 20, "/healthz 200 after the backend came back")
                assert scrape(metrics)["obi_spans_exported_total"] > stuck
            assert exporter.shutdown(10.0)
            # Every span the counter calls exported crossed the socket. At most one batch more
            # arrived: the one in flight when the gate closed, whose reply was cut off.
            final = scrape(metrics)
            exported = exporter.stats()["exported"]
            assert final["obi_spans_exported_total"] == exported
            assert exported <= len(rx.spans()) <= exported + 16
    finally:
        gate.close()
        health.stop()
        exporter.shutdown(2.0)


def test_datapath_detach_turns_healthz_503(ports: tuple[int, ...]) -> None:
    """One listener for both paths; the agent's status callback drives /healthz."""
    port = ports[0]
    cfg = Config(
        health_check_port=port, internal_metrics_port=port, sources={"trace_printer": "test"}, trace_printer="disabled"
    )
    with Exporter(cfg) as exporter:
        status: dict[str, Any] = {"datapath": "kernel", "attached": True}
        with HealthServer(cfg, lambda: status, exporter.stats, host="127.0.0.1"):
            assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
            assert scrape(f"http://127.0.0.1:{port}/internal/metrics")['obi_datapath_info{datapath="kernel"}'] == 1
            status.update(attached=False, reason="stopping")
            code, body = get(f"http://127.0.0.1:{port}/healthz")
            assert code == 503 and json.loads(body)["reason"] == "stopping"


# --- the real agent ---------------------------------------------------------------------


def test_agent_serves_health() -> None:
    pytest.importorskip("obi.kernel.datapath", reason="kernel datapath (obi.kernel.datapath) not written yet")
    import obi.agent

    if "HealthServer" not in inspect.getsource(obi.agent):
        pytest.skip("obi.agent does not start obi.health.HealthServer yet")
    _run_agent_and_scrape()


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGENT_ARGV = [sys.executable, "-m", "obi", "run"]


def _run_agent_and_scrape() -> None:
    """`obi run` (kernel datapath) on a service host with its own netns and cgroup; scrape
    /healthz and the metrics from inside that namespace while requests flow through."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and BPF")
    from obi.demo import app as demoapp
    from obi.demo.topology import Topology, have_netns_tools

    missing = have_netns_tools()
    if missing:
        pytest.skip(f"network namespace tools missing: {missing}")
    port, health_port = 8080, 9400
    with Topology(["service", "backend"], prefix="obih") as topo:
        service, backend = topo["service"], topo["backend"]
        demoapp.start(backend, port)
        demoapp.start(service, port, downstream=f"http://{backend.addr}:{port}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(
            OTEL_EBPF_DATAPATH="kernel",
            OTEL_EBPF_OPEN_PORT=str(port),
            OTEL_EBPF_BPF_CONTEXT_PROPAGATION="all",
            OTEL_EBPF_CGROUP_PATH=service.cgroup,
            OTEL_EBPF_TRACE_PRINTER="json",
            OTEL_EBPF_HEALTH_CHECK_PORT=str(health_port),
            OTEL_EBPF_INTERNAL_METRICS_PROMETHEUS_PORT=str(health_port),
            OTEL_EBPF_SHUTDOWN_TIMEOUT="5s",
        )
        # nsenter, not `ip netns exec` (host.popen): that one remounts /sys, hiding the
        # cgroup2 mount the agent attaches to.
        agent = subprocess.Popen(
            ["nsenter", f"--net={service.netns_path}", *AGENT_ARGV],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        probe = (
            "import sys,urllib.request as u\n"
            "try:\n r=u.urlopen(sys.argv[1],timeout=5); print(r.status); print(r.read().decode())\n"
            "except u.HTTPError as e: print(e.code); print(e.read().decode())\n"
            "except OSError as e: print(0); print(e)\n"
        )

        def inside(url: str) -> tuple[int, str]:
            res = service.run([sys.executable, "-c", probe, url], check=False, timeout=15)
            code, _, body = res.stdout.partition("\n")
            return (int(code) if code.strip().isdigit() else 0), body

        def metric(body: str, name: str) -> float:
            m = re.search(rf"^{name} (\S+)$", body, re.M)
            assert m, f"{name} missing from the exposition"
            return float(m.group(1))

        base = f"http://127.0.0.1:{health_port}"
        try:
            until(lambda: agent.poll() is not None or inside(f"{base}/healthz")[0] == 200, 30, "agent /healthz 200")
            assert agent.poll() is None, agent.stderr.read()
            code, body = inside(f"{base}/healthz")
            doc = json.loads(body)
            assert doc["datapath"] == "kernel" and doc["attached"] is True and doc["exporting"] is True
            before = inside(f"{base}/internal/metrics")[1]
            assert 'obi_datapath_info{datapath="kernel"} 1' in before
            # Requests into the service: each makes one outgoing call, which gets a header.
            for i in range(5):
                code, _ = inside(f"http://{service.addr}:{port}/work/{i}")
                assert code == 200
            until(
                lambda: (
                    metric(inside(f"{base}/internal/metrics")[1], "obi_headers_inserted_total")
                    >= metric(before, "obi_headers_inserted_total") + 5
                ),
                10,
                "obi_headers_inserted_total to rise by 5",
            )
        finally:
            agent.terminate()
            try:
                agent.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.communicate(timeout=5)
