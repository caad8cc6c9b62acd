"""`obi doctor`: what this kernel and machine can do, and which datapath `auto` picks.

`run_checks(cfg)` turns the feature probes of `obi.kernel.probes` and the machine-wide
probes of `obi.machine_probes` into ok/warn/fail checks;
`choose_datapath(cfg)` is the capability switch (the agent calls it too), and
`report_text` / `report_json` render the checks for the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import machine_probes
from .config import Config
from .kernel import probes
from .kernel.probes import Probe
from .model import Datapath

OK, WARN, FAIL = "ok", "warn", "fail"

PER_PROCESS_NOTE = (
    "the userspace datapath links outgoing calls to incoming requests per process, "
    "not per thread (packets carry no thread)"
)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    value: Any = field(default=None, compare=False)  # machine-readable result, if any


@dataclass(frozen=True)
class DatapathChoice:
    datapath: Datapath | None
    reason: str


@dataclass(frozen=True)
class ProgramLoads:
    """The kernel path's programs loaded in the configured mode (obi.kernel.loader), or
    why they could not be tried at all (`unavailable`: no libbpf, objects not built)."""

    rows: tuple = ()  # of loader.ProgramLoad
    unavailable: str = ""

    @property
    def ok(self) -> bool:
        return not self.unavailable and bool(self.rows) and all(r.ok for r in self.rows)

    def first_failure(self):
        return next((r for r in self.rows if not r.ok), None)

    def largest(self):
        return max(self.rows, key=lambda r: r.verified_insns, default=None)


def load_programs(cfg: Config) -> ProgramLoads:
    """Load (never attach) every program `obi run` would load for `cfg` on the kernel path,
    one at a time, and report each one's verifier cost or rejection."""
    if probes.libbpf is None:
        return ProgramLoads(unavailable=probes.LIBBPF_ERROR)
    from .kernel import loader
    from .kernel.datapath import choose_thread_hook

    try:
        objects = loader.kernel_objects(choose_thread_hook())
        return ProgramLoads(tuple(loader.load_report(loader.cfg_flags(cfg), objects)))
    except Exception as e:  # objects not built, libbpf error before any program loads
        return ProgramLoads(unavailable=f"{type(e).__name__}: {str(e).splitlines()[0]}")


def _programs_verdict(loads: ProgramLoads) -> str:
    """ "" when the kernel path's programs all load, else why not (for the datapath reason)."""
    if loads.unavailable:
        return f"the kernel path's programs could not be loaded: {loads.unavailable}"
    bad = loads.first_failure()
    if bad is None:
        return ""
    if bad.missing_feature:
        return bad.error
    return f"the kernel has the features, but {bad.error}"


def choose_datapath(
    cfg: Config,
    bpf_loop_ok: bool | None = None,
    nfqueue_ok: bool | None = None,
    thread_tp_ok: bool | None = None,
    syscall_tp_ok: bool | None = None,
    programs: ProgramLoads | None = None,
) -> DatapathChoice:
    """The capability switch. `ebpf.datapath: kernel|userspace` forces; `auto` picks the
    kernel path when a bpf_loop program loads (or `override_bpfloop_enabled` is set, which
    skips that probe), it can link threads to requests: with the sock:sock_recv_length
    tracepoint (`thread_tp_ok`, Linux >= 6.3) or else with the syscall tracepoints
    (`syscall_tp_ok`), and every program the kernel path would load for this config
    loads (`programs`, see load_programs); otherwise the userspace path when NFQUEUE is
    usable, else nothing. Results not given are probed here (the syscall tracepoints only
    when needed, the programs only when everything else says kernel)."""
    if cfg.datapath == Datapath.KERNEL.value:
        return DatapathChoice(Datapath.KERNEL, "ebpf.datapath is kernel (forced)")
    if cfg.datapath == Datapath.USERSPACE.value:
        return DatapathChoice(Datapath.USERSPACE, f"ebpf.datapath is userspace (forced); {PER_PROCESS_NOTE}")
    if thread_tp_ok is None:
        thread_tp_ok = probes.probe_sock_recv_tracepoint().ok
    if thread_tp_ok is False and syscall_tp_ok is None:
        syscall_tp_ok = probes.probe_syscall_tracepoints().ok
    # An unknown answer (no tracefs, no BTF) does not veto: start() would still fail
    # cleanly with MissingFeature and the agent fall back.
    no_tp = thread_tp_ok is False and syscall_tp_ok is False
    how = "; threads linked with syscall tracepoints (no sock:sock_recv_length)" if thread_tp_ok is False else ""
    if bpf_loop_ok is None and not cfg.override_bpfloop_enabled:
        bpf_loop_ok = bool(probes.probe_bpf_loop().ok)
    if no_tp and (bpf_loop_ok or cfg.override_bpfloop_enabled):
        missing = (
            "no tracepoint to link threads with: neither sock:sock_recv_length (Linux >= 6.3) "
            "nor the syscall tracepoints (CONFIG_FTRACE_SYSCALLS)"
        )
    elif bpf_loop_ok or cfg.override_bpfloop_enabled:
        if programs is None:
            programs = load_programs(cfg)
        missing = _programs_verdict(programs)
        if not missing:
            why = (
                "override_bpfloop_enabled is set, bpf_loop probe skipped"
                if cfg.override_bpfloop_enabled
                else "a bpf_loop program loads"
            )
            top = programs.largest()
            cost = (
                f"; its {len(programs.rows)} programs load (largest {top.program}: {top.verified_insns:,} "
                f"verified instructions)"
                if top is not None
                else ""
            )
            return DatapathChoice(Datapath.KERNEL, f"auto: {why}{cost}; kernel datapath{how}")
    else:
        missing = "no bpf_loop (needs Linux >= 5.17)"
    if nfqueue_ok is None:
        nfqueue_ok = bool(machine_probes.probe_nfqueue().ok)
    if nfqueue_ok:
        return DatapathChoice(
            Datapath.USERSPACE,
            f"auto: {missing}; NFQUEUE usable; userspace datapath; {PER_PROCESS_NOTE}",
        )
    return DatapathChoice(None, f"auto: {missing} and NFQUEUE not usable; no datapath available")


