"""How fast one persistent Mosaic GPU program per SM streams a weight through shared memory.

    python -m benchmarks.mgpu_stream_probe [--mb 64] [--reps 20] [--out FILE]

`pallas_kernels.between_attention_mgpu` streams its weights at ~2–3 TB/s where a standalone
Mosaic GEMV reaches ~4.5 TB/s after its fixed cost (docs/PERF.md #53, #68). The span kernel runs
one warpgroup per SM that waits for a tile, runs its products, waits for them and only then
refills the slot; the GEMV runs two programs per SM. This probe isolates the streaming: `blocks`
programs each read a contiguous run of [block_k, 64] bf16 tiles of W [K, N] (tile i: K tile
i mod K/block_k of column strip i div K/block_k) and add x @ tile into one float32 accumulator,
x [64, 64] ones, so out[b] holds the column sums of program b's tiles (checked against jnp).
Modes, each a separate kernel:

- `copy`: the span's ring (`stages` slots, one TMA barrier each) with no products: a slot is
  refilled as soon as its tile has landed. The ring's own ceiling.
- `wgmma`: the span's loop: wait for the tile, its products, wait for them, refill the slot.
- `wgmma_overlap`: the refill of a step's slot is issued after the next step's products are
  issued (`SpanConfig.overlap`): one step of products in flight while refilling.
- `pipeline`: `plgpu.emit_pipeline` (JAX's own TMA pipeline, `delay_release=1`).
- `pipeline_ws`: `plgpu.emit_pipeline_warp_specialized`: a memory warpgroup issues the copies,
  a compute warpgroup runs the products (as JAX's `hopper_matmul_mgpu` does).

GPU time per call from CUPTI (the kernel alone), TB/s = W bytes / time; beside them XLA's
elementwise pass over the same W (read and write: 2x the bytes). Needs an sm_90 GPU; every mode
also runs in Pallas' Mosaic GPU interpreter (`--interpret`, a small W: the correctness of the
modes, not their speed).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks._report import Budget, chosen, failure, log, write_log

TILE_N = 64  # columns of a weight tile: one 128-byte swizzle row of bf16
ROWS = 64  # accumulator rows (wgmma's M)
MODES = ("copy", "wgmma", "wgmma_overlap", "pipeline", "pipeline_ws")


def _tiles(cols: int):
    return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(cols * 2))


def _run(b, total: int, blocks: int):
    """Program b's tiles: [b * total // blocks, (b + 1) * total // blocks) (ints or traced)."""
    return b * total // blocks, (b + 1) * total // blocks


