"""Kernel path lifecycle: `kill -9` of a running `obi run`, then `obi cleanup`.

The agent runs as the real CLI inside B's netns (entered with nsenter: `ip netns exec`
remounts /sys and would hide the cgroup2 mount), instrumenting B's cgroup with the tc
clsact backend (a clsact filter is what outlives a killed process) and with tcx (links die
with the process). A foreign tc filter is placed on B's interface first. Asserted: traffic from A
keeps flowing on an old keep-alive connection and on new ones before, during and after the
kill and the cleanup; after cleanup no tc filter, cgroup attachment, sk_msg attachment,
program or map of the agent remains, and the foreign filter is still there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from obi.demo import app as demoapp
from obi.demo.topology import Topology
from tests.helpers.skips import skip_module_unless_kernel_path

pytestmark = pytest.mark.root


skip_module_unless_kernel_path({tool: f"needs {tool}" for tool in ("bpftool", "nsenter", "tc")})

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PORT = 8080
FOREIGN = "bytecode '1,6 0 0 0'"  # a classic BPF filter that matches nothing: harmless

# A's traffic: one keep-alive connection plus a fresh connection every 5th round, one
# request each per 20 ms, for argv[2] seconds. Prints one JSON line per request.
TRAFFIC = r"""
import http.client, json, sys, time
host, end = sys.argv[1], time.time() + float(sys.argv[2])
ka = http.client.HTTPConnection(host, 8080, timeout=5)
i = 0
while time.time() < end:
    for kind in (("ka", "new") if i % 5 == 0 else ("ka",)):
        conn = ka if kind == "ka" else http.client.HTTPConnection(host, 8080, timeout=5)
        t = time.time()
        try:
            conn.request("GET", f"/headers?{kind}={i}")
            r = conn.getresponse(); r.read()
            ok = r.status == 200
        except Exception as e:
            ok = repr(e)
        if kind == "new":
            conn.close()
        print(json.dumps({"t": t, "kind": kind, "ok": ok}), flush=True)
    i += 1
    time.sleep(0.02)
"""


def _nsenter(host, argv: list[str], env: dict[str, str] | None = None, **kw):
    full_env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    return ["nsenter", f"--net={host.netns_path}", "--", *argv], full_env


def _bpftool_json(*args: str, netns: str = "") -> object:
    argv = ["bpftool", "-j", *args]
    if netns:
        argv = ["nsenter", f"--net={netns}", "--", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out or "null")


def _held_by(pid: int) -> tuple[set[int], set[int]]:
    """(program ids, map ids) a process holds fds of, from /proc/<pid>/fdinfo (this
    bpftool is built without the pids column)."""
    progs, maps = set(), set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = open(f"/proc/{pid}/fdinfo/{fd}").read()
        except OSError:
            continue
        for key, into in (("prog_id", progs), ("map_id", maps)):
            m = re.search(rf"^{key}:\s+(\d+)", text, re.M)
            if m:
                into.add(int(m.group(1)))
    return progs, maps


def _tc_filters(host, direction: str = "ingress") -> str:
    return subprocess.run(
        ["tc", "-n", host.netns, "filter", "show", "dev", host.ifname, direction],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _cgroup_progs(cgroup: str) -> str:
    return subprocess.run(["bpftool", "cgroup", "show", cgroup], capture_output=True, text=True).stdout


@pytest.mark.parametrize("backend", ["tc", "tcx"])
def test_kill9_then_cleanup(tmp_path, backend):
    with Topology(["a", "b"], prefix="obik") as topo:
        a, b = topo["a"], topo["b"]
        demoapp.start(b, PORT)
        subprocess.run(["tc", "-n", b.netns, "qdisc", "add", "dev", b.ifname, "clsact"], check=True)
        subprocess.run(
            f"tc -n {b.netns} filter add dev {b.ifname} ingress prio 7 protocol all bpf {FOREIGN}",
            shell=True,
            check=True,
        )

        argv, env = _nsenter(
            b,
            [sys.executable, "-m", "obi", "run"],
            {
                "OTEL_EBPF_CGROUP_PATH": b.cgroup,
                "OTEL_EBPF_OPEN_PORT": str(PORT),
                "OTEL_EBPF_BPF_CONTEXT_PROPAGATION": "all",
                "OTEL_EBPF_BPF_TC_BACKEND": backend,
            },
        )
        log = open(tmp_path / "agent.out", "w")
        agent = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # Attached: the agent says so, and its programs are on B's cgroup and eth0.
            deadline = time.monotonic() + 20
            while "attached" not in (tmp_path / "agent.out").read_text():
                assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "agent.out").read_text()
                time.sleep(0.1)
            progs, maps = _held_by(agent.pid)
            assert len(progs) >= 5 and maps  # sockops, sk_msg, tc ingress and egress, tracepoint
            assert "obi_sockops" in _cgroup_progs(b.cgroup)
            if backend == "tc":
                assert "obi_tc_ingress" in _tc_filters(b) and "obi_tc_egress" in _tc_filters(b, "egress")
            else:  # this bpftool lists tcx links only as "type 11" in `link show`
                links = _bpftool_json("link", "show") or []
                assert any(ln.get("prog_id") in progs and ln.get("type") in ("tcx", 11) for ln in links), links

            traffic = a.popen([sys.executable, "-c", TRAFFIC, b.addr, "6"], stdout=subprocess.PIPE, text=True)
            time.sleep(1.5)
            t_kill = time.time()
            agent.send_signal(signal.SIGKILL)
            agent.wait(timeout=10)
        finally:
            if agent.poll() is None:
                agent.kill()
            log.close()

        # A killed agent's clsact filter stays (what cleanup is for); a tcx link does not.
        assert ("obi_tc_ingress" in _tc_filters(b)) == (backend == "tc")
        assert ("obi_tc_egress" in _tc_filters(b, "egress")) == (backend == "tc")
        time.sleep(1.5)
        t_clean = time.time()
        argv, env = _nsenter(b, [sys.executable, "-m", "obi", "cleanup"])
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
        assert ("removed tc filter" in out) == (backend == "tc"), out

        lines = traffic.communicate(timeout=30)[0].splitlines()
        reqs = [json.loads(x) for x in lines]
        failed = [r for r in reqs if r["ok"] is not True]
        assert not failed, failed[:5]
        for kind in ("ka", "new"):  # served in every phase, on the old and on new connections
            ts = [r["t"] for r in reqs if r["kind"] == kind]
            assert (
                any(t < t_kill for t in ts) and any(t_kill < t < t_clean for t in ts) and any(t > t_clean for t in ts)
            )

        # Nothing of the agent is left; the foreign filter is.
        tc_now = _tc_filters(b)
        assert "obi_" not in tc_now and re.search(r"pref 7 bpf .*bytecode", tc_now), tc_now
        assert "obi_" not in _tc_filters(b, "egress")
        assert "obi_" not in json.dumps(_bpftool_json("net", "show", netns=b.netns_path))
        assert "obi_" not in _cgroup_progs(b.cgroup)
        left_progs = {p["id"] for p in _bpftool_json("prog", "show") or []}
        left_maps = {m["id"] for m in _bpftool_json("map", "show") or []}
        assert not progs & left_progs, f"programs of the killed agent still loaded: {progs & left_progs}"
        assert not maps & left_maps, f"maps of the killed agent still alive: {maps & left_maps}"
        # Its state file is gone too.
        assert not os.path.exists(f"/run/obi/{agent.pid}.json")
        # And the agent did instrument B while it ran.
        assert "/headers" in (tmp_path / "agent.out").read_text()
