"""GPU A/B of decode-loop variants at batch 1 and batch 64, with kernel profiles, in one process.

    python -m pallas_kernels.decode_probe [--out DIR] [--variants a,b,...] [--batches 1,64]

Random full-size CSM-1B in bf16, prompt of 100 text rows, chunks of 16 frames. For each variant
and batch: ms per frame step (median of 4 warm chunks) and, with --profile, the GPU kernels of
one chunk (CUPTI): count, busy time and the costliest kernels. Each variant is a set of module
switches (see VARIANTS); the default state is restored after each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from pallas_kernels._report import Budget, log, write_log


def _switch(settings: dict):
    """Apply {"module.ATTR": value}; return the previous values."""
    import importlib

    old = {}
    for name, value in settings.items():
        mod, attr = name.rsplit(".", 1)
        m = importlib.import_module(mod)
        old[name] = getattr(m, attr)
        setattr(m, attr, value)
    return old


# name → module switches. "default" is the code as shipped.
VARIANTS = {
    "default": {},
    "topk_sort": {"jaxtts.sampling.TOP_K_METHOD": "sort"},
    "topk_rank": {"jaxtts.sampling.TOP_K_METHOD": "rank"},
    "fused64": {"jaxtts.llama.FUSED_STEP_MAX_ROWS": 64, "jaxtts.llama.MATVEC_MAX_ROWS": 64},
    "no_fused": {"jaxtts.llama.USE_FUSED_STEP": False},
    "xla_sampling": {"jaxtts.sampling.SAMPLE_KERNEL": False},
    "xla_sampling_sort": {"jaxtts.sampling.SAMPLE_KERNEL": False, "jaxtts.sampling.TOP_K_METHOD": "sort"},
    "no_table": {"jaxtts.generation.USE_AUDIO_TABLE": False},
    "no_step_attention": {"jaxtts.llama.USE_STEP_ATTENTION": False},
    "untuned": {"pallas_kernels.matvec.TUNED": {}},
    "no_split_cache": {"jaxtts.generation.SPLIT_CACHE": False},
    # --tune-matvec adds matvec_tuned and fused64_tuned: the swept configs as pallas_kernels.matvec.TUNED
    "before": {"jaxtts.sampling.SAMPLE_KERNEL": False, "jaxtts.generation.USE_AUDIO_TABLE": False},
}


def check_sampling() -> bool:
    """The sampling kernel on the GPU vs its jnp reference at CSM's shapes: equal draws, and each
    draw inside the reference's top-k set."""
    import jax.numpy as jnp
    import numpy as np

    from jaxtts.sampling import top_k_mask
    from pallas_kernels.sample_top_k import gumbel_noise, sample_top_k, sample_top_k_reference

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

    from pallas_kernels._report import gpu_kernel_events

    events = gpu_kernel_events(lambda: [run() for _ in range(calls)][-1].block_until_ready())
    if match is None:
        return sum(d for _, d, _ in events) / calls / 1e3
    durations = [d for _, d, name in events if match in name]
    return statistics.median(durations) / 1e3


