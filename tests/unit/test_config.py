"""Config precedence (defaults < file < env) and every error path names key, value and choices."""

import logging

import pytest

from obi import config
from obi.config import PortRange
from obi.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "obi.yml"
    path.write_text(text)
    return str(path)


def test_defaults():
    cfg = config.load(env={})
    assert cfg.context_propagation == frozenset()
    assert cfg.datapath == "auto"
    assert cfg.traffic_control_backend == "auto"
    assert cfg.trace_printer == "disabled"
    assert cfg.override_bpfloop_enabled is False
    assert cfg.track_request_headers is False
    assert cfg.otlp_protocol == "http/protobuf"
    assert cfg.traces_endpoint == ""
    assert cfg.shutdown_timeout_s == 10.0
    assert cfg.sources == {}


def test_file_overrides_defaults_and_env_overrides_file(tmp_path):
    path = write(
        tmp_path,
        """
ebpf:
  context_propagation: headers
  datapath: userspace
  traffic_control_backend: tc
open_port: 80,443,8000-8999
trace_printer: text
shutdown_timeout: 3s
otel_traces_export:
  endpoint: http://collector:4318
  protocol: grpc
""",
    )
    cfg = config.load(path, env={})
    assert cfg.context_propagation == {"headers"}
    assert cfg.datapath == "userspace"
    assert cfg.traffic_control_backend == "tc"
    assert cfg.open_ports == (PortRange(80, 80), PortRange(443, 443), PortRange(8000, 8999))
    assert cfg.trace_printer == "text"
    assert cfg.shutdown_timeout_s == 3.0
    assert cfg.otlp_protocol == "grpc"
    assert cfg.traces_endpoint == "http://collector:4318"
    assert cfg.sources["datapath"] == f"file {path}"

    env = {
        "OTEL_EBPF_BPF_CONTEXT_PROPAGATION": "all",
        "OTEL_EBPF_DATAPATH": "kernel",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EBPF_TRACE_PRINTER": "json",
    }
    cfg = config.load(path, env=env)
    assert cfg.context_propagation == {"headers", "tcp"}
    assert cfg.datapath == "kernel"
    assert cfg.trace_printer == "json"
    assert cfg.traffic_control_backend == "tc"  # not in env: file still applies
    assert cfg.traces_endpoint == "http://collector:4318/v1/traces"
    assert cfg.sources["datapath"] == "env OTEL_EBPF_DATAPATH"


def test_config_path_from_env(tmp_path):
    path = write(tmp_path, "ebpf:\n  override_bpfloop_enabled: true\n")
    cfg = config.load(env={"OTEL_EBPF_CONFIG_PATH": path})
    assert cfg.override_bpfloop_enabled is True


def test_explicit_path_wins_over_env_path(tmp_path):
    a = write(tmp_path, "trace_printer: text\n")
    b = tmp_path / "other.yml"
    b.write_text("trace_printer: json\n")
    assert config.load(a, env={"OTEL_EBPF_CONFIG_PATH": str(b)}).trace_printer == "text"


def test_signal_specific_env_wins():
    env = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4318/custom",
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s3cr%20t,x=y",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    cfg = config.load(env=env)
    assert cfg.otlp_protocol == "http/protobuf"
    assert cfg.traces_endpoint == "http://b:4318/custom"  # signal endpoint used as-is
    assert cfg.otlp_headers == (("api-key", "s3cr t"), ("x", "y"))
    assert cfg.otlp_insecure is True
    assert cfg.as_dict()["otel_traces_export.headers"] == {"api-key": "<redacted>", "x": "<redacted>"}


@pytest.mark.parametrize(
    "value, expected",
    [
        ("all", {"headers", "tcp"}),
        ("headers", {"headers"}),
        ("tcp", {"tcp"}),
        ("headers,tcp", {"headers", "tcp"}),
        (" HEADERS , tcp ", {"headers", "tcp"}),
        ("disabled", set()),
        ("", set()),
    ],
)
def test_context_propagation_values(value, expected):
    cfg = config.load(env={"OTEL_EBPF_BPF_CONTEXT_PROPAGATION": value})
    assert cfg.context_propagation == expected
    assert cfg.propagate_headers == ("headers" in expected)
    assert cfg.propagate_tcp == ("tcp" in expected)


