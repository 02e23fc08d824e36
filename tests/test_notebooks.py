"""The notebooks in notebooks/ run top to bottom on CPU, each in under two minutes, and are
committed without outputs.

Each notebook runs in a fresh Jupyter kernel (this interpreter, via a throwaway kernelspec) with
JAX on CPU, empty weight caches (so the small random models are used, never real weights found on
the machine) and a compilation cache in a temporary directory. A failing cell fails the test with
its traceback.

To strip outputs before committing:  python tests/test_notebooks.py --strip
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_convert_and_parity", "03_kernels", "04_finetune"]
WALL_LIMIT_S = 120  # per notebook, kernel start included
CELL_TIMEOUT_S = 110
KERNEL_NAME = "jaxtts-notebook-test"
STRIP_HINT = "strip them before committing: python tests/test_notebooks.py --strip"


def strip(path: Path) -> bool:
    """Remove outputs and execution counts from a notebook in place. True if it changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None or "execution" in cell.metadata:
            changed = True
        cell.outputs = []
        cell.execution_count = None
        cell.metadata.pop("execution", None)
    if changed:
        nbformat.write(nb, path)
    return changed


# ------------------------------------------------------------------------------------------------
# Committed form
# ------------------------------------------------------------------------------------------------
def test_every_notebook_is_there():
    names = [p.stem for p in NOTEBOOKS]
    missing = [n for n in EXPECTED if n not in names]
    assert not missing, f"missing notebooks: {missing}"
    readme = (NOTEBOOK_DIR / "README.md").read_text()
    for p in NOTEBOOKS:
        assert p.name in readme, f"notebooks/README.md does not mention {p.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    import nbformat

    nbformat.validate(nbformat.read(path, as_version=4))
    nb = json.loads(path.read_text())
    dirty = [
        i
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; {STRIP_HINT}"


# ------------------------------------------------------------------------------------------------
# Execution
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    """A kernelspec for this interpreter and the environment the kernels inherit."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    root = tmp_path_factory.mktemp("notebooks")
    spec_dir = root / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": f"jaxtts tests ({sys.executable})",
                "language": "python",
            }
        )
    )
    for d in ("hf_hub", "jaxtts_cache", "xla"):
        (root / d).mkdir()
    env = {
        "JUPYTER_PATH": str(root / "jupyter"),
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_CACHE": str(root / "hf_hub"),  # empty caches: never pick up real weights
        "HF_HOME": str(root / "hf_hub"),
        "HF_HUB_OFFLINE": "1",
        "JAXTTS_CACHE": str(root / "jaxtts_cache"),
        "JAXTTS_COMPILE_CACHE": str(root / "xla"),  # shared by the notebooks of this run
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TRANSFORMERS_VERBOSITY": "error",
        "TQDM_DISABLE": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield root
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cell_seconds(nb) -> list[tuple[int, float]]:
    """(code cell number, seconds) from the timings nbclient records in each cell's metadata."""
    from datetime import datetime

    out = []
    for n, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        ex = cell.metadata.get("execution", {})
        start, end = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if start and end:
            t = datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(
                start.replace("Z", "+00:00")
            )
            out.append((n, t.total_seconds()))
    return out


def _error_outputs(nb) -> list[str]:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                out.append(f"{o['ename']}: {o['evalue']}")
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, notebook_env):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell's traceback) when a cell fails
    wall = time.perf_counter() - t0
    cells = ", ".join(f"[{n}] {t:.1f}" for n, t in _cell_seconds(nb))
    print(f"{path.name}: {wall:.1f} s (code cells, s: {cells})")
    assert not _error_outputs(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells), "not every cell ran"
    assert wall < WALL_LIMIT_S, (
        f"{path.name} took {wall:.0f} s; notebooks must run in under {WALL_LIMIT_S} s on CPU (code cells, s: {cells})"
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--strip"]:
        sys.exit("usage: python tests/test_notebooks.py --strip   (removes outputs from notebooks/*.ipynb)")
    for p in NOTEBOOKS:
        print(("stripped " if strip(p) else "clean    ") + str(p.relative_to(ROOT)))
