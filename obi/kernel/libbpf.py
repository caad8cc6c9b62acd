"""The one ctypes binding to libbpf (libbpf.so.1, API of libbpf 1.1).

Everything BPF in obi goes through this module: open/load objects, find programs and maps,
attach, run programs with BPF_PROG_TEST_RUN (the ring buffer is read without libbpf, by
`obi.kernel.ringbuf`). Only functions present in libbpf 1.1 are used; newer kernel
features (tcx links) go through the bpf(2) syscall with an attr laid out here
(`link_create`).

Error convention of libbpf 1.x: int functions return -errno, pointer functions return NULL
and set errno. Both become `BpfError(what, errno, log)`; `log` holds what libbpf printed
during the call (for a failed load this includes the verifier log).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import logging
import os
import platform
import struct
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_int,
    c_long,
    c_size_t,
    c_uint,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Iterator, Self

from ..errors import BpfError

log = logging.getLogger("obi.kernel.libbpf")

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(None, use_errno=True)


def _fn(name: str, restype, *argtypes):
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


# --- constants (uapi/linux/bpf.h) ------------------------------------------------------

# enum bpf_attach_type
BPF_CGROUP_INET_INGRESS = 0
BPF_CGROUP_INET_EGRESS = 1
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_SKB_STREAM_PARSER = 4
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_SK_MSG_VERDICT = 7
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47

# enum bpf_map_type (the ones obi cares about)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_SOCKHASH = 18
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
BPF_MAP_TYPE_RINGBUF = 27
_PERCPU_MAP_TYPES = {
    BPF_MAP_TYPE_PERCPU_HASH,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_LRU_PERCPU_HASH,
    BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE,
}

# bpf_map_update_elem flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# bpf(2) commands used directly
BPF_MAP_CREATE = 0
BPF_LINK_CREATE = 28

# enum bpf_tc_attach_point (libbpf.h)
BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_CUSTOM = 4

# bpf(2) syscall number per architecture (libbpf 1.1 has no tcx link API).
_BPF_SYSCALL = {
    "x86_64": 321,
    "aarch64": 280,
    "riscv64": 280,
    "i386": 357,
    "i686": 357,
    "armv7l": 386,
    "ppc64le": 361,
    "s390x": 351,
}

# --- libbpf print callback: collect messages of the current call ------------------------

_PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
_libc.vsnprintf.restype = c_int
# va_list travels as a pointer on x86_64 and aarch64 (array / by-reference aggregate).
_libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
_LIBBPF_DEBUG = 2
_tls = threading.local()


# Size of the va_list object the callback's pointer refers to, where copying those bytes
# is what va_copy does (x86_64: one __va_list_tag; aarch64: the AAPCS64 struct). Lets us
# measure a message (the verifier log can be megabytes) before formatting it for real.
_VA_LIST_BYTES = {"x86_64": 24, "aarch64": 32}.get(platform.machine(), 0)
_PRINT_FALLBACK_SIZE = 1 << 20


def _format(fmt: bytes, args: int) -> str:
    size = _PRINT_FALLBACK_SIZE
    if _VA_LIST_BYTES:
        copy = ctypes.create_string_buffer(ctypes.string_at(args, _VA_LIST_BYTES), _VA_LIST_BYTES)
        size = _libc.vsnprintf(None, 0, fmt, ctypes.addressof(copy)) + 1
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _libc.vsnprintf(buf, len(buf), fmt, args)
    return buf.value.decode(errors="replace") if n > 0 else ""


def _on_print(level: int, fmt: bytes, args: int) -> int:
    try:
        if level >= _LIBBPF_DEBUG:
            return 0
        text = _format(fmt, args)
        sink = getattr(_tls, "sink", None)
        if sink is not None:
            sink.append(text)
        else:
            log.debug("libbpf: %s", text.rstrip())
    except Exception:  # never let Python errors unwind into C
        pass
    return 0


_print_cb = _PRINT_FN(_on_print)  # kept alive for the life of the process
_fn("libbpf_set_print", c_void_p, _PRINT_FN)(_print_cb)


class _Capture:
    """Collect libbpf's messages printed by this thread during a block."""

    def __enter__(self) -> "_Capture":
        self.lines: list[str] = []
        self._prev = getattr(_tls, "sink", None)
        _tls.sink = self.lines
        return self

    def __exit__(self, *exc) -> None:
        _tls.sink = self._prev

    @property
    def text(self) -> str:
        return "".join(self.lines).strip()


