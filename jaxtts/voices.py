"""Stored voices: a speaker id and context segments (transcripts + Mimi codes), encoded once.

    store = VoiceStore()                                         # $JAXTTS_CACHE/voices
    store.add("alice", [Segment(1, "Hi, I'm Alice.", audio="alice.wav")], codec=tts.codec)
    engine.submit("Hello there.", voice="alice")                 # speaker 1, after Alice's turn
    speaker, segments = resolve_voice(store, "alice", codec=tts.codec)
    tts.generate("Hello there.", speaker=speaker, context=segments)

A voice directory is written to a temporary sibling and renamed into place, so a reader never
sees half of one:

    NAME/voice.json       {"format": "jaxtts-voice", "version": 1, "name", "speaker", "created",
                           "codec": {"fingerprint", "config"},
                           "segments": [{"speaker", "text", "codes": "segment-0.npy", "frames"}]}
    NAME/segment-K.npy    int32 Mimi codes [32, T] of segment K

The codes are used as stored (never re-encoded); a voice encoded by another codec (its
fingerprint differs) is refused rather than silently mis-decoded. `save_context` /
`load_context` store a prepared `Context` (rows + backbone KV cache) the same way.

This module imports nothing from jaxtts.tts (which calls into it), so that the layering stays a DAG.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxtts.audio import load_audio
from jaxtts.checkpoint import atomic_directory
from jaxtts.errors import ArgumentParser, JaxttsError
from jaxtts.prompt import Segment, validate_codes, validate_speaker

VOICE_FORMAT, CONTEXT_FORMAT, VERSION = "jaxtts-voice", "jaxtts-context", 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def default_root() -> Path:
    from jaxtts.hub import jaxtts_cache

    return jaxtts_cache() / "voices"


def validate_name(name) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise JaxttsError(
            f"voice name must be 1-64 letters, digits, '.', '_' or '-' (not starting with "
            f"'.', '_' or '-'), got {name!r}"
        )
    return name


# --------------------------------------------------------------------------- codec fingerprint

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def codec_fingerprint(codec) -> str:
    """A short hash of a Mimi codec's config and weights (rounded to bfloat16, so that a float32
    and a bfloat16 copy of one checkpoint agree): codes are only meaningful to the codec that
    made them."""
    hit = _FINGERPRINTS.get(codec)
    if hit is None:
        import jax
        import ml_dtypes

        h = hashlib.sha256(json.dumps(codec.config.to_dict(), sort_keys=True).encode())
        for leaf in jax.tree.leaves(codec.params):
            h.update(np.asarray(leaf).astype(ml_dtypes.bfloat16).tobytes())
        hit = _FINGERPRINTS[codec] = h.hexdigest()[:16]
    return hit


def encode_codes(codec, audio) -> np.ndarray:
    """Mimi codes [32, T] of an audio array or file, encoded as `TTS.encode_segment` does."""
    wav = load_audio(audio)
    return np.asarray(codec.encode(wav[None, None]))[0].astype(np.int32)


# --------------------------------------------------------------------------- voices


@dataclass(eq=False)
class Voice:
    """A stored voice: the speaker id its requests speak as, and its context segments (codes)."""

    name: str
    speaker: int
    segments: list[Segment]
    codec_fingerprint: str
    created: str
    path: Path

    @property
    def cache_key(self) -> tuple:
        """Identifies this version of the voice (a voice re-added under the same name differs)."""
        return (str(self.path), self.created, self.codec_fingerprint)

    @property
    def frames(self) -> int:
        return sum(s.codes.shape[1] for s in self.segments)


class VoiceStore:
    """Voices under `root` (default `$JAXTTS_CACHE/voices`), one directory each."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def add(
        self,
        name: str,
        segments: Sequence[Segment] | Segment,
        speaker: int | None = None,
        *,
        codec=None,
        overwrite: bool = False,
    ) -> Voice:
        """Store a voice: segments' audio is encoded with `codec` (needed unless every segment
        has codes). speaker defaults to the first segment's."""
        path = self.path(name)
        segments = [segments] if isinstance(segments, Segment) else list(segments)
        if not segments or not all(isinstance(s, Segment) for s in segments):
            raise JaxttsError("a voice needs at least one jaxtts.Segment (audio or codes, and its transcript)")
        if any(s.audio is None and s.codes is None for s in segments):
            raise JaxttsError("every segment of a voice needs its audio (or Mimi codes)")
        if codec is None:
            raise JaxttsError("adding a voice needs the Mimi codec that will decode it (codec=tts.codec)")
        speaker = segments[0].speaker if speaker is None else speaker
        validate_speaker(speaker)
        if path.exists() and not overwrite:
            raise JaxttsError(f"voice {name!r} already exists in {self.root}; remove it first or pass overwrite=True")
        codes = [s.codes if s.codes is not None else encode_codes(codec, s.audio) for s in segments]
        meta = {
            "format": VOICE_FORMAT,
            "version": VERSION,
            "name": name,
            "speaker": int(speaker),
            "created": datetime.datetime.now(datetime.UTC).isoformat(),
            "codec": {"fingerprint": codec_fingerprint(codec), "config": codec.config.to_dict()},
            "segments": [
                {"speaker": int(s.speaker), "text": s.text, "codes": f"segment-{i}.npy", "frames": int(c.shape[1])}
                for i, (s, c) in enumerate(zip(segments, codes))
            ],
        }
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JaxttsError(
                f"cannot create the voice directory {self.root} ({e.strerror or e}); "
                "set JAXTTS_CACHE to a writable directory, or pass another voice directory (--voices)"
            ) from None
        with atomic_directory(path, overwrite=True) as tmp:
            for i, c in enumerate(codes):
                np.save(tmp / f"segment-{i}.npy", np.asarray(c, np.int32))
            (tmp / "voice.json").write_text(json.dumps(meta, indent=2) + "\n")
        return self.load(name)

    def load(self, name: str, *, codec=None) -> Voice:
        """The stored voice; with `codec`, refused if another codec encoded it."""
        path = self.path(name)
        if not path.is_dir():
            raise JaxttsError(f"no voice named {name!r} in {self.root} (`jaxtts voice list` shows the stored ones)")
        meta = _read_json(path / "voice.json", VOICE_FORMAT, what="voice")
        try:
            segments = [Segment(int(s["speaker"]), s["text"], codes=_load_codes(path, s)) for s in meta["segments"]]
            speaker, fingerprint, created = int(meta["speaker"]), meta["codec"]["fingerprint"], meta["created"]
            validate_speaker(speaker)
        except JaxttsError as e:
            raise JaxttsError(f"{path}: corrupt voice ({e}); remove it with `jaxtts voice rm {name}`") from None
        except (KeyError, TypeError, ValueError) as e:
            raise JaxttsError(
                f"{path}: corrupt voice (bad voice.json: {type(e).__name__} {e}); "
                f"remove it with `jaxtts voice rm {name}`"
            ) from None
        if codec is not None and fingerprint != codec_fingerprint(codec):
            raise JaxttsError(
                f"voice {name!r} was encoded by another Mimi codec (fingerprint {fingerprint}, this one "
                f"{codec_fingerprint(codec)}); add it again with this codec"
            )
        return Voice(name, speaker, segments, fingerprint, created, path)

    def list(self) -> list[str]:
        """Names of the stored voices (directories being written are not listed)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and NAME_PATTERN.fullmatch(p.name) and (p / "voice.json").is_file()
        )

    def remove(self, name: str) -> None:
        path = self.path(name)
        if not path.is_dir():
            raise JaxttsError(f"no voice named {name!r} in {self.root}")
        shutil.rmtree(path)


def resolve_voice(store: VoiceStore | str | os.PathLike | None, name: str, *, codec=None) -> tuple[int, list[Segment]]:
    """(speaker, context segments) of a stored voice: what `TTS.generate(voice=NAME)` speaks with."""
    store = store if isinstance(store, VoiceStore) else VoiceStore(store)
    voice = store.load(name, codec=codec)
    return voice.speaker, list(voice.segments)


def with_voice(name: str, speaker: int | None, context, *, codec, store=None) -> tuple[int, list[Segment]]:
    """(speaker, context segments) of a request naming a stored voice: the voice's speaker unless
    `speaker` is given, and the voice's segments before `context` (None, a Segment or a list)."""
    voice = (store if isinstance(store, VoiceStore) else VoiceStore(store)).load(name, codec=codec)
    if context is None:
        context = []
    elif isinstance(context, Segment):
        context = [context]
    elif isinstance(context, (list, tuple)) and all(isinstance(s, Segment) for s in context):
        context = list(context)
    else:
        raise JaxttsError(
            f"with a voice, the context must be Segments (they follow the voice's), got {type(context).__name__}"
        )
    return (voice.speaker if speaker is None else speaker), voice.segments + context


