"""Kernel path: full selection maps (selected_tgids holds 4,096 processes, server_ports
1,024 ports). A scan that selects more keeps what fits, goes on refreshing the other map,
counts and logs it, and never fails the scan (it failed every rescan with E2BIG before,
and server_ports then stopped being refreshed)."""

from __future__ import annotations

import logging
import struct
import time

import pytest

from obi import discovery
from obi.demo.topology import Topology
from tests.helpers.kernel_agent import Agent
from tests.helpers.skips import skip_module_unless_kernel_path

pytestmark = pytest.mark.root

skip_module_unless_kernel_path()


def _keys(m) -> set[int]:
    return {struct.unpack("=I", k)[0] for k in m.keys()}


def test_full_maps_keep_what_fits_and_scans_go_on(tmp_path, monkeypatch, caplog):
    with Topology(["h"], prefix="obimf") as topo:
        agent = Agent(topo["h"], tmp_path, ports="8080")
        try:
            dp = agent.dp
            dp.scan_interval = 3600  # the periodic rescan stays out of the counts below
            time.sleep(0.6)  # (a wait already under way ends first)
            eg = dp._objs["tpinjector"]
            tgids, ports = eg.map("selected_tgids"), eg.map("server_ports")
            many_pids = set(range(100_000, 100_000 + tgids.max_entries + 50))
            many_ports = set(range(20_000, 20_000 + ports.max_entries + 10))
            monkeypatch.setattr(
                discovery,
                "scan",
                lambda cfg, ino, **kw: discovery.Selection(pids=set(many_pids), ports=set(many_ports)),
            )
            with caplog.at_level(logging.WARNING, logger="obi.kernel.datapath"):
                dp.scan_now()  # must not raise
            assert len(_keys(tgids)) == tgids.max_entries and len(_keys(ports)) == ports.max_entries
            assert dp.selected_pids == _keys(tgids) and dp.server_ports == _keys(ports)
            assert dp.stats()["selection_map_full"] == 50 + 10
            warned = [r.getMessage() for r in caplog.records if "map full" in r.getMessage()]
            assert len(warned) == 2, warned
            # The next scan selects fewer processes and new ports: both maps follow.
            caplog.clear()
            monkeypatch.setattr(
                discovery, "scan", lambda cfg, ino, **kw: discovery.Selection(pids={1, 2, 3}, ports={8080, 9090})
            )
            with caplog.at_level(logging.INFO, logger="obi.kernel.datapath"):
                dp.scan_now()
            assert _keys(tgids) == {1, 2, 3} and _keys(ports) == {8080, 9090}
            assert dp.stats()["selection_map_full"] == 60  # a counter: nothing refused this time
            assert sum("has room again" in r.getMessage() for r in caplog.records) == 2
        finally:
            agent.stop()
