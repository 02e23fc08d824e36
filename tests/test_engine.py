"""The serving engine: continuous batching gives each request exactly what `TTS.generate` gives
alone; cancellation, deadlines, the queue bound and failures stay with their request; pools grow
and shrink without changing rows; nothing compiles after warmup.

The tiny random CSM (float32, the real text vocabulary) and the full-size random Mimi. The main
engine decodes 2 frames per call, the 1-slot engine 1 then 2, the reference TTS 1 then 4: frames
do not depend on chunking. Tests that count compilations come first (later ones compile on
purpose: a context from another model).
"""

import asyncio
import json
import threading
import time

import jax
import numpy as np
import pytest

from jaxtts import programs
from jaxtts.engine import Busy, Engine
from jaxtts.errors import JaxttsError
from jaxtts.llama import KVCache
from jaxtts.prompt import Segment
from jaxtts.tts import FRAME_SIZE, TTS, Context


@pytest.fixture(scope="module")
def tts(tiny_csm, mimi):
    return TTS(tiny_csm, mimi, max_silence_ms=None, chunk_frames=4, first_chunk_frames=1)


def warm_engine(tts, **kwargs):
    """The main test engine's configuration (plus kwargs), warmed up; yields it, then closes it."""
    eng = Engine(
        tts,
        max_batch=4,
        pool_sizes=(1, 4),
        chunk_frames=2,
        first_chunk_frames=2,
        max_prefill=2,
        queue_limit=16,
        shrink_after=1,
        **kwargs,
    )
    eng.warmup_report = eng.warmup(text_tokens=32, context_rows=32, encode=False)
    eng.compiled_at_warmup = eng.compilations
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def engine(tts):
    yield from warm_engine(tts)


@pytest.fixture(scope="module")
def ahead(tts):
    """The main engine's configuration, keeping one chunk ahead on the device (`run_ahead`)."""
    yield from warm_engine(tts, run_ahead=True)


@pytest.fixture(scope="module")
def one_slot(tts):
    """A 1-slot engine (its programs are the main engine's 1-row ones, plus a 1-frame first chunk)."""
    eng = Engine(tts, max_batch=1, chunk_frames=2, first_chunk_frames=1, queue_limit=1)
    eng.warmup(text_tokens=16, context_rows=16, encode=False)  # timings below assume nothing compiles
    yield eng
    eng.close()


VOICE = Segment(1, "This is my voice.", codes=np.random.default_rng(0).integers(0, 2048, (32, 6)))
_REFERENCES = {}


def reference(tts, text, **kw):
    """(audio, frames) of `TTS.generate` alone (engine keyword names), computed once per request."""
    key = (text, repr(sorted(kw.items())))
    if key not in _REFERENCES:
        sampling = {k: kw.pop(k) for k in ("temperature", "top_k", "top_p", "min_p") if k in kw}
        _REFERENCES[key] = tts.generate_batch([dict(text=text, **kw)], return_frames=True, **sampling)[0]
    return _REFERENCES[key]


def assert_same(audio, frames, ref):
    ref_audio, ref_frames = ref
    np.testing.assert_array_equal(frames, ref_frames)
    assert len(audio) == len(ref_audio) == FRAME_SIZE * len(ref_frames)
    if len(ref_audio):
        np.testing.assert_allclose(audio, ref_audio, atol=1e-4 * np.abs(ref_audio).max())


def assert_handle_same(handle, tts, **request):
    assert handle.status == "done", handle.error
    assert_same(handle.result(), handle.frames(), reference(tts, **request))


REQUESTS = [
    dict(text="Hello there.", seed=1, max_audio_ms=640),
    dict(text="A much longer sentence, to give this row a longer prompt.", speaker=2, seed=2, max_audio_ms=480),
    dict(text="And now me.", seed=3, max_audio_ms=400, context=[VOICE]),
    dict(text="Short.", seed=4, max_audio_ms=240),
    dict(text="Another one arriving late.", speaker=3, seed=5, max_audio_ms=560),
    dict(text="Sampled more carefully.", seed=6, max_audio_ms=320, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05),
]


