"""One TCP socket by its exact 4-tuple, from the kernel (sock_diag netlink, no /proc parse).

`lookup((local addr, local port, peer addr, peer port))` asks the kernel for the socket with
exactly that 4-tuple in the current network namespace (an exact request, not a dump: one
round trip, whatever the number of sockets) and returns its state and inode, or None. The
userspace datapath uses it to tell which process owns the socket sending a SYN (by inode)
and whether a connection it translates still has a socket (TIME_WAIT included).
Addresses are packed (4 or 16 bytes), as in `flows.Key`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from typing import NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
TCP_LISTEN = 10
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
TCP_TIME_WAIT = 6

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid: ports (big
# endian), src[16], dst[16], interface, cookie[2].
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue, uid, inode
_MSG = struct.Struct("=BBBB48xIIIII")


class Socket(NamedTuple):
    state: int  # TCP_ESTABLISHED = 1, ... TCP_TIME_WAIT = 6
    inode: int  # 0 for a TIME_WAIT socket (no file behind it)


class SockDiag:
    """A netlink socket for exact lookups (thread-safe; one request at a time)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        self._sock.bind((0, 0))
        self._sock.settimeout(2.0)
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def lookup(self, key: tuple[bytes, int, bytes, int]) -> Socket | None:
        """The TCP socket with exactly this (local addr, local port, peer addr, peer port)."""
        laddr, lport, paddr, pport = key
        family = socket.AF_INET6 if len(laddr) == 16 else socket.AF_INET
        body = (
            _REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
            + _SOCKID.pack(lport, pport, laddr.ljust(16, b"\0"), paddr.ljust(16, b"\0"))
            + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
        )
        with self._lock:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            seq = self._seq
            self._sock.send(
                _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + body
            )
            while True:
                data, (pid, _) = self._sock.recvfrom(65536)
                if pid != 0:
                    continue  # only the kernel answers
                off = 0
                while off + _NLMSGHDR.size <= len(data):
                    length, kind, _flags, mseq, _ = _NLMSGHDR.unpack_from(data, off)
                    if length < _NLMSGHDR.size:
                        break
                    if mseq == seq:
                        if kind == NLMSG_ERROR:
                            err = -struct.unpack_from("=i", data, off + _NLMSGHDR.size)[0]
                            if err in (0, errno.ENOENT):
                                return None
                            raise OSError(err, f"sock_diag lookup: {os.strerror(err)}")
                        if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSGHDR.size + _MSG.size:
                            _fam, state, _t, _r, _exp, _rq, _wq, _uid, inode = _MSG.unpack_from(
                                data, off + _NLMSGHDR.size
                            )
                            return Socket(state, inode)
                    off += (length + 3) & ~3

    def listening(self) -> set[int]:
        """Inodes of the listening TCP sockets (IPv4 and IPv6): a dump of that state only,
        whatever the number of other sockets."""
        out: set[int] = set()
        with self._lock:
            for family in (socket.AF_INET, socket.AF_INET6):
                self._seq = (self._seq + 1) & 0xFFFFFFFF
                seq = self._seq
                body = (
                    _REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN)
                    + _SOCKID.pack(0, 0, bytes(16), bytes(16))
                    + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
                )
                self._sock.send(
                    _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                    + body
                )
                done = False
                while not done:
                    data, (pid, _) = self._sock.recvfrom(1 << 20)
                    if pid != 0:
                        continue
                    off = 0
                    while off + _NLMSGHDR.size <= len(data):
                        length, kind, _flags, mseq, _ = _NLMSGHDR.unpack_from(data, off)
                        if length < _NLMSGHDR.size:
                            break
                        if mseq == seq:
                            if kind in (NLMSG_DONE, NLMSG_ERROR):
                                done = True
                                break
                            if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSGHDR.size + _MSG.size:
                                out.add(_MSG.unpack_from(data, off + _NLMSGHDR.size)[-1])
                        off += (length + 3) & ~3
        return out


_shared: SockDiag | None = None
_shared_lock = threading.Lock()


def lookup(key: tuple[bytes, int, bytes, int]) -> Socket | None:
    """`SockDiag.lookup` on a socket shared by the process (opened on first use, in the
    network namespace of that moment)."""
    return _get().lookup(key)


def listening() -> set[int]:
    """`SockDiag.listening` on the shared socket."""
    return _get().listening()


def _get() -> SockDiag:
    global _shared
    if _shared is None:
        with _shared_lock:
            if _shared is None:
                _shared = SockDiag()
    return _shared
