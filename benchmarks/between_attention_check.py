"""GPU check and A/B of `pallas_kernels.between_attention_mgpu` (issue #17), in one process.

    python -m benchmarks.between_attention_check [--out FILE] [--budget-s 300] [--shapes depth,backbone]

1. Correctness (bf16 weights, random operands, 1 and 8 rows, both configs): the kernel against
   `between_attention_reference`: relative L2 error of h_out and qkv. Run twice: the two runs
   may differ only by the reduce-add's summation order (max difference printed).
2. Time per block span (out → … → next qkv) in a chain of calls through 8 layers' distinct
   weights (so they do not sit in L2), each call's qkv feeding the next call's o, unrolled in one
   XLA program: (t(40 calls) - t(8 calls)) / 32, median of 15 runs each. Variants: today's
   kernels for the same span (`Llama.fused_step`: out GEMV, residual add, gate/up norm_matvec,
   finish + SwiGLU, down GEMV, residual add, qkv norm_matvec + finish) and the persistent kernel,
   its out projection and qkv by column owners or spread over K splits (`config_for(spread=)`),
   with and without overlapped refill, P1's tiles first (`critical_first`) and tiled weights. Beside them, the bytes of the span's
   weights at 4.3 TB/s (a measured H200 copy). Then the GPU kernels of one chain (CUPTI).
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._report import Budget, failure, log, median_seconds, write_log
from benchmarks.profile import kernel_us_per_call

BF = jnp.bfloat16
EPS = 1e-5
COPY_TBPS = 4.3  # device-to-device copy measured on the H200 (docs/PERF.md)
SHAPES = {"depth": (1024, 1024, 8192, 1536), "backbone": (2048, 2048, 8192, 3072)}


def _weights(layers, hd, d, f, nq, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    normal = lambda k, shape, fan_in: (jax.random.normal(k, shape, jnp.float32) * fan_in**-0.5).astype(BF)  # noqa: E731
    return dict(
        w_out=normal(ks[0], (layers, hd, d), hd),
        mlp_scale=(1 + 0.1 * jax.random.normal(ks[1], (layers, d))).astype(BF),
        w_gate_up=normal(ks[2], (layers, d, 2 * f), d),
        w_down=normal(ks[3], (layers, f, d), f),
        attn_scale=(1 + 0.1 * jax.random.normal(ks[4], (layers, d))).astype(BF),
        w_qkv=normal(ks[5], (layers, d, nq), d),
    )


ORDER = ("w_out", "mlp_scale", "w_gate_up", "w_down", "attn_scale", "w_qkv")


def today(o, h, w_out, mlp_scale, w_gate_up, w_down, attn_scale, w_qkv, *, opts):
    """`Llama.fused_step`'s kernels for the same span, with the model's bf16 residual stream
    (a float32 one sends today's norm_matvec down a slower path): (h_out, qkv) in float32."""
    from jaxtts.llama import gemv, norm_gemv, swiglu
    from pallas_kernels.fused_decode import add_residual, finish

    d = h.shape[-1]
    h2 = add_residual(h.astype(BF), gemv(o, w_out, opts, partials=True))
    gate_up = finish(*norm_gemv(h2, mlp_scale, w_gate_up, opts), d, EPS).astype(h2.dtype)
    h3 = add_residual(h2, gemv(swiglu(gate_up), w_down, opts, partials=True))
    return h3.astype(jnp.float32), finish(*norm_gemv(h3, attn_scale, w_qkv, opts), d, EPS)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(name, shape, rows, spread: bool = False) -> bool:
    from pallas_kernels.between_attention_mgpu import between_attention_mgpu, between_attention_reference, config_for

    hd, d, f, nq = shape
    w = {k: v[0] for k, v in _weights(1, *shape).items()}
    ks = jax.random.split(jax.random.key(7), 2)
    o = jax.random.normal(ks[0], (rows, hd), BF)
    h = jax.random.normal(ks[1], (rows, d), jnp.float32)
    args = (o, h, *(w[k] for k in ORDER))
    want_h, want_q = between_attention_reference(*args, eps=EPS)
    cfg = config_for(*shape, spread=spread)
    fn = jax.jit(lambda *a: between_attention_mgpu(*a, eps=EPS, config=cfg))
    kind = f"kernel, {'spread' if spread else 'column owners'}"
    ok = True
    runs = []
    for label in (kind, f"{kind} again"):
        got_h, got_q = jax.block_until_ready(fn(*args))
        runs.append((np.asarray(got_h), np.asarray(got_q)))
        eh, eq = _rel(got_h, want_h), _rel(got_q, want_q)
        good = bool(np.isfinite(runs[-1][0]).all() and np.isfinite(runs[-1][1]).all() and eh < 1e-2 and eq < 2e-2)
        ok &= good
        log(f"| {name} | {rows} | {label} | {eh:.2e} | {eq:.2e} | {'ok' if good else 'WRONG'} |")
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(runs[0], runs[1]))
    log(f"| {name} | {rows} | run-to-run max difference | {diff:.2e} | | {'ok' if diff < 1e-3 else 'LARGE'} |")
    # today's kernels on the same operands, for scale
    from jaxtts.options import default_options

    th, tq = jax.jit(lambda *a: today(*a, opts=default_options()))(*args)
    log(f"| {name} | {rows} | today's kernels | {_rel(th, want_h):.2e} | {_rel(tq, want_q):.2e} | |")
    return ok


