"""obi.health: exposition format, health logic, one and two listeners on loopback (no root)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from obi import __version__
from obi.config import Config
from obi.errors import ObiError
from obi.health import METRICS, ExportHealth, HealthServer, render_metrics

pytestmark = pytest.mark.timeout(30)

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(rf"^({NAME})(?:\{{({LABEL}(?:,{LABEL})*)?\}})? (\S+)$")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """Parse Prometheus text format 0.0.4 strictly: family -> {type, help, samples}.

    Checks what a scraper relies on: HELP/TYPE precede their samples, each family appears
    once and contiguously, names and labels are well formed, values are numbers.
    """
    assert text.endswith("\n"), "exposition must end with a newline"
    families: dict[str, dict[str, Any]] = {}
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        assert line.strip(), f"line {n}: empty line"
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            assert re.fullmatch(NAME, name) and help_, f"line {n}: bad HELP: {line!r}"
            assert name not in families, f"line {n}: family {name} repeated"
            families[name] = {"help": help_, "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current, f"line {n}: TYPE for {name} not right after its HELP"
            assert kind in ("counter", "gauge", "untyped", "summary", "histogram"), f"line {n}: {kind}"
            assert families[name]["type"] is None and not families[name]["samples"]
            families[name]["type"] = kind
        else:
            assert not line.startswith("#"), f"line {n}: unknown comment {line!r}"
            m = SAMPLE.match(line)
            assert m, f"line {n}: not a sample line: {line!r}"
            name, labels, value = m.group(1), m.group(2) or "", m.group(3)
            assert name == current, f"line {n}: sample {name} outside its family {current}"
            families[name]["samples"].append((dict(LABEL_RE.findall(labels)), float(value)))
    return families


COUNTERS = {
    "exported": 12,
    "dropped": 3,
    "export_errors": 2,
    "events_lost": 5,
    "packets_queued": 100,
    "packets_accepted": 98,
    "packets_bypassed": 2,
    "headers_inserted": 7,
    "tcp_options_written": 4,
    "observe_dropped": 6,
    "observe_shed": 1,
    "health_connections_dropped": 9,
    "flows_evicted": 10,
    "flows_refused": 1,
    "segments_ignored": 20,
    "rst_ignored": 3,
    "requests_evicted": 9,
    "tracestate_inserted": 4,
    "ts_states_full": 1,
    "selection_map_full": 3,
}


def test_exposition_is_valid_and_complete() -> None:
    fams = parse_exposition(render_metrics(COUNTERS, "kernel"))
    expected = {
        "obi_spans_exported_total": 12,
        "obi_spans_dropped_total": 3,
        "obi_export_errors_total": 2,
        "obi_ringbuf_events_lost_total": 5,
        "obi_packets_queued_total": 100,
        "obi_packets_accepted_total": 98,
        "obi_packets_bypassed_total": 2,
        "obi_headers_inserted_total": 7,
        "obi_tcp_options_written_total": 4,
        "obi_packets_unparsed_total": 7,  # both userspace counters of copies not parsed
        "obi_health_connections_dropped_total": 9,
        "obi_flows_evicted_total": 11,
        "obi_segments_ignored_total": 23,
        "obi_requests_evicted_total": 9,
        "obi_tracestate_inserted_total": 4,
        "obi_tracestate_dropped_total": 1,
        "obi_selection_map_full_total": 3,
    }
    for name, value in expected.items():
        assert fams[name]["type"] == "counter"
        assert fams[name]["samples"] == [({}, value)]
    assert fams["obi_datapath_info"]["type"] == "gauge"
    assert fams["obi_datapath_info"]["samples"] == [({"datapath": "kernel"}, 1.0)]
    ((labels, value),) = fams["obi_build_info"]["samples"]
    assert value == 1.0 and labels["version"] == __version__ and re.fullmatch(r"3\.\d+\.\d+.*", labels["python"])
    assert set(fams) == set(expected) | {"obi_datapath_info", "obi_build_info"}


def test_missing_keys_read_as_zero_and_no_datapath_is_none() -> None:
    fams = parse_exposition(render_metrics({"exported": 1}, None))
    assert fams["obi_spans_exported_total"]["samples"] == [({}, 1.0)]
    for m in METRICS:
        if m.keys != ("exported",):
            assert fams[m.name]["samples"] == [({}, 0.0)], m.name
    assert fams["obi_datapath_info"]["samples"] == [({"datapath": "none"}, 1.0)]


def test_both_datapaths_names_map_to_one_metric() -> None:
    kernel = parse_exposition(render_metrics({"tcpopt_written": 6, "events_lost": 1}, "kernel"))
    user = parse_exposition(render_metrics({"tcp_options_written": 2, "packets_queued": 9}, "userspace"))
    assert kernel["obi_tcp_options_written_total"]["samples"] == [({}, 6.0)]
    assert kernel["obi_ringbuf_events_lost_total"]["samples"] == [({}, 1.0)]
    assert user["obi_tcp_options_written_total"]["samples"] == [({}, 2.0)]
    assert user["obi_packets_queued_total"]["samples"] == [({}, 9.0)]


def test_label_values_are_escaped() -> None:
    fams = parse_exposition(render_metrics({}, 'we"ird\\path\nx'))
    assert fams["obi_datapath_info"]["samples"][0][0]["datapath"] == 'we\\"ird\\\\path\\nx'


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_export_health_fails_on_errors_and_recovers() -> None:
    clock = Clock()
    h = ExportHealth(window_s=30, clock=clock)
    h.update({"exported": 0, "export_errors": 0})
    assert h.failing() == (False, "")
    h.update({"exported": 5, "export_errors": 0})
    assert not h.failing()[0]
    clock.t += 1
    h.update({"exported": 5, "export_errors": 1})  # backend went down
    failing, why = h.failing()
    assert failing and "1 failed batches" in why
    clock.t += 10
    h.update({"exported": 5, "export_errors": 1})  # no news: still failing
    assert h.failing()[0]
    h.update({"exported": 6, "export_errors": 1})  # a batch got through
    assert not h.failing()[0]
    h.update({"exported": 6, "export_errors": 3})
    assert h.failing()[0]
    clock.t += 31  # no new error for longer than the window
    assert not h.failing()[0]


def test_export_health_success_wins_when_both_moved() -> None:
    h = ExportHealth(window_s=30, clock=Clock())
    h.update({"exported": 4, "export_errors": 1})
    assert not h.failing()[0]


# --- real listeners on loopback --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


class FakeAgent:
    """Status and counters a test sets by hand."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {"datapath": "kernel", "attached": True}
        self.counters: dict[str, int] = {}

    def status_fn(self) -> dict[str, Any]:
        return self.status

    def metrics_fn(self) -> dict[str, int]:
        return self.counters


