"""Llama-3 blocks in Flax NNX: RMSNorm, grouped-query attention over an explicit KV cache,
SwiGLU MLP and Llama-3-scaled rotary embeddings.

Weights are stored [in, out] (int8 weights [out, in]: `jaxtts.quantize.QuantizedWeight`). q/k/v
are one fused matrix and gate/up another, so that a decode step at batch 1 issues one matmul for
each instead of three and two (latency, not bandwidth, is what a small matmul costs on a GPU). RoPE rotates *halves* of each head (the Hugging Face layout);
the converter permutes q/k rows of torchtune checkpoints, which rotate interleaved pairs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtts.attention import attention
from jaxtts.config import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_OLD_CONTEXT_LEN, LlamaConfig
from jaxtts.options import DecodeOptions
from jaxtts.quantize import SCALE_SUFFIX, QuantizedWeight, weight


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """Llama-3 scaled inverse frequencies, computed in float32 exactly as torchtune does."""
    dim = cfg.head_dim
    freqs = 1.0 / (np.float32(cfg.rope_base) ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / np.float32(dim)))
    low_wavelen = ROPE_OLD_CONTEXT_LEN / ROPE_LOW_FREQ_FACTOR
    high_wavelen = ROPE_OLD_CONTEXT_LEN / ROPE_HIGH_FREQ_FACTOR
    out = []
    for f in freqs.astype(np.float32):
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / cfg.scale_factor)
        else:
            smooth = (ROPE_OLD_CONTEXT_LEN / wavelen - ROPE_LOW_FREQ_FACTOR) / (
                ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR
            )
            out.append((1 - smooth) * f / cfg.scale_factor + smooth * f)
    return np.asarray(out, dtype=np.float32)


def rope_table(cfg: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_seq_len, head_dim/2] (float32)."""
    theta = np.arange(cfg.max_seq_len, dtype=np.float32)[:, None] * rope_frequencies(cfg)[None, :]
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


def apply_rope(x, cos, sin):
    """x [B, T, H, D]; cos/sin [B, T, D/2]. Rotates the two halves of each head."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def rope_heads_flat(x, cos, sin, rope_heads: int, head_dim: int):
    """`apply_rope` on the first `rope_heads` heads of x [B, heads * D] (cos/sin [B, D/2]), the
    other heads passed through: one elementwise pass, where slicing q and k out, rotating them
    and concatenating q, k, v back costs a copy kernel per decode step."""
    b = x.shape[0]
    xf = x.astype(jnp.float32).reshape(b, -1, 2, head_dim // 2)
    sign = jnp.array([-1.0, 1.0], jnp.float32)[:, None]  # lo' = lo c - hi s, hi' = hi c + lo s
    rot = xf * cos[:, None, None, :] + xf[:, :, ::-1] * (sign * sin[:, None, None, :])
    is_rope = (jnp.arange(xf.shape[1]) < rope_heads)[None, :, None, None]
    return jnp.where(is_rope, rot, xf).astype(x.dtype).reshape(b, -1)


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """Per-layer key/value caches, each [B, S, Hkv, D]. Slot p holds position p of that row."""

    k: list
    v: list

    @classmethod
    def zeros(cls, cfg: LlamaConfig, batch: int, length: int, dtype) -> KVCache:
        return _zero_cache(cfg, int(batch), int(length), jnp.dtype(dtype))

    def resized(self, length: int) -> KVCache:
        """This cache with `length` positions (zeros added, or the last ones cut), always in new
        buffers: a prepared context's cache is reused and must never be donated."""
        return _resize_cache(self, int(length))

    @staticmethod
    def concat(rows: list[KVCache]) -> KVCache:
        """Caches stacked on the batch axis (one program)."""
        return _concat_caches(rows)