def _per_layer(weights, tiled=False):
    """A list of per-layer weight tuples in ORDER, each its own buffer (as the model's layers
    are: slicing one stacked array inside the program made XLA copy today's weights first)."""
    from pallas_kernels.between_attention_mgpu import tile_weights

    layers = []
    for li in range(weights["w_out"].shape[0]):
        w = [jnp.array(weights[k][li]) for k in ORDER]
        if tiled:
            w[0], w[2], w[3], w[5] = tile_weights(w[0], w[2], w[3], w[5])
        layers.append(tuple(w))
    return layers


def _chain(span, calls, layers):
    @jax.jit
    def run(o, h, w):
        for i in range(calls):
            h, qkv = span(o, h, *w[i % layers])
            o = qkv[:, : o.shape[1]].astype(BF)  # the next call waits for all of this one
        return h

    return run


def variants(shape) -> dict:
    """label -> (span function, whether it takes the weights from `tile_weights`)."""
    from jaxtts.options import default_options
    from pallas_kernels.between_attention_mgpu import between_attention_mgpu, config_for

    hd, d, f, nq = shape
    base = config_for(hd, d, f, nq)
    opts = default_options()
    out = {"today's kernels": ((lambda *a: today(*a, opts=opts)), False)}
    # label -> (config, tiled weights)
    spread = config_for(hd, d, f, nq, spread=True)
    configs = {
        f"persistent ({base.stages} stages)": (base, False),
        "persistent, overlapped refill": (base._replace(overlap=True), False),
        "persistent, tiled weights": (base, True),
        f"spread (out / qkv split {spread.out_splits} / {spread.qkv_splits}, {spread.stages} stages)": (spread, False),
        "spread, P1's tiles first": (spread._replace(critical_first=True), False),
        "spread, overlapped refill": (spread._replace(overlap=True), False),
        "spread, tiled weights": (spread, True),
    }
    for label, (cfg, tiled) in configs.items():
        out[label] = (lambda *a, cfg=cfg: between_attention_mgpu(*a, eps=EPS, config=cfg)), tiled
    return out


def summarise_trace(path: str) -> list[str]:
    """Mosaic GPU's profile of one call: per named scope, over the programs that ran it, the
    median start (µs after the kernel's first event), median and max duration, last end."""
    import json

    with open(path) as fh:
        events = json.load(fh)["traceEvents"]
    t0 = min(e["ts"] for e in events)
    spans: dict[str, list[tuple[float, float]]] = {}
    open_by_tid: dict[int, list[dict]] = {}
    for e in sorted(events, key=lambda e: (e["tid"], e["ts"])):
        stack = open_by_tid.setdefault(e["tid"], [])
        if e["ph"] == "B":
            stack.append(e)
        else:
            begin = stack.pop()
            name = " / ".join([x["name"] for x in stack] + [begin["name"]])
            spans.setdefault(name, []).append((begin["ts"] - t0, e["ts"] - begin["ts"]))
    lines = ["| scope | programs | median start µs | median µs | max µs | last end µs |", "|---|---|---|---|---|---|"]
    for name, xs in sorted(spans.items(), key=lambda kv: statistics.median(x[0] for x in kv[1])):
        starts, durs = [x[0] for x in xs], [x[1] for x in xs]
        end = max(a + b for a, b in xs)
        lines.append(
            f"| {name} | {len(xs)} | {statistics.median(starts):.2f} | {statistics.median(durs):.2f} "
            f"| {max(durs):.2f} | {end:.2f} |"
        )
    return lines


