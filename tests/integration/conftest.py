"""Fixtures shared by the integration tests (helpers they import live in tests/helpers/)."""

from __future__ import annotations

from typing import Iterator

import pytest

from obi.demo.topology import Topology


@pytest.fixture
def three_hosts() -> Iterator[Topology]:
    """Hosts a, b and c, each in its own network namespace and cgroup, on one bridge."""
    with Topology(["a", "b", "c"], prefix="obik") as t:
        yield t
