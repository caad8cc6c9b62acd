"""`python3 -m bench` / `obi bench`: run the benchmarks (see bench/README.md).

`bench` is not part of the installed distribution: it is found because the current
directory is on sys.path, so run it from the repository root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _check_root() -> None:
    if not (_ROOT / "obi").is_dir() or not (_ROOT / "bench" / "harness.py").is_file():
        sys.exit(f"bench: expected to run from the obi-py repository root, found {_ROOT}")
    if str(_ROOT) not in sys.path:  # e.g. started by runpy with the package found elsewhere
        sys.path.insert(0, str(_ROOT))
    if os.geteuid() != 0:
        sys.exit("bench: needs root (network namespaces, iptables in them, BPF). Run: sudo python3 -m bench")


if __name__ == "__main__":
    _check_root()
    from bench.harness import main

    sys.exit(main())
