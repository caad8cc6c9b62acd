"""Shift journal and resumed translation: what a killed agent leaves is enough for the next
one to translate the same connection identically; the hold rules come first, unbypassed."""

from __future__ import annotations

import os
import socket

from scapy.layers.inet import IP, TCP

from obi.config import Config, PortRange
from obi.fallback import codec, rules, shift_journal
from obi.fallback.flows import Tracker

B, C = "198.18.0.2", "198.18.0.3"


class Owners:
    def server_pid(self, port):
        return None

    def client_pid(self, pkt):
        return 42

    def exe(self, pid):
        return ""


class Recorder(shift_journal.Journal):
    """A journal in a temporary file (no /run/obi, no ss needed)."""

    def __init__(self, path):
        super().__init__(str(path))
        self.rewrite([])


def tracker(journal):
    cfg = Config(context_propagation=frozenset({"headers"}), open_ports=(PortRange(8080, 8080),))
    return Tracker(cfg, lambda s: None, Owners(), mark=rules.MARK, shift_mark=rules.SHIFT, journal=journal)


def pkt(flags, seq, ack=9000, payload=b"", out=True):
    ip = IP(src=B, dst=C) if out else IP(src=C, dst=B)
    sport, dport = (40000, 8080) if out else (8080, 40000)
    return bytes(ip / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack) / payload)


REQ = b"GET /a HTTP/1.1\r\nHost: c\r\n\r\n"


def test_journal_lets_a_new_tracker_translate_the_same_connection(tmp_path):
    j1 = Recorder(tmp_path / "j")
    t1 = tracker(j1)
    t1.handle(pkt("S", 999, 0), True)
    t1.handle(pkt("SA", 8999, 1000, out=False), False)
    v = t1.handle(pkt("PA", 1000, payload=REQ), True)
    assert v.mark == rules.MARK | rules.SHIFT and len(codec.parse(v.payload).payload) == len(REQ) + 70
    # The agent dies here. What the journal holds:
    live = shift_journal.load(j1.path)
    key = (socket.inet_aton(B), 40000, socket.inet_aton(C), 8080)
    assert list(live) == [key] and live[key][0] == 1000 and live[key][1][0][0] == len(b"GET /a HTTP/1.1\r\n")

    t2 = tracker(Recorder(tmp_path / "j2"))
    t2.resume(key, *live[key])
    # A retransmission of the first request carries the identical inserted bytes; the next
    # request is shifted by them (and gets no header: the resumed flow's framing is unknown).
    assert t2.handle(pkt("PA", 1000, payload=REQ), True).payload == v.payload
    nxt = codec.parse(t2.handle(pkt("PA", 1000 + len(REQ), payload=REQ), True).payload)
    assert nxt.seq == 1000 + len(REQ) + 70 and bytes(nxt.payload) == REQ and codec.verify_checksums(nxt.data)
    ack = pkt("A", 9000, ack=1000 + 2 * len(REQ) + 70, out=False)
    assert codec.parse(t2.handle(ack, False).payload).ack == 1000 + 2 * len(REQ)
    assert t2.stats["headers_inserted"] == 0 and t2.stats["flows_resumed"] == 1

    # The connection ends: the journal says so, and nothing is left to resume.
    t1.handle(pkt("R", 1000 + 2 * len(REQ)), True)
    assert shift_journal.load(j1.path) == {}


