"""The package's import graph is a DAG that flows one way, counting imports inside functions.

Layers, bottom to top (a module may import its own layer or lower ones, never a higher one):
0. kernels (tinyformer.kernels.*, which imports nothing else of tinyformer), config and names (Hugging Face's
   parameter names);
1. ops (the dispatch); cache, generate, chat and checkpoint: generation and saving
   take any model object, so `model.generate` and `model.save` (the public contract) call down into them;
2. model (the math);
3. qlinear (the modules compression swaps in);
4. compress, convert (`tinyformer.load`), finetune (LoRA), export, data, optim, train, eval;
5. cli and the package itself (__init__, __main__).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    {"tinyformer.kernels", "tinyformer.config", "tinyformer.names"},
    {"tinyformer.ops", "tinyformer.cache", "tinyformer.generate", "tinyformer.chat", "tinyformer.checkpoint"},
    {"tinyformer.model"},
    {"tinyformer.qlinear"},
    {"tinyformer.compress", "tinyformer.convert", "tinyformer.finetune", "tinyformer.export", "tinyformer.data",
     "tinyformer.optim", "tinyformer.train", "tinyformer.eval"},
    {"tinyformer.cli", "tinyformer", "tinyformer.__main__"},
]


def _modules() -> dict[str, Path]:
    """Module name -> source file, for tinyformer/ and kernels/ (installed as tinyformer.kernels)."""
    out = {}
    for folder, package in ((ROOT / "tinyformer", "tinyformer"), (ROOT / "kernels", "tinyformer.kernels")):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known) -> set[str]:
    """The tinyformer modules `name` imports anywhere in its file (module level, functions, methods)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import module` too
        else:
            continue
        # an ancestor package runs before any of its modules anyway: `from tinyformer import ops` is an edge to ops
        found |= {t for t in targets if t in known and t != name and not name.startswith(t + ".")}
    return found


def _graph():
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _layer(name: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{name} is in no layer of this test: place it in LAYERS"
    return best[0]


def _cycle(graph) -> list[str] | None:
    """One import cycle of `graph` as a list of modules, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) >= 25 and graph["tinyformer.model"]  # the walk found the package and its imports
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_down_the_layers():
    wrong = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
             for a, targets in _graph().items() for b in targets
             if _layer(b) > _layer(a)]
    assert not wrong, "\n".join(wrong)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
