"""iptables rules of the userspace path, as a context manager that removes only its own.

Every rule carries the comment `obi-fallback-<pid>-<start>-<hex>` (the agent's pid, its
start time in clock ticks, a random tag); `Rules` deletes exactly the rules it added, and
`remove_stale()` / `cleanup()` delete the `obi-fallback` rules whose agent is gone (no such
pid, or a pid reused by another process) in the current network namespace, and nothing
else: a running agent's rules are left alone. All rules are in
the mangle table, for IPv4 (iptables) and IPv6 (ip6tables):

- server side: TCP to/from the watched ports (INPUT --dports of connections conntrack sees
  as ESTABLISHED, OUTPUT --sports), to the *observe* queue (`queue + 1`): those segments
  are only read, never changed, so the reader accepts them at once and the agent parses
  copies (see `queue`); everything else below goes to the *sync* queue (`queue`), whose
  packets wait for the agent's verdict;
- client side: outgoing SYNs jump to a chain of this agent (`obi-syn-<hex>`) that queues
  those of the cgroups the selected processes are in (`-m cgroup --path`, kept up to date
  by `Rules.set_syn_cgroups`; every SYN where the kernel lacks that match) to the *SYN*
  queue (`queue + 2`), bound fail-open: when the agent is behind and the queue is full, a
  SYN passes unmarked (that connection is not traced) rather than being dropped. The
  agent marks the SYN of a connection owned by a selected process, POSTROUTING saves the
  mark in the connmark, and from then on both directions of that connection are queued
  by connmark;
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
import secrets
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


def syn_queue(queue: int) -> int:
    return queue + 2


SYN_CHAIN_PREFIX = "obi-syn-"


def syn_chain(tag: str) -> str:
    """The SYN chain of the agent tagged `tag` (its random part: chain names are short)."""
    return SYN_CHAIN_PREFIX + tag.rsplit("-", 1)[-1]


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
            ("OUTPUT", ["-p", "tcp", "--syn", *c, "-j", syn_chain(tag)]),
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
            # Incoming: only connections the kernel has seen both ways (never a SYN, nor a
            # segment from a forged source the stack did not answer).
            (
                "INPUT",
                [
                    "-p",
                    "tcp",
                    "-m",
                    "multiport",
                    "--dports",
                    chunk,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "ESTABLISHED",
                    *c,
                    *observe,
                ],
            ),
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
        self.chain = syn_chain(self.tag) if clients else ""
        self.syn_queue = syn_queue(queue)
        self.chains: list[str] = []  # tools whose SYN chain we created
        self.syn_rules: dict[tuple[str, str | None], list[str]] = {}  # (tool, cgroup or None) -> spec
        self.cgroup_match = True  # False once the kernel refused -m cgroup: every SYN is queued

    def __enter__(self) -> "Rules":
        try:
            for tool in TOOLS:
                if self.chain:
                    r = _run([tool, "-w", "-t", TABLE, "-N", self.chain])
                    if r.returncode != 0 and "exists" not in r.stderr:
                        raise OSError(f"{tool} -N {self.chain}: {r.stderr.strip()}")
                    _run([tool, "-w", "-t", TABLE, "-F", self.chain])  # a stale one of the same name
                    self.chains.append(tool)
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

    def _syn_spec(self, cgroup: str | None) -> list[str]:
        match = ["-m", "cgroup", "--path", cgroup] if cgroup is not None else []
        return [
            *match,
            "-m",
            "comment",
            "--comment",
            self.tag,
            "-j",
            "NFQUEUE",
            "--queue-num",
            str(self.syn_queue),
            "--queue-bypass",
        ]

    def set_syn_cgroups(self, cgroups: set[str]) -> None:
        """Queue the SYNs of processes in these cgroups (v2 paths) from now on, and no others.
        Every SYN is queued instead (as before cgroup matching, never fewer than needed) once
        a path cannot be matched: the kernel lacks the match, or a path lies outside the
        agent's cgroup namespace (`/../`, a container with its own), or a rule is refused."""
        if not self.chain:
            return
        if self.cgroup_match and any(not cg.startswith("/") or "/.." in cg for cg in cgroups):
            self._all_syns(f"cgroups outside this cgroup namespace ({sorted(cgroups)[0]})")
        wanted: set[str | None] = set(cgroups) if self.cgroup_match else {None}
        for tool in self.chains:
            have = {cg for t, cg in self.syn_rules if t == tool}
            for cg in sorted(wanted - have, key=str):
                spec = self._syn_spec(cg)
                r = _run([tool, "-w", "-t", TABLE, "-A", self.chain, *spec])
                if r.returncode == 0:
                    self.syn_rules[(tool, cg)] = spec
                elif cg is not None:
                    self._all_syns(f"{tool} refused the cgroup match for {cg}: {r.stderr.strip()}")
                    return self.set_syn_cgroups(cgroups)
                else:
                    log.warning("could not queue outgoing SYNs (%s): %s", tool, r.stderr.strip())
            for cg in have - wanted:
                spec = self.syn_rules.pop((tool, cg))
                _run([tool, "-w", "-t", TABLE, "-D", self.chain, *spec])

    def _all_syns(self, why: str) -> None:
        if self.cgroup_match:
            log.warning("userspace datapath: every outgoing SYN is queued (%s)", why)
        self.cgroup_match = False

    def remove(self) -> None:
        while self.added:
            tool, chain, spec = self.added.pop()
            r = _run([tool, "-w", "-t", TABLE, "-D", chain, *spec])
            if r.returncode != 0:
                log.warning("could not delete %s rule %s %s: %s", tool, chain, shlex.join(spec), r.stderr.strip())
        while self.chains:  # no rule jumps to it any more
            tool = self.chains.pop()
            _run([tool, "-w", "-t", TABLE, "-F", self.chain])
            r = _run([tool, "-w", "-t", TABLE, "-X", self.chain])
            if r.returncode != 0:
                log.warning("could not delete %s chain %s: %s", tool, self.chain, r.stderr.strip())
        self.syn_rules.clear()


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


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of `pid`, None if it does not run (no such
    process, or a zombie that exited and was not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3, the state
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22


def instance(pid: int | None = None) -> str:
    """The tag of this agent's rules: `<pid>-<start time>-<random hex>`."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{proc_start_time(pid) or 0}-{secrets.token_hex(2)}"


def _instance_owner(comment: str) -> tuple[int, int | None] | None:
    """(pid, start time) of `obi-fallback-<pid>-<start>-<hex>`; start None for the older
    `obi-fallback-<pid>-<hex>`; None for another shape."""
    parts = comment[len(TAG_PREFIX) + 1 :].split("-")
    if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
        return int(parts[0]), int(parts[1])
    if len(parts) == 2 and parts[0].isdigit():
        return int(parts[0]), None
    return None


def owner_alive(comment: str) -> bool:
    """Whether the agent that tagged a rule with `comment` still runs. A rule of another
    shape counts as alive (never deleted by guesswork)."""
    owner = _instance_owner(comment)
    if owner is None:
        return True
    pid, start = owner
    now = proc_start_time(pid)
    return now is not None and (start is None or now == start)


def remove_stale() -> list[str]:
    """Delete the rules of agents that are gone (a kill -9 left them); live agents' rules
    stay. Called by a starting agent once its own rules are in place (see `datapath`)."""
    done = []
    for tool, args in list_ours():
        comment = args[args.index("--comment") + 1]
        if owner_alive(comment):
            continue
        if _run([tool, "-w", "-t", TABLE, "-D", *args[1:]]).returncode == 0:
            done.append(f"removed {tool} -t {TABLE} {shlex.join(args)}")
    done += _remove_orphan_chains()
    return done


def _remove_orphan_chains() -> list[str]:
    """Delete `obi-syn-*` chains that no rule jumps to (their agent is gone)."""
    done = []
    for tool in TOOLS:
        r = _run([tool, "-w", "-t", TABLE, "-S"])
        if r.returncode != 0:
            continue
        lines = [shlex.split(line) for line in r.stdout.splitlines()]
        chains = {a[1] for a in lines if a[:1] == ["-N"] and len(a) > 1 and a[1].startswith(SYN_CHAIN_PREFIX)}
        used = {a[a.index("-j") + 1] for a in lines if a[:1] == ["-A"] and "-j" in a}
        for chain in sorted(chains - used):
            _run([tool, "-w", "-t", TABLE, "-F", chain])
            if _run([tool, "-w", "-t", TABLE, "-X", chain]).returncode == 0:
                done.append(f"removed {tool} -t {TABLE} chain {chain}")
    return done


def cleanup() -> list[str]:
    """Remove what userspace-path agents that are gone left in this netns; returns what was
    done. Connections that carried inserted headers are reset first (without an agent they
    could only stall, held by the rules, or, once the rules are gone, be corrupted), unless
    a running agent owns the journal (it translates them). A running agent's rules stay."""
    done = shift_journal.abort_journaled()
    done += remove_stale()
    live = sorted({args[args.index("--comment") + 1] for _, args in list_ours()})
    done += [f"left the rules of running agent {tag} alone" for tag in live]
    return done
