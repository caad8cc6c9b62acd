"""Least privilege: obi runs with the DaemonSet's capability list and no CAP_SYS_ADMIN.

Processes are started under `setpriv` as uid 0 with the capability bounding set cut down
to the list shipped in deploy/kubernetes/daemonset.yaml (so the test proves the manifest,
not a copy of it); a root process gets exactly its bounding set on exec. The tests check
the kernel grants that set, that `obi doctor` sees it (no CAP_SYS_ADMIN, bpf_loop still
loads), that dropping any one capability makes doctor name it and what stops working, and
(once the kernel datapath exists) that `obi run` propagates context with that set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "deploy" / "kubernetes" / "daemonset.yaml"

pytestmark = pytest.mark.timeout(120)


def shipped_caps() -> list[str]:
    """The capability list of the DaemonSet (Kubernetes spelling: BPF, NET_ADMIN, ...)."""
    for doc in yaml.safe_load_all(DAEMONSET.read_text()):
        if doc and doc.get("kind") == "DaemonSet":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            return list(container["securityContext"]["capabilities"]["add"])
    raise AssertionError("no DaemonSet in " + str(DAEMONSET))


def cap_numbers() -> dict[str, int]:
    from obi.machine_probes import CAPABILITIES

    return {name: bit for name, (bit, _) in CAPABILITIES.items()}


@pytest.fixture(scope="module", autouse=True)
def need_setpriv() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (setpriv keeps capabilities for uid 0 only)")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) not installed")
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    if last < 40:
        pytest.skip(f"kernel has no CAP_BPF/CAP_PERFMON/CAP_CHECKPOINT_RESTORE (cap_last_cap={last}, needs 40)")


def setpriv(caps: list[str]) -> list[str]:
    """argv prefix: uid 0, nothing inheritable or ambient, bounding set = `caps`."""
    bounding = ",".join(["-all"] + [f"+{c.lower()}" for c in caps])
    return ["setpriv", "--reuid=0", "--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set={bounding}", "--"]


def capeff_of(argv_prefix: list[str]) -> int:
    out = subprocess.run(
        [*argv_prefix, "grep", "^CapEff:", "/proc/self/status"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return int(out.split(":")[1], 16)


def doctor(caps: list[str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    res = subprocess.run(
        [*setpriv(caps), sys.executable, "-m", "obi", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def check(report: dict[str, Any], name: str) -> dict[str, str]:
    return next(c for c in report["checks"] if c["name"] == name)


def test_the_kernel_grants_exactly_the_shipped_set() -> None:
    caps = shipped_caps()
    bits = cap_numbers()
    want = sum(1 << bits[f"CAP_{c}"] for c in caps)
    assert capeff_of(setpriv(caps)) == want
    assert not want >> bits["CAP_SYS_ADMIN"] & 1


def test_doctor_with_the_shipped_set() -> None:
    report = doctor(shipped_caps())
    caps = report["capabilities"]
    assert caps, "doctor --json has no capabilities object"
    assert caps["CAP_SYS_ADMIN"] is False
    for c in shipped_caps():
        assert caps[f"CAP_{c}"] is True, c
    # The kernel datapath's essential probe still passes without CAP_SYS_ADMIN.
    assert report["bpf_loop"] is True and check(report, "bpf_loop")["status"] == "ok"
    for name in ("sockops", "sk_msg", "ringbuf"):
        assert check(report, name)["status"] == "ok", check(report, name)
    assert report["datapath"] == "kernel"
    # The only capability doctor misses is CAP_SYS_ADMIN, and it is not fatal.
    cap_check = check(report, "capabilities")
    assert cap_check["status"] != "fail"
    missing = [part.split(":")[0] for part in cap_check["detail"].split("; ")]
    assert missing == ["missing CAP_SYS_ADMIN"], cap_check["detail"]


@pytest.mark.parametrize("dropped", shipped_caps())
def test_doctor_names_a_missing_capability(dropped: str) -> None:
    from obi.machine_probes import CAPABILITIES

    caps = [c for c in shipped_caps() if c != dropped]
    report = doctor(caps)
    name = f"CAP_{dropped}"
    assert report["capabilities"][name] is False
    cap_check = check(report, "capabilities")
    # Named, with what stops working without it.
    effect = CAPABILITIES[name][1]
    assert f"missing {name}: {effect}" in cap_check["detail"], cap_check["detail"]
    assert effect
    if dropped in ("BPF", "NET_ADMIN"):
        assert cap_check["status"] == "fail"
    if dropped == "BPF":
        # Without CAP_BPF (and CAP_SYS_ADMIN) no program loads: no kernel datapath.
        assert report["bpf_loop"] is False
        assert check(report, "bpf_loop")["status"] != "ok"
        assert report["datapath"] != "kernel"


# --- the kernel datapath under the shipped set --------------------------------------------


def test_kernel_datapath_runs_without_sys_admin() -> None:
    pytest.importorskip("obi.kernel.datapath", reason="kernel datapath (obi.kernel.datapath) not written yet")
    from obi.demo import app as demoapp
    from obi.demo.topology import Topology, have_netns_tools
    from obi.w3c import parse_traceparent

    reason = have_netns_tools()
    if reason:
        pytest.skip(reason)
    port = 8080
    upstream = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with Topology(["client", "service", "backend"], prefix="obih") as topo:
        client, service, backend = topo["client"], topo["service"], topo["backend"]
        demoapp.start(backend, port)
        demoapp.start(service, port, downstream=f"http://{backend.addr}:{port}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(
            OTEL_EBPF_DATAPATH="kernel",
            OTEL_EBPF_OPEN_PORT=str(port),
            OTEL_EBPF_BPF_CONTEXT_PROPAGATION="all",
            OTEL_EBPF_CGROUP_PATH=service.cgroup,
            OTEL_EBPF_TRACE_PRINTER="json",
            OTEL_EBPF_SHUTDOWN_TIMEOUT="5s",
        )
        # Entering the namespace needs CAP_SYS_ADMIN, so nsenter runs first; setpriv drops to
        # the shipped set right before the agent's Python starts (same pid: exec chain).
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup2 mount.
        agent = subprocess.Popen(
            ["nsenter", f"--net={service.netns_path}", *setpriv(shipped_caps()), sys.executable, "-m", "obi", "run"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            log: list[str] = []
            while time.monotonic() < deadline and agent.poll() is None:
                line = agent.stderr.readline()
                log.append(line)
                if "attached" in line:
                    break
            assert agent.poll() is None, "agent exited:\n" + "".join(log) + agent.stderr.read()
            status = Path(f"/proc/{agent.pid}/status").read_text()
            capeff = int(next(ln for ln in status.splitlines() if ln.startswith("CapEff:")).split(":")[1], 16)
            bits = cap_numbers()
            assert capeff == sum(1 << bits[f"CAP_{c}"] for c in shipped_caps())  # no CAP_SYS_ADMIN

            out = client.run(
                ["curl", "-s", "-H", f"traceparent: {upstream}", f"http://{service.addr}:{port}/work"], timeout=20
            ).stdout
            answer = json.loads(out)
            got = dict((k.lower(), v) for k, v in answer["downstream"]["body"]["headers"]).get("traceparent")
            assert got, f"backend received no traceparent: {answer}"
            sent = parse_traceparent(got)
            assert sent is not None and sent.trace_id == upstream.split("-")[1]
        finally:
            agent.terminate()
            try:
                out, err = agent.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                agent.kill()
                out, err = agent.communicate(timeout=5)
        assert agent.returncode == 0, err
        spans = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        by_kind = {s["kind"]: s for s in spans if s["trace_id"] == sent.trace_id}
        assert set(by_kind) == {"SERVER", "CLIENT"}, spans
        # The server span continues the upstream trace; the client span is its child and is
        # the parent the backend saw on the wire.
        assert by_kind["SERVER"]["parent_span_id"] == upstream.split("-")[2]
        assert by_kind["CLIENT"]["parent_span_id"] == by_kind["SERVER"]["span_id"]
        assert by_kind["CLIENT"]["span_id"] == sent.span_id
