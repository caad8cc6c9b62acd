"""UserspaceDatapath hands finished spans to the sink in batches: none is lost or held
back for long (first span at once, then at most every SPAN_DELAY_S, a full batch at once,
the rest when the queue goes idle or the datapath stops)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from obi.config import Config, PortRange
from obi.fallback import datapath as dp_mod
from obi.fallback.flows import Tracker
from tests.helpers.fallback_fakes import Conn, FakeOwners

REQ = b"GET /x HTTP/1.1\r\nHost: b\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
def clock(monkeypatch):
    now = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(dp_mod, "time", SimpleNamespace(monotonic=lambda: now.t))
    return now


def datapath(sink):
    cfg = Config(context_propagation=frozenset(("headers",)), open_ports=(PortRange(8080, 8080),))
    d = dp_mod.UserspaceDatapath(cfg, sink)
    d.tracker = Tracker(cfg, d._spans.append, FakeOwners())
    return d


def request(d, c):
    """One request/response on connection c through the datapath's packet handler."""
    d._handle(c.inn(payload=REQ), False)
    c.pseq += len(REQ)
    d._handle(c.out(payload=RESP), True)
    c.lseq += len(RESP)


def test_spans_reach_the_sink_batched_and_none_is_lost(clock):
    got = []
    d = datapath(got.append)
    c = Conn("198.18.0.2", 8080, "198.18.0.1", 40000)
    d._handle(c.inn("S", seq=c.pseq - 1, ack=0), False)
    d._handle(c.out("SA", seq=c.lseq - 1, ack=c.pseq), True)
    request(d, c)
    assert [s.path for s in got] == ["/x"]  # the first span goes at once
    for _ in range(3):
        request(d, c)
    assert len(got) == 1  # within SPAN_DELAY_S: held
    clock.t += dp_mod.SPAN_DELAY_S * 2
    d._handle(c.inn("A"), False)  # any packet after the delay hands them over
    assert len(got) == 4
    for _ in range(dp_mod.SPAN_BATCH):
        request(d, c)
    assert len(got) == 4 + dp_mod.SPAN_BATCH  # a full batch goes without waiting
    request(d, c)
    d._idle()  # the queue went idle
    assert len(got) == 5 + dp_mod.SPAN_BATCH
    request(d, c)
    d.stop()  # stopping hands over what is left
    assert len(got) == 6 + dp_mod.SPAN_BATCH
    assert all(s.status == 200 and s.path == "/x" for s in got)
    assert len({s.span_id for s in got}) == len(got)