def stream(w, *, blocks: int, stages: int, block_k: int, mode: str, interpret: bool = False):
    """[blocks, 64, 64] float32: program b's sum of ones(64, block_k) @ tile over its tiles."""
    k, n = w.shape
    kt = k // block_k
    total = kt * (n // TILE_N)
    if k % block_k or n % TILE_N or block_k % TILE_N:
        raise ValueError(f"W {w.shape} does not tile into [{block_k}, {TILE_N}]")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    if mode.startswith("pipeline") and total % blocks:  # the pipelines' grids are static
        raise ValueError(f"{mode} needs the {total} tiles to split evenly over {blocks} programs")
    per_k = block_k // TILE_N
    f32 = jnp.float32

    def tile_of(first, i):
        g = first + i
        return lax.rem(g, kt), g // kt  # (K tile, column strip)

    def products(acc, x, tile):
        for c in range(per_k):
            plgpu.wgmma(acc, x, tile.at[pl.ds(c * TILE_N, TILE_N)])

    def store(acc_val, out, b, stage):
        stage[...] = acc_val
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage, out.at[b])
        plgpu.wait_smem_to_gmem(0)

    def load_x(x_ref, x, xbar):
        plgpu.copy_gmem_to_smem(x_ref, x, xbar)
        plgpu.barrier_wait(xbar)

    def ring_body(w_ref, x_ref, out, x, stage, xbar, ring, bars):
        b = lax.axis_index("b")
        first, end = _run(b, total, blocks)
        per = end - first
        load_x(x_ref, x, xbar)

        def issue(i):
            kk, nn = tile_of(first, i)
            slot = lax.rem(i, stages)
            plgpu.copy_gmem_to_smem(
                w_ref.at[pl.ds(kk * block_k, block_k), pl.ds(nn * TILE_N, TILE_N)], ring.at[slot], bars.at[slot]
            )

        for i in range(stages):

            @pl.when(i < per)
            def _():
                issue(jnp.int32(i))

        def refill(i):
            @pl.when(i + stages < per)
            def _():
                issue(i + stages)

        def with_acc(acc):
            def step(i, _):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(bars.at[slot])
                if mode == "copy":
                    refill(i)
                    return None
                products(acc, x, ring.at[slot])
                if mode == "wgmma":
                    plgpu.wgmma_wait(0)
                    refill(i)
                else:  # wgmma_overlap: the previous step's slot, once its products are done
                    plgpu.wgmma_wait(per_k)

                    @pl.when(i >= 1)
                    def _():
                        refill(i - 1)

                return None

            @pl.loop(0, per)
            def _(i):
                step(i, None)

            if mode == "wgmma_overlap":
                plgpu.wgmma_wait(0)
            store(acc[...], out, b, stage)

        pl.run_scoped(with_acc, plgpu.ACC((ROWS, TILE_N), f32))

    per = total // blocks  # the pipelines: an even split

    def pipeline_body(w_ref, x_ref, out, x, stage, xbar):
        b = lax.axis_index("b")
        load_x(x_ref, x, xbar)

        def with_acc(acc):
            plgpu.emit_pipeline(
                lambda _, tile: products(acc, x, tile),
                grid=(per,),
                in_specs=[
                    plgpu.BlockSpec(
                        (block_k, TILE_N), lambda i: tile_of(b * per, i), transforms=_tiles(TILE_N), delay_release=1
                    )
                ],
                max_concurrent_steps=stages,
            )(w_ref)
            store(acc[...], out, b, stage)

        pl.run_scoped(with_acc, plgpu.ACC((ROWS, TILE_N), f32))

    def pipeline_ws_body(w_ref, x_ref, out, x, stage, xbar):
        b = lax.axis_index("b")

        def mma(_, tile, acc):
            products(acc, x, tile)
            plgpu.wgmma_wait(0)
            return acc

        def context(eval_pipeline):  # the compute warpgroup only: x, the accumulator, the store
            load_x(x_ref, x, xbar)

            def with_acc(acc):
                eval_pipeline(acc)
                store(acc[...], out, b, stage)

            pl.run_scoped(with_acc, plgpu.ACC((ROWS, TILE_N), f32))

        plgpu.emit_pipeline_warp_specialized(
            mma,
            grid=(per,),
            memory_registers=40,
            in_specs=[plgpu.BlockSpec((block_k, TILE_N), lambda i: tile_of(b * per, i), transforms=_tiles(TILE_N))],
            max_concurrent_steps=stages,
            wg_axis="wg",
            num_compute_wgs=1,
            compute_context=context,
        )(w_ref)

    scratch = [
        plgpu.SMEM((ROWS, TILE_N), jnp.bfloat16, transforms=_tiles(TILE_N)),  # x
        plgpu.SMEM((ROWS, TILE_N), f32),  # stage: the accumulator on its way out
        plgpu.Barrier(num_barriers=1),  # xbar
    ]
    kw = {}
    if mode in ("copy", "wgmma", "wgmma_overlap"):
        body = ring_body
        scratch += [
            plgpu.SMEM((stages, block_k, TILE_N), jnp.bfloat16, transforms=_tiles(TILE_N)),
            plgpu.Barrier(num_barriers=stages),
        ]
    elif mode == "pipeline":
        body = pipeline_body
    else:
        body = pipeline_ws_body
        kw = dict(num_threads=2, thread_name="wg")
    params = None
    if interpret:
        from pallas_kernels.matvec_mgpu import _interpret_params

        params = _interpret_params(True)
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((blocks, ROWS, TILE_N), f32),
        grid=(blocks,),
        grid_names=("b",),
        scratch_types=scratch,
        interpret=params,
        kernel_name=f"stream_{mode}",
        **kw,
    )(w, jnp.ones((ROWS, TILE_N), jnp.bfloat16))


