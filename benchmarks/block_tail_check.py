"""GPU check and A/B of `pallas_kernels.block_tail_mgpu` (issue #17), in one process.

    python -m benchmarks.block_tail_check [--out FILE] [--budget-s 240]

1. Correctness (bf16 weights, random operands): the fused kernel (one launch, grid barriers)
   against `block_tail_reference` and against the three-kernel form, at the depth decoder's
   shapes (D 1024, F 8192) and the backbone's (D 2048), 1 and 8 rows. h2 max error; relative L2
   error of the summed down partials. Run twice: the down output must be bit-identical between
   runs (no race between phases).
2. Time per block tail in a chain of calls (each call's h2 feeds the next as o and h, through 8
   layers' worth of distinct weights, so the weights do not sit in L2), unrolled in one XLA
   program: (t(40 calls) - t(8 calls)) / 32, median of 15 runs each. Variants: the five-kernel
   tail of `Llama.fused_step` today (Triton GEMVs + XLA fusions), the fused kernel (weight tiles
   of 64, 128, 256 rows; PDL on), and its three phases as three kernels. Then the GPU kernels of
   one chain (CUPTI): µs per tail by kernel.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._report import Budget, failure, log, median_seconds, write_log
from benchmarks.profile import kernel_us_per_call

BF = jnp.bfloat16


def _weights(layers, hd, d, f, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    return dict(
        w_out=(jax.random.normal(ks[0], (layers, hd, d), jnp.float32) * hd**-0.5).astype(BF),
        scale=(1 + 0.1 * jax.random.normal(ks[1], (layers, d))).astype(BF),
        w_gate_up=(jax.random.normal(ks[2], (layers, d, 2 * f), jnp.float32) * d**-0.5).astype(BF),
        w_down=(jax.random.normal(ks[3], (layers, f, d), jnp.float32) * f**-0.5).astype(BF),
    )


def five_kernel_tail(o, h, w_out, scale, w_gate_up, w_down, *, eps, opts):
    """`Llama.fused_step`'s tail without the block-tail kernel: (h2, down partials)."""
    from jaxtts.llama import gemv, norm_gemv, swiglu
    from pallas_kernels.fused_decode import add_residual, finish

    h2 = add_residual(h, gemv(o, w_out, opts, partials=True))
    gate_up = finish(*norm_gemv(h2, scale, w_gate_up, opts), h2.shape[-1], eps).astype(h2.dtype)
    return h2, gemv(swiglu(gate_up), w_down, opts, partials=True)


def check(name, hd, d, f, rows) -> bool:
    from pallas_kernels.block_tail_mgpu import block_tail_mgpu, block_tail_reference

    w = {k: v[0] for k, v in _weights(1, hd, d, f).items()}
    ks = jax.random.split(jax.random.key(7), 2)
    o = jax.random.normal(ks[0], (rows, hd), BF)
    h = jax.random.normal(ks[1], (rows, d), BF)
    args = (o, h, w["w_out"], w["scale"], w["w_gate_up"], w["w_down"])
    want_h2, want = block_tail_reference(*args, eps=1e-5)
    fused = jax.jit(lambda *a: block_tail_mgpu(*a, eps=1e-5, fused=True))
    three = jax.jit(lambda *a: block_tail_mgpu(*a, eps=1e-5, fused=False))
    ok = True
    outs = {}
    for label, fn in (("fused", fused), ("fused again", fused), ("three kernels", three)):
        h2, parts = jax.block_until_ready(fn(*args))
        down = np.asarray(parts.sum(0))
        outs[label] = down
        h2_err = float(np.max(np.abs(np.asarray(h2, np.float32) - np.asarray(want_h2, np.float32))))
        rel = float(np.linalg.norm(down - np.asarray(want)) / np.linalg.norm(np.asarray(want)))
        good = np.isfinite(down).all() and rel < 1e-2 and h2_err < 0.1
        ok &= bool(good)
        log(f"| {name} | {rows} | {label} | {h2_err:.2e} | {rel:.2e} | {'ok' if good else 'WRONG'} |")
    same = bool(np.array_equal(outs["fused"], outs["fused again"]))
    log(f"| {name} | {rows} | fused twice: bit-identical | | | {'ok' if same else 'DIFFERENT'} |")
    return ok and same


