"""Bad input at the API edge gives one clear JaxttsError; odd but valid input works."""

import numpy as np
import pytest

from jaxtts.config import CSM_TINY
from jaxtts.csm import CSM
from jaxtts.errors import JaxttsError
from jaxtts.generation import generate_frames
from jaxtts.prompt import Segment, text_rows
from jaxtts.tts import TTS, Request


@pytest.fixture(scope="module")
def tts():
    from jaxtts.mimi import Mimi

    return TTS(CSM.random(CSM_TINY, seed=1), Mimi.random(seed=0), max_silence_ms=None)


BAD_GENERATE = [
    (dict(seed=-1), "unsigned 32-bit"),
    (dict(seed=2**32), "unsigned 32-bit"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed="7"), "seed must be an integer"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(temperature=-0.1), r"temperature must be in \[0, 100\]"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(top_k=True), "top_k must be an integer"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(max_audio_ms=float("inf")), "max_audio_ms must be a finite number"),
    (dict(max_audio_ms=40), "max_audio_ms must be in"),
    (dict(speaker=-2), "speaker must be"),
    (dict(speaker="0"), "speaker must be"),
    (dict(context="me.wav"), "context must be a jaxtts.Segment"),
    (dict(context=[1, 2]), r"context\[0\] must be a jaxtts.Segment"),
    (dict(long_form="yes"), "long_form must be True or False"),
]


@pytest.mark.parametrize("kwargs, message", BAD_GENERATE)
def test_bad_generate_arguments(tts, kwargs, message):
    with pytest.raises(JaxttsError, match=message):
        tts.generate("Hello.", max_audio_ms=kwargs.pop("max_audio_ms", 160), **kwargs)


def test_bad_text_and_segments():
    with pytest.raises(JaxttsError, match="text must be a string"):
        Segment(0, None)
    with pytest.raises(JaxttsError, match=r"codes must be \[32, T\]"):
        Segment(0, "hi", codes=np.zeros((8, 3), np.int32))
    with pytest.raises(JaxttsError, match=r"codes must be in \[0, 2047\]"):
        Segment(0, "hi", codes=np.full((32, 3), 2049))
    with pytest.raises(JaxttsError, match="codes must be integers"):
        Segment(0, "hi", codes=np.zeros((32, 3), np.float32))
    with pytest.raises(JaxttsError, match="not both"):
        Segment(0, "hi", audio=np.zeros(100, np.float32), codes=np.zeros((32, 2), np.int32))
    with pytest.raises(JaxttsError, match="path or an array"):
        Segment(0, "hi", audio=42)


def test_bad_batch_and_constructor_arguments(tts):
    with pytest.raises(JaxttsError, match="list of Request"):
        tts.generate_batch("just one string")
    with pytest.raises(JaxttsError, match="unknown field 'voise'"):
        tts.generate_batch([dict(text="Hi.", voise=1)])
    with pytest.raises(JaxttsError, match=r"requests\[1\] must be"):
        tts.generate_batch(["Hi.", 3])
    with pytest.raises(JaxttsError, match="chunk_frames"):
        TTS(tts.model, tts.codec, chunk_frames=0)
    with pytest.raises(JaxttsError, match="random_weights"):
        TTS.load("some/dir", random_weights=True)
    with pytest.raises(JaxttsError, match="dtype"):
        TTS.load(random_weights=True, dtype="float16")
    with pytest.raises(JaxttsError, match="model must be a jaxtts.CSM"):
        TTS("csm-1b/", tts.codec)
    with pytest.raises(JaxttsError, match="codec must be a jaxtts.Mimi"):
        TTS(tts.model, None)
    with pytest.raises(JaxttsError, match="model must be a path"):
        TTS.load(3)
    with pytest.raises(JaxttsError, match="attention 'pallas' needs an NVIDIA GPU, this device is cpu"):
        TTS(tts.model, tts.codec, attention="pallas")


