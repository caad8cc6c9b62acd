"""UserspaceDatapath: the DatapathRunner for kernels without bpf_loop (NFQUEUE + Python).

Runs in the network namespace of the hosts it watches (like the agent). start() reads the
MTU, finds the watched ports, relaxes conntrack's TCP window check for this netns (peers
ack bytes the local stack never sent, which strict conntrack would mark INVALID, and an
untracked packet no longer matches our connmark rules), adds the iptables rules and
starts reading the queue. stop() undoes it in reverse order.

Connections with inserted headers cannot go on without translation (`shift_journal`). start()
resumes those a killed predecessor left in the shift journal; stop() first drains: no new
connections are tracked and nothing more is inserted, while open connections with
inserted bytes keep being translated until they close, for at most half of
shutdown_timeout. Those still open then are reset (both ends see a reset; none sees
corrupted bytes) before the rules go.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time

from obi.config import Config
from obi.datapath import SpanSink
from obi.errors import AttachError, MissingFeature

from . import rules, shift_journal
from .flows import INSERT_LEN, TCP_OPTION_ROOM, Tracker
from .queue import QueueLoop
from .socket_owners import ProcOwners

log = logging.getLogger("obi.fallback")

LIBERAL = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"
IP_TCP_HEADERS = 60  # IPv6 (40) + TCP (20): the MSS headroom is computed for the larger family
# Finished spans are handed to the exporter in batches of this many (or when the queue
# has been idle for queue.WAKE_S, or at stop): the exporter's thread then wakes once per
# batch instead of competing with the packet thread for the GIL on every span.
SPAN_BATCH = 128
SPAN_DELAY_S = 0.05  # ...and at least this often while spans are waiting
SELECT_INTERVAL_S = 1.0  # processes are rescanned this often (their cgroups choose the SYNs queued)


def path_mtu() -> int:
    """Smallest MTU of the up, non-loopback interfaces of this netns (1500 if none)."""
    mtus = []
    for dev in os.listdir("/sys/class/net"):
        if dev == "lo":
            continue
        try:
            with open(f"/sys/class/net/{dev}/mtu") as f:
                mtus.append(int(f.read()))
        except (OSError, ValueError):
            continue
    return min(mtus) if mtus else 1500


def clamp_mss(mtu: int, tcp_option: bool) -> int:
    return mtu - IP_TCP_HEADERS - INSERT_LEN - (TCP_OPTION_ROOM if tcp_option else 0)


class UserspaceDatapath:
    name = "userspace"

    def __init__(self, cfg: Config, sink: SpanSink, queue_num: int = rules.DEFAULT_QUEUE) -> None:
        self.cfg = cfg
        self.sink = sink
        self.queue_num = queue_num
        self.instance = rules.instance()
        self.owners = ProcOwners(cfg)
        self.tracker: Tracker | None = None
        self._rules: rules.Rules | None = None
        self._queue: QueueLoop | None = None
        self._liberal_before: str | None = None
        self._lock = threading.Lock()
        self._queue_counts: dict[str, int] = {}
        self._journal: shift_journal.Journal | None = None
        self.drain_s = cfg.shutdown_timeout_s / 2  # the other half is for flushing spans
        self.drain_stats: dict[str, int] = {}
        self._spans: list = []  # finished spans not yet handed to the sink
        self._flushed_at = 0.0
        self._rescan_stop = threading.Event()
        self._rescanner: threading.Thread | None = None

    def start(self) -> None:
        if os.geteuid() != 0:
            raise MissingFeature("NFQUEUE userspace datapath (needs root / CAP_NET_ADMIN)")
        if not shutil.which("iptables") or not shutil.which("ip6tables"):
            raise MissingFeature("iptables/ip6tables commands (userspace datapath)")
        try:
            mtu = path_mtu()
            ports = [(r.low, r.high) for r in self.cfg.open_ports]
            if self.cfg.auto_target_exe:
                ports += [(p, p) for p in self.owners.listening_ports()]
            self.owners.refresh()
            self._journal = shift_journal.Journal()
            resumed = self._journal.open()
            self.tracker = Tracker(
                self.cfg,
                self._spans.append,
                self.owners,
                mtu=mtu,
                mark=rules.MARK,
                shift_mark=rules.SHIFT,
                journal=self._journal,
            )
            for key, (base, inserts) in resumed.items():
                self.tracker.resume(key, base, inserts)
            if resumed:
                log.info(
                    "userspace datapath: resumed translation of %d connection(s) with inserted headers", len(resumed)
                )
            self._set_liberal()
            self._queue = QueueLoop(
                self.queue_num,
                rules.observe_queue(self.queue_num),
                self._handle,
                on_idle=self._idle,
                on_loss=self._lost,
                release=self._release,
                syn_queue=rules.syn_queue(self.queue_num),
            )
            self._queue.start()  # read before the rules send us packets
            self._rules = rules.Rules(ports, self.queue_num, clamp_mss(mtu, self.cfg.propagate_tcp), self.instance)
            self._rules.__enter__()
            self._rules.set_syn_cgroups(self.owners.cgroups())
            self._rescan_stop.clear()
            self._rescanner = threading.Thread(target=self._rescan, name="obi-fallback-rescan", daemon=True)
            self._rescanner.start()
            # Only now, with the journal resumed, the queues read and our rules in place, the
            # rules of a killed predecessor go: removing them first would let its connections
            # with inserted headers pass untranslated in between (their stream corrupted).
            for line in rules.remove_stale():
                log.info("userspace datapath: %s (left by a killed agent)", line)
            log.info(
                "userspace datapath: queues %d (sync), %d (observe) and %d (SYNs of %s), ports %s, mtu %d "
                "(links outgoing calls per process, not per thread)",
                self.queue_num,
                rules.observe_queue(self.queue_num),
                rules.syn_queue(self.queue_num),
                "the selected processes' cgroups" if self._rules.cgroup_match else "every process",
                ports,
                mtu,
            )
        except MissingFeature:
            self.stop()
            raise
        except Exception as e:
            self.stop()
            raise AttachError(f"userspace datapath: {e}") from e

    def _rescan(self) -> None:
        """Every SELECT_INTERVAL_S: walk /proc for the selected processes (outside the packet
        thread's lock), hand the result over, and queue the SYNs of their cgroups only."""
        while not self._rescan_stop.wait(SELECT_INTERVAL_S):
            try:
                scanned = self.owners.scan()
                with self._lock:
                    self.owners.apply(scanned)
                    cgroups = self.owners.cgroups()
                if self._rules is not None:
                    self._rules.set_syn_cgroups(cgroups)
            except Exception:
                log.exception("userspace datapath: rescanning processes failed")

    def _handle(self, data: bytes, outgoing: bool, ts_ns: int | None = None):
        assert self.tracker is not None
        with self._lock:
            verdict = self.tracker.handle(data, outgoing, ts_ns)
            if self._journal is not None and self._journal.too_big:
                self._journal.rewrite(self.tracker.shift_state())
            spans = self._spans
            if spans and (len(spans) >= SPAN_BATCH or time.monotonic() - self._flushed_at > SPAN_DELAY_S):
                self._flush_spans()
            return verdict

    def _release(self, overdue: bool) -> list:
        """Verdicts of held packets (segments of request heads) decided since the last call;
        `overdue`: decide first those that waited their time."""
        tracker = self.tracker
        assert tracker is not None
        if overdue:
            with self._lock:
                tracker.tick()
                return tracker.take_released()
        if not tracker.released:  # the usual case: no lock needed to see that
            return []
        with self._lock:
            return tracker.take_released()

    def _lost(self, n: int) -> None:
        """Observed packets the tracker will never see (backlog overflow): streams have holes."""
        assert self.tracker is not None
        with self._lock:
            self.tracker.copies_lost(n)

    def _idle(self) -> None:
        with self._lock:
            self._flush_spans()

    def _flush_spans(self) -> None:
        """Hand the finished spans to the sink (caller holds self._lock or the queue is stopped)."""
        self._flushed_at = time.monotonic()
        if not self._spans:
            return
        spans = self._spans[:]
        del self._spans[:]  # in place: the tracker holds this list's append
        sink = self.sink
        for rec in spans:
            try:
                sink(rec)
            except Exception:  # the sink must not break the datapath
                log.exception("span sink failed")

    def _drain(self) -> None:
        """Keep translating connections with inserted bytes until they close (bounded), then
        reset those still open while the rules still translate the reset."""
        tracker = self.tracker
        if tracker is None or self._queue is None:
            return
        with self._lock:
            tracker.draining = True
            tracker.tick()  # held heads go now, with nothing inserted
        deadline = time.monotonic() + self.drain_s
        while True:
            with self._lock:
                left = [f.key for f in tracker.shifted()]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        reset = sum(shift_journal.abort(key) for key in left)
        if left:
            log.warning(
                "userspace datapath: %d connection(s) with inserted headers still open after %.1fs "
                "of draining; reset %d of them",
                len(left),
                self.drain_s,
                reset,
            )
            time.sleep(0.1)  # let the queue translate the resets
        self.drain_stats = {"drain_left": len(left), "drain_reset": reset}

    def _set_liberal(self) -> None:
        try:
            with open(LIBERAL) as f:
                self._liberal_before = f.read().strip()
            if self._liberal_before != "1":
                with open(LIBERAL, "w") as f:
                    f.write("1")
        except OSError as e:
            log.warning("cannot relax conntrack TCP window checks (%s); inserted headers may stall", e)

    def stop(self) -> None:
        self._rescan_stop.set()
        if self._rescanner is not None:
            self._rescanner.join(10)
            self._rescanner = None
        if self._rules is not None:
            try:
                self._drain()
            except Exception:
                log.exception("draining failed")
            self._rules.remove()
            self._rules = None
        if self._queue is not None:
            self._queue.stop()
            self._queue_counts = self._queue.stats()
            self._queue = None
        if self.tracker is not None:
            with self._lock:
                self.tracker.close_all()
                self._flush_spans()
        if self._journal is not None:
            # Kept only if connections with inserted bytes remain (a failed start, a failed reset).
            keep = self.tracker is not None and bool(self.tracker.shifted(linger=0))
            self._journal.close(remove=not keep)
            self._journal = None
        if self._liberal_before not in (None, "1"):
            try:
                with open(LIBERAL, "w") as f:
                    f.write(self._liberal_before)
            except OSError:
                pass
        self._liberal_before = None

    def stats(self) -> dict[str, int]:
        out = dict(self.tracker.stats) if self.tracker else {}
        out.update(self._queue_counts)
        out.update(self.drain_stats)
        if self._queue is not None:
            out.update(self._queue.stats())
        return out


def cleanup() -> list[str]:
    """Remove leftovers of a killed userspace agent in this netns (same as rules.cleanup)."""
    return rules.cleanup()