def check_phases(name, hd, d, f, rows) -> None:
    """Each phase alone (its own kernel) on the reference's inputs, against the reference's
    intermediate values: which phase is wrong, when one is."""
    from pallas_kernels import block_tail_mgpu as bt

    w = {k: v[0] for k, v in _weights(1, hd, d, f).items()}
    ks = jax.random.split(jax.random.key(7), 2)
    o = jax.random.normal(ks[0], (rows, hd), BF)
    h = jax.random.normal(ks[1], (rows, d), BF)
    f32 = jnp.float32
    h2 = (h.astype(f32) + jnp.dot(o, w["w_out"], preferred_element_type=f32).astype(BF).astype(f32)).astype(BF)
    x2 = (h2.astype(f32) * w["scale"].astype(f32)).astype(BF)
    ss = jnp.sum(h2.astype(f32).reshape(rows, -1, 64) ** 2, axis=-1).T  # [D/64, M]
    r = jax.lax.rsqrt(jnp.sum(ss, 0) / d + 1e-5)[:, None]
    gu = jnp.dot(x2, w["w_gate_up"], preferred_element_type=f32) * r
    g, u = jnp.split(gu, 2, axis=-1)
    act = (g / (1 + jnp.exp(-g)) * u).astype(BF)
    down = jnp.dot(act, w["w_down"], preferred_element_type=f32)
    cfg = bt.config_for(d, f)
    dims = bt._dims(o, h, w["w_out"], w["w_gate_up"], w["w_down"], cfg)
    types = bt._out_types(dims, cfg, BF)
    ss_pad = jnp.zeros((dims.n1, 64), f32).at[:, :rows].set(ss)
    pad = lambda a: jnp.pad(a, ((0, bt.ROWS - rows), (0, 0)))  # noqa: E731 (the kernel's 8-row buffers)
    values = dict(
        o=pad(o),
        h=h,
        w_out=w["w_out"],
        scale=w["scale"].astype(f32),
        w_gate_up=w["w_gate_up"],
        w_down=w["w_down"],
        x2=pad(x2),
        ss=ss_pad,
        act=pad(act),
    )

    def rel(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    for phase, wants in ((1, dict(h2=h2, x2=x2)), (2, dict(act=act)), (3, dict(parts=down))):
        try:
            out = jax.jit(lambda v, p=phase: bt._launch(v, dims, cfg, 1e-5, (p,), False, False, None, types))(values)
            got = {k: out[k].sum(0) if k == "parts" else out[k][:rows] for k in wants}
            errs = {k: rel(got[k], want) for k, want in wants.items()}
            if phase == 1:
                errs["ss"] = rel(out["ss"][:, :rows], ss)
            log(
                f"| {name} | {rows} | phase {phase} alone | "
                + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
                + " |"
            )
        except Exception as e:
            log(f"| {name} | {rows} | phase {phase} alone | failed: {failure(e, 200)} |")


def _chain(tail, weights, calls, layers):
    from pallas_kernels.fused_decode import add_residual

    @jax.jit
    def run(o, h, w):
        for i in range(calls):
            li = i % layers
            h2, parts = tail(o, h, w["w_out"][li], w["scale"][li], w["w_gate_up"][li], w["w_down"][li])
            h = add_residual(h2, parts)
            o = h.astype(BF)
        return h

    return run


PROFILED = ("five kernels (today)", "fused", "three kernels, tiled")


def time_tails(name, hd, d, f, rows, budget) -> dict:
    from jaxtts.options import default_options
    from pallas_kernels.block_tail_mgpu import block_tail_mgpu, config_for, tile_weights

    layers = 8
    weights = _weights(layers, hd, d, f, seed=1)
    opts = default_options(attention="pallas")
    base = config_for(d, f)
    tiled = dict(weights)
    tiled["w_out"], tiled["w_gate_up"], tiled["w_down"] = jax.vmap(tile_weights)(
        weights["w_out"], weights["w_gate_up"], weights["w_down"]
    )
    # label -> (tail, weights: row-major or from tile_weights)
    variants = {
        "five kernels (today)": (lambda *a: five_kernel_tail(*a, eps=1e-5, opts=opts), weights),
        "fused": (lambda *a: block_tail_mgpu(*a, eps=1e-5, config=base), weights),
        "fused, overlapped ring": (
            lambda *a: block_tail_mgpu(*a, eps=1e-5, config=base._replace(overlap=True)),
            weights,
        ),
        "fused, overlapped ring, stages 4, block_k 64": (
            lambda *a: block_tail_mgpu(*a, eps=1e-5, config=base._replace(overlap=True, stages=4, block_k=64)),
            weights,
        ),
        "fused, tiled weights": (lambda *a: block_tail_mgpu(*a, eps=1e-5, config=base), tiled),
        "fused, tiled, block_k 256, stages 2": (
            lambda *a: block_tail_mgpu(*a, eps=1e-5, config=base._replace(block_k=256, stages=2, out_stages=2)),
            tiled,
        ),
        "fused, block_k 64, stages 4": (
            lambda *a: block_tail_mgpu(*a, eps=1e-5, config=base._replace(block_k=64, stages=4)),
            weights,
        ),
        "fused, PDL": (lambda *a: block_tail_mgpu(*a, eps=1e-5, config=base, pdl=True), weights),
        "three kernels": (lambda *a: block_tail_mgpu(*a, eps=1e-5, config=base, fused=False), weights),
        "three kernels, tiled": (lambda *a: block_tail_mgpu(*a, eps=1e-5, config=base, fused=False), tiled),
    }
    o = jax.random.normal(jax.random.key(3), (rows, hd), BF)
    h = jax.random.normal(jax.random.key(4), (rows, d), BF)
    out = {}
    for label, (tail, ws) in variants.items():
        if not budget.left():
            log(f"| {name} | {rows} | {label} | skipped (budget) |")
            continue
        try:
            short = median_seconds(_chain(tail, ws, 8, layers), o, h, ws)
            long = median_seconds(_chain(tail, ws, 40, layers), o, h, ws)
            us = (long - short) / 32 * 1e6
            out[label] = us
            log(f"| {name} | {rows} | {label} | {us:.2f} |")
            if label in PROFILED:
                out[label + " kernels"] = kernel_us_per_call(_chain(tail, ws, 8, layers), o, h, ws, calls=8)
        except Exception as e:  # one failing variant must not hide the others
            log(f"| {name} | {rows} | {label} | failed: {failure(e, 240)} |")
    return out


SHAPES = {"depth": (1024, 1024, 8192), "backbone": (2048, 2048, 8192)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also write the log (markdown) here")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--shapes", default="depth,backbone")
    ap.add_argument("--phases", action="store_true", help="also check each phase alone against the reference")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    log(f"# block_tail_mgpu on {dev.device_kind} (jax {jax.__version__})\n")
    budget = Budget(args.budget_s)
    rows = [int(r) for r in args.rows.split(",")]
    log("| shape | rows | variant | h2 max err | down rel err | check |\n|---|---|---|---|---|---|")
    ok = True
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    for name, (hd, d, f) in shapes.items():
        for m in rows:
            try:
                ok &= check(name, hd, d, f, m)
            except Exception as e:
                ok = False
                log(f"| {name} | {m} | failed: {failure(e)} | | | |")
    if args.phases:
        log("\n| shape | rows | phase | relative error vs the reference's intermediate values |\n|---|---|---|---|")
        for name, (hd, d, f) in shapes.items():
            for m in rows:
                check_phases(name, hd, d, f, m)
    log("\n| shape | rows | variant | µs per block tail |\n|---|---|---|---|")
    profiles = {}
    for name, (hd, d, f) in shapes.items():
        for m in rows:
            for key, value in time_tails(name, hd, d, f, m, budget).items():
                if isinstance(value, dict):
                    profiles[f"{name}, {m} rows, {key}"] = value
    for key, per in profiles.items():
        log(f"\n{key} (GPU µs per block tail, CUPTI; the chain's residual adds included):")
        for kname, us in list(per.items())[:12]:
            log(f"  {us:8.2f}  {kname[:90]}")
    if args.out:
        write_log(args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
