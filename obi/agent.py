"""`obi run`: choose a datapath, attach it, export its spans, stop cleanly on a signal."""

from __future__ import annotations

import logging
import re
import signal
import threading
from typing import Callable

from . import doctor
from .config import Config
from .datapath import DatapathRunner, SpanSink
from .errors import AttachError, MissingFeature, ObiError, ProgramRejected
from .model import Datapath

log = logging.getLogger("obi.agent")

# The log line of an attached agent names its datapath; the demo and the benchmark read it.
ATTACHED_RE = re.compile(r"attached: datapath (\w+)")


def make_datapath(kind: Datapath, cfg: Config, sink: SpanSink) -> DatapathRunner:
    # Imported lazily: the userspace path must not need libbpf, nor the kernel path the
    # NFQUEUE reader extension.
    if kind is Datapath.KERNEL:
        from .kernel.datapath import KernelDatapath

        return KernelDatapath(cfg, sink)
    from .fallback.datapath import UserspaceDatapath

    return UserspaceDatapath(cfg, sink)


class Agent:
    """Owns one datapath and one exporter for the lifetime of `obi run`."""

    def __init__(self, cfg: Config, exporter_factory: Callable | None = None):
        self.cfg = cfg
        if exporter_factory is None:
            from .export import Exporter

            exporter_factory = Exporter
        self.exporter = exporter_factory(cfg)
        self.datapath: DatapathRunner | None = None
        self.attached = False  # True between a successful start() and stop()
        self.reason = ""  # why this datapath (doctor's choice, or the fallback that followed)
        self.stopping = threading.Event()

    def start(self) -> None:
        """Attach the datapath doctor.choose_datapath picks (the same choice `obi doctor`
        shows). Under `auto`, a kernel path that then fails to load or attach falls back to
        the userspace path with a warning; `reason` always says what is attached and why."""
        choice = doctor.choose_datapath(self.cfg)
        if choice.datapath is None:
            raise ObiError(f"no datapath can run here: {choice.reason}")
        log.info("datapath chosen: %s (%s)", choice.datapath.value, choice.reason)
        self.reason = choice.reason
        if choice.datapath is Datapath.USERSPACE and self.cfg.datapath == "auto":
            log.warning("kernel datapath not used: %s", choice.reason)
        try:
            self.datapath = make_datapath(choice.datapath, self.cfg, self.exporter.export)
            self.datapath.start()
        except (MissingFeature, ProgramRejected, AttachError) as e:
            if self.cfg.datapath != "auto" or choice.datapath is not Datapath.KERNEL:
                raise
            self.reason = f"auto: the kernel datapath failed to start ({e}); userspace datapath"
            log.warning("kernel datapath failed to start (%s); falling back to the userspace datapath", e)
            self.datapath = make_datapath(Datapath.USERSPACE, self.cfg, self.exporter.export)
            self.datapath.start()
        self.attached = True
        log.info(
            "attached: datapath %s; instrumenting ports %s",
            self.datapath.name,
            ",".join(str(p) for p in self.cfg.open_ports) or "(none)",
        )

    def stop(self) -> bool:
        """Detach and flush, bounded by shutdown_timeout. Returns False if it ran out of time."""
        self.attached = False
        done = threading.Event()

        def _stop() -> None:
            try:
                if self.datapath is not None:
                    self.datapath.stop()
            except Exception:
                log.exception("detaching the datapath failed; run `obi cleanup`")
            finally:
                deadline = self.cfg.shutdown_timeout_s
                try:
                    self.exporter.shutdown(deadline)
                except Exception:
                    log.exception("flushing spans failed")
                done.set()

        threading.Thread(target=_stop, name="obi-shutdown", daemon=True).start()
        # Detaching is quick; the exporter gets the rest of the budget. A little slack
        # on top so the exporter's own timeout fires first and reports what it dropped.
        if not done.wait(self.cfg.shutdown_timeout_s + 1.0):
            log.error("shutdown did not finish within %.1fs; exiting anyway", self.cfg.shutdown_timeout_s)
            return False
        stats = dict(self.exporter.stats())
        if self.datapath is not None:
            stats.update(self.datapath.stats())
        log.info("stopped: %s", ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
        return True

    def run(self) -> int:
        """Start, wait for SIGINT/SIGTERM, stop. The exit code of `obi run`."""

        def _on_signal(signum, _frame) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stopping.set()

        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        health = None
        if self.cfg.health_check_port or self.cfg.internal_metrics_port:
            from .health import HealthServer

            # Up before attaching, so liveness answers (and readiness says 503) meanwhile.
            health = HealthServer.for_agent(self)
            health.start()
        try:
            try:
                self.start()
            except BaseException:
                self.stop()
                raise
            while not self.stopping.wait(1.0):
                pass
            return 0 if self.stop() else 1
        finally:
            if health is not None:
                health.stop()
            for s, handler in old.items():
                signal.signal(s, handler)
