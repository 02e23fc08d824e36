"""The engine: batching, streaming, context caching, greedy equivalence, length and silence guards.

A small random CSM with the real 128 256-token text vocabulary and the full-size random Mimi.
"""

import numpy as np
import pytest

import jaxtts
from jaxtts import buckets
from jaxtts.errors import JaxttsError
from jaxtts.generation import generate_frames
from jaxtts.prompt import Segment, text_rows
from jaxtts.tts import FRAME_SIZE, TTS, mimi_codes, split_sentences, trailing_silence_frames


@pytest.fixture(scope="module")
def tts(tiny_csm, mimi):
    return TTS(tiny_csm, mimi, max_silence_ms=None)


@pytest.fixture(scope="module")
def voice():
    rng = np.random.default_rng(0)
    return Segment(
        speaker=1, text="This is my voice.", audio=(0.1 * rng.standard_normal(3 * 1920 + 500)).astype(np.float32)
    )


def test_batch_rows_equal_alone(tts):
    reqs = [
        dict(text="Hello there.", seed=1, max_audio_ms=640),
        dict(text="A much longer sentence, to give this row a longer prompt.", speaker=2, seed=2, max_audio_ms=480),
    ]
    together = tts.generate_batch(reqs, return_frames=True)
    for req, (audio, frames) in zip(reqs, together):
        alone_audio, alone_frames = tts.generate_batch([req], return_frames=True)[0]
        np.testing.assert_array_equal(frames, alone_frames)
        assert len(audio) == FRAME_SIZE * len(frames) == len(alone_audio)
        np.testing.assert_allclose(audio, alone_audio, atol=1e-4 * np.abs(alone_audio).max())
    assert len(together[0][1]) == 8 and len(together[1][1]) == 6  # max_audio_ms respected per row


def test_stream_concatenation_equals_generate(tts):
    kw = dict(seed=3, max_audio_ms=640)
    chunks = list(tts.stream("Streaming test.", **kw))
    assert len(chunks) > 1 and len(chunks[0]) == tts.first_chunk_frames * FRAME_SIZE
    # generate decodes in chunk_frames steps only (one program fewer): the same frames, and the
    # same audio up to the rounding of Mimi's streaming steps
    whole = tts.generate("Streaming test.", **kw)
    np.testing.assert_allclose(np.concatenate(chunks), whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def test_prepared_context_equals_segments(tts, voice):
    ctx = tts.prepare_context([voice])
    assert ctx.length > 4 + 1  # text rows + 4 audio frames + EOS frame
    direct = tts.generate("And now me.", context=[voice], seed=4, max_audio_ms=480)
    cached = tts.generate("And now me.", context=ctx, seed=4, max_audio_ms=480)
    again = tts.generate("And now me.", context=ctx, seed=4, max_audio_ms=480)  # the context survives reuse
    np.testing.assert_array_equal(direct, cached)
    np.testing.assert_array_equal(cached, again)
    plain = tts.generate("And now me.", seed=4, max_audio_ms=480)
    assert not np.array_equal(plain, direct)


def test_greedy_equals_generate_frames(tts):
    ids = tts.tokenizer.encode_segment("Greedy check.", 0)
    tokens, mask = text_rows(ids)
    expected = generate_frames(tts.model, tokens, mask, max_frames=7, top_k=1, seed=0)
    expected = np.asarray(mimi_codes(expected))  # TTS returns codes ≥ 2048 (CSM's vocabulary: 2051) as 0
    _, frames = tts.generate_batch(
        [dict(text="Greedy check.", seed=9, max_audio_ms=7 * 80)], top_k=1, return_frames=True
    )[0]
    np.testing.assert_array_equal(frames, expected)


def test_too_long_is_a_clear_error(tts):
    with pytest.raises(JaxttsError, match=r"exceeds the model's 256 positions"):
        tts.generate("word " * 300, max_audio_ms=800)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text="   "), "text is empty"),
        (dict(text="hi", speaker=-1), "speaker must be"),
        (dict(text="hi", speaker=1.5), "speaker must be"),
        (dict(text="hi", temperature=-1), "temperature"),
        (dict(text="hi", top_k=0), "top_k"),
    ],
)
def test_bad_arguments(tts, kwargs, message):
    text = kwargs.pop("text")
    with pytest.raises(JaxttsError, match=message):
        tts.generate(text, **kwargs)


