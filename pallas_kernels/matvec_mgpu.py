"""Skinny matmul (GEMV) `x [M, K] @ w [K, N]` as a Pallas Mosaic GPU kernel for Hopper (sm_90).

The Mosaic GPU counterpart of `pallas_kernels.matvec` (Triton lowering, deprecated since JAX 0.11),
for the decode step's few rows (M <= 8 in CSM-1B; up to 64 bf16 rows are accepted). Not wired into
the model: `matvec_reference` (pallas_kernels.matvec) is what it must reproduce.

One program per (N block, K split), `plgpu.kernel` grid (n_blocks, k_splits), one warpgroup each:

- W streams through shared memory in a `stages`-deep ring of TMA copies ([block_k, block_n] bf16
  tiles, 128-byte swizzle), one mbarrier per slot. The first `stages` W copies are issued before
  anything else: W is a weight, no earlier kernel writes it.
- Then `griddepcontrol.launch_dependents` (the next kernel may start launching: programmatic
  dependent launch, PDL) and `griddepcontrol.wait` (block until the previous kernel in the stream,
  which produced x, has finished and flushed its writes). Only after the wait are x tiles copied
  and the output written.
- The product runs on the tensor cores (wgmma, float32 accumulator [64, block_n]): x's rows are
  the A operand, padded to the 64 rows a warpgroup MMA needs. The TMA copy of an x tile reads
  rows [0, R) with R = M rounded up to 8; rows past M are out of bounds of x, which TMA fills with
  zeros. A rows R..63 are never written (uninitialised shared memory, or another slot's x rows):
  row r of the product depends only on row r of A, so they only reach accumulator rows that are
  never stored. This keeps x's shared-memory ring at ((stages - 1) * R + 64) rows instead of
  stages * 64 (each slot's 64-row A view overlaps the next slots).
- Epilogue: the accumulator goes to shared memory, and one TMA store writes its first M rows:
  the output in x's dtype with one split, else float32 partials [k_splits, M, N] that a jnp sum
  reduces (under jit XLA fuses that sum into its consumer; `partials=True` returns them).

int8 weights (`w_scale=`, issue 18): w int8 [K, N] and one float32 scale per column, as
jaxtts.quantize stores them; the result is `(x @ w.astype(bf16)) * w_scale` (`matvec_reference`'s
and the Triton `matvec`'s int8 semantics). The int8 tiles stream through the same TMA ring (half
the bytes per tile: 64- or 128-byte swizzle, whichever tiles block_n bytes). wgmma reads B from
shared memory only and takes no int8 x bf16 product, so each tile is converted on the way: the
warpgroup loads it into registers in the 8-bit WGMMA layout (4 bytes per thread and load, no bank
conflicts: the lowering's optimized transfer), converts to bf16 (exact for |q| <= 127; Mosaic GPU
does it with a byte permute and a bf16x2 subtract) and stores it into one of two bf16 tiles with
the 128-byte swizzle wgmma wants; `commit_smem` (fence.proxy.async + warpgroup barrier) makes it
visible to the tensor cores. Tile i + 1 is converted while the wgmma on tile i runs (two bf16
tiles), and its int8 slot is refilled as soon as it has been read. The column scales (also a
weight: copied before `griddepcontrol.wait`) multiply the float32 accumulator in the epilogue,
so the output, or each split's partial, comes back dequantized. The weight is never dequantized
outside the kernel. Default config: the bf16 blocks and splits, and the deepest ring up to 6 that
still fits two programs per SM. Written, interpreter- and lowering-tested on CPU; not yet run or
timed on a GPU (`python -m benchmarks.mgpu_check --int8`). The interpreter computes each op on
whole arrays and runs wgmma synchronously (its wgmma_wait is a no-op: JAX 0.10.2), so it cannot
catch a missing fence or a tile overwritten while the tensor cores still read it: that ordering is
argued above, not tested.

float32 x: wgmma wants both operands in one dtype, and rounding x to bf16 would cost ~3 decimal
digits. x is split into three bf16 parts (hi + mid + lo == x to ~2^-24 relative) stacked as 3M
rows of A; bf16 x bf16 products are exact in the float32 accumulator, and the three row groups are
summed after the kernel. So float32 x costs 3x the (idle) tensor-core work and an extra jnp op,
never any extra W traffic.

Shapes: K a multiple of block_k (a multiple of 64), N a multiple of block_n (64, 128, 192 or 256):
every CSM-1B projection qualifies (the heads' N = 2051 does not). No masking: ragged shapes raise
ValueError.

Interpret mode (CPU, tests): `interpret=True` runs the same kernel body in Pallas' Mosaic GPU
interpreter (`InterpretGPUParams`, JAX >= 0.10.2) with `out_of_bounds_reads="uninitialized"`,
so the out-of-bounds x rows read NaN there (zeros on the GPU): a test that passes also shows that
those rows never reach the output. The interpreter has no rule for the two griddepcontrol
primitives (NotImplementedError: "MLIR translation rule for primitive
'griddepcontrol_launch_dependents' not found for platform cpu"), so they are left out when
interpreting; benchmarks/mgpu_interpret_probe.py and docs/KERNELS.md have the details. Nor do
layouts exist there (`plgpu.load(ref, (), layout=...)` fails with an AssertionError): the int8
path's two register loads are plain `ref[...]` when interpreting.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.matvec import matvec_reference  # noqa: F401  (the reference, re-exported)

MMA_ROWS = 64  # a Hopper warpgroup MMA computes 64 rows of the output at a time
ROW_TILE = 8  # x rows are copied in multiples of the 8-row shared-memory tile
SWIZZLE = 128  # bytes: rows of 64 bf16 elements
SWIZZLE_ELEMS = SWIZZLE // 2
MAX_ROWS = MMA_ROWS  # bf16 x; float32 x takes 3 A rows per row, so MAX_ROWS // 3
BLOCK_NS = (64, 128, 192, 256)  # wgmma N must be a multiple of the 64-element swizzle tile, <= 256
MAX_PROGRAMS = 264  # one wave at two programs per SM on an H100 / H200 (132 SMs; <= 113 KB smem each)
SMEM_LIMIT = 227 * 1024  # opt-in shared memory per block on sm_90
SMEM_PER_SM = 228 * 1024  # shared memory per SM on sm_90 (two programs share it)
INT8_MAX_STAGES = 6  # int8 W: the deepest default ring (an int8 tile is half a bf16 tile's bytes)


class MgpuConfig(NamedTuple):
    block_n: int
    block_k: int
    k_splits: int
    stages: int


def _interpret_params(interpret):
    """None (compile for the GPU) or the InterpretGPUParams to run the kernel on CPU with."""
    if interpret is False or interpret is None:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    if isinstance(interpret, InterpretGPUParams):
        return interpret
    # The x copy reads rows past the end of x (TMA fills them with zeros on the GPU); the
    # interpreter raises on that by default.
    return InterpretGPUParams(out_of_bounds_reads="uninitialized")


def default_k_splits(m: int, k: int, n: int, block_n: int, block_k: int, max_programs: int = MAX_PROGRAMS) -> int:
    """The most splits (a power of two dividing K's blocks) that keep the grid to one wave of
    `max_programs`, capped like the Triton kernel's so that the float32 partials (8 * splits * m
    * n bytes written and read) stay within half of W's bytes."""
    k_blocks = k // block_k
    n_blocks = n // block_n
    most = max(1, min(k_blocks, k // (8 * m)))
    splits = 1
    while n_blocks * splits * 2 <= max_programs and splits * 2 <= most and k_blocks % (splits * 2) == 0:
        splits *= 2
    return splits


def default_config(m: int, k: int, n: int, int8: bool = False) -> MgpuConfig:
    """Blocks, splits and pipeline depth for x [m, k] @ w [k, n] (m counts A rows: 3x for f32 x).

    Untuned (written without a GPU; benchmarks/mgpu_check.py --sweep is where to tune): 128
    output columns per program (64 when that gives fewer than 16 N blocks), K blocks of 64 (one
    swizzle tile), a 4-deep W ring, and as many K splits as fit one wave of ~2 programs per SM.
    int8 W (`int8=True`): the same blocks and splits, and the deepest ring up to
    INT8_MAX_STAGES that still fits two programs per SM (an int8 tile carries half the bytes).
    """
    block_n = 128 if n % 128 == 0 and n // 128 >= 16 else 64
    if n % block_n:
        block_n = next((b for b in BLOCK_NS if n % b == 0), 64)
    block_k = 64
    splits = default_k_splits(m, k, n, block_n, block_k) if k % block_k == 0 and n % block_n == 0 else 1
    stages = 4
    if int8:
        stages = INT8_MAX_STAGES
        while stages > 4 and 2 * smem_bytes(m, 4, block_n, block_k, stages, int8=True) > SMEM_PER_SM:
            stages -= 1
    return MgpuConfig(block_n, block_k, splits, stages=stages)


def smem_bytes(a_rows: int, out_itemsize: int, block_n: int, block_k: int, stages: int, int8: bool = False) -> int:
    """Shared memory one program allocates (W ring + overlapped x ring + output tile; for int8 W
    also the two bf16 tiles the tensor cores read and the column scales)."""
    r = -(-a_rows // ROW_TILE) * ROW_TILE
    w_ring = stages * block_k * block_n * (1 if int8 else 2)
    extra = 2 * block_k * block_n * 2 + block_n * 4 if int8 else 0
    return w_ring + extra + ((stages - 1) * r + MMA_ROWS) * block_k * 2 + MMA_ROWS * block_n * out_itemsize


def _top_bf16(x):
    """x's top 16 bits (sign, exponent, 7 mantissa bits) as float32: exactly a bf16 value.

    Truncating by mask rather than rounding through `astype(bfloat16)`: XLA on the GPU may drop
    an f32 -> bf16 -> f32 round trip as excess precision (`xla_allow_excess_precision`), which
    made `x - hi` zero there and left float32 x rounded to bf16 (measured on the H200)."""
    bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFF0000)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _split3(x):
    """float32 x as three bf16 parts stacked on rows: hi + mid + lo == x to ~2^-24 relative."""
    hi = _top_bf16(x)
    r1 = x - hi  # exact: hi holds x's leading bits
    mid = _top_bf16(r1)
    lo = r1 - mid
    return jnp.concatenate([hi, mid, lo], axis=0).astype(jnp.bfloat16)  # hi, mid exact; lo rounded


def _kernel(
    *refs,
    a_rows,
    r,
    steps,
    block_n,
    block_k,
    stages,
    pdl,
    dynamic_x_rows,
    int8,
    interpreting,
):
    if int8:
        x_gmem, w_gmem, s_gmem, o_gmem, x_smem, w_smem, o_smem, w_bar, x_bar, wb_smem, s_smem, s_bar = refs
    else:
        x_gmem, w_gmem, o_gmem, x_smem, w_smem, o_smem, w_bar, x_bar = refs
    j = lax.axis_index("n")
    s = lax.axis_index("s")
    n_slice = pl.ds(j * block_n, block_n)
    k_base = s * (steps * block_k)
    # x has `a_rows` rows; the copy reads `r` (a multiple of 8). When r > a_rows the rows past the
    # end are out of bounds, which TMA fills with zeros; a dynamic start keeps Pallas' static bounds
    # check from rejecting the slice.
    x_row0 = (j * 0) if dynamic_x_rows else 0

    def k_slice(step):
        return pl.ds(k_base + step * block_k, block_k)

    def copy_w(step, slot):
        plgpu.copy_gmem_to_smem(w_gmem.at[k_slice(step), n_slice], w_smem.at[slot], w_bar.at[slot])

    def copy_x(step, slot):
        plgpu.copy_gmem_to_smem(
            x_gmem.at[pl.ds(x_row0, r), k_slice(step)], x_smem.at[pl.ds(slot * r, r)], x_bar.at[slot]
        )

    def load(ref, layout):
        """ref's value in registers with `layout` (the interpreter has no layouts: a plain load)."""
        return ref[...] if interpreting else plgpu.load(ref, (), layout=layout)

    prologue = min(stages, steps)
    for i in range(prologue):  # W does not depend on the previous kernel: start streaming it now
        copy_w(i, i)
    if int8:  # nor do W's column scales
        plgpu.copy_gmem_to_smem(s_gmem.at[n_slice], s_smem, s_bar.at[0])
    if pdl:
        plgpu.griddepcontrol_launch_dependents()
        plgpu.griddepcontrol_wait()  # x (and our output buffer) belong to earlier kernels
    for i in range(prologue):
        copy_x(i, i)

    def scope(acc):
        def step_body(i, carry):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(w_bar.at[slot])
            plgpu.barrier_wait(x_bar.at[slot])
            a = x_smem.at[pl.ds(slot * r, MMA_ROWS)]
            plgpu.wgmma(acc, a, w_smem.at[slot])
            plgpu.wgmma_wait(0)  # the slot's tiles are consumed: refill it

            @pl.when(i + stages < steps)
            def _():
                copy_w(i + stages, slot)
                copy_x(i + stages, slot)

            return carry

        def convert(step):
            """int8 W tile `step` -> registers (4 bytes per load, the 8-bit WGMMA layout) -> bf16
            (exact: |q| <= 127) -> bf16 tile step % 2, swizzled as wgmma reads it."""
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(w_bar.at[slot])
            wb_smem[lax.rem(step, 2)] = load(w_smem.at[slot], plgpu.Layout.WGMMA_8BIT).astype(jnp.bfloat16)
            # Fence + warpgroup barrier: every thread's stores are visible to the tensor cores (the
            # async proxy), and every thread has read the int8 slot, so TMA may refill it now.
            plgpu.commit_smem()

            @pl.when(step + stages < steps)
            def _():
                copy_w(step + stages, slot)

        def int8_step_body(i, carry):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(x_bar.at[slot])
            plgpu.wgmma(acc, x_smem.at[pl.ds(slot * r, MMA_ROWS)], wb_smem.at[lax.rem(i, 2)])

            @pl.when(i + 1 < steps)
            def _():
                convert(i + 1)  # into the other bf16 tile while the tensor cores read this one

            plgpu.wgmma_wait(0)  # x's slot is consumed, and so is bf16 tile i % 2

            @pl.when(i + stages < steps)
            def _():
                copy_x(i + stages, slot)

            return carry

        if int8:
            convert(0)
            step_body = int8_step_body
        lax.fori_loop(0, steps, step_body, None)
        out = acc[...]
        if int8:  # dequantize: W = q * scale per column, and the scale commutes with the sum over K
            plgpu.barrier_wait(s_bar.at[0])
            scale = load(s_smem, plgpu.Layout.WGMMA.reduce(0))
            out = out * lax.broadcast_in_dim(scale, out.shape, [1])
        o_smem[...] = out.astype(o_smem.dtype)

    pl.run_scoped(scope, plgpu.ACC((MMA_ROWS, block_n), jnp.float32))
    plgpu.commit_smem()
    rows = pl.ds(0, a_rows)
    dst = o_gmem.at[s] if len(o_gmem.shape) == 3 else o_gmem
    plgpu.copy_smem_to_gmem(o_smem.at[rows], dst.at[:, n_slice])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(
    jax.jit,
    static_argnames=("config", "block_n", "block_k", "k_splits", "stages", "pdl", "partials", "interpret"),
)
def matvec_mgpu(
    x,
    w,
    w_scale=None,
    *,
    config: MgpuConfig | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    k_splits: int | None = None,
    stages: int | None = None,
    pdl: bool = True,
    partials: bool = False,
    interpret=False,
):
    """`x @ w` for x [..., K] (bfloat16 or float32, at most 64 bf16 / 21 f32 rows in all) and w
    [K, N] bfloat16; returns [..., N] in x's dtype, accumulated in float32.

    int8 weights: w int8 [K, N] with `w_scale` float32 [N] (one scale per column, as
    jaxtts.quantize stores them) computes `(x @ w.astype(bf16)) * w_scale`: each W tile is copied
    as int8 and converted in the kernel, and the scale multiplies the float32 accumulator before
    the output (or each split's partial) is written, like `matvec(x, w, w_scale)`.

    Arguments left None come from `config` (default `default_config`). K must be a multiple of
    block_k (a multiple of 64) and N of block_n (64, 128, 192 or 256); k_splits must divide K's
    blocks. `pdl=False` leaves out the griddepcontrol instructions (they are always left out when
    interpreting). `partials=True` returns the float32 per-split sums [k_splits', M, N] unsummed
    (x must be 2-D; for float32 x, k_splits' = 3 * k_splits: the hi/mid/lo parts are split sums
    too). `interpret`: False (compile for the GPU), True (the Mosaic GPU interpreter on CPU), or an
    `InterpretGPUParams`.
    """
    *lead, k = x.shape
    if w.ndim != 2 or w.shape[0] != k:
        raise ValueError(f"x {x.shape} and w {w.shape} do not multiply")
    int8 = w.dtype == jnp.int8
    if w.dtype != jnp.bfloat16 and not int8:
        raise ValueError(f"w must be bfloat16, or int8 with w_scale, got {w.dtype}")
    if int8 != (w_scale is not None):
        raise ValueError(
            "int8 w needs w_scale (float32 [N], one scale per column)"
            if int8
            else f"w_scale is for int8 w, got {w.dtype} w"
        )
    if int8 and (w_scale.dtype != jnp.float32 or w_scale.shape != (w.shape[1],)):
        raise ValueError(
            f"w_scale must be float32 [{w.shape[1]}] (one scale per column of w {w.shape}), "
            f"got {w_scale.dtype} {w_scale.shape}"
        )
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
    if partials and len(lead) != 1:
        raise ValueError(f"partials=True takes x [M, K], got {x.shape}")
    n = w.shape[1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    parts = 3 if x.dtype == jnp.float32 else 1
    a_rows = parts * m
    if not 1 <= a_rows <= MMA_ROWS:
        raise ValueError(f"matvec_mgpu takes 1..{MMA_ROWS // parts} {x.dtype} rows, got {m}: use jnp.dot")

    cfg = config or default_config(a_rows, k, n, int8=int8)
    block_n = block_n or cfg.block_n
    block_k = block_k or cfg.block_k
    stages = stages or cfg.stages
    if block_n not in BLOCK_NS:
        raise ValueError(f"block_n={block_n} must be one of {BLOCK_NS}")
    if block_k % SWIZZLE_ELEMS or block_k <= 0:
        raise ValueError(f"block_k={block_k} must be a positive multiple of {SWIZZLE_ELEMS}")
    if k % block_k or n % block_n:
        raise ValueError(f"K={k} and N={n} must be multiples of block_k={block_k} and block_n={block_n}")
    k_blocks = k // block_k
    if k_splits is None:
        same = (block_n, block_k) == (cfg.block_n, cfg.block_k)
        k_splits = cfg.k_splits if same else default_k_splits(a_rows, k, n, block_n, block_k)
    if not 1 <= k_splits <= k_blocks or k_blocks % k_splits:
        raise ValueError(f"k_splits={k_splits} must divide K's {k_blocks} blocks of {block_k}")
    if stages < 1:
        raise ValueError(f"stages={stages} must be >= 1")
    steps = k_blocks // k_splits
    stages = min(stages, steps)

    a = _split3(x2) if parts == 3 else x2
    r = -(-a_rows // ROW_TILE) * ROW_TILE
    params = _interpret_params(interpret)

    write_partials = partials or k_splits > 1 or parts > 1
    if write_partials:
        out_type = jax.ShapeDtypeStruct((k_splits, a_rows, n), jnp.float32)
    else:
        out_type = jax.ShapeDtypeStruct((a_rows, n), x.dtype)
    need = smem_bytes(a_rows, out_type.dtype.itemsize, block_n, block_k, stages, int8=int8)
    if need > SMEM_LIMIT:
        raise ValueError(f"{need} bytes of shared memory > {SMEM_LIMIT}: lower stages, block_n or block_k")

    tiles = (plgpu.TilingTransform((ROW_TILE, SWIZZLE_ELEMS)), plgpu.SwizzleTransform(SWIZZLE))
    scratch = [
        plgpu.SMEM(((stages - 1) * r + MMA_ROWS, block_k), jnp.bfloat16, transforms=tiles),
        plgpu.SMEM((stages, block_k, block_n), jnp.bfloat16, transforms=tiles),
        plgpu.SMEM((MMA_ROWS, block_n), out_type.dtype),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
    ]
    operands = [a, w]
    if int8:
        # The int8 ring: rows of block_n bytes, swizzled by the widest pattern that tiles them
        # (128 bytes; 64 for block_n 64 and 192). The tensor cores read the converted bf16 tile.
        i8_swizzle = SWIZZLE if block_n % SWIZZLE == 0 else SWIZZLE // 2
        i8_tiles = (plgpu.TilingTransform((ROW_TILE, i8_swizzle)), plgpu.SwizzleTransform(i8_swizzle))
        scratch[1] = plgpu.SMEM((stages, block_k, block_n), jnp.int8, transforms=i8_tiles)
        scratch += [
            plgpu.SMEM((2, block_k, block_n), jnp.bfloat16, transforms=tiles),
            plgpu.SMEM((block_n,), jnp.float32),
            plgpu.Barrier(num_barriers=1),
        ]
        operands.append(w_scale)
    kernel = functools.partial(
        _kernel,
        a_rows=a_rows,
        r=r,
        steps=steps,
        block_n=block_n,
        block_k=block_k,
        stages=stages,
        pdl=pdl and params is None,
        dynamic_x_rows=r > a_rows,
        int8=int8,
        interpreting=params is not None,
    )
    out = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(n // block_n, k_splits),
        grid_names=("n", "s"),
        scratch_types=scratch,
        interpret=params,
        kernel_name="matvec_mgpu_int8" if int8 else "matvec_mgpu",
    )(*operands)

    if partials:
        return out.reshape(k_splits * parts, m, n)  # rows were (part, m): a free reshape
    if write_partials:
        out = jnp.sum(out.reshape(k_splits * parts, m, n), axis=0).astype(x.dtype)
    return out.reshape(*lead, n)
