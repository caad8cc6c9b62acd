"""Which process owns a socket, from /proc (the userspace path has no socket hooks).

Only processes in the agent's own network namespace are looked at: the agent runs in the
netns of the hosts it watches, and /proc/net/tcp* describes exactly that namespace.
"""

from __future__ import annotations

import os
import time

from obi import discovery
from obi.config import Config

from . import codec, sockdiag

REFRESH_S = 2.0
MISS_REFRESH_S = 0.25  # at most this often on a SYN from an unknown socket


class ProcOwners:
    """Owners for `flows.Tracker`: selected = listening on an open_port, or exe matches."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.netns = discovery.netns_inode("/proc/self/ns/net")
        self.me = os.getpid()
        self.port_pid: dict[int, int] = {}
        self.selected: set[int] = set()
        self._exe: dict[int, str] = {}
        self._refreshed = 0.0
        self._listening: set[int] = set()  # listening socket inodes of this netns at the last walk
        self._inode_pid: dict[int, int] = {}  # socket inode -> selected pid owning it

    def refresh(self) -> None:
        """Map listening ports to pids; cost is one /proc walk, at most every REFRESH_S."""
        self.apply(self.scan())

    def scan(self) -> tuple[float, set[int], discovery.Selection]:
        """The walk of refresh(), changing nothing (another thread may run it)."""
        now = time.monotonic()
        # Taken before the walk: a socket that starts listening during it counts as new later.
        try:
            listening = sockdiag.listening()
        except OSError:
            listening = set(discovery.tcp_table(True).values())
        return now, listening, discovery.scan(self.cfg, self.netns, skip_pid=self.me)

    def apply(self, scanned: tuple[float, set[int], discovery.Selection]) -> None:
        """Take the result of scan() (in the thread that uses this object)."""
        self._refreshed, self._listening, sel = scanned
        self.port_pid, self.selected = sel.port_pid, sel.pids
        self._exe.update(sel.exes)
        self._inode_pid = {}

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
        """The selected process that owns the socket sending this SYN, found by the socket's
        exact 4-tuple (sock_diag: one round trip, not a parse of /proc/net/tcp*, and no two
        sockets to different hosts taken for one), then by inode among the sockets of the
        selected processes."""
        self._maybe_refresh()
        try:
            sock = sockdiag.lookup((pkt.src, pkt.sport, pkt.dst, pkt.dport))
        except OSError:
            return None
        if sock is None or not sock.inode:
            return None
        for attempt in (1, 2):
            pid = self._inode_pid.get(sock.inode)
            if pid is None:
                self._inode_pid = self._selected_inodes()  # a socket opened since the last look
                pid = self._inode_pid.get(sock.inode)
            if pid is not None:
                return pid
            # A process that started listening since the last walk may be selected now: look
            # again at once. Otherwise (an unselected sender) walk /proc at most every
            # MISS_REFRESH_S, which also catches processes selected by executable.
            if attempt == 1 and (time.monotonic() - self._refreshed > MISS_REFRESH_S or self._new_listener()):
                self.refresh()
            else:
                break
        return None

    def _new_listener(self) -> bool:
        """Whether a socket started listening in this netns since the last walk (a dump of
        the listening sockets only: cheap however many others there are)."""
        try:
            return not sockdiag.listening() <= self._listening
        except OSError:
            return True

    def _selected_inodes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for pid in self.selected:
            for inode in discovery.socket_inodes(pid):
                out.setdefault(inode, pid)
        return out

    def socket_exists(self, key: tuple[bytes, int, bytes, int]) -> bool:
        """Whether a TCP socket with this exact 4-tuple exists (TIME_WAIT included)."""
        return sockdiag.lookup(key) is not None

    def cgroups(self) -> set[str]:
        """cgroup v2 paths of the selected processes (as /proc/<pid>/cgroup names them)."""
        out = set()
        for pid in self.selected:
            path = cgroup_path(pid)
            if path is not None:
                out.add(path)
        return out

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


def cgroup_path(pid: int) -> str | None:
    """The cgroup v2 path of a process (`0::<path>` in /proc/<pid>/cgroup), None if it is
    gone or has none."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip() or "/"
    except OSError:
        pass
    return None
