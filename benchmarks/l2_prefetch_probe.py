"""Does an L2 prefetch kernel make a later GEMV faster, and what does the prefetch kernel cost?

    python -m benchmarks.l2_prefetch_probe [--blocks 64,132,264] [--fillers 0,3] [--out FILE]

`pallas_kernels.l2_prefetch_mgpu` issues TMA L2 prefetches of a weight and exits. It pays only
if (a) the kernel itself is short (the prefetches are left to the memory system), and (b) a GEMV
that finds its weight in L2 is faster than one that streams it from HBM. This probe measures both
on the depth decoder's gate/up shape ([1, 1024] @ [1024, 16384] bf16, 33.5 MB), in one process:
a jitted chain through `layers` different weights (so nothing stays in L2 from the previous
layer), each layer

    [l2_prefetch(x, W_i)]  →  `fillers` latency-bound GEMVs ([1024, 1536], the depth qkv shape)
                           →  the Triton GEMV x @ W_i (the model's `matvec`)

with and without the prefetch, over the prefetch kernel's program counts. CUPTI per kernel: the
prefetch kernel's µs, the big GEMV's µs, and the chain's span per layer (first kernel start to
last kernel end, / layers): the number that says whether the whole pays.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._report import Budget, failure, log, write_log

K, N, N_SMALL = 1024, 16384, 1536


def chain(x, weights, smalls, *, prefetch_blocks: int | None, fillers: int):
    from pallas_kernels.l2_prefetch_mgpu import l2_prefetch
    from pallas_kernels.matvec import matvec

    for w, small in zip(weights, smalls):
        if prefetch_blocks:
            x = l2_prefetch(x, w, blocks=prefetch_blocks)
        for _ in range(fillers):
            x = x + matvec(x, small)[:, :K] * 1e-3
        x = matvec(x, w)[:, :K]
    return x


def run(blocks_list, fillers_list, layers: int, budget: Budget) -> None:
    from benchmarks.profile import gpu_kernel_events

    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal((K, N), np.float32) / 32, jnp.bfloat16) for _ in range(layers)]
    smalls = [jnp.asarray(rng.standard_normal((K, N_SMALL), np.float32) / 32, jnp.bfloat16) for _ in range(layers)]
    x = jnp.asarray(rng.standard_normal((1, K), np.float32), jnp.bfloat16)
    log(f"\nlayers {layers}, W [{K}, {N}] bf16 ({K * N * 2 / 2**20:.1f} MB) per layer; fillers [{K}, {N_SMALL}]\n")
    log(
        "| fillers | prefetch programs | span µs per layer | prefetch kernel µs | big GEMV µs | filler GEMV µs | same output |"
    )
    log("|---|---|---|---|---|---|---|")
    for fillers in fillers_list:
        want = None
        for blocks in [0, *blocks_list]:
            if not budget.left():
                log("(budget spent)")
                return
            try:
                fn = jax.jit(lambda x, ws, ss, b=blocks, f=fillers: chain(x, ws, ss, prefetch_blocks=b, fillers=f))
                out = np.asarray(jax.block_until_ready(fn(x, weights, smalls)), np.float32)
                want = out if want is None else want
                same = bool(np.array_equal(out, want))
                spans, per = [], {}
                for _ in range(5):
                    ev = gpu_kernel_events(lambda: jax.block_until_ready(fn(x, weights, smalls)))
                    spans.append((max(s + d for s, d, _ in ev) - min(s for s, _, _ in ev)) / 1e3 / layers)
                    for _, d, name in ev:
                        per.setdefault(name, []).append(d / 1e3)
                gemvs = sorted((v for k, v in per.items() if "matvec" in k), key=lambda v: -np.mean(v))
                big = np.mean(gemvs[0]) if gemvs else float("nan")
                small = np.mean(gemvs[1]) if len(gemvs) > 1 else float("nan")
                pre = [v for k, v in per.items() if "l2_prefetch" in k]
                pre_us = f"{np.mean(pre[0]):.2f}" if pre else "–"
                log(
                    f"| {fillers} | {blocks or 'none'} | {np.median(spans):.2f} | {pre_us} | {big:.2f} | {small:.2f} | {same} |"
                )
            except Exception as e:  # a variant that fails is a row, not a traceback
                log(f"| {fillers} | {blocks or 'none'} | {failure(e, 200)} | | | | |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="64,132,264", help="prefetch kernel program counts (comma list)")
    ap.add_argument("--fillers", default="0,3", help="latency-bound GEMVs between prefetch and use (comma list)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    log(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    run(
        [int(b) for b in args.blocks.split(",") if b],
        [int(f) for f in args.fillers.split(",") if f],
        args.layers,
        Budget(args.budget_s),
    )
    if args.out:
        write_log(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
