"""The decode loop through the Pallas kernels (interpret mode: fused step, sampling kernel,
projected-embedding table, attention_step past the fused rows) gives the XLA loop's frames."""

import numpy as np
import pytest

from jaxtts import bench
from jaxtts.config import preset
from jaxtts.csm import CSM
from jaxtts.generation import audio_table, decode_chunk
from jaxtts.sampling import Sampler


@pytest.fixture(scope="module")
def model():
    return CSM.random(preset("tiny"), dtype="float32", seed=3)


def _frames(model, impl, batch, sampler):
    state = bench._prompt_state(model, batch, 10, 64, impl, seed=5)
    state, frames, _ = decode_chunk(model, state, sampler, 3, impl=impl)
    return np.asarray(frames), np.asarray(state.hidden), [np.asarray(k) for k in state.cache.k]


@pytest.mark.parametrize("batch", [1, 3, 12])  # 12 rows: past the fused step (attention_step, no norm)
def test_pallas_loop_matches_xla_loop(model, batch):
    sampler = Sampler.create(0.9, 50)
    want = _frames(model, "xla", batch, sampler)
    got = _frames(model, "pallas_interpret", batch, sampler)
    assert want[0].std() > 0
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)
    for g, w in zip(got[2], want[2]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_audio_table_is_the_projection_and_is_cached(model):
    table = np.asarray(audio_table(model))
    emb, proj = np.asarray(model.audio_embeddings[...]), np.asarray(model.projection[...])
    np.testing.assert_allclose(table, emb @ proj, rtol=1e-5, atol=1e-5)
    assert audio_table(model) is audio_table(model)
