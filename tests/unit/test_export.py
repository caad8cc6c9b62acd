"""obi.export without network or root: naming, attributes, status, resource, printer,
sampling, and the exporter's never-blocking queue."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from opentelemetry.trace import SpanKind as OtelKind
from opentelemetry.trace import StatusCode

from obi import __version__
from obi.config import Config
from obi.errors import ConfigError
from obi.export import Exporter
from obi.export.otlp_transport import make_otlp_exporter
from obi.export.printer import SpanPrinter, span_to_dict
from obi.export.sampling import Sampler
from obi.export.sdk_span import to_readable_span
from obi.export.semconv import ResourceCache, resource_attributes, span_attributes, span_name, span_status, split_host
from obi.model import FLAG_RANDOM, FLAG_SAMPLED, Datapath, SpanKind, SpanRecord, TraceContext

T0 = 1_700_000_000_000_000_000


def rec(kind: SpanKind = SpanKind.SERVER, **kw) -> SpanRecord:
    ctx = TraceContext.new_root()
    values = dict(
        trace_id=ctx.trace_id,
        span_id=ctx.span_id,
        parent_span_id="",
        kind=kind,
        start_ns=T0,
        end_ns=T0 + 2_500_000,
        method="GET",
        path="/items/1",
        status=200,
        local_addr="198.18.0.1",
        local_port=8080,
        peer_addr="198.18.0.2",
        peer_port=41000,
    )
    values.update(kw)
    return SpanRecord(**values)


# --- naming -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"])
def test_known_methods_name_the_span(method: str) -> None:
    r = rec(method=method)
    assert span_name(r) == method
    attrs = span_attributes(r)
    assert attrs["http.request.method"] == method
    assert "http.request.method_original" not in attrs


@pytest.mark.parametrize("method", ["FOO", "get", "PROPFIND", ""])
def test_other_methods(method: str) -> None:
    r = rec(method=method)
    assert span_name(r) == "HTTP"
    attrs = span_attributes(r)
    assert attrs["http.request.method"] == "_OTHER"
    assert attrs["http.request.method_original"] == method


# --- attributes ---------------------------------------------------------------------------


def test_server_attributes_from_sockets() -> None:
    r = rec(path="/items/1?x=1&y=2", pid=10, tid=11, datapath=Datapath.KERNEL)
    assert span_attributes(r) == {
        "http.request.method": "GET",
        "url.path": "/items/1",
        "url.query": "x=1&y=2",
        "url.scheme": "http",
        "http.response.status_code": 200,
        "server.address": "198.18.0.1",
        "server.port": 8080,
        "client.address": "198.18.0.2",
        "client.port": 41000,
        "network.peer.address": "198.18.0.2",
        "network.peer.port": 41000,
        "network.protocol.name": "http",
        "network.protocol.version": "1.1",
        "network.transport": "tcp",
        "obi.datapath": "kernel",
        "thread.id": 11,
        "process.pid": 10,
    }


def test_server_address_prefers_host_header() -> None:
    attrs = span_attributes(rec(host="api.example:9000"))
    assert (attrs["server.address"], attrs["server.port"]) == ("api.example", 9000)
    # Host without a port: the port the connection arrived on.
    attrs = span_attributes(rec(host="api.example"))
    assert (attrs["server.address"], attrs["server.port"]) == ("api.example", 8080)


def test_client_attributes_and_url_full() -> None:
    r = rec(
        SpanKind.CLIENT,
        local_port=50000,
        peer_addr="198.18.0.9",
        peer_port=8000,
        path="/a?b=c",
        datapath=Datapath.USERSPACE,
    )
    attrs = span_attributes(r)
    assert attrs["server.address"] == "198.18.0.9" and attrs["server.port"] == 8000
    assert attrs["network.peer.address"] == "198.18.0.9" and attrs["network.peer.port"] == 8000
    assert attrs["url.full"] == "http://198.18.0.9:8000/a?b=c"
    assert "client.address" not in attrs and "client.port" not in attrs
    assert attrs["obi.datapath"] == "userspace"


def test_url_full_uses_host_and_omits_default_port() -> None:
    attrs = span_attributes(rec(SpanKind.CLIENT, host="svc.local", peer_port=80))
    assert attrs["url.full"] == "http://svc.local/items/1"
    attrs = span_attributes(rec(SpanKind.CLIENT, host="svc.local:8443", scheme="https"))
    assert attrs["url.full"] == "https://svc.local:8443/items/1"
    attrs = span_attributes(rec(SpanKind.CLIENT, peer_addr="2001:db8::1", peer_port=8080))
    assert attrs["url.full"] == "http://[2001:db8::1]:8080/items/1"
    assert attrs["server.address"] == "2001:db8::1"  # no brackets in the attribute


def test_url_full_from_server_span_is_absent() -> None:
    assert "url.full" not in span_attributes(rec())


def test_absolute_form_target() -> None:
    attrs = span_attributes(rec(path="http://origin.example/p/q?z=1"))
    assert attrs["url.path"] == "/p/q" and attrs["url.query"] == "z=1"


def test_no_response_no_status_code_no_error() -> None:
    attrs = span_attributes(rec(status=0))
    assert "http.response.status_code" not in attrs and "error.type" not in attrs
    assert span_status(rec(status=0)).status_code is StatusCode.UNSET


def test_unknown_pid_tid_omitted_and_extra_merged() -> None:
    attrs = span_attributes(rec(extra={"obi.propagation": "tcp", "tls_version": "1.3", "url.path": "not me"}))
    assert "thread.id" not in attrs and "process.pid" not in attrs
    assert attrs["obi.propagation"] == "tcp"
    assert attrs["obi.tls_version"] == "1.3"  # datapath facts go into obi's namespace
    assert attrs["url.path"] == "/items/1"  # extra never overrides a convention attribute
    assert attrs["obi.url.path"] == "not me"


def test_tls_span_has_no_http_fields() -> None:
    r = rec(SpanKind.CLIENT, method="", path="", status=0, extra={"tls": True, "tcp_option": True})
    assert span_name(r) == "TLS"
    attrs = span_attributes(r)
    assert not any(k.startswith(("http.", "url.")) for k in attrs), attrs
    assert "network.protocol.name" not in attrs
    assert attrs["network.transport"] == "tcp"
    assert attrs["obi.tls"] is True and attrs["obi.tcp_option"] is True
    assert attrs["server.address"] == r.peer_addr and attrs["network.peer.port"] == r.peer_port
    assert span_status(r).status_code.name == "UNSET"


@pytest.mark.parametrize(
    "host,expected",
    [
        ("a.example", ("a.example", None)),
        ("a.example:8080", ("a.example", 8080)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
        ("a.example:notaport", ("a.example", None)),
        ("a.example:70000", ("a.example", None)),
    ],
)
def test_split_host(host: str, expected: tuple) -> None:
    assert split_host(host) == expected


# --- status -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,status,error",
    [
        (SpanKind.SERVER, 200, False),
        (SpanKind.SERVER, 302, False),
        (SpanKind.SERVER, 404, False),
        (SpanKind.SERVER, 499, False),
        (SpanKind.SERVER, 500, True),
        (SpanKind.SERVER, 503, True),
        (SpanKind.CLIENT, 200, False),
        (SpanKind.CLIENT, 399, False),
        (SpanKind.CLIENT, 400, True),
        (SpanKind.CLIENT, 404, True),
        (SpanKind.CLIENT, 504, True),
        (SpanKind.CLIENT, 0, False),
    ],
)
def test_status_rules(kind: SpanKind, status: int, error: bool) -> None:
    r = rec(kind, status=status)
    assert span_status(r).status_code is (StatusCode.ERROR if error else StatusCode.UNSET)
    attrs = span_attributes(r)
    if error:
        assert attrs["error.type"] == str(status)
    else:
        assert "error.type" not in attrs


# --- resource -----------------------------------------------------------------------------


def test_resource_names_the_project_and_process() -> None:
    attrs = resource_attributes(rec(pid=321, exe="/usr/local/bin/gunicorn"))
    assert attrs["service.name"] == "gunicorn"
    assert attrs["telemetry.sdk.name"] == "obi-py"
    assert attrs["telemetry.sdk.language"] == "python"
    assert attrs["telemetry.sdk.version"] == __version__
    assert attrs["process.pid"] == 321
    assert attrs["process.executable.path"] == "/usr/local/bin/gunicorn"
    assert attrs["host.name"]


def test_resource_service_name_precedence() -> None:
    assert resource_attributes(rec(exe="/bin/app"), "configured")["service.name"] == "configured"
    assert resource_attributes(rec(exe="/bin/app"))["service.name"] == "app"
    unknown = resource_attributes(rec())
    assert unknown["service.name"] == "unknown_service"
    assert "process.pid" not in unknown and "process.executable.path" not in unknown


def test_resource_cache_one_per_process_and_bounded() -> None:
    cache = ResourceCache(max_entries=2)
    a1, a2, b = cache.get(rec(pid=1, exe="/a")), cache.get(rec(pid=1, exe="/a")), cache.get(rec(pid=2, exe="/b"))
    assert a1 is a2 and a1 is not b
    assert b.attributes["process.pid"] == 2 and a1.attributes["process.pid"] == 1
    cache.get(rec(pid=3, exe="/c"))  # evicts the least recently used: pid 1
    assert cache.get(rec(pid=2, exe="/b")) is b
    assert cache.get(rec(pid=1, exe="/a")) is not a1


# --- SDK span -----------------------------------------------------------------------------


def test_readable_span_keeps_ids_parent_kind_times() -> None:
    parent = TraceContext.new_root()
    r = rec(
        SpanKind.CLIENT,
        trace_id=parent.trace_id,
        span_id=parent.child().span_id,
        parent_span_id=parent.span_id,
        tracestate="k=v",
        status=500,
    )
    span = to_readable_span(r, ResourceCache().get(r))
    ctx = span.get_span_context()
    assert f"{ctx.trace_id:032x}" == r.trace_id and f"{ctx.span_id:016x}" == r.span_id
    assert ctx.trace_flags.sampled and not ctx.is_remote
    assert span.parent is not None and span.parent.is_remote
    assert f"{span.parent.span_id:016x}" == r.parent_span_id
    assert span.kind is OtelKind.CLIENT
    assert (span.start_time, span.end_time) == (r.start_ns, r.end_ns)
    assert span.status.status_code is StatusCode.ERROR
    assert ctx.trace_state.get("k") == "v"
    assert span.instrumentation_scope.name == "obi"


# --- printer ------------------------------------------------------------------------------

JSON_KEYS = {
    "trace_id",
    "span_id",
    "parent_span_id",
    "name",
    "kind",
    "start_time_unix_nano",
    "end_time_unix_nano",
    "attributes",
    "resource",
    "status",
}


def printing_config(mode: str, **kw) -> Config:
    return Config(trace_printer=mode, sources={"trace_printer": "test"}, **kw)


def test_json_printer_one_object_per_line_from_many_threads() -> None:
    out = io.StringIO()
    exp = Exporter(printing_config("json"), stream=out)
    parents = {}

    def produce() -> None:
        for _ in range(50):
            root = rec(pid=5, exe="/srv/api")
            child_ctx = TraceContext(root.trace_id, root.span_id).child()
            child = rec(
                SpanKind.CLIENT,
                trace_id=root.trace_id,
                span_id=child_ctx.span_id,
                parent_span_id=root.span_id,
                pid=5,
                exe="/srv/api",
            )
            parents[child.span_id] = root.span_id
            exp.export(root)
            exp.export(child)

    threads = [threading.Thread(target=produce) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert exp.shutdown(5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 400 == exp.stats()["printed"]
    seen = set()
    for line in lines:
        obj = json.loads(line)  # exactly one complete object per line
        assert JSON_KEYS <= set(obj)
        assert obj["kind"] in ("SERVER", "CLIENT")
        assert len(obj["trace_id"]) == 32 and len(obj["span_id"]) == 16
        if obj["kind"] == "SERVER":
            assert obj["parent_span_id"] == ""
        else:
            assert obj["parent_span_id"] == parents[obj["span_id"]]
        assert obj["end_time_unix_nano"] - obj["start_time_unix_nano"] == 2_500_000
        assert obj["resource"]["service.name"] == "api"
        assert obj["resource"]["telemetry.sdk.name"] == "obi-py"
        assert obj["attributes"]["http.request.method"] == "GET"
        assert obj["status"]["code"] == "UNSET"
        seen.add(obj["span_id"])
    assert len(seen) == 400


def test_printer_lines_never_interleave() -> None:
    """Several printers sharing one stream (as they share stdout) write whole lines."""

    class Chunky(io.StringIO):
        def write(self, s: str) -> int:  # tear every write in two, to give threads a chance
            half = len(s) // 2
            super().write(s[:half])
            time.sleep(0)
            return super().write(s[half:])

    out = Chunky()
    span = to_readable_span(rec(), ResourceCache().get(rec()))
    printers = [SpanPrinter("json", out) for _ in range(4)]
    threads = [threading.Thread(target=lambda p=p: [p.print(span) for _ in range(100)]) for p in printers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 400
    span_id = f"{span.get_span_context().span_id:016x}"
    assert all(json.loads(line)["span_id"] == span_id for line in lines)


def test_text_printer_line() -> None:
    r = rec(parent_span_id="00f067aa0ba902b7", status=503, exe="/bin/web", path="/pay?x=1")
    line = SpanPrinter("text").format(to_readable_span(r, ResourceCache().get(r)))
    assert "\n" not in line
    for part in (
        "web",
        "SERVER",
        "GET",
        "/pay",
        "503",
        "ERROR",
        "2.500ms",
        f"trace={r.trace_id}",
        f"span={r.span_id}",
        "parent=00f067aa0ba902b7",
        "2023-11-14T22:13:20.000Z",
    ):
        assert part in line, part


def test_span_to_dict_root_parent_is_empty() -> None:
    r = rec()
    assert span_to_dict(to_readable_span(r, ResourceCache().get(r)))["parent_span_id"] == ""


def test_printer_default_and_choice() -> None:
    # Nowhere to send spans and no explicit printer setting: print text (the embedded default).
    cases = [
        (Config(), "text"),
        (printing_config("disabled"), None),
        (Config(otlp_traces_endpoint="http://127.0.0.1:1/v1/traces"), None),
    ]
    for cfg, mode in cases:
        exp = Exporter(cfg)
        assert (exp.printer.mode if exp.printer else None) == mode
        exp.shutdown(1)
    with pytest.raises(ConfigError):
        SpanPrinter("yaml")


# --- sampling -----------------------------------------------------------------------------


def _export_all(cfg: Config, records: list[SpanRecord]) -> tuple[dict, list[dict]]:
    out = io.StringIO()
    exp = Exporter(cfg, stream=out)
    for r in records:
        exp.export(r)
    assert exp.shutdown(5)
    return exp.stats(), [json.loads(line) for line in out.getvalue().splitlines()]


def test_unsampled_records_are_not_exported_by_default() -> None:
    sampled = rec()
    unsampled_child = rec(parent_span_id="00f067aa0ba902b7", flags=0)
    unsampled_root = rec(flags=FLAG_RANDOM)
    stats, spans = _export_all(printing_config("json"), [sampled, unsampled_child, unsampled_root])
    assert [s["span_id"] for s in spans] == [sampled.span_id]
    assert stats["unsampled"] == 2 and stats["received"] == 3


def test_always_off_exports_nothing() -> None:
    stats, spans = _export_all(printing_config("json", traces_sampler="always_off"), [rec() for _ in range(5)])
    assert spans == [] and stats["unsampled"] == 5


def test_always_on_ignores_flags() -> None:
    stats, spans = _export_all(printing_config("json", traces_sampler="always_on"), [rec(flags=0), rec()])
    assert len(spans) == 2 and stats["unsampled"] == 0


def test_traceidratio_is_deterministic_on_trace_id() -> None:
    sampler = Sampler("traceidratio", "0.25")
    ids = [TraceContext.new_root().trace_id for _ in range(4000)]
    picked = [t for t in ids if sampler.root_sampled(t)]
    assert 800 < len(picked) < 1200
    assert picked == [t for t in ids if Sampler("traceidratio", "0.25").root_sampled(t)]
    # Decided on the low 64 bits, the same way as the OpenTelemetry SDKs.
    assert sampler.root_sampled("f" * 16 + "0" * 15 + "1")
    assert not sampler.root_sampled("0" * 16 + "f" * 16)
    assert not Sampler("traceidratio", "0").root_sampled("0" * 31 + "1")
    assert Sampler("traceidratio", "1").root_sampled("f" * 32)
    # Children of a sampled parent are kept by parentbased_traceidratio whatever the ratio.
    pb = Sampler("parentbased_traceidratio", "0")
    assert pb.should_export(rec(parent_span_id="00f067aa0ba902b7", flags=FLAG_SAMPLED))
    assert not pb.should_export(rec(parent_span_id="00f067aa0ba902b7", flags=0))
    assert not pb.should_export(rec())


def test_parentbased_always_off_drops_roots_keeps_sampled_children() -> None:
    s = Sampler("parentbased_always_off")
    assert not s.should_export(rec())
    assert s.should_export(rec(parent_span_id="00f067aa0ba902b7"))


@pytest.mark.parametrize("arg", ["abc", "1.5", "-0.1"])
def test_bad_ratio_is_a_config_error(arg: str) -> None:
    with pytest.raises(ConfigError, match="sampler.arg"):
        Sampler("traceidratio", arg)


# --- queue, drops, lifecycle ------------------------------------------------------------


class BlockingStream(io.StringIO):
    """A stdout that hangs (a full pipe) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        self.release.wait(10)
        return super().write(s)


