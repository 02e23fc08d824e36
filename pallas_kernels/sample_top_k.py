"""One kernel per draw: logits → temperature → top-k → Gumbel-max → token id, a program per row.

Sampling from softmax(top_k(logits / T)) is the argmax of (logits / T + Gumbel noise) over the
top-k set; that is how `jax.random.categorical` draws too, so with the same noise this kernel
returns what `Sampler` returned before (the noise for a whole frame comes from the same per-row
keys, drawn once per frame: `jaxtts.sampling.gumbel_noise`). In XLA the draw was ~9 small kernels, and at batch 64
its top-k (rank counting, O(V²) per row) cost ~49 µs per draw (docs/PERF.md).

The k-th largest value is found exactly, without sorting: floats map to unsigned integers in the
same order, and the largest integer t with count(u >= t) >= k is built two bits at a time (16
rounds of four counts over the row). Ties at the boundary are kept, as `top_k_mask` keeps them.

The logits may come as the split partials of the head's `norm_matvec` (parts [P, M, V] with the
sums of squares [P, M]): the kernel adds them and applies the norm's row factor, as `finish` does.
`sample_top_k_reference` is the pure-jnp definition.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _backend as be

# Bits of the k-th largest value fixed per counting round, and warps per program (the [2^bits,
# lanes] compare tile is spread over them). Chosen by `python -m benchmarks.decode_probe`.
RADIX_BITS = 2
NUM_WARPS = 8


def _sum_parts(parts, sumsq, norm_dim, eps):
    """parts [P, M, V] → logits [M, V]: added in order p = 0, 1, ..., times the norm's row factor."""
    logits = parts[0]
    for p in range(1, parts.shape[0]):
        logits = logits + parts[p]
    if sumsq is not None:
        ss = sumsq[0]
        for p in range(1, sumsq.shape[0]):
            ss = ss + sumsq[p]
        logits = logits * jax.lax.rsqrt(ss / norm_dim + eps)[:, None]
    return logits


def sample_top_k_reference(
    parts, noise, step, temperature, *, top_k: int, sumsq=None, norm_dim: int = 1, eps: float = 0.0
):
    """Token ids [M] int32: argmax over the top-k entries of logits / temperature of (that + noise).

    parts float32 [P, M, V] (P = 1: plain logits), noise float32 [S, M, V] of which row `step` is
    used, temperature a float32 scalar; sumsq [P, M] applies rsqrt(sum / norm_dim + eps) per row.

    Per row (the serving engine's pools): temperature float32 [M] and top_k int32 [M], where a row's
    top_k <= 0 (or >= V) keeps every code and top_k 1 is greedy (the first largest, no noise).
    """
    y = _sum_parts(parts.astype(jnp.float32), sumsq, norm_dim, eps)
    if not isinstance(top_k, int):
        vocab = y.shape[-1]
        y = y / jnp.asarray(temperature, jnp.float32)[:, None]
        k = jnp.asarray(top_k, jnp.int32)[:, None]
        kth = jnp.take_along_axis(jnp.sort(y, axis=-1), jnp.clip(vocab - k, 0, vocab - 1), axis=-1)
        keep = (y >= kth) | (k <= 0) | (k >= vocab)
        g = jnp.where(k == 1, 0.0, noise[step])
        return jnp.argmax(jnp.where(keep, y + g, -jnp.inf), axis=-1).astype(jnp.int32)
    y = y / temperature
    if 0 < top_k < y.shape[-1]:
        kth = jax.lax.top_k(y, top_k)[0][..., -1:]
        y = jnp.where(y >= kth, y, -jnp.inf)  # ties with the k-th largest stay in
    return jnp.argmax(y + noise[step], axis=-1).astype(jnp.int32)


def _ordered_bits(y):
    """uint32 keys in the order of the floats y (-0.0 counted as +0.0, as float comparison does)."""
    y = jnp.where(y == 0, 0.0, y)
    u = jax.lax.bitcast_convert_type(y, jnp.uint32)
    negative = (u >> 31) == 1
    return jnp.where(negative, ~u, u | jnp.uint32(0x80000000))