def profile_span(name, shape, label, cfg, tiled, out_dir) -> None:
    """One call of the kernel under Mosaic GPU's profiler; its scopes summarised."""
    import os
    import tempfile

    from pallas_kernels.between_attention_mgpu import between_attention_mgpu

    w = _per_layer(_weights(1, *shape, seed=1), tiled)[0]
    hd, d = shape[:2]
    o = jax.random.normal(jax.random.key(3), (1, hd), BF)
    h = jax.random.normal(jax.random.key(4), (1, d), jnp.float32)
    os.makedirs(out_dir, exist_ok=True)
    where = tempfile.mkdtemp(dir=out_dir)
    fn = jax.jit(lambda *a: between_attention_mgpu(*a, eps=EPS, config=cfg, profile_dir=where))
    for _ in range(2):  # the second call's trace is the one kept (warm)
        for old in os.listdir(where):
            os.remove(os.path.join(where, old))
        jax.block_until_ready(fn(o, h, *w))
        jax.effects_barrier()
    [trace] = os.listdir(where)
    log(f"\n{name}, {label}: Mosaic GPU profile of one call ({os.path.join(where, trace)})\n")
    for line in summarise_trace(os.path.join(where, trace)):
        log(line)


def time_spans(name, shape, rows, budget, profile: bool, reps: int = 15) -> dict:
    layers = 8
    weights = _weights(layers, *shape, seed=1)
    hd, d, f, nq = shape
    o = jax.random.normal(jax.random.key(3), (rows, hd), BF)
    h = jax.random.normal(jax.random.key(4), (rows, d), jnp.float32)
    mb = sum(int(np.prod(weights[k].shape[1:])) * 2 for k in ("w_out", "w_gate_up", "w_down", "w_qkv")) / 1e6
    log(f"| {name} | {rows} | weight bytes at {COPY_TBPS} TB/s ({mb:.1f} MB) | {mb / COPY_TBPS:.2f} |")
    out = {}
    per_layer = {False: _per_layer(weights), True: _per_layer(weights, tiled=True)}
    for label, (span, tiled) in variants(shape).items():
        ws = per_layer[tiled]
        if not budget.left():
            log(f"| {name} | {rows} | {label} | skipped (budget) |")
            continue
        try:
            short = median_seconds(_chain(span, 8, layers), o, h, ws, reps=reps)
            long = median_seconds(_chain(span, 40, layers), o, h, ws, reps=reps)
            us = (long - short) / 32 * 1e6
            out[label] = us
            log(f"| {name} | {rows} | {label} | {us:.2f} |")
            if profile and (label == "today's kernels" or label.startswith(("persistent (", "spread ("))):
                out[label + " kernels"] = kernel_us_per_call(_chain(span, 8, layers), o, h, ws, calls=8)
        except Exception as e:  # one failing variant must not hide the others
            log(f"| {name} | {rows} | {label} | failed: {failure(e, 240)} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also write the log (markdown) here")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--shapes", default="depth,backbone")
    ap.add_argument("--no-profile", action="store_true", help="skip the CUPTI kernel tables")
    ap.add_argument(
        "--trace-dir", default=None, help="also profile one call per shape inside the kernel (Mosaic GPU's profiler)"
    )
    ap.add_argument("--reps", type=int, default=15, help="timed runs per chain (median)")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    log(f"# between_attention_mgpu on {dev.device_kind} (jax {jax.__version__})\n")
    budget = Budget(args.budget_s)
    rows = [int(r) for r in args.rows.split(",")]
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    log("| shape | rows | variant | h_out rel err | qkv rel err | check |\n|---|---|---|---|---|---|")
    ok = True
    for name, shape in shapes.items():
        for m in rows:
            for spread in (False, True):
                try:
                    ok &= check(name, shape, m, spread)
                except Exception as e:
                    ok = False
                    log(f"| {name} | {m} | failed: {failure(e)} | | | |")
    log("\n| shape | rows | variant | µs per span |\n|---|---|---|---|")
    profiles = {}
    for name, shape in shapes.items():
        for m in rows[:1]:
            for key, value in time_spans(name, shape, m, budget, not args.no_profile, args.reps).items():
                if isinstance(value, dict):
                    profiles[f"{name}, {m} rows, {key}"] = value
    for key, per in profiles.items():
        log(f"\n{key} (GPU µs per span, CUPTI):")
        for kname, us in list(per.items())[:12]:
            log(f"  {us:8.2f}  {kname[:90]}")
    if args.trace_dir:
        from pallas_kernels.between_attention_mgpu import config_for

        for name, shape in shapes.items():
            for label, cfg, tiled in (
                ("column owners", config_for(*shape), False),
                ("spread", config_for(*shape, spread=True), False),
                ("spread, P1's tiles first", config_for(*shape, spread=True)._replace(critical_first=True), False),
            ):
                try:
                    profile_span(name, shape, label, cfg, tiled, args.trace_dir)
                except Exception as e:
                    log(f"{name}, {label}: profile failed: {failure(e)}")
    if args.out:
        write_log(args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
