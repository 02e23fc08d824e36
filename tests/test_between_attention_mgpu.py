"""pallas_kernels.between_attention_mgpu (a block's step from one attention to the next as one
persistent Mosaic GPU kernel).

On CPU: the kernel with one program in Pallas' Mosaic GPU interpreter (every unit of every phase
in one program: the weight ring's order across the phases is exercised) against the jnp
reference, and the 128-program kernel lowered for CUDA at CSM-1B's shapes. With
JAXTTS_TEST_DEVICE=gpu the gpu-marked tests run the compiled kernel at the depth decoder's shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtts.config import LlamaConfig
from jaxtts.llama import KVCache, Llama, between_attention_args
from jaxtts.options import DecodeOptions
from pallas_kernels.between_attention_mgpu import (
    SMEM_LIMIT,
    SpanConfig,
    _Dims,
    between_attention_mgpu,
    between_attention_reference,
    config_for,
    smem_bytes,
    tile_weights,
)

BF = jnp.bfloat16


def _operands(m, hd, d, f, nq, seed=0):
    ks = jax.random.split(jax.random.key(seed), 8)
    normal = lambda k, shape, fan_in: (jax.random.normal(k, shape) * fan_in**-0.5).astype(BF)  # noqa: E731
    return (
        jax.random.normal(ks[0], (m, hd), BF),
        jax.random.normal(ks[1], (m, d), jnp.float32),
        normal(ks[2], (hd, d), hd),
        (1 + 0.1 * jax.random.normal(ks[3], (d,))).astype(BF),
        normal(ks[4], (d, 2 * f), d),
        normal(ks[5], (f, d), f),
        (1 + 0.1 * jax.random.normal(ks[6], (d,))).astype(BF) if nq else None,
        normal(ks[7], (d, nq), d) if nq else None,
    )


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize(
    "m,nq,cfg,tiled",
    [
        (1, 384, SpanConfig(blocks=1, stages=3, block_k=128, down_splits=2), False),
        # a ring deeper than P1's and P4's tiles: it holds tiles of the next phases at each barrier
        (3, 384, SpanConfig(blocks=1, stages=8, block_k=64, down_splits=4), False),
        (8, 0, SpanConfig(blocks=1, stages=2, block_k=128, down_splits=1), False),  # the last block: no qkv
        (2, 384, SpanConfig(blocks=1, stages=5, block_k=64, down_splits=2, overlap=True), False),
        (1, 384, SpanConfig(blocks=1, stages=4, block_k=128, down_splits=2, overlap=True), True),
        # out projection and qkv split over K too: partials, a sum phase, qkv summed here
        (1, 384, SpanConfig(blocks=1, stages=6, block_k=64, down_splits=2, out_splits=4, qkv_splits=2), False),
        (5, 384, SpanConfig(blocks=1, stages=3, block_k=64, down_splits=1, out_splits=2, qkv_splits=4), True),
        (2, 0, SpanConfig(blocks=1, stages=4, block_k=128, down_splits=2, out_splits=2), False),
        # P1's 8 tiles issued first, the ring's other 4 slots once they are in
        (2, 384, SpanConfig(blocks=1, stages=12, block_k=64, down_splits=2, out_splits=2, critical_first=True), False),
    ],
)
def test_interpreted_matches_reference(m, nq, cfg, tiled):
    args = _operands(m, 128, 256, 512, nq) if cfg.critical_first else _operands(m, 256, 256, 512, nq)
    o, h, w_out, s_mlp, w_gu, w_down, s_attn, w_qkv = args
    if tiled:  # each unit's columns contiguous: the same products
        w_out, w_gu, w_down, w_qkv = tile_weights(w_out, w_gu, w_down, w_qkv)
    h_out, qkv = between_attention_mgpu(
        o, h, w_out, s_mlp, w_gu, w_down, s_attn, w_qkv, eps=1e-5, config=cfg, interpret=True
    )
    want_h, want_q = between_attention_reference(*args, eps=1e-5)
    assert h_out.shape == (m, 256) and h_out.dtype == jnp.float32
    # Same operands, float32 accumulation; only the summation order differs.
    assert _rel(h_out, want_h) < 1e-5
    if nq:
        assert qkv.shape == (m, nq) and _rel(qkv, want_q) < 1e-5
    else:
        assert qkv is None and want_q is None


def test_qkv_parts_sum_to_qkv():
    """qkv_parts=True: qkv's K splits unsummed, [qkv_splits, M, Nq], for attention_step to add."""
    args = _operands(2, 256, 256, 512, 384)
    cfg = SpanConfig(blocks=1, stages=4, block_k=64, down_splits=2, out_splits=2, qkv_splits=4)
    _, parts = between_attention_mgpu(*args, eps=1e-5, config=cfg, interpret=True, qkv_parts=True)
    _, want_q = between_attention_reference(*args, eps=1e-5)
    assert parts.shape == (4, 2, 384) and _rel(parts.sum(0), want_q) < 1e-5
    assert _rel(parts[0], want_q) > 0.1  # each part is a split, not the whole


