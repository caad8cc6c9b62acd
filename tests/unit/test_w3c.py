"""W3C Trace Context Level 1 (+ Level 2 `random` flag) codec cases for obi.w3c."""

from __future__ import annotations

import random

import pytest

from obi.model import TraceContext
from obi.w3c import (
    extract,
    format_traceparent,
    format_tracestate,
    inject_headers,
    inject_value,
    parse_traceparent,
    parse_tracestate,
    truncate_tracestate,
)

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"
VALID = f"00-{TID}-{SID}-01"

# ---------------------------------------------------------------------------------------
# traceparent: valid values -> (trace_id, span_id, flags)

VALID_TRACEPARENTS = [
    pytest.param(VALID, (TID, SID, 0x01), id="sampled"),
    pytest.param(f"00-{TID}-{SID}-00", (TID, SID, 0x00), id="not-sampled"),
    pytest.param(f"00-{TID}-{SID}-02", (TID, SID, 0x02), id="random-only"),
    pytest.param(f"00-{TID}-{SID}-03", (TID, SID, 0x03), id="sampled-random"),
    pytest.param(f"00-{TID}-{SID}-ff", (TID, SID, 0xFF), id="all-flag-bits-kept"),
    pytest.param(f"00-{TID}-{SID}-08", (TID, SID, 0x08), id="unknown-flag-bit-not-invalid"),
    pytest.param(f"00-{'0' * 31}1-{'0' * 15}1-01", ("0" * 31 + "1", "0" * 15 + "1", 1), id="min-ids"),
    pytest.param(f"00-{'f' * 32}-{'f' * 16}-01", ("f" * 32, "f" * 16, 1), id="max-ids"),
    # higher versions: first 55 chars, then end of value or '-'
    pytest.param(f"01-{TID}-{SID}-01", (TID, SID, 1), id="version-01-exact"),
    pytest.param(f"cc-{TID}-{SID}-01", (TID, SID, 1), id="version-cc-exact"),
    pytest.param(f"fe-{TID}-{SID}-00", (TID, SID, 0), id="version-fe-exact"),
    pytest.param(f"cc-{TID}-{SID}-01-what-the-future-will-be-like", (TID, SID, 1), id="version-cc-extra-fields"),
    pytest.param(f"02-{TID}-{SID}-09-", (TID, SID, 9), id="version-02-trailing-dash"),
    pytest.param(f"99-{TID}-{SID}-01-XYZ.!", (TID, SID, 1), id="version-99-opaque-extra"),
    # OWS around the value is trimmed
    pytest.param(f" {VALID}", (TID, SID, 1), id="leading-space"),
    pytest.param(f"\t{VALID}", (TID, SID, 1), id="leading-tab"),
    pytest.param(f"{VALID} ", (TID, SID, 1), id="trailing-space"),
    pytest.param(f"{VALID}\t", (TID, SID, 1), id="trailing-tab"),
    pytest.param(f"\t  {VALID} \t ", (TID, SID, 1), id="both-sides-ows"),
    pytest.param(f"  cc-{TID}-{SID}-01-x  ", (TID, SID, 1), id="ows-higher-version"),
    pytest.param(VALID.encode(), (TID, SID, 1), id="bytes-from-the-wire"),
]


@pytest.mark.parametrize(("value", "expected"), VALID_TRACEPARENTS)
def test_valid_traceparent(value: str, expected: tuple[str, str, int]) -> None:
    ctx = parse_traceparent(value)
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.flags) == expected
    assert ctx.tracestate == ""
    assert ctx.sampled == bool(expected[2] & 1)
    assert ctx.random == bool(expected[2] & 2)


