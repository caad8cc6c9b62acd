"""The no-op NFQUEUE consumer: accepts every packet unchanged, counts them.

Run inside the server's namespace as `python3 -m bench.nfq_noop --queue N`. It is the
floor of an NFQUEUE design that makes every packet wait for Python: the
kernel->userspace->kernel round trip plus the smallest possible Python callback, with no
parsing. (The agent's own reader does that only for client connections.) Prints "ready" once bound, and one
JSON line {"packets": N} on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from netfilterqueue import NetfilterQueue


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.nfq_noop")
    p.add_argument("--queue", type=int, required=True)
    args = p.parse_args(argv)
    count = 0

    def accept(pkt) -> None:
        nonlocal count
        count += 1
        pkt.accept()

    def finish(_signum, _frame) -> None:
        # The C receive loop may be blocked; print and leave from the handler.
        sys.stdout.write(json.dumps({"packets": count}) + "\n")
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    nfq = NetfilterQueue()
    nfq.bind(args.queue, accept, max_len=4096)
    print("ready", flush=True)
    try:
        nfq.run()
    finally:
        nfq.unbind()
    return 0


if __name__ == "__main__":
    sys.exit(main())
