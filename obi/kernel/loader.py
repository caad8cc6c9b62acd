"""Opening and loading the kernel path's BPF objects, and what the verifier says of them.

One place for: which objects the kernel datapath loads, the config flags they are loaded
with, the maps they share, how a load failure is told apart (the kernel lacks a feature,
or the verifier rejected a program of ours), and the per-program load report that
`obi doctor`, the datapath choice, the verifier-budget test and the benchmark all read.

Verifier budget: every program must verify in at most `BUDGET` processed instructions
(a quarter of the kernel's limit) in every mode. What keeps the count bounded, on 5.17-6.2
(bpf_loop callbacks verified once) as on 6.8+ (callbacks re-verified until their states
converge), is in bpf/include/obi_http.h ("Verifier cost").
"""

from __future__ import annotations

import itertools
import os
import re
import struct
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from ..config import Config
from ..errors import BpfError, MissingFeature, ObiError, ProgramRejected
from . import libbpf
from .abi import CFG_HDR_INSERT, CFG_HDR_READ, CFG_TCP

VERIFIER_LIMIT = 1_000_000  # BPF_COMPLEXITY_LIMIT_INSNS
BUDGET = VERIFIER_LIMIT // 4

# tpinjector first: it creates the shared maps (obi_maps.h); the others reuse its fds.
OBJECTS = ("tpinjector", "tctracer")
# Thread hooks (which request a thread serves) -> their BPF object.
THREAD_HOOKS = {"sock_recv_length": "threads", "syscalls": "threads_syscalls"}
# The iterator that adopts connections established before start: object, program.
ADOPT_ITER = ("adopt", "obi_adopt")
ALL_FLAGS = (CFG_HDR_INSERT, CFG_HDR_READ, CFG_TCP)


def cfg_flags(cfg: Config) -> int:
    """obi_cfg_flags for the BPF programs. As in OBI: incoming traceparent headers are
    continued with headers propagation or with track_request_headers alone; headers are
    inserted only with headers propagation."""
    flags = CFG_TCP if cfg.propagate_tcp else 0
    if cfg.propagate_headers:
        flags |= CFG_HDR_INSERT
    if cfg.read_incoming_headers:
        flags |= CFG_HDR_READ
    return flags


def flag_names(flags: int) -> str:
    names = [
        n for bit, n in ((CFG_HDR_INSERT, "hdr_insert"), (CFG_HDR_READ, "hdr_read"), (CFG_TCP, "tcp")) if flags & bit
    ]
    return "+".join(names) or "none"


def kernel_objects(thread_hook: str) -> tuple[str, ...]:
    """Every object the kernel datapath loads with `thread_hook` (a THREAD_HOOKS key)."""
    return (*OBJECTS, THREAD_HOOKS[thread_hook], ADOPT_ITER[0])


# --- opening and loading -----------------------------------------------------------------


def open_object(name: str, flags: int, shared: dict[str, int]) -> libbpf.BpfObject:
    """Open object `name` with obi_cfg_flags = `flags` and the maps in `shared` reused."""
    obj = libbpf.BpfObject.open(libbpf.object_path(name))
    obj.set_global("obi_cfg_flags", struct.pack("=I", flags))
    for m in obj.maps():
        if m.name in shared:
            m.reuse_fd(shared[m.name])
    return obj


def shared_fds(obj: libbpf.BpfObject) -> dict[str, int]:
    """The maps of obi_maps.h as `obj` (loaded) holds them, for the next objects to reuse."""
    return {
        m.name: m.fd
        for m in obj.maps()
        if not m.name.startswith(".") and not m.name.endswith((".rodata", ".data", ".bss"))
    }


def load(obj: libbpf.BpfObject) -> None:
    """obj.load(), its failure classified (see classify)."""
    try:
        obj.load()
    except BpfError as e:
        raise classify(e, os.path.basename(obj.path)) from e


# --- what a failed load means ------------------------------------------------------------

# Helpers the programs call, by id: (name, first kernel that has it). An old kernel names
# a helper it does not know "unknown#<id>".
HELPERS = {
    181: ("bpf_loop", "5.17"),
    130: ("bpf_ringbuf_output", "5.8"),
    131: ("bpf_ringbuf_reserve", "5.8"),
    132: ("bpf_ringbuf_submit", "5.8"),
    107: ("bpf_sk_storage_get", "5.2"),
    90: ("bpf_msg_push_data", "4.20"),
    142: ("bpf_load_hdr_opt", "5.10"),
    143: ("bpf_store_hdr_opt", "5.10"),
    144: ("bpf_reserve_hdr_opt", "5.10"),
    127: ("bpf_seq_write", "5.8"),
}

_PROG_FAILED = re.compile(r"prog '([^']+)': (?:BPF program )?(?:load failed|failed to load)")
_PROCESSED = re.compile(r"processed (\d+) insns")
_UNKNOWN_FUNC = re.compile(r"unknown func (\w+)#(\d+)")
_CANNOT_USE = re.compile(r"program of this type cannot use helper (\w+)#(\d+)")
_MAP_CREATE = re.compile(r"map '([^']+)': failed to create")