def server(fake: FakeAgent, health_port: int, metrics_port: int, **kw: Any) -> HealthServer:
    cfg = Config(
        health_check_port=health_port, internal_metrics_port=metrics_port, internal_metrics_path="/internal/metrics"
    )
    return HealthServer(cfg, fake.status_fn, fake.metrics_fn, host="127.0.0.1", **kw)


def test_one_port_serves_both_paths() -> None:
    fake = FakeAgent()
    fake.counters = {"exported": 3, "headers_inserted": 2}
    port = free_port()
    with server(fake, port, port) as srv:
        assert srv.ports == [port]
        code, ctype, body = get(port, "/healthz")
        assert code == 200 and ctype == "application/json"
        assert json.loads(body) == {
            "status": "ok",
            "datapath": "kernel",
            "attached": True,
            "exporting": True,
            "reason": "",
            "datapath_reason": "",
        }
        code, ctype, body = get(port, "/internal/metrics")
        assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
        fams = parse_exposition(body.decode())
        assert fams["obi_spans_exported_total"]["samples"] == [({}, 3.0)]
        assert fams["obi_headers_inserted_total"]["samples"] == [({}, 2.0)]
        assert get(port, "/livez")[0] == 200
        assert get(port, "/nope")[0] == 404


def test_two_ports_each_serve_their_path_only() -> None:
    fake = FakeAgent()
    hp, mp = free_port(), free_port()
    while mp == hp:
        mp = free_port()
    with server(fake, hp, mp) as srv:
        assert srv.ports == [hp, mp]
        assert get(hp, "/healthz")[0] == 200
        assert get(hp, "/internal/metrics")[0] == 404
        assert get(mp, "/internal/metrics")[0] == 200
        assert get(mp, "/healthz")[0] == 404


