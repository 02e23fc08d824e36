"""The Mosaic GPU matvec kernel (pallas_kernels.matvec_mgpu) vs the jnp reference.

On CPU the kernel runs in JAX's Mosaic GPU interpreter (`InterpretGPUParams`, with out-of-bounds
reads returning NaN where TMA returns zeros, and uninitialised shared memory NaN): "all finite"
therefore also checks that no padding row (x rows past M, the 64-row MMA padding) reaches the
output. With JAXTTS_TEST_DEVICE=gpu the tests marked gpu compile it for the GPU (Hopper only).
One more test lowers it for CUDA at every CSM-1B decode shape on the CPU: Mosaic GPU's Python
lowering (layouts, transforms, TMA and wgmma rules, shared-memory budget) runs at trace time;
only the final PTX compilation needs the GPU. The interpreter has no griddepcontrol rule, so PDL
is only lowered here, never interpreted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip(
    "jax._src.pallas.mosaic_gpu.interpret.params", reason="needs JAX's Mosaic GPU interpreter (>= 0.10.2)"
)

from jaxtts.quantize import quantize_array  # noqa: E402
from pallas_kernels.matvec import matvec_reference  # noqa: E402
from pallas_kernels.matvec_mgpu import MgpuConfig, default_config, matvec_mgpu, smem_bytes  # noqa: E402

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}

# name -> (K, N): CSM-1B's decode projections.
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
    w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k), jnp.bfloat16)
    return x, w


def _close(out, x, w):
    dtype = x.dtype.type
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.shape[1])
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    want = np.asarray(x.astype(jnp.float32)) @ np.asarray(w.astype(jnp.float32))
    np.testing.assert_allclose(out.reshape(want.shape), want, rtol=TOL[dtype], atol=TOL[dtype])
    ref = np.asarray(matvec_reference(x, w).astype(jnp.float32))
    np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m, k, n, dtype, kw",
    [
        (1, 256, 256, jnp.bfloat16, {}),  # default config: 4 splits of one K block
        (3, 512, 384, jnp.bfloat16, dict(block_n=128, k_splits=2, stages=3)),  # ring wraps (4 steps, 3 slots)
        (8, 256, 128, jnp.bfloat16, dict(k_splits=1)),  # one split: bf16 written by the kernel, no padding rows
        (5, 384, 192, jnp.bfloat16, dict(block_n=192, k_splits=1, stages=1)),  # one slot, 6 steps
        (2, 512, 256, jnp.float32, dict(block_n=256, k_splits=2, stages=2)),  # f32 x: hi/mid/lo rows
        (1, 256, 128, jnp.float32, dict(k_splits=1)),
        (8, 128, 64, jnp.bfloat16, dict(block_k=128, k_splits=1)),  # a K block of two swizzle tiles
    ],
)
def test_matches_reference(m, k, n, dtype, kw, interpret):
    x, w = _operands(m, k, n, dtype)
    _close(matvec_mgpu(x, w, interpret=interpret, **kw), x, w)


@pytest.mark.gpu
def test_leading_dims_and_partials(interpret):
    x, w = _operands(8, 256, 128, jnp.bfloat16, seed=1)
    out = matvec_mgpu(x.reshape(2, 4, 256), w, k_splits=2, interpret=interpret)
    assert out.shape == (2, 4, 128)
    _close(out.reshape(8, 128), x, w)

    parts = matvec_mgpu(x, w, k_splits=2, partials=True, interpret=interpret)
    assert parts.shape == (2, 8, 128) and parts.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(parts.sum(0)), np.asarray(x, np.float32) @ np.asarray(w, np.float32), rtol=1e-4, atol=1e-4
    )

    xf = x.astype(jnp.float32)[:3]
    parts = matvec_mgpu(xf, w, k_splits=2, partials=True, interpret=interpret)
    assert parts.shape == (6, 3, 128)  # 2 splits x (hi, mid, lo)
    np.testing.assert_allclose(
        np.asarray(parts.sum(0)), np.asarray(xf) @ np.asarray(w, np.float32), rtol=1e-5, atol=1e-5
    )


@pytest.mark.gpu
def test_chained_kernels(interpret):
    """Two kernels back to back, the second reading the first's output: on the GPU the second is
    launched early (PDL) and must wait for the first before it reads x."""
    x, w1 = _operands(2, 512, 1024, jnp.bfloat16, seed=2)
    w2 = _operands(2, 1024, 256, jnp.bfloat16, seed=3)[1]

    @jax.jit
    def chain(x):
        h = matvec_mgpu(x, w1, k_splits=1, interpret=interpret)
        return matvec_mgpu(h, w2, k_splits=1, interpret=interpret), h

    out, h = chain(x)
    _close(h, x, w1)
    _close(out, h, w2)


def test_bad_arguments():
    x, w = _operands(1, 256, 256, jnp.bfloat16)
    with pytest.raises(ValueError, match="multiples"):
        matvec_mgpu(x[:, :200], w[:200], interpret=True)
    with pytest.raises(ValueError, match="multiples"):
        matvec_mgpu(x, w[:, :200], interpret=True)
    with pytest.raises(ValueError, match="bfloat16"):
        matvec_mgpu(x, w.astype(jnp.float32), interpret=True)
    with pytest.raises(ValueError, match="rows"):
        matvec_mgpu(jnp.zeros((65, 256), jnp.bfloat16), w, interpret=True)
    with pytest.raises(ValueError, match="rows"):
        matvec_mgpu(jnp.zeros((22, 256), jnp.float32), w, interpret=True)
    with pytest.raises(ValueError, match="block_n"):
        matvec_mgpu(x, w, block_n=32, interpret=True)
    with pytest.raises(ValueError, match="k_splits"):
        matvec_mgpu(x, w, k_splits=3, interpret=True)
    with pytest.raises(ValueError, match="do not multiply"):
        matvec_mgpu(x, w[:128], interpret=True)


def test_default_configs_fit():
    """At every CSM-1B shape: the default fits one wave of two programs per SM and the shared
    memory budget, and every split gets whole K blocks."""
    for k, n in CSM_SHAPES.values():
        for rows in (1, 8, 24):  # bf16 M=1, M=8; f32 M=8 (3 A rows per row)
            cfg = default_config(rows, k, n)
            assert isinstance(cfg, MgpuConfig)
            assert n % cfg.block_n == 0 and k % cfg.block_k == 0 and (k // cfg.block_k) % cfg.k_splits == 0
            assert (n // cfg.block_n) * cfg.k_splits <= 264
            assert 2 * smem_bytes(rows, 4, cfg.block_n, cfg.block_k, cfg.stages) <= 228 * 1024


def _lowered_module(m, k, n, dtype, **kw):
    shapes = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((k, n), jnp.bfloat16))
    lowered = jax.jit(lambda x, w: matvec_mgpu(x, w, **kw)).trace(*shapes).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


def test_lowers_for_cuda_at_csm_shapes():
    """Mosaic GPU lowering (no GPU needed) at every CSM-1B decode shape, M = 1 and 8 in bf16 and
    M = 1 in f32, with the default configs."""
    for k, n in CSM_SHAPES.values():
        for m, dtype in ((1, jnp.bfloat16), (8, jnp.bfloat16), (1, jnp.float32)):
            text = _lowered_module(m, k, n, dtype)
            assert "mosaic_gpu" in text, (m, k, n)
    # The PDL instructions are in the kernel's module exactly when asked for (it is bytecode, in
    # which inline-asm strings stay verbatim).
    text = _lowered_module(1, 2048, 3072, jnp.bfloat16)
    assert "griddepcontrol.wait;" in text and "griddepcontrol.launch_dependents;" in text
    assert "griddepcontrol" not in _lowered_module(1, 2048, 3072, jnp.bfloat16, pdl=False)


@pytest.mark.parametrize(
    "m, kw",
    [
        (1, dict(k_splits=1)),  # bf16 output written by the kernel
        (3, dict(block_n=256)),
        (8, dict(block_k=128, stages=3)),
        (5, dict(block_n=192, k_splits=1, stages=1)),
    ],
)
def test_lowers_for_cuda_other_configs(m, kw):
    assert "mosaic_gpu" in _lowered_module(m, 2048, 3072, jnp.bfloat16, **kw)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n", [(1, 2048, 3072), (8, 1024, 1024)])
def test_full_size(m, k, n, interpret):
    """Full CSM-1B shapes with the default config (~10 s each in the interpreter)."""
    x, w = _operands(m, k, n, jnp.bfloat16, seed=4)
    _close(matvec_mgpu(x, w, interpret=interpret), x, w)


# --------------------------------------------------------------------------- int8 weights


def _int8_operands(m, k, n, dtype, seed=0):
    x, w = _operands(m, k, n, dtype, seed)
    q, scale = quantize_array(w.astype(jnp.float32))
    return x, jnp.swapaxes(q, -1, -2), scale  # this kernel reads int8 W [K, N] (the model stores [N, K])


def _close_int8(out, x, q, scale):
    dtype = x.dtype.type
    k, n = q.shape
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], n)
    out = np.asarray(out.astype(jnp.float32)).reshape(-1, n)
    assert np.isfinite(out).all()
    x2 = x.reshape(-1, k)
    ref = np.asarray(matvec_reference(x2, q, scale).astype(jnp.float32))
    np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype])
    # ... which is x times the dequantized weight, up to rounding
    deq = np.asarray(q, np.float32) * np.asarray(scale)[None, :]
    np.testing.assert_allclose(out, np.asarray(x2, np.float32) @ deq, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m, k, n, dtype, kw",
    [
        (1, 256, 256, jnp.bfloat16, {}),  # default config
        (3, 512, 384, jnp.bfloat16, dict(block_n=128, k_splits=2, stages=3)),  # ring wraps (4 steps, 3 slots)
        (1, 256, 128, jnp.bfloat16, dict(k_splits=1)),  # one split: the kernel scales and writes bf16
        (3, 384, 192, jnp.bfloat16, dict(block_n=192, k_splits=1, stages=1)),  # 192-byte int8 rows, one slot
        (3, 256, 64, jnp.bfloat16, dict(block_k=128, k_splits=1)),  # 64-byte rows, K blocks of two swizzle tiles
        (3, 512, 256, jnp.float32, dict(block_n=256, k_splits=2, stages=2)),  # f32 x: hi/mid/lo rows
    ],
)
def test_int8_matches_reference(m, k, n, dtype, kw, interpret):
    x, q, scale = _int8_operands(m, k, n, dtype, seed=5)
    _close_int8(matvec_mgpu(x, q, scale, interpret=interpret, **kw), x, q, scale)


@pytest.mark.gpu
def test_int8_partials_and_leading_dims(interpret):
    x, q, scale = _int8_operands(8, 256, 128, jnp.bfloat16, seed=6)
    x3 = x.reshape(2, 4, 256)
    _close_int8(matvec_mgpu(x3, q, w_scale=scale, interpret=interpret), x3, q, scale)
    parts = matvec_mgpu(x, q, scale, k_splits=2, partials=True, interpret=interpret)
    assert parts.shape == (2, 8, 128) and parts.dtype == jnp.float32  # each split's partial comes back scaled
    want = np.asarray(matvec_reference(x.astype(jnp.float32), q, scale))
    np.testing.assert_allclose(np.asarray(parts.sum(0)), want, rtol=1e-4, atol=1e-4)


def test_int8_weight_is_not_dequantized_outside_the_kernel():
    """The int8 weight goes into the kernel as it is: outside the kernel, no op reads it (the
    jaxpr of the compiled variant, walked through the calls that wrap the kernel)."""
    x, q, scale = _int8_operands(1, 256, 256, jnp.bfloat16)
    readers = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            inner = eqn.params.get("jaxpr", eqn.params.get("call"))  # jit; custom_vmap_call (plgpu.kernel)
            if eqn.primitive.name in ("jit", "pjit", "custom_vmap_call") and inner is not None:
                walk(getattr(inner, "jaxpr", inner))
            elif any(getattr(getattr(v, "aval", None), "dtype", None) == jnp.int8 for v in eqn.invars):
                readers.append(eqn.primitive.name)

    walk(jax.make_jaxpr(lambda x, q, s: matvec_mgpu(x, q, s))(x, q, scale).jaxpr)
    # one reader: the kernel (its primitive is mpmd_map in JAX 0.10.2)
    assert len(readers) == 1 and readers[0] in ("mpmd_map", "pallas_call"), readers


def test_int8_bad_arguments():
    x, q, scale = _int8_operands(1, 256, 256, jnp.bfloat16)
    with pytest.raises(ValueError, match="int8 w needs w_scale"):
        matvec_mgpu(x, q, interpret=True)
    for bad in (scale[:128], scale.astype(jnp.bfloat16), scale[None], scale.astype(jnp.float16)[:200]):
        with pytest.raises(ValueError, match=r"w_scale must be float32 \[256\] \(one scale per column"):
            matvec_mgpu(x, q, bad, interpret=True)
    with pytest.raises(ValueError, match="w_scale is for int8 w"):
        matvec_mgpu(x, q.astype(jnp.bfloat16), scale, interpret=True)
    with pytest.raises(ValueError, match="bfloat16, or int8"):
        matvec_mgpu(x, q.astype(jnp.int32), scale, interpret=True)


def test_int8_default_configs_fit():
    for k, n in CSM_SHAPES.values():
        for rows in (1, 8, 24):
            cfg = default_config(rows, k, n, int8=True)
            assert n % cfg.block_n == 0 and k % cfg.block_k == 0 and (k // cfg.block_k) % cfg.k_splits == 0
            assert (n // cfg.block_n) * cfg.k_splits <= 264 and cfg.stages >= 4
            assert 2 * smem_bytes(rows, 4, cfg.block_n, cfg.block_k, cfg.stages, int8=True) <= 228 * 1024


def _lowered_int8(m, k, n, dtype, **kw):
    sds = jax.ShapeDtypeStruct
    shapes = (sds((m, k), dtype), sds((k, n), jnp.int8), sds((n,), jnp.float32))
    fn = jax.jit(lambda x, w, s: matvec_mgpu(x, w, s, **kw))
    return fn.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def test_int8_lowers_for_cuda_at_csm_shapes():
    """Mosaic GPU lowering of the int8 kernel (the int8 tile's load in the 8-bit WGMMA layout,
    the conversion, the store to the swizzled bf16 tile, the scale epilogue) at every CSM-1B
    decode shape, M = 1 and 8 in bf16 and M = 1 in f32, default configs."""
    for k, n in CSM_SHAPES.values():
        for m, dtype in ((1, jnp.bfloat16), (8, jnp.bfloat16), (1, jnp.float32)):
            assert "mosaic_gpu" in _lowered_int8(m, k, n, dtype), (m, k, n)


@pytest.mark.parametrize(
    "m, kw",
    [
        (1, dict(k_splits=1)),  # bf16 output written by the kernel
        (3, dict(block_n=256)),
        (8, dict(block_n=64, block_k=128, stages=3)),  # 64-byte int8 rows
        (5, dict(block_n=192, k_splits=1, stages=1)),  # 192-byte int8 rows
    ],
)
def test_int8_lowers_for_cuda_other_configs(m, kw):
    assert "mosaic_gpu" in _lowered_int8(m, 2048, 3072, jnp.bfloat16, **kw)
