"""The datapath switch and the doctor's parsers, with faked probe results (no root)."""

from __future__ import annotations

import pytest

from obi import doctor, machine_probes
from obi.config import Config
from obi.doctor import Check, choose_datapath
from obi.kernel import probes
from obi.model import Datapath


@pytest.fixture
def no_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any real probe call fails the test: results must come from the arguments."""

    def boom() -> probes.Probe:
        raise AssertionError("probe must not run")

    monkeypatch.setattr(probes, "probe_bpf_loop", boom)
    monkeypatch.setattr(machine_probes, "probe_nfqueue", boom)
    # Not faked by a test: the tracepoint is there (as on every kernel >= 6.3).
    monkeypatch.setattr(
        probes, "probe_sock_recv_tracepoint", lambda: probes.Probe("sock_recv_tracepoint", True, "", "6.3")
    )
    monkeypatch.setattr(probes, "probe_syscall_tracepoints", lambda: probes.Probe("syscall_tracepoints", True, ""))
    # The kernel path's own programs load (a test that says otherwise passes `programs`).
    monkeypatch.setattr(doctor, "load_programs", lambda cfg: doctor.ProgramLoads((_row(),)))


def _row(error: str = "", missing: bool = False, insns: int = 9_581):
    from obi.kernel.loader import ProgramLoad

    return ProgramLoad("ingress", "obi_tc_ingress", 7, 0 if error else insns, 10.0, error, missing)


@pytest.mark.usefixtures("no_probing")
class TestChooseDatapath:
    def test_forced_kernel_ignores_probes(self) -> None:
        choice = choose_datapath(Config(datapath="kernel"), bpf_loop_ok=False, nfqueue_ok=True)
        assert choice.datapath is Datapath.KERNEL
        assert "forced" in choice.reason

    def test_forced_userspace_says_per_process(self) -> None:
        choice = choose_datapath(Config(datapath="userspace"), bpf_loop_ok=True, nfqueue_ok=True)
        assert choice.datapath is Datapath.USERSPACE
        assert "per process, not per thread" in choice.reason

    def test_auto_with_bpf_loop_picks_kernel(self) -> None:
        choice = choose_datapath(Config(), bpf_loop_ok=True, nfqueue_ok=True)
        assert choice.datapath is Datapath.KERNEL
        assert "bpf_loop" in choice.reason

    def test_auto_without_the_thread_tracepoint_uses_syscall_tracepoints(self) -> None:
        # A 5.17 - 6.2 kernel: bpf_loop loads, sock:sock_recv_length does not exist, the
        # syscall tracepoints do: still the kernel path, saying how threads are linked.
        choice = choose_datapath(Config(), bpf_loop_ok=True, nfqueue_ok=True, thread_tp_ok=False, syscall_tp_ok=True)
        assert choice.datapath is Datapath.KERNEL
        assert "syscall tracepoints" in choice.reason
        override = choose_datapath(Config(override_bpfloop_enabled=True), thread_tp_ok=False, syscall_tp_ok=True)
        assert override.datapath is Datapath.KERNEL and "syscall tracepoints" in override.reason
        # Not told: the syscall probe runs only when sock_recv_length is missing.
        assert choose_datapath(Config(), bpf_loop_ok=True, thread_tp_ok=False).datapath is Datapath.KERNEL
        with_tp = choose_datapath(Config(), bpf_loop_ok=True, thread_tp_ok=True, syscall_tp_ok=False)
        assert with_tp.datapath is Datapath.KERNEL and "syscall" not in with_tp.reason

    def test_auto_without_any_thread_tracepoint_picks_userspace(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Neither sock:sock_recv_length nor CONFIG_FTRACE_SYSCALLS.
        choice = choose_datapath(Config(), bpf_loop_ok=True, nfqueue_ok=True, thread_tp_ok=False, syscall_tp_ok=False)
        assert choice.datapath is Datapath.USERSPACE
        assert "sock_recv_length" in choice.reason and "6.3" in choice.reason
        assert "CONFIG_FTRACE_SYSCALLS" in choice.reason
        override = choose_datapath(
            Config(override_bpfloop_enabled=True), nfqueue_ok=True, thread_tp_ok=False, syscall_tp_ok=False
        )
        assert override.datapath is Datapath.USERSPACE
        # Cannot tell (no tracefs, no BTF): no veto; start() would fail cleanly instead.
        monkeypatch.setattr(
            probes,
            "probe_sock_recv_tracepoint",
            lambda: probes.Probe("sock_recv_tracepoint", None, "cannot tell", "6.3"),
        )
        unknown = choose_datapath(Config(), bpf_loop_ok=True, nfqueue_ok=True)
        assert unknown.datapath is Datapath.KERNEL

    def test_auto_without_bpf_loop_picks_userspace(self) -> None:
        choice = choose_datapath(Config(), bpf_loop_ok=False, nfqueue_ok=True)
        assert choice.datapath is Datapath.USERSPACE
        assert "5.17" in choice.reason
        assert "per process, not per thread" in choice.reason

    def test_override_skips_probe(self) -> None:
        # bpf_loop_ok=None would normally probe; the fixture makes probing fail the test.
        choice = choose_datapath(Config(override_bpfloop_enabled=True))
        assert choice.datapath is Datapath.KERNEL
        assert "override" in choice.reason

    def test_override_beats_failed_probe(self) -> None:
        choice = choose_datapath(Config(override_bpfloop_enabled=True), bpf_loop_ok=False, nfqueue_ok=False)
        assert choice.datapath is Datapath.KERNEL

    def test_none_available(self) -> None:
        choice = choose_datapath(Config(), bpf_loop_ok=False, nfqueue_ok=False)
        assert choice.datapath is None
        assert "NFQUEUE" in choice.reason and "bpf_loop" in choice.reason


def test_auto_probes_when_not_told(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_loop() -> probes.Probe:
        calls.append("bpf_loop")
        return probes.Probe("bpf_loop", False, "unknown func bpf_loop#181", "5.17")

    def fake_nfq() -> probes.Probe:
        calls.append("nfqueue")
        return probes.Probe("nfqueue", True, "ok")

    monkeypatch.setattr(probes, "probe_bpf_loop", fake_loop)
    monkeypatch.setattr(machine_probes, "probe_nfqueue", fake_nfq)
    assert choose_datapath(Config()).datapath is Datapath.USERSPACE
    assert calls == ["bpf_loop", "nfqueue"]


@pytest.mark.parametrize(
    "text, mode",
    [
        ("none [integrity] confidentiality", "integrity"),
        ("[none] integrity confidentiality", "none"),
        ("none integrity [confidentiality]\n", "confidentiality"),
        ("none integrity confidentiality", ""),
        ("", ""),
    ],
)
def test_parse_lockdown(text: str, mode: str) -> None:
    assert machine_probes.parse_lockdown(text) == mode


def test_parse_capeff_full_root() -> None:
    caps = machine_probes.parse_capeff("000001ffffffffff")
    assert set(caps) == {
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
        "CAP_DAC_READ_SEARCH",
        "CAP_CHECKPOINT_RESTORE",
    }
    assert all(caps.values())


def test_parse_capeff_partial() -> None:
    # CAP_NET_ADMIN (12) + CAP_NET_RAW (13) + CAP_BPF (39)
    mask = (1 << 12) | (1 << 13) | (1 << 39)
    caps = machine_probes.parse_capeff(f"{mask:016x}")
    assert {n for n, have in caps.items() if have} == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF"}
    assert machine_probes.parse_capeff("0000000000000000") == {n: False for n in caps}


def test_read_capeff_from_status_file(tmp_path) -> None:
    status = tmp_path / "status"
    status.write_text(
        "Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t0000000000003000\nCapBnd:\t000001ffffffffff\n"
    )
    caps = machine_probes.parse_capeff(machine_probes.read_capeff(str(status)))
    assert caps["CAP_NET_ADMIN"] and caps["CAP_NET_RAW"] and not caps["CAP_BPF"]


def test_capabilities_check_names_what_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine_probes, "read_capeff", lambda: f"{(1 << 39) | (1 << 12):016x}")
    check = doctor._capabilities_check()
    assert check.status == "warn"  # BPF and NET_ADMIN present: the agent can work
    assert "missing CAP_SYS_PTRACE" in check.detail and "discovery" in check.detail
    monkeypatch.setattr(machine_probes, "read_capeff", lambda: "0")
    assert doctor._capabilities_check().status == "fail"


def test_verifier_reason_picks_the_complaint() -> None:
    log = (
        "libbpf: prog 'probe_bpf_loop': BPF program load failed: Invalid argument\n"
        "libbpf: prog 'probe_bpf_loop': -- BEGIN PROG LOAD LOG --\n"
        "0: R1=ctx() R10=fp0\n"
        "5: (85) call unknown#181\n"
        "invalid func unknown#181\n"
        "processed 6 insns (limit 1000000)\n"
        "-- END PROG LOAD LOG --\n"
    )
    assert probes._verifier_reason(log) == "invalid func unknown#181"


def test_reports_from_checks() -> None:
    checks = [
        Check("kernel", "ok", "5.15.0", "5.15.0"),
        Check("bpf_loop", "warn", "invalid func unknown#181", False),
        Check("lockdown", "ok", "integrity: ...", "integrity"),
        Check("datapath", "warn", "auto: no bpf_loop ...; per process, not per thread", "userspace"),
    ]
    doc = doctor.report_json(checks)
    assert doc["kernel"] == "5.15.0"
    assert doc["bpf_loop"] is False
    assert doc["lockdown"] == "integrity"
    assert doc["datapath"] == "userspace"
    assert "per process" in doc["datapath_reason"]
    assert [c["name"] for c in doc["checks"]] == ["kernel", "bpf_loop", "lockdown", "datapath"]
    text = doctor.report_text(checks)
    assert "[warn] bpf_loop" in text and text.endswith("overall: warn")
    none = doctor.report_json([Check("datapath", "fail", "no datapath", None)])
    assert none["datapath"] is None


def test_probe_reports_missing_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "PROBES_OBJECT", "does-not-exist")
    p = probes.probe_bpf_loop()
    assert p.ok is None and "not built" in p.detail and "make -C bpf" in p.detail
    assert doctor._feature(p, "warn", "x").status == "warn"


@pytest.mark.usefixtures("no_probing")
class TestProgramsDecide:
    """auto picks the kernel path only when the programs obi run would load do load."""

    def test_rejected_program_falls_back_and_names_it(self) -> None:
        rejected = doctor.ProgramLoads(
            (
                _row(
                    "BPF program obi_tc_ingress (ingress.bpf.o) rejected by the verifier "
                    "after 1,000,001 processed instructions"
                ),
            )
        )
        choice = choose_datapath(Config(), bpf_loop_ok=True, nfqueue_ok=True, programs=rejected)
        assert choice.datapath is Datapath.USERSPACE
        assert "obi_tc_ingress" in choice.reason and "the kernel has the features" in choice.reason
        assert "5.17" not in choice.reason

    def test_missing_helper_falls_back_as_missing(self) -> None:
        missing = doctor.ProgramLoads(
            (_row("kernel feature unavailable: BPF helper bpf_loop (needs Linux >= 5.17)", missing=True),)
        )
        choice = choose_datapath(Config(override_bpfloop_enabled=True), nfqueue_ok=True, programs=missing)
        assert choice.datapath is Datapath.USERSPACE and "bpf_loop" in choice.reason

    def test_loaded_programs_give_the_kernel_path_with_their_cost(self) -> None:
        choice = choose_datapath(Config(), bpf_loop_ok=True, nfqueue_ok=True, programs=doctor.ProgramLoads((_row(),)))
        assert choice.datapath is Datapath.KERNEL and "9,581" in choice.reason

    def test_programs_check_over_budget_warns_and_rejection_fails_when_forced(self) -> None:
        over = doctor._programs_check(doctor.ProgramLoads((_row(insns=300_000),)), Config(), doctor.WARN)
        assert over.status == doctor.WARN and "over budget" in over.detail
        ok = doctor._programs_check(doctor.ProgramLoads((_row(),)), Config(), doctor.WARN)
        assert ok.status == doctor.OK and "9,581" in ok.detail
        bad = doctor.ProgramLoads((_row("rejected by the verifier"),))
        assert doctor._programs_check(bad, Config(datapath="kernel"), doctor.FAIL).status == doctor.FAIL
        assert doctor._programs_check(bad, Config(), doctor.WARN).status == doctor.WARN
