"""obi/kernel/abi.py must match bpf/include/obi_abi.h as compiled: sizes and offsets are
read from the BTF of the built objects (`bpftool btf dump file ... format raw`). No root."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess

import pytest

from obi.kernel import abi

OBJ_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "obi", "_bpf")
OBJECTS = ("tpinjector", "tctracer", "threads", "threads_syscalls")


def _bpftool() -> str:
    return shutil.which("bpftool") or ("/usr/sbin/bpftool" if os.path.exists("/usr/sbin/bpftool") else "")


def btf_structs(obj: str) -> dict[str, tuple[int, dict[str, int]]]:
    """{struct name: (size, {member: byte offset})} from an object's BTF."""
    path = os.path.join(OBJ_DIR, f"{obj}.bpf.o")
    if not os.path.exists(path):
        pytest.skip(f"{path} not built (run `make -C bpf`)")
    tool = _bpftool()
    if not tool:
        pytest.skip("needs bpftool to read BTF")
    out = subprocess.run(
        [tool, "btf", "dump", "file", path, "format", "raw"], check=True, capture_output=True, text=True
    ).stdout
    structs: dict[str, tuple[int, dict[str, int]]] = {}
    cur: dict[str, int] | None = None
    for line in out.splitlines():
        m = re.match(r"\[\d+\] STRUCT '(\w+)' size=(\d+)", line)
        if m:
            cur = {}
            structs[m.group(1)] = (int(m.group(2)), cur)
            continue
        m = re.match(r"\s+'(\w+)' type_id=\d+ bits_offset=(\d+)", line)
        if m and cur is not None:
            cur[m.group(1)] = int(m.group(2)) // 8
        elif not line.startswith(("\t", " ")):
            cur = None
    return structs


@pytest.mark.parametrize("obj", OBJECTS)
def test_event_layout_matches_btf(obj):
    structs = btf_structs(obj)
    size, members = structs["obi_event"]
    assert size == abi.EVENT_SIZE == 912
    assert members == abi.field_offsets(abi.EVENT_FIELDS)


@pytest.mark.parametrize("obj", OBJECTS)
def test_tuple_layout_matches_btf(obj):
    size, members = btf_structs(obj)["obi_tuple"]
    assert size == abi.TUPLE_SIZE == 40
    assert members == {"local_addr": 0, "peer_addr": 16, "local_port": 32, "peer_port": 34, "family": 36, "_pad0": 38}


def test_counter_enum_matches_header():
    header = open(os.path.join(os.path.dirname(__file__), "..", "..", "bpf", "include", "obi_abi.h")).read()
    body = header[header.index("enum obi_counter {") :]
    body = body[: body.index("};")]
    names = re.findall(r"OBI_CNT_(\w+)", body)
    assert names[-1] == "MAX"
    assert [c.name for c in abi.Counter] == names[:-1]
    assert abi.COUNTER_MAX == len(names) - 1


def test_event_roundtrip():
    t = abi.Tuple("198.18.0.2", "198.18.0.3", 40000, 8080, abi.AF_INET)
    vals = {name: 0 for name, _ in abi.EVENT_FIELDS}
    vals.update(
        kind=3,
        flags=abi.EVF_INJECTED,
        ts_ns=123,
        pid_tgid=(7 << 32) | 9,
        tuple=t.pack(),
        trace_id=bytes(range(16)),
        span_id=bytes(range(1, 9)),
        parent_id=bytes(8),
        trace_flags=3,
        line_len=4,
        line=b"GET /",
        tp=b"",
        tracestate=b"",
        host_len=6,
        host=b"c:8080xyz",
    )
    raw = struct.pack(
        abi.EVENT_FMT, *(vals[n] if not isinstance(vals[n], int) or f[-1] != "s" else b"" for n, f in abi.EVENT_FIELDS)
    )
    ev = abi.Event.unpack(raw)
    assert ev.kind == abi.EventKind.CLIENT_REQ and ev.tuple == t and ev.pid == 7 and ev.tid == 9
    assert ev.trace_id == bytes(range(16)).hex() and ev.parent_id == "" and ev.line == b"GET "
    assert ev.host == "c:8080"
