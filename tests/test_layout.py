"""The package layout's dependency direction, checked on the source: every project import (at module top
or inside a function) points down the stack

    runtime <- sparse_attention <- {transcoders, prompts} <- {attribution, circuits} <- comparison
        <- {pipeline, viewer} <- cli
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [["runtime"], ["sparse_attention"], ["transcoders", "prompts"], ["attribution", "circuits"],
          ["comparison"], ["pipeline", "viewer"], ["cli"]]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import of a project package in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in RANK]
    return found


def upward_imports(package: str) -> list[str]:
    """'file:line imports X' for each import of a package at the same or a higher layer (other than itself)."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, imported in project_imports(path):
            if imported != package and RANK[imported] >= RANK[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    return bad


@pytest.mark.parametrize("package", list(RANK))
def test_imports_point_down_the_stack(package):
    assert (ROOT / package / "__init__.py").is_file(), f"{package}/ is not a package"
    assert upward_imports(package) == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "runtime"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from pipeline.config import load_config\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert upward_imports("runtime") == ["runtime/bad.py:2 imports pipeline"]
