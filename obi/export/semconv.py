"""The OpenTelemetry semantic conventions as obi applies them to a `SpanRecord`.

Span name, attributes and status per the stable HTTP conventions (plus obi's own facts under
`obi.*`), and the Resource of the process a span was seen in. Pure functions of the record:
the SDK span (`sdk_span`) and the wire encoder (`otlp_wire`) both build on them.
"""

from __future__ import annotations

import collections
import os
import socket
from typing import Any, Callable
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Status, StatusCode

from .. import __version__
from ..model import SpanKind, SpanRecord

SDK_NAME = "obi-py"
SCOPE = InstrumentationScope("obi", __version__)

# Methods the HTTP semantic conventions know (RFC 9110 + PATCH); case-sensitive.
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


# --- span naming, attributes, status (pure) ------------------------------------------


def _known_method(method: str) -> bool:
    return method in KNOWN_METHODS


def is_tls(rec: SpanRecord) -> bool:
    """An encrypted exchange: linked by the TCP option, its HTTP fields unknown."""
    return bool(rec.extra.get("tls"))


def span_name(rec: SpanRecord) -> str:
    """`{method}` (routes are unknown on the wire); `HTTP` for a nonstandard method;
    `TLS` for an encrypted request, whose method the agent cannot see."""
    if is_tls(rec):
        return "TLS"
    return rec.method if _known_method(rec.method) else "HTTP"


def _split_target(target: str) -> tuple[str, str]:
    """Request target -> (path, query). Handles absolute-form targets (proxies)."""
    if "://" in target.split("?", 1)[0]:
        parts = urlsplit(target)
        return parts.path or "/", parts.query
    path, _, query = target.partition("?")
    path = path.partition("#")[0]
    return path, query.partition("#")[0]


def split_host(host: str) -> tuple[str, int | None]:
    """A Host header value -> (name, port or None). `[v6]:port` keeps no brackets."""
    host = host.strip()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    else:  # bare name, or an unbracketed IPv6 address
        name, port = host, ""
    return name, (int(port) if port.isdigit() and 0 < int(port) < 65536 else None)


def _url_host(name: str) -> str:
    return f"[{name}]" if ":" in name else name


def is_error(rec: SpanRecord) -> bool:
    """5xx is an error on both kinds; 4xx only on client spans (the server did its job)."""
    if rec.status >= 500:
        return True
    return rec.kind is SpanKind.CLIENT and 400 <= rec.status < 500


def span_status(rec: SpanRecord) -> Status:
    return Status(StatusCode.ERROR) if is_error(rec) else Status(StatusCode.UNSET)


def span_attributes(rec: SpanRecord) -> dict[str, str | int | bool]:
    """Attributes per the stable OpenTelemetry HTTP semantic conventions, plus obi's own."""
    attrs: dict[str, str | int | bool] = {}
    tls = is_tls(rec)
    path, query = _split_target(rec.path)
    if not tls:  # encrypted: method, target and status are not visible on the wire
        if _known_method(rec.method):
            attrs["http.request.method"] = rec.method
        else:
            attrs["http.request.method"] = "_OTHER"
            attrs["http.request.method_original"] = rec.method
        attrs["url.path"] = path
        if query:
            attrs["url.query"] = query
        attrs["url.scheme"] = rec.scheme
    if rec.status > 0:
        attrs["http.response.status_code"] = rec.status

    host_name, host_port = split_host(rec.host) if rec.host else ("", None)
    if rec.kind is SpanKind.SERVER:
        server_addr, server_port = host_name or rec.local_addr, host_port or rec.local_port
    else:
        server_addr, server_port = host_name or rec.peer_addr, host_port or rec.peer_port
    if server_addr:
        attrs["server.address"] = server_addr
    if server_port:
        attrs["server.port"] = server_port
    if rec.kind is SpanKind.SERVER:
        if rec.peer_addr:
            attrs["client.address"] = rec.peer_addr
        if rec.peer_port:
            attrs["client.port"] = rec.peer_port
    if rec.peer_addr:
        attrs["network.peer.address"] = rec.peer_addr
    if rec.peer_port:
        attrs["network.peer.port"] = rec.peer_port
    attrs["network.transport"] = "tcp"
    if not tls:
        attrs["network.protocol.name"] = "http"
        attrs["network.protocol.version"] = "1.1"
    if rec.kind is SpanKind.CLIENT and server_addr and not tls:
        authority = _url_host(server_addr)
        if server_port and server_port != _DEFAULT_PORTS.get(rec.scheme):
            authority += f":{server_port}"
        attrs["url.full"] = f"{rec.scheme}://{authority}{path}" + (f"?{query}" if query else "")
    if is_error(rec):
        attrs["error.type"] = str(rec.status)
    attrs["obi.datapath"] = rec.datapath.value
    if rec.tid:
        attrs["thread.id"] = rec.tid
    if rec.pid:
        attrs["process.pid"] = rec.pid
    # Datapath-specific facts (e.g. tls, tcp_option) live in obi's own namespace.
    for key, value in rec.extra.items():
        attrs.setdefault(key if key.startswith("obi.") else f"obi.{key}", value)
    return attrs


# --- resource ---------------------------------------------------------------------------


def resource_attributes(rec: SpanRecord, service_name: str = "") -> dict[str, str | int]:
    """The Resource of the process the span was seen in."""
    exe_name = os.path.basename(rec.exe) if rec.exe else ""
    attrs: dict[str, str | int] = {
        "service.name": service_name or exe_name or "unknown_service",
        "telemetry.sdk.name": SDK_NAME,
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": __version__,
        "host.name": socket.gethostname(),
    }
    if rec.pid:
        attrs["process.pid"] = rec.pid
    if rec.exe:
        attrs["process.executable.path"] = rec.exe
        attrs["process.executable.name"] = exe_name
    return attrs


class ResourceCache:
    """One resource per (pid, exe), created lazily; bounded (LRU) so churn can't grow it.

    The resource is an SDK `Resource` by default, or what `build` makes of the attributes
    (the wire encoder keeps them encoded)."""

    def __init__(self, service_name: str = "", max_entries: int = 4096, build: Callable[[dict], Any] = Resource):
        self._service_name = service_name
        self._max = max_entries
        # Resource(...) rather than Resource.create(): no environment, no SDK defaults.
        self._build = build
        self._cache: collections.OrderedDict[tuple[int, str], Any] = collections.OrderedDict()

    def get(self, rec: SpanRecord) -> Any:
        key = (rec.pid, rec.exe)
        res = self._cache.get(key)
        if res is None:
            res = self._build(resource_attributes(rec, self._service_name))
            self._cache[key] = res
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return res
