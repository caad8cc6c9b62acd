"""The kernel path's thread hook for kernels without sock:sock_recv_length (5.17 - 6.2):
threads_syscalls.bpf.o (syscall tracepoints + CO-RE fd -> socket walk) forced on this
kernel. The same A -> B -> C checks as test_kernel_e2e.py: B's client span is the child of
B's server span, one request and 32 concurrent keep-alive clients with zero cross-links.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from obi import config
from obi.demo.topology import Topology
from obi.model import SpanKind
from tests.helpers.kernel_agent import Agent
from tests.helpers.traffic import CONCURRENT_CODE, PORT, TP_SPAN, TP_TRACE, http_get, serve

pytestmark = pytest.mark.root

# test_kernel_e2e skips itself (and so this module) where the kernel path cannot run.

from obi.kernel import libbpf  # noqa: E402  (loadable: checked by the skip above)

if not os.path.exists(libbpf.object_path("threads_syscalls")):
    pytest.skip("threads_syscalls.bpf.o not built (run `make -C bpf`)", allow_module_level=True)


def SyscallsAgent(host, tmp_path) -> Agent:
    """kernel_agent.Agent with the thread hook forced to the syscall tracepoints."""
    return Agent(host, tmp_path, thread_hook="syscalls")


@pytest.fixture
def abc(tmp_path):
    with Topology(["a", "b", "c"], prefix="obit") as topo:
        c = topo["c"]
        serve(c)
        serve(topo["b"], downstream=f"http://{c.addr}:{PORT}")
        agent_c = SyscallsAgent(c, tmp_path)
        try:
            agent_b = SyscallsAgent(topo["b"], tmp_path)
            try:
                yield topo, agent_b, agent_c
            finally:
                agent_b.stop()
        finally:
            agent_c.stop()


def _clean(agent: Agent) -> None:
    st = agent.dp.stats()
    assert st["events_lost"] == 0 and st["scratch_busy"] == 0 and st["parse_lost"] == 0, st


def test_syscalls_hook_loaded(abc):
    _, agent_b, _ = abc
    assert agent_b.dp.thread_hook == "syscalls"
    assert "threads_syscalls" in agent_b.dp._objs and "threads" not in agent_b.dp._objs


def test_a_b_c_linked(abc):
    topo, agent_b, agent_c = abc
    a, b = topo["a"], topo["b"]
    out = http_get(a, f"http://{b.addr}:{PORT}/work", {"traceparent": f"00-{TP_TRACE}-{TP_SPAN}-01"})
    tps = [v for k, v in out["downstream"]["body"]["headers"] if k.lower() == "traceparent"]
    assert len(tps) == 1 and tps[0].split("-")[1] == TP_TRACE
    bs = agent_b.wait(lambda s: s.kind == SpanKind.SERVER and s.path == "/work")
    bc = agent_b.wait(lambda s: s.kind == SpanKind.CLIENT and s.path == "/headers")
    cs = agent_c.wait(lambda s: s.kind == SpanKind.SERVER and s.path == "/headers")
    assert len(bs) == len(bc) == len(cs) == 1, (agent_b.spans, agent_c.spans)
    assert bs[0].trace_id == TP_TRACE and bs[0].parent_span_id == TP_SPAN
    # The thread link made by the syscall hook: B's client span is its server span's child,
    # and its id is the parent C received on the wire.
    assert bc[0].trace_id == TP_TRACE and bc[0].parent_span_id == bs[0].span_id
    assert bc[0].span_id == tps[0].split("-")[2] == cs[0].parent_span_id
    assert agent_b.dp.stats()["thread_links"] >= 1
    for agent in (agent_b, agent_c):
        _clean(agent)


def test_concurrent_keepalive_no_cross_links(abc):
    topo, agent_b, agent_c = abc
    a, b = topo["a"], topo["b"]
    n_clients, n_req = 32, 40
    total = n_clients * n_req
    r = a.run([sys.executable, "-c", CONCURRENT_CODE, b.addr, str(n_clients), str(n_req)], timeout=180)
    out = json.loads(r.stdout)
    assert out["done"] == total and out["n_bad"] == 0, out
    servers = agent_b.wait_count(SpanKind.SERVER, total, timeout=30)
    clients = agent_b.wait_count(SpanKind.CLIENT, total, timeout=30)
    assert len(servers) == total and len(clients) == total, (len(servers), len(clients), agent_b.dp.stats())
    by_id = {s.span_id: s for s in servers}
    # A cross-link: a client span whose parent is missing or a server span of another trace.
    cross = [c for c in clients if (p := by_id.get(c.parent_span_id)) is None or p.trace_id != c.trace_id]
    print(f"threads_syscalls: {total} requests, {len(cross)} cross-links, B stats {agent_b.dp.stats()}")
    assert cross == []
    children: dict[str, int] = {}
    for c in clients:
        children[c.parent_span_id] = children.get(c.parent_span_id, 0) + 1
    assert len(children) == total and set(children.values()) == {1}
    c_servers = agent_c.wait_count(SpanKind.SERVER, total, timeout=30)
    client_ids = {c.span_id: c for c in clients}
    assert len(c_servers) == total
    assert all(
        s.parent_span_id in client_ids and client_ids[s.parent_span_id].trace_id == s.trace_id for s in c_servers
    )
    assert agent_b.dp.stats()["thread_links"] >= total
    for agent in (agent_b, agent_c):
        _clean(agent)


def test_auto_choice_follows_the_tracepoint_probe(monkeypatch):
    """auto takes sock_recv_length when it exists (this kernel) and the syscall hook when
    the probe says it is missing; the doctor then still picks the kernel path, with the
    syscall tracepoints probed for real."""
    from obi import doctor
    from obi.kernel import datapath, probes

    assert probes.probe_syscall_tracepoints().ok is True, "this kernel has CONFIG_FTRACE_SYSCALLS"
    if probes.probe_sock_recv_tracepoint().ok:
        assert datapath.choose_thread_hook("auto") == "sock_recv_length"
    monkeypatch.setattr(
        probes, "probe_sock_recv_tracepoint", lambda: probes.Probe("sock_recv_tracepoint", False, "missing", "6.3")
    )
    assert datapath.choose_thread_hook("auto") == "syscalls"
    assert datapath.choose_thread_hook("sock_recv_length") == "sock_recv_length"
    with pytest.raises(ValueError):
        datapath.choose_thread_hook("kprobe")
    choice = doctor.choose_datapath(config.Config(), bpf_loop_ok=True, nfqueue_ok=False)
    assert choice.datapath is not None and choice.datapath.value == "kernel"
    assert "syscall tracepoints" in choice.reason


def test_stop_detaches_the_syscall_hook(tmp_path):
    import subprocess

    with Topology(["b"], prefix="obit") as topo:
        serve(topo["b"])
        agent = SyscallsAgent(topo["b"], tmp_path)
        ids = {p.info()["id"] for p in agent.dp._objs["threads_syscalls"].programs()}
        assert len(ids) == 2
        agent.stop()
    left = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
    assert not any(f"{i}:" in left.split() for i in ids), left
