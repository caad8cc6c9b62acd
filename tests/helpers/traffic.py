"""Traffic for the integration tests: the demo service on a test host, requests sent from
inside hosts, and what to look for in the answers.

- `serve(host)`: the demo service (obi.demo.app) on PORT; `http_get(host, url)`: one
  request from inside a host, the JSON answer returned.
- `traceparent_values(headers)`: the traceparent values among the headers a service saw.
- `CONCURRENT_CODE`: keep-alive clients, each request with its own trace id.
- `READ_RESPONSE_SRC`: an HTTP response reader for the client scripts run inside hosts.
"""

from __future__ import annotations

import json
import subprocess
import sys

from obi.demo import app as demoapp

PORT = 8080
CLIENT_PORT = 8081  # the test client in B listens here: that makes it a selected process
TP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TP_SPAN = "00f067aa0ba902b7"


def serve(host, downstream: str = "") -> subprocess.Popen:
    return demoapp.start(host, PORT, downstream)


def http_get(host, url: str, headers: dict[str, str] | None = None) -> dict:
    code = (
        "import json,sys,urllib.request\n"
        "req=urllib.request.Request(sys.argv[1], headers=json.loads(sys.argv[2]))\n"
        "print(urllib.request.urlopen(req, timeout=10).read().decode())\n"
    )
    r = host.run([sys.executable, "-c", code, url, json.dumps(headers or {})], timeout=30)
    return json.loads(r.stdout)


def traceparent_values(headers: list[list[str]]) -> list[str]:
    return [v for k, v in headers if k.lower() == "traceparent"]


# 32 keep-alive clients in A, each request with its own trace id; B echoes what C got.
CONCURRENT_CODE = r"""
import http.client, json, secrets, sys, threading
host, n_clients, n_req = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bad, done, errors = [], [], []
def worker(k):
    conn = http.client.HTTPConnection(host, 8080, timeout=30)
    for i in range(n_req):
        trace = secrets.token_hex(16)
        raw = b""
        try:
            conn.request("GET", f"/w/{k}/{i}", headers={"traceparent": f"00-{trace}-{secrets.token_hex(8)}-01"})
            raw = conn.getresponse().read()
            body = json.loads(raw)
            tps = [v for k2, v in body["downstream"]["body"]["headers"] if k2.lower() == "traceparent"]
        except Exception as e:
            errors.append(f"{e!r}: {raw[:300]!r}")
            conn.close(); conn = http.client.HTTPConnection(host, 8080, timeout=30); continue
        if len(tps) != 1 or tps[0].split("-")[1] != trace:
            bad.append((trace, tps))
        done.append(trace)
ts = [threading.Thread(target=worker, args=(k,)) for k in range(n_clients)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"done": len(done), "bad": bad[:5], "n_bad": len(bad), "errors": errors[:5]}))
"""


# Python source put in front of the client scripts the tests run inside a host
# (`python -c`): read_response(f) reads one Content-Length framed HTTP/1.1 response from a
# binary file and returns its body parsed as JSON.
READ_RESPONSE_SRC = r"""
import json
def read_response(f):
    f.readline()  # status line
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        if k.lower() == "content-length":
            length = int(v)
    return json.loads(f.read(length))
"""
