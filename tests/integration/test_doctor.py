"""`obi doctor` and the probes on this kernel (root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from obi import doctor, machine_probes
from obi.config import Config
from obi.kernel import probes
from obi.model import Datapath

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, securityfs, netns)")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _need_probes_object() -> None:
    from obi.kernel import libbpf

    if not os.path.exists(libbpf.object_path(probes.PROBES_OBJECT)):
        pytest.skip("probes.bpf.o not built (run `make -C bpf`)")


def _lockdown_independently() -> str:
    """The lockdown file read in a private mount namespace (no effect on ours)."""
    script = (
        "mountpoint -q /sys/kernel/security || mount -t securityfs securityfs /sys/kernel/security; "
        "cat /sys/kernel/security/lockdown"
    )
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        pytest.skip(f"lockdown LSM not readable here: {res.stderr.strip()}")
    return machine_probes.parse_lockdown(res.stdout)


def _netns_names() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def _securityfs_mounted() -> bool:
    return os.path.ismount(machine_probes.SECURITYFS)


@pytest.fixture(scope="module")
def report() -> dict:
    _need_probes_object()
    before_ns, before_sec = _netns_names(), _securityfs_mounted()
    checks = doctor.run_checks(Config())
    # Probing leaves nothing behind: no namespace, no change to the securityfs mount.
    assert {n for n in _netns_names() - before_ns if n.startswith(machine_probes.NETNS_PREFIX)} == set()
    assert _securityfs_mounted() == before_sec
    return doctor.report_json(checks)


def test_bpf_loop_found_by_loading(report: dict) -> None:
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    if release < (5, 17):
        pytest.skip("bpf_loop needs Linux >= 5.17")
    assert report["bpf_loop"] is True
    assert report["datapath"] == "kernel"
    assert "bpf_loop" in report["datapath_reason"]


def test_lockdown_matches_the_kernel(report: dict) -> None:
    expected = _lockdown_independently()
    assert report["lockdown"] == expected
    if expected != "integrity":
        pytest.skip(f"this machine's lockdown is {expected!r}, the reference machine's is 'integrity'")
    assert report["lockdown"] == "integrity"
    by = {c["name"]: c for c in report["checks"]}
    assert by["bpf_probe_write_user"]["status"] == "ok" and report["bpf_probe_write_user"] is False
    assert "not usable" in by["bpf_probe_write_user"]["detail"]


def test_every_check_present(report: dict) -> None:
    names = [c["name"] for c in report["checks"]]
    assert names == [
        "kernel",
        "btf",
        "bpf_loop",
        "sock_recv_tracepoint",
        "tracefs",
        "sockops",
        "sk_msg",
        "tc",
        "tcx",
        "ringbuf",
        "cgroup_v2",
        "lockdown",
        "bpf_probe_write_user",
        "capabilities",
        "iptables",
        "nfqueue",
        "programs",
        "datapath",
    ]
    assert report["kernel"] == os.uname().release
    assert all(c["status"] in ("ok", "warn", "fail") and c["detail"] for c in report["checks"])
    by = {c["name"]: c for c in report["checks"]}
    assert by["cgroup_v2"]["detail"] == probes.libbpf.cgroup_v2_mount()


def test_choose_datapath_with_the_real_probes() -> None:
    _need_probes_object()
    real = doctor.choose_datapath(Config())
    bpf_loop = probes.probe_bpf_loop().ok
    if bpf_loop:
        assert real.datapath is Datapath.KERNEL
    else:
        assert real.datapath in (Datapath.USERSPACE, None)
    # The same kernel with the bpf_loop probe faked as failed: NFQUEUE is probed for real.
    nfq = machine_probes.probe_nfqueue()
    fallback = doctor.choose_datapath(Config(), bpf_loop_ok=False)
    assert fallback.datapath is (Datapath.USERSPACE if nfq.ok else None)
    if nfq.ok:
        assert "per process, not per thread" in fallback.reason


def test_doctor_cli_json() -> None:
    _need_probes_object()
    if not os.path.exists(os.path.join(REPO, "obi", "cli.py")):
        pytest.skip("obi/cli.py not there yet")
    res = subprocess.run(
        [sys.executable, "-m", "obi", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {"kernel", "bpf_loop", "lockdown", "datapath", "datapath_reason", "checks"} <= set(doc)
    assert doc["kernel"] == os.uname().release
    assert doc["bpf_loop"] is bool(probes.probe_bpf_loop().ok)
    assert doc["lockdown"] == _lockdown_independently()
    assert doc["datapath"] in ("kernel", "userspace", None)


def test_doctor_cli_text_forced_userspace() -> None:
    _need_probes_object()
    if not os.path.exists(os.path.join(REPO, "obi", "cli.py")):
        pytest.skip("obi/cli.py not there yet")
    env = {**os.environ, "OTEL_EBPF_DATAPATH": "userspace"}
    res = subprocess.run(
        [sys.executable, "-m", "obi", "doctor"], capture_output=True, text=True, timeout=60, cwd=REPO, env=env
    )
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if "] datapath" in ln)
    assert "userspace (forced)" in line and "per process, not per thread" in line


def test_thread_tracepoint_probe_agrees_with_btf_and_tracefs(monkeypatch) -> None:
    """Both ways of finding sock:sock_recv_length give the same answer on this kernel."""
    if not os.path.exists(probes.BTF_VMLINUX):
        pytest.skip(f"{probes.BTF_VMLINUX} missing: kernel built without BTF")
    with_tracefs = probes.probe_sock_recv_tracepoint()
    monkeypatch.setattr(probes, "_TRACEFS_EVENT", ())
    from_btf = probes.probe_sock_recv_tracepoint()
    assert "kernel BTF" in from_btf.detail
    assert from_btf.ok == with_tracefs.ok
    release = tuple(int(x) for x in probes.kernel_release().split(".")[:2])
    if release >= (6, 3):
        assert from_btf.ok is True


@pytest.mark.parametrize("propagation", ["all", "headers", "tcp", "disabled"])
def test_doctor_loads_what_run_attaches(propagation: str, tmp_path) -> None:
    """doctor loads the real objects in the configured mode; its choice is what the agent
    attaches, and the programs the agent loaded are the ones doctor measured (same
    verifier cost)."""
    _need_probes_object()
    from obi import config as config_mod

    cfg = config_mod.load(env={"OTEL_EBPF_BPF_CONTEXT_PROPAGATION": propagation, "OTEL_EBPF_TRACE_PRINTER": "disabled"})
    rep = doctor.report_json(doctor.run_checks(cfg))
    if rep["datapath"] != "kernel":
        from tests.helpers.skips import kernel_path_missing

        assert kernel_path_missing(), (
            f"doctor did not pick the kernel path on a capable kernel: {rep['datapath_reason']}"
        )
        pytest.skip(f"kernel path unavailable here: {rep['datapath_reason']}")
    progs = {(p["object"], p["program"]): p for p in rep["programs"]}
    assert progs and all(
        not p["error"] and 0 < p["verified_insns"] <= 250_000 and p["load_ms"] > 0 for p in progs.values()
    ), rep["programs"]

    # What Agent.start does with that choice, in a namespace of the test's own.
    from obi.demo.topology import Topology
    from obi.kernel.datapath import KernelDatapath

    assert doctor.choose_datapath(cfg).datapath is Datapath.KERNEL
    with Topology(["h"], prefix="obidr") as topo:
        host = topo["h"]
        cfg = config_mod.load(
            env={
                "OTEL_EBPF_BPF_CONTEXT_PROPAGATION": propagation,
                "OTEL_EBPF_TRACE_PRINTER": "disabled",
                "OTEL_EBPF_CGROUP_PATH": host.cgroup,
            }
        )
        dp = KernelDatapath(cfg, lambda span: None, netns=host.netns_path, state_dir=str(tmp_path))
        dp.start()
        try:
            loaded = {
                (name, p.name): p.info()["verified_insns"] for name, obj in dp._objs.items() for p in obj.programs()
            }
        finally:
            dp.stop()
    assert loaded
    for key, insns in loaded.items():
        assert progs[key]["verified_insns"] == insns, (key, insns, progs[key])
