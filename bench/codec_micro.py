"""Micro-benchmarks: the userspace packet codec and the span export pipeline.

- codec: microseconds per packet for `parse`, header insertion (`parse` + `rebuild` with
  a 70-byte traceparent spliced after the request line, checksums recomputed) and seq/ack
  translation (`parse` + `rebuild` with new seq/ack and SACK edges mapped), on real
  IPv4/TCP packets built with scapy. The codec is imported lazily: while it is missing,
  the result says "unavailable" and why.
- span pipeline: spans/s from `obi.export.Exporter.export()` to a local OTLP http/protobuf
  receiver (bench.otlp_receiver, another process, on loopback), and what `export()` costs the
  calling datapath thread.
"""

from __future__ import annotations

import importlib
import socket
import sys
import time
from typing import Any, Callable

from .child_process import Proc

TRACEPARENT = b"Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
REQUEST = b"GET /api/items?id=42 HTTP/1.1\r\nHost: 198.18.0.2:8080\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


def _time_per_call(fn: Callable[[], Any], n: int) -> float:
    """Microseconds per call of fn, best of 3 rounds of n calls (least disturbed)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
    return round(best, 3)


def _packets() -> dict[str, bytes]:
    from scapy.layers.inet import IP, TCP
    from scapy.packet import Raw

    ts = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]
    request = (
        IP(src="198.18.0.1", dst="198.18.0.2")
        / TCP(sport=40000, dport=8080, flags="PA", seq=1000, ack=2000, window=502, options=ts)
        / Raw(REQUEST)
    )
    sack_ack = IP(src="198.18.0.2", dst="198.18.0.1") / TCP(
        sport=8080,
        dport=40000,
        flags="A",
        seq=2000,
        ack=1300,
        window=502,
        options=[("NOP", None), ("NOP", None), ("SAck", (1500, 2948, 4396, 5844))],
    )
    return {"request": bytes(request), "sack_ack": bytes(sack_ack)}


def bench_codec(scale: float = 1.0) -> dict[str, Any]:
    try:
        codec = importlib.import_module("obi.fallback.codec")
        parse, rebuild = codec.parse, codec.rebuild
    except (ImportError, AttributeError) as e:
        return {"unavailable": f"obi.fallback.codec not usable: {e!r}"}
    n = max(500, int(20000 * scale))
    pk = _packets()
    req, sack = pk["request"], pk["sack_ack"]
    p_req = parse(req)
    if p_req is None or parse(sack) is None:
        return {"unavailable": "obi.fallback.codec.parse() returned None for a valid TCP packet"}
    at = bytes(p_req.payload).index(b"\r\n") + 2
    shift = len(TRACEPARENT)

    def insert() -> bytes | None:
        p = parse(req)
        return rebuild(p, inserts=[(at, TRACEPARENT)])

    def translate_data() -> bytes | None:
        p = parse(req)
        return rebuild(p, seq=p.seq + shift)

    def translate_sack() -> bytes | None:
        p = parse(sack)
        return rebuild(p, ack=p.ack - shift, map_sack=lambda x: x - shift)

    # Check the operations do what they claim before timing them.
    grown = insert()
    if grown is None or len(grown) != len(req) + shift or TRACEPARENT not in grown or not codec.verify_checksums(grown):
        return {"unavailable": "codec insert did not produce a valid grown packet"}
    ops = {
        "parse": (lambda: parse(req), "parse an IPv4 HTTP request segment"),
        "insert": (insert, "parse + splice a 70-byte traceparent after the request line, checksums"),
        "seq_translate": (translate_data, "parse + rewrite seq of a data segment, checksums"),
        "ack_sack_translate": (translate_sack, "parse + rewrite ack and 2 SACK blocks of an ACK, checksums"),
    }
    out: dict[str, Any] = {"iterations": n, "ops": {}}
    for name, (fn, desc) in ops.items():
        out["ops"][name] = {"us_per_packet": _time_per_call(fn, n), "desc": desc}
    try:
        importlib.import_module("obi.fallback.flows")
        out["flows_module"] = "present (flow-table cost is inside the userspace arm's CPU/request)"
    except ImportError as e:
        out["flows_module"] = f"unavailable: {e}"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_span_pipeline(scale: float = 1.0, timeout_s: float = 120.0) -> dict[str, Any]:
    try:
        from obi import config as config_mod
        from obi.export import Exporter
        from obi.model import SpanKind, SpanRecord, new_span_id, new_trace_id
    except ImportError as e:
        return {"unavailable": f"obi.export not importable: {e!r}"}
    port = _free_port()
    received = [0]

    def on_line(_stream: str, line: str) -> None:
        if line.startswith("spans "):
            received[0] = int(line.split()[1])

    sink = Proc([sys.executable, "-m", "bench.otlp_receiver", "--port", str(port)], on_line=on_line)
    try:
        if not sink.wait_for(lambda: "ready" in sink.out, 15):
            return {"unavailable": "OTLP sink did not start: " + " | ".join(sink.tail())}
        cfg = config_mod.load(
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EBPF_TRACE_PRINTER": "disabled",
                "OTEL_SERVICE_NAME": "obi-bench",
                "OTEL_EBPF_SHUTDOWN_TIMEOUT": "30s",
            }
        )
        n = max(2000, int(100000 * scale))
        now = time.time_ns()
        recs = [
            SpanRecord(
                new_trace_id(),
                new_span_id(),
                "",
                SpanKind.SERVER,
                now + i * 1000,
                now + i * 1000 + 50000,
                "GET",
                f"/items/{i % 100}",
                200,
                host="198.18.0.2:8080",
                local_addr="198.18.0.2",
                local_port=8080,
                peer_addr="198.18.0.1",
                peer_port=40000 + i % 20000,
                pid=1234,
                tid=1234,
                exe="/usr/bin/python3",
            )
            for i in range(n)
        ]
        exp = Exporter(cfg)
        call_ns = 0
        t0 = time.perf_counter()
        for i, rec in enumerate(recs):
            # Keep at most ~6000 spans in flight (both buffers hold 8192): what is measured
            # is sustained throughput, not the size of the queues. Drops still count.
            if i % 256 == 0:
                while True:
                    st = exp.stats()
                    if i - st["exported"] - st["dropped"] <= 6000:
                        break
                    time.sleep(0.0005)
            c0 = time.perf_counter_ns()
            exp.export(rec)
            call_ns += time.perf_counter_ns() - c0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = exp.stats()
            if st["exported"] + st["dropped"] >= n:
                break
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        st = exp.stats()
        exp.shutdown(10)
        sink.wait_for(lambda: received[0] >= st["exported"], 5)
        return {
            "spans": n,
            "exported": st["exported"],
            "dropped": st["dropped"],
            "received": received[0],
            "seconds": round(elapsed, 3),
            "spans_per_s": round(st["exported"] / elapsed, 1) if elapsed else None,
            "export_call_us": round(call_ns / n / 1000, 3),
            "receiver": "bench.otlp_receiver (separate process, loopback, http/protobuf)",
        }
    finally:
        sink.stop(timeout=3)
