"""The C NFQUEUE reader (`obi.fallback._nfq`) against hostile and unlucky input, in a
namespace of its own (issue 12, findings 7 and 8):

- close() while other threads are in fetch() or verdict(), with packets flowing: the reader
  is built with ThreadSanitizer and must report no data race (it used to free the packet
  list under a running fetch());
- fetch() with a negative, NaN or infinite timeout raises at once (it used to spin forever
  on EINVAL with the mutex held);
- a packet longer than the copy range (65,531 bytes) is never handed on cut: it counts as
  lost (its stream has a hole) instead of a whole packet with bytes missing;
- netlink messages that do not come from the kernel are ignored, not taken for packets;
- a verdict payload one netlink attribute cannot carry is refused (nla_len would wrap).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from obi.demo.topology import Topology
from tests.helpers.skips import skip_module_unless_nfqueue

pytestmark = pytest.mark.root

skip_module_unless_nfqueue("NFQUEUE target")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "fallback", "_nfq.c")

PRELUDE = textwrap.dedent("""
    import json, os, socket, struct, subprocess, sys, threading, time
    MODDIR = "__MODDIR__"
    if MODDIR:
        sys.path.insert(0, MODDIR)
        import _nfq
    else:
        from obi.fallback import _nfq
    SYNC, OBSERVE = 300, 301

    def sh(*argv):
        subprocess.run(argv, check=True, capture_output=True)

    def queue_port(port, queue, tool="iptables"):
        for chain, match in (("INPUT", "--dport"), ("OUTPUT", "--sport")):
            sh(tool, "-w", "-A", chain, "-p", "tcp", match, str(port), "-j", "NFQUEUE",
               "--queue-num", str(queue), "--queue-bypass")

    def sink_server(addr, port, family=socket.AF_INET):
        srv = socket.socket(family)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((addr, port)); srv.listen(64)
        def serve(conn):
            with conn:
                try:
                    while data := conn.recv(1 << 20):
                        conn.sendall(data[:64])
                except OSError:
                    pass
        def accept():
            while True:
                conn, _ = srv.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()
        threading.Thread(target=accept, daemon=True).start()
""")


def run_in_ns(script: str, moddir: str = "", timeout: float = 60, tsan: str = "") -> subprocess.CompletedProcess:
    with Topology(["h"], prefix="obiq", cgroups=False) as topo:
        host = topo["h"]
        host.run(["ip", "link", "set", "lo", "up"])
        code = (PRELUDE + textwrap.dedent(script)).replace("__MODDIR__", moddir)
        argv = [sys.executable, "-c", code]
        if tsan:
            # ASLR off: ThreadSanitizer cannot map its shadow memory with this kernel's
            # mmap randomisation.
            argv = ["setarch", "-R", "env", f"LD_PRELOAD={tsan}", "TSAN_OPTIONS=halt_on_error=0", *argv]
        return host.run(argv, timeout=timeout, check=False)


def last_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tsan_module(tmp_path_factory) -> tuple[str, str]:
    """(directory holding _nfq built with -fsanitize=thread, path of libtsan)."""
    if not shutil.which("gcc") or not shutil.which("setarch"):
        pytest.skip("needs gcc and setarch (util-linux) for the ThreadSanitizer build")
    lib = subprocess.run(["gcc", "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(lib) or not os.path.exists(lib):
        pytest.skip("gcc has no ThreadSanitizer runtime (libtsan) on this machine")
    out = tmp_path_factory.mktemp("tsan")
    name = "_nfq" + sysconfig.get_config_var("EXT_SUFFIX")
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-O1",
            "-g",
            "-fsanitize=thread",
            f"-I{sysconfig.get_paths()['include']}",
            SOURCE,
            "-o",
            str(out / name),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return str(out), lib


CLOSE_RACES = """
    queue_port(9009, OBSERVE)
    queue_port(9010, SYNC)
    sink_server("127.0.0.1", 9009); sink_server("127.0.0.1", 9010)
    stop = threading.Event()

    def traffic(port):
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                    for _ in range(20):
                        c.sendall(b"x" * 3000); c.recv(64)
            except OSError:
                pass

    for port in (9009, 9010):
        threading.Thread(target=traffic, args=(port,), daemon=True).start()
    errors, fetched = [], [0]
    for round_ in range(6):
        r = _nfq.Reader(SYNC, OBSERVE)
        def fetcher():
            while True:
                try:
                    batch = r.fetch(0.01 if round_ % 2 else 1.0, 4, 0.25)
                    fetched[0] += len(batch)
                    for data, outgoing, ts, pid, lost in batch:
                        if pid is not None:
                            r.verdict(pid, None, 0)
                except ValueError:
                    return  # closed
                except Exception as e:
                    errors.append(repr(e)); return
        def verdicter():
            while True:
                try:
                    r.verdict(4000000000, None, 0)  # no such packet: the kernel says so later
                except ValueError:
                    return
                except OSError:
                    pass
        ts = [threading.Thread(target=f) for f in (fetcher, fetcher, verdicter)]
        for t in ts:
            t.start()
        time.sleep(0.3)
        r.close()
        for t in ts:
            t.join(10)
        assert not any(t.is_alive() for t in ts), "a call did not return after close()"
        try:
            r.fetch(0.1)
            errors.append("fetch after close did not raise")
        except ValueError:
            pass
    stop.set()
    print(json.dumps({"errors": errors, "fetched": fetched[0]}))
