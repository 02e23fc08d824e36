"""Mimi as pure functions over a parameter tree (nested dicts; layer indices are int keys).

Activations are channels-last: audio [B, L, 1], latents [B, T, C]. Parameter layout:

  conv      {"w": [K, Cin, Cout], "b": [Cout]}          causal: sees (K-1)·dilation + 1 - stride past steps
  convtr    {"w": [Cin, K, Cout/groups], "b": [Cout]}   causal transposed conv, K a multiple of the stride;
                                                        dense (groups 1) or depthwise (groups = Cin = Cout)
  layer     {"norm1": {"scale", "bias"}, "qkv": [D, 3D], "out": [D, D], "norm2": {...},
             "ff1": [D, F], "ff2": [F, D], "scale1": [D], "scale2": [D]}
            qkv columns are (q|k|v, head, dim); RoPE rotates interleaved pairs (dim 2i, 2i+1), as moshi does
  quantizer {"semantic" | "acoustic": {"in_proj": [D, d], "out_proj": [d, D], "codebooks": [n, bins, d]}}
            codebooks hold the codewords, embedding_sum / max(cluster_usage, eps), computed at conversion

  encoder   {"conv_in", "blocks": {i: {"res": {j: {"conv1", "conv2"}}, "down"}}, "conv_out"}
  decoder   {"conv_in", "blocks": {i: {"up", "res": {j: {"conv1", "conv2"}}}}, "conv_out"}
  top level {"encoder", "encoder_transformer": {i: layer}, "downsample": {"w"}, "quantizer",
             "upsample": {"w"}, "decoder_transformer": {i: layer}, "decoder"}

Every op that looks back in time takes its streaming state (None = start of a stream) and returns the
new one, so the whole-sequence decoder and the streaming decoder are the same code.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxtts.mimi.config import MimiConfig


def _get(state, *keys):
    """state[k0][k1]…, or None when there is no state yet (start of stream)."""
    for k in keys:
        if state is None:
            return None
        state = state[k]
    return state


# ---------------------------------------------------------------------------------------------
# Parameter specification (shapes and random init), shared by random init, loading and the converter


class Leaf(NamedTuple):
    """One parameter: its shape and random init `mean + std · N(0, 1)`."""

    shape: tuple[int, ...]
    std: float = 0.0
    mean: float = 0.0


def _conv_spec(cin, cout, k, *, bias=True, gain=1.0):
    spec = {"w": Leaf((k, cin, cout), gain * (k * cin) ** -0.5)}
    if bias:
        spec["b"] = Leaf((cout,))
    return spec


def _convtr_spec(cin, cout, k, stride, groups=1, bias=True):
    # Each output sample sums k/stride taps of cin/groups channels.
    spec = {"w": Leaf((cin, k, cout // groups), (cin // groups * k // stride) ** -0.5)}
    if bias:
        spec["b"] = Leaf((cout,))
    return spec


def _res_spec(cfg: MimiConfig, dim: int) -> dict:
    hidden = dim // cfg.compress
    return {
        j: {"conv1": _conv_spec(dim, hidden, cfg.residual_kernel_size), "conv2": _conv_spec(hidden, dim, 1)}
        for j in range(cfg.n_residual_layers)
    }


def _transformer_spec(cfg: MimiConfig) -> dict:
    d, f = cfg.dimension, cfg.dim_feedforward
    norm = {"scale": Leaf((d,), mean=1.0), "bias": Leaf((d,))}
    layer = {
        "norm1": norm,
        "qkv": Leaf((d, 3 * d), d**-0.5),
        "out": Leaf((d, d), d**-0.5),
        "norm2": norm,
        "ff1": Leaf((d, f), d**-0.5),
        "ff2": Leaf((f, d), f**-0.5),
        "scale1": Leaf((d,), mean=0.1),
        "scale2": Leaf((d,), mean=0.1),
    }
    return {i: layer for i in range(cfg.num_layers)}


def param_specs(cfg: MimiConfig) -> dict:
    """The parameter tree with a `Leaf` (shape, init) at every position."""
    nf, d = cfg.n_filters, cfg.dimension
    enc_blocks, mult = {}, 1
    for i, ratio in enumerate(reversed(cfg.ratios)):
        enc_blocks[i] = {"res": _res_spec(cfg, mult * nf), "down": _conv_spec(mult * nf, 2 * mult * nf, 2 * ratio)}
        mult *= 2
    encoder = {
        "conv_in": _conv_spec(cfg.channels, nf, cfg.kernel_size),
        "blocks": enc_blocks,
        "conv_out": _conv_spec(mult * nf, d, cfg.last_kernel_size),
    }
    dec_blocks = {}
    for i, ratio in enumerate(cfg.ratios):
        dec_blocks[i] = {
            "up": _convtr_spec(mult * nf, mult * nf // 2, 2 * ratio, ratio),
            "res": _res_spec(cfg, mult * nf // 2),
        }
        mult //= 2
    decoder = {
        "conv_in": _conv_spec(d, (2 ** len(cfg.ratios)) * nf, cfg.kernel_size),
        "blocks": dec_blocks,
        # small, so that random-weight audio stays mostly within [-1, 1]
        "conv_out": _conv_spec(nf, cfg.channels, cfg.last_kernel_size, gain=0.05),
    }
    s, q = cfg.resample_stride, cfg.codebook_dim

    def rvq(n):
        return {
            "in_proj": Leaf((d, q), d**-0.5),
            "out_proj": Leaf((q, d), q**-0.5),
            "codebooks": Leaf((n, cfg.bins, q), 1.0),
        }

    return {
        "encoder": encoder,
        "encoder_transformer": _transformer_spec(cfg),
        "downsample": _conv_spec(d, d, 2 * s, bias=False),
        "quantizer": {"semantic": rvq(cfg.n_q_semantic), "acoustic": rvq(cfg.n_q - cfg.n_q_semantic)},
        "upsample": _convtr_spec(d, d, 2 * s, s, groups=d, bias=False),
        "decoder_transformer": _transformer_spec(cfg),
        "decoder": decoder,
    }


def _is_leaf(x) -> bool:
    return isinstance(x, Leaf)


def abstract_params(cfg: MimiConfig, dtype=jnp.float32) -> dict:
    return jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, dtype), param_specs(cfg), is_leaf=_is_leaf)


def init_params(cfg: MimiConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Random full parameters (for tests, benchmarks and `--random-weights`), as numpy arrays.

    Drawn on the host, in threads: one core takes ~1.7 s for Mimi's 96 M normals, and a device
    program would compile a kernel for each of the 224 leaves. The values depend on the seed
    only, not on the number of threads."""
    leaves, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=_is_leaf)
    sizes = [math.prod(leaf.shape) if leaf.std else 0 for leaf in leaves]
    ends = np.cumsum(sizes)
    noise = _standard_normal(int(ends[-1]), seed)

    def init(i):
        leaf = leaves[i]
        if not leaf.std:
            return np.full(leaf.shape, leaf.mean, dtype)
        x = noise[ends[i] - sizes[i] : ends[i]].reshape(leaf.shape)  # a view: scaled in place
        x *= np.float32(leaf.std)
        x += np.float32(leaf.mean)
        return x.astype(dtype, copy=False)

    with _pool() as pool:
        return jax.tree.unflatten(treedef, list(pool.map(init, range(len(leaves)))))


