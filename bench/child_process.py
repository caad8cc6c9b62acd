"""Child processes of the benchmark: started in a namespace, their output kept, stopped cleanly."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment, with the repo root importable (for `-m bench.*`) and no stray
    OTEL_* settings of the caller leaking into the agent under test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OBI_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


class Proc:
    """A long-running child; its stdout/stderr lines are kept (the last `keep` of each)
    and offered to `on_line(stream, line)` as they arrive."""

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        keep: int = 400,
        on_line: Callable[[str, str], None] | None = None,
        popen: Callable[..., subprocess.Popen] | None = None,
    ):
        self.argv = list(argv)
        self.out: collections.deque[str] = collections.deque(maxlen=keep)
        self.err: collections.deque[str] = collections.deque(maxlen=keep)
        self._on_line = on_line
        start = popen or subprocess.Popen
        self.proc = start(
            self.argv,
            env=env if env is not None else child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(REPO_ROOT),
        )
        self._threads = [
            threading.Thread(target=self._read, args=(s, n), daemon=True)
            for s, n in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream, name: str) -> None:
        sink = self.out if name == "out" else self.err
        for line in stream:
            line = line.rstrip("\n")
            sink.append(line)
            if self._on_line is not None:
                self._on_line(name, line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Poll until predicate() or the process exits or timeout; True if predicate held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if not self.alive():
                time.sleep(0.1)  # let the readers drain the last lines
                return predicate()
            time.sleep(0.02)
        return predicate()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int | None:
        """Signal, wait, kill if needed. Returns the exit code (None if it had to be killed)."""
        if self.alive():
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                self.join()
                return None
        self.join()
        return self.proc.returncode

    def join(self) -> None:
        for t in self._threads:
            t.join(2)

    def tail(self, n: int = 8) -> list[str]:
        return list(self.err)[-n:] + ([] if self.err else list(self.out)[-n:])