@pytest.mark.parametrize("which", ["engine", "ahead"])
def test_overlapping_submissions_equal_generate_alone(which, request, tts):
    """Six requests from six threads at staggered times (joining the running batch at chunk
    boundaries, growing the pool) each stream exactly their audio alone; nothing compiles.
    Also with the engine decoding one chunk ahead of the host (`run_ahead`)."""
    engine = request.getfixturevalue(which)
    results = [None] * len(REQUESTS)

    def client(i):
        time.sleep(0.1 * i)
        handle = engine.submit(**REQUESTS[i])
        results[i] = (np.concatenate(list(handle)), handle)  # streamed as decoded

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if which == "engine":  # the first engine compiles; `ahead` shares its programs
        assert engine.warmup_report["compilations"] > 0
    assert engine.compilations == engine.compiled_at_warmup  # warmup compiled everything this needed
    for req, (streamed, handle) in zip(REQUESTS, results):
        np.testing.assert_array_equal(streamed, handle.result())
        assert_handle_same(handle, tts, **req)


@pytest.mark.parametrize("which", ["engine", "ahead"])
def test_pool_grows_and_shrinks_keeping_rows_exact(which, request, tts):
    """A row moves 1 → 4 slots when company arrives and back to 1 when it leaves, unchanged
    (with `run_ahead`, while a chunk of the old pool is still on its way)."""
    engine = request.getfixturevalue(which)
    moves = engine.resize_count
    first = dict(text="I started alone and kept on talking.", seed=21, max_audio_ms=2400)
    company = [dict(text=f"Company number {i}.", seed=30 + i, max_audio_ms=240) for i in range(3)]
    handle = engine.submit(**first)
    chunks = iter(handle)
    head = next(chunks)  # running alone
    others = [engine.submit(**c) for c in company]
    streamed = np.concatenate([head, *chunks])
    np.testing.assert_array_equal(streamed, handle.result())
    new = engine.resize_count - moves
    latest = list(engine.resizes)[-new:] if new else []
    assert (1, 4, 1) in latest and (4, 1, 1) in latest  # both with `first` live
    assert_handle_same(handle, tts, **first)
    for h, c in zip(others, company):
        h.wait(60)
        assert_handle_same(h, tts, **c)
    assert engine.compilations == engine.compiled_at_warmup


def test_long_form_through_the_engine(engine, tts):
    """Sentence by sentence through one handle, each continuing the last: as TTS long form."""
    text = "First one. Second one! And a third?"
    handle = engine.submit(text, long_form=True, seed=5, max_audio_ms=240)
    streamed = np.concatenate(list(handle))
    expected = tts.generate(text, long_form=True, seed=5, max_audio_ms=240)
    assert handle.status == "done" and len(streamed) == len(expected) == 3 * 3 * FRAME_SIZE
    np.testing.assert_allclose(streamed, expected, atol=1e-4 * np.abs(expected).max())
    assert handle.frames().shape == (9, 32)
    assert engine.compilations == engine.compiled_at_warmup


def test_async_submit_and_iterate(engine, tts):
    async def speak():
        handle = await engine.asubmit("Hello there.", seed=1, max_audio_ms=640)
        return [chunk async for chunk in handle], handle

    chunks, handle = asyncio.run(speak())
    np.testing.assert_array_equal(np.concatenate(chunks), handle.result())
    assert_handle_same(handle, tts, **REQUESTS[0])


def test_cancel_frees_the_slot_at_once(one_slot, tts):
    """With one slot, a queued request starts at the next chunk boundary after the running one
    is cancelled, not after its remaining frames; a cancelled queued request never starts."""
    talker = one_slot.submit("This one would talk for a very long time.", seed=7, max_audio_ms=12_000)
    next(iter(talker))  # running: 150 frames to go
    waiting = dict(text="Next please.", seed=8, max_audio_ms=320)
    queued = one_slot.submit(**waiting)
    assert queued.status == "queued"
    steps = one_slot.frame_steps
    assert talker.cancel()
    queued.wait(120)
    # The chunk in flight (≤ 2 frames), perhaps one more, then the new row's 4 frames in chunks of 1, 2, 2.
    assert one_slot.frame_steps - steps <= 2 + 2 + 5
    assert talker.status == "cancelled" and not talker.cancel()
    with pytest.raises(JaxttsError, match="cancelled"):
        talker.result()
    assert_handle_same(queued, tts, **waiting)

    blocker = one_slot.submit("Holding the slot.", seed=9, max_audio_ms=12_000)
    next(iter(blocker))
    never = one_slot.submit("Never to be heard.", seed=10, max_audio_ms=800)
    assert never.cancel() and never.status == "cancelled" and never.first_audio_at is None
    blocker.cancel()
    blocker.wait(60)


