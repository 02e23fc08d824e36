"""Does programmatic dependent launch (PDL) hide a Mosaic GPU GEMV's fixed cost, and when?

    python -m benchmarks.mgpu_pdl_probe [--calls 32] [--reps 5] [--out FILE]

Issue #17 asks each decode-step kernel to stream its weights into shared memory before
`griddepcontrol.wait`, so that its fixed cost (launch, first bytes from HBM, ramp) overlaps the
kernel before it. Session 6 (docs/PERF.md #24) saw the Mosaic GEMV's CUPTI span per call equal
with and without PDL. Two reasons could hide a gain, and this probe separates them:

- room: a dependent kernel can only start early on an SM where it fits beside the running one.
  `pallas_kernels.matvec_mgpu`'s default grid is ~2 programs per SM of up to ~110 KB of shared
  memory each, so the SMs may be full. The "fits" configs use <= 132 programs of <= ~107 KB;
- XLA's command buffers (CUDA graphs, on by default): each Mosaic custom call may become its own
  graph node, and whether the launch attribute survives that is unknown. Run the probe again
  under `XLA_FLAGS=--xla_gpu_enable_command_buffer=` (no command buffers) to compare.

For each shape x config x PDL on/off: one jitted program of --calls kernel calls in a row, each on
its own copy of W (>= 192 MB in all, so W streams from HBM), `partials=True` (no sum op between
the kernels: back-to-back Mosaic kernels). GPU kernel events from CUPTI (benchmarks.profile) over
--reps runs: per call, span (first start to last end / calls) and busy time, and the share of
kernels that started before the previous one ended (only PDL can do that on one stream).
TB/s = W bytes / span per call. Needs an sm_90 GPU and JAX >= 0.11.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._report import log, write_log

SHAPES = {  # CSM-1B's depth-decoder projections at batch 1
    "depth qkv": (1024, 1536),
    "depth out": (1024, 1024),
    "depth gate_up": (1024, 16384),
    "depth down": (8192, 1024),
}
# name -> {shape: matvec_mgpu keywords}; {} = its default config
CONFIGS = {
    "default": {},
    "fits": {  # <= 132 programs, <= ~107 KB of shared memory each: a dependent fits beside
        "depth qkv": dict(block_n=64, k_splits=4, stages=4),  # 24 x 4 = 96 programs
        "depth out": dict(block_n=64, k_splits=8, stages=2),  # 16 x 8 = 128
        "depth gate_up": dict(block_n=128, k_splits=1, stages=4),  # 128
        "depth down": dict(block_n=64, k_splits=8, stages=4),  # 16 x 8 = 128
    },
}


# --direct: each GEMV reads the previous one's output itself (one split, bf16 out: no XLA op in
# between), so a dependent kernel can only start early through PDL, command buffers or not.
DIRECT_SHAPES = {"square 2048": (2048, 2048)}
DIRECT_CONFIGS = {
    "16 programs": {"square 2048": dict(block_n=128, k_splits=1)},
    "32 programs": {"square 2048": dict(block_n=64, k_splits=1)},
}


def chain_events(fn, xs, ws, reps: int, dependent: bool, direct: bool = False):
    """CUPTI kernel events of `reps` runs of one jitted program calling fn on each (x, w): on
    each its own x, or (`dependent`) on x made from the previous call's output by one XLA fusion
    (sum of the split partials, cast to bf16, tiled to K), as in a decode step."""
    from benchmarks.profile import gpu_kernel_events

    def independent(xs, ws):
        return [fn(x, w) for x, w in zip(xs, ws)]

    def chained(xs, ws):
        x, outs = xs[0], []
        for w in ws:
            out = fn(x, w)
            y = jnp.sum(out, axis=0)  # [1, N]
            k = w.shape[0]
            x = jnp.tile(y, (1, -(-k // y.shape[1])))[:, :k].astype(jnp.bfloat16)
            outs.append(out)
        return outs[-1]

    def direct_chain(xs, ws):
        x = xs[0]
        for w in ws:
            x = fn(x, w)
        return x

    prog = jax.jit(direct_chain if direct else chained if dependent else independent)
    jax.block_until_ready(prog(xs, ws))
    jax.block_until_ready(prog(xs, ws))

    def run():
        for _ in range(reps):
            jax.block_until_ready(prog(xs, ws))

    return gpu_kernel_events(run)


def summarize(events, calls: int) -> dict:
    """Per-call span and GEMV busy time (µs), and the share of GEMVs that started before the
    kernel just before them ended (only PDL can do that on one stream). A run is cut after its
    `calls`-th GEMV (and the fusion that follows it, in a dependent chain): runs are the
    profiled repetitions of one program."""
    runs, cur, seen = [], [], 0
    for s, d, name in events:
        gemv = "matvec" in name
        if gemv and seen == calls:  # the next run's first GEMV
            runs.append(cur)
            cur, seen = [], 0
        cur.append((s, d, gemv))
        seen += gemv
    if seen == calls:
        runs.append(cur)
    if not runs:
        return {"error": f"{len(events)} kernel events, no run of {calls} GEMVs"}
    spans, busy, early, followers = [], [], 0, 0
    for r in runs:
        spans.append((max(s + d for s, d, _ in r) - r[0][0]) / calls / 1e3)
        busy.append(sum(d for _, d, g in r if g) / calls / 1e3)
        for (s0, d0, _), (s1, _, g1) in zip(r, r[1:]):
            if g1:
                followers += 1
                early += s1 < s0 + d0
    return {
        "span_us": float(np.median(spans)),
        "busy_us": float(np.median(busy)),
        "early_share": early / max(1, followers),
        "runs": len(runs),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=32, help="kernel calls per program")
    ap.add_argument("--reps", type=int, default=5, help="profiled runs of each program")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    ap.add_argument(
        "--direct",
        action="store_true",
        help="a chain of one-split GEMVs, each reading the previous output directly (square 2048 weights)",
    )
    ap.add_argument(
        "--dependent",
        action="store_true",
        help="each call's x made from the previous call's output by an XLA fusion (a decode step's shape)",
    )
    args = ap.parse_args(argv)
    from pallas_kernels.matvec_mgpu import default_config, matvec_mgpu, smem_bytes

    dev = jax.devices()[0]
    flags = os.environ.get("XLA_FLAGS", "")
    mode = (
        "direct chain (GEMV, GEMV, ...)"
        if args.direct
        else "dependent chain (GEMV, fusion, GEMV, ...)"
        if args.dependent
        else "independent calls"
    )
    shapes, configs = (DIRECT_SHAPES, DIRECT_CONFIGS) if args.direct else (SHAPES, CONFIGS)
    log(f"device: {dev.device_kind}; jax {jax.__version__}; XLA_FLAGS={flags!r}; {mode}")
    log(
        "\n| shape | config | programs | smem KB | PDL | span µs/call | busy µs/call | early starts | TB/s |"
        "\n|---|---|---|---|---|---|---|---|---|"
    )
    rng = np.random.default_rng(0)
    for shape, (k, n) in shapes.items():
        ws = [jnp.asarray(rng.standard_normal((k, n), np.float32) / k**0.5, jnp.bfloat16) for _ in range(args.calls)]
        xs = [jnp.asarray(rng.standard_normal((1, k), np.float32), jnp.bfloat16) for _ in range(args.calls)]
        # --calls copies of W: at 32, even depth out streams 67 MB a run, beyond the 50 MB L2
        for cname, table in configs.items():
            kw = table.get(shape, {})
            cfg = default_config(1, k, n)._replace(**kw)
            programs = (n // cfg.block_n) * cfg.k_splits
            out_bytes = 2 if args.direct else 4  # one split writes bf16; partials are float32
            steps = k // cfg.block_k // cfg.k_splits
            smem = smem_bytes(1, out_bytes, cfg.block_n, cfg.block_k, min(cfg.stages, steps))
            for pdl in (True, False):
                fn = lambda x, w, pdl=pdl: matvec_mgpu(x, w, config=cfg, pdl=pdl, partials=not args.direct)  # noqa: E731
                try:
                    r = summarize(chain_events(fn, xs, ws, args.reps, args.dependent, args.direct), args.calls)
                except Exception as e:  # one failing config must not hide the others
                    r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                if "error" in r:
                    log(f"| {shape} | {cname} | {programs} | {smem / 1024:.0f} | {pdl} | {r['error']} | | | |")
                    continue
                tbs = 2 * k * n / (r["span_us"] * 1e-6) / 1e12
                log(
                    f"| {shape} | {cname} | {programs} | {smem / 1024:.0f} | {pdl} | {r['span_us']:.2f} | "
                    f"{r['busy_us']:.2f} | {100 * r['early_share']:.0f} % | {tbs:.2f} |"
                )
    if args.out:
        write_log(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
