"""The package's import structure: layers import only downward, no cycles, few and explained lazy imports.

A static check over the source with ``ast`` (nothing is imported): every ``import`` / ``from ... import``
in a module, at any depth (function-level imports included), is an edge of the module graph.

Layers, bottom to top (DESIGN.md): a module may import from its own layer or below.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "arra_ds"

LAYERS: list[tuple[str, ...]] = [
    ("arra_ds", "arra_ds.errors", "arra_ds.warnings", "arra_ds.config", "arra_ds.distributed", "arra_ds.io", "arra_ds.cli",
     "arra_ds.weights"),
    ("arra_ds.tokens",),
    ("arra_ds.kernels",),
    ("arra_ds.model",),
    ("arra_ds.data",),
    ("arra_ds.demo",),
    ("arra_ds.checkpoints",),
    ("arra_ds.generate",),
    ("arra_ds.eval",),
    ("arra_ds.train",),
    ("arra_ds.study",),
]

# Function-level imports of the package's own modules that are allowed: each keeps a heavy optional
# dependency (Triton) out of the import of its caller. Every function-level import, of any module,
# must carry a comment that says why (on its line or the line above).
ALLOWED_LAZY_PACKAGE_IMPORTS = {
    ("arra_ds.kernels", "arra_ds.kernels.lm_loss"),
    ("arra_ds.kernels", "arra_ds.kernels.align_loss"),
}


def package_modules() -> dict[str, Path]:
    """module name -> file; ``arra_ds/kernels`` is a link to the top-level ``kernels/`` folder."""
    modules = {}
    roots = [(REPO_ROOT / PACKAGE, PACKAGE), (REPO_ROOT / "kernels", f"{PACKAGE}.kernels")]
    for root, prefix in roots:
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts and parts[0] == "kernels" and prefix == PACKAGE:
                continue  # reached through the link; counted once as the kernels/ folder
            name = ".".join((prefix, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def import_edges(modules: dict[str, Path]) -> list[tuple[str, str, int, bool, Path]]:
    """(importer, imported, line, inside a function, file) for every import of a package module."""
    edges = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        in_function = {
            id(node)
            for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(fn)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if not target.startswith(PACKAGE):
                    continue
                resolved = _resolve(target, modules)
                if resolved and resolved != name:
                    edges.append((name, resolved, node.lineno, id(node) in in_function, path))
    return edges


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > best_len and not (prefix == PACKAGE and module != PACKAGE):
                best, best_len = index, len(prefix)
    assert best is not None, f"module {module} is in no layer: add it to LAYERS in tests/test_layers.py"
    return best


def test_every_module_has_a_layer():
    for module in package_modules():
        layer_of(module)


def test_imports_only_go_down():
    modules = package_modules()
    upward = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, dst, line, _, path in import_edges(modules)
        if layer_of(dst) > layer_of(src)
    ]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_no_import_cycles():
    modules = package_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for src, dst, *_ in import_edges(modules):
        graph[src].add(dst)
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
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
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_lazy_package_imports_are_the_documented_ones():
    lazy = {(src, dst) for src, dst, _, inside, _ in import_edges(package_modules()) if inside}
    assert lazy <= ALLOWED_LAZY_PACKAGE_IMPORTS, f"function-level imports of arra_ds modules: {sorted(lazy - ALLOWED_LAZY_PACKAGE_IMPORTS)}"


def test_every_function_level_import_says_why():
    unexplained = []
    for name, path in package_modules().items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                # the comment may stand on the import's line, or above a block of consecutive imports
                row = node.lineno - 1
                while row > 0 and lines[row - 1].strip().startswith(("import ", "from ")):
                    row -= 1
                if "#" not in lines[node.lineno - 1] and not lines[row - 1].strip().startswith("#"):
                    unexplained.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, "function-level imports without a reason comment:\n" + "\n".join(unexplained)


def test_no_top_level_kernels_module_is_installed():
    """Hugging Face publishes a package named ``kernels`` too: ours is installed as arra_ds.kernels only."""
    from setuptools import find_packages  # the build's own package finder, as setup.py calls it

    setup_call = next(
        node for node in ast.walk(ast.parse((REPO_ROOT / "setup.py").read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    packages_call = next(k.value for k in setup_call.keywords if k.arg == "packages")
    include = ast.literal_eval(next(k.value for k in packages_call.keywords if k.arg == "include"))
    packages = find_packages(where=str(REPO_ROOT), include=include)
    assert "arra_ds.kernels" in packages
    assert all(p == PACKAGE or p.startswith(PACKAGE + ".") for p in packages), packages
    link = REPO_ROOT / PACKAGE / "kernels"
    assert link.is_symlink() and link.resolve() == (REPO_ROOT / "kernels").resolve()


# Backbone names: what model.source may be compared with only inside arra_ds/model/ (the registry and the backbones'
# own modules). Everywhere else a backbone's capabilities go through its registry entry (model/interface.py Backbone).
BACKBONE_NAMES = {"debug", "chameleon", "lumina_mgpt", "llamagen", "janus"}


def _string_constants(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_no_module_outside_model_compares_a_source_with_a_backbone_name():
    found = []
    for name, path in package_modules().items():
        if name.startswith(f"{PACKAGE}.model"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = _string_constants(node) & BACKBONE_NAMES
                if names:
                    found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: compares with {sorted(names)}")
    assert not found, "backbone names outside arra_ds/model/ (ask the registry entry instead):\n" + "\n".join(found)
