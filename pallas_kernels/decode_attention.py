"""Decode attention: one new query per row against a ragged KV cache (flash-decoding).

Grid: (batch, kv head, split). Each program loads the query group of one KV head (G = H / Hkv
heads, padded to 16 rows for the tensor-core dot), so each KV head is read once for all its query
heads. The filled part of the row, `limit = min(lengths[b], q_start[b] + 1)` keys, is cut into
`num_splits` equal runs of whole key blocks; each program folds its run into a running max /
sum / output (online softmax) and writes them as partials. A small jnp step combines the partials
(skipped when num_splits == 1, where the kernel writes the normalised output itself).

Because the runs are cut from `limit` at run time, not from the cache size, nothing past the
filled part is read and the work is spread over the splits however full the cache is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _backend as be


def decode_attention_reference(q, k, v, lengths, q_start=None):
    """Pure-jnp decode attention in float32. q [B, H, D], k/v [B, S, Hkv, D] -> [B, H, D]."""
    b, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    limit = lengths if q_start is None else jnp.minimum(lengths, q_start + 1)
    valid = jnp.arange(s)[None, :] < limit[:, None]  # [B, S]
    # Zero the unfilled slots so stale values (even NaN) there cannot leak through 0 * x.
    k32 = jnp.where(valid[:, :, None, None], k.astype(jnp.float32), 0.0)
    v32 = jnp.where(valid[:, :, None, None], v.astype(jnp.float32), 0.0)
    qg = q.astype(jnp.float32).reshape(b, hkv, h // hkv, d)
    scores = jnp.einsum("bkgd,bskd->bkgs", qg, k32, precision="highest") / jnp.sqrt(jnp.float32(d))
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(valid[:, None, None, :], jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgs,bskd->bkgd", p, v32, precision="highest") / jnp.where(denom == 0, 1.0, denom)
    return out.reshape(b, h, d).astype(q.dtype)


def default_block_k(head_dim: int) -> int:
    # A [block_k, D] K tile plus its V tile is 32 KiB in bf16 either way.
    return 128 if head_dim <= 64 else 64


def default_num_splits(batch: int, kv_heads: int, seq_len: int, block_k: int) -> int:
    """Enough splits for ~256 programs (about two per SM on an H100/H200), at most one per block."""
    want = pl.next_power_of_2(pl.cdiv(256, batch * kv_heads))
    return max(1, min(want, pl.cdiv(seq_len, block_k)))


def fold_key_block(q, k, v, key_ok, scale, acc, m, l):
    """Online softmax: fold one block of keys k / values v [block, D] (key_ok marks the real ones)
    into a query tile's running output acc [rows, D], max m and sum l [rows]."""
    s = jnp.where(key_ok[None, :], be.dot(q, k, trans_b=True) * scale, be.NEG_INF)  # [rows, block]
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    return acc * alpha[:, None] + be.dot(p.astype(v.dtype), v), m_new, l * alpha + jnp.sum(p, axis=1)


def _decode_kernel(*refs, scale, block_k, num_splits, group, rows, seq_len, has_q_start):
    if has_q_start:
        len_ref, qs_ref, q_ref, k_ref, v_ref, *out_refs = refs
        limit = jnp.minimum(len_ref[()], qs_ref[()] + 1)
    else:
        len_ref, q_ref, k_ref, v_ref, *out_refs = refs
        limit = len_ref[()]
    limit = jnp.clip(limit, 0, seq_len)  # never read past the cache, whatever lengths says

    n_blocks = pl.cdiv(limit, block_k)
    per_split = pl.cdiv(n_blocks, num_splits)
    lo = pl.program_id(2) * per_split
    hi = jnp.minimum(lo + per_split, n_blocks)

    row_ok = jnp.arange(rows) < group
    q = be.load(q_ref.at[pl.ds(0, rows), :], mask=row_ok[:, None], other=0)

    def body(i, carry):
        acc, m, l = carry
        start = pl.multiple_of(i * block_k, block_k)
        key_ok = start + jnp.arange(block_k) < limit
        k = be.load(k_ref.at[pl.ds(start, block_k), :], mask=key_ok[:, None], other=0)
        v = be.load(v_ref.at[pl.ds(start, block_k), :], mask=key_ok[:, None], other=0)
        # Every block in [lo, hi) holds at least one visible key, so each row's max is real.
        return fold_key_block(q, k, v, key_ok, scale, acc, m, l)

    head_dim = q_ref.shape[-1]
    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), be.NEG_INF, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(lo, hi, body, init)

    if num_splits == 1:
        (o_ref,) = out_refs
        out = acc / jnp.where(l == 0, 1.0, l)[:, None]  # l == 0 only when the row has no keys
        be.store(o_ref.at[pl.ds(0, rows), :], out.astype(o_ref.dtype), mask=row_ok[:, None])
    else:
        # Empty splits still write (acc 0, m NEG_INF, l 0) so the combine never reads garbage.
        o_ref, m_ref, l_ref = out_refs
        be.store(o_ref.at[pl.ds(0, rows), :], acc, mask=row_ok[:, None])
        be.store(m_ref.at[pl.ds(0, rows)], m, mask=row_ok)
        be.store(l_ref.at[pl.ds(0, rows)], l, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("block_k", "num_splits", "num_warps", "num_stages", "interpret"))
