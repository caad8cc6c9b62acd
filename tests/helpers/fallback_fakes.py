"""Stand-ins for the userspace path's unit tests: a socket-owner lookup that needs no /proc,
and a TCP connection as scapy-built packets."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6


class FakeOwners:
    def server_pid(self, port):
        return 42 if port == 8080 else None

    def client_pid(self, pkt):
        return 42

    def exe(self, pid):
        return "/usr/bin/python3"


class Conn:
    """One TCP connection as packets: out = local->peer, inn = peer->local."""

    def __init__(self, local, lport, peer, pport, v6=False, lseq=1000, pseq=9000):
        self.l, self.lp, self.p, self.pp, self.v6 = local, lport, peer, pport, v6
        self.lseq, self.pseq = lseq, pseq

    def _ip(self, src, dst):
        return IPv6(src=src, dst=dst) if self.v6 else IP(src=src, dst=dst)

    def out(self, flags="PA", payload=b"", seq=None, ack=None, **kw):
        return bytes(
            self._ip(self.l, self.p)
            / TCP(
                sport=self.lp,
                dport=self.pp,
                flags=flags,
                seq=self.lseq if seq is None else seq,
                ack=self.pseq if ack is None else ack,
                **kw,
            )
            / payload
        )

    def inn(self, flags="PA", payload=b"", seq=None, ack=None, **kw):
        return bytes(
            self._ip(self.p, self.l)
            / TCP(
                sport=self.pp,
                dport=self.lp,
                flags=flags,
                seq=self.pseq if seq is None else seq,
                ack=self.lseq if ack is None else ack,
                **kw,
            )
            / payload
        )