def _check(ret: int, what: str, captured: _Capture | None = None) -> int:
    if ret < 0:
        raise BpfError(what, -ret, captured.text if captured else "")
    return ret


def _check_ptr(ptr: int | None, what: str, captured: _Capture | None = None) -> int:
    if not ptr:
        err = ctypes.get_errno() or _errno.EINVAL
        raise BpfError(what, err, captured.text if captured else "")
    return ptr


# --- prototypes ------------------------------------------------------------------------

_obj_open_file = _fn("bpf_object__open_file", c_void_p, c_char_p, c_void_p)
_obj_load = _fn("bpf_object__load", c_int, c_void_p)
_obj_close = _fn("bpf_object__close", None, c_void_p)
_obj_find_prog = _fn("bpf_object__find_program_by_name", c_void_p, c_void_p, c_char_p)
_obj_next_prog = _fn("bpf_object__next_program", c_void_p, c_void_p, c_void_p)
_obj_next_map = _fn("bpf_object__next_map", c_void_p, c_void_p, c_void_p)
_obj_btf = _fn("bpf_object__btf", c_void_p, c_void_p)

_prog_name = _fn("bpf_program__name", c_char_p, c_void_p)
_prog_section = _fn("bpf_program__section_name", c_char_p, c_void_p)
_prog_fd = _fn("bpf_program__fd", c_int, c_void_p)
_prog_type = _fn("bpf_program__type", c_int, c_void_p)
_prog_set_autoload = _fn("bpf_program__set_autoload", c_int, c_void_p, c_bool)
_prog_autoload = _fn("bpf_program__autoload", c_bool, c_void_p)
_prog_attach = _fn("bpf_program__attach", c_void_p, c_void_p)
_prog_attach_cgroup = _fn("bpf_program__attach_cgroup", c_void_p, c_void_p, c_int)
_prog_attach_tp = _fn("bpf_program__attach_tracepoint", c_void_p, c_void_p, c_char_p, c_char_p)
_prog_attach_raw_tp = _fn("bpf_program__attach_raw_tracepoint", c_void_p, c_void_p, c_char_p)

_link_destroy = _fn("bpf_link__destroy", c_int, c_void_p)
_link_fd = _fn("bpf_link__fd", c_int, c_void_p)
_prog_attach_iter = _fn("bpf_program__attach_iter", c_void_p, c_void_p, c_void_p)
_iter_create = _fn("bpf_iter_create", c_int, c_int)

_map_name = _fn("bpf_map__name", c_char_p, c_void_p)
_map_fd = _fn("bpf_map__fd", c_int, c_void_p)
_map_type = _fn("bpf_map__type", c_int, c_void_p)
_map_key_size = _fn("bpf_map__key_size", c_uint32, c_void_p)
_map_value_size = _fn("bpf_map__value_size", c_uint32, c_void_p)
_map_max_entries = _fn("bpf_map__max_entries", c_uint32, c_void_p)
_map_set_max_entries = _fn("bpf_map__set_max_entries", c_int, c_void_p, c_uint32)
_map_reuse_fd = _fn("bpf_map__reuse_fd", c_int, c_void_p, c_int)
_map_initial_value = _fn("bpf_map__initial_value", c_void_p, c_void_p, POINTER(c_size_t))

_map_lookup = _fn("bpf_map_lookup_elem", c_int, c_int, c_void_p, c_void_p)
_map_update = _fn("bpf_map_update_elem", c_int, c_int, c_void_p, c_void_p, c_uint64)
_map_delete = _fn("bpf_map_delete_elem", c_int, c_int, c_void_p)
_map_next_key = _fn("bpf_map_get_next_key", c_int, c_int, c_void_p, c_void_p)
_map_create = _fn("bpf_map_create", c_int, c_int, c_char_p, c_uint32, c_uint32, c_uint32, c_void_p)