def test_queue_full_drops_are_counted_and_export_never_blocks() -> None:
    stream = BlockingStream()
    exp = Exporter(printing_config("text"), stream=stream, queue_size=4)
    exp.export(rec())
    assert stream.entered.wait(5)  # the worker is now stuck on the first span
    slowest = 0.0
    for _ in range(14):
        t0 = time.perf_counter()
        exp.export(rec())
        slowest = max(slowest, time.perf_counter() - t0)
    assert slowest < 0.010
    assert exp.dropped == 10 and exp.stats()["queued"] == 4
    stream.release.set()
    assert exp.shutdown(5)
    stats = exp.stats()
    assert stats["printed"] == 5 and stats["dropped"] == 10
    assert len(stream.getvalue().splitlines()) == 5


def test_shutdown_bounded_when_worker_is_stuck() -> None:
    stream = BlockingStream()
    exp = Exporter(printing_config("text"), stream=stream, queue_size=8)
    for _ in range(5):
        exp.export(rec())
    assert stream.entered.wait(5)
    t0 = time.monotonic()
    assert exp.shutdown(0.5) is False
    assert time.monotonic() - t0 < 1.0
    assert exp.dropped == 4  # the queued ones, counted; the one being printed is in flight
    exp.export(rec())  # after shutdown: counted, not blocking
    assert exp.dropped == 5
    stream.release.set()