def verifier_log(text: str) -> list[str]:
    """The verifier's own lines of a libbpf message (between BEGIN/END PROG LOAD LOG)."""
    out, inside = [], False
    for ln in text.splitlines():
        if "-- BEGIN PROG LOAD LOG --" in ln:
            inside, out = True, []
        elif "-- END PROG LOAD LOG --" in ln:
            inside = False
        elif inside and ln.strip():
            out.append(ln.rstrip())
    return out


def classify(e: BpfError, object_name: str) -> ObiError:
    """A load failure as MissingFeature (the kernel lacks a helper, map type or program
    type we need: a fallback is right) or ProgramRejected (the verifier refused a program
    of ours on a kernel that has what it needs: a defect to report, never "needs Linux X")."""
    text = e.log or ""
    m = _UNKNOWN_FUNC.search(text)
    if m:
        name, hid = m.group(1), int(m.group(2))
        known = HELPERS.get(hid)
        helper = known[0] if known else (name if name != "unknown" else f"helper #{hid}")
        return MissingFeature(f"BPF helper {helper}", known[1] if known else "", f"{object_name}: {m.group(0)}")
    m = _CANNOT_USE.search(text)
    if m:
        return MissingFeature(f"BPF helper {m.group(1)} for this program type", "", f"{object_name}: {m.group(0)}")
    m = _MAP_CREATE.search(text)
    if m and not _PROG_FAILED.search(text):
        return MissingFeature(f"BPF map {m.group(1)}", "", f"{object_name}: {text.splitlines()[-1] if text else e}")
    prog = _PROG_FAILED.search(text)
    lines = verifier_log(text)
    processed = _PROCESSED.search(text)
    return ProgramRejected(
        object_name,
        prog.group(1) if prog else "",
        int(processed.group(1)) if processed else 0,
        lines[-6:] if lines else [ln for ln in text.splitlines() if ln.strip()][-3:],
        e.errno,
    )


# --- the load report -----------------------------------------------------------------------


@dataclass(frozen=True)
class ProgramLoad:
    """One program loaded on its own: how much the verifier had to do, or why it refused."""

    object: str
    program: str
    flags: int
    verified_insns: int  # 0 when it failed, or on kernels before 5.16 (not reported)
    load_ms: float
    error: str = ""  # "" when it loaded
    missing_feature: bool = False  # the error is a missing kernel feature, not our program

    @property
    def ok(self) -> bool:
        return not self.error

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mode"] = flag_names(self.flags)
        d["load_ms"] = round(self.load_ms, 2)
        return d


def load_report(flags: int, objects: Sequence[str]) -> list[ProgramLoad]:
    """Load every program of `objects`, one at a time (each alone in its object, as the
    kernel verifies them anyway), with obi_cfg_flags = `flags` and one set of shared maps,
    as the datapath would; nothing is attached. One ProgramLoad per program."""
    out: list[ProgramLoad] = []
    shared: dict[str, int] = {}
    keep: list[libbpf.BpfObject] = []  # the map owner stays open until the end
    try:
        for name in objects:
            with libbpf.BpfObject.open(libbpf.object_path(name)) as probe_obj:
                progs = [p.name for p in probe_obj.programs()]
            for prog in progs:
                obj = open_object(name, flags, shared)
                for p in obj.programs():
                    p.set_autoload(p.name == prog)
                t0 = time.perf_counter()
                try:
                    load(obj)
                except ObiError as e:
                    ms = (time.perf_counter() - t0) * 1e3
                    out.append(
                        ProgramLoad(
                            name, prog, flags, getattr(e, "processed", 0), ms, str(e), isinstance(e, MissingFeature)
                        )
                    )
                    obj.close()
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                info = obj.program(prog).info()
                out.append(ProgramLoad(name, prog, flags, int(info["verified_insns"]), ms))
                if not shared:
                    shared.update(shared_fds(obj))
                    keep.append(obj)
                else:
                    obj.close()
    finally:
        for obj in keep:
            obj.close()
    return out


def budget_table(flag_sets: Iterable[int] | None = None) -> list[ProgramLoad]:
    """Every program of every object the kernel datapath can load (both thread hooks, the
    adoption iterator), under every combination of obi_cfg_flags."""
    if flag_sets is None:
        flag_sets = sorted({sum(c) for r in range(len(ALL_FLAGS) + 1) for c in itertools.combinations(ALL_FLAGS, r)})
    objects = (*OBJECTS, *THREAD_HOOKS.values(), ADOPT_ITER[0])
    return [row for flags in flag_sets for row in load_report(flags, objects)]


def format_table(rows: Sequence[ProgramLoad]) -> str:
    """The report as a text table (tests and the benchmark print it)."""
    lines = [f"{'object':<18} {'program':<16} {'mode':<22} {'verified insns':>14} {'load ms':>8}  budget {BUDGET:,}"]
    for r in rows:
        state = (
            "ok" if r.ok and r.verified_insns <= BUDGET else ("OVER" if r.ok else f"FAILED: {r.error.splitlines()[0]}")
        )
        lines.append(
            f"{r.object:<18} {r.program:<16} {flag_names(r.flags):<22} {r.verified_insns:>14,} "
            f"{r.load_ms:>8.1f}  {state}"
        )
    return "\n".join(lines)