def _feature(p: Probe, missing_status: str, missing_effect: str) -> Check:
    if p.ok:
        return Check(p.name, OK, p.detail, True)
    # The kernel version hint only helps when the kernel, not the machine, said no.
    need = f" (needs Linux >= {p.min_kernel})" if p.min_kernel and not probes.LIBBPF_ERROR else ""
    if p.ok is None:
        return Check(p.name, WARN, f"unknown: {p.detail}", None)
    return Check(p.name, missing_status, f"{p.detail}{need}; {missing_effect}", False)


def run_checks(cfg: Config) -> list[Check]:
    """Every doctor check, in a stable order; the last one is the datapath decision."""
    found = {**probes.run_all(), **machine_probes.run_all()}
    kernel_forced = cfg.datapath == Datapath.KERNEL.value
    kpath = FAIL if kernel_forced else WARN  # a missing kernel-path feature
    checks = [Check("kernel", OK, probes.kernel_release(), probes.kernel_release())]

    checks.append(_feature(found["btf"], WARN, "BTF-based checks of the built objects unavailable"))
    bpf_loop = found["bpf_loop"]
    effect = "the kernel datapath cannot parse ingress headers; auto picks userspace"
    if cfg.override_bpfloop_enabled:
        effect = "override_bpfloop_enabled is set: the kernel datapath is used anyway"
    checks.append(_feature(bpf_loop, kpath, effect))
    tp, sys_tp = found["sock_recv_tracepoint"], found["syscall_tracepoints"]
    if tp.ok is False and sys_tp.ok:
        # One check for the thread hook (either tracepoint will do).
        checks.append(
            Check(
                tp.name,
                OK,
                f"{tp.detail} (needs Linux >= {tp.min_kernel}); "
                f"threads are linked with the syscall tracepoints instead: {sys_tp.detail}",
                True,
            )
        )
    else:
        checks.append(_feature(tp, kpath, f"the kernel path cannot link threads to requests ({sys_tp.detail})"))
    tracefs = found["tracefs"]
    if tracefs.ok is None:  # not mounted yet: the agent mounts it
        checks.append(Check(tracefs.name, OK, tracefs.detail, None))
    else:
        checks.append(_feature(tracefs, kpath, "the kernel path cannot attach its tracepoints"))
    checks.append(_feature(found["sockops"], kpath, "no egress socket tracking on the kernel path"))
    checks.append(_feature(found["sk_msg"], kpath, "no header injection on the kernel path"))
    checks.append(_feature(found["tc"], kpath, "no ingress program on the kernel path (clsact)"))
    tcx = found["tcx"]
    if cfg.traffic_control_backend == "tcx":
        checks.append(_feature(tcx, FAIL, "traffic_control_backend is tcx"))
    else:
        checks.append(_feature(tcx, WARN, "tc clsact is used instead"))
    checks.append(_feature(found["ringbuf"], kpath, "no event delivery on the kernel path"))
    checks.append(_feature(found["cgroup_v2"], kpath, "sockops cannot be attached"))

    lock = found["lockdown"]
    mode = lock.detail if lock.ok else ""
    if lock.ok:
        note = {"none": "no restrictions"}.get(mode, "restricts some BPF helpers; obi needs none of them")
        checks.append(Check("lockdown", OK, f"{mode}: {note}", mode))
    else:
        checks.append(Check("lockdown", WARN, f"unknown: {lock.detail}", ""))

    pwu = found["bpf_probe_write_user"]
    if pwu.ok:
        checks.append(Check(pwu.name, OK, "usable (obi does not use it)", True))
    else:
        # Reported because OBI's Go-library propagation depends on it; obi-py's datapaths
        # write on the wire instead, so its absence is no problem here.
        checks.append(Check(pwu.name, OK, f"not usable: {pwu.detail} (obi does not need it)", False))

    checks.append(_capabilities_check())

    ipt = found["iptables"]
    checks.append(Check("iptables", OK if ipt.ok else WARN, ipt.detail, ipt.detail.split(" ", 1)[0] if ipt.ok else ""))
    nfq = found["nfqueue"]
    uspace = FAIL if cfg.datapath == Datapath.USERSPACE.value else WARN
    checks.append(
        _feature(nfq, uspace, "the userspace datapath is unavailable")
        if not nfq.ok
        else Check("nfqueue", OK, nfq.detail, True)
    )

    loads = (
        load_programs(cfg)
        if cfg.datapath != Datapath.USERSPACE.value
        else ProgramLoads(unavailable="not loaded: ebpf.datapath is userspace")
    )
    checks.append(_programs_check(loads, cfg, kpath))
    choice = choose_datapath(
        cfg,
        bpf_loop_ok=bool(bpf_loop.ok),
        nfqueue_ok=bool(nfq.ok),
        thread_tp_ok=tp.ok,
        syscall_tp_ok=sys_tp.ok,
        programs=loads,
    )
    if choice.datapath is None:
        status = FAIL
    elif choice.datapath is Datapath.USERSPACE:
        status = WARN  # works, links per process only
    elif kernel_forced and ((not bpf_loop.ok and not cfg.override_bpfloop_enabled) or not loads.ok):
        status = FAIL
    else:
        status = OK
    value = choice.datapath.value if choice.datapath else None
    checks.append(Check("datapath", status, choice.reason, value))
    return checks


