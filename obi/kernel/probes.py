"""Kernel feature probes: what this kernel can do, found by trying, not by version.

BPF features are probed by loading the tiny programs of bpf/probes.bpf.c one at a time
(a rejected program fails only its own probe); tc and tcx by attaching briefly to `lo` of
a throw-away network namespace. Every probe returns a `Probe` and never raises: a failure
is `ok=False` with the reason, `ok=None` means it could not be told (e.g. object not built).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Callable

from ..errors import BpfError
from .netns import in_new_netns
from .tracefs import TRACEFS_DIRS, tracefs_mounted

try:  # doctor must still report (not crash) where libbpf.so.1 is missing
    from . import libbpf

    LIBBPF_ERROR = ""
except OSError as e:
    libbpf = None  # type: ignore[assignment]
    LIBBPF_ERROR = f"libbpf.so.1 not loadable ({e}); install libbpf1"

PROBES_OBJECT = "probes"
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool | None
    detail: str
    min_kernel: str = ""


def kernel_release() -> str:
    return platform.release()


# --- BPF program probes ----------------------------------------------------------------


def _verifier_reason(log_text: str) -> str:
    """The verifier's complaint: the last line before "processed N insns" / END marker."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("processed ") or ln.startswith("-- END PROG LOAD LOG"):
            if i > 0:
                return lines[i - 1]
    for ln in reversed(lines):
        if not ln.startswith("libbpf:"):
            return ln
    return lines[-1] if lines else ""


def _with_probe(prog_name: str, use: Callable[[libbpf.Program], str] | None = None) -> tuple[bool | None, str]:
    """Load only `prog_name` from the probes object; then `use(prog)` may try more
    (its return value is the detail). Returns (ok, detail)."""
    if libbpf is None:
        return False, LIBBPF_ERROR
    path = libbpf.object_path(PROBES_OBJECT)
    if not os.path.exists(path):
        return None, f"{path} not built (run `make -C bpf`)"
    try:
        with libbpf.BpfObject.open(path) as obj:
            for prog in obj.programs():
                prog.set_autoload(prog.name == prog_name)
            obj.load()
            prog = obj.program(prog_name)
            return True, use(prog) if use else "loaded"
    except BpfError as e:
        reason = _verifier_reason(e.log) if e.log else ""
        err = os.strerror(e.errno) if e.errno else str(e)
        return False, f"{e.what}: {err}" + (f" ({reason})" if reason else "")
    except Exception as e:  # a probe never raises
        return False, f"{type(e).__name__}: {e}"


def probe_bpf_loop() -> Probe:
    ok, detail = _with_probe("probe_bpf_loop")
    if ok:
        detail = "a tc program calling bpf_loop loaded"
    return Probe("bpf_loop", ok, detail, "5.17")


def probe_sockops() -> Probe:
    ok, detail = _with_probe("probe_sockops")
    if ok:
        detail = "sockops program with bpf_sock_hash_update loaded"
    return Probe("sockops", ok, detail, "4.13")


def probe_sk_msg() -> Probe:
    ok, detail = _with_probe("probe_sk_msg")
    if ok:
        detail = "sk_msg program with bpf_msg_push_data loaded"
    return Probe("sk_msg", ok, detail, "4.20")


def _tc_attach_lo(prog: libbpf.Program) -> str:
    def body() -> str:
        hook = libbpf.tc_hook(1, libbpf.BPF_TC_INGRESS)  # lo of the fresh netns
        libbpf.tc_hook_create(hook)
        libbpf.tc_attach(hook, libbpf.tc_opts(prog.fd))
        return "cls_bpf program loaded and attached to a clsact qdisc (throw-away netns)"

    return in_new_netns(body)


def probe_tc() -> Probe:
    return Probe("tc", *_with_probe("probe_tc", _tc_attach_lo), "4.5")


def _tcx_attach_lo(prog: libbpf.Program) -> str:
    def body() -> str:
        fd = libbpf.link_create(prog.fd, 1, libbpf.BPF_TCX_INGRESS)
        os.close(fd)
        return "tcx link created on lo (throw-away netns)"

    return in_new_netns(body)


def probe_tcx() -> Probe:
    ok, detail = _with_probe("probe_tc", _tcx_attach_lo)
    return Probe("tcx", ok, detail, "6.6")


def probe_write_user() -> Probe:
    ok, detail = _with_probe("probe_write_user")
    if ok:
        detail = "tracepoint program using bpf_probe_write_user loaded"
    elif ok is False and "cannot use helper" in detail:
        detail += "; kernel lockdown forbids it"
    return Probe("bpf_probe_write_user", ok, detail, "4.8")


def probe_ringbuf() -> Probe:
    if libbpf is None:
        return Probe("ringbuf", False, LIBBPF_ERROR, "5.8")
    try:
        fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096, "obi_probe_rb")
        os.close(fd)
        return Probe("ringbuf", True, "BPF_MAP_TYPE_RINGBUF map created", "5.8")
    except BpfError as e:
        return Probe("ringbuf", False, str(e), "5.8")
    except Exception as e:
        return Probe("ringbuf", False, f"{type(e).__name__}: {e}", "5.8")


