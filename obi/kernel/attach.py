"""Attachments as context managers that remove only what they created, plus `obi cleanup`.

- `TcAttachment`: a tc program on an interface, as a tcx link (kernel >= 6.6, fd based: it
  vanishes with the process) or as a clsact cls_bpf filter (it survives the process).
- `CgroupAttachment`: a cgroup program as a link (vanishes with the process).
- `SkMsgAttachment`: an sk_msg verdict program on a sockhash (lives as long as the map).

Each live attachment is recorded in `<state_dir>/<pid>.json` so that `cleanup()` can
remove exactly the tc filters / sk_msg attachments an agent that was killed left behind.
Only filters whose program name starts with `obi_` are ever removed, so BPF programs
meant for the agent must be named `obi_*`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import subprocess
import threading
import time
from typing import Any

from ..errors import AttachError, BpfError, MissingFeature
from . import libbpf
from .libbpf import Program
from .netns import current_netns_path, in_netns

log = logging.getLogger("obi.kernel.attach")

DEFAULT_STATE_DIR = "/run/obi"
PROG_PREFIX = "obi_"  # cleanup() removes only filters running programs named like this


# --- state file ------------------------------------------------------------------------


def _proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of `pid`, None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 of stat; fields[0] is field 3


class _StateFile:
    """One JSON file per agent pid listing its live attachments."""

    def __init__(self, state_dir: str):
        self.dir = state_dir
        self.pid = os.getpid()
        self.path = os.path.join(state_dir, f"{self.pid}.json")
        self.entries: dict[int, dict[str, Any]] = {}
        self.next_id = 1
        self.lock = threading.Lock()

    def add(self, entry: dict[str, Any]) -> int:
        with self.lock:
            key = self.next_id
            self.next_id += 1
            self.entries[key] = entry
            self._write()
            return key

    def remove(self, key: int) -> None:
        with self.lock:
            self.entries.pop(key, None)
            self._write()

    def _write(self) -> None:
        try:
            if not self.entries:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                return
            os.makedirs(self.dir, exist_ok=True)
            doc = {
                "pid": self.pid,
                "start_time": _proc_start_time(self.pid),
                "attachments": list(self.entries.values()),
            }
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as e:  # state is best effort; attaching must not fail over it
            log.warning("cannot write attachment state %s: %s", self.path, e)


_states: dict[str, _StateFile] = {}
_states_lock = threading.Lock()


def _state(state_dir: str | None) -> _StateFile | None:
    if not state_dir:
        return None
    with _states_lock:
        st = _states.get(state_dir)
        if st is None or st.pid != os.getpid():  # fresh after fork
            st = _states[state_dir] = _StateFile(state_dir)
        return st


# --- tc ------------------------------------------------------------------------------

_DIRECTIONS = {
    "ingress": (libbpf.BPF_TC_INGRESS, libbpf.BPF_TCX_INGRESS),
    "egress": (libbpf.BPF_TC_EGRESS, libbpf.BPF_TCX_EGRESS),
}


def _tc_filters_present(ifname: str) -> bool | None:
    """Whether any filter is on the clsact hooks of `ifname` (in the calling thread's
    netns); None when it cannot be told (then we keep the qdisc)."""
    try:
        for direction in ("ingress", "egress"):
            out = subprocess.run(
                ["tc", "filter", "show", "dev", ifname, direction],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            if out.strip():
                return True
        return False
    except (OSError, subprocess.SubprocessError):
        return None


def _destroy_clsact_if_empty(ifindex: int) -> str:
    """Remove the clsact qdisc of `ifindex` if no filter is left on it."""
    try:
        ifname = socket.if_indextoname(ifindex)
    except OSError:
        return "device gone"
    present = _tc_filters_present(ifname)
    if present is None:
        return "kept clsact qdisc (could not list filters)"
    if present:
        return "kept clsact qdisc (other filters remain)"
    hook = libbpf.tc_hook(ifindex, libbpf.BPF_TC_INGRESS | libbpf.BPF_TC_EGRESS)
    try:
        libbpf.tc_hook_destroy(hook)
    except BpfError as e:
        if e.errno in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            return "clsact qdisc already gone"
        raise
    return "removed clsact qdisc"


class TcAttachment:
    """A tc program on `ifindex` (in the calling thread's netns), removed on exit.

    backend "tcx": a tcx link (kernel >= 6.6); "tc": a cls_bpf filter on a clsact qdisc,
    created if missing (and then removed on exit if no other filter is left on it);
    "auto": tcx, falling back to tc. `handle`/`priority` 0 let the kernel pick; the values
    used are in `.handle`/`.priority` after attaching."""

    def __init__(
        self,
        prog: Program,
        ifindex: int,
        direction: str = "ingress",
        backend: str = "auto",
        *,
        handle: int = 0,
        priority: int = 0,
        state_dir: str | None = DEFAULT_STATE_DIR,
    ):
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be ingress or egress, not {direction!r}")
        if backend not in ("auto", "tc", "tcx"):
            raise ValueError(f"backend must be auto, tc or tcx, not {backend!r}")
        self.prog = prog
        self.ifindex = ifindex
        self.direction = direction
        self.backend = backend
        self.handle = handle
        self.priority = priority
        self.used: str = ""  # "tcx" or "tc" once attached
        self.created_qdisc = False
        self._link: libbpf.FdLink | None = None
        self._netns_fd: int | None = None
        self._state = _state(state_dir)
        self._state_key: int | None = None

    def __enter__(self) -> "TcAttachment":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> "TcAttachment":
        if self.used:
            return self
        tc_point, tcx_type = _DIRECTIONS[self.direction]
        if self.backend in ("auto", "tcx"):
            try:
                fd = libbpf.link_create(self.prog.fd, self.ifindex, tcx_type)
                self._link = libbpf.FdLink(fd, f"tcx {self.direction} {self.prog.name}")
                self.used = "tcx"
            except BpfError as e:
                if self.backend == "tcx":
                    if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                        raise MissingFeature("tcx", "6.6", str(e)) from None
                    raise AttachError(f"tcx attach of {self.prog.name} to ifindex {self.ifindex}: {e}") from e
                log.info("tcx unavailable (%s), using tc clsact", e)
        if not self.used:
            self._attach_tc(tc_point)
        self._netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self._record()
        return self

    def _attach_tc(self, tc_point: int) -> None:
        hook = libbpf.tc_hook(self.ifindex, tc_point)
        try:
            self.created_qdisc = libbpf.tc_hook_create(hook)
            opts = libbpf.tc_opts(self.prog.fd, self.handle, self.priority)
            libbpf.tc_attach(hook, opts)
        except BpfError as e:
            if self.created_qdisc:
                with contextlib.suppress(BpfError):
                    _destroy_clsact_if_empty(self.ifindex)
            raise AttachError(f"tc attach of {self.prog.name} to ifindex {self.ifindex}: {e}") from e
        self.handle, self.priority = int(opts.handle), int(opts.priority)
        self.used = "tc"

    def _record(self) -> None:
        if self._state is None:
            return
        try:
            info = self.prog.info()
            ifname = socket.if_indextoname(self.ifindex)
        except (BpfError, OSError):
            info, ifname = {}, ""
        self._state_key = self._state.add(
            {
                "kind": self.used,
                "direction": self.direction,
                "ifindex": self.ifindex,
                "ifname": ifname,
                "netns": current_netns_path(),
                "handle": self.handle,
                "priority": self.priority,
                "prog_id": info.get("id"),
                "prog_tag": info.get("tag"),
                "prog_name": info.get("name", self.prog.name),
                "created_qdisc": self.created_qdisc,
            }
        )

    def detach(self) -> None:
        """Remove what attach() created (in the netns it was created in)."""
        if not self.used:
            return
        try:
            if self._link is not None:
                self._link.close()
                self._link = None
            else:
                self._detach_tc()
        finally:
            self.used = ""
            if self._state is not None and self._state_key is not None:
                self._state.remove(self._state_key)
                self._state_key = None
            if self._netns_fd is not None:
                os.close(self._netns_fd)
                self._netns_fd = None

    def _detach_tc(self) -> None:
        same = self._netns_fd is None or os.fstat(self._netns_fd)[1:3] == os.stat("/proc/thread-self/ns/net")[1:3]
        ns = None if same else f"/proc/self/fd/{self._netns_fd}"
        with in_netns(ns):
            tc_point, _ = _DIRECTIONS[self.direction]
            hook = libbpf.tc_hook(self.ifindex, tc_point)
            try:
                libbpf.tc_detach(hook, self.handle, self.priority)
            except BpfError as e:
                if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise AttachError(f"tc detach of {self.prog.name}: {e}") from e
            if self.created_qdisc:
                _destroy_clsact_if_empty(self.ifindex)


# --- cgroup and sk_msg ------------------------------------------------------------------


class CgroupAttachment:
    """A cgroup program attached to the cgroup v2 directory `cgroup_path` through a link
    (bpf_program__attach_cgroup): gone on exit and when the process dies."""

    def __init__(self, prog: Program, cgroup_path: str, *, state_dir: str | None = DEFAULT_STATE_DIR):
        self.prog = prog
        self.cgroup_path = cgroup_path
        self.link: libbpf.Link | None = None
        self._state = _state(state_dir)
        self._state_key: int | None = None

    def __enter__(self) -> "CgroupAttachment":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> "CgroupAttachment":
        if self.link is not None:
            return self
        try:
            fd = libbpf.open_cgroup(self.cgroup_path)
        except OSError as e:
            raise AttachError(f"cannot open cgroup {self.cgroup_path}: {e}") from e
        try:
            self.link = self.prog.attach_cgroup(fd)
        except BpfError as e:
            raise AttachError(f"cgroup attach of {self.prog.name} to {self.cgroup_path}: {e}") from e
        finally:
            os.close(fd)  # the link holds its own reference to the cgroup
        if self._state is not None:
            self._state_key = self._state.add(
                {"kind": "cgroup", "cgroup_path": self.cgroup_path, "prog_name": self.prog.name}
            )
        return self

    def detach(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
        if self._state is not None and self._state_key is not None:
            self._state.remove(self._state_key)
            self._state_key = None


class SkMsgAttachment:
    """An sk_msg verdict program attached to a sockhash/sockmap (not a link: detached on
    exit; after a crash it lasts until the map is freed, which `cleanup()` checks)."""

    def __init__(self, prog: Program, sockmap: libbpf.Map, *, state_dir: str | None = DEFAULT_STATE_DIR):
        self.prog = prog
        self.sockmap = sockmap
        self._att: libbpf.Attachment | None = None
        self._state = _state(state_dir)
        self._state_key: int | None = None

    def __enter__(self) -> "SkMsgAttachment":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> "SkMsgAttachment":
        if self._att is not None:
            return self
        try:
            self._att = libbpf.attach_sk_msg(self.prog, self.sockmap)
        except BpfError as e:
            raise AttachError(f"sk_msg attach of {self.prog.name} to {self.sockmap.name}: {e}") from e
        if self._state is not None:
            pinfo = self.prog.info()
            minfo = libbpf.map_info(self.sockmap.fd)
            self._state_key = self._state.add(
                {
                    "kind": "sk_msg",
                    "prog_id": pinfo["id"],
                    "prog_name": pinfo["name"],
                    "map_id": minfo["id"],
                    "map_name": minfo["name"],
                }
            )
        return self

    def detach(self) -> None:
        if self._att is not None:
            att, self._att = self._att, None
            with contextlib.suppress(BpfError):
                att.detach()
        if self._state is not None and self._state_key is not None:
            self._state.remove(self._state_key)
            self._state_key = None


# --- cleanup of a killed agent ----------------------------------------------------------


def _pid_alive(pid: int, start_time: int | None) -> bool:
    now = _proc_start_time(pid)
    if now is None:
        return False
    return start_time is None or now == start_time


def _prog_name_by_id(prog_id: int) -> tuple[str, int]:
    fd = libbpf.prog_fd_by_id(prog_id)
    try:
        info = libbpf.prog_info(fd)
        return str(info["name"]), int(info["id"])  # type: ignore[arg-type]
    finally:
        os.close(fd)


def _cleanup_tc(rec: dict[str, Any]) -> str:
    where = f"{rec.get('ifname') or rec['ifindex']} {rec['direction']} handle {rec['handle']:#x} prio {rec['priority']}"
    netns = rec.get("netns", "")
    if netns == "?":
        return f"tc filter {where}: netns not reachable, skipped"
    if netns and not os.path.exists(netns):
        return f"tc filter {where}: netns {netns} gone, nothing to do"
    with in_netns(netns):
        ifindex = int(rec["ifindex"])
        try:
            name_now = socket.if_indextoname(ifindex)
        except OSError:
            return f"tc filter {where}: device gone, nothing to do"
        if rec.get("ifname") and name_now != rec["ifname"]:
            return f"tc filter {where}: ifindex now names {name_now}, skipped"
        tc_point, _ = _DIRECTIONS[rec["direction"]]
        hook = libbpf.tc_hook(ifindex, tc_point)
        prog_id = libbpf.tc_query(hook, int(rec["handle"]), int(rec["priority"]))
        if prog_id is None:
            return f"tc filter {where}: already gone"
        try:
            name, _ = _prog_name_by_id(prog_id)
        except BpfError as e:
            return f"tc filter {where}: cannot identify program {prog_id} ({e}), skipped"
        if not name.startswith(PROG_PREFIX):
            return f"tc filter {where}: runs foreign program {name!r}, left alone"
        if rec.get("prog_id") and prog_id != rec["prog_id"]:
            return f"tc filter {where}: program id {prog_id} is not the recorded {rec['prog_id']}, left alone"
        libbpf.tc_detach(hook, int(rec["handle"]), int(rec["priority"]))
        msg = f"removed tc filter {where} (prog {name} id {prog_id})"
        if netns:
            msg += f" in {netns}"
        if rec.get("created_qdisc"):
            msg += "; " + _destroy_clsact_if_empty(ifindex)
        return msg


def _cleanup_sk_msg(rec: dict[str, Any]) -> str:
    what = f"sk_msg {rec.get('prog_name')} on map {rec.get('map_name')} (id {rec.get('map_id')})"
    try:
        map_fd = libbpf.map_fd_by_id(int(rec["map_id"]))
    except BpfError:
        return f"{what}: map freed with its last user, nothing to do"
    try:
        try:
            prog_fd = libbpf.prog_fd_by_id(int(rec["prog_id"]))
        except BpfError:
            return f"{what}: program gone, nothing to do"
        try:
            if not str(libbpf.prog_info(prog_fd)["name"]).startswith(PROG_PREFIX):
                return f"{what}: foreign program, left alone"
            libbpf.prog_detach(prog_fd, map_fd, libbpf.BPF_SK_MSG_VERDICT)
            return f"detached {what}"
        except BpfError as e:
            return f"{what}: detach failed ({e})"
        finally:
            os.close(prog_fd)
    finally:
        os.close(map_fd)


def cleanup(state_dir: str = DEFAULT_STATE_DIR) -> list[str]:
    """Remove what agents that are no longer running left attached, per their state files.

    Returns one line per action (or per thing found already gone). Live agents' files are
    left alone. A state file is deleted once everything in it was handled."""
    done: list[str] = []
    try:
        names = sorted(os.listdir(state_dir))
    except OSError:
        return done
    for fname in names:
        if not fname.endswith(".json"):
            continue
        path = os.path.join(state_dir, fname)
        try:
            with open(path) as f:
                doc = json.load(f)
            pid = int(doc["pid"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            done.append(f"{path}: unreadable state file ({e}), left alone")
            continue
        if _pid_alive(pid, doc.get("start_time")):
            continue
        failed = False
        for rec in doc.get("attachments", []):
            kind = rec.get("kind")
            try:
                if kind == "tc":
                    done.append(f"agent {pid}: " + _cleanup_tc(rec))
                elif kind == "sk_msg":
                    done.append(f"agent {pid}: " + _cleanup_sk_msg(rec))
                elif kind in ("tcx", "cgroup"):
                    done.append(f"agent {pid}: {kind} link of {rec.get('prog_name')} ended with the process")
                else:
                    done.append(f"agent {pid}: unknown attachment kind {kind!r}, skipped")
            except (BpfError, OSError) as e:
                failed = True
                done.append(f"agent {pid}: {kind} cleanup failed: {e}")
        if not failed:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return done


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait until `pid` has exited (helper for tests and the CLI)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _proc_start_time(pid) is None:
            return True
        time.sleep(0.02)
    return False
