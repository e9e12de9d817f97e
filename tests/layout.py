"""The package's shape, read from its source: lines per sub-package, the largest modules, and
import cycles (imports inside functions count too). ``python tests/layout.py`` prints it;
tests/test_layout.py asserts the limits docs/architecture.md states."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featprobe"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (top level or in functions)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted.

    A package's ``__init__`` importing its own submodules is not a cycle of the design (it is
    how a package exports), so edges from a package to the modules inside it are ignored.
    """
    edges = {a: {b for b in bs if not b.startswith(a + ".")} for a, bs in g.items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def report(root: Path = PACKAGE) -> str:
    mods = modules(root)
    per_group: dict[str, int] = defaultdict(int)
    for name, path in mods.items():
        parts = name.split(".")
        group = parts[1] if len(parts) > 2 or path.name == "__init__.py" and len(parts) > 1 \
            else "(top level)"
        per_group[group] += lines(path)
    largest = sorted(((lines(p), n) for n, p in mods.items()), reverse=True)[:5]
    cyc = cycles(graph(root))
    out = [f"package: {sum(per_group.values())} lines in {len(mods)} modules"]
    out += [f"  {g:14} {n:5}" for g, n in sorted(per_group.items())]
    out.append("largest: " + ", ".join(f"{n} ({k})" for k, n in largest))
    out.append(f"import cycles: {len(cyc)}" + "".join(f"\n  {' <-> '.join(c)}" for c in cyc))
    return "\n".join(out)


if __name__ == "__main__":
    print(report())