def _load_codes(path: Path, seg: dict) -> np.ndarray:
    file = path / seg["codes"]
    if file.parent != path or not file.is_file():
        raise JaxttsError(f"missing codes file {seg['codes']!r}")
    try:
        codes = np.load(file, allow_pickle=False)
    except Exception as e:
        raise JaxttsError(f"unreadable {file.name} ({type(e).__name__})") from None
    codes = validate_codes(codes)
    if codes.shape[1] != int(seg["frames"]):
        raise JaxttsError(f"{file.name} holds {codes.shape[1]} frames, voice.json says {seg['frames']}")
    return codes


def _read_json(file: Path, fmt: str, *, what: str) -> dict:
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise JaxttsError(f"{file.parent}: not a jaxtts {what} (no {file.name})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise JaxttsError(f"{file}: corrupt {what} (not valid JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise JaxttsError(f"{file.parent}: not a jaxtts {what} ({file.name} is not of format {fmt!r})")
    if meta.get("version") != VERSION:
        raise JaxttsError(
            f"{file.parent}: {what} format version {meta.get('version')!r}; this jaxtts reads "
            f"version {VERSION} (written by another jaxtts version?)"
        )
    return meta


# --------------------------------------------------------------------------- prepared contexts


def save_context(path: str | os.PathLike, context, *, overwrite: bool = False) -> Path:
    """Write a prepared `Context` (prompt rows and its backbone KV cache) to directory `path`.
    It only means something to the model (same weights) that prepared it."""
    tokens, mask, cache = np.asarray(context.tokens), np.asarray(context.mask, bool), context.cache
    layers = [] if cache is None else [(np.asarray(k), np.asarray(v)) for k, v in zip(cache.k, cache.v)]
    meta = {
        "format": CONTEXT_FORMAT,
        "version": VERSION,
        "rows": len(tokens),
        "layers": len(layers),
        "dtype": layers[0][0].dtype.name if layers else None,
        "cache_shape": list(layers[0][0].shape) if layers else None,
    }
    with atomic_directory(path, overwrite=overwrite) as tmp:
        np.save(tmp / "tokens.npy", tokens.astype(np.int32))
        np.save(tmp / "mask.npy", mask)
        # Raw bits: .npy has no bfloat16; the dtype is in context.json.
        arrays = {
            f"{kv}{i}": a.view(f"u{a.dtype.itemsize}") for i, pair in enumerate(layers) for kv, a in zip("kv", pair)
        }
        np.savez(tmp / "cache.npz", **arrays)
        (tmp / "context.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(path)


def load_context(path: str | os.PathLike):
    """(tokens [n, 33], mask [n, 33], KVCache or None) of a saved context: `Context(*load_context(p))`."""
    import jax.numpy as jnp

    from jaxtts.llama import KVCache

    path = Path(path)
    meta = _read_json(path / "context.json", CONTEXT_FORMAT, what="context")
    try:
        tokens, mask = np.load(path / "tokens.npy", allow_pickle=False), np.load(path / "mask.npy", allow_pickle=False)
        n, layers = int(meta["rows"]), int(meta["layers"])
        if tokens.shape != (n, 33) or mask.shape != (n, 33):
            raise ValueError(f"rows of shape {tokens.shape} / {mask.shape}, expected ({n}, 33)")
        if not layers:
            return tokens.astype(np.int32), mask.astype(bool), None
        dtype, shape = jnp.dtype(meta["dtype"]), tuple(meta["cache_shape"])
        with np.load(path / "cache.npz", allow_pickle=False) as z:
            read = [[z[f"{kv}{i}"].view(dtype) for i in range(layers)] for kv in "kv"]
        if any(a.shape != shape for a in read[0] + read[1]):
            raise ValueError(f"cache arrays are not all of shape {shape}")
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise JaxttsError(f"{path}: corrupt context ({type(e).__name__}: {e})") from None
    cache = KVCache(k=[jnp.asarray(a) for a in read[0]], v=[jnp.asarray(a) for a in read[1]])
    return tokens.astype(np.int32), mask.astype(bool), cache


# --------------------------------------------------------------------------- command line


def add_voice_parser(subparsers) -> None:
    """`jaxtts voice add|list|rm`."""
    p = subparsers.add_parser("voice", help="store voices (speaker id + context audio, encoded once) to speak with")
    sub = p.add_subparsers(dest="voice_command", required=True, parser_class=ArgumentParser)
    add = sub.add_parser("add", help="encode AUDIO (its transcript TEXT) once and store it as voice NAME")
    add.add_argument("name")
    add.add_argument("audio", help="audio file of the voice speaking TEXT (a few seconds)")
    add.add_argument("text", help="the transcript of AUDIO")
    add.add_argument("--speaker", type=int, default=0, help="the speaker id requests with this voice use (default 0)")
    add.add_argument("--codec", help="converted Mimi directory or checkpoint (default: the caches)")
    add.add_argument("--random-weights", action="store_true", help="random Mimi weights (for checking the install)")
    add.add_argument("--overwrite", action="store_true", help="replace a voice of that name")
    sub.add_parser("list", help="the stored voices")
    rm = sub.add_parser("rm", help="remove a stored voice")
    rm.add_argument("name")
    for q in (add, sub.choices["list"], rm):
        q.add_argument("--voices", help="voice directory (default $JAXTTS_CACHE/voices)")


def run_voice(args) -> int:
    store = VoiceStore(args.voices)
    if args.voice_command == "list":
        for name in store.list():
            try:
                v = store.load(name)
                print(
                    f"{name}\tspeaker {v.speaker}\t{len(v.segments)} segment(s)\t{v.frames * 0.08:.2f} s\t{v.created}"
                )
            except JaxttsError as e:
                print(f"{name}\tunreadable: {e}")
        return 0
    if args.voice_command == "rm":
        store.remove(args.name)
        print(f"removed voice {args.name}", file=sys.stderr)
        return 0
    validate_name(args.name)
    validate_speaker(args.speaker)
    if args.random_weights and args.codec:
        raise JaxttsError("--random-weights builds its own codec: drop --codec, or drop --random-weights")
    segment = Segment(args.speaker, args.text, audio=load_audio(args.audio))
    voice = store.add(args.name, [segment], args.speaker, codec=_cli_codec(args), overwrite=args.overwrite)
    print(
        f"stored voice {voice.name} ({voice.frames * 0.08:.2f} s, speaker {voice.speaker}) in {voice.path}",
        file=sys.stderr,
    )
    return 0


def _cli_codec(args):
    from jaxtts.mimi import Mimi

    if args.random_weights:
        return Mimi.random()
    from jaxtts.hub import resolve

    return Mimi.load(resolve("mimi", args.codec))