def test_queue_bound_gives_busy(one_slot):
    running = one_slot.submit("Busy talking here.", seed=1, max_audio_ms=12_000)
    next(iter(running))
    waiting = one_slot.submit("Waiting my turn.", seed=2, max_audio_ms=800)
    with pytest.raises(Busy, match=r"busy \(1 requests queued\); retry in about") as e:
        one_slot.submit("No room for me.", seed=3, max_audio_ms=800)
    assert isinstance(e.value, JaxttsError) and e.value.retry_after_s > 0
    waiting.cancel()
    running.cancel()
    running.wait(60)
    assert one_slot.submit("Room again.", seed=4, max_audio_ms=160).result(timeout=60).size == 2 * FRAME_SIZE


def test_deadline(one_slot):
    slow = one_slot.submit("Talking well past my deadline.", seed=1, max_audio_ms=12_000, deadline_s=1.0)
    next(iter(slow))  # running
    late = one_slot.submit("Never started in time.", seed=2, deadline_s=0.3, max_audio_ms=800)  # queued behind `slow`
    with pytest.raises(JaxttsError, match=r"deadline of 1 s passed"):
        list(slow)
    assert slow.status == "expired" and 0 < slow.audio_seconds < 12
    late.wait(60)
    assert late.status == "expired" and late.first_audio_at is None
    with pytest.raises(JaxttsError, match="deadline of 0.3 s"):
        late.result()


def test_silence_guard_keeps_a_pause_in_any_chunking(tts, monkeypatch):
    """A row that runs on in silence stops after max_silence_ms of it, keeping 5 frames of pause
    however the frames were chunked (the guard holds silence back rather than sending what it
    may have to take back). The engine's audio is made silent after 5 frames of each row's
    own stream; the frames are the model's, as without the guard."""
    import jaxtts.engine as engine_module

    real = engine_module._decode_audio

    def silent_after_5(params, mimi, frames, *, cfg, cardinality):
        first = np.asarray(mimi["transformer"]["offset"]) // 2  # Mimi runs 2 steps per frame
        mimi, frames, pcm = real(params, mimi, frames, cfg=cfg, cardinality=cardinality)
        index = first[:, None] + np.arange(frames.shape[0])[None]
        return mimi, frames, np.repeat(np.where(index < 5, 0.5, 0.0).astype(np.float32), FRAME_SIZE, axis=1)

    monkeypatch.setattr(engine_module, "_decode_audio", silent_after_5)
    guarded = TTS(tts.model, tts.codec, tokenizer=tts.tokenizer, max_silence_ms=800)  # 10 frames
    # The engine then calls its jitted functions (the stand-in above), not stored programs.
    with programs.bypassed(), Engine(guarded, max_batch=1, chunk_frames=2, first_chunk_frames=1) as eng:
        handle = eng.submit("Hello.", seed=0, max_audio_ms=4000)
        audio = handle.result(timeout=120)
        steps = eng.frame_steps
    assert handle.status == "done"
    np.testing.assert_array_equal(audio, np.repeat([0.5] * 5 + [0.0] * 5, FRAME_SIZE).astype(np.float32))
    np.testing.assert_array_equal(handle.frames(), reference(tts, "Hello.", seed=0, max_audio_ms=800)[1])
    assert steps <= 15 + 2  # stopped on the 10th silent frame (in a chunk of 2), not after 50 frames


