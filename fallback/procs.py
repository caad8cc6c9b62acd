"""Which process owns a socket, from /proc (the userspace path has no socket hooks).

Only processes in the agent's own network namespace are looked at: the agent runs in the
netns of the hosts it watches, and /proc/net/tcp* describes exactly that namespace.
"""

from __future__ import annotations

import fnmatch
import os
import time

from obi.config import Config

from . import codec

_LISTEN = "0A"
REFRESH_S = 2.0
MISS_REFRESH_S = 0.25  # at most this often on a SYN from an unknown socket


def _sockets(listening: bool) -> dict[tuple[int, int], int]:
    """{(local port, remote port): inode} for TCP sockets of this netns (v4 and v6)."""
    out: dict[tuple[int, int], int] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, encoding="ascii") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10 or (parts[3] == _LISTEN) != listening:
                        continue
                    lport = int(parts[1].rsplit(":", 1)[1], 16)
                    rport = int(parts[2].rsplit(":", 1)[1], 16)
                    out[(lport, rport)] = int(parts[9])
        except OSError:
            continue
    return out


def _socket_inodes(pid: int) -> set[int]:
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


class ProcOwners:
    """Owners for `flows.Tracker`: selected = listening on an open_port, or exe matches."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.netns = os.readlink("/proc/self/ns/net")
        self.me = os.getpid()
        self.port_pid: dict[int, int] = {}
        self.selected: set[int] = set()
        self._exe: dict[int, str] = {}
        self._refreshed = 0.0

    def refresh(self) -> None:
        """Map listening ports to pids; cost is one /proc walk, at most every REFRESH_S."""
        self._refreshed = time.monotonic()
        listening = {inode: lport for (lport, _), inode in _sockets(True).items()}
        port_pid: dict[int, int] = {}
        selected: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.me:
                continue
            pid = int(entry)
            try:
                if os.readlink(f"/proc/{pid}/ns/net") != self.netns:
                    continue
            except OSError:
                continue
            by_exe = self.cfg.exe_selected(self.exe(pid)) if self.cfg.auto_target_exe else False
            for inode in _socket_inodes(pid) & listening.keys():
                port = listening[inode]
                if self.cfg.port_selected(port) or by_exe:
                    port_pid.setdefault(port, pid)
                    selected.add(pid)
            if by_exe:
                selected.add(pid)
        self.port_pid, self.selected = port_pid, selected

    def _maybe_refresh(self) -> None:
        if time.monotonic() - self._refreshed > REFRESH_S:
            self.refresh()

    def listening_ports(self) -> list[int]:
        self.refresh()
        return sorted(self.port_pid)

    def server_pid(self, local_port: int) -> int | None:
        pid = self.port_pid.get(local_port)
        if pid is None:
            self._maybe_refresh()
            pid = self.port_pid.get(local_port)
        return pid

    def client_pid(self, pkt: codec.Packet) -> int | None:
        self._maybe_refresh()
        inode = _sockets(False).get((pkt.sport, pkt.dport))
        if inode is None:
            return None
        for attempt in (1, 2):
            for pid in self.selected:
                if inode in _socket_inodes(pid):
                    return pid
            # A process that started listening since the last walk: look again, rate-limited.
            if attempt == 1 and time.monotonic() - self._refreshed > MISS_REFRESH_S:
                self.refresh()
            else:
                break
        return None

    def exe(self, pid: int) -> str:
        exe = self._exe.get(pid)
        if exe is None:
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                exe = ""
            if len(self._exe) > 4096:
                self._exe.clear()
            self._exe[pid] = exe
        return exe
