"""Network namespaces for the calling thread.

`in_netns(path)` switches the calling thread into a network namespace and back;
`in_new_netns(fn)` runs `fn` in a thread inside a fresh, throw-away network namespace;
`current_netns_path()` names the calling thread's namespace (for the attachment records).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Any, Callable, Iterator, TypeVar

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]

T = TypeVar("T")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(path: str | None) -> Iterator[None]:
    """Run the block with the calling thread in the network namespace at `path`
    (e.g. /run/netns/NAME); `None` or "" means stay where we are. Always switches back."""
    if not path:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def in_new_netns(fn: Callable[[], T], timeout: float = 10.0) -> T:
    """Run `fn()` in a new thread that first unshares into a fresh network namespace.

    The namespace disappears when the thread ends (unless `fn` kept something in it alive).
    Exceptions of `fn` are re-raised here."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            box["result"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=body, name="obi-new-netns", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError("function in new network namespace did not finish")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def current_netns_path() -> str:
    """Path naming the calling thread's netns: "" for the initial one (that of pid 1), a
    /run/netns/NAME entry when one matches, else "?" (not reachable by cleanup)."""
    me = _ns_id("/proc/thread-self/ns/net")
    try:
        if _ns_id("/proc/1/ns/net") == me:
            return ""
    except OSError:
        pass
    try:
        for name in sorted(os.listdir("/run/netns")):
            path = os.path.join("/run/netns", name)
            with contextlib.suppress(OSError):
                if _ns_id(path) == me:
                    return path
    except OSError:
        pass
    return "?"
