"""Shift journal: the per-connection sequence shift outlives the agent process.

Once a header was inserted into a connection, the peer and the local TCP stack disagree
on sequence numbers for the rest of that connection, and only the agent translates.
Packets of such a connection that pass untranslated are not just lost: the peer takes
the tail of a segment as new data at the wrong stream offset. So those connections are
marked (connmark bit `rules.SHIFT`) and queued *without* --queue-bypass: with no agent
they stall instead of being corrupted. This journal lets a restarted agent resume their
translation (`Journal.open`), and lets `cleanup` reset the ones nobody will resume
(`abort_journaled`), so applications see a reset instead of a stall.

One file per network namespace under /run/obi, JSON lines appended with one write(2)
per insertion (the page cache survives the process; a host reboot ends the connections
anyway): {"k": key, "base": seq, "pos": offset, "blob": hex} for an insertion,
{"k": key, "end": 1} when the connection ended.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import subprocess
from typing import Iterable

log = logging.getLogger("obi.fallback")

STATE_DIR = "/run/obi"
COMPACT_BYTES = 4 << 20  # rewrite the journal from live state beyond this size

Key = tuple[bytes, int, bytes, int]  # local addr, local port, peer addr, peer port (packed addrs)
Shift = tuple[int, list[tuple[int, bytes]]]  # out_base, [(orig offset, inserted bytes)]


def journal_path(state_dir: str = STATE_DIR) -> str:
    """One journal per network namespace (the inode of /proc/self/ns/net names it)."""
    return os.path.join(state_dir, f"fallback-shift-net{os.stat('/proc/self/ns/net').st_ino}.jsonl")


def _key_json(key: Key) -> list:
    return [key[0].hex(), key[1], key[2].hex(), key[3]]


def _key_from(k: list) -> Key:
    return (bytes.fromhex(k[0]), int(k[1]), bytes.fromhex(k[2]), int(k[3]))


def load(path: str) -> dict[Key, Shift]:
    """Connections whose insertions the journal holds and that did not end."""
    live: dict[Key, Shift] = {}
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    key = _key_from(rec["k"])
                except (ValueError, KeyError, IndexError, TypeError):
                    continue  # a torn last line of a killed writer
                if rec.get("end"):
                    live.pop(key, None)
                    continue
                base, inserts = live.setdefault(key, (int(rec["base"]), []))
                inserts.append((int(rec["pos"]), bytes.fromhex(rec["blob"])))
    except OSError:
        pass
    return live


def _addr(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(packed) == 16 else socket.AF_INET, packed)


def _endpoint(packed: bytes, port: int) -> str:
    return f"[{_addr(packed)}]:{port}" if len(packed) == 16 else f"{_addr(packed)}:{port}"


def connection_exists(key: Key) -> bool:
    """Whether a TCP socket with exactly this 4-tuple exists in this netns."""
    r = subprocess.run(
        ["ss", "-t", "-a", "-H", "-n", "src", _endpoint(key[0], key[1]), "dst", _endpoint(key[2], key[3])],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return r.returncode == 0 and bool(r.stdout.strip())


def abort(key: Key) -> bool:
    """Reset one connection on both ends (SOCK_DESTROY via `ss -K`)."""
    r = subprocess.run(
        ["ss", "-K", "-t", "-H", "-n", "src", _endpoint(key[0], key[1]), "dst", _endpoint(key[2], key[3])],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return r.returncode == 0 and bool(r.stdout.strip())


def describe(key: Key) -> str:
    return f"{_endpoint(key[0], key[1])} -> {_endpoint(key[2], key[3])}"


def _lock(path: str) -> int | None:
    """An exclusive flock on `<journal>.lock`: the fd while held, None if another process
    (a running agent) holds it. The kernel drops it when the holder dies, however it dies."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


class JournalBusy(OSError):
    """Another running agent owns this network namespace's journal."""


class Journal:
    def __init__(self, path: str | None = None) -> None:
        self.path = path or journal_path()
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._size = 0

    def open(self) -> dict[Key, Shift]:
        """Take the journal (its lock, held until close or death), read what a previous agent
        left (connections that still exist), compact, append. JournalBusy if a running agent
        holds it."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self._lock_fd = _lock(self.path)
        if self._lock_fd is None:
            raise JournalBusy(f"{self.path} is held by a running agent")
        live = {k: v for k, v in load(self.path).items() if connection_exists(k)}
        self.rewrite(live.items())
        return live

    def rewrite(self, shifts: Iterable[tuple[Key, Shift]]) -> None:
        tmp = self.path + ".tmp"
        # 0600: the journal holds trace ids and the inserted bytes.
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="ascii") as f:
            for key, (base, inserts) in shifts:
                for pos, blob in inserts:
                    f.write(self._line(key, base, pos, blob))
        os.replace(tmp, self.path)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    @staticmethod
    def _line(key: Key, base: int, pos: int, blob: bytes) -> str:
        # The text json.dumps gives for {"k": _key_json(key), "base":, "pos":, "blob":}
        # (hex strings and ints need no escaping), at a fraction of its cost: one line is
        # written for every inserted header.
        return (
            f'{{"k": ["{key[0].hex()}", {key[1]:d}, "{key[2].hex()}", {key[3]:d}], '
            f'"base": {base:d}, "pos": {pos:d}, "blob": "{blob.hex()}"}}\n'
        )

    def insertion(self, key: Key, base: int, pos: int, blob: bytes) -> None:
        self._write(self._line(key, base, pos, blob))

    def end(self, key: Key) -> None:
        self._write(f'{{"k": ["{key[0].hex()}", {key[1]:d}, "{key[2].hex()}", {key[3]:d}], "end": 1}}\n')

    def _write(self, line: str) -> None:
        if self._fd is None:
            return
        try:
            self._size += os.write(self._fd, line.encode("ascii"))
        except OSError as e:  # a full /run must not stop the datapath
            log.warning("shift journal write failed: %s", e)

    @property
    def too_big(self) -> bool:
        return self._size > COMPACT_BYTES

    def close(self, remove: bool) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if remove and self._lock_fd is not None:  # never another agent's journal
            try:
                os.unlink(self.path)
            except OSError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None


def abort_journaled(path: str | None = None) -> list[str]:
    """Reset the journaled connections that still exist (nobody translates them any more)
    and remove the journal. For `cleanup` after a killed agent; nothing is touched while a
    running agent holds the journal (those connections are its own, being translated)."""
    path = path or journal_path()
    if not os.path.exists(path):
        return []
    lock = _lock(path)
    if lock is None:
        return [f"left {path} alone (a running agent holds it)"]
    try:
        done = []
        for key in load(path):
            if abort(key):
                done.append(f"reset connection {describe(key)} (had inserted headers, agent gone)")
        try:
            os.unlink(path)
        except OSError:
            pass
        return done
    finally:
        os.close(lock)
