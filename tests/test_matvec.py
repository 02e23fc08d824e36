"""The Pallas matvec kernel vs its jnp reference, and its Triton lowering.

Written once for both devices (tests/conftest.py): on CPU the kernel runs in the Pallas
interpreter, which fills output buffers with NaN before the kernel runs, so "all finite" also
checks that every output element (and every split's partial) was written; with
JAXTTS_TEST_DEVICE=gpu the tests marked gpu compile it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import matvec, matvec_reference
from pallas_kernels.matvec import default_config

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}

# name -> (K, N): CSM-1B's projections.
CSM_SHAPES = {
    "depth qkv": (1024, 1536),
    "depth out": (1024, 1024),
    "depth gate_up": (1024, 16384),
    "depth down": (8192, 1024),
    "projection": (2048, 1024),
    "backbone qkv": (2048, 3072),
    "backbone out": (2048, 2048),
    "backbone gate_up": (2048, 16384),
    "backbone down": (8192, 2048),
}


def _operands(m, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), dtype)
    w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k), dtype)
    return x, w


def _close(out, x, w):
    dtype = x.dtype.type
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.shape[1])
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    # The reference in float32 on the same (rounded) inputs; bf16 only adds the output rounding.
    want = np.asarray(x.astype(jnp.float32)) @ np.asarray(w.astype(jnp.float32))
    np.testing.assert_allclose(out, want, rtol=TOL[dtype], atol=TOL[dtype])
    ref = np.asarray(matvec_reference(x, w).astype(jnp.float32))
    np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m, k, n, dtype, kw",
    [
        (1, 256, 640, jnp.float32, dict(block_n=128, block_k=64, k_splits=2)),  # even blocks
        (3, 200, 96, jnp.float32, dict(block_n=32, block_k=32, k_splits=3)),  # ragged K, N; 7 blocks / 3
        (17, 64, 130, jnp.float32, dict(block_n=64, block_k=16, k_splits=1)),  # 32 rows, one split
        (1, 256, 640, jnp.bfloat16, {}),  # default config
        (3, 192, 96, jnp.bfloat16, dict(block_n=32, block_k=64, k_splits=4)),  # more splits than blocks
        (1, 100, 70, jnp.float32, dict(method="reduce", block_n=32, block_k=16, k_splits=2)),
        (3, 128, 96, jnp.bfloat16, dict(method="reduce", block_n=32, block_k=32)),
    ],
)
def test_matvec_matches_reference(m, k, n, dtype, kw, interpret):
    x, w = _operands(m, k, n, dtype)
    _close(matvec(x, w, interpret=interpret, **kw), x, w)
    # W given as [N, K] (each output column's weights contiguous): the same product
    _close(matvec(x, jnp.asarray(w.T), w_transposed=True, interpret=interpret, **kw), x, w)


@pytest.mark.gpu
def test_leading_dims_and_mixed_dtypes(interpret):
    x, w = _operands(4, 64, 48, jnp.float32, seed=1)
    out = matvec(x.reshape(2, 2, 64), w.astype(jnp.bfloat16), block_n=16, block_k=32, interpret=interpret)
    assert out.shape == (2, 2, 48) and out.dtype == jnp.float32
    want = x @ w.astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(out.reshape(4, 48)), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_rejects_bad_arguments(interpret):
    x, w = _operands(65, 32, 16, jnp.float32)
    with pytest.raises(ValueError, match="rows"):
        matvec(x, w, interpret=interpret)
    with pytest.raises(ValueError, match="power of two"):
        matvec(x[:1], w, block_n=24, interpret=interpret)
    with pytest.raises(ValueError, match="multiply"):
        matvec(x[:1], w[:16], interpret=interpret)


def test_default_config_spreads_work():
    # ~2 programs per SM unless every split is down to one K block or the partials would grow
    # past half of W's bytes (8 * splits * M * N vs 2 * K * N).
    for k, n in [(1024, 1536), (1024, 16384), (8192, 1024), (2048, 3072), (8192, 2048)]:
        for m in (1, 8, 64):
            cfg = default_config(m, k, n)
            programs = -(-n // cfg.block_n) * cfg.k_splits
            at_cap = 2 * cfg.k_splits * cfg.block_k > k or 2 * cfg.k_splits > k // (8 * m)
            assert programs >= 256 or at_cap, (m, k, n, cfg)
            assert 8 * cfg.k_splits * m * n <= k * n, (m, k, n, cfg)
            # int8 stored [N, K]: K tiles of 256 for the wide (gate_up) shapes up to 8 rows, else bf16's
            nk = default_config(m, k, n, int8_nk=True)
            wide = n >= 8192 and m <= 8
            assert nk == (cfg if not wide else cfg._replace(block_k=256, k_splits=nk.k_splits)), (m, k, n, nk)
            assert not wide or (nk.k_splits == 1 and -(-n // nk.block_n) >= 256)


# ------------------------------------- CSM-1B shapes: the correctness checks of benchmarks/matvec_check.py

ONE_OF_EACH = pytest.mark.gpu_only(reason="~1 s each in the Pallas interpreter: CPU runs one default config per M")


def _case(name, m, dtype, kw=None, cpu=True):
    kw = kw or {}
    label = "-".join([name.replace(" ", "_"), f"m{m}", jnp.dtype(dtype).name, *(f"{k}={v}" for k, v in kw.items())])
    return pytest.param(name, m, dtype, kw, id=label, marks=() if cpu else ONE_OF_EACH)


CSM_CASES = [
    _case(name, m, jnp.bfloat16, cpu=(name, m) in {("depth down", 1), ("backbone qkv", 8)})
    for name in CSM_SHAPES
    for m in (1, 8)
] + [
    _case("depth down", 1, jnp.float32),
    _case("backbone qkv", 8, jnp.float32),
    _case("depth gate_up", 1, jnp.bfloat16, dict(method="reduce")),
    _case("depth down", 1, jnp.bfloat16, dict(method="reduce", block_n=64, block_k=64)),
    _case("backbone down", 64, jnp.bfloat16),
]


def _rel(out, want):
    out, want = np.asarray(out.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
    assert np.isfinite(out).all()
    return float(np.linalg.norm(out - want) / np.linalg.norm(want))


@pytest.mark.gpu
@pytest.mark.parametrize("name, m, dtype, kw", CSM_CASES)
def test_matvec_at_csm_shapes(name, m, dtype, kw, interpret):
    """Relative L2 error against `matvec_reference`, default config unless given."""
    k, n = CSM_SHAPES[name]
    x, w = _operands(m, k, n, dtype, seed=2)
    assert _rel(matvec(x, w, interpret=interpret, **kw), matvec_reference(x, w)) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m, dtype, kw",
    [
        (3, jnp.bfloat16, dict(block_n=128, block_k=64, k_splits=5)),
        (17, jnp.float32, {}),
        (1, jnp.bfloat16, dict(method="reduce", block_n=64, block_k=64)),
    ],
)
def test_matvec_ragged_1000x1500(m, dtype, kw, interpret):
    """K and N no multiple of any block: masked tails on every side."""
    x, w = _operands(m, 1000, 1500, dtype, seed=3)
    assert _rel(matvec(x, w, interpret=interpret, **kw), matvec_reference(x, w)) <= TOL[dtype]


@pytest.mark.parametrize("m", [1, 8, 64])
def test_lowers_to_triton_at_csm_shapes(m):
    """The Triton lowering runs at trace time, so CPU catches its shape and op restrictions (on a
    GPU the tests above compile the kernel, and this one is skipped)."""
    sds = jax.ShapeDtypeStruct
    for k, n in CSM_SHAPES.values():
        for method in ("dot", "reduce") if m <= 8 else ("dot",):
            fn = jax.jit(lambda x, w, method=method: matvec(x, w, method=method))
            hlo = (
                fn.trace(sds((m, k), jnp.bfloat16), sds((k, n), jnp.bfloat16))
                .lower(lowering_platforms=("cuda",))
                .as_text()
            )
            assert "triton" in hlo
    # A ragged shape with masks on every side.
    fn = jax.jit(lambda x, w: matvec(x, w, block_n=64, block_k=64, k_splits=3))
    assert (
        "triton"
        in fn.trace(sds((3, 1000), jnp.bfloat16), sds((1000, 1500), jnp.bfloat16))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
