"""pallas_kernels.block_tail_mgpu (a block's out → gate/up → down as one Mosaic GPU kernel).

On CPU: the three phases (as three kernels) in Pallas' Mosaic GPU interpreter against the jnp
reference and inside `Llama.fused_step`, and the fused one-launch kernel lowered for CUDA at
CSM-1B's shapes (lowering is where Mosaic GPU's layout and shape rules bite; only the final
compile needs a GPU). With JAXTTS_TEST_DEVICE=gpu the gpu-marked tests run the fused kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtts.config import LlamaConfig
from jaxtts.llama import KVCache, Llama, block_tail_config
from jaxtts.options import DecodeOptions
from pallas_kernels.block_tail_mgpu import TailConfig, block_tail_mgpu, block_tail_reference, config_for, tile_weights

BF = jnp.bfloat16


def _operands(m, hd, d, f, h_dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    return (
        jax.random.normal(ks[0], (m, hd), BF),
        jax.random.normal(ks[1], (m, d), h_dtype),
        (jax.random.normal(ks[2], (hd, d)) * hd**-0.5).astype(BF),
        (1 + 0.1 * jax.random.normal(ks[3], (d,))).astype(BF),
        (jax.random.normal(ks[4], (d, 2 * f)) * d**-0.5).astype(BF),
        (jax.random.normal(ks[5], (f, d)) * f**-0.5).astype(BF),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("m,h_dtype,tiled", [(1, BF, False), (3, jnp.float32, False), (8, BF, False), (1, BF, True)])
def test_matches_reference(on_gpu, m, h_dtype, tiled):
    """h2 within one rounding of h's dtype, the summed down partials within 1e-2 relative (bf16
    activations; the norm factor applied after the matmul). On CPU: three kernels, interpreted;
    on a GPU: the fused kernel at the depth decoder's shapes."""
    if on_gpu:
        hd, d, f, cfg, kw = 1024, 1024, 8192, config_for(1024, 8192), dict(fused=True)
    else:
        hd, d, f, kw = 256, 256, 256, dict(fused=False, interpret=True)
        cfg = config_for(d, f, fused=False)
    args = _operands(m, hd, d, f, h_dtype)
    weights = (args[2], *args[4:])
    if tiled:  # each program's weight slab contiguous: the same products
        w_out, w_gate_up, w_down = tile_weights(*weights)
        h2, parts = block_tail_mgpu(*args[:2], w_out, args[3], w_gate_up, w_down, eps=1e-5, config=cfg, **kw)
    else:
        h2, parts = block_tail_mgpu(*args, eps=1e-5, config=cfg, **kw)
    want_h2, want_down = block_tail_reference(*args, eps=1e-5)
    assert h2.dtype == h_dtype and parts.shape == (cfg.down_splits, m, d)
    np.testing.assert_allclose(np.asarray(h2, np.float32), np.asarray(want_h2, np.float32), rtol=1e-2, atol=1e-2)
    down = np.asarray(parts.sum(0))
    assert np.isfinite(down).all()
    err = np.linalg.norm(down - np.asarray(want_down)) / np.linalg.norm(np.asarray(want_down))
    assert err < 1e-2, err


