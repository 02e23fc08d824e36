"""The import structure: a DAG of layers, and no Pallas code on the CPU / XLA path."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxtts", "pallas_kernels", "convert")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module → the project modules it imports (at the top or inside functions)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` depends on the submodule; `from mod import name` on mod
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_module_imports_form_a_dag():
    graph = import_graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in graph[node]:
            if dep in ("jaxtts", "pallas_kernels", "convert"):
                continue  # the package __init__ re-exports; its own imports are checked as a module
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " → ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_kernels_and_converter_stay_below_the_library():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("pallas_kernels"):
            assert not [d for d in deps if d.startswith("jaxtts")], (name, deps)
        if name.startswith("convert"):
            allowed = (
                "jaxtts.config",
                "jaxtts.errors",
                "jaxtts.checkpoint",
                "jaxtts.quantize",  # the int8 parameter layout (`--quantize int8`)
                "jaxtts.mimi.config",
                "jaxtts.mimi.model",
            )
            bad = [d for d in deps if d.startswith("jaxtts") and d not in allowed]
            assert not bad, (name, bad)


def test_cpu_generation_loads_no_pallas():
    code = """
import sys
import numpy as np
import jaxtts
from jaxtts.config import preset
model = jaxtts.CSM.random(preset("tiny"), dtype="float32")
tokens = np.zeros((5, 33), np.int32); mask = np.zeros((5, 33), bool); mask[:, 32] = True
frames = jaxtts.generate_frames(model, tokens, mask, max_frames=3, seed=0)
assert frames.shape[1] == 32
# (jax itself imports jax._src.pallas.core; the kernels and the lowerings are what must stay out)
loaded = sorted(m for m in sys.modules if m.startswith(("jax.experimental.pallas", "pallas_kernels", "jax._src.pallas.triton")))
print("LOADED", loaded)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout, out.stdout
