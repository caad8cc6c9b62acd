"""The README's main command: `obi demo` on each datapath, end to end in namespaces.

The demo checks its own links (the header the backend received names a CLIENT span whose
parent is the service's SERVER span, which continues the client's context), so the test
asserts on its verdict and on the JSON spans it prints.
"""

import json
import os
import subprocess
import sys

import pytest

from obi.demo.topology import have_netns_tools
from obi.w3c import parse_traceparent

pytestmark = pytest.mark.skipif(bool(have_netns_tools()), reason=have_netns_tools() or "ok")


def _demo(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-m", "obi", "demo", *args], capture_output=True, text=True, timeout=240, env=env
    )


@pytest.mark.parametrize("datapath", ["kernel", "userspace"])
def test_demo_links_every_trace(datapath):
    if datapath == "kernel":
        from obi.kernel.probes import probe_bpf_loop

        probe = probe_bpf_loop()
        if probe.ok is False:
            pytest.skip(f"kernel datapath needs bpf_loop: {probe.detail}")
    r = _demo("--datapath", datapath, "--requests", "2", "--output", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    spans = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert "demo ok: 4 requests, 12 spans" in r.stdout
    # Each agent says which datapath it attached; the one asked for, for both.
    for name in ("service", "backend"):
        assert f"agent on {name}: datapath {datapath}" in r.stdout, r.stdout
    assert len(spans) == 12
    assert {s["resource"]["service.name"] for s in spans} == {"service", "backend"}
    by_id = {s["span_id"]: s for s in spans}
    for s in spans:
        if s["kind"] == "CLIENT":
            assert by_id[s["parent_span_id"]]["kind"] == "SERVER"
            assert by_id[s["parent_span_id"]]["trace_id"] == s["trace_id"]
            assert s["attributes"]["url.full"].endswith("/headers")
    roots = [s for s in spans if s["parent_span_id"] == ""]
    assert len(roots) == 2  # the two requests sent without a traceparent


def test_demo_text_output_shows_wire_and_trees():
    r = _demo("--datapath", "userspace", "--requests", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    wire = [line for line in r.stdout.splitlines() if line.startswith("client sent traceparent")]
    assert len(wire) == 2
    for line in wire:
        assert parse_traceparent(line.rsplit(" ", 1)[-1]) is not None
    assert r.stdout.count("\ntrace ") == 2
