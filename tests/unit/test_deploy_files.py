"""Structural checks of the deployment files (no Docker engine or cluster exists here).

The capability list is the mission's DaemonSet list; every deployment file must grant
exactly it (and never CAP_SYS_ADMIN or privileged mode). Configs embedded in the files are
loaded with obi.config, so a key the agent would reject fails here.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from obi import config as config_mod
from obi.config import Config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"
COMPOSE = DEPLOY / "compose" / "docker-compose.yaml"
SYSTEMD = DEPLOY / "systemd" / "obi.service"
DOCKERFILE = ROOT / "Dockerfile"

# The mission's DaemonSet capability list (Kubernetes spelling, without CAP_).
MISSION_CAPS = {"BPF", "PERFMON", "NET_ADMIN", "NET_RAW", "SYS_PTRACE", "DAC_READ_SEARCH", "CHECKPOINT_RESTORE"}


def load_config_text(text: str, tmp_path: Path) -> Config:
    path = tmp_path / "obi-config.yml"
    path.write_text(text)
    return config_mod.load(str(path), env={})


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
    return {d["kind"]: d for d in docs}


def obi_container(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = k8s["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return container


def test_daemonset_host_namespaces_and_selector(k8s: dict[str, dict[str, Any]]) -> None:
    ds = k8s["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["serviceAccountName"] == k8s["ServiceAccount"]["metadata"]["name"]
    namespace = k8s["Namespace"]["metadata"]["name"]
    for kind in ("ServiceAccount", "ConfigMap", "DaemonSet"):
        assert k8s[kind]["metadata"]["namespace"] == namespace


def test_daemonset_capabilities_are_the_mission_list_only(k8s: dict[str, dict[str, Any]]) -> None:
    sc = obi_container(k8s)["securityContext"]
    caps = sc["capabilities"]
    assert set(caps["add"]) == MISSION_CAPS and len(caps["add"]) == len(MISSION_CAPS)
    assert "SYS_ADMIN" not in caps["add"] and "CAP_SYS_ADMIN" not in caps["add"]
    assert caps["drop"] == ["ALL"]  # nothing from the runtime's default set either
    assert sc.get("privileged", False) is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert (
        "securityContext" not in k8s["DaemonSet"]["spec"]["template"]["spec"]
        or "privileged" not in k8s["DaemonSet"]["spec"]["template"]["spec"]["securityContext"]
    )


def test_daemonset_mounts(k8s: dict[str, dict[str, Any]]) -> None:
    pod = k8s["DaemonSet"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in obi_container(k8s)["volumeMounts"]}
    for path in ("/sys/fs/cgroup", "/sys/kernel/security"):
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path, path
    assert volumes[mounts["/run/obi"]["name"]]["hostPath"]["path"] == "/run/obi"
    # Every mount has a volume; the config comes from the ConfigMap.
    for m in mounts.values():
        assert m["name"] in volumes, m
    cfg_volume = volumes[mounts["/config"]["name"]]
    assert cfg_volume["configMap"]["name"] == k8s["ConfigMap"]["metadata"]["name"]


def test_daemonset_config_env_and_probes(k8s: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    container = obi_container(k8s)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")
    cfg_file = env["OTEL_EBPF_CONFIG_PATH"]
    mount_dir, name = os.path.split(cfg_file)
    assert any(m["mountPath"] == mount_dir for m in container["volumeMounts"])
    text = k8s["ConfigMap"]["data"][name]
    # The agent accepts the config as shipped, with the container's environment on top.
    cfg = load_config_text(text, tmp_path)
    cfg_env = config_mod.load(str(tmp_path / "obi-config.yml"), env=env)
    assert cfg_env.traces_endpoint == env["OTEL_EXPORTER_OTLP_ENDPOINT"] + "/v1/traces"
    assert cfg.health_check_port > 0 and cfg.internal_metrics_port > 0
    assert cfg.context_propagation == {"headers", "tcp"} and cfg.open_ports
    # Probes point at the configured health port; readiness is /healthz.
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/healthz" and ready["port"] == cfg.health_check_port
    assert live["path"] == "/livez" and live["port"] == cfg.health_check_port
    assert any(p["containerPort"] == cfg.health_check_port for p in container["ports"])
    # Kubelet probes the pod IP, not loopback (the agent's default listen address).
    assert not ipaddress.ip_address(cfg.health_check_listen_address).is_loopback
    notes = k8s["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert int(notes["prometheus.io/port"]) == cfg.internal_metrics_port
    assert notes["prometheus.io/path"] == cfg.internal_metrics_path
    # The pod gets time to detach and flush.
    assert k8s["DaemonSet"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > cfg.shutdown_timeout_s


def test_health_paths_match_the_server() -> None:
    from obi.health import HEALTH_PATH, LIVE_PATH

    assert (HEALTH_PATH, LIVE_PATH) == ("/healthz", "/livez")


# --- Dockerfile ----------------------------------------------------------------------------


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions (KEYWORD, arguments) grouped by stage; joins continuation lines."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    stages: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            stages.append([])
        assert stages, f"{ins} before the first FROM"
        stages[-1].append(ins)
    return stages


def test_dockerfile_is_multi_stage_and_runtime_has_no_compiler() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    assert build[0][1].startswith("debian:12") and " AS " in build[0][1].upper()
    assert runtime[0][1].startswith("debian:12")
    build_runs = " ".join(a for k, a in build if k == "RUN")
    for pkg in ("clang", "llvm", "libbpf-dev", "make", "gcc", "python3-dev"):  # gcc: fallback/_nfq.c
        assert re.search(rf"(^|\s){re.escape(pkg)}(\s|$)", build_runs), pkg
    assert "make -C bpf" in build_runs and "wheel" in build_runs
    runtime_runs = " ".join(a for k, a in runtime if k == "RUN")
    words = set(runtime_runs.replace("\\", " ").split())
    for pkg in ("libbpf1", "iptables", "iproute2"):
        assert pkg in words, pkg
    for compiler in (
        "clang",
        "llvm",
        "gcc",
        "g++",
        "cc",
        "make",
        "build-essential",
        "libbpf-dev",
        "python3-dev",
        "libnetfilter-queue-dev",
    ):
        assert compiler not in words, f"runtime stage installs {compiler}"
    # Only the wheels come over from the build stage; nothing is compiled in the runtime.
    assert "from=build" in runtime_runs and "--no-index" in runtime_runs
    assert all(k != "COPY" or "--from=build" in a for k, a in runtime)
    entry = [a for k, a in runtime if k == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == ["obi", "run"]
    # Non-interactive apt everywhere.
    for stage in stages:
        assert any(k == "ENV" and "DEBIAN_FRONTEND=noninteractive" in a for k, a in stage)


def test_dockerignore_keeps_host_builds_out() -> None:
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()}
    assert {".git", ".venv", "obi/_bpf"} <= lines
    # The build needs these, so they must not be ignored.
    for needed in ("bpf", "obi", "fallback", "pyproject.toml", "setup.py", "README.md"):
        assert needed not in lines
    assert "**/*.so" in lines  # a host-built extension would not match the image's Python


def test_wheel_ships_the_bpf_objects() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"obi"\s*=\s*\[\s*"_bpf/\*\.bpf\.o"\s*\]', text)


def test_wheel_builds_the_nfqueue_reader() -> None:
    text = (ROOT / "setup.py").read_text()
    assert re.search(r'Extension\("obi\.fallback\._nfq",\s*\["fallback/_nfq\.c"\]', text)
    assert (ROOT / "fallback" / "_nfq.c").is_file()


# --- docker compose -------------------------------------------------------------------------


def test_compose_agent_and_collector(tmp_path: Path) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    obi, col = services["obi"], services["otelcol"]
    assert col["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert obi["network_mode"] == "host" and obi["pid"] == "host"
    assert set(obi["cap_add"]) == MISSION_CAPS and obi["cap_drop"] == ["ALL"]
    assert not obi.get("privileged", False) and obi["read_only"] is True
    assert (COMPOSE.parent / obi["build"]["context"] / obi["build"]["dockerfile"]).resolve() == DOCKERFILE
    mounts = {}
    for v in obi["volumes"]:
        src, dst = v.split(":")[:2]
        mounts[dst] = src
    assert mounts["/sys/fs/cgroup"] == "/sys/fs/cgroup"
    assert mounts["/sys/kernel/security"] == "/sys/kernel/security"
    env = obi["environment"]
    cfg_src = COMPOSE.parent / mounts[env["OTEL_EBPF_CONFIG_PATH"]]
    cfg = load_config_text(cfg_src.read_text(), tmp_path)
    # The agent's endpoint reaches the collector's published OTLP/HTTP port.
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4318"
    assert "127.0.0.1:4318:4318" in col["ports"]
    health = obi["healthcheck"]["test"]
    assert f"127.0.0.1:{cfg.health_check_port}/healthz" in " ".join(health)

    # The collector's own config: OTLP in, traces pipeline out; scrapes the agent's metrics.
    col_cfg_src = next(v.split(":")[0] for v in col["volumes"] if "config.yaml" in v)
    col_cfg = yaml.safe_load((COMPOSE.parent / col_cfg_src).read_text())
    assert {"grpc", "http"} <= set(col_cfg["receivers"]["otlp"]["protocols"])
    assert col_cfg["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    pipelines = col_cfg["service"]["pipelines"]
    assert "otlp" in pipelines["traces"]["receivers"]
    for p in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for name in p.get(kind, []):
                assert name in col_cfg[kind], f"{kind} {name} used but not defined"
    (scrape,) = col_cfg["receivers"]["prometheus"]["config"]["scrape_configs"]
    assert scrape["metrics_path"] == cfg.internal_metrics_path
    assert scrape["static_configs"][0]["targets"][0].endswith(f":{cfg.internal_metrics_port}")


# --- systemd -------------------------------------------------------------------------------


def systemd_unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string(SYSTEMD.read_text())
    return parser


def test_systemd_unit_keys() -> None:
    unit = systemd_unit()
    svc = unit["Service"]
    assert shlex.split(svc["ExecStart"])[1:] == ["run"]
    assert shlex.split(svc["ExecStart"])[0].endswith("/obi")
    assert shlex.split(svc["ExecStopPost"])[1:] == ["cleanup"]
    assert svc["Restart"] == "on-failure"
    ambient = set(svc["AmbientCapabilities"].split())
    bounding = set(svc["CapabilityBoundingSet"].split())
    assert ambient == bounding == {f"CAP_{c}" for c in MISSION_CAPS}
    assert "CAP_SYS_ADMIN" not in bounding
    assert svc["NoNewPrivileges"] == "yes"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]
    assert svc["Environment"].startswith("OTEL_EBPF_CONFIG_PATH=")


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    # verify wants the executables to exist: point them at /bin/true in a copy.
    text = SYSTEMD.read_text().replace("/opt/obi/bin/obi", "/bin/true")
    unit = tmp_path / "obi.service"
    unit.write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "Unknown" not in res.stderr, res.stderr
