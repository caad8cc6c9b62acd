"""Smoke test of the benchmark: every arm for about a second (`python3 -m bench --quick`).

Checks that the outputs are complete and consistent, never timings: the baseline queued
no packets and exported no spans; the no-op NFQUEUE arm queued packets; the kernel arm
inserted headers (or, while that datapath cannot start, says why); the userspace arm
inserted headers and translated sequence numbers (or says why); JSON, Markdown and PNG
files are there with the keys the README documents.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from obi.demo.topology import have_netns_tools

REPO = Path(__file__).resolve().parents[2]
ARMS = ("baseline", "kernel", "userspace", "noop_nfqueue")
PHASES = ("closed", "c1", "fixed", "chain")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.root


def _skip_reason() -> str:
    reason = have_netns_tools()
    if reason:
        return reason
    for tool in ("wrk", "curl", "ss"):
        if not shutil.which(tool):
            return f"needs '{tool}' (the load generator / checks of the benchmark)"
    return ""


def _bpf_stats_sysctl() -> str | None:
    try:
        return Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    except OSError:
        return None


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path, str]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("bench")
    stats_before = _bpf_stats_sysctl()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # BPF run-time stats are on only while an arm runs: the sysctl must be as before.
    assert _bpf_stats_sysctl() == stats_before
    return json.loads((out / "results.json").read_text()), out, proc.stdout


def _runs(results: dict, arm: str) -> list[dict]:
    return results["arms"][arm]["runs"]


def test_files_and_schema(run):
    results, out, stdout = run
    for key in (
        "schema",
        "started",
        "finished",
        "command",
        "settings",
        "machine",
        "versions",
        "topology",
        "order",
        "arms",
        "micro",
        "goals",
        "charts",
    ):
        assert key in results, key
    for key in ("cpu_model", "cores", "kernel"):
        assert results["machine"][key], key
    for key in ("python", "obi", "wrk"):
        assert results["versions"][key], key
    assert set(results["arms"]) == set(ARMS)
    assert results["order"] and results["order"][0][0] == "baseline"
    for arm in ARMS:
        a = results["arms"][arm]
        assert {"available", "reason", "runs", "aggregate"} <= set(a)
        assert len(a["runs"]) == results["settings"]["reps"]
    report = (out / "report.md").read_text()
    assert "| metric |" in report and "## Goals" in report
    for png in ("rps_ratio.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
        assert png in results["charts"]
    assert "summary (medians):" in stdout
    assert len(results["goals"]) == 5
    for g in results["goals"]:
        assert g["met"] in (True, False, None)
        if g["met"] is None:
            assert g["note"], g  # not measured must say why


def _check_phases(run_: dict) -> None:
    for phase in PHASES:
        p = run_["phases"][phase]
        assert p["load"]["requests"] > 0, phase
        assert p["wall_s"] > 0
    s = run_["summary"]
    assert s["rps_c32"] > 0 and s["p50_us_c1"] > 0 and s["p99_us_c1"] >= s["p50_us_c1"]


def test_baseline_queues_nothing(run):
    results, _, _ = run
    for r in _runs(results, "baseline"):
        assert r["available"], r["reason"]
        _check_phases(r)
        assert all(p["queued"] == 0 for p in r["phases"].values())
        assert r["summary"]["queued_per_request"] == 0
        assert r["spans_received"] == 0
        assert r["summary"]["rps_ratio"] == 1.0
        # Nothing inserts a header when nothing is instrumented.
        assert r["propagation"]["ok"] and r["propagation"]["traceparent_at_backend"] is None
        assert not any(p["bpf_programs"] for p in r["phases"].values())


def test_noop_nfqueue_queues_packets(run):
    results, _, _ = run
    arm = results["arms"]["noop_nfqueue"]
    if importlib.util.find_spec("netfilterqueue") is None or not shutil.which("iptables"):
        assert not arm["available"] and arm["reason"]
        pytest.skip("netfilterqueue / iptables missing: the arm reported " + arm["reason"])
    for r in arm["runs"]:
        assert r["available"], r["reason"]
        _check_phases(r)
        queued = sum(p["queued"] for p in r["phases"].values())
        assert queued > 0
        # The consumer saw at least what the kernel queued during the phases (plus warm-up).
        assert r["counters"]["packets"] >= queued
        assert r["summary"]["queued_per_request"] > 0
        assert r["spans_received"] == 0
        assert r["propagation"]["traceparent_at_backend"] is None
        assert r["leftovers"] == []


def _agent_arm(results: dict, arm: str) -> list[dict]:
    a = results["arms"][arm]
    if not a["available"]:
        # Unavailable is allowed while the datapath cannot run here, but never silently.
        assert len(a["reason"]) > 10, a
        assert all(not r.get("summary") for r in a["runs"])
        if arm == "kernel":
            # Only a kernel that lacks a feature excuses the kernel arm (doctor's probes say
            # which); our programs failing on a capable kernel is a failure.
            from tests.helpers.skips import kernel_path_missing

            missing = kernel_path_missing()
            if not missing:
                pytest.fail(f"kernel arm unavailable on a kernel with every feature: {a['reason'][:600]}")
        pytest.skip(f"{arm} arm unavailable: {a['reason'][:300]}")
    return [r for r in a["runs"] if r.get("summary")]


def test_kernel_arm_inserted_headers(run):
    results, _, _ = run
    for r in _agent_arm(results, "kernel"):
        _check_phases(r)
        # The header arrived at C: bytes on the wire; and the agent's counter agrees, if it has one.
        assert r["propagation"]["traceparent_at_backend"], r["propagation"]
        if "headers_inserted" in r["counters"]:
            assert r["counters"]["headers_inserted"] > 0, r["counters"]
        assert 0 < r["spans_received"] and r["spans_expected"] >= r["requests_total"]
        assert all(p["queued"] == 0 for p in r["phases"].values())  # no NFQUEUE on this path
        if r.get("bpf_stats_enabled"):
            assert sum(p["bpf_run_cnt"] for p in r["phases"].values()) > 0
        assert r["leftovers"] == [], r["leftovers"]


def test_userspace_arm_translated_sequence_numbers(run):
    results, _, _ = run
    for r in _agent_arm(results, "userspace"):
        _check_phases(r)
        c = r["counters"]
        assert c.get("headers_inserted", 0) > 0, c
        # Every segment after an insertion on a kept-alive B->C connection is rewritten.
        translated = (
            c["seq_translated"] if "seq_translated" in c else c.get("packets_modified", 0) - c["headers_inserted"]
        )
        assert translated > 0, c
        assert r["phases"]["chain"]["load"]["socket_errors"] == 0  # translation kept TCP healthy
        assert r["propagation"]["traceparent_at_backend"], r["propagation"]
        assert sum(p["queued"] for p in r["phases"].values()) > 0
        assert r["spans_received"] > 0
        assert r["leftovers"] == [], r["leftovers"]


def test_micro_benchmarks_reported(run):
    results, _, _ = run
    codec, pipe = results["micro"]["codec"], results["micro"]["span_pipeline"]
    if "unavailable" not in codec:
        assert set(codec["ops"]) == {"parse", "insert", "seq_translate", "ack_sack_translate"}
        assert all(op["us_per_packet"] > 0 for op in codec["ops"].values())
    if "unavailable" not in pipe:
        assert pipe["exported"] > 0 and pipe["received"] == pipe["exported"]
        assert pipe["spans_per_s"] > 0


def test_verifier_table_recorded(run):
    # The same table the verifier-budget test asserts on, in results.json and report.md.
    results, out, _ = run
    v = results["verifier"]
    assert not v.get("unavailable"), v
    assert len(v["programs"]) == 64 and v["budget"] == 250_000
    assert all(0 < r["verified_insns"] <= v["budget"] and not r["error"] for r in v["programs"]), v["programs"]
    md = (out / "report.md").read_text()
    assert "## Verifier budget" in md and "obi_tc_ingress" in md
