"""The package's shape: imports flow one way, rooms stay small, and the modules a GPU machine
without Ray runs import without Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fearec_dist"
MAX_LINES = 400
# what a machine with torch but no Ray imports (bench/gpu.py): models, the epoch loop,
# evaluation scoring and the feed's batch schema
RAY_FREE = [
    "fearec_dist.models",
    "fearec_dist.train.loop",
    "fearec_dist.train.evaluate",
    "fearec_dist.data.feed",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Project modules ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("fearec_dist"):
                out.add(node.module)
                # `from fearec_dist.train import checkpoint` imports a module too
                out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fearec_dist")}
    return out


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in project_imports(p) if i in files and i != m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module imports, ignoring the package ``__init__`` re-exports (a package
    importing its own submodules is how a package exposes its names)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if m.startswith(n + "."):  # a submodule importing its own package's __init__
                continue
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if state.get(n) is None and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if state.get(m) is None and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_at_module_or_function_level():
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_leaf_rooms_import_no_room_above_them():
    graph = import_graph()
    above = ("fearec_dist.data", "fearec_dist.train", "fearec_dist.models", "fearec_dist.serve")
    leaves = [m for m in graph if m == "fearec_dist.storage" or m.startswith("fearec_dist.config")]
    assert "fearec_dist.storage" in leaves and len(leaves) > 1
    for m in leaves:
        bad = sorted(i for i in graph[m] if i.startswith(above))
        assert not bad, f"{m} imports {bad}"


def test_no_module_passes_the_line_limit():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_gpu_path_modules_import_without_ray():
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # any `import ray` now raises ImportError\n"
        f"for name in {RAY_FREE!r}:\n"
        "    __import__(name)\n"
        "loaded = [m for m in sys.modules if sys.modules[m] and m.split('.')[0] == 'ray']\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_no_ray_check_fails_when_a_module_needs_ray():
    code = "import sys\nsys.modules['ray'] = None\nimport fearec_dist.data.planner\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "ray" in out.stderr
