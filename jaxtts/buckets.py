"""The one bucketing policy: every variable length that reaches a compiled program is rounded up
to one of a few sizes, so that new lengths reuse compiled programs instead of compiling again.

    prompt_rows      prompt rows of a prefill               powers of two ≥ 16, capped at the limit
    cache_length     backbone KV-cache slots                powers of two ≥ 256, capped at the limit
    CONTEXT_CHUNK    rows of each prefill of a context      64 (a context's cache: cache_length)
    encode_frames    Mimi encoder input, in 80 ms frames    powers of two ≥ 16
    train_rows       fine-tuning batch rows                 powers of two ≥ 16 up to 256, then multiples of 256
"""

from __future__ import annotations

# A context (voice prompt) is prefilled in chunks of this many rows: one program per cache bucket
# serves every context length in it (a prefill of 64 rows reads the same weights as one of 16).
CONTEXT_CHUNK = 64


def pow2_bucket(n: int, minimum: int = 16) -> int:
    """n rounded up to a power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def prompt_rows(n: int, limit: int) -> int:
    """Padded row count of a prefill of n rows (never past the model's `limit` positions)."""
    return min(pow2_bucket(n), limit)


def cache_length(needed: int, limit: int) -> int:
    """KV-cache slots for `needed` positions: a power of two ≥ 256 up to the model's `limit`.
    Past the limit only padding rows can land (a batch's shared text padding after a long
    context): then the next multiple of 256."""
    if needed > limit:
        return -(-needed // 256) * 256
    return min(limit, pow2_bucket(needed, 256))


def encode_frames(frames: int) -> int:
    """Frames a Mimi encode of `frames` frames is padded to (the encoder is causal: the codes of
    the real frames do not change)."""
    return pow2_bucket(frames)


def train_rows(n: int, limit: int) -> int:
    """Padded length of a fine-tuning batch whose longest example has n rows."""
    size = pow2_bucket(min(n, 256))
    if n > 256:
        size = -(-n // 256) * 256
    return min(size, limit)
