"""Sampling: which finished spans are exported (OTEL_TRACES_SAMPLER semantics)."""

from __future__ import annotations

from ..errors import ConfigError
from ..model import FLAG_SAMPLED, SpanRecord


class Sampler:
    """OTEL_TRACES_SAMPLER semantics applied to finished records.

    `always_on`/`always_off`/`traceidratio` decide on every span; `parentbased_*` follow the
    record's sampled flag for spans with a parent and use the named sampler for roots.
    `traceidratio` compares the low 64 bits of the trace id with ratio * 2^64, so every
    agent that sees a trace makes the same decision. Datapaths creating a new root can
    call `root_sampled(trace_id)` to set the sampled flag they put on the wire.
    """

    def __init__(self, name: str = "parentbased_always_on", arg: str = ""):
        self.name = name
        self.parent_based = name.startswith("parentbased_")
        self.root = name.removeprefix("parentbased_")
        self.ratio = 1.0
        if self.root == "traceidratio":
            try:
                self.ratio = float(arg) if arg else 1.0
            except ValueError:
                raise ConfigError("otel_traces_export.sampler.arg", arg, "a number between 0 and 1") from None
            if not 0.0 <= self.ratio <= 1.0:
                raise ConfigError("otel_traces_export.sampler.arg", arg, "a number between 0 and 1")
        self._bound = round(self.ratio * (1 << 64))

    def root_sampled(self, trace_id: str) -> bool:
        if self.root == "always_on":
            return True
        if self.root == "always_off":
            return False
        return int(trace_id[-16:], 16) < self._bound

    def should_export(self, rec: SpanRecord) -> bool:
        if self.parent_based and not rec.is_root:
            return bool(rec.flags & FLAG_SAMPLED)
        if self.parent_based:
            # A root the datapath marked unsampled on the wire stays unsampled here too.
            return bool(rec.flags & FLAG_SAMPLED) and self.root_sampled(rec.trace_id)
        return self.root_sampled(rec.trace_id)
