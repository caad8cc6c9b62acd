"""Real OTLP trace receivers on loopback, http/protobuf and grpc: the one the tests and the
benchmarks use.

Both decode every request into `ExportTraceServiceRequest` messages (opentelemetry-proto),
so what is counted or asserted is what actually crossed the socket. Use as context
managers; `port=0` picks a free port, or pass a port chosen earlier (to start a backend
that was "down").

`python3 -m bench.otlp_receiver --port 4318` is the benchmarks' span counter: an http
receiver in a process of its own (decoding never competes with the agent or exporter being
measured) that keeps no requests and prints `spans <total>` after each one, which the
harness reads from its stdout.
"""

from __future__ import annotations

import argparse
import gzip
import socket
import sys
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def free_port() -> int:
    """A loopback TCP port with nothing listening on it (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def any_value(v: AnyValue) -> Any:
    field = v.WhichOneof("value")
    if field == "array_value":
        return [any_value(x) for x in v.array_value.values]
    return getattr(v, field) if field else None


def attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    span: Span
    resource: dict[str, Any]
    scope: str

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return attrs(self.span.attributes)


class _Receiver:
    """`keep=False`: count spans without keeping the requests (a benchmark sends hundreds of
    thousands); `on_count(total)` is called after each request, in arrival order."""

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        keep: bool = True,
        on_count: Callable[[int], None] | None = None,
    ):
        self.port = port or free_port()
        self.host = host
        self.keep = keep
        self.on_count = on_count
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.span_count = 0  # spans decoded so far (cheap to poll, unlike spans())
        self._cond = threading.Condition()

    def _record(self, req: trace_service_pb2.ExportTraceServiceRequest, headers: dict[str, str]) -> None:
        n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        with self._cond:
            if self.keep:
                self.requests.append(req)
                self.headers.append(headers)
            self.span_count += n
            if self.on_count is not None:
                self.on_count(self.span_count)
            self._cond.notify_all()

    def wait_for_count(self, n: int, timeout: float) -> int:
        """Wait until at least n spans arrived (or timeout); returns how many arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.span_count < n and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(min(left, 0.1))
            return self.span_count

    def span_ids(self) -> list[bytes]:
        """Every received span id, in arrival order (duplicates kept)."""
        with self._cond:
            reqs = list(self.requests)
        return [s.span_id for req in reqs for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            reqs = list(self.requests)
        out = []
        for req in reqs:
            for rs in req.resource_spans:
                res = attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    out.extend(ReceivedSpan(s, res, ss.scope.name) for s in ss.spans)
        return out

    def wait_for(self, n: int, timeout: float) -> list[ReceivedSpan]:
        """Wait until at least n spans arrived (or timeout); returns what arrived."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            left = deadline - time.monotonic()
            if len(spans) >= n or left <= 0:
                return spans
            with self._cond:
                self._cond.wait(min(left, 0.1))


class HttpReceiver(_Receiver):
    """POST /v1/traces, application/x-protobuf, like a collector's otlphttp receiver."""

    path = "/v1/traces"

    def __enter__(self) -> "HttpReceiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != receiver.path:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                receiver._record(req, {k.lower(): v for k, v in self.headers.items()})
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class GrpcReceiver(_Receiver):
    """A real grpc.server implementing opentelemetry.proto TraceService/Export."""

    def __enter__(self) -> "GrpcReceiver":
        import grpc  # only here: the benchmarks' http receiver starts without it
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 (grpc naming)
                receiver._record(request, {k: v for k, v in context.invocation_metadata()})
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        bound = self._server.add_insecure_port(f"{self.host}:{self.port}")
        if bound != self.port:
            raise OSError(f"grpc receiver could not bind {self.host}:{self.port}")
        self._server.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self._server.stop(0).wait(5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.otlp_receiver")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)

    def report(total: int) -> None:
        sys.stdout.write(f"spans {total}\n")
        sys.stdout.flush()

    with HttpReceiver(args.port, host=args.host, keep=False, on_count=report):
        print("ready", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
