"""The libbpf binding and the attachments against the real kernel (root).

Programs come from bpf/testprogs.bpf.c. Traffic only flows inside network namespaces made
here (addresses from 198.18.0.0/30), and everything made here is removed in `finally`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from typing import Iterator

import pytest

from obi.errors import BpfError, ProgramRejected
from obi.kernel import attach, libbpf
from obi.kernel.libbpf import BpfObject
from obi.kernel.netns import in_netns, in_new_netns
from obi.kernel.ringbuf import RingReader

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, netns)")

# Built by `make -C bpf` from bpf/test/ next to the tests (never shipped in the package).
TESTPROGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_bpf", "testprogs.bpf.o")
PROBES = libbpf.object_path("probes")
PREFIX = "obip"
EVENT = struct.Struct("=II16s")  # struct test_event
ETH_FRAME = bytes.fromhex("ffffffffffff02000000000108004500") + bytes(48)


def _sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=20).stdout


@pytest.fixture
def obj() -> Iterator[BpfObject]:
    if not os.path.exists(TESTPROGS):
        pytest.skip(f"{TESTPROGS} not built (run `make -C bpf`)")
    with BpfObject.open(TESTPROGS) as o:
        o.load()
        yield o


@pytest.fixture
def netpair() -> Iterator[dict[str, str]]:
    """Two namespaces joined by a veth pair: a=198.18.0.1 in ns_a, b=198.18.0.2 in ns_b."""
    tag = f"{os.getpid() % 10000}{secrets.token_hex(2)}"
    ns_a, ns_b = f"{PREFIX}a{tag}", f"{PREFIX}b{tag}"
    dev_a, dev_b = f"{PREFIX}a{tag}", f"{PREFIX}b{tag}"  # <= 15 chars
    try:
        _sh("ip", "netns", "add", ns_a)
        _sh("ip", "netns", "add", ns_b)
        _sh("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, dev_a, "198.18.0.1/30"), (ns_b, dev_b, "198.18.0.2/30")):
            _sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield {"ns_a": ns_a, "ns_b": ns_b, "dev_a": dev_a, "dev_b": dev_b}
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _send_udp(ns: str, n: int = 3) -> None:
    """n UDP datagrams from ns_a's 198.18.0.1 to 198.18.0.2:9."""
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for _ in range({n}): s.sendto(b'obi-test', ('198.18.0.2', 9))\n"
    )
    _sh("ip", "netns", "exec", ns, sys.executable, "-c", code)