@functools.partial(jax.jit, static_argnums=1)
def _resize_cache(cache: KVCache, length: int) -> KVCache:
    def resize(a):
        if length > a.shape[1]:
            return jnp.pad(a, ((0, 0), (0, length - a.shape[1]), (0, 0), (0, 0)))
        return jnp.copy(a[:, :length])  # a copy even when nothing changes: jit would hand back `a`

    return jax.tree.map(resize, cache)


@jax.jit
def _concat_caches(rows: list[KVCache]) -> KVCache:
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *rows)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _zero_cache(cfg: LlamaConfig, batch: int, length: int, dtype) -> KVCache:
    # One program for all 2 x layers buffers (eagerly, each jnp.zeros is its own dispatch).
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(
        k=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        v=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
    )


XLA = DecodeOptions()  # plain XLA: what a call without options compiles


def dense(x, w, opts: DecodeOptions = XLA):
    """x [..., K] @ w [K, N], float32 accumulation, result in x's dtype: through the Pallas GEMV
    kernel where `opts` sends this shape there (skinny decode-step matmuls), else XLA's dot.
    w may be a `QuantizedWeight` (int8 + column scales): the kernel dequantizes in registers and
    scales in its epilogue; XLA's dot takes the int8 weight converted to x's dtype (`dot_f32`)."""
    rows = math.prod(x.shape[:-1])
    quantized = isinstance(w, QuantizedWeight)
    if opts.uses_matvec(rows, *w.shape, quantized=quantized):
        return gemv(x, w, opts)
    return dot_f32(x, w).astype(x.dtype)


def dot_f32(x, w):
    """x @ w accumulated and returned in float32; for a `QuantizedWeight`,
    (x @ q.astype(x.dtype)) * scale: the column scale applied after the sum over K (exact up to
    rounding), so the int8 → x.dtype convert is the only thing in front of the dot."""
    if isinstance(w, QuantizedWeight):  # q [N, K]: contract x's last axis with q's last
        dims = (((x.ndim - 1,), (1,)), ((), ()))
        y = jax.lax.dot_general(x, w.q.astype(x.dtype), dims, preferred_element_type=jnp.float32)
        return y * w.scale.astype(jnp.float32)
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def gemv(x, w, opts: DecodeOptions, *, partials: bool = False):
    """`pallas_kernels.matvec` of x [..., K] (≤ 64 rows) and w (an array or a `QuantizedWeight`)
    with this device's tuned config for the shape."""
    from pallas_kernels import matvec

    rows = math.prod(x.shape[:-1])
    q, scale, transposed = _kernel_weight(w)
    return matvec(
        x,
        q,
        w_scale=scale,
        partials=partials,
        config=matvec_config(opts, rows, w),
        int8_convert=opts.int8_convert,
        w_transposed=transposed,
        interpret=opts.interpret,
    )


def _kernel_weight(w):
    """(array, column scales or None, whether the array is [N, K]) of an array or a
    `QuantizedWeight`, as the Pallas GEMV kernels take them: int8 weights are stored [N, K]."""
    if isinstance(w, QuantizedWeight):
        return w.q, w.scale, True
    return w, None, False


def fused_step_applies(x, lengths, opts: DecodeOptions, quantized: bool = False) -> bool:
    """Whether a call on x [B, T, D] takes `Llama.fused_step`: one new position per row, default
    lengths, and `opts` sending that many rows (of a model with int8 weights or not) to the fused
    kernels."""
    b, t = x.shape[:2]
    return t == 1 and lengths is None and opts.uses_fused_step(b, quantized=quantized)


def matvec_config(opts: DecodeOptions, rows: int, w):
    """The measured GEMV config of this device for x [rows, K] @ w (an array or a
    `QuantizedWeight`: its [K, N] shape) (None: the kernel's default)."""
    tuned = opts.tuned_matvec(rows, *w.shape[-2:])
    if tuned is None:
        return None
    from pallas_kernels.matvec import MatvecConfig

    return MatvecConfig(*tuned)