_prog_test_run_opts = _fn("bpf_prog_test_run_opts", c_int, c_int, c_void_p)
_prog_attach_fd = _fn("bpf_prog_attach", c_int, c_int, c_int, c_int, c_uint)
_prog_detach2 = _fn("bpf_prog_detach2", c_int, c_int, c_int, c_int)
_prog_get_fd_by_id = _fn("bpf_prog_get_fd_by_id", c_int, c_uint32)
_map_get_fd_by_id = _fn("bpf_map_get_fd_by_id", c_int, c_uint32)
_obj_get_info_by_fd = _fn("bpf_obj_get_info_by_fd", c_int, c_int, c_void_p, POINTER(c_uint32))
_num_possible_cpus = _fn("libbpf_num_possible_cpus", c_int)

_btf_find_by_name_kind = _fn("btf__find_by_name_kind", c_int, c_void_p, c_char_p, c_uint32)
_btf_type_by_id = _fn("btf__type_by_id", c_void_p, c_void_p, c_uint32)
_btf_name_by_offset = _fn("btf__name_by_offset", c_char_p, c_void_p, c_uint32)


class TcHook(Structure):
    """struct bpf_tc_hook (libbpf.h)."""

    _fields_ = [
        ("sz", c_size_t),
        ("ifindex", c_int),
        ("attach_point", c_int),
        ("parent", c_uint32),
        ("_pad", c_uint32),
    ]


class TcOpts(Structure):
    """struct bpf_tc_opts (libbpf.h)."""

    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
        ("_pad", c_uint32),
    ]


class _TestRunOpts(Structure):
    """struct bpf_test_run_opts (bpf.h)."""

    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


_tc_hook_create = _fn("bpf_tc_hook_create", c_int, POINTER(TcHook))
_tc_hook_destroy = _fn("bpf_tc_hook_destroy", c_int, POINTER(TcHook))
_tc_attach = _fn("bpf_tc_attach", c_int, POINTER(TcHook), POINTER(TcOpts))
_tc_detach = _fn("bpf_tc_detach", c_int, POINTER(TcHook), POINTER(TcOpts))
_tc_query = _fn("bpf_tc_query", c_int, POINTER(TcHook), POINTER(TcOpts))


def tc_hook(ifindex: int, attach_point: int) -> TcHook:
    return TcHook(sz=ctypes.sizeof(TcHook), ifindex=ifindex, attach_point=attach_point)


def tc_opts(prog_fd: int = 0, handle: int = 0, priority: int = 0, flags: int = 0) -> TcOpts:
    return TcOpts(sz=ctypes.sizeof(TcOpts), prog_fd=prog_fd, handle=handle, priority=priority, flags=flags)


def tc_hook_create(hook: TcHook) -> bool:
    """Create the clsact qdisc of `hook`. True if we created it, False if it existed."""
    ret = _tc_hook_create(ctypes.byref(hook))
    if ret == -_errno.EEXIST:
        return False
    _check(ret, f"bpf_tc_hook_create(ifindex={hook.ifindex})")
    return True


def tc_hook_destroy(hook: TcHook) -> None:
    _check(_tc_hook_destroy(ctypes.byref(hook)), f"bpf_tc_hook_destroy(ifindex={hook.ifindex})")


def tc_attach(hook: TcHook, opts: TcOpts) -> None:
    """Attach opts.prog_fd; libbpf fills opts.handle/priority/prog_id from the reply."""
    _check(_tc_attach(ctypes.byref(hook), ctypes.byref(opts)), f"bpf_tc_attach(ifindex={hook.ifindex})")


def tc_detach(hook: TcHook, handle: int, priority: int) -> None:
    opts = tc_opts(handle=handle, priority=priority)
    _check(_tc_detach(ctypes.byref(hook), ctypes.byref(opts)), f"bpf_tc_detach(ifindex={hook.ifindex})")


def tc_query(hook: TcHook, handle: int, priority: int) -> int | None:
    """The prog id of the filter at (handle, priority), None if there is none."""
    opts = tc_opts(handle=handle, priority=priority)
    ret = _tc_query(ctypes.byref(hook), ctypes.byref(opts))
    if ret in (-_errno.ENOENT, -_errno.EINVAL, -_errno.ENODEV):
        return None
    _check(ret, f"bpf_tc_query(ifindex={hook.ifindex})")
    return int(opts.prog_id)


# --- raw bpf(2) ------------------------------------------------------------------------

_libc.syscall.restype = c_long