def _filters(ns: str, dev: str, direction: str = "ingress") -> str:
    return _sh("ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, direction)


def _qdiscs(ns: str, dev: str) -> str:
    return _sh("ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev)


# --- objects, maps, test_run, ring buffer ----------------------------------------------


def test_object_lists_programs_and_maps(obj: BpfObject) -> None:
    names = {p.name for p in obj.programs()}
    assert {"obi_test_ringbuf", "obi_test_mark", "obi_test_bad"} <= names
    assert not obj.program("obi_test_bad").autoload  # SEC("?tc")
    m = obj.map("test_hash")
    assert (m.key_size, m.value_size, m.max_entries) == (4, 8, 64)
    assert obj.program("obi_test_ringbuf").fd > 0
    with pytest.raises(BpfError):
        obj.program("nope")


def test_map_roundtrip(obj: BpfObject) -> None:
    m = obj.map("test_hash")
    k = lambda i: struct.pack("=I", i)  # noqa: E731
    for i in range(10):
        m.update(k(i), struct.pack("=Q", i * 1000))
    assert m.lookup(k(7)) == struct.pack("=Q", 7000)
    assert sorted(m.keys()) == sorted(k(i) for i in range(10))
    assert m.delete(k(7)) is True
    assert m.delete(k(7)) is False
    assert m.lookup(k(7)) is None
    with pytest.raises(BpfError) as e:
        m.update(k(1), struct.pack("=Q", 1), libbpf.BPF_NOEXIST)
    assert e.value.errno == 17  # EEXIST
    with pytest.raises(BpfError):
        m.lookup(b"\x00")  # wrong key size
    assert dict(m.items())[k(3)] == struct.pack("=Q", 3000)


def test_test_run_retval_and_data_out(obj: BpfObject) -> None:
    retval, out = obj.program("obi_test_mark").test_run(ETH_FRAME)
    assert retval == 2  # TC_ACT_SHOT
    assert out[0] == 0xFF and out[1:] == ETH_FRAME[1:]


def test_set_global_before_load() -> None:
    if not os.path.exists(TESTPROGS):
        pytest.skip(f"{TESTPROGS} not built")
    with BpfObject.open(TESTPROGS) as o:
        o.set_global("test_retval", struct.pack("=I", 7))
        with pytest.raises(BpfError):
            o.set_global("test_retval", b"\x01")  # wrong size
        o.load()
        assert o.program("obi_test_ringbuf").test_run(ETH_FRAME)[0] == 7
        assert struct.unpack("=Q", o.map(".bss").lookup(bytes(4))[:8])[0] == 1  # test_runs


def test_ringbuf_delivers_events(obj: BpfObject) -> None:
    got: list[tuple[int, int, bytes]] = []
    prog = obj.program("obi_test_ringbuf")
    with RingReader(obj.map("test_events"), lambda v: got.append(EVENT.unpack(v))) as rb:
        for i in range(5):
            frame = bytes([i]) + ETH_FRAME[1:]
            assert prog.test_run(frame)[0] == 0  # TC_ACT_OK (test_retval default)
        deadline = time.monotonic() + 2
        while len(got) < 5 and time.monotonic() < deadline:
            rb.poll(100)
    assert [g[0] for g in got] == [len(ETH_FRAME)] * 5
    assert {g[1] for g in got} == {0x0B1E0B1E}
    assert [g[2][0] for g in got] == [0, 1, 2, 3, 4]
    assert got[3][2] == bytes([3]) + ETH_FRAME[1:16]
    per_cpu = obj.map("test_percpu").lookup_percpu(bytes(4))
    assert per_cpu is not None and sum(struct.unpack("=Q", v)[0] for v in per_cpu) == 5


def test_ringbuf_callback_errors_are_counted(obj: BpfObject) -> None:
    def bad(view: memoryview) -> None:
        # The logged traceback keeps this frame alive; with the view in it, close() could
        # not unmap the ring (exported pointers). Callbacks must not keep views anyway.
        del view
        raise ValueError("boom")

    with RingReader(obj.map("test_events"), bad) as rb:
        obj.program("obi_test_ringbuf").test_run(ETH_FRAME)
        obj.program("obi_test_ringbuf").test_run(ETH_FRAME)
        assert rb.consume() == 2
        assert (rb.events, rb.errors) == (2, 2)


def test_load_failure_carries_verifier_log() -> None:
    if not os.path.exists(TESTPROGS):
        pytest.skip(f"{TESTPROGS} not built")
    with BpfObject.open(TESTPROGS) as o:
        o.program("obi_test_bad").set_autoload(True)
        with pytest.raises(BpfError) as e:
            o.load()
    assert e.value.errno in (13, 22)  # EACCES from the verifier
    assert "outside of the packet" in e.value.log
    # The loader tells a rejected program of ours from a missing kernel feature, on a
    # real verifier log: named, with its count, never "needs Linux >= ...".
    from obi.kernel.loader import classify

    err = classify(e.value, "testprogs.bpf.o")
    assert isinstance(err, ProgramRejected) and err.program == "obi_test_bad" and err.processed > 0
    assert "outside of the packet" in str(err) and "needs Linux" not in str(err)


def test_missing_object_names_build_step() -> None:
    with pytest.raises(BpfError) as e:
        BpfObject.open("/nonexistent/x.bpf.o")
    assert "make -C bpf" in str(e.value)


# --- tc / tcx attachments ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tc", "tcx"])
def test_tc_attach_sees_traffic_and_leaves_nothing(
    obj: BpfObject, netpair: dict[str, str], backend: str, tmp_path
) -> None:
    ns_b, dev_b = netpair["ns_b"], netpair["dev_b"]
    got: list[bytes] = []
    prog = obj.program("obi_test_ringbuf")
    state_dir = str(tmp_path / "state")
    with RingReader(obj.map("test_events"), lambda v: got.append(bytes(v))) as rb:
        with in_netns(f"/run/netns/{ns_b}"):
            ifindex = socket.if_nametoindex(dev_b)
            try:
                att = attach.TcAttachment(prog, ifindex, "ingress", backend, state_dir=state_dir)
                att.attach()
            except attach.MissingFeature as e:
                pytest.skip(str(e))
        try:
            assert att.used == backend
            state = json.loads((tmp_path / "state" / f"{os.getpid()}.json").read_text())
            rec = state["attachments"][0]
            assert rec["kind"] == backend and rec["ifname"] == dev_b
            assert rec["netns"] == f"/run/netns/{ns_b}"
            if backend == "tc":
                assert "obi_test_ringbu" in _filters(ns_b, dev_b)
                assert rec["created_qdisc"] is True and rec["handle"] and rec["priority"]
            _send_udp(netpair["ns_a"])
            deadline = time.monotonic() + 3
            while not any(b"obi-test" in e or EVENT.unpack(e)[0] >= 50 for e in got) and time.monotonic() < deadline:
                rb.poll(100)
            seen = len(got)
            assert seen >= 3, f"expected the UDP datagrams at ingress, saw {seen} events"
        finally:
            att.detach()  # from the root netns: detach must go back to the attach netns
        assert _filters(ns_b, dev_b) == ""
        assert "clsact" not in _qdiscs(ns_b, dev_b)
        assert not (tmp_path / "state" / f"{os.getpid()}.json").exists()
        _send_udp(netpair["ns_a"])
        time.sleep(0.2)
        rb.poll(0)
        assert len(got) == seen, "program still ran after detach"


def test_tc_keeps_existing_qdisc_and_foreign_filter(obj: BpfObject, netpair: dict[str, str]) -> None:
    ns_b, dev_b = netpair["ns_b"], netpair["dev_b"]
    _sh("ip", "netns", "exec", ns_b, "tc", "qdisc", "add", "dev", dev_b, "clsact")
    _sh(
        "ip",
        "netns",
        "exec",
        ns_b,
        "tc",
        "filter",
        "add",
        "dev",
        dev_b,
        "ingress",
        "prio",
        "7",
        "protocol",
        "all",
        "u32",
        "match",
        "u32",
        "0",
        "0",
    )
    with in_netns(f"/run/netns/{ns_b}"):
        ifindex = socket.if_nametoindex(dev_b)
        with attach.TcAttachment(obj.program("obi_test_ringbuf"), ifindex, "ingress", "tc", state_dir=None) as att:
            assert att.created_qdisc is False
            assert "obi_test_ringbu" in _filters(ns_b, dev_b)
    after = _filters(ns_b, dev_b)
    assert "obi_test_ringbu" not in after and "u32" in after
    assert "clsact" in _qdiscs(ns_b, dev_b)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _write_state(state_dir: str, pid: int, records: list[dict], start_time: int | None = 1) -> str:
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, f"{pid}.json")
    with open(path, "w") as f:
        json.dump({"pid": pid, "start_time": start_time, "attachments": records}, f)
    return path


def test_cleanup_removes_only_our_filter(obj: BpfObject, netpair: dict[str, str], tmp_path) -> None:
    """A killed agent's clsact filter is removed; a foreign BPF filter recorded at another
    handle (program not named obi_*) and a foreign u32 filter stay, and so does the qdisc."""
    ns_b, dev_b = netpair["ns_b"], netpair["dev_b"]
    if not os.path.exists(PROBES):
        pytest.skip(f"{PROBES} not built")
    netns = f"/run/netns/{ns_b}"
    with BpfObject.open(PROBES) as foreign_obj:
        for p in foreign_obj.programs():
            p.set_autoload(p.name == "probe_tc")
        foreign_obj.load()
        with in_netns(netns):
            ifindex = socket.if_nametoindex(dev_b)
            hook = libbpf.tc_hook(ifindex, libbpf.BPF_TC_INGRESS)
            created = libbpf.tc_hook_create(hook)
            assert created
            ours = libbpf.tc_opts(obj.program("obi_test_ringbuf").fd, handle=0x0B1, priority=3)
            libbpf.tc_attach(hook, ours)
            theirs = libbpf.tc_opts(foreign_obj.program("probe_tc").fd, handle=0x0B2, priority=4)
            libbpf.tc_attach(hook, theirs)
    _sh(
        "ip",
        "netns",
        "exec",
        ns_b,
        "tc",
        "filter",
        "add",
        "dev",
        dev_b,
        "ingress",
        "prio",
        "9",
        "protocol",
        "all",
        "u32",
        "match",
        "u32",
        "0",
        "0",
    )
    # Our filter's program outlives this object only through the filter, as after a kill.
    base = {"kind": "tc", "direction": "ingress", "ifindex": ifindex, "ifname": dev_b, "netns": netns}
    pid = _dead_pid()
    state_dir = str(tmp_path / "state")
    path = _write_state(
        state_dir,
        pid,
        [
            {**base, "handle": 0x0B1, "priority": 3, "prog_id": int(ours.prog_id), "created_qdisc": True},
            {**base, "handle": 0x0B2, "priority": 4, "prog_id": int(theirs.prog_id), "created_qdisc": True},
        ],
    )
    me = os.getpid()
    live = _write_state(state_dir, me, [{**base, "handle": 0x0B1, "priority": 3}], attach._proc_start_time(me))
    try:
        report = attach.cleanup(state_dir)
    finally:
        os.unlink(live)
    text = "\n".join(report)
    assert "removed tc filter" in text and "foreign program 'probe_tc'" in text
    assert "kept clsact qdisc (other filters remain)" in text
    filters = _filters(ns_b, dev_b)
    assert "obi_test_ringbu" not in filters
    assert "probe_tc" in filters and "u32" in filters
    assert "clsact" in _qdiscs(ns_b, dev_b)
    assert not os.path.exists(path)
    # The live agent's file was not touched: cleanup never reported it.
    assert all(f"agent {os.getpid()}" not in line for line in report)


def test_cleanup_removes_qdisc_it_created_when_empty(obj: BpfObject, netpair: dict[str, str], tmp_path) -> None:
    ns_b, dev_b = netpair["ns_b"], netpair["dev_b"]
    netns = f"/run/netns/{ns_b}"
    with in_netns(netns):
        ifindex = socket.if_nametoindex(dev_b)
        hook = libbpf.tc_hook(ifindex, libbpf.BPF_TC_EGRESS)
        assert libbpf.tc_hook_create(hook)
        opts = libbpf.tc_opts(obj.program("obi_test_ringbuf").fd, handle=5, priority=5)
        libbpf.tc_attach(hook, opts)
    assert "clsact" in _qdiscs(ns_b, dev_b)
    rec = {
        "kind": "tc",
        "direction": "egress",
        "ifindex": ifindex,
        "ifname": dev_b,
        "netns": netns,
        "handle": 5,
        "priority": 5,
        "prog_id": int(opts.prog_id),
        "created_qdisc": True,
    }
    _write_state(str(tmp_path), _dead_pid(), [rec])
    report = attach.cleanup(str(tmp_path))
    assert any("removed clsact qdisc" in line for line in report), report
    assert "clsact" not in _qdiscs(ns_b, dev_b)
    assert _filters(ns_b, dev_b, "egress") == ""
    # Running it again finds nothing to do.
    assert attach.cleanup(str(tmp_path)) == []


# --- sk_msg and cgroup ------------------------------------------------------------------


def test_sk_msg_attach_detach_and_cleanup(obj: BpfObject, tmp_path) -> None:
    prog, sockhash = obj.program("obi_test_sk_msg"), obj.map("test_sockhash")
    att = libbpf.attach_sk_msg(prog, sockhash)
    att.detach()
    with pytest.raises(BpfError) as e:
        libbpf.prog_detach(prog.fd, sockhash.fd, libbpf.BPF_SK_MSG_VERDICT)
    assert e.value.errno == 2  # ENOENT: the context manager's detach removed it
    # A killed agent's attachment while the map still lives: cleanup detaches it.
    libbpf.attach_sk_msg(prog, sockhash)
    minfo = libbpf.map_info(sockhash.fd)
    _write_state(
        str(tmp_path),
        _dead_pid(),
        [
            {
                "kind": "sk_msg",
                "prog_id": prog.info()["id"],
                "prog_name": prog.name,
                "map_id": minfo["id"],
                "map_name": minfo["name"],
            }
        ],
    )
    report = attach.cleanup(str(tmp_path))
    assert report and report[0].endswith(f"detached sk_msg {prog.name} on map {minfo['name']} (id {minfo['id']})")
    with pytest.raises(BpfError) as e:
        libbpf.prog_detach(prog.fd, sockhash.fd, libbpf.BPF_SK_MSG_VERDICT)
    assert e.value.errno == 2  # nothing attached any more


@contextlib.contextmanager
def _cgroup() -> Iterator[str]:
    root = libbpf.cgroup_v2_mount()
    if not root:
        pytest.skip("cgroup v2 not mounted")
    path = os.path.join(root, f"{PREFIX}{os.getpid()}{secrets.token_hex(2)}")
    os.mkdir(path)
    try:
        yield path
    finally:
        for _ in range(50):  # the member process may take a moment to be reaped
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.05)


