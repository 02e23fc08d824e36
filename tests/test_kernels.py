"""Pallas attention kernels vs their jnp references and the XLA path.

Written once for both devices (tests/conftest.py): on CPU the kernels run in the Pallas
interpreter, which fills output buffers with NaN before the kernel runs, so "all finite" also
checks that every output element was written; with JAXTTS_TEST_DEVICE=gpu the tests marked gpu
compile them. Cache slots past each row's length hold NaN, standing for stale memory: a kernel
that read them with any weight would return NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtts.attention import attention, xla_attention
from pallas_kernels import (
    decode_attention,
    decode_attention_reference,
    prefill_attention,
    prefill_attention_reference,
)

BACKBONE = dict(h=32, hkv=8, d=64)
DEPTH = dict(h=8, hkv=2, d=128)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# At CSM-1B's sizes (up to 2048 keys per row), the bounds of benchmarks/gpu_check.py.
CSM_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}
CSM_SLOTS = {"backbone": 2048, "depth": 32}
FULL_BACKBONE = pytest.mark.gpu_only(
    reason="the backbone's full 2048-slot cache is slow in the Pallas interpreter; the tests above run its heads "
    "at 80 slots on CPU"
)


def _cache(rng, b, s, hkv, d, lengths, dtype):
    """K/V caches whose slots at or past lengths[b] are NaN."""
    k = rng.standard_normal((b, s, hkv, d), dtype=np.float32)
    v = rng.standard_normal((b, s, hkv, d), dtype=np.float32)
    stale = np.arange(s)[None, :] >= np.asarray(lengths)[:, None]
    k[stale] = np.nan
    v[stale] = np.nan
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _zero_stale(x, lengths):
    """The cache as the XLA path must see it: it would carry the NaN through 0 * NaN."""
    filled = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    return jnp.where(filled[:, :, None, None], x, 0)


def _close(out, want, dtype, tol=TOL):
    assert out.dtype == dtype
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, np.asarray(want.astype(jnp.float32)), atol=tol[dtype], rtol=tol[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape, dtype, s, lengths, block_k, num_splits",
    [
        (BACKBONE, jnp.float32, 80, [1, 37, 80], 16, 1),
        (BACKBONE, jnp.float32, 80, [1, 37, 80], 16, 3),
        (DEPTH, jnp.bfloat16, 33, [5, 33], 16, 2),
        (DEPTH, jnp.float32, 33, [7, 30], None, None),  # default block size and splits
    ],
)
def test_decode_matches_references(shape, dtype, s, lengths, block_k, num_splits, interpret):
    rng = np.random.default_rng(0)
    b = len(lengths)
    lengths = jnp.asarray(lengths, jnp.int32)
    q = jnp.asarray(rng.standard_normal((b, shape["h"], shape["d"]), dtype=np.float32), dtype)
    k, v = _cache(rng, b, s, shape["hkv"], shape["d"], lengths, dtype)

    out = decode_attention(q, k, v, lengths, block_k=block_k, num_splits=num_splits, interpret=interpret)
    _close(out, decode_attention_reference(q, k, v, lengths), dtype)
    want = xla_attention(q[:, None], _zero_stale(k, lengths), _zero_stale(v, lengths), lengths - 1, lengths)
    _close(out, want[:, 0], dtype)


@pytest.mark.gpu
def test_decode_empty_row_and_earlier_query(interpret):
    # Row 0 has no keys (must give zeros); row 1's query sits before the end of its filled slots.
    rng = np.random.default_rng(1)
    lengths = jnp.asarray([0, 20], jnp.int32)
    q_start = jnp.asarray([0, 9], jnp.int32)
    q = jnp.asarray(rng.standard_normal((2, 8, 128), dtype=np.float32))
    k, v = _cache(rng, 2, 40, 2, 128, lengths, jnp.float32)

    out = decode_attention(q, k, v, lengths, q_start, block_k=16, num_splits=2, interpret=interpret)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    _close(out, decode_attention_reference(q, k, v, lengths, q_start), jnp.float32)
    want = xla_attention(q[:, None], _zero_stale(k, lengths), _zero_stale(v, lengths), q_start, lengths)
    _close(out, want[:, 0], jnp.float32)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape, dtype, t, s, q_start, lengths, blocks",
    [
        # Prompt, prompt after cached context, and padded query rows (q_start + t > lengths).
        (BACKBONE, jnp.float32, 37, 80, [0, 20, 43], [37, 57, 70], (16, 16)),
        (DEPTH, jnp.bfloat16, 2, 32, [0, 0], [2, 1], (None, None)),  # depth decoder's first step
        (DEPTH, jnp.float32, 19, 50, [0, 30], [0, 49], (16, 32)),  # an empty row
    ],
)
def test_prefill_matches_references(shape, dtype, t, s, q_start, lengths, blocks, interpret):
    rng = np.random.default_rng(2)
    b = len(lengths)
    q_start = jnp.asarray(q_start, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    q = jnp.asarray(rng.standard_normal((b, t, shape["h"], shape["d"]), dtype=np.float32), dtype)
    k, v = _cache(rng, b, s, shape["hkv"], shape["d"], lengths, dtype)

    out = prefill_attention(q, k, v, q_start, lengths, block_q=blocks[0], block_k=blocks[1], interpret=interpret)
    _close(out, prefill_attention_reference(q, k, v, q_start, lengths), dtype)
    _close(out, xla_attention(q, _zero_stale(k, lengths), _zero_stale(v, lengths), q_start, lengths), dtype)
    for row in np.flatnonzero(np.asarray(lengths) == 0):
        np.testing.assert_array_equal(np.asarray(out[row].astype(jnp.float32)), 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 5])
def test_attention_entry_point_dispatch(t, kernel_options):
    rng = np.random.default_rng(3)
    q_start = jnp.asarray([3, 11], jnp.int32)
    lengths = q_start + t
    q = jnp.asarray(rng.standard_normal((2, t, 8, 128), dtype=np.float32))
    k = jnp.asarray(rng.standard_normal((2, 24, 2, 128), dtype=np.float32))
    v = jnp.asarray(rng.standard_normal((2, 24, 2, 128), dtype=np.float32))
    out = attention(q, k, v, q_start, lengths, impl=kernel_options.attention)
    _close(out, attention(q, k, v, q_start, lengths, impl="xla"), jnp.float32)


# ---------------------------------------- CSM-1B shapes: the correctness checks of benchmarks/gpu_check.py


def _csm_lengths(s):
    """Eight rows: one key, a full cache, and six random fills."""
    return jnp.asarray(np.r_[1, s, np.random.default_rng(0).integers(1, s + 1, 6)], jnp.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "model, kw, before_end",
    [
        pytest.param("backbone", {}, False, marks=FULL_BACKBONE),
        pytest.param("backbone", dict(num_splits=1), False, marks=FULL_BACKBONE),
        pytest.param("backbone", {}, True, marks=FULL_BACKBONE),
        ("depth", {}, False),
        ("depth", dict(num_splits=1), False),
        ("depth", {}, True),  # the query sits halfway into its row's keys
    ],
)
def test_decode_at_csm_shapes(model, kw, before_end, dtype, interpret):
    shape, s = (BACKBONE if model == "backbone" else DEPTH), CSM_SLOTS[model]
    rng = np.random.default_rng(4)
    lengths = _csm_lengths(s)
    q_start = lengths // 2 if before_end else None
    q = jnp.asarray(rng.standard_normal((8, shape["h"], shape["d"]), dtype=np.float32), dtype)
    k, v = _cache(rng, 8, s, shape["hkv"], shape["d"], lengths, dtype)
    out = decode_attention(q, k, v, lengths, q_start, interpret=interpret, **kw)
    _close(out, decode_attention_reference(q, k, v, lengths, q_start), dtype, CSM_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "model, t, q_start, lengths",
    [
        pytest.param("backbone", 300, [0, 1024], [300, 1324], marks=FULL_BACKBONE),  # after cached context
        pytest.param("backbone", 2048, [0], [2048], marks=FULL_BACKBONE),  # the whole cache at once
        ("depth", 2, [0] * 4, [2, 2, 2, 1]),
    ],
)
def test_prefill_at_csm_shapes(model, t, q_start, lengths, dtype, interpret):
    shape, s = (BACKBONE if model == "backbone" else DEPTH), CSM_SLOTS[model]
    rng = np.random.default_rng(5)
    q_start, lengths = jnp.asarray(q_start, jnp.int32), jnp.asarray(lengths, jnp.int32)
    q = jnp.asarray(rng.standard_normal((len(lengths), t, shape["h"], shape["d"]), dtype=np.float32), dtype)
    k, v = _cache(rng, len(lengths), s, shape["hkv"], shape["d"], lengths, dtype)
    out = prefill_attention(q, k, v, q_start, lengths, interpret=interpret)
    _close(out, prefill_attention_reference(q, k, v, q_start, lengths), dtype, CSM_TOL)


@pytest.mark.parametrize("shape, s", [(BACKBONE, 2048), (DEPTH, 32)])
@pytest.mark.parametrize("batch", [1, 64])
def test_lowers_to_triton_at_csm_shapes(shape, s, batch):
    """The Triton lowering runs at trace time, so CPU catches its shape and op restrictions (on a
    GPU the tests above compile the kernels, and this one is skipped)."""
    sds = jax.ShapeDtypeStruct
    h, hkv, d = shape["h"], shape["hkv"], shape["d"]
    kv = sds((batch, s, hkv, d), jnp.bfloat16)
    rows = sds((batch,), jnp.int32)
    cases = [
        (lambda q, k, v, n: decode_attention(q, k, v, n), (sds((batch, h, d), jnp.bfloat16), kv, kv, rows)),
        (
            lambda q, k, v, qs, n: prefill_attention(q, k, v, qs, n),
            (sds((batch, min(s, 100), h, d), jnp.bfloat16), kv, kv, rows, rows),
        ),
    ]
    for fn, args in cases:
        hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in hlo
