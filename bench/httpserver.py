"""The benchmark's HTTP server: single-process asyncio, HTTP/1.1 keep-alive, fixed answer.

Run as `python3 -m bench.httpserver --port 8080`. It answers every request with a
13-byte body. Chosen over `obi.demo.app` (thread per connection, ~10x slower) so that the
server is not the only thing measured; it is still Python, so a C server (nginx) would
show a larger relative agent overhead: see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

BODY = b"Hello, world\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: obi-bench\r\nContent-Type: text/plain\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)
_MAX_HEADER = 64 * 1024


class HttpProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""
        self.need = 0  # body bytes of the current request still to skip

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = []
        close = False
        while True:
            if self.need:
                take = min(self.need, len(buf))
                buf, self.need = buf[take:], self.need - take
                if self.need:
                    break
                out.append(RESPONSE)
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEADER:
                    close = True
                break
            head = buf[:end].lower()
            buf = buf[end + 4 :]
            length = 0
            pos = head.find(b"\r\ncontent-length:")
            if pos >= 0:
                line_end = head.find(b"\r\n", pos + 2)
                try:
                    length = int(head[pos + 17 : line_end if line_end >= 0 else None])
                except ValueError:
                    close = True
                    break
            if b"\r\nconnection: close" in head:
                close = True
            if length:
                self.need = length
                continue
            out.append(RESPONSE)
            if close:
                break
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))
        if close:
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HttpProtocol, host, port, reuse_address=True, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.httpserver")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
