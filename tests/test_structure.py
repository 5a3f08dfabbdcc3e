"""The project's structure targets, checked on the source: no import cycle, the library apart from the
harness and the tests (scripts/import_graph.py), and classes / functions of a readable size in dga_hf/."""

from __future__ import annotations

import ast

from helpers import ROOT, load_script

MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80


def test_no_import_cycle_and_no_arrow_from_the_library_to_the_harness():
    graph = load_script("import_graph")
    arrows = graph.graph()
    assert "dga_hf.ops.dispatch" in arrows and "dga_eval.cli" in arrows  # the walk found both packages
    assert graph.cycles(arrows) == []
    assert graph.forbidden(arrows) == []


def test_the_graph_sees_cycles_and_forbidden_arrows():
    graph = load_script("import_graph")
    arrows = {"dga_hf.a": {"dga_hf.b"}, "dga_hf.b": {"dga_hf.c"}, "dga_hf.c": {"dga_hf.a", "dga_eval.x"}, "dga_eval.x": set()}
    assert graph.cycles(arrows) == [["dga_hf.a", "dga_hf.b", "dga_hf.c"]]
    assert graph.forbidden(arrows) == [("dga_hf.c", "dga_eval.x")]


def _is_kernel(node: ast.AST) -> bool:
    return any("jit" in ast.unparse(decorator) for decorator in getattr(node, "decorator_list", []))


def test_classes_and_functions_are_of_a_readable_size():
    """Kernels (@triton.jit bodies) are excepted: a kernel stays whole."""
    too_long = []
    for path in sorted((ROOT / "dga_hf").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES:
                too_long.append(f"class {path.relative_to(ROOT)}:{node.name} ({lines} lines)")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION_LINES and not _is_kernel(node):
                too_long.append(f"function {path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert too_long == []
