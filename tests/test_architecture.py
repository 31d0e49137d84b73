"""The package's layering is code, checked here: every module imports alone, there is no import cycle, no
function-local import of the package, and each layer imports only the layers below it (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sfdaseg"

# Layers, bottom first: a module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("sfdaseg.task", "sfdaseg.config_base", "sfdaseg.normalization", "sfdaseg.amp", "sfdaseg.log",
                "sfdaseg.data.classes", "sfdaseg.storage")),
    ("data", ("sfdaseg.data",)),
    ("models", ("sfdaseg.models",)),
    ("components", ("sfdaseg.losses", "sfdaseg.pseudo_labels", "sfdaseg.augment", "sfdaseg.style",
                    "sfdaseg.strong_view", "sfdaseg.uncertainty", "sfdaseg.offline_labels", "sfdaseg.distill",
                    "sfdaseg.selection", "sfdaseg.evaluation", "sfdaseg.report", "sfdaseg.class_stats",
                    "sfdaseg.regularizers")),
    ("recipes", ("sfdaseg.methods",)),
    ("command configs", ("sfdaseg.config",)),
    ("engine", ("sfdaseg.engine",)),
    ("runs", ("sfdaseg.runs",)),
    ("entry points", ("sfdaseg.cli", "sfdaseg.__main__", "sfdaseg")),
]
# The only function-local imports of the package, each with its reason.
LOCAL_IMPORTS_ALLOWED = {
    ("sfdaseg.data.datasets", "sfdaseg.data.synthetic"): "import cost: real data never pays for the generator",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    best, index = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, index = len(p), i
    assert index >= 0, f"{module} belongs to no layer of tests/test_architecture.py (add it to LAYERS)"
    return index


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """``(imported sfdaseg module, inside a function)`` for every runtime import of ``module``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only, never executed
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.split(".")[0] == "sfdaseg")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "sfdaseg":
                for a in child.names:  # `from sfdaseg.methods import duda` imports the submodule
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if sub in MODULES else child.module, in_function))
            visit(child, local)

    visit(tree, False)
    return found


def _inert(module: str) -> bool:
    """A package whose ``__init__`` imports nothing of ours: importing it cannot pull a layer in."""
    path = MODULES[module]
    return path.name == "__init__.py" and not _imports(module, path)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _ in _imports(module, path):
            parts = target.split(".")
            # Importing a.b.c runs the __init__ of a.b first, unless the importer lives inside that package.
            for i in range(2, len(parts) + 1):
                name = ".".join(parts[:i])
                if name in MODULES and name != module and not module.startswith(name + ".") and not (
                        name != target and _inert(name)):
                    graph[module].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_there_is_no_import_cycle():
    assert _cycles(_graph()) == []


def test_each_layer_imports_only_the_layers_below_it():
    graph = _graph()
    wrong = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
             for m, targets in graph.items() for t in sorted(targets) if _layer(t) > _layer(m)]
    assert wrong == []


def test_recipes_import_nothing_of_the_engine_or_the_commands():
    bad = [f"{m} imports {t}" for m, targets in _graph().items() if m.startswith("sfdaseg.methods")
           for t in targets if t.startswith(("sfdaseg.engine", "sfdaseg.runs", "sfdaseg.cli")) or t == "sfdaseg.config"]
    assert bad == []


def test_no_function_local_import_of_the_package():
    local = [(m, t) for m, p in MODULES.items() for t, inside in _imports(m, p) if inside]
    assert [x for x in local if x not in LOCAL_IMPORTS_ALLOWED] == []


def test_every_module_imports_alone():
    """Each module in a fresh set of sfdaseg modules (third-party libraries stay loaded: only our order matters)."""
    script = (
        "import importlib, sys, torch, torchvision, numpy, yaml, PIL\n"
        f"names = {sorted(m for m in MODULES if m != 'sfdaseg.__main__')!r}\n"  # __main__ runs the CLI
        "failed = []\n"
        "for name in names:\n"
        "    for k in [k for k in sys.modules if k == 'sfdaseg' or k.startswith('sfdaseg.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
