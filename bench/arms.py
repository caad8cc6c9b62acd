"""The arms of the benchmark: what runs next to the server while the load is applied.

Each arm is "start something in the server's namespace, (load runs), stop it, collect its
counters". An arm that cannot start raises `ArmUnavailable` with the reason (the agent's
exit code and last log lines, a missing module...); the report prints that reason instead
of numbers. Nothing here invents a figure: every counter comes from the process measured
or from the kernel.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from obi.agent import ATTACHED_RE
from obi.demo.topology import Host

from .child_process import Proc, child_env

ARM_NAMES = ("baseline", "kernel", "userspace", "noop_nfqueue")
ARM_TITLES = {
    "baseline": "uninstrumented",
    "kernel": "kernel path",
    "userspace": "userspace path",
    "noop_nfqueue": "no-op NFQUEUE",
}
# The agent's last log line on a clean stop: "stopped: k=v, k=v, ..." (obi.agent.Agent.stop).
_STOPPED = re.compile(r"stopped: (.*)$")
_KV = re.compile(r"([A-Za-z_][\w.]*)=(-?\d+)")


def in_netns(host: Host) -> list[str]:
    """Command prefix that runs in the host's network namespace only. Not `ip netns exec`:
    that also remounts /sys, which hides the cgroup2 mount (/sys/fs/cgroup/unified) the
    kernel path attaches to; `nsenter --net` changes nothing but the network namespace."""
    if shutil.which("nsenter"):
        return ["nsenter", f"--net={host.netns_path}", "--"]
    return ["ip", "netns", "exec", host.netns]


class ArmUnavailable(Exception):
    """The arm cannot run here; str() is the reason shown in the report."""


@dataclass
class ArmContext:
    server: Host  # the host whose traffic is instrumented
    ports: tuple[int, ...]  # server ports the agent / queue watch
    otlp_endpoint: str  # OTLP http base endpoint reachable from the server namespace
    attach_timeout_s: float = 30.0


@dataclass
class Arm:
    name: str
    process: Proc | None = None  # what CPU time / RSS are measured on (None: nothing runs)
    counters: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.alive() else None

    def start(self, ctx: ArmContext) -> None:
        pass

    def stop(self) -> dict[str, Any]:
        """Stop and return the counters of this run (empty for the baseline)."""
        return {}


class Baseline(Arm):
    """Nothing runs: the server alone."""


class AgentArm(Arm):
    """`python3 -m obi run` inside the server namespace with one forced datapath."""

    def __init__(self, name: str, datapath: str):
        super().__init__(name)
        self.datapath = datapath
        self.exit_code: int | None = None

    def start(self, ctx: ArmContext) -> None:
        env = child_env(
            {
                "OTEL_EBPF_DATAPATH": self.datapath,
                "OTEL_EBPF_OPEN_PORT": ",".join(str(p) for p in ctx.ports),
                "OTEL_EBPF_BPF_CONTEXT_PROPAGATION": "all",
                "OTEL_EBPF_CGROUP_PATH": ctx.server.cgroup,
                "OTEL_EBPF_TRACE_PRINTER": "disabled",
                "OTEL_EXPORTER_OTLP_ENDPOINT": ctx.otlp_endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_SERVICE_NAME": "obi-bench-server",
                "OTEL_EBPF_SHUTDOWN_TIMEOUT": "10s",
                "OTEL_EBPF_LOG_LEVEL": "info",
            }
        )
        # Not in the server's cgroup: a per-node agent is not part of the service it watches.
        argv = [*in_netns(ctx.server), sys.executable, "-m", "obi", "run"]
        self.process = proc = Proc(argv, env=env)
        attached = proc.wait_for(lambda: any(ATTACHED_RE.search(line) for line in proc.err), ctx.attach_timeout_s)
        got = next((m.group(1) for m in map(ATTACHED_RE.search, proc.err) if m), "")
        if attached and got != self.datapath:  # never measure one datapath under another's name
            proc.stop(timeout=10)
            self.process = None
            raise ArmUnavailable(
                f"agent attached the {got} datapath, not {self.datapath}: " + " | ".join(_interesting(proc.tail(20)))
            )
        if not attached:
            alive = proc.alive()
            code = proc.stop(timeout=5)
            self.process = None
            lines = " | ".join(_interesting(proc.tail(20)))
            if alive:
                raise ArmUnavailable(f"agent did not attach within {ctx.attach_timeout_s:.0f}s: {lines or 'no output'}")
            raise ArmUnavailable(f"agent exited with code {code}: {lines or 'no output'}")

    def stop(self) -> dict[str, Any]:
        proc = self.process
        if proc is None:
            return {}
        crashed = not proc.alive()
        self.exit_code = proc.stop(timeout=20)
        stats: dict[str, Any] = {}
        for line in proc.err:
            m = _STOPPED.search(line)
            if m:
                stats = {k: int(v) for k, v in _KV.findall(m.group(1))}
        stats["exit_code"] = self.exit_code if self.exit_code is not None else -9
        if crashed:
            stats["crashed"] = 1
            stats["log_tail"] = _interesting(proc.tail(20))
        return stats


def _interesting(lines: list[str]) -> list[str]:
    """Log lines worth quoting in a reason: errors and tracebacks first, else the last ones."""
    bad = [ln.strip() for ln in lines if re.search(r"error|Error|exception|Traceback|refus|denied|No module", ln)]
    return (bad or [ln.strip() for ln in lines])[-4:]


class NoopNfqueue(Arm):
    """iptables NFQUEUE rules on the server port (both directions, payload-carrying
    segments only, --queue-bypass) and `bench.nfq_noop`, which accepts everything."""

    def __init__(self) -> None:
        super().__init__("noop_nfqueue")
        self.queue = 30000 + secrets.randbelow(20000)
        self._rules: list[list[str]] = []
        self._server: Host | None = None

    def _rule_specs(self, ports: tuple[int, ...]) -> list[list[str]]:
        # The same ports the agent watches, either end (served and called). An IPv4 TCP
        # packet longer than 80 bytes (20 IP + up to 60 TCP header) carries payload; pure
        # ACKs never do. That is what a datapath that queues only payload must at least
        # take (docs/architecture.md, decision 6).
        match = [
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--ports",
            ",".join(map(str, ports)),
            "-m",
            "length",
            "--length",
            "81:65535",
        ]
        target = ["-j", "NFQUEUE", "--queue-num", str(self.queue), "--queue-bypass"]
        return [["INPUT", *match, *target], ["OUTPUT", *match, *target]]

    def start(self, ctx: ArmContext) -> None:
        if not shutil.which("iptables"):
            raise ArmUnavailable("iptables is not installed")
        try:
            import netfilterqueue  # noqa: F401  (only to give a clear reason)
        except ImportError as e:
            raise ArmUnavailable(f"python module netfilterqueue missing: {e}") from None
        self._server = ctx.server
        argv = [*in_netns(ctx.server), sys.executable, "-m", "bench.nfq_noop", "--queue", str(self.queue)]
        self.process = proc = Proc(argv)
        if not proc.wait_for(lambda: "ready" in proc.out, 10):
            proc.stop(timeout=3)
            self.process = None
            raise ArmUnavailable("no-op NFQUEUE consumer did not start: " + " | ".join(_interesting(proc.tail(10))))
        try:
            for spec in self._rule_specs(ctx.ports):
                ctx.server.run(["iptables", "-w", "-A", *spec], timeout=10)
                self._rules.append(spec)
        except subprocess.CalledProcessError as e:
            self.stop()
            raise ArmUnavailable(f"iptables NFQUEUE rule failed: {e.stderr.strip()}") from None

    def stop(self) -> dict[str, Any]:
        # Rules first, so nothing is queued to a consumer that is going away.
        for spec in reversed(self._rules):
            if self._server is not None:
                self._server.run(["iptables", "-w", "-D", *spec], timeout=10, check=False)
        self._rules.clear()
        counters: dict[str, Any] = {}
        if self.process is not None:
            self.process.stop(timeout=5)
            for line in self.process.out:
                if line.startswith("{"):
                    counters = json.loads(line)
        return counters


def make_arm(name: str) -> Arm:
    if name == "baseline":
        return Baseline("baseline")
    if name in ("kernel", "userspace"):
        return AgentArm(name, name)
    if name == "noop_nfqueue":
        return NoopNfqueue()
    raise ValueError(f"unknown arm {name!r}; choose from {', '.join(ARM_NAMES)}")
