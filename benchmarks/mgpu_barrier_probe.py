"""What a grid-wide barrier costs inside one Mosaic GPU kernel, against a kernel boundary.

    python -m benchmarks.mgpu_barrier_probe [--blocks 132] [--reps 50] [--out FILE]

The persistent depth decoder (issue #17) would replace each of the ~40 kernels of a depth step
(31 steps a frame) with a phase of one kernel, the phases separated by grid-wide barriers made
of a global-memory counter (`pl.get_global(SemaphoreType.REGULAR)`, `pl.semaphore_signal`,
`pl.semaphore_wait(..., decrement=False)`). It pays only if such a barrier costs well under a
kernel boundary. This probe measures both on the GPU:

- barrier kernel: `--blocks` blocks (default: the SM count), P phases. In each phase every block
  writes an [8, 128] float32 tile of its own to global memory (TMA store, waited for), signals the
  counter, waits until the counter reaches (phase + 1) * blocks, then reads its neighbour's tile
  of that phase (TMA load) and accumulates |read - expected|. The output is that error sum per
  block: all zeros shows the barrier orders the writes (a block never reads a stale tile).
  Time per barrier = (t(P=256) - t(P=64)) / 192, so the launch and the program's dispatch cancel.
- kernel chain: the same tile exchange as P separate kernels, each reading the previous one's
  output (one XLA program, the calls unrolled): time per boundary = (t(P=256) - t(P=64)) / 192.
  (A first run with the chain in a `lax.fori_loop` measured 13.9 µs per boundary: mostly the
  while loop's own per-iteration cost, docs/bench/2026-12-03-h200-barrier-probe.md.)
- neighbour waits (session 11): the barrier kernel's exchange, but each block waits only for
  the counters of the 1 (or 8) blocks after it, one counter per block: what a phase costs when
  its consumers depend on a few producers rather than on the whole grid.

Needs an sm_90 GPU and JAX >= 0.11 (Pallas' Mosaic GPU interpreter has no semaphores, so this
does not run on a CPU). Timings: median of --reps runs of one jitted program each (wall clock,
block_until_ready), after two warm-up runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

TILE = (8, 128)


def barrier_kernel(phases: int, blocks: int):
    """A jitted function of no arguments running the barrier kernel: returns [blocks, 8, 128]
    error sums (zeros when every exchange read what its neighbour wrote)."""
    return _exchange_kernel(phases, blocks, fan_in=None)


def neighbour_kernel(phases: int, blocks: int, fan_in: int = 1):
    """The barrier kernel's exchange with point-to-point waits instead of a grid barrier: one
    counter per block (`SemaphoreType.REGULAR((blocks,))`); in each phase a block signals its own
    after its TMA store and waits only for the `fan_in` blocks after it (b + 1 .. b + fan_in) to
    have signalled this phase, then reads its next neighbour's tile. The dataflow a persistent
    kernel would use between phases whose consumers need a few producers' tiles, not all."""
    return _exchange_kernel(phases, blocks, fan_in=fan_in)


