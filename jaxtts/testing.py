"""Small random models and prompts for tests, benchmarks and notebooks (no weights needed)."""

from __future__ import annotations

import numpy as np

from jaxtts.csm import CSM, _flat
from jaxtts.generation import DecodeState, prefill, row_keys
from jaxtts.options import DecodeOptions


def flat(tree) -> dict:
    """A nested dict of parameters (`param_dict`) as {"a.b.c": leaf}, the names checkpoints use."""
    return dict(_flat(tree))


def random_text_prompt(batch: int, prompt_tokens: int, *, text_vocab: int = 128_000, seed: int = 0):
    """tokens int32 [batch, T, 33] / mask bool [batch, T, 33] of random text rows."""
    rng = np.random.default_rng(seed)
    tok = np.zeros((batch, prompt_tokens, 33), np.int32)
    tok[..., 32] = rng.integers(0, text_vocab, (batch, prompt_tokens))
    msk = np.zeros((batch, prompt_tokens, 33), bool)
    msk[..., 32] = True
    return tok, msk


def prompt_state(
    model: CSM, batch: int, prompt_tokens: int, cache_len: int, opts: DecodeOptions | None = None, seed: int = 0
) -> DecodeState:
    """The decode state after prefilling `batch` random text prompts of `prompt_tokens` rows
    (row b seeded with seed + b), ready for `decode_chunk`."""
    tok, msk = random_text_prompt(batch, prompt_tokens, text_vocab=min(128_000, model.cfg.text_vocab_size), seed=seed)
    return prefill(
        model,
        tok,
        msk,
        [prompt_tokens] * batch,
        cache=model.backbone_cache(batch, cache_len),
        key=row_keys(range(seed, seed + batch)),
        opts=opts,
    )


def tiny_tts(seed: int = 1, *, max_silence_ms: float | None = None, **kwargs):
    """A TTS over the tiny random CSM (float32, seed `seed`: the tests' `tiny_csm`) and the
    full-size random Mimi (seed 0): a whole pipeline in seconds on a CPU, saying noise. Importable
    by name ("jaxtts.testing:tiny_tts"), e.g. for Ray Serve replicas in tests."""
    from jaxtts.config import preset
    from jaxtts.mimi import Mimi
    from jaxtts.tts import TTS

    return TTS(CSM.random(preset("tiny"), seed=seed), Mimi.random(seed=0), max_silence_ms=max_silence_ms, **kwargs)