# --- files and system state ------------------------------------------------------------


def probe_tracefs() -> Probe:
    where = tracefs_mounted()
    if where:
        return Probe("tracefs", True, f"mounted at {where}")
    if not os.path.isdir(TRACEFS_DIRS[0]):
        return Probe("tracefs", False, f"not mounted, and {TRACEFS_DIRS[0]} does not exist")
    return Probe("tracefs", None, f"not mounted; the agent mounts it at {TRACEFS_DIRS[0]} when it starts")


# The kernel path links threads to requests with the sock:sock_recv_length tracepoint
# (threads.bpf.c). Its event class is in the kernel's BTF as this type.
SOCK_RECV_TP_BTF_TYPE = b"trace_event_raw_sock_msg_length"
_TRACEFS_EVENT = tuple(f"{d}/events/sock/sock_recv_length" for d in TRACEFS_DIRS)


def probe_sock_recv_tracepoint() -> Probe:
    """Found in the kernel's BTF (readable without privileges) or in tracefs."""
    name, min_kernel = "sock_recv_tracepoint", "6.3"
    if any(os.path.isdir(path) for path in _TRACEFS_EVENT):
        return Probe(name, True, "tracepoint sock:sock_recv_length present (tracefs)", min_kernel)
    try:
        with open(BTF_VMLINUX, "rb") as f:
            found = SOCK_RECV_TP_BTF_TYPE in f.read()
    except OSError as e:
        return Probe(name, None, f"cannot tell: no tracefs, {BTF_VMLINUX}: {e.strerror}", min_kernel)
    if found:
        return Probe(name, True, "tracepoint sock:sock_recv_length present (kernel BTF)", min_kernel)
    return Probe(name, False, "tracepoint sock:sock_recv_length missing", min_kernel)


# Without sock:sock_recv_length the kernel path links threads from the syscall
# tracepoints of the reads (threads_syscalls.bpf.c), which need CONFIG_FTRACE_SYSCALLS;
# that option is also what puts these types (kernel/trace/trace_syscalls.c) in the BTF.
SYSCALL_TP_BTF_TYPE = b"syscall_trace_exit"
SYSCALL_TP_EVENTS = ("sys_enter_recvfrom", "sys_exit_recvfrom", "sys_enter_read", "sys_exit_read")
_TRACEFS_SYSCALLS = tuple(f"{d}/events/syscalls" for d in TRACEFS_DIRS)


def probe_syscall_tracepoints() -> Probe:
    """The syscalls:sys_{enter,exit}_* tracepoints: found in tracefs or the kernel's BTF."""
    name = "syscall_tracepoints"
    for root in _TRACEFS_SYSCALLS:
        if os.path.isdir(root):
            missing = [e for e in SYSCALL_TP_EVENTS if not os.path.isdir(os.path.join(root, e))]
            if missing:
                return Probe(name, False, "tracepoints missing: syscalls:" + ", syscalls:".join(missing))
            return Probe(name, True, "syscall tracepoints present (tracefs)")
    try:
        with open(BTF_VMLINUX, "rb") as f:
            found = SYSCALL_TP_BTF_TYPE in f.read()
    except OSError as e:
        return Probe(name, None, f"cannot tell: no tracefs, {BTF_VMLINUX}: {e.strerror}")
    if found:
        return Probe(name, True, "syscall tracepoints present (kernel BTF)")
    return Probe(name, False, "no syscall tracepoints (kernel built without CONFIG_FTRACE_SYSCALLS)")


def probe_btf() -> Probe:
    if os.path.exists(BTF_VMLINUX):
        return Probe("btf", True, f"{BTF_VMLINUX} present", "5.4")
    return Probe("btf", False, f"{BTF_VMLINUX} missing (kernel built without CONFIG_DEBUG_INFO_BTF)", "5.4")


def probe_cgroup_v2() -> Probe:
    if libbpf is None:
        return Probe("cgroup_v2", None, LIBBPF_ERROR, "4.5")
    mount = libbpf.cgroup_v2_mount()
    if mount:
        return Probe("cgroup_v2", True, mount, "4.5")
    return Probe("cgroup_v2", False, "no cgroup2 file system mounted", "4.5")


ALL_PROBES: tuple[Callable[[], Probe], ...] = (
    probe_btf,
    probe_bpf_loop,
    probe_sock_recv_tracepoint,
    probe_syscall_tracepoints,
    probe_tracefs,
    probe_sockops,
    probe_sk_msg,
    probe_tc,
    probe_tcx,
    probe_ringbuf,
    probe_cgroup_v2,
    probe_write_user,
)


def run_all(probes: tuple[Callable[[], Probe], ...] = ALL_PROBES) -> dict[str, Probe]:
    """Every probe of `probes` (by default the kernel's), by name."""
    out: dict[str, Probe] = {}
    for fn in probes:
        try:
            p = fn()
        except Exception as e:  # belt and braces: probes must not raise
            p = Probe(fn.__name__.removeprefix("probe_"), False, f"{type(e).__name__}: {e}")
        out[p.name] = p
    return out
