"""A decoder block's decode step between two attentions — out projection → residual → RMSNorm →
gate/up → SwiGLU → down → residual → the next block's RMSNorm → qkv — as one persistent Pallas
Mosaic GPU kernel for Hopper (sm_90). Issue #17, docs/KERNELS.md "the depth step as one
persistent kernel", step 2 without the attention: per block, one launch of this and one of the
attention, where today's fused step launches eight kernels.

`blocks` programs (<= the SM count: they wait for each other, so all must be resident), phases
separated by grid barriers (a global counter, `pl.get_global`):

    P1  h_out = h + o @ W_out           unit j < D/64: 64 columns, all of K; the unit also writes
                                        x = bf16(h_out * s_mlp) and each row's sum of squares
                                        over its columns (what a normed GEMV reads)
        ---- barrier ----
    P2  act = silu(g) * u               unit p < F/64: gate columns p and up columns p, all of K;
        [g | u] = (x @ W_gate_up) * rsqrt(sum of the sums of squares / D + eps)
        ---- barrier ----
    P3  h_out += act @ W_down           unit (j, s): 64 columns, K split s of down_splits, added
                                        into h_out with a TMA reduce-add (cp.reduce.async.bulk)
        ---- barrier ----
        norm                            unit j < D/64 reads h_out's finished columns back and
                                        writes x = bf16(h_out * s_attn) and the sums of squares
        ---- barrier ----
    P4  qkv = (x @ W_qkv) * rsqrt(...)  unit j < Nq/64 (the last two left out for the last
                                        block: W_qkv None)

Program b takes the units b, b + blocks, ... of each phase. Its weight tiles ([block_k, 64]
bf16, 128-byte swizzle) stream through one `stages`-deep ring of TMA copies in the order the
program consumes them, across the phases: a tile is refilled as soon as its products are done,
with whatever tile comes `stages` later, even one of a later phase. Weights depend on nothing,
so while a program waits at a barrier its ring holds the next phase's first tiles, in flight or
landed (the Hazy-style overlap the plan asks for; block_tail_mgpu restarted a ring per phase).
`critical_first` issues only P1's tiles at the start and the rest of the first fill once P1's
products are done, so that the critical path's tiles do not wait behind 16 MB of prefetch.

Activations: each phase reads its whole input row (K) once, bf16, into 8-row slots that wgmma
reads as A (block_tail_mgpu's layout); o's rows are copied before the weight ring fills. The
norm factor multiplies the accumulator after the last K step (as `fused_decode.norm_matvec`
does), and the residual stream stays float32 inside the kernel. (A first version normed P2's
and P4's float32 rows in registers, chunk by chunk, as a register A operand: ~1 µs per K step
on the H200, docs/PERF.md session 12.)

Rows: always 8 (o and h padded with zeros, outputs sliced; block_tail_mgpu's finding). The
reduce-add makes P3's sum order vary run to run (float32 rounding only).

Interpret mode (CPU tests): Pallas' Mosaic GPU interpreter runs a grid's programs one after
another and has no semaphores and no TMA reductions. With `blocks=1` one program does every
unit of every phase, so the ring's order across phases is exercised and no barrier is needed;
the reduce-add becomes load + add + store. Everything else is the GPU's code.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# CHUNK (64: K elements per wgmma, and here also a unit's columns), ROWS (8 activation rows,
# M <= ROWS padded) and the row-slot helpers are block_tail_mgpu's: the same activation layout.
from pallas_kernels.block_tail_mgpu import CHUNK, MMA_ROWS, ROWS, _load_x, _tiles, _x_rows, _x_view
from pallas_kernels.matvec_mgpu import SMEM_LIMIT, _interpret_params

MAX_STAGES = 8


class SpanConfig(NamedTuple):
    blocks: int = 128  # programs (<= SM count); 1 in the interpreter
    stages: int = 8  # weight tiles in flight per program
    block_k: int = 128  # K rows of a weight tile
    down_splits: int = 8  # K splits of the down projection (its units: D/64 x down_splits)
    overlap: bool = False  # refill a step's slots while the next step's products run
    out_splits: int = 1  # K splits of the out projection (> 1: partials, summed by a norm phase)
    qkv_splits: int = 1  # K splits of qkv (> 1: qkv comes back as partial sums)
    critical_first: bool = False  # fill the ring with P1's tiles first, the rest once P1's are in


# --- reference ------------------------------------------------------------------------------------


def _norm_dot(h, scale, w, eps):
    """(bf16(h * scale) @ w) * rsqrt(mean(h²) + eps) in float32: RMSNorm folded into a GEMV."""
    f32 = jnp.float32
    r = lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    x = (h * scale.astype(f32)).astype(w.dtype)
    return jnp.dot(x, w, preferred_element_type=f32) * r


def between_attention_reference(o, h, w_out, mlp_scale, w_gate_up, w_down, attn_scale=None, w_qkv=None, *, eps):
    """(h_out, qkv) in jnp, float32: h2 = h + o @ W_out; h_out = h2 + swiglu(rmsnorm(h2) @
    W_gate_up) @ W_down; qkv = rmsnorm(h_out) @ W_qkv (None without W_qkv). The GEMVs take bf16
    operands (o, the normed rows, act) and accumulate in float32."""
    f32 = jnp.float32
    h2 = h.astype(f32) + jnp.dot(o.astype(w_out.dtype), w_out, preferred_element_type=f32)
    g, u = jnp.split(_norm_dot(h2, mlp_scale, w_gate_up, eps), 2, axis=-1)
    act = (g / (1.0 + jnp.exp(-g)) * u).astype(w_down.dtype)
    h_out = h2 + jnp.dot(act, w_down, preferred_element_type=f32)
    qkv = None if w_qkv is None else _norm_dot(h_out, attn_scale, w_qkv, eps)
    return h_out, qkv


def tile_weights(*weights):
    """Each [K, N] weight re-laid as [N/64, K, 64], so that a unit's 64 columns are one contiguous
    slab (row-major, a weight tile is 128-byte pieces one matrix row apart). None stays None."""
    return tuple(None if w is None else w.reshape(w.shape[0], -1, CHUNK).transpose(1, 0, 2) for w in weights)


def _kn(w):
    """(K, N) of a weight, row-major [K, N] or from tile_weights [N/64, K, 64]."""
    return (w.shape[1], w.shape[0] * w.shape[2]) if w.ndim == 3 else tuple(w.shape)


# --- shapes and config ----------------------------------------------------------------------------


class _Dims(NamedTuple):
    hd: int  # K of W_out
    d: int  # model width
    f: int  # MLP width
    nq: int  # qkv width (0: no P4)
    splits: int  # down K splits
    out_splits: int = 1  # out projection K splits
    qkv_splits: int = 1  # qkv K splits

    @property
    def units(self):  # per phase
        d, os, qs = self.d // CHUNK, self.out_splits, self.qkv_splits
        return (d * os, self.f // CHUNK, d * self.splits, self.nq // CHUNK * qs)

    def tiles(self, block_k):  # weight tiles per unit, per phase
        return (
            self.hd // self.out_splits // block_k,
            2 * self.d // block_k,
            self.f // self.splits // block_k,
            self.d // self.qkv_splits // block_k,
        )

    @property
    def chunks(self):  # K chunks of 64 each phase reads into its rows (P1: all of o, P4: all of x)
        return (self.hd // CHUNK, self.d // CHUNK, self.f // self.splits // CHUNK, self.d // CHUNK)

    @property
    def unit_chunks(self):  # K chunks of 64 one unit of P1 / P4 multiplies (its K split)
        return self.hd // self.out_splits // CHUNK, self.d // self.qkv_splits // CHUNK

    @property
    def phases(self):
        return (0, 1, 2, 3) if self.nq else (0, 1, 2)


def smem_bytes(dims: _Dims, cfg: SpanConfig) -> int:
    """One program's shared memory: the weight ring, the bf16 rows wgmma reads as A, the sums of
    squares, and the epilogue tiles."""
    ring = cfg.stages * cfg.block_k * CHUNK * 2
    rows = _x_rows(max(dims.chunks)) * CHUNK * 2
    sums = _sum_rows(dims.out_splits) * CHUNK * 4 if dims.out_splits > 1 else 0
    buffers = ring + rows + sums + dims.d // CHUNK * MMA_ROWS * 4 + (CHUNK + MMA_ROWS) * 4 + MMA_ROWS * CHUNK * (4 + 2)
    return buffers + SMEM_RESERVE


SMEM_RESERVE = 4096  # barriers and the allocator's alignment (measured: ~3.7 KB over the buffers' sum)


def _sum_rows(out_splits: int) -> int:
    # The out projection's sum: h and its K splits' partials in 8-row slots, each read through a
    # 64-row window (as _x_rows' chunks are)
    return out_splits * ROWS + MMA_ROWS


def _splits_within(units: int, blocks: int, k: int, block_k: int) -> int:
    """The most K splits (a power of two) of a phase of `units` column units that keep its units
    within `blocks` programs and each split a whole number of block_k tiles."""
    splits = 1
    while units * splits * 2 <= blocks and k % (splits * 2 * block_k) == 0:
        splits *= 2
    return splits


def config_for(hd: int, d: int, f: int, nq: int = 0, *, blocks: int = 128, spread: bool = False) -> SpanConfig | None:
    """The config for these widths: `blocks` programs, down split so that its units number
    `blocks` (or as near as divides), the deepest ring up to MAX_STAGES that fits; None when the
    widths do not tile. `spread`: the out projection and qkv split over K as well, so that their
    phases too run on (nearly) every program."""
    cfg = SpanConfig(blocks=blocks)
    if any(w % CHUNK for w in (hd, d, f, nq)) or hd % cfg.block_k or d % cfg.block_k:
        return None
    splits = max(1, blocks // (d // CHUNK))
    while splits > 1 and (f % splits or (f // splits) % cfg.block_k):
        splits //= 2
    if f % splits or (f // splits) % cfg.block_k:
        return None
    cfg = cfg._replace(down_splits=splits)
    if spread:  # one program (the interpreter) splits as 128 would: the same path runs
        grid = blocks if blocks > 1 else 128
        cfg = cfg._replace(
            out_splits=_splits_within(d // CHUNK, grid, hd, cfg.block_k),
            qkv_splits=_splits_within(nq // CHUNK, grid, d, cfg.block_k) if nq else 1,
        )
    dims = _dims_of(hd, d, f, nq, cfg)
    for stages in range(MAX_STAGES, 1, -1):
        cfg = cfg._replace(stages=stages)
        if smem_bytes(dims, cfg) <= SMEM_LIMIT:
            return cfg
    return None


def _dims_of(hd, d, f, nq, cfg: SpanConfig) -> _Dims:
    return _Dims(hd, d, f, nq, cfg.down_splits, cfg.out_splits, cfg.qkv_splits)


# --- the kernel -----------------------------------------------------------------------------------


class _Bufs(NamedTuple):
    """The kernel's shared memory besides the weight ring (what each is for: `_kernel`)."""

    stage: object
    sums: object  # h and the out projection's partials (out_splits > 1)
    nbar: object
    act_stage: object
    xb: object
    x1bar: object
    x2bar: object
    x3bar: object
    ebar: object
    sbar: object
    scale_cols: object
    ss_stage: object
    ss_all: object


