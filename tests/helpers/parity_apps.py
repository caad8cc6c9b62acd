"""Helper programs the parity suite runs inside its namespaces (`python3 parity_apps.py CMD`).

- `recorder --port P`: the wire witness on C. A connection whose first line is an HTTP/1.x
  request line (a registered method) is answered, request by request (keep-alive), with
  `200` and a body that is exactly the bytes of that request as C's socket received them
  (head and body); a HEAD request gets the same head with its Content-Length and no body.
  Anything else (random bytes, an HTTP/2 preface, a text protocol) is read to EOF and
  echoed back unchanged.
- `driver --listen P`: a client inside B. It listens on a watched port, which makes it a
  selected process, so the agent instruments the requests it sends. It reads one JSON job
  per stdin line and prints one JSON answer per line (see `Driver.run_job`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import re
import socket
import socketserver
import sys

from obi.fallback.http import HTTP_METHODS  # noqa: E402

REQUEST_LINE = re.compile(rb"^(?:" + b"|".join(m.encode() for m in HTTP_METHODS) + rb") \S+ HTTP/1\.[01]\r\n")


def pattern(n: int) -> bytes:
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


class _Conn:
    """Buffered reads on a socket, byte-exact (nothing is re-encoded)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def until(self, marker: bytes) -> bytes | None:
        while marker not in self.buf:
            if not self.fill():
                return None
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self.fill():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest(self) -> bytes:
        while self.fill():
            pass
        out, self.buf = self.buf, b""
        return out


def _header(head: bytes, name: bytes) -> bytes | None:
    # obs-fold lines (starting with SP or HTAB) continue the previous value (RFC 9112 5.2)
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", head)
    for line in unfolded.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip()
    return None


def read_message(conn: _Conn, no_body: bool = False) -> bytes | None:
    """One HTTP/1.x message (request or response) exactly as received, or None at EOF.
    no_body: a response to HEAD (its Content-Length describes a body that is not sent)."""
    head = conn.until(b"\r\n\r\n")
    if head is None:
        return None
    if no_body:
        return head
    if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
        body = b""
        while True:
            size_line = conn.until(b"\r\n")
            assert size_line is not None
            size = int(size_line.split(b";")[0], 16)
            body += size_line
            if size == 0:
                trailer = conn.until(b"\r\n")
                assert trailer is not None
                while trailer != b"\r\n":
                    body += trailer
                    trailer = conn.until(b"\r\n")
                    assert trailer is not None
                return head + body + trailer
            chunk = conn.exactly(size + 2)
            assert chunk is not None
            body += chunk
    length = int(_header(head, b"content-length") or 0)
    body = conn.exactly(length) if length else b""
    assert body is not None
    return head + body


class _Recorder(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn = _Conn(self.request)
        while len(conn.buf) < 24 and b"\r\n" not in conn.buf:
            if not conn.fill():
                break
        if not REQUEST_LINE.match(conn.buf):
            self.request.sendall(conn.rest())  # not HTTP/1.x: echo to EOF
            return
        while True:
            raw = read_message(conn)
            if raw is None:
                return
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(raw)
            self.request.sendall(head if raw.startswith(b"HEAD ") else head + raw)


class _ThreadingServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def recorder(port: int) -> None:
    server = _ThreadingServer(("0.0.0.0", port), _Recorder)
    print("listening", flush=True)
    server.serve_forever()


class Driver:
    """Runs jobs from the test; connections are kept per (addr, port) unless new_conn."""

    def __init__(self) -> None:
        self.raw_conns: dict[tuple[str, int], _Conn] = {}
        self.http_conns: dict[tuple[str, int], http.client.HTTPConnection] = {}

    def _raw_conn(self, addr: str, port: int, new: bool) -> _Conn:
        key = (addr, port)
        if new or key not in self.raw_conns:
            if key in self.raw_conns:
                self.raw_conns[key].sock.close()
            self.raw_conns[key] = _Conn(socket.create_connection(key, timeout=20))
        return self.raw_conns[key]

    def run_job(self, job: dict) -> dict:
        op, addr, port = job["op"], job["addr"], int(job["port"])
        if op == "raw_http":
            # Send these exact bytes as one request; answer the response body (base64).
            conn = self._raw_conn(addr, port, job.get("new_conn", False))
            for piece in job["pieces_b64"]:  # several writes when asked to
                conn.sock.sendall(base64.b64decode(piece))
            answers = []
            head_req = base64.b64decode(job["pieces_b64"][0]).startswith(b"HEAD ")
            for _ in range(job.get("responses", 1)):  # several when the requests were pipelined
                resp = read_message(conn, no_body=head_req)
                assert resp is not None, "connection closed before a response"
                head, _, body = resp.partition(b"\r\n\r\n")
                answers.append(
                    {
                        "status": int(head.split(b" ")[1]),
                        "body_b64": base64.b64encode(body).decode(),
                        "head_b64": base64.b64encode(head).decode(),
                    }
                )
            return answers[0] if len(answers) == 1 else {"answers": answers}
        if op == "raw":
            # Fresh connection, send, half-close, read to EOF.
            sock = socket.create_connection((addr, port), timeout=20)
            sock.sendall(base64.b64decode(job["data_b64"]))
            sock.shutdown(socket.SHUT_WR)
            got = _Conn(sock).rest()
            sock.close()
            return {"data_b64": base64.b64encode(got).decode()}
        if op == "echo":
            key = (addr, port)
            if job.get("new_conn") or key not in self.http_conns:
                self.http_conns[key] = http.client.HTTPConnection(addr, port, timeout=30)
            conn = self.http_conns[key]
            body = pattern(job["size"])
            if job.get("chunked"):
                pieces = [body[i : i + 7000] for i in range(0, len(body), 7000)]
                conn.request("POST", "/echo", body=iter(pieces), encode_chunked=True)
            else:
                conn.request("POST", "/echo", body=body)
            resp = conn.getresponse()
            data = resp.read()
            return {
                "status": resp.status,
                "sent_sha": hashlib.sha256(body).hexdigest(),
                "c_sha": resp.getheader("X-Body-Sha256"),
                "back_sha": hashlib.sha256(data).hexdigest(),
                "len": len(data),
            }
        raise ValueError(f"unknown op {op}")


def driver(listen: int) -> None:
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("0.0.0.0", listen))
    lst.listen(1)
    d = Driver()
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            out = d.run_job(json.loads(line))
        except Exception as e:  # the test reads the error instead of hanging
            out = {"error": repr(e)}
        print(json.dumps(out), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("recorder").add_argument("--port", type=int, required=True)
    sub.add_parser("driver").add_argument("--listen", type=int, required=True)
    args = p.parse_args()
    if args.cmd == "recorder":
        recorder(args.port)
    else:
        driver(args.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
