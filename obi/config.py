"""Configuration: read once (defaults < YAML file < environment), validated, handed down.

This is the only module that reads the environment. Every key is declared once in
`_KEYS` with its YAML path, its environment variable(s) and its parser; the YAML names and
`OTEL_EBPF_*` names follow OBI where the feature exists there.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import yaml

from .errors import ConfigError

log = logging.getLogger("obi.config")

PROPAGATION_KINDS = ("headers", "tcp")


@dataclass(frozen=True)
class PortRange:
    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class Config:
    # ebpf.*
    context_propagation: frozenset[str] = frozenset()  # subset of PROPAGATION_KINDS
    track_request_headers: bool = False
    override_bpfloop_enabled: bool = False
    traffic_control_backend: str = "auto"  # auto | tc | tcx
    datapath: str = "auto"  # auto | kernel | userspace
    cgroup_path: str = ""  # cgroup v2 dir the sockops program attaches to; "" = root
    # discovery
    open_ports: tuple[PortRange, ...] = ()
    auto_target_exe: str = ""  # glob on the executable path
    # export
    otlp_endpoint: str = ""  # base endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)
    otlp_traces_endpoint: str = ""  # signal endpoint, used as-is
    otlp_protocol: str = "http/protobuf"  # grpc | http/protobuf
    otlp_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # credentials: never printed
    otlp_insecure: bool | None = None
    otlp_timeout_s: float = 10.0
    service_name: str = ""
    traces_sampler: str = "parentbased_always_on"
    traces_sampler_arg: str = ""
    trace_printer: str = "disabled"  # disabled | text | json
    # agent
    log_level: str = "info"
    log_format: str = "text"  # text | json
    shutdown_timeout_s: float = 10.0
    health_check_port: int = 0  # 0 = no health endpoint
    health_check_listen_address: str = "127.0.0.1"  # also the metrics listener's (as OBI: loopback)
    internal_metrics_port: int = 0  # 0 = no Prometheus endpoint
    internal_metrics_path: str = "/internal/metrics"
    # Where each value came from, for `obi config show`.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def propagate_headers(self) -> bool:
        return "headers" in self.context_propagation

    @property
    def read_incoming_headers(self) -> bool:
        """Continue incoming `traceparent` headers: with headers propagation, or (as in
        OBI) with track_request_headers alone."""
        return self.propagate_headers or self.track_request_headers

    @property
    def propagate_tcp(self) -> bool:
        return "tcp" in self.context_propagation

    @property
    def traces_endpoint(self) -> str:
        """The OTLP traces endpoint to send to, or "" when OTLP export is off."""
        if self.otlp_traces_endpoint:
            return self.otlp_traces_endpoint
        if not self.otlp_endpoint:
            return ""
        if self.otlp_protocol == "grpc":
            return self.otlp_endpoint
        return self.otlp_endpoint.rstrip("/") + "/v1/traces"

    def port_selected(self, port: int) -> bool:
        return any(port in r for r in self.open_ports)

    def exe_selected(self, exe: str) -> bool:
        return bool(self.auto_target_exe) and fnmatch.fnmatch(exe, self.auto_target_exe)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in _KEYS:
            value = getattr(self, key.attr)
            out[key.yaml] = key.show(value)
        return out


# --- parsers: each takes the raw value and the key name (for the error) ---------------


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise ConfigError(key, value, "true or false")


def _choice(*allowed: str) -> Callable[[Any, str], str]:
    def parse(value: Any, key: str) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ConfigError(key, value, "one of " + ", ".join(allowed))
        return text

    return parse


def _propagation(value: Any, key: str) -> frozenset[str]:
    items = value if isinstance(value, list) else str(value).split(",")
    kinds: set[str] = set()
    for raw in items:
        item = str(raw).strip().lower()
        if item in ("", "disabled"):
            continue
        if item == "all":
            kinds.update(PROPAGATION_KINDS)
        elif item in PROPAGATION_KINDS:
            kinds.add(item)
        elif item == "ip":
            log.warning("%s: 'ip' context propagation is deprecated and ignored", key)
        else:
            raise ConfigError(key, value, "all, headers, tcp, a comma list of those, or disabled")
    return frozenset(kinds)


def _ports(value: Any, key: str) -> tuple[PortRange, ...]:
    items = value if isinstance(value, list) else str(value).split(",")
    ranges = []
    for raw in items:
        item = str(raw).strip()
        if not item:
            continue
        low_s, _, high_s = item.partition("-")
        try:
            low = int(low_s)
            high = int(high_s) if high_s else low
        except ValueError:
            raise ConfigError(key, value, "ports or ranges like 80,443,8000-8999") from None
        if not (1 <= low <= high <= 65535):
            raise ConfigError(key, value, "ports between 1 and 65535, ranges low-high")
        ranges.append(PortRange(low, high))
    return tuple(ranges)


def _text(value: Any, key: str) -> str:
    if isinstance(value, (dict, list)):
        raise ConfigError(key, value, "a string")
    return "" if value is None else str(value).strip()


def _seconds(value: Any, key: str) -> float:
    text = str(value).strip().lower()
    scale = 1.0
    for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            text, scale = text[: -len(suffix)], mult
            break
    try:
        seconds = float(text) * scale
    except ValueError:
        raise ConfigError(key, value, "a duration like 10s, 500ms or 2m") from None
    # NaN compares false with everything: a deadline of now + nan never passes.
    if not math.isfinite(seconds):
        raise ConfigError(key, value, "a finite positive duration")
    if seconds <= 0:
        raise ConfigError(key, value, "a positive duration")
    return seconds


def _port(value: Any, key: str) -> int:
    try:
        port = int(str(value).strip())
    except ValueError:
        raise ConfigError(key, value, "a TCP port number (0 to disable)") from None
    if not 0 <= port <= 65535:
        raise ConfigError(key, value, "a TCP port number between 0 and 65535")
    return port


def _ip(value: Any, key: str) -> str:
    import ipaddress

    text = _text(value, key)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ConfigError(key, value, "an IP address such as 127.0.0.1, 0.0.0.0 or ::") from None


def _url_path(value: Any, key: str) -> str:
    text = _text(value, key)
    if not text.startswith("/"):
        raise ConfigError(key, value, "an absolute URL path such as /internal/metrics")
    return text


def _headers(value: Any, key: str) -> tuple[tuple[str, str], ...]:
    """OTLP headers: a mapping, a list of `name=value` strings, or `name=value,...` text.
    They usually carry credentials (bearer tokens, API keys): an error names the position
    of the bad item, never its text, since it ends up in logs and termination messages."""
    from urllib.parse import unquote

    if isinstance(value, dict):
        return tuple((str(k), str(v)) for k, v in value.items())
    items = [str(v) for v in value] if isinstance(value, list) else str(value).split(",")
    pairs = []
    for n, item in enumerate(items, 1):
        if not item.strip():
            continue
        name, sep, val = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(
                key,
                f"<{len(items)} item(s), not shown>",
                f"comma-separated name=value pairs (item {n} is not one; header values are never shown)",
            )
        pairs.append((unquote(name.strip()), unquote(val.strip())))
    return tuple(pairs)


def _endpoint(value: Any, key: str) -> str:
    text = _text(value, key)
    if text and "://" not in text:
        raise ConfigError(key, value, "a URL such as http://collector:4318")
    return text


def _sampler(value: Any, key: str) -> str:
    return _choice(
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    )(value, key)


def _log_level(value: Any, key: str) -> str:
    return _choice("debug", "info", "warn", "warning", "error")(value, key).replace("warning", "warn")


@dataclass(frozen=True)
class _Key:
    attr: str
    yaml: str  # dotted path in the YAML file
    env: tuple[str, ...]  # environment variables, first one wins
    parse: Callable[[Any, str], Any]

    def show(self, value: Any) -> Any:
        if isinstance(value, frozenset):
            return ",".join(sorted(value)) or "disabled"
        if self.attr == "open_ports":
            return ",".join(str(r) for r in value)
        if self.attr == "otlp_headers":
            return {k: "<redacted>" for k, _ in value}
        return value


_KEYS: tuple[_Key, ...] = (
    _Key("context_propagation", "ebpf.context_propagation", ("OTEL_EBPF_BPF_CONTEXT_PROPAGATION",), _propagation),
    _Key("track_request_headers", "ebpf.track_request_headers", ("OTEL_EBPF_BPF_TRACK_REQUEST_HEADERS",), _bool),
    _Key("override_bpfloop_enabled", "ebpf.override_bpfloop_enabled", ("OTEL_EBPF_OVERRIDE_BPF_LOOP_ENABLED",), _bool),
    _Key(
        "traffic_control_backend",
        "ebpf.traffic_control_backend",
        ("OTEL_EBPF_BPF_TC_BACKEND",),
        _choice("auto", "tc", "tcx"),
    ),
    _Key("datapath", "ebpf.datapath", ("OTEL_EBPF_DATAPATH",), _choice("auto", "kernel", "userspace")),
    _Key("cgroup_path", "ebpf.cgroup_path", ("OTEL_EBPF_CGROUP_PATH",), _text),
    _Key("open_ports", "open_port", ("OTEL_EBPF_OPEN_PORT",), _ports),
    _Key("auto_target_exe", "auto_target_exe", ("OTEL_EBPF_AUTO_TARGET_EXE",), _text),
    _Key("otlp_endpoint", "otel_traces_export.endpoint", ("OTEL_EXPORTER_OTLP_ENDPOINT",), _endpoint),
    _Key(
        "otlp_traces_endpoint", "otel_traces_export.traces_endpoint", ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",), _endpoint
    ),
    _Key(
        "otlp_protocol",
        "otel_traces_export.protocol",
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        _choice("grpc", "http/protobuf"),
    ),
    _Key(
        "otlp_headers",
        "otel_traces_export.headers",
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"),
        _headers,
    ),
    _Key(
        "otlp_insecure",
        "otel_traces_export.insecure",
        ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"),
        _bool,
    ),
    _Key(
        "otlp_timeout_s",
        "otel_traces_export.timeout",
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"),
        _seconds,
    ),
    _Key("service_name", "service_name", ("OTEL_SERVICE_NAME",), _text),
    _Key("traces_sampler", "otel_traces_export.sampler.name", ("OTEL_TRACES_SAMPLER",), _sampler),
    _Key("traces_sampler_arg", "otel_traces_export.sampler.arg", ("OTEL_TRACES_SAMPLER_ARG",), _text),
    _Key("trace_printer", "trace_printer", ("OTEL_EBPF_TRACE_PRINTER",), _choice("disabled", "text", "json")),
    _Key("log_level", "log_level", ("OTEL_EBPF_LOG_LEVEL",), _log_level),
    _Key("log_format", "log_format", ("OTEL_EBPF_LOG_FORMAT",), _choice("text", "json")),
    _Key("shutdown_timeout_s", "shutdown_timeout", ("OTEL_EBPF_SHUTDOWN_TIMEOUT",), _seconds),
    _Key("health_check_port", "health_check.port", ("OTEL_EBPF_HEALTH_CHECK_PORT",), _port),
    _Key("health_check_listen_address", "health_check.listen_address", ("OTEL_EBPF_HEALTH_CHECK_LISTEN_ADDRESS",), _ip),
    _Key(
        "internal_metrics_port",
        "internal_metrics.prometheus.port",
        ("OTEL_EBPF_INTERNAL_METRICS_PROMETHEUS_PORT",),
        _port,
    ),
    _Key(
        "internal_metrics_path",
        "internal_metrics.prometheus.path",
        ("OTEL_EBPF_INTERNAL_METRICS_PROMETHEUS_PATH",),
        _url_path,
    ),
)

KNOWN_YAML_KEYS = frozenset(k.yaml for k in _KEYS)
CONFIG_PATH_ENV = "OTEL_EBPF_CONFIG_PATH"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict) and path not in KNOWN_YAML_KEYS:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def read_yaml(path: str) -> dict[str, Any]:
    """Parse a config file into {dotted key: raw value}; unknown keys are errors."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("config file", path, f"a readable file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError("config file", path, f"valid YAML ({e})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError("config file", path, "a YAML mapping at the top level")
    flat = _flatten(tree)
    unknown = sorted(set(flat) - KNOWN_YAML_KEYS)
    if unknown:
        raise ConfigError(unknown[0], flat[unknown[0]], "a known key (" + ", ".join(sorted(KNOWN_YAML_KEYS)) + ")")
    return flat


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the Config: defaults, then the YAML file, then the environment (env wins).

    `path` is `--config FILE`; when None, `OTEL_EBPF_CONFIG_PATH` names the file, if set.
    """
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_PATH_ENV) or None
    file_values = read_yaml(path) if path else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in _KEYS:
        raw, source = None, ""
        if key.yaml in file_values:
            raw, source = file_values[key.yaml], f"file {path}"
        for var in key.env:
            if var in env:
                raw, source = env[var], f"env {var}"
                break
        if source:
            values[key.attr] = key.parse(raw, f"{key.yaml} ({source})")
            sources[key.attr] = source
    # The service name may also come from OTEL_RESOURCE_ATTRIBUTES, as in the SDKs.
    if "service_name" not in values:
        for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
            name, _, val = item.partition("=")
            if name.strip() == "service.name" and val.strip():
                values["service_name"] = val.strip()
                sources["service_name"] = "env OTEL_RESOURCE_ATTRIBUTES"
    cfg = Config(**values, sources=sources)
    if cfg.context_propagation and not cfg.open_ports and not cfg.auto_target_exe:
        # Nothing selected: valid (the agent then does nothing), but say so.
        log.debug("no open_port / auto_target_exe set: no process is instrumented")
    return cfg
