"""Which process owns a socket, from /proc (the userspace path has no socket hooks).

Only processes in the agent's own network namespace are looked at: the agent runs in the
netns of the hosts it watches, and /proc/net/tcp* describes exactly that namespace.
"""

from __future__ import annotations

import os
import time

from obi import discovery
from obi.config import Config

from . import codec

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

    def refresh(self) -> None:
        """Map listening ports to pids; cost is one /proc walk, at most every REFRESH_S."""
        self._refreshed = time.monotonic()
        # Taken before the walk: a socket that starts listening during it counts as new later.
        self._listening = set(discovery.tcp_table(True).values())
        sel = discovery.scan(self.cfg, self.netns, skip_pid=self.me)
        self.port_pid, self.selected = sel.port_pid, sel.pids
        self._exe.update(sel.exes)

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
        inode = discovery.tcp_table(False).get((pkt.sport, pkt.dport))
        if inode is None:
            return None
        for attempt in (1, 2):
            for pid in self.selected:
                if inode in discovery.socket_inodes(pid):
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
        """Whether a socket started listening in this netns since the last walk."""
        return not set(discovery.tcp_table(True).values()) <= self._listening

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
