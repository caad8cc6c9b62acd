"""Kernel path: ebpf.track_request_headers without headers propagation (as in OBI).

A -> B -> C with `tcp` propagation only (no header insertion). With track_request_headers
on, B's SERVER span continues A's incoming traceparent; off, it starts a new trace. Either
way nothing is inserted: C receives no Traceparent, and B's CLIENT span is still the child
of B's SERVER span (thread linking does not depend on headers).
"""

from __future__ import annotations

import pytest

from obi.demo.topology import Topology
from obi.model import SpanKind
from tests.helpers.kernel_agent import Agent
from tests.helpers.skips import skip_module_unless_kernel_path
from tests.helpers.traffic import PORT, TP_SPAN, TP_TRACE, http_get, serve, traceparent_values

pytestmark = pytest.mark.root


skip_module_unless_kernel_path()


@pytest.mark.parametrize("track", [True, False], ids=["track-on", "track-off"])
def test_track_request_headers_reads_without_inserting(tmp_path, track):
    with Topology(["a", "b", "c"], prefix="obik") as topo:
        a, b, c = topo["a"], topo["b"], topo["c"]
        serve(c)
        serve(b, downstream=f"http://{c.addr}:{PORT}")
        env = {"OTEL_EBPF_BPF_TRACK_REQUEST_HEADERS": "true" if track else "false"}
        agent_b = Agent(b, tmp_path, propagation="tcp", env=env)
        try:
            out = http_get(a, f"http://{b.addr}:{PORT}/track", {"traceparent": f"00-{TP_TRACE}-{TP_SPAN}-01"})
            assert traceparent_values(out["downstream"]["body"]["headers"]) == []  # nothing inserted
            bs = agent_b.wait(lambda s: s.kind == SpanKind.SERVER and s.path == "/track")
            bc = agent_b.wait(lambda s: s.kind == SpanKind.CLIENT and s.path == "/headers")
            assert len(bs) == 1 and len(bc) == 1, agent_b.spans
            if track:
                assert bs[0].trace_id == TP_TRACE and bs[0].parent_span_id == TP_SPAN and bs[0].propagated
            else:
                assert bs[0].trace_id != TP_TRACE and bs[0].parent_span_id == "" and not bs[0].propagated
            assert bc[0].trace_id == bs[0].trace_id and bc[0].parent_span_id == bs[0].span_id
            assert agent_b.dp.stats()["headers_inserted"] == 0
        finally:
            agent_b.stop()