def tune_sampling() -> dict:
    """Time the sampling kernel per configuration (warps, radix bits) against the XLA draw at the
    depth head's shapes (rows 1 and 8: norm_matvec partials; 64: plain logits), then set the
    fastest configuration and the smallest batch from which the kernel wins."""
    import jax.numpy as jnp

    from jaxtts import sampling
    from jaxtts.sampling import Sampler
    from pallas_kernels import sample_top_k as sk
    from pallas_kernels.fused_decode import SplitLogits, norm_matvec

    sampler = Sampler.create(0.9, 50)
    heads = 0.03 * jax.random.normal(jax.random.key(0), (31, 1024, 2051), jnp.bfloat16)
    cases = {}
    for m in (1, 8, 64):
        h = jax.random.normal(jax.random.key(m), (m, 1024), jnp.bfloat16)
        noise = sk.gumbel_noise(jax.random.split(jax.random.key(9), (32, m)), 2051)
        if m <= 8:
            parts, ss = norm_matvec(h, jnp.ones((1024,), jnp.bfloat16), heads, w_index=jnp.array([3], jnp.int32))
            logits = SplitLogits(parts, ss, 1024, 1e-5)
        else:
            logits = jnp.dot(h, heads[3], preferred_element_type=jnp.float32)
        cases[m] = (logits, noise)
    configs = [(w, r) for w in (4, 8, 16) for r in (1, 2, 4)]
    table = {}
    log("\n| rows | XLA draw µs | " + " | ".join(f"w{w} r{r}" for w, r in configs) + " |")
    log("|---" * (len(configs) + 2) + "|")
    for m, (logits, noise) in cases.items():
        xla = jax.jit(lambda l, n: sampler.draw(l, n, 5, "xla"))
        row = {"xla": _kernel_us(lambda: xla(logits, noise), None, 30)}
        for w, r in configs:
            sk.NUM_WARPS, sk.RADIX_BITS = w, r
            fn = jax.jit(lambda l, n: sampler.draw(l, n, 5, "pallas"))
            row[(w, r)] = _kernel_us(lambda: fn(logits, noise), "sample_top_k", 30)
        table[m] = row
        log(f"| {m} | {row['xla']:.1f} | " + " | ".join(f"{row[c]:.1f}" for c in configs) + " |")
    best = min(configs, key=lambda c: sum(table[m][c] for m in table))
    sk.NUM_WARPS, sk.RADIX_BITS = best
    wins = [m for m in table if table[m][best] < table[m]["xla"]]
    sampling.SAMPLE_KERNEL_MIN_ROWS = min(m for m in wins if all(n in wins for n in table if n > m)) if wins else 1 << 30
    log(f"chosen: num_warps={best[0]}, radix_bits={best[1]}, kernel from {sampling.SAMPLE_KERNEL_MIN_ROWS} rows")
    return {"table": {str(m): {str(k): v for k, v in r.items()} for m, r in table.items()},
            "num_warps": best[0], "radix_bits": best[1], "min_rows": sampling.SAMPLE_KERNEL_MIN_ROWS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for probe.json and probe.md")
    ap.add_argument("--variants", default="default,topk_sort,fused64",
                    help="comma list of VARIANTS names, each optionally with :batches (e.g. fused64:64/32)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--profile", default="default", help="variants to profile with CUPTI (comma list)")
    ap.add_argument("--check", action="store_true", help="first check the sampling kernel against its reference")
    ap.add_argument("--tune-sampling", action="store_true",
                    help="time sampling-kernel configurations, keep the fastest for what follows")
    ap.add_argument("--tune-matvec", action="store_true",
                    help="sweep the matvec kernel at M = 32 / 64 first; variants matvec_tuned / fused64_tuned use "
                         "the winners")
    ap.add_argument("--tune-rows", default="64,32", help="row counts for --tune-matvec")
    ap.add_argument("--first-audio", default="", help="variants to time first audio for (comma list)")
    ap.add_argument("--bench", action="store_true", help="finish with a full `jaxtts bench --kernels` in-process")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later variants are skipped past it")
    args = ap.parse_args(argv)
    from jaxtts import bench
    from jaxtts.config import preset
    from jaxtts.csm import CSM
    from jaxtts.sampling import Sampler

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
            tuned = tune_sampling()
        except Exception as e:
            log(f"sampling tuning failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            from jaxtts import sampling

            sampling.SAMPLE_KERNEL_MIN_ROWS = 16  # measured: XLA at batch 1, the kernel at batch 64
    swept = None
    if args.tune_matvec:
        from pallas_kernels.matvec_check import tune_rows

        try:
            swept = tune_rows(Budget(args.budget / 2), rows=[int(m) for m in args.tune_rows.split(",")])
        except Exception as e:
            log(f"matvec tuning failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            swept = {}
        log("swept winners (pallas_kernels.matvec.TUNED): {" + ", ".join(
            f"{k}: MatvecConfig{tuple(v)}" for k, v in swept.items()) + "}")
        VARIANTS["matvec_tuned"] = {"pallas_kernels.matvec.TUNED": swept}
        VARIANTS["fused64_tuned"] = {**VARIANTS["fused64"], "pallas_kernels.matvec.TUNED": swept}
    model = CSM.random(preset("csm-1b"), dtype="bfloat16")
    sampler = Sampler.create(0.9, 50)
    batches = [int(b) for b in args.batches.split(",") if b]
    profiled = set(args.profile.split(","))
    results = {}
    log("\n| variant | batch | ms/step | x real time | kernels/frame | busy ms/frame |\n|---|---|---|---|---|---|")
    for item in filter(None, args.variants.split(",")):
        name, _, only = item.partition(":")  # "name:64/32" runs that variant at those batches only
        for b in ([int(x) for x in only.split("/")] if only else batches):
            if not budget.left():
                log(f"| {name} | {b} | skipped (budget) | | | |")
                continue
            old = _switch(VARIANTS[name])
            jax.clear_caches()
            try:
                ms = 1000 * bench.time_decode(model, sampler, batch=b, chunk=16, reps=4, prompt_tokens=100,
                                              impl="pallas")
                r = {"ms_per_step": ms, "x_realtime": b * 80.0 / ms}
                if name in profiled:
                    r.update(bench.kernel_profile(model, sampler, chunk=16, prompt_tokens=100, impl="pallas",
                                                  top=40, batch=b))
                results[f"{name}/b{b}"] = r
                log(f"| {name} | {b} | {ms:.3f} | {r['x_realtime']:.0f} | {r.get('kernels_per_frame', 0):.0f} | "
                    f"{r.get('kernel_busy_ms_per_frame', 0):.3f} |")
            except Exception as e:  # one failing variant must not hide the others
                log(f"| {name} | {b} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} | | | |")
            finally:
                _switch(old)
    if args.first_audio:
        from types import SimpleNamespace

        log("\n| variant | first 80 ms of audio, warm (ms) |\n|---|---|")
        for name in args.first_audio.split(","):
            old = _switch(VARIANTS[name])
            try:
                ms = 1000 * bench.time_first_audio(SimpleNamespace(codec=None, prompt_tokens=100), model, "pallas")
                results[f"{name}/first_audio_ms"] = ms
                log(f"| {name} | {ms:.1f} |")
            finally:
                _switch(old)
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
            json.dump({"device": dev.device_kind, "jax": jax.__version__, "sampling_tuning": tuned,
                       "matvec_tuned": {str(k): list(v) for k, v in (swept or {}).items()},
                       "results": results}, f, indent=1)
        write_log(os.path.join(args.out, "probe.md"))
    if args.bench:
        from jaxtts.cli import main as cli

        del model
        cli(["bench", "--kernels"] + (["--json", os.path.join(args.out, "bench.json")] if args.out else []))
    return 0 if checked else 1


if __name__ == "__main__":
    sys.exit(main())
