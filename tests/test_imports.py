"""The import graph reads top-down: cli -> pipeline -> strategies/passes/backends -> ir/spec/models -> errors, the
runtime beside the pipeline. Built statically with `ast` from every module of the three package dirs that
pyproject.toml maps (dgopt/, passes/ as dgopt.passes, backends/ as dgopt.backends); every import counts, those inside
functions too (a lazy import is still a dependency). A package's own __init__ is not counted as imported by its
submodules (Python runs it first, but that is the package's facade, kept lazy: see test_backends_load_alone)."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent

# importer prefix -> prefixes it must not reach, directly or through other modules
FORBIDDEN = {
    "dgopt.backends": ("dgopt.pipeline", "dgopt.cli", "dgopt.runtime", "dgopt.strategies", "dgopt.passes"),
    "dgopt.runtime": ("dgopt.pipeline", "dgopt.cli", "dgopt.passes", "dgopt.strategies"),
    "dgopt.strategies": ("dgopt.pipeline", "dgopt.cli", "dgopt.runtime", "dgopt.backends", "dgopt.passes"),
    "dgopt.passes": ("dgopt.pipeline", "dgopt.cli", "dgopt.runtime", "dgopt.backends", "dgopt.strategies"),
    "dgopt.passmgr": ("dgopt.pipeline", "dgopt.cli", "dgopt.runtime", "dgopt.backends", "dgopt.strategies"),
    "dgopt.ir": ("dgopt.spec", "dgopt.pipeline", "dgopt.cli", "dgopt.runtime", "dgopt.backends",
                 "dgopt.strategies", "dgopt.passes", "dgopt.passmgr"),
    "dgopt.spec": ("dgopt.pipeline", "dgopt.cli", "dgopt.runtime", "dgopt.backends", "dgopt.strategies",
                   "dgopt.passes"),
    "dgopt.errors": ("dgopt.",),
}


def package_dirs() -> dict[str, Path]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: ROOT / d for pkg, d in cfg["package-dir"].items()}


def modules(dirs: dict[str, Path]) -> dict[str, Path]:
    """Module name -> file. A dir mapped to its own package (passes/) is walked as that package only."""
    mapped = {d.resolve() for d in dirs.values()}
    found = {}
    for pkg, d in dirs.items():
        for f in sorted(d.rglob("*.py")):
            rel = f.relative_to(d)
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                continue
            if any((d / Path(*rel.parts[:i])).resolve() in mapped for i in range(1, len(rel.parts))):
                continue    # under a dir that is mapped to a package of its own
            parts = [pkg, *rel.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = f
    return found


def _resolve(name: str, mods) -> str | None:
    """The module `import name` loads that is ours: the longest prefix of name that is one of our modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in mods:
            return cand
    return None


def import_graph(mods: dict[str, Path]) -> nx.DiGraph:
    """Edges importer -> imported, each with the file and line of its (first) import statement."""
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module
                # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                dst = _resolve(t, mods)
                if dst and dst != mod and not g.has_edge(mod, dst):
                    g.add_edge(mod, dst, where=f"{path.relative_to(ROOT)}:{node.lineno}")
    return g


def cycles(g: nx.DiGraph) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (every circle lies inside one)."""
    found = []
    for comp in nx.strongly_connected_components(g):
        if len(comp) > 1:
            found.append([u for u, _ in nx.find_cycle(g.subgraph(comp))])
    return sorted(found)


def component(g: nx.DiGraph, mod: str) -> list[str]:
    return sorted(next(c for c in nx.strongly_connected_components(g) if mod in c))


def describe(g: nx.DiGraph, path: list[str]) -> str:
    return "\n".join(f"    {a} -> {b}   ({g.edges[a, b]['where']})" for a, b in zip(path, path[1:]))


def _graph():
    return import_graph(modules(package_dirs()))


def test_the_graph_sees_every_layer():
    """Guards the reader itself: the package dirs are found and relative, absolute and lazy imports all count."""
    g = _graph()
    assert {"dgopt.cli", "dgopt.pipeline", "dgopt.passes.merge_forwards", "dgopt.backends.onnx",
            "dgopt.strategies.speculative", "dgopt.runtime"} <= set(g)
    assert g.has_edge("dgopt.passes.merge_forwards", "dgopt.passmgr")         # absolute, top level
    assert g.has_edge("dgopt.strategies.speculative", "dgopt.strategies.verify")  # relative
    assert g.has_edge("dgopt.pipeline", "dgopt.strategies")                     # inside a function
    assert g.has_edge("dgopt.pipeline", "dgopt.passes")                         # `from dgopt import passes`
    assert cycles(nx.DiGraph([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])) == [["a", "b", "c"]]


def test_no_import_circles():
    g = _graph()
    found = cycles(g)
    assert not found, "import circles (each line: importer -> imported (where)):\n" + "\n\n".join(
        f"  circle among {', '.join(component(g, c[0]))}:\n{describe(g, c + [c[0]])}" for c in found)


def test_layers_read_top_down():
    g = _graph()
    bad = []
    for mod in g:
        banned = next((v for k, v in FORBIDDEN.items() if mod == k or mod.startswith(k + ".")), ())
        for dst, path in nx.single_source_shortest_path(g, mod).items():     # nearest first
            if dst != mod and any(dst == b or dst.startswith(b if b.endswith(".") else b + ".") for b in banned):
                bad.append(f"{mod} reaches {dst}:\n{describe(g, path)}")
                break
    more = f"\n... and {len(bad) - 6} more modules" if len(bad) > 6 else ""
    assert not bad, "imports against the layers (cli -> pipeline -> strategies/passes/backends -> " \
                    "ir/spec/models -> errors; runtime beside pipeline):\n" + "\n".join(bad[:6]) + more


def test_backends_load_alone():
    """What Python really runs: importing a backend (or the passes, or a strategy) runs dgopt/__init__.py first, which
    must not pull in the compiler driver, the CLI or the runtime."""
    code = ("import sys, dgopt.backends.onnx, dgopt.backends.reference, dgopt.backends.tensorrt, dgopt.passes, "
            "dgopt.strategies; print(sorted(m for m in sys.modules if m in ('dgopt.pipeline', 'dgopt.cli') or "
            "m.startswith('dgopt.runtime')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
