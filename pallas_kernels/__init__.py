"""Pallas GPU kernels for jaxtts, each beside a pure-jnp reference.

Imports nothing from jaxtts. `attention` follows the conventions of `jaxtts.attention` (q [B, T, H, D], KV cache
[B, S, Hkv, D], q_start / lengths [B]); it sends single-query steps to the flash-decoding kernel
and everything else to the causal flash-attention kernel. `matvec` is the skinny matmul
(x [M <= 64, K] @ w [K, N]) for batch-1 decoding. The lowering (Triton, or the
interpreter on CPU) is chosen in `pallas_kernels._backend`.
"""

from __future__ import annotations

from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.matvec import matvec, matvec_reference
from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_reference

__all__ = [
    "attention",
    "decode_attention",
    "decode_attention_reference",
    "matvec",
    "matvec_reference",
    "prefill_attention",
    "prefill_attention_reference",
]


def attention(q, k, v, q_start, lengths, *, interpret: bool = False):
    """`jaxtts.attention` semantics; T == 1 goes to the decode kernel, T > 1 to prefill."""
    if q.shape[1] == 1:
        out = decode_attention(q[:, 0], k, v, lengths, q_start, interpret=interpret)
        return out[:, None]
    return prefill_attention(q, k, v, q_start, lengths, interpret=interpret)
