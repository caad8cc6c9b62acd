"""The kernel path's event correlator (no root): open requests are bounded by count and age."""

from __future__ import annotations

from obi.kernel.abi import Event, EventKind, Tuple
from obi.kernel.events import Correlator


def _req(port: int, kind: EventKind = EventKind.SERVER_REQ, ts: int = 1) -> Event:
    t = Tuple("198.18.0.2", "198.18.0.1", 8080, port, 2)
    return Event(int(kind), 0, ts, 0, 7 << 32, t, "ab" * 16, "cd" * 8, "", 1, 0, 0, b"GET / HTTP/1.1", b"", b"", "")


def _resp(port: int, kind: EventKind = EventKind.SERVER_RESP) -> Event:
    e = _req(port, kind, ts=5)
    e.status = 200
    return e


def test_open_requests_are_bounded_by_count_oldest_connection_first():
    spans = []
    c = Correlator(spans.append, max_open=100)
    for port in range(1000, 1300):  # e.g. spoofed request + FIN segments: never answered
        c.on_event(_req(port))
    assert c.open_requests == 100 and c.evicted == 200
    # The newest connections are kept: a response to one of them still makes its span.
    c.on_event(_resp(1299))
    assert len(spans) == 1 and spans[0].status == 200 and spans[0].peer_port == 1299
    c.on_event(_resp(1000))  # evicted: no span, counted as unmatched
    assert len(spans) == 1 and c.unmatched_responses == 1


def test_open_requests_expire_by_age():
    now = [0.0]
    spans = []
    c = Correlator(spans.append, max_age_s=300, clock=lambda: now[0])
    c.on_event(_req(1))
    now[0] = 200.0
    c.on_event(_req(2, EventKind.CLIENT_REQ))
    now[0] = 400.0
    assert c.expire() == 1 and c.open_requests == 1  # port 1 is 400 s old, port 2 only 200 s
    c.on_event(_resp(2, EventKind.CLIENT_RESP))
    assert [s.peer_port for s in spans] == [2]
    now[0] = 10_000.0
    assert c.expire() == 0 and c.open_requests == 0 and c.evicted == 1


def test_pairing_still_in_order_per_connection():
    spans = []
    c = Correlator(spans.append)
    for _ in range(3):
        c.on_event(_req(9))
    for _ in range(3):
        c.on_event(_resp(9))
    assert len(spans) == 3 and c.open_requests == 0 and c.evicted == 0