def _standard_normal(n: int, seed: int, block: int = 1 << 22) -> np.ndarray:
    """n float32 N(0, 1) draws, block by block, each block from its own stream of `seed` (NumPy
    releases the GIL while it fills one, so the blocks fill in parallel)."""
    out = np.empty(n, np.float32)

    def fill(b):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(b,)))
        rng.standard_normal(out=out[b * block : (b + 1) * block], dtype=np.float32)

    with _pool() as pool:
        list(pool.map(fill, range(-(-n // block))))
    return out


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(min(16, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------
# Convolutions


def conv1d(p, x, history, *, stride=1, dilation=1, replicate=False):
    """Causal conv over x [B, T, Cin] (T a multiple of stride) → ([B, T/stride, Cout], new history).

    `history` holds the input steps just before x that the first outputs still see; at the start of a
    stream it is zeros, or copies of the first sample with `replicate`.
    """
    k = p["w"].shape[0]
    context = (k - 1) * dilation + 1 - stride
    if history is None:
        first = x[:, :1] if replicate else jnp.zeros_like(x[:, :1])
        history = jnp.broadcast_to(first, (x.shape[0], context, x.shape[2]))
    xx = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    # As one matmul over the k taps side by side (im2col), not lax.conv: on the GPU, XLA hands
    # 1-D convolutions of audio length to cuDNN, whose algorithm search planned workspaces of
    # 129-258 GiB for Mimi (the "Can't reduce memory use below 106 GiB" warnings and a failed
    # 258 GiB allocation on the H200) and made most of Mimi's compile time.
    t_out = x.shape[1] // stride
    span = (t_out - 1) * stride + 1
    taps = [lax.slice_in_dim(xx, i * dilation, i * dilation + span, stride, axis=1) for i in range(k)]
    cols = taps[0] if k == 1 else jnp.concatenate(taps, axis=-1)  # [B, T/stride, k·Cin]
    w = p["w"]
    y = cols @ w.reshape(k * w.shape[1], w.shape[2])
    if "b" in p:
        y = y + p["b"]
    return y, xx[:, xx.shape[1] - context :]


def conv_transpose1d(p, x, overlap, *, stride, groups=1):
    """Causal transposed conv over x [B, T, Cin] → ([B, T·stride, Cout], new overlap).

    The full output is (T-1)·stride + K long; its last K - stride samples are incomplete until the next
    input arrives. Whole-sequence Mimi drops them; streaming keeps them (without bias) in `overlap` and
    adds them to the start of the next output.
    """
    w = p["w"]
    cin, k, cout_per_group = w.shape
    b, t, _ = x.shape
    taps = k // stride
    # z[:, n, j] is input n's contribution to output sample n·stride + j.
    if groups == 1:  # one matmul; the [Cin, K·Cout] weight layout needs no transpose
        z = x @ w.reshape(cin, k * cout_per_group)
    elif groups == cin and cout_per_group == 1:  # depthwise: a broadcast multiply
        z = x[:, :, None, :] * w[:, :, 0].T
    else:
        raise ValueError(f"transposed conv with groups={groups}: only dense or depthwise are supported")
    z = z.reshape(b, t, taps, stride, -1)
    # Output frame n (stride samples) sums tap i of input n - i.
    full = sum(jnp.pad(z[:, :, i], ((0, 0), (i, taps - 1 - i), (0, 0), (0, 0))) for i in range(taps))
    full = full.reshape(b, (t + taps - 1) * stride, -1)
    if overlap is not None:
        full = full.at[:, : overlap.shape[1]].add(overlap.astype(full.dtype))
    y = full[:, : t * stride]
    if "b" in p:
        y = y + p["b"]
    return y, full[:, t * stride :]


def resblock(p, x, state, *, dilation):
    """SEANet residual block: x + conv2(ELU(conv1(ELU(x)))), identity skip."""
    h, s1 = conv1d(p["conv1"], jax.nn.elu(x), _get(state, "conv1"), dilation=dilation)
    h, s2 = conv1d(p["conv2"], jax.nn.elu(h), _get(state, "conv2"))
    return x + h, {"conv1": s1, "conv2": s2}


def seanet_encoder(p, cfg: MimiConfig, wav):
    """[B, L, 1] audio → [B, L/hop, D] latents (whole sequence only)."""
    x, _ = conv1d(p["conv_in"], wav, None)
    for i, ratio in enumerate(reversed(cfg.ratios)):
        blk = p["blocks"][i]
        for j in range(cfg.n_residual_layers):
            x, _ = resblock(blk["res"][j], x, None, dilation=cfg.dilation_base**j)
        x, _ = conv1d(blk["down"], jax.nn.elu(x), None, stride=ratio)
    x, _ = conv1d(p["conv_out"], jax.nn.elu(x), None)
    return x


def seanet_decoder(p, cfg: MimiConfig, x, state):
    """[B, T, D] latents → ([B, T·hop, 1] audio, new state)."""
    new = {}
    x, new["conv_in"] = conv1d(p["conv_in"], x, _get(state, "conv_in"))
    new["blocks"] = {}
    for i, ratio in enumerate(cfg.ratios):
        blk, st = p["blocks"][i], _get(state, "blocks", i)
        x, up = conv_transpose1d(blk["up"], jax.nn.elu(x), _get(st, "up"), stride=ratio)
        res = {}
        for j in range(cfg.n_residual_layers):
            x, res[j] = resblock(blk["res"][j], x, _get(st, "res", j), dilation=cfg.dilation_base**j)
        new["blocks"][i] = {"up": up, "res": res}
    x, new["conv_out"] = conv1d(p["conv_out"], jax.nn.elu(x), _get(state, "conv_out"))
    return x, new


# ---------------------------------------------------------------------------------------------
# Transformer


def layer_norm(p, x, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * lax.rsqrt(var + eps) * p["scale"] + p["bias"]).astype(x.dtype)


def rope(x, positions, max_period):
    """Rotate interleaved pairs (2i, 2i+1) of x [B, T, H, D] by positions [T] · max_period^(-2i/D)."""
    d = x.shape[-1]
    freqs = jnp.exp(jnp.arange(d // 2, dtype=jnp.float32) * (-math.log(max_period) * 2 / d))
    angle = positions.astype(jnp.float32)[:, None] * freqs
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], d // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _windowed_softmax_attention(q, k, v, q_pos, k_pos, window):
    """q [..., T, H, Dh] over k, v [..., S, H, Dh]; key s is visible to query t iff its position is
    not negative (before the stream) and 0 <= q_pos[t] - k_pos[s] < window."""
    delta = q_pos[..., :, None] - k_pos[..., None, :]
    visible = (k_pos >= 0)[..., None, :] & (delta >= 0) & (delta < window)
    scale = 1 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("...thd,...shd->...hts", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(visible[..., None, :, :], scores, -jnp.inf), axis=-1)
    return jnp.einsum("...hts,...shd->...thd", probs.astype(v.dtype), v)


def self_attention(p, cfg: MimiConfig, x, cache, offset):
    """Causal attention over the last `cfg.context` steps (the current one included).

    `cache` {"k", "v"}: [B, context, H, Dh] keys (rotated) and values of the steps before x, oldest
    first; slots before the start of the stream are masked out by their (negative) positions.
    """
    b, t, d = x.shape
    h, hd, window = cfg.num_heads, cfg.head_dim, cfg.context
    q, k, v = jnp.moveaxis((x @ p["qkv"]).reshape(b, t, 3, h, hd), 2, 0)
    positions = offset + jnp.arange(t)
    q, k = rope(q, positions, cfg.max_period), rope(k, positions, cfg.max_period)
    if cache is None:
        cache = {"k": jnp.zeros((b, window, h, hd), x.dtype), "v": jnp.zeros((b, window, h, hd), x.dtype)}
    keys = jnp.concatenate([cache["k"].astype(x.dtype), k], axis=1)
    values = jnp.concatenate([cache["v"].astype(x.dtype), v], axis=1)
    key_pos = offset - window + jnp.arange(window + t)
    if t <= window:
        out = _windowed_softmax_attention(q, keys, values, positions, key_pos, window)
    else:
        # Long sequences: query block j (window steps) only sees key blocks j and j+1, so memory grows
        # linearly with t instead of quadratically. Padding queries and keys at the end changes nothing
        # before them (causality); the padded outputs are dropped.
        n = -(-t // window)

        def blocks(a, count):
            a = jnp.pad(a, [(0, 0), (0, count * window - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
            return a.reshape(a.shape[0], count, window, *a.shape[2:])

        def pairs(a):  # blocks j and j+1 side by side
            return jnp.concatenate([a[:, :-1], a[:, 1:]], axis=2)

        kpos = (offset - window + jnp.arange((n + 1) * window)).reshape(1, n + 1, window)
        out = _windowed_softmax_attention(
            blocks(q, n),
            pairs(blocks(keys, n + 1)),
            pairs(blocks(values, n + 1)),
            (offset + jnp.arange(n * window)).reshape(n, window),
            pairs(kpos)[0],
            window,
        )
        out = out.reshape(b, n * window, h, hd)[:, :t]
    return out.reshape(b, t, d) @ p["out"], {"k": keys[:, t:], "v": values[:, t:]}


def transformer(p, cfg: MimiConfig, x, state):
    """Pre-norm layers with LayerScale on both branches; no final norm. x [B, T, D]."""
    offset = jnp.zeros((), jnp.int32) if state is None else state["offset"]
    caches = {}
    for i in range(cfg.num_layers):
        lp = p[i]
        h, caches[i] = self_attention(
            lp, cfg, layer_norm(lp["norm1"], x, cfg.norm_eps), _get(state, "layers", i), offset
        )
        x = x + lp["scale1"] * h
        h = jax.nn.gelu(layer_norm(lp["norm2"], x, cfg.norm_eps) @ lp["ff1"], approximate=False) @ lp["ff2"]
        x = x + lp["scale2"] * h
    return x, {"offset": offset + x.shape[1], "layers": caches}


# ---------------------------------------------------------------------------------------------
# Split residual vector quantizer


def _rvq_encode(q, x):
    """Residual quantization of x [B, T, D] with each codebook in turn → codes [B, n, T]."""
    residual = (x @ q["in_proj"]).astype(jnp.float32)

    def step(residual, codebook):
        codebook = codebook.astype(jnp.float32)
        # argmin ||r - e||² = argmin ||e||² - 2 r·e
        dist = jnp.sum(codebook * codebook, -1) - 2 * residual @ codebook.T
        idx = jnp.argmin(dist, axis=-1).astype(jnp.int32)
        return residual - codebook[idx], idx

    _, codes = lax.scan(step, residual, q["codebooks"])
    return jnp.moveaxis(codes, 0, 1)


def _rvq_decode(q, codes):
    """codes [B, k, T] (k ≤ n) → [B, T, D]: sum of the codewords, projected out."""
    k = codes.shape[1]
    words = q["codebooks"][jnp.arange(k)[None, :, None], codes]  # [B, k, T, d]
    return words.sum(axis=1) @ q["out_proj"]


def quantizer_encode(p, cfg: MimiConfig, x):
    # Both parts quantize the same latents, each through its own input projection.
    return jnp.concatenate([_rvq_encode(p["semantic"], x), _rvq_encode(p["acoustic"], x)], axis=1)


def quantizer_decode(p, cfg: MimiConfig, codes):
    n = cfg.n_q_semantic
    x = _rvq_decode(p["semantic"], codes[:, :n])
    if codes.shape[1] > n:
        x = x + _rvq_decode(p["acoustic"], codes[:, n:])
    return x


# ---------------------------------------------------------------------------------------------
# Whole model


def encode(params, wav, *, cfg: MimiConfig):
    """wav [B, L, 1], L a multiple of cfg.frame_size → int32 codes [B, n_q, L / frame_size]."""
    x = seanet_encoder(params["encoder"], cfg, wav.astype(params["encoder"]["conv_in"]["w"].dtype))
    x, _ = transformer(params["encoder_transformer"], cfg, x, None)
    x, _ = conv1d(params["downsample"], x, None, stride=cfg.resample_stride, replicate=True)
    return quantizer_encode(params["quantizer"], cfg, x)


def decode_step(params, state, codes, *, cfg: MimiConfig):
    """Decode codes [B, K, T] (K ≤ n_q) following `state` (None: start of stream) → (state, [B, T·frame, 1]).

    The state holds everything the decoder needs from earlier frames: the upsampler's and each
    transposed conv's overlap, each conv's input tail, and each transformer layer's key/value window.
    """
    x = quantizer_decode(params["quantizer"], cfg, codes)
    x, up = conv_transpose1d(
        params["upsample"], x, _get(state, "upsample"), stride=cfg.resample_stride, groups=cfg.dimension
    )
    x, tr = transformer(params["decoder_transformer"], cfg, x, _get(state, "transformer"))
    pcm, sea = seanet_decoder(params["decoder"], cfg, x, _get(state, "seanet"))
    return {"upsample": up, "transformer": tr, "seanet": sea}, pcm


def decode(params, codes, *, cfg: MimiConfig):
    """Whole-sequence decode: codes [B, K, T] → audio [B, T·frame_size, 1]."""
    return decode_step(params, None, codes, cfg=cfg)[1]