def bpf_syscall(cmd: int, attr: bytes | bytearray) -> int:
    """bpf(cmd, attr, len(attr)); returns the result or raises BpfError."""
    nr = _BPF_SYSCALL.get(platform.machine())
    if nr is None:
        raise BpfError(f"bpf(2) syscall number unknown for {platform.machine()}", _errno.ENOSYS)
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    ret = _libc.syscall(c_long(nr), c_int(cmd), buf, c_uint(len(attr)))
    if ret < 0:
        raise BpfError(f"bpf(cmd={cmd})", ctypes.get_errno())
    return int(ret)


def link_create(prog_fd: int, target: int, attach_type: int, flags: int = 0) -> int:
    """BPF_LINK_CREATE: returns the link fd (the attachment lives as long as the fd).

    Layout of attr.link_create: prog_fd u32, target_fd/target_ifindex u32, attach_type u32,
    flags u32, then a per-type union (tcx: relative_fd u32, pad, expected_revision u64),
    left zero here.
    """
    attr = struct.pack("=IIII", prog_fd, target, attach_type, flags) + bytes(48)
    try:
        return bpf_syscall(BPF_LINK_CREATE, attr)
    except BpfError as e:
        raise BpfError(f"link create (attach_type={attach_type}, target={target})", e.errno) from None


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "") -> int:
    """bpf_map_create: returns a new map fd (the caller closes it)."""
    ret = _map_create(map_type, name.encode() or None, key_size, value_size, max_entries, None)
    return _check(ret, f"bpf_map_create(type={map_type})")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    _check(_prog_attach_fd(prog_fd, target_fd, attach_type, flags), f"bpf_prog_attach(type={attach_type})")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(_prog_detach2(prog_fd, target_fd, attach_type), f"bpf_prog_detach2(type={attach_type})")


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_prog_get_fd_by_id(prog_id), f"bpf_prog_get_fd_by_id({prog_id})")


def map_fd_by_id(map_id: int) -> int:
    return _check(_map_get_fd_by_id(map_id), f"bpf_map_get_fd_by_id({map_id})")


# Offsets in struct bpf_prog_info (linux/bpf.h, stable UAPI: fields are only appended).
_PI_NAME = 64
_PI_RUN_TIME_NS = 192  # run_time_ns, run_cnt: counted while kernel.bpf_stats_enabled=1
_PI_VERIFIED_INSNS = 216  # Linux >= 5.16; 0 on older kernels (the field is not filled)


def prog_info(fd: int) -> dict[str, object]:
    """id, type, tag (hex), name, verified_insns (instructions the verifier processed to
    accept the program), run_time_ns and run_cnt of a loaded program, from struct
    bpf_prog_info."""
    buf = ctypes.create_string_buffer(256)
    size = c_uint32(len(buf))
    _check(_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "bpf_obj_get_info_by_fd(prog)")
    raw = buf.raw
    ptype, pid = struct.unpack_from("=II", raw, 0)
    tag = raw[8:16].hex()
    name = raw[_PI_NAME : _PI_NAME + 16].split(b"\0", 1)[0].decode(errors="replace")
    run_time_ns, run_cnt = struct.unpack_from("=QQ", raw, _PI_RUN_TIME_NS)
    (verified,) = struct.unpack_from("=I", raw, _PI_VERIFIED_INSNS)
    return {
        "id": pid,
        "type": ptype,
        "tag": tag,
        "name": name,
        "verified_insns": verified,
        "run_time_ns": run_time_ns,
        "run_cnt": run_cnt,
    }


def map_info(fd: int) -> dict[str, object]:
    """type, id, key/value size, max entries, name of a map, from struct bpf_map_info."""
    buf = ctypes.create_string_buffer(128)
    size = c_uint32(len(buf))
    _check(_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "bpf_obj_get_info_by_fd(map)")
    mtype, mid, ksz, vsz, maxe, flags = struct.unpack_from("=IIIIII", buf.raw, 0)
    name = buf.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return {"type": mtype, "id": mid, "key_size": ksz, "value_size": vsz, "max_entries": maxe, "name": name}


def num_possible_cpus() -> int:
    return _check(_num_possible_cpus(), "libbpf_num_possible_cpus")


# --- closing and detaching --------------------------------------------------------------