def test_bad_record_does_not_stop_the_exporter() -> None:
    out = io.StringIO()
    exp = Exporter(printing_config("json"), stream=out)
    exp.export(rec(trace_id="not-hex"))
    good = rec()
    exp.export(good)
    assert exp.shutdown(5)
    assert [json.loads(line)["span_id"] for line in out.getvalue().splitlines()] == [good.span_id]
    assert exp.dropped == 1


def test_shutdown_is_idempotent() -> None:
    exp = Exporter(printing_config("disabled"))
    assert exp.shutdown(1) and exp.shutdown(1)


def test_make_otlp_exporter_follows_config() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    assert make_otlp_exporter(Config()) is None
    http = make_otlp_exporter(Config(otlp_endpoint="http://127.0.0.1:4318", otlp_timeout_s=3.0))
    assert isinstance(http, Http) and http._endpoint == "http://127.0.0.1:4318/v1/traces"
    grpc_exp = make_otlp_exporter(
        Config(otlp_endpoint="http://127.0.0.1:4317", otlp_protocol="grpc", otlp_headers=(("k", "v"),))
    )
    assert isinstance(grpc_exp, Grpc) and grpc_exp._endpoint == "127.0.0.1:4317"
    assert grpc_exp._headers == (("k", "v"),) and grpc_exp._insecure
    http.shutdown()
    grpc_exp.shutdown()


