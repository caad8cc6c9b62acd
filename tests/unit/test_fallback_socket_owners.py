"""Which process owns a client connection (userspace datapath, `ProcOwners`): a process
that started listening on a watched port just before connecting is found at once, even
right after a /proc walk, and a connection of a process that is gone is not attributed."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from obi.config import Config, PortRange
from obi.fallback import socket_owners

# Listens on a port (which makes it "selected"), then connects to the test's server and
# prints its listening port and the client connection's local port.
CLIENT = """
import socket, sys, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(srv.getsockname()[1], c.getsockname()[1], flush=True)
time.sleep(60)
"""


@pytest.fixture
def server():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s
    s.close()


def syn(sport: int, dport: int):
    return SimpleNamespace(sport=sport, dport=dport)  # what client_pid reads of the SYN


def test_new_listener_is_found_despite_a_recent_walk_and_not_after_it_exits(server):
    sport = server.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(sport)], stdout=subprocess.PIPE, text=True)
    try:
        listen_port, client_port = map(int, proc.stdout.readline().split())
        owners = socket_owners.ProcOwners(Config(open_ports=(PortRange(listen_port, listen_port),)))
        owners.refresh()
        # A walk that happened just before the process started listening: its socket is
        # not in the walk, and the time-based rate limit would forbid walking again.
        owners.port_pid, owners.selected = {}, set()
        owners._listening.discard(
            next(i for (lp, _), i in socket_owners.discovery.tcp_table(True).items() if lp == listen_port)
        )
        owners._refreshed = time.monotonic()
        assert owners.client_pid(syn(client_port, sport)) == proc.pid
        # Found again without a walk (it is selected now).
        assert owners.client_pid(syn(client_port, sport)) == proc.pid
    finally:
        proc.kill()
        proc.wait()
    # The process is gone: its connection (and any inode it had) is nobody's.
    assert owners.client_pid(syn(client_port, sport)) is None
    owners._refreshed = 0.0
    assert owners.client_pid(syn(client_port, sport)) is None
    assert proc.pid not in owners.selected


def test_unselected_sender_does_not_walk_proc_on_every_syn(server, monkeypatch):
    """A SYN from a process nobody selected: one walk, then none for MISS_REFRESH_S while
    no new socket listens."""
    sport = server.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", sport))
    try:
        owners = socket_owners.ProcOwners(Config(open_ports=(PortRange(1, 1),)))
        owners.refresh()
        walks = []
        real = owners.refresh
        monkeypatch.setattr(owners, "refresh", lambda: (walks.append(1), real())[1])
        for _ in range(3):
            assert owners.client_pid(syn(c.getsockname()[1], sport)) is None
        assert len(walks) <= 1
    finally:
        c.close()