INVALID_TRACEPARENTS = [
    pytest.param("", id="empty"),
    pytest.param("   \t ", id="only-ows"),
    pytest.param(VALID[:-1], id="54-chars"),
    pytest.param(VALID + "0", id="56-chars-v00"),
    pytest.param(VALID + "-", id="v00-trailing-dash"),
    pytest.param(VALID + "-extra", id="v00-extra-field"),
    pytest.param(VALID + ".", id="v00-trailing-dot"),
    pytest.param(f"cc-{TID}-{SID}-01.what-the-future-will-not-be-like", id="higher-version-no-dash"),
    pytest.param(f"cc-{TID}-{SID}-010", id="higher-version-long-flags"),
    pytest.param(f"ff-{TID}-{SID}-01", id="version-ff"),
    pytest.param(f"ff-{TID}-{SID}-01-extra", id="version-ff-extra"),
    pytest.param(f"0-{TID}-{SID}-01", id="version-too-short"),
    pytest.param(f"000-{TID}-{SID}-01", id="version-too-long"),
    pytest.param(f"0.-{TID}-{SID}-01", id="version-illegal-char"),
    pytest.param(f"CC-{TID}-{SID}-01", id="version-uppercase"),
    pytest.param(f"00-{TID.upper()}-{SID}-01", id="trace-id-uppercase"),
    pytest.param(f"00-{TID[:-1]}A-{SID}-01", id="trace-id-one-uppercase"),
    pytest.param(f"00-{TID[:-1]}g-{SID}-01", id="trace-id-non-hex"),
    pytest.param(f"00-{TID[:-1]}.-{SID}-01", id="trace-id-dot"),
    pytest.param(f"00-{'0' * 32}-{SID}-01", id="trace-id-all-zero"),
    pytest.param(f"00-{TID[:-1]}-{SID}-01", id="trace-id-too-short"),
    pytest.param(f"00-{TID}0-{SID}-01", id="trace-id-too-long"),
    pytest.param(f"00-{TID}-{SID.upper()}-01", id="parent-id-uppercase"),
    pytest.param(f"00-{TID}-{SID[:-1]}g-01", id="parent-id-non-hex"),
    pytest.param(f"00-{TID}-{'0' * 16}-01", id="parent-id-all-zero"),
    pytest.param(f"00-{TID}-{SID[:-1]}-01", id="parent-id-too-short"),
    pytest.param(f"00-{TID}-{SID}0-01", id="parent-id-too-long"),
    pytest.param(f"00-{TID}-{SID}-0A", id="flags-uppercase"),
    pytest.param(f"00-{TID}-{SID}-0.", id="flags-illegal-char"),
    pytest.param(f"00-{TID}-{SID}-1", id="flags-too-short"),
    pytest.param(f"00-{TID}-{SID}-001", id="flags-too-long"),
    pytest.param(f"00_{TID}-{SID}-01", id="separator-underscore"),
    pytest.param(f"00-{TID}_{SID}-01", id="separator-2-underscore"),
    pytest.param(f"00-{TID}-{SID}:01", id="separator-3-colon"),
    pytest.param(f"00 {TID} {SID} 01", id="separator-spaces"),
    pytest.param(f"00{TID}{SID}01xxx", id="no-separators"),
    pytest.param(f"00-{TID}-{SID}-01\r\n", id="crlf-is-not-ows"),
    pytest.param(f"\n{VALID}", id="leading-newline-is-not-ows"),
    pytest.param(f"00-{TID[:30]}\u0660\u0661-{SID}-01", id="unicode-digits"),
    pytest.param(b"00-" + TID.encode() + b"-" + SID.encode() + b"-0\xff", id="non-ascii-bytes"),
]


@pytest.mark.parametrize("value", INVALID_TRACEPARENTS)
def test_invalid_traceparent(value: str) -> None:
    assert parse_traceparent(value) is None


@pytest.mark.parametrize("value", [None, 42, ["00"]])
def test_non_text_traceparent_is_invalid(value: object) -> None:
    assert parse_traceparent(value) is None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# formatting


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(0, "00"), (1, "01"), (2, "02"), (3, "03"), (0xFF, "03"), (0x1FF, "03"), (0x100, "00"), (0x05, "01")],
)
def test_format_traceparent_flags_byte(flags: int, expected: str) -> None:
    value = format_traceparent(TraceContext(TID, SID, flags))
    assert value == f"00-{TID}-{SID}-{expected}"
    assert len(value) == 55


def test_higher_version_is_reemitted_as_00() -> None:
    ctx = parse_traceparent(f"cc-{TID}-{SID}-01-future")
    assert ctx is not None
    assert format_traceparent(ctx) == VALID
    assert inject_value(ctx) == VALID


@pytest.mark.parametrize(
    ("trace_id", "span_id"),
    [
        ("0" * 32, SID),
        (TID, "0" * 16),
        (TID.upper(), SID),
        (TID, SID.upper()),
        (TID[:-1], SID),
        (TID, SID + "0"),
    ],
)
def test_format_traceparent_rejects_invalid_ids(trace_id: str, span_id: str) -> None:
    with pytest.raises(ValueError):
        format_traceparent(TraceContext(trace_id, span_id, 1))


