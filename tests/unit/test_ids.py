"""ID generation, the one generator both datapaths use (obi.model.IdPool): format, uniqueness,
never all-zero."""

from __future__ import annotations

import os
import re
import threading

import pytest

from obi import model
from obi.model import FLAG_RANDOM, FLAG_SAMPLED, IdPool, TraceContext, new_span_id, new_trace_id
from obi.w3c import format_traceparent, parse_traceparent

DRAWS = 5000


@pytest.mark.parametrize(("gen", "length"), [(new_trace_id, 32), (new_span_id, 16)])
def test_format_is_lowercase_hex_of_fixed_length(gen, length: int) -> None:
    pattern = re.compile(rf"[0-9a-f]{{{length}}}")
    for _ in range(DRAWS):
        value = gen()
        assert isinstance(value, str)
        assert pattern.fullmatch(value), value
        assert value != "0" * length


@pytest.mark.parametrize("gen", [new_trace_id, new_span_id])
def test_ids_are_unique_over_many_draws(gen) -> None:
    values = {gen() for _ in range(DRAWS)}
    assert len(values) == DRAWS


def test_bits_are_spread() -> None:
    # A CSPRNG sets every bit position somewhere in a few thousand draws; a constant,
    # truncated or badly-seeded generator would not.
    acc = 0
    for _ in range(2000):
        acc |= int(new_trace_id(), 16)
    assert acc == (1 << 128) - 1


@pytest.mark.parametrize(("gen", "nbytes"), [(new_trace_id, 16), (new_span_id, 8)])
def test_never_zero_even_if_rng_returns_zeros(monkeypatch, gen, nbytes: int) -> None:
    # The random bytes begin with three all-zero ids: each is skipped.
    chunk = bytes(3 * nbytes) + b"\xab" * (IdPool.CHUNK - 3 * nbytes)
    calls: list[int] = []

    def fake_urandom(n: int) -> bytes:
        calls.append(n)
        return chunk[:n]

    monkeypatch.setattr(os, "urandom", fake_urandom)
    monkeypatch.setattr(model._pools, "pool", IdPool())
    assert gen() == "ab" * nbytes
    assert calls == [IdPool.CHUNK]  # one read of the CSPRNG for the whole pool


def test_pools_are_per_thread() -> None:
    # A pool is not thread-safe: each thread draws from its own.
    pools = []
    t = threading.Thread(target=lambda: pools.append(model._pools.pool))
    t.start()
    t.join()
    assert pools[0] is not model._pools.pool


def test_new_root_and_child() -> None:
    root = TraceContext.new_root()
    assert root.sampled and root.random
    assert root.flags == FLAG_SAMPLED | FLAG_RANDOM
    unsampled = TraceContext.new_root(sampled=False)
    assert not unsampled.sampled and unsampled.random
    child = TraceContext(root.trace_id, root.span_id, root.flags, "a=1").child()
    assert child.trace_id == root.trace_id
    assert child.span_id != root.span_id
    assert child.flags == root.flags and child.tracestate == "a=1"


def test_generated_contexts_round_trip_through_the_codec() -> None:
    for _ in range(500):
        ctx = TraceContext.new_root().child()
        assert parse_traceparent(format_traceparent(ctx)) == ctx
