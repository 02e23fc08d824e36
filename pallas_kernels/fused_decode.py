"""Fused kernels for one decode step (one new position, a few rows) of a Llama block.

At batch 1 a block step is ~15 small GPU kernels, and each costs 2-5 µs of ramp-up and tail
whatever its work (docs/PERF.md). These kernels fold the glue into the projections, so that a
block step is eight kernels, three of them small XLA fusions:

    h          = residual(h, down_parts)                 # previous block's MLP output (XLA)
    qkv, ss    = norm_matvec(h, attn_norm, W_qkv, rope=(cos, sin))
    o, kc, vc  = attention_step(qkv, ss, kc, vc, pos)   # sums qkv, norm factor, attends, writes k/v
    o_parts    = matvec(o, W_out, partials=True)
    h          = residual(h, o_parts)                    # (XLA)
    act        = swiglu(finish(*norm_matvec(h, mlp_norm, W_gate_up)))   # (XLA)
    down_parts = matvec(act, W_down, partials=True)

or, with `DecodeOptions.swiglu_epilogue` (the GPU default), seven: the gate/up kernel finishes the
norm and applies SwiGLU itself, `act = norm_matvec(h, mlp_norm, W_gate_up, swiglu=True)`.

The RMSNorm's row factor rsqrt(mean(h²) + eps) is a scalar per row, so it commutes with the
matmul (and with RoPE): norm_matvec multiplies h * scale (an XLA multiply fused into h's
producer) by W, sums the squares of its own part of h, and leaves the factor (with the partial
sums of squares) to the consumer. No program needs all of h before it starts.
Values are rounded to the model dtype where the unfused path (jaxtts.llama) rounds them, except
that the norm's row factor is applied after the matmul, so the two agree to rounding.

Measured slower and dropped (docs/PERF.md): adding the residual's split partials in the
consumer's prologue instead of an XLA fusion. A SwiGLU epilogue (gate and up tiles in one
program) measured slower in session 2 (#11), before the loads were fixed to pipeline (#12);
measured again in session 15 (#78) it ties bf16 and saves 0.14 ms per frame with int8 weights.

int8 weights: norm_matvec and matvec take `w_scale` (one float32 scale per output column, per
matrix of a stack) and scale each split's float32 partial in their epilogue, before RoPE (which
mixes columns); everything downstream sees dequantized partial sums.

`norm_matvec_reference` and `attention_step_reference` are the pure-jnp definitions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _backend as be
from pallas_kernels.decode_attention import fold_key_block
from pallas_kernels.matvec import MatvecConfig, default_config, default_k_splits

# --- references -----------------------------------------------------------------------------------


def add_residual(x, parts):
    """x + (sum of parts, rounded to x's dtype), in x's dtype; x itself when parts is None."""
    if parts is None:
        return x
    return (x.astype(jnp.float32) + jnp.sum(parts, axis=0).astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def rms_norm_reference(h, scale, eps):
    hf = h.astype(jnp.float32)
    y = hf * jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(h.dtype)


def norm_matvec_reference(x, scale, w, *, eps, rope=None, head_dim=None, rope_heads=0, w_index=None, w_scale=None):
    """y = rmsnorm(x) @ w in float32 (compare with `finish` of norm_matvec's outputs), then RoPE
    on the first `rope_heads` heads of y (cos/sin [M, head_dim/2], halves layout).
    With w_scale (w int8): y = (rmsnorm(x) @ w.astype(x.dtype)) * w_scale, per column."""
    if w_index is not None:
        w = w[w_index]
        w_scale = None if w_scale is None else w_scale[w_index]
    xn = rms_norm_reference(x, scale, eps)
    if w_scale is not None:
        w = w.astype(x.dtype)
    y = jnp.dot(xn, w, precision="highest", preferred_element_type=jnp.float32)
    if w_scale is not None:
        y = y * w_scale.astype(jnp.float32)
    if rope is not None:
        y = apply_rope(y, rope, head_dim=head_dim, rope_heads=rope_heads)
    return y


def apply_rope(y, rope, *, head_dim: int, rope_heads: int):
    """RoPE on the first `rope_heads` heads of y [M, N] (heads of `head_dim` columns, halves
    layout), cos/sin [M, head_dim/2]: what norm_matvec's `rope=` does in its epilogue."""
    cos, sin = rope
    m, n = y.shape
    yh = y.reshape(m, n // head_dim, 2, head_dim // 2)
    lo, hi = yh[:, :, 0], yh[:, :, 1]
    c, s = cos[:, None], sin[:, None]
    rot = jnp.stack([lo * c - hi * s, hi * c + lo * s], axis=2)
    is_rope = (jnp.arange(n // head_dim) < rope_heads)[None, :, None, None]
    return jnp.where(is_rope, rot, yh).reshape(m, n)


def attention_step_reference(qkv, k_cache, v_cache, pos, *, num_heads):
    """qkv [M, (H + 2 Hkv) * D] float32 (q and k already rotated) for the query at position
    pos[b]; k/v caches [M, S, Hkv, D]. Writes the new key/value at pos and attends over slots
    0..pos. Returns (o [M, H * D], k_cache, v_cache), o in the caches' dtype."""
    m = qkv.shape[0]
    _, s, hkv, d = k_cache.shape
    dtype = k_cache.dtype
    qkv = qkv.astype(dtype).reshape(m, num_heads + 2 * hkv, d)
    q, k, v = qkv[:, :num_heads], qkv[:, num_heads : num_heads + hkv], qkv[:, num_heads + hkv :]
    write = jax.vmap(lambda c, n, p: jax.lax.dynamic_update_slice(c, n[None], (p, 0, 0)))
    k_cache, v_cache = write(k_cache, k, pos), write(v_cache, v, pos)
    qg = q.reshape(m, hkv, num_heads // hkv, d)
    scores = jnp.einsum("bkgd,bskd->bkgs", qg, k_cache, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    visible = jnp.arange(s)[None, :] <= pos[:, None]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bkgs,bskd->bkgd", p.astype(dtype), v_cache, preferred_element_type=jnp.float32)
    return o.reshape(m, num_heads * d).astype(dtype), k_cache, v_cache


NORM_CHUNK = 1024  # columns per load of the sum-of-squares pass


def _select(flag, a, b):
    """where(flag, a, b) for a scalar flag (Triton's lowering wants the condition full-shaped)."""
    a = jnp.asarray(a, jnp.float32) + jnp.zeros(jnp.shape(b), jnp.float32)
    return jnp.where(jnp.broadcast_to(flag, a.shape), a, b)


# --- norm_matvec ------------------------------------------------------------------------------------


def _norm_matvec_kernel(
    *refs,
    m,
    k,
    rows,
    block_n,
    block_k,
    per_split,
    rope,
    half,
    rope_heads,
    has_index,
    scaled,
    norm_rows,
    norm_chunk,
    convert,
    transposed,
    swiglu,
    eps,
):
    it = iter(refs)
    x_ref = next(it)
    xs_ref = next(it)
    idx_ref = next(it) if has_index else None
    w_ref = next(it)
    s_ref = next(it) if scaled else None
    cos_ref, sin_ref = (next(it), next(it)) if rope else (None, None)
    out_ref = next(it)
    ss_ref = None if swiglu else next(it)
    n = 2 * out_ref.shape[-1] if swiglu else out_ref.shape[-1]  # W's columns
    w_lead = (idx_ref[0],) if has_index else ()  # one indexer per load: Triton takes no chains
    dtype = x_ref.dtype
    row_ok = jnp.arange(rows) < m

    k_blocks = pl.cdiv(k, block_k)
    lo = pl.program_id(1) * per_split
    hi = jnp.minimum(lo + per_split, k_blocks)
    n0 = pl.program_id(0) * block_n  # first output column of this program
    column_zero = pl.program_id(0) == 0  # these programs also write the sums of squares

    # Column tiles of W this program reads, as (first column, width): the two halves of a head
    # for RoPE, a gate tile and the matching up tile (W's second half) for swiglu, else one tile.
    if rope:
        tiles = [(n0, half), (n0 + half, half)]
    elif swiglu:
        tiles = [(n0, block_n), (n // 2 + n0, block_n)]
    else:
        tiles = [(n0, block_n)]

    # Sum of squares of this program's part of x, in a few wide loads before the main loop (in
    # the loop, loads that do not feed the dot directly stall its pipelining: measured).
    k_lo, k_hi = lo * block_k, jnp.minimum(hi * block_k, k)
    nrow_ok = jnp.arange(norm_rows) < m

    def sumsq(i, ss):
        start = k_lo + i * norm_chunk
        mask = nrow_ok[:, None] & (start + jnp.arange(norm_chunk) < k_hi)[None, :]
        h = be.load(x_ref.at[pl.ds(0, norm_rows), pl.ds(start, norm_chunk)], mask=mask, other=0)
        return ss + jnp.sum(h.astype(jnp.float32) ** 2, axis=1)

    ss = jax.lax.fori_loop(0, pl.cdiv(per_split * block_k, norm_chunk), sumsq, jnp.zeros((norm_rows,), jnp.float32))

    # rmsnorm(h) * scale @ W == rsqrt(mean(h²) + eps) * ((h * scale) @ W): the row factor is
    # applied after the sum over K, so the loop is a plain matvec over xs = h * scale.
    def body(i, accs):
        start = pl.multiple_of(i * block_k, block_k)
        k_ok = start + jnp.arange(block_k) < k
        xs = be.load(xs_ref.at[pl.ds(0, rows), pl.ds(start, block_k)], mask=row_ok[:, None] & k_ok[None, :], other=0)
        out = []
        for (c0, width), acc in zip(tiles, accs):
            if transposed:  # W [.., N, K]: the tile [width, block_k], K-contiguous
                wmask = (c0 + jnp.arange(width) < n)[:, None] & k_ok[None, :]
                w_at = w_ref.at[(*w_lead, pl.ds(c0, width), pl.ds(start, block_k))]
            else:
                wmask = k_ok[:, None] & (c0 + jnp.arange(width) < n)[None, :]
                w_at = w_ref.at[(*w_lead, pl.ds(start, block_k), pl.ds(c0, width))]
            wt = be.load(w_at, mask=wmask, other=0)
            out.append(acc + be.dot(xs, convert(wt, dtype) if scaled else wt.astype(dtype), trans_b=transposed))
        return tuple(out)

    accs = jax.lax.fori_loop(lo, hi, body, tuple(jnp.zeros((rows, w), jnp.float32) for _, w in tiles))
    if s_ref is not None:  # int8 W: each tile's column scales, before RoPE mixes the halves
        accs = tuple(
            acc * be.load(s_ref.at[(*w_lead, pl.ds(c0, width))], mask=c0 + jnp.arange(width) < n, other=0)[None, :]
            for (c0, width), acc in zip(tiles, accs)
        )

    if swiglu:  # one split: this program summed all of x², so it applies the norm itself
        inv = jax.lax.rsqrt(ss / k + eps)[:, None]  # [rows, 1] (norm_rows == rows here)
        gate, up = ((acc * inv).astype(dtype).astype(jnp.float32) for acc in accs)  # rounded as finish()'s
        act = gate / (1 + jnp.exp(-gate)) * up
        mask = row_ok[:, None] & (n0 + jnp.arange(block_n) < n // 2)[None, :]
        be.store(out_ref.at[pl.ds(0, rows), pl.ds(n0, block_n)], act.astype(out_ref.dtype), mask=mask)
        return

    @pl.when(column_zero)  # the consumer normalises: it gets this split's sum of squares
    def _():
        be.store(ss_ref.at[pl.ds(0, norm_rows)], ss, mask=nrow_ok)

    def store(c0, width, value, limit):
        mask = row_ok[:, None] & (c0 + jnp.arange(width) < limit)[None, :]
        be.store(out_ref.at[pl.ds(0, rows), pl.ds(c0, width)], value.astype(out_ref.dtype), mask=mask)

    if rope:
        lo_acc, hi_acc = accs
        cmask = row_ok[:, None]
        c = be.load(cos_ref.at[pl.ds(0, rows), :], mask=cmask, other=0)
        s = be.load(sin_ref.at[pl.ds(0, rows), :], mask=cmask, other=0)
        # RoPE is linear, so rotating each split's partial sum rotates their total.
        rotate = pl.program_id(0) < rope_heads
        lo_out = _select(rotate, lo_acc * c - hi_acc * s, lo_acc)
        hi_out = _select(rotate, hi_acc * c + lo_acc * s, hi_acc)
        store(n0, half, lo_out, n)
        store(n0 + half, half, hi_out, n)
    else:
        store(n0, block_n, accs[0], n)


@functools.partial(
    jax.jit,
    static_argnames=(
        "head_dim",
        "rope_heads",
        "config",
        "k_splits",
        "block_n",
        "block_k",
        "num_warps",
        "num_stages",
        "int8_convert",
        "w_transposed",
        "swiglu",
        "eps",
        "interpret",
    ),
)
def norm_matvec(
    x,
    scale,
    w,
    *,
    rope=None,
    head_dim: int | None = None,
    rope_heads: int = 0,
    w_index=None,
    w_scale=None,
    config: MatvecConfig | None = None,
    k_splits: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    int8_convert: str = "cvt",
    w_transposed: bool = False,
    swiglu: bool = False,
    eps: float | None = None,
    interpret: bool = False,
):
    """The matmul of rmsnorm(x) * scale @ w, leaving the norm's row factor to the consumer.

    x [M, K] (M <= 64), scale [K], w [K, N] or [L, K, N] with w_index an int32 [1] picking one.
    w_scale [N] (or [L, N] for a stack) with w int8: the weight is w * w_scale per column; the
    int8 tiles are converted to x's dtype in registers (as `int8_convert` says:
    `_backend.INT8_CONVERTS`) and the partials come back scaled.
    rope=(cos, sin) ([M, head_dim/2] float32) rotates the halves of each of the first
    `rope_heads` heads of the result (heads of `head_dim` columns).
    w_transposed=True: w is given as [N, K] (or [L, N, K]), each output column's weights
    contiguous (`matvec`'s w_transposed; what int8 weights are stored as).
    Returns (y, sumsq): float32 partial sums y [splits, M, N] of (x * scale) @ w and sumsq
    [splits, M] of x². `finish(y, sumsq, K, eps)` (or the next kernel) gives the result.

    swiglu=True (with `eps`; no rope, no stack): w is a fused gate/up [K, 2F] and the result is
    the activation silu(gate) * up [M, F] in x's dtype, finished in the kernel: one K split, so
    each program sums all of x² and applies the norm; a program reads a gate tile and the
    matching up tile (`block_n` / 2 columns each, the programs and bytes of a plain call).
    Equal to `swiglu(finish(...).astype(x.dtype))` up to rounding.
    """
    m, k = x.shape
    w_k, n = (w.shape[-1], w.shape[-2]) if w_transposed else (w.shape[-2], w.shape[-1])
    if not 1 <= m <= 64:
        raise ValueError(f"norm_matvec takes 1..64 rows, got {m}")
    if w_k != k or scale.shape != (k,):
        raise ValueError(f"x {x.shape}, scale {scale.shape} and w {w.shape} do not match")
    if (w.ndim == 3) != (w_index is not None):
        raise ValueError("pass w_index exactly when w is a stack [L, K, N]")
    if w_scale is not None and w_scale.shape != (*w.shape[:-2], n):
        raise ValueError(f"w_scale {w_scale.shape} does not match w {w.shape}: one scale per column")
    cfg = config or default_config(m, k, n, int8_nk=w_scale is not None and w_transposed)
    block_k = block_k or cfg.block_k
    half = 0
    if swiglu:
        if rope is not None or w_index is not None or eps is None:
            raise ValueError("swiglu takes eps, and no rope or weight stack")
        block_n = block_n or max(be.MIN_DOT_DIM, cfg.block_n // 2)
        if n % 2:
            raise ValueError(f"swiglu needs gate and up halves: N={n} is odd")
        k_splits = 1
    if rope is not None:
        if not head_dim or n % head_dim:
            raise ValueError(f"rope needs head_dim dividing N={n}, got {head_dim}")
        half = head_dim // 2
        block_n = head_dim
    else:
        block_n = block_n or cfg.block_n
    n_blocks = pl.cdiv(n, block_n)
    k_blocks = pl.cdiv(k, block_k)
    if k_splits is None:  # the config's splits when its blocks are in use (a tuned config)
        same = (block_n, block_k) == (cfg.block_n, cfg.block_k)
        k_splits = cfg.k_splits if same else default_k_splits(m, k, n, block_n, block_k)
    k_splits = min(k_splits, k_blocks)
    per_split = pl.cdiv(k_blocks, k_splits)
    k_splits = pl.cdiv(k_blocks, per_split)
    rows = be.pow2_at_least(m)
    num_warps, num_stages = num_warps or cfg.num_warps, num_stages or cfg.num_stages
    if swiglu:
        n_blocks = pl.cdiv(n // 2, block_n)  # a ragged last gate tile reads into up: never stored

    full = lambda shape: pl.BlockSpec(shape, lambda j, s, nd=len(shape): (0,) * nd)  # noqa: E731, B008
    # x * scale, rounded as the norm's output is: under jit XLA fuses it into x's producer.
    xs = (x.astype(jnp.float32) * scale.astype(jnp.float32)).astype(x.dtype)
    args, in_specs = [x, xs], [full(x.shape), full(x.shape)]
    if w_index is not None:
        args.append(jnp.asarray(w_index, jnp.int32).reshape(1))
        in_specs.append(full((1,)))
    args.append(w)
    in_specs.append(full(w.shape))
    if w_scale is not None:
        args.append(w_scale.astype(jnp.float32))
        in_specs.append(full(w_scale.shape))
    if rope is not None:
        cos, sin = (jnp.asarray(t, jnp.float32) for t in rope)
        args += [cos, sin]
        in_specs += [full(cos.shape), full(sin.shape)]

    out_shape = [jax.ShapeDtypeStruct((k_splits, m, n), jnp.float32), jax.ShapeDtypeStruct((k_splits, m), jnp.float32)]
    out_specs = [pl.BlockSpec((None, m, n), lambda j, s: (s, 0, 0)), pl.BlockSpec((None, m), lambda j, s: (s, 0))]
    if swiglu:
        out_shape, out_specs = [jax.ShapeDtypeStruct((m, n // 2), x.dtype)], [full((m, n // 2))]
    kernel = functools.partial(
        _norm_matvec_kernel,
        m=m,
        k=k,
        rows=rows,
        block_n=block_n,
        block_k=block_k,
        per_split=per_split,
        rope=rope is not None,
        half=half,
        rope_heads=rope_heads,
        has_index=w_index is not None,
        scaled=w_scale is not None,
        norm_rows=rows if swiglu else be.pow2_at_least(m, 1),
        norm_chunk=min(NORM_CHUNK, be.pow2_at_least(per_split * block_k, 1)),
        convert=functools.partial(be.int8_to, how=int8_convert, interpret=interpret),
        transposed=w_transposed,
        swiglu=swiglu,
        eps=eps,
    )
    outs = be.pallas_call(
        kernel,
        grid=(n_blocks, k_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        name="norm_matvec_swiglu" if swiglu else "norm_matvec",
    )(*args)
    return outs[0] if swiglu else tuple(outs)


def finish(parts, sumsq, k: int, eps: float):
    """The float32 result [M, N] of a split norm_matvec: sum of the partials times each row's
    rsqrt(mean(h²) + eps) (the norm's row factor, which the kernel leaves to its consumer)."""
    inv = jax.lax.rsqrt(jnp.sum(sumsq, axis=0) / k + eps)
    return jnp.sum(parts, axis=0) * inv[:, None]


# --- attention_step -------------------------------------------------------------------------------


def _attention_step_kernel(
    *refs, n_parts, has_norm, num_heads, kv_heads, group, rows, block_k, num_splits, seq_len, scale, model_dim, eps
):
    it = iter(refs)
    pos_ref, qkv_ref = next(it), next(it)
    ss_ref = next(it) if has_norm else None
    k_ref, v_ref = next(it), next(it)
    out_refs = list(it)
    if num_splits == 1:
        o_ref, k_out, v_out = out_refs
    else:
        o_ref, m_ref, l_ref, k_out, v_out = out_refs
    b, g, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    dtype = k_ref.dtype
    pos = jnp.clip(pos_ref[()], 0, seq_len - 1)
    row_ok = jnp.arange(rows) < group

    # Sum the projection's split partials (the group's queries and the new key and value) and
    # apply the norm's row factor, which norm_matvec leaves to its consumer.
    q = jnp.zeros((rows, qkv_ref.shape[-1]), jnp.float32)
    k_new = jnp.zeros((qkv_ref.shape[-1],), jnp.float32)
    v_new = jnp.zeros_like(k_new)
    for p in range(n_parts):
        q += be.load(qkv_ref.at[jnp.int32(p), b, pl.ds(g * group, rows), :], mask=row_ok[:, None], other=0)
        k_new += be.load(qkv_ref.at[jnp.int32(p), b, num_heads + g, :])
        v_new += be.load(qkv_ref.at[jnp.int32(p), b, num_heads + kv_heads + g, :])
    if ss_ref is not None:
        ss = jnp.zeros((1,), jnp.float32)
        for p in range(n_parts):
            ss += be.load(ss_ref.at[jnp.int32(p), pl.ds(b, 1)])
        inv = jax.lax.rsqrt(ss / model_dim + eps)  # [1]
        q, k_new, v_new = q * inv[:, None], k_new * inv, v_new * inv
    q, k_new, v_new = q.astype(dtype), k_new.astype(dtype), v_new.astype(dtype)

    # The cache's slots 0..pos-1 are cut into `num_splits` runs of key blocks; split 0 also takes
    # the new key (held in registers, so the cache write below cannot race the reads).
    n_blocks = pl.cdiv(pos, block_k)
    per_split = pl.cdiv(n_blocks, num_splits)
    lo = split * per_split
    hi = jnp.minimum(lo + per_split, n_blocks)

    s_new = jnp.sum(q.astype(jnp.float32) * k_new.astype(jnp.float32)[None, :], axis=1) * scale
    first = split == 0
    m0 = _select(first, s_new, jnp.full((rows,), be.NEG_INF, jnp.float32))
    l0 = _select(first, 1.0, jnp.zeros((rows,), jnp.float32))
    acc0 = _select(
        first, jnp.broadcast_to(v_new.astype(jnp.float32)[None, :], q.shape), jnp.zeros(q.shape, jnp.float32)
    )

    def body(i, carry):
        acc, m_run, l_run = carry
        start = pl.multiple_of(i * block_k, block_k)
        key_ok = start + jnp.arange(block_k) < pos
        kt = be.load(k_ref.at[pl.ds(start, block_k), :], mask=key_ok[:, None], other=0)
        vt = be.load(v_ref.at[pl.ds(start, block_k), :], mask=key_ok[:, None], other=0)
        return fold_key_block(q, kt, vt, key_ok, scale, acc, m_run, l_run)

    acc, m_run, l_run = jax.lax.fori_loop(lo, hi, body, (acc0, m0, l0))

    @pl.when(first)
    def _():
        be.store(k_out.at[pl.ds(pos, 1), :], k_new[None, :])
        be.store(v_out.at[pl.ds(pos, 1), :], v_new[None, :])

    if num_splits == 1:
        be.store(o_ref.at[pl.ds(0, rows), :], (acc / l_run[:, None]).astype(o_ref.dtype), mask=row_ok[:, None])
    else:
        be.store(o_ref.at[pl.ds(0, rows), :], acc, mask=row_ok[:, None])
        be.store(m_ref.at[pl.ds(0, rows)], m_run, mask=row_ok)
        be.store(l_ref.at[pl.ds(0, rows)], l_run, mask=row_ok)


def default_step_splits(batch: int, kv_heads: int, seq_len: int, block_k: int) -> int:
    """Splits of the cache for ~128 programs, none for short caches (the depth decoder's)."""
    if seq_len <= 4 * block_k:
        return 1
    want = pl.next_power_of_2(pl.cdiv(128, batch * kv_heads))
    return max(1, min(want, pl.cdiv(seq_len, block_k)))


@functools.partial(
    jax.jit,
    static_argnames=("num_heads", "model_dim", "eps", "block_k", "num_splits", "num_warps", "num_stages", "interpret"),
)
def attention_step(
    qkv_parts,
    sumsq,
    k_cache,
    v_cache,
    pos,
    *,
    num_heads: int,
    model_dim: int,
    eps: float,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """One decode step of attention, fed straight from the qkv projection's partial sums.

    qkv_parts float32 [P, M, (H + 2 Hkv) * D] and sumsq [P, M] from norm_matvec (q and k
    already rotated; the norm's row factor over `model_dim` inputs is applied here; sumsq=None:
    the parts are already normalised, e.g. a plain projection [1, M, N]), k/v caches
    [M, S, Hkv, D] (the new key/value go to slot pos[b]; in place under jit when the caller
    donates or no longer needs the caches), pos [M] int32.
    Row b attends over slots 0..pos[b]. Returns (o [M, H * D], k_cache, v_cache).
    """
    n_parts, m, width = qkv_parts.shape
    _, s, hkv, d = k_cache.shape
    if width != (num_heads + 2 * hkv) * d or num_heads % hkv:
        raise ValueError(f"qkv width {width} does not match {num_heads} heads, {hkv} kv heads of {d}")
    group = num_heads // hkv
    rows = be.pow2_at_least(group)
    block_k = min(block_k or (128 if d <= 64 else 64), be.pow2_at_least(s))
    num_splits = num_splits or default_step_splits(m, hkv, s, block_k)
    parts = qkv_parts.reshape(n_parts, m, num_heads + 2 * hkv, d)

    kv_spec = pl.BlockSpec((None, s, None, d), lambda b, g, sp: (b, 0, g, 0))
    has_norm = sumsq is not None
    in_specs = [pl.BlockSpec((None,), lambda b, g, sp: (b,)), pl.BlockSpec(parts.shape, lambda b, g, sp: (0, 0, 0, 0))]
    args = [pos.astype(jnp.int32), parts]
    if has_norm:
        in_specs.append(pl.BlockSpec(sumsq.shape, lambda b, g, sp: (0, 0)))
        args.append(sumsq.astype(jnp.float32))
    in_specs += [kv_spec, kv_spec]
    args += [k_cache, v_cache]
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((m, hkv, group, d), k_cache.dtype)]
        out_specs = [pl.BlockSpec((None, None, group, d), lambda b, g, sp: (b, g, 0, 0))]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((m, hkv, num_splits, group, d), jnp.float32),
            jax.ShapeDtypeStruct((m, hkv, num_splits, group), jnp.float32),
            jax.ShapeDtypeStruct((m, hkv, num_splits, group), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, group, d), lambda b, g, sp: (b, g, sp, 0, 0)),
            pl.BlockSpec((None, None, None, group), lambda b, g, sp: (b, g, sp, 0)),
            pl.BlockSpec((None, None, None, group), lambda b, g, sp: (b, g, sp, 0)),
        ]
    out_shape += [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype)] * 2
    out_specs += [kv_spec, kv_spec]
    n_out = len(out_shape)
    kernel = functools.partial(
        _attention_step_kernel,
        n_parts=n_parts,
        has_norm=has_norm,
        num_heads=num_heads,
        kv_heads=hkv,
        group=group,
        rows=rows,
        block_k=block_k,
        num_splits=num_splits,
        seq_len=s,
        scale=1.0 / d**0.5,
        model_dim=model_dim,
        eps=float(eps),
    )
    outs = be.pallas_call(
        kernel,
        grid=(m, hkv, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={len(args) - 2: n_out - 2, len(args) - 1: n_out - 1},
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        name="attention_step",
    )(*args)
    if num_splits == 1:
        o = outs[0]
    else:
        acc, mx, l = outs[:3]
        w = jnp.exp(mx - jnp.max(mx, axis=2, keepdims=True))
        o = (jnp.sum(w[..., None] * acc, axis=2) / jnp.sum(w * l, axis=2)[..., None]).astype(k_cache.dtype)
    return o.reshape(m, num_heads * d), outs[-2], outs[-1]
