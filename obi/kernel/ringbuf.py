"""Reader of the BPF ring buffer through which the kernel datapath hands its events over.

The agent's hot path: every span starts as a record here (see `RingReader`).
"""

from __future__ import annotations

import errno as _errno
import logging
import mmap
import select
import struct
from typing import Callable

from ..errors import BpfError
from .libbpf import Map, _Closing

log = logging.getLogger("obi.kernel.ringbuf")


class RingReader(_Closing):
    """Consume a BPF_MAP_TYPE_RINGBUF map by reading its memory directly (mmap), in
    batches: no libbpf callback per record (a ctypes callback costs microseconds; at tens
    of thousands of records per second the agent fell behind and the kernel dropped
    events). Kernel layout (kernel/bpf/ringbuf.c): page 0 holds consumer_pos (we write it),
    page 1 producer_pos, then the data area, mapped twice so that a record that wraps is
    contiguous. Each record: u32 len (bit 31 busy, bit 30 discarded), u32 page offset, then
    len bytes, the whole rounded up to 8.

    `callback(view)` gets a memoryview of each record, valid only during the call (copy
    what you keep). Exceptions in it are logged and counted in `.errors`."""

    _BUSY = 1 << 31
    _DISCARD = 1 << 30
    _U64 = struct.Struct("=Q")
    _U32 = struct.Struct("=I")

    def __init__(self, map: Map, callback: Callable[[memoryview], None]):
        if map.map_type != 27:  # BPF_MAP_TYPE_RINGBUF
            raise BpfError(f"map {map.name} is not a ring buffer", _errno.EINVAL)
        self.errors = 0
        self.events = 0
        self._cb = callback
        page = mmap.PAGESIZE
        size = map.max_entries
        self._mask = size - 1
        fd = map.fd
        try:
            self._cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._prod = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError as e:
            raise BpfError(f"mmap of ring buffer {map.name}: {e}", e.errno or _errno.EINVAL) from e
        self._data: memoryview | None = memoryview(self._prod)[page:]
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)

    def consume(self) -> int:
        """Handle every record committed so far (in order, up to the first one still being
        written); returns how many."""
        data = self._data
        if data is None:
            raise BpfError("ring buffer closed", _errno.EBADF)
        u32, mask, cb = self._U32.unpack_from, self._mask, self._cb
        cons = self._U64.unpack_from(self._cons, 0)[0]
        n = 0
        while True:
            prod = self._U64.unpack_from(self._prod, 0)[0]
            start = cons
            while cons < prod:
                off = cons & mask
                hdr = u32(data, off)[0]
                if hdr & self._BUSY:
                    break  # reserved, not committed yet: later records wait for it
                length = hdr & ~(self._BUSY | self._DISCARD)
                if not hdr & self._DISCARD:
                    n += 1
                    try:
                        cb(data[off + 8 : off + 8 + length])
                    except Exception:
                        self.errors += 1
                        log.exception("ring buffer callback failed")
                cons += (length + 8 + 7) & ~7
            if cons == start:
                break
            self._U64.pack_into(self._cons, 0, cons)  # frees the space for the producer
        self.events += n
        return n

    def poll(self, timeout_ms: int) -> int:
        """Consume what is there, else wait up to timeout_ms for records and consume them."""
        n = self.consume()
        if n:
            return n
        try:
            self._epoll.poll(timeout_ms / 1000)
        except InterruptedError:
            return 0
        return self.consume()

    def close(self) -> None:
        if self._data is not None:
            self._data.release()
            self._data = None
            self._epoll.close()
            self._prod.close()
            self._cons.close()