class _Closing:
    """A context manager whose block ends with `close()`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Detaching(_Closing):
    """Something attached to the kernel: `close()` detaches it."""

    def detach(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.detach()


class _OwnedLink(_Detaching):
    """A link this process holds: detached on close, and also when garbage collected."""

    def __del__(self) -> None:
        try:
            self.detach()
        except Exception:
            pass


# --- links and attachments -------------------------------------------------------------


class Link(_OwnedLink):
    """A libbpf `struct bpf_link`: destroyed (detached) on close, or when the process dies."""

    def __init__(self, ptr: int, what: str):
        self._ptr: int | None = ptr
        self.what = what

    @property
    def fd(self) -> int:
        if not self._ptr:
            raise BpfError(f"{self.what}: link closed", _errno.EBADF)
        return _link_fd(self._ptr)

    def detach(self) -> None:
        if self._ptr:
            ptr, self._ptr = self._ptr, None
            _link_destroy(ptr)


class FdLink(_OwnedLink):
    """A BPF link we hold as a bare fd (e.g. a tcx link made with `link_create`)."""

    def __init__(self, fd: int, what: str):
        self._fd: int | None = fd
        self.what = what

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise BpfError(f"{self.what}: link closed", _errno.EBADF)
        return self._fd

    def detach(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class Attachment(_Detaching):
    """A bpf_prog_attach() attachment (not a link): survives the process, detach explicitly."""

    def __init__(self, prog_fd: int, target_fd: int, attach_type: int, what: str):
        self.prog_fd = prog_fd
        self.target_fd = target_fd
        self.attach_type = attach_type
        self.what = what
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            self.attached = False
            prog_detach(self.prog_fd, self.target_fd, self.attach_type)


# --- objects, programs, maps -----------------------------------------------------------


class Program:
    """One program of a `BpfObject` (valid while the object is open)."""

    def __init__(self, obj: "BpfObject", ptr: int):
        self._obj = obj
        self._ptr = ptr
        self.name: str = _prog_name(ptr).decode()
        self.section: str = (_prog_section(ptr) or b"").decode()

    @property
    def fd(self) -> int:
        fd = _prog_fd(self._ptr)
        if fd < 0:
            raise BpfError(f"program {self.name}: not loaded", -fd)
        return fd

    @property
    def prog_type(self) -> int:
        return _prog_type(self._ptr)

    @property
    def autoload(self) -> bool:
        return bool(_prog_autoload(self._ptr))

    def set_autoload(self, on: bool) -> None:
        _check(_prog_set_autoload(self._ptr, on), f"set_autoload({self.name})")

    def info(self) -> dict[str, object]:
        """Kernel view: id, type, tag, name (name truncated to 15 chars by the kernel)."""
        return prog_info(self.fd)

    def _link(self, ptr: int | None, what: str, cap: _Capture) -> Link:
        return Link(_check_ptr(ptr, what, cap), what)

    def attach(self) -> Link:
        """Attach as the SEC() name says (tracepoint/..., raw_tp/..., tp_btf/..., uprobe)."""
        with _Capture() as cap:
            return self._link(_prog_attach(self._ptr), f"attach {self.name}", cap)

    def attach_cgroup(self, cgroup_fd: int) -> Link:
        with _Capture() as cap:
            return self._link(_prog_attach_cgroup(self._ptr, cgroup_fd), f"attach {self.name} to cgroup", cap)

    def attach_tracepoint(self, category: str, name: str) -> Link:
        with _Capture() as cap:
            ptr = _prog_attach_tp(self._ptr, category.encode(), name.encode())
            return self._link(ptr, f"attach {self.name} to tracepoint {category}:{name}", cap)

    def attach_raw_tracepoint(self, name: str) -> Link:
        with _Capture() as cap:
            ptr = _prog_attach_raw_tp(self._ptr, name.encode())
            return self._link(ptr, f"attach {self.name} to raw_tp {name}", cap)

    def attach_iter(self) -> Link:
        """Attach an iter/... program (no target options): the link iterators are made from."""
        with _Capture() as cap:
            return self._link(_prog_attach_iter(self._ptr, None), f"attach iterator {self.name}", cap)

    def run_iter(self) -> bytes:
        """Attach this iter/... program, run one iteration to the end (in the calling thread's
        namespaces, e.g. the netns a TCP iterator walks) and return what it wrote."""
        with self.attach_iter() as link:
            fd = _check(_iter_create(link.fd), f"bpf_iter_create({self.name})")
            out = bytearray()
            try:
                while chunk := os.read(fd, 65536):
                    out += chunk
            finally:
                os.close(fd)
            return bytes(out)

    def test_run(self, data: bytes, ctx: bytes | None = None, repeat: int = 1) -> tuple[int, bytes]:
        """BPF_PROG_TEST_RUN: (program return value, packet data after the run)."""
        res = self.test_run_ex(data, ctx, repeat)
        return res.retval, res.data_out

    def test_run_ex(
        self, data: bytes, ctx: bytes | None = None, repeat: int = 1, data_out_size: int = 0
    ) -> "TestRunResult":
        """Like `test_run`, also returning ctx_out and the mean duration in ns."""
        data_in = ctypes.create_string_buffer(bytes(data), max(len(data), 1))
        out_size = data_out_size or (len(data) + 4096 if data else 0)
        data_out = ctypes.create_string_buffer(max(out_size, 1))
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), repeat=repeat)
        if data:
            opts.data_in = ctypes.cast(data_in, c_void_p)
            opts.data_size_in = len(data)
            opts.data_out = ctypes.cast(data_out, c_void_p)
            opts.data_size_out = out_size
        ctx_in = ctx_out = None
        if ctx is not None:
            ctx_in = ctypes.create_string_buffer(bytes(ctx), max(len(ctx), 1))
            ctx_out = ctypes.create_string_buffer(max(len(ctx), 1))
            opts.ctx_in = ctypes.cast(ctx_in, c_void_p)
            opts.ctx_size_in = len(ctx)
            opts.ctx_out = ctypes.cast(ctx_out, c_void_p)
            opts.ctx_size_out = len(ctx)
        _check(_prog_test_run_opts(self.fd, ctypes.byref(opts)), f"test_run({self.name})")
        return TestRunResult(
            retval=int(opts.retval),
            data_out=data_out.raw[: opts.data_size_out] if data else b"",
            ctx_out=ctx_out.raw[: opts.ctx_size_out] if ctx_out is not None else b"",
            duration_ns=int(opts.duration),
        )

    def __repr__(self) -> str:
        return f"<Program {self.name} sec={self.section}>"


class TestRunResult:
    __slots__ = ("retval", "data_out", "ctx_out", "duration_ns")
    __test__ = False  # not a pytest class

    def __init__(self, retval: int, data_out: bytes, ctx_out: bytes, duration_ns: int):
        self.retval = retval
        self.data_out = data_out
        self.ctx_out = ctx_out
        self.duration_ns = duration_ns


class Map:
    """A BPF map: of a `BpfObject` (valid while it is open) or wrapping a bare fd."""

    def __init__(self, obj: "BpfObject | None", ptr: int | None, fd: int | None = None):
        self._obj = obj
        self._ptr = ptr
        self._own_fd = fd
        if ptr:
            self.name = _map_name(ptr).decode()
            self.map_type = _map_type(ptr)
            self.key_size = int(_map_key_size(ptr))
            self.value_size = int(_map_value_size(ptr))
            self.max_entries = int(_map_max_entries(ptr))
        else:
            assert fd is not None
            info = map_info(fd)
            self.name = str(info["name"])
            self.map_type = int(info["type"])  # type: ignore[arg-type]
            self.key_size = int(info["key_size"])  # type: ignore[arg-type]
            self.value_size = int(info["value_size"])  # type: ignore[arg-type]
            self.max_entries = int(info["max_entries"])  # type: ignore[arg-type]

    @classmethod
    def from_fd(cls, fd: int) -> "Map":
        """Wrap a map fd (e.g. from `map_fd_by_id`); `close()` closes the fd."""
        return cls(None, None, fd)

    def close(self) -> None:
        if self._own_fd is not None:
            fd, self._own_fd = self._own_fd, None
            os.close(fd)

    @property
    def fd(self) -> int:
        if self._own_fd is not None:
            return self._own_fd
        fd = _map_fd(self._ptr) if self._ptr else -_errno.EBADF
        if fd < 0:
            raise BpfError(f"map {self.name}: not created (object not loaded?)", -fd)
        return fd

    def set_max_entries(self, n: int) -> None:
        """Before load only."""
        _check(_map_set_max_entries(self._ptr, n), f"set_max_entries({self.name})")
        self.max_entries = n

    def reuse_fd(self, fd: int) -> None:
        """Before load only: use the existing map `fd` (e.g. created by another object)
        instead of creating this one, so that several objects share one map."""
        _check(_map_reuse_fd(self._ptr, fd), f"bpf_map__reuse_fd({self.name})")

    def _key(self, key: bytes) -> ctypes.Array:
        if len(key) != self.key_size:
            raise BpfError(f"map {self.name}: key is {len(key)} bytes, expected {self.key_size}", _errno.EINVAL)
        return ctypes.create_string_buffer(bytes(key), self.key_size)

    @property
    def _percpu(self) -> bool:
        return self.map_type in _PERCPU_MAP_TYPES

    def lookup(self, key: bytes) -> bytes | None:
        """The value for `key`, None if absent. Per-CPU maps: all CPUs' values concatenated,
        each padded to 8 bytes (see `lookup_percpu`)."""
        size = self._value_buf_size()
        val = ctypes.create_string_buffer(max(size, 1))
        ret = _map_lookup(self.fd, self._key(key), val)
        if ret == -_errno.ENOENT:
            return None
        _check(ret, f"lookup in {self.name}")
        return val.raw[:size]

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        raw = self.lookup(key)
        if raw is None:
            return None
        stride = (self.value_size + 7) // 8 * 8
        return [raw[i : i + self.value_size] for i in range(0, len(raw), stride)]

    def _value_buf_size(self) -> int:
        if self._percpu:
            return (self.value_size + 7) // 8 * 8 * num_possible_cpus()
        return self.value_size

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        size = self._value_buf_size()
        if len(value) != size:
            raise BpfError(f"map {self.name}: value is {len(value)} bytes, expected {size}", _errno.EINVAL)
        val = ctypes.create_string_buffer(bytes(value), max(size, 1))
        _check(_map_update(self.fd, self._key(key), val, flags), f"update in {self.name}")

    def delete(self, key: bytes) -> bool:
        """Delete `key`; False if it was not there."""
        ret = _map_delete(self.fd, self._key(key))
        if ret == -_errno.ENOENT:
            return False
        _check(ret, f"delete in {self.name}")
        return True

    def keys(self) -> Iterator[bytes]:
        """All keys (bpf_map_get_next_key). Concurrent deletes may restart the walk."""
        cur: ctypes.Array | None = None
        nxt = ctypes.create_string_buffer(max(self.key_size, 1))
        while True:
            ret = _map_next_key(self.fd, cur, nxt)
            if ret == -_errno.ENOENT:
                return
            _check(ret, f"next key in {self.name}")
            key = nxt.raw[: self.key_size]
            yield key
            cur = ctypes.create_string_buffer(key, max(self.key_size, 1))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def initial_value(self) -> memoryview | None:
        """Writable view of a .data/.rodata/.bss map's contents (before load only)."""
        size = c_size_t(0)
        ptr = _map_initial_value(self._ptr, ctypes.byref(size))
        if not ptr:
            return None
        return memoryview((ctypes.c_char * size.value).from_address(ptr)).cast("B")

    def __repr__(self) -> str:
        return f"<Map {self.name} type={self.map_type} k={self.key_size} v={self.value_size}>"


