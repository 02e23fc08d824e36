"""GPU A/B of decode-loop variants at batch 1 and batch 64, with kernel profiles, in one process.

    python -m benchmarks.decode_probe [--out DIR] [--variants a,b,...] [--batches 1,64]

Random full-size CSM-1B in bf16 (`--quantize int8`: its int8 form), prompt of 100 text rows,
chunks of 16 frames. For each variant and batch: ms per frame step (median of 4 warm chunks)
and, with --profile, the GPU kernels of one chunk (CUPTI): count, busy time and the costliest
kernels. Each variant is a set of
`DecodeOptions` fields (see VARIANTS) applied to this device's `default_options()` with
`.replace(...)`: a different options value, so a different compiled program, with nothing global
changed in between.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from benchmarks._report import Budget, log, write_log

# name → DecodeOptions fields that differ from the base options. "default" is the code as shipped.
VARIANTS = {
    "default": {},
    "topk_sort": dict(top_k_method="sort"),
    "topk_rank": dict(top_k_method="rank"),
    "fused64": dict(fused_step_max_rows=64, matvec_max_rows=64),
    "no_fused": dict(fused_step=False),
    "xla_sampling": dict(sample_kernel=False),
    "xla_sampling_sort": dict(sample_kernel=False, top_k_method="sort"),
    "no_table": dict(audio_table=False),
    "no_step_attention": dict(step_attention=False),
    "untuned": dict(matvec_tuned=()),
    "block_tail": dict(block_tail=True),  # pallas_kernels.block_tail_mgpu in the fused step
    # pallas_kernels.between_attention_mgpu: two kernels a block in the fused step
    "between_attention": dict(between_attention=True),
    "between_attention_spread": dict(between_attention=True, span_spread=True),  # its out / qkv over K splits too
    # the norm + SwiGLU in the gate/up kernel's epilogue (the GPU default since session 15), or in XLA
    "swiglu_epilogue": dict(swiglu_epilogue=True),
    "no_swiglu_epilogue": dict(swiglu_epilogue=False),
    # XLA's matmuls through cuBLAS (per program) from 1 row / never
    "cublas": dict(cublas_min_rows=1),
    "no_cublas": dict(cublas_min_rows=0),
    # the depth decoder's 30-step scan unrolled: fewer loop iterations, longer compile
    **{f"unroll{u}": dict(depth_unroll=u) for u in (2, 3, 5, 10, 15, 30)},
    # --tune-matvec adds matvec_tuned and fused64_tuned: the swept configs as DecodeOptions.matvec_tuned
    "before": dict(sample_kernel=False, audio_table=False),
    # with --quantize int8: how the kernels turn int8 tiles into floats; all projections in XLA
    "int8_magic": dict(int8_convert="magic"),
    "int8_asm": dict(int8_convert="asm"),
    "int8_xla": dict(int8_kernels=False),
}
# Variants of the host loop rather than of the compiled program: the same options, timed with the
# model split afresh before every chunk (`split_model(reuse=False)`), i.e. without the split cache.
HOST_VARIANTS = {"no_split_cache": dict(fresh_split=True)}


def variant_options(base, name: str, variants: dict | None = None):
    """(options, time_decode keywords) of variant `name`: `base.replace(**variants[name])`, or
    `base` and the host keywords of a HOST_VARIANTS entry."""
    variants = VARIANTS if variants is None else variants
    if name in HOST_VARIANTS:
        return base, HOST_VARIANTS[name]
    if name not in variants:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join([*variants, *HOST_VARIANTS])}")
    return base.replace(**variants[name]), {}


def as_matvec_tuned(swept: dict) -> tuple:
    """{(M, K, N): MatvecConfig} from `matvec_check.tune_rows` → a `DecodeOptions.matvec_tuned` value."""
    return tuple(sorted((tuple(shape), tuple(cfg)) for shape, cfg in swept.items()))


def check_sampling() -> bool:
    """The sampling kernel on the GPU vs its jnp reference at CSM's shapes: equal draws, and each
    draw inside the reference's top-k set."""
    import jax.numpy as jnp
    import numpy as np

    from jaxtts.sampling import gumbel_noise, top_k_mask
    from pallas_kernels.sample_top_k import sample_top_k, sample_top_k_reference

    ok = True
    log("\n| sampling check | rows | parts | top-k | equal draws | in top-k |\n|---|---|---|---|---|---|")
    for m, parts, top_k in [(1, 1, 50), (64, 1, 50), (1, 8, 50), (64, 4, 50), (64, 4, 2050), (8, 4, 1)]:
        agree = inside = total = 0
        for seed in range(8):
            logits = 3 * jax.random.normal(jax.random.key(seed), (parts, m, 2051))
            sumsq = 100 * jnp.abs(jax.random.normal(jax.random.key(seed + 100), (parts, m))) if parts > 1 else None
            noise = gumbel_noise(jax.random.split(jax.random.key(seed + 200), (3, m)), 2051)
            kw = dict(top_k=top_k, sumsq=sumsq, norm_dim=1024, eps=1e-5)
            got = np.asarray(sample_top_k(logits, noise, 2, 0.9, **kw))
            want = np.asarray(sample_top_k_reference(logits, noise, 2, 0.9, **kw))
            y = logits.sum(0) if sumsq is None else logits.sum(0) * jax.lax.rsqrt(sumsq.sum(0) / 1024 + 1e-5)[:, None]
            mask = np.asarray(top_k_mask(y / 0.9, top_k, "sort"))
            agree += int((got == want).sum())
            inside += int(mask[np.arange(m), got].sum())
            total += m
        good = inside == total and agree >= total - 1
        ok &= good
        log(f"| {'ok' if good else 'FAIL'} | {m} | {parts} | {top_k} | {agree}/{total} | {inside}/{total} |")
    return ok


