"""The layers of docs/architecture.md, checked on the source: every import (function-local ones too)
points to the same layer or one below, no import circle among tpo_fast modules, and only
tpo_fast/ops/options.py reads the kernel settings from the environment."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Bottom to top. A module belongs to the layer of its longest matching prefix; the root package
# `tpo_fast` (its __init__ re-exports the primitives) sits with ops.
LAYERS = [
    ("kernels", ("tpo_fast.kernels", "tpo_fast._ext", "tpo_fast._C")),
    ("ops", ("tpo_fast.ops", "tpo_fast")),
    ("loss", ("tpo_fast.loss",)),
    ("trainer", ("tpo_fast.trainer",)),
    ("methods", ("tpo_fast.methods",)),
    ("cli", ("tpo_fast.cli",)),
]
# Known exceptions, each (importer, imported) with the reason and who removes it; a stale entry fails
# `test_allow_list_is_current`. Empty: the trainer -> methods.povid edge went when the POVID and FiSAO
# losses moved into tpo_fast/loss/.
ALLOWED_EDGES: set[tuple[str, str]] = set()
# Kernel settings: only the options module may name these variables (as environment lookups or otherwise).
SETTING_NAME = re.compile(r"^(TPO_FAST_[A-Z0-9_]+|TRITON_INTERPRET)$")
OPTIONS_MODULE = "tpo_fast.ops.options"


def _modules() -> dict[str, Path]:
    """Module name -> file, for tpo_fast/ and kernels/ (installed as tpo_fast.kernels)."""
    found = {}
    for folder, package in ((ROOT / "tpo_fast", "tpo_fast"), (ROOT / "kernels", "tpo_fast.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    found["tpo_fast._C"] = ROOT / "csrc"  # the compiled extension
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """The tpo_fast modules (or top-level `kernels`) that `name` imports anywhere in its body."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if _is_package(name) else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in MODULES else base)
    resolved = set()
    for t in targets:
        if t == "kernels" or t.startswith("kernels."):
            resolved.add(t)
        elif t == "tpo_fast" or t.startswith("tpo_fast."):
            while t not in MODULES:  # `import tpo_fast.ops.x.y` style: the longest known module
                t = t.rpartition(".")[0]
            if t != name:
                resolved.add(t)
    return resolved


GRAPH = {name: _imports(name) for name in MODULES if name != "tpo_fast._C"}


def _layer(name: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            exact_only = p == "tpo_fast"
            if (name == p or (not exact_only and name.startswith(p + "."))) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{name} is in no layer: add its package to LAYERS and docs/architecture.md"
    return best


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for name, targets in graph.items():
        for t in sorted(targets):
            if t.split(".")[0] == "kernels":
                problems.append(f"{name} imports {t}: import the kernels as tpo_fast.kernels")
            elif _layer(t) > _layer(name) and (name, t) not in ALLOWED_EDGES:
                below, above = LAYERS[_layer(name)][0], LAYERS[_layer(t)][0]
                problems.append(f"{name} ({below}) imports {t} ({above}), a layer above")
    return problems


def test_imports_point_down():
    problems = _upward(GRAPH)
    assert not problems, "\n".join(problems)


def test_an_upward_import_is_found():
    assert _upward({"tpo_fast.trainer.model": {"tpo_fast.methods.povid", "tpo_fast.loss"}}) == [
        "tpo_fast.trainer.model (trainer) imports tpo_fast.methods.povid (methods), a layer above"
    ]
    assert _upward({"tpo_fast._ext": {"tpo_fast"}, "tpo_fast.ops.x": {"kernels.indexed_dot"}}) == [
        "tpo_fast._ext (kernels) imports tpo_fast (ops), a layer above",
        "tpo_fast.ops.x imports kernels.indexed_dot: import the kernels as tpo_fast.kernels",
    ]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    graph = {name: {t for t in targets if (name, t) not in ALLOWED_EDGES} for name, targets in GRAPH.items()}
    circles = _cycles(graph)
    assert not circles, "import circles:\n" + "\n".join(
        " <-> ".join(c) + ": " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c)
        for c in circles
    )


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_allow_list_is_current():
    for importer, imported in ALLOWED_EDGES:
        assert imported in GRAPH.get(importer, ()), f"remove the stale allow-list entry {importer} -> {imported}"


def test_nothing_in_tpo_fast_imports_the_cli():
    users = sorted(n for n, targets in GRAPH.items() if not n.startswith("tpo_fast.cli")
                   and any(t.startswith("tpo_fast.cli") for t in targets))
    assert not users, f"the CLI is the top layer; imported by {users}"


def test_only_the_options_module_reads_kernel_settings():
    readers = []
    for name, path in MODULES.items():
        if name in (OPTIONS_MODULE, "tpo_fast._C"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SETTING_NAME.match(node.value):
                readers.append(f"{name}:{node.lineno} names {node.value!r}")
    assert not readers, "read kernel settings through tpo_fast.ops.options.KernelOptions:\n" + "\n".join(readers)


def test_the_checks_see_function_local_and_relative_imports(tmp_path, monkeypatch):
    """The parser itself: a function-local import and a relative one are edges."""
    pkg = tmp_path / "tpo_fast" / "trainer"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from tpo_fast.methods import povid\n\nfrom . import y\nfrom .y import z\n")
    (pkg / "y.py").write_text("z = 1\n")
    monkeypatch.setitem(MODULES, "tpo_fast.trainer.x", pkg / "x.py")
    monkeypatch.setitem(MODULES, "tpo_fast.trainer.y", pkg / "y.py")
    assert _imports("tpo_fast.trainer.x") == {"tpo_fast.methods.povid", "tpo_fast.trainer.y"}