@pytest.mark.parametrize(
    "name,hd,d,f,rows",
    [("depth decoder", 1024, 1024, 8192, 1), ("backbone", 2048, 2048, 8192, 8)],
)
def test_fused_kernel_lowers_for_cuda_at_csm_shapes(name, hd, d, f, rows):
    """One launch of 128 programs with grid barriers, lowered to Mosaic GPU on the CPU."""
    cfg = config_for(d, f)
    assert cfg is not None and cfg.blocks == 128
    shapes = [(rows, hd), (rows, d), (hd, d), (d,), (d, 2 * f), (f, d)]
    args = [jax.ShapeDtypeStruct(s, BF) for s in shapes]
    fn = jax.jit(lambda *a: block_tail_mgpu(*a, eps=1e-5, config=cfg, fused=True))
    assert "block_tail_mgpu" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    tiled = jax.jit(
        lambda o, h, wo, s, wgu, wd: block_tail_mgpu(
            o, h, *tile_weights(wo, wgu, wd)[:1], s, *tile_weights(wo, wgu, wd)[1:], eps=1e-5, config=cfg
        )
    )
    assert "block_tail_mgpu" in tiled.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_overlapped_ring_matches_and_lowers():
    """TailConfig(overlap=True): a slot is refilled while the next step's products run."""
    args = _operands(3, 256, 256, 512, BF)
    cfg = config_for(256, 512, fused=False)._replace(overlap=True, stages=2, block_k=64, out_block_k=64)
    h2, parts = block_tail_mgpu(*args, eps=1e-5, config=cfg, fused=False, interpret=True)
    want_h2, want = block_tail_reference(*args, eps=1e-5)
    np.testing.assert_array_equal(np.asarray(h2, np.float32), np.asarray(want_h2, np.float32))
    down = np.asarray(parts.sum(0))
    assert np.linalg.norm(down - np.asarray(want)) / np.linalg.norm(np.asarray(want)) < 1e-2
    shapes = [(1, 1024), (1, 1024), (1024, 1024), (1024,), (1024, 16384), (8192, 1024)]
    fn = jax.jit(lambda *a: block_tail_mgpu(*a, eps=1e-5, config=config_for(1024, 8192)._replace(overlap=True)))
    assert (
        "block_tail_mgpu"
        in fn.trace(*[jax.ShapeDtypeStruct(s, BF) for s in shapes]).lower(lowering_platforms=("cuda",)).as_text()
    )


def test_tile_weights_makes_each_programs_slab_contiguous():
    _, _, w_out, _, w_gate_up, w_down = _operands(1, 256, 256, 512, BF)
    t_out, t_gu, t_down = tile_weights(w_out, w_gate_up, w_down)
    assert t_out.shape == (4, 256, 64) and t_gu.shape == (8, 256, 128) and t_down.shape == (2, 512, 128)
    np.testing.assert_array_equal(t_out[1], w_out[:, 64:128])
    np.testing.assert_array_equal(
        t_gu[3], jnp.concatenate([w_gate_up[:, 192:256], w_gate_up[:, 512 + 192 : 512 + 256]], 1)
    )
    np.testing.assert_array_equal(t_down[1], w_down[:, 128:256])


def test_config_for_refuses_widths_that_do_not_divide():
    assert config_for(1024, 8192) == TailConfig(blocks=128, down_splits=16)
    assert config_for(2048, 8192).down_splits == 8
    assert config_for(96, 8192) is None  # d not a multiple of 128
    assert config_for(1024, 8200) is None


def test_bad_operands_are_refused():
    args = list(_operands(1, 256, 256, 256, BF))
    with pytest.raises(ValueError, match="1..8 rows"):
        block_tail_mgpu(jnp.zeros((9, 256), BF), jnp.zeros((9, 256), BF), *args[2:], eps=1e-5, fused=False)
    args[4] = args[4].astype(jnp.float32)
    with pytest.raises(ValueError, match="W_gate_up must be bfloat16"):
        block_tail_mgpu(*args, eps=1e-5, fused=False)
    with pytest.raises(ValueError, match="needs a GPU"):
        block_tail_mgpu(*_operands(1, 256, 256, 256, BF), eps=1e-5, fused=True, interpret=True)


def test_fused_step_with_the_block_tail_matches_without():
    """A two-layer bfloat16 Llama step (interpreted kernels): the block-tail path gives the
    five-kernel path's hidden state and caches to bf16 rounding."""
    cfg = LlamaConfig(num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=256, intermediate_dim=256, max_seq_len=32)
    model = Llama(cfg, dtype=BF, rngs=nnx.Rngs(0))
    cache = KVCache.zeros(cfg, 2, 32, BF)
    x = jax.random.normal(jax.random.key(1), (2, 1, 256), BF)
    start = jnp.array([0, 5], jnp.int32)
    opts = DecodeOptions(attention="pallas_interpret")
    layer = model.layers[0]
    tail = (layer.attn.out[...], layer.mlp.gate_up[...], layer.mlp.down[...])
    assert block_tail_config(2, tail, opts) is None
    assert block_tail_config(2, tail, opts.replace(block_tail=True)) == config_for(256, 256, fused=False)
    want, want_cache = model.fused_step(x, start, cache, opts)
    got, got_cache = model.fused_step(x, start, cache, opts.replace(block_tail=True))
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.linalg.norm(g - w) / np.linalg.norm(w) < 2e-2
    for a, b in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)
