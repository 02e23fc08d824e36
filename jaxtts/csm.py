"""CSM: a Llama-3 backbone over 33-wide rows of Mimi codes + text, and a depth decoder that
fills codebooks 1..31 of each 80 ms frame."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtts.config import CSMConfig
from jaxtts.errors import JaxttsError
from jaxtts.llama import XLA, KVCache, Llama, _init, dense, fused_step_applies, matvec_config
from jaxtts.options import DecodeOptions
from jaxtts.sampling import SplitLogits

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise JaxttsError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


@functools.partial(jax.jit, static_argnames="blocks")
def _project(table, w, blocks: int):
    # One block of rows at a time (a codebook's), so the temporaries (float32 products, the GEMM
    # autotuner's scratch) stay small next to the 134 MB result.
    rows = table.reshape(blocks, -1, table.shape[-1])
    out = jax.lax.map(lambda t: jnp.dot(t, w, preferred_element_type=jnp.float32).astype(table.dtype), rows)
    return out.reshape(-1, w.shape[-1])


class CSM(nnx.Module):
    def __init__(self, cfg: CSMConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        cfg.validate()
        self.cfg = cfg
        nb, vocab = cfg.audio_num_codebooks, cfg.audio_vocab_size
        d_bb, d_dec = cfg.backbone.embed_dim, cfg.decoder.embed_dim
        self.backbone = Llama(cfg.backbone, dtype=dtype, rngs=rngs)
        self.decoder = Llama(cfg.decoder, dtype=dtype, rngs=rngs)
        self.text_embeddings = _init(rngs, (cfg.text_vocab_size, d_bb), dtype, 1.0)
        self.audio_embeddings = _init(rngs, (nb * vocab, d_bb), dtype, 1.0)
        self.projection = _init(rngs, (d_bb, d_dec), dtype)
        self.codebook0_head = _init(rngs, (d_bb, vocab), dtype)
        self.audio_head = _init(rngs, (nb - 1, d_dec, vocab), dtype)

    @property
    def dtype(self):
        return self.text_embeddings[...].dtype

    # --- embeddings -------------------------------------------------------------------------
    def embed_rows(self, tokens, mask):
        """Masked sum of the 33 embeddings of each row: tokens/mask [B,T,33] → [B,T,D]."""
        nb, vocab = self.cfg.audio_num_codebooks, self.cfg.audio_vocab_size
        audio_ids = tokens[..., :nb] + vocab * jnp.arange(nb, dtype=tokens.dtype)
        audio = self.audio_embeddings[...][audio_ids]  # [B,T,32,D]
        text = self.text_embeddings[...][tokens[..., nb]]  # [B,T,D]
        m = mask.astype(audio.dtype)
        return jnp.sum(audio * m[..., :nb, None], axis=-2) + text * m[..., nb, None]

    def embed_audio(self, codebook: int | jax.Array, codes):
        """Embedding of codes [B] of one codebook: [B, D_backbone]."""
        return self.audio_embeddings[...][codes + codebook * self.cfg.audio_vocab_size]

    # --- the two transformers ------------------------------------------------------------------
    def run_backbone(self, tokens, mask, start, cache: KVCache, *, lengths=None, opts: DecodeOptions = XLA):
        """Backbone over rows [B,T,33] at positions start[b]+t. Returns (hidden [B,T,D], cache)."""
        with jax.named_scope("backbone"):
            return self.backbone(self.embed_rows(tokens, mask), start, cache, lengths=lengths, opts=opts)

    def codebook0_logits(self, hidden):
        return jnp.dot(hidden, self.codebook0_head[...], preferred_element_type=jnp.float32)

    def run_decoder(self, inputs, start, cache: KVCache, *, opts: DecodeOptions = XLA):
        """Depth decoder over backbone-width inputs [B,T,D_bb] (projected here)."""
        with jax.named_scope("depth"):
            return self.decoder(dense(inputs, self.projection[...], opts), start, cache, opts=opts)

    def decoder_step_logits(
        self, inputs, start, cache: KVCache, codebook, *, opts: DecodeOptions = XLA, projected=False
    ):
        """One depth-decoder step over inputs [B,1,D_bb] (or [B,1,D_dec] already `projected`) at
        positions start, then the logits of `codebook` (≥ 1, may be traced): (logits, cache).

        The logits are float32 [B, V], or with the fused Pallas step a `SplitLogits` (the head's
        partial sums with the final norm folded in, one kernel instead of two) for the sampling
        kernel to finish."""
        with jax.named_scope("depth"):
            x = inputs if projected else dense(inputs, self.projection[...], opts)
            if fused_step_applies(x, None, opts):
                from pallas_kernels.fused_decode import norm_matvec

                dec = self.decoder
                h, cache = dec.fused_step(x, start, cache, opts, final_norm=False)
                head = self.audio_head[...]
                parts, ss = norm_matvec(
                    h,
                    dec.norm.scale[...],
                    head,
                    w_index=jnp.reshape(codebook - 1, (1,)).astype(jnp.int32),
                    config=matvec_config(opts, h.shape[0], head),
                    interpret=opts.interpret,
                )
                return SplitLogits(parts, ss, dec.cfg.embed_dim, dec.cfg.norm_eps), cache
            h, cache = self.decoder(x, start, cache, opts=opts)
            return self.codebook_logits(h[:, -1], codebook), cache

    def projected_audio_embeddings(self):
        """The audio embeddings through the decoder's input projection, [32·V, D_dec] in the model
        dtype: a table lookup then replaces one matvec per depth step (generation.audio_table)."""
        return _project(self.audio_embeddings[...], self.projection[...], self.cfg.audio_num_codebooks)

    def codebook_logits(self, decoder_hidden, codebook: int | jax.Array):
        """Logits of codebook i ≥ 1 from the depth decoder's hidden state."""
        return jnp.dot(decoder_hidden, self.audio_head[...][codebook - 1], preferred_element_type=jnp.float32)

    def backbone_cache(self, batch: int, length: int | None = None) -> KVCache:
        return KVCache.zeros(self.cfg.backbone, batch, length or self.cfg.backbone.max_seq_len, self.dtype)

    def decoder_cache(self, batch: int) -> KVCache:
        return KVCache.zeros(self.cfg.decoder, batch, self.cfg.audio_num_codebooks, self.dtype)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def random(cls, cfg: CSMConfig, *, dtype="float32", seed: int = 0) -> CSM:
        """Random weights (for tests, benchmarks and checking an install without weights).

        Built inside one jit: eagerly, each parameter's draw would be its own small compilation.
        """
        return nnx.jit(lambda: cls(cfg, dtype=resolve_dtype(dtype), rngs=nnx.Rngs(seed)))()

    @classmethod
    def abstract(cls, cfg: CSMConfig, dtype="float32") -> CSM:
        """The model with ShapeDtypeStructs instead of arrays (no memory allocated)."""
        return nnx.eval_shape(lambda: cls(cfg, dtype=resolve_dtype(dtype), rngs=nnx.Rngs(0)))

    @classmethod
    def from_params(cls, cfg: CSMConfig, params: dict, dtype="float32") -> CSM:
        """Build from a nested dict of arrays shaped like `param_dict(model)`; shapes are checked."""
        target = resolve_dtype(dtype)
        model = cls.abstract(cfg, target)
        expected = dict(_flat(param_dict(model)))
        given = dict(_flat(params))
        for name, spec in expected.items():
            if name not in given:
                raise JaxttsError(f"parameter {name} is missing")
            if tuple(given[name].shape) != tuple(spec.shape):
                raise JaxttsError(
                    f"parameter {name} has shape {tuple(given[name].shape)}, expected {tuple(spec.shape)}"
                )
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, dtype=target), params))
        nnx.update(model, state)
        _fill_constants(model)
        return model

    def save(self, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        return save_csm(self, out, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, dtype=None) -> CSM:
        """Load a directory written by jaxtts-convert, or an original / transformers checkpoint.

        dtype: "bfloat16" / "float32" (default: `jaxtts.defaults.default_dtype()`, float32 on CPU)."""
        from jaxtts.checkpoint import is_converted_dir, read_meta, read_params
        from jaxtts.defaults import default_dtype

        dtype = default_dtype() if dtype is None else dtype

        path = Path(path)
        if not path.exists():
            raise JaxttsError(f"{path}: no such file or directory")
        if is_converted_dir(path):
            meta = read_meta(path)
            if meta["model"] != "csm":
                raise JaxttsError(f"{path}: holds a {meta['model']} checkpoint, not CSM")
            cfg = CSMConfig.from_dict(meta["config"])
            abstract = param_dict(cls.abstract(cfg, dtype))
            return cls.from_params(cfg, read_params(path, abstract), dtype)
        from convert.csm import read_csm_checkpoint

        cfg, params = read_csm_checkpoint(path)
        return cls.from_params(cfg, params, dtype)


def save_csm(model: CSM, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `model` as a jaxtts directory (what `CSM.load`, `jaxtts.load` and `--model` accept)."""
    import numpy as np

    from jaxtts.checkpoint import atomic_directory, write_checkpoint

    dtype = "bfloat16" if model.dtype == jnp.bfloat16 else "float32"
    params = jax.tree.map(np.asarray, param_dict(model))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, model="csm", config=model.cfg.to_dict(), dtype=dtype, params=params)
    return Path(out)


def _fill_constants(model: CSM) -> None:
    """Set the RoPE tables of an abstract model to their concrete values."""
    from jaxtts.llama import rope_table

    for stack, cfg in ((model.backbone, model.cfg.backbone), (model.decoder, model.cfg.decoder)):
        cos, sin = rope_table(cfg)
        stack.rope_cos.set_value(jnp.asarray(cos))
        stack.rope_sin.set_value(jnp.asarray(sin))


def param_dict(model: CSM) -> dict:
    """The parameters as a nested dict of arrays (what converters produce and Orbax stores)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flat(tree, prefix=""):
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from _flat(v, name)
        else:
            yield name, v
