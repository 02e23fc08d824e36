"""Mimi in JAX against moshi's and transformers' PyTorch Mimi (full size, random weights), streaming,
input checks and the converter's error handling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("moshi")
pytest.importorskip("transformers")

from safetensors.numpy import save_file  # noqa: E402

import mimi_reference as ref  # noqa: E402
from convert.mimi import convert_mimi, read_mimi_checkpoint  # noqa: E402
from jaxtts.errors import JaxttsError  # noqa: E402
from jaxtts.mimi import Mimi  # noqa: E402

FRAMES = 130  # 260 steps of the 25 Hz transformers: past their 250-step window
FRAME = 1920
CODEWORD_STD = 0.5  # codewords about as large as the projected latents, so encoding is a real choice


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def make_audio(length: int, batch: int = 2) -> np.ndarray:
    """A tone plus noise, different in each batch row."""
    rng = np.random.default_rng(length)
    t = np.arange(length) / 24_000
    tone = 0.3 * np.sin(2 * np.pi * np.array([220.0, 330.0, 440.0][:batch])[:, None] * t)
    return (tone[:, None, :] + 0.1 * rng.standard_normal((batch, 1, length))).astype(np.float32)


@pytest.fixture(scope="module")
def codes():
    return np.random.default_rng(0).integers(0, 2048, (2, 32, FRAMES))


@pytest.fixture(scope="module")
def moshi(tmp_path_factory):
    """moshi's MimiModel with random weights, and its state saved as the released file's layout."""
    model = ref.moshi_mimi(seed=0, codeword_std=CODEWORD_STD)
    path = ref.save_moshi(model, tmp_path_factory.mktemp("moshi"))
    # the file must be what moshi's own loader accepts (its hook un-fuses in_proj_weight)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
    return model, path


@pytest.fixture(scope="module")
def ours(moshi, tmp_path_factory):
    """Our Mimi from the converted directory of the moshi file."""
    out = convert_mimi(moshi[1], tmp_path_factory.mktemp("converted") / "mimi", progress=False)
    return Mimi.load(out)


@pytest.fixture(scope="module")
def ours_decoded(ours, codes):
    return np.asarray(ours.decode(codes))


# ---------------------------------------------------------------------------------------------
# Parity with moshi


def test_load_file_directly_equals_converted(ours, moshi):
    direct = Mimi.load(moshi[1])
    flat_a, tree_a = jax.tree.flatten(ours.params)
    flat_b, tree_b = jax.tree.flatten(direct.params)
    assert tree_a == tree_b
    for a, b in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_and_load_round_trip(ours, tmp_path):
    back = Mimi.load(ours.save(tmp_path / "saved"))
    assert back.config == ours.config
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_decode_matches_moshi(moshi, ours, codes, ours_decoded):
    with torch.no_grad():
        want = moshi[0].decode(torch.from_numpy(codes)).numpy()
    assert ours_decoded.shape == (2, 1, FRAME * FRAMES) and ours_decoded.dtype == np.float32
    assert rel_err(ours_decoded, want) < 1e-5


def test_decode_fewer_codebooks_matches_moshi(moshi, ours, codes):
    few = codes[:, :8, :12]
    with torch.no_grad():
        want = moshi[0].decode(torch.from_numpy(few)).numpy()
    assert rel_err(ours.decode(few), want) < 1e-5


@pytest.mark.parametrize("length", [20 * FRAME, 20 * FRAME - 700], ids=["whole-frames", "partial-frame"])
def test_encode_matches_moshi(moshi, ours, length):
    wav = make_audio(length)
    with torch.no_grad():
        want = moshi[0].encode(torch.from_numpy(wav)).numpy()
    got = np.asarray(ours.encode(wav))
    assert got.shape == (2, 32, 20) and got.dtype == np.int32
    assert (got == want).mean() >= 0.99


# ---------------------------------------------------------------------------------------------
# Parity with transformers (its own file layout: split q/k/v, q/k permuted for half rotation)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    model = ref.transformers_mimi(seed=1, codeword_std=CODEWORD_STD)
    out = tmp_path_factory.mktemp("hf")
    model.save_pretrained(out)
    return model, Mimi.load(out)


def test_decode_matches_transformers(hf, codes):
    model, mimi = hf
    with torch.no_grad():
        want = model.decode(torch.from_numpy(codes)).audio_values.numpy()
    assert rel_err(mimi.decode(codes), want) < 1e-5


@pytest.mark.parametrize("length", [20 * FRAME, 20 * FRAME - 700], ids=["whole-frames", "partial-frame"])
def test_encode_matches_transformers(hf, length):
    model, mimi = hf
    wav = make_audio(length)
    with torch.no_grad():
        want = model.encode(torch.from_numpy(wav)).audio_codes.numpy()
    got = np.asarray(mimi.encode(wav))
    assert got.shape == want.shape == (2, 32, 20)
    # transformers pads inside each strided conv instead of padding the audio as moshi (and we) do, so a
    # partial last frame legitimately differs; every complete frame must agree.
    full = length // FRAME
    assert (got[..., :full] == want[..., :full]).mean() >= 0.99


# ---------------------------------------------------------------------------------------------
# Streaming decode


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_streaming_equals_whole_decode(ours, codes, ours_decoded, chunk):
    # 129 frames (258 transformer steps, past the window): 8-frame chunks end with a 1-frame one. The
    # decoder is causal, so they must reproduce the first 129 frames of the 130-frame decode.
    frames = FRAMES - 1
    state = ours.decode_stream_init(2)
    pieces = []
    for start in range(0, frames, chunk):
        part = codes[:, :, start : min(start + chunk, frames)]
        state, pcm = ours.decode_stream_step(state, part)
        assert pcm.shape == (2, 1, FRAME * part.shape[2])
        pieces.append(np.asarray(pcm))
    assert int(state["transformer"]["offset"]) == 2 * frames
    assert rel_err(np.concatenate(pieces, axis=-1), ours_decoded[..., : FRAME * frames]) < 1e-5


def test_stream_state_is_a_fixed_shape_pytree(ours):
    state = ours.decode_stream_init(2)
    layer = state["transformer"]["layers"][0]
    assert layer["k"].shape == (2, 250, 8, 64)
    shapes = [x.shape for x in jax.tree.leaves(state)]
    state, _ = ours.decode_stream_step(state, np.zeros((2, 32, 1), np.int32))
    assert [x.shape for x in jax.tree.leaves(state)] == shapes


def test_long_sequence_attention_blocks_match_direct(ours):
    """Past one window, attention runs over blocks (linear memory); it must equal the direct form."""
    import jax.numpy as jnp

    from jaxtts.mimi import MIMI, model

    rng = np.random.default_rng(0)
    p = ours.params["decoder_transformer"][0]
    t, offset, w = 777, jnp.int32(300), MIMI.context
    x = jnp.asarray(rng.standard_normal((2, t, 512)), jnp.float32)
    cache = {name: jnp.asarray(rng.standard_normal((2, w, 8, 64)), jnp.float32) for name in "kv"}
    got, _ = model.self_attention(p, MIMI, x, cache, offset)

    q, k, v = jnp.moveaxis((x @ p["qkv"]).reshape(2, t, 3, 8, 64), 2, 0)
    pos = offset + jnp.arange(t)
    q, k = model.rope(q, pos, MIMI.max_period), model.rope(k, pos, MIMI.max_period)
    direct = model._windowed_softmax_attention(
        q,
        jnp.concatenate([cache["k"], k], 1),
        jnp.concatenate([cache["v"], v], 1),
        pos,
        offset - w + jnp.arange(w + t),
        w,
    )
    assert rel_err(got, direct.reshape(2, t, 512) @ p["out"]) < 1e-6


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((32, 4), np.int32), "shape"),
        (np.zeros((1, 33, 4), np.int32), "codebooks"),
        (np.zeros((1, 0, 4), np.int32), "codebooks"),
        (np.zeros((1, 32, 0), np.int32), "empty"),
        (np.zeros((0, 32, 4), np.int32), "empty"),
        (np.full((1, 32, 4), 2048), "2048"),
        (np.full((1, 32, 4), -1), "-1"),
        (np.zeros((1, 32, 4), np.float32), "integers"),
    ],
)
def test_decode_rejects_bad_codes(ours, bad, message):
    with pytest.raises(JaxttsError, match=message):
        ours.decode(bad)
    with pytest.raises(JaxttsError, match=message):
        ours.decode_stream_step(ours.decode_stream_init(max(bad.shape[0], 1) if bad.ndim == 3 else 1), bad)


def test_stream_rejects_batch_mismatch(ours):
    with pytest.raises(JaxttsError, match="batch"):
        ours.decode_stream_step(ours.decode_stream_init(2), np.zeros((3, 32, 1), np.int32))
    with pytest.raises(JaxttsError, match="batch"):
        ours.decode_stream_init(0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((1, 1920), np.float32), "shape"),
        (np.zeros((1, 2, 1920), np.float32), "mono"),
        (np.zeros((1, 1, 0), np.float32), "empty"),
        (np.zeros((0, 1, 1920), np.float32), "empty"),
        (np.zeros((1, 1, 1920), np.int16), "floating"),
        (np.full((1, 1, 1920), np.nan, np.float32), "NaN"),
        (np.full((1, 1, 1920), np.inf, np.float32), "infinite"),
    ],
)
def test_encode_rejects_bad_audio(ours, bad, message):
    with pytest.raises(JaxttsError, match=message):
        ours.encode(bad)


# ---------------------------------------------------------------------------------------------
# Converter errors: one clear message, nothing left in the output location


def _assert_nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def test_convert_missing_file(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(JaxttsError, match="no such file"):
        convert_mimi(tmp_path / "nope.safetensors", out, progress=False)
    _assert_nothing_written(out)


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {
                "backbone.layers.0.attn.q_proj.weight": np.zeros((4, 4), np.float32),
                "audio_head": np.zeros((31, 4, 4), np.float32),
            },
            "CSM",
        ),
        ({"some.random.tensor": np.zeros(3, np.float32)}, "not a Mimi checkpoint"),
        (
            {"quantizer.rvq_first.input_proj.weight": np.zeros((256, 512, 1), np.float32)},
            "missing tensor 'encoder.model.0.conv.conv.weight'",
        ),
        (
            {
                "quantizer.rvq_first.input_proj.weight": np.zeros((256, 512, 1), np.float32),
                "encoder.model.0.conv.conv.weight": np.zeros((64, 1, 5), np.float32),
            },
            r"'encoder.model.0.conv.conv.weight' has shape \(64, 1, 5\), expected \(64, 1, 7\)",
        ),
    ],
)
def test_convert_foreign_or_broken_checkpoint(tmp_path, tensors, message):
    src, out = tmp_path / "model.safetensors", tmp_path / "out"
    save_file(tensors, str(src))
    with pytest.raises(JaxttsError, match=message):
        convert_mimi(src, out, progress=False)
    _assert_nothing_written(out)


def test_convert_truncated_file(moshi, tmp_path):
    src, out = tmp_path / ref.MOSHI_FILENAME, tmp_path / "out"
    with open(moshi[1], "rb") as f:
        src.write_bytes(f.read(os.path.getsize(moshi[1]) // 2))
    with pytest.raises(JaxttsError, match="safetensors"):
        convert_mimi(src, out, progress=False)
    _assert_nothing_written(out)


def test_convert_unexpected_tensor(moshi, tmp_path):
    # a directory's safetensors files are read as one checkpoint: the real file plus a stray tensor
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / ref.MOSHI_FILENAME).symlink_to(moshi[1])
    save_file({"encoder.model.99.conv.conv.weight": np.zeros(1, np.float32)}, str(src / "extra.safetensors"))
    with pytest.raises(JaxttsError, match="unexpected tensor 'encoder.model.99"):
        read_mimi_checkpoint(src)


def test_convert_refuses_existing_output(moshi, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(JaxttsError, match="exists"):
        convert_mimi(moshi[1], out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_load_rejects_converted_csm_dir(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"format": "jaxtts", "model": "csm", "config": {}}))
    with pytest.raises(JaxttsError, match="not Mimi"):
        Mimi.load(tmp_path)
