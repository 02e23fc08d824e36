"""Shared test setup: the device the tests run on, and the random models several files use.

Tests run on the CPU: JAX_PLATFORMS=cpu is set here, before JAX is imported, so that results do
not depend on the machine (subprocesses the tests start inherit it). With JAXTTS_TEST_DEVICE=gpu,
JAX keeps its default device, which must be a GPU, and only the tests marked `gpu` run: kernel
tests written once, which run the Pallas kernels in the interpreter on CPU and compiled through
Triton on the GPU (the `interpret` and `kernel_options` fixtures below make the difference):

    make test-gpu PY=python3    # JAXTTS_TEST_DEVICE=gpu python3 -m pytest -q -m gpu tests

On the GPU, float32 matmuls run in true float32 (`jax_default_matmul_precision="highest"`;
XLA's GPU default rounds them to TF32), so a float32 tolerance means the same on both devices.
The reference stack the CPU tests compare against (torch, moshi, soundfile...) need not be
installed there: modules without a gpu test are not even imported.

Marks (registered in pyproject.toml):
  gpu       a kernel test that must also pass compiled on a GPU
  gpu_only  skipped on CPU (full CSM-1B sizes, too slow in the Pallas interpreter); pass reason=
"""

from __future__ import annotations

import os
from pathlib import Path

ON_GPU = os.environ.get("JAXTTS_TEST_DEVICE", "cpu").lower() == "gpu"
if not ON_GPU:
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402  (after JAX_PLATFORMS)
import pytest  # noqa: E402

if ON_GPU:
    jax.config.update("jax_default_matmul_precision", "highest")
else:
    jax.config.update("jax_platforms", "cpu")  # in case a plugin imported JAX before this file


# --------------------------------------------------------------------------- the device


def pytest_sessionstart(session):
    if ON_GPU and not session.config.option.collectonly:
        device = jax.devices()[0]
        if device.platform != "gpu":
            raise pytest.UsageError(
                f"JAXTTS_TEST_DEVICE=gpu, but JAX's default device is {device.platform!r}: install "
                "jax[cuda12] or jax[cuda13] on a machine with an NVIDIA GPU, or unset JAXTTS_TEST_DEVICE"
            )


def pytest_ignore_collect(collection_path: Path, config):
    """On the GPU, skip importing test modules without a gpu test (they may need the CPU-only
    reference stack)."""
    if ON_GPU and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        if "mark.gpu" not in collection_path.read_text(encoding="utf-8"):
            return True
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if ON_GPU and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.skip(reason="CPU test: JAXTTS_TEST_DEVICE=gpu runs the tests marked gpu"))
        only = item.get_closest_marker("gpu_only")
        if not ON_GPU and only is not None:
            item.add_marker(pytest.mark.skip(reason=only.kwargs.get("reason", "needs a GPU")))


@pytest.fixture(scope="session")
def on_gpu() -> bool:
    """Whether the tests run on a GPU (JAXTTS_TEST_DEVICE=gpu)."""
    return ON_GPU


@pytest.fixture(scope="session")
def interpret(on_gpu) -> bool:
    """The kernels' `interpret=` argument: the Pallas interpreter on CPU, compiled on a GPU."""
    return not on_gpu


@pytest.fixture(scope="session")
def kernel_options(on_gpu):
    """DecodeOptions running every Pallas kernel: in the interpreter on CPU; on a GPU compiled,
    with the rest of that GPU's defaults (`default_options`: rank top-k, tuned GEMV configs)."""
    from jaxtts.options import DecodeOptions, default_options

    return default_options(attention="pallas") if on_gpu else DecodeOptions(attention="pallas_interpret")


@pytest.fixture(scope="session")
def xla_options(kernel_options):
    """`kernel_options` with XLA in place of every kernel: what the kernels must reproduce."""
    return kernel_options.replace(attention="xla")


# --------------------------------------------------------------------------- random models


@pytest.fixture(scope="session")
def random_csm():
    """random_csm(preset="tiny", *, dtype="float32", seed=0): `CSM.random(preset(name), ...)`,
    built once per session for each set of arguments. Shared by every test that asks for the same
    one: do not change its weights (build your own `CSM.random` for that)."""
    from jaxtts.config import preset
    from jaxtts.csm import CSM

    built = {}

    def make(name: str = "tiny", *, dtype: str = "float32", seed: int = 0):
        key = (name, dtype, seed)
        if key not in built:
            built[key] = CSM.random(preset(name), dtype=dtype, seed=seed)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_csm(random_csm):
    """The small float32 CSM of the engine and CLI tests (the real text vocabulary), seed 1."""
    return random_csm("tiny", seed=1)


@pytest.fixture(scope="session")
def mimi():
    """The full-size random Mimi (seed 0) of the engine, CLI and fine-tuning tests."""
    from jaxtts.mimi import Mimi

    return Mimi.random(seed=0)


@pytest.fixture(scope="session")
def check_preset(on_gpu) -> str:
    """The model of the whole-model kernel checks: full-size CSM-1B on a GPU (the tiny preset's
    12-wide depth-decoder heads break the Triton lowering's power-of-two rule); on CPU, where the
    Pallas interpreter would take minutes per step at full size, the tiny preset."""
    return "csm-1b" if on_gpu else "tiny"
