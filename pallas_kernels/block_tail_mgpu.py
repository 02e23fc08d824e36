"""The tail of a decoder block's decode step (out projection → residual → RMSNorm → gate/up →
SwiGLU → down) as one persistent Pallas Mosaic GPU kernel for Hopper (sm_90). Issue #17.

At batch 1 a depth-decoder step is bound by kernel boundaries, not by bytes: each boundary costs
~3.3 µs on the H200 against ~2.3 µs for a grid barrier inside one kernel (docs/PERF.md, session 6,
rows 25), and a barrier can hide behind weights that are already streaming. Today the tail of a
block is five kernels (out GEMV, residual + norm fusion, gate_up GEMV, SwiGLU fusion, down GEMV;
`pallas_kernels.fused_decode`). Here it is one launch of `blocks` programs (<= the SM count, one
per SM: every program must be resident, since they wait for each other) in three phases:

    P1  h2 = h + o @ W_out            per 64-column tile j < D/64, whole K (no split): the program
                                      owning tile j has complete columns, so it also writes
                                      x2 = bf16(h2 * mlp_norm_scale) and ss[j] = sum over its
                                      columns of h2² (per row)
        ---- grid barrier: a global counter reaches D/64 ----
    P2  act = silu(g) * u, [g | u] = (x2 @ W_gate_up) * rsqrt(sum_j ss[j] / D + eps)
                                      per pair of 64-column tiles (gate tile p, up tile p)
        ---- grid barrier: the counter reaches D/64 + F/64 ----
    P3  parts[s] = act[:, K_s] @ W_down[K_s, :]   per (128-column tile, K split s): float32
                                      partials that the next block's residual add sums (XLA)

Before anything else every program issues the first weight-tile copies (TMA) of P1 and P2, and
its P3 copies as soon as its P2 products are done (P2 and P3 share one ring): weights are not
written by anyone, so each phase's first tiles are in flight when its barrier opens, and the
barrier's latency hides behind them. Each phase loads its activations once, all of K at a time.
Measured on the H200 (docs/PERF.md, session 7): correct, but slower than the five kernels; the
phases stream at ~2.7 TB/s. `DecodeOptions(block_tail=True)` is off by default.

Each phase is also a kernel of its own (`fused=False`): three launches, the same phase bodies.
That is how the CPU tests run it (Pallas' Mosaic GPU interpreter has no semaphores, and it runs a
grid's programs one after another, so a program could not wait for a later one), and it is the
A/B for the barrier. Cross-program ordering follows `benchmarks/mgpu_barrier_probe.py` (checked on
the H200: no stale reads): TMA stores, `wait_smem_to_gmem(0)`, then `semaphore_signal`; readers
`semaphore_wait` (no decrement) and then issue their TMA loads.

Rows: 1..8, always run as 8 (o and h padded with zeros, the outputs sliced). Activations are
copied 8 rows at a time in 64-column chunks, each chunk's rows at an 8-row slot; a wgmma reads 64
rows from there, the rest being other chunks' rows, which reach only accumulator rows that are
never stored. At M = 1 (copies of 1 row, TMA zero-filling the other 7 of a slot, or 8-row
buffers with 7 rows never written) the H200 gave wrong down partials while P1, P2 and M = 8 were
right; the cause is not isolated (docs/PERF.md, session 7), so M < 8 is padded. Weights bfloat16; h bfloat16 or float32 (h2 is written in h's
dtype, rounded where `fused_decode.add_residual` rounds). The norm factor is applied after the
gate/up matmul, as in `fused_decode.norm_matvec`, so the kernel and `block_tail_reference` agree
to rounding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.matvec_mgpu import SMEM_LIMIT, _interpret_params

CHUNK = 64  # K elements per wgmma: one 128-byte swizzle row of bf16
ROWS = 8  # activation rows copied per chunk (M <= ROWS)
MMA_ROWS = 64
PAIR_N = 64  # columns of each tile of the P2 / P3 weight ring (gate|up, or the two halves of P3)


class TailConfig(NamedTuple):
    blocks: int = 128  # programs of the fused kernel (<= SM count); F/64 and P3's programs equal it
    stages: int = 3  # P2 / P3 weight-ring depth (steps in flight)
    block_k: int = 128  # K rows of a P2 / P3 weight tile
    out_block_k: int = 128  # K rows of a P1 weight tile (P1: D/64 programs of 64 columns)
    out_stages: int = 4
    overlap: bool = False  # refill a ring slot while the next step's wgmma run (needs stages >= 2)
    down_splits: int = 16  # K splits of the down projection (partials the next residual add sums)


def config_for(d: int, f: int, blocks: int | None = None, *, fused: bool = True) -> TailConfig | None:
    """The kernel's config for model width d and MLP width f: one program per gate/up tile pair
    (F/64 of them, 128 in CSM-1B's backbone and depth decoder), and as many down splits as make
    the down projection the same number of programs; None when the widths do not divide so (or,
    for the fused kernel, when P1 would need more programs than that)."""
    blocks = blocks or f // PAIR_N
    cfg = TailConfig(blocks=blocks)
    if d % (2 * PAIR_N) or f % PAIR_N or blocks != f // PAIR_N or blocks % (d // (2 * PAIR_N)):
        return None
    cfg = cfg._replace(down_splits=blocks // (d // (2 * PAIR_N)))
    if (f // cfg.down_splits) % cfg.block_k or (fused and d // PAIR_N > blocks):
        return None
    # The deepest P1 ring that fits next to the rest (float32 h, the widest case).
    dims = _Dims(ROWS, d, d, f, d // PAIR_N, f // PAIR_N, d // (2 * PAIR_N), blocks, f // cfg.down_splits)
    while cfg.out_stages > 1 and smem_bytes(dims, 4, cfg) > SMEM_LIMIT:
        cfg = cfg._replace(out_stages=cfg.out_stages - 1)
    return cfg


# --- reference ------------------------------------------------------------------------------------


def block_tail_reference(o, h, w_out, mlp_scale, w_gate_up, w_down, *, eps):
    """(h2, down) in jnp: h2 = h + o @ W_out (in h's dtype, the product rounded to it first, as
    `fused_decode.add_residual` does), down = swiglu(rmsnorm(h2) @ W_gate_up) @ W_down in float32."""
    f32 = jnp.float32
    prod = jnp.dot(o, w_out, preferred_element_type=f32)
    h2 = (h.astype(f32) + prod.astype(h.dtype).astype(f32)).astype(h.dtype)
    h2f = h2.astype(f32)
    r = lax.rsqrt(jnp.mean(h2f * h2f, axis=-1, keepdims=True) + eps)
    x = (h2f * mlp_scale.astype(f32)).astype(w_gate_up.dtype)
    gu = jnp.dot(x, w_gate_up, preferred_element_type=f32) * r
    g, u = jnp.split(gu, 2, axis=-1)
    act = (g / (1.0 + jnp.exp(-g)) * u).astype(w_down.dtype)
    return h2, jnp.dot(act, w_down, preferred_element_type=f32)


# --- shapes -------------------------------------------------------------------------------------


class _Dims(NamedTuple):
    m: int  # rows
    hd: int  # attention output width (K of W_out)
    d: int  # model width
    f: int  # MLP width
    n1: int  # P1 programs (D / 64)
    n2: int  # P2 programs: gate/up tile pairs (F / 64)
    n3_tiles: int  # P3 column tiles (D / 128)
    n3: int  # P3 programs (tiles x splits)
    k3: int  # P3 K rows per program


def tile_weights(w_out, w_gate_up, w_down):
    """The three weights re-laid so that each program's slab is contiguous in memory: W_out
    [D/64, Hd, 64] (P1's column tiles), W_gate_up [F/64, D, 128] (gate tile p | up tile p) and
    W_down [D/128, F, 128] (P3's column tiles; a K split reads a contiguous run of rows). The
    row-major [K, N] forms make every weight tile a set of 128-byte pieces one matrix row apart."""
    hd, d = w_out.shape
    f = w_down.shape[0]
    tiles = lambda w, n: w.reshape(w.shape[0], -1, n).transpose(1, 0, 2)  # noqa: E731
    gate, up = tiles(w_gate_up[:, :f], PAIR_N), tiles(w_gate_up[:, f:], PAIR_N)
    return tiles(w_out, PAIR_N), jnp.concatenate([gate, up], axis=-1), tiles(w_down, 2 * PAIR_N)


def _untiled_shapes(w_out, w_gate_up, w_down):
    """(W_out, W_gate_up, W_down) shapes in the row-major [K, N] form, tiled or not."""
    if w_out.ndim == 3:
        return (
            (w_out.shape[1], w_out.shape[0] * w_out.shape[2]),
            (w_gate_up.shape[1], w_gate_up.shape[0] * w_gate_up.shape[2]),
            (w_down.shape[1], w_down.shape[0] * w_down.shape[2]),
        )
    return w_out.shape, w_gate_up.shape, w_down.shape


def _dims(o, h, w_out, w_gate_up, w_down, cfg: TailConfig) -> _Dims:
    m, hd = o.shape
    if not w_out.ndim == w_gate_up.ndim == w_down.ndim and w_out.ndim in (2, 3):
        raise ValueError("pass the three weights row-major ([K, N]) or all three from tile_weights")
    if w_out.ndim == 3 and (w_out.shape[2], w_gate_up.shape[2], w_down.shape[2]) != (PAIR_N, 2 * PAIR_N, 2 * PAIR_N):
        raise ValueError(f"tiled weights {w_out.shape} {w_gate_up.shape} {w_down.shape} are not tile_weights'")
    s_out, s_gu, s_down = _untiled_shapes(w_out, w_gate_up, w_down)
    d = s_out[1]
    f = s_down[0]
    if h.shape != (m, d) or s_out[0] != hd or s_gu != (d, 2 * f) or s_down != (f, d):
        raise ValueError(
            f"shapes do not chain: o {o.shape} h {h.shape} W_out {w_out.shape} "
            f"W_gate_up {w_gate_up.shape} W_down {w_down.shape}"
        )
    if not 1 <= m <= ROWS:
        raise ValueError(f"block_tail_mgpu takes 1..{ROWS} rows, got {m}")
    for name, w in (("W_out", w_out), ("W_gate_up", w_gate_up), ("W_down", w_down)):
        if w.dtype != jnp.bfloat16:
            raise ValueError(f"{name} must be bfloat16, got {w.dtype}")
    if o.dtype != jnp.bfloat16:
        raise ValueError(f"o must be bfloat16, got {o.dtype}")
    bk, bk1, s3 = cfg.block_k, cfg.out_block_k, cfg.down_splits
    if bk % CHUNK or bk1 % CHUNK or hd % bk1 or d % bk or d % (2 * PAIR_N) or f % PAIR_N or f % s3 or (f // s3) % bk:
        raise ValueError(
            f"widths hd={hd} d={d} f={f} do not tile: hd by out_block_k={bk1}, d by block_k={bk}, "
            f"128, f/down_splits={f}/{s3} by block_k"
        )
    n3_tiles = d // (2 * PAIR_N)
    return _Dims(m, hd, d, f, d // PAIR_N, f // PAIR_N, n3_tiles, n3_tiles * s3, f // s3)


def _tiles(cols: int):
    """Tiling + swizzle of a bf16 shared-memory tile `cols` wide (the swizzle spans one row)."""
    return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(cols * 2))


def _x_rows(chunks: int) -> int:
    # An activation chunk c (ROWS rows x 64) sits at rows [8c, 8c + 8); its 64-row MMA view
    # [8c, 8c + 64) overlaps the next chunks' rows, which reach only accumulator rows >= ROWS.
    return (chunks - 1) * ROWS + MMA_ROWS


# --- building blocks ------------------------------------------------------------------------------


class _Refs:
    """The kernel's refs by name, and what differs in the interpreter (no register layouts)."""

    def __init__(self, interpreting: bool, tiled: bool, **refs):
        self.interpreting = interpreting
        self.tiled = tiled  # weights from tile_weights
        self.__dict__.update(refs)

    def load(self, ref, layout):
        """ref's value in registers with `layout` (the interpreter has no layouts: a plain load)."""
        return ref[...] if self.interpreting else plgpu.load(ref, (), layout=layout, optimized=False)


def _load_x(src, chunk0, chunks: int, xbuf, bar):
    """Copy the 8 activation rows (ROWS-row buffers; rows past M are never stored) of columns
    [64 * chunk0, 64 * (chunk0 + chunks)) into xbuf, all at once on one barrier of `chunks`
    arrivals: chunk c's rows at [8c, 8c + 8)."""
    for c in range(chunks):
        cols = pl.ds((chunk0 + c) * CHUNK, CHUNK)
        plgpu.copy_gmem_to_smem(src.at[:, cols], xbuf.at[pl.ds(c * ROWS, ROWS)], bar)


def _x_view(xbuf, chunk):
    return xbuf.at[pl.ds(chunk * ROWS, MMA_ROWS)]


class _WStream:
    """A program's weight tiles, `steps` K steps of `block_k` rows each (one or two tiles a step,
    one per accumulator), through a `stages`-deep ring of TMA copies."""

    def __init__(self, srcs, ring, bars, steps, block_k, stages, overlap=False):
        self.srcs, self.ring, self.bars = srcs, ring, bars
        self.steps, self.block_k, self.stages = steps, block_k, min(stages, steps)
        self.overlap = overlap and self.stages >= 2

    def _copy(self, step, slot):
        for src, ring, bar in zip(self.srcs, self.ring, self.bars):
            plgpu.copy_gmem_to_smem(src(pl.ds(step * self.block_k, self.block_k)), ring.at[slot], bar.at[slot])

    def issue(self):
        """The first `stages` copies: weights depend on nothing, so this may run before any wait."""
        for i in range(self.stages):
            self._copy(i, i)

    def run(self, accs, xbuf, chunk0=0):
        """accs[t] += x @ tiles[t], x's chunks from `chunk0` in xbuf (already loaded)."""
        per_step = self.block_k // CHUNK

        def body(i, carry):
            slot = lax.rem(i, self.stages)
            for bar in self.bars:
                plgpu.barrier_wait(bar.at[slot])
            for c in range(per_step):
                a = _x_view(xbuf, chunk0 + i * per_step + c)
                for acc, ring in zip(accs, self.ring):
                    plgpu.wgmma(acc, a, ring.at[slot].at[pl.ds(c * CHUNK, CHUNK)])
            if self.overlap:
                # Only the previous step's products must be done: its slot is refilled while this
                # step's run on the tensor cores.
                plgpu.wgmma_wait(per_step * len(accs))
                prev = i - 1

                @pl.when((i >= 1) & (prev + self.stages < self.steps))
                def _():
                    self._copy(prev + self.stages, lax.rem(prev, self.stages))

            else:
                plgpu.wgmma_wait(0)  # the slot is consumed: refill it

                @pl.when(i + self.stages < self.steps)
                def _():
                    self._copy(i + self.stages, slot)

            return carry

        lax.fori_loop(0, self.steps, body, None)
        if self.overlap:
            plgpu.wgmma_wait(0)


# --- phases -------------------------------------------------------------------------------------
#
# Each phase is (issue(program), run(program)): `issue` starts the program's weight stream
# (it needs nothing from earlier phases), `run` waits for nothing itself; the caller orders it.


def _phase1(r, dims: _Dims, cfg: TailConfig, eps, fused):
    """h2 = h + o @ W_out and x2 = bf16(h2 * mlp_scale), columns [j*64, (j+1)*64)."""
    del eps, fused
    bn = PAIR_N

    def stream(j):
        cols = pl.ds(j * bn, bn)
        return _WStream(
            [lambda ks: r.w_out.at[j, ks, :] if r.tiled else r.w_out.at[ks, cols]],
            [r.w1],
            [r.w1_bar],
            dims.hd // cfg.out_block_k,
            cfg.out_block_k,
            cfg.out_stages,
            cfg.overlap,
        )

    def run(j):
        cols = pl.ds(j * bn, bn)
        rows = pl.ds(0, dims.m)  # 64 columns: >= 128 bytes a row, so exact rows may be copied
        _load_x(r.o, 0, dims.hd // CHUNK, r.xbuf, r.x1_bar)

        def scoped(h_smem, scale_smem, h2_smem, x2_smem, ss_smem, bar):
            plgpu.copy_gmem_to_smem(r.h.at[rows, cols], h_smem.at[rows], bar.at[0])
            plgpu.copy_gmem_to_smem(r.scale.at[cols], scale_smem, bar.at[1])
            plgpu.barrier_wait(r.x1_bar)

            def with_acc(acc):
                stream(j).run([acc], r.xbuf)
                plgpu.barrier_wait(bar.at[0])
                plgpu.barrier_wait(bar.at[1])
                hdt = h_smem.dtype
                prod = acc[...].astype(hdt).astype(jnp.float32)
                h_in = r.load(h_smem, plgpu.Layout.WGMMA).astype(jnp.float32)
                h2 = (h_in + prod).astype(hdt)
                scale = r.load(scale_smem, plgpu.Layout.WGMMA.reduce(0))
                h2_smem[...] = h2
                h2 = h2.astype(jnp.float32)
                x2_smem[...] = (h2 * lax.broadcast_in_dim(scale, h2.shape, [1])).astype(jnp.bfloat16)
                ss_smem[...] = jnp.sum(h2 * h2, axis=1)  # this tile's share of each row's sum of squares

            pl.run_scoped(with_acc, plgpu.ACC((MMA_ROWS, bn), jnp.float32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(h2_smem.at[rows], r.h2.at[rows, cols])
            plgpu.copy_smem_to_gmem(x2_smem.at[rows], r.x2.at[rows, cols])
            plgpu.copy_smem_to_gmem(ss_smem, r.ss.at[j])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((MMA_ROWS, bn), r.h.dtype),
            plgpu.SMEM((bn,), jnp.float32),
            plgpu.SMEM((MMA_ROWS, bn), r.h.dtype),
            plgpu.SMEM((MMA_ROWS, bn), jnp.bfloat16),
            plgpu.SMEM((MMA_ROWS,), jnp.float32),
            plgpu.Barrier(num_barriers=2),
        )

    return (lambda j: stream(j).issue()), run


def _pair_stream(r, cfg: TailConfig, srcs, steps: int) -> _WStream:
    """A P2 or P3 weight stream: two tiles a step through the ring the two phases share."""
    return _WStream(srcs, [r.wa, r.wb], [r.wa_bar, r.wb_bar], steps, cfg.block_k, cfg.stages, cfg.overlap)


def _stream3(r, dims: _Dims, cfg: TailConfig, q):
    j = lax.rem(q, dims.n3_tiles)
    k0 = (q // dims.n3_tiles) * dims.k3
    halves = [pl.ds(j * 2 * PAIR_N, PAIR_N), pl.ds(j * 2 * PAIR_N + PAIR_N, PAIR_N)]
    return _pair_stream(
        r,
        cfg,
        [
            lambda ks, c=c, t=t: (
                r.w_down.at[j, pl.ds(k0 + ks.start, ks.size), pl.ds(t * PAIR_N, PAIR_N)]
                if r.tiled
                else r.w_down.at[pl.ds(k0 + ks.start, ks.size), c]
            )
            for t, c in enumerate(halves)
        ],
        dims.k3 // cfg.block_k,
    )


def _phase2(r, dims: _Dims, cfg: TailConfig, eps, fused):
    """act[:, p*64:(p+1)*64] = silu(g) * u, [g | u] = (x2 @ W_gate_up) * rmsnorm factor of h2.
    Fused: when its products are done, the program starts its P3 weight stream (same ring)."""

    def stream(p):
        cols = [pl.ds(p * PAIR_N, PAIR_N), pl.ds(dims.f + p * PAIR_N, PAIR_N)]
        return _pair_stream(
            r,
            cfg,
            [
                lambda ks, c=c, t=t: (
                    r.w_gate_up.at[p, ks, pl.ds(t * PAIR_N, PAIR_N)] if r.tiled else r.w_gate_up.at[ks, c]
                )
                for t, c in enumerate(cols)
            ],
            dims.d // cfg.block_k,
        )

    def run(p):
        rows = pl.ds(0, dims.m)
        _load_x(r.x2, 0, dims.d // CHUNK, r.xbuf, r.x2_bar)

        def scoped(ss_smem, act_smem, bar):
            plgpu.copy_gmem_to_smem(r.ss, ss_smem, bar)
            plgpu.barrier_wait(r.x2_bar)

            def with_acc(acc_g, acc_u):
                stream(p).run([acc_g, acc_u], r.xbuf)
                if fused:  # P3's first weight tiles stream in while this program finishes and waits
                    _stream3(r, dims, cfg, p).issue()
                plgpu.barrier_wait(bar)
                # The norm's row factor from P1's per-tile sums of squares.
                row_layout = plgpu.Layout.WGMMA.reduce(1)
                ss = r.load(ss_smem.at[0], row_layout)
                for t in range(1, dims.n1):
                    ss = ss + r.load(ss_smem.at[t], row_layout)
                factor = lax.rsqrt(ss * (1.0 / dims.d) + eps)
                factor = lax.broadcast_in_dim(factor, (MMA_ROWS, PAIR_N), [0])
                g = acc_g[...] * factor
                u = acc_u[...] * factor
                act_smem[...] = (g / (1.0 + jnp.exp(-g)) * u).astype(jnp.bfloat16)

            pl.run_scoped(
                with_acc, plgpu.ACC((MMA_ROWS, PAIR_N), jnp.float32), plgpu.ACC((MMA_ROWS, PAIR_N), jnp.float32)
            )
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(act_smem.at[rows], r.act.at[rows, pl.ds(p * PAIR_N, PAIR_N)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((dims.n1, MMA_ROWS), jnp.float32),
            plgpu.SMEM((MMA_ROWS, PAIR_N), jnp.bfloat16),
            plgpu.Barrier(num_barriers=1),
        )

    return (lambda p: stream(p).issue()), run


def _phase3(r, dims: _Dims, cfg: TailConfig, eps, fused):
    """parts[s][:, tile j] (128 columns as two halves) for program q = s * n3_tiles + j."""
    del eps, fused

    def run(q):
        rows = pl.ds(0, dims.m)
        j = lax.rem(q, dims.n3_tiles)
        s = q // dims.n3_tiles
        chunks = dims.k3 // CHUNK
        _load_x(r.act, s * chunks, chunks, r.xbuf, r.x3_bar)

        def scoped(out_smem):
            plgpu.barrier_wait(r.x3_bar)

            def with_acc(acc_a, acc_b):
                _stream3(r, dims, cfg, q).run([acc_a, acc_b], r.xbuf)
                out_smem[:, pl.ds(0, PAIR_N)] = acc_a[...]
                out_smem[:, pl.ds(PAIR_N, PAIR_N)] = acc_b[...]

            pl.run_scoped(
                with_acc, plgpu.ACC((MMA_ROWS, PAIR_N), jnp.float32), plgpu.ACC((MMA_ROWS, PAIR_N), jnp.float32)
            )
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[rows], r.parts.at[s].at[:, pl.ds(j * 2 * PAIR_N, 2 * PAIR_N)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM((MMA_ROWS, 2 * PAIR_N), jnp.float32))

    return (lambda q: _stream3(r, dims, cfg, q).issue()), run


# --- the kernels ----------------------------------------------------------------------------------

_INPUTS = ("o", "h", "w_out", "scale", "w_gate_up", "w_down", "x2", "ss", "act")
_MAKES = {1: ("h2", "x2", "ss"), 2: ("act",), 3: ("parts",)}
_READS = {1: ("o", "h", "w_out", "scale"), 2: ("x2", "ss", "w_gate_up"), 3: ("act", "w_down")}


def _out_types(dims: _Dims, cfg: TailConfig, h_dtype):
    return dict(
        h2=jax.ShapeDtypeStruct((dims.m, dims.d), h_dtype),
        x2=jax.ShapeDtypeStruct((ROWS, dims.d), jnp.bfloat16),
        ss=jax.ShapeDtypeStruct((dims.n1, MMA_ROWS), jnp.float32),
        act=jax.ShapeDtypeStruct((ROWS, dims.f), jnp.bfloat16),
        parts=jax.ShapeDtypeStruct((cfg.down_splits, dims.m, dims.d), jnp.float32),
    )


def _scratch(dims: _Dims, cfg: TailConfig, phases) -> dict:
    """Shared memory outside the phases' own: P1's weight ring, the P2/P3 ring of tile pairs, the
    activation buffer (sized for the widest phase) and its barriers."""
    out = {}
    chunks = []
    if 1 in phases:
        bn, st = PAIR_N, cfg.out_stages
        out |= dict(
            w1=plgpu.SMEM((st, cfg.out_block_k, bn), jnp.bfloat16, transforms=_tiles(bn)),
            w1_bar=plgpu.Barrier(num_barriers=st),
            x1_bar=plgpu.Barrier(num_arrivals=dims.hd // CHUNK),
        )
        chunks.append(dims.hd // CHUNK)
    if 2 in phases or 3 in phases:
        st = cfg.stages
        tile = plgpu.SMEM((st, cfg.block_k, PAIR_N), jnp.bfloat16, transforms=_tiles(PAIR_N))
        out |= dict(wa=tile, wb=tile, wa_bar=plgpu.Barrier(num_barriers=st), wb_bar=plgpu.Barrier(num_barriers=st))
    if 2 in phases:
        out["x2_bar"] = plgpu.Barrier(num_arrivals=dims.d // CHUNK)
        chunks.append(dims.d // CHUNK)
    if 3 in phases:
        out["x3_bar"] = plgpu.Barrier(num_arrivals=dims.k3 // CHUNK)
        chunks.append(dims.k3 // CHUNK)
    out["xbuf"] = plgpu.SMEM((_x_rows(max(chunks)), CHUNK), jnp.bfloat16, transforms=_tiles(CHUNK))
    return out


def smem_bytes(dims: _Dims, h_itemsize: int, cfg: TailConfig, phases=(1, 2, 3)) -> int:
    """Shared memory of one program: the rings and activation buffer + the largest phase's own."""
    fixed = 0
    chunks = []
    own = [0]
    if 1 in phases:
        bn = PAIR_N
        fixed += cfg.out_stages * cfg.out_block_k * bn * 2
        chunks.append(dims.hd // CHUNK)
        own.append(2 * MMA_ROWS * bn * h_itemsize + MMA_ROWS * bn * 2 + bn * 4 + MMA_ROWS * 4)
    if 2 in phases or 3 in phases:
        fixed += 2 * cfg.stages * cfg.block_k * PAIR_N * 2
    if 2 in phases:
        chunks.append(dims.d // CHUNK)
        own.append(dims.n1 * MMA_ROWS * 4 + MMA_ROWS * PAIR_N * 2)
    if 3 in phases:
        chunks.append(dims.k3 // CHUNK)
        own.append(MMA_ROWS * 2 * PAIR_N * 4)
    return fixed + _x_rows(max(chunks)) * CHUNK * 2 + max(own)


def _make_kernel(dims: _Dims, cfg: TailConfig, eps, phases, fused: bool, pdl: bool, interpreting: bool, tiled: bool):
    """(body over (inputs..., outputs..., scratch...), input names, output names)."""
    made = {n for p in phases for n in _MAKES[p]}
    ins = [n for n in _INPUTS if n not in made and any(n in _READS[p] for p in phases)]
    outs = [n for p in phases for n in _MAKES[p]]
    scratch_names = list(_scratch(dims, cfg, phases))
    makers = {1: _phase1, 2: _phase2, 3: _phase3}
    counts = {1: dims.n1, 2: dims.n2, 3: dims.n3}

    def body(*refs):
        r = _Refs(interpreting, tiled, **dict(zip(ins + outs + scratch_names, refs)))
        b = lax.axis_index("b")
        steps = [(p, *makers[p](r, dims, cfg, eps, fused)) for p in phases]
        for p, issue, _ in steps:
            if fused and p == 3:
                continue  # issued by each program at the end of its P2 products (the ring is P2's)

            @pl.when(b < counts[p])
            def _():
                issue(b)

        if pdl:
            plgpu.griddepcontrol_launch_dependents()
            plgpu.griddepcontrol_wait()
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR) if fused else None
        done = 0
        for p, _, run in steps:
            if fused and done:
                pl.semaphore_wait(sem, value=done, decrement=False)

            @pl.when(b < counts[p])
            def _():
                run(b)
                if fused:
                    pl.semaphore_signal(sem)

            done += counts[p]

    return body, ins, outs


def _launch(values: dict, dims, cfg, eps, phases, fused, pdl, params, out_types):
    tiled = values["w_gate_up"].ndim == 3
    body, ins, outs = _make_kernel(dims, cfg, eps, phases, fused, pdl, params is not None, tiled)
    grid = cfg.blocks if fused else {1: dims.n1, 2: dims.n2, 3: dims.n3}[phases[0]]
    kernel = plgpu.kernel(
        body,
        out_type=tuple(out_types[n] for n in outs),
        grid=(grid,),
        grid_names=("b",),
        scratch_types=list(_scratch(dims, cfg, phases).values()),
        interpret=params,
        kernel_name="block_tail_mgpu" if fused else f"block_tail_p{phases[0]}_mgpu",
    )
    return dict(zip(outs, kernel(*(values[n] for n in ins))))


@functools.partial(jax.jit, static_argnames=("eps", "config", "fused", "pdl", "interpret"))
def block_tail_mgpu(
    o,
    h,
    w_out,
    mlp_scale,
    w_gate_up,
    w_down,
    *,
    eps: float,
    config: TailConfig | None = None,
    fused: bool = True,
    pdl: bool = False,
    interpret=False,
):
    """(h2 [M, D] in h's dtype, parts [down_splits, M, D] float32): h2 = h + o @ W_out and
    sum(parts) = swiglu(rmsnorm(h2) * mlp_scale @ W_gate_up) @ W_down; `block_tail_reference`
    is the definition. o [M, Hd] bf16, h [M, D], W_out [Hd, D], W_gate_up [D, 2F] ([gate | up]),
    W_down [F, D], all bf16 weights, or the three from `tile_weights`; M <= 8.

    config: default `config_for(D, F)`. fused=True: one launch of `config.blocks` programs with
    grid barriers (GPU only). fused=False: three launches (the interpreter's mode: `interpret=True`
    runs it on CPU). pdl: griddepcontrol before the first activation read (ignored when
    interpreting).
    """
    params = _interpret_params(interpret)
    if fused and params is not None:
        raise ValueError("fused=True needs a GPU (the Mosaic GPU interpreter has no semaphores): pass fused=False")
    s_out, _, s_down = _untiled_shapes(w_out, w_gate_up, w_down)
    cfg = config or config_for(s_out[1], s_down[0]) or TailConfig()
    dims = _dims(o, h, w_out, w_gate_up, w_down, cfg)
    if fused and (dims.n1 > cfg.blocks or dims.n2 != cfg.blocks or dims.n3 != cfg.blocks):
        raise ValueError(
            f"blocks={cfg.blocks} must equal F/64={dims.n2} and the down programs "
            f"{dims.n3_tiles}x{cfg.down_splits}={dims.n3}, and cover D/64={dims.n1}"
        )
    itemsize = jnp.dtype(h.dtype).itemsize
    for phases in [(1, 2, 3)] if fused else [(1,), (2,), (3,)]:
        need = smem_bytes(dims, itemsize, cfg, phases)
        if need > SMEM_LIMIT:
            raise ValueError(f"{need} bytes of shared memory > {SMEM_LIMIT}: lower stages or block_k")
    # Always 8 rows (zeros past M, sliced off below): the one row count checked on the GPU, where
    # 1-row down partials came out wrong (docs/PERF.md, session 7).
    m = dims.m
    dims = dims._replace(m=ROWS)
    pad = lambda a: jnp.pad(a, ((0, ROWS - m), (0, 0)))  # noqa: E731
    values = dict(
        o=pad(o), h=pad(h), w_out=w_out, scale=mlp_scale.astype(jnp.float32), w_gate_up=w_gate_up, w_down=w_down
    )
    out_types = _out_types(dims, cfg, h.dtype)
    pdl = pdl and params is None
    if fused:
        values |= _launch(values, dims, cfg, eps, (1, 2, 3), True, pdl, params, out_types)
    else:
        for phase in (1, 2, 3):
            values |= _launch(values, dims, cfg, eps, (phase,), False, pdl, params, out_types)
    return values["h2"][:m], values["parts"][:, :m]
