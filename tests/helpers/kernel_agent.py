"""Agent: a KernelDatapath in the test process, watching one test host (its netns and
cgroup), spans collected in a list. Skips the test if a kernel feature is missing
(`skips.skip_or_fail`).

Nothing from obi.kernel is imported at module level: it loads libbpf.so.1, and a missing
library must become a skip (`skips.skip_module_unless_kernel_path`), not an import error.
"""

from __future__ import annotations

import time

from obi import config
from obi.errors import MissingFeature
from obi.model import SpanKind, SpanRecord
from tests.helpers.skips import skip_or_fail


class Agent:
    """A KernelDatapath watching one host; spans land in .spans."""

    def __init__(
        self,
        host,
        tmp_path,
        propagation: str = "headers",
        ports: str = "8080,8081",
        env: dict[str, str] | None = None,
        sink=None,
        thread_hook: str = "auto",
    ):
        """sink: called with each span instead of collecting them in .spans; thread_hook:
        KernelDatapath's choice of thread-linking tracepoints ("auto", "sock_recv_length",
        "syscalls")."""
        from obi.kernel.datapath import KernelDatapath  # loads libbpf: see the module doc

        self.spans: list[SpanRecord] = []
        cfg = config.load(
            env={
                "OTEL_EBPF_BPF_CONTEXT_PROPAGATION": propagation,
                "OTEL_EBPF_OPEN_PORT": ports,
                "OTEL_EBPF_CGROUP_PATH": host.cgroup,
                **(env or {}),
            }
        )
        self.dp = KernelDatapath(
            cfg,
            sink or self.spans.append,
            netns=host.netns_path,
            state_dir=str(tmp_path / host.name),
            thread_hook=thread_hook,
        )
        try:
            self.dp.start()
        except MissingFeature as e:
            skip_or_fail(e)

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
