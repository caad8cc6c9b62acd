"""The NFQUEUE reader (fallback/_nfq.c) stays clean under two static analyzers and strict
warnings: gcc -fanalyzer and clang --analyze (issue 12, finding 8: both once flagged a NULL
dereference only a data race made possible). A finding fails the suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig

import pytest

SOURCE = os.path.join(os.path.dirname(__file__), "..", "..", "fallback", "_nfq.c")
INCLUDE = f"-I{sysconfig.get_paths()['include']}"


def _run(argv: list[str], tmp_path) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return r.stderr


@pytest.mark.parametrize("flags", [["-fanalyzer", "-O1"], ["-Wall", "-Wextra", "-O2"]], ids=["fanalyzer", "wextra"])
def test_gcc_finds_nothing(flags, tmp_path) -> None:
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    out = _run(["gcc", *flags, "-c", INCLUDE, os.path.abspath(SOURCE), "-o", str(tmp_path / "nfq.o")], tmp_path)
    assert "warning" not in out and "error" not in out, out


def test_clang_static_analyzer_finds_nothing(tmp_path) -> None:
    if not shutil.which("clang"):
        pytest.skip("clang is not installed")
    out = _run(
        [
            "clang",
            "--analyze",
            "-Xanalyzer",
            "-analyzer-output=text",
            INCLUDE,
            os.path.abspath(SOURCE),
            "-o",
            str(tmp_path / "nfq.plist"),
        ],
        tmp_path,
    )
    assert "warning" not in out and "error" not in out, out


def test_clang_format_is_applied(tmp_path) -> None:
    """The reader keeps its style (fallback/.clang-format); `clang-format -i` repairs it."""
    if not shutil.which("clang-format"):
        pytest.skip("clang-format is not installed")
    r = subprocess.run(
        ["clang-format", "--dry-run", "--Werror", os.path.abspath(SOURCE)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr[-2000:]