def _kernel(*refs, n_parts, has_norm, vocab, lanes, top_k, norm_dim, eps, radix_bits):
    """top_k: the static k of every row, or None: each row's k from k_ref."""
    it = iter(refs)
    step_ref, temp_ref = next(it), next(it)
    k_ref = next(it) if top_k is None else None
    parts_ref = next(it)
    ss_ref = next(it) if has_norm else None
    noise_ref, out_ref = next(it), next(it)
    b = pl.program_id(0)
    lane = jnp.arange(lanes)
    lane_ok = lane < vocab

    y = jnp.zeros((lanes,), jnp.float32)
    for p in range(n_parts):
        y += be.load(parts_ref.at[jnp.int32(p), b, pl.ds(0, lanes)], mask=lane_ok, other=0)
    if has_norm:
        ss = jnp.zeros((1,), jnp.float32)
        for p in range(n_parts):
            ss += be.load(ss_ref.at[jnp.int32(p), pl.ds(b, 1)])
        y = y * jax.lax.rsqrt(ss / norm_dim + eps)
    y = y / be.load(temp_ref.at[pl.ds(b, 1)])

    keep = lane_ok
    k = top_k if k_ref is None else be.load(k_ref.at[pl.ds(b, 1)])
    if k_ref is not None or 0 < top_k < vocab:
        u = jnp.where(lane_ok, _ordered_bits(y), jnp.uint32(0))  # padding lanes rank below everything
        digits = jnp.arange(1 << radix_bits, dtype=jnp.uint32)
        kth = jnp.uint32(0)
        for shift in range(32 - radix_bits, -1, -radix_bits):
            cand = kth | (digits << shift)  # [D]; digit 0 always has count >= k
            counts = jnp.sum((u[None, :] >= cand[:, None]).astype(jnp.int32), axis=1)
            digit = jnp.sum((counts >= k).astype(jnp.int32)) - 1
            kth = kth | (digit.astype(jnp.uint32) << shift)
        keep = lane_ok & (u >= kth)
        if k_ref is not None:  # k <= 0 or k >= V keeps every code
            keep = keep | (lane_ok & ((k <= 0) | (k >= vocab)))

    g = be.load(noise_ref.at[step_ref[0], b, pl.ds(0, lanes)], mask=lane_ok, other=0)
    if k_ref is not None:
        g = jnp.where(k == 1, 0.0, g)  # greedy rows: the first largest, as argmax
    z = jnp.where(keep, y + g, -jnp.inf)
    best = jnp.max(z)
    first = jnp.min(jnp.where(z == best, lane, lanes))  # argmax's tie rule: the first index
    out_ref[0] = first.astype(jnp.int32)


def sample_top_k(
    parts,
    noise,
    step,
    temperature,
    *,
    top_k,
    sumsq=None,
    norm_dim: int = 1,
    eps: float = 0.0,
    num_warps: int | None = None,
    radix_bits: int | None = None,
    interpret: bool = False,
):
    """`sample_top_k_reference` as one Pallas kernel (grid: one program per row). top_k: an int
    for every row, or an int32 array [M] (with temperature float32 [M]): each row its own."""
    per_row = not isinstance(top_k, int)
    return _sample_top_k(
        parts,
        noise,
        step,
        temperature,
        jnp.asarray(top_k, jnp.int32) if per_row else None,
        top_k=None if per_row else top_k,
        sumsq=sumsq,
        norm_dim=norm_dim,
        eps=eps,
        num_warps=num_warps or NUM_WARPS,
        radix_bits=radix_bits or RADIX_BITS,
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("top_k", "norm_dim", "eps", "num_warps", "radix_bits", "interpret"))
def _sample_top_k(
    parts, noise, step, temperature, row_top_k, *, top_k, sumsq, norm_dim, eps, num_warps, radix_bits, interpret
):
    if 32 % radix_bits:
        raise ValueError(f"radix_bits must divide 32, got {radix_bits}")
    if parts.ndim == 2:
        parts = parts[None]
    n_parts, m, vocab = parts.shape
    if noise.ndim != 3 or noise.shape[1:] != (m, vocab):
        raise ValueError(f"noise {noise.shape} does not match logits [{m}, {vocab}]")
    lanes = be.pow2_at_least(vocab)
    full = lambda a: pl.BlockSpec(a.shape, lambda b, nd=a.ndim: (0,) * nd)  # noqa: E731
    args = [jnp.asarray(step, jnp.int32).reshape(1), jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (m,))]
    if row_top_k is not None:
        if row_top_k.shape != (m,):
            raise ValueError(f"per-row top_k {row_top_k.shape} does not match {m} rows")
        args.append(row_top_k)
    args.append(parts.astype(jnp.float32))
    if sumsq is not None:
        args.append(sumsq.astype(jnp.float32))
    args.append(noise.astype(jnp.float32))
    kernel = functools.partial(
        _kernel,
        n_parts=n_parts,
        has_norm=sumsq is not None,
        vocab=vocab,
        lanes=lanes,
        top_k=top_k,
        norm_dim=norm_dim,
        eps=float(eps),
        radix_bits=radix_bits,
    )
    return be.pallas_call(
        kernel,
        grid=(m,),
        in_specs=[full(a) for a in args],
        out_specs=pl.BlockSpec((1,), lambda b: (b,)),
        out_shape=jax.ShapeDtypeStruct((m,), jnp.int32),
        interpret=interpret,
        num_warps=num_warps,
        num_stages=1,
        name="sample_top_k",
    )(*args)
