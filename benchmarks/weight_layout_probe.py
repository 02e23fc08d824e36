"""Why an int8 GEMV is no faster than a bf16 one: weight layout, work per element, or bytes in flight.

    python -m benchmarks.weight_layout_probe [--shapes depth_gate_up,depth_down] [--budget-s 300] [--out FILE]

Every int8 GEMV measured so far (the Triton `matvec`, the Mosaic GPU `matvec_mgpu`, XLA's convert
+ dot) streams int8 at about half the TB/s of its bf16 twin: the same time per call for half the
bytes (docs/QUANTIZATION.md, "Why int8 is not faster"). The conversion is ruled out (three ways,
the same time). This probe separates what is left, with small Triton kernels at batch 1 (x [1, K]),
each over several copies of W (>= 192 MB of bf16, so W streams from HBM), GPU time from CUPTI:

- layout `kn`: W [K, N] as the model stores it, a program's tile [block_k, block_n]: each of the
  tile's rows is block_n contiguous elements (64 int8 = 64 bytes, 64 bf16 = 128 bytes), the rows
  N elements apart;
- layout `nk`: W [N, K] (PyTorch's [out, in]), a tile [block_n, block_k]: each row is block_k
  contiguous elements of one output column;
- work `read`: the tile is loaded and added into a tile-shaped accumulator (int32 for int8): the
  load path alone;
- work `fma`: x times the tile added into a tile-shaped float32 accumulator, summed over K once at
  the end (CUDA cores, no cross-thread reduction in the loop);
- work `dot`: the matrix-unit dot, as `matvec` does (x padded to 16 rows);
- work `dot8` (int8 W only): x rounded to int8 too and an int8 × int8 dot accumulated in int32,
  no conversion of W at all: if it streams much faster than `dot`, the conversion path is the limit.

If `read` on int8 runs at bf16's bytes per second while `dot` does not, the work per element is
the limit; if `read` is already slow, the loads are (layout, request size, bytes in flight). The
table gives µs per call and TB/s at each variant's own bytes, `matvec`'s bf16 and int8 beside them.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from benchmarks._report import Budget, chosen, failure, log, write_log
from pallas_kernels import _backend as be
from pallas_kernels.matvec import matvec

SHAPES = {  # name -> (K, N)
    "depth_gate_up": (1024, 16384),
    "depth_down": (8192, 1024),
    "backbone_gate_up": (2048, 16384),
    "backbone_down": (8192, 2048),
}
LAYOUTS = ("kn", "nk")
WORKS = ("read", "fma", "dot", "dot8")
TARGET_PROGRAMS = 256


def _kernel(x_ref, w_ref, o_ref, *, layout, work, block_n, block_k, per_split, int8):
    n0 = pl.multiple_of(pl.program_id(0) * block_n, block_n)
    first = pl.program_id(1) * per_split
    tile = (block_k, block_n) if layout == "kn" else (block_n, block_k)
    k_axis = 0 if layout == "kn" else 1

    def body(i, acc):
        start = pl.multiple_of((first + i) * block_k, block_k)
        if layout == "kn":
            wt = be.load(w_ref.at[pl.ds(start, block_k), pl.ds(n0, block_n)])
        else:
            wt = be.load(w_ref.at[pl.ds(n0, block_n), pl.ds(start, block_k)])
        if work == "read":
            return acc + wt.astype(acc.dtype)
        xt = be.load(x_ref.at[pl.ds(0, 16), pl.ds(start, block_k)])  # [16, bk], row 0 is x
        if work == "dot8":
            dims = (((1,), (1 if layout == "nk" else 0,)), ((), ()))
            return acc + jax.lax.dot_general(xt, wt, dims, preferred_element_type=jnp.int32)
        wf = be.int8_to(wt, jnp.bfloat16, "cvt") if int8 else wt
        if work == "dot":
            return acc + be.dot(xt, wf, trans_b=layout == "nk")
        xk = jnp.sum(xt.astype(jnp.float32), axis=0)  # rows 1..15 are zeros: x's row as a vector
        xb = xk[:, None] if layout == "kn" else xk[None, :]
        return acc + xb * wf.astype(jnp.float32)

    if work in ("dot", "dot8"):
        init = jnp.zeros((16, block_n), jnp.int32 if work == "dot8" else jnp.float32)
    else:
        init = jnp.zeros(tile, jnp.int32 if (int8 and work == "read") else jnp.float32)
    acc = jax.lax.fori_loop(0, per_split, body, init)
    if work in ("dot", "dot8"):  # all 16 rows (Triton cannot slice a tensor); the caller keeps row 0
        be.store(o_ref.at[pl.ds(0, 16), pl.ds(n0, block_n)], acc.astype(jnp.float32))
    else:
        be.store(o_ref.at[pl.ds(0, 1), pl.ds(n0, block_n)], jnp.sum(acc.astype(jnp.float32), axis=k_axis)[None, :])


@functools.partial(
    jax.jit, static_argnames=("layout", "work", "block_n", "block_k", "splits", "num_warps", "num_stages", "interpret")
)
def probe_matvec(
    x, w, *, layout, work, block_n=64, block_k=128, splits=None, num_warps=4, num_stages=3, interpret=False
):
    """x [1, K] and W in `layout` ("kn": [K, N], "nk": [N, K]); returns float32 [N]: x @ W for
    work "fma"/"dot" (int8 W unscaled: x @ q), the column sums of W for "read"."""
    k = x.shape[1]
    n = w.shape[1] if layout == "kn" else w.shape[0]
    k_blocks = k // block_k
    if splits is None:
        splits = 1
        while (n // block_n) * splits < TARGET_PROGRAMS and splits * 2 <= k_blocks:
            splits *= 2
    per_split = k_blocks // splits
    rows = 16 if work in ("dot", "dot8") else 1
    xdt = jnp.int8 if work == "dot8" else jnp.bfloat16
    x16 = jnp.zeros((16, k), xdt).at[0].set(as_x(x, work)[0])
    kernel = functools.partial(
        _kernel,
        layout=layout,
        work=work,
        block_n=block_n,
        block_k=block_k,
        per_split=per_split,
        int8=w.dtype == jnp.int8,
    )
    out = be.pallas_call(
        kernel,
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec(x16.shape, lambda j, s: (0, 0)), pl.BlockSpec(w.shape, lambda j, s: (0, 0))],
        out_specs=pl.BlockSpec((None, rows, n), lambda j, s: (s, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((splits, rows, n), jnp.float32),
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        name=f"probe_{layout}_{work}",
    )(x16, w)
    return jnp.sum(out[:, 0], axis=0)


def as_x(x, work):
    """x as the kernel takes it: bf16, or for "dot8" int8 (x * 32 rounded, clipped: a probe's
    stand-in for activation quantization, not a scheme)."""
    if work == "dot8":
        return jnp.clip(jnp.round(x.astype(jnp.float32) * 32), -127, 127).astype(jnp.int8)
    return x.astype(jnp.bfloat16)


def probe_reference(x, w, *, layout, work):
    """What `probe_matvec` computes, in float32 terms."""
    wf = jnp.asarray(w, jnp.float32)
    wkn = wf if layout == "kn" else wf.T
    if work == "read":
        return jnp.sum(wkn, axis=0)
    return as_x(x, work).astype(jnp.float32)[0] @ wkn


def _variants(k, n):
    """name -> (dtype, layout, fn(x, w)) for one shape."""
    out = {
        "matvec bf16": (jnp.bfloat16, "kn", lambda x, w: matvec(x, w)),
        "matvec int8": (jnp.int8, "kn", lambda x, w: matvec(x, w, jnp.ones((n,), jnp.float32))),
    }
    for dtype, dn in ((jnp.bfloat16, "bf16"), (jnp.int8, "int8")):
        for layout in LAYOUTS:
            for work in WORKS:
                configs = ((64, 128, 3), (64, 256, 3), (64, 512, 3), (128, 128, 3), (64, 128, 4), (128, 256, 3))
                if work == "dot8" and dtype != jnp.int8:
                    continue
                for bn, bk, stages in configs if work in ("dot", "dot8") else ((64, 256, 3),):
                    if bk > k:
                        continue
                    name = f"{dn} {layout} {work} {bn}x{bk}x{stages}"
                    out[name] = (
                        dtype,
                        layout,
                        functools.partial(
                            probe_matvec, layout=layout, work=work, block_n=bn, block_k=bk, num_stages=stages
                        ),
                    )
    return out


def _weights(key, k, n, dtype, layout, copies):
    shape = (k, n) if layout == "kn" else (n, k)
    ws = []
    for kk in jax.random.split(key, copies):
        if dtype == jnp.int8:
            ws.append(jax.random.randint(kk, shape, -127, 128, jnp.int32).astype(jnp.int8))
        else:
            ws.append((jax.random.normal(kk, shape, jnp.float32) * k**-0.5).astype(dtype))
    return ws


def run(shapes, budget: Budget, check_only: bool = False):
    from benchmarks.profile import kernel_us_per_call

    log("| shape | variant | µs per call | TB/s (own bytes) | max rel. err |")
    log("|---|---|---|---|---|")
    key = jax.random.key(0)
    for shape in shapes:
        k, n = SHAPES[shape]
        copies = int(min(48, max(4, -(-192e6 // (2 * k * n)))))
        x = jax.random.normal(jax.random.key(1), (1, k), jnp.float32).astype(jnp.bfloat16)
        cache = {}
        for name, (dtype, layout, fn) in _variants(k, n).items():
            if not budget.left():
                log(f"| {shape} | {name} | skipped (time budget) | | |")
                continue
            if (dtype, layout) not in cache:
                cache[(dtype, layout)] = _weights(key, k, n, dtype, layout, copies)
            ws = cache[(dtype, layout)]
            try:
                work = "dot" if name.startswith("matvec") else name.split()[2]
                got = np.asarray(fn(x, ws[0]), np.float32).reshape(-1)
                want = np.asarray(probe_reference(x, ws[0], layout=layout, work=work), np.float32)
                err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
                if check_only:
                    log(f"| {shape} | {name} | – | – | {err:.1e} |")
                    continue
                chain = jax.jit(lambda x, ws, fn=fn: [fn(x, w) for w in ws])
                us = sum(kernel_us_per_call(chain, x, ws, calls=len(ws)).values())
                nbytes = ws[0].size * ws[0].dtype.itemsize
                log(f"| {shape} | {name} | {us:.1f} | {nbytes / us / 1e6:.2f} | {err:.1e} |")
            except Exception as e:  # one broken variant is a row, not the end of the run
                log(f"| {shape} | {name} | {failure(e)} | | |")
        cache.clear()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="depth_gate_up,depth_down", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--check-only", action="store_true", help="correctness only (no profiler)")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    shapes = chosen(args.shapes, SHAPES, "shape")
    log(f"# weight layout probe on {jax.devices()[0].device_kind}, jax {jax.__version__}")
    run(shapes, Budget(args.budget_s), check_only=args.check_only)
    if args.out:
        write_log(args.out)


if __name__ == "__main__":
    main()
