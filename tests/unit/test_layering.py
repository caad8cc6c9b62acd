"""docs/architecture.md, decision 16: the kernel path and the userspace path do not import
each other (the agent imports the chosen one lazily)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports, relative imports resolved."""
    package = "obi.fallback" if path.parent.name == "fallback" else ".".join(path.relative_to(ROOT).parent.parts)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize(("folder", "forbidden"), [("obi/kernel", "obi.fallback"), ("fallback", "obi.kernel")])
def test_datapaths_do_not_import_each_other(folder: str, forbidden: str) -> None:
    bad = {
        str(path.relative_to(ROOT)): sorted(
            n for n in _imports(path) if n == forbidden or n.startswith(forbidden + ".")
        )
        for path in sorted((ROOT / folder).glob("*.py"))
    }
    assert {k: v for k, v in bad.items() if v} == {}