def test_hold_rules_precede_bypass_rules_and_have_no_bypass():
    specs = rules.rule_specs([(8080, 8080)], 177, 1300, "obi-fallback-1-ab")
    queue_rules = [(chain, spec) for chain, spec in specs if "NFQUEUE" in spec]
    held = [i for i, (_, spec) in enumerate(queue_rules) if f"{rules.SHIFT:#x}/{rules.SHIFT:#x}" in spec]
    assert len(held) == 2 and held == [0, 1]
    assert all("--queue-bypass" not in queue_rules[i][1] for i in held)
    assert all("--queue-bypass" in spec for i, (_, spec) in enumerate(queue_rules) if i not in held)
    # Only the watched-port (server side) rules feed the observe queue, after the client rules.
    queues = [spec[spec.index("--queue-num") + 1] for _, spec in queue_rules]
    ports = [i for i, (_, spec) in enumerate(queue_rules) if "multiport" in spec]
    assert ports and ports == list(range(len(queue_rules) - len(ports), len(queue_rules)))
    assert all(queues[i] == str(rules.observe_queue(177)) == "178" for i in ports)
    assert all(q == "177" for i, q in enumerate(queues) if i not in ports)
    # Incoming observed segments only of connections the kernel saw both ways: no SYN, no
    # segment from a forged source the stack never answered, reaches the agent.
    observed_in = [spec for chain, spec in queue_rules if chain == "INPUT" and "multiport" in spec]
    assert observed_in and all(spec[spec.index("--ctstate") + 1] == "ESTABLISHED" for spec in observed_in)
    save = next(spec for chain, spec in specs if chain == "POSTROUTING")
    assert save[save.index("--mask") + 1] == f"{rules.MARK | rules.SHIFT:#x}"
    assert rules._instance_owner("obi-fallback-123-beef") == (123, None)
    assert rules._instance_owner("obi-fallback-123-4567-beef") == (123, 4567)
    assert rules._instance_owner("obi-fallback-x") is None


def test_rule_owners_are_told_by_pid_and_start_time():
    """A rule's agent is alive only if its pid runs *and* started when the agent did: a pid
    reused by another process (a restarted container's agent is often pid 1 again) does
    not keep a dead agent's rules alive."""
    import os

    me = rules.instance()
    pid, start, _ = me.split("-")
    assert int(pid) == os.getpid() and int(start) == rules.proc_start_time(os.getpid())
    assert rules.owner_alive(f"obi-fallback-{me}")
    assert not rules.owner_alive(f"obi-fallback-{pid}-{int(start) + 1}-beef")  # same pid, other process
    assert rules.owner_alive(f"obi-fallback-{pid}-beef")  # older tags: by pid only
    assert not rules.owner_alive("obi-fallback-999999999-1-beef")  # no such pid
    assert rules.owner_alive("obi-fallback-someone-elses")  # unknown shape: never guessed dead


def test_journal_is_owned_by_one_running_agent(tmp_path):
    """The journal's lock tells a running agent's journal from a dead one's: a second
    opener is refused, and cleanup's abort_journaled() leaves it (and the connections it
    lists) alone, instead of resetting the connections a running agent translates."""
    key = (socket.inet_aton(B), 40000, socket.inet_aton(C), 8080)
    path = str(tmp_path / "j.jsonl")
    owner = shift_journal.Journal(path)
    owner.open()
    owner.insertion(key, 1000, 17, b"x" * 70)
    try:
        import pytest

        with pytest.raises(shift_journal.JournalBusy):
            shift_journal.Journal(path).open()
        aborted = []
        real_abort, shift_journal.abort = shift_journal.abort, lambda k: aborted.append(k) or True
        try:
            out = shift_journal.abort_journaled(path)
        finally:
            shift_journal.abort = real_abort
        assert aborted == [] and "running agent" in out[0]
        assert shift_journal.load(path) == {key: (1000, [(17, b"x" * 70)])}
        # A refused opener's close never removes the owner's journal.
        other = shift_journal.Journal(path)
        with pytest.raises(shift_journal.JournalBusy):
            other.open()
        other.close(remove=True)
        assert os.path.exists(path)
    finally:
        owner.close(remove=False)
    # The owner is gone (its lock with it): now cleanup resets what the journal lists.
    aborted = []
    real_abort, shift_journal.abort = shift_journal.abort, lambda k: aborted.append(k) or True
    try:
        out = shift_journal.abort_journaled(path)
    finally:
        shift_journal.abort = real_abort
    assert aborted == [key] and not os.path.exists(path)


