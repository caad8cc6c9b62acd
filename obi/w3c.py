"""W3C Trace Context codec: `traceparent` and `tracestate` headers.

Follows Trace Context Level 1 (https://www.w3.org/TR/trace-context/) and the Level 2
`random` trace-flag. Invalid input is never an exception here: parsers return None and
the caller starts a new trace, as the spec asks. Formatting invalid data is a bug in
the caller and raises ValueError.

Choices where the spec leaves room, made once here:
- `flags` keeps the whole received byte; `sampled`/`random` are masks on it
  (`obi.model`), never comparisons, so unknown bits do not invalidate a header.
- A higher version (01..fe) is read by its first 55 characters, which must be followed
  by the end of the value or a '-' (room for future fields). It is re-emitted as 00.
- The 32-member tracestate limit counts `key=value` members; empty members (allowed by
  the spec so that combined headers stay valid) are dropped and do not count.
- A valid tracestate is kept normalized: members joined by ',' without OWS or empties.
- A tracestate longer than 512 characters (normalized) is truncated as the spec asks, by
  whole members: members longer than 128 characters go first, then members from the end
  (`truncate_tracestate`). The kernel path does the same in BPF (bpf/include/obi_w3c.h).
- Outgoing trace-flags keep only the flags this version defines (sampled 0x01, Level 2's
  random 0x02): the spec asks that the others be sent as zero.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from obi.model import TraceContext

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# Length of a version-00 traceparent, and the prefix read from any higher version.
TRACEPARENT_LEN = 55
TRACESTATE_MAX_MEMBERS = 32
# The longest tracestate passed on (normalized, commas included): the spec asks vendors to
# propagate at least 512 characters. When longer, members above TRACESTATE_LONG_MEMBER
# characters are removed first, then members from the end.
TRACESTATE_PROPAGATED_MAX = 512
TRACESTATE_LONG_MEMBER = 128
# trace-flags defined so far: sampled (Level 1) and random (Level 2).
KNOWN_FLAGS = 0x03

_OWS = " \t"
_INVALID_VERSION = "ff"
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16

# version "-" trace-id "-" parent-id "-" trace-flags, all lowercase hex (HEXDIGLC).
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACE_ID_RE = re.compile(r"[0-9a-f]{32}")
_SPAN_ID_RE = re.compile(r"[0-9a-f]{16}")

# tracestate key: simple-key, or multi-tenant-key = tenant-id "@" system-id.
_KEY_CHARS = r"[a-z0-9_\-*/]"
_KEY_RE = re.compile(
    rf"[a-z]{_KEY_CHARS}{{0,255}}"  # simple-key, up to 256 chars
    rf"|[a-z0-9]{_KEY_CHARS}{{0,240}}@[a-z]{_KEY_CHARS}{{0,13}}"  # tenant(241) @ system(14)
)
# value: 1..256 printable ASCII except ',' and '=', and it may not end with a space.
_VALUE_RE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


def _text(value: str | bytes | bytearray | memoryview) -> str | None:
    """Header values as str; the datapaths may hand raw wire bytes (must be ASCII)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    return None


def parse_traceparent(value: str | bytes) -> TraceContext | None:
    """Parse one `traceparent` header value; None if it is invalid (restart the trace).

    The returned context has `span_id` = the received parent-id and an empty tracestate.
    """
    text = _text(value)
    if text is None:
        return None
    text = text.strip(_OWS)
    if len(text) < TRACEPARENT_LEN:
        return None
    match = _TRACEPARENT_RE.fullmatch(text, 0, TRACEPARENT_LEN)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == _INVALID_VERSION:
        return None
    if len(text) > TRACEPARENT_LEN:
        # Version 00 is exactly 55 chars; later versions may only append "-" fields.
        if version == "00" or text[TRACEPARENT_LEN] != "-":
            return None
    if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return None
    return TraceContext(trace_id, span_id, int(flags, 16))


def format_traceparent(ctx: TraceContext) -> str:
    """The version-00 `traceparent` value for `ctx` (always 55 chars); flags the spec does
    not define are sent as zero."""
    if not _TRACE_ID_RE.fullmatch(ctx.trace_id) or ctx.trace_id == _ZERO_TRACE_ID:
        raise ValueError(f"invalid trace_id {ctx.trace_id!r}: need 32 lowercase hex, not all zero")
    if not _SPAN_ID_RE.fullmatch(ctx.span_id) or ctx.span_id == _ZERO_SPAN_ID:
        raise ValueError(f"invalid span_id {ctx.span_id!r}: need 16 lowercase hex, not all zero")
    return f"00-{ctx.trace_id}-{ctx.span_id}-{ctx.flags & KNOWN_FLAGS:02x}"


