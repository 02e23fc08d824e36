"""Streaming decode: codes arrive a few frames at a time, audio leaves as soon as it is final.

    state = init_state(params, batch, cfg=cfg)
    state, pcm = decode_step(params, state, codes, cfg=cfg)   # codes [B, K, T] → pcm [B, T·1920, 1]

Both are pure and jit/scan-friendly (the generation engine can call `decode_step` inside its own
jitted loop; `Mimi.decode_stream_step` is the jitted, input-checked version). The state is a pytree of
fixed-shape arrays, so every step with the same T reuses one compilation:

  "upsample"     [B, 2, 512]           overlap of the depthwise 25 Hz upsampler (bias-free)
  "transformer"  "offset": int32 []    25 Hz steps decoded so far (RoPE position of the next one)
                 "layers": {i: {"k", "v": [B, 250, H, Dh]}}   the last 250 rotated keys and values
  "seanet"       conv input tails [B, (K-1)·dilation, C] and transposed-conv overlaps [B, K-stride, C]

Concatenating the pcm of successive steps gives exactly the whole-sequence `model.decode` output:
the whole-sequence decoder is this same step function started from no state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtts.mimi import model
from jaxtts.mimi.config import MimiConfig

decode_step = model.decode_step


def state_shapes(params, batch: int, *, cfg: MimiConfig):
    """The state's structure as ShapeDtypeStructs (read off the decoder itself, which is traced once)."""
    one_frame = jax.ShapeDtypeStruct((batch, 1, 1), jnp.int32)
    shapes, _ = jax.eval_shape(lambda p, c: model.decode_step(p, None, c, cfg=cfg), params, one_frame)
    return shapes


def init_state(params, batch: int, *, cfg: MimiConfig, shapes=None):
    """The state at the start of a stream: all zeros (no history, no overlap, offset 0)."""
    shapes = shapes or state_shapes(params, batch, cfg=cfg)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
