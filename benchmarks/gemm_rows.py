"""GPU survey of the decode step's projections at 16–256 rows and of XLA's GEMM choices for the
batched decode loop, in one process.

    python -m benchmarks.gemm_rows [--rows 16,64,256] [--shapes "depth gate_up,..."]
                                   [--decode-batches 64,256] [--preset csm-1b] [--budget 300] [--out FILE]

1. Per CSM-1B projection shape and row count M: GPU time per call (CUPTI, the sum of the
   program's kernels: a split-K GEMM's reduction included) of
   - `xla`: `jnp.dot(x, w, preferred_element_type=f32).astype(bf16)` as the model compiles it
     (XLA picks Triton GEMM fusions or cuBLAS per dot);
   - the same program compiled with each of `COMPILER_VARIANTS` (per-program XLA options, passed
     to `jax.jit(compiler_options=...)`: nothing global changes);
   - `triton_gemv`: `pallas_kernels.matvec` with this device's tuned config (M <= 64);
   - `mgpu_gemv`: `pallas_kernels.matvec_mgpu`, default config (M <= 64, Hopper).
   Each program calls the variant once per copy of W (>= 192 MB in all), so W streams from HBM
   as in the model. TB/s = W bytes / time.
2. `decode_chunk` of random CSM-1B (bf16, default options) at each batch, one program lowered
   once and compiled with each compiler variant (`Lowered.compile(compiler_options=...)`): ms
   per frame step (median of --reps chunks of 16 frames after one warm-up chunk).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._report import Budget, chosen, failure, log, write_log

SHAPES = {  # name: (K, N)
    "depth qkv": (1024, 1536),
    "depth out": (1024, 1024),
    "depth gate_up": (1024, 16384),
    "depth down": (8192, 1024),
    "backbone qkv": (2048, 3072),
    "backbone out": (2048, 2048),
    "backbone gate_up": (2048, 16384),
    "backbone down": (8192, 2048),
}
# name → XLA compiler options of one program (DebugOptions fields)
COMPILER_VARIANTS = {
    "xla_cublas": {"xla_gpu_enable_triton_gemm": False},
    "xla_cublaslt": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_cublaslt": True},
    "xla_exhaustive": {"xla_gpu_exhaustive_tiling_search": True},
}
STREAM_BYTES = 192 << 20


def _kernel_us(fn, *args, calls: int) -> float:
    from benchmarks.profile import kernel_us_per_call

    return sum(kernel_us_per_call(fn, *args, calls=calls).values())


def survey(shapes, rows, budget: Budget) -> None:
    from jaxtts.options import default_options
    from pallas_kernels.matvec import MatvecConfig, matvec
    from pallas_kernels.matvec_mgpu import matvec_mgpu

    opts = default_options()
    names = ["xla", *COMPILER_VARIANTS, "triton_gemv", "mgpu_gemv"]
    log("\n## GPU µs per call (CUPTI, all of the program's kernels / copies), W TB/s in brackets\n")
    log("| shape | M | copies | " + " | ".join(names) + " |")
    log("|---|---|---|" + "---|" * len(names))
    rng = np.random.default_rng(0)
    for shape in shapes:
        k, n = SHAPES[shape]
        copies = max(4, -(-STREAM_BYTES // (2 * k * n)))
        ws = [jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k), jnp.bfloat16) for _ in range(copies)]
        for m in rows:
            if not budget.left():
                log(f"(budget spent: {shape} M={m} and later skipped)")
                return
            xs = [jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16) for _ in range(copies)]

            def dot(x, w):
                return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

            tuned = opts.tuned_matvec(m, k, n)
            fns = {"xla": jax.jit(lambda xs, ws: [dot(x, w) for x, w in zip(xs, ws)])}
            for name, options in COMPILER_VARIANTS.items():
                fns[name] = jax.jit(lambda xs, ws: [dot(x, w) for x, w in zip(xs, ws)], compiler_options=options)
            if m <= 64:
                cfg = MatvecConfig(*tuned) if tuned else None
                fns["triton_gemv"] = jax.jit(lambda xs, ws, cfg=cfg: [matvec(x, w, config=cfg) for x, w in zip(xs, ws)])
                fns["mgpu_gemv"] = jax.jit(lambda xs, ws: [matvec_mgpu(x, w) for x, w in zip(xs, ws)])
            cells = []
            want = np.asarray(dot(xs[0], ws[0]).astype(jnp.float32))
            for name in names:
                if name not in fns:
                    cells.append("–")
                    continue
                try:
                    got = np.asarray(fns[name](xs[:1], ws[:1])[0].astype(jnp.float32))
                    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                    if not rel < 1e-2:
                        cells.append(f"wrong (rel {rel:.1e})")
                        continue
                    us = _kernel_us(fns[name], xs, ws, calls=copies)
                    cells.append(f"{us:.2f} ({2 * k * n / us / 1e6:.2f})")
                except Exception as e:  # a variant that fails is a cell, not a traceback
                    cells.append(failure(e, 80))
            log(f"| {shape} | {m} | {copies} | " + " | ".join(cells) + " |")


def decode_loop(batches, reps: int, budget: Budget, preset_name: str = "csm-1b") -> None:
    from jaxtts.config import preset
    from jaxtts.csm import CSM
    from jaxtts.generation import decode_chunk, lower_decode_chunk
    from jaxtts.options import default_options
    from jaxtts.sampling import Sampler
    from jaxtts.testing import prompt_state

    chunk = 16
    model = CSM.random(preset(preset_name), dtype="bfloat16")
    sampler = Sampler.create(0.9, 50)
    opts = default_options()
    log("\n## decode_chunk, ms per frame step (one lowering, compiled per variant; same process)\n")
    log("| batch | variant | ms/step | x real time | compile s |")
    log("|---|---|---|---|---|")
    for b in batches:
        state = prompt_state(model, b, 100, 100 + chunk * (reps + 2) + 1, opts)
        lowered = lower_decode_chunk(model, state, sampler, chunk, opts=opts)
        for name, options in {"xla": {}, **COMPILER_VARIANTS}.items():
            if not budget.left():
                log(f"(budget spent: batch {b} {name} and later skipped)")
                return
            try:
                t = time.perf_counter()
                program = lowered.compile(compiler_options=options or None)
                compile_s = time.perf_counter() - t
                run = prompt_state(model, b, 100, 100 + chunk * (reps + 2) + 1, opts)
                run, frames, _ = decode_chunk(model, run, sampler, chunk, opts=opts, program=program)
                jax.block_until_ready(frames)
                times = []
                for _ in range(reps):
                    t = time.perf_counter()
                    run, frames, _ = decode_chunk(model, run, sampler, chunk, opts=opts, program=program)
                    jax.block_until_ready(frames)
                    times.append((time.perf_counter() - t) / chunk)
                ms = statistics.median(times) * 1e3
                log(f"| {b} | {name} | {ms:.3f} | {80 * b / ms:.0f} | {compile_s:.1f} |")
            except Exception as e:
                log(f"| {b} | {name} | {failure(e, 120)} | | |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="16,32,64,128,256")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--decode-batches", default="64,256", help="empty: skip part 2")
    ap.add_argument("--reps", type=int, default=4, help="timed decode chunks per variant")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; later cases are skipped past it")
    ap.add_argument("--preset", default="csm-1b", help="model of part 2 (tiny: a quick run on any device)")
    ap.add_argument("--out", help="also write the tables (markdown) here")
    args = ap.parse_args(argv)
    shapes = chosen(args.shapes, SHAPES, "shape")
    budget = Budget(args.budget)
    dev = jax.devices()[0]
    log(f"device: {dev.device_kind}, jax {jax.__version__}")
    if args.decode_batches:
        decode_loop([int(b) for b in args.decode_batches.split(",")], args.reps, budget, args.preset)
    survey(shapes, [int(m) for m in args.rows.split(",")], budget)
    if args.out:
        write_log(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