def test_only_metrics_port_configured() -> None:
    fake = FakeAgent()
    mp = free_port()
    with server(fake, 0, mp) as srv:
        assert srv.ports == [mp]
        assert get(mp, "/internal/metrics")[0] == 200
        assert get(mp, "/healthz")[0] == 404


def test_nothing_configured_binds_nothing() -> None:
    with server(FakeAgent(), 0, 0) as srv:
        assert srv.ports == []


def test_503_when_not_attached_or_export_failing() -> None:
    fake = FakeAgent()
    port = free_port()
    with server(fake, port, port) as srv:
        fake.status = {"datapath": None, "attached": False}
        code, _, body = get(port, "/healthz")
        doc = json.loads(body)
        assert code == 503 and doc["status"] == "unavailable" and doc["attached"] is False
        assert doc["reason"] == "datapath not attached"

        fake.status = {"datapath": "userspace", "attached": True}
        assert get(port, "/healthz")[0] == 200
        fake.counters = {"exported": 0, "export_errors": 2}
        code, _, body = get(port, "/healthz")
        doc = json.loads(body)
        assert code == 503 and doc["exporting"] is False and doc["attached"] is True
        assert "OTLP export failing" in doc["reason"]
        # Liveness does not follow the backend: restarting would not fix it.
        assert get(port, "/livez")[0] == 200

        fake.counters = {"exported": 10, "export_errors": 2}
        assert get(port, "/healthz")[0] == 200

        fake.counters = {"exported": 10, "export_errors": 3}
        assert get(port, "/healthz")[0] == 503
        srv.export_health.window_s = 0.0  # the error is now older than the window
        assert get(port, "/healthz")[0] == 200


def test_broken_status_callback_is_503_not_500() -> None:
    fake = FakeAgent()

    def boom() -> dict[str, Any]:
        raise RuntimeError("datapath gone")

    port = free_port()
    cfg = Config(health_check_port=port)
    with HealthServer(cfg, boom, fake.metrics_fn, host="127.0.0.1"):
        code, _, body = get(port, "/healthz")
    assert code == 503 and "datapath gone" in json.loads(body)["reason"]


def test_port_in_use_is_an_obi_error_naming_the_key() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ObiError, match=f"health_check.port {port}"):
            server(FakeAgent(), port, 0).start()


def test_stop_closes_the_listener() -> None:
    port = free_port()
    srv = server(FakeAgent(), port, port)
    srv.start()
    assert get(port, "/healthz")[0] == 200
    srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# --- hostile clients (issue 12, finding 9) -----------------------------------------------


def test_listen_address_setting_is_read_and_validated() -> None:
    from obi import config
    from obi.errors import ConfigError

    assert config.load(env={}).health_check_listen_address == "127.0.0.1"  # as OBI: loopback
    env = {"OTEL_EBPF_HEALTH_CHECK_LISTEN_ADDRESS": "::1"}
    assert config.load(env=env).health_check_listen_address == "::1"
    with pytest.raises(ConfigError, match="health_check.listen_address"):
        config.load(env={"OTEL_EBPF_HEALTH_CHECK_LISTEN_ADDRESS": "localhost:9400"})


