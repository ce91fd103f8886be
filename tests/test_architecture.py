"""The package's shape: imports flow one way, modules stay small, stored values have one owner,
and the CLI's help starts without the heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "heretic_like"
MODULES = {path.stem: path for path in PACKAGE.glob("*.py")}


def imports(path: Path) -> set[str]:
    """Package modules `path` imports, at top level or inside functions alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            found |= {name for name in names if name in MODULES}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("heretic_like."):
            found.add(node.module.split(".")[1])
    return found - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_even_through_imports_inside_functions():
    graph = {name: imports(path) for name, path in MODULES.items()}
    assert find_cycle(graph) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_two_ideas(name):
    assert len(MODULES[name].read_text().splitlines()) <= 400, f"{name}.py: over 400 lines"


def test_only_the_records_module_spells_stored_keys():
    for name, path in MODULES.items():
        if name == "records":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("user_attrs", "set_user_attr"), f"{name}.py reads Optuna user attrs"


def test_library_modules_never_import_the_commands_layer():
    for name, path in MODULES.items():
        if name not in ("cli", "__main__"):
            assert "cli" not in imports(path), name


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"], ["export", "--help"]])
def test_help_starts_without_torch_or_transformers(argv):
    code = (f"import sys\nfrom heretic_like.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'optuna', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=PACKAGE.parent, check=True).stdout  # fmt: skip
    assert "usage:" in out and out.strip().endswith("[]"), out[-300:]
