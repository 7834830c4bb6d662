"""The package's shape: three layers that import only downward, no import circle, short files.

Read from the source with `ast` (imports inside functions included), so a lazy import cannot hide
a circle: engine <- prune <- experiment <- sweep, and `sparsetrain.kernels` (Triton) below all of them.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PKG = os.path.join(ROOT, "sparsetrain")
# a package's modules may import from these packages only (None: the root package, whose
# __init__ only names the public API lazily)
ALLOWED = {
    "engine": {None, "engine", "_C", "kernels"},
    "prune": {None, "prune", "engine", "_C"},
    "experiment": {None, "experiment", "prune", "engine", "_C"},
    "sweep": {None, "sweep", "experiment"},  # composes experiment runs; never the engine directly
}


def _modules():
    """{dotted module name: path} of every sparsetrain source file (kernels/ is sparsetrain.kernels)."""
    out = {}
    for base, prefix in ((PKG, "sparsetrain"), (os.path.join(ROOT, "kernels"), "sparsetrain.kernels")):
        for d, _, files in os.walk(base):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), base)[:-3].replace(os.sep, ".")
                    name = prefix if rel == "__init__" else f"{prefix}.{rel.removesuffix('.__init__')}"
                    out[name] = os.path.join(d, f)
    return out


MODULES = _modules()
EXTENSION = "sparsetrain._C"  # the C++ extension (no source file here): the bottom of the graph


def _imports(name: str, path: str) -> set[str]:
    """sparsetrain modules imported anywhere in the file (resolved to modules in MODULES)."""
    is_pkg = path.endswith("__init__.py")
    pkg = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in MODULES and t != EXTENSION:  # `from pkg import name`: name may be a module or an attribute
                t = t.rpartition(".")[0]
            if t and t.startswith("sparsetrain") and t != name:
                found.add(t)
    return found


GRAPH = {n: _imports(n, p) for n, p in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_graph_is_read():
    assert "sparsetrain.engine.formats" in GRAPH["sparsetrain.engine.nn"]
    assert "sparsetrain.engine.nn" in GRAPH["sparsetrain.prune.magnitude"]
    assert "sparsetrain.prune" in GRAPH["sparsetrain.experiment.loop"]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downward(layer):
    bad = sorted((m, t) for m, targets in GRAPH.items() if _layer(m) == layer
                 for t in targets if _layer(t) not in ALLOWED[layer])
    assert not bad, f"{layer} imports from a layer above it: {bad}"


def test_no_import_circle():
    """Depth-first search over the module graph; a back edge is a circle (package __init__ files
    that re-export their own modules are edges too)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t.startswith(m + "."):  # a package's __init__ importing its own submodule
                continue
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_stay_short(name):
    with open(MODULES[name]) as f:
        n = sum(1 for _ in f)
    assert n <= 400, f"{MODULES[name]} has {n} lines (split it: the layout keeps files under ~400)"


def test_readme_layout_names_every_module():
    """README's Layout is the map of the package ("where to add things"): every module file is named
    there (kernels/' modules by their op names; dataset_checks.py, dataset_lock.py and teachers.py
    were missing)."""
    import re
    readme = open(os.path.join(ROOT, "README.md")).read()
    layout = readme[readme.index("\n## Layout"):readme.index("\n## Not built yet")]
    missing = []
    for name, path in sorted(MODULES.items()):
        file = os.path.basename(path)
        if file == "__init__.py":
            continue
        named = re.search(r"\b" + re.escape(file[:-3]) + r"\b", layout) if name.startswith("sparsetrain.kernels.") \
            else file in layout
        if not named:
            missing.append(os.path.relpath(path, ROOT))
    assert not missing, f"README's Layout does not name {missing}"


def test_the_extension_loader_loads_it_when_imported_first():
    """sparsetrain.engine.extension imported alone, before torch (libc10 not loaded yet: it told
    the user to build the extension that was built)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import sparsetrain.engine.extension as e; print(e._C.__name__)"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "sparsetrain._C", out.stderr[-2000:]


def test_import_leaves_torch_dynamo_unloaded():
    """torch._dynamo is half of `import sparsetrain`'s time (~1.5 s a CLI process): the layers run
    eagerly under torch.compile through torch's lazy decorator, which loads it on the first call
    (test_fused's torch.compile test checks they still do)."""
    import subprocess
    import sys
    code = ("import sys, sparsetrain, sparsetrain.nn, sparsetrain.experiment.study, sparsetrain.sweep.cli\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