def inject_value(ctx: TraceContext) -> str:
    """The `traceparent` value to write into an outgoing request."""
    return format_traceparent(ctx)


def inject_headers(ctx: TraceContext) -> list[tuple[str, str]]:
    """The headers to write into an outgoing request: traceparent, and tracestate if any."""
    headers = [(TRACEPARENT, format_traceparent(ctx))]
    if ctx.tracestate:
        headers.append((TRACESTATE, ctx.tracestate))
    return headers


def is_valid_tracestate_key(key: str) -> bool:
    return _KEY_RE.fullmatch(key) is not None


def is_valid_tracestate_value(value: str) -> bool:
    return _VALUE_RE.fullmatch(value) is not None


def parse_tracestate(value: str | bytes) -> list[tuple[str, str]] | None:
    """Parse a (possibly combined) `tracestate` value into ordered (key, value) pairs.

    None when the list is invalid: a member breaks the key/value grammar, a key repeats,
    or there are more than 32 members. An empty or whitespace-only value is valid ([]).
    """
    text = _text(value)
    if text is None:
        return None
    entries: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in text.split(","):
        member = raw.strip(_OWS)
        if not member:
            continue  # empty list-members are allowed
        key, sep, val = member.partition("=")
        if not sep or not is_valid_tracestate_key(key) or not is_valid_tracestate_value(val):
            return None
        if key in seen:
            return None
        seen.add(key)
        entries.append((key, val))
        if len(entries) > TRACESTATE_MAX_MEMBERS:
            return None
    return entries


def format_tracestate(entries: Iterable[tuple[str, str]]) -> str:
    """The `tracestate` value for ordered (key, value) pairs; ValueError if invalid."""
    parts: list[str] = []
    seen: set[str] = set()
    for key, val in entries:
        if not is_valid_tracestate_key(key):
            raise ValueError(f"invalid tracestate key {key!r}")
        if not is_valid_tracestate_value(val):
            raise ValueError(f"invalid tracestate value {val!r} for key {key!r}")
        if key in seen:
            raise ValueError(f"duplicate tracestate key {key!r}")
        seen.add(key)
        parts.append(f"{key}={val}")
    if len(parts) > TRACESTATE_MAX_MEMBERS:
        raise ValueError(f"{len(parts)} tracestate members, at most {TRACESTATE_MAX_MEMBERS}")
    return ",".join(parts)


def truncate_tracestate(
    entries: list[tuple[str, str]], limit: int = TRACESTATE_PROPAGATED_MAX
) -> list[tuple[str, str]]:
    """The members of a valid tracestate that fit in `limit` characters once formatted,
    truncated as the spec asks: whole members only; when the list is too long, members
    longer than TRACESTATE_LONG_MEMBER characters go first, then members from the end."""
    sizes = [len(k) + 1 + len(v) for k, v in entries]
    if sum(sizes) + max(len(sizes) - 1, 0) <= limit:
        return list(entries)
    out: list[tuple[str, str]] = []
    used = 0
    for entry, size in zip(entries, sizes):
        if size > TRACESTATE_LONG_MEMBER:
            continue
        used += size + (1 if out else 0)
        if used > limit:
            break
        out.append(entry)
    return out


def extract(
    headers: Iterable[tuple[str | bytes, str | bytes]] | Mapping[str, str],
) -> TraceContext | None:
    """The incoming trace context from request headers, or None (start a new trace).

    Header names are case-insensitive. More than one `traceparent` makes it invalid.
    Several `tracestate` headers are joined with ',' (RFC 7230 list rule) and validated
    as one list; an invalid tracestate is dropped, the traceparent still counts; a long one
    is truncated (truncate_tracestate). The tracestate is not looked at when the
    traceparent is missing or invalid.
    """
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    traceparents: list[str | bytes] = []
    tracestates: list[str] = []
    for name, value in pairs:
        lname = _text(name)
        if lname is None:
            continue
        lname = lname.lower()
        if lname == TRACEPARENT:
            traceparents.append(value)
        elif lname == TRACESTATE:
            text = _text(value)
            # A non-ASCII tracestate poisons the list; remember it as an invalid member.
            tracestates.append(text if text is not None else "\x00")
    if len(traceparents) != 1:
        return None
    ctx = parse_traceparent(traceparents[0])
    if ctx is None or not tracestates:
        return ctx
    entries = parse_tracestate(",".join(tracestates))
    if not entries:
        return ctx
    return TraceContext(ctx.trace_id, ctx.span_id, ctx.flags, format_tracestate(truncate_tracestate(entries)))