def _programs_check(loads: ProgramLoads, cfg: Config, missing_status: str) -> Check:
    """The kernel path's own programs, loaded in the configured mode: verifier cost of
    each against the budget (a quarter of the kernel's limit), or which one failed and why.
    value: the rows as dicts (report_json's `programs`)."""
    from .kernel.loader import BUDGET, flag_names

    rows = [r.as_dict() for r in loads.rows]
    if loads.unavailable:
        status = OK if cfg.datapath == Datapath.USERSPACE.value else WARN
        return Check("programs", status, loads.unavailable, rows)
    bad = loads.first_failure()
    if bad is not None:
        status = missing_status if bad.missing_feature else (FAIL if cfg.datapath == Datapath.KERNEL.value else WARN)
        return Check("programs", status, bad.error, rows)
    top = loads.largest()
    total_ms = sum(r.load_ms for r in loads.rows)
    detail = (
        f"{len(rows)} programs load in mode {flag_names(loads.rows[0].flags)} in {total_ms:.0f} ms; "
        f"largest {top.object}/{top.program}: {top.verified_insns:,} verified instructions "
        f"(budget {BUDGET:,}, a quarter of the verifier's limit)"
    )
    over = [r for r in loads.rows if r.verified_insns > BUDGET]
    if over:
        return Check("programs", WARN, detail + "; over budget: " + ", ".join(r.program for r in over), rows)
    return Check("programs", OK, detail, rows)


def _capabilities_check() -> Check:
    try:
        caps = machine_probes.parse_capeff(machine_probes.read_capeff())
    except OSError as e:
        return Check("capabilities", WARN, f"cannot read /proc/self/status: {e}", {})
    missing = [n for n, have in caps.items() if not have]
    if not missing:
        return Check("capabilities", OK, "all needed capabilities present", caps)
    lines = [f"missing {n}: {machine_probes.CAPABILITIES[n][1]}" for n in missing]
    bpf_ok = caps["CAP_BPF"] or caps["CAP_SYS_ADMIN"]
    status = FAIL if not (bpf_ok and caps["CAP_NET_ADMIN"]) else WARN
    return Check("capabilities", status, "; ".join(lines), caps)


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def report_json(checks: list[Check]) -> dict[str, Any]:
    by = _by_name(checks)

    def val(name: str, default: Any = None) -> Any:
        c = by.get(name)
        return c.value if c is not None else default

    dp = by.get("datapath")
    return {
        "kernel": val("kernel", ""),
        "bpf_loop": bool(val("bpf_loop", False)),
        "lockdown": val("lockdown", "") or "",
        "datapath": val("datapath"),
        "datapath_reason": dp.detail if dp else "",
        "tcx": bool(val("tcx", False)),
        "bpf_probe_write_user": bool(val("bpf_probe_write_user", False)),
        "iptables_backend": val("iptables", ""),
        "capabilities": val("capabilities", {}),
        "programs": [
            {k: r[k] for k in ("object", "program", "mode", "verified_insns", "load_ms", "error")}
            for r in val("programs", []) or []
        ],
        "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in checks],
    }


def report_text(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = [f"[{c.status:^4}] {c.name:<{width}}  {c.detail}" for c in checks]
    worst = FAIL if any(c.status == FAIL for c in checks) else WARN if any(c.status == WARN for c in checks) else OK
    lines.append(f"overall: {worst}")
    return "\n".join(lines)
