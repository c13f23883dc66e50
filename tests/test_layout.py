"""The package's layout: subpackages by job, imports running one way, no cycles, no private names
across subpackages (a static read of every module's imports, lazy ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hf_graft"

# Top to bottom: a module may import from its own layer or a lower one, never a higher one.
LAYERS = [
    {"train", "trainer", "grafting", "builder"},  # import paths kept for user code (re-exports)
    {"cli"},
    {"training"},
    {"run", "export"},
    {"population"},
    {"data", "models", "metrics"},
    {"config", "trainer_fields"},
    {"graft"},
    {"errors", "utils", "_compat"},
]
# run and export share a layer but must not import each other in both directions
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(imported hf_graft module, names taken from it) for every import in the file, lazy ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "hf_graft" or target.startswith("hf_graft."):
                names = [alias.name for alias in node.names]
                # `from hf_graft.x import y` where y is a submodule imports that module
                submodules = [f"{target}.{n}" for n in names if _is_module(f"{target}.{n}")]
                if submodules:
                    found.extend((m, []) for m in submodules)
                    names = [n for n in names if f"{target}.{n}" not in submodules]
                if names:
                    found.append((target, names))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names if alias.name.startswith("hf_graft."))
    return found


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def top_part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_layer():
    unplaced = sorted({top_part(m) for m in MODULES if top_part(m) and top_part(m) not in LAYER_OF})
    assert unplaced == [], f"modules outside every layer of tests/test_layout.py: {unplaced}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if top_part(m)))
def test_imports_run_one_way(module):
    own = top_part(module)
    for target, names in imports_of(MODULES[module]):
        other = top_part(target)
        if not other or other == own:
            continue
        assert LAYER_OF[other] >= LAYER_OF[own], f"{module} (layer {own}) imports {target}, a higher layer"
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{module} imports private names {private} from another subpackage ({target})"


def test_no_import_cycles():
    graph = {m: sorted({t for t, _ in imports_of(p) if t in MODULES and t != m}) for m, p in MODULES.items()}
    # a package's __init__ importing its own modules is not a cycle with them
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_run_and_export_do_not_import_each_other_both_ways():
    def depends(a: str, b: str) -> bool:
        return any(top_part(t) == b for m, p in MODULES.items() if top_part(m) == a for t, _ in imports_of(p))

    assert not (depends("run", "export") and depends("export", "run"))
