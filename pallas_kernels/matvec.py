"""Skinny matmul (GEMV): `x [M, K] @ w [K, N]` for a few rows, M <= 64.

At batch 1 every projection of the decoders is a matrix-vector product: the cost is reading W
once, and at M = 1 XLA reads these weights at well under the GPU's bandwidth (it lowers the
small ones to a multiply fusion plus a reduce fusion). This kernel splits the work over enough
programs to keep every SM streaming W. Measured on an H200: docs/KERNELS.md.

Grid: (N blocks, K splits). Program (j, s) owns output columns [j * block_n, (j + 1) * block_n)
and the s-th run of `per_split` consecutive K blocks; it walks its run block by block, loading an
x tile [rows, block_k] (tiny, stays in L1/L2) and a W tile [block_k, block_n], and accumulates
in float32 one of two ways (`method`):

- "dot": the matrix units. x's M rows are padded to a power of two >= 16 (Triton's dot wants
  every dimension >= 16); the padding rows are masked off, so they cost no memory traffic, only
  idle tensor-core work, which is nowhere near the bottleneck.
- "reduce": `sum(x[:, :, None] * w[None], axis=1)` on the CUDA cores, M padded to a power of two
  >= 1. The classic GEMV for M == 1; its register tile grows with M, so it suits only tiny M.

With one split the kernel writes the output (x's dtype) itself. With several it writes float32
partials [splits, M, N] and a jnp sum reduces them; under jit XLA fuses that sum with whatever
consumes the result.

int8 weights (`w_scale=`, one float32 scale per output column): each W tile is loaded as int8
(half the bytes of bf16), converted to x's dtype in registers (exact: |q| <= 127; how is
`int8_convert`, see `_backend.INT8_CONVERTS`) and fed to the same dot; the epilogue multiplies the float32 accumulator by the tile's column scales, so
every split's partial (and the output) is already dequantized. The scale commutes with the sum
over K: the result is `(x @ q) * scale` up to float32 rounding.

Shapes need not be multiples of the blocks: ragged N and K tails use masked loads and stores (no
memory past the arrays is touched), and the masks are left out when the shape divides evenly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _backend as be

MAX_ROWS = 64  # larger M is a real matmul: use jnp.dot (the padded tile would not fit)
TARGET_PROGRAMS = 256  # about two per SM on an H100 / H200 (132 SMs)
METHODS = ("dot", "reduce")
SMALL_W = 8 * 1024 * 1024  # W with fewer elements than this gets K blocks of 64, not 128
WIDE_N = 8192  # int8 [N, K] weights at least this wide (the gate_up projections) get K blocks of 256


class MatvecConfig(NamedTuple):
    block_n: int
    block_k: int
    k_splits: int
    num_warps: int
    num_stages: int
    method: str


def matvec_reference(x, w, w_scale=None):
    """Plain `x @ w` with float32 accumulation, in x's dtype. x [..., K], w [K, N].

    With w_scale [N] (w int8): `(x @ w.astype(x.dtype)) * w_scale`, the scale applied to the
    float32 sum before the result is rounded to x's dtype."""
    if w_scale is None:
        out = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        return out.astype(x.dtype)
    out = jnp.dot(x, w.astype(x.dtype), precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return (out * w_scale.astype(jnp.float32)).astype(x.dtype)


def default_k_splits(m: int, k: int, n: int, block_n: int, block_k: int, target: int = TARGET_PROGRAMS) -> int:
    """The fewest splits (a power of two) giving >= `target` programs.

    Capped at one K block per split, and so that the float32 partials (written once, read once:
    8 * splits * m * n bytes, mostly through L2) stay within half of W's bytes (2 * k * n in bf16).
    """
    n_blocks = pl.cdiv(n, block_n)
    most = max(1, min(pl.cdiv(k, block_k), k // (8 * m)))
    splits = 1
    while n_blocks * splits < target and splits * 2 <= most:
        splits *= 2
    return splits


def default_config(m: int, k: int, n: int, *, int8_nk: bool = False) -> MatvecConfig:
    """Block sizes, splits and pipelining for x [m, k] @ w [k, n].

    Chosen from sweeps on an H200 (bf16, M = 1 and 8, docs/KERNELS.md): the matrix-unit dot,
    64 output columns per program, 4 warps, 3 pipeline stages, and enough K splits for ~256
    programs. K blocks of 128, or of 64 when W has fewer than 8M elements (the small projections:
    more, shorter programs were 2-10% faster there, and 7-16% slower on the big ones). Within 3%
    of the best swept config at every CSM shape; num_stages=2 was up to 30% slower, and
    method="reduce" up to 35% slower on the big shapes (a tie on the small ones). Configs measured
    for more rows on a particular GPU are passed in by the caller (`config=`; the tables live in
    jaxtts.options, keyed by device kind).

    int8_nk: the weight is int8 stored [N, K] (the model's int8 layout). Up to 8 rows, the wide
    ones (N >= 8192: gate_up) then get K blocks of 256 (the same bytes per tile as bf16's 128):
    7.4 vs 8.0 µs at depth gate_up, 11.6 vs 13.2 at backbone gate_up on an H200; the other
    shapes were best at bf16's blocks (docs/PERF.md #77).
    """
    block_n = min(64, be.pow2_at_least(n))
    block_k = min(64 if k * n < SMALL_W else 128, be.pow2_at_least(k))
    if int8_nk and m <= 8 and n >= WIDE_N:
        block_k = min(256, be.pow2_at_least(k))
    splits = default_k_splits(m, k, n, block_n, block_k)
    return MatvecConfig(block_n, block_k, splits, num_warps=4, num_stages=3, method="dot")


def _matvec_kernel(
    *refs, m, k, n, rows, block_n, block_k, per_split, method, compute_dtype, scaled, convert, transposed
):
    if scaled:
        x_ref, w_ref, s_ref, o_ref = refs
    else:
        (x_ref, w_ref, o_ref), s_ref = refs, None
    k_blocks = pl.cdiv(k, block_k)
    lo = pl.program_id(1) * per_split
    # Every split gets `per_split` blocks when they divide evenly (a static trip count, which
    # Triton pipelines best); otherwise the last split stops early at the end of K.
    if k_blocks % per_split == 0:
        lo, hi = 0, per_split
        first = pl.program_id(1) * per_split
    else:
        hi = jnp.minimum(lo + per_split, k_blocks)
        first = 0
    n0 = pl.multiple_of(pl.program_id(0) * block_n, block_n)

    # Static flags: a mask is only built where the shape does not divide evenly.
    row_ok = (jnp.arange(rows) < m)[:, None] if rows != m else None
    col_ok = (n0 + jnp.arange(block_n) < n)[None, :] if n % block_n else None
    col_ok_t = (n0 + jnp.arange(block_n) < n)[:, None] if transposed and n % block_n else None

    def both(a, b):
        if a is None:
            return b
        return a if b is None else a & b

    def body(i, acc):
        start = pl.multiple_of((first + i) * block_k, block_k)
        k_ok = start + jnp.arange(block_k) < k if k % block_k else None
        x_mask = both(row_ok, None if k_ok is None else k_ok[None, :])
        xt = be.load(x_ref.at[pl.ds(0, rows), pl.ds(start, block_k)], mask=x_mask, other=None if x_mask is None else 0)
        if transposed:  # W [N, K]: the tile [block_n, block_k], each row one output column's K run
            w_mask = both(col_ok_t, None if k_ok is None else k_ok[None, :])
            w_at = w_ref.at[pl.ds(n0, block_n), pl.ds(start, block_k)]
        else:
            w_mask = both(None if k_ok is None else k_ok[:, None], col_ok)
            w_at = w_ref.at[pl.ds(start, block_k), pl.ds(n0, block_n)]
        wt = be.load(w_at, mask=w_mask, other=None if w_mask is None else 0)
        float_dtype = compute_dtype if method == "dot" else jnp.float32
        wt = convert(wt, float_dtype) if scaled else wt.astype(float_dtype)
        if method == "dot":
            return acc + be.dot(xt.astype(compute_dtype), wt, trans_b=transposed)
        if transposed:
            return acc + jnp.sum(xt.astype(jnp.float32)[:, None, :] * wt[None, :, :], axis=2)
        prod = xt.astype(jnp.float32)[:, :, None] * wt[None, :, :]
        return acc + jnp.sum(prod, axis=1)

    acc = jax.lax.fori_loop(lo, hi, body, jnp.zeros((rows, block_n), jnp.float32))
    if s_ref is not None:  # int8 W: dequantize the accumulator (the column scales, [block_n])
        s_mask = None if col_ok is None else col_ok[0]
        acc = acc * be.load(s_ref.at[pl.ds(n0, block_n)], mask=s_mask, other=None if s_mask is None else 0)[None, :]
    be.store(o_ref.at[pl.ds(0, rows), pl.ds(n0, block_n)], acc.astype(o_ref.dtype), mask=both(row_ok, col_ok))


@functools.partial(
    jax.jit,
    static_argnames=(
        "config",
        "block_n",
        "block_k",
        "k_splits",
        "num_warps",
        "num_stages",
        "method",
        "int8_convert",
        "partials",
        "w_transposed",
        "interpret",
    ),
)
def matvec(
    x,
    w,
    w_scale=None,
    *,
    config: MatvecConfig | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    k_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    method: str | None = None,
    int8_convert: str = "cvt",
    partials: bool = False,
    w_transposed: bool = False,
    interpret: bool = False,
):
    """`x @ w` for x [..., K] with at most 64 rows in all, w [K, N]; returns [..., N] in x's dtype.

    Accumulates in float32 (float32 inputs stay true float32: no TF32). Mixed dtypes are computed
    in their promoted dtype. K and N need not be multiples of the blocks (masked tails). Any
    argument left None comes from `config` (default: `default_config(M, K, N)`; k_splits from `default_k_splits` for
    the block sizes in use); an explicit one overrides it (block sizes must be powers of two,
    >= 16 for method="dot"). Raises ValueError for more than 64 rows: call jnp.dot there.

    partials=True returns the float32 split partial sums [splits, M, N] unsummed (x must be
    2-D), for a consumer that adds them up itself (pallas_kernels.fused_decode).

    w_scale [N] float32 with w int8 [K, N]: the weight is q * w_scale per column (`x @ q` is
    computed in x's dtype, then scaled in float32; the partials come back scaled).
    int8_convert: how the int8 tiles become floats in registers (`_backend.INT8_CONVERTS`;
    the same values every way).
    w_transposed=True: w is given as [N, K] (each output column's weights contiguous, PyTorch's
    [out, in]); the result is still `x @ w.T`-as-[K, N]. int8 weights stream ~20-35 % faster so
    (docs/PERF.md #73: the tile is K-contiguous, as the matrix units take B); bf16 the same.
    """
    *lead, k = x.shape
    if w.ndim != 2 or w.shape[1 if w_transposed else 0] != k:
        raise ValueError(f"x {x.shape} and w {w.shape}{' (given [N, K])' if w_transposed else ''} do not multiply")
    n = w.shape[0 if w_transposed else 1]
    if w_scale is not None and w_scale.shape != (n,):
        raise ValueError(f"w_scale {w_scale.shape} does not match w {w.shape}: one scale per column")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"matvec takes 1..{MAX_ROWS} rows, got {m}: use jnp.dot")

    cfg = config or default_config(m, k, n, int8_nk=w_scale is not None and w_transposed)
    method = method or cfg.method
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    block_n = block_n or cfg.block_n
    block_k = block_k or cfg.block_k
    floor = be.MIN_DOT_DIM if method == "dot" else 1
    for name, b in (("block_n", block_n), ("block_k", block_k)):
        if b != pl.next_power_of_2(b) or b < floor:
            raise ValueError(f"{name}={b} must be a power of two >= {floor} for method={method!r}")
    k_blocks = pl.cdiv(k, block_k)
    if k_splits is None:  # the config's splits when its blocks are in use
        same = (block_n, block_k) == (cfg.block_n, cfg.block_k)
        k_splits = cfg.k_splits if same else default_k_splits(m, k, n, block_n, block_k)
    k_splits = min(k_splits, k_blocks)
    per_split = pl.cdiv(k_blocks, k_splits)
    k_splits = pl.cdiv(k_blocks, per_split)  # drop splits that would get no block
    num_warps = num_warps or cfg.num_warps
    num_stages = num_stages or cfg.num_stages

    rows = be.pow2_at_least(m, floor)
    n_blocks = pl.cdiv(n, block_n)
    # int8 weights are converted to x's dtype in registers (exact: |q| <= 127 fits in bf16)
    compute_dtype = x2.dtype if w_scale is not None else jnp.promote_types(x2.dtype, w.dtype)
    kernel = functools.partial(
        _matvec_kernel,
        m=m,
        k=k,
        n=n,
        rows=rows,
        block_n=block_n,
        block_k=block_k,
        per_split=per_split,
        method=method,
        compute_dtype=compute_dtype,
        scaled=w_scale is not None,
        convert=functools.partial(be.int8_to, how=int8_convert, interpret=interpret),
        transposed=w_transposed,
    )
    in_specs = [pl.BlockSpec((m, k), lambda j, s: (0, 0)), pl.BlockSpec(w.shape, lambda j, s: (0, 0))]
    args = [x2, w]
    if w_scale is not None:
        in_specs.append(pl.BlockSpec((n,), lambda j, s: (0,)))
        args.append(w_scale.astype(jnp.float32))
    if partials and len(lead) != 1:
        raise ValueError(f"partials=True takes x [M, K], got {x.shape}")
    if k_splits == 1 and not partials:
        out_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
        out_specs = pl.BlockSpec((m, n), lambda j, s: (0, 0))
    else:
        out_shape = jax.ShapeDtypeStruct((k_splits, m, n), jnp.float32)
        out_specs = pl.BlockSpec((None, m, n), lambda j, s: (s, 0, 0))
    out = be.pallas_call(
        kernel,
        grid=(n_blocks, k_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        name="matvec",
    )(*args)
    if partials:
        return out
    if k_splits > 1:
        out = jnp.sum(out, axis=0).astype(x.dtype)
    return out.reshape(*lead, n)
