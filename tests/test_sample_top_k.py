"""The sampling kernel (pallas_kernels/sample_top_k.py) in interpret mode vs its reference, vs
jax.random.categorical, and against the distribution it must sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtts.sampling import Sampler
from jaxtts.options import DecodeOptions
from jaxtts.sampling import SplitLogits, gumbel_noise
from pallas_kernels.sample_top_k import sample_top_k, sample_top_k_reference

V = 2051


def _noise(seed, steps, m, vocab=V):
    return gumbel_noise(jax.random.split(jax.random.key(seed), (steps, m)), vocab)


@pytest.mark.parametrize("m,parts", [(1, 1), (3, 1), (2, 4)])
@pytest.mark.parametrize("top_k", [1, 2, 50, V - 1, V, 0])
def test_kernel_matches_reference(m, parts, top_k):
    logits = 3 * jax.random.normal(jax.random.key(top_k + 7 * m), (parts, m, V))
    # Ties at the top-k boundary: every entry equal to the k-th largest stays in the set.
    logits = logits.at[:, :, 100:110].set(jnp.sort(logits[0], axis=-1)[:, -max(top_k, 1)][None, :, None])
    sumsq = jnp.abs(jax.random.normal(jax.random.key(1), (parts, m))) * 50 if parts > 1 else None
    noise = _noise(2, 5, m)
    for step in (0, 3):
        got = sample_top_k(logits, noise, step, 0.9, top_k=top_k, sumsq=sumsq, norm_dim=1024, eps=1e-5,
                           interpret=True)
        want = sample_top_k_reference(logits, noise, step, 0.9, top_k=top_k, sumsq=sumsq, norm_dim=1024,
                                      eps=1e-5)
        assert got.shape == (m,) and got.dtype == jnp.int32
        np.testing.assert_array_equal(got, want)


def test_draw_is_what_categorical_gives_with_the_same_key():
    """Precomputed noise reproduces `Sampler.__call__` (jax.random.categorical) row by row."""
    sampler = Sampler.create(0.8, 50)
    logits = 2 * jax.random.normal(jax.random.key(3), (4, V))
    keys = jax.random.split(jax.random.key(4), 4)
    want = jax.vmap(lambda k, row: sampler(k, row[None])[0])(keys, logits)
    noise = sampler.noise(keys, V)[None]
    for attention in ("xla", "pallas_interpret"):
        np.testing.assert_array_equal(sampler.draw(logits, noise, 0, DecodeOptions(attention=attention)), want)


def test_split_logits_are_finished_like_the_head():
    parts = jax.random.normal(jax.random.key(5), (3, 2, V))
    sumsq = jnp.abs(jax.random.normal(jax.random.key(6), (3, 2))) * 100
    split = SplitLogits(parts, sumsq, 1024, 1e-5)
    noise = _noise(7, 1, 2)
    sampler = Sampler.create(1.1, 20)
    np.testing.assert_array_equal(sampler.draw(split, noise, 0, DecodeOptions(attention="pallas_interpret")),
                                  sampler.draw(split.finish(), noise, 0, DecodeOptions()))


def test_draws_follow_softmax_over_the_top_k():
    """Many rows with the same logits and fresh noise: frequencies ≈ softmax(top_k(logits / T))."""
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    rows, top_k, temp = 3000, 4, 0.7
    noise = _noise(8, 1, rows, len(probs))
    draws = np.asarray(sample_top_k(jnp.broadcast_to(logits, (1, rows, len(probs))), noise, 0, temp, top_k=top_k,
                                    interpret=True))
    want = probs[:top_k] ** (1 / temp)
    want /= want.sum()
    freq = np.bincount(draws, minlength=len(probs)) / rows
    assert freq[top_k:].sum() == 0
    np.testing.assert_allclose(freq[:top_k], want, atol=0.03)


@pytest.mark.parametrize("m", [1, 64])
def test_lowers_to_triton_at_csm_shapes(m):
    sds = jax.ShapeDtypeStruct
    fn = jax.jit(lambda p, s, n, i, t: sample_top_k(p, n, i, t, top_k=50, sumsq=s, norm_dim=1024, eps=1e-5))
    text = fn.trace(sds((4, m, V), jnp.float32), sds((4, m), jnp.float32), sds((32, m, V), jnp.float32),
                    sds((), jnp.int32), sds((), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
