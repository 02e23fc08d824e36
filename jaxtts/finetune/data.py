"""Training data: utterances → Mimi codes (encoded once, cached on disk) → CSM rows.

Two layouts are read:

* a JSONL manifest, one utterance per line:
  `{"audio": "clips/a.wav", "text": "Hello.", "speaker": 0, "id": "a", "context": ["b"]}`.
  `audio` is relative to the manifest's folder; `speaker` defaults to 0; `id` defaults to the
  line number; `context` lists ids of other lines whose text + audio come first in the prompt.
* a folder of audio files (`.wav`, `.flac`, `.ogg`) each with a same-stem `.txt` transcript;
  speakers from an optional `speakers.json` (`{"stem": id}`), else 0.

Rows are built exactly as generation builds a prompt: each context utterance as text rows then
audio rows (its frames + the all-zero end-of-audio frame), then the utterance's own text rows
and audio rows. Only the utterance's own audio rows are training targets (see loss.py).

Codes are cached as `<cache>/<sha256>.npy`, the hash covering the audio file's bytes and the codec's
weights, so editing a clip or switching codecs re-encodes, and moving files does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxtts.buckets import train_rows
from jaxtts.errors import JaxttsError
from jaxtts.prompt import NUM_CODEBOOKS, WIDTH, audio_rows, concat_rows, text_rows

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
CACHE_DIRNAME = ".jaxtts-codes"


@dataclass(frozen=True)
class Utterance:
    """One manifest entry, checked but not yet encoded."""

    where: str  # "manifest.jsonl line 3" or the audio path: named in every error about it
    id: str
    audio: Path
    text: str
    speaker: int
    context: tuple[str, ...] = ()


@dataclass
class Example:
    """One training sequence: rows [T, 33] and which of them are scored."""

    name: str
    tokens: np.ndarray  # int32 [T, 33]
    mask: np.ndarray  # bool [T, 33]
    target: np.ndarray  # bool [T]: the utterance's own audio rows (frames and end-of-audio frame)

    @property
    def frames(self) -> int:
        return int(self.target.sum())

    def __len__(self) -> int:
        return len(self.tokens)


# --- reading the listing -----------------------------------------------------------------------
def read_listing(path: str | os.PathLike) -> list[Utterance]:
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return _read_manifest(path)
    raise JaxttsError(f"{path}: no such manifest file or data folder")


def _read_manifest(path: Path) -> list[Utterance]:
    out, ids = [], set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise JaxttsError(f"{path}: not a UTF-8 text file (expected JSON lines)") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise JaxttsError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(entry, dict):
            raise JaxttsError(f'{where}: expected a JSON object with "audio" and "text"')
        unknown = set(entry) - {"audio", "text", "speaker", "context", "id"}
        if unknown:
            raise JaxttsError(f"{where}: unknown keys {sorted(unknown)} (allowed: audio, text, speaker, context, id)")
        audio, text = entry.get("audio"), entry.get("text")
        if not isinstance(audio, str) or not audio:
            raise JaxttsError(f'{where}: "audio" must be a path to an audio file')
        uid = str(entry.get("id", n))
        if uid in ids:
            raise JaxttsError(f"{where}: id {uid!r} is used by an earlier line")
        ids.add(uid)
        context = entry.get("context", [])
        if not isinstance(context, list):
            raise JaxttsError(f'{where}: "context" must be a list of ids of other lines')
        out.append(
            _utterance(where, uid, path.parent / audio, text, entry.get("speaker", 0), tuple(str(c) for c in context))
        )
    if not out:
        raise JaxttsError(f"{path}: the manifest has no entries")
    for u in out:
        for c in u.context:
            if c not in ids:
                raise JaxttsError(f"{u.where}: context id {c!r} is not the id of any line")
            if c == u.id:
                raise JaxttsError(f"{u.where}: an utterance cannot be its own context")
    return out


def _read_folder(folder: Path) -> list[Utterance]:
    speakers = {}
    sidecar = folder / "speakers.json"
    if sidecar.exists():
        try:
            speakers = json.loads(sidecar.read_text(encoding="utf-8"))
        except ValueError as e:
            raise JaxttsError(f"{sidecar}: not valid JSON ({e})") from None
        if not isinstance(speakers, dict):
            raise JaxttsError(f"{sidecar}: expected an object mapping file stems to speaker ids")
    audio_files = sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    if not audio_files:
        raise JaxttsError(f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) with .txt transcripts")
    out = []
    for audio in audio_files:
        txt = audio.with_suffix(".txt")
        if not txt.is_file():
            raise JaxttsError(f"{audio}: no transcript {txt.name} beside it")
        out.append(
            _utterance(
                str(audio), audio.stem, audio, txt.read_text(encoding="utf-8").strip(), speakers.get(audio.stem, 0)
            )
        )
    return out


def _utterance(where, uid, audio, text, speaker, context=()) -> Utterance:
    if not isinstance(text, str) or not text.strip():
        raise JaxttsError(f"{where}: the text is empty")
    if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0:
        raise JaxttsError(f"{where}: speaker must be a non-negative integer, got {speaker!r}")
    return Utterance(where=where, id=uid, audio=Path(audio), text=text.strip(), speaker=speaker, context=context)


# --- encoding with a disk cache ------------------------------------------------------------------
_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def codec_fingerprint(codec) -> str:
    """A hash of the codec's config and weights (computed once per codec object)."""
    if codec not in _fingerprints:
        import jax

        h = hashlib.sha256(json.dumps(codec.config.to_dict(), sort_keys=True).encode())
        for leaf in jax.tree.leaves(codec.params):
            h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
        _fingerprints[codec] = h.hexdigest()
    return _fingerprints[codec]


