"""The decode loop through the Pallas kernels (interpret mode: fused step, sampling kernel,
projected-embedding table, attention_step past the fused rows) gives the XLA loop's frames."""

import numpy as np
import pytest

from jaxtts.config import preset
from jaxtts.csm import CSM
from jaxtts.generation import audio_table, decode_chunk
from jaxtts.options import DecodeOptions
from jaxtts.sampling import Sampler
from jaxtts.testing import prompt_state

XLA = DecodeOptions(attention="xla")
PALLAS = DecodeOptions(attention="pallas_interpret")


@pytest.fixture(scope="module")
def model():
    return CSM.random(preset("tiny"), dtype="float32", seed=3)


def _frames(model, opts, batch, sampler):
    state = prompt_state(model, batch, 10, 64, opts, seed=5)
    state, frames, _ = decode_chunk(model, state, sampler, 3, opts=opts)
    return np.asarray(frames), np.asarray(state.hidden), [np.asarray(k) for k in state.cache.k]


@pytest.mark.parametrize("batch", [1, 3, 12])  # 12 rows: past the fused step (attention_step, no norm)
def test_pallas_loop_matches_xla_loop(model, batch):
    sampler = Sampler.create(0.9, 50)
    want = _frames(model, XLA, batch, sampler)
    got = _frames(model, PALLAS, batch, sampler)
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


def test_split_model_is_reused_until_the_weights_change():
    from flax import nnx

    from jaxtts.generation import split_model

    model = CSM.random(preset("tiny"), dtype="float32", seed=4)
    sampler = Sampler.create(0.9, 50)
    graphdef, weights = split_model(model)
    assert split_model(model)[1] is weights
    before = _frames(model, XLA, 1, sampler)[0]
    new = model.audio_head.get_value()[:, :, ::-1]  # other logits for every codebook ≥ 1
    model.audio_head.set_value(new)
    graphdef2, weights2 = split_model(model)
    assert weights2 is not weights
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef2, weights2).audio_head.get_value()), np.asarray(new))
    after = _frames(model, XLA, 1, sampler)[0]
    assert (after[:, :, 1:] != before[:, :, 1:]).any()  # a stale split would decode the old weights


def test_rope_heads_flat_is_apply_rope_on_q_and_k():
    import jax
    import jax.numpy as jnp

    from jaxtts.llama import apply_rope, rope_heads_flat

    b, h, hkv, d = 3, 8, 2, 64
    x = jax.random.normal(jax.random.key(0), (b, (h + 2 * hkv) * d)).astype(jnp.bfloat16)
    theta = jax.random.uniform(jax.random.key(1), (b, d // 2)) * 6
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    rotate = lambda a, n: apply_rope(x[:, a * d:(a + n) * d].reshape(b, 1, n, d), cos[:, None], sin[:, None])
    want = jnp.concatenate([rotate(0, h).reshape(b, -1), rotate(h, hkv).reshape(b, -1), x[:, (h + hkv) * d:]], -1)
    np.testing.assert_array_equal(np.asarray(rope_heads_flat(x, cos, sin, h + hkv, d), np.float32),
                                  np.asarray(want, np.float32))


def test_dense_takes_the_kernel_at_tuned_shapes_only(monkeypatch):
    import jax

    import pallas_kernels
    from jaxtts import llama

    calls = []
    real = pallas_kernels.matvec
    monkeypatch.setattr(pallas_kernels, "matvec", lambda *a, **kw: calls.append(kw["config"]) or real(*a, **kw))
    x = jax.random.normal(jax.random.key(0), (12, 1, 64))
    w = jax.random.normal(jax.random.key(1), (64, 96)) / 8
    want = np.asarray(x @ w)
    np.testing.assert_allclose(np.asarray(llama.dense(x, w, PALLAS)), want, rtol=1e-5, atol=1e-5)
    assert not calls  # 12 rows, no tuned config: XLA's dot
    tuned = PALLAS.replace(matvec_tuned=(((16, 64, 96), (32, 32, 2, 4, 3, "dot")),))
    np.testing.assert_allclose(np.asarray(llama.dense(x, w, tuned)), want, rtol=1e-5, atol=1e-5)
    assert calls == [(32, 32, 2, 4, 3, "dot")]
    np.testing.assert_allclose(np.asarray(llama.dense(x[:, :, :32], w[:32], tuned)),
                               np.asarray(x[:, :, :32] @ w[:32]), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1  # another shape: still XLA


def test_tuned_tables_apply_to_their_device_kind_only():
    from jaxtts.options import MATVEC_TUNED, default_options

    class FakeGPU:
        platform = "gpu"

        def __init__(self, kind):
            self.device_kind = kind

    h200 = default_options(FakeGPU("NVIDIA H200"))
    assert h200.matvec_tuned and dict(h200.matvec_tuned) == MATVEC_TUNED["NVIDIA H200"]
    assert h200.tuned_matvec(64, 8192, 2048) == MATVEC_TUNED["NVIDIA H200"][(64, 8192, 2048)]
    other = default_options(FakeGPU("NVIDIA A100-SXM4-80GB"))
    assert other.matvec_tuned == () and other.tuned_matvec(64, 8192, 2048) is None
    assert other.attention == "pallas" and other.top_k_method == "rank"
