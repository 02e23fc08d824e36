"""The one attention function every model block calls; the Pallas kernels plug in here.

Conventions (shared with pallas_kernels/):
  q        [B, T, H, D]     queries; row t of batch b sits at absolute position q_start[b] + t
  k, v     [B, S, Hkv, D]   the KV cache (already holding the new keys), H % Hkv == 0
  q_start  [B] int32        absolute position of each row's first query
  lengths  [B] int32        number of valid cache slots per row (keys j >= lengths[b] are ignored)
Key j is visible to query t of row b iff j <= q_start[b] + t and j < lengths[b].
Softmax is accumulated in float32; the output has q's dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxtts.options import ATTENTION_IMPLS


def xla_attention(q, k, v, q_start, lengths):
    b, t, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qg = q.reshape(b, t, hkv, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / (d**0.5))
    q_pos = q_start[:, None] + jnp.arange(t)[None, :]  # [B, T]
    key_pos = jnp.arange(k.shape[1])
    visible = (key_pos[None, None, :] <= q_pos[:, :, None]) & (key_pos[None, None, :] < lengths[:, None, None])
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    # Rows with nothing visible (padding queries) get zeros instead of NaNs.
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def attention(q, k, v, q_start, lengths, *, impl: str = "xla"):
    """impl: "xla", or the Pallas kernels ("pallas"; "pallas_interpret" on CPU). Imported only
    when chosen, so the XLA path loads no Pallas code."""
    if impl == "xla":
        return xla_attention(q, k, v, q_start, lengths)
    if impl in ("pallas", "pallas_interpret"):
        from pallas_kernels import attention as pallas_attention

        return pallas_attention(q, k, v, q_start, lengths, interpret=impl == "pallas_interpret")
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {ATTENTION_IMPLS}")
