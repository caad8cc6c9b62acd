"""Health endpoint and self-metrics of a running agent (`obi run`).

`HealthServer(cfg, status_fn, metrics_fn)` serves, over plain HTTP on
`health_check.listen_address` (loopback by default, as OBI), from one event-loop thread:

- `/healthz` on `health_check.port`: JSON, 200 when the datapath is attached and the
  exporter is not failing persistently, 503 otherwise (Kubernetes readiness).
- `/livez` on the same port: 200 while the agent process is up and serving (Kubernetes
  liveness: a collector outage makes /healthz 503, but restarting the agent would not fix
  it and would detach/reattach every hook).
- `internal_metrics.prometheus.path` (default /internal/metrics) on
  `internal_metrics.prometheus.port`: Prometheus text exposition format 0.0.4.

When both ports are equal one listener serves every path. `status_fn()` returns a dict
with `datapath` (name or None) and `attached` (bool), optionally `reason`; `metrics_fn()`
returns the merged counters of the exporter and the datapath (`METRICS` below maps them).
Neither callback may block for long: they run on the request thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import platform
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from . import __version__
from .config import Config
from .errors import ObiError

log = logging.getLogger("obi.health")

HEALTH_PATH = "/healthz"
LIVE_PATH = "/livez"
CONTENT_TYPE_PROM = "text/plain; version=0.0.4; charset=utf-8"
# An export error makes the agent unhealthy until a batch succeeds or this long passes
# without a new error (a backend that is down keeps failing every batch it is sent).
EXPORT_ERROR_WINDOW_S = 60.0
SAMPLE_INTERVAL_S = 1.0
REQUEST_DEADLINE_S = 5.0  # from accept to the answer written, whatever the client's pace

StatusFn = Callable[[], Mapping[str, Any]]
MetricsFn = Callable[[], Mapping[str, int]]


@dataclass(frozen=True)
class Metric:
    name: str  # Prometheus name (counters end in _total)
    keys: tuple[str, ...]  # keys in metrics_fn()'s dict, summed; missing keys read as 0
    help: str

    def value(self, counters: Mapping[str, int]) -> int:
        return sum(int(counters.get(k, 0)) for k in self.keys)


# The one table from internal counters to exported metric names. Every metric is a counter.
# Where the two datapaths name a counter differently, both names are listed (only one
# datapath runs, so at most one of them is present).
METRICS: tuple[Metric, ...] = (
    Metric("obi_spans_exported_total", ("exported",), "Spans the OTLP backend accepted."),
    Metric("obi_spans_dropped_total", ("dropped",), "Spans dropped: export queue full, failed export or shutdown."),
    Metric("obi_export_errors_total", ("export_errors",), "OTLP export requests (batches) that failed."),
    Metric(
        "obi_ringbuf_events_lost_total",
        ("events_lost",),
        "Kernel datapath events lost because the ring buffer was full.",
    ),
    Metric("obi_packets_queued_total", ("packets_queued",), "Packets the userspace datapath received from NFQUEUE."),
    Metric(
        "obi_packets_unparsed_total",
        ("observe_dropped", "observe_shed"),
        "Packets of served connections the userspace datapath let through unparsed because it was behind "
        "(their requests get no span).",
    ),
    Metric(
        "obi_packets_accepted_total", ("packets_accepted",), "Packets the userspace datapath gave back to the kernel."
    ),
    Metric(
        "obi_packets_bypassed_total",
        ("packets_bypassed",),
        "Packets passed unchanged because of a parse miss or an error.",
    ),
    Metric(
        "obi_headers_inserted_total", ("headers_inserted",), "Traceparent headers written into outgoing HTTP requests."
    ),
    Metric(
        "obi_tcp_options_written_total",
        ("tcp_options_written", "tcpopt_written"),
        "TCP segments tagged with the trace context option (kind 25).",
    ),
    Metric(
        "obi_tracestate_inserted_total",
        ("tracestate_inserted",),
        "tracestate headers passed on in outgoing HTTP requests (with a Traceparent).",
    ),
    Metric(
        "obi_tracestate_dropped_total",
        ("ts_states_full", "tracestate_skipped_mtu"),
        "Incoming tracestates not passed on: no room to keep one (kernel path) or to insert it within the MTU "
        "(userspace path).",
    ),
    Metric(
        "obi_requests_evicted_total",
        ("requests_evicted",),
        "Requests dropped while waiting for their response (too many open, or none for 5 minutes): no span.",
    ),
    Metric(
        "obi_selection_map_full_total",
        ("selection_map_full",),
        "Processes or ports left uninstrumented at a process scan because the kernel path's "
        "selected_tgids or server_ports map was full (counted at every scan while it lasts).",
    ),
    Metric(
        "obi_flows_evicted_total",
        ("flows_evicted", "flows_refused"),
        "Connections the userspace datapath stopped tracing, or never traced, because its flow table was full "
        "(no span for them; their traffic is not touched).",
    ),
    Metric(
        "obi_segments_ignored_total",
        ("segments_ignored", "rst_ignored"),
        "Incoming segments (RSTs included) the userspace datapath did not parse or act on: not part of a "
        "connection it knows, or outside what the local stack sent and acknowledged (forged, or far out of window).",
    ),
    Metric(
        "obi_health_connections_dropped_total",
        ("health_connections_dropped",),
        "Connections to the health/metrics listener cut off: no complete request within the deadline, "
        "or closed to make room (at most 64 open).",
    ),
)


def _label(value: object) -> str:
    """A label value escaped as the text format requires (backslash, quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(counters: Mapping[str, int], datapath: str | None) -> str:
    """The Prometheus text exposition (format 0.0.4) of the counters plus info gauges."""
    lines: list[str] = []
    for m in METRICS:
        lines += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} counter", f"{m.name} {m.value(counters)}"]
    lines += [
        "# HELP obi_datapath_info The datapath in use (kernel, userspace, or none before attach).",
        "# TYPE obi_datapath_info gauge",
        f'obi_datapath_info{{datapath="{_label(datapath or "none")}"}} 1',
        "# HELP obi_build_info obi-py version and Python version.",
        "# TYPE obi_build_info gauge",
        f'obi_build_info{{version="{_label(__version__)}",python="{_label(platform.python_version())}"}} 1',
    ]
    return "\n".join(lines) + "\n"


