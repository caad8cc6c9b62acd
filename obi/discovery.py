"""Which processes the config selects, and which sockets they own, read from /proc.

Both datapaths select the same processes: those listening on an `open_port`, or whose
executable matches `auto_target_exe`, in the network namespace being watched. This is the
one place that reads /proc/net/tcp{,6} and /proc/<pid>/fd for that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .config import Config

_TCP_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


def tcp_table(listening: bool, proc_net: str = "/proc/net") -> dict[tuple[int, int], int]:
    """{(local port, remote port): socket inode} of the TCP sockets (v4 and v6) in the
    netns that `proc_net` (`/proc/net` or `/proc/<pid>/net`) describes; listening ones
    only, or all but the listening ones."""
    out: dict[tuple[int, int], int] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc_net}/{name}", encoding="ascii") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10 or (parts[3] == _TCP_LISTEN) != listening:
                        continue
                    lport = int(parts[1].rsplit(":", 1)[1], 16)
                    rport = int(parts[2].rsplit(":", 1)[1], 16)
                    out[(lport, rport)] = int(parts[9])
        except OSError:
            continue
    return out


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` has open (empty if it is gone)."""
    inodes: set[int] = set()
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return inodes
    for fd in names:
        try:
            target = os.readlink(f"{base}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def netns_inode(path: str) -> int | None:
    """Inode of a network namespace file (e.g. /proc/<pid>/ns/net), None if unreadable."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


@dataclass
class Selection:
    """The processes a config selects in one netns."""

    pids: set[int] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)  # selected listening ports
    port_pid: dict[int, int] = field(default_factory=dict)  # listening port -> first owner
    exes: dict[int, str] = field(default_factory=dict)  # pid -> executable path


def scan(cfg: Config, netns_ino: int | None, skip_pid: int = 0) -> Selection:
    """Walk /proc once: every process in the netns with inode `netns_ino` (None: any)
    that listens on a selected port or whose executable matches."""
    sel = Selection()
    listening_by_ns: dict[int, dict[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == skip_pid:
            continue
        pid = int(entry)
        ns = netns_inode(f"/proc/{pid}/ns/net")
        if ns is None or (netns_ino is not None and ns != netns_ino):
            continue
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue  # a kernel thread, or gone
        if ns not in listening_by_ns:
            listening_by_ns[ns] = {inode: lport for (lport, _), inode in tcp_table(True, f"/proc/{pid}/net").items()}
        listening = listening_by_ns[ns]
        own_ports = {listening[i] for i in socket_inodes(pid) if i in listening} if listening else set()
        by_exe = cfg.exe_selected(exe)
        chosen = {p for p in own_ports if by_exe or cfg.port_selected(p)}
        if chosen or by_exe:
            sel.pids.add(pid)
            sel.exes[pid] = exe
            sel.ports |= chosen
            for port in chosen:
                sel.port_pid.setdefault(port, pid)
    return sel