def test_numpy_scalars_and_one_segment_are_accepted(tts):
    voice = Segment(np.int64(1), "This is me.", codes=np.arange(32 * 3).reshape(32, 3) % 2048)
    a = tts.generate(
        "Hi.",
        speaker=np.int32(1),
        context=voice,
        seed=np.uint32(5),
        temperature=np.float32(0.8),
        top_k=np.int64(40),
        max_audio_ms=np.float64(240),
    )
    b = tts.generate("Hi.", speaker=1, context=[voice], seed=5, temperature=0.8, top_k=40, max_audio_ms=240)
    np.testing.assert_array_equal(a, b)
    assert len(a) > 0


def test_temperature_zero_is_greedy(tts):
    a = tts.generate_batch([Request("Greedy.", seed=1, max_audio_ms=240)], temperature=0, return_frames=True)[0][1]
    b = tts.generate_batch([Request("Greedy.", seed=2, max_audio_ms=240)], top_k=1, return_frames=True)[0][1]
    np.testing.assert_array_equal(a, b)


def test_mixed_context_and_text_lengths_at_the_position_limit(tts):
    """A long context with a short text beside a long text with no context: the shared text padding
    used to overflow (a broadcast error); each row must still equal its request alone."""
    limit = tts.model.cfg.backbone.max_seq_len
    rng = np.random.default_rng(0)
    voice = Segment(0, "Context.", codes=rng.integers(0, 2048, (32, limit - 110)))
    long_text = " ".join(["word"] * 90)
    reqs = [Request("Short.", context=[voice], seed=3, max_audio_ms=240), Request(long_text, seed=4, max_audio_ms=240)]
    together = tts.generate_batch(reqs, return_frames=True)
    for req, (audio, frames) in zip(reqs, together):
        alone_audio, alone_frames = tts.generate_batch([req], return_frames=True)[0]
        np.testing.assert_array_equal(frames, alone_frames)
        np.testing.assert_allclose(audio, alone_audio, atol=1e-4 * max(1e-6, np.abs(alone_audio).max()))


def test_codes_past_mimi_are_zero_everywhere_they_leave_the_model():
    """With the audio heads zeroed, codebooks 1..31 are uniform over CSM's 2051 codes, so some draws
    are 2048..2050: the sampled frames hold them, the returned ones hold 0 there, and those frames
    round-trip as a Segment and through Mimi.decode."""
    from jaxtts.mimi import Mimi

    model = CSM.random(CSM_TINY, seed=2)
    model.audio_head.set_value(model.audio_head.get_value() * 0)
    tts = TTS(model, Mimi.random(seed=0), max_silence_ms=None)
    rows = text_rows(tts.tokenizer.encode_segment("Odd codes.", 0))
    for seed in range(8):
        raw = generate_frames(model, *rows, max_frames=12, temperature=1.0, top_k=None, seed=seed, chunk_frames=4)
        if (raw >= 2048).any():
            break
    assert (raw >= 2048).any()
    audio, frames = tts.generate_batch(
        [Request("Odd codes.", seed=seed, max_audio_ms=12 * 80)], temperature=1.0, top_k=None, return_frames=True
    )[0]
    np.testing.assert_array_equal(frames, np.where(raw < 2048, raw, 0)[: len(frames)])
    seg = Segment(0, "Odd codes.", codes=frames.T)  # accepted as a context
    pcm = np.asarray(tts.codec.decode(frames.T[None]))[0, 0]
    np.testing.assert_allclose(pcm, audio, atol=1e-4 * max(1e-6, np.abs(audio).max()))
    assert len(tts.generate("Next.", context=seg, seed=1, max_audio_ms=160)) > 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("\x00", "text is empty"),  # not whitespace to str.strip
        ("\u200b\ufeff", "text is empty"),  # zero-width space, BOM
        ("\x07\x1b\x7f ", "text is empty"),  # BEL, ESC, DEL
        ("Hi \udcff", r"text is not valid Unicode \('\\udcff' at character 3\)"),  # a non-UTF-8 byte, escaped
    ],
)
def test_text_with_nothing_to_say_or_not_unicode(tts, text, message):
    with pytest.raises(JaxttsError, match=message):
        tts.generate(text, max_audio_ms=160)


