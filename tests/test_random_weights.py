"""Random weights (`CSM.random`, `Mimi.random`): deterministic per seed, the layout of a loaded
model, the constructors' distributions; and `benchmarks.startup --compile-ab` on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtts.config import preset
from jaxtts.csm import CSM, param_dict
from jaxtts.mimi import Mimi
from jaxtts.mimi.config import MIMI
from jaxtts.mimi.model import _is_leaf, abstract_params, init_params, param_specs
from jaxtts.testing import flat

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return preset("tiny")


def test_csm_random_is_deterministic_per_seed(tiny, random_csm):
    a = flat(param_dict(random_csm("tiny", seed=0)))
    b = flat(param_dict(CSM.random(tiny, dtype="float32", seed=0)))
    c = flat(param_dict(random_csm("tiny", seed=1)))
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(not np.array_equal(a[k], c[k]) for k in a if not k.endswith("scale")), "a seed changes every draw"
    # Seeds are taken modulo 2**32 (the program's seed is a uint32 argument).
    d = flat(param_dict(CSM.random(tiny, dtype="float32", seed=2**32)))
    assert all(np.array_equal(a[k], d[k]) for k in a)


@pytest.mark.parametrize("dtype,quantize", [("float32", None), ("bfloat16", None), ("bfloat16", "int8")])
def test_csm_random_has_the_abstract_layout(tiny, dtype, quantize):
    got = nnx.state(CSM.random(tiny, dtype=dtype, seed=3, quantize=quantize))
    want = nnx.state(CSM.abstract(tiny, dtype, quantization=quantize))
    spec = lambda a: (tuple(a.shape), jnp.dtype(a.dtype))  # noqa: E731
    assert jax.tree.map(spec, nnx.to_pure_dict(got)) == jax.tree.map(spec, nnx.to_pure_dict(want))


def test_csm_random_draws_as_the_constructor_does(tiny, random_csm):
    """Layers drawn stacked (one draw per weight kind) keep the constructor's distributions: each
    parameter's mean and std match those of the plain constructor's draw (norms: ones), and the
    layers of a stack differ from each other."""
    model = param_dict(random_csm("tiny", seed=0))
    plain = flat(param_dict(CSM(tiny, dtype=jnp.float32, rngs=nnx.Rngs(5))))
    got = flat(model)
    for k, ref in plain.items():
        x, ref = np.asarray(got[k], np.float64), np.asarray(ref, np.float64)
        if ref.std() == 0:
            assert np.array_equal(x, ref), k
            continue
        tol = 6 / np.sqrt(x.size)  # a few standard errors
        assert abs(x.mean() - ref.mean()) < tol * ref.std() + 1e-12, k
        assert abs(x.std() / ref.std() - 1) < 3 * tol, k
    layers = model["backbone"]["layers"]
    for name in ("qkv", "out"):
        assert not np.array_equal(layers[0]["attn"][name], layers[1]["attn"][name]), name


def test_int8_random_model_runs(tiny, tmp_path):
    from jaxtts.generation import generate_frames

    model = CSM.random(tiny, dtype="float32", seed=1, quantize="int8")
    assert model.quantization == "int8" and model.quantized_embeddings
    path = model.save(tmp_path / "int8")
    loaded = CSM.load(path, dtype="float32")
    assert loaded.quantization == "int8"
    tokens = np.zeros((3, 33), np.int32)
    mask = np.zeros((3, 33), bool)
    tokens[:, 32], mask[:, 32] = [5, 6, 7], True
    frames = generate_frames(loaded, tokens, mask, max_frames=2, seed=0)
    assert frames.shape[1] == 32 and np.all((frames >= 0) & (frames < tiny.audio_vocab_size))


def test_mimi_random_is_deterministic_with_the_spec_layout_and_distributions():
    a, b = init_params(MIMI, seed=0), init_params(MIMI, seed=0)
    c = init_params(MIMI, seed=1)
    specs = jax.tree.leaves(param_specs(MIMI), is_leaf=_is_leaf)
    leaves_a, leaves_b, leaves_c = jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c)
    assert jax.tree.structure(a) == jax.tree.structure(abstract_params(MIMI))
    for spec, x, y, z in zip(specs, leaves_a, leaves_b, leaves_c, strict=True):
        assert x.shape == spec.shape and x.dtype == np.float32
        assert np.array_equal(x, y)
        if not spec.std:
            assert np.all(x == np.float32(spec.mean))
            continue
        assert not np.array_equal(x, z)
        tol = 6 / np.sqrt(x.size)
        assert abs(x.mean() - spec.mean) < tol * spec.std and abs(x.std() / spec.std - 1) < 3 * tol + 1e-3
    codec = Mimi.random(seed=0, dtype=jnp.bfloat16)
    assert all(isinstance(p, jax.Array) and p.dtype == jnp.bfloat16 for p in jax.tree.leaves(codec.params))


def test_startup_compile_ab_runs_on_cpu(tmp_path):
    """The compile-options A/B on the tiny preset: the four programs compile and run (CPU: the
    default variant only; the GPU variants are skipped with a reason)."""
    import json

    out = tmp_path / "ab.json"
    cmd = [sys.executable, "-m", "benchmarks.startup", "--preset", "tiny", "--compile-ab", "--budget-s", "120"]
    cmd += ["--context-s", "2", "--json", str(out)]
    env = dict(os.environ, JAXTTS_COMPILE_CACHE=str(tmp_path / "xla"))  # not the user's cache
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    res = json.loads(out.read_text())
    assert [r["program"] for r in res["compile_ab"]] == ["prefill", "decode chunk", "Mimi decode step", "Mimi encode"]
    assert all(r["variant"] == "XLA default" and r["compile_s"] > 0 and r["run_ms"] > 0 for r in res["compile_ab"])
    assert "ignores" in res["skipped"] and "variants not run" in run.stdout


def test_jit_cublas_runs_alone_and_nested():
    """Mimi's and the prefill's jits carry compiler options, which JAX refuses on a nested jit:
    inside a user's jit or eval_shape they must still work (as plain nested jits)."""
    import jax.numpy as jnp

    from jaxtts.defaults import jit_cublas

    f = jit_cublas(lambda x: x @ x)
    x = jnp.ones((4, 4))
    assert float(f(x).sum()) == 64
    assert float(jax.jit(lambda x: f(x) + 1)(x).sum()) == 80
    assert jax.eval_shape(lambda: f(x)).shape == (4, 4)
    with pytest.raises(TypeError):  # other errors still surface
        f(x, x)