class ExportHealth:
    """Tells from successive counter samples whether export is failing persistently.

    Failing = an export error was seen within `window_s` and no span was exported since.
    Counters are sampled (by the server's ticker and on every request); when errors and
    successes both moved between two samples the order is unknown and success wins.
    """

    def __init__(self, window_s: float = EXPORT_ERROR_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._errors = 0
        self._exported = 0
        self._last_error_at: float | None = None
        self._failing = False  # an error seen and nothing exported since

    def update(self, counters: Mapping[str, int]) -> None:
        errors, exported = int(counters.get("export_errors", 0)), int(counters.get("exported", 0))
        with self._lock:
            if exported > self._exported:
                self._failing = False
            elif errors > self._errors:
                self._failing = True
                self._last_error_at = self._clock()
            self._errors, self._exported = errors, exported

    def failing(self) -> tuple[bool, str]:
        """(failing, reason)."""
        with self._lock:
            if not self._failing or self._last_error_at is None:
                return False, ""
            age = self._clock() - self._last_error_at
            if age > self.window_s:
                return False, ""
            return True, f"OTLP export failing: {self._errors} failed batches, last {age:.0f}s ago, none exported since"


class HealthServer:
    """The agent's health and metrics listener(s). `start()` binds, `stop()` closes.

    One asyncio loop in one daemon thread serves every connection, so a slow or hostile
    client costs a socket, never a thread: at most `max_connections` are open (a new one
    beyond that closes the oldest), each must deliver its request and take its answer
    within `request_deadline_s` in all (not per read: a client trickling a byte at a time is
    cut off too), and a request head is at most 8 KiB. `/livez` is answered in the loop;
    `/healthz` and the metrics call into the agent on a two-thread pool, so a stuck agent
    callback cannot stop liveness from answering. Connections cut off count in
    `health_connections_dropped`.
    """

    max_connections = 64
    MAX_HEAD = 8192

    def __init__(
        self,
        cfg: Config,
        status_fn: StatusFn,
        metrics_fn: MetricsFn,
        *,
        host: str | None = None,
        error_window_s: float = EXPORT_ERROR_WINDOW_S,
        request_deadline_s: float = REQUEST_DEADLINE_S,
    ):
        self.cfg = cfg
        self.status_fn = status_fn
        self.metrics_fn = metrics_fn
        self.host = cfg.health_check_listen_address if host is None else host
        self.request_deadline_s = request_deadline_s
        self.export_health = ExportHealth(error_window_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._threads: list[threading.Thread] = []
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._conns: dict[asyncio.StreamWriter, None] = {}  # open connections, oldest first
        self._stop = threading.Event()
        self._dropped = 0

    @classmethod
    def for_agent(cls, agent: Any, **kw: Any) -> "HealthServer":
        """A server reading an `obi.agent.Agent` (its cfg, exporter and datapath)."""

        def status() -> dict[str, Any]:
            dp = agent.datapath
            return {
                "datapath": getattr(dp, "name", None),
                "attached": agent.attached,
                "datapath_reason": getattr(agent, "reason", ""),
            }

        def metrics() -> dict[str, int]:
            merged = dict(agent.exporter.stats())
            if agent.datapath is not None:
                merged.update(agent.datapath.stats())
            return merged

        return cls(agent.cfg, status, metrics, **kw)

    def stats(self) -> dict[str, int]:
        return {"health_connections_dropped": self._dropped}

    # -- what each path answers -------------------------------------------------------

    def routes(self, port: int) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
        """Path -> handler for the listener on `port` (configured port, not the bound one)."""
        out: dict[str, Callable[[], tuple[int, str, bytes]]] = {}
        if port == self.cfg.health_check_port:
            out[HEALTH_PATH] = self.healthz
            out[LIVE_PATH] = self.livez
        if port == self.cfg.internal_metrics_port:
            out[self.cfg.internal_metrics_path] = self.metrics
        return out

    def _counters(self) -> dict[str, int]:
        counters = dict(self.metrics_fn())
        self.export_health.update(counters)
        counters.update(self.stats())
        return counters

    def health(self) -> dict[str, Any]:
        """The /healthz document; `status` is "ok" or "unavailable"."""
        try:
            st = dict(self.status_fn())
            self._counters()
        except Exception as e:  # a broken callback is an unhealthy agent, not a 500
            return {
                "status": "unavailable",
                "datapath": None,
                "attached": False,
                "exporting": False,
                "reason": f"status check raised {type(e).__name__}: {e}",
            }
        attached = bool(st.get("attached"))
        failing, why = self.export_health.failing()
        reasons = []
        if not attached:
            reasons.append(st.get("reason") or "datapath not attached")
        if failing:
            reasons.append(why)
        return {
            "status": "ok" if attached and not failing else "unavailable",
            "datapath": st.get("datapath"),
            "datapath_reason": st.get("datapath_reason", ""),
            "attached": attached,
            "exporting": not failing,
            "reason": "; ".join(str(r) for r in reasons),
        }

    def healthz(self) -> tuple[int, str, bytes]:
        doc = self.health()
        code = 200 if doc["status"] == "ok" else 503
        return code, "application/json", (json.dumps(doc) + "\n").encode()

    def livez(self) -> tuple[int, str, bytes]:
        return 200, "application/json", b'{"status": "alive"}\n'

    def metrics(self) -> tuple[int, str, bytes]:
        counters = self._counters()
        try:
            datapath = self.status_fn().get("datapath")
        except Exception:
            datapath = None
        return 200, CONTENT_TYPE_PROM, render_metrics(counters, datapath).encode()

    # -- lifecycle --------------------------------------------------------------------

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(address, port) of each listener, in start order (health first)."""
        return [s.sockets[0].getsockname()[:2] for s in self._servers]

    @property
    def ports(self) -> list[int]:
        """The bound ports, in start order (health first)."""
        return [port for _, port in self.addresses]

    def start(self) -> None:
        """Bind the configured port(s); nothing when both are 0. ObiError if a port is taken."""
        wanted = {
            self.cfg.health_check_port: "health_check.port",
            self.cfg.internal_metrics_port: "internal_metrics.prometheus.port",
        }
        wanted.pop(0, None)
        if not wanted:
            return
        self._stop.clear()
        loop = self._loop = asyncio.new_event_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="obi-health-call")
        t = threading.Thread(target=loop.run_forever, name="obi-health", daemon=True)
        t.start()
        self._threads.append(t)
        for port, key in wanted.items():  # one listener when both ports are the same
            try:
                asyncio.run_coroutine_threadsafe(self._listen(port), loop).result(10)
            except OSError as e:
                self.stop()
                raise ObiError(f"{key} {port}: cannot listen on {self.host}:{port}: {e.strerror or e}") from e
        t = threading.Thread(target=self._tick, name="obi-health-sampler", daemon=True)
        t.start()
        self._threads.append(t)

    async def _listen(self, port: int) -> None:
        routes = self.routes(port)
        server = await asyncio.start_server(
            lambda r, w: self._connection(r, w, routes), self.host, port, reuse_address=True, limit=self.MAX_HEAD
        )
        self._servers.append(server)
        log.info("serving %s on %s:%d", ", ".join(sorted(routes)), self.host, server.sockets[0].getsockname()[1])

    async def _connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        routes: Mapping[str, Callable[[], tuple[int, str, bytes]]],
    ) -> None:
        conns = self._conns
        while len(conns) >= self.max_connections:  # the oldest has had the most time
            oldest = next(iter(conns))
            del conns[oldest]
            self._dropped += 1
            oldest.transport.abort()
        conns[writer] = None
        try:
            await asyncio.wait_for(self._exchange(reader, writer, routes), self.request_deadline_s)
        except (
            asyncio.TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,
        ):
            if writer in conns:
                self._dropped += 1
        finally:
            conns.pop(writer, None)
            writer.transport.abort()

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        routes: Mapping[str, Callable[[], tuple[int, str, bytes]]],
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, _, rest = head.partition(b" ")
        target = rest.split(b" ", 1)[0].decode("latin-1")
        path = target.split("?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            code, ctype, data = 405, "text/plain", b"method not allowed\n"
        elif path not in routes:
            code, ctype, data = 404, "text/plain", b"not found\n"
        elif path == LIVE_PATH:
            code, ctype, data = routes[path]()  # never calls into the agent
        else:
            assert self._loop is not None
            try:
                code, ctype, data = await self._loop.run_in_executor(self._pool, routes[path])
            except Exception as e:
                log.exception("health endpoint %s failed", path)
                code, ctype, data = 500, "text/plain", f"{type(e).__name__}: {e}\n".encode()
        reason = {
            200: "OK",
            404: "Not Found",
            405: "Method Not Allowed",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }.get(code, "")
        writer.write(
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        if method != b"HEAD":
            writer.write(data)
        await writer.drain()
        self._conns.pop(writer, None)  # answered: not cut off

    def _tick(self) -> None:
        # Samples the counters so that an error is timed when it happens, not when probed.
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            try:
                self._counters()
            except Exception:
                log.debug("metrics sampling failed", exc_info=True)

    async def _close(self) -> None:
        for s in self._servers:
            s.close()
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in self._servers:
            await s.wait_closed()

    def stop(self) -> None:
        """Close every listener and connection, and join the threads (bounded). Idempotent."""
        self._stop.set()
        loop = self._loop
        if loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(2.0)
            except Exception:
                log.debug("closing the health listeners failed", exc_info=True)
            loop.call_soon_threadsafe(loop.stop)
        for t in self._threads:
            t.join(2.0)
        if loop is not None and not loop.is_running():
            loop.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._loop, self._pool = None, None
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> "HealthServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
