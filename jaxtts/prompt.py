"""Prompt rows, built exactly as the original generator builds them.

A row is 33 wide: 32 Mimi codebook columns + 1 text column, with a boolean mask of the same
shape. A text segment is `[speaker]text` tokenised with BOS/EOS in the text column; an audio
segment is its Mimi codes in the audio columns followed by one all-zero end-of-audio frame.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import numpy as np

from jaxtts.errors import JaxttsError

NUM_CODEBOOKS = 32
WIDTH = NUM_CODEBOOKS + 1

AudioLike = Union[np.ndarray, str, os.PathLike, None]


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


def validate_speaker(speaker) -> None:
    if isinstance(speaker, bool) or not isinstance(speaker, (int, np.integer)) or speaker < 0:
        raise JaxttsError(f"speaker must be a non-negative integer, got {speaker!r}")


def validate_text(text) -> None:
    if not isinstance(text, str) or not text.strip():
        raise JaxttsError("text is empty; give some words to speak")


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
