"""The import graph of the project's packages, read from the source with `ast` (nothing is imported).

    python scripts/import_graph.py            # check: exit 1 on an import cycle or a forbidden arrow
    python scripts/import_graph.py --edges    # every arrow, one "a -> b" per line
    python scripts/import_graph.py --dot      # Graphviz: ... --dot | dot -Tpng -o imports.png

Modules are named as installed (setup.cfg's package_dir: eval/ is `dga_eval`, configs/ and patches/ are
`dga_hf.configs` and `dga_hf.patches`). Every import counts, also one inside a function: a lazy import that
closes a cycle still ties the two modules together. Forbidden: the library (`dga_hf`) importing the harness
(`dga_eval`) or the tests.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = "dga_hf"
FORBIDDEN_FROM_LIBRARY = ("dga_eval", "tests")


def package_folders(root: Path = ROOT) -> dict[str, Path]:
    """Installed package -> source folder: the library and every ``package_dir`` entry of setup.cfg."""
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    folders = {LIBRARY: root / LIBRARY}
    for line in setup["options"]["package_dir"].strip().splitlines():
        package, folder = (part.strip() for part in line.split("="))
        folders[package] = root / folder
    return folders


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Installed module name -> source file (a folder mapped inside another package's folder is walked
    under its own name only)."""
    found: dict[str, Path] = {}
    folders = package_folders(root)
    for package, base in folders.items():
        nested = [other for other in folders.values() if other != base and base in other.parents]
        for path in sorted(base.rglob("*.py")):
            if any(folder in path.parents for folder in nested):
                continue
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _imported_names(name: str, path: Path) -> set[str]:
    """Absolute names of every module or attribute `name` imports."""
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (a parent package's own __init__ is not an arrow from its
    submodules: importing a submodule runs it anyway). Imports of the test suite (`tests`, `test_*`
    modules) are kept as arrows too, by their top-level name."""
    found = modules(root)
    arrows: dict[str, set[str]] = {name: set() for name in found}
    for name, path in found.items():
        for imported in _imported_names(name, path):
            target = imported
            while target and target not in found:
                target = target.rpartition(".")[0]  # an attribute of a module: the module
            top = imported.split(".")[0]
            if not target and (top == "tests" or top.startswith("test_")):
                target = top
            if target and target != name and not name.startswith(target + "."):
                arrows[name].add(target)
    return arrows


def cycles(arrows: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in arrows.get(node, ()):
            if nxt not in arrows:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(arrows):
        if node not in index:
            visit(node)
    return found


def forbidden(arrows: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Arrows from the library to the harness or the tests."""
    return sorted(
        (source, target)
        for source, targets in arrows.items()
        if source.split(".")[0] == LIBRARY
        for target in targets
        if target.split(".")[0] in FORBIDDEN_FROM_LIBRARY or target.startswith("test_")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", action="store_true", help="print every arrow")
    parser.add_argument("--dot", action="store_true", help="print the graph in Graphviz DOT")
    args = parser.parse_args(argv)
    arrows = graph()
    if args.dot:
        print("digraph imports {\n  rankdir=LR;")
        print("\n".join(f'  "{a}" -> "{b}";' for a in sorted(arrows) for b in sorted(arrows[a])))
        print("}")
    elif args.edges:
        print("\n".join(f"{a} -> {b}" for a in sorted(arrows) for b in sorted(arrows[a])))
    loops, bad = cycles(arrows), forbidden(arrows)
    report = sys.stderr if (args.dot or args.edges) else sys.stdout
    print(f"{len(arrows)} modules, {sum(map(len, arrows.values()))} arrows", file=report)
    for loop in loops:
        print("import cycle: " + " <-> ".join(loop), file=report)
    for source, target in bad:
        print(f"library imports {target}: {source}", file=report)
    if not loops and not bad:
        print("no import cycle; the library imports nothing from the harness or the tests", file=report)
    return 1 if loops or bad else 0


if __name__ == "__main__":
    sys.exit(main())
