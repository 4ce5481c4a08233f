"""The package's layering: no import cycle, and no import from a lower layer to a higher one.

The layer order is the one the README's Layout section declares (its "Layers" block), so the
documentation and this check cannot drift apart. Every ``import`` statement counts, also
those inside functions and under ``TYPE_CHECKING``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "actsparse"


def declared_layers() -> list[set[str]]:
    """The README's layer order, lowest first: ``a b < c d < ...`` in the block after "Layers"."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"\nLayers, lowest first.*?```[a-z]*\n(.*?)```", text, re.S)
    assert m, "README.md's Layout section must declare the layers in a ``` block after a 'Layers' line"
    return [set(part.split()) for part in " ".join(m.group(1).split()).split("<")]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules imported by module ``name`` (explicit statements anywhere in the file)."""
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "actsparse"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            if base.split(".")[0] != "actsparse":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_every_package_module_has_a_declared_layer():
    layers = set().union(*declared_layers())
    top = {layer_of(m) for m in modules()}
    assert top <= layers, f"modules with no layer in the README: {sorted(top - layers)}"
    assert not layers - top, f"README layers with no module: {sorted(layers - top)}"


def test_no_import_goes_up_a_layer():
    rank = {name: i for i, group in enumerate(declared_layers()) for name in group}
    bad = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
           for a, targets in graph().items() for b in targets if rank[layer_of(b)] > rank[layer_of(a)]]
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from actsparse.cli import main\n    import actsparse.report.plots\n"
                   "    from . import io\n")
    known = {"actsparse.cli", "actsparse.report.plots", "actsparse.io", "actsparse.x"}
    assert imports_of("actsparse.x", src, known) == {"actsparse.cli", "actsparse.report.plots", "actsparse.io"}


def test_readme_layout_lists_the_tree():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## Layout\n+```\n(src/actsparse/\n.*?)```", text, re.S)
    assert m, "README.md's Layout section must start with the src/actsparse/ tree"
    listed = {line.split()[0].rstrip("/") for line in m.group(1).splitlines()[1:]
              if line.startswith("  ") and not line.startswith("   ")}
    listed -= {"tests", "benchmarks"}
    actual = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    actual |= {p.stem + ".py" for p in PACKAGE.glob("*.py")}
    listed = {x if x.endswith(".py") or "." in x else x for x in listed}
    assert listed == actual, f"README lists {sorted(listed - actual)} that do not exist; misses {sorted(actual - listed)}"