def swiglu(gate_up):
    """silu(gate) * up of a fused [..., 2F] gate/up projection."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


def _write_rows(cache, new, start):
    """cache [B,S,H,D] ← new [B,T,H,D] at per-row offsets start [B]."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0)))(cache, new, start)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def _init(rngs, shape, dtype, scale=None):
    """Random weights; matrices [.., in, out] default to std 1/sqrt(in) so activations and logits
    keep unit scale (random models then make peaked, input-dependent predictions, as trained ones do)."""
    std = scale if scale is not None else shape[-2] ** -0.5
    # Drawn in the target dtype: a float32 draw of the 128k×2048 text table alone would be 1 GB.
    return nnx.Param(jnp.asarray(std, dtype) * jax.random.normal(rngs.params(), shape, dtype))


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        d, h, hkv, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, hd
        self.qkv = _init(rngs, (d, (h + 2 * hkv) * hd), dtype)
        self.out = _init(rngs, (h * hd, d), dtype)

    def __call__(self, x, cos, sin, k_cache, v_cache, start, lengths, opts: DecodeOptions, step: bool = False):
        """step: one new position per row (lengths = start + 1) through the attention_step kernel,
        which writes the new key/value into the caches and attends in one launch."""
        b, t, _ = x.shape
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        with jax.named_scope("qkv"):
            qkv = dense(x, weight(self, "qkv"), opts)
        if step:
            from pallas_kernels.fused_decode import attention_step

            rotated = rope_heads_flat(qkv[:, 0], cos[:, 0], sin[:, 0], h + hkv, hd)
            o, k_cache, v_cache = attention_step(
                rotated[None],
                None,
                k_cache,
                v_cache,
                start,
                num_heads=h,
                model_dim=x.shape[-1],
                eps=0.0,
                interpret=opts.interpret,
            )
            return dense(o[:, None], weight(self, "out"), opts), k_cache, v_cache
        q = qkv[..., : h * hd].reshape(b, t, h, hd)
        k = qkv[..., h * hd : (h + hkv) * hd].reshape(b, t, hkv, hd)
        v = qkv[..., (h + hkv) * hd :].reshape(b, t, hkv, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache = _write_rows(k_cache, k, start)
        v_cache = _write_rows(v_cache, v, start)
        with jax.named_scope("attention"):
            o = attention(q, k_cache, v_cache, start, lengths, impl=opts.attention)
        with jax.named_scope("out"):
            return dense(o.reshape(b, t, h * hd), weight(self, "out"), opts), k_cache, v_cache


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_up = _init(rngs, (cfg.embed_dim, 2 * cfg.intermediate_dim), dtype)
        self.down = _init(rngs, (cfg.intermediate_dim, cfg.embed_dim), dtype)

    def __call__(self, x, opts: DecodeOptions = XLA):
        with jax.named_scope("mlp"):
            return dense(swiglu(dense(x, weight(self, "gate_up"), opts)), weight(self, "down"), opts)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, dtype=dtype)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, k_cache, v_cache, start, lengths, opts: DecodeOptions, step: bool = False):
        a, k_cache, v_cache = self.attn(self.attn_norm(x), cos, sin, k_cache, v_cache, start, lengths, opts, step)
        x = x + a
        return x + self.mlp(self.mlp_norm(x), opts), k_cache, v_cache


