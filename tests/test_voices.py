"""Stored voices and saved contexts: a round trip gives exactly what the same segments give, a
damaged or foreign voice is one clear error line, and the `jaxtts voice` commands.

The tiny random CSM (float32) and the full-size random Mimi, as in test_engine.py.
"""

import json

import numpy as np
import pytest

from jaxtts.audio import write_audio
from jaxtts.engine import Engine
from jaxtts.errors import ArgumentParser, JaxttsError
from jaxtts.prompt import Segment
from jaxtts.tts import FRAME_SIZE, TTS, Context
from jaxtts.voices import (
    VoiceStore,
    add_voice_parser,
    codec_fingerprint,
    load_context,
    resolve_voice,
    run_voice,
    save_context,
    with_voice,
)


@pytest.fixture(scope="module")
def tts(tiny_csm, mimi):
    return TTS(tiny_csm, mimi, max_silence_ms=None)


@pytest.fixture(scope="module")
def segment():
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(3 * FRAME_SIZE + 500)).astype(np.float32)
    return Segment(1, "This is my voice.", audio=audio)


@pytest.fixture
def store(tmp_path):
    return VoiceStore(tmp_path / "voices")


def test_voice_round_trip_speaks_as_its_segments(store, tts, segment, monkeypatch):
    """add → list → load: codes as TTS encodes them; the engine with voice=NAME and TTS with the
    resolved voice both give exactly what the original segments give; the voice's context is
    prefilled once however many requests use it."""
    voice = store.add("alice", [segment], codec=tts.codec)
    assert store.list() == ["alice"] and voice.speaker == 1 and voice.frames == 4
    np.testing.assert_array_equal(
        store.load("alice", codec=tts.codec).segments[0].codes, tts.encode_segment(segment).codes
    )
    expected = tts.generate_batch(
        [dict(text="And now me.", speaker=1, context=[segment], seed=4, max_audio_ms=480)], return_frames=True
    )[0]

    prepared = []
    original = tts.prepare_context
    monkeypatch.setattr(tts, "prepare_context", lambda segs: prepared.append(1) or original(segs))
    with Engine(tts, max_batch=1, chunk_frames=2, voices=store) as engine:
        first = engine.submit("And now me.", voice="alice", seed=4, max_audio_ms=480)
        again = engine.submit("And now me.", voice="alice", seed=4, max_audio_ms=480)
        for handle in (first, again):
            np.testing.assert_array_equal(handle.frames(timeout=120), expected[1])
            np.testing.assert_allclose(handle.result(), expected[0], atol=1e-4 * np.abs(expected[0]).max())
        assert len(prepared) == 1 and engine.stats()["context_cache_bytes"] > 0
    monkeypatch.undo()

    speaker, segments = resolve_voice(store, "alice", codec=tts.codec)
    direct = tts.generate("And now me.", speaker=speaker, context=segments, seed=4, max_audio_ms=480)
    np.testing.assert_array_equal(
        direct, tts.generate("And now me.", speaker=1, context=[segment], seed=4, max_audio_ms=480)
    )
    store.remove("alice")
    assert store.list() == []


def _damage(path, how):
    meta = json.loads((path / "voice.json").read_text())
    if how == "no json":
        (path / "voice.json").unlink()
    elif how == "bad json":
        (path / "voice.json").write_text("{not json")
    elif how == "foreign":
        (path / "voice.json").write_text(json.dumps({"format": "something-else"}))
    elif how == "newer":
        (path / "voice.json").write_text(json.dumps(dict(meta, version=99)))
    elif how == "missing codes":
        (path / "segment-0.npy").unlink()
    elif how == "garbage codes":
        (path / "segment-0.npy").write_bytes(b"\x93NUMPY garbage")
    elif how == "codes out of range":
        np.save(path / "segment-0.npy", np.full((32, 4), 5000, np.int32))
    elif how == "frame count":
        np.save(path / "segment-0.npy", np.zeros((32, 3), np.int32))
    elif how == "missing field":
        del meta["speaker"]
        (path / "voice.json").write_text(json.dumps(meta))
    elif how == "other codec":
        meta["codec"]["fingerprint"] = "0123456789abcdef"
        (path / "voice.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "how, message",
    [
        ("no json", "not a jaxtts voice"),
        ("bad json", "corrupt voice"),
        ("foreign", "not a jaxtts voice"),
        ("newer", "format version 99"),
        ("missing codes", "corrupt voice .missing codes file"),
        ("garbage codes", "corrupt voice .unreadable segment-0.npy"),
        ("codes out of range", r"corrupt voice .Segment codes must be in \[0, 2047\]"),
        ("frame count", "holds 3 frames, voice.json says 4"),
        ("missing field", "corrupt voice .bad voice.json: KeyError"),
        ("other codec", "encoded by another Mimi codec"),
    ],
)
def test_damaged_or_foreign_voice_is_one_line(store, tts, how, message):
    store.add("v", [Segment(0, "Hello.", codes=np.zeros((32, 4), np.int32))], codec=tts.codec)
    _damage(store.path("v"), how)
    with pytest.raises(JaxttsError, match=message) as e:
        store.load("v", codec=tts.codec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["", "../up", "a/b", ".hidden", "-dash", "x" * 65, 3])
