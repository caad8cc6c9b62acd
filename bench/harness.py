"""The benchmark run: topology, servers, arms interleaved over repetitions, load phases,
measurements, then the report (bench.report) and micro-benchmarks (bench.codec_micro).

Topology (obi.demo.topology, addresses 198.18.0.0/24, MTU 1500, each host its own cgroup):

    client ──▶ server :8080  bench.httpserver (asyncio, fixed 13-byte answer)
                      :8081  obi.demo.app "B", calls backend for each request
                      127.0.0.1:4318  bench.otlp_receiver (counts the agent's spans)
    client ──▶ server :8081 ──▶ backend :8082  obi.demo.app "C" (answers /headers)

Per arm and repetition: start the arm in the server namespace, warm up, then the phases
  closed  wrk -c32 (closed loop)          -> requests/s, p50/p99
  c1      wrk -c1                         -> p50/p99 at one connection
  fixed   bench.loadgen at --rate req/s   -> p50/p99 in an open loop
  chain   wrk -c4 on B (B calls C)        -> requests/s through an outgoing call, and the
                                             headers the agent inserts there
each bracketed by snapshots of the measured process (CPU time from /proc/<pid>/stat),
the server namespace's NFQUEUE counters (/proc/net/netfilter/nfnetlink_queue) and the BPF
run-time counters (kernel.bpf_stats_enabled + bpftool), then stop the arm and collect its
counters. One request through B is checked for a `traceparent` arriving at C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from obi.demo.topology import Host, Topology, have_netns_tools

from .arms import ARM_NAMES, ARM_TITLES, ArmContext, ArmUnavailable, make_arm
from .child_process import REPO_ROOT, Proc, child_env

PORT_SERVE = 8080  # bench.httpserver on the server
PORT_CHAIN = 8081  # demoapp B on the server, calls C
PORT_BACKEND = 8082  # demoapp C on the backend
OTLP_PORT = 4318
NETNS_PREFIX = "obib"
SERVE_PHASES = ("closed", "c1", "fixed")  # the per-request figures are over these
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Settings:
    reps: int = 3
    duration_s: float = 5.0  # per load phase
    chain_duration_s: float = 3.0
    rate: float = 500.0  # fixed-rate phase, requests/s
    warmup_s: float = 1.0
    arms: tuple[str, ...] = ARM_NAMES
    connections: int = 32
    wrk_threads: int = 2
    micro: bool = True
    micro_scale: float = 1.0  # 1.0 = full micro-benchmarks; smaller for --quick
    out_dir: str = ""
    quick: bool = False
    charts: bool = True

    @classmethod
    def quick_settings(cls, **over: Any) -> "Settings":
        base = dict(
            reps=1, duration_s=1.0, chain_duration_s=1.0, rate=200.0, warmup_s=0.3, micro_scale=0.05, quick=True
        )
        base.update(over)
        return cls(**base)


# --- progress -------------------------------------------------------------------------


class Progress:
    """One status line, redrawn in place on a terminal, plain lines otherwise."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total = max(1, total)
        self.done = 0
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = time.monotonic()
        self._last_len = 0

    def step(self, text: str) -> None:
        self.show(text)
        self.done += 1

    def show(self, text: str) -> None:
        el = time.monotonic() - self.t0
        pct = 100 * self.done / self.total
        line = f"[{pct:3.0f}% {int(el) // 60}:{int(el) % 60:02d}] {text}"
        if self.tty:
            pad = max(0, self._last_len - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._last_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line that stays (results of an arm)."""
        if self.tty:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self._last_len = 0
        self.stream.write(text + "\n")
        self.stream.flush()


# --- load generators ---------------------------------------------------------------------

_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNIT_US[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """The numbers of a `wrk --latency` report."""
    res: dict[str, Any] = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+),", out)
    if not m:
        raise ValueError("wrk printed no request count:\n" + out[-500:])
    res["requests"] = int(m.group(1))
    res["duration_s"] = _us(m.group(2) + m.group(3)) / 1e6
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            res[f"p{pct}_us"] = round(_us(m.group(1)), 1)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


def run_wrk(client: Host, url: str, connections: int, threads: int, duration_s: float) -> dict[str, Any]:
    threads = max(1, min(threads, connections))
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--latency",
        "--timeout",
        "5s",
        url,
    ]
    r = client.run(argv, timeout=duration_s + 60)
    out = parse_wrk(r.stdout)
    out["connections"] = connections
    return out


def run_fixed_rate(client: Host, url: str, rate: float, duration_s: float) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.loadgen", "--url", url, "--rate", str(rate), "--duration", str(duration_s)]
    r = client.run(argv, timeout=duration_s + 60, env=child_env(), cwd=str(REPO_ROOT))
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["requests"] = out["completed"]
    return out


# --- measurements --------------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads), seconds; None if gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(rest[11]) + int(rest[12])) / _CLK_TCK


def peak_rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None


def nfqueue_counters(netns: str) -> dict[str, int]:
    """Sum over the NFQUEUE queues bound in a namespace: packets ever queued
    (id_sequence), dropped by the kernel (queue full) and by the user side."""
    r = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", "/proc/net/netfilter/nfnetlink_queue"], capture_output=True, text=True
    )
    out = {"queues": 0, "queued": 0, "queue_dropped": 0, "user_dropped": 0}
    for line in r.stdout.splitlines():
        f = line.split()
        if len(f) >= 8:
            out["queues"] += 1
            out["queue_dropped"] += int(f[5])
            out["user_dropped"] += int(f[6])
            out["queued"] += int(f[7])
    return out


def owned_prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs a process holds, directly or through links: its fds'
    /proc/<pid>/fdinfo show `prog_id:`. (Debian's bpftool has no `pids` column.)"""
    ids: set[int] = set()
    base = f"/proc/{pid}/fdinfo"
    try:
        fds = os.listdir(base)
    except OSError:
        return ids
    for fd in fds:
        try:
            with open(os.path.join(base, fd), encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except (OSError, ValueError):
            continue
    return ids


def bpf_programs(pid: int | None) -> dict[int, dict[str, Any]]:
    """Run-time counters of the BPF programs the measured process holds (other agents'
    programs, e.g. of tests running at the same time, are not counted).
    {prog id: {name, type, run_cnt, run_time_ns}}."""
    if pid is None or not shutil.which("bpftool"):
        return {}
    mine = owned_prog_ids(pid)
    if not mine:
        return {}
    r = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True)
    try:
        progs = json.loads(r.stdout or "[]")
    except ValueError:
        return {}
    return {
        p["id"]: {
            "name": p.get("name", ""),
            "type": p.get("type", ""),
            "run_cnt": p.get("run_cnt", 0),
            "run_time_ns": p.get("run_time_ns", 0),
        }
        for p in progs
        if p.get("id") in mine
    }


@contextlib.contextmanager
def bpf_stats_enabled() -> Iterator[bool]:
    """BPF run-time statistics on for the duration.

    Preferred: libbpf's bpf_enable_stats(BPF_STATS_RUN_TIME) (the BPF_ENABLE_STATS command,
    Linux >= 5.8): the kernel keeps stats on while the returned fd is open and counts
    holders, so concurrent runs cannot leave the setting behind. Otherwise the
    kernel.bpf_stats_enabled sysctl is set to 1 and its previous value written back.
    """
    fd = _enable_stats_fd()
    if fd >= 0:
        try:
            yield True
        finally:
            os.close(fd)
        return
    path = "/proc/sys/kernel/bpf_stats_enabled"
    try:
        with open(path, encoding="ascii") as f:
            old = f.read().strip()
        with open(path, "w", encoding="ascii") as f:
            f.write("1")
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        with open(path, "w", encoding="ascii") as f:
            f.write(old)


def _enable_stats_fd() -> int:
    import ctypes

    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        fd = lib.bpf_enable_stats(ctypes.c_int(0))  # BPF_STATS_RUN_TIME
    except (OSError, AttributeError):
        return -1
    return fd if fd >= 0 else -1


@dataclass
class Snapshot:
    t: float
    cpu_s: float | None
    nfq: dict[str, int]
    bpf: dict[int, dict[str, Any]]

    @classmethod
    def take(cls, pid: int | None, netns: str) -> "Snapshot":
        return cls(time.monotonic(), cpu_seconds(pid), nfqueue_counters(netns), bpf_programs(pid))


def delta(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    progs = []
    for pid_, pb in b.bpf.items():
        pa = a.bpf.get(pid_, {"run_cnt": 0, "run_time_ns": 0})
        cnt, ns = pb["run_cnt"] - pa["run_cnt"], pb["run_time_ns"] - pa["run_time_ns"]
        progs.append(
            {
                "id": pid_,
                "name": pb["name"],
                "type": pb["type"],
                "run_cnt": cnt,
                "run_time_ns": ns,
                "ns_per_run": round(ns / cnt, 1) if cnt else None,
            }
        )
    return {
        "wall_s": round(b.t - a.t, 3),
        "cpu_s": round(b.cpu_s - a.cpu_s, 4) if a.cpu_s is not None and b.cpu_s is not None else None,
        "queued": b.nfq["queued"] - a.nfq["queued"] if b.nfq["queues"] else 0,
        "queue_dropped": b.nfq["queue_dropped"] - a.nfq["queue_dropped"] if b.nfq["queues"] else 0,
        "bpf_programs": progs,
        "bpf_run_cnt": sum(p["run_cnt"] for p in progs),
        "bpf_run_time_ns": sum(p["run_time_ns"] for p in progs),
    }


# --- the bench --------------------------------------------------------------------------------


class Bench:
    """The topology and the long-running servers, shared by every arm of a run."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self.client, self.server, self.backend = topo["client"], topo["server"], topo["backend"]
        self.spans_seen = 0
        self.sink: Proc | None = None

    def _on_sink_line(self, _stream: str, line: str) -> None:
        if line.startswith("spans "):
            self.spans_seen = int(line.split()[1])

    def start_servers(self) -> None:
        py = sys.executable
        backend_url = f"http://{self.backend.addr}:{PORT_BACKEND}"
        procs = [
            (self.server, [py, "-m", "bench.httpserver", "--port", str(PORT_SERVE)], PORT_SERVE),
            (
                self.server,
                [py, "-m", "obi.demo.app", "serve", "--port", str(PORT_CHAIN), "--downstream", backend_url],
                PORT_CHAIN,
            ),
            (self.backend, [py, "-m", "obi.demo.app", "serve", "--port", str(PORT_BACKEND)], PORT_BACKEND),
        ]
        for host, argv, port in procs:
            Proc(argv, popen=host.popen)  # killed with the topology
            wait_listening(host, port)
        # The span sink: in the server namespace (where the agent runs), outside its cgroup.
        self.sink = Proc(
            ["ip", "netns", "exec", self.server.netns, py, "-m", "bench.otlp_receiver", "--port", str(OTLP_PORT)],
            on_line=self._on_sink_line,
        )
        wait_listening(self.server, OTLP_PORT)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.stop(timeout=3)

    def url(self, port: int = PORT_SERVE, path: str = "/") -> str:
        host = self.backend.addr if port == PORT_BACKEND else self.server.addr
        return f"http://{host}:{port}{path}"

    def context(self) -> ArmContext:
        return ArmContext(
            server=self.server,
            ports=(PORT_SERVE, PORT_CHAIN, PORT_BACKEND),
            otlp_endpoint=f"http://127.0.0.1:{OTLP_PORT}",
        )

    def propagation_check(self) -> dict[str, Any]:
        """One request client -> B -> C: did C receive a traceparent, and which?"""
        r = self.client.run(["curl", "-sS", "--max-time", "5", self.url(PORT_CHAIN, "/check")], check=False, timeout=15)
        try:
            body = json.loads(r.stdout)
            headers = {k.lower(): v for k, v in body["downstream"]["body"]["headers"]}
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "traceparent_at_backend": None, "error": (r.stderr or r.stdout)[-200:]}
        return {"ok": True, "traceparent_at_backend": headers.get("traceparent")}

    def wait_spans_settled(self, timeout: float = 3.0) -> int:
        """The sink's count once it stopped moving (exports are batched)."""
        last, deadline = -1, time.monotonic() + timeout
        while time.monotonic() < deadline and self.spans_seen != last:
            last = self.spans_seen
            time.sleep(0.3)
        return self.spans_seen


def wait_listening(host: Host, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(
            ["ip", "netns", "exec", host.netns, "ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True
        )
        if r.stdout.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host.name}:{port} after {timeout:.0f}s")


def run_arm(bench: Bench, name: str, rep: int, s: Settings, progress: Progress) -> dict[str, Any]:
    """One repetition of one arm. Never raises for an arm failure: it is recorded."""
    title = f"rep {rep + 1}/{s.reps} {ARM_TITLES[name]}"
    result: dict[str, Any] = {"arm": name, "rep": rep, "available": False, "reason": "", "phases": {}}
    arm = make_arm(name)
    spans_before = bench.spans_seen
    progress.show(f"{title}: starting")
    t_start = time.monotonic()
    try:
        arm.start(bench.context())
    except ArmUnavailable as e:
        result["reason"] = str(e)
        return result
    result["start_s"] = round(time.monotonic() - t_start, 2)
    phases: dict[str, Any] = result["phases"]
    warm = 0
    try:
        with bpf_stats_enabled() as stats_on:
            result["bpf_stats_enabled"] = stats_on
            progress.show(f"{title}: warm-up")
            warm = run_wrk(bench.client, bench.url(), 4, 1, s.warmup_s)["requests"]
            plan = [
                ("closed", lambda: run_wrk(bench.client, bench.url(), s.connections, s.wrk_threads, s.duration_s)),
                ("c1", lambda: run_wrk(bench.client, bench.url(), 1, 1, s.duration_s)),
                ("fixed", lambda: run_fixed_rate(bench.client, bench.url(), s.rate, s.duration_s)),
                ("chain", lambda: run_wrk(bench.client, bench.url(PORT_CHAIN, "/chain"), 4, 1, s.chain_duration_s)),
            ]
            for phase, fn in plan:
                progress.step(f"{title}: {phase}")
                if arm.process is not None and not arm.process.alive():
                    raise RuntimeError(f"{arm.name} process exited during the run")
                a = Snapshot.take(arm.pid, bench.server.netns)
                load = fn()
                b = Snapshot.take(arm.pid, bench.server.netns)
                phases[phase] = {"load": load, **delta(a, b)}
            result["peak_rss_kib"] = peak_rss_kib(arm.pid)
        result["propagation"] = bench.propagation_check()
        result["available"] = True
    except (subprocess.SubprocessError, RuntimeError, ValueError, OSError) as e:
        result["reason"] = f"run failed: {e}"
    finally:
        result["counters"] = arm.stop()
    if arm.name in ("kernel", "userspace") and result["counters"].get("crashed"):
        result["available"] = False
        result["reason"] = "agent crashed during the run: " + " | ".join(result["counters"].get("log_tail", []))
    requests = sum(p["load"]["requests"] for p in phases.values())
    checked = 1 if "propagation" in result else 0
    result["requests_total"] = requests + warm + checked
    # Spans a complete agent exports: one server span per request to the server, and a
    # server plus a client span on B per request of the chain phase (and the check).
    chain = phases.get("chain", {}).get("load", {}).get("requests", 0)
    result["spans_expected"] = requests + chain + warm + 2 * checked
    result["spans_received"] = bench.wait_spans_settled() - spans_before
    result["leftovers"] = leftovers(bench.server)
    summarize_run(result)
    return result


def leftovers(server: Host) -> list[str]:
    """Rules/filters left in the server namespace after an arm stopped (should be none).
    They are removed here (the namespace is ours) so the next arm starts clean."""
    found = []
    r = server.run(["iptables-save"], check=False, timeout=10) if shutil.which("iptables-save") else None
    if r is not None:
        rules = [ln for ln in r.stdout.splitlines() if ln.startswith("-A ")]
        if rules:
            found += [f"iptables: {ln}" for ln in rules]
            for table in ("filter", "mangle", "raw", "nat"):
                server.run(["iptables", "-w", "-t", table, "-F"], check=False, timeout=10)
    for kind in ("ingress", "egress"):
        r = server.run(["tc", "filter", "show", "dev", server.ifname, kind], check=False, timeout=10)
        if r.stdout.strip():
            found.append(f"tc {kind}: {r.stdout.strip().splitlines()[0]}")
            server.run(["tc", "filter", "del", "dev", server.ifname, kind], check=False, timeout=10)
    if shutil.which("bpftool") and server.cgroup:
        r = subprocess.run(["bpftool", "cgroup", "show", server.cgroup], capture_output=True, text=True)
        rows = [ln for ln in r.stdout.splitlines()[1:] if ln.strip()]
        found += [f"cgroup attachment: {ln.strip()}" for ln in rows]
    return found


def summarize_run(r: dict[str, Any]) -> None:
    """Per-request figures of one repetition, over the serve phases (closed, c1, fixed)."""
    phases = r["phases"]
    if not r["available"] or not all(p in phases for p in SERVE_PHASES):
        return
    serve = [phases[p] for p in SERVE_PHASES]
    reqs = sum(p["load"]["requests"] for p in serve)
    cpu = [p["cpu_s"] for p in serve]
    queued = sum(p["queued"] for p in serve)
    bpf_cnt = sum(p["bpf_run_cnt"] for p in serve)
    bpf_ns = sum(p["bpf_run_time_ns"] for p in serve)
    all_wall = sum(p["wall_s"] for p in phases.values())
    c = r["counters"]
    r["summary"] = {
        "rps_c32": phases["closed"]["load"]["rps"],
        "p50_us_c32": phases["closed"]["load"].get("p50_us"),
        "p99_us_c32": phases["closed"]["load"].get("p99_us"),
        "p50_us_c1": phases["c1"]["load"].get("p50_us"),
        "p99_us_c1": phases["c1"]["load"].get("p99_us"),
        "p50_us_fixed": phases["fixed"]["load"]["p50_us"],
        "p99_us_fixed": phases["fixed"]["load"]["p99_us"],
        "rps_chain": phases["chain"]["load"]["rps"] if "chain" in phases else None,
        "cpu_us_per_request": round(sum(cpu) / reqs * 1e6, 2) if reqs and None not in cpu else None,
        "cpu_utilisation_c32": round(phases["closed"]["cpu_s"] / phases["closed"]["wall_s"], 3)
        if phases["closed"]["cpu_s"] is not None
        else None,
        "peak_rss_mib": round(r["peak_rss_kib"] / 1024, 1) if r.get("peak_rss_kib") else None,
        "spans_per_second": round(r["spans_received"] / all_wall, 1)
        if all_wall and r["arm"] in ("kernel", "userspace")
        else None,
        "spans_per_request": round(r["spans_received"] / r["requests_total"], 3) if r["requests_total"] else None,
        "span_completeness": round(r["spans_received"] / r["spans_expected"], 3)
        if r["spans_expected"] and r["arm"] in ("kernel", "userspace")
        else None,
        "bpf_ns_per_run": round(bpf_ns / bpf_cnt, 1) if bpf_cnt else None,
        "bpf_runs_per_request": round(bpf_cnt / reqs, 2) if reqs and bpf_cnt else None,
        "bpf_ns_per_request": round(bpf_ns / reqs, 1) if reqs and bpf_cnt else None,
        "queued_per_request": round(queued / reqs, 3) if reqs else None,
        "queue_dropped": sum(p["queue_dropped"] for p in phases.values()),
        "headers_inserted": c.get("headers_inserted"),
        "seq_translated": c.get("seq_translated"),
        "packets_modified": c.get("packets_modified"),
        "traceparent_at_backend": bool((r.get("propagation") or {}).get("traceparent_at_backend")),
    }


# --- machine / versions ---------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_mib": mem_kib // 1024,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "hostname_hash": hex(hash(platform.node()) & 0xFFFF),
    }


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    import obi

    out: dict[str, Any] = {"python": platform.python_version(), "obi": obi.__version__}
    for dist in (
        "opentelemetry-sdk",
        "opentelemetry-exporter-otlp-proto-http",
        "netfilterqueue",
        "scapy",
        "matplotlib",
    ):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    for tool, argv in (
        ("wrk", ["wrk", "-v"]),
        ("bpftool", ["bpftool", "version"]),
        ("iptables", ["iptables", "--version"]),
    ):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            out[tool] = ((r.stdout or r.stderr).strip().splitlines() or [""])[0]
        except (OSError, subprocess.TimeoutExpired):
            out[tool] = None
    r = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out["git_commit"] = r.stdout.strip() or None
    return out


def verifier_table() -> dict[str, Any]:
    """Verified instructions of every kernel-path program in every mode (obi.kernel.loader,
    the same table the verifier-budget test asserts on), or why it could not be measured."""
    try:
        from obi.kernel import loader

        rows = loader.budget_table()
    except Exception as e:  # libbpf missing, objects not built
        return {"unavailable": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    return {
        "budget": loader.BUDGET,
        "limit": loader.VERIFIER_LIMIT,
        "kernel_build": platform.version(),
        "programs": [r.as_dict() for r in rows],
    }


# --- the run ------------------------------------------------------------------------------------


def preflight() -> str:
    """ "" when the benchmark can run here, else why not."""
    reason = have_netns_tools()
    if reason:
        return reason
    for tool in ("wrk", "curl", "ss"):
        if not shutil.which(tool):
            return f"needs the '{tool}' command (Debian package: {dict(ss='iproute2').get(tool, tool)})"
    return ""


def interleaved_order(arms: tuple[str, ...], rep: int) -> list[str]:
    """Arms rotated by one per repetition, baseline kept first: each arm runs at every
    position over the run, and every repetition has its own baseline for the ratios."""
    rest = [a for a in arms if a != "baseline"]
    if rest:
        k = rep % len(rest)
        rest = rest[k:] + rest[:k]
    return (["baseline"] if "baseline" in arms else []) + rest


def run(s: Settings) -> dict[str, Any]:
    from . import report

    why = preflight()
    if why:
        raise SystemExit(f"bench: cannot run: {why}")
    out_dir = Path(s.out_dir or REPO_ROOT / "bench" / "results" / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "schema": 1,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python3 -m bench", *sys.argv[1:]]),
        "settings": asdict(s) | {"arms": list(s.arms)},
        "machine": machine_info() | {"loadavg_start": os.getloadavg()},
        "versions": versions(),
        "topology": {},
        "order": [],
        "arms": {a: {"title": ARM_TITLES[a], "runs": []} for a in s.arms},
        "micro": {},
    }
    progress = Progress(total=s.reps * len(s.arms) * 4 + (2 if s.micro else 0))
    progress.show("verifier: loading every BPF program in every mode")
    results["verifier"] = verifier_table()
    gave_up: dict[str, str] = {}
    with Topology(["client", "server", "backend"], prefix=NETNS_PREFIX, mtu=1500) as topo:
        bench = Bench(topo)
        try:
            progress.show("starting servers")
            bench.start_servers()
            results["topology"] = {
                "client": bench.client.addr,
                "server": bench.server.addr,
                "backend": bench.backend.addr,
                "mtu": topo.mtu,
                "serve": f"bench.httpserver (asyncio) on {bench.server.addr}:{PORT_SERVE}",
                "chain": f"obi.demo.app B on :{PORT_CHAIN} -> obi.demo.app C on {bench.backend.addr}:{PORT_BACKEND}",
                "otlp_sink": f"bench.otlp_receiver on 127.0.0.1:{OTLP_PORT} in the server namespace",
                "fixed_rate_generator": "bench.loadgen (open loop, Python asyncio)",
            }
            for rep in range(s.reps):
                order = interleaved_order(s.arms, rep)
                results["order"].append(order)
                for name in order:
                    if name in gave_up:
                        results["arms"][name]["runs"].append(
                            {"arm": name, "rep": rep, "available": False, "reason": gave_up[name], "phases": {}}
                        )
                        progress.done += 4
                        continue
                    r = run_arm(bench, name, rep, s, progress)
                    results["arms"][name]["runs"].append(r)
                    if not r["available"] and not r["phases"]:
                        gave_up[name] = r["reason"]  # could not even start: do not retry each rep
                        progress.done += 4 - len(r["phases"])
                    progress.note(report.arm_line(r))
        finally:
            bench.close()
    if s.micro:
        from . import codec_micro

        progress.step("micro-benchmark: packet codec")
        results["micro"]["codec"] = codec_micro.bench_codec(scale=s.micro_scale)
        progress.step("micro-benchmark: span pipeline")
        results["micro"]["span_pipeline"] = codec_micro.bench_span_pipeline(scale=s.micro_scale)
    results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    results["machine"]["loadavg_end"] = os.getloadavg()  # other work on the machine makes numbers noisy
    report.finish(results, out_dir, charts=s.charts)
    progress.note("")
    print(report.terminal_summary(results, out_dir))
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m bench",
        description="Benchmark obi-py: uninstrumented vs kernel path vs userspace path vs a no-op NFQUEUE "
        "consumer, in network namespaces. Needs root. Run from the repository root.",
    )
    d = Settings()
    p.add_argument(
        "--quick", action="store_true", help="about 1 s per load phase, 1 repetition, short micro-benchmarks"
    )
    p.add_argument("--reps", type=int, help=f"repetitions of every arm (default {d.reps}; --quick: 1)")
    p.add_argument("--duration", type=float, help=f"seconds per load phase (default {d.duration_s}; --quick: 1)")
    p.add_argument("--rate", type=float, help=f"requests/s of the fixed-rate phase (default {d.rate:g}; --quick: 200)")
    p.add_argument("--arms", default=",".join(ARM_NAMES), help="comma list, from: " + ", ".join(ARM_NAMES))
    p.add_argument("--no-micro", action="store_true", help="skip the codec and span-pipeline micro-benchmarks")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    p.add_argument("--out", default="", help="results directory (default bench/results/<timestamp>/)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # `obi bench -- --quick` passes the separator through
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    for a in arms:
        if a not in ARM_NAMES:
            raise SystemExit(f"bench: unknown arm {a!r}; choose from {', '.join(ARM_NAMES)}")
    over: dict[str, Any] = {"arms": arms, "micro": not args.no_micro, "charts": not args.no_charts, "out_dir": args.out}
    if args.reps is not None:
        over["reps"] = max(1, args.reps)
    if args.duration is not None:
        over["duration_s"] = args.duration
        over["chain_duration_s"] = max(1.0, args.duration / 2)
    if args.rate is not None:
        over["rate"] = args.rate
    s = Settings.quick_settings(**over) if args.quick else Settings(**over)
    run(s)
    return 0
