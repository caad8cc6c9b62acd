"""Machine-wide probes: what this host lets the agent do, whichever datapath it runs.

Kernel lockdown, the agent's capabilities, and what the userspace datapath needs (iptables,
NFQUEUE and its reader extension). Kept out of `obi.kernel` so that the kernel wing never
imports the userspace one. Like the kernel feature probes (`obi.kernel.probes`), every
probe returns a `Probe` and never raises.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
from typing import Callable

from .kernel import probes
from .kernel.probes import Probe

SECURITYFS = "/sys/kernel/security"
NETNS_PREFIX = "obip"


# --- lockdown --------------------------------------------------------------------------


def parse_lockdown(text: str) -> str:
    """The active mode of /sys/kernel/security/lockdown, e.g.
    "none [integrity] confidentiality" -> "integrity"; "" if none is marked."""
    m = re.search(r"\[([a-z]+)\]", text)
    return m.group(1) if m else ""


def read_lockdown() -> tuple[str, str]:
    """(mode, detail). Mounts securityfs for the read if it is not mounted (and unmounts
    it again). Mode "" when it cannot be told."""
    path = os.path.join(SECURITYFS, "lockdown")
    mounted_here = False
    try:
        if not os.path.exists(path) and not os.path.ismount(SECURITYFS) and os.path.isdir(SECURITYFS):
            res = subprocess.run(
                ["mount", "-t", "securityfs", "securityfs", SECURITYFS],
                capture_output=True,
                text=True,
                timeout=5,
            )
            mounted_here = res.returncode == 0
            if not mounted_here:
                return "", f"cannot mount securityfs: {res.stderr.strip()}"
        try:
            with open(path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return "none", "no lockdown LSM in this kernel"
        mode = parse_lockdown(text)
        return mode, text
    except (OSError, subprocess.SubprocessError) as e:
        return "", f"cannot read {path}: {e}"
    finally:
        if mounted_here:
            subprocess.run(["umount", SECURITYFS], capture_output=True, timeout=5)


def probe_lockdown() -> Probe:
    mode, detail = read_lockdown()
    return Probe("lockdown", bool(mode), mode or detail, "5.4")


# --- capabilities ----------------------------------------------------------------------

# Capability -> number, and what stops working without it (for `obi doctor`).
CAPABILITIES: dict[str, tuple[int, str]] = {
    "CAP_BPF": (39, "loading BPF programs and creating maps (unless CAP_SYS_ADMIN)"),
    "CAP_PERFMON": (38, "tracepoint programs and pointer arithmetic in BPF (unless CAP_SYS_ADMIN)"),
    "CAP_NET_ADMIN": (12, "tc/tcx attach, sockops/sk_msg, NFQUEUE rules and queues"),
    "CAP_NET_RAW": (13, "raw sockets (userspace datapath packet re-injection, tests)"),
    "CAP_SYS_ADMIN": (21, "setns into network namespaces, mounting securityfs, finding BPF objects by id (cleanup)"),
    "CAP_SYS_PTRACE": (19, "reading /proc/<pid>/exe and fds of other users' processes (discovery)"),
    "CAP_DAC_READ_SEARCH": (2, "reading /proc/<pid>/fd of other users' processes (socket ownership)"),
    "CAP_CHECKPOINT_RESTORE": (40, "reading /proc/<pid>/map_files (executable discovery)"),
}


def parse_capeff(value: str | int) -> dict[str, bool]:
    """Which of `CAPABILITIES` the CapEff mask (hex string as in /proc/self/status) holds."""
    mask = int(value, 16) if isinstance(value, str) else value
    return {name: bool(mask >> bit & 1) for name, (bit, _) in CAPABILITIES.items()}


def read_capeff(status_path: str = "/proc/self/status") -> str:
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return line.split(":", 1)[1].strip()
    return "0"


def probe_capabilities() -> Probe:
    try:
        caps = parse_capeff(read_capeff())
    except OSError as e:
        return Probe("capabilities", None, f"cannot read /proc/self/status: {e}")
    missing = [n for n, have in caps.items() if not have]
    if not missing:
        return Probe("capabilities", True, "all of " + ", ".join(caps))
    return Probe("capabilities", False, "missing " + ", ".join(missing))


# --- iptables / NFQUEUE ----------------------------------------------------------------


def probe_iptables() -> Probe:
    try:
        out = subprocess.run(["iptables", "--version"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return Probe("iptables", False, f"iptables not usable: {e}")
    m = re.search(r"\((nf_tables|legacy)\)", out)
    backend = m.group(1) if m else "legacy" if out else ""
    if not out:
        return Probe("iptables", False, "iptables --version printed nothing")
    return Probe("iptables", True, f"{backend} ({out})")


def probe_nfqueue() -> Probe:
    """The NFQUEUE reader extension is built + iptables accepts an NFQUEUE rule (in a
    throw-away netns)."""
    try:
        from obi.fallback import _nfq  # noqa: F401
    except ImportError as e:
        return Probe(
            "nfqueue",
            False,
            f"NFQUEUE reader extension obi.fallback._nfq not built ({e}); reinstall obi-py with a C compiler",
        )
    ns = f"{NETNS_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        res = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True, timeout=10)
        if res.returncode != 0:
            return Probe("nfqueue", False, f"cannot create a network namespace: {res.stderr.strip()}")
        rule = [
            "iptables",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "9",
            "-j",
            "NFQUEUE",
            "--queue-num",
            "7",
            "--queue-bypass",
        ]
        res = subprocess.run(["ip", "netns", "exec", ns, *rule], capture_output=True, text=True, timeout=10)
        if res.returncode != 0:
            return Probe("nfqueue", False, f"iptables refused an NFQUEUE rule: {res.stderr.strip()}")
        return Probe(
            "nfqueue", True, "NFQUEUE reader (obi.fallback._nfq) built, iptables accepts NFQUEUE --queue-bypass"
        )
    except (OSError, subprocess.SubprocessError) as e:
        return Probe("nfqueue", False, f"{type(e).__name__}: {e}")
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


MACHINE_PROBES: tuple[Callable[[], Probe], ...] = (
    probe_lockdown,
    probe_capabilities,
    probe_iptables,
    probe_nfqueue,
)


def run_all() -> dict[str, Probe]:
    """Every machine-wide probe, by name."""
    return probes.run_all(MACHINE_PROBES)