def test_reference_is_the_block_math():
    """The reference against the plain formulas: residual, RMSNorm, SwiGLU, residual, RMSNorm."""
    o, h, w_out, s_mlp, w_gu, w_down, s_attn, w_qkv = _operands(2, 128, 128, 256, 192)
    f32 = jnp.float32

    def rms(x, s):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * s.astype(f32)

    h2 = h + o.astype(f32) @ w_out.astype(f32)
    gate, up = jnp.split(rms(h2, s_mlp) @ w_gu.astype(f32), 2, -1)
    h3 = h2 + (jax.nn.silu(gate) * up) @ w_down.astype(f32)
    qkv = rms(h3, s_attn) @ w_qkv.astype(f32)
    got_h, got_q = between_attention_reference(o, h, w_out, s_mlp, w_gu, w_down, s_attn, w_qkv, eps=1e-5)
    assert _rel(got_h, h3) < 1e-2 and _rel(got_q, qkv) < 2e-2  # bf16 GEMV operands


@pytest.mark.parametrize(
    "name,shape,rows,spread",
    [
        ("depth decoder", (1024, 1024, 8192, 1536), 1, False),
        ("depth decoder, last block", (1024, 1024, 8192, 0), 1, False),
        ("backbone", (2048, 2048, 8192, 3072), 8, False),
        ("depth decoder, spread", (1024, 1024, 8192, 1536), 1, True),
        ("backbone, spread", (2048, 2048, 8192, 3072), 1, True),
        ("depth decoder, spread, P1's tiles first", (1024, 1024, 8192, 1536), 1, "critical_first"),
    ],
)
def test_lowers_for_cuda_at_csm_shapes(name, shape, rows, spread):
    """128 programs, grid barriers, TMA reduce-add and register A operands, lowered on the CPU."""
    cfg = config_for(*shape, spread=bool(spread))
    cfg = cfg._replace(critical_first=spread == "critical_first")
    dims = _Dims(*shape, cfg.down_splits, cfg.out_splits, cfg.qkv_splits)
    assert cfg is not None and cfg.blocks == 128 and smem_bytes(dims, cfg) <= SMEM_LIMIT
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) if a is not None else None for a in _operands(rows, *shape)]
    fn = jax.jit(lambda *a: between_attention_mgpu(*a, eps=1e-5, config=cfg))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "between_attention_mgpu" in text


def test_tile_weights_makes_each_units_columns_contiguous():
    w = jnp.arange(256 * 192, dtype=jnp.float32).reshape(256, 192).astype(BF)
    (t,) = tile_weights(w)
    assert t.shape == (3, 256, 64)
    np.testing.assert_array_equal(t[1], w[:, 64:128])
    assert tile_weights(None) == (None,)


def test_config_for():
    cfg = config_for(1024, 1024, 8192, 1536)
    assert cfg.down_splits == 8 and cfg.stages == 8  # 16 column tiles x 8 splits = 128 down units
    back = config_for(2048, 2048, 8192, 3072)
    assert back.down_splits == 4 and back.stages == 8  # 32 column tiles x 4 splits
    assert config_for(1024, 1024, 8192, 1536, blocks=64).down_splits == 4
    assert config_for(1024, 1000, 8192) is None
    assert (cfg.out_splits, cfg.qkv_splits) == (1, 1)
    # spread: 16 out columns x 8 splits, 24 qkv columns x 4 splits (of 256 rows: 2 tiles)
    spread = config_for(1024, 1024, 8192, 1536, spread=True)
    assert (spread.out_splits, spread.qkv_splits, spread.down_splits) == (8, 4, 8)
    back = config_for(2048, 2048, 8192, 3072, spread=True)
    assert (back.out_splits, back.qkv_splits) == (4, 2) and back.stages >= 6