def test_ip_is_deprecated_and_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="obi.config"):
        cfg = config.load(env={"OTEL_EBPF_BPF_CONTEXT_PROPAGATION": "headers,ip"})
    assert cfg.context_propagation == {"headers"}
    assert "deprecated" in caplog.text


def test_service_name_from_resource_attributes():
    cfg = config.load(env={"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=x, service.name=shop"})
    assert cfg.service_name == "shop"
    cfg = config.load(env={"OTEL_RESOURCE_ATTRIBUTES": "service.name=shop", "OTEL_SERVICE_NAME": "cart"})
    assert cfg.service_name == "cart"


def test_port_and_exe_selection():
    cfg = config.load(env={"OTEL_EBPF_OPEN_PORT": "80,8000-8002", "OTEL_EBPF_AUTO_TARGET_EXE": "*/python3*"})
    assert cfg.port_selected(80) and cfg.port_selected(8001) and not cfg.port_selected(8003)
    assert cfg.exe_selected("/usr/bin/python3.11") and not cfg.exe_selected("/usr/sbin/nginx")


@pytest.mark.parametrize(
    "env, key, allowed",
    [
        ({"OTEL_EBPF_BPF_CONTEXT_PROPAGATION": "everything"}, "ebpf.context_propagation", "all, headers, tcp"),
        ({"OTEL_EBPF_BPF_TRACK_REQUEST_HEADERS": "maybe"}, "ebpf.track_request_headers", "true or false"),
        ({"OTEL_EBPF_OVERRIDE_BPF_LOOP_ENABLED": "2"}, "ebpf.override_bpfloop_enabled", "true or false"),
        ({"OTEL_EBPF_BPF_TC_BACKEND": "netkit"}, "ebpf.traffic_control_backend", "auto, tc, tcx"),
        ({"OTEL_EBPF_DATAPATH": "fast"}, "ebpf.datapath", "auto, kernel, userspace"),
        ({"OTEL_EBPF_OPEN_PORT": "http"}, "open_port", "80,443,8000-8999"),
        ({"OTEL_EBPF_OPEN_PORT": "0"}, "open_port", "between 1 and 65535"),
        ({"OTEL_EBPF_OPEN_PORT": "9000-8000"}, "open_port", "between 1 and 65535"),
        ({"OTEL_EBPF_OPEN_PORT": "70000"}, "open_port", "between 1 and 65535"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "otel_traces_export.protocol", "grpc, http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "otel_traces_export.endpoint", "a URL"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "nohost"}, "otel_traces_export.traces_endpoint", "a URL"),
        ({"OTEL_EXPORTER_OTLP_INSECURE": "sometimes"}, "otel_traces_export.insecure", "true or false"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "otel_traces_export.timeout", "a duration"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "otel_traces_export.sampler.name", "always_on"),
        ({"OTEL_EBPF_TRACE_PRINTER": "pretty"}, "trace_printer", "disabled, text, json"),
        ({"OTEL_EBPF_LOG_LEVEL": "loud"}, "log_level", "debug, info"),
        ({"OTEL_EBPF_LOG_FORMAT": "xml"}, "log_format", "text, json"),
        ({"OTEL_EBPF_SHUTDOWN_TIMEOUT": "-1s"}, "shutdown_timeout", "a positive duration"),
        ({"OTEL_EBPF_SHUTDOWN_TIMEOUT": "0"}, "shutdown_timeout", "a positive duration"),
        ({"OTEL_EBPF_HEALTH_CHECK_PORT": "web"}, "health_check.port", "a TCP port number"),
        (
            {"OTEL_EBPF_INTERNAL_METRICS_PROMETHEUS_PORT": "99999"},
            "internal_metrics.prometheus.port",
            "between 0 and 65535",
        ),
        (
            {"OTEL_EBPF_INTERNAL_METRICS_PROMETHEUS_PATH": "metrics"},
            "internal_metrics.prometheus.path",
            "absolute URL path",
        ),
    ],
)
def test_bad_env_values_name_key_value_and_choices(env, key, allowed):
    with pytest.raises(ConfigError) as err:
        config.load(env=env)
    msg = str(err.value)
    value = next(iter(env.values()))
    assert key in msg and repr(value) in msg and allowed in msg
    assert next(iter(env)) in msg  # the env variable is named as the source


def test_bad_file_value_names_the_file(tmp_path):
    path = write(tmp_path, "ebpf:\n  datapath: turbo\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    assert "ebpf.datapath" in str(err.value) and "'turbo'" in str(err.value) and path in str(err.value)


def test_unknown_key_is_an_error(tmp_path):
    path = write(tmp_path, "ebpf:\n  context_propagaton: all\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    assert "ebpf.context_propagaton" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        config.load(str(tmp_path / "nope.yml"), env={})
    assert "nope.yml" in str(err.value) and "readable" in str(err.value)


def test_not_yaml_and_not_mapping(tmp_path):
    with pytest.raises(ConfigError, match="valid YAML"):
        config.load(write(tmp_path, "a: [unclosed\n"), env={})
    with pytest.raises(ConfigError, match="mapping"):
        config.load(write(tmp_path, "- a\n- b\n"), env={})


def test_empty_file_is_defaults(tmp_path):
    assert config.load(write(tmp_path, ""), env={}).datapath == "auto"


def test_yaml_lists_and_native_types(tmp_path):
    path = write(
        tmp_path, "ebpf:\n  context_propagation: [headers, tcp]\n  track_request_headers: true\nopen_port: 8080\n"
    )
    cfg = config.load(path, env={})
    assert cfg.context_propagation == {"headers", "tcp"}
    assert cfg.track_request_headers is True
    assert cfg.open_ports == (PortRange(8080, 8080),)


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("2m", 120.0), ("7", 7.0), ("1.5s", 1.5)])
def test_durations(text, seconds):
    assert config.load(env={"OTEL_EBPF_SHUTDOWN_TIMEOUT": text}).shutdown_timeout_s == seconds


def test_as_dict_round_trips_through_a_file(tmp_path):
    import yaml

    env = {"OTEL_EBPF_BPF_CONTEXT_PROPAGATION": "all", "OTEL_EBPF_OPEN_PORT": "80,8000-8100"}
    shown = config.load(env=env).as_dict()
    tree: dict = {}
    for dotted, value in shown.items():
        if dotted == "otel_traces_export.headers" or value in (None, ""):
            continue
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = write(tmp_path, yaml.safe_dump(tree))
    again = config.load(path, env={})
    assert again.context_propagation == {"headers", "tcp"}
    assert again.open_ports == (PortRange(80, 80), PortRange(8000, 8100))


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "infs", "1e309", "1e308m", "nanms"])
@pytest.mark.parametrize(
    "var, key",
    [("OTEL_EBPF_SHUTDOWN_TIMEOUT", "shutdown_timeout"), ("OTEL_EXPORTER_OTLP_TIMEOUT", "otel_traces_export.timeout")],
)
def test_non_finite_durations_are_rejected(text, var, key):
    """A NaN or infinite shutdown_timeout would make the drain deadline never pass: a stop
    would then run until killed, leaving the userspace path's hold rules behind."""
    with pytest.raises(ConfigError) as err:
        config.load(env={var: text})
    assert key in str(err.value) and "finite" in str(err.value)