def decode_attention(
    q,
    k,
    v,
    lengths,
    q_start=None,
    *,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Attention of one query per row over a ragged KV cache.

    q [B, H, D] is the query at position `lengths[b] - 1` (or `q_start[b]` when given: keys
    j <= q_start[b] and j < lengths[b] are visible); k, v [B, S, Hkv, D] already hold its key.
    Returns [B, H, D] in q's dtype. Rows with no visible key give zeros.
    """
    b, h, d = q.shape
    _, s, hkv, _ = k.shape
    if h % hkv:
        raise ValueError(f"{h} query heads do not group over {hkv} kv heads")
    group = h // hkv
    rows = be.pow2_at_least(group)
    block_k = min(block_k or default_block_k(d), be.pow2_at_least(s))
    num_splits = num_splits or default_num_splits(b, hkv, s, block_k)

    qg = q.reshape(b, hkv, group, d)  # free: heads of one group are adjacent
    scalar = pl.BlockSpec((None,), lambda bi, hi, si: (bi,))
    kv_spec = pl.BlockSpec((None, s, None, d), lambda bi, hi, si: (bi, 0, hi, 0))
    in_specs = (
        [scalar]
        + ([scalar] if q_start is not None else [])
        + [
            pl.BlockSpec((None, None, group, d), lambda bi, hi, si: (bi, hi, 0, 0)),
            kv_spec,
            kv_spec,
        ]
    )
    args = [lengths.astype(jnp.int32)]
    if q_start is not None:
        args.append(q_start.astype(jnp.int32))
    args += [qg, k, v]

    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct((b, hkv, group, d), q.dtype)
        out_specs = pl.BlockSpec((None, None, group, d), lambda bi, hi, si: (bi, hi, 0, 0))
    else:
        out_shape = (
            jax.ShapeDtypeStruct((b, hkv, num_splits, group, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, num_splits, group), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, num_splits, group), jnp.float32),
        )
        out_specs = (
            pl.BlockSpec((None, None, None, group, d), lambda bi, hi, si: (bi, hi, si, 0, 0)),
            pl.BlockSpec((None, None, None, group), lambda bi, hi, si: (bi, hi, si, 0)),
            pl.BlockSpec((None, None, None, group), lambda bi, hi, si: (bi, hi, si, 0)),
        )

    kernel = functools.partial(
        _decode_kernel,
        scale=1.0 / d**0.5,
        block_k=block_k,
        num_splits=num_splits,
        group=group,
        rows=rows,
        seq_len=s,
        has_q_start=q_start is not None,
    )
    out = be.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        name="decode_attention",
    )(*args)

    if num_splits > 1:
        acc, m, l = out
        # Rescale every split to the row's overall max; empty splits get weight 0 (or, when the
        # whole row is empty, weight 1 on zeros).
        w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))
        denom = jnp.sum(w * l, axis=2)
        out = jnp.sum(w[..., None] * acc, axis=2) / jnp.where(denom == 0, 1.0, denom)[..., None]
    return out.reshape(b, h, d).astype(q.dtype)
