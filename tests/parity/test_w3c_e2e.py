"""W3C Trace Context, end to end on both datapaths: the rules of the specification (Level 1,
and Level 2's random flag) checked on the bytes the next hop received.

A sends a request to B (an uninstrumented service watched by the agent), B makes one or
more calls to C, C answers with the headers it received. What C got is compared with what
the specification asks of a participant that continues the trace: a traceparent with the
same trace-id and B's client span as parent-id, flags carried over (only those defined),
and the incoming tracestate passed on, combined, validated and truncated (obi.w3c is the
reference, itself tested against the spec's examples in tests/unit/test_w3c.py). When the
incoming traceparent is not valid, a new trace starts and no tracestate goes on.
"""

from __future__ import annotations

import secrets
import urllib.parse

import pytest

from obi import w3c
from tests.helpers.parity_harness import Env, traceparents

pytestmark = pytest.mark.root

TID, SID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TP = f"00-{TID}-{SID}-01"


def _raw(path: str, headers: list[tuple[str, str]]) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: b\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode()


def call(env: Env, headers: list[tuple[str, str]], query: str = "") -> tuple[dict, list[list[list[str]]], str]:
    """A -> B (with these request headers, in this order) -> C. Returns B's answer, the
    header lists C received (one per call B made) and B's request path."""
    path = f"/w3c/{secrets.token_hex(4)}" + (f"?{query}" if query else "")
    answer = env.a_raw([_raw(path, headers)])[0]
    downs = answer.get("downstreams") or [answer["downstream"]]
    return answer, [d["body"]["headers"] for d in downs], path.split("?")[0]