# --- OTLP wire encoding (must equal the SDK's encoding) -----------------------------------

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from opentelemetry.sdk.trace.export import SpanExportResult  # noqa: E402

from obi.export.otlp_transport import Payload, SdkInternalsChanged, _payload_exporter_classes  # noqa: E402
from obi.export.otlp_wire import WireEncoder  # noqa: E402


def varied_records() -> list[SpanRecord]:
    """Records covering every branch the encoder has: kinds, parents, tracestate, status
    classes, odd methods, IPv6, every attribute value type, several processes."""
    parent = TraceContext.new_root()
    out = [
        rec(),
        rec(SpanKind.CLIENT, parent_span_id=parent.span_id, status=404, host="svc:8443", scheme="https"),
        rec(parent_span_id=parent.span_id, status=503, tracestate="vendor=abc,other=x:y", pid=7, exe="/bin/a"),
        rec(tracestate="not a valid tracestate ===", pid=7, exe="/bin/a"),
        rec(tracestate="k1=v1 , k2=v2", pid=8, exe="/usr/sbin/b"),  # normalized like the SDK does
        rec(method="PROPFIND", status=0, path="http://origin.example/p?q=1#frag"),
        rec(SpanKind.CLIENT, peer_addr="2001:db8::1", peer_port=65535, status=500, pid=9, tid=10),
        rec(end_ns=T0 - 5),  # end before start: clamped, like to_readable_span
        rec(start_ns=0, end_ns=2**64 - 1, local_port=0, peer_port=0, local_addr="", peer_addr=""),
        rec(
            extra={
                "b.true": True,
                "b.false": False,
                "i.zero": 0,
                "i.one": 1,
                "i.neg": -5,
                "i.big": 2**62,
                "f": 1.5,
                "s.empty": "",
                "s.utf8": "héllo ✓",
                "raw": b"\x00\x01",
                "none": None,
                "list": ["a", 1, True],
                "map": {"k": "v", "n": 2},
                "too.big": 2**64,
                "bad": object(),
            }
        ),
        rec(extra={"b.true": 1, "b.false": 0, "i.one": True}),  # same keys, other types: no cache mix-up
    ]
    out += [rec(peer_port=40000 + i, path=f"/items/{i}", pid=7, exe="/bin/a") for i in range(50)]
    return out


