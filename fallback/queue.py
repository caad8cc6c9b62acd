"""The NFQUEUE loop: one thread reads packets, asks the handler, always accepts.

The thread sits in netfilterqueue's blocking C receive loop (`run()`): no Python runs
between packets. The netlink socket has a receive timeout (SO_RCVTIMEO), so when idle the
loop returns every `WAKE_S` and the thread sees `stop()`: stopping is prompt without a
select() and a Python loop turn per packet.

Fail open: whatever the handler does (returns, raises), the packet gets NF_ACCEPT, with the
new bytes/mark only when the handler produced them without error. When the process dies
the queue has no reader and the rules' --queue-bypass lets packets through.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Callable

from netfilterqueue import NetfilterQueue

from .flows import Verdict

log = logging.getLogger("obi.fallback")

NF_INET_LOCAL_OUT = 3  # hook numbers as netfilterqueue reports them
QUEUE_MAXLEN = 4096
WAKE_S = 0.2  # idle receive timeout: how long stop() may wait for the reader thread


class QueueLoop:
    def __init__(self, num: int, handler: Callable[[bytes, bool], Verdict],
                 on_idle: Callable[[], None] | None = None) -> None:
        self.num = num
        self.handler = handler
        self.on_idle = on_idle  # called in the reader thread after WAKE_S without packets
        self.errors = 0
        self.packets = 0
        self._nfq: NetfilterQueue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _callback(self, pkt) -> None:
        self.packets += 1
        try:
            verdict = self.handler(pkt.get_payload(), pkt.hook == NF_INET_LOCAL_OUT)
            if verdict.mark:
                pkt.set_mark(verdict.mark)
            if verdict.payload is not None:
                pkt.set_payload(verdict.payload)
        except Exception:
            self.errors += 1
            if self.errors <= 10:
                log.exception("packet handler failed; packet accepted unchanged")
        finally:
            pkt.accept()

    def start(self) -> None:
        nfq = NetfilterQueue()
        nfq.bind(self.num, self._callback, max_len=QUEUE_MAXLEN)
        self._nfq = nfq
        self._thread = threading.Thread(target=self._loop, name=f"nfqueue-{self.num}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        nfq = self._nfq
        assert nfq is not None
        # A receive timeout on the queue's netlink socket makes the blocking run() return
        # (EAGAIN) when no packet came for WAKE_S. fromfd() dups the descriptor; the
        # option belongs to the socket both descriptors share.
        with socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW) as sock:
            sec = int(WAKE_S)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            struct.pack("ll", sec, int((WAKE_S - sec) * 1_000_000)))
        while not self._stop.is_set():
            try:
                nfq.run(block=True)
                if self.on_idle is not None:
                    self.on_idle()
            except Exception:
                self.errors += 1
                if self.errors <= 10:
                    log.exception("nfqueue loop error")
                self._stop.wait(0.01)  # a persistent error must neither spin nor flood the log

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._nfq is not None:
            self._nfq.unbind()
            self._nfq = None