def test_bad_operands_are_refused():
    args = list(_operands(1, 256, 256, 512, 384))
    one = SpanConfig(blocks=1, stages=2, block_k=128, down_splits=2)
    with pytest.raises(ValueError, match="1..8 rows"):
        between_attention_mgpu(jnp.zeros((9, 256), BF), jnp.zeros((9, 256)), *args[2:], eps=1e-5, interpret=True)
    bad = list(args)
    bad[4] = bad[4].astype(jnp.float32)
    with pytest.raises(ValueError, match="W_gate_up must be bfloat16"):
        between_attention_mgpu(*bad, eps=1e-5, config=one, interpret=True)
    with pytest.raises(ValueError, match="do not chain"):
        between_attention_mgpu(*args[:5], args[5][:128], *args[6:], eps=1e-5, config=one, interpret=True)
    with pytest.raises(ValueError, match="multiples of block_k"):  # 256-wide rows in 192-row tiles
        between_attention_mgpu(*args, eps=1e-5, config=one._replace(block_k=192), interpret=True)
    with pytest.raises(ValueError, match="blocks=1"):
        between_attention_mgpu(*args, eps=1e-5, config=one._replace(blocks=4), interpret=True)
    with pytest.raises(ValueError, match="attn_scale"):
        between_attention_mgpu(*args[:6], None, args[7], eps=1e-5, config=one, interpret=True)


@pytest.mark.gpu
@pytest.mark.gpu_only(reason="full-size operands: the 128-program kernel needs the GPU")
@pytest.mark.parametrize("m,spread", [(1, False), (8, False), (1, True), (8, True)])
def test_compiled_matches_reference(m, spread):
    args = _operands(m, 1024, 1024, 8192, 1536)
    h_out, qkv = between_attention_mgpu(*args, eps=1e-5, config=config_for(1024, 1024, 8192, 1536, spread=spread))
    want_h, want_q = between_attention_reference(*args, eps=1e-5)
    assert np.isfinite(np.asarray(h_out)).all() and np.isfinite(np.asarray(qkv)).all()
    assert _rel(h_out, want_h) < 1e-3 and _rel(qkv, want_q) < 1e-2


def test_fused_step_with_the_span_kernel_matches_without():
    """A three-layer bfloat16 Llama step (interpreted kernels): the span kernel's path (two
    kernels a block, the residual stream float32 inside) gives the eight-kernel path's hidden state
    and caches to bf16 rounding; the last block's span has no qkv."""
    cfg = LlamaConfig(num_layers=3, num_heads=2, num_kv_heads=1, embed_dim=256, intermediate_dim=256, max_seq_len=32)
    model = Llama(cfg, dtype=BF, rngs=nnx.Rngs(0))
    cache = KVCache.zeros(cfg, 2, 32, BF)
    x = jax.random.normal(jax.random.key(1), (2, 1, 256), BF)
    start = jnp.array([0, 5], jnp.int32)
    opts = DecodeOptions(attention="pallas_interpret")
    layers = model.layers
    assert between_attention_args(layers[0], layers[1], 2, opts) is None  # off unless asked for
    on = opts.replace(between_attention=True)
    weights, config = between_attention_args(layers[0], layers[1], 2, on)
    assert config.blocks == 1 and weights[5].shape == (256, 512)
    assert between_attention_args(layers[2], None, 2, on)[0][4:] == (None, None)
    assert between_attention_args(layers[0], layers[1], 9, on) is None  # more rows than the kernel takes
    want, want_cache = model.fused_step(x, start, cache, opts)
    got, got_cache = model.fused_step(x, start, cache, on)
    assert got.dtype == want.dtype
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.linalg.norm(g - w) / np.linalg.norm(w) < 2e-2
    for a, b in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)
    # span_spread: the out projection and qkv over K splits too; the same step to float32 rounding
    spread = on.replace(span_spread=True)
    config = between_attention_args(layers[0], layers[1], 2, spread)[1]
    assert config.out_splits > 1 and config.qkv_splits > 1
    alt, alt_cache = model.fused_step(x, start, cache, spread)
    assert _rel(alt, got) < 1e-2
    for a, b in zip(alt_cache.k + alt_cache.v, got_cache.k + got_cache.v):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)


def test_the_option_needs_a_mosaic_device():
    w = [jnp.zeros((256, 256), BF)]
    on = DecodeOptions(attention="pallas", between_attention=True)
    assert not on.uses_between_attention(1, w)  # compiled, on a device without Mosaic GPU
    assert on.replace(mosaic=True).uses_between_attention(1, w)
    assert not on.replace(mosaic=True).uses_between_attention(1, [w[0].astype(jnp.float32)])