def sdk_request(records: list[SpanRecord], service_name: str = "") -> ExportTraceServiceRequest:
    resources = ResourceCache(service_name)
    return encode_spans([to_readable_span(r, resources.get(r)) for r in records])


def wire_request(enc: WireEncoder, records: list[SpanRecord]) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(enc.request([(enc.resource(r), enc.span(r)) for r in records]))


@pytest.mark.parametrize("service_name", ["", "checkout"])
def test_wire_encoding_equals_the_sdk_encoding(service_name: str) -> None:
    records = varied_records()
    enc = WireEncoder(service_name)
    expected = sdk_request(records, service_name)
    # Twice: the second pass is served from the encoder's caches.
    for _ in range(2):
        got = wire_request(enc, records)
        assert got == expected
    # Grouped by process in first-seen order, one scope each.
    assert len(got.resource_spans) == 4
    assert [len(rs.scope_spans[0].spans) for rs in got.resource_spans] == [7, 52, 1, 1]
    assert got.resource_spans[0].scope_spans[0].scope.name == "obi"
    attrs = {kv.key: kv.value for kv in got.resource_spans[0].scope_spans[0].spans[-1].attributes}
    assert attrs["obi.b.true"].WhichOneof("value") == "int_value" and attrs["obi.i.one"].bool_value is True