class _SilentAfter:
    """A stand-in codec: loud PCM for the first `loud` frames of each row, then digital silence."""

    cardinality = 2048

    def __init__(self, loud):
        self.loud = loud

    def decode_stream_init(self, batch):
        return np.zeros(batch, np.int64)

    def decode_stream_step(self, state, codes, check=True):
        b, _, n = codes.shape
        pos = state[:, None] + np.arange(n)[None]
        amp = np.where(pos < self.loud, 0.5, 0.0).astype(np.float32)
        return state + n, np.repeat(amp, FRAME_SIZE, axis=1)[:, None]


def test_silence_guard_stops_runaway_silence(tts):
    guarded = TTS(tts.model, _SilentAfter(loud=5), tokenizer=tts.tokenizer, max_silence_ms=800)
    audio = guarded.generate("Hello.", seed=0, max_audio_ms=4000)
    frames = len(audio) // FRAME_SIZE
    # 5 loud frames + at most a short pause, well before the 50-frame limit.
    assert 5 <= frames <= 5 + 10 and len(audio) % FRAME_SIZE == 0
    assert trailing_silence_frames(audio) <= 5
    unguarded = TTS(tts.model, _SilentAfter(loud=5), tokenizer=tts.tokenizer, max_silence_ms=None)
    assert len(unguarded.generate("Hello.", seed=0, max_audio_ms=4000)) == 50 * FRAME_SIZE


def test_trailing_silence_frames():
    pcm = np.concatenate([np.full(3 * FRAME_SIZE, 0.3), np.zeros(4 * FRAME_SIZE), np.zeros(100)]).astype(np.float32)
    assert trailing_silence_frames(pcm) == 4
    assert trailing_silence_frames(np.zeros(2 * FRAME_SIZE, np.float32)) == 2


def test_split_sentences():
    assert split_sentences("Hi there. How are you?  Fine!\nGood") == ["Hi there.", "How are you?", "Fine!", "Good"]


def test_long_form_continues_each_sentence(tts):
    audio = tts.generate("First one. Second one.", long_form=True, seed=5, max_audio_ms=240)
    first = tts.generate("First one.", seed=5, max_audio_ms=240)
    assert len(audio) == 2 * 3 * FRAME_SIZE
    np.testing.assert_array_equal(audio[: len(first)], first)


def test_public_api_exports():
    for name in ("load", "TTS", "Segment", "CSM", "Mimi", "generate_frames", "Context"):
        assert hasattr(jaxtts, name)


def test_silence_guard_never_keeps_frames_it_has_not_seen():
    """A limit shorter than the kept pause stops at the frame that reached the limit."""
    from jaxtts.tts import SilenceGuard

    loud, quiet = np.full(FRAME_SIZE, 0.5, np.float32), np.zeros(FRAME_SIZE, np.float32)
    guard = SilenceGuard(limit=2, pause=5)
    piece = np.concatenate([loud, quiet, quiet, quiet, loud])
    assert guard.frames_to_keep(piece) == 3  # loud + the two silent frames that hit the limit


def _codes_context(frames: int, seed: int = 0) -> list[Segment]:
    codes = np.random.default_rng(seed).integers(0, 2048, (32, frames)).astype(np.int32)
    return [Segment(0, "A voice prompt.", codes=codes)]


def test_context_is_prefilled_in_chunks_as_in_one_call(tts):
    """`prepare_context` prefills 64 rows at a time: its cache equals one prefill of every row."""
    from jaxtts.generation import prefill, row_keys

    ctx = tts.prepare_context(_codes_context(150))  # ~160 rows: three chunks
    n = ctx.length
    assert n > 2 * buckets.CONTEXT_CHUNK
    length = ctx.cache.k[0].shape[1]
    assert length == buckets.cache_length(n, tts.model.cfg.backbone.max_seq_len)
    whole = prefill(
        tts.model, ctx.tokens[None], ctx.mask[None], [n], cache=tts.model.backbone_cache(1, length), key=row_keys([0])
    ).cache
    for got, want in zip(ctx.cache.k + ctx.cache.v, whole.k + whole.v):
        np.testing.assert_allclose(np.asarray(got)[:, :n], np.asarray(want)[:, :n], rtol=1e-5, atol=1e-5)


def test_context_lengths_in_one_cache_bucket_share_one_prefill_program(tts):
    """A voice prompt of a new length compiles nothing new while its cache bucket is the same."""
    from jaxtts import programs

    tts.prepare_context(_codes_context(40))
    before = programs.stats["compiled"]
    for frames in (10, 70, 120):  # 1, 2 and 3 chunks; all within the first cache bucket
        tts.prepare_context(_codes_context(frames, seed=frames))
    assert programs.stats["compiled"] == before
