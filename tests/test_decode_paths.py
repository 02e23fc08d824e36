"""The decode loop through the Pallas kernels (fused step, sampling kernel, projected-embedding
table, attention_step past the fused rows) gives the XLA loop's frames.

Written once for both devices (tests/conftest.py): the kernels in the Pallas interpreter on CPU;
with JAXTTS_TEST_DEVICE=gpu the tests marked gpu compile them, and the whole-model checks run on
full-size CSM-1B instead of the tiny model."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtts.config import preset
from jaxtts.csm import CSM
from jaxtts.generation import audio_table, decode_chunk, split_model
from jaxtts.options import DecodeOptions
from jaxtts.sampling import Sampler
from jaxtts.testing import prompt_state, random_text_prompt

XLA = DecodeOptions(attention="xla")


@pytest.fixture(scope="module")
def model(random_csm):
    return random_csm("tiny", seed=3)


def _frames(model, opts, batch, sampler, num_frames=3, prompt_tokens=10, cache_len=64):
    """(frames [num_frames, batch, 32], last hidden state, backbone keys) after a random prompt."""
    state = prompt_state(model, batch, prompt_tokens, cache_len, opts, seed=5)
    state, frames, _ = decode_chunk(model, state, sampler, num_frames, opts=opts)
    return np.asarray(frames), np.asarray(state.hidden), [np.asarray(k) for k in state.cache.k]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch, variant",
    [
        (1, {}),
        (3, {}),
        (12, {}),  # 12 rows: past the fused step (attention_step, no norm)
        (1, {"swiglu_epilogue": True}),  # the fused step's gate/up kernel applies the norm and SwiGLU
    ],
)
def test_pallas_loop_matches_xla_loop(random_csm, check_preset, batch, variant, kernel_options, xla_options):
    """Sampled frames (top-k 50) equal, hidden states and caches within 1e-4, in float32: the tiny
    model on CPU (the `model` fixture), full-size CSM-1B on a GPU."""
    model = random_csm(check_preset, seed=3)
    sampler = Sampler.create(0.9, 50)
    want = _frames(model, xla_options, batch, sampler)
    got = _frames(model, kernel_options.replace(**variant), batch, sampler)
    assert want[0].std() > 0
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)
    for g, w in zip(got[2], want[2]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.gpu_only(
    reason="the Pallas parts of this loop are what test_pallas_loop_matches_xla_loop checks on CPU; the point "
    "here is 12 frames of full-size float32 CSM-1B"
)
@pytest.mark.parametrize("batch", [1, 12])
def test_greedy_frames_equal_xla_in_float32(random_csm, check_preset, kernel_options, xla_options, batch):
    """12 greedy frames of random float32 CSM-1B, token for token."""
    model = random_csm(check_preset, dtype="float32", seed=3)
    greedy, num_frames = Sampler.create(0.9, 1), 12
    kw = dict(num_frames=num_frames, prompt_tokens=40, cache_len=128)
    want = _frames(model, xla_options, batch, greedy, **kw)[0]
    got = _frames(model, kernel_options, batch, greedy, **kw)[0]
    assert want.shape == (num_frames, batch, model.cfg.audio_num_codebooks) and want.std() > 0
    if not np.array_equal(got, want):
        f, b, c = np.argwhere(got != want)[0]
        raise AssertionError(
            f"first difference at frame {f}, row {b}, codebook {c}; "
            f"{int((got != want).sum())} of {got.size} tokens differ"
        )


@partial(jax.jit, static_argnames=("graphdef", "opts"))
def _codebook0_logits(graphdef, weights, tokens, mask, opts):
    """Codebook-0 logits after a prompt (the prefill kernel) and after one more row (a decode step)."""
    model = nnx.merge(graphdef, weights)
    b, t = tokens.shape[:2]
    start = jnp.zeros((b,), jnp.int32)
    h, cache = model.run_backbone(tokens[:, :-1], mask[:, :-1], start, model.backbone_cache(b, 128), opts=opts)
    h1, _ = model.run_backbone(tokens[:, -1:], mask[:, -1:], start + t - 1, cache, opts=opts)
    return model.codebook0_logits(h[:, -1]), model.codebook0_logits(h1[:, 0])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch",
    [
        1,  # the fused step
        # past it: attention_step without the norm
        pytest.param(
            12, marks=pytest.mark.gpu_only(reason="test_pallas_loop_matches_xla_loop[12-variant2] covers it on CPU")
        ),
        pytest.param(64, marks=pytest.mark.gpu_only(reason="the tuned GEMV configs apply on a GPU only")),
    ],
)
def test_codebook0_logits_match_xla_in_bfloat16(random_csm, check_preset, kernel_options, xla_options, batch):
    """Relative L2 error < 2e-2 in bf16 (full-size CSM-1B on a GPU)."""
    model = random_csm(check_preset, dtype="bfloat16")
    tokens, mask = random_text_prompt(batch, 101, text_vocab=model.cfg.text_vocab_size, seed=6)
    graphdef, weights = split_model(model)
    want = _codebook0_logits(graphdef, weights, tokens, mask, xla_options)
    got = _codebook0_logits(graphdef, weights, tokens, mask, kernel_options)
    for name, g, w in zip(("prompt", "step"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all(), name
        err = np.linalg.norm(g - w) / np.linalg.norm(w)
        assert err < 2e-2, f"{name}: relative error {err:.2e}"


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
    from jaxtts.llama import apply_rope, rope_heads_flat

    b, h, hkv, d = 3, 8, 2, 64
    x = jax.random.normal(jax.random.key(0), (b, (h + 2 * hkv) * d)).astype(jnp.bfloat16)
    theta = jax.random.uniform(jax.random.key(1), (b, d // 2)) * 6
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    rotate = lambda a, n: apply_rope(x[:, a * d : (a + n) * d].reshape(b, 1, n, d), cos[:, None], sin[:, None])
    want = jnp.concatenate([rotate(0, h).reshape(b, -1), rotate(h, hkv).reshape(b, -1), x[:, (h + hkv) * d :]], -1)
    np.testing.assert_array_equal(
        np.asarray(rope_heads_flat(x, cos, sin, h + hkv, d), np.float32), np.asarray(want, np.float32)
    )


@pytest.mark.gpu
def test_dense_takes_the_kernel_at_tuned_shapes_only(monkeypatch, kernel_options):
    import pallas_kernels
    from jaxtts import llama

    calls = []
    real = pallas_kernels.matvec
    monkeypatch.setattr(pallas_kernels, "matvec", lambda *a, **kw: calls.append(kw["config"]) or real(*a, **kw))
    x = jax.random.normal(jax.random.key(0), (12, 1, 64))
    w = jax.random.normal(jax.random.key(1), (64, 96)) / 8
    want = np.asarray(x @ w)
    np.testing.assert_allclose(np.asarray(llama.dense(x, w, kernel_options)), want, rtol=1e-5, atol=1e-5)
    assert not calls  # 12 rows, no tuned config: XLA's dot
    tuned = kernel_options.replace(matvec_tuned=(((16, 64, 96), (32, 32, 2, 4, 3, "dot")),))
    np.testing.assert_allclose(np.asarray(llama.dense(x, w, tuned)), want, rtol=1e-5, atol=1e-5)
    assert calls == [(32, 32, 2, 4, 3, "dot")]
    np.testing.assert_allclose(
        np.asarray(llama.dense(x[:, :, :32], w[:32], tuned)), np.asarray(x[:, :, :32] @ w[:32]), rtol=1e-5, atol=1e-5
    )
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
