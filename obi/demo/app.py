"""Small uninstrumented HTTP services for the demo, the tests and the benchmarks.

Run as `python3 -m obi.demo.app serve --port 8080 [--downstream http://198.18.0.3:8080]`.

The service is thread-per-request (`ThreadingHTTPServer`) and knows nothing of tracing:
that is the point. What it does, per request:

- `GET /headers`: answers with the request headers it received, as JSON, so a test can see
  exactly which `traceparent` arrived.
- `POST /echo`: answers with the body it received (Content-Length or chunked), plus an
  `X-Body-Sha256` header, so a test can prove payload bytes arrived unchanged.
- `GET /bytes?n=N`: answers with N bytes of a fixed pattern.
- anything else: if `--downstream` is set, calls `<downstream>/headers` (over a keep-alive
  connection owned by the serving thread) and embeds the downstream answer; the JSON
  answer also lists the headers this request carried. Query parameters: `calls=N` makes N
  calls (answers in `downstreams`, the first also in `downstream`); `tp=` / `ts=` send
  the service's own `traceparent` / `tracestate` on them, as an instrumented app would.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import socket
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def pattern_bytes(n: int) -> bytes:
    """n bytes of a fixed, non-repeating-per-256 pattern (the same everywhere)."""
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffer the response so head and body leave in one write (the handler flushes after
    # each request); two small writes would meet Nagle + delayed ACK, a 40 ms stall.
    wbufsize = 64 * 1024
    server_version = "obi-demo/1"
    downstream: urllib.parse.SplitResult | None = None
    _local = threading.local()

    def log_message(self, fmt: str, *args) -> None:  # keep the demo output readable
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, body: bytes, ctype: str = "application/json", extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _call_downstream(self, own: dict[str, str]) -> dict:
        target = self.downstream
        assert target is not None
        conn = getattr(self._local, "conn", None)
        for attempt in (1, 2):
            if conn is None:
                conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=10)
                self._local.conn = conn
            try:
                conn.request("GET", (target.path.rstrip("/") or "") + "/headers", headers=own)
                resp = conn.getresponse()
                data = resp.read()
                return {"status": resp.status, "body": json.loads(data or b"null")}
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = self._local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        body = self._read_body()
        headers = [[k, v] for k, v in self.headers.items()]
        if url.path == "/echo":
            digest = hashlib.sha256(body).hexdigest()
            self._reply(200, body, "application/octet-stream", {"X-Body-Sha256": digest})
        elif url.path == "/bytes":
            n = int(urllib.parse.parse_qs(url.query).get("n", ["0"])[0])
            self._reply(200, pattern_bytes(n), "application/octet-stream")
        elif url.path == "/headers" or self.downstream is None:
            self._reply(200, json.dumps({"headers": headers}).encode())
        else:
            query = urllib.parse.parse_qs(url.query)
            own = {name: query[key][0] for key, name in (("tp", "traceparent"), ("ts", "tracestate")) if key in query}
            try:
                downs = [self._call_downstream(own) for _ in range(int(query.get("calls", ["1"])[0]))]
            except (OSError, http.client.HTTPException) as e:
                self._reply(502, json.dumps({"headers": headers, "error": str(e)}).encode())
                return
            answer = {"headers": headers, "downstream": downs[0] if downs else None, "downstreams": downs}
            self._reply(200, json.dumps(answer).encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


class _DualStackServer(ThreadingHTTPServer):
    """Listens on "::" for IPv6 and, through v4-mapped addresses, IPv4 too."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve(port: int, downstream: str = "", host: str = "0.0.0.0") -> None:
    handler = type("Handler", (_Handler,), {"downstream": urllib.parse.urlsplit(downstream) if downstream else None})
    server_class = _DualStackServer if ":" in host else ThreadingHTTPServer
    server = server_class((host, port), handler)
    server.daemon_threads = True
    print(f"listening on {host}:{port}", flush=True)
    server.serve_forever()


def start(host, port: int, downstream: str = "", listen: str = "0.0.0.0"):
    """Start the demo service inside an `obi.demo.topology.Host`; returns the Popen once it listens."""
    argv = [sys.executable, "-m", "obi.demo.app", "serve", "--port", str(port), "--host", listen]
    if downstream:
        argv += ["--downstream", downstream]
    proc = host.popen(argv, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening" not in line:
        raise RuntimeError(f"demo service on {host.name}:{port} did not start: {line!r}")
    return proc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m obi.demo.app")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run a demo HTTP service")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--host", default="0.0.0.0", help='address to listen on; "::" listens on IPv6 and IPv4')
    s.add_argument("--downstream", default="", help="base URL to call for each request")
    args = p.parse_args(argv)
    try:
        serve(args.port, args.downstream, args.host)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
