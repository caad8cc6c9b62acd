"""Structured logs: `log_format: json` writes one JSON object per line on stderr."""

import json
import logging

import pytest

from obi import config, logs


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_log_lines(capsys):
    logs.setup(config.load(env={"OTEL_EBPF_LOG_FORMAT": "json", "OTEL_EBPF_LOG_LEVEL": "debug"}))
    logging.getLogger("obi.test").debug("attached %d programs", 3)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("obi.test").exception("detach failed")
    lines = capsys.readouterr().err.strip().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "debug" and first["logger"] == "obi.test" and first["msg"] == "attached 3 programs"
    assert first["time"].endswith("Z")
    assert second["level"] == "error" and "ValueError: boom" in second["error"]


def test_text_logs_and_level(capsys):
    logs.setup(config.load(env={"OTEL_EBPF_LOG_LEVEL": "warn"}))
    logging.getLogger("obi.test").info("hidden")
    logging.getLogger("obi.test").warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "WARNING obi.test: shown" in err
