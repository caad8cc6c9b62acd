"""CLI commands that need no root, and the agent's lifecycle with stand-in parts."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from obi import agent as agent_mod
from obi import cli, config
from obi.errors import MissingFeature
from obi.model import Datapath


def run_cli(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OBI_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "obi", *args], capture_output=True, text=True, env=full_env, timeout=60
    )


def test_version():
    r = run_cli("version")
    assert r.returncode == 0 and r.stdout.startswith("obi-py ")


def test_config_validate_ok_and_bad(tmp_path):
    good = tmp_path / "good.yml"
    good.write_text("ebpf:\n  context_propagation: all\nopen_port: 8080\n")
    r = run_cli("config", "validate", str(good))
    assert r.returncode == 0 and "ok" in r.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text("ebpf:\n  traffic_control_backend: netkit\n")
    r = run_cli("config", "validate", str(bad))
    assert r.returncode == 2
    assert "ebpf.traffic_control_backend" in r.stderr and "'netkit'" in r.stderr and "auto, tc, tcx" in r.stderr


def test_config_validate_ignores_environment(tmp_path):
    good = tmp_path / "good.yml"
    good.write_text("trace_printer: json\n")
    r = run_cli("config", "validate", str(good), env={"OTEL_EBPF_DATAPATH": "nonsense"})
    assert r.returncode == 0


def test_config_show_json_reports_sources(tmp_path):
    f = tmp_path / "c.yml"
    f.write_text("trace_printer: text\nopen_port: 80,8000-8001\n")
    r = run_cli("--config", str(f), "config", "show", "--json", env={"OTEL_EBPF_TRACE_PRINTER": "json"})
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["config"]["trace_printer"] == "json"
    assert shown["sources"]["trace_printer"] == "env OTEL_EBPF_TRACE_PRINTER"
    assert shown["config"]["open_port"] == "80,8000-8001"
    assert shown["sources"]["open_port"] == f"file {f}"
    assert shown["sources"]["ebpf.datapath"] == "default"


def test_bad_env_is_a_clean_error():
    r = run_cli("config", "show", env={"OTEL_EBPF_BPF_CONTEXT_PROPAGATION": "bogus"})
    assert r.returncode == 2
    assert "OTEL_EBPF_BPF_CONTEXT_PROPAGATION" in r.stderr and "Traceback" not in r.stderr


def test_parser_has_every_documented_command():
    parser = cli.build_parser()
    for argv in (["run"], ["doctor", "--json"], ["config", "show"], ["cleanup"], ["version"], ["demo"]):
        assert parser.parse_args(argv).func is not None


# --- the agent with stand-ins: lifecycle logic only (the real parts are integration-tested) ---


class FakeExporter:
    def __init__(self, cfg):
        self.records, self.shut = [], None

    def export(self, rec):
        self.records.append(rec)

    def stats(self):
        return {"exported": len(self.records)}

    def shutdown(self, timeout_s=None):
        self.shut = timeout_s


class FakeDatapath:
    instances: list = []

    def __init__(self, kind, fail=None):
        self.kind, self.fail, self.started, self.stopped = kind, fail, False, False
        self.name = kind.value
        FakeDatapath.instances.append(self)

    def start(self):
        if self.fail:
            raise self.fail
        self.started = True

    def stop(self):
        self.stopped = True

    def stats(self):
        return {"headers_inserted": 0}


@pytest.fixture
def fakes(monkeypatch):
    FakeDatapath.instances = []
    failures = {}

    def make(kind, cfg, sink):
        return FakeDatapath(kind, failures.get(kind))

    monkeypatch.setattr(agent_mod, "make_datapath", make)
    return failures


def choose(kind, reason="test"):
    from obi.doctor import DatapathChoice

    return lambda cfg: DatapathChoice(kind, reason)


def test_auto_falls_back_to_userspace_when_kernel_start_lacks_a_feature(fakes, monkeypatch):
    monkeypatch.setattr(agent_mod.doctor, "choose_datapath", choose(Datapath.KERNEL))
    fakes[Datapath.KERNEL] = MissingFeature("bpf_loop", "5.17")
    a = agent_mod.Agent(config.load(env={}), exporter_factory=FakeExporter)
    a.start()
    kinds = [(d.kind, d.started) for d in FakeDatapath.instances]
    assert kinds == [(Datapath.KERNEL, False), (Datapath.USERSPACE, True)]
    assert a.stop() is True
    assert FakeDatapath.instances[-1].stopped and a.exporter.shut == 10.0


def test_auto_falls_back_when_the_verifier_rejects_a_program_and_says_so(fakes, monkeypatch, caplog):
    from obi.errors import ProgramRejected

    monkeypatch.setattr(agent_mod.doctor, "choose_datapath", choose(Datapath.KERNEL))
    fakes[Datapath.KERNEL] = ProgramRejected(
        "ingress.bpf.o", "obi_tc_ingress", 1_000_001, ["BPF program is too large. Processed 1000001 insn"], 7
    )
    a = agent_mod.Agent(config.load(env={}), exporter_factory=FakeExporter)
    with caplog.at_level("WARNING"):
        a.start()
    assert [d.kind for d in FakeDatapath.instances if d.started] == [Datapath.USERSPACE]
    # The reason names the program and the verifier's count, never a kernel version.
    assert "obi_tc_ingress" in a.reason and "1,000,001" in a.reason and "5.17" not in a.reason
    assert any("falling back" in r.message and r.levelname == "WARNING" for r in caplog.records)
    a.stop()


def test_forced_kernel_does_not_fall_back(fakes, monkeypatch):
    monkeypatch.setattr(agent_mod.doctor, "choose_datapath", choose(Datapath.KERNEL))
    fakes[Datapath.KERNEL] = MissingFeature("bpf_loop", "5.17")
    a = agent_mod.Agent(config.load(env={"OTEL_EBPF_DATAPATH": "kernel"}), exporter_factory=FakeExporter)
    with pytest.raises(MissingFeature):
        a.start()


def test_no_datapath_is_an_error_with_the_reason(fakes, monkeypatch):
    from obi.errors import ObiError

    monkeypatch.setattr(agent_mod.doctor, "choose_datapath", choose(None, "no bpf_loop and no NFQUEUE"))
    a = agent_mod.Agent(config.load(env={}), exporter_factory=FakeExporter)
    with pytest.raises(ObiError, match="no bpf_loop and no NFQUEUE"):
        a.start()


def test_run_stops_on_sigterm_and_detaches(fakes, monkeypatch):
    monkeypatch.setattr(agent_mod.doctor, "choose_datapath", choose(Datapath.USERSPACE))
    a = agent_mod.Agent(config.load(env={"OTEL_EBPF_SHUTDOWN_TIMEOUT": "2s"}), exporter_factory=FakeExporter)
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    t0 = time.monotonic()
    assert a.run() == 0
    assert time.monotonic() - t0 < 3
    assert FakeDatapath.instances[0].stopped and a.exporter.shut == 2.0


def test_stop_is_bounded_by_shutdown_timeout(fakes, monkeypatch):
    class StuckExporter(FakeExporter):
        def shutdown(self, timeout_s=None):
            time.sleep(30)

    monkeypatch.setattr(agent_mod.doctor, "choose_datapath", choose(Datapath.USERSPACE))
    a = agent_mod.Agent(config.load(env={"OTEL_EBPF_SHUTDOWN_TIMEOUT": "500ms"}), exporter_factory=StuckExporter)
    a.start()
    t0 = time.monotonic()
    assert a.stop() is False
    assert time.monotonic() - t0 < 2.5
