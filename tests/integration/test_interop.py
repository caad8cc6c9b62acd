"""Interop with the real OpenTelemetry Python SDK, both ways, on both datapaths.

    A: SDK client (requests + RequestsInstrumentor)  ──▶  B: obi.demo.app, traced by the agent
                                                          ──▶  C: SDK WSGI server (OpenTelemetryMiddleware)

(a) the agent continues the SDK client's header: B's SERVER span has the SDK trace id and
    the SDK CLIENT span as parent;
(b) the SDK server continues the header the agent inserted: C's SDK SERVER span has B's
    trace id and B's CLIENT span as parent.
Only B runs the agent; A and C are instrumented by the SDK alone.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from obi.w3c import parse_traceparent  # noqa: E402
from tests.helpers.parity_harness import DATAPATHS, PORT, Env, skip_reason, start_service, traceparents  # noqa: E402

pytestmark = pytest.mark.root

APPS = str(Path(__file__).parent.parent / "helpers" / "interop_apps.py")


class SdkServerEnv(Env):
    spans_file: Path

    def sdk_spans(self, pred, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.spans_file.read_text().splitlines() if self.spans_file.exists() else []
            got = [s for s in map(json.loads, lines) if pred(s)]
            if got or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


@pytest.fixture(scope="module", params=DATAPATHS)
def env(request, tmp_path_factory) -> Iterator[SdkServerEnv]:
    why = skip_reason(request.param)
    if why:
        pytest.skip(why)
    spans_file = tmp_path_factory.mktemp(f"interop-{request.param}") / "c-spans.jsonl"

    def sdk_server(host) -> None:
        start_service(host, [sys.executable, APPS, "server", "--port", str(PORT), "--spans", str(spans_file)])

    with SdkServerEnv(request.param, agents_on=("b",), c_service=sdk_server, driver=False) as e:
        e.spans_file = spans_file
        yield e


def sdk_client(env: Env, url: str) -> dict:
    r = env.topo["a"].run([sys.executable, APPS, "client", "--url", url], timeout=60, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_agent_continues_sdk_client_header(env: SdkServerEnv):
    a, b, c = env.hosts
    agent_b = env.agents["b"]
    mark = agent_b.mark()
    path = f"/from-sdk/{secrets.token_hex(4)}"
    out = sdk_client(env, f"http://{b.addr}:{PORT}{path}")
    sdk = {s["kind"]: s for s in out["spans"]}
    assert {"INTERNAL", "CLIENT"} <= sdk.keys(), out["spans"]
    sdk_client_span = sdk["CLIENT"]
    assert sdk_client_span["parent_span_id"] == sdk["INTERNAL"]["span_id"]
    # What B received from the SDK is what B echoes back: the SDK's own header.
    sent = parse_traceparent(traceparents(out["response"]["headers"])[0][2])
    assert sent.trace_id == sdk_client_span["trace_id"] and sent.span_id == sdk_client_span["span_id"]

    servers = agent_b.wait(lambda s: s["kind"] == "SERVER" and s["attributes"].get("url.path") == path, since=mark)
    assert len(servers) == 1, f"no B SERVER span for {path}: {agent_b.spans[mark:]}\n{env.logs()}"
    bs = servers[0]
    assert bs["trace_id"] == sdk_client_span["trace_id"], "B's SERVER span did not continue the SDK trace"
    assert bs["parent_span_id"] == sdk_client_span["span_id"], "B's SERVER span is not the SDK CLIENT span's child"
    # And the trace goes on: the header B sent C names B's CLIENT span, child of B's SERVER span.
    c_got = parse_traceparent(traceparents(out["response"]["downstream"]["body"]["headers"])[0][2])
    assert c_got.trace_id == sdk_client_span["trace_id"]
    clients = agent_b.wait(lambda s: s["kind"] == "CLIENT" and s["span_id"] == c_got.span_id, since=mark)
    assert len(clients) == 1 and clients[0]["parent_span_id"] == bs["span_id"], agent_b.spans[mark:]


def test_sdk_server_continues_agent_header(env: SdkServerEnv):
    a, b, c = env.hosts
    agent_b = env.agents["b"]
    mark = agent_b.mark()
    path = f"/to-sdk/{secrets.token_hex(4)}"
    answer = env.a_get(path)  # no traceparent: B starts the trace
    received = traceparents(answer["downstream"]["body"]["headers"])
    assert len(received) == 1, answer["downstream"]["body"]["headers"]
    header = parse_traceparent(received[0][2])
    assert header is not None, received

    servers = agent_b.wait(lambda s: s["kind"] == "SERVER" and s["attributes"].get("url.path") == path, since=mark)
    assert len(servers) == 1, f"no B SERVER span for {path}: {agent_b.spans[mark:]}\n{env.logs()}"
    bs = servers[0]
    clients = agent_b.wait(lambda s: s["kind"] == "CLIENT" and s["parent_span_id"] == bs["span_id"], since=mark)
    assert len(clients) == 1, agent_b.spans[mark:]
    bc = clients[0]
    assert bs["parent_span_id"] == "" and bc["trace_id"] == bs["trace_id"]
    assert (header.trace_id, header.span_id) == (bc["trace_id"], bc["span_id"])

    sdk = env.sdk_spans(lambda s: s["kind"] == "SERVER" and s["trace_id"] == bs["trace_id"])
    assert len(sdk) == 1, f"C's SDK server span did not join B's trace {bs['trace_id']}: {env.sdk_spans(bool, 1)}"
    assert sdk[0]["parent_span_id"] == bc["span_id"], "C's SDK SERVER span is not B's CLIENT span's child"
    assert sdk[0]["parent_remote"] is True