"""


def test_close_racing_fetch_and_verdict_is_free_of_data_races(tsan_module) -> None:
    moddir, lib = tsan_module
    r = run_in_ns(CLOSE_RACES, moddir=moddir, tsan=lib, timeout=120)
    races = [line for line in r.stderr.splitlines() if "ThreadSanitizer" in line]
    assert not races, "\n".join(races[:10]) + "\n" + r.stderr[-6000:]
    out = last_json(r)
    assert out["errors"] == [] and out["fetched"] > 0


BAD_TIMEOUTS = """
    r = _nfq.Reader(SYNC, OBSERVE)
    refused = []
    for args in [(-1.0,), (float("nan"),), (float("inf"),), (-0.5, 4), (0.1, 4, float("nan")), (0.1, 4, -1.0),
                 (0.1, 4, float("inf"))]:
        t0 = time.monotonic()
        try:
            r.fetch(*args)
        except ValueError:
            refused.append(repr(args))
        assert time.monotonic() - t0 < 1.0, args
    t0 = time.monotonic()
    assert r.fetch(0.2) == [] and time.monotonic() - t0 < 1.0  # a good timeout still works
    r.close()
    print(json.dumps({"refused": refused}))
"""


def test_fetch_refuses_negative_nan_and_infinite_timeouts_at_once() -> None:
    out = last_json(run_in_ns(BAD_TIMEOUTS, timeout=30))
    assert len(out["refused"]) == 7, out


CUT_PACKETS = """
    from obi.fallback.flows import Verdict
    from obi.fallback.queue import QueueLoop
    queue_port(9011, OBSERVE)
    sink_server("127.0.0.1", 9011)
    handed, losses = [], []
    def handler(data, outgoing, ts_ns):
        handed.append((len(data), int.from_bytes(data[2:4], "big")))
        return Verdict()
    loop = QueueLoop(SYNC, OBSERVE, handler, on_loss=losses.append)
    loop.start()
    # Loopback's MTU is 64 KiB: segments of ~65,5xx bytes, more than the copy range.
    with socket.create_connection(("127.0.0.1", 9011), timeout=10) as c:
        c.sendall(os.urandom(4 << 20))
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536):
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(losses) < loop.stats()["truncated"]:
        time.sleep(0.05)
    loop.stop()
    st = loop.stats()
    print(json.dumps({"handed": handed, "truncated": st["truncated"], "lost": sum(losses)}))
"""


def test_packets_longer_than_the_copy_range_are_counted_lost_never_handed_on_cut() -> None:
    out = last_json(run_in_ns(CUT_PACKETS, timeout=60))
    cut = [(got, total) for got, total in out["handed"] if got != total]
    assert not cut, f"{len(cut)} packets handed on cut, e.g. {cut[:3]}"
    assert out["truncated"] > 0  # the test did send packets beyond 65,531 bytes
    assert out["lost"] == out["truncated"]  # each reported as a hole in its stream


FORGED = """
    r = _nfq.Reader(SYNC, OBSERVE)
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    portid = None
    with open("/proc/net/netlink") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[1] == "12" and int(cols[-1]) in inodes:  # NETLINK_NETFILTER, our socket
                portid = int(cols[2])
    assert portid is not None
    # A queued-packet message for the observe queue, as the kernel would send it.
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 20 + 6, 1, 0, 64, 6, 0, socket.inet_aton("198.18.0.9"),
                     socket.inet_aton("198.18.0.1"))
    tcp = struct.pack("!HHIIBBHHH", 4444, 8080, 1, 1, 0x50, 0x18, 65535, 0, 0)
    payload = ip + tcp + b"forged"
    def attr(kind, body):
        a = struct.pack("=HH", 4 + len(body), kind) + body
        return a + bytes(-len(a) % 4)
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(OBSERVE))
    body += attr(1, struct.pack("!IHB", 77, 0x0800, 1)) + attr(10, payload)
    msg = struct.pack("=IHHII", 16 + len(body), (3 << 8) | 0, 0, 0, 0) + body
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    s.bind((0, 0))
    for _ in range(3):
        s.sendto(msg, (portid, 0))
    got = r.fetch(0.5)
    st = r.stats()
    r.close()
    print(json.dumps({"got": [d.hex() for d, *_ in got], "foreign": st.get("foreign", 0), "received": st["received"]}))
"""


def test_netlink_messages_not_from_the_kernel_are_ignored() -> None:
    out = last_json(run_in_ns(FORGED, timeout=30))
    assert out["got"] == [] and out["received"] == 0
    assert out["foreign"] == 3


OVERSIZE = """
    r = _nfq.Reader(SYNC, OBSERVE)
    results = {}
    for n in (65531, 65532, 70000):
        try:
            r.verdict(123456, b"x" * n, 0)  # no such packet: the kernel refuses it later
            results[n] = "sent"
        except ValueError:
            results[n] = "refused"
    r.close()
    print(json.dumps(results))
"""


def test_a_verdict_payload_beyond_one_netlink_attribute_is_refused() -> None:
    out = last_json(run_in_ns(OVERSIZE, timeout=30))
    assert out == {"65531": "sent", "65532": "refused", "70000": "refused"}
