"""Test helper for the kernel-path tests: a KernelDatapath watching one test host (its
netns and cgroup), spans collected in a list. Skips the test if a kernel feature is
missing."""

from __future__ import annotations

import time

import pytest

from obi import config
from obi.errors import MissingFeature
from obi.kernel.datapath import KernelDatapath
from obi.model import SpanKind, SpanRecord


class Agent:
    """A KernelDatapath watching one host; spans land in .spans."""

    def __init__(self, host, tmp_path, propagation: str = "headers", ports: str = "8080,8081",
                 env: dict[str, str] | None = None, sink=None):
        """sink: called with each span instead of collecting them in .spans."""
        self.spans: list[SpanRecord] = []
        cfg = config.load(env={
            "OTEL_EBPF_BPF_CONTEXT_PROPAGATION": propagation,
            "OTEL_EBPF_OPEN_PORT": ports,
            "OTEL_EBPF_CGROUP_PATH": host.cgroup,
            **(env or {}),
        })
        self.dp = KernelDatapath(cfg, sink or self.spans.append, netns=host.netns_path, state_dir=str(tmp_path / host.name))
        try:
            self.dp.start()
        except MissingFeature as e:
            pytest.skip(f"kernel feature missing: {e}")

    def wait(self, pred, timeout: float = 10.0) -> list[SpanRecord]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [s for s in list(self.spans) if pred(s)]
            if got:
                return got
            time.sleep(0.05)
        return []

    def wait_count(self, kind: SpanKind, n: int, timeout: float = 20.0) -> list[SpanRecord]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [s for s in list(self.spans) if s.kind == kind]
            if len(got) >= n:
                return got
            time.sleep(0.05)
        return [s for s in list(self.spans) if s.kind == kind]

    def stop(self) -> None:
        self.dp.stop()