def _random_valid_traceparent(rng: random.Random) -> str:
    def hexid(nbytes: int) -> str:
        while True:
            # Bias towards values with many zero nibbles to stress the all-zero check.
            digits = "".join(rng.choice("0000123456789abcdef") for _ in range(nbytes * 2))
            if digits.strip("0"):
                return digits

    return f"00-{hexid(16)}-{hexid(8)}-{rng.randrange(4):02x}"  # flags the spec defines


def test_round_trip_property() -> None:
    rng = random.Random(0x3C3)  # fixed seed: reproducible
    for _ in range(3000):
        value = _random_valid_traceparent(rng)
        ctx = parse_traceparent(value)
        assert ctx is not None, value
        assert format_traceparent(ctx) == value
        # and the other way round: parse(format(ctx)) == ctx
        assert parse_traceparent(format_traceparent(ctx)) == ctx


def test_random_mutations_never_raise_and_stay_strict() -> None:
    # A single-character change of a valid v00 header never makes parsing raise; when the
    # result still parses, it is the same header (hex digit swapped) or a higher version.
    rng = random.Random(7)
    alphabet = "0123456789abcdefABCDEF-_. \t\x00g"
    for _ in range(3000):
        value = list(_random_valid_traceparent(rng))
        pos = rng.randrange(len(value))
        value[pos] = rng.choice(alphabet)
        text = "".join(value)
        ctx = parse_traceparent(text)
        if ctx is not None:
            assert len(text.strip(" \t")) == 55
            # re-emitted as version 00, with only the flags the spec defines
            bare = text.strip(" \t")
            assert format_traceparent(ctx) == "00" + bare[2:53] + f"{int(bare[53:55], 16) & 3:02x}"


# ---------------------------------------------------------------------------------------
# tracestate


def _members(n: int) -> str:
    return ",".join(f"k{i:02d}=v{i}" for i in range(n))


VALID_TRACESTATES = [
    pytest.param("", [], id="empty"),
    pytest.param(" \t ", [], id="only-ows"),
    pytest.param("congo=t61rcWkgMzE", [("congo", "t61rcWkgMzE")], id="single"),
    pytest.param(
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
        [("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE")],
        id="two-order-kept",
    ),
    pytest.param("a=1 \t , \t b=2,\tc=3 ", [("a", "1"), ("b", "2"), ("c", "3")], id="ows-around-commas"),
    pytest.param("a=1,,b=2", [("a", "1"), ("b", "2")], id="empty-member-between-commas"),
    pytest.param(",a=1, ,\t,b=2,", [("a", "1"), ("b", "2")], id="empty-members-at-ends"),
    pytest.param(_members(32), [(f"k{i:02d}", f"v{i}") for i in range(32)], id="32-members"),
    pytest.param(_members(32) + ",,,", [(f"k{i:02d}", f"v{i}") for i in range(32)], id="32-members-plus-empties"),
    pytest.param("fw529a3039@dt=x", [("fw529a3039@dt", "x")], id="multi-tenant-key"),
    pytest.param("0tenant@sys=x", [("0tenant@sys", "x")], id="tenant-may-start-with-digit"),
    pytest.param("a_-*/9=x", [("a_-*/9", "x")], id="key-special-chars"),
    pytest.param("a" * 256 + "=x", [("a" * 256, "x")], id="simple-key-256"),
    pytest.param("t" * 241 + "@" + "s" * 14 + "=x", [("t" * 241 + "@" + "s" * 14, "x")], id="multi-tenant-max"),
    pytest.param("k=" + "v" * 256, [("k", "v" * 256)], id="value-256"),
    pytest.param("k= x y", [("k", " x y")], id="value-inner-and-leading-space"),
    pytest.param(
        "k=!\"#$%&'()*+-./:;<>?@[\\]^_`{|}~", [("k", "!\"#$%&'()*+-./:;<>?@[\\]^_`{|}~")], id="value-punctuation"
    ),
    pytest.param(b"a=1,b=2", [("a", "1"), ("b", "2")], id="bytes"),
]


@pytest.mark.parametrize(("value", "expected"), VALID_TRACESTATES)
def test_valid_tracestate(value: str, expected: list[tuple[str, str]]) -> None:
    assert parse_tracestate(value) == expected