def _kernel_us(run, match: str | None, calls: int) -> float:
    """Median GPU duration (µs) of the kernels whose name contains `match` over `calls` calls of
    run(); with match=None, the summed duration of all kernels per call."""
    import statistics

    from benchmarks.profile import gpu_kernel_events

    events = gpu_kernel_events(lambda: [run() for _ in range(calls)][-1].block_until_ready())
    if match is None:
        return sum(d for _, d, _ in events) / calls / 1e3
    durations = [d for _, d, name in events if match in name]
    return statistics.median(durations) / 1e3


def tune_sampling(base) -> dict:
    """Time the sampling kernel per configuration (warps, radix bits; explicit arguments of
    `sample_top_k`) against the XLA draw at the depth head's shapes (rows 1 and 8: norm_matvec
    partials; 64: plain logits). Returns the table, the fastest configuration (to adopt it, set
    `pallas_kernels.sample_top_k.NUM_WARPS` / `RADIX_BITS`) and the smallest batch from which the
    kernel wins (`min_rows`: the probe's variants then use `sample_kernel_min_rows=min_rows`)."""
    import jax.numpy as jnp

    from jaxtts.sampling import Sampler, SplitLogits, gumbel_noise
    from pallas_kernels.fused_decode import norm_matvec
    from pallas_kernels.sample_top_k import sample_top_k

    sampler = Sampler.create(0.9, 50)
    xla_opts = base.replace(sample_kernel=False)
    heads = 0.03 * jax.random.normal(jax.random.key(0), (31, 1024, 2051), jnp.bfloat16)
    cases = {}
    for m in (1, 8, 64):
        h = jax.random.normal(jax.random.key(m), (m, 1024), jnp.bfloat16)
        noise = gumbel_noise(jax.random.split(jax.random.key(9), (32, m)), 2051)
        if m <= 8:
            parts, ss = norm_matvec(h, jnp.ones((1024,), jnp.bfloat16), heads, w_index=jnp.array([3], jnp.int32))
            logits = SplitLogits(parts, ss, 1024, 1e-5)
        else:
            logits = jnp.dot(h, heads[3], preferred_element_type=jnp.float32)
        cases[m] = (logits, noise)

    def kernel_draw(num_warps, radix_bits):
        def draw(lg, noise):
            if isinstance(lg, SplitLogits):
                return sample_top_k(
                    lg.parts,
                    noise,
                    5,
                    sampler.temperature,
                    top_k=sampler.top_k,
                    sumsq=lg.sumsq,
                    norm_dim=lg.norm_dim,
                    eps=lg.eps,
                    num_warps=num_warps,
                    radix_bits=radix_bits,
                )
            return sample_top_k(
                lg, noise, 5, sampler.temperature, top_k=sampler.top_k, num_warps=num_warps, radix_bits=radix_bits
            )

        return jax.jit(draw)

    configs = [(w, r) for w in (4, 8, 16) for r in (1, 2, 4)]
    table = {}
    log("\n| rows | XLA draw µs | " + " | ".join(f"w{w} r{r}" for w, r in configs) + " |")
    log("|---" * (len(configs) + 2) + "|")
    for m, (logits, noise) in cases.items():
        xla = jax.jit(lambda lg, n: sampler.draw(lg, n, 5, xla_opts))
        row = {"xla": _kernel_us(lambda: xla(logits, noise), None, 30)}
        for w, r in configs:
            fn = kernel_draw(w, r)
            row[(w, r)] = _kernel_us(lambda: fn(logits, noise), "sample_top_k", 30)
        table[m] = row
        log(f"| {m} | {row['xla']:.1f} | " + " | ".join(f"{row[c]:.1f}" for c in configs) + " |")
    best = min(configs, key=lambda c: sum(table[m][c] for m in table))
    wins = [m for m in table if table[m][best] < table[m]["xla"]]
    min_rows = min(m for m in wins if all(n in wins for n in table if n > m)) if wins else 1 << 30
    log(
        f"chosen: num_warps={best[0]}, radix_bits={best[1]}, kernel from {min_rows} rows "
        f"(the variants below use sample_kernel_min_rows={min_rows}; the kernel's own defaults are "
        "pallas_kernels.sample_top_k.NUM_WARPS / RADIX_BITS)"
    )
    return {
        "table": {str(m): {str(k): v for k, v in r.items()} for m, r in table.items()},
        "num_warps": best[0],
        "radix_bits": best[1],
        "min_rows": min_rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for probe.json and probe.md")
    ap.add_argument(
        "--variants",
        default="default,topk_sort,fused64",
        help="comma list of VARIANTS names, each optionally with :batches (e.g. fused64:64/32); "
        f"choose from {', '.join([*VARIANTS, *HOST_VARIANTS])}",
    )
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--quantize", default="none", choices=["none", "int8"], help="the model's weights")
    ap.add_argument(
        "--attention",
        default="pallas",
        choices=["xla", "pallas", "pallas_interpret"],
        help="attention of the base options (default pallas: the probe is for GPUs)",
    )
    ap.add_argument("--profile", default="default", help="variants to profile with CUPTI (comma list)")
    ap.add_argument("--check", action="store_true", help="first check the sampling kernel against its reference")
    ap.add_argument(
        "--tune-sampling",
        action="store_true",
        help="time sampling-kernel configurations; the variants then start the kernel from the batch where it wins",
    )
    ap.add_argument(
        "--tune-matvec",
        action="store_true",
        help="sweep the matvec kernel at M = 32 / 64 first; variants matvec_tuned / fused64_tuned use the winners",
    )
    ap.add_argument("--tune-rows", default="64,32", help="row counts for --tune-matvec")
    ap.add_argument("--first-audio", default="", help="variants to time first audio for (comma list)")
    ap.add_argument("--bench", action="store_true", help="finish with a full `jaxtts bench --kernels` in-process")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later variants are skipped past it")
    args = ap.parse_args(argv)
    from benchmarks.profile import kernel_profile
    from jaxtts import bench
    from jaxtts.config import preset
    from jaxtts.csm import CSM
    from jaxtts.options import default_options
    from jaxtts.sampling import Sampler

    known = [*VARIANTS, *HOST_VARIANTS, *(("matvec_tuned", "fused64_tuned") if args.tune_matvec else ())]
    for item in [*args.variants.split(","), *args.first_audio.split(",")]:  # unknown names fail before any work
        if item and item.partition(":")[0] not in known:
            raise SystemExit(f"unknown variant {item.partition(':')[0]!r}; choose from {', '.join(known)}")
    base = default_options(attention=args.attention)
    variants = dict(VARIANTS)  # this run's: the module's table stays as it is
    budget = Budget(args.budget)
    checked = True
    if args.check:
        try:
            checked = check_sampling()
        except Exception as e:  # report and go on to the timings
            log(f"sampling check failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            checked = False
    dev = jax.devices()[0]
    log(f"device: {dev.device_kind}, jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    tuned = None
    if args.tune_sampling:
        try:
            tuned = tune_sampling(base)
            base = base.replace(sample_kernel_min_rows=tuned["min_rows"])
        except Exception as e:
            log(f"sampling tuning failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    swept = None
    if args.tune_matvec:
        from benchmarks.matvec_check import tune_rows

        try:
            swept = tune_rows(Budget(args.budget / 2), rows=[int(m) for m in args.tune_rows.split(",")])
        except Exception as e:
            log(f"matvec tuning failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            swept = {}
        log(
            f"swept winners (for jaxtts.options.MATVEC_TUNED[{dev.device_kind!r}]): {{"
            + ", ".join(f"{k}: {tuple(v)}" for k, v in swept.items())
            + "}"
        )
        variants["matvec_tuned"] = dict(matvec_tuned=as_matvec_tuned(swept))
        variants["fused64_tuned"] = {**variants["fused64"], "matvec_tuned": as_matvec_tuned(swept)}
    log(f"base options: {base}")

    def options_of(name):
        return variant_options(base, name, variants)

    model = CSM.random(preset("csm-1b"), dtype="bfloat16", quantize=None if args.quantize == "none" else args.quantize)
    log(f"model: random csm-1b, bfloat16, weights {args.quantize}")
    sampler = Sampler.create(0.9, 50)
    batches = [int(b) for b in args.batches.split(",") if b]
    profiled = set(args.profile.split(","))

    results = {}
    log(
        "\n| variant | batch | ms/step | x real time | first chunk s (compile) | kernels/frame | busy ms/frame |"
        "\n|---|---|---|---|---|---|---|"
    )
    for item in filter(None, args.variants.split(",")):
        name, _, only = item.partition(":")  # "name:64/32" runs that variant at those batches only
        opts, host = options_of(name)
        for b in [int(x) for x in only.split("/")] if only else batches:
            if not budget.left():
                log(f"| {name} | {b} | skipped (budget) | | | | |")
                continue
            try:
                first = {}  # the first chunk's seconds: its compilation, unless a cache had it
                ms = 1000 * bench.time_decode(
                    model, sampler, batch=b, chunk=16, reps=4, prompt_tokens=100, opts=opts, report=first, **host
                )
                r = {"ms_per_step": ms, "x_realtime": b * 80.0 / ms, "first_chunk_s": first["first_chunk_s"]}
                if name in profiled:
                    r.update(kernel_profile(model, sampler, chunk=16, prompt_tokens=100, opts=opts, top=40, batch=b))
                results[f"{name}/b{b}"] = r
                log(
                    f"| {name} | {b} | {ms:.3f} | {r['x_realtime']:.0f} | {r['first_chunk_s']:.1f} | "
                    f"{r.get('kernels_per_frame', 0):.0f} | "
                    f"{r.get('kernel_busy_ms_per_frame', 0):.3f} |"
                )
            except Exception as e:  # one failing variant must not hide the others
                log(f"| {name} | {b} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} | | | | |")
    if args.first_audio:
        from jaxtts.mimi import Mimi

        codec = Mimi.random()
        log("\n| variant | first 80 ms of audio, warm (ms) |\n|---|---|")
        for name in args.first_audio.split(","):
            opts, _ = options_of(name)
            try:  # a new TTS per variant: its options are its own
                ms = 1000 * bench.time_first_audio(model, codec, opts, prompt_tokens=100)
                results[f"{name}/first_audio_ms"] = ms
                log(f"| {name} | {ms:.1f} |")
            except Exception as e:
                log(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} |")
    for key, r in results.items():
        if not isinstance(r, dict):
            continue
        top = sorted((r.get("kernel_top") or {}).items(), key=lambda kv: -kv[1]["us_per_frame"])
        if top:
            log(f"\n{key} costliest kernels (count/frame, µs/frame):")
            for k, v in top:
                log(f"  {v['per_frame']:7.1f} {v['us_per_frame']:8.1f}  {k[:70]}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            json.dump(
                {
                    "device": dev.device_kind,
                    "jax": jax.__version__,
                    "sampling_tuning": tuned,
                    "base_options": repr(base),
                    "variants": {k: repr(v) for k, v in variants.items()},
                    "matvec_tuned": {str(k): list(v) for k, v in (swept or {}).items()},
                    "results": results,
                },
                f,
                indent=1,
            )
        write_log(os.path.join(args.out, "probe.md"))
    if args.bench:
        from jaxtts.cli import main as cli

        del model
        cli(["bench", "--kernels"] + (["--json", os.path.join(args.out, "bench.json")] if args.out else []))
    return 0 if checked else 1


if __name__ == "__main__":
    sys.exit(main())
