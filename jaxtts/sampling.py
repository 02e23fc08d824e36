"""Token sampling, as the original CSM does it: logits / temperature, keep the top-k, softmax, draw.

`Sampler` is a small pytree: temperature / top_p / min_p are traced values (changing them does
not recompile); top_k and which filters are on are static. The decode loop draws a frame's
Gumbel noise once (`Sampler.noise`) and each code with `Sampler.draw`: the argmax of the filtered
logits plus that noise, which is how `jax.random.categorical` samples, so the draws are the ones
its keys give. With the Pallas kernels on, a draw is one kernel (pallas_kernels/sample_top_k.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxtts import validation
from jaxtts.options import DecodeOptions


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SplitLogits:
    """Logits left as the fused head's outputs (pallas_kernels.fused_decode.norm_matvec), for a
    consumer that finishes them itself (the sampling kernel): the float32 [M, V] they stand for
    is the sum of the partials times each row's RMSNorm factor rsqrt(mean(h²) + eps)."""

    parts: jax.Array  # float32 [P, M, V]
    sumsq: jax.Array  # float32 [P, M]: partial sums of h² over the norm's `norm_dim` features
    norm_dim: int = dataclasses.field(metadata=dict(static=True))
    eps: float = dataclasses.field(metadata=dict(static=True))

    def finish(self):
        inv = jax.lax.rsqrt(jnp.sum(self.sumsq, axis=0) / self.norm_dim + self.eps)
        return jnp.sum(self.parts, axis=0) * inv[:, None]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Sampler:
    temperature: float = 0.9
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = dataclasses.field(default=50, metadata=dict(static=True))
    use_top_p: bool = dataclasses.field(default=False, metadata=dict(static=True))
    use_min_p: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def create(cls, temperature=0.9, top_k=50, top_p=None, min_p=None) -> Sampler:
        """Checked sampling settings. temperature 0 (or top_k 1) is greedy: always the most
        likely code. top_k None keeps every code; top_p / min_p None switch those filters off."""
        temperature = validation.number("temperature", temperature, low=0.0, high=100.0)
        if top_k is not None:
            top_k = validation.integer("top_k", top_k, low=1, high=2**31 - 1)  # int32 on the device
        top_p = validation.optional_number("top_p", top_p, low=0.0, high=1.0, low_open=True)
        min_p = validation.optional_number("min_p", min_p, low=0.0, high=1.0, high_open=True)
        if temperature == 0.0:  # greedy; the temperature then divides nothing
            temperature, top_k = 1.0, 1
        return cls(
            temperature=temperature,
            top_p=1.0 if top_p is None else top_p,
            min_p=0.0 if min_p is None else min_p,
            top_k=int(top_k or 0),
            use_top_p=top_p is not None,
            use_min_p=min_p is not None,
        )

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    def per_row(self, keys, logits):
        """Draw row b of logits [B, V] with its own key keys[b]: a row's draws never depend on the
        other rows of a batch, so batching gives each prompt exactly what it gets alone."""
        return self.draw(logits, self.noise(keys, logits.shape[-1])[None] if not self.greedy else None, 0)

    def noise(self, keys, vocab: int):
        """The Gumbel noise `draw` uses, one row per key: keys [...] → float32 [..., V] (None when
        greedy). Row [..., :] is the noise `jax.random.categorical(key, ...)` would draw."""
        if self.greedy:
            return None
        return gumbel_noise(keys, vocab)

    def draw(self, logits, noise, step, opts: DecodeOptions | None = None):
        """Draw one id per row from logits [B, V] (float, or the head's `SplitLogits`) with the
        precomputed noise[step] [B, V] (from `noise`): what `__call__` gives with that row's key.
        With `opts` choosing the sampling kernel, temperature + top-k + the draw are one kernel."""
        opts = opts or DecodeOptions()
        rows = logits.parts.shape[1] if isinstance(logits, SplitLogits) else logits.shape[0]
        if opts.uses_sample_kernel(rows) and not (self.greedy or self.use_top_p or self.use_min_p):
            from pallas_kernels.sample_top_k import sample_top_k

            if isinstance(logits, SplitLogits):
                return sample_top_k(
                    logits.parts,
                    noise,
                    step,
                    self.temperature,
                    top_k=self.top_k,
                    sumsq=logits.sumsq,
                    norm_dim=logits.norm_dim,
                    eps=logits.eps,
                    interpret=opts.interpret,
                )
            return sample_top_k(
                logits.astype(jnp.float32), noise, step, self.temperature, top_k=self.top_k, interpret=opts.interpret
            )
        if isinstance(logits, SplitLogits):
            logits = logits.finish()
        if self.greedy:
            return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
        return jnp.argmax(self.filtered(logits, opts.top_k_method) + noise[step], axis=-1).astype(jnp.int32)

    def filtered(self, logits, top_k_method: str = "sort"):
        """logits / temperature (float32 [B, V]), -inf outside the top-k / top-p / min-p sets."""
        logits = logits.astype(jnp.float32) / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            logits = jnp.where(top_k_mask(logits, self.top_k, top_k_method), logits, -jnp.inf)
        if self.use_top_p:
            logits = top_p_filter(logits, self.top_p)
        if self.use_min_p:
            logits = jnp.where(min_p_keep(logits, self.min_p), logits, -jnp.inf)
        return logits

    def __call__(self, key, logits):
        """Draw one id per row from float logits [B, V] → int32 [B]."""
        if self.greedy:
            return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, self.filtered(logits), axis=-1).astype(jnp.int32)


def min_p_keep(logits, min_p):
    """True where an entry's probability is at least min_p times its row's largest."""
    probs = jax.nn.softmax(logits, axis=-1)
    return probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)


def gumbel_noise(keys, vocab: int):
    """Gumbel noise [*keys.shape, V] float32: entry [..., :] is `jax.random.gumbel(key, (1, V))`,
    the noise `jax.random.categorical(key, logits[None])` adds before its argmax."""
    draw = lambda k: jax.random.gumbel(k, (1, vocab), jnp.float32)[0]  # noqa: E731
    for _ in range(keys.ndim):
        draw = jax.vmap(draw)
    return draw(keys)


def top_k_mask(logits, k: int, method: str = "sort"):
    """True for the entries at least as large as the k-th largest of their row (ties kept).

    method "sort": lax.top_k's k-th value; "rank": an entry is kept iff fewer than k entries are
    strictly larger (one fused compare-and-reduce: fewer, cheaper GPU kernels). Same set."""
    if method == "sort":
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        return logits >= kth
    larger = jnp.sum(logits[..., None, :] > logits[..., :, None], axis=-1, dtype=jnp.int32)
    return larger < k


def top_p_filter(logits, p):
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_keep = mass_before < p  # the most likely token always stays
    keep = jnp.zeros_like(sorted_keep).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_keep)
    return jnp.where(keep, logits, -jnp.inf)