def test_integer_pcm_is_scaled_and_other_dtypes_are_refused():
    from jaxtts.audio import load_audio

    np.testing.assert_allclose(load_audio(np.array([-32768, 0, 16384], np.int16)), [-1, 0, 0.5])
    np.testing.assert_allclose(load_audio(np.array([0, 128, 192], np.uint8)), [-1, 0, 0.5])
    for bad in (np.ones(8, bool), np.ones(8, np.complex64), np.array(["a", "b"]), np.array([None, 1])):
        with pytest.raises(JaxttsError, match=f"samples must be floats .* got dtype {bad.dtype}"):
            load_audio(bad)


def test_context_audio_too_long_for_the_model_is_refused_before_encoding(tts, monkeypatch):
    monkeypatch.setattr(tts.codec, "encode", lambda wav: pytest.fail("encoded audio that cannot fit"))
    limit = tts.model.cfg.backbone.max_seq_len  # 256 frames of 80 ms: 20.48 s
    voice = Segment(0, "Me.", audio=np.zeros(limit * 1920 + 24000, np.float32))
    with pytest.raises(JaxttsError, match=r"context audio of 21\.5 s \(269 frames of 80 ms\) exceeds the model's 256"):
        tts.generate("Hi.", context=voice, max_audio_ms=160)


@pytest.mark.parametrize(
    "audio, message",
    [
        (np.zeros((2, 100), np.float32), r"float mono samples \[L\], got ndarray of shape \(2, 100\)"),
        (np.array([0.0, np.nan], np.float32), "NaN or infinite"),
        ("abc", "float mono samples"),
        (None, "float mono samples"),
    ],
)
def test_save_refuses_what_is_not_mono_audio(tmp_path, audio, message):
    with pytest.raises(JaxttsError, match=message):
        TTS.save(tmp_path / "x.wav", audio)
    assert list(tmp_path.iterdir()) == []


def test_save_paths(tmp_path):
    import os

    import soundfile as sf

    audio = np.zeros(1920, np.float32)
    with pytest.raises(JaxttsError, match="output path must be a str or os.PathLike, got int"):
        TTS.save(3, audio)
    with pytest.raises(JaxttsError, match="cannot write the output file"):
        TTS.save(tmp_path / ("x" * 300 + ".wav"), audio)
    # through a symlink: its target is replaced, the link stays
    (tmp_path / "link.wav").symlink_to(tmp_path / "real.wav")
    TTS.save(tmp_path / "link.wav", audio)
    assert (tmp_path / "link.wav").is_symlink() and len(sf.read(tmp_path / "real.wav")[0]) == 1920
    # a device is written straight through, never replaced by a renamed file (as root it would be)
    (tmp_path / "null.wav").symlink_to(os.devnull)
    TTS.save(tmp_path / "null.wav", audio)
    assert (tmp_path / "null.wav").is_symlink() and (tmp_path / "null.wav").is_char_device()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.wav", "null.wav", "real.wav"]


def test_unusable_cache_directories(tts, tmp_path):
    """A compile cache that cannot be created only costs speed (a warning); a voice store that
    cannot be created is an error naming it."""
    from jaxtts.tts import enable_compilation_cache
    from jaxtts.voices import VoiceStore

    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="compiled programs are not cached: cannot create .*file"):
        enable_compilation_cache(tmp_path / "file")  # what JAXTTS_COMPILE_CACHE=PATH asks for
    store = VoiceStore(tmp_path / "file" / "voices")
    with pytest.raises(JaxttsError, match="cannot create the voice directory .*file/voices \\(Not a directory\\)"):
        store.add("me", Segment(0, "Me.", codes=np.zeros((32, 2), np.int32)), codec=tts.codec)