def _file_hash(path: Path, codec_hash: str) -> str:
    h = hashlib.sha256(codec_hash.encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_audio(codec, wav: np.ndarray) -> np.ndarray:
    """Mimi codes [32, ceil(L/1920)] of 24 kHz mono audio (`Mimi.encode` buckets the length)."""
    return np.asarray(codec.encode(np.asarray(wav, np.float32)[None, None]))[0].astype(np.int32)


def cached_codes(utt: Utterance, codec, cache_dir: Path) -> np.ndarray:
    from jaxtts.audio import read_audio

    if not utt.audio.is_file():
        raise JaxttsError(f"{utt.where}: no such audio file {utt.audio}")
    key = _file_hash(utt.audio, codec_fingerprint(codec))
    path = cache_dir / f"{key}.npy"
    if path.is_file():
        try:
            codes = np.load(path)
            if codes.ndim == 2 and codes.shape[0] == NUM_CODEBOOKS and codes.shape[1] > 0:
                return codes.astype(np.int32)
        except (OSError, ValueError):
            pass  # a damaged cache entry: encode again below
    try:
        wav = read_audio(utt.audio)
    except JaxttsError as e:
        raise JaxttsError(f"{utt.where}: {e}") from None
    codes = encode_audio(codec, wav)
    tmp = cache_dir / f".{key}.{os.getpid()}.npy"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(tmp, codes)
        os.replace(tmp, path)  # never a half-written cache entry
    except OSError as e:
        raise JaxttsError(
            f"cannot write the code cache in {cache_dir} ({e.strerror}); choose another with --cache-dir"
        ) from None
    return codes


# --- rows ---------------------------------------------------------------------------------------------
def build_example(
    utt: Utterance, codes: dict[str, np.ndarray], by_id: dict[str, Utterance], tokenizer, max_positions: int
) -> Example:
    parts, target = [], []
    for uid in (*utt.context, utt.id):
        u = by_id[uid]
        text = text_rows(tokenizer.encode_segment(u.text, u.speaker))
        audio = audio_rows(codes[uid])
        parts += [text, audio]
        target += [np.zeros(len(text[0]), bool), np.full(len(audio[0]), uid == utt.id)]
    tokens, mask = concat_rows(parts)
    if len(tokens) > max_positions:
        raise JaxttsError(
            f"{utt.where}: {len(tokens)} rows (text, audio and context) exceed the model's "
            f"{max_positions} positions; use a shorter clip or less context"
        )
    return Example(name=utt.id, tokens=tokens, mask=mask, target=np.concatenate(target))


def load_examples(
    data: str | os.PathLike,
    codec,
    *,
    tokenizer=None,
    max_positions: int = 2048,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[Example]:
    """Read a manifest or folder, encode (or fetch cached) codes, and build one Example per utterance."""
    from tqdm.auto import tqdm

    from jaxtts.tokenizer import default_tokenizer

    tokenizer = tokenizer or default_tokenizer()
    data = Path(data)
    utts = read_listing(data)
    if cache_dir is None:
        cache_dir = (data if data.is_dir() else data.parent) / CACHE_DIRNAME
    cache_dir = Path(cache_dir)
    codes = {
        u.id: cached_codes(u, codec, cache_dir)
        for u in tqdm(utts, desc="encoding audio", unit="clip", disable=not progress, leave=False)
    }
    by_id = {u.id: u for u in utts}
    return [build_example(u, codes, by_id, tokenizer, max_positions) for u in utts]


def collate(examples: list[Example], length: int) -> dict[str, np.ndarray]:
    """Right-pad examples to `length` rows. Padding rows are masked out and never scored."""
    b = len(examples)
    tokens = np.zeros((b, length, WIDTH), np.int32)
    mask = np.zeros((b, length, WIDTH), bool)
    target = np.zeros((b, length), bool)
    for i, ex in enumerate(examples):
        n = len(ex)
        tokens[i, :n], mask[i, :n], target[i, :n] = ex.tokens, ex.mask, ex.target
    return {"tokens": tokens, "mask": mask, "target": target}


def dataset_fingerprint(examples: list[Example]) -> str:
    """Hash of every example's rows: a resumed run must see the same data."""
    h = hashlib.sha256()
    for ex in examples:
        for a in (ex.tokens, ex.mask, ex.target):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class Stream:
    """An endless, seeded stream of examples: each epoch is a fresh permutation.

    Batch k holds stream positions [k·B, (k+1)·B), so the data position is one integer (examples
    consumed) and a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, limit: int):
        if not examples:
            raise JaxttsError("no training examples (all were held out for evaluation?)")
        self.examples, self.batch_size, self.seed, self.limit = examples, batch_size, seed, limit
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))}
        return self._perms[epoch]

    def batch(self, position: int) -> tuple[dict[str, np.ndarray], int]:
        """The batch starting at stream position `position`, and the position after it."""
        n = len(self.examples)
        picked = [self.examples[self._perm(p // n)[p % n]] for p in range(position, position + self.batch_size)]
        length = train_rows(max(len(e) for e in picked), self.limit)
        return collate(picked, length), position + self.batch_size


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(fraction·N) examples (at least one when fraction > 0, never all)."""
    if not 0 <= fraction < 1:
        raise JaxttsError(f"eval fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    n_eval = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng([seed, 1 << 20]).permutation(n)
    held = set(order[:n_eval].tolist())
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])
