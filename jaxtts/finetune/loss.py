"""The CSM training loss (Sesame's paper, "compute amortization").

For every target row t (an audio frame of the utterance being learned, see data.py):

* codebook 0 is predicted by `codebook0_head` from the backbone's hidden state at row t-1, the
  row before the frame, exactly where generation samples it;
* codebooks 1..31 are predicted by the depth decoder, which sees [hidden(t-1), emb(c0), ...,
  emb(c30)] at positions 0..31 and predicts codebook i at position i. It runs on a random subset of
  the target frames only (default 1/16), which is what makes training the 32-codebook model cheap.

Text rows, context utterances and padding are not scored. The end-of-audio row (the all-zero frame
after the last real frame) *is* scored, on all 32 codebooks, and always belongs to the depth subset:
generation stops when a whole frame comes out as zeros, so both the backbone (c0 = 0) and the depth
decoder (c1..31 = 0) must learn it. Being one frame per utterance, it costs next to nothing.

The loss is mean CE(codebook 0) over target frames + `depth_weight` × mean CE over the 31 depth
codebooks of the selected frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from jaxtts.csm import CSM


@dataclass(frozen=True)
class LossConfig:
    depth_fraction: float = 1 / 16  # share of target frames the depth decoder is trained on (1 = all)
    depth_weight: float = 1.0

    def depth_frames(self, rows: int) -> int:
        """Frames per sequence sent through the depth decoder (static, so shapes stay fixed)."""
        return max(1, min(rows, math.ceil(self.depth_fraction * rows - 1e-9)))


def end_of_audio_rows(target):
    """target [B, T] → bool [B, T]: the last row of each run of target rows (the all-zero frame)."""
    after = jnp.concatenate([target[:, 1:], jnp.zeros_like(target[:, :1])], axis=1)
    return target & ~after


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def loss_terms(model: CSM, batch: dict, key, cfg: LossConfig) -> dict:
    """Sums and counts of both CE terms (so batches and eval splits combine exactly)."""
    tokens, mask, target = batch["tokens"], batch["mask"], batch["target"]
    b, t, _ = tokens.shape
    nb = model.cfg.audio_num_codebooks
    hidden, _ = model.run_backbone(tokens, mask, jnp.zeros((b,), jnp.int32), model.backbone_cache(b, t))

    # Row t is predicted from row t-1.
    h_prev = hidden[:, :-1]
    codes = tokens[:, 1:, :nb]
    scored = target[:, 1:]
    ce0 = _xent(model.codebook0_logits(h_prev), codes[..., 0])
    c0_sum = jnp.sum(jnp.where(scored, ce0, 0.0))
    c0_count = jnp.sum(scored)

    # Depth subset: random target frames, the end-of-audio frame first.
    k = cfg.depth_frames(t - 1)
    priority = jax.random.uniform(key, scored.shape) + 2.0 * end_of_audio_rows(scored)
    priority = jnp.where(scored, priority, -1.0)
    _, idx = jax.lax.top_k(priority, k)  # [B, K]
    picked = jnp.take_along_axis(scored, idx, axis=1)
    h_sel = jnp.take_along_axis(h_prev, idx[..., None], axis=1)  # [B, K, D]
    c_sel = jnp.take_along_axis(codes, idx[..., None], axis=1)  # [B, K, 32]
    vocab = model.cfg.audio_vocab_size
    emb = model.audio_embeddings[...][c_sel[..., :-1] + vocab * jnp.arange(nb - 1)]  # [B, K, 31, D]
    x = jnp.concatenate([h_sel[:, :, None].astype(emb.dtype), emb], axis=2).reshape(b * k, nb, -1)
    dec, _ = model.run_decoder(x, jnp.zeros((b * k,), jnp.int32), model.decoder_cache(b * k))
    logits = jnp.einsum("npd,pdv->npv", dec[:, 1:], model.audio_head[...], preferred_element_type=jnp.float32)
    ce = _xent(logits, c_sel.reshape(b * k, nb)[:, 1:]).mean(axis=-1).reshape(b, k)
    depth_sum = jnp.sum(jnp.where(picked, ce, 0.0))
    depth_count = jnp.sum(picked)
    return {"c0_sum": c0_sum, "c0_count": c0_count, "depth_sum": depth_sum, "depth_count": depth_count}


def combine(terms: dict, cfg: LossConfig) -> dict:
    """Mean losses from summed terms."""
    c0 = terms["c0_sum"] / jnp.maximum(terms["c0_count"], 1)
    depth = terms["depth_sum"] / jnp.maximum(terms["depth_count"], 1)
    return {"loss": c0 + cfg.depth_weight * depth, "loss_c0": c0, "loss_depth": depth}


def csm_loss(model: CSM, batch: dict, key, cfg: LossConfig = LossConfig()) -> tuple[jax.Array, dict]:
    """(scalar loss, metrics) for one batch of collated rows (see data.collate)."""
    terms = loss_terms(model, batch, key, cfg)
    out = combine(terms, cfg)
    return out["loss"], {**out, "frames": terms["c0_count"]}
