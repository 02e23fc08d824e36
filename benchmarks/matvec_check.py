"""GPU check for the matvec kernel at CSM's projection shapes: correctness, timings vs XLA, sweeps.

    python -m benchmarks.matvec_check [--sweep none|small|wide] [--budget-s 215] [--out FILE]
    python -m benchmarks.matvec_check --int8 [--budget-s 215] [--out FILE]

1. Correctness: `matvec` (default config, plus a few others) against `matvec_reference` at every
   CSM shape, M = 1 and 8, bf16 (and float32 for some), plus ragged shapes and method="reduce".
2. Timings (bf16) of `matvec` vs XLA's `jnp.dot(x, w, preferred_element_type=f32).astype(bf16)`
   at every shape, M = 1 and 8. Each timed program makes the call once for each of several
   separate copies of W (>= 192 MB in all, 4..48 copies, each with its own x), so W streams from
   HBM as in the model rather than sitting in the 50 MB L2. The main figure is GPU time per call
   from a CUPTI trace (jax's profiler): the sum of the call's kernels' durations, median over 20
   programs (IQR/2 after ±). It leaves out launch gaps, which in this harness come from the host
   (wall-clock per call is about twice the kernel time for every variant) and which the model's
   own dispatch decides. GPU span and wall-clock per call are printed beside it.
   TB/s = W's bytes / kernel time (x and the output are negligible).
3. Sweeps of block_n / block_k / k_splits / num_warps / num_stages / method (GPU kernel time,
   10 programs per config): "small" = 4 shapes, "wide" = 14 (shape, M) pairs, ~30 configs each.

Stops starting new work after --budget-s seconds so the tables still get printed; the wide sweep
took 150 s in all on an H200.

--int8 (instead of 1-3): int8 weights with column scales (`jaxtts.quantize`, the GEMV's
`w_scale=`) against bf16 at every shape, M = 1 and 8, GPU kernel time per call: the bf16 GEMV,
the int8 GEMV with the default config (the one tuned for bf16, which the model uses) for each
way of turning the int8 tiles into floats (`int8_convert`: cvt / magic / asm), and XLA's
convert + dot on the int8 weight; TB/s of each from its own weight bytes; each way's error
against the reference, and whether the ways agree bit for bit. Then a sweep of int8 configs ×
{magic, asm} at M = 1 on the four bandwidth-bound shapes (wider K tiles: same bytes per tile as
bf16).
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
from benchmarks.profile import gpu_kernel_events
from pallas_kernels._backend import INT8_CONVERTS
from pallas_kernels.matvec import default_config, default_k_splits, matvec, matvec_reference

# name -> (K, N)
SHAPES = {
    "depth qkv": (1024, 1536),
    "depth out": (1024, 1024),
    "depth gate_up": (1024, 16384),
    "depth down": (8192, 1024),
    "projection": (2048, 1024),
    "backbone qkv": (2048, 3072),
    "backbone out": (2048, 2048),
    "backbone gate_up": (2048, 16384),
    "backbone down": (8192, 2048),
}


def _rand(key, shape, dtype, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def _err(out, want):
    out = np.asarray(out.astype(jnp.float32))
    want = np.asarray(want.astype(jnp.float32))
    if not np.isfinite(out).all():
        return float("nan"), float("nan")
    return float(np.max(np.abs(out - want))), float(np.linalg.norm(out - want) / np.linalg.norm(want))


# --------------------------------------------------------------------------- correctness


def check_correctness(budget: Budget) -> bool:
    log("## Correctness (matvec vs matvec_reference)")
    log("| shape | M | K×N | dtype | config | max abs err | rel L2 err | ok |")
    log("|---|---|---|---|---|---|---|---|")
    cases = []
    for name, (k, n) in SHAPES.items():
        for m in (1, 8):
            cases.append((name, m, k, n, jnp.bfloat16, {}))
    cases += [
        ("depth down", 1, 8192, 1024, jnp.float32, {}),
        ("backbone qkv", 8, 2048, 3072, jnp.float32, {}),
        ("ragged", 3, 1000, 1500, jnp.bfloat16, dict(block_n=128, block_k=64, k_splits=5)),
        ("ragged", 17, 1000, 1500, jnp.float32, {}),
        ("depth gate_up", 1, 1024, 16384, jnp.bfloat16, dict(method="reduce")),
        ("depth down", 1, 8192, 1024, jnp.bfloat16, dict(method="reduce", block_n=64, block_k=64)),
        ("ragged", 1, 1000, 1500, jnp.bfloat16, dict(method="reduce", block_n=64, block_k=64)),
        ("backbone down", 64, 8192, 2048, jnp.bfloat16, {}),
    ]
    key = jax.random.key(0)
    all_ok = True
    for name, m, k, n, dtype, kw in cases:
        cfg = ", ".join(f"{a}={b}" for a, b in kw.items()) or "default"
        if not budget.left():
            log(f"| {name} | {m} | {k}×{n} | {dtype.__name__} | {cfg} | skipped (time budget) | | |")
            continue
        key, k1, k2 = jax.random.split(key, 3)
        x = _rand(k1, (m, k), dtype)
        w = _rand(k2, (k, n), dtype, scale=k**-0.5)
        try:
            err, rel = _err(matvec(x, w, **kw), matvec_reference(x, w))
            ok = bool(rel <= (1e-5 if dtype == jnp.float32 else 1e-2))
        except Exception as e:  # keep going: one broken case must not hide the others
            ok, err, rel = False, float("nan"), float("nan")
            log(f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            traceback.print_exc(limit=4)
        all_ok &= ok
        log(f"| {name} | {m} | {k}×{n} | {dtype.__name__} | {cfg} | {err:.2e} | {rel:.2e} | {'yes' if ok else 'NO'} |")
    return all_ok


# --------------------------------------------------------------------------- timing


def _copies(k, n, min_bytes=192e6, lo=4, hi=48):
    return int(min(hi, max(lo, -(-min_bytes // (2 * k * n)))))


def _operands(key, m, k, n, copies, dtype=jnp.bfloat16):
    xs, ws = [], []
    for kk in jax.random.split(key, copies):
        k1, k2 = jax.random.split(kk)
        xs.append(_rand(k1, (m, k), dtype))
        ws.append(_rand(k2, (k, n), dtype, scale=k**-0.5))
    return xs, ws


def _programs(fns):
    """One jit per variant that calls it once per (x, w) pair and returns the list of outputs."""
    return {name: jax.jit(lambda xs, ws, fn=fn: [fn(x, w) for x, w in zip(xs, ws)]) for name, fn in fns.items()}


def _stat(v):
    q1, q2, q3 = np.percentile(v, [25, 50, 75])
    return float(q2), float(q3 - q1) / 2


def _wall(runs, xs, ws, reps=50, inner=2):
    """name -> (median, IQR/2) wall-clock seconds per call, variants interleaved sample by sample.

    Includes the host's cost of dispatching a program with 2 * copies arguments and of launching
    each kernel; for the small shapes that, not the GPU, sets the pace.
    """
    samples = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            t = time.perf_counter()
            for _ in range(inner):
                out = run(xs, ws)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t) / inner / len(ws))
    return {name: _stat(v) for name, v in samples.items()}


_PROFILE_NOTE: list[str] = []


def _device(runs, xs, ws, reps=20):
    """name -> dict of GPU-side times per call, from a CUPTI trace (jax's profiler).

    Each variant runs `reps` times in turn, with sleeps in between, so the kernels of one program
    run form one cluster on the GPU timeline (gaps inside a program are launch gaps of
    microseconds; between programs, a millisecond or more). Per program: busy = sum of its
    kernels' durations, span = first kernel start to last kernel end; both / copies. Returns
    median and IQR/2 over the reps, and the mean time per call of each kernel name. None when
    the trace has no GPU kernels or the clusters do not match up.
    """
    order = []

    def run_all():
        for name, run in runs.items():
            for _ in range(reps):
                jax.block_until_ready(run(xs, ws))
                order.append(name)
                time.sleep(0.003)
            time.sleep(0.01)

    events = gpu_kernel_events(run_all)
    if not _PROFILE_NOTE:
        _PROFILE_NOTE.append(f"(profile: {len(events)} kernel events)")
        log(_PROFILE_NOTE[0])
    events = sorted(events)
    clusters, last_end = [], None
    for ev in events:
        if last_end is None or ev[0] - last_end > 1_000_000:  # a gap > 1 ms: next program
            clusters.append([])
        clusters[-1].append(ev)
        last_end = ev[0] + ev[1] if last_end is None else max(last_end, ev[0] + ev[1])
    if len(clusters) != len(order):
        log(f"(profile: {len(clusters)} GPU clusters for {len(order)} programs; using wall-clock only)")
        return None
    per = {name: {"busy": [], "span": [], "kernels": {}} for name in runs}
    calls = len(ws)
    for name, cl in zip(order, clusters):
        per[name]["busy"].append(sum(d for _, d, _ in cl) * 1e-9 / calls)
        per[name]["span"].append((max(t + d for t, d, _ in cl) - cl[0][0]) * 1e-9 / calls)
        for _, d, kname in cl:
            per[name]["kernels"][kname] = per[name]["kernels"].get(kname, 0.0) + d * 1e-9 / calls / reps
    return {name: dict(busy=_stat(v["busy"]), span=_stat(v["span"]), kernels=v["kernels"]) for name, v in per.items()}


def _xla(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _us(st):
    return f"{st[0] * 1e6:.1f} ±{st[1] * 1e6:.1f}"


def _kernels(d):
    """'name µs + name µs' for the kernels of one call, longest first, names shortened."""
    ks = sorted(d.items(), key=lambda kv: -kv[1])
    return " + ".join(f"{n[:28]} {t * 1e6:.1f}" for n, t in ks[:3])


def _measure(fns, xs, ws, wall_reps=50, dev_reps=20):
    runs = _programs(fns)
    for run in runs.values():  # compile, warm up
        jax.block_until_ready(run(xs, ws))
        jax.block_until_ready(run(xs, ws))
    try:
        dev = _device(runs, xs, ws, reps=dev_reps)
    except Exception as e:  # no CUPTI: wall-clock only
        log(f"(profile failed: {type(e).__name__}: {str(e)[:200]}; wall-clock only)")
        dev = None
    wall = _wall(runs, xs, ws, reps=wall_reps or 20) if wall_reps or dev is None else None
    return wall, dev


def time_table(budget: Budget):
    log(
        "## bf16 timings per call: GPU kernel time (CUPTI; median ±IQR/2) and W read rate, "
        "plus GPU span and wall-clock per call"
    )
    log(
        "| shape | K×N | M | W MB | xla kernel µs | xla TB/s | pallas kernel µs | pallas TB/s | speed-up "
        "| xla / pallas span µs | xla / pallas wall µs | pallas config |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    key = jax.random.key(1)
    breakdown = []
    for name, (k, n) in SHAPES.items():
        for m in (1, 8):
            cfg = default_config(m, k, n)
            cfg_s = (
                f"{cfg.method} bn={cfg.block_n} bk={cfg.block_k} s={cfg.k_splits} w={cfg.num_warps} st={cfg.num_stages}"
            )
            if not budget.left():
                log(f"| {name} | {k}×{n} | {m} | | skipped (time budget) | | | | | | | |")
                continue
            key, sub = jax.random.split(key)
            xs, ws = _operands(sub, m, k, n, _copies(k, n))
            wb = 2 * k * n
            try:
                wall, dev = _measure({"xla": _xla, "pallas": matvec}, xs, ws)
                ww = f"{wall['xla'][0] * 1e6:.1f} / {wall['pallas'][0] * 1e6:.1f}"
                if dev:
                    tx, tp = dev["xla"]["busy"][0], dev["pallas"]["busy"][0]
                    sp = f"{dev['xla']['span'][0] * 1e6:.1f} / {dev['pallas']['span'][0] * 1e6:.1f}"
                    log(
                        f"| {name} | {k}×{n} | {m} | {wb / 1e6:.1f} | {_us(dev['xla']['busy'])} | "
                        f"{wb / tx / 1e12:.2f} | {_us(dev['pallas']['busy'])} | {wb / tp / 1e12:.2f} | "
                        f"{tx / tp:.2f}x | {sp} | {ww} | {cfg_s} |"
                    )
                    breakdown.append(
                        f"- {name} M={m}: xla {_kernels(dev['xla']['kernels'])}; "
                        f"pallas {_kernels(dev['pallas']['kernels'])}"
                    )
                else:
                    tx, tp = wall["xla"][0], wall["pallas"][0]
                    log(
                        f"| {name} | {k}×{n} | {m} | {wb / 1e6:.1f} | (wall) {_us(wall['xla'])} | "
                        f"{wb / tx / 1e12:.2f} | (wall) {_us(wall['pallas'])} | {wb / tp / 1e12:.2f} | "
                        f"{tx / tp:.2f}x | | {ww} | {cfg_s} |"
                    )
            except Exception as e:
                log(f"| {name} | {k}×{n} | {m} | ERROR {type(e).__name__}: {str(e)[:200]} | | | | | | | |")
                traceback.print_exc(limit=4)
            del xs, ws
    if breakdown:
        log("\nKernels per call (µs, mean): ")
        for line in breakdown:
            log(line)


# --------------------------------------------------------------------------- int8


def _int8_operands(key, m, k, n, copies):
    """xs [m, k] bf16 and, per copy, (W bf16, q int8 [N, K] as the model stores it, column scales)
    of the same weight."""
    from jaxtts.quantize import quantize_array

    xs, ws = _operands(key, m, k, n, copies)
    return xs, [(w, *quantize_array(w)) for w in ws]


def _int8_fns(configs=()):
    """The variants of the int8 table (w = (bf16 W, q, scale)), plus int8 GEMV configs."""
    from jaxtts.llama import dot_f32
    from jaxtts.quantize import QuantizedWeight

    fns = {
        "bf16 pallas": lambda x, w: matvec(x, w[0]),
        **{
            f"int8 {how}": lambda x, w, how=how: matvec(x, w[1], w[2], int8_convert=how, w_transposed=True)
            for how in INT8_CONVERTS
        },
        "int8 xla": lambda x, w: dot_f32(x, QuantizedWeight(w[1], w[2])).astype(x.dtype),
    }
    for cfg in configs:
        fns[cfg] = lambda x, w, c=cfg: matvec(
            x,
            w[1],
            w[2],
            method=c[0],
            block_n=c[1],
            block_k=c[2],
            k_splits=c[3],
            num_warps=c[4],
            num_stages=c[5],
            int8_convert=c[6],
            w_transposed=True,
        )
    return fns


def _int8_errors(xs, ws):
    """Each int8 GEMV's largest relative error against `matvec_reference` (first copy), and
    whether the ways of converting agree bit for bit (they convert to the same floats)."""
    x, (_, q, scale) = xs[0], ws[0]
    want = np.asarray(matvec_reference(x, q.T, scale), np.float32)
    outs = {
        how: np.asarray(matvec(x, q, scale, int8_convert=how, w_transposed=True), np.float32) for how in INT8_CONVERTS
    }
    errs = {how: float(np.abs(o - want).max() / np.abs(want).max()) for how, o in outs.items()}
    same = all(np.array_equal(o, outs["cvt"]) for o in outs.values())
    return errs, same


# int8 configs at M = 1 (W [N, K]): K tiles of 2x the bf16 default carry the same bytes per tile;
# 32-column tiles give twice the programs
_INT8_1 = [
    ("dot", 64, 128, None, 4, 3),
    ("dot", 64, 256, None, 4, 3),
    ("dot", 64, 128, None, 4, 4),
    ("dot", 64, 256, None, 4, 4),
    ("dot", 64, 512, None, 4, 3),
    ("dot", 64, 256, None, 8, 3),
    ("dot", 128, 128, None, 4, 3),
    ("dot", 128, 256, None, 4, 3),
    ("dot", 32, 128, None, 4, 3),
    ("dot", 32, 256, None, 4, 3),
    ("dot", 32, 256, None, 4, 4),
    ("dot", 32, 512, None, 4, 3),
    ("dot", 64, 128, None, 2, 3),
    ("reduce", 64, 128, None, 4, 2),
]


def int8_table(
    budget: Budget,
    sweep_shapes=("depth gate_up", "depth down", "backbone gate_up", "backbone down"),
    sweep_only: bool = False,
):
    if sweep_only:
        return int8_sweep(budget, sweep_shapes, converts=("cvt",))
    log(
        "## int8 weights vs bf16: GPU kernel µs per call (median ±IQR/2) and TB/s (each variant's own weight "
        "bytes: int8 + scales, or bf16)"
    )
    int8_cols = [f"int8 {how}" for how in INT8_CONVERTS]
    log(
        "| shape | K×N | M | bf16 pallas µs (TB/s) | "
        + " | ".join(f"{c} µs (TB/s)" for c in int8_cols)
        + " | int8 xla µs (TB/s) | best int8 / bf16 | max rel. err (cvt, magic, asm) | ways agree bitwise |"
    )
    log("|---|---|---|" + "---|" * (len(int8_cols) + 5))
    key = jax.random.key(4)
    for name, (k, n) in SHAPES.items():
        for m in (1, 8):
            if not budget.left():
                log(f"| {name} | {k}×{n} | {m} | skipped (time budget) |")
                continue
            key, sub = jax.random.split(key)
            xs, ws = _int8_operands(sub, m, k, n, _copies(k, n))
            try:
                wall, dev = _measure(_int8_fns(), xs, ws, wall_reps=0)
                st = {c: v["busy"] for c, v in dev.items()} if dev else wall
                b16, b8 = 2 * k * n, k * n + 4 * n
                cells = [
                    f"{_us(st[v])} ({b / st[v][0] / 1e12:.2f})"
                    for v, b in (("bf16 pallas", b16), *((c, b8) for c in int8_cols), ("int8 xla", b8))
                ]
                ratio = min(st[c][0] for c in int8_cols) / st["bf16 pallas"][0]
                errs, same = _int8_errors(xs, ws)
                err = ", ".join(f"{errs[h]:.1e}" for h in INT8_CONVERTS)
                log(
                    f"| {name} | {k}×{n} | {m} | {' | '.join(cells)} | {ratio:.2f} | {err} | {'yes' if same else 'NO'} |"
                    + ("" if dev else " (wall)")
                )
            except Exception as e:
                log(f"| {name} | {k}×{n} | {m} | ERROR {type(e).__name__}: {str(e)[:200]} |")
                traceback.print_exc(limit=4)
            del xs, ws
    int8_sweep(budget, sweep_shapes, converts=("magic", "asm"))


def int8_sweep(budget: Budget, sweep_shapes, converts):
    """int8 GEMV configs (`_INT8_1` and split variants) × `converts` at M = 1, fastest first."""
    log("\n## int8 sweep at M = 1: GPU kernel µs per call and TB/s, fastest first")
    key = jax.random.key(5)
    for name in sweep_shapes:
        k, n = SHAPES[name]
        title = f"{name} {k}×{n} M=1"
        if not budget.left():
            log(f"- {title}: skipped (time budget)")
            continue
        key, sub = jax.random.split(key)
        xs, ws = _int8_operands(sub, 1, k, n, _copies(k, n, min_bytes=160e6))
        configs = [(*c, how) for how in converts for c in _split_variants(1, k, n, _INT8_1)]
        good = _compiling(_int8_fns(configs), xs[:1], ws[:1], title)
        try:
            wall, dev = _measure(good, xs, ws, wall_reps=0, dev_reps=10)
        except Exception as e:
            log(f"- {title}: ERROR {type(e).__name__}: {str(e)[:200]}")
            continue
        st = {c: v["busy"] for c, v in dev.items()} if dev else wall
        b8 = k * n + 4 * n
        order = sorted(st, key=lambda c: st[c][0])
        log(
            f"- {title} [t={elapsed():.0f} s]{'' if dev else ' (WALL-CLOCK)'} "
            f"(default {tuple(default_config(1, k, n))}): "
            + ", ".join(f"{c} {_us(st[c])} ({b8 / st[c][0] / 1e12:.2f})" for c in order[:10])
        )
        del xs, ws


# --------------------------------------------------------------------------- sweeps

# (method, block_n, block_k, k_splits, num_warps, num_stages); k_splits None = default for the blocks
_WIDE_1 = [
    ("dot", 64, 128, None, 4, 3),
    ("dot", 128, 128, None, 4, 3),
    ("dot", 64, 128, None, 4, 4),
    ("dot", 64, 128, None, 8, 3),
    ("dot", 64, 128, None, 2, 3),
    ("dot", 64, 256, None, 4, 3),
    ("dot", 64, 256, None, 4, 4),
    ("dot", 64, 64, None, 4, 3),
    ("dot", 64, 64, None, 2, 3),
    ("dot", 32, 128, None, 2, 3),
    ("dot", 32, 256, None, 4, 3),
    ("dot", 128, 128, None, 8, 3),
    ("dot", 128, 64, None, 4, 3),
    ("dot", 128, 256, None, 8, 3),
    ("dot", 256, 64, None, 4, 3),
    ("dot", 256, 128, None, 8, 3),
    ("dot", 64, 128, None, 4, 2),
    ("reduce", 64, 128, None, 4, 2),
    ("reduce", 128, 64, None, 4, 2),
    ("reduce", 256, 32, None, 4, 2),
    ("reduce", 128, 32, None, 4, 2),
    ("reduce", 64, 64, None, 2, 2),
    ("reduce", 32, 128, None, 4, 2),
    ("reduce", 64, 128, None, 4, 3),
]
_WIDE_8 = [c for c in _WIDE_1 if c[0] == "dot"]


def _split_variants(m, k, n, configs):
    """Each config at its default splits; the first two also at 1/4, 1/2, 2 and 4 times that."""
    out = []
    for i, (meth, bn, bk, s, w, st) in enumerate(configs):
        s0 = s or default_k_splits(m, k, n, bn, bk)
        out.append((meth, bn, bk, s0, w, st))
        if i < 2 and meth == "dot":
            for s1 in (s0 // 4, s0 // 2, s0 * 2, s0 * 4):
                if 1 <= s1 <= -(-k // bk):
                    out.append((meth, bn, bk, s1, w, st))
    return list(dict.fromkeys(out))


def _config_fns(configs):
    """{"xla": XLA's dot, config: matvec with that config} for configs (method, block_n, block_k,
    k_splits, num_warps, num_stages)."""

    def make(cfg):
        meth, bn, bk, s, w, st = cfg
        return lambda x, wt: matvec(x, wt, method=meth, block_n=bn, block_k=bk, k_splits=s, num_warps=w, num_stages=st)

    return {"xla": _xla, **{cfg: make(cfg) for cfg in configs}}


def _compiling(fns, xs, ws, title):
    """The entries of fns that compile and run on their own; the others are logged and dropped."""
    good = {}
    for cfg, fn in fns.items():
        try:
            jax.block_until_ready(_programs({cfg: fn})[cfg](xs, ws))
            good[cfg] = fn
        except Exception as e:
            log(f"  {title} {cfg}: ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return good


def sweep(budget: Budget, mode: str):
    if mode == "none":
        return
    log(
        "## Sweeps, bf16: GPU kernel µs per call (median ±IQR/2) and TB/s, fastest first; "
        "config = (method, block_n, block_k, k_splits, num_warps, num_stages)"
    )
    plan = [
        ("depth gate_up", 1),
        ("depth down", 1),
        ("depth qkv", 1),
        ("depth out", 1),
        ("backbone gate_up", 1),
        ("backbone down", 1),
        ("depth gate_up", 8),
        ("depth down", 8),
        ("projection", 1),
        ("backbone qkv", 1),
        ("backbone out", 1),
        ("depth qkv", 8),
        ("backbone down", 8),
        ("backbone gate_up", 8),
    ]
    if mode == "small":
        plan = plan[:4]
    key = jax.random.key(2)
    for name, m in plan:
        k, n = SHAPES[name]
        title = f"{name} {k}×{n} M={m}"
        if not budget.left():
            log(f"- {title}: skipped (time budget)")
            continue
        base = _WIDE_1 if m == 1 else _WIDE_8
        if mode == "small":
            base = base[:6] + [c for c in base if c[0] == "reduce"][:2]
        configs = _split_variants(m, k, n, base)
        key, sub = jax.random.split(key)
        xs, ws = _operands(sub, m, k, n, _copies(k, n, min_bytes=160e6))

        fns = _config_fns(configs)
        try:
            wall, dev = _measure(fns, xs, ws, wall_reps=0, dev_reps=10)
        except Exception as e:  # one bad config: drop the configs that fail on their own
            log(f"  ({title}: joint run failed with {type(e).__name__}: {str(e)[:200]}; one by one)")
            wall, dev = _measure(_compiling(fns, xs, ws, title), xs, ws, wall_reps=0, dev_reps=10)
        st = {c: v["busy"] for c, v in dev.items()} if dev else wall
        wb = 2 * k * n
        order = sorted(st, key=lambda c: st[c][0])
        log(
            f"- {title} [t={elapsed():.0f} s]{'' if dev else ' (WALL-CLOCK)'} "
            f"(default {tuple(default_config(m, k, n))}): "
            + ", ".join(f"{c} {_us(st[c])} ({wb / st[c][0] / 1e12:.2f})" for c in order)
        )
        del xs, ws


# (method, block_n, block_k, k_splits, num_warps, num_stages) for M = 32 / 64 rows: wider column
# tiles than at M <= 8, because every program reads all M rows of x (at block_n = 64 and M = 64
# that is as many bytes as its W tile).
_ROWS_CONFIGS = [
    ("dot", 64, 128, None, 4, 3),
    ("dot", 64, 64, None, 4, 4),
    ("dot", 128, 64, None, 4, 3),
    ("dot", 128, 64, None, 4, 4),
    ("dot", 128, 64, None, 8, 3),
    ("dot", 128, 128, None, 4, 3),
    ("dot", 128, 128, None, 8, 3),
    ("dot", 128, 128, None, 8, 4),
    ("dot", 256, 64, None, 8, 3),
    ("dot", 256, 64, None, 8, 4),
    ("dot", 256, 32, None, 8, 4),
    ("dot", 256, 128, None, 8, 3),
    ("dot", 128, 32, None, 4, 5),
    ("dot", 64, 64, None, 4, 3),
    ("dot", 128, 64, None, 8, 5),
]
ROWS_SHAPES = (
    "depth gate_up",
    "depth down",
    "depth qkv",
    "depth out",
    "backbone gate_up",
    "backbone down",
    "backbone qkv",
    "backbone out",
)


def tune_rows(budget: Budget, rows=(64, 32), min_gain: float = 0.03) -> dict:
    """Sweep the kernel at M = 32 / 64 (batch-32 / 64 decode steps) against XLA's dot; return
    {(M, K, N): MatvecConfig} for the shapes where the fastest config beats XLA by > min_gain and
    matches matvec_reference (bf16 tolerance)."""
    from pallas_kernels.matvec import MatvecConfig

    log(
        "## M = 32 / 64 sweep, bf16: GPU kernel µs per call (median ±IQR/2) and TB/s, fastest first; "
        "config = (method, block_n, block_k, k_splits, num_warps, num_stages)"
    )
    winners = {}
    key = jax.random.key(3)
    for m in rows:
        for name in ROWS_SHAPES:
            k, n = SHAPES[name]
            title = f"{name} {k}×{n} M={m}"
            if not budget.left():
                log(f"- {title}: skipped (time budget)")
                continue
            configs = _split_variants(m, k, n, _ROWS_CONFIGS)
            key, sub = jax.random.split(key)
            xs, ws = _operands(sub, m, k, n, _copies(k, n, min_bytes=160e6))
            good = _compiling(_config_fns(configs), xs[:1], ws[:1], title)  # e.g. past shared memory
            try:
                wall, dev = _measure(good, xs, ws, wall_reps=0, dev_reps=10)
            except Exception as e:
                log(f"- {title}: ERROR {type(e).__name__}: {str(e)[:200]}")
                continue
            st = {c: v["busy"] for c, v in dev.items()} if dev else wall
            wb = 2 * k * n
            order = sorted(st, key=lambda c: st[c][0])
            log(
                f"- {title} [t={elapsed():.0f} s]{'' if dev else ' (WALL-CLOCK)'}: "
                + ", ".join(f"{c} {_us(st[c])} ({wb / st[c][0] / 1e12:.2f})" for c in order[:8])
            )
            best = next(c for c in order if c != "xla")
            if st[best][0] < (1 - min_gain) * st["xla"][0]:
                meth, bn, bk, sp, w, stg = best
                out = good[best](xs[0], ws[0])
                err = _err(out, matvec_reference(xs[0], ws[0]))
                ok = bool(np.isfinite(err[1]) and err[1] < 2e-2)
                log(
                    f"  → {'TUNED' if ok else 'REJECTED (error)'}: {best} {st['xla'][0] / st[best][0]:.2f}x vs XLA, "
                    f"relative error {err[1]:.2e}"
                )
                if ok:
                    winners[(m, k, n)] = MatvecConfig(bn, bk, sp, w, stg, meth)
            del xs, ws
    return winners


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", choices=("none", "small", "wide"), default="wide")
    p.add_argument("--budget-s", type=float, default=215.0, help="start no new case after this")
    p.add_argument("--out", help="also write the tables (markdown) here")
    p.add_argument("--int8", action="store_true", help="int8 weights vs bf16 and an int8 config sweep (only)")
    p.add_argument("--int8-sweep", action="store_true", help="the int8 config sweep alone (convert: cvt)")
    args = p.parse_args(argv)

    dev = jax.devices()[0]
    log(f"# Pallas matvec on {dev.device_kind} ({dev.platform})")
    log(
        f"date {datetime.date.today()}, jax {jax.__version__}, python {sys.version.split()[0]}, "
        f"command: python -m benchmarks.matvec_check {' '.join(argv or sys.argv[1:])}"
    )
    if dev.platform != "gpu":
        log("not a GPU: nothing to check here (tests/test_matvec.py runs the kernel in interpret mode)")
        return 1
    budget = Budget(args.budget_s)
    if args.int8 or args.int8_sweep:
        int8_table(budget, sweep_only=args.int8_sweep)
        log(f"\ntotal {elapsed():.0f} s")
        if args.out:
            write_log(args.out)
        return 0
    ok = check_correctness(budget)
    log(f"(correctness done at {elapsed():.0f} s)")
    time_table(budget)
    log(f"(table done at {elapsed():.0f} s)")
    sweep(budget, args.sweep)
    log(f"\ncorrectness {'PASSED' if ok else 'FAILED'}; total {elapsed():.0f} s")
    if args.out:
        write_log(args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