def test_silence_hold_equals_the_guard_on_the_whole_utterance():
    """Whatever the chunking, a row keeps what SilenceGuard keeps of the whole utterance at once."""
    from jaxtts.engine import _SilenceHold
    from jaxtts.tts import SilenceGuard

    rng = np.random.default_rng(0)
    for trial in range(200):
        loud = rng.random(int(rng.integers(1, 40))) < rng.choice([0.2, 0.5, 0.8])
        pcm = np.repeat(np.where(loud, 0.5, 0.0), FRAME_SIZE).astype(np.float32)
        frames = np.arange(len(loud))[:, None] * np.ones((1, 32), np.int64)
        limit = int(rng.integers(1, 12))
        keep = SilenceGuard(limit).frames_to_keep(pcm)
        one_by_one = SilenceGuard(limit)
        stop = next(
            (
                f
                for f in range(len(loud))
                if one_by_one.frames_to_keep(pcm[f * FRAME_SIZE : (f + 1) * FRAME_SIZE]) is not None
            ),
            None,
        )
        # (With limit < pause, SilenceGuard would keep frames after the one that stops the row.)
        expected = len(loud) if keep is None else min(keep, stop + 1)
        hold, sent, start = _SilenceHold(limit), [], 0
        while start < len(loud):
            n = int(rng.integers(1, 9))
            end = min(start + n, len(loud))
            p, f, stop = hold.take(pcm[start * FRAME_SIZE : end * FRAME_SIZE], frames[start:end], last=end == len(loud))
            assert len(p) == FRAME_SIZE * len(f)
            sent.append(f)
            start = end
            if stop:
                break
        np.testing.assert_array_equal(np.concatenate(sent), frames[:expected], err_msg=f"trial {trial}")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text="  "), "text is empty"),
        (dict(text="hi", speaker=-1), "speaker must be"),
        (dict(text="hi", seed=-5), "seed must be"),
        (dict(text="hi", temperature=-1), "temperature"),
        (dict(text="hi", deadline_s=0), "deadline_s must be"),
        (dict(text="hi", context="nope"), "context must be"),
        (dict(text="hi", voice=3), "voice must be"),
        (dict(text="word " * 300, max_audio_ms=800), r"more than the model's 256; shorten the text"),
        (dict(text="hi", max_audio_ms=30_000), r"\+ 375 frames of 80 ms"),
        (dict(text="Fine. " + "word " * 300, long_form=True, max_audio_ms=800), r"sentence 2 of the text needs"),
    ],
)
def test_bad_arguments_are_refused_at_submit(engine, kwargs, message):
    with pytest.raises(JaxttsError, match=message) as e:
        engine.submit(**kwargs)
    assert "\n" not in str(e.value)


def test_a_failing_request_fails_alone(engine, tts):
    """Requests that fail on the engine thread (a context of NaNs; one from another model) fail
    alone: requests in the same prefill group and the same batch finish exactly."""
    ctx = tts.prepare_context([VOICE])
    poisoned = Context(ctx.tokens, ctx.mask, jax.tree.map(lambda a: a * np.nan, ctx.cache))
    wrong = jax.numpy.zeros((1, 16, 2, 8), jax.numpy.float32)  # another model's head size
    alien = Context(ctx.tokens, ctx.mask, KVCache(k=[wrong] * 3, v=[wrong] * 3))
    fine = [dict(text="Fine one.", seed=11, max_audio_ms=320), dict(text="Fine two.", seed=14, max_audio_ms=240)]
    handles = [
        engine.submit(**fine[0]),
        engine.submit("Poisoned.", context=poisoned, seed=12, max_audio_ms=320),
        engine.submit("From elsewhere.", context=alien, seed=13, max_audio_ms=320),
        engine.submit(**fine[1]),
    ]
    for h in handles:
        h.wait(120)
    assert handles[1].status == "failed" and "non-finite" in str(handles[1].error)
    assert handles[2].status == "failed" and isinstance(handles[2].error, JaxttsError)
    with pytest.raises(JaxttsError):
        list(handles[2])
    assert_handle_same(handles[0], tts, **fine[0])
    assert_handle_same(handles[3], tts, **fine[1])


def test_serving_benchmark_smoke(engine, tmp_path):
    pytest.importorskip("uvicorn")
    from benchmarks.serving import HttpServer, format_table, measure

    server = HttpServer(engine)
    try:
        rows = measure(engine, clients=[1, 3], audio_s=0.32, ramp_s=0.2, seed=0, url=server.url)
    finally:
        server.close()
    assert [(r["clients"], r["via"]) for r in rows] == [(1, "engine"), (1, "HTTP"), (3, "engine"), (3, "HTTP")]
    for r in rows:
        assert r["completed"] == r["clients"] and r["compilations"] == 0, r["errors"]
        assert 0 < r["ttfa_p50_s"] <= r["ttfa_p95_s"] and r["slowest_rtf"] > 0 and r["aggregate_x_realtime"] > 0
    # The same requests through HTTP deliver the same amount of audio (pcm: 2 bytes per sample).
    assert rows[0]["audio_s_total"] == pytest.approx(rows[1]["audio_s_total"], abs=1e-6)
    assert rows[2]["audio_s_total"] == pytest.approx(rows[3]["audio_s_total"], abs=1e-6)
    table = format_table(rows)
    assert "TTFA p50" in table and len(table.splitlines()) == 2 + len(rows)
    out = tmp_path / "serving.json"
    out.write_text(json.dumps({"rows": rows}))
    assert json.loads(out.read_text())["rows"][0]["clients"] == 1
