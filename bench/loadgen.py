"""Fixed-rate (open-loop) HTTP load generator, for latency at a steady request rate.

Run as `python3 -m bench.loadgen --url http://198.18.0.2:8080/ --rate 500 --duration 5`;
prints one JSON object. Request i is *scheduled* at t0 + i/rate whatever happened to the
earlier ones (open loop), and its latency is measured from that scheduled time, so a slow
server cannot hide its queueing delay by slowing the generator down (no coordinated
omission) -- reported as `sched_p50_us`/`sched_p99_us`. asyncio's timers wake up to 1 ms late
(epoll timeouts are whole milliseconds), which that figure includes, so `p50_us`/`p99_us`
are measured from the moment the request was written instead. Requests go over keep-alive connections taken from a pool; a new connection is
opened only when every pooled one is busy. Written here because `hey` and `wrk2` are not in
Debian 12; being Python, it adds a constant few tens of microseconds to every arm alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100); 0.0 for no values."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer


async def _request(conn: _Conn, raw: bytes, sent: list[float]) -> int:
    sent.append(time.perf_counter())
    conn.writer.write(raw)
    head = await conn.reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await conn.reader.readexactly(length)
    return status


async def run(url: str, rate: float, duration: float, max_conns: int, timeout: float) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    raw = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: obi-bench\r\n\r\n".encode()
    idle: list[_Conn] = []
    open_conns = 0
    latencies: list[float] = []  # from the write of the request
    sched_latencies: list[float] = []  # from its scheduled time
    errors = 0
    skipped = 0  # scheduled but not sent: every connection busy (counted, not hidden)
    late_max = 0.0
    tasks: set[asyncio.Task] = set()

    async def one(scheduled: float) -> None:
        nonlocal open_conns, errors
        conn = idle.pop() if idle else None
        try:
            if conn is None:
                open_conns += 1
                conn = _Conn(*await asyncio.open_connection(host, port))
            sent: list[float] = []
            status = await asyncio.wait_for(_request(conn, raw, sent), timeout)
            done = time.perf_counter()
            latencies.append(done - sent[0])
            sched_latencies.append(done - scheduled)
            if status >= 400:
                errors += 1
            idle.append(conn)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            if conn is not None:
                conn.writer.close()
            open_conns -= 1

    n = int(rate * duration)
    t0 = time.perf_counter() + 0.05
    for i in range(n):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late_max = max(late_max, -delay)
        if not idle and open_conns >= max_conns:
            skipped += 1
            continue
        task = asyncio.create_task(one(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(list(tasks), timeout=timeout)
    elapsed = time.perf_counter() - t0
    for conn in idle:
        conn.writer.close()
    us = sorted(x * 1e6 for x in latencies)
    sched_us = sorted(x * 1e6 for x in sched_latencies)
    return {
        "rate": rate,
        "duration_s": round(elapsed, 3),
        "scheduled": n,
        "completed": len(latencies),
        "errors": errors,
        "skipped": skipped,
        "connections": open_conns,
        "generator_late_max_us": round(late_max * 1e6, 1),
        "p50_us": round(percentile(us, 50), 1),
        "p90_us": round(percentile(us, 90), 1),
        "p99_us": round(percentile(us, 99), 1),
        "max_us": round(us[-1], 1) if us else 0.0,
        "sched_p50_us": round(percentile(sched_us, 50), 1),
        "sched_p99_us": round(percentile(sched_us, 99), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.loadgen")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, default=500.0, help="requests per second")
    p.add_argument("--duration", type=float, default=5.0, help="seconds")
    p.add_argument("--max-conns", type=int, default=64)
    p.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    args = p.parse_args(argv)
    result = asyncio.run(run(args.url, args.rate, args.duration, args.max_conns, args.timeout))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