def _kernel(dims: _Dims, cfg: SpanConfig, eps: float, interpreting: bool, tiled: bool):
    g_count, stages, bk = cfg.blocks, cfg.stages, cfg.block_k
    units, tiles, chunks = dims.units, dims.tiles(bk), dims.chunks
    phases = dims.phases
    per_k = bk // CHUNK  # chunks per weight tile
    f32, bf16 = jnp.float32, jnp.bfloat16

    def load(ref, layout):
        return ref[...] if interpreting else plgpu.load(ref, (), layout=layout, optimized=False)

    def body(*refs):
        (o, h, w_out, s_mlp, w_gu, w_down, s_attn, w_qkv, h_out, act, qkv, x_rows, ss, out_parts, ring, ring_bar) = refs
        d_units, q_units = dims.d // CHUNK, dims.nq // CHUNK
        os_, qs_ = dims.out_splits, dims.qkv_splits
        k1, k4 = dims.unit_chunks
        b = lax.axis_index("b")

        # This program's units per phase, and where each phase's tiles start in its sequence.
        counts = [jnp.maximum((units[p] - b + g_count - 1) // g_count, 0) for p in phases]
        starts = [jnp.int32(0)]
        for p in phases:
            starts.append(starts[-1] + counts[p] * tiles[p])
        total = starts[-1]

        def tile_src(p, unit, t):
            """The weight tile t of phase p's unit: a [block_k, 64] slice of a row-major weight,
            or of a weight from `tile_weights` ([N/64, K, 64]: each unit's columns contiguous)."""
            if p == 0:
                j, t = lax.rem(unit, d_units), (unit // d_units) * (dims.hd // os_ // bk) + t
            if p == 3:
                j, t = lax.rem(unit, q_units), (unit // q_units) * (dims.d // qs_ // bk) + t
            if tiled:
                if p == 0:
                    return w_out.at[j, pl.ds(t * bk, bk)]
                if p == 1:
                    return w_gu.at[unit + lax.rem(t, 2) * (dims.f // CHUNK), pl.ds((t // 2) * bk, bk)]
                if p == 2:
                    j, s = lax.rem(unit, dims.d // CHUNK), unit // (dims.d // CHUNK)
                    return w_down.at[j, pl.ds(s * (dims.f // dims.splits) + t * bk, bk)]
                return w_qkv.at[j, pl.ds(t * bk, bk)]
            if p == 0:
                return w_out.at[pl.ds(t * bk, bk), pl.ds(j * CHUNK, CHUNK)]
            if p == 1:  # gate tile and up tile alternate, one K step each
                col = unit * CHUNK + lax.rem(t, 2) * dims.f
                return w_gu.at[pl.ds((t // 2) * bk, bk), pl.ds(col, CHUNK)]
            if p == 2:
                j, s = lax.rem(unit, dims.d // CHUNK), unit // (dims.d // CHUNK)
                return w_down.at[pl.ds(s * (dims.f // dims.splits) + t * bk, bk), pl.ds(j * CHUNK, CHUNK)]
            return w_qkv.at[pl.ds(t * bk, bk), pl.ds(j * CHUNK, CHUNK)]

        def issue(g):
            """Start the copy of this program's g-th weight tile into ring slot g % stages."""
            slot = lax.rem(g, stages)
            for p in phases:

                @pl.when((g >= starts[p]) & (g < starts[p + 1]))
                def _():
                    local = g - starts[p]
                    unit = b + (local // tiles[p]) * g_count
                    plgpu.copy_gmem_to_smem(
                        tile_src(p, unit, lax.rem(local, tiles[p])), ring.at[slot], ring_bar.at[slot]
                    )

        def gemv(p, i, accs, xb, x0=0):
            """accs[w] += x @ (tile w of each K step) over the i-th unit of phase p, x's rows in
            xb's 8-row slots from chunk x0 on; each ring slot is refilled as soon as its products
            are done."""
            per_step = len(accs)
            base = starts[p] + i * tiles[p]
            steps = tiles[p] // per_step

            def refill(g0):
                for w in range(per_step):

                    @pl.when(g0 + w + stages < total)
                    def _():
                        issue(g0 + w + stages)

            def step(k, _):
                g0 = base + k * per_step
                for w in range(per_step):
                    plgpu.barrier_wait(ring_bar.at[lax.rem(g0 + w, stages)])
                for c in range(per_k):
                    a = _x_view(xb, x0 + k * per_k + c)
                    for w, acc in enumerate(accs):
                        plgpu.wgmma(acc, a, ring.at[lax.rem(g0 + w, stages)].at[pl.ds(c * CHUNK, CHUNK)])
                if cfg.overlap:  # only the previous step's products must be done to refill its slots
                    plgpu.wgmma_wait(per_k * per_step)

                    @pl.when(k >= 1)
                    def _():
                        refill(g0 - per_step)

                else:
                    plgpu.wgmma_wait(0)
                    refill(g0)

            lax.fori_loop(0, steps, step, None)
            if cfg.overlap:
                plgpu.wgmma_wait(0)
                refill(base + (steps - 1) * per_step)

        sem = None if g_count == 1 else pl.get_global(plgpu.SemaphoreType.REGULAR)

        def barrier(done_phases):
            if sem is not None:
                pl.semaphore_signal(sem)
                pl.semaphore_wait(sem, value=g_count * done_phases, decrement=False)

        def store_rows(src, dst, **kw):
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(src.at[pl.ds(0, ROWS)], dst, **kw)
            plgpu.wait_smem_to_gmem(0)

        def units_of(p, fn):
            """fn(i, unit) for each of this program's units of phase p."""

            @pl.loop(0, counts[p])
            def _(i):
                fn(i, b + i * g_count)

        def norm_factor(ss):
            r = lax.rsqrt(ss * (1.0 / dims.d) + eps)
            return lax.broadcast_in_dim(r, (MMA_ROWS, CHUNK), [0])

        def normed_rows(bufs, h_val, scale, unit):
            """Write what a normed GEMV reads for columns `unit` of a complete float32 row block
            h_val (WGMMA layout, rows past 8 unused): x = bf16(h * scale) and each row's sum of
            squares over these columns."""
            plgpu.copy_gmem_to_smem(scale.at[unit], bufs.scale_cols, bufs.sbar)
            plgpu.barrier_wait(bufs.sbar)
            s = load(bufs.scale_cols, plgpu.Layout.WGMMA.reduce(0))
            bufs.act_stage[...] = (h_val * lax.broadcast_in_dim(s, h_val.shape, [1])).astype(bf16)
            bufs.ss_stage[...] = jnp.sum(h_val * h_val, axis=1)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(bufs.act_stage.at[pl.ds(0, ROWS)], x_rows.at[:, pl.ds(unit * CHUNK, CHUNK)])
            plgpu.copy_smem_to_gmem(bufs.ss_stage, ss.at[unit])

        def finish_columns(bufs, h2, unit):
            """Write h2, the complete float32 residual of 64 columns (WGMMA layout), to h_out and
            P2's normed rows of those columns."""
            bufs.stage[...] = h2
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(bufs.stage.at[pl.ds(0, ROWS)], h_out.at[:, pl.ds(unit * CHUNK, CHUNK)])
            normed_rows(bufs, h2, s_mlp, unit)
            plgpu.wait_smem_to_gmem(0)

        def p1_out(bufs):
            """h_out = h + o @ W_out for 64 columns, and P2's normed rows of them."""

            def unit_body(i, unit):
                cols = pl.ds(unit * CHUNK, CHUNK)
                plgpu.copy_gmem_to_smem(h.at[:, cols], bufs.stage.at[pl.ds(0, ROWS)], bufs.ebar)

                def with_acc(acc):
                    with jax.named_scope("gemv"):
                        gemv(0, i, [acc], bufs.xb)
                    plgpu.barrier_wait(bufs.ebar)
                    finish_columns(bufs, load(bufs.stage, plgpu.Layout.WGMMA) + acc[...], unit)

                pl.run_scoped(with_acc, plgpu.ACC((MMA_ROWS, CHUNK), f32))

            def split_body(i, unit):  # out_splits > 1: this K split's partial sum, stored
                j, s = lax.rem(unit, d_units), unit // d_units

                def with_acc(acc):
                    with jax.named_scope("gemv"):
                        gemv(0, i, [acc], bufs.xb, x0=s * k1)
                    bufs.stage[...] = acc[...]
                    store_rows(bufs.stage, out_parts.at[s, :, pl.ds(j * CHUNK, CHUNK)])

                pl.run_scoped(with_acc, plgpu.ACC((MMA_ROWS, CHUNK), f32))

            @pl.when(counts[0] > 0)
            @jax.named_scope("rows")
            def _():
                plgpu.barrier_wait(bufs.x1bar)  # o's rows, copied before the weights

            units_of(0, unit_body if os_ == 1 else split_body)

        def sum_out(bufs):
            """out_splits > 1: the column owners add h and the out projection's partials, write
            h_out and P2's normed rows of their columns."""

            @pl.loop(b, d_units, step=g_count)
            def _(unit):
                cols = pl.ds(unit * CHUNK, CHUNK)
                plgpu.copy_gmem_to_smem(h.at[:, cols], bufs.sums.at[pl.ds(0, ROWS)], bufs.nbar)
                for s_ in range(os_):
                    plgpu.copy_gmem_to_smem(
                        out_parts.at[s_, :, cols], bufs.sums.at[pl.ds((s_ + 1) * ROWS, ROWS)], bufs.nbar
                    )
                plgpu.barrier_wait(bufs.nbar)
                h2 = load(bufs.sums.at[pl.ds(0, MMA_ROWS)], plgpu.Layout.WGMMA)
                for s_ in range(1, os_ + 1):
                    h2 = h2 + load(bufs.sums.at[pl.ds(s_ * ROWS, MMA_ROWS)], plgpu.Layout.WGMMA)
                finish_columns(bufs, h2, unit)

        def norm_rows_of_h_out(bufs):
            """P4's normed rows: after P3's reduce-adds no unit owns whole columns of h_out, so the
            column owners read the finished columns back and write x and the sums of squares."""

            @pl.loop(b, dims.d // CHUNK, step=g_count)
            def _(unit):
                plgpu.copy_gmem_to_smem(
                    h_out.at[:, pl.ds(unit * CHUNK, CHUNK)], bufs.stage.at[pl.ds(0, ROWS)], bufs.ebar
                )
                plgpu.barrier_wait(bufs.ebar)
                normed_rows(bufs, load(bufs.stage, plgpu.Layout.WGMMA), s_attn, unit)
                plgpu.wait_smem_to_gmem(0)

        def normed_gemv(p, bufs, epilogue):
            """P2 / P4: acc[w] = (x @ tile w) * rsqrt(mean(h²) + eps) for this program's units,
            x and the sums of squares as the column owners wrote them; epilogue(unit, normed accs)."""

            @pl.when(counts[p] > 0)
            @jax.named_scope("rows")
            def _():
                _load_x(x_rows, 0, chunks[p], bufs.xb, bufs.x2bar)
                plgpu.copy_gmem_to_smem(ss, bufs.ss_all, bufs.x2bar)
                plgpu.barrier_wait(bufs.x2bar)

            n_acc = 2 if p == 1 else 1

            def unit_body(i, unit):
                x0 = (unit // q_units) * k4 if p == 3 else 0

                def with_acc(*accs):
                    with jax.named_scope("gemv"):
                        gemv(p, i, list(accs), bufs.xb, x0=x0)
                    row = plgpu.Layout.WGMMA.reduce(1)
                    total_ss = load(bufs.ss_all.at[0], row)
                    for t in range(1, dims.d // CHUNK):
                        total_ss = total_ss + load(bufs.ss_all.at[t], row)
                    r = norm_factor(total_ss)
                    epilogue(unit, [acc[...] * r for acc in accs])

                pl.run_scoped(with_acc, *[plgpu.ACC((MMA_ROWS, CHUNK), f32)] * n_acc)

            units_of(p, unit_body)

        def swiglu_out(bufs):
            def epilogue(unit, accs):
                gate, up = accs
                bufs.act_stage[...] = (gate / (1.0 + jnp.exp(-gate)) * up).astype(bf16)
                store_rows(bufs.act_stage, act.at[:, pl.ds(unit * CHUNK, CHUNK)])

            return epilogue

        def qkv_out(bufs):
            def epilogue(unit, accs):  # K split s of columns j (the norm factor is linear)
                j, s_ = lax.rem(unit, q_units), unit // q_units
                bufs.stage[...] = accs[0]
                store_rows(bufs.stage, qkv.at[s_, :, pl.ds(j * CHUNK, CHUNK)])

            return epilogue

        def p3_down(bufs):
            """h_out += act[:, K split s] @ W_down[K split s, 64 columns] (TMA reduce-add)."""

            def unit_body(i, unit):
                cols = pl.ds(lax.rem(unit, dims.d // CHUNK) * CHUNK, CHUNK)
                with jax.named_scope("rows"):
                    _load_x(act, (unit // (dims.d // CHUNK)) * chunks[2], chunks[2], bufs.xb, bufs.x3bar)
                    plgpu.barrier_wait(bufs.x3bar)

                def with_acc(acc):
                    with jax.named_scope("gemv"):
                        gemv(2, i, [acc], bufs.xb)
                    bufs.stage[...] = acc[...]

                pl.run_scoped(with_acc, plgpu.ACC((MMA_ROWS, CHUNK), f32))
                if interpreting:  # no TMA reduce-add there; one program at a time, so no race
                    plgpu.copy_gmem_to_smem(h_out.at[:, cols], bufs.stage.at[pl.ds(ROWS, ROWS)], bufs.ebar)
                    plgpu.barrier_wait(bufs.ebar)
                    bufs.stage[pl.ds(0, ROWS)] = bufs.stage[pl.ds(0, ROWS)] + bufs.stage[pl.ds(ROWS, ROWS)]
                    store_rows(bufs.stage, h_out.at[:, cols])
                else:
                    store_rows(bufs.stage, h_out.at[:, cols], reduction_op="add")

            units_of(2, unit_body)

        def all_phases(*refs):
            bufs = _Bufs(*refs)

            @pl.when(counts[0] > 0)
            def _():
                _load_x(o, 0, chunks[0], bufs.xb, bufs.x1bar)  # tiny, and needed first: ahead of the weights

            # The named scopes are what Mosaic GPU's profiler records (`profile_dir=`).
            # Weights depend on nothing: the ring fills now. critical_first: only P1's tiles (every
            # later phase waits for P1), the rest once P1's products are done, so that P1's tiles
            # do not queue behind the later phases' prefetch.
            first = jnp.minimum(starts[1], total) if cfg.critical_first else total
            with jax.named_scope("fill"):
                for g in range(stages):

                    @pl.when(g < first)
                    def _():
                        issue(jnp.int32(g))

            done = 0

            def next_barrier():
                nonlocal done
                done += 1
                with jax.named_scope(f"barrier {done}"):
                    barrier(done)

            with jax.named_scope("P1 out"):
                p1_out(bufs)
            if cfg.critical_first:
                with jax.named_scope("fill rest"):
                    for g in range(stages):

                        @pl.when((g >= first) & (g < total))
                        def _():
                            issue(jnp.int32(g))

            next_barrier()
            if os_ > 1:
                with jax.named_scope("P1 sum"):
                    sum_out(bufs)
                next_barrier()
            with jax.named_scope("P2 gate_up"):
                normed_gemv(1, bufs, swiglu_out(bufs))
            next_barrier()
            with jax.named_scope("P3 down"):
                p3_down(bufs)
            if dims.nq:
                next_barrier()
                with jax.named_scope("P3 norm"):
                    norm_rows_of_h_out(bufs)
                next_barrier()
                with jax.named_scope("P4 qkv"):
                    normed_gemv(3, bufs, qkv_out(bufs))

        pl.run_scoped(
            all_phases,
            plgpu.SMEM((MMA_ROWS, CHUNK), f32),  # stage: float32 epilogue tile
            plgpu.SMEM((_sum_rows(os_) if os_ > 1 else ROWS, CHUNK), f32),  # sums: h + out partials
            plgpu.Barrier(num_arrivals=os_ + 1),  # nbar: those
            plgpu.SMEM((MMA_ROWS, CHUNK), bf16),  # act_stage: bf16 epilogue tile
            plgpu.SMEM((_x_rows(max(chunks)), CHUNK), bf16, transforms=_tiles(CHUNK)),  # xb: A rows
            plgpu.Barrier(num_arrivals=chunks[0]),  # x1bar: o
            plgpu.Barrier(num_arrivals=chunks[1] + 1),  # x2bar: normed rows + sums of squares
            plgpu.Barrier(num_arrivals=chunks[2]),  # x3bar: act's K split
            plgpu.Barrier(num_barriers=1),  # ebar: an h / h_out tile
            plgpu.Barrier(num_barriers=1),  # sbar: norm weights of 64 columns
            plgpu.SMEM((CHUNK,), f32),  # scale_cols
            plgpu.SMEM((MMA_ROWS,), f32),  # ss_stage
            plgpu.SMEM((dims.d // CHUNK, MMA_ROWS), f32),  # ss_all
        )

    return body


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret", "profile_dir", "qkv_parts"))
def between_attention_mgpu(
    o,
    h,
    w_out,
    mlp_scale,
    w_gate_up,
    w_down,
    attn_scale=None,
    w_qkv=None,
    *,
    eps: float,
    config: SpanConfig | None = None,
    interpret=False,
    profile_dir: str | None = None,
    qkv_parts: bool = False,
):
    """(h_out [M, D] float32, qkv [M, Nq] float32 or None); `between_attention_reference` is the
    definition. `qkv_parts`: qkv as its K splits' partial sums [qkv_splits, M, Nq] instead (what
    `fused_decode.attention_step` takes), not summed here. o [M, Hd] (bf16 for wgmma), h [M, D], W_out [Hd, D], W_gate_up [D, 2F] ([gate |
    up]), W_down [F, D], W_qkv [D, Nq] or None (the last block), all bf16; M <= 8.

    config: default `config_for(...)` with 128 programs on a GPU, 1 program when interpreted.
    interpret=True runs it in Pallas' Mosaic GPU interpreter on CPU (needs config.blocks == 1).
    Weights may also come from `tile_weights` (each unit's columns contiguous), all four or none.
    profile_dir: write Mosaic GPU's profile of the named phases there (a Chrome trace per call)."""
    params = _interpret_params(interpret)
    weights = (w_out, w_gate_up, w_down, w_qkv)
    tiled = w_out.ndim == 3
    if any(w is not None and w.ndim != w_out.ndim for w in weights):
        raise ValueError("pass the weights all row-major ([K, N]) or all from tile_weights")
    if tiled and any(w is not None and w.shape[2] != CHUNK for w in weights):
        raise ValueError("tiled weights must come from tile_weights ([N/64, K, 64])")
    s_out, s_gu, s_down, s_qkv = (None if w is None else _kn(w) for w in weights)
    m, hd = o.shape
    d = s_out[1]
    f = s_down[0]
    nq = 0 if w_qkv is None else s_qkv[1]
    if h.shape != (m, d) or s_out[0] != hd or s_gu != (d, 2 * f) or s_down != (f, d):
        raise ValueError(f"shapes do not chain: o {o.shape} h {h.shape} W_out {s_out} W_gate_up {s_gu} W_down {s_down}")
    if w_qkv is not None and (s_qkv[0] != d or attn_scale is None):
        raise ValueError(f"W_qkv {s_qkv} needs {d} rows and attn_scale")
    if not 1 <= m <= ROWS:
        raise ValueError(f"between_attention_mgpu takes 1..{ROWS} rows, got {m}")
    for name, w in (("W_out", w_out), ("W_gate_up", w_gate_up), ("W_down", w_down), ("W_qkv", w_qkv)):
        if w is not None and w.dtype != jnp.bfloat16:
            raise ValueError(f"{name} must be bfloat16, got {w.dtype}")
    cfg = config or config_for(hd, d, f, nq, blocks=1 if params is not None else 128)
    if cfg is None:
        raise ValueError(f"widths hd={hd} d={d} f={f} nq={nq} do not tile by 64 and block_k")
    if params is not None and cfg.blocks != 1:
        raise ValueError("the interpreter runs programs one after another: pass a config with blocks=1")
    dims = _dims_of(hd, d, f, nq, cfg)
    bk = cfg.block_k
    if bk % CHUNK or hd % bk or d % bk or f % cfg.down_splits or (f // cfg.down_splits) % bk:
        raise ValueError(
            f"hd={hd}, d={d} and f/down_splits={f}/{cfg.down_splits} must be multiples of block_k={bk} (itself of {CHUNK})"
        )
    if hd % (cfg.out_splits * bk) or d % (cfg.qkv_splits * bk):
        raise ValueError(
            f"hd={hd} / out_splits={cfg.out_splits} and d={d} / qkv_splits={cfg.qkv_splits} must be multiples of block_k={bk}"
        )
    if smem_bytes(dims, cfg) > SMEM_LIMIT:
        raise ValueError(f"{smem_bytes(dims, cfg)} bytes of shared memory > {SMEM_LIMIT}: lower stages")

    f32 = jnp.float32
    pad = lambda a: jnp.pad(a, ((0, ROWS - m), (0, 0)))  # noqa: E731
    if w_qkv is not None:
        w_qkv_in = w_qkv
    else:  # never read
        w_qkv_in = jnp.zeros((1, d, CHUNK) if tiled else (d, CHUNK), jnp.bfloat16)
    s_attn = (attn_scale if attn_scale is not None else jnp.zeros((d,))).astype(f32)
    kernel = plgpu.kernel(
        _kernel(dims, cfg, eps, params is not None, tiled),
        out_type=(
            jax.ShapeDtypeStruct((ROWS, d), f32),
            jax.ShapeDtypeStruct((ROWS, f), jnp.bfloat16),
            jax.ShapeDtypeStruct((cfg.qkv_splits, ROWS, max(nq, CHUNK)), f32),  # qkv's partial sums
            jax.ShapeDtypeStruct((ROWS, d), jnp.bfloat16),  # normed rows: P1 -> P2, P3 -> P4
            jax.ShapeDtypeStruct((d // CHUNK, MMA_ROWS), f32),  # their sums of squares
            jax.ShapeDtypeStruct((cfg.out_splits, ROWS, d), f32),  # the out projection's partials
        ),
        grid=(cfg.blocks,),
        grid_names=("b",),
        scratch_types=[
            plgpu.SMEM((cfg.stages, cfg.block_k, CHUNK), jnp.bfloat16, transforms=_tiles(CHUNK)),
            plgpu.Barrier(num_barriers=cfg.stages),
        ],
        interpret=params,
        compiler_params=plgpu.CompilerParams(profile_space=64, profile_dir=profile_dir) if profile_dir else None,
        kernel_name="between_attention_mgpu",
    )
    h_out, _, qkv, _, _, _ = kernel(
        pad(o.astype(jnp.bfloat16)),
        pad(h.astype(f32)),
        w_out,
        mlp_scale.astype(f32).reshape(-1, CHUNK),
        w_gate_up,
        w_down,
        s_attn.reshape(-1, CHUNK),
        w_qkv_in,
    )
    if not nq:
        return h_out[:m], None
    return h_out[:m], (qkv[:, :m] if qkv_parts else jnp.sum(qkv[:, :m], axis=0))
