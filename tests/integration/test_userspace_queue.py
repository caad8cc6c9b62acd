"""The NFQUEUE reader (`fallback.queue.QueueLoop`): packets go through the blocking receive
loop, and stop() returns promptly whether the queue is busy or idle.

Runs inside a namespace of its own: a TCP echo over 198.18.x.1 whose segments are queued
to a QueueLoop by an iptables rule in that namespace only.
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from obi.netns import Topology

pytestmark = pytest.mark.root

sys.path.insert(0, os.path.dirname(__file__))
from kernel_agent import skip_module_unless_nfqueue  # noqa: E402

skip_module_unless_nfqueue("NFQUEUE target")

# Runs in the namespace: a QueueLoop whose handler records the packets it saw, 200 echo
# round trips through it, then stop() timed while idle.
SCRIPT = textwrap.dedent("""
    import json, socket, subprocess, threading, time
    from obi.fallback.flows import Verdict
    from obi.fallback.queue import QueueLoop, WAKE_S

    ADDR, PORT, QUEUE = "{addr}", 8099, 211
    seen = []
    def handler(data, outgoing):
        seen.append((len(data), outgoing))
        return Verdict()
    loop = QueueLoop(QUEUE, handler)
    loop.start()
    rule = ["-p", "tcp", "--dport", str(PORT), "-j", "NFQUEUE", "--queue-num", str(QUEUE), "--queue-bypass"]
    subprocess.run(["iptables", "-w", "-A", "INPUT", *rule], check=True)
    try:
        srv = socket.create_server((ADDR, PORT))
        def echo():
            conn, _ = srv.accept()
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)
        threading.Thread(target=echo, daemon=True).start()
        with socket.create_connection((ADDR, PORT), timeout=5) as c:
            for i in range(200):
                msg = f"ping {{i}}".encode()
                c.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    got += c.recv(4096)
                assert got == msg, (got, msg)
    finally:
        subprocess.run(["iptables", "-w", "-D", "INPUT", *rule], check=True)
    time.sleep(3 * WAKE_S)  # idle: the reader sits in its blocking receive
    t0 = time.monotonic()
    loop.stop()
    took = time.monotonic() - t0
    print(json.dumps({{"packets": loop.packets, "errors": loop.errors, "seen": len(seen),
                      "incoming": sum(1 for _, o in seen if not o), "stop_s": took, "wake_s": WAKE_S,
                      "thread_gone": loop._thread is None}}))
""")


def test_queue_loop_passes_packets_and_stops_promptly() -> None:
    import json

    with Topology(["h"], prefix="obiu", cgroups=False) as topo:
        host = topo["h"]
        r = host.run([sys.executable, "-c", SCRIPT.format(addr=host.addr)], timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
    # Every request segment of the 200 round trips went through the handler (plus the
    # handshake's ACKs and the close); nothing failed.
    assert out["errors"] == 0
    assert out["incoming"] >= 200
    assert out["packets"] == out["seen"]
    # stop() while idle: the receive timeout wakes the reader within WAKE_S.
    assert out["thread_gone"]
    assert out["stop_s"] < out["wake_s"] + 1.0, out