def test_journal_lines_are_the_json_the_loader_reads(tmp_path):
    """Journal lines are formatted by hand (one per inserted header, on the hot path); they
    must be exactly what json.dumps gives, for both address families."""
    import json

    for key in (
        (socket.inet_aton("198.18.0.2"), 40000, socket.inet_aton("198.18.0.3"), 8082),
        (
            socket.inet_pton(socket.AF_INET6, "fd00:198:18::2"),
            1,
            socket.inet_pton(socket.AF_INET6, "fd00:198:18::3"),
            65535,
        ),
    ):
        line = shift_journal.Journal._line(key, 4294967295, 123, b"Traceparent: x\r\n")
        assert (
            line
            == json.dumps(
                {"k": shift_journal._key_json(key), "base": 4294967295, "pos": 123, "blob": b"Traceparent: x\r\n".hex()}
            )
            + "\n"
        )
        j = Recorder(str(tmp_path / "j.jsonl"))
        j.rewrite([])
        j.insertion(key, 7, 0, b"ab")
        j.end(key)
        with open(j.path) as f:
            lines = f.read().splitlines()
        assert lines[1] == json.dumps({"k": shift_journal._key_json(key), "end": 1})
        assert shift_journal.load(j.path) == {}
        j.close(remove=True)


def test_a_zombie_agent_counts_as_gone():
    """An agent killed but not yet reaped by its parent (a zombie) holds nothing any more:
    its rules are stale."""
    import subprocess
    import time

    p = subprocess.Popen(["sleep", "0"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{p.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    try:
        assert rules.proc_start_time(p.pid) is None
        assert not rules.owner_alive(f"obi-fallback-{p.pid}-1-beef")
    finally:
        p.wait()


class FakeIptables:
    """Records the iptables commands Rules runs; refuses `-m cgroup` when told to."""

    def __init__(self, refuse_cgroup=False):
        self.rules: dict[str, list[list[str]]] = {}
        self.refuse_cgroup = refuse_cgroup

    def __call__(self, argv):
        import subprocess

        tool, op, chain, spec = argv[0], argv[4], argv[5] if len(argv) > 5 else "", argv[6:]
        rules_ = self.rules.setdefault(f"{tool} {chain}", [])
        ok = True
        if op == "-A":
            if self.refuse_cgroup and "cgroup" in spec:
                ok = False
            else:
                rules_.append(spec)
        elif op == "-D":
            ok = spec in rules_
            if ok:
                rules_.remove(spec)
        elif op == "-F":
            rules_.clear()
        return subprocess.CompletedProcess(argv, 0 if ok else 1, "", "" if ok else "Couldn't load match `cgroup'")


def syn_paths(fake, rules_obj):
    out = set()
    for spec in fake.rules.get(f"iptables {rules_obj.chain}", []):
        out.add(spec[spec.index("--path") + 1] if "--path" in spec else None)
    return out


def test_syn_rules_follow_the_cgroups_of_the_selected_processes(monkeypatch):
    """Issue 12, finding 5: only the SYNs of the selected processes' cgroups are queued; the
    rules follow the selection; a cgroup outside the agent's cgroup namespace, or a kernel
    without the match, means every SYN (never fewer than needed)."""
    fake = FakeIptables()
    monkeypatch.setattr(rules, "_run", fake)
    r = rules.Rules([(8080, 8080)], 177, 1300, "1-2-beef")
    r.__enter__()
    jump = [s for s in fake.rules["iptables OUTPUT"] if "--syn" in s]
    assert jump and jump[0][-2:] == ["-j", r.chain]
    r.set_syn_cgroups({"/svc/a", "/svc/b"})
    assert syn_paths(fake, r) == {"/svc/a", "/svc/b"}
    queue = fake.rules[f"iptables {r.chain}"][0]
    assert queue[queue.index("--queue-num") + 1] == "179" and "--queue-bypass" in queue
    r.set_syn_cgroups({"/svc/b", "/svc/c"})
    assert syn_paths(fake, r) == {"/svc/b", "/svc/c"} and syn_paths(fake, r) == {
        s[s.index("--path") + 1] for s in fake.rules[f"ip6tables {r.chain}"]
    }
    r.set_syn_cgroups({"/../kubepods/pod1"})  # outside the agent's cgroup namespace
    assert syn_paths(fake, r) == {None} and not r.cgroup_match
    r.remove()
    assert not any(fake.rules.values())

    fake = FakeIptables(refuse_cgroup=True)
    monkeypatch.setattr(rules, "_run", fake)
    r = rules.Rules([(8080, 8080)], 177, 1300, "1-2-beef")
    r.__enter__()
    r.set_syn_cgroups({"/svc/a"})
    assert syn_paths(fake, r) == {None}
