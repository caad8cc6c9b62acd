"""`python3 -m obi.fallback`: run only the userspace datapath, spans as JSON lines on stdout.

For tests and debugging inside a namespace (`ip netns exec NS python3 -m obi.fallback
--ports 8080 --propagation headers`). Prints `ready` once packets are being read; SIGTERM
or SIGINT stop it cleanly (rules removed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading

from obi import config

from .datapath import UserspaceDatapath, cleanup


def _span_json(span) -> str:
    d = dataclasses.asdict(span)
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
    lock = threading.Lock()

    def sink(span) -> None:
        line = _span_json(span)
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

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
        print(json.dumps({"stats": dp.stats()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