INVALID_TRACESTATES = [
    pytest.param(_members(33), id="33-members"),
    pytest.param("a=1,a=2", id="duplicate-key"),
    pytest.param("a=1,b=2,a=1", id="duplicate-key-same-value"),
    pytest.param("A=1", id="key-uppercase"),
    pytest.param("1a=1", id="simple-key-starts-with-digit"),
    pytest.param("_a=1", id="key-starts-with-underscore"),
    pytest.param("a.b=1", id="key-dot"),
    pytest.param("a b=1", id="key-inner-space"),
    pytest.param("a" * 257 + "=x", id="simple-key-257"),
    pytest.param("t" * 242 + "@" + "s" * 14 + "=x", id="tenant-242"),
    pytest.param("t" * 241 + "@" + "s" * 15 + "=x", id="system-15"),
    pytest.param("t@1sys=x", id="system-starts-with-digit"),
    pytest.param("@sys=x", id="empty-tenant"),
    pytest.param("t@=x", id="empty-system"),
    pytest.param("a@b@c=x", id="two-at-signs"),
    pytest.param("=x", id="empty-key"),
    pytest.param("k=", id="empty-value"),
    pytest.param("k", id="no-equals"),
    pytest.param("k=a=b", id="value-with-equals"),
    pytest.param("k=" + "v" * 257, id="value-257"),
    pytest.param("k=a\tb", id="value-tab"),
    pytest.param("k=\x7f", id="value-del"),
    pytest.param("k=caf\u00e9", id="value-non-ascii"),
    pytest.param("k=   ", id="value-only-spaces"),
    pytest.param("a=1,bad", id="one-bad-member-spoils-list"),
]


@pytest.mark.parametrize("value", INVALID_TRACESTATES)
def test_invalid_tracestate(value: str) -> None:
    assert parse_tracestate(value) is None


@pytest.mark.parametrize(
    "entries",
    [[], [("a", "1")], [("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE")], [(f"k{i}", "v") for i in range(32)]],
)
def test_format_tracestate_round_trip(entries: list[tuple[str, str]]) -> None:
    text = format_tracestate(entries)
    assert parse_tracestate(text) == entries


def test_format_tracestate_normalizes() -> None:
    entries = parse_tracestate(" a=1 ,, \t b=2 ,")
    assert entries is not None
    assert format_tracestate(entries) == "a=1,b=2"


@pytest.mark.parametrize(
    "entries",
    [
        [("A", "1")],
        [("a", "")],
        [("a", "x,y")],
        [("a", "1"), ("a", "2")],
        [(f"k{i}", "v") for i in range(33)],
    ],
)
def test_format_tracestate_rejects_invalid(entries: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError):
        format_tracestate(entries)


# ---------------------------------------------------------------------------------------
# extract: header lists as received


def _extract(*pairs: tuple[str, str]) -> TraceContext | None:
    return extract(list(pairs))


@pytest.mark.parametrize("name", ["traceparent", "TraceParent", "TRACEPARENT"])
def test_extract_header_name_case_insensitive(name: str) -> None:
    ctx = _extract(("Host", "x"), (name, VALID), ("TraceState", "a=1"))
    assert ctx == TraceContext(TID, SID, 1, "a=1")


def test_extract_without_traceparent() -> None:
    assert _extract(("host", "x"), ("tracestate", "a=1")) is None
    assert extract([]) is None


def test_extract_duplicate_traceparent_is_invalid() -> None:
    assert _extract(("traceparent", VALID), ("traceparent", VALID)) is None
    other = f"00-{TID}-{'1' * 16}-01"
    assert _extract(("traceparent", VALID), ("Traceparent", other)) is None


def test_extract_invalid_traceparent_ignores_tracestate() -> None:
    assert _extract(("traceparent", f"00-{'0' * 32}-{SID}-01"), ("tracestate", "a=1")) is None


@pytest.mark.parametrize(
    ("tracestates", "expected"),
    [
        pytest.param(["a=1", "b=2"], "a=1,b=2", id="combine-two"),
        pytest.param(["a=1", ""], "a=1", id="combine-with-empty-header"),
        pytest.param(["", "a=1"], "a=1", id="empty-header-first"),
        pytest.param([" a=1 , b=2 ", "\tc=3"], "a=1,b=2,c=3", id="combine-normalizes-ows"),
        pytest.param(["a=1", "a=2"], "", id="duplicate-across-headers-dropped"),
        pytest.param([_members(16), _members(32)[len(_members(16)) + 1 :]], _members(32), id="32-across-headers"),
        pytest.param([_members(16), _members(33)[len(_members(16)) + 1 :]], "", id="33-across-headers-dropped"),
        pytest.param(["a=1", "B=2"], "", id="bad-member-in-second-header-drops-all"),
        pytest.param([], "", id="no-tracestate"),
        pytest.param([""], "", id="only-empty-tracestate"),
    ],
)
def test_extract_combines_tracestate_headers(tracestates: list[str], expected: str) -> None:
    pairs = [("traceparent", VALID)] + [("tracestate", ts) for ts in tracestates]
    ctx = extract(pairs)
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.flags) == (TID, SID, 1)
    assert ctx.tracestate == expected


