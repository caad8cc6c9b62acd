"""Fixtures of the parity suite: one live environment per datapath, shared by its tests.

Building a topology and attaching two agents costs seconds; the suite's scenarios each take
a fraction of that, so each datapath's Env is built once (lazily) and reused, and rebuilt
only if a process in it died. Tests identify their own spans (unique paths, ids from the
wire, marks taken before the traffic), so sharing is safe.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.helpers.parity_harness import DATAPATHS, Env, skip_reason  # noqa: E402


class EnvPool:
    def __init__(self) -> None:
        self.envs: dict[str, Env] = {}

    def get(self, datapath: str) -> Env:
        why = skip_reason(datapath)
        if why:
            pytest.skip(why)
        env = self.envs.get(datapath)
        if env is not None and not env.healthy():
            env.close()  # a crashed agent or service must not fail every later test
            env = None
        if env is None:
            env = self.envs[datapath] = Env(datapath).__enter__()
        return env

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        self.envs.clear()


@pytest.fixture(scope="session")
def env_pool() -> Iterator[EnvPool]:
    pool = EnvPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(params=DATAPATHS)
def env(request, env_pool: EnvPool) -> Env:
    return env_pool.get(request.param)
