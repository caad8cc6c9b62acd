"""ID generation: format, uniqueness, never all-zero (obi.model.new_trace_id/new_span_id)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest

from obi.model import FLAG_RANDOM, FLAG_SAMPLED, TraceContext, new_span_id, new_trace_id
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


def _sequence(values: list[str]) -> Iterator[str]:
    yield from values


@pytest.mark.parametrize(("gen", "nbytes"), [(new_trace_id, 16), (new_span_id, 8)])
def test_never_zero_even_if_rng_returns_zeros(monkeypatch, gen, nbytes: int) -> None:
    good = "ab" * nbytes
    draws = _sequence(["00" * nbytes, "00" * nbytes, "00" * nbytes, good])
    calls: list[int] = []

    def fake_token_hex(n: int) -> str:
        calls.append(n)
        return next(draws)

    monkeypatch.setattr(secrets, "token_hex", fake_token_hex)
    assert gen() == good
    assert calls == [nbytes] * 4  # asked the CSPRNG again for each zero draw


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