def test_wire_encoder_caches_are_bounded_and_stay_correct() -> None:
    enc = WireEncoder(max_cached=64, per_key=8)
    records = [
        rec(peer_port=1024 + i, path=f"/p/{i}", host=f"h{i % 3}.example", pid=1 + i % 5, exe="/bin/x")
        for i in range(400)
    ]
    for chunk in (records[:200], records[200:]):
        assert wire_request(enc, chunk) == sdk_request(chunk)
    assert len(enc._attrs) <= 64
    # High-cardinality keys stop being cached: ports and paths were not kept past per_key.
    assert sum(1 for key, *_ in enc._attrs if key == "client.port") <= 8


def test_wire_encoder_attribute_blocks_follow_every_field() -> None:
    """Spans of one connection share a cached attribute block: each field that changes an
    attribute (status, path, method, kind, thread, extra) must give the SDK's encoding, also
    when the same combination comes back, and an unhashable extra is encoded uncached."""
    enc = WireEncoder(max_cached=16)
    variants = [
        dict(),
        dict(status=500),
        dict(path="/other?q=1"),
        dict(method="POST"),
        dict(kind=SpanKind.CLIENT),
        dict(tid=7),
        dict(pid=9),
        dict(host="h.example:81"),
        dict(extra={"tls": True}),
        dict(extra={"tls": True, "tcp_option": False}),
        dict(extra={"list": [1, 2]}),
        dict(status=0),
    ]
    records = [rec(**v) for v in variants] * 3
    assert wire_request(enc, records) == sdk_request(records)
    assert 0 < len(enc._blocks) <= 16


