"""The sampling kernel (pallas_kernels/sample_top_k.py) vs its reference, vs
jax.random.categorical, and against the distribution it must sample.

Written once for both devices (tests/conftest.py): the Pallas interpreter on CPU; with
JAXTTS_TEST_DEVICE=gpu the tests marked gpu compile the kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtts.sampling import Sampler, SplitLogits, gumbel_noise, top_k_mask
from pallas_kernels.sample_top_k import sample_top_k, sample_top_k_reference

V = 2051


def _noise(seed, steps, m, vocab=V):
    return gumbel_noise(jax.random.split(jax.random.key(seed), (steps, m)), vocab)


@pytest.mark.gpu
@pytest.mark.parametrize("m,parts", [(1, 1), (3, 1), (2, 4)])
@pytest.mark.parametrize("top_k", [1, 2, 50, V - 1, V, 0])
def test_kernel_matches_reference(m, parts, top_k, interpret):
    logits = 3 * jax.random.normal(jax.random.key(top_k + 7 * m), (parts, m, V))
    # Ties at the top-k boundary: every entry equal to the k-th largest stays in the set.
    logits = logits.at[:, :, 100:110].set(jnp.sort(logits[0], axis=-1)[:, -max(top_k, 1)][None, :, None])
    sumsq = jnp.abs(jax.random.normal(jax.random.key(1), (parts, m))) * 50 if parts > 1 else None
    noise = _noise(2, 5, m)
    for step in (0, 3):
        got = sample_top_k(
            logits, noise, step, 0.9, top_k=top_k, sumsq=sumsq, norm_dim=1024, eps=1e-5, interpret=interpret
        )
        want = sample_top_k_reference(logits, noise, step, 0.9, top_k=top_k, sumsq=sumsq, norm_dim=1024, eps=1e-5)
        assert got.shape == (m,) and got.dtype == jnp.int32
        np.testing.assert_array_equal(got, want)


ROW_TOP_K = [0, 1, 5, 50, V + 3, 2]  # keep all, greedy, small, the default, past V, two
ROW_TEMPERATURE = [0.7, 1.0, 1.3, 0.9, 1.0, 2.0]


@pytest.mark.gpu
@pytest.mark.parametrize("parts", [1, 3])
def test_per_row_settings_match_reference(parts, interpret):
    """Each row its own temperature and top-k (the engine's pools): kernel == reference, with a
    tie at the top for the greedy row (it takes the first largest, as argmax does)."""
    m = len(ROW_TOP_K)
    logits = 3 * jax.random.normal(jax.random.key(11), (parts, m, V))
    logits = logits.at[:, 1, 7].set(logits[:, 1, 900])  # a tie the greedy row must break like argmax
    logits = logits.at[:, 1, 900].set(1e3)
    logits = logits.at[:, 1, 7].set(1e3)
    sumsq = jnp.abs(jax.random.normal(jax.random.key(12), (parts, m))) * 50 if parts > 1 else None
    noise = _noise(13, 2, m)
    top_k, temperature = jnp.asarray(ROW_TOP_K, jnp.int32), jnp.asarray(ROW_TEMPERATURE, jnp.float32)
    kw = dict(top_k=top_k, sumsq=sumsq, norm_dim=1024, eps=1e-5)
    got = sample_top_k(logits, noise, 1, temperature, interpret=interpret, **kw)
    want = sample_top_k_reference(logits, noise, 1, temperature, **kw)
    np.testing.assert_array_equal(got, want)
    assert int(got[1]) == 7


@pytest.mark.gpu
def test_engine_rows_draw_the_same_through_the_kernel_as_through_xla(kernel_options, xla_options):
    """The engine's per-row sampler: the kernel (every row top-k / temperature only) and the XLA
    draw agree row for row; a pool with a top-p row takes the XLA draw for everyone."""
    from jaxtts.engine import RowSampler

    m = len(ROW_TOP_K)
    split = SplitLogits(
        jax.random.normal(jax.random.key(14), (2, m, V)),
        jnp.abs(jax.random.normal(jax.random.key(15), (2, m))) * 80,
        1024,
        1e-5,
    )
    noise = _noise(16, 3, m)
    for use_top_p in (False, True):
        rows = RowSampler(
            temperature=jnp.asarray(ROW_TEMPERATURE, jnp.float32),
            top_k=jnp.asarray(ROW_TOP_K, jnp.int32),
            top_p=jnp.full((m,), 0.8, jnp.float32),
            min_p=jnp.zeros((m,), jnp.float32),
            use_top_p=jnp.zeros((m,), bool).at[3].set(use_top_p),
            use_min_p=jnp.zeros((m,), bool),
        )
        want = rows.draw(split, noise, 2, xla_options)
        np.testing.assert_array_equal(rows.draw(split, noise, 2, kernel_options), want)


@pytest.mark.gpu
def test_draw_is_what_categorical_gives_with_the_same_key(kernel_options, xla_options):
    """Precomputed noise reproduces `Sampler.__call__` (jax.random.categorical) row by row."""
    sampler = Sampler.create(0.8, 50)
    logits = 2 * jax.random.normal(jax.random.key(3), (4, V))
    keys = jax.random.split(jax.random.key(4), 4)
    want = jax.vmap(lambda k, row: sampler(k, row[None])[0])(keys, logits)
    noise = sampler.noise(keys, V)[None]
    for opts in (xla_options, kernel_options):
        np.testing.assert_array_equal(sampler.draw(logits, noise, 0, opts), want)


@pytest.mark.gpu
def test_split_logits_are_finished_like_the_head(kernel_options, xla_options):
    parts = jax.random.normal(jax.random.key(5), (3, 2, V))
    sumsq = jnp.abs(jax.random.normal(jax.random.key(6), (3, 2))) * 100
    split = SplitLogits(parts, sumsq, 1024, 1e-5)
    noise = _noise(7, 1, 2)
    sampler = Sampler.create(1.1, 20)
    np.testing.assert_array_equal(
        sampler.draw(split, noise, 0, kernel_options), sampler.draw(split.finish(), noise, 0, xla_options)
    )


@pytest.mark.gpu
def test_draws_follow_softmax_over_the_top_k(interpret):
    """Many rows with the same logits and fresh noise: frequencies ≈ softmax(top_k(logits / T))."""
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    rows, top_k, temp = 3000, 4, 0.7
    noise = _noise(8, 1, rows, len(probs))
    draws = np.asarray(
        sample_top_k(jnp.broadcast_to(logits, (1, rows, len(probs))), noise, 0, temp, top_k=top_k, interpret=interpret)
    )
    want = probs[:top_k] ** (1 / temp)
    want /= want.sum()
    freq = np.bincount(draws, minlength=len(probs)) / rows
    assert freq[top_k:].sum() == 0
    np.testing.assert_allclose(freq[:top_k], want, atol=0.03)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m, parts, top_k",
    [(64, 4, 50)]
    + [
        pytest.param(*case, marks=pytest.mark.gpu_only(reason="test_kernel_matches_reference covers it on CPU"))
        for case in [(1, 1, 50), (64, 1, 50), (1, 8, 50), (64, 4, V - 1), (8, 4, 1)]
    ],
)
def test_kernel_at_csm_shapes(m, parts, top_k, interpret, on_gpu):
    """The depth head's shapes (benchmarks/decode_probe.py --check): over 8 seeds (one in the slower
    interpreter on CPU) the kernel draws what the reference draws, but for at most one near-tie,
    and every draw is inside the top-k set."""
    seeds = 8 if on_gpu else 1
    agree = inside = 0
    for seed in range(seeds):
        logits = 3 * jax.random.normal(jax.random.key(seed), (parts, m, V))
        sumsq = 100 * jnp.abs(jax.random.normal(jax.random.key(seed + 100), (parts, m))) if parts > 1 else None
        noise = _noise(seed + 200, 3, m)
        kw = dict(top_k=top_k, sumsq=sumsq, norm_dim=1024, eps=1e-5)
        got = np.asarray(sample_top_k(logits, noise, 2, 0.9, interpret=interpret, **kw))
        want = np.asarray(sample_top_k_reference(logits, noise, 2, 0.9, **kw))
        y = logits.sum(0) if sumsq is None else logits.sum(0) * jax.lax.rsqrt(sumsq.sum(0) / 1024 + 1e-5)[:, None]
        mask = np.asarray(top_k_mask(y / 0.9, top_k, "sort"))
        agree += int((got == want).sum())
        inside += int(mask[np.arange(m), got].sum())
    total = seeds * m
    assert inside == total, f"{total - inside} draws outside the top {top_k}"
    assert agree >= total - 1, f"{total - agree} of {total} draws differ from the reference"


@pytest.mark.parametrize("m", [1, 64])
def test_lowers_to_triton_at_csm_shapes(m):
    """The Triton lowering runs at trace time, so CPU catches its shape and op restrictions (on a
    GPU the tests above compile the kernel, and this one is skipped)."""
    sds = jax.ShapeDtypeStruct
    fn = jax.jit(lambda p, s, n, i, t: sample_top_k(p, n, i, t, top_k=50, sumsq=s, norm_dim=1024, eps=1e-5))
    text = (
        fn.trace(
            sds((4, m, V), jnp.float32),
            sds((4, m), jnp.float32),
            sds((32, m, V), jnp.float32),
            sds((), jnp.int32),
            sds((), jnp.float32),
        )
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "triton" in text
