"""The one place that decides how the attention kernels are lowered.

Today every kernel goes through Pallas' Triton lowering on NVIDIA GPUs (and through the Pallas
interpreter on CPU, for tests). JAX 0.11 deprecates that lowering in favour of Mosaic GPU; when it
goes, the kernels' backend-specific pieces are all here: the `pallas_call` wrapper with its
compiler parameters, masked loads/stores (how a kernel reads a ragged tail without touching memory
past it) and the matrix-unit dot with its shape rules.

Passing Triton's `CompilerParams` explicitly is what selects the Triton lowering: without it JAX
picks the backend from the `jax_pallas_use_mosaic_gpu` flag, whose default may change.

The Mosaic GPU kernels (`*_mgpu.py`) are written against Mosaic GPU directly. Which devices run
them is decided in one place, `jaxtts.options.mosaic_gpu_capable` (Hopper), through
`DecodeOptions.mosaic`.
"""

from __future__ import annotations

import jax
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


# How an int8 weight tile becomes floats in registers (every way is exact: |q| <= 128):
# "cvt"   the conversion instruction (Triton's int → float cast: I2F, a quarter-rate unit on
#         Hopper, which measured as slow as reading the bytes: int8 GEMVs no faster than bf16);
# "magic" integer add and float subtract: the bits of 1.5 * 2**23 plus q are the float
#         1.5 * 2**23 + q, so subtracting 1.5 * 2**23 leaves q (full-rate ALU instructions);
#         bfloat16 is then the top half of those float32 bits;
# "asm"   the same trick four bytes at a time in PTX (byte permutes, one per value), which
#         the compiler may not find from "magic"'s per-element code. GPU only: the interpreter
#         cannot run PTX, so under interpret=True it computes "magic" (the same values).
INT8_CONVERTS = ("cvt", "magic", "asm")
_MAGIC = 1.5 * 2**23
_MAGIC_BITS = 0x4B400000  # the float32 bits of _MAGIC


def int8_to(q, dtype, how: str, *, interpret: bool = False):
    """int8 tile q as exact floats of `dtype` (float32 or bfloat16), computed the way `how` names."""
    if how not in INT8_CONVERTS:
        raise ValueError(f"int8 convert must be one of {INT8_CONVERTS}, got {how!r}")
    dtype = jnp.dtype(dtype)
    if how == "cvt":
        return q.astype(dtype)
    if how == "asm" and not interpret and dtype in (jnp.float32, jnp.bfloat16):
        return _int8_asm(q, dtype)
    f = lax.bitcast_convert_type(q.astype(jnp.int32) + _MAGIC_BITS, jnp.float32) - _MAGIC
    if dtype != jnp.bfloat16:
        return f.astype(dtype)
    # q has at most 8 significant bits, so its bfloat16 is float32's top half exactly (no rounding)
    top = lax.shift_right_logical(lax.bitcast_convert_type(f, jnp.uint32), jnp.uint32(16))
    return lax.bitcast_convert_type(top.astype(jnp.uint16), jnp.bfloat16)


# Four int8 in one 32-bit register → four floats. q ^ 0x80 is the unsigned byte u = q + 128;
# prmt builds the float bits 0x4B0000uu = 2**23 + u (byte u below 0x4B 00 00; selector
# nibbles: result byte 0 = u's byte i, bytes 1-2 = 0x00, byte 3 = 0x4B), and subtracting
# 2**23 + 128 (0f4B000080) leaves q. For bfloat16, a last prmt packs the top halves of two
# floats into one register (element 0 in the low half).
_ASM_F32 = """{
.reg .b32 u;
xor.b32 u, $4, 0x80808080;
prmt.b32 $0, u, 0x4B000000, 0x7540;
prmt.b32 $1, u, 0x4B000000, 0x7541;
prmt.b32 $2, u, 0x4B000000, 0x7542;
prmt.b32 $3, u, 0x4B000000, 0x7543;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}"""
_ASM_BF16 = """{
.reg .b32 u, f<4>;
xor.b32 u, $2, 0x80808080;
prmt.b32 f0, u, 0x4B000000, 0x7540;
prmt.b32 f1, u, 0x4B000000, 0x7541;
prmt.b32 f2, u, 0x4B000000, 0x7542;
prmt.b32 f3, u, 0x4B000000, 0x7543;
sub.f32 f0, f0, 0f4B000080;
sub.f32 f1, f1, 0f4B000080;
sub.f32 f2, f2, 0f4B000080;
sub.f32 f3, f3, 0f4B000080;
prmt.b32 $0, f0, f1, 0x7632;
prmt.b32 $1, f2, f3, 0x7632;
}"""


def _int8_asm(q, dtype):
    f32 = dtype == jnp.float32
    [out] = pltriton.elementwise_inline_asm(
        _ASM_F32 if f32 else _ASM_BF16,
        args=[q],
        constraints="=f,=f,=f,=f,r" if f32 else "=r,=r,r",
        pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(q.shape, dtype)],
    )
    return out


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
