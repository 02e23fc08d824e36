"""The one place that decides how the attention kernels are lowered.

Today every kernel goes through Pallas' Triton lowering on NVIDIA GPUs (and through the Pallas
interpreter on CPU, for tests). JAX 0.11 deprecates that lowering in favour of Mosaic GPU; when it
goes, the kernels' backend-specific pieces are all here: the `pallas_call` wrapper with its
compiler parameters, masked loads/stores (how a kernel reads a ragged tail without touching memory
past it) and the matrix-unit dot with its shape rules.

Passing Triton's `CompilerParams` explicitly is what selects the Triton lowering: without it JAX
picks the backend from the `jax_pallas_use_mosaic_gpu` flag, whose default may change.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BACKEND = "triton"  # what `pallas_call` below lowers through on GPU

# Triton's tensor-core dot wants every operand dimension >= 16, and every tensor a kernel loads,
# stores or computes on must have a power-of-two number of elements.
MIN_DOT_DIM = 16

# Finite stand-in for -inf in masked scores: exp(NEG_INF - m) underflows to 0 for any real m, and
# NEG_INF - NEG_INF is 0 rather than NaN, so rows that have seen no key yet stay finite.
NEG_INF = -1e30


def pow2_at_least(n: int, floor: int = MIN_DOT_DIM) -> int:
    """The smallest power of two >= max(n, floor): a legal tile extent for n rows."""
    return max(floor, pl.next_power_of_2(max(int(n), 1)))


def pallas_call(
    kernel,
    *,
    grid,
    in_specs,
    out_specs,
    out_shape,
    interpret: bool,
    num_warps: int,
    num_stages: int,
    name: str,
    input_output_aliases=None,
):
    return pl.pallas_call(
        kernel,
        input_output_aliases=input_output_aliases or {},
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=name,
    )


def load(ref, *, mask=None, other=None):
    """Masked load: lanes where `mask` is False read no memory and yield `other`."""
    return pltriton.load(ref, mask=mask, other=other)


def store(ref, value, *, mask=None):
    """Masked store: lanes where `mask` is False leave memory untouched."""
    pltriton.store(ref, value, mask=mask)


def dot(a, b, *, trans_b: bool = False):
    """`a @ b` (or `a @ b.T`) on the matrix units, accumulated in float32.

    HIGHEST keeps float32 inputs in true float32 (no TF32 rounding); bfloat16 inputs are
    unaffected by it.
    """
    contract_b = 1 if trans_b else 0
    return lax.dot_general(
        a,
        b,
        (((1,), (contract_b,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
