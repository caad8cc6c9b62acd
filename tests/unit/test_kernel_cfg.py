"""obi_cfg_flags from the config (no root): which header work the BPF programs do."""

from __future__ import annotations

import pytest

from obi import config
from obi.kernel.abi import CFG_HDR_INSERT, CFG_HDR_READ, CFG_TCP
from obi.kernel.loader import cfg_flags


@pytest.mark.parametrize(
    "propagation,track,want",
    [
        ("all", False, CFG_HDR_INSERT | CFG_HDR_READ | CFG_TCP),
        ("headers", False, CFG_HDR_INSERT | CFG_HDR_READ),
        ("tcp", False, CFG_TCP),
        ("tcp", True, CFG_TCP | CFG_HDR_READ),  # read incoming traceparent, insert nothing
        ("headers", True, CFG_HDR_INSERT | CFG_HDR_READ),
    ],
)
def test_cfg_flags(propagation, track, want):
    cfg = config.load(
        env={
            "OTEL_EBPF_BPF_CONTEXT_PROPAGATION": propagation,
            "OTEL_EBPF_BPF_TRACK_REQUEST_HEADERS": "true" if track else "false",
        }
    )
    assert cfg.track_request_headers is track
    assert cfg_flags(cfg) == want


def test_bits_match_header():
    import os
    import re

    header = open(os.path.join(os.path.dirname(__file__), "..", "..", "bpf", "include", "obi_abi.h")).read()
    bits = {m[0]: 1 << int(m[1]) for m in re.findall(r"#define OBI_CFG_(\w+)\s+\(1u << (\d+)\)", header)}
    assert bits == {"HDR_INSERT": CFG_HDR_INSERT, "TCP": CFG_TCP, "HDR_READ": CFG_HDR_READ}
