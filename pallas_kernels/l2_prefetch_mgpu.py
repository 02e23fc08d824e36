"""Ask the L2 cache to fetch weights that a later kernel will read: a Pallas Mosaic GPU kernel.

A decode step at batch 1 is a chain of latency-bound kernels (the qkv GEMV, the step attention,
the out GEMV, glue fusions) between bandwidth-bound ones (gate/up, down). During the first kind
HBM idles: a depth block spends ~14 of its ~30 µs in kernels that read a few MB (docs/PERF.md,
session 14). Inside XLA's command buffers kernels do not overlap (PDL does not act there, #50),
but a kernel can leave work to the memory system: `cp.async.bulk.prefetch.tensor.L2` (TMA's L2
prefetch, `plgpu.async_prefetch`) asks for a box of a tensor to be brought into L2 and completes
nothing the issuing thread waits for. `l2_prefetch(x, weights)` is a kernel that issues those
prefetches for the given weights and returns x. The hope was that it costs a launch, that the
weights' bytes stream into L2 while the following latency-bound kernels run, and that the GEMV
that reads them later finds them there (the H200's L2 is 50 MB: a depth block's gate/up,
33.5 MB, fits; the backbone's, 67 MB, does not, hence `max_bytes`).

The kernel's only output is a token of 8 int32 that it never writes; the caller gets back
x + 0 * float(token). Any int32 converts to a finite float, so that is x, and it is a data
dependence XLA keeps: the kernel runs before anything that reads the returned x. x is also an
input of the kernel (never read): a kernel of weights alone is loop-invariant, and XLA hoisted it
out of the decode loop and merged the copies (40 kernels a frame instead of 136 on the H200,
session 14). Where x comes from an XLA fusion the add folds into it; after a Pallas kernel it
is a small fusion of its own. Two ways that do not work in JAX 0.11.2: a `pallas_call` with x
aliased to its output (no Mosaic GPU lowering of `pallas_call` there any more), and a kernel tied
to x by `lax.optimization_barrier` (XLA expanded the barrier and removed the kernel as dead code
on the H200, session 14).

Each weight [K, N] (any dtype; a 3-D stack is not accepted) is cut into boxes of at most 256 x 256
elements (TMA's box limit), rows first: box j covers rows (j // cols_boxes) * box_rows and columns
(j % cols_boxes) * box_cols. With `max_bytes`, only the first rows of each weight (in order, until
the budget is spent) are asked for: the rows a GEMV's K loop reads first. Program b of `blocks`
issues boxes b, b + blocks, ... of the concatenated list; one thread per program issues them.

The reference is the identity (`l2_prefetch_reference`): a prefetch changes no value. In Pallas'
Mosaic GPU interpreter (CPU, tests) the prefetch is a no-op; the tests there check that x comes
back unchanged and that the box plan covers exactly the bytes asked for, and lower the kernel for
CUDA to catch API misuse.

Measured on the H200 (session 14, docs/PERF.md #69–#70): it does not pay, and nothing in the
model calls it. The kernel is not fire-and-forget: with 64–528 programs it lasts 5.1–6.2 µs for
the depth gate/up's 33.5 MB (about the time the bytes take to arrive: its programs apparently end only once their
prefetches have landed), and the
GEMV that then reads the weight from L2 takes 9.0 µs instead of 9.7 (the Triton GEMV is limited
by its own loads, not by HBM). In the decode loop, prefetching each block's gate/up at its start
cost 5.98 ms per frame against 4.96. Kept, with `benchmarks/l2_prefetch_probe.py`, as the
experiment that shows it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, gpu
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCKS = 64  # programs issuing prefetches: enough that no single thread issues hundreds


class Boxes(NamedTuple):
    """The prefetch plan of one weight: `count` boxes of [rows, cols] over its first rows."""

    rows: int  # box height
    cols: int  # box width
    per_row: int  # boxes across N
    count: int  # boxes asked for (a multiple of per_row: whole box rows)


def _box_side(n: int) -> int:
    """The largest of 256 (TMA's box limit per dimension), 128, ..., 8 that divides n."""
    for side in (256, 128, 64, 32, 16, 8):
        if n % side == 0:
            return side
    raise ValueError(f"l2_prefetch: dimension {n} is not a multiple of 8")


def plan(shapes_and_itemsizes, max_bytes: int | None = None) -> tuple[Boxes, ...]:
    """The boxes of each weight ((K, N), itemsize), in order, until `max_bytes` is spent."""
    out = []
    budget = max_bytes
    for (k, n), itemsize in shapes_and_itemsizes:
        rows, cols = _box_side(k), _box_side(n)
        per_row = n // cols
        box_row_bytes = rows * n * itemsize
        box_rows = k // rows if budget is None else min(k // rows, budget // box_row_bytes)
        out.append(Boxes(rows, cols, per_row, box_rows * per_row))
        if budget is not None:
            budget -= box_rows * box_row_bytes
    return tuple(out)


def planned_bytes(boxes: tuple[Boxes, ...], itemsizes) -> int:
    return sum(b.count * b.rows * b.cols * s for b, s in zip(boxes, itemsizes))


def l2_prefetch_reference(x, *weights, **_):
    """What `l2_prefetch` computes: x."""
    del weights
    return x


def _interpret_params(interpret):
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return interpret if isinstance(interpret, InterpretGPUParams) else InterpretGPUParams()


@functools.partial(jax.jit, static_argnames=("max_bytes", "blocks", "interpret"))
def l2_prefetch(x, *weights, max_bytes: int | None = None, blocks: int = BLOCKS, interpret=False):
    """x, after a kernel that asks L2 to fetch `weights` (2-D arrays; their first `max_bytes`)."""
    for w in weights:
        if w.ndim != 2:
            raise ValueError(f"l2_prefetch: weights must be 2-D, got {w.shape}")
    boxes = plan([(w.shape, w.dtype.itemsize) for w in weights], max_bytes)
    if not any(b.count for b in boxes):
        return x
    total = sum(b.count for b in boxes)
    blocks = max(1, min(blocks, total))

    def issue(launch_ctx, *w_refs):
        """Program b's prefetches, in Mosaic GPU terms: one predicated TMA prefetch per (round,
        weight); the predicate keeps the first thread of programs whose box is in range."""
        index = ir.IndexType.get()
        const = lambda v: arith.constant(index, v)  # noqa: E731
        b = gpu.block_id(gpu.Dimension.x)
        one_thread = mgpu.utils.single_thread_predicate(mgpu.utils.ThreadSubset.WARPGROUP)
        for t in range(pl.cdiv(total, blocks)):  # round t: global boxes t * blocks + b
            lo, hi = t * blocks, (t + 1) * blocks
            first = 0  # the weight's first global box
            for w_ref, box in zip(w_refs, boxes):
                if first < hi and first + box.count > lo:  # the weight has boxes in this round
                    j = arith.addi(b, const(lo)) if lo >= first else arith.subi(b, const(first - lo))
                    ok = one_thread
                    if first > lo:  # b < first - lo belong to the weight before
                        ok = arith.andi(ok, arith.cmpi(arith.CmpIPredicate.uge, b, const(first - lo)))
                    if first + box.count < hi:  # past this weight's last box
                        ok = arith.andi(ok, arith.cmpi(arith.CmpIPredicate.ult, b, const(first + box.count - lo)))
                        j = arith.minui(j, const(box.count - 1))
                    if first > lo:
                        j = arith.maxsi(j, const(0))
                    r0 = arith.muli(arith.divui(j, const(box.per_row)), const(box.rows))
                    c0 = arith.muli(arith.remui(j, const(box.per_row)), const(box.cols))
                    launch_ctx.async_prefetch(
                        gmem_ref=w_ref,
                        gmem_slice=(mgpu.ds(r0, box.rows), mgpu.ds(c0, box.cols)),
                        predicate=ok,
                    )
                first += box.count

    def body(x_ref, *refs):
        del x_ref  # an input only so that the kernel depends on x (see above)
        if interpret:  # the interpreter has no inline Mosaic GPU code; a prefetch is a no-op there
            return
        # `plgpu.async_prefetch` carries only a read effect, which Pallas' dead-code elimination
        # drops (JAX 0.10–0.11): inline Mosaic GPU code is kept (it has a memory effect).
        plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * len(weights))(issue)(*refs[:-1])

    token = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((8,), jnp.int32),  # never written: only a dependence
        grid=(blocks,),
        grid_names=("b",),
        interpret=_interpret_params(interpret),
        kernel_name="l2_prefetch",
    )(x, *weights)
    # x + 0 * float(token): any int converts to a finite float, so this is x (up to the sign of
    # a zero), and XLA cannot drop the kernel or order x's readers before it. Folded into the
    # fusion that makes x when that is an XLA fusion (the residual add before a block's qkv).
    zero = token[0].astype(jnp.float32) * 0
    return (x.astype(jnp.promote_types(x.dtype, jnp.float32)) + zero).astype(x.dtype)
