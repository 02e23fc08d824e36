"""LoRA: low-rank adapters on the attention (qkv, out) and MLP (gate_up, down) projections of both
transformers, the backbone and the depth decoder.

A projection W [in, out] becomes W + (A @ B)·(alpha / rank), A [in, r] random, B [r, out] zero,
so training starts from the base model exactly. Only A and B are trained.

The adapters are merged into the weights before each forward pass rather than applied as a side
branch: the model code stays untouched and merging is the very function the export uses. The cost is
a dense gradient for each adapted matrix (then projected onto A and B); the memory LoRA saves is the
optimizer state and the float32 master copy of the 1.5 B base weights, which is most of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxtts.config import CSMConfig

PROJECTIONS = ("attn.qkv", "attn.out", "mlp.gate_up", "mlp.down")


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_names(cfg: CSMConfig) -> list[str]:
    """Flat parameter names of every adapted projection, e.g. `backbone.layers.0.attn.qkv`."""
    return [
        f"{stack}.layers.{i}.{proj}"
        for stack, llama in (("backbone", cfg.backbone), ("decoder", cfg.decoder))
        for i in range(llama.num_layers)
        for proj in PROJECTIONS
    ]


def init_adapters(params: dict, cfg: CSMConfig, lora: LoraConfig, key) -> dict:
    """Adapters {name + ".a" / ".b": array} (float32) for flat base params {name: array}."""
    out = {}
    names = target_names(cfg)
    for name, k in zip(names, jax.random.split(key, len(names))):
        d_in, d_out = params[name].shape
        out[f"{name}.a"] = jax.random.normal(k, (d_in, lora.rank), jnp.float32) * d_in**-0.5
        out[f"{name}.b"] = jnp.zeros((lora.rank, d_out), jnp.float32)
    return out


def merge(params: dict, adapters: dict, lora: LoraConfig) -> dict:
    """Flat params with W ← W + A @ B · scale for every adapted W (in float32, stored in W's dtype)."""
    out = dict(params)
    for key in adapters:
        if not key.endswith(".a"):
            continue
        name = key[:-2]
        w = params[name]
        delta = jnp.dot(
            adapters[f"{name}.a"].astype(jnp.float32),
            adapters[f"{name}.b"].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        out[name] = (w.astype(jnp.float32) + delta * lora.scale).astype(w.dtype)
    return out
