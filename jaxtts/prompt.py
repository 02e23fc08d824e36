"""Prompt rows, built exactly as the original generator builds them.

A row is 33 wide: 32 Mimi codebook columns + 1 text column, with a boolean mask of the same
shape. A text segment is `[speaker]text` tokenised with BOS/EOS in the text column; an audio
segment is its Mimi codes in the audio columns followed by one all-zero end-of-audio frame.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass

import numpy as np

from jaxtts.errors import JaxttsError

NUM_CODEBOOKS = 32
WIDTH = NUM_CODEBOOKS + 1

AudioLike = np.ndarray | str | os.PathLike | None


@dataclass
class Segment:
    """One turn of a conversation: who spoke, what they said, and (for context) how it sounded.

    `audio` is a float array of mono PCM at 24 kHz, or a path to an audio file (any rate and
    channel count soundfile reads; resampled and mixed down on load). `codes` may be given instead
    of audio: Mimi codes [32, T] (for example the frames of an earlier generation).
    """

    speaker: int
    text: str
    audio: AudioLike = None
    codes: np.ndarray | None = None

    def __post_init__(self):
        validate_speaker(self.speaker)
        validate_text(self.text)
        if self.codes is not None:
            if self.audio is not None:
                raise JaxttsError("Segment: give audio or codes, not both")
            self.codes = validate_codes(self.codes)
        elif self.audio is not None and not isinstance(self.audio, (str, os.PathLike, np.ndarray, list, tuple)):
            raise JaxttsError(f"Segment audio must be a path or an array of samples, got {type(self.audio).__name__}")


MIMI_CARDINALITY = 2048  # codes per Mimi codebook; CSM samples from 2051 (see jaxtts.tts.mimi_codes)


def validate_codes(codes) -> np.ndarray:
    """Mimi codes [32, T] of integers in [0, 2048) → int32; anything else is one clear error."""
    arr = np.asarray(codes)
    if arr.ndim != 2 or arr.shape[0] != NUM_CODEBOOKS:
        raise JaxttsError(f"Segment codes must be [{NUM_CODEBOOKS}, T] (codebooks first), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise JaxttsError(f"Segment codes must be integers, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= MIMI_CARDINALITY):
        raise JaxttsError(
            f"Segment codes must be in [0, {MIMI_CARDINALITY - 1}], got values in [{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int32)


MAX_SPEAKER = 2**31 - 1


def validate_speaker(speaker) -> None:
    if isinstance(speaker, bool) or not isinstance(speaker, (int, np.integer)) or not 0 <= speaker <= MAX_SPEAKER:
        raise JaxttsError(f"speaker must be an integer in [0, {MAX_SPEAKER}], got {speaker!r}")


def validate_text(text) -> None:
    if not isinstance(text, str):
        raise JaxttsError(f"text must be a string, got {type(text).__name__}")
    # Only spaces, control and format characters (NUL, zero-width space, BOM) is nothing to say.
    if all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text):
        raise JaxttsError("text is empty; give some words to speak")
    # Lone surrogates: bytes that were not UTF-8 (a shell argument or stdin in another encoding).
    bad = next((i for i, c in enumerate(text) if unicodedata.category(c) == "Cs"), None)
    if bad is not None:
        raise JaxttsError(f"text is not valid Unicode ({text[bad]!r} at character {bad}); give UTF-8 text")


def text_rows(token_ids) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(token_ids, np.int32)
    tokens = np.zeros((len(ids), WIDTH), np.int32)
    mask = np.zeros((len(ids), WIDTH), bool)
    tokens[:, -1] = ids
    mask[:, -1] = True
    return tokens, mask


def audio_rows(codes) -> tuple[np.ndarray, np.ndarray]:
    """Codes [32, T] → rows [T+1, 33]: the frames, then the all-zero end-of-audio frame."""
    codes = np.asarray(codes, np.int32)
    if codes.ndim != 2 or codes.shape[0] != NUM_CODEBOOKS:
        raise JaxttsError(f"audio codes must be [{NUM_CODEBOOKS}, T], got {codes.shape}")
    t = codes.shape[1]
    tokens = np.zeros((t + 1, WIDTH), np.int32)
    mask = np.zeros((t + 1, WIDTH), bool)
    tokens[:t, :-1] = codes.T
    mask[:, :-1] = True
    return tokens, mask


def concat_rows(parts) -> tuple[np.ndarray, np.ndarray]:
    parts = list(parts)
    if not parts:
        return np.zeros((0, WIDTH), np.int32), np.zeros((0, WIDTH), bool)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
