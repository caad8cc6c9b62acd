"""The NFQUEUE reader (`fallback.queue.QueueLoop` over the C `_nfq.Reader`), in a namespace
of its own: a TCP echo over 198.18.x.1 whose segments iptables queues to the loop.

- observe queue: packets are accepted before the handler runs, so round trips complete
  while the handler is stuck; the handler then gets every packet but bare ACKs, in order,
  with the time the reader took it; with a tiny backlog, copies are dropped and counted,
  traffic unharmed;
- sync queue: the verdict carries the handler's new bytes (upper-cased payload, checksums
  recomputed by scapy) and its mark (counted by a mark-matching rule); a sync packet does
  not wait behind an old backlog of observed copies (the reader drops them);
- stop() is prompt while idle.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from obi.demo.topology import Topology
from tests.helpers.skips import skip_module_unless_nfqueue

pytestmark = pytest.mark.root


skip_module_unless_nfqueue("NFQUEUE target")

COMMON = textwrap.dedent("""
    import json, socket, subprocess, threading, time
    from obi.fallback.flows import Verdict
    from obi.fallback.queue import QueueLoop, WAKE_S

    ADDR, PORT, SYNC, OBSERVE = "__ADDR__", 8099, 211, 212

    def iptables(*args):
        subprocess.run(["iptables", "-w", *args], check=True)

    def echo_server(port=PORT):
        srv = socket.create_server((ADDR, port))
        def serve():
            conn, _ = srv.accept()
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)
        threading.Thread(target=serve, daemon=True).start()
        return srv

    def round_trips(n, expect=lambda m: m, port=PORT):
        with socket.create_connection((ADDR, port), timeout=10) as c:
            for i in range(n):
                msg = f"ping {i}".encode()
                c.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    got += c.recv(4096)
                assert got == expect(msg), (got, msg)
""")

# Observe queue: the handler blocks on the first packet until the round trips are done.
OBSERVE_SCRIPT = COMMON + textwrap.dedent("""
    backlog = __BACKLOG__
    release = threading.Event()
    seen = []
    def handler(data, outgoing, ts_ns):
        release.wait(30)
        seen.append((data, outgoing, ts_ns))
        return Verdict()
    losses = []
    loop = QueueLoop(SYNC, OBSERVE, handler, backlog=backlog, on_loss=losses.append)
    loop.start()
    rules = [("INPUT", "--dport"), ("OUTPUT", "--sport")]
    for chain, match in rules:
        iptables("-A", chain, "-p", "tcp", match, str(PORT), "-j", "NFQUEUE", "--queue-num", str(OBSERVE), "--queue-bypass")
    srv = echo_server()
    t0 = time.time_ns()
    round_trips(50)  # completes although the handler has not returned once
    stuck = len(seen)
    release.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (loop.stats()["observe_waiting"]
                                           or sum(losses) < loop.stats()["observe_dropped"]):
        time.sleep(0.05)  # losses after the last packet are reported once the loop is idle
    time.sleep(0.2)
    for chain, match in rules:
        iptables("-D", chain, "-p", "tcp", match, str(PORT), "-j", "NFQUEUE", "--queue-num", str(OBSERVE), "--queue-bypass")
    loop.stop()
    st = loop.stats()
    print(json.dumps({"stuck": stuck, "stats": st, "n": len(seen), "t0": t0, "t1": time.time_ns(), "lost": sum(losses),
                      "ts": [t for _, _, t in seen], "outgoing": [o for _, o, _ in seen],
                      "pings": [d.hex() for d, _, _ in seen]}))
