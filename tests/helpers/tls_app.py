"""TLS test services for the kernel path's TCP-option tests (no tracing code in here).

    python3 tls_app.py backend --port 8443 --cert c.pem --key c.key
        HTTPS service: POST /echo answers the body with X-Body-Sha256; anything else
        answers {"path": ...}.
    python3 tls_app.py front --port 8080 --backend 198.18.0.3:8443 --ca c.pem
        Plain HTTP service, thread per connection: each request /<n> POSTs n bytes of
        obi.demo.app.pattern_bytes to the backend's /echo over one keep-alive TLS
        connection per serving thread, and answers JSON {status, sent_sha, got_sha,
        echo_sha, conn_reused}.

`make_cert(dir)` writes a self-signed certificate (CN=c, SAN IP) with openssl.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from obi.demo.app import pattern_bytes  # noqa: E402


def make_cert(directory: str, ip: str) -> tuple[str, str]:
    cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "c.key")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=c",
            "-days",
            "1",
            "-addext",
            f"subjectAltName=IP:{ip}",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:
        pass

    def _reply(self, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class _Backend(_Quiet):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._reply(body, {"X-Body-Sha256": hashlib.sha256(body).hexdigest()})

    def do_GET(self) -> None:
        self._reply(json.dumps({"path": self.path}).encode())


class _Front(_Quiet):
    backend = ("", 0)
    ctx: ssl.SSLContext
    _local = threading.local()

    def do_GET(self) -> None:
        n = int(self.path.strip("/") or 0)
        body = pattern_bytes(n)
        conn = getattr(self._local, "conn", None)
        reused = conn is not None
        if conn is None:
            conn = self._local.conn = http.client.HTTPSConnection(*self.backend, context=self.ctx, timeout=10)
        conn.request("POST", "/echo", body=body)
        resp = conn.getresponse()
        data = resp.read()
        self._reply(
            json.dumps(
                {
                    "status": resp.status,
                    "sent_sha": hashlib.sha256(body).hexdigest(),
                    "got_sha": resp.getheader("X-Body-Sha256"),
                    "echo_sha": hashlib.sha256(data).hexdigest(),
                    "conn_reused": reused,
                }
            ).encode()
        )


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend")
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--cert", required=True)
    b.add_argument("--key", required=True)
    f = sub.add_parser("front")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--backend", required=True)
    f.add_argument("--ca", required=True)
    args = p.parse_args()
    if args.cmd == "backend":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        server = ThreadingHTTPServer(("0.0.0.0", args.port), _Backend)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    else:
        ctx = ssl.create_default_context(cafile=args.ca)
        host, port = args.backend.rsplit(":", 1)
        handler = type("Front", (_Front,), {"backend": (host, int(port)), "ctx": ctx})
        server = ThreadingHTTPServer(("0.0.0.0", args.port), handler)
    server.daemon_threads = True
    print(f"listening on {args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
