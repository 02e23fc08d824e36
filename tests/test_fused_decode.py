"""The fused decode-step kernels (pallas_kernels/fused_decode.py) vs their references, at CSM's
head layouts, with ragged shapes, splits, a weight stack and bf16; and the fused step inside the
model vs the unfused kernels.

Written once for both devices (tests/conftest.py): the Pallas interpreter on CPU; with
JAXTTS_TEST_DEVICE=gpu the tests marked gpu compile the kernels."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtts.generation import frame_rows, split_model
from jaxtts.llama import KVCache
from jaxtts.testing import prompt_state
from pallas_kernels.fused_decode import (
    add_residual,
    attention_step,
    attention_step_reference,
    finish,
    norm_matvec,
    norm_matvec_reference,
)
from pallas_kernels.matvec import matvec


def _rand(key, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)).astype(dtype)


def _close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), "output has unwritten (NaN) elements"
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)
    assert err < tol, f"relative error {err:.2e} ≥ {tol}"


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,splits", [(1, 256, 192, 4), (3, 200, 100, 2), (8, 128, 64, 1)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_norm_matvec_plain(m, k, n, splits, dtype, tol, interpret):
    x = _rand(0, (m, k), dtype)
    scale = _rand(2, (k,), dtype)
    w = _rand(3, (k, n), dtype, k**-0.5)
    y, ss = norm_matvec(x, scale, w, k_splits=splits, interpret=interpret)
    y_ref = norm_matvec_reference(x, scale, w, eps=1e-5)
    assert y.shape == (splits, m, n) and y.dtype == jnp.float32 and ss.shape == (splits, m)
    _close(finish(y, ss, k, 1e-5), y_ref, tol)
    # W given as [N, K]: the same result
    y, ss = norm_matvec(x, scale, jnp.asarray(w.T), k_splits=splits, w_transposed=True, interpret=interpret)
    _close(finish(y, ss, k, 1e-5), y_ref, tol)


def test_add_residual_rounds_like_the_model():
    x, parts = _rand(0, (2, 8), jnp.bfloat16), _rand(1, (3, 2, 8), jnp.float32)
    want = x + jnp.sum(parts, axis=0).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(add_residual(x, parts), np.float32), np.asarray(want, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv,d", [(32, 8, 64), (8, 2, 128)])
def test_norm_matvec_rope(heads, kv, d, interpret):
    m, k = 2, 256
    n = (heads + 2 * kv) * d
    x = _rand(0, (m, k))
    scale, w = _rand(2, (k,)), _rand(3, (k, n), jnp.float32, k**-0.5)
    ang = _rand(4, (m, d // 2))
    rope = (jnp.cos(ang), jnp.sin(ang))
    y, ss = norm_matvec(x, scale, w, rope=rope, head_dim=d, rope_heads=heads + kv, k_splits=2, interpret=interpret)
    y_ref = norm_matvec_reference(x, scale, w, eps=1e-5, rope=rope, head_dim=d, rope_heads=heads + kv)
    y = finish(y, ss, k, 1e-5)
    _close(y, y_ref, 1e-5)
    # v heads are not rotated: compare them to the plain projection.
    plain = norm_matvec_reference(x, scale, w, eps=1e-5)
    np.testing.assert_allclose(y[:, (heads + kv) * d :], plain[:, (heads + kv) * d :], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_norm_matvec_weight_stack(dtype, tol, interpret):
    m, k = 3, 192
    x, scale = _rand(0, (m, k), dtype), _rand(2, (k,), dtype)
    stack = _rand(5, (3, k, 70), dtype, k**-0.5)
    y, ss = norm_matvec(x, scale, stack, w_index=jnp.array([2]), k_splits=2, interpret=interpret)
    y_ref = norm_matvec_reference(x, scale, stack, eps=1e-6, w_index=2)
    _close(finish(y, ss, k, 1e-6), y_ref, tol)


@pytest.mark.gpu
def test_matvec_partials_sum_to_product(interpret):
    x, w = _rand(0, (2, 300)), _rand(1, (300, 130), jnp.float32, 0.1)
    parts = matvec(x, w, k_splits=3, partials=True, interpret=interpret)
    assert parts.shape[1:] == (2, 130) and parts.dtype == jnp.float32
    np.testing.assert_allclose(parts.sum(0), x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "heads,kv,d,s,pos,splits",
    [
        (8, 2, 128, 32, [0, 5, 31], None),  # depth decoder: one split, first and last slot
        (32, 8, 64, 300, [1, 150, 299], 4),  # backbone: ragged, several splits
    ],
)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_attention_step(heads, kv, d, s, pos, splits, dtype, tol, interpret):
    m = len(pos)
    n = (heads + 2 * kv) * d
    parts = _rand(0, (3, m, n), jnp.float32, 0.5)
    ss = jnp.abs(_rand(3, (3, m), jnp.float32, 40.0))  # partial sums of squares of a 64-wide input
    kc, vc = _rand(1, (m, s, kv, d), dtype), _rand(2, (m, s, kv, d), dtype)
    pos = jnp.array(pos, jnp.int32)
    o_ref, k_ref, v_ref = attention_step_reference(finish(parts, ss, 64, 1e-5), kc, vc, pos, num_heads=heads)
    o, k_new, v_new = attention_step(
        parts,
        ss,
        kc.copy(),
        vc.copy(),
        pos,
        num_heads=heads,
        model_dim=64,
        eps=1e-5,
        num_splits=splits,
        interpret=interpret,
    )
    _close(o, o_ref, tol)
    np.testing.assert_allclose(np.asarray(k_new, np.float32), np.asarray(k_ref, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(v_new, np.float32), np.asarray(v_ref, np.float32), rtol=tol, atol=tol)
    # Only slot pos[b] of each row changed.
    changed = np.any(np.asarray(k_new != kc), axis=(2, 3))
    assert changed.sum() == m and all(changed[b, int(p)] for b, p in enumerate(pos))


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv,d,s,pos", [(8, 2, 128, 32, [5, 0, 31]), (4, 2, 64, 300, [299, 17, 128])])
def test_attention_step_without_norm(heads, kv, d, s, pos, interpret):
    """sumsq=None: one plain bf16 projection (the decode path past the fused step's rows)."""
    m = len(pos)
    qkv = _rand(0, (m, (heads + 2 * kv) * d), jnp.bfloat16)
    kc, vc = _rand(1, (m, s, kv, d), jnp.bfloat16), _rand(2, (m, s, kv, d), jnp.bfloat16)
    pos = jnp.array(pos, jnp.int32)
    want = attention_step_reference(qkv.astype(jnp.float32), kc, vc, pos, num_heads=heads)
    got = attention_step(
        qkv[None], None, kc.copy(), vc.copy(), pos, num_heads=heads, model_dim=1, eps=0.0, interpret=interpret
    )
    _close(got[0], want[0], 1e-2)
    for g, w in zip(got[1:], want[1:]):  # the new slots hold exactly the projected values
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


# ------------------------------------------ in the model: the correctness check of benchmarks/fused_check.py


@partial(jax.jit, static_argnames=("graphdef", "opts"))
def _one_step(graphdef, weights, cache, position, dec_cache, x_dec, opts):
    """One backbone step (a frame of 7s) after the prompt and one depth-decoder step at slot 5:
    the hidden states and the cache slots each wrote."""
    model = nnx.merge(graphdef, weights)
    tokens, mask = frame_rows(jnp.full((1, model.cfg.audio_num_codebooks), 7, jnp.int32))
    h, cache = model.run_backbone(tokens, mask, position, cache, opts=opts)
    hd, dec_cache = model.run_decoder(x_dec, jnp.array([5], jnp.int32), dec_cache, opts=opts)
    p = position[0]
    return dict(
        backbone_hidden=h,
        backbone_new_keys=jnp.stack([k[0, p] for k in cache.k]),
        depth_hidden=hd,
        depth_new_kv=jnp.stack([c[0, 5] for c in dec_cache.k + dec_cache.v]),
    )


@pytest.mark.gpu
@pytest.mark.gpu_only(
    reason="interpreted, the two steps take ~15 s of compiling; on CPU test_decode_paths.py checks the fused "
    "step against XLA in float32 at the tiny model's size"
)
def test_fused_step_matches_unfused_kernels_in_csm(random_csm, check_preset, kernel_options):
    """bf16, batch 1, same weights and caches: the fused step's hidden states and new cache slots
    within 3e-2 (relative L2) of the unfused Pallas path's. Full-size CSM-1B, as benchmarks/fused_check.py."""
    model = random_csm(check_preset, dtype="bfloat16")
    state = prompt_state(model, 1, 100, min(512, model.cfg.backbone.max_seq_len), kernel_options)
    zeros = model.decoder_cache(1)
    dec_cache = KVCache(
        k=[_rand(10 + i, c.shape, c.dtype) for i, c in enumerate(zeros.k)],
        v=[_rand(20 + i, c.shape, c.dtype) for i, c in enumerate(zeros.v)],
    )
    x_dec = _rand(1, (1, 1, model.cfg.backbone.embed_dim), model.dtype)
    graphdef, weights = split_model(model)
    args = (graphdef, weights, state.cache, state.position, dec_cache, x_dec)
    fused = _one_step(*args, kernel_options)
    unfused = _one_step(*args, kernel_options.replace(fused_step=False))
    assert kernel_options.uses_fused_step(1)
    for name in fused:
        _close(fused[name], unfused[name], 3e-2)
    # The SwiGLU in the gate/up kernel's epilogue: the same step
    epilogue = _one_step(*args, kernel_options.replace(swiglu_epilogue=True))
    for name in fused:
        _close(epilogue[name], unfused[name], 3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,f,block_n", [(1, 256, 128, None), (3, 200, 96, 16), (2, 128, 40, 16)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_norm_matvec_swiglu_epilogue(m, k, f, block_n, dtype, tol, interpret):
    """swiglu=True: the finished norm, then silu(gate) * up, in the kernel (ragged F included),
    equal to the plain kernel's output finished and passed through `jaxtts.llama.swiglu`; also
    for int8 weights stored [N, K]."""
    from jaxtts.llama import swiglu
    from jaxtts.quantize import quantize_array

    x, scale = _rand(0, (m, k), dtype), _rand(2, (k,), dtype)
    w = _rand(3, (k, 2 * f), dtype, k**-0.5)
    want = swiglu(finish(*norm_matvec(x, scale, w, interpret=interpret), k, 1e-5).astype(dtype))
    got = norm_matvec(x, scale, w, swiglu=True, eps=1e-5, block_n=block_n, interpret=interpret)
    assert got.shape == (m, f) and got.dtype == dtype
    _close(got, want, tol)
    q, s = quantize_array(w.astype(jnp.float32))
    kw = dict(w_scale=s, w_transposed=True, interpret=interpret)
    want = swiglu(finish(*norm_matvec(x, scale, q, **kw), k, 1e-5).astype(dtype))
    _close(norm_matvec(x, scale, q, swiglu=True, eps=1e-5, block_n=block_n, **kw), want, tol)
    with pytest.raises(ValueError, match="swiglu takes eps"):
        norm_matvec(x, scale, w, swiglu=True, interpret=interpret)


@pytest.mark.parametrize("m", [1, 8, 64])
def test_lowers_to_triton_at_csm_shapes(m):
    """The Triton lowering runs at trace time, so CPU catches its shape and op restrictions."""
    sds = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    for d_model, heads, kv, hd, ffn, seq in [(2048, 32, 8, 64, 8192, 2048), (1024, 8, 2, 128, 8192, 32)]:
        qkv_n = (heads + 2 * kv) * hd
        x, scale = sds((m, d_model), bf), sds((d_model,), bf)
        rope = (sds((m, hd // 2), jnp.float32), sds((m, hd // 2), jnp.float32))
        fn = jax.jit(lambda x, s, w, r: norm_matvec(x, s, w, rope=r, head_dim=hd, rope_heads=heads + kv))
        assert (
            "triton"
            in fn.trace(x, scale, sds((d_model, qkv_n), bf), rope).lower(lowering_platforms=("cuda",)).as_text()
        )
        fn = jax.jit(lambda x, s, w: norm_matvec(x, s, w))
        assert "triton" in fn.trace(x, scale, sds((d_model, 2 * ffn), bf)).lower(lowering_platforms=("cuda",)).as_text()
        fn = jax.jit(lambda x, s, w, i: norm_matvec(x, s, w, w_index=i))
        assert (
            "triton"
            in fn.trace(x, scale, sds((31, d_model, 2051), bf), sds((1,), jnp.int32))
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
        cache = sds((m, seq, kv, hd), bf)
        fn = jax.jit(
            lambda q, ss, k, v, p: attention_step(q, ss, k, v, p, num_heads=heads, model_dim=d_model, eps=1e-5)
        )
        assert (
            "triton"
            in fn.trace(sds((8, m, qkv_n), jnp.float32), sds((8, m), jnp.float32), cache, cache, sds((m,), jnp.int32))
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
        fn = jax.jit(lambda q, k, v, p: attention_step(q, None, k, v, p, num_heads=heads, model_dim=d_model, eps=0.0))
        assert (
            "triton"
            in fn.trace(sds((1, m, qkv_n), bf), cache, cache, sds((m,), jnp.int32))
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
        fn = jax.jit(lambda o, w: matvec(o, w, partials=True, k_splits=4))
        assert (
            "triton"
            in fn.trace(sds((m, ffn), bf), sds((ffn, d_model), bf)).lower(lowering_platforms=("cuda",)).as_text()
        )
