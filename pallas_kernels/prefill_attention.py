"""Prefill attention: causal flash attention with grouped-query heads and per-row start/lengths.

Grid: (batch, query head, query block). Query t of row b sits at position q_start[b] + t and sees
key j iff j <= q_start[b] + t and j < lengths[b]; a prompt appended after cached context has
q_start > 0. Each program walks the key blocks of its KV head (h // G) in two runs: the blocks
every query of the block can see in full, with no masking, then the few blocks on the causal
diagonal or the ragged end, masked. Key blocks past both limits are never loaded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _backend as be


def prefill_attention_reference(q, k, v, q_start, lengths):
    """Pure-jnp causal attention in float32. q [B, T, H, D], k/v [B, S, Hkv, D] -> [B, T, H, D]."""
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    q_pos = q_start[:, None] + jnp.arange(t)[None, :]  # [B, T]
    key = jnp.arange(s)
    filled = key[None, :] < lengths[:, None]  # [B, S]
    visible = (key[None, None, :] <= q_pos[:, :, None]) & filled[:, None, :]  # [B, T, S]
    # Zero the unfilled slots so stale values (even NaN) there cannot leak through 0 * x.
    k32 = jnp.where(filled[:, :, None, None], k.astype(jnp.float32), 0.0)
    v32 = jnp.where(filled[:, :, None, None], v.astype(jnp.float32), 0.0)
    k32 = jnp.repeat(k32, h // hkv, axis=2)  # query head n uses kv head n // G
    v32 = jnp.repeat(v32, h // hkv, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k32, precision="highest")
    scores = scores / jnp.sqrt(jnp.float32(d))
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(visible[:, None], jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhts,bshd->bthd", p / jnp.where(denom == 0, 1.0, denom), v32, precision="highest")
    return out.astype(q.dtype)


def default_blocks(head_dim: int) -> tuple[int, int]:
    """(block_q, block_k)."""
    return (64, 64) if head_dim <= 64 else (64, 32)


def _prefill_kernel(len_ref, qs_ref, q_ref, k_ref, v_ref, o_ref, *, scale, block_q, block_k, q_len, seq_len):
    t0 = pl.program_id(2) * block_q
    q_start = qs_ref[()]
    length = jnp.clip(len_ref[()], 0, seq_len)  # never read past the cache, whatever lengths says

    t = t0 + jnp.arange(block_q)
    row_ok = t < q_len
    q_pos = q_start + t
    q = be.load(q_ref.at[pl.ds(t0, block_q), :], mask=row_ok[:, None], other=0)

    # Keys [0, full_end) are visible to every query of the block (its first sits at q_start + t0).
    full_end = jnp.clip(jnp.minimum(q_start + t0 + 1, length), 0, None)
    last_t = jnp.minimum(t0 + block_q, q_len) - 1
    kv_end = jnp.clip(jnp.minimum(q_start + last_t + 1, length), 0, None)
    n_full = full_end // block_k
    n_kv = pl.cdiv(kv_end, block_k)

    def step(i, carry, masked: bool):
        acc, m, l = carry
        start = pl.multiple_of(i * block_k, block_k)
        key = start + jnp.arange(block_k)
        if masked:
            key_ok = key < length
            k = be.load(k_ref.at[pl.ds(start, block_k), :], mask=key_ok[:, None], other=0)
            v = be.load(v_ref.at[pl.ds(start, block_k), :], mask=key_ok[:, None], other=0)
        else:
            k = be.load(k_ref.at[pl.ds(start, block_k), :])
            v = be.load(v_ref.at[pl.ds(start, block_k), :])
        s = be.dot(q, k, trans_b=True) * scale  # [block_q, block_k]
        if masked:
            visible = (key[None, :] <= q_pos[:, None]) & key_ok[None, :]
            s = jnp.where(visible, s, be.NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        if masked:
            # A row may see nothing in this block and nothing before it (m_new still NEG_INF,
            # so exp gives 1): zero its masked entries explicitly.
            p = jnp.where(visible, p, 0.0)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + be.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    head_dim = q_ref.shape[-1]
    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), be.NEG_INF, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = jax.lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    acc, _, l = jax.lax.fori_loop(n_full, n_kv, functools.partial(step, masked=True), carry)

    out = acc / jnp.where(l == 0, 1.0, l)[:, None]  # l == 0 only for rows with no visible key
    be.store(o_ref.at[pl.ds(t0, block_q), :], out.astype(o_ref.dtype), mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "num_warps", "num_stages", "interpret"))
def prefill_attention(
    q,
    k,
    v,
    q_start,
    lengths,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Causal attention of T queries per row over a KV cache that already holds their keys.

    q [B, T, H, D]; k, v [B, S, Hkv, D]; q_start, lengths [B] int32. Returns [B, T, H, D] in q's
    dtype. Query rows with no visible key give zeros.
    """
    b, t, h, d = q.shape
    _, s, hkv, _ = k.shape
    if h % hkv:
        raise ValueError(f"{h} query heads do not group over {hkv} kv heads")
    group = h // hkv
    dq, dk = default_blocks(d)
    block_q = min(block_q or dq, be.pow2_at_least(t))
    block_k = min(block_k or dk, be.pow2_at_least(s))

    scalar = pl.BlockSpec((None,), lambda bi, hi, qi: (bi,))
    q_spec = pl.BlockSpec((None, t, None, d), lambda bi, hi, qi: (bi, 0, hi, 0))
    kv_spec = pl.BlockSpec((None, s, None, d), lambda bi, hi, qi: (bi, 0, hi // group, 0))
    kernel = functools.partial(
        _prefill_kernel, scale=1.0 / d**0.5, block_q=block_q, block_k=block_k, q_len=t, seq_len=s
    )
    return be.pallas_call(
        kernel,
        grid=(b, h, pl.cdiv(t, block_q)),
        in_specs=[scalar, scalar, q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        name="prefill_attention",
    )(lengths.astype(jnp.int32), q_start.astype(jnp.int32), q, k, v)