def header_values(headers: list[list[str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


def continued(c_headers: list[list[str]]) -> w3c.TraceContext:
    tps = traceparents(c_headers)
    assert len(tps) == 1, c_headers
    ctx = w3c.parse_traceparent(tps[0][2])
    assert ctx is not None and tps[0][2].startswith("00-"), tps
    return ctx


@pytest.mark.parametrize(
    "tracestates",
    [
        pytest.param(["congo=t61rcWkgMzE"], id="one"),
        pytest.param(["rojo=00f067aa0ba902b7 , \tcongo=t61rcWkgMzE "], id="ows"),
        pytest.param(["a=1", "b=2,c=3", " ,d=4 ,"], id="several-headers-combined-in-order"),
        pytest.param(["", "a=1"], id="empty-header"),
        pytest.param(["fw529a3039@dt=x,0t@sys=y"], id="multi-tenant-keys"),
        pytest.param(["k= leading and inner spaces"], id="value-spaces"),
    ],
)
def test_tracestate_passed_on(env: Env, tracestates: list[str]):
    headers = [("traceparent", TP)] + [("TraceState" if i % 2 else "tracestate", v) for i, v in enumerate(tracestates)]
    want = w3c.extract(headers).tracestate
    assert want  # every case has something to pass on
    _, (c,), _ = call(env, headers)
    ctx = continued(c)
    assert ctx.trace_id == TID and ctx.span_id != SID and ctx.flags == 1
    assert header_values(c, "tracestate") == [want], c


@pytest.mark.parametrize(
    "tracestates",
    [
        pytest.param(["a=1,a=2"], id="duplicate-key"),
        pytest.param(["a=1", "b=2,a=3"], id="duplicate-across-headers"),
        pytest.param([",".join(f"k{i}=v" for i in range(33))], id="33-members"),
        pytest.param(["A=1"], id="uppercase-key"),
        pytest.param(["k=a\tb"], id="tab-in-value"),
        pytest.param(["k="], id="empty-value"),
        pytest.param(["k=1,junk"], id="member-without-equals"),
        pytest.param(["", " "], id="only-empty"),
    ],
)
def test_invalid_or_empty_tracestate_is_not_passed_on_but_the_trace_continues(env: Env, tracestates: list[str]):
    headers = [("traceparent", TP)] + [("tracestate", v) for v in tracestates]
    _, (c,), _ = call(env, headers)
    assert continued(c).trace_id == TID
    assert header_values(c, "tracestate") == [], c


def test_32_members_pass(env: Env):
    value = ",".join(f"k{i}=v" for i in range(32))
    _, (c,), _ = call(env, [("traceparent", TP), ("tracestate", value)])
    assert header_values(c, "tracestate") == [value]


def _member(key: str, size: int) -> str:
    value = min(256, size - len(key) - 1)
    return f"{key}{'x' * (size - len(key) - 1 - value)}={'v' * value}"


@pytest.mark.parametrize(
    "members",
    [
        pytest.param([_member("a", 300), _member("b", 100), _member("c", 120)], id="long-member-goes-first"),
        pytest.param([_member(f"k{i}", 100) for i in range(6)], id="then-from-the-end"),
        pytest.param([_member(f"k{i}", 128) for i in range(3)] + [_member("z", 125)], id="exactly-512"),
    ],
)
def test_long_tracestate_truncated_by_whole_members(env: Env, members: list[str]):
    headers = [("traceparent", TP), ("tracestate", ",".join(members))]
    want = w3c.extract(headers).tracestate
    _, (c,), _ = call(env, headers)
    got = header_values(c, "tracestate")
    assert got == [want] and len(want) <= 512, (got, want)


@pytest.mark.parametrize(
    "traceparent",
    [
        pytest.param(f"ff-{TID}-{SID}-01", id="version-ff"),
        pytest.param(f"00-{'0' * 32}-{SID}-01", id="zero-trace-id"),
        pytest.param(f"00-{TID}-{'0' * 16}-01", id="zero-parent-id"),
        pytest.param(f"00-{TID.upper()}-{SID}-01", id="uppercase-hex"),
        pytest.param(f"00-{TID}-{SID}-1", id="short-flags"),
        pytest.param(f"00-{TID}-{SID}-01-extra", id="v00-with-more"),
        pytest.param(f"00_{TID}-{SID}-01", id="bad-delimiter"),
        pytest.param(f"00-{TID[:-1]}g-{SID}-01", id="illegal-character"),
        pytest.param("", id="empty"),
    ],
)
def test_invalid_traceparent_starts_a_new_trace_without_tracestate(env: Env, traceparent: str):
    _, (c,), _ = call(env, [("traceparent", traceparent), ("tracestate", "a=1")])
    ctx = continued(c)
    assert ctx.trace_id != TID and ctx.flags == 0x03  # a fresh random id: sampled + random
    assert header_values(c, "tracestate") == []


def test_two_traceparents_with_different_values_start_a_new_trace(env: Env):
    other = f"00-{'1' * 32}-{SID}-01"
    _, (c,), _ = call(env, [("traceparent", TP), ("traceparent", other), ("tracestate", "a=1")])
    ctx = continued(c)
    assert ctx.trace_id not in (TID, "1" * 32) and header_values(c, "tracestate") == []


def test_no_traceparent_tracestate_alone_is_dropped(env: Env):
    _, (c,), _ = call(env, [("tracestate", "a=1")])
    assert continued(c).flags == 0x03 and header_values(c, "tracestate") == []


def test_future_version_read_by_its_first_four_fields(env: Env):
    _, (c,), _ = call(env, [("traceparent", f"cc-{TID}-{SID}-01-what-comes-next"), ("tracestate", "a=1")])
    ctx = continued(c)
    assert ctx.trace_id == TID and ctx.flags == 1
    assert header_values(c, "tracestate") == ["a=1"]


@pytest.mark.parametrize(("incoming", "outgoing"), [("00", 0), ("01", 1), ("02", 2), ("03", 3), ("ff", 3), ("f1", 1)])
def test_flags_carried_over_only_the_defined_ones(env: Env, incoming: str, outgoing: int):
    _, (c,), _ = call(env, [("traceparent", f"00-{TID}-{SID}-{incoming}")])
    ctx = continued(c)
    assert ctx.trace_id == TID and ctx.flags == outgoing


def test_header_names_in_any_case(env: Env):
    _, (c,), _ = call(env, [("TRACEPARENT", TP), ("TrAcEsTaTe", "a=1")])
    assert continued(c).trace_id == TID and header_values(c, "tracestate") == ["a=1"]


def test_several_calls_each_carry_the_context(env: Env):
    _, cs, path = call(env, [("traceparent", TP), ("tracestate", "a=1,b=2")], "calls=3")
    assert len(cs) == 3
    ctxs = [continued(c) for c in cs]
    assert {ctx.trace_id for ctx in ctxs} == {TID}
    assert len({ctx.span_id for ctx in ctxs}) == 3  # one client span each
    assert all(header_values(c, "tracestate") == ["a=1,b=2"] for c in cs)
    # Each id C received is one of B's CLIENT spans, child of B's SERVER span, which
    # carries the incoming tracestate (OTLP trace_state).
    b = env.agents["b"]
    server = b.wait(lambda s: s["kind"] == "SERVER" and s["attributes"].get("url.path") == path)
    assert len(server) == 1 and server[0]["trace_state"] == "a=1,b=2" and server[0]["parent_span_id"] == SID
    for ctx in ctxs:
        client = b.wait(lambda s, sid=ctx.span_id: s["kind"] == "CLIENT" and s["span_id"] == sid)
        assert len(client) == 1 and client[0]["parent_span_id"] == server[0]["span_id"], client


def test_application_headers_left_as_they_are(env: Env):
    own_tp, own_ts = f"00-{'2' * 32}-{'3' * 16}-01", "app=1"
    q = urllib.parse.urlencode({"tp": own_tp, "ts": own_ts})
    _, (c,), _ = call(env, [("traceparent", TP), ("tracestate", "a=1")], q)
    assert [v for _, _, v in traceparents(c)] == [own_tp]
    assert header_values(c, "tracestate") == [own_ts]


def test_application_tracestate_alone_gets_a_traceparent_but_no_second_tracestate(env: Env):
    q = urllib.parse.urlencode({"ts": "app=1"})
    _, (c,), _ = call(env, [("traceparent", TP), ("tracestate", "a=1")], q)
    assert continued(c).trace_id == TID
    assert header_values(c, "tracestate") == ["app=1"]


def test_new_trace_ids_have_the_random_flag(env: Env):
    _, (c,), _ = call(env, [])
    ctx = continued(c)
    assert ctx.flags == 0x03 and ctx.trace_id != TID