def test_extract_keeps_context_when_tracestate_invalid() -> None:
    ctx = _extract(("traceparent", VALID), ("tracestate", "a=1,a=2"))
    assert ctx == TraceContext(TID, SID, 1, "")


def test_extract_accepts_bytes_and_mappings() -> None:
    ctx = extract([(b"Traceparent", VALID.encode()), (b"tracestate", b"a=1")])
    assert ctx == TraceContext(TID, SID, 1, "a=1")
    assert extract({"traceparent": VALID}) == TraceContext(TID, SID, 1, "")
    assert extract([(b"tracestate", b"a=\xff"), (b"traceparent", VALID.encode())]) == TraceContext(TID, SID, 1)


def test_extract_higher_version_with_tracestate() -> None:
    ctx = _extract(("traceparent", f"cc-{TID}-{SID}-03-future"), ("tracestate", "a=1"))
    assert ctx == TraceContext(TID, SID, 3, "a=1")
    assert ctx.sampled and ctx.random


def test_inject_headers_round_trip() -> None:
    ctx = TraceContext(TID, SID, 3, "a=1,b=2")
    headers = inject_headers(ctx)
    assert headers == [("traceparent", f"00-{TID}-{SID}-03"), ("tracestate", "a=1,b=2")]
    assert extract(headers) == ctx
    assert inject_headers(TraceContext(TID, SID, 1)) == [("traceparent", VALID)]


def test_child_context_propagates_tracestate() -> None:
    ctx = _extract(("traceparent", VALID), ("tracestate", "a=1"))
    assert ctx is not None
    child = ctx.child()
    value = inject_value(child)
    assert value.startswith(f"00-{TID}-") and value.endswith("-01")
    assert value[36:52] == child.span_id != SID
    assert child.tracestate == "a=1"


# ---------------------------------------------------------------------------------------
# truncation (the spec: whole members; longer than 128 first, then from the end)


def _m(key: str, size: int) -> tuple[str, str]:
    """A valid member of exactly `size` characters (key=value, 2..513): the value up to
    its 256-character limit, the key padded with 'x' for the rest."""
    value = min(256, size - len(key) - 1)
    return (key + "x" * (size - len(key) - 1 - value), "v" * value)


@pytest.mark.parametrize(
    ("sizes", "kept"),
    [
        pytest.param([100, 100, 100], [0, 1, 2], id="short-enough-untouched"),
        pytest.param([300, 100, 120], [1, 2], id="long-member-goes-first"),
        pytest.param([300, 100, 150], [1], id="every-long-member-goes-before-any-short-one"),
        pytest.param([100] * 6, [0, 1, 2, 3, 4], id="then-from-the-end"),
        pytest.param([200, 129, 128, 128, 128, 128], [2, 3, 4], id="every-long-member-goes-first"),
        pytest.param([513], [], id="one-member-too-long"),
        pytest.param([512], [0], id="one-long-member-that-fits"),
        pytest.param([128, 128, 128, 125], [0, 1, 2, 3], id="exactly-512-with-commas"),
        pytest.param([128, 128, 128, 126], [0, 1, 2], id="513-with-commas"),
    ],
)
def test_truncate_tracestate(sizes: list[int], kept: list[int]) -> None:
    entries = [_m(f"k{i}", n) for i, n in enumerate(sizes)]
    out = truncate_tracestate(entries)
    assert out == [entries[i] for i in kept]
    assert len(format_tracestate(out)) <= 512


def test_extract_truncates_a_long_tracestate() -> None:
    members = [_m("a", 300), _m("b", 100), _m("c", 120)]
    ctx = _extract(("traceparent", VALID), ("tracestate", ",".join(f"{k}={v}" for k, v in members)))
    assert ctx is not None and ctx.tracestate == f"b={'v' * 98},c={'v' * 118}"