def test_server_binds_the_configured_address_only() -> None:
    port = free_port()
    cfg = Config(health_check_port=port, health_check_listen_address="127.0.0.1")
    fake = FakeAgent()
    with HealthServer(cfg, fake.status_fn, fake.metrics_fn) as srv:  # no host override
        assert srv.addresses == [("127.0.0.1", port)]
        assert get(port, "/livez")[0] == 200
    v6 = Config(health_check_port=port, health_check_listen_address="::1")
    with HealthServer(v6, fake.status_fn, fake.metrics_fn) as srv:
        assert srv.addresses == [("::1", port)]
        with urllib.request.urlopen(f"http://[::1]:{port}/livez", timeout=5) as r:
            assert r.status == 200


def _slow_client(port: int, stop: threading.Event, closed: list, interval: float) -> None:
    """Sends a request head one byte at a time, forever; notes when the server hangs up."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        closed.append(time.monotonic())
        return
    with s:
        head = b"GET /livez HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 4000
        for b in head:
            if stop.is_set():
                return
            try:
                s.sendall(bytes((b,)))
            except OSError:
                closed.append(time.monotonic())
                return
            time.sleep(interval)


def test_slow_loris_clients_are_cut_off_and_probes_keep_answering() -> None:
    """200 clients each trickling a request head (a byte every 0.2 s: no single read ever
    times out) while probes run: every probe answers within a second, the agent keeps a
    bounded number of threads, and each slow client is cut off after the whole-request
    deadline."""
    fake = FakeAgent()
    port = free_port()
    stop = threading.Event()
    closed: list[float] = []
    threads_before = threading.active_count()
    with server(fake, port, port, request_deadline_s=1.5) as srv:
        t0 = time.monotonic()
        clients = [
            threading.Thread(target=_slow_client, args=(port, stop, closed, 0.2), daemon=True) for _ in range(200)
        ]
        for c in clients:
            c.start()
        time.sleep(0.5)
        agent_threads = threading.active_count() - len(clients) - threads_before
        worst = 0.0
        for _ in range(20):
            t = time.monotonic()
            assert get(port, "/livez")[0] == 200
            assert get(port, "/healthz")[0] == 200
            assert get(port, "/internal/metrics")[0] == 200
            worst = max(worst, time.monotonic() - t)
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while len(closed) < len(clients) and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        dropped = srv.stats()["health_connections_dropped"]
    assert worst < 1.0, f"a probe took {worst:.2f}s"
    assert agent_threads <= 6, f"{agent_threads} server threads for 200 slow clients"
    assert len(closed) == len(clients), f"{len(clients) - len(closed)} slow clients never cut off"
    assert max(closed) - t0 < 1.5 + 4.0  # the deadline, not a per-read timeout
    assert dropped >= len(clients)


def test_idle_connections_beyond_the_cap_do_not_lock_probes_out() -> None:
    fake = FakeAgent()
    port = free_port()
    with server(fake, port, port, request_deadline_s=30) as srv:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(srv.max_connections * 2)]
        try:
            for _ in range(5):
                t = time.monotonic()
                assert get(port, "/livez")[0] == 200
                assert time.monotonic() - t < 1.0
        finally:
            for s in idle:
                s.close()


def test_a_hanging_status_callback_does_not_stop_liveness() -> None:
    """/healthz calls into the agent; if that hangs, /livez (which does not) still answers."""
    release = threading.Event()
    fake = FakeAgent()

    def stuck() -> dict[str, Any]:
        release.wait(10)
        return fake.status

    port = free_port()
    cfg = Config(health_check_port=port)
    with HealthServer(cfg, stuck, fake.metrics_fn, host="127.0.0.1", request_deadline_s=1.0):
        hung = [threading.Thread(target=lambda: _get_quiet(port, "/healthz"), daemon=True) for _ in range(8)]
        for t in hung:
            t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        assert get(port, "/livez")[0] == 200
        assert time.monotonic() - t0 < 1.0
        release.set()


def _get_quiet(port: int, path: str) -> None:
    try:
        get(port, path)
    except OSError:
        pass
