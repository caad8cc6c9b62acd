"""The interface both datapaths implement; the agent (obi.agent) drives one of them.

A datapath attaches its hooks for the processes the config selects, turns what it sees
into `SpanRecord`s and hands each finished span to `sink` (which never blocks). It must
never break traffic: anything it cannot parse passes unchanged.
"""

from __future__ import annotations

from typing import Callable, Protocol

from .config import Config
from .model import SpanRecord

SpanSink = Callable[[SpanRecord], None]


class DatapathRunner(Protocol):
    name: str  # "kernel" or "userspace"

    def __init__(self, cfg: Config, sink: SpanSink) -> None: ...

    def start(self) -> None:
        """Attach everything. Raises MissingFeature (caller may fall back) or AttachError.
        On failure, whatever was attached so far is already detached."""

    def stop(self) -> None:
        """Detach exactly what start() attached. Idempotent."""

    def stats(self) -> dict[str, int]:
        """Counters for health/metrics, e.g. headers_inserted, events_lost, packets_queued."""