def test_cgroup_attachment_counts_member_traffic(obj: BpfObject, netpair: dict[str, str], tmp_path) -> None:
    bss = obj.map(".bss")
    offset = _global_offset(obj, "test_cgroup_pkts")

    def count() -> int:
        return struct.unpack_from("=Q", bss.lookup(bytes(4)), offset)[0]

    with _cgroup() as cg:
        with attach.CgroupAttachment(obj.program("obi_test_cgroup"), cg, state_dir=str(tmp_path)) as att:
            assert att.link is not None
            before = count()
            _send_as_member(cg, netpair["ns_a"], 4)
            assert count() - before >= 4
            _send_udp(netpair["ns_a"], 4)  # not a member: not counted
            assert count() - before < 8
        after = count()
        _send_as_member(cg, netpair["ns_a"], 1)
        assert count() == after, "cgroup program still attached after exit"


def _send_as_member(cg: str, ns: str, n: int) -> None:
    """Join cgroup `cg` first (`ip netns exec` remounts /sys, hiding the cgroup2 mount),
    then send n datagrams from ns."""
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for _ in range({n}): s.sendto(b'x', ('198.18.0.2', 9))\n"
    )
    script = 'echo $$ > "$1/cgroup.procs" && exec ip netns exec "$2" "$3" -c "$4"'
    _sh("sh", "-c", script, "sh", cg, ns, sys.executable, code)


