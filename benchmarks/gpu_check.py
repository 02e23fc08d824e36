"""GPU check for the attention kernels: correctness at CSM shapes, then timings vs the XLA path.

    python -m benchmarks.gpu_check [--sweep] [--budget-s 420] [--out FILE]

1. Correctness: both kernels (float32 and bfloat16) against their jnp references at CSM's shapes,
   ragged lengths, context before the prompt, cache slots past the lengths poisoned with NaN.
2. Timings (bf16) of `jaxtts.attention.attention` with impl="pallas" vs impl="xla" over several
   batch sizes and filled lengths. Each timed program chains the call through several layers'
   caches (the output is the next layer's query), so the caches are separate buffers as in the
   model and mostly do not sit in L2; the figure is the median time per call (see _time_chains).
3. With --sweep: block-size / split / pipelining sweeps, to choose the kernels' defaults.

Stops starting new work after --budget-s seconds so the tables still get printed.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._report import Budget, elapsed, log, write_log
from jaxtts.attention import attention
from pallas_kernels import (
    decode_attention,
    decode_attention_reference,
    prefill_attention,
    prefill_attention_reference,
)

BACKBONE = (32, 8, 64, 2048)  # heads, kv heads, head dim, cache slots
DEPTH = (8, 2, 128, 32)


def _rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _cache(key, b, s, hkv, d, lengths, dtype, poison=True):
    kk, kv = jax.random.split(key)
    k, v = _rand(kk, (b, s, hkv, d), dtype), _rand(kv, (b, s, hkv, d), dtype)
    if poison:  # stale slots: any weight on them turns the output into NaN
        stale = (jnp.arange(s)[None, :] >= lengths[:, None])[:, :, None, None]
        k, v = jnp.where(stale, jnp.nan, k).astype(dtype), jnp.where(stale, jnp.nan, v).astype(dtype)
    return k, v


# --------------------------------------------------------------------------- correctness


def check_correctness(budget: Budget) -> bool:
    log("## Correctness (kernel vs jnp reference, max |err|; cache past lengths is NaN)")
    log("| kernel | shape | dtype | max abs err | rel L2 err | ok |")
    log("|---|---|---|---|---|---|")
    all_ok = True
    key = jax.random.key(0)
    cases = []
    for name, (h, hkv, d, s) in (("backbone", BACKBONE), ("depth", DEPTH)):
        b = 8
        lengths = jnp.asarray(np.r_[1, s, np.random.default_rng(0).integers(1, s + 1, b - 2)], jnp.int32)
        cases.append(
            ("decode", f"{name} B={b} S={s} ragged", dict(h=h, hkv=hkv, d=d, s=s, b=b, lengths=lengths, kw={}))
        )
        cases.append(
            (
                "decode",
                f"{name} B={b} S={s} ragged, 1 split",
                dict(h=h, hkv=hkv, d=d, s=s, b=b, lengths=lengths, kw=dict(num_splits=1)),
            )
        )
        cases.append(
            (
                "decode+q_start",
                f"{name} B={b} S={s} query before end",
                dict(h=h, hkv=hkv, d=d, s=s, b=b, lengths=lengths, q_start=lengths // 2, kw={}),
            )
        )
    h, hkv, d, s = BACKBONE
    t, ctx = min(300, s // 2), s // 2
    cases += [
        (
            "prefill",
            f"backbone B=2 T={t} q_start=[0,{ctx}]",
            dict(h=h, hkv=hkv, d=d, s=s, t=t, q_start=[0, ctx], lengths=[t, ctx + t]),
        ),
        ("prefill", f"backbone B=1 T={s}", dict(h=h, hkv=hkv, d=d, s=s, t=s, q_start=[0], lengths=[s])),
    ]
    h, hkv, d, s = DEPTH
    cases.append(("prefill", "depth B=4 T=2", dict(h=h, hkv=hkv, d=d, s=s, t=2, q_start=[0] * 4, lengths=[2, 2, 2, 1])))
    for kind, desc, c in cases:
        for dtype in (jnp.float32, jnp.bfloat16):
            if not budget.left():
                log(f"| {kind} | {desc} | {dtype.__name__} | skipped (time budget) | | |")
                continue
            key, k1, k2 = jax.random.split(key, 3)
            try:
                if kind.startswith("decode"):
                    lengths = c["lengths"]
                    q = _rand(k1, (c["b"], c["h"], c["d"]), dtype)
                    k, v = _cache(k2, c["b"], c["s"], c["hkv"], c["d"], lengths, dtype)
                    qs = c.get("q_start")
                    out = decode_attention(q, k, v, lengths, qs, **c["kw"])
                    want = decode_attention_reference(q, k, v, lengths, qs)
                else:
                    qs = jnp.asarray(c["q_start"], jnp.int32)
                    lengths = jnp.asarray(c["lengths"], jnp.int32)
                    q = _rand(k1, (len(c["lengths"]), c["t"], c["h"], c["d"]), dtype)
                    k, v = _cache(k2, len(c["lengths"]), c["s"], c["hkv"], c["d"], lengths, dtype)
                    out = prefill_attention(q, k, v, qs, lengths)
                    want = prefill_attention_reference(q, k, v, qs, lengths)
                out = np.asarray(out.astype(jnp.float32))
                want = np.asarray(want.astype(jnp.float32))
                err = float(np.nanmax(np.abs(out - want))) if np.isfinite(out).any() else float("nan")
                rel = float(np.linalg.norm(np.nan_to_num(out - want, nan=1e9)) / np.linalg.norm(want))
                tol = 1e-4 if dtype == jnp.float32 else 3e-2
                ok = bool(np.isfinite(out).all() and err <= tol)
                verdict = "yes" if ok else "NO"
                log(f"| {kind} | {desc} | {dtype.__name__} | {err:.2e} | {rel:.2e} | {verdict} |")
            except Exception as e:  # keep going: one broken case must not hide the others
                ok = False
                log(
                    f"| {kind} | {desc} | {dtype.__name__} | ERROR {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''} | | NO |"
                )
                traceback.print_exc(limit=4)
            all_ok &= ok
    return all_ok


# --------------------------------------------------------------------------- timing


def _time_chains(fns, q, caches, extra, reps=25, inner=5):
    """Seconds per call of each fn in `fns` (name -> fn), chained through the caches in one jit.

    Returns name -> (median, half the interquartile range). Variants are timed in turn within
    each repetition so that clock or thermal drift hits them alike, and each sample enqueues
    `inner` programs back to back before waiting, so the host's wake-up latency is spread thin.
    """

    def chain(fn):
        @jax.jit
        def run(q, caches, extra):
            for k, v in caches:
                q = fn(q, k, v, *extra)
            return q

        return run

    runs = {name: chain(fn) for name, fn in fns.items()}
    for run in runs.values():  # compile and warm up
        run(q, caches, extra).block_until_ready()
        run(q, caches, extra).block_until_ready()
    samples = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            t = time.perf_counter()
            for _ in range(inner):
                out = run(q, caches, extra)
            out.block_until_ready()
            samples[name].append((time.perf_counter() - t) / inner / len(caches))
    stats = {}
    for name, xs in samples.items():
        q1, q2, q3 = np.percentile(xs, [25, 50, 75])
        stats[name] = (float(q2), float(q3 - q1) / 2)
    return stats


def _us(stat):
    return f"{stat[0] * 1e6:.1f} ±{stat[1] * 1e6:.1f}"


def _layers(b, s, hkv, d, lengths, key, max_layers=32, dtype=jnp.bfloat16):
    """Enough separate caches (4..max_layers) to hold ~256 MB, well past the 50 MB L2."""
    per_layer = 2 * b * s * hkv * d * jnp.dtype(dtype).itemsize
    n = int(min(max_layers, max(4, 256e6 // per_layer)))
    keys = jax.random.split(key, n)
    return [_cache(kk, b, s, hkv, d, lengths, dtype, poison=False) for kk in keys]


def _decode_rows():
    rows = []
    h, hkv, d, s = BACKBONE
    for b in (1, 8, 64):
        for filled in (128, 512, 2048):
            rows.append(("backbone", h, hkv, d, s, b, str(filled), np.full(b, filled)))
    rows.append(("backbone", h, hkv, d, s, 64, "ragged 1..2048", np.random.default_rng(1).integers(1, s + 1, 64)))
    h, hkv, d, s = DEPTH
    for b in (1, 64):
        for filled in (4, 32):
            rows.append(("depth", h, hkv, d, s, b, str(filled), np.full(b, filled)))
    return rows


def _prefill_rows():
    h, hkv, d, s = BACKBONE
    rows = [("backbone", h, hkv, d, s, 1, t, 0) for t in (128, 512, 2048)]
    rows += [("backbone", h, hkv, d, s, 1, 256, 1024), ("backbone", h, hkv, d, s, 8, 512, 0)]
    h, hkv, d, s = DEPTH
    rows += [("depth", h, hkv, d, s, b, 2, 0) for b in (1, 64)]
    return rows


def _entry(impl):
    def fn(q, k, v, q_start, lengths):
        return attention(q, k, v, q_start, lengths, impl=impl)

    return fn


def time_decode(budget: Budget):
    log("## Decode (T=1), bf16: `attention(impl=...)`, µs per call")
    log("| model | B | filled | xla µs | pallas µs | speed-up | pallas KV GB/s |")
    log("|---|---|---|---|---|---|---|")
    key = jax.random.key(1)
    for name, h, hkv, d, s, b, desc, filled in _decode_rows():
        if not budget.left():
            log(f"| {name} | {b} | {desc} | skipped (time budget) | | | |")
            continue
        key, k1, k2 = jax.random.split(key, 3)
        lengths = jnp.asarray(filled, jnp.int32)
        q = _rand(k1, (b, 1, h, d), jnp.bfloat16)
        caches = _layers(b, s, hkv, d, lengths, k2)
        extra = (lengths - 1, lengths)
        try:
            st = _time_chains({"xla": _entry("xla"), "pallas": _entry("pallas")}, q, caches, extra)
            t_x, t_p = st["xla"][0], st["pallas"][0]
            kv_bytes = 2 * int(np.sum(np.asarray(filled))) * hkv * d * 2
            log(
                f"| {name} | {b} | {desc} | {_us(st['xla'])} | {_us(st['pallas'])} | {t_x / t_p:.2f}x | "
                f"{kv_bytes / t_p / 1e9:.0f} |"
            )
        except Exception as e:
            log(f"| {name} | {b} | {desc} | ERROR {type(e).__name__}: {str(e)[:150]} | | | |")
            traceback.print_exc(limit=4)
        del caches


def time_prefill(budget: Budget):
    log("## Prefill, bf16: `attention(impl=...)`, µs per call")
    log("| model | B | T | q_start | xla µs | pallas µs | speed-up | pallas TFLOP/s |")
    log("|---|---|---|---|---|---|---|---|")
    key = jax.random.key(2)
    for name, h, hkv, d, s, b, t, q0 in _prefill_rows():
        if not budget.left():
            log(f"| {name} | {b} | {t} | {q0} | skipped (time budget) | | | |")
            continue
        key, k1, k2 = jax.random.split(key, 3)
        q_start = jnp.full((b,), q0, jnp.int32)
        lengths = q_start + t
        q = _rand(k1, (b, t, h, d), jnp.bfloat16)
        caches = _layers(b, s, hkv, d, lengths, k2, max_layers=16)
        extra = (q_start, lengths)
        try:
            st = _time_chains({"xla": _entry("xla"), "pallas": _entry("pallas")}, q, caches, extra, reps=15)
            t_x, t_p = st["xla"][0], st["pallas"][0]
            pairs = b * (t * (t + 1) // 2 + t * q0)  # visible (query, key) pairs
            flops = 4 * pairs * h * d
            log(
                f"| {name} | {b} | {t} | {q0} | {_us(st['xla'])} | {_us(st['pallas'])} | {t_x / t_p:.2f}x | "
                f"{flops / t_p / 1e12:.1f} |"
            )
        except Exception as e:
            log(f"| {name} | {b} | {t} | {q0} | ERROR {type(e).__name__}: {str(e)[:150]} | | | |")
            traceback.print_exc(limit=4)
        del caches


# --------------------------------------------------------------------------- sweeps


def sweep(budget: Budget):
    log("## Sweeps (bf16, µs per call, median ±IQR/2; fastest first)")
    key = jax.random.key(3)

    def run_sweep(title, q, caches, extra, make_fn, configs):
        if not budget.left():
            log(f"- {title}: skipped (time budget)")
            return
        try:
            st = _time_chains({cfg: make_fn(cfg) for cfg in configs}, q, caches, extra, reps=15)
        except Exception as e:
            log(f"- {title}: ERROR {type(e).__name__}: {str(e)[:200]}")
            traceback.print_exc(limit=4)
            return
        order = sorted(st, key=lambda cfg: st[cfg][0])
        log(f"- {title}: " + ", ".join(f"{cfg} {_us(st[cfg])}" for cfg in order))

    def decode_fn(cfg):
        block_k, splits, warps, stages = cfg
        return lambda q, k, v, n: decode_attention(
            q, k, v, n, block_k=block_k, num_splits=splits, num_warps=warps, num_stages=stages
        )

    decode_cases = [
        (
            BACKBONE,
            1,
            "2048",
            np.full(1, 2048),
            [
                (128, 16, 4, 2),
                (64, 16, 4, 2),
                (128, 8, 4, 2),
                (256, 8, 4, 2),
                (64, 32, 4, 2),
                (128, 16, 2, 2),
                (128, 16, 4, 3),
            ],
        ),
        (
            BACKBONE,
            1,
            "512",
            np.full(1, 512),
            [(128, 16, 4, 2), (64, 4, 4, 2), (64, 8, 4, 2), (128, 4, 4, 2), (32, 16, 4, 2)],
        ),
        (
            BACKBONE,
            8,
            "2048",
            np.full(8, 2048),
            [(128, 4, 4, 2), (64, 8, 4, 2), (256, 4, 4, 2), (128, 4, 4, 3), (128, 8, 4, 2)],
        ),
        (
            BACKBONE,
            64,
            "2048",
            np.full(64, 2048),
            [
                (128, 1, 4, 2),
                (64, 1, 4, 2),
                (128, 1, 4, 3),
                (64, 1, 4, 3),
                (128, 1, 4, 4),
                (64, 1, 2, 3),
                (256, 1, 4, 2),
                (128, 2, 4, 2),
            ],
        ),
        (
            BACKBONE,
            64,
            "ragged 1..2048",
            np.random.default_rng(1).integers(1, 2049, 64),
            [(128, 1, 4, 2), (128, 2, 4, 2), (64, 2, 4, 2), (64, 1, 4, 3), (128, 4, 4, 2)],
        ),
        (DEPTH, 64, "32", np.full(64, 32), [(32, 1, 4, 2), (32, 1, 2, 2), (16, 1, 4, 2), (16, 2, 4, 2)]),
    ]
    for shape, b, desc, filled, configs in decode_cases:
        if not budget.left():
            log(f"- decode B={b} filled={desc}: skipped (time budget)")
            continue
        h, hkv, d, s = shape
        key, k1, k2 = jax.random.split(key, 3)
        lengths = jnp.asarray(filled, jnp.int32)
        q = _rand(k1, (b, h, d), jnp.bfloat16)
        caches = _layers(b, s, hkv, d, lengths, k2)
        name = "backbone" if shape == BACKBONE else "depth"
        run_sweep(
            f"decode {name} B={b} filled={desc} (block_k, splits, warps, stages)",
            q,
            caches,
            (lengths,),
            decode_fn,
            configs,
        )
        del caches

    def prefill_fn(cfg):
        block_q, block_k, warps, stages = cfg
        return lambda q, k, v, qs, n: prefill_attention(
            q, k, v, qs, n, block_q=block_q, block_k=block_k, num_warps=warps, num_stages=stages
        )

    h, hkv, d, s = BACKBONE
    for t, configs in (
        (2048, [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3)]),
        (512, [(64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 3)]),
    ):
        if not budget.left():
            log(f"- prefill T={t}: skipped (time budget)")
            continue
        key, k1, k2 = jax.random.split(key, 3)
        q_start = jnp.zeros((1,), jnp.int32)
        lengths = q_start + t
        q = _rand(k1, (1, t, h, d), jnp.bfloat16)
        caches = _layers(1, s, hkv, d, lengths, k2, max_layers=8)
        run_sweep(
            f"prefill backbone B=1 T={t} (block_q, block_k, warps, stages)",
            q,
            caches,
            (q_start, lengths),
            prefill_fn,
            configs,
        )
        del caches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also sweep block sizes / splits")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new case after this")
    p.add_argument("--out", help="also write the tables (markdown) here")
    args = p.parse_args(argv)

    dev = jax.devices()[0]
    log(f"# Pallas attention kernels on {dev.device_kind} ({dev.platform})")
    log(
        f"date {datetime.date.today()}, jax {jax.__version__}, python {sys.version.split()[0]}, "
        f"command: python -m benchmarks.gpu_check {' '.join(argv or sys.argv[1:])}"
    )
    if dev.platform != "gpu":
        log("not a GPU: nothing to check here (the CPU tests run the kernels in interpret mode)")
        return 1
    budget = Budget(args.budget_s)
    ok = check_correctness(budget)
    time_decode(budget)
    time_prefill(budget)
    if args.sweep:
        sweep(budget)
    log(f"\ncorrectness {'PASSED' if ok else 'FAILED'}; total {elapsed():.0f} s")
    if args.out:
        write_log(args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
