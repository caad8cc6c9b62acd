"""The one error tree of obi. Everything the agent raises on purpose derives from ObiError."""

from __future__ import annotations


class ObiError(Exception):
    """Base class of every error obi raises on purpose."""


class ConfigError(ObiError):
    """A configuration value is wrong. The message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid value {value!r} for {key}: expected {allowed}")


class MissingFeature(ObiError):
    """The kernel (or the machine) lacks something a component needs.

    Tests turn this into a skip; the agent turns it into a fallback with a log line.
    """

    def __init__(self, feature: str, min_kernel: str = "", detail: str = ""):
        self.feature = feature
        self.min_kernel = min_kernel
        self.detail = detail
        msg = f"kernel feature unavailable: {feature}"
        if min_kernel:
            msg += f" (needs Linux >= {min_kernel})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class ProgramRejected(ObiError):
    """The verifier refused a BPF program of ours on a kernel that has every feature it
    needs: a defect of ours (or a kernel build it was not tested on), never a missing
    feature. Names the program, how far the verifier got and its last lines."""

    def __init__(self, obj: str, program: str, processed: int, tail: list[str], errno_: int = 0):
        self.object = obj
        self.program = program
        self.processed = processed
        self.tail = tail
        self.errno = errno_
        what = f"BPF program {program or '?'} ({obj}) rejected by the verifier"
        if processed:
            what += f" after {processed:,} processed instructions"
        import os

        if errno_:
            what += f" ({os.strerror(errno_)})"
        super().__init__(what + (": " + " | ".join(tail) if tail else ""))


class AttachError(ObiError):
    """Attaching or detaching a program, filter or rule failed."""


class BpfError(ObiError):
    """libbpf reported an error (loading, verifying, map access)."""

    def __init__(self, what: str, errno_: int = 0, log: str = ""):
        self.what = what
        self.errno = errno_
        self.log = log
        import os

        msg = what
        if errno_:
            msg += f": {os.strerror(errno_)} (errno {errno_})"
        if log:
            msg += "\n" + log
        super().__init__(msg)
