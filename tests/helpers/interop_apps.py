"""Services instrumented with the real OpenTelemetry Python SDK, for test_interop.py.

Run inside a test namespace as `python3 interop_apps.py CMD ...`:

- `client --url URL`: a TracerProvider with an in-memory exporter, `RequestsInstrumentor`,
  and one GET of URL made inside a started SDK span. Prints one JSON line:
  {"response": <the JSON answer>, "spans": [<finished SDK spans>]}.
- `server --port P --spans FILE`: a WSGI app behind `OpenTelemetryMiddleware` on wsgiref.
  `GET /headers` answers {"headers": [[name, value], ...]} (what obi.demo.app's /headers
  answers, so the demoapp can call it); every finished SDK span is appended to FILE as one
  JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def span_json(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else "",
        "parent_remote": bool(span.parent and span.parent.is_remote),
        "attributes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in (span.attributes or {}).items()},
    }


def _provider(service: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    trace.set_tracer_provider(provider)
    return provider


def client(url: str) -> None:
    import requests
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    provider = _provider("sdk-client")
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    RequestsInstrumentor().instrument()
    tracer = trace.get_tracer("interop")
    with tracer.start_as_current_span("client-work"):
        resp = requests.get(url, timeout=20)
        resp.raise_for_status()
        answer = resp.json()
    provider.force_flush()
    print(json.dumps({"response": answer, "spans": [span_json(s) for s in memory.get_finished_spans()]}))


def server(port: int, spans_file: str) -> None:
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    provider = _provider("sdk-server")
    out = open(spans_file, "a", buffering=1, encoding="utf-8")
    provider.add_span_processor(
        SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=lambda span: json.dumps(span_json(span)) + "\n"))
    )

    def app(environ, start_response):
        headers = [[k[5:].replace("_", "-").title(), v] for k, v in environ.items() if k.startswith("HTTP_")]
        body = json.dumps({"headers": headers, "path": environ.get("PATH_INFO", "")}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = make_server("0.0.0.0", port, OpenTelemetryMiddleware(app), handler_class=QuietHandler)
    print("listening", flush=True)
    httpd.serve_forever()


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("client").add_argument("--url", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--spans", required=True)
    args = p.parse_args()
    if args.cmd == "client":
        client(args.url)
    else:
        server(args.port, args.spans)
    return 0


if __name__ == "__main__":
    sys.exit(main())
