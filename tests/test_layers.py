"""The package's import layers: a module imports only from its own layer or lower ones (function-level imports
count; ``if TYPE_CHECKING:`` ones do not), no two modules import each other, and the package root holds only what a
run is made of. Read from the source (ast), nothing is imported."""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "megatron_async_rlhf"

# lowest first; a module's layer is that of the longest prefix listed
LAYERS = [
    ["errors"],
    ["weights", "algorithms", "metrics", "preemption", "launch"],
    ["data", "models", "learner"],
    ["rewards", "cluster"],
    ["rollout"],
    ["config"],
    ["schedules", "evaluation", "run_state"],
    ["modes"],
    ["checks", "train"],
    ["cli", "__main__", "__init__"],
]
ROOT_MODULES = {"__init__", "__main__", "errors", "config", "train", "cluster", "launch", "metrics", "preemption",
                "run_state", "evaluation", "cli"}


def _layer(mod: str) -> int:
    best, layer = -1, None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and len(n) > best:
                best, layer = len(n), i
    assert layer is not None, f"module {mod} is in no layer: add it to LAYERS"
    return layer


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: pathlib.Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):  # imports only type checkers see
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.startswith("megatron_async_rlhf."):
                m = n[len("megatron_async_rlhf."):]
                while m and m not in known:
                    m = m.rpartition(".")[0]
                if m:
                    found.add(m)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_no_module_imports_a_higher_layer():
    bad = [f"{m} (layer {_layer(m)}) -> {d} (layer {_layer(d)})" for m, deps in _graph().items() for d in deps
           if _layer(d) > _layer(m)]
    assert not bad, "imports up the layers:\n" + "\n".join(sorted(bad))


def test_no_two_modules_import_each_other():
    g = _graph()
    pairs = sorted({tuple(sorted((a, b))) for a, deps in g.items() for b in deps
                    if a in g.get(b, ()) and not (a.startswith(b + ".") or b.startswith(a + "."))})
    assert not pairs, f"modules importing each other: {pairs}"


def test_the_package_root_holds_only_the_run():
    extra = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ROOT_MODULES)
    assert not extra, f"modules at the package root that are not part of a run: {extra} (checks/ or tools/)"
