"""Throwaway network topologies in namespaces, for the demo, the tests and the benchmarks.

A `Topology` is a set of hosts, each its own network namespace, all plugged into one
Linux bridge that lives in a switch namespace. Host addresses come from 198.18.0.0/15
(RFC 2544 benchmarking range), so nothing here can reach a real network. Each host may
also get its own cgroup v2 directory, so BPF programs can be attached to exactly the
processes under test instead of to the whole machine.

Everything created is removed on exit, also when the body raised.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Sequence

CGROUP2_ROOT = "/sys/fs/cgroup/unified"
_NETNS_DIR = "/run/netns"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def cgroup2_root() -> str:
    """The cgroup v2 mount point (hybrid hosts mount it at .../unified)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return left.split()[4]
    return CGROUP2_ROOT


@dataclass
class Host:
    name: str  # short name given by the caller, e.g. "client"
    netns: str  # namespace name under /run/netns
    ifname: str  # interface inside the namespace
    addr: str  # IPv4 address, no prefix
    addr6: str  # IPv6 address, no prefix
    cgroup: str = ""  # cgroup v2 directory, or "" when none was asked for
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def netns_path(self) -> str:
        return os.path.join(_NETNS_DIR, self.netns)

    def _argv(self, argv: Sequence[str]) -> list[str]:
        inner = ["ip", "netns", "exec", self.netns, *argv]
        if not self.cgroup:
            return inner
        # Join the cgroup before exec, so not even the first syscall escapes it.
        procs = os.path.join(self.cgroup, "cgroup.procs")
        script = f"echo $$ > {shlex.quote(procs)} && exec {shlex.join(inner)}"
        return ["sh", "-c", script]

    def run(self, argv: Sequence[str], timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a command to completion inside the host (its netns and cgroup)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self._argv(argv), timeout=timeout, check=check, **kw)

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a long-running command inside the host; it is killed when the topology closes."""
        proc = subprocess.Popen(self._argv(argv), **kw)
        self.procs.append(proc)
        return proc

    def ifindex(self) -> int:
        out = subprocess.run(
            ["ip", "-n", self.netns, "-o", "link", "show", self.ifname], check=True, capture_output=True, text=True
        ).stdout
        return int(out.split(":", 1)[0])


class Topology:
    """Hosts on one bridge. Use as a context manager::

    with Topology(["client", "svc", "backend"], prefix="obit") as topo:
        topo["svc"].popen([...])
    """

    def __init__(
        self, hosts: Sequence[str], prefix: str = "obi", cgroups: bool = True, mtu: int = 1500, subnet: int = 0
    ):
        tag = prefix + secrets.token_hex(3)
        self.tag = tag
        self.mtu = mtu
        self.cgroups = cgroups
        self.switch = f"{tag}-sw"
        # 198.18.<subnet>.0/24 and fd00:198:18:<subnet>::/64; hosts get .1, .2, ...
        self.subnet = subnet
        self.hosts: dict[str, Host] = {}
        for i, name in enumerate(hosts, start=1):
            self.hosts[name] = Host(
                name=name,
                netns=f"{tag}-{name}"[:32],
                ifname="eth0",
                addr=f"198.18.{subnet}.{i}",
                addr6=str(ipaddress.IPv6Address(f"fd00:198:18:{subnet}::{i}")),  # canonical form
            )
        self._made_ns: list[str] = []
        self._made_cgroups: list[str] = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> "Topology":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self._made_ns.append(self.switch)
        _ip("-n", self.switch, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        root = cgroup2_root()
        for i, host in enumerate(self.hosts.values(), start=1):
            _ip("netns", "add", host.netns)
            self._made_ns.append(host.netns)
            peer = f"p{i}"
            _ip(
                "-n",
                host.netns,
                "link",
                "add",
                host.ifname,
                "mtu",
                str(self.mtu),
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                self.switch,
            )
            _ip("-n", self.switch, "link", "set", peer, "mtu", str(self.mtu), "master", "br0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
            _ip("-n", host.netns, "addr", "add", f"{host.addr6}/64", "dev", host.ifname, "nodad")
            _ip("-n", host.netns, "link", "set", host.ifname, "up")
            if self.cgroups:
                path = os.path.join(root, f"{self.tag}-{host.name}")
                os.mkdir(path)
                self._made_cgroups.append(path)
                host.cgroup = path
        self.wait_reachable()

    def wait_reachable(self, timeout: float = 10.0) -> None:
        """Bridges forward only after the ports settle; ping until every host answers."""
        first = next(iter(self.hosts.values()))
        deadline = time.monotonic() + timeout
        for host in self.hosts.values():
            while True:
                r = subprocess.run(
                    ["ip", "netns", "exec", first.netns, "ping", "-c1", "-W1", host.addr], capture_output=True
                )
                if r.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"host {host.name} ({host.addr}) unreachable in topology {self.tag}")
                time.sleep(0.1)

    def close(self) -> None:
        for host in self.hosts.values():
            for proc in host.procs:
                if proc.poll() is None:
                    proc.kill()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            host.procs.clear()
        for path in reversed(self._made_cgroups):
            _kill_cgroup(path)
        self._made_cgroups.clear()
        for ns in reversed(self._made_ns):
            _ip("netns", "del", ns, check=False)
        self._made_ns.clear()


def _kill_cgroup(path: str) -> None:
    """Kill whatever is left in a cgroup we made, then remove the directory."""
    kill = os.path.join(path, "cgroup.kill")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(os.path.join(path, "cgroup.procs"), encoding="utf-8") as f:
                if not f.read().strip():
                    break
            if os.path.exists(kill):
                with open(kill, "w", encoding="utf-8") as f:
                    f.write("1")
        except FileNotFoundError:
            return
        time.sleep(0.05)
    try:
        os.rmdir(path)
    except OSError:
        pass


def have_netns_tools() -> str:
    """ "" when namespaces can be built here, else the reason (for skips)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "ping"):
        if not shutil.which(tool):
            return f"needs the '{tool}' command (iproute2 / iputils-ping)"
    return ""
