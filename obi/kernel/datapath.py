"""KernelDatapath: loads the BPF objects, attaches them, selects processes, turns ring
buffer events into spans (obi.datapath.DatapathRunner).

What gets attached (all through obi.kernel.attach, so `obi cleanup` knows about it):
- tpinjector.bpf.o: `obi_sockops` on cfg.cgroup_path (cgroup link) and `obi_sk_msg` on its
  sock_hash (client sockets only: server sockets in a sockmap would break blocking reads,
  obi_maps.h says how);
- tctracer.bpf.o: `obi_tc_ingress` and `obi_tc_egress` on every interface of the watched
  netns (tcx or clsact per cfg.traffic_control_backend); egress reads the responses of
  server connections;
- the thread hook (which request a thread serves, docs/architecture.md, decision 5), one of:
  threads.bpf.o: `obi_recv_length` on the sock:sock_recv_length tracepoint (Linux >= 6.3);
  threads_syscalls.bpf.o: `obi_sys_enter` / `obi_sys_exit` on the syscalls:sys_enter_* /
  sys_exit_* tracepoints of SYSCALLS (kernels without it). `thread_hook` chooses.
The three objects share one set of maps (obi_maps.h): egress creates them, the others
reuse its fds.

Process selection: a process is instrumented when it listens on a port of cfg.open_ports
(its /proc/<pid>/net/tcp{,6} listening sockets whose inode is among its fds) or when its
executable matches cfg.auto_target_exe; only processes in the watched netns count (one
agent per node, like a DaemonSet). Their tgids go to `selected_tgids`, their listening
ports to `server_ports`; a scanner thread refreshes both every `scan_interval` seconds.

TLS (connections that begin with a handshake record) is never parsed or written into;
its requests are request/response turns, and with `tcp` propagation the client's context
travels in TCP option kind 25 of one segment per request (tpinjector.bpf.c explains both).
Such spans have empty method/path, status 0 and extra {"tls": True, "tcp_option": ...}.

Sockets established before start() are adopted once, right after attaching: adopt.bpf.o's
TCP iterator, run from a thread inside the watched netns (an iterator walks its creator's
netns), puts the established client sockets of the selected processes (their socket
inodes, from /proc, in the iterator's adopt_inodes map) into sock_hash with an egress
parse state that waits for a write beginning with a start line (HS_RESYNC), so nothing is
inserted into a body (adopt.bpf.c says which sockets). Server connections need no adoption:
tc follows them from their next request. `adopted` counts what it did. Client sockets
with a request in flight at start, and adoption itself on kernels without TCP iterators,
are left as before: their requests pass unchanged with no client span. Adopted sockets
have no TCP-option callbacks (sockops sets them at establishment).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
import time
from typing import Iterable

from .. import discovery
from ..config import Config
from ..datapath import SpanSink
from ..errors import AttachError, BpfError, MissingFeature
from . import attach, libbpf, probes, ringbuf, tracefs
from .abi import COUNTER_MAX, Counter
from .events import Correlator
from .loader import ADOPT_ITER, OBJECTS, THREAD_HOOKS, cfg_flags, load, open_object, shared_fds
from .netns import in_netns

log = logging.getLogger("obi.kernel.datapath")

# Its output, one byte per established socket -> KernelDatapath.adopted key.
ADOPT_CODES = {b"S": "server", b"C": "client", b"b": "in_flight", b"k": "known", b"e": "failed", b"o": "not_selected"}

# The syscalls that read sockets, hooked by threads_syscalls (sock_recv_length fires for
# all of them, from sock_recvmsg).
SYSCALLS = ("read", "readv", "recvfrom", "recvmsg")


def choose_thread_hook(requested: str = "auto") -> str:
    """The THREAD_HOOKS key to use. "auto": sock_recv_length where that tracepoint exists
    (or cannot be told: attaching then says), else the syscall tracepoints."""
    if requested in THREAD_HOOKS:
        return requested
    if requested != "auto":
        raise ValueError(f"thread_hook must be auto or one of {sorted(THREAD_HOOKS)}, not {requested!r}")
    return "syscalls" if probes.probe_sock_recv_tracepoint().ok is False else "sock_recv_length"


# --- the datapath --------------------------------------------------------------------


class KernelDatapath:
    """The kernel fast path. `netns`: path of the network namespace whose interfaces and
    processes this agent watches ("" = the agent's own). `thread_hook`: how threads are
    linked to requests, "auto" or a THREAD_HOOKS key (tests force "syscalls")."""

    name = "kernel"

    def __init__(
        self,
        cfg: Config,
        sink: SpanSink,
        *,
        netns: str = "",
        state_dir: str | None = attach.DEFAULT_STATE_DIR,
        scan_interval: float = 0.5,
        thread_hook: str = "auto",
    ):
        self.cfg = cfg
        self.sink = sink
        self.netns = netns
        self.state_dir = state_dir
        self.scan_interval = scan_interval
        self.thread_hook = choose_thread_hook(thread_hook)
        self._objs: dict[str, libbpf.BpfObject] = {}
        self._attachments: list = []  # detached in reverse order
        self._links: list[libbpf.Link] = []
        self._ring: ringbuf.RingReader | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._exes: dict[int, str] = {}
        self._selected: set[int] = set()
        self._ports: set[int] = set()
        self._scan_lock = threading.Lock()
        self._map_full: dict[str, int] = {}  # what -> entries that did not fit at the last scan
        self.selection_map_full = 0
        self.correlator = Correlator(sink, exe_of=lambda pid: self._exes.get(pid, ""))
        self.started = False
        # What _adopt did with the connections that existed at start (ADOPT_CODES values).
        self.adopted: dict[str, int] = {}

    # -- lifecycle

    def start(self) -> None:
        if self.started:
            return
        try:
            self._load()
            self.scan_now()
            self._attach()
            self._adopt()
            self._ring = ringbuf.RingReader(self._objs["tpinjector"].map("events"), self.correlator.on_raw)
        except BaseException:
            self.stop()
            raise
        self._stop.clear()
        for target, name in ((self._poll_loop, "obi-kernel-events"), (self._scan_loop, "obi-kernel-scan")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.started = True

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        if self._ring is not None:
            try:
                self._ring.consume()  # what is already in the ring buffer still counts
            except BpfError:
                pass
        for a in reversed(self._attachments):
            try:
                a.detach()
            except Exception as e:  # keep detaching the rest
                log.warning("detach failed: %s", e)
        self._attachments.clear()
        for link in reversed(self._links):
            link.detach()
        self._links.clear()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self.correlator.flush()
        for obj in reversed(list(self._objs.values())):
            obj.close()
        self._objs.clear()
        self.started = False

    def __enter__(self) -> "KernelDatapath":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- loading and attaching

    def _load(self) -> None:
        """Load the objects; a failure is MissingFeature or ProgramRejected (loader.classify)."""
        shared: dict[str, int] = {}
        for name in (*OBJECTS, THREAD_HOOKS[self.thread_hook]):
            obj = self._objs[name] = open_object(name, cfg_flags(self.cfg), shared)
            load(obj)
            if not shared:
                shared.update(shared_fds(obj))

    def _adopt(self) -> None:
        """Run ADOPT_ITER once, in the watched netns: connections established before start()
        join sock_hash (adopt.bpf.c says which, and why that is safe). Without TCP
        iterators (Linux < 5.10 or so) they are left alone, as they were before."""
        try:
            obj = open_object(ADOPT_ITER[0], cfg_flags(self.cfg), shared_fds(self._objs["tpinjector"]))
        except BpfError as e:
            log.warning("pre-existing connections not adopted: %s", e)
            return
        try:
            obj.load()
            inodes = obj.map("adopt_inodes")
            one = struct.pack("=I", 1)
            for pid in sorted(self._selected):
                for ino in discovery.socket_inodes(pid):
                    inodes.update(struct.pack("=Q", ino), one)
            with in_netns(self.netns):
                out = obj.program(ADOPT_ITER[1]).run_iter()
        except BpfError as e:
            log.warning("pre-existing connections not adopted: %s", str(e).splitlines()[0])
            return
        finally:
            obj.close()  # the maps stay (egress holds them); the iterator is done
        self.adopted = {what: out.count(code) for code, what in ADOPT_CODES.items()}
        log.info("pre-existing TCP connections: %s", self.adopted)

    def _attach(self) -> None:
        eg = self._objs["tpinjector"]
        cgroup = self.cfg.cgroup_path or libbpf.cgroup_v2_mount()
        if not cgroup:
            raise MissingFeature("cgroup v2", "4.5", "no cgroup2 mount for sockops")
        sd = self.state_dir
        self._attachments.append(attach.CgroupAttachment(eg.program("obi_sockops"), cgroup, state_dir=sd).attach())
        self._attachments.append(
            attach.SkMsgAttachment(eg.program("obi_sk_msg"), eg.map("sock_hash"), state_dir=sd).attach()
        )
        self._attach_thread_hook()
        tc = self._objs["tctracer"]
        backend = self.cfg.traffic_control_backend
        with in_netns(self.netns):
            for ifindex, ifname in socket.if_nameindex():
                for direction in ("ingress", "egress"):
                    a = attach.TcAttachment(
                        tc.program(f"obi_tc_{direction}"), ifindex, direction, backend, state_dir=sd
                    )
                    try:
                        a.attach()
                    except (AttachError, BpfError) as e:
                        raise AttachError(f"tc {direction} on {ifname}: {e}") from e
                    self._attachments.append(a)

    def _attach_thread_hook(self) -> None:
        obj = self._objs[THREAD_HOOKS[self.thread_hook]]
        tracefs.ensure_tracefs()
        if self.thread_hook == "sock_recv_length":
            try:
                self._links.append(obj.program("obi_recv_length").attach_tracepoint("sock", "sock_recv_length"))
            except BpfError as e:
                raise MissingFeature("tracepoint sock:sock_recv_length", "6.3", str(e)) from e
            return
        log.info("thread hook: syscall tracepoints (%s)", ", ".join(SYSCALLS))
        enter, exit_ = obj.program("obi_sys_enter"), obj.program("obi_sys_exit")
        for call in SYSCALLS:
            # Exit before enter: no fd is remembered for a call whose exit is not hooked.
            for prog, tp in ((exit_, f"sys_exit_{call}"), (enter, f"sys_enter_{call}")):
                try:
                    self._links.append(prog.attach_tracepoint("syscalls", tp))
                except BpfError as e:
                    raise MissingFeature(f"tracepoint syscalls:{tp} (CONFIG_FTRACE_SYSCALLS)", "", str(e)) from e

    # -- process selection

    def scan_now(self) -> None:
        """Refresh selected_tgids / server_ports from /proc (also run periodically)."""
        with self._scan_lock:
            ino = discovery.netns_inode(self.netns or "/proc/thread-self/ns/net")
            sel = discovery.scan(self.cfg, ino)
            tgids, ports, exes = sel.pids, sel.ports, sel.exes
            eg = self._objs.get("tpinjector")
            if eg is None:
                return
            self._selected = self._sync(eg.map("selected_tgids"), self._selected, tgids, "processes")
            self._ports = self._sync(eg.map("server_ports"), self._ports, ports, "ports")
            self._exes = exes

    def _sync(self, m: libbpf.Map, old: Iterable[int], new: set[int], what: str) -> set[int]:
        """Make map `m` hold `new` (it holds `old`); returns what it holds after. A full map
        (E2BIG) keeps what fits: the rest stays uninstrumented, counted in
        selection_map_full at every scan, logged when it starts and when it ends."""
        one = struct.pack("=I", 1)
        held = set(old)
        for k in held - new:
            m.delete(struct.pack("=I", k))
            held.discard(k)
        refused = 0
        for k in sorted(new - held):
            try:
                m.update(struct.pack("=I", k), one)
            except BpfError as e:
                if e.errno != errno.E2BIG:
                    raise
                refused = len(new - held)
                break
            held.add(k)
        was = self._map_full.get(what, 0)
        if refused and not was:
            log.warning(
                "%s map full (%d entries): %d %s not instrumented until some go away",
                m.name,
                m.max_entries,
                refused,
                what,
            )
        elif was and not refused:
            log.info("%s map has room again: every selected %s instrumented", m.name, what)
        self._map_full[what] = refused
        self.selection_map_full += refused
        return held

    @property
    def selected_pids(self) -> set[int]:
        return set(self._selected)

    @property
    def server_ports(self) -> set[int]:
        return set(self._ports)

    def _scan_loop(self) -> None:
        while not self._stop.wait(self.scan_interval):
            try:
                self.scan_now()
            except Exception:
                log.exception("process scan failed")

    def _poll_loop(self) -> None:
        ring = self._ring
        last_sync = time.monotonic()
        while not self._stop.is_set() and ring is not None:
            try:
                ring.poll(100)
            except BpfError as e:
                log.warning("ring buffer poll: %s", e)
                time.sleep(0.1)
            if time.monotonic() - last_sync > 60:
                self.correlator.resync_clock()
                self.correlator.expire()
                last_sync = time.monotonic()

    # -- stats

    def counters(self) -> dict[str, int]:
        eg = self._objs.get("tpinjector")
        if eg is None:
            return {}
        m = eg.map("counters")
        out = {}
        for c in Counter:
            vals = m.lookup_percpu(struct.pack("=I", int(c))) or []
            out[c.name.lower()] = sum(struct.unpack("=Q", v[:8])[0] for v in vals)
        return out

    def stats(self) -> dict[str, int]:
        out = self.counters()
        out["spans"] = self.correlator.spans
        out["unmatched_responses"] = self.correlator.unmatched_responses
        out["requests_evicted"] = self.correlator.evicted + self.correlator.dropped_requests
        out["selection_map_full"] = self.selection_map_full
        out["selected_processes"] = len(self._selected)
        out["ring_callback_errors"] = self._ring.errors if self._ring else 0
        return out


assert COUNTER_MAX == len(Counter)
