"""iptables rules of the userspace path, as a context manager that removes only its own.

Every rule carries the comment `obi-fallback-<instance>`; `Rules` deletes exactly the rules
it added, `cleanup()` deletes every rule whose comment starts with `obi-fallback` (what a
killed agent left) in the current network namespace, and nothing else. All rules are in
the mangle table, for IPv4 (iptables) and IPv6 (ip6tables):

- server side: TCP to/from the watched ports (INPUT --dports, OUTPUT --sports), to the
  *observe* queue (`queue + 1`): those segments are only read, never changed, so the reader
  accepts them at once and the agent parses copies (see `queue`); everything else below
  goes to the *sync* queue (`queue`), whose packets wait for the agent's verdict;
- client side: every outgoing SYN is queued once; the agent marks the SYN of a connection
  owned by a selected process, POSTROUTING saves the mark in the connmark, and from then
  on both directions of that connection are queued by connmark;
- the SYN-ACK of those connections gets its MSS clamped (TCPMSS, before the queue rule)
  so a segment that grows by an inserted header still fits the path MTU;
- once a header was inserted into a connection the agent also sets the SHIFT bit (saved
  in the connmark the same way): its packets are queued *without* --queue-bypass, because
  untranslated they would be taken at the wrong stream offset (see `shift_journal`). With no agent
  those connections stall until an agent resumes them or `cleanup` resets them.
Every other NFQUEUE rule has --queue-bypass: with no agent reading, packets pass untouched.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from typing import Sequence

from . import shift_journal

log = logging.getLogger("obi.fallback")

TAG_PREFIX = "obi-fallback"
MARK = 0x02000000  # one mark bit: "connection of a selected process"
SHIFT = 0x04000000  # one more: "bytes were inserted into this connection"
DEFAULT_QUEUE = 177  # the sync queue; the observe queue is the next number
TABLE = "mangle"
TOOLS = ("iptables", "ip6tables")


def _multiport_chunks(ports: Sequence[tuple[int, int]]) -> list[str]:
    """multiport takes at most 15 ports (a range counts as two) per rule."""
    chunks, cur, used = [], [], 0
    for low, high in ports:
        item, cost = (str(low), 1) if low == high else (f"{low}:{high}", 2)
        if used + cost > 15:
            chunks.append(",".join(cur))
            cur, used = [], 0
        cur.append(item)
        used += cost
    if cur:
        chunks.append(",".join(cur))
    return chunks


def observe_queue(queue: int) -> int:
    return queue + 1


def rule_specs(
    ports: Sequence[tuple[int, int]], queue: int, mss: int, tag: str, clients: bool = True
) -> list[tuple[str, list[str]]]:
    """(chain, rule arguments) in insertion order; the same list for both IP versions.
    Client-side rules come first: a connection of a selected process to a local watched
    port is a client connection on both hooks, so it must not reach the observe queue."""
    q = ["-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]
    observe = ["-j", "NFQUEUE", "--queue-num", str(observe_queue(queue)), "--queue-bypass"]
    c = ["-m", "comment", "--comment", tag]
    conn = ["-m", "connmark", "--mark", f"{MARK:#x}/{MARK:#x}"]
    shifted = ["-m", "connmark", "--mark", f"{SHIFT:#x}/{SHIFT:#x}"]
    hold = ["-j", "NFQUEUE", "--queue-num", str(queue)]  # no bypass: see the module doc
    specs: list[tuple[str, list[str]]] = []
    if clients:
        specs += [
            ("INPUT", ["-p", "tcp", "--tcp-flags", "SYN,RST", "SYN", *conn, *c, "-j", "TCPMSS", "--set-mss", str(mss)]),
            ("INPUT", ["-p", "tcp", *shifted, *c, *hold]),
            ("OUTPUT", ["-p", "tcp", *shifted, *c, *hold]),
            ("INPUT", ["-p", "tcp", *conn, *c, *q]),
            ("OUTPUT", ["-p", "tcp", *conn, *c, *q]),
            ("OUTPUT", ["-p", "tcp", "--syn", *c, *q]),
            (
                "POSTROUTING",
                [
                    "-m",
                    "mark",
                    "--mark",
                    f"{MARK:#x}/{MARK:#x}",
                    *c,
                    "-j",
                    "CONNMARK",
                    "--save-mark",
                    "--mask",
                    f"{MARK | SHIFT:#x}",
                ],
            ),
        ]
    for chunk in _multiport_chunks(ports):
        specs += [
            ("INPUT", ["-p", "tcp", "-m", "multiport", "--dports", chunk, *c, *observe]),
            ("OUTPUT", ["-p", "tcp", "-m", "multiport", "--sports", chunk, *c, *observe]),
        ]
    return specs


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


class Rules:
    """Add the rules on enter, delete exactly those on exit (also after a partial enter)."""

    def __init__(
        self, ports: Sequence[tuple[int, int]], queue: int, mss: int, instance: str, clients: bool = True
    ) -> None:
        self.tag = f"{TAG_PREFIX}-{instance}"
        self.specs = rule_specs(ports, queue, mss, self.tag, clients)
        self.added: list[tuple[str, str, list[str]]] = []

    def __enter__(self) -> "Rules":
        try:
            for tool in TOOLS:
                for chain, spec in self.specs:
                    r = _run([tool, "-w", "-t", TABLE, "-A", chain, *spec])
                    if r.returncode != 0:
                        raise OSError(f"{tool} -A {chain} {shlex.join(spec)}: {r.stderr.strip()}")
                    self.added.append((tool, chain, spec))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        while self.added:
            tool, chain, spec = self.added.pop()
            r = _run([tool, "-w", "-t", TABLE, "-D", chain, *spec])
            if r.returncode != 0:
                log.warning("could not delete %s rule %s %s: %s", tool, chain, shlex.join(spec), r.stderr.strip())


def list_ours(prefix: str = TAG_PREFIX) -> list[tuple[str, list[str]]]:
    """(tool, `-A ...` arguments) of every rule whose comment starts with prefix."""
    found = []
    for tool in TOOLS:
        r = _run([tool, "-w", "-t", TABLE, "-S"])
        if r.returncode != 0:
            continue
        for line in r.stdout.splitlines():
            args = shlex.split(line)
            if args[:1] != ["-A"] or "--comment" not in args:
                continue
            comment = args[args.index("--comment") + 1]
            if comment.startswith(prefix):
                found.append((tool, args))
    return found


def _instance_pid(comment: str) -> int | None:
    """pid part of `obi-fallback-<pid>-<hex>`, None for another shape."""
    parts = comment[len(TAG_PREFIX) + 1 :].split("-")
    return int(parts[0]) if len(parts) == 2 and parts[0].isdigit() else None


def remove_stale() -> list[str]:
    """Delete the rules of agents whose process is gone (a kill -9 left them); live agents'
    rules stay. Called at start, so a restarted agent does not run behind stale rules."""
    done = []
    for tool, args in list_ours():
        pid = _instance_pid(args[args.index("--comment") + 1])
        if pid is None or os.path.exists(f"/proc/{pid}"):
            continue
        if _run([tool, "-w", "-t", TABLE, "-D", *args[1:]]).returncode == 0:
            done.append(f"removed {tool} -t {TABLE} {shlex.join(args)}")
    return done


def cleanup() -> list[str]:
    """Delete the rules of any userspace-path agent in this netns; returns what was removed.
    Connections that carried inserted headers are reset first: without an agent they could
    only stall (held by the rules) or, once the rules are gone, be corrupted."""
    done = shift_journal.abort_journaled()
    for tool, args in list_ours():
        r = _run([tool, "-w", "-t", TABLE, "-D", *args[1:]])
        if r.returncode == 0:
            done.append(f"removed {tool} -t {TABLE} {shlex.join(args)}")
    return done
