"""QueueLoop on batches from a fake reader (no kernel): sync packets get exactly one verdict
each, observed copies none, a handler error still accepts; lost copies are reported before
the next packet, or when idle. (Shedding for a waiting sync packet is the reader's, tested
in tests/integration/test_userspace_queue.py.)"""

from __future__ import annotations

import time

from obi.fallback import queue
from obi.fallback.flows import Verdict


class FakeReader:
    def __init__(self, batches):
        self.batches = list(batches)
        self.verdicts = []

    def fetch(self, timeout, max_items, shed_after):
        return self.batches.pop(0) if self.batches else []

    def verdict(self, packet_id, payload, mark):
        self.verdicts.append((packet_id, payload, mark))

    def stats(self):
        return {"running": True}

    def close(self):
        self.closed = True

    def take_lost(self):
        lost, self.lost_after = getattr(self, "lost_after", 0), 0
        return lost


def run(batches, handler, lost_after=0):
    losses = []
    loop = queue.QueueLoop(1, 2, handler, on_loss=losses.append)
    loop._reader = reader = FakeReader(batches)
    reader.lost_after = lost_after  # copies dropped after the last packet: reported when idle
    loop.on_idle = loop._stop.set  # stop once the batches are used up
    loop._loop()
    return loop, reader, losses


def test_sync_packets_get_their_verdict_observed_copies_none():
    seen = []

    def handler(data, outgoing, ts_ns):
        seen.append(data)
        return Verdict(b"new" + data, 0x10) if data.startswith(b"s") else Verdict()

    now = time.time_ns()
    batch = [(b"o1", False, now, None, 0), (b"s1", True, now, 7, 0), (b"o2", True, now, None, 3)]
    loop, reader, losses = run([batch], handler)
    assert seen == [b"o1", b"s1", b"o2"]
    assert reader.verdicts == [(7, b"news1", 0x10)]
    assert losses == [3]  # reported before o2, the first packet after the reader's drops
    assert loop.errors == 0


def test_a_handler_error_still_accepts_the_sync_packet_unchanged():
    def handler(data, outgoing, ts_ns):
        raise RuntimeError("boom")

    loop, reader, _ = run([[(b"s", True, time.time_ns(), 9, 0)]], handler)
    assert reader.verdicts == [(9, None, 0)] and loop.errors == 1


def test_losses_after_the_last_packet_are_reported_when_idle():
    now = time.time_ns()
    loop, reader, losses = run([[(b"o1", False, now, None, 2)]], lambda *a: Verdict(), lost_after=5)
    assert losses == [2, 5]


def test_a_fresh_backlog_is_handled_in_order():
    seen = []

    def handler(data, outgoing, ts_ns):
        seen.append(data)
        return Verdict()

    now = time.time_ns()
    batch = [(b"o1", False, now, None, 0), (b"s1", True, now, 4, 0)]
    loop, reader, losses = run([batch], handler)
    assert seen == [b"o1", b"s1"] and losses == []


def test_a_failing_reader_is_closed_so_that_bypass_takes_over():
    class Broken(FakeReader):
        def fetch(self, timeout, max_items, shed_after):
            raise OSError("netlink gone")

    loop = queue.QueueLoop(1, 2, lambda *a: Verdict())
    loop._reader = reader = Broken([])
    loop._loop()  # returns instead of spinning
    assert reader.closed


class Refusing(FakeReader):
    """A reader that refuses verdicts whose payload one netlink attribute cannot carry (as
    the C reader does, instead of wrapping nla_len and having the kernel drop the verdict)."""

    def __init__(self, batches):
        super().__init__(batches)
        self.drops = []

    def verdict(self, packet_id, payload, mark):
        if payload is not None and len(payload) > 65531:
            raise ValueError("verdict payload too big")
        super().verdict(packet_id, payload, mark)

    def drop(self, packet_id):
        self.drops.append(packet_id)


def test_a_refused_changed_verdict_drops_the_packet_never_leaves_it_waiting():
    """The tracker already counts the new bytes (a header, translated numbers): accepting the
    packet unchanged would desynchronise the stream, leaving it without a verdict would hold
    a queue slot for good. It is dropped; TCP retransmits it, rebuilt the same way."""
    now = time.time_ns()
    batch = [(b"s1", True, now, 11, 0), (b"s2", True, now, 12, 0)]

    def handler(data, outgoing, ts_ns):
        return Verdict(b"x" * 70000, 0x10) if data == b"s1" else Verdict(b"ok", 0)

    loop = queue.QueueLoop(1, 2, handler)
    loop._reader = reader = Refusing([batch])
    loop.on_idle = loop._stop.set
    loop._loop()
    assert reader.drops == [11] and reader.verdicts == [(12, b"ok", 0)]
    assert loop.stats()["verdicts_dropped"] == 1 and loop.errors == 1


def test_stop_closes_the_reader_even_when_the_loop_thread_is_stuck(monkeypatch):
    """A handler stuck beyond stop()'s join: the reader is still closed (so the queues are
    unbound and --queue-bypass takes over); the real reader waits for the thread's fetch or
    verdict in progress before freeing anything (tests/integration/test_nfq_reader.py)."""
    import threading

    release = threading.Event()

    def handler(data, outgoing, ts_ns):
        release.wait(10)
        return Verdict()

    loop = queue.QueueLoop(1, 2, handler)
    loop._reader = reader = FakeReader([[(b"s", True, time.time_ns(), 5, 0)]])
    loop._thread = threading.Thread(target=loop._loop, daemon=True)
    loop._thread.start()
    monkeypatch.setattr(loop._thread, "join", lambda timeout=None: None)  # as if 5 s passed
    loop.stop()
    assert reader.closed
    release.set()


def test_held_packets_get_their_verdicts_later_in_order():
    """The handler holds s1 (a segment of an incomplete request head); s2 completes the
    head: s1's verdict (released) goes out before s2's, and a packet still held when the
    loop stops is accepted, never left without a verdict."""
    now = time.time_ns()
    released = []

    def handler(data, outgoing, ts_ns):
        if data == b"s1":
            return Verdict(hold=1)
        if data == b"s2":
            released.append((1, Verdict(b"S1+header", 0x10)))
            return Verdict(b"S2", 0x10)
        return Verdict(hold=2)  # s3: never released

    def release(overdue):
        out = released[:]
        del released[:]
        return out

    loop = queue.QueueLoop(1, 2, handler, release=release)
    batch = [(b"s1", True, now, 21, 0), (b"s2", True, now, 22, 0), (b"s3", True, now, 23, 0)]
    loop._reader = reader = FakeReader([batch])
    loop.on_idle = loop._stop.set
    loop._loop()
    assert reader.verdicts == [(21, b"S1+header", 0x10), (22, b"S2", 0x10)]
    loop.stop()
    assert reader.verdicts[-1] == (23, None, 0) and reader.closed