class Llama(nnx.Module):
    """A Llama-3 stack without token embedding or output layer (CSM supplies its own)."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layers = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, dtype=dtype)
        cos, sin = rope_table(cfg)
        # Constants, not parameters: kept out of the checkpoint and the optimizer.
        self.rope_cos = nnx.Variable(jnp.asarray(cos))
        self.rope_sin = nnx.Variable(jnp.asarray(sin))

    @property
    def quantized(self) -> bool:
        """Whether the projections hold int8 weights (`jaxtts.quantize`)."""
        return hasattr(self.layers[0].attn, "qkv" + SCALE_SUFFIX)

    def __call__(self, x, start, cache: KVCache, *, lengths=None, opts: DecodeOptions = XLA):
        """x [B,T,D] at positions start[b] + t. Returns (final-normed hidden [B,T,D], new cache).

        `lengths` (valid cache slots per row after this call) defaults to start + T.
        """
        if fused_step_applies(x, lengths, opts, self.quantized):
            return self.fused_step(x, start, cache, opts)
        t = x.shape[1]
        pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        pos = jnp.minimum(pos, self.cfg.max_seq_len - 1)
        cos, sin = self.rope_cos[...][pos], self.rope_sin[...][pos]
        step = opts.pallas and opts.step_attention and t == 1 and lengths is None
        if lengths is None:
            lengths = start + t
        ks, vs = [], []
        for i, (layer, kc, vc) in enumerate(zip(self.layers, cache.k, cache.v)):
            with jax.named_scope(f"layer{i}"):
                x, kc, vc = layer(x, cos, sin, kc, vc, start, lengths, opts, step)
            ks.append(kc)
            vs.append(vc)
        return self.norm(x), KVCache(k=ks, v=vs)

    def fused_step(self, x, start, cache: KVCache, opts: DecodeOptions, *, final_norm: bool = True):
        """`__call__` for one new position per row (x [B,1,D]) through the fused Pallas kernels
        (pallas_kernels/fused_decode.py): the same computation in eight kernels per block, or,
        with `opts.between_attention`, two (the attention, and everything up to the next one).
        With final_norm=False, returns the last residual stream [B, D] before the final norm
        (for a caller that folds the norm into its output projection)."""
        from pallas_kernels.block_tail_mgpu import block_tail_mgpu
        from pallas_kernels.fused_decode import add_residual, apply_rope, attention_step, finish

        cfg = self.cfg
        pos = jnp.minimum(start, cfg.max_seq_len - 1)
        rope = (self.rope_cos[...][pos], self.rope_sin[...][pos])
        rope_heads = cfg.num_heads + cfg.num_kv_heads
        h, parts = x[:, 0], None
        qkv_next = None  # the next block's normed qkv, when the span kernel made it
        ks, vs = [], []
        n_layers = len(self.layers)
        for i, (layer, kc, vc) in enumerate(zip(self.layers, cache.k, cache.v)):
            attn, mlp = layer.attn, layer.mlp
            with jax.named_scope(f"layer{i}"):
                if qkv_next is None:
                    h = add_residual(h, parts)  # the previous block's MLP output
                    qkv, ss = norm_gemv(
                        h,
                        layer.attn_norm.scale[...],
                        weight(attn, "qkv"),
                        opts,
                        rope=rope,
                        head_dim=cfg.head_dim,
                        rope_heads=rope_heads,
                    )
                else:  # normed already; RoPE is not in the span kernel
                    qkv, ss = apply_rope(qkv_next, rope, head_dim=cfg.head_dim, rope_heads=rope_heads)[None], None
                    qkv_next = None
                o, kc, vc = attention_step(
                    qkv,
                    ss,
                    kc,
                    vc,
                    start,
                    num_heads=cfg.num_heads,
                    model_dim=cfg.embed_dim,
                    eps=cfg.norm_eps,
                    interpret=opts.interpret,
                )
                nxt = self.layers[i + 1] if i + 1 < n_layers else None
                span = between_attention_args(layer, nxt, h.shape[0], opts)
                tail = (weight(attn, "out"), weight(mlp, "gate_up"), weight(mlp, "down"))
                tail_config = None if span is not None else block_tail_config(h.shape[0], tail, opts)
                if span is not None:  # out → … → the next qkv in one kernel; h stays float32
                    from pallas_kernels.between_attention_mgpu import between_attention_mgpu

                    weights, config = span
                    h, qkv_next = between_attention_mgpu(
                        o.astype(jnp.bfloat16), h, *weights, eps=cfg.norm_eps, config=config, interpret=opts.interpret
                    )
                    parts = None
                elif tail_config is not None:  # out → gate_up → down in one kernel
                    h, parts = block_tail_mgpu(
                        o.astype(jnp.bfloat16),
                        h,
                        tail[0],
                        layer.mlp_norm.scale[...],
                        *tail[1:],
                        eps=cfg.norm_eps,
                        config=tail_config,
                        fused=not opts.interpret,
                        interpret=opts.interpret,
                    )
                else:
                    h = add_residual(h, gemv(o, tail[0], opts, partials=True))
                    if opts.swiglu_epilogue:  # the norm and SwiGLU in the gate/up kernel
                        act = norm_gemv(h, layer.mlp_norm.scale[...], tail[1], opts, swiglu=True, eps=cfg.norm_eps)
                    else:
                        gate_up = finish(
                            *norm_gemv(h, layer.mlp_norm.scale[...], tail[1], opts),
                            cfg.embed_dim,
                            cfg.norm_eps,
                        ).astype(h.dtype)
                        act = swiglu(gate_up)
                    parts = gemv(act, tail[2], opts, partials=True)
            ks.append(kc)
            vs.append(vc)
        h = add_residual(h, parts).astype(x.dtype)
        return (self.norm(h)[:, None] if final_norm else h), KVCache(k=ks, v=vs)


def between_attention_args(layer, nxt, rows: int, opts: DecodeOptions):
    """((W_out, mlp norm, W_gate_up, W_down, next attn norm, next W_qkv), config) for
    `pallas_kernels.between_attention_mgpu` over the span from `layer`'s attention to `nxt`'s
    (None: the last block, whose span ends at its residual), or None when the options do not ask
    for it or the weights do not fit it."""
    weights = [
        weight(layer.attn, "out"),
        layer.mlp_norm.scale[...],
        weight(layer.mlp, "gate_up"),
        weight(layer.mlp, "down"),
    ]
    weights += [None, None] if nxt is None else [nxt.attn_norm.scale[...], weight(nxt.attn, "qkv")]
    matrices = [weights[i] for i in (0, 2, 3, 5) if weights[i] is not None]
    if not opts.uses_between_attention(rows, matrices):
        return None
    from pallas_kernels.between_attention_mgpu import config_for

    (hd, d), f = weights[0].shape, weights[3].shape[0]
    nq = 0 if nxt is None else weights[5].shape[1]
    config = config_for(hd, d, f, nq, blocks=1 if opts.interpret else 128, spread=opts.span_spread)
    return None if config is None else (tuple(weights), config)


def block_tail_config(rows: int, tail, opts: DecodeOptions):
    """The `pallas_kernels.block_tail_mgpu` config for a fused step's block tail (W_out,
    W_gate_up, W_down), or None when the options do not ask for it or the weights do not fit it."""
    if not opts.uses_block_tail(rows, tail):
        return None
    from pallas_kernels.block_tail_mgpu import config_for

    w_out, _, w_down = tail
    return config_for(w_out.shape[1], w_down.shape[0], fused=not opts.interpret) if w_out.shape[0] % 256 == 0 else None


def norm_gemv(x, norm_scale, w, opts: DecodeOptions, **kwargs):
    """`pallas_kernels.fused_decode.norm_matvec` of x [M, K] and w (an array or a
    `QuantizedWeight`, [K, N] or a stack [L, K, N] with w_index=) with the tuned config."""
    from pallas_kernels.fused_decode import norm_matvec

    q, scale, transposed = _kernel_weight(w)
    return norm_matvec(
        x,
        norm_scale,
        q,
        w_scale=scale,
        config=matvec_config(opts, x.shape[0], w),
        int8_convert=opts.int8_convert,
        w_transposed=transposed,
        interpret=opts.interpret,
        **kwargs,
    )