def test_wire_encoder_rejects_malformed_ids() -> None:
    enc = WireEncoder()
    for bad in (dict(trace_id="abcd"), dict(span_id="00" * 9), dict(parent_span_id="zz" * 8), dict(trace_id="x" * 32)):
        with pytest.raises(ValueError):
            enc.span(rec(**bad))


# --- the SDK exporters' internals that send_payload relies on --------------------------------


def test_sdk_transport_internals() -> None:
    """Fails loudly when an opentelemetry-exporter-otlp upgrade moves what obi.export's
    transport adapter uses (then export silently falls back to the slow SDK encoding)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    http = make_otlp_exporter(Config(otlp_endpoint="http://127.0.0.1:4318"))
    assert isinstance(http, Http) and type(http) is not Http, "fell back to the plain SDK exporter"
    assert callable(http._client.export) and http._shutdown is False

    grpc_exp = make_otlp_exporter(Config(otlp_endpoint="http://127.0.0.1:4317", otlp_protocol="grpc"))
    assert isinstance(grpc_exp, Grpc) and type(grpc_exp) is not Grpc, "fell back to the plain SDK exporter"
    assert grpc_exp._stub.__name__ == "_PayloadTraceStub" and type(grpc_exp._client) is grpc_exp._stub
    payload = Payload(b"\x0a\x00", 3)
    assert grpc_exp._translate_data(payload) == b"\x0a\x00" and grpc_exp._count_data(payload) == 3
    # SDK spans still go through the SDK encoder (and the stub serializes its message).
    span = to_readable_span(rec(), ResourceCache().get(rec()))
    assert isinstance(grpc_exp._translate_data([span]), ExportTraceServiceRequest)
    for exp in (http, grpc_exp):
        exp.shutdown()
        assert exp.send_payload(payload) is False  # after shutdown: refused, no network


def test_sdk_internals_change_falls_back_to_the_sdk_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    cls = _payload_exporter_classes()["http/protobuf"]

    def changed(self, **kw):
        raise SdkInternalsChanged("simulated")

    monkeypatch.setattr(cls, "__init__", changed)
    exp = make_otlp_exporter(Config(otlp_endpoint="http://127.0.0.1:4318"))
    assert type(exp) is Http and not hasattr(exp, "send_payload")
    exp.shutdown()


def test_export_is_cheap_and_counters_exact_with_a_refusing_backend() -> None:
    """An SDK exporter that refuses every batch: nothing blocks, every span is accounted for."""

    class Refusing:
        def __init__(self) -> None:
            self.batches = 0

        def export(self, spans):
            self.batches += 1
            return SpanExportResult.FAILURE

        def shutdown(self) -> None:
            pass

    backend = Refusing()
    exp = Exporter(printing_config("disabled"), otlp_exporter=backend, batch_size=100, schedule_delay_s=0.01)
    records = [rec() for _ in range(1000)]
    t0 = time.perf_counter()
    for r in records:
        exp.export(r)
    per_call = (time.perf_counter() - t0) / len(records)
    assert exp.shutdown(5)
    stats = exp.stats()
    assert stats["received"] == 1000 and stats["exported"] == 0
    assert stats["dropped"] == 1000 and stats["export_errors"] == backend.batches >= 10
    assert per_call < 0.001
