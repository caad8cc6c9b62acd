"""The NFQUEUE loop: the C reader (`_nfq.Reader`) takes packets off the kernel's queues, one
Python thread runs the handler on them in order.

Two queues (see `rules`): packets of the *sync* queue (client connections, which may get an
inserted header, translated seq/ack or a mark) wait for the handler's verdict; packets of
the *observe* queue (connections served by watched processes, only read) were accepted by
the reader the moment it got them, and the handler sees a copy afterwards. So a served
request is not held up by Python, and when Python falls behind, the reader drops copies
(counted as `observe_dropped`) instead of holding traffic. Packets are handled in the order
the kernel queued them, so a sync packet waits for the copies ahead of it; when those are
older than SYNC_MAX_WAIT_S, the reader drops them (`observe_shed`) so that a client
connection is not held up by the backlog of served ones (fetches take at most FETCH_MAX
packets, so it gets the chance often). Lost and dropped copies are reported to
`on_loss(n)` before the next packet is handled: their connections' streams have holes.

Held packets: the handler may answer a sync packet with Verdict(hold=token) (a segment of a
request head not complete yet); its verdict then comes later from `release()`, which the
loop calls after every packet and, while anything is held, every HOLD_TICK_S (`release(True)`
also decides what waited too long). Released verdicts are sent before the current packet's,
so the kernel gets them in the order the packets came.

Fail open: whatever the handler does (returns, raises), a sync packet gets NF_ACCEPT, with
the new bytes/mark only when the handler produced them without error. If a verdict with new
bytes/mark cannot be sent (the reader refuses it), the packet is dropped instead (the
tracker already counts those bytes; TCP retransmits the segment, rebuilt the same way), never
left without a verdict. When the process dies the queues have no reader and the rules'
--queue-bypass lets packets through.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .flows import Verdict

log = logging.getLogger("obi.fallback")

QUEUE_MAXLEN = 4096  # packets the kernel keeps per queue awaiting a verdict
OBSERVE_BACKLOG = 65536  # copies of observed packets waiting for the handler, at most...
OBSERVE_BACKLOG_BYTES = 64 << 20  # ...and at most this many bytes of them
WAKE_S = 0.2  # idle fetch timeout: how long stop() may wait for the loop thread
SYNC_MAX_WAIT_S = 0.25  # how far behind the handler may be before a sync packet skips the backlog
FETCH_MAX = 1024  # packets per fetch: the reader sheds for a waiting sync packet between fetches
HOLD_TICK_S = 0.01  # fetch timeout while the handler holds packets (their deadline is checked between fetches)

Handler = Callable[[bytes, bool, int], Verdict]


class QueueLoop:
    """`handler(data, outgoing, ts_ns)`: ts_ns is when the reader got the packet."""

    def __init__(
        self,
        sync_queue: int,
        observe_queue: int,
        handler: Handler,
        on_idle: Callable[[], None] | None = None,
        backlog: int = OBSERVE_BACKLOG,
        on_loss: Callable[[int], None] | None = None,
        release: Callable[[bool], list[tuple[int, Verdict]]] | None = None,
        syn_queue: int = -1,
    ) -> None:
        self.sync_queue = sync_queue
        self.syn_queue = syn_queue  # SYNs of selected processes: wait for the handler too, bound fail-open
        self.observe_queue = observe_queue
        self.handler = handler
        self.on_idle = on_idle  # called in the loop thread after WAKE_S without packets
        self.backlog = backlog
        self.on_loss = on_loss  # called with the number of observed packets that will never be handled
        self.errors = 0
        self.packets = 0
        self.observe_changed = 0  # verdicts with changes for packets already accepted (a bug)
        self.dropped = 0  # sync packets dropped because their changed bytes could not be sent
        self.release = release  # (token, verdict) of packets the handler held; True: also the overdue ones
        self._held: dict[int, int] = {}  # hold token -> packet id
        self._reader = None
        self._final_stats: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        from . import _nfq  # the C extension; its absence is reported by the capability probe

        self._reader = _nfq.Reader(
            self.sync_queue, self.observe_queue, QUEUE_MAXLEN, self.backlog, OBSERVE_BACKLOG_BYTES, self.syn_queue
        )
        self._thread = threading.Thread(target=self._loop, name=f"nfqueue-{self.sync_queue}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        reader = self._reader
        assert reader is not None
        handler = self.handler
        while not self._stop.is_set():
            if self._held:
                self._send_released(reader, True)
            try:
                batch = reader.fetch(HOLD_TICK_S if self._held else WAKE_S, FETCH_MAX, SYNC_MAX_WAIT_S)
            except Exception:
                # Nobody would give sync packets their verdict: unbind, --queue-bypass takes over.
                log.exception("nfqueue reader failed; packets now pass by --queue-bypass")
                reader.close()
                return
            if not batch:
                if not reader.stats()["running"]:
                    # Unbind, so that the rules' --queue-bypass lets packets through.
                    log.error("nfqueue reader thread ended; packets now pass by --queue-bypass")
                    reader.close()
                    return
                lost = reader.take_lost()  # copies dropped with no packet after them
                if lost:
                    self._call_hook(self.on_loss, lost)
                self._call_hook(self.on_idle)
                continue
            self.packets += len(batch)
            for data, outgoing, ts_ns, packet_id, lost in batch:
                if lost:
                    self._call_hook(self.on_loss, lost)
                verdict = None
                try:
                    verdict = handler(data, outgoing, ts_ns)
                except Exception:
                    self._count_error("packet handler failed; packet accepted unchanged")
                if self.release is not None:
                    self._send_released(reader, False)  # earlier packets first
                if packet_id is None:  # observed: accepted long ago
                    if verdict is not None and (verdict.payload is not None or verdict.mark):
                        self.observe_changed += 1
                    continue
                if verdict is not None and verdict.hold:
                    self._held[verdict.hold] = packet_id
                    continue
                self._send(reader, packet_id, verdict)

    def _send(self, reader, packet_id: int, verdict: Verdict | None) -> None:
        changed = verdict is not None and (verdict.payload is not None or verdict.mark)
        try:
            if changed:
                reader.verdict(packet_id, verdict.payload, verdict.mark)
            else:
                reader.verdict(packet_id, None, 0)
        except Exception:
            self._count_error("verdict failed")
            self._verdict_failed(reader, packet_id, changed)

    def _send_released(self, reader, overdue: bool) -> None:
        try:
            released = self.release(overdue) if self.release is not None else []
        except Exception:
            self._count_error("release hook failed")
            released = []
        for token, verdict in released:
            packet_id = self._held.pop(token, None)
            if packet_id is not None:
                self._send(reader, packet_id, verdict)

    def _verdict_failed(self, reader, packet_id: int, changed: bool) -> None:
        """A verdict could not be sent. A packet never left without a verdict: it would hold
        its queue slot for good. Unchanged ones get another plain accept. Changed ones are
        dropped, not accepted unchanged: the tracker already counts their new bytes (an
        inserted header, translated numbers), and the kernel retransmits the segment, which
        is then rebuilt the same way."""
        try:
            if changed:
                reader.drop(packet_id)
                self.dropped += 1
            else:
                reader.verdict(packet_id, None, 0)
        except Exception:
            self._count_error("fallback verdict failed")

    def _call_hook(self, hook: Callable[..., None] | None, *args: int) -> None:
        """on_idle / on_loss: a failing hook is counted, never stops the loop."""
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            self._count_error(f"{hook!r} failed")

    def _count_error(self, what: str) -> None:
        self.errors += 1
        if self.errors <= 10:
            log.exception(what)

    def stats(self) -> dict[str, int]:
        """Loop and reader counters (the reader's are kept after stop())."""
        out = dict(self._final_stats)
        if self._reader is not None:
            out = {k: int(v) for k, v in self._reader.stats().items() if k != "running"}
        # packets_queued: what the kernel queued to us; packets_handled: what the handler got.
        out.update(
            packets_queued=out.get("received", 0),
            packets_handled=self.packets,
            handler_errors=self.errors,
            verdicts_dropped=self.dropped,
        )
        if self.observe_changed:
            out["observe_changed"] = self.observe_changed
        return out

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                # A handler stuck for 5 s. Closing is still safe: the reader waits for the
                # thread's fetch()/verdict() in progress, which refuse from then on.
                log.warning("nfqueue loop thread still busy after 5 s; closing the reader under it")
            self._thread = None
        if self._reader is not None:
            for packet_id in self._held.values():  # never left without a verdict
                try:
                    self._reader.verdict(packet_id, None, 0)
                except Exception:
                    pass
            self._held.clear()
            self._final_stats = {k: int(v) for k, v in self._reader.stats().items() if k != "running"}
            self._reader.close()  # accepts sync packets nobody fetched, unbinds both queues
            self._reader = None
