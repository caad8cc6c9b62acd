"""`python3 -m obi.fallback`: run only the userspace datapath, spans as JSON lines on stdout.

For tests and debugging inside a namespace (`ip netns exec NS python3 -m obi.fallback
--ports 8080 --propagation headers`). Prints `ready` once packets are being read; SIGTERM
or SIGINT stop it cleanly (rules removed).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import signal
import sys
import threading

from obi import config
from obi.model import SpanRecord

from .datapath import UserspaceDatapath, cleanup

_FIELDS = [f.name for f in dataclasses.fields(SpanRecord)]


def _span_json(span: SpanRecord) -> str:
    d = {name: getattr(span, name) for name in _FIELDS}  # asdict() deep-copies: 10x slower
    d["kind"] = span.kind.value
    d["datapath"] = span.datapath.value
    return json.dumps(d)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m obi.fallback")
    p.add_argument("--ports", default="", help="open_port value, e.g. 8080,9000-9010")
    p.add_argument("--propagation", default="headers", help="context_propagation value")
    p.add_argument("--queue", type=int, default=177)
    p.add_argument("--cleanup", action="store_true", help="only remove leftover rules and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if args.cleanup:
        for line in cleanup():
            print(line, flush=True)
        return 0
    cfg = config.load(env={"OTEL_EBPF_OPEN_PORT": args.ports, "OTEL_EBPF_BPF_CONTEXT_PROPAGATION": args.propagation})
    # Like the agent's exporter: the packet thread only appends; a writer thread serializes.
    pending: collections.deque = collections.deque()
    wake = threading.Event()

    def sink(span) -> None:
        pending.append(span)
        wake.set()

    def writer() -> None:
        while True:
            wake.wait()
            wake.clear()
            lines = []
            while pending:
                lines.append(_span_json(pending.popleft()) + "\n")
            if lines:
                sys.stdout.write("".join(lines))
                sys.stdout.flush()

    threading.Thread(target=writer, name="span-writer", daemon=True).start()

    dp = UserspaceDatapath(cfg, sink, queue_num=args.queue)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    dp.start()
    print("ready", flush=True)
    try:
        while not done.wait(1.0):
            pass
    finally:
        dp.stop()
        while pending:  # spans of the last moments (the writer may be mid-batch: same order kept)
            sys.stdout.write(_span_json(pending.popleft()) + "\n")
        print(json.dumps({"stats": dp.stats()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