def stream_reference(w, blocks: int, block_k: int):
    """What `stream` returns: per program, the column sums of its tiles, on every row."""
    k, n = w.shape
    kt = k // block_k
    tiles = w.astype(jnp.float32).reshape(kt, block_k, n // TILE_N, TILE_N).transpose(2, 0, 1, 3)  # strip, K tile
    sums = tiles.sum(axis=2).reshape(-1, TILE_N)  # tile i = strip * kt + K tile
    runs = [_run(b, sums.shape[0], blocks) for b in range(blocks)]
    per_program = jnp.stack([sums[a:e].sum(axis=0) for a, e in runs])
    return jnp.broadcast_to(per_program[:, None, :], (blocks, ROWS, TILE_N))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=64.0, help="size of W in MB (K = 8192, N to match)")
    ap.add_argument("--blocks", default="128,132,264", help="program counts (comma list)")
    ap.add_argument("--stages", default="4,8,12", help="ring depths (comma list)")
    ap.add_argument("--block-k", default="64,128", help="tile heights (comma list)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no new config after this")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--interpret", action="store_true", help="check the modes in the CPU interpreter (small W)")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    modes = chosen(args.modes, MODES, "mode")
    budget = Budget(args.budget_s)
    dev = jax.devices()[0]
    log(f"device: {dev.device_kind}, jax {jax.__version__}")
    if args.interpret:
        w = jax.random.normal(jax.random.key(0), (512, 256), jnp.bfloat16)
        for mode in modes:
            # the ring modes: 3 programs over 16 tiles, uneven runs; the pipelines need even ones
            blocks = 2 if mode.startswith("pipeline") else 3
            got = stream(w, blocks=blocks, stages=3, block_k=128, mode=mode, interpret=True)
            want = jnp.zeros_like(got) if mode == "copy" else stream_reference(w, blocks, 128)
            ok = np.allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-2)
            log(f"{mode}: {'ok' if ok else 'WRONG'}")
        return 0
    from benchmarks.profile import kernel_us_per_call

    k = 8192
    # N a multiple of 66 column strips: the tiles split evenly over 128, 132 and 264 programs
    strips = 66 * TILE_N
    n = max(1, round(args.mb * 1e6 / (2 * k) / strips)) * strips
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.bfloat16)
    mb = k * n * 2 / 1e6
    copy = jax.jit(lambda w: w * 2)
    us = sum(kernel_us_per_call(copy, w, calls=1).values())
    log(f"\nW [{k}, {n}] bf16, {mb:.1f} MB. XLA elementwise pass (read + write): {us:.2f} µs, {2 * mb / us:.2f} TB/s\n")
    log("| mode | blocks | stages | block_k | tiles per program | µs (CUPTI) | TB/s | check |")
    log("|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for blocks in [int(b) for b in args.blocks.split(",")]:
            for stages in [int(s) for s in args.stages.split(",")]:
                for bk in [int(b) for b in args.block_k.split(",")]:
                    per = k // bk * (n // TILE_N) / blocks  # tiles per program (mean)
                    row = f"| {mode} | {blocks} | {stages} | {bk} | {per:g} |"
                    if not budget.left():
                        log(f"{row} skipped (budget) | | |")
                        continue
                    try:
                        fn = jax.jit(functools.partial(stream, blocks=blocks, stages=stages, block_k=bk, mode=mode))
                        got = fn(w)
                        want = jnp.zeros_like(got) if mode == "copy" else stream_reference(w, blocks, bk)
                        good = bool(np.allclose(np.asarray(got), np.asarray(want), rtol=1e-2, atol=1.0))
                        us = sum(kernel_us_per_call(fn, w, calls=1).values())
                        log(f"{row} {us:.2f} | {mb / us:.2f} | {'ok' if good else 'WRONG'} |")
                    except Exception as e:  # a mode or config that fails is a row, not a traceback
                        log(f"{row} {failure(e, 160)} | | |")
    if args.out:
        write_log(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
