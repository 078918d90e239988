"""Print the package's shape: largest modules, function-local imports, import cycles.

    python scripts/architecture_report.py            # the figures quoted in docs/notes/issue-15.md
    python scripts/architecture_report.py --list     # also every function-local import, with its line
"""

import argparse
import ast
from pathlib import Path

import grimp

PACKAGE = "sae_vision_ext"


def function_local_imports(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    lines.append(inner.lineno)
    return sorted(set(lines))


def import_cycles(graph) -> list[list[str]]:
    """Strongly connected components (Tarjan) of the module import graph with more than one module."""
    modules = sorted(graph.modules)
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return components


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="list every function-local import")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1] / PACKAGE
    files = sorted(root.rglob("*.py"))
    sizes = sorted(((len(f.read_text().splitlines()), f) for f in files), reverse=True)
    local = {f: function_local_imports(f) for f in files}
    graph = grimp.build_graph(PACKAGE, include_external_packages=False)
    cycles = import_cycles(graph)
    print(f"modules: {len(files)}, lines: {sum(n for n, _ in sizes)}")
    print("largest modules: " + ", ".join(f"{f.relative_to(root)} {n}" for n, f in sizes[:5]))
    print(f"function-local imports: {sum(len(v) for v in local.values())}")
    print(f"import cycles (strongly connected groups of modules): {len(cycles)}")
    for cycle in cycles:
        print("  " + " <-> ".join(m.removeprefix(PACKAGE + ".") for m in cycle))
    if args.list:
        for f, lines in local.items():
            for line in lines:
                print(f"{f.relative_to(root.parent)}:{line}: {f.read_text().splitlines()[line - 1].strip()}")


if __name__ == "__main__":
    main()
