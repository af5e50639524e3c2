"""The package's import graph: modules, imports inside functions, import circles and layers.

    python tools/import_graph.py            # summary; exit status 1 on a circle or an upward import
    python tools/import_graph.py -v         # also every import inside a function

An import inside a function counts as an edge too: a circle hidden that way is still a circle.
The layers (docs/architecture.md), bottom first; a module imports only its own layer or below,
and the package's ``__init__`` and the Lightning shell at the root sit on top.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# (the request types, data/requests.py, are the vocabulary every layer speaks: at the bottom)
LAYERS = [("errors", "resources", "version", "data.requests"), ("engine",), ("data", "evaluation", "longform"),
          ("stream", "builtin", "trace")]
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package directory ``root``."""
    out = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def targets(mods: dict[str, Path], module: str, node: ast.Import | ast.ImportFrom, is_pkg: bool) -> set[str]:
    """The package's modules an import statement depends on ("from pkg import mod" depends on
    ``pkg.mod``, not on ``pkg``'s ``__init__``; "from mod import name" on ``mod``)."""
    if isinstance(node, ast.ImportFrom):
        base = module.split(".")[: None if is_pkg else -1]
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
        subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
        names = subs if len(subs) == len(node.names) else [target, *subs]
    else:
        names = [a.name for a in node.names]
    pkg = next(iter(mods)).split(".")[0]
    out = set()
    for t in names:
        while t and t not in mods:
            t = t.rpartition(".")[0]
        if t and t.split(".")[0] == pkg and t != module:
            out.add(t)
    return out


def graph(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """``(edges, inner)``: every module's imports of the package (inside functions included), and
    ``(module, statement)`` for each import inside a function."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    inner: list[tuple[str, str]] = []

    def visit(module: str, node: ast.AST, in_function: bool, is_pkg: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                edges[module] |= targets(mods, module, child, is_pkg)
                if in_function:
                    inner.append((module, ast.unparse(child)))
            visit(module, child, in_function or isinstance(child, FUNCTIONS), is_pkg)

    for m, p in mods.items():
        visit(m, ast.parse(p.read_text()), False, p.name == "__init__.py")
    return edges, inner


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            connect(v)
    return out


def layer(module: str) -> int:
    rel = module.split(".", 1)[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if rel and any(rel == n or rel.startswith(n + ".") for n in names):
            return i
    return len(LAYERS)  # the package's __init__ and the shell: cli, module, callbacks, report, api, ...


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("-")]
    root = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "lightning_edit"
    mods = modules(root)
    edges, inner = graph(mods)
    cyc = circles(edges)
    upward = sorted((m, t) for m in mods for t in edges[m] if layer(t) > layer(m))
    print("modules", len(mods), "function-level imports", len(inner))
    print("cycles (incl. function-level imports):", cyc)
    print("imports pointing up:", [f"{m} -> {t}" for m, t in upward])
    if "-v" in argv:
        for m, statement in inner:
            print("  inner", m, ":", statement)
    return 1 if cyc or upward else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