def _exchange_kernel(phases: int, blocks: int, fan_in: int | None):
    """Both kernels above: in each phase every block writes its tile, synchronises (fan_in None:
    one grid-wide counter; else its own counter and waits on the next `fan_in` blocks'), then
    reads its neighbour's tile and accumulates the difference from what it should hold."""

    def body(err_gmem, buf_gmem, tile_smem, read_smem, acc_smem, bar):
        b = lax.axis_index("b")
        if fan_in is None:
            sem = pl.get_global(plgpu.SemaphoreType.REGULAR)
        else:
            sems = pl.get_global(plgpu.SemaphoreType.REGULAR((blocks,)))
        acc_smem[...] = jnp.zeros(TILE, jnp.float32)
        neighbour = lax.rem(b + 1, blocks)

        @pl.loop(0, phases)
        def _(p):
            tile_smem[...] = jnp.full(TILE, (p * blocks + b).astype(jnp.float32), jnp.float32)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(tile_smem, buf_gmem.at[p, b])
            plgpu.wait_smem_to_gmem(0)
            if fan_in is None:
                pl.semaphore_signal(sem)
                pl.semaphore_wait(sem, value=(p + 1) * blocks, decrement=False)
            else:
                pl.semaphore_signal(sems.at[b])
                for j in range(1, fan_in + 1):
                    pl.semaphore_wait(sems.at[lax.rem(b + j, blocks)], value=p + 1, decrement=False)
            plgpu.copy_gmem_to_smem(buf_gmem.at[p, neighbour], read_smem, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            expected = (p * blocks + neighbour).astype(jnp.float32)
            acc_smem[...] = acc_smem[...] + jnp.abs(read_smem[...] - expected)

        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(acc_smem, err_gmem.at[b])
        plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((blocks, *TILE), jnp.float32),
            jax.ShapeDtypeStruct((max(phases, 1), blocks, *TILE), jnp.float32),
        ),
        grid=(blocks,),
        grid_names=("b",),
        scratch_types=[
            plgpu.SMEM(TILE, jnp.float32),
            plgpu.SMEM(TILE, jnp.float32),
            plgpu.SMEM(TILE, jnp.float32),
            plgpu.Barrier(num_barriers=1),
        ],
        kernel_name="barrier_probe" if fan_in is None else f"neighbour_probe_{fan_in}",
    )
    return jax.jit(lambda: call()[0])


def chain_kernel(phases: int, blocks: int):
    """The same exchange as `phases` kernels, each reading the previous one's output."""

    def body(prev_gmem, out_gmem, read_smem, tile_smem, bar):
        b = lax.axis_index("b")
        neighbour = lax.rem(b + 1, blocks)
        plgpu.copy_gmem_to_smem(prev_gmem.at[neighbour], read_smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        tile_smem[...] = read_smem[...] + 1.0
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(tile_smem, out_gmem.at[b])
        plgpu.wait_smem_to_gmem(0)

    step = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((blocks, *TILE), jnp.float32),
        grid=(blocks,),
        grid_names=("b",),
        scratch_types=[plgpu.SMEM(TILE, jnp.float32), plgpu.SMEM(TILE, jnp.float32), plgpu.Barrier(num_barriers=1)],
        kernel_name="chain_probe",
    )

    @jax.jit
    def run():
        x = jnp.zeros((blocks, *TILE), jnp.float32)
        for _ in range(phases):  # unrolled: an XLA while loop adds its own per-iteration cost
            x = step(x)
        return x

    return run


def _time(fn, reps: int) -> float:
    for _ in range(2):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=None, help="blocks in the grid (default: the SM count)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        print("needs a GPU (sm_90)")
        return 2
    blocks = args.blocks or dev.core_count
    lines = [f"# Grid barrier vs kernel boundary ({dev.device_kind}, jax {jax.__version__}, {blocks} blocks)", ""]
    lines += ["| variant | phases | ms per program | check |", "|---|---|---|---|"]
    per = {}
    makers = (
        ("barrier kernel", barrier_kernel),
        ("neighbour waits, fan-in 1", neighbour_kernel),
        ("neighbour waits, fan-in 8", lambda p, b: neighbour_kernel(p, b, fan_in=8)),
        ("kernel chain", chain_kernel),
    )
    for name, make in makers:
        t = {}
        for phases in (64, 256):
            try:
                fn = make(phases, blocks)
                out = jax.block_until_ready(fn())
                if name != "kernel chain":
                    check = "ok" if float(jnp.max(out)) == 0.0 else f"STALE READS (max err {float(jnp.max(out)):g})"
                else:
                    check = "ok" if bool(jnp.all(out == phases)) else "WRONG"
                t[phases] = _time(fn, args.reps)
                lines.append(f"| {name} | {phases} | {t[phases] * 1e3:.3f} | {check} |")
            except Exception as e:  # a lowering or runtime failure is itself the finding
                msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                lines.append(f"| {name} | {phases} | failed | {msg} |")
            print(lines[-1], flush=True)
        if len(t) == 2:
            per[name] = (t[256] - t[64]) / 192 * 1e6
    lines.append("")
    for name, us in per.items():
        what = "kernel boundary" if name == "kernel chain" else "phase"
        lines.append(f"- {name}: **{us:.2f} µs** per {what}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