""")

# Sync queue: incoming data upper-cased by the verdict, outgoing packets marked.
SYNC_SCRIPT = COMMON + textwrap.dedent("""
    from scapy.layers.inet import IP, TCP
    from scapy.packet import Raw
    MARK = 0x1234
    def handler(data, outgoing, ts_ns):
        if outgoing:
            return Verdict(mark=MARK)
        p = IP(data)
        if Raw not in p:
            return Verdict()
        p[Raw].load = p[Raw].load.upper()
        del p[IP].chksum, p[TCP].chksum
        return Verdict(payload=bytes(p))
    loop = QueueLoop(SYNC, OBSERVE, handler)
    loop.start()
    rules = [("INPUT", "--dport"), ("OUTPUT", "--sport")]
    for chain, match in rules:
        iptables("-A", chain, "-p", "tcp", match, str(PORT), "-j", "NFQUEUE", "--queue-num", str(SYNC), "--queue-bypass")
    iptables("-A", "POSTROUTING", "-t", "mangle", "-p", "tcp", "--sport", str(PORT), "-m", "mark", "--mark", hex(MARK))
    srv = echo_server()
    round_trips(30, expect=lambda m: m.upper())
    marked = subprocess.run(["iptables", "-w", "-t", "mangle", "-L", "POSTROUTING", "-v", "-x", "-n"],
                            capture_output=True, text=True, check=True).stdout
    for chain, match in rules:
        iptables("-D", chain, "-p", "tcp", match, str(PORT), "-j", "NFQUEUE", "--queue-num", str(SYNC), "--queue-bypass")
    time.sleep(3 * WAKE_S)  # idle: the loop waits in fetch()
    t0 = time.monotonic()
    loop.stop()
    took = time.monotonic() - t0
    counted = [int(line.split()[0]) for line in marked.splitlines() if "mark match 0x1234" in line]
    print(json.dumps({"stats": loop.stats(), "marked": counted, "stop_s": took, "wake_s": WAKE_S}))
""")


# A sync packet behind an old backlog of observed copies: the handler is stuck on its first
# packet while 20 round trips go through the observe queue; then, past SYNC_MAX_WAIT_S, a
# connection on the sync port starts; when the handler is released it gets the sync packet
# next, the old copies having been dropped by the reader (observe_shed) and reported lost.
SHED_SCRIPT = COMMON + textwrap.dedent("""
    from obi.fallback.queue import SYNC_MAX_WAIT_S
    SYNC_PORT = PORT + 1
    release = threading.Event()
    seen = []
    def handler(data, outgoing, ts_ns):
        release.wait(30)
        seen.append((data, outgoing))
        return Verdict()
    losses = []
    loop = QueueLoop(SYNC, OBSERVE, handler, on_loss=losses.append)
    loop.start()
    rules = [("INPUT", "--dport", PORT, OBSERVE), ("OUTPUT", "--sport", PORT, OBSERVE),
             ("INPUT", "--dport", SYNC_PORT, SYNC), ("OUTPUT", "--sport", SYNC_PORT, SYNC)]
    for chain, match, port, q in rules:
        iptables("-A", chain, "-p", "tcp", match, str(port), "-j", "NFQUEUE", "--queue-num", str(q), "--queue-bypass")
    echo_server(), echo_server(SYNC_PORT)
    round_trips(20)
    time.sleep(SYNC_MAX_WAIT_S + 0.15)
    done = []
    t = threading.Thread(target=lambda: (round_trips(1, port=SYNC_PORT), done.append(1)))
    t.start()
    time.sleep(0.1)
    release.set()
    t.join(15)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(losses) < loop.stats()["observe_shed"] + loop.stats()["observe_dropped"]:
        time.sleep(0.05)
    for chain, match, port, q in rules:
        iptables("-D", chain, "-p", "tcp", match, str(port), "-j", "NFQUEUE", "--queue-num", str(q), "--queue-bypass")
    loop.stop()
    sync_at = [i for i, (d, o) in enumerate(seen) if d[22:24] == SYNC_PORT.to_bytes(2, "big")]
    print(json.dumps({"stats": loop.stats(), "lost": sum(losses), "sync_done": bool(done),
                      "first_sync_at": sync_at[0] if sync_at else None, "seen": len(seen)}))
