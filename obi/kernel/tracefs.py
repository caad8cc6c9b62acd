"""tracefs, through which libbpf attaches tracepoints: where it is mounted, and mounting it."""

from __future__ import annotations

import ctypes
import logging
import os

from ..errors import MissingFeature

log = logging.getLogger("obi.kernel.tracefs")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


# libbpf attaches a tracepoint by name through tracefs (events/<category>/<name>/id);
# where it may be mounted. The agent mounts it at the first when neither is
# (ensure_tracefs).
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def tracefs_mounted() -> str:
    """Where tracefs is mounted (one of TRACEFS_DIRS), or ""."""
    return next((d for d in TRACEFS_DIRS if os.path.isdir(os.path.join(d, "events"))), "")


def ensure_tracefs() -> str:
    """Mount tracefs at /sys/kernel/tracing unless it is mounted already (minimal hosts
    and containers often lack the mount; systemd makes it at boot elsewhere). Returns where
    it is. It stays mounted at exit: a mount of the kernel's own tracing view, shared with
    every other tracing tool, not an attachment of ours. Raises MissingFeature if it cannot
    be mounted (no CAP_SYS_ADMIN, or a kernel without tracefs)."""
    where = tracefs_mounted()
    if where:
        return where
    target = TRACEFS_DIRS[0]
    if _libc.mount(b"tracefs", target.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise MissingFeature("tracefs", "4.1", f"not mounted and mounting it at {target} failed: {os.strerror(err)}")
    log.info("mounted tracefs at %s (tracepoints are attached through it)", target)
    return target