def test_voice_names_are_checked(store, name):
    with pytest.raises(JaxttsError, match="voice name must be"):
        store.path(name)


def test_store_errors(store, tts):
    seg = Segment(0, "Hello.", codes=np.zeros((32, 2), np.int32))
    store.add("v", [seg], codec=tts.codec)
    with pytest.raises(JaxttsError, match="already exists"):
        store.add("v", [seg], codec=tts.codec)
    assert store.add("v", [seg], 3, codec=tts.codec, overwrite=True).speaker == 3
    with pytest.raises(JaxttsError, match="no voice named 'w'"):
        store.load("w")
    with pytest.raises(JaxttsError, match="no voice named 'w'"):
        store.remove("w")
    with pytest.raises(JaxttsError, match="needs its audio"):
        store.add("x", [Segment(0, "No audio.")], codec=tts.codec)
    with pytest.raises(JaxttsError, match="needs the Mimi codec"):
        store.add("x", [seg])
    assert VoiceStore(store.root / "nowhere").list() == []
    assert len(codec_fingerprint(tts.codec)) == 16


def test_with_voice(store, tts):
    """What TTS.generate(voice=...) / jaxtts speak --voice use: the voice's speaker unless one is
    given, its turns before the request's own."""
    turn = Segment(2, "Voice turn.", codes=np.zeros((32, 2), np.int32))
    store.add("v", [turn], 5, codec=tts.codec)
    extra = Segment(0, "Extra turn.", codes=np.ones((32, 1), np.int32))
    speaker, segments = with_voice("v", None, extra, codec=tts.codec, store=store)
    assert speaker == 5 and [s.text for s in segments] == ["Voice turn.", "Extra turn."]
    assert with_voice("v", 0, None, codec=tts.codec, store=store.root)[0] == 0
    ctx = tts.prepare_context([turn])
    with pytest.raises(JaxttsError, match="with a voice, the context must be Segments"):
        with_voice("v", None, ctx, codec=tts.codec, store=store)


def test_saved_context_round_trip(tmp_path, tts, segment):
    ctx = tts.prepare_context([segment])
    save_context(tmp_path / "ctx", ctx)
    loaded = Context(*load_context(tmp_path / "ctx"))
    np.testing.assert_array_equal(loaded.tokens, ctx.tokens)
    np.testing.assert_array_equal(loaded.mask, ctx.mask)
    for a, b in zip(loaded.cache.k + loaded.cache.v, ctx.cache.k + ctx.cache.v):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kw = dict(seed=4, max_audio_ms=480)
    np.testing.assert_array_equal(
        tts.generate("And now me.", context=loaded, **kw), tts.generate("And now me.", context=ctx, **kw)
    )
    (tmp_path / "ctx" / "cache.npz").write_bytes(b"garbage")
    with pytest.raises(JaxttsError, match="corrupt context") as e:
        load_context(tmp_path / "ctx")
    assert "\n" not in str(e.value)
    with pytest.raises(JaxttsError, match="not a jaxtts context"):
        load_context(tmp_path)


def test_voice_commands(tmp_path, capsys, segment):
    parser = ArgumentParser(prog="jaxtts")
    add_voice_parser(parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser))
    root = str(tmp_path / "voices")
    wav = tmp_path / "bob.wav"
    write_audio(wav, segment.audio, 24_000)
    assert (
        run_voice(
            parser.parse_args(
                [
                    "voice",
                    "add",
                    "bob",
                    str(wav),
                    "Hello, I am Bob.",
                    "--speaker",
                    "2",
                    "--random-weights",
                    "--voices",
                    root,
                ]
            )
        )
        == 0
    )
    assert run_voice(parser.parse_args(["voice", "list", "--voices", root])) == 0
    assert capsys.readouterr().out.startswith("bob\tspeaker 2\t1 segment(s)\t0.32 s\t")
    assert run_voice(parser.parse_args(["voice", "rm", "bob", "--voices", root])) == 0
    with pytest.raises(JaxttsError, match="no voice named 'bob'"):
        run_voice(parser.parse_args(["voice", "rm", "bob", "--voices", root]))
    with pytest.raises(JaxttsError, match="voice name must be"):
        run_voice(parser.parse_args(["voice", "add", "../x", str(wav), "Hi.", "--random-weights", "--voices", root]))
    with pytest.raises(JaxttsError, match="invalid choice"):
        parser.parse_args(["voice", "rename", "x"])


def test_tts_generate_with_a_stored_voice(tmp_path, monkeypatch, tts, segment):
    """TTS.generate(voice=NAME) speaks as the voice's speaker with its turns first; Context.save/load."""
    monkeypatch.setenv("JAXTTS_CACHE", str(tmp_path))
    VoiceStore().add("carol", [segment], codec=tts.codec)
    kw = dict(seed=6, max_audio_ms=320)
    want = tts.generate("Hi there.", speaker=1, context=[segment], **kw)
    np.testing.assert_array_equal(tts.generate("Hi there.", voice="carol", **kw), want)
    with pytest.raises(JaxttsError, match="no voice named"):
        tts.generate("Hi there.", voice="nobody", **kw)
    ctx = tts.prepare_context([segment])
    ctx.save(tmp_path / "ctx")
    np.testing.assert_array_equal(
        tts.generate("Hi there.", speaker=1, context=Context.load(tmp_path / "ctx"), **kw), want
    )
