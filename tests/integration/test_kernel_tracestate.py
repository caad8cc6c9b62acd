"""The kernel path's tracestate handling (bpf/include/obi_tracestate.h) against the Python
reference (obi.w3c.extract), with BPF_PROG_TEST_RUN: requests are fed to the real
obi_tc_ingress program as TCP segments (whole, or cut at every kind of place), and the
tracestate BPF reports for the server span (map open_spans, struct obi_event) must be what
obi.w3c makes of the same headers: combined, validated, normalized, truncated to 512
characters by the spec's rules, or dropped.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from obi import w3c

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("needs root (loads BPF programs)", allow_module_level=True)
try:
    from obi.kernel import loader
    from obi.kernel.abi import CFG_HDR_READ, EVF_TP_VALID, Event, Tuple
except OSError as e:  # libbpf.so.1 missing
    pytest.skip(f"kernel path unavailable: {e}", allow_module_level=True)

TID, SID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
SERVER, CLIENT, PORT = "198.18.5.2", "198.18.5.1", 8080
MSS = 1448


@pytest.fixture(scope="module")
def progs():
    """tpinjector (it creates the shared maps) and tctracer loaded as the datapath loads
    them, headers read (OBI_CFG_HDR_READ); PORT is a selected server port."""
    shared: dict[str, int] = {}
    objs = []
    for name in loader.OBJECTS:
        obj = loader.open_object(name, CFG_HDR_READ, shared)
        loader.load(obj)
        if not shared:
            shared.update(loader.shared_fds(obj))
        objs.append(obj)
    inj, tc = objs
    inj.map("server_ports").update(struct.pack("=I", PORT), struct.pack("=I", 1))
    yield tc.program("obi_tc_ingress"), inj.map("open_spans"), inj.map("ts_states")
    for obj in reversed(objs):
        obj.close()


def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF


def segment(sport: int, seq: int, payload: bytes, flags: int = 0x18) -> bytes:
    """An Ethernet + IPv4 + TCP frame from CLIENT:sport to SERVER:PORT."""
    tcp = struct.pack("!HHIIBBHHH", sport, PORT, seq, 1, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(tcp) + len(payload),
        1,
        0x4000,
        64,
        6,
        0,
        bytes(map(int, CLIENT.split("."))),
        bytes(map(int, SERVER.split("."))),
    )
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + payload


class Conn:
    """One client connection to PORT (its own source port): requests fed as segments."""

    _next_port = 20000

    def __init__(self, progs):
        self.prog, self.open_spans, self.ts_states = progs
        Conn._next_port += 1
        self.sport, self.seq = Conn._next_port, 1000
        self.key = Tuple(SERVER, CLIENT, PORT, self.sport, 2).pack()

    def send(self, data: bytes, cuts: list[int] = ()) -> None:
        # segments of at most MSS bytes (BPF_PROG_TEST_RUN takes about a page)
        cuts = sorted(set(cuts) | set(range(MSS, len(data), MSS)))
        for a, b in zip([0, *cuts], [*cuts, len(data)]):
            if b > a:
                retval, _ = self.prog.test_run(segment(self.sport, self.seq, data[a:b]))
                assert retval == 0  # TC_ACT_OK: never drops
                self.seq += b - a

    def server_event(self) -> Event:
        raw = self.open_spans.lookup(self.key)
        assert raw is not None, "no server span held for the request"
        ev = Event.unpack(raw)
        self.open_spans.delete(self.key)  # the next request's event is held on its own
        return ev

    def close(self) -> None:
        self.prog.test_run(segment(self.sport, self.seq, b"", flags=0x11))  # FIN: entries go


def request(headers: list[tuple[str, str]]) -> bytes:
    return b"GET /ts HTTP/1.1\r\nHost: s\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n"


def expected(headers: list[tuple[str, str]]) -> str:
    ctx = w3c.extract(headers)
    return ctx.tracestate if ctx is not None else ""


def kernel_tracestate(progs, headers: list[tuple[str, str]], cuts: list[int] = ()) -> str:
    conn = Conn(progs)
    try:
        conn.send(request(headers), cuts)
        ev = conn.server_event()
        assert bool(ev.flags & EVF_TP_VALID) == (w3c.extract(headers) is not None)
        return ev.tracestate.decode("ascii")
    finally:
        conn.close()


def _m(key: str, size: int) -> str:
    value = min(256, size - len(key) - 1)
    return f"{key}{'x' * (size - len(key) - 1 - value)}={'v' * value}"


TP = ("traceparent", f"00-{TID}-{SID}-01")
CASES = [
    pytest.param([TP, ("tracestate", "congo=t61rcWkgMzE")], id="single"),
    pytest.param([TP, ("TraceState", "rojo=00f067aa0ba902b7 , congo=t61rcWkgMzE")], id="name-case-and-ows"),
    pytest.param([TP, ("tracestate", "a=1"), ("tracestate", "b=2"), ("tracestate", "c=3")], id="three-headers"),
    pytest.param([TP, ("tracestate", ""), ("tracestate", " , a=1,, \t,")], id="empty-header-and-members"),
    pytest.param([TP, ("tracestate", "a=1,a=2")], id="duplicate-key"),
    pytest.param([TP, ("tracestate", "a=1"), ("tracestate", "b=2,a=3")], id="duplicate-across-headers"),
    pytest.param([TP, ("tracestate", ",".join(f"k{i}=v" for i in range(32)))], id="32-members"),
    pytest.param([TP, ("tracestate", ",".join(f"k{i}=v" for i in range(33)))], id="33-members"),
    pytest.param([TP, ("tracestate", "A=1")], id="uppercase-key"),
    pytest.param([TP, ("tracestate", "1a=1")], id="simple-key-starting-with-digit"),
    pytest.param([TP, ("tracestate", "1a@sys=1,t@s0=2")], id="multi-tenant"),
    pytest.param([TP, ("tracestate", "t@0s=1")], id="system-id-starting-with-digit"),
    pytest.param([TP, ("tracestate", "a@b@c=1")], id="two-at-signs"),
    pytest.param([TP, ("tracestate", "t" * 242 + "@s=1")], id="tenant-too-long"),
    pytest.param([TP, ("tracestate", "t@" + "s" * 15 + "=1")], id="system-too-long"),
    pytest.param([TP, ("tracestate", "k" * 256 + "=1")], id="key-256"),
    pytest.param([TP, ("tracestate", "k" * 257 + "=1")], id="key-257"),
    pytest.param([TP, ("tracestate", "k=" + "v" * 256)], id="value-256"),
    pytest.param([TP, ("tracestate", "k=" + "v" * 257)], id="value-257"),
    pytest.param([TP, ("tracestate", "k= lead and inner  spaces   ")], id="value-spaces"),
    pytest.param([TP, ("tracestate", "k=a\tb")], id="tab-inside-value"),
    pytest.param([TP, ("tracestate", "k=a \t ,j=b\t")], id="tabs-as-ows"),
    pytest.param([TP, ("tracestate", "k=")], id="empty-value"),
    pytest.param([TP, ("tracestate", "k=a=b")], id="equals-in-value"),
    pytest.param([TP, ("tracestate", "k")], id="no-equals"),
    pytest.param([TP, ("tracestate", "k =1")], id="space-before-equals"),
    pytest.param([TP, ("tracestate", "k=\x7f")], id="control-char"),
    pytest.param([TP, ("tracestate", ",".join([_m("a", 300), _m("b", 100), _m("c", 120)]))], id="long-member-first"),
    pytest.param([TP, ("tracestate", ",".join([_m(f"k{i}", 100) for i in range(6)]))], id="then-from-the-end"),
    pytest.param(
        [TP, ("tracestate", ",".join([_m("a", 200), _m("b", 129)] + [_m(f"s{i}", 128) for i in range(4)]))],
        id="all-long-members-first",
    ),
    pytest.param(
        [TP, ("tracestate", ",".join([_m(f"k{i}", 128) for i in range(3)] + [_m("z", 125)]))], id="exactly-512"
    ),
    pytest.param([TP, ("tracestate", ",".join([_m(f"k{i}", 128) for i in range(3)] + [_m("z", 126)]))], id="513"),
    pytest.param([TP, ("tracestate", _m("a", 510)), ("tracestate", "b=1")], id="long-then-short-across-headers"),
    pytest.param([("traceparent", f"00-{'0' * 32}-{SID}-01"), ("tracestate", "a=1")], id="invalid-traceparent"),
    pytest.param([("tracestate", "a=1")], id="no-traceparent"),
    pytest.param([TP, TP, ("tracestate", "a=1")], id="two-traceparents"),
    pytest.param([("traceparent", f"cc-{TID}-{SID}-01-future"), ("tracestate", "a=1")], id="future-version"),
]


@pytest.mark.parametrize("headers", CASES)
def test_same_tracestate_as_the_reference(progs, headers):
    assert kernel_tracestate(progs, headers) == expected(headers)


@pytest.mark.parametrize("headers", CASES[:4] + CASES[27:33])
def test_same_tracestate_when_cut_anywhere(progs, headers):
    """The head cut into segments at random places, inside names and values too: the
    state carries over (the connection's ts_states entry is made mid-segment)."""
    data = request(headers)
    rng = random.Random(len(data))
    for _ in range(6):
        cuts = sorted(rng.sample(range(1, len(data)), min(4, len(data) - 1)))
        assert kernel_tracestate(progs, headers, cuts) == expected(headers), cuts


def _random_member(rng: random.Random) -> str:
    kind = rng.random()
    key = rng.choice("abcdefghijklmnopqrstuvwxyz") + "".join(
        rng.choice("abcdefghijklmnopqrstuvwxyz0123456789_-*/") for _ in range(rng.choice([0, 2, 10, 60, 250]))
    )
    if kind < 0.08:
        key = key[:10] + "@" + rng.choice(["sys", "0s", "", "s" * 15])
    value = "".join(rng.choice(" !#$%&'()*+-./:;<>?@[]^_`{|}~az09") for _ in range(rng.choice([1, 5, 40, 120, 256])))
    value = value.rstrip(" ") or "v"
    if kind > 0.97:
        value += rng.choice(["=", "\t!", ","])
    ows = rng.choice(["", " ", "\t", " \t "])
    return f"{ows}{key}={value}{ows}"


@pytest.mark.parametrize("seed", [0x7E57, 0xC0FFEE])
def test_random_lists_agree(progs, seed):
    """Random lists (valid and not, short and far over 512 characters, spread over several
    headers), whole or cut into segments at random places."""
    rng = random.Random(seed)
    for _ in range(300):
        members = [_random_member(rng) for _ in range(rng.choice([1, 3, 8, 20, 33]))]
        if rng.random() < 0.1 and members:
            members.append(members[0].strip(" \t").split("=")[0] + "=dup")
        headers, i = [TP], 0
        while i < len(members):
            n = rng.randint(1, 6)
            headers.append(("tracestate", ",".join(members[i : i + n])))
            i += n
        size = len(request(headers))
        cuts = sorted(rng.sample(range(1, size), 3)) if rng.random() < 0.5 else []
        assert kernel_tracestate(progs, headers, cuts) == expected(headers), (headers, cuts)


def test_next_request_on_the_connection_starts_clean(progs):
    conn = Conn(progs)
    try:
        conn.send(request([TP, ("tracestate", "a=1,b=2")]))
        assert conn.server_event().tracestate == b"a=1,b=2"
        conn.send(request([TP]))
        assert conn.server_event().tracestate == b""
        conn.send(request([TP, ("tracestate", "c=3")]))
        assert conn.server_event().tracestate == b"c=3"
    finally:
        conn.close()
    assert conn.ts_states.lookup(conn.key) is None  # FIN: the connection's entry is gone