class BpfObject(_Closing):
    """A BPF ELF object: `with BpfObject.open(path) as obj: obj.load(); obj.program(...)`."""

    def __init__(self, ptr: int, path: str):
        self._ptr: int | None = ptr
        self.path = path
        self.loaded = False

    @classmethod
    def open(cls, path: str) -> "BpfObject":
        if not os.path.exists(path):
            raise BpfError(f"BPF object {path} not found (run `make -C bpf`)", _errno.ENOENT)
        with _Capture() as cap:
            ptr = _obj_open_file(path.encode(), None)
            _check_ptr(ptr, f"open BPF object {path}", cap)
        return cls(ptr, path)

    @property
    def ptr(self) -> int:
        if not self._ptr:
            raise BpfError(f"{self.path}: object closed", _errno.EBADF)
        return self._ptr

    def load(self) -> None:
        """Create maps, load programs through the verifier. The verifier log is in the
        BpfError when it fails."""
        with _Capture() as cap:
            _check(_obj_load(self.ptr), f"load {os.path.basename(self.path)}", cap)
        self.loaded = True

    def program(self, name: str) -> Program:
        ptr = _obj_find_prog(self.ptr, name.encode())
        if not ptr:
            raise BpfError(f"{self.path}: no program {name!r}", _errno.ENOENT)
        return Program(self, ptr)

    def programs(self) -> list[Program]:
        out, ptr = [], _obj_next_prog(self.ptr, None)
        while ptr:
            out.append(Program(self, ptr))
            ptr = _obj_next_prog(self.ptr, ptr)
        return out

    def maps(self) -> list[Map]:
        out, ptr = [], _obj_next_map(self.ptr, None)
        while ptr:
            out.append(Map(self, ptr))
            ptr = _obj_next_map(self.ptr, ptr)
        return out

    def map(self, name: str) -> Map:
        """By name; internal maps also by section (".rodata", ".bss", ".data")."""
        for m in self.maps():
            if m.name == name or (name.startswith(".") and m.name.endswith(name)):
                return m
        raise BpfError(f"{self.path}: no map {name!r}", _errno.ENOENT)

    def set_global(self, var: str, value: bytes) -> None:
        """Set a global variable (`const volatile` in .rodata, or .data/.bss) before load.

        The variable's offset and size come from the object's BTF (DATASEC). `value` must
        have exactly the variable's size (pack it with struct)."""
        if self.loaded:
            raise BpfError(f"set_global({var}): object already loaded", _errno.EBUSY)
        btf = _obj_btf(self.ptr)
        if not btf:
            raise BpfError(f"set_global({var}): object has no BTF", _errno.ENOENT)
        for sec in (".rodata", ".data", ".bss"):
            loc = _datasec_var(btf, sec, var)
            if loc is None:
                continue
            offset, size = loc
            if len(value) != size:
                raise BpfError(f"set_global({var}): {len(value)} bytes, variable has {size}", _errno.EINVAL)
            view = self.map(sec).initial_value()
            if view is None:
                raise BpfError(f"set_global({var}): no initial value for {sec}", _errno.ENOENT)
            view[offset : offset + size] = value
            return
        raise BpfError(f"set_global({var}): no such global in {self.path}", _errno.ENOENT)

    def close(self) -> None:
        if self._ptr:
            ptr, self._ptr = self._ptr, None
            _obj_close(ptr)


