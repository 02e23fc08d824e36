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

from jaxtts.attention import uses_pallas
from jaxtts.errors import JaxttsError


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
    def create(cls, temperature=0.9, top_k=50, top_p=None, min_p=None) -> "Sampler":
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise JaxttsError(f"temperature must be a number > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise JaxttsError(f"top-k must be an integer ≥ 1, got {top_k!r}")
        if top_p is not None and not (0.0 < top_p <= 1.0):
            raise JaxttsError(f"top-p must be in (0, 1], got {top_p!r}")
        if min_p is not None and not (0.0 <= min_p < 1.0):
            raise JaxttsError(f"min-p must be in [0, 1), got {min_p!r}")
        return cls(temperature=float(temperature), top_p=float(top_p or 1.0), min_p=float(min_p or 0.0),
                   top_k=int(top_k or 0), use_top_p=top_p is not None, use_min_p=min_p is not None)

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
        from pallas_kernels.sample_top_k import gumbel_noise

        return gumbel_noise(keys, vocab)

    def draw(self, logits, noise, step, impl: str = "xla"):
        """Draw one id per row from logits [B, V] (float, or the head's `SplitLogits`) with the
        precomputed noise[step] [B, V] (from `noise`): what `__call__` gives with that row's key.
        With the Pallas kernels on, temperature + top-k + the draw are one kernel."""
        from pallas_kernels.fused_decode import SplitLogits
        from pallas_kernels.sample_top_k import sample_top_k

        rows = logits.parts.shape[1] if isinstance(logits, SplitLogits) else logits.shape[0]
        if (SAMPLE_KERNEL and uses_pallas(impl) and rows >= SAMPLE_KERNEL_MIN_ROWS
                and not (self.greedy or self.use_top_p or self.use_min_p)):
            if isinstance(logits, SplitLogits):
                return sample_top_k(logits.parts, noise, step, self.temperature, top_k=self.top_k,
                                    sumsq=logits.sumsq, norm_dim=logits.norm_dim, eps=logits.eps,
                                    interpret=impl == "pallas_interpret")
            return sample_top_k(logits.astype(jnp.float32), noise, step, self.temperature, top_k=self.top_k,
                                interpret=impl == "pallas_interpret")
        if isinstance(logits, SplitLogits):
            logits = logits.finish()
        if self.greedy:
            return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
        return jnp.argmax(self.filtered(logits) + noise[step], axis=-1).astype(jnp.int32)

    def filtered(self, logits):
        """logits / temperature (float32 [B, V]), -inf outside the top-k / top-p / min-p sets."""
        logits = logits.astype(jnp.float32) / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            logits = jnp.where(top_k_mask(logits, self.top_k), logits, -jnp.inf)
        if self.use_top_p:
            logits = _top_p(logits, self.top_p)
        if self.use_min_p:
            probs = jax.nn.softmax(logits, axis=-1)
            keep = probs >= self.min_p * jnp.max(probs, axis=-1, keepdims=True)
            logits = jnp.where(keep, logits, -jnp.inf)
        return logits

    def __call__(self, key, logits):
        """Draw one id per row from float logits [B, V] → int32 [B]."""
        if self.greedy:
            return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, self.filtered(logits), axis=-1).astype(jnp.int32)


# Draw with the Pallas sampling kernel when the Pallas kernels are on and a batch has at least
# SAMPLE_KERNEL_MIN_ROWS rows (one program per row: a lone row is latency-bound, and the XLA ops
# spread it over the GPU; measured in docs/PERF.md). False: always the XLA ops.
SAMPLE_KERNEL = True
SAMPLE_KERNEL_MIN_ROWS = 2

# How the top-k set is found: "sort" (lax.top_k) or "rank" (count the larger logits of each entry,
# one fused compare-and-reduce: fewer, cheaper GPU kernels than a sort). Both give the same set.
TOP_K_METHOD = None  # None: "rank" on GPU, "sort" elsewhere


def top_k_mask(logits, k: int, method: str | None = None):
    """True for the entries at least as large as the k-th largest of their row (ties kept)."""
    method = method or TOP_K_METHOD or ("rank" if jax.default_backend() == "gpu" else "sort")
    if method == "sort":
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        return logits >= kth
    # An entry is in the top k iff fewer than k entries are strictly larger.
    larger = jnp.sum(logits[..., None, :] > logits[..., :, None], axis=-1, dtype=jnp.int32)
    return larger < k


def _top_p(logits, p):
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_keep = mass_before < p  # the most likely token always stays
    keep = jnp.zeros_like(sorted_keep).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_keep)
    return jnp.where(keep, logits, -jnp.inf)
