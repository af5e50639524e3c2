"""The package's import graph: modules, imports inside functions, and import circles.

    python tools/import_graph.py            # summary; exit status 1 when there is a circle
    python tools/import_graph.py -v         # also every import inside a function

An import inside a function counts as an edge too: a circle hidden that way is still a circle.
"""
import ast, sys, pathlib
from collections import defaultdict
args = [a for a in sys.argv[1:] if not a.startswith("-")]
root = pathlib.Path(args[0] if args else pathlib.Path(__file__).resolve().parents[1] / "lightning_edit")
pkg = root.name
mods = {}
for p in root.rglob("*.py"):
    rel = p.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__": parts = parts[:-1]
    mods[".".join(parts)] = p
def resolve(modname, node, is_pkg):
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = modname.split(".")
            if not is_pkg: base = base[:-1]
            base = base[:len(base)-(node.level-1)] if node.level > 1 else base
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        # "from pkg import mod" depends on pkg.mod (not on pkg's __init__); "from mod import name" on mod
        subs = [target + "." + a.name for a in node.names if target + "." + a.name in mods]
        outs = subs if len(subs) == len(node.names) else [target] + subs
    else:
        outs = [a.name for a in node.names]
    res = set()
    for t in outs:
        while t and t not in mods: t = t.rpartition(".")[0]
        if t and t.startswith(pkg): res.add(t)
    return res
top = defaultdict(set); inner = defaultdict(set); ninner = 0; inner_list=[]
for m, p in mods.items():
    tree = ast.parse(p.read_text())
    is_pkg = p.name == "__init__.py"
    def visit(node, depth):
        global ninner
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.Import, ast.ImportFrom)):
                targets = resolve(m, ch, is_pkg) - {m}
                if depth == 0 and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    top[m] |= targets
                else:
                    ninner += 1
                    inner_list.append((m, ast.unparse(ch)))
                    inner[m] |= targets
            nd = depth + (1 if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)) else 0)
            visit(ch, nd)
    visit(tree, 0)
# SCC over top+inner
graph = {m: (top[m] | inner[m]) for m in mods}
def sccs(g):
    idx = {}; low = {}; st = []; on = set(); out = []; c = [0]
    sys.setrecursionlimit(10000)
    def sc(v):
        idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
        for w in g.get(v, ()):
            if w not in idx: sc(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], idx[w])
        if low[v] == idx[v]:
            comp = []
            while True:
                w = st.pop(); on.discard(w); comp.append(w)
                if w == v: break
            out.append(comp)
    for v in g:
        if v not in idx: sc(v)
    return out
cyc = [c for c in sccs(graph) if len(c) > 1]
print("modules", len(mods), "function-level imports", ninner)
print("cycles (incl. function-level imports):", [sorted(c) for c in cyc])
cyc_top = [c for c in sccs({m: top[m] for m in mods}) if len(c) > 1]
print("cycles (top-level only):", [sorted(c) for c in cyc_top])
if "-v" in sys.argv:
    for m, s in inner_list: print("  inner", m, ":", s)
# layers: a module imports only modules of its own layer or below (the package's __init__ and
# the Lightning shell at the root sit on top)
# (the request types, data/requests.py, are the vocabulary every layer speaks: at the bottom)
LAYERS = [("errors", "resources", "version", "data.requests"), ("engine",), ("data", "evaluation", "longform"),
          ("stream", "builtin", "trace")]


def layer(m):
    rel = m.split(".", 1)[1] if "." in m else ""
    if not rel:
        return len(LAYERS)  # the package's __init__
    for i, names in enumerate(LAYERS):
        if any(rel == n or rel.startswith(n + ".") for n in names):
            return i
    return len(LAYERS)  # the shell: cli, module, callbacks, report, api, ...


upward = sorted((m, t) for m in mods for t in graph[m] if layer(t) > layer(m))
print("imports pointing up:", [f"{m} -> {t}" for m, t in upward])
sys.exit(1 if cyc or upward else 0)