""")


def run_in_ns(script: str, backlog: int = 0) -> dict:
    with Topology(["h"], prefix="obiu", cgroups=False) as topo:
        host = topo["h"]
        script = script.replace("__ADDR__", host.addr).replace("__BACKLOG__", str(backlog))
        r = host.run([sys.executable, "-c", script], timeout=90, check=False)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])


def test_observed_packets_pass_while_the_handler_is_stuck_and_arrive_in_order() -> None:
    out = run_in_ns(OBSERVE_SCRIPT, backlog=65536)
    st = out["stats"]
    assert out["stuck"] == 0  # 50 round trips done, the handler had not returned once
    assert st["handler_errors"] == 0 and st["send_errors"] == 0
    assert st["observe_dropped"] == 0 and out["lost"] == 0
    assert st["sync"] == 0 and st["observed"] == out["n"]
    # Bare ACKs (no payload, no SYN/FIN/RST) are accepted but not handed on: server
    # connections are parsed from their data and their SYN/FIN/RST only.
    assert st["acks_skipped"] > 0 and st["observed"] + st["acks_skipped"] == st["received"]
    for hexdata in out["pings"]:
        data = bytes.fromhex(hexdata)
        ihl = (data[0] & 15) * 4
        payload_len = int.from_bytes(data[2:4], "big") - ihl - (data[ihl + 12] >> 4) * 4
        assert payload_len > 0 or data[ihl + 13] & 0x07, "a bare ACK was handed on"
    # Every ping went in and came back out, in order: payload "ping i" in, then out.
    pings = []
    for hexdata, outgoing in zip(out["pings"], out["outgoing"]):
        data = bytes.fromhex(hexdata)
        body = data[(data[0] & 15) * 4 + (data[(data[0] & 15) * 4 + 12] >> 4) * 4 :]
        if body:
            pings.append((body.decode(), outgoing))
    expected = []
    for i in range(50):
        expected += [(f"ping {i}", False), (f"ping {i}", True)]
    assert pings == expected
    # ts_ns is when the reader took the packet (before the handler ran), in order.
    ts = out["ts"]
    assert ts == sorted(ts)
    assert out["t0"] <= ts[0] and ts[-1] <= out["t1"]


def test_observed_copies_beyond_the_backlog_are_dropped_not_the_traffic() -> None:
    out = run_in_ns(OBSERVE_SCRIPT, backlog=5)
    st = out["stats"]
    assert out["stuck"] == 0
    assert out["n"] <= 5 + 32  # the backlog, plus what one receive batch had already taken
    assert st["observe_dropped"] > 0
    assert st["observed"] + st["observe_dropped"] + st["acks_skipped"] == st["received"]
    # The loop was told about every dropped copy (their streams have holes).
    assert out["lost"] == st["observe_dropped"]
    assert st["handler_errors"] == 0


def test_sync_verdicts_carry_new_bytes_and_marks_and_stop_is_prompt() -> None:
    out = run_in_ns(SYNC_SCRIPT)
    st = out["stats"]
    assert st["handler_errors"] == 0 and st["send_errors"] == 0
    assert st["observed"] == 0 and st["sync"] == st["received"] >= 60
    assert st["verdicts"] == st["sync"]  # every sync packet got exactly one verdict
    # The echoes came back upper-cased (asserted in the script) and every outgoing packet
    # carried the mark the handler set.
    assert out["marked"] and out["marked"][0] >= 30
    assert out["stop_s"] < out["wake_s"] + 1.0, out


def test_a_sync_packet_does_not_wait_for_an_old_backlog_of_observed_copies() -> None:
    out = run_in_ns(SHED_SCRIPT)
    st = out["stats"]
    assert out["sync_done"]  # the client round trip on the sync port completed
    assert st["observe_shed"] > 0 and st["observe_dropped"] == 0
    assert out["lost"] == st["observe_shed"]  # every dropped copy was reported lost
    # The handler was stuck on its first packet; the next thing it got was the sync
    # connection's SYN (destination port SYNC_PORT), not the 20 round trips' old copies.
    assert out["first_sync_at"] is not None and out["first_sync_at"] <= 2, out
    assert st["handler_errors"] == 0 and st["verdicts"] == st["sync"]