_BTF_KIND_VAR = 14
_BTF_KIND_DATASEC = 15


def _datasec_var(btf: int, section: str, var: str) -> tuple[int, int] | None:
    """(offset, size) of `var` inside DATASEC `section`, from struct btf_type +
    btf_var_secinfo[vlen] (each {type, offset, size})."""
    sec_id = _btf_find_by_name_kind(btf, section.encode(), _BTF_KIND_DATASEC)
    if sec_id < 0:
        return None
    t = _btf_type_by_id(btf, sec_id)
    _, info, _ = struct.unpack("=III", ctypes.string_at(t, 12))
    vlen = info & 0xFFFF
    raw = ctypes.string_at(t + 12, 12 * vlen)
    for i in range(vlen):
        type_id, offset, size = struct.unpack_from("=III", raw, 12 * i)
        vt = _btf_type_by_id(btf, type_id)
        name_off = struct.unpack("=I", ctypes.string_at(vt, 4))[0]
        if _btf_name_by_offset(btf, name_off) == var.encode():
            return offset, size
    return None


def attach_sk_msg(prog: Program, sockmap: Map) -> Attachment:
    """Attach an sk_msg verdict program to a SOCKMAP/SOCKHASH (bpf_prog_attach; not a link:
    it lasts until detached or until the map is freed with its last reference)."""
    prog_attach(prog.fd, sockmap.fd, BPF_SK_MSG_VERDICT)
    return Attachment(prog.fd, sockmap.fd, BPF_SK_MSG_VERDICT, f"sk_msg {prog.name} on {sockmap.name}")


# --- where the built objects are -------------------------------------------------------

OBJECT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_bpf")


def object_path(name: str) -> str:
    """Path of the built object of bpf/<name>.bpf.c (`make -C bpf` puts it in obi/_bpf)."""
    return os.path.join(OBJECT_DIR, f"{name}.bpf.o")


# --- cgroups ---------------------------------------------------------------------------


def cgroup_v2_mount() -> str:
    """Mount point of the cgroup v2 hierarchy (from /proc/self/mountinfo), "" if none."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4].replace("\\040", " ")
    except OSError:
        pass
    return ""


def open_cgroup(path: str) -> int:
    """An O_RDONLY|O_DIRECTORY fd of a cgroup v2 directory (the caller closes it)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
