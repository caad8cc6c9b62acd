"""Shared helpers for the integration tests.

- skip_module_unless_kernel_path / skip_module_unless_nfqueue: the module-level skips of
  the kernel-path and userspace (NFQUEUE) test files, each naming what is missing.
- READ_RESPONSE_SRC: an HTTP response reader for the client scripts run inside hosts.
- Agent: a KernelDatapath watching one test host (its netns and cgroup), spans collected
  in a list. Skips the test if a kernel feature is missing.

Nothing from obi.kernel is imported at module level: it loads libbpf.so.1, and a missing
library must become a skip (in skip_module_unless_kernel_path), not an import error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from obi import config
from obi.errors import MissingFeature
from obi.model import SpanKind, SpanRecord
from obi.demo.topology import have_netns_tools

# The BPF objects the kernel datapath loads (built by `make -C bpf`).
KERNEL_OBJECTS = ("egress", "ingress", "threads", "threads_syscalls", "iter")


def skip_module_unless_kernel_path(tools: dict[str, str] | None = None) -> None:
    """Skip the calling test module (call it at import) unless namespaces can be built,
    each command in `tools` is installed (value: the skip reason), libbpf loads and the
    BPF objects are built. Checked in that order."""
    why = have_netns_tools()
    if why:
        pytest.skip(why, allow_module_level=True)
    for tool, reason in (tools or {}).items():
        if not shutil.which(tool):
            pytest.skip(reason, allow_module_level=True)
    try:
        from obi.kernel import libbpf
    except Exception as e:  # libbpf.so.1 missing
        pytest.skip(f"kernel path unavailable: {e}", allow_module_level=True)
    if not all(os.path.exists(libbpf.object_path(n)) for n in KERNEL_OBJECTS):
        pytest.skip("BPF objects not built (run `make -C bpf`)", allow_module_level=True)


def nfqueue_missing(iptables_use: str) -> str:
    """"" when the userspace (NFQUEUE) path can run here, else the reason: namespaces, the
    NFQUEUE reader extension, iptables. iptables_use: what the caller needs iptables for."""
    why = have_netns_tools()
    if why:
        return why
    try:
        from obi.fallback import _nfq  # noqa: F401
    except ImportError as e:
        return f"the NFQUEUE reader extension obi.fallback._nfq is not built ({e}; run scripts/setup.sh)"
    if subprocess.run(["which", "iptables"], capture_output=True).returncode:
        return f"needs iptables ({iptables_use})"
    return ""


def skip_module_unless_nfqueue(iptables_use: str) -> None:
    """Skip the calling test module (call it at import) if nfqueue_missing() says so."""
    why = nfqueue_missing(iptables_use)
    if why:
        pytest.skip(why, allow_module_level=True)


# Python source put in front of the client scripts the tests run inside a host
# (`python -c`): read_response(f) reads one Content-Length framed HTTP/1.1 response from a
# binary file and returns its body parsed as JSON.
READ_RESPONSE_SRC = r"""
import json
def read_response(f):
    f.readline()  # status line
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        if k.lower() == "content-length":
            length = int(v)
    return json.loads(f.read(length))
"""


class Agent:
    """A KernelDatapath watching one host; spans land in .spans."""

    def __init__(self, host, tmp_path, propagation: str = "headers", ports: str = "8080,8081",
                 env: dict[str, str] | None = None, sink=None, thread_hook: str = "auto"):
        """sink: called with each span instead of collecting them in .spans; thread_hook:
        KernelDatapath's choice of thread-linking tracepoints ("auto", "sock_recv_length",
        "syscalls")."""
        from obi.kernel.datapath import KernelDatapath  # loads libbpf: see the module doc

        self.spans: list[SpanRecord] = []
        cfg = config.load(env={
            "OTEL_EBPF_BPF_CONTEXT_PROPAGATION": propagation,
            "OTEL_EBPF_OPEN_PORT": ports,
            "OTEL_EBPF_CGROUP_PATH": host.cgroup,
            **(env or {}),
        })
        self.dp = KernelDatapath(cfg, sink or self.spans.append, netns=host.netns_path,
                                 state_dir=str(tmp_path / host.name), thread_hook=thread_hook)
        try:
            self.dp.start()
        except MissingFeature as e:
            pytest.skip(f"kernel feature missing: {e}")

    def wait(self, pred, timeout: float = 10.0) -> list[SpanRecord]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [s for s in list(self.spans) if pred(s)]
            if got:
                return got
            time.sleep(0.05)
        return []

    def wait_count(self, kind: SpanKind, n: int, timeout: float = 20.0) -> list[SpanRecord]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [s for s in list(self.spans) if s.kind == kind]
            if len(got) >= n:
                return got
            time.sleep(0.05)
        return [s for s in list(self.spans) if s.kind == kind]

    def stop(self) -> None:
        self.dp.stop()