@pytest.mark.parametrize(
    "raw",
    [
        "Authorization=Bearer%20s3cr3t-token,broken",
        "x-api-key=s3cr3t-token,=nameless",
        "s3cr3t-token",
    ],
)
@pytest.mark.parametrize("var", ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"])
def test_malformed_otlp_headers_error_never_shows_header_values(raw, var):
    """The error names the key, the source and what is wrong, never a header value (it ends
    up in logs and in a pod's termination message)."""
    with pytest.raises(ConfigError) as err:
        config.load(env={var: raw})
    msg = str(err.value)
    assert "s3cr3t" not in msg and "Bearer" not in msg
    assert "otel_traces_export.headers" in msg and var in msg and "name=value" in msg
    assert "s3cr3t" not in repr(err.value.value)


def test_malformed_otlp_headers_in_a_file_never_show_values(tmp_path):
    path = write(tmp_path, 'otel_traces_export:\n  headers: ["api-key=s3cr3t", "broken-s3cr3t"]\n')
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    assert "s3cr3t" not in str(err.value) and "otel_traces_export.headers" in str(err.value)


def test_config_repr_never_shows_header_values():
    cfg = config.load(env={"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20s3cr3t"})
    assert cfg.otlp_headers == (("Authorization", "Bearer s3cr3t"),)
    assert "s3cr3t" not in repr(cfg) and "s3cr3t" not in str(cfg.as_dict())
