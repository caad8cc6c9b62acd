"""Skips of the integration tests, each naming what is missing.

`skip_module_unless_kernel_path()` / `skip_module_unless_nfqueue(use)` are called at import
by the kernel-path and userspace (NFQUEUE) test files; `nfqueue_missing(use)` tells why the
userspace path cannot run here ("" when it can). `skip_or_fail(e)` turns a MissingFeature
of the kernel path into a skip only where doctor's probes find the feature missing
(`kernel_path_missing()`).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from obi.demo.topology import have_netns_tools
from obi.errors import MissingFeature

# The BPF objects the kernel datapath loads (built by `make -C bpf`).
KERNEL_OBJECTS = ("tpinjector", "tctracer", "threads", "threads_syscalls", "adopt")


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
    """ "" when the userspace (NFQUEUE) path can run here, else the reason: namespaces, the
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


# The probes (obi doctor's) of what the kernel path needs from the kernel.
KERNEL_PATH_PROBES = ("bpf_loop", "sockops", "sk_msg", "tc", "ringbuf", "cgroup_v2")


def kernel_path_missing() -> str:
    """What doctor's probes report missing for the kernel path ("" if nothing)."""
    from obi.kernel import probes

    found = probes.run_all()
    missing = [f"{n}: {found[n].detail}" for n in KERNEL_PATH_PROBES if found[n].ok is False]
    if found["sock_recv_tracepoint"].ok is False and found["syscall_tracepoints"].ok is False:
        missing.append("no thread tracepoint (sock:sock_recv_length or syscalls)")
    return "; ".join(missing)


def skip_or_fail(e: MissingFeature) -> None:
    """A test skips when the kernel lacks what the kernel path needs, as doctor's probes
    tell; a MissingFeature on a kernel whose probes say it has everything is our defect
    (a program the verifier rejects, a wrong classification): the test fails."""
    missing = kernel_path_missing()
    if missing:
        pytest.skip(f"kernel feature missing: {e} (doctor: {missing})")
    pytest.fail(f"the kernel path reported a missing feature, but doctor's probes find every one: {e}")
