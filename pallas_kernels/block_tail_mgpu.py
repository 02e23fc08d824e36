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

Before anything else every program issues the first `stages` weight-tile copies (TMA) of each of
its three phases: weights are not written by anyone, so the first tiles of P2 and P3 are already
in shared memory when their barrier opens, and the barrier's latency hides behind them.

Each phase is also a kernel of its own (`fused=False`): three launches, the same phase bodies.
That is how the CPU tests run it (Pallas' Mosaic GPU interpreter has no semaphores, and it runs a
grid's programs one after another, so a program could not wait for a later one), and it is the
A/B for the barrier. Cross-program ordering follows `benchmarks/mgpu_barrier_probe.py` (checked on
the H200: no stale reads): TMA stores, `wait_smem_to_gmem(0)`, then `semaphore_signal`; readers
`semaphore_wait` (no decrement) and then issue their TMA loads.

Rows: 1..8 (x and act rows are copied 8 at a time; rows past M read zeros from TMA on the GPU,
NaN in the interpreter, and reach only accumulator rows that are never stored: see
`pallas_kernels.matvec_mgpu`). Weights bfloat16; h bfloat16 or float32 (h2 is written in h's
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

from pallas_kernels.matvec_mgpu import SMEM_LIMIT, SWIZZLE, _interpret_params

LANES = 64  # columns of a P1 / P2 tile: one 128-byte swizzle row of bf16
BLOCK_K = 64  # K rows per weight tile
ROWS = 8  # x / act rows copied per tile (M <= ROWS)
MMA_ROWS = 64


class TailConfig(NamedTuple):
    blocks: int = 128  # programs of the fused kernel (<= SM count); F/64 and P3's programs divide it
    stages: int = 4  # weight tiles in flight per phase
    down_block_n: int = 128  # output columns of a P3 program
    down_splits: int = 16  # K splits of the down projection (partials the next residual add sums)


def config_for(d: int, f: int, blocks: int | None = None) -> TailConfig | None:
    """The fused kernel's config for model width d and MLP width f: one program per gate/up tile
    pair (F/64 of them, 128 in CSM-1B's backbone and depth decoder) and as many down splits as make
    the down projection the same number of programs; None when the widths do not divide so."""
    blocks = blocks or f // LANES
    if d % 128 or f % LANES or blocks != f // LANES or blocks % (d // 128) or d // LANES > blocks:
        return None
    return TailConfig(blocks=blocks, down_block_n=128, down_splits=blocks // (d // 128))


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
    n1: int  # P1 tiles (D / 64)
    n2: int  # P2 tile pairs (F / 64)
    n3_tiles: int  # P3 column tiles
    n3: int  # P3 programs (tiles x splits)
    k3: int  # P3 K steps per program


def _dims(o, h, w_out, w_gate_up, w_down, cfg: TailConfig) -> _Dims:
    m, hd = o.shape
    d = w_out.shape[1]
    f = w_down.shape[0]
    if h.shape != (m, d) or w_out.shape[0] != hd or w_gate_up.shape != (d, 2 * f) or w_down.shape != (f, d):
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
    bn3, s3 = cfg.down_block_n, cfg.down_splits
    if hd % BLOCK_K or d % LANES or f % LANES or d % bn3 or (f // BLOCK_K) % s3:
        raise ValueError(f"widths hd={hd} d={d} f={f} must be multiples of 64 (d of {bn3}, f/64 of {s3})")
    n3_tiles = d // bn3
    return _Dims(m, hd, d, f, d // LANES, f // LANES, n3_tiles, n3_tiles * s3, f // BLOCK_K // s3)


_TILES = (plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE))


def _ring(shape, stages):
    return plgpu.SMEM((stages, *shape), jnp.bfloat16, transforms=_TILES)


def _x_ring(stages):
    # x tiles of ROWS rows per slot; a slot's 64-row MMA view overlaps the next slots' rows
    return plgpu.SMEM(((stages - 1) * ROWS + MMA_ROWS, BLOCK_K), jnp.bfloat16, transforms=_TILES)


# --- phases -------------------------------------------------------------------------------------
#
# Each phase is (issue(program) -> None, run(program) -> None) over a namespace of refs: `issue`
# starts the weight stream (needs nothing from earlier phases), `run` copies the activations,
# multiplies and writes the phase's outputs.


class _Stream:
    """A K loop of one program: `stages`-deep TMA ring of weight tiles (one or two per step) and
    x tiles, wgmma into the given accumulators."""

    def __init__(self, w_srcs, w_ring, w_bars, x_src, x_ring, x_bar, steps, stages, dynamic_rows):
        self.w_srcs, self.w_ring, self.w_bars = w_srcs, w_ring, w_bars
        self.x_src, self.x_ring, self.x_bar = x_src, x_ring, x_bar
        self.steps, self.stages = steps, min(stages, steps)
        self.dynamic_rows = dynamic_rows

    def _copy_w(self, step, slot):
        for src, ring, bar in zip(self.w_srcs, self.w_ring, self.w_bars):
            plgpu.copy_gmem_to_smem(src(step), ring.at[slot], bar.at[slot])

    def _copy_x(self, step, slot, zero):
        row0 = zero if self.dynamic_rows else 0  # a dynamic start: TMA zero-fills rows past M
        plgpu.copy_gmem_to_smem(self.x_src(step, row0), self.x_ring.at[pl.ds(slot * ROWS, ROWS)], self.x_bar.at[slot])

    def issue(self):
        for i in range(self.stages):
            self._copy_w(i, i)

    def run(self, accs, zero):
        for i in range(self.stages):
            self._copy_x(i, i, zero)

        def body(i, carry):
            slot = lax.rem(i, self.stages)
            for bar in self.w_bars:
                plgpu.barrier_wait(bar.at[slot])
            plgpu.barrier_wait(self.x_bar.at[slot])
            a = self.x_ring.at[pl.ds(slot * ROWS, MMA_ROWS)]
            for acc, ring in zip(accs, self.w_ring):
                plgpu.wgmma(acc, a, ring.at[slot])
            plgpu.wgmma_wait(0)

            @pl.when(i + self.stages < self.steps)
            def _():
                self._copy_w(i + self.stages, slot)
                self._copy_x(i + self.stages, slot, zero)

            return carry

        lax.fori_loop(0, self.steps, body, None)


def _phase1(r, dims: _Dims, cfg: TailConfig, eps):
    """h2 / x2 / ss for column tile j."""
    del eps

    def stream(j):
        cols = pl.ds(j * LANES, LANES)
        return _Stream(
            [lambda s: r.w_out.at[pl.ds(s * BLOCK_K, BLOCK_K), cols]],
            [r.w1],
            [r.w1_bar],
            lambda s, row0: r.o.at[pl.ds(row0, ROWS), pl.ds(s * BLOCK_K, BLOCK_K)],
            r.x_ring,
            r.x_bar,
            dims.hd // BLOCK_K,
            cfg.stages,
            dims.m < ROWS,
        )

    def issue(j):
        stream(j).issue()

    def run(j):
        cols = pl.ds(j * LANES, LANES)
        zero = j * 0
        rows = pl.ds(0, dims.m)

        def scoped(h_smem, scale_smem, h2_smem, x2_smem, ss_smem, bar):
            plgpu.copy_gmem_to_smem(r.h.at[rows, cols], h_smem.at[rows], bar.at[0])
            plgpu.copy_gmem_to_smem(r.scale.at[cols], scale_smem, bar.at[1])

            def with_acc(acc):
                stream(j).run([acc], zero)
                plgpu.barrier_wait(bar.at[0])
                plgpu.barrier_wait(bar.at[1])
                hdt = h_smem.dtype
                prod = acc[...].astype(hdt).astype(jnp.float32)
                h_in = r.load(h_smem, plgpu.Layout.WGMMA).astype(jnp.float32)
                h2 = (h_in + prod).astype(hdt).astype(jnp.float32)
                scale = r.load(scale_smem, plgpu.Layout.WGMMA.reduce(0))
                h2_smem[...] = h2.astype(hdt)
                x2_smem[...] = (h2 * lax.broadcast_in_dim(scale, h2.shape, [1])).astype(jnp.bfloat16)
                ss_smem[...] = jnp.sum(h2 * h2, axis=1)

            pl.run_scoped(with_acc, plgpu.ACC((MMA_ROWS, LANES), jnp.float32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(h2_smem.at[rows], r.h2.at[:, cols])
            plgpu.copy_smem_to_gmem(x2_smem.at[rows], r.x2.at[:, cols])
            plgpu.copy_smem_to_gmem(ss_smem, r.ss.at[j])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((MMA_ROWS, LANES), r.h.dtype),
            plgpu.SMEM((LANES,), jnp.float32),
            plgpu.SMEM((MMA_ROWS, LANES), r.h.dtype),
            plgpu.SMEM((MMA_ROWS, LANES), jnp.bfloat16),
            plgpu.SMEM((MMA_ROWS,), jnp.float32),
            plgpu.Barrier(num_barriers=2),
        )

    return issue, run


def _phase2(r, dims: _Dims, cfg: TailConfig, eps):
    """act tile pair p = silu(g) * u."""

    def stream(p):
        g_cols = pl.ds(p * LANES, LANES)
        u_cols = pl.ds(dims.f + p * LANES, LANES)
        return _Stream(
            [
                lambda s: r.w_gate_up.at[pl.ds(s * BLOCK_K, BLOCK_K), g_cols],
                lambda s: r.w_gate_up.at[pl.ds(s * BLOCK_K, BLOCK_K), u_cols],
            ],
            [r.w2g, r.w2u],
            [r.w2g_bar, r.w2u_bar],
            lambda s, row0: r.x2.at[pl.ds(row0, ROWS), pl.ds(s * BLOCK_K, BLOCK_K)],
            r.x_ring,
            r.x_bar,
            dims.d // BLOCK_K,
            cfg.stages,
            dims.m < ROWS,
        )

    def issue(p):
        stream(p).issue()

    def run(p):
        zero = p * 0
        rows = pl.ds(0, dims.m)

        def scoped(ss_smem, act_smem, bar):
            plgpu.copy_gmem_to_smem(r.ss, ss_smem, bar.at[0])

            def with_acc(acc_g, acc_u):
                stream(p).run([acc_g, acc_u], zero)
                plgpu.barrier_wait(bar.at[0])
                ss = r.load(ss_smem.at[0], plgpu.Layout.WGMMA.reduce(1))
                for t in range(1, dims.n1):
                    ss = ss + r.load(ss_smem.at[t], plgpu.Layout.WGMMA.reduce(1))
                factor = lax.rsqrt(ss * (1.0 / dims.d) + eps)
                fb = lax.broadcast_in_dim(factor, (MMA_ROWS, LANES), [0])
                g = acc_g[...] * fb
                u = acc_u[...] * fb
                act_smem[...] = (g / (1.0 + jnp.exp(-g)) * u).astype(jnp.bfloat16)

            pl.run_scoped(
                with_acc, plgpu.ACC((MMA_ROWS, LANES), jnp.float32), plgpu.ACC((MMA_ROWS, LANES), jnp.float32)
            )
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(act_smem.at[rows], r.act.at[:, pl.ds(p * LANES, LANES)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((dims.n1, MMA_ROWS), jnp.float32),
            plgpu.SMEM((MMA_ROWS, LANES), jnp.bfloat16),
            plgpu.Barrier(num_barriers=1),
        )

    return issue, run


def _phase3(r, dims: _Dims, cfg: TailConfig, eps):
    """parts[s][:, tile j] for program q = s * n3_tiles + j."""
    del eps
    bn = cfg.down_block_n

    def stream(q):
        j = lax.rem(q, dims.n3_tiles)
        k0 = (q // dims.n3_tiles) * (dims.k3 * BLOCK_K)
        cols = pl.ds(j * bn, bn)
        return _Stream(
            [lambda s: r.w_down.at[pl.ds(k0 + s * BLOCK_K, BLOCK_K), cols]],
            [r.w3],
            [r.w3_bar],
            lambda s, row0: r.act.at[pl.ds(row0, ROWS), pl.ds(k0 + s * BLOCK_K, BLOCK_K)],
            r.x_ring,
            r.x_bar,
            dims.k3,
            cfg.stages,
            dims.m < ROWS,
        )

    def issue(q):
        stream(q).issue()

    def run(q):
        zero = q * 0
        rows = pl.ds(0, dims.m)
        j = lax.rem(q, dims.n3_tiles)
        s = q // dims.n3_tiles

        def scoped(out_smem):
            def with_acc(acc):
                stream(q).run([acc], zero)
                out_smem[...] = acc[...]

            pl.run_scoped(with_acc, plgpu.ACC((MMA_ROWS, bn), jnp.float32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[rows], r.parts.at[s].at[:, pl.ds(j * bn, bn)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM((MMA_ROWS, bn), jnp.float32))

    return issue, run


# --- the kernels ----------------------------------------------------------------------------------


class _Refs:
    def __init__(self, interpreting: bool, **refs):
        self.interpreting = interpreting
        self.__dict__.update(refs)

    def load(self, ref, layout):
        """ref's value in registers with `layout` (the interpreter has no layouts: a plain load)."""
        return ref[...] if self.interpreting else plgpu.load(ref, (), layout=layout, optimized=False)


_INPUTS = ("o", "h", "w_out", "scale", "w_gate_up", "w_down")
_OUTPUTS = ("h2", "x2", "ss", "act", "parts")


def _out_types(dims: _Dims, cfg: TailConfig, h_dtype):
    return dict(
        h2=jax.ShapeDtypeStruct((dims.m, dims.d), h_dtype),
        x2=jax.ShapeDtypeStruct((dims.m, dims.d), jnp.bfloat16),
        ss=jax.ShapeDtypeStruct((dims.n1, MMA_ROWS), jnp.float32),
        act=jax.ShapeDtypeStruct((dims.m, dims.f), jnp.bfloat16),
        parts=jax.ShapeDtypeStruct((cfg.down_splits, dims.m, dims.d), jnp.float32),
    )


def _ring_scratch(cfg: TailConfig, phases):
    """Weight rings of the given phases (1, 2, 3) and the shared x ring, as name -> scratch type."""
    st = cfg.stages
    out = {}
    if 1 in phases:
        out |= dict(w1=_ring((BLOCK_K, LANES), st), w1_bar=plgpu.Barrier(num_barriers=st))
    if 2 in phases:
        out |= dict(
            w2g=_ring((BLOCK_K, LANES), st),
            w2u=_ring((BLOCK_K, LANES), st),
            w2g_bar=plgpu.Barrier(num_barriers=st),
            w2u_bar=plgpu.Barrier(num_barriers=st),
        )
    if 3 in phases:
        out |= dict(w3=_ring((BLOCK_K, cfg.down_block_n), st), w3_bar=plgpu.Barrier(num_barriers=st))
    out |= dict(x_ring=_x_ring(st), x_bar=plgpu.Barrier(num_barriers=st))
    return out


def smem_bytes(dims_d_n1: int, h_itemsize: int, cfg: TailConfig) -> int:
    """Shared memory of one fused program (rings of all three phases + the largest phase's own)."""
    st = cfg.stages
    rings = st * BLOCK_K * (3 * LANES + cfg.down_block_n) * 2 + ((st - 1) * ROWS + MMA_ROWS) * BLOCK_K * 2
    p1 = 2 * MMA_ROWS * LANES * h_itemsize + MMA_ROWS * LANES * 2 + LANES * 4 + MMA_ROWS * 4
    p2 = dims_d_n1 * MMA_ROWS * 4 + MMA_ROWS * LANES * 2
    p3 = MMA_ROWS * cfg.down_block_n * 4
    return rings + max(p1, p2, p3)


def _make_kernel(dims: _Dims, cfg: TailConfig, eps, phases, fused: bool, pdl: bool, interpreting: bool):
    """Body over (inputs..., outputs..., scratch...) for the given phases."""
    ins = [n for n in _INPUTS + ("x2", "ss", "act") if _needs(n, phases)]
    outs = [n for n in _OUTPUTS if _makes(n, phases)]
    scratch_names = list(_ring_scratch(cfg, phases))
    makers = {1: _phase1, 2: _phase2, 3: _phase3}
    counts = {1: dims.n1, 2: dims.n2, 3: dims.n3}

    def body(*refs):
        r = _Refs(interpreting, **dict(zip(ins + outs + scratch_names, refs)))
        b = lax.axis_index("b")
        steps = [(p, *makers[p](r, dims, cfg, eps)) for p in phases]
        for p, issue, _ in steps:  # every phase's first weight tiles, before any wait

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


def _needs(name, phases):
    return {
        "o": 1 in phases,
        "h": 1 in phases,
        "w_out": 1 in phases,
        "scale": 1 in phases,
        "w_gate_up": 2 in phases,
        "w_down": 3 in phases,
        "x2": 2 in phases and 1 not in phases,
        "ss": 2 in phases and 1 not in phases,
        "act": 3 in phases and 2 not in phases,
    }[name]


def _makes(name, phases):
    return {
        "h2": 1 in phases,
        "x2": 1 in phases,
        "ss": 1 in phases,
        "act": 2 in phases,
        "parts": 3 in phases,
    }[name]


def _launch(values: dict, dims, cfg, eps, phases, fused, pdl, params, out_types):
    body, ins, outs = _make_kernel(dims, cfg, eps, phases, fused, pdl, params is not None)
    grid = cfg.blocks if fused else {1: dims.n1, 2: dims.n2, 3: dims.n3}[phases[0]]
    kernel = plgpu.kernel(
        body,
        out_type=tuple(out_types[n] for n in outs),
        grid=(grid,),
        grid_names=("b",),
        scratch_types=list(_ring_scratch(cfg, phases).values()),
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
    W_down [F, D], all bf16 weights; M <= 8.

    config: default `config_for(D, F)`. fused=True: one launch of `config.blocks` programs with grid barriers (GPU only). fused=False:
    three launches (the interpreter's mode: `interpret=True` runs it on CPU). pdl: griddepcontrol
    before the first activation read (ignored when interpreting).
    """
    params = _interpret_params(interpret)
    if fused and params is not None:
        raise ValueError("fused=True needs a GPU (the Mosaic GPU interpreter has no semaphores): pass fused=False")
    cfg = config or config_for(w_out.shape[-1], w_down.shape[0]) or TailConfig()
    dims = _dims(o, h, w_out, w_gate_up, w_down, cfg)
    if fused and (dims.n1 > cfg.blocks or dims.n2 != cfg.blocks or dims.n3 != cfg.blocks):
        raise ValueError(
            f"blocks={cfg.blocks} must equal F/64={dims.n2} and the down programs "
            f"{dims.n3_tiles}x{cfg.down_splits}={dims.n3}, and cover D/64={dims.n1}"
        )
    need = smem_bytes(dims.n1, jnp.dtype(h.dtype).itemsize, cfg)
    if need > SMEM_LIMIT:
        raise ValueError(f"{need} bytes of shared memory > {SMEM_LIMIT}: lower stages or down_block_n")
    values = dict(o=o, h=h, w_out=w_out, scale=mlp_scale.astype(jnp.float32), w_gate_up=w_gate_up, w_down=w_down)
    out_types = _out_types(dims, cfg, h.dtype)
    pdl = pdl and params is None
    if fused:
        values |= _launch(values, dims, cfg, eps, (1, 2, 3), True, pdl, params, out_types)
    else:
        for phase in (1, 2, 3):
            values |= _launch(values, dims, cfg, eps, (phase,), False, pdl, params, out_types)
    return values["h2"], values["parts"]