def _global_offset(obj: BpfObject, var: str) -> int:
    loc = libbpf._datasec_var(libbpf._obj_btf(obj.ptr), ".bss", var)
    assert loc is not None
    return loc[0]


def test_in_new_netns_is_isolated() -> None:
    def inside() -> tuple[int, list[str]]:
        return os.stat("/proc/thread-self/ns/net").st_ino, [n for _, n in socket.if_nameindex()]

    ino, names = in_new_netns(inside)
    assert ino != os.stat("/proc/thread-self/ns/net").st_ino
    assert names == ["lo"]


_AGENT = """
import socket, sys, time
from obi.kernel import attach, libbpf, netns
obj = libbpf.BpfObject.open(sys.argv[4])
obj.load()
prog = obj.program("obi_test_ringbuf")
with netns.in_netns(sys.argv[1]):
    idx = socket.if_nametoindex(sys.argv[2])
    attach.TcAttachment(prog, idx, "ingress", "tc", state_dir=sys.argv[3]).attach()
    attach.TcAttachment(prog, idx, "egress", "tcx", state_dir=sys.argv[3]).attach()
print("ready", flush=True)
time.sleep(60)
"""


def test_kill_9_then_cleanup(netpair: dict[str, str], tmp_path) -> None:
    """A real agent process attaches, is SIGKILLed; its clsact filter survives it, and
    cleanup() removes it and the qdisc it created, guided by the state file it wrote."""
    if not os.path.exists(TESTPROGS):
        pytest.skip(f"{TESTPROGS} not built")
    ns_b, dev_b = netpair["ns_b"], netpair["dev_b"]
    state_dir = str(tmp_path / "state")
    agent = subprocess.Popen(
        [sys.executable, "-c", _AGENT, f"/run/netns/{ns_b}", dev_b, state_dir, TESTPROGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = agent.stdout.readline() if agent.stdout else ""
        assert line.strip() == "ready", agent.stderr.read() if agent.stderr else ""
        assert "obi_test_ringbu" in _filters(ns_b, dev_b)
    finally:
        agent.kill()
        agent.wait(10)
    assert "obi_test_ringbu" in _filters(ns_b, dev_b), "clsact filters outlive the process"
    report = attach.cleanup(state_dir)
    text = "\n".join(report)
    assert "removed tc filter" in text and "removed clsact qdisc" in text, text
    assert "tcx link of obi_test_ringbu" in text
    assert _filters(ns_b, dev_b) == "" and "clsact" not in _qdiscs(ns_b, dev_b)
    assert os.listdir(state_dir) == []
