"""The UI's shape, checked: each tab's `build` only lays out and wires, in at most 60 lines; no function of the UI
or the services is longer; handlers are module-level functions (the one guard in qdemo.ui.context is the only
function in the UI that defines functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "qdemo"
LIMIT = 60  # lines, end_lineno - lineno + 1, nested definitions included
TABS = ("chat_tab", "compare_tab", "lab_tab", "internals_tab", "inspect_tab", "perf_tab")


def _functions(folder: str) -> list[tuple[str, ast.FunctionDef]]:
    found = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [(f"{path.relative_to(PACKAGE)}:{node.name}", node) for node in ast.walk(tree)
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return found


def _lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def test_no_function_in_the_ui_or_the_services_is_over_60_lines():
    long = {name: _lines(node) for folder in ("ui", "services") for name, node in _functions(folder)
            if _lines(node) > LIMIT}
    assert long == {}


def test_every_tab_builds_in_60_lines():
    builds = {name: _lines(node) for name, node in _functions("ui") if name.endswith(":build")}
    assert {name.split(".")[0].split("/")[-1] for name in builds} >= set(TABS)
    assert all(lines <= LIMIT for lines in builds.values()), builds


def test_handlers_are_module_level_functions_not_closures():
    nested = [f"{name} defines {inner.name}" for name, node in _functions("ui") if not name.startswith("ui/context.py")
              for inner in ast.walk(node)
              if inner is not node and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert nested == []
