"""Kernel path under load: every request becomes exactly one span.

32 keep-alive wrk connections against the benchmark's asyncio server (bench.httpserver)
for two seconds, the agent watching it. Before, the agent got two 520-byte events per
request through a ctypes callback each and fell behind: the ring buffer filled and the
kernel dropped most events (15% of the spans arrived). Now BPF completes each span itself
(one event per request) and the agent reads the ring buffer's memory in batches.
Asserted on the spans: one 200 span per request wrk completed (a few more for requests in
flight when wrk stopped), each with its own id, none left unpaired; events lost because the
agent fell behind are counted by the kernel, account for every missing span and stay rare.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from obi.demo.topology import Topology
from obi.model import SpanKind
from tests.helpers.kernel_agent import Agent
from tests.helpers.skips import skip_module_unless_kernel_path

pytestmark = pytest.mark.root


skip_module_unless_kernel_path({"wrk": "needs wrk (scripts/setup.sh installs it)"})

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONNS = 32


def test_every_request_one_span_under_load(tmp_path):
    with Topology(["cl", "sv"], prefix="obik") as topo:
        cl, sv = topo["cl"], topo["sv"]
        srv = sv.popen(
            [sys.executable, "-m", "bench.httpserver", "--port", "8080"], stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        assert "listening" in srv.stdout.readline()
        # Spans are tallied, not kept: 100k live objects would make the garbage collector
        # pause this process (and the agent thread in it) long enough to fill the ring.
        ids: set[str] = set()
        tally = {"spans": 0, "ok": 0, "bad": 0}

        def sink(s) -> None:
            tally["spans"] += 1
            ids.add(s.span_id)
            good = s.kind == SpanKind.SERVER and s.path == "/load" and s.pid == srv.pid and s.end_ns >= s.start_ns
            tally["ok" if good and s.status == 200 else "bad"] += 1

        agent = Agent(sv, tmp_path, propagation="all", ports="8080", sink=sink)
        try:
            agent.dp.scan_now()
            out = cl.run(["wrk", "-t2", f"-c{CONNS}", "-d2s", f"http://{sv.addr}:8080/load"], timeout=60).stdout
            n = int(re.search(r"(\d+) requests in", out).group(1))
            assert n > 1000, out
            deadline = time.monotonic() + 20
            while tally["spans"] + agent.dp.counters()["events_lost"] < n and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(0.5)
            st = agent.dp.stats()
        finally:
            agent.stop()
        assert st["unmatched_responses"] == 0 and st["parse_lost"] == 0, st
        # Every request is a span, or an event the kernel counted as lost: a Python consumer
        # sharing 2 busy cores with wrk and the server (and, on a shared machine, with other
        # jobs) can fall behind for a moment; losses must then be rare and counted.
        lost = st["events_lost"]
        assert lost <= n // 100, (n, tally, st)
        assert n <= tally["ok"] + lost and tally["ok"] <= n + CONNS, (n, tally, st)
        assert tally["bad"] <= CONNS, tally  # only requests cut off when wrk stopped (status 0)
        assert len(ids) == tally["spans"]
