"""Sampling: the two top-k methods agree, greedy is argmax, filters keep what they promise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtts.errors import JaxttsError
from jaxtts.sampling import Sampler, top_k_mask


@pytest.mark.parametrize("k", [1, 2, 50, 2050])
def test_top_k_methods_agree(k):
    logits = jax.random.normal(jax.random.key(k), (3, 2051))
    logits = logits.at[1, :10].set(0.5)  # ties at the boundary are kept by both
    by_sort, by_rank = top_k_mask(logits, k, "sort"), top_k_mask(logits, k, "rank")
    np.testing.assert_array_equal(by_sort, by_rank)
    assert (np.asarray(by_sort[0]).sum(), np.asarray(by_sort[2]).sum()) == (k, k)


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (4, 2051))
    np.testing.assert_array_equal(Sampler.create(0.9, 1)(None, logits), jnp.argmax(logits, -1))


def test_draws_stay_in_top_k_and_follow_the_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler.create(1.0, 2)
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: sampler(k, logits)[0])(keys))
    assert set(np.unique(draws)) == {0, 1}
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03


def test_top_p_and_min_p_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(1), 2000)
    top_p = np.asarray(jax.vmap(lambda k: Sampler.create(1.0, None, top_p=0.7)(k, logits)[0])(keys))
    assert set(np.unique(top_p)) == {0, 1}
    min_p = np.asarray(jax.vmap(lambda k: Sampler.create(1.0, None, min_p=0.5)(k, logits)[0])(keys))
    assert set(np.unique(min_p)) == {0, 1}


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=0), dict(top_p=1.5), dict(min_p=1.0)],
)
def test_invalid_settings(kwargs):
    with pytest.raises(JaxttsError):
        Sampler.create(**kwargs)


def test_temperature_zero_is_greedy():
    s = Sampler.create(0, 50)
    assert s.greedy and s.top_k == 1
    logits = jnp.array([[0.1, 2.0, -1.0, 1.9]])
    assert int(s(jax.random.key(0), logits)[0]) == 1
