"""CSM: a Llama-3 backbone over 33-wide rows of Mimi codes + text, and a depth decoder that
fills codebooks 1..31 of each 80 ms frame."""

from __future__ import annotations

import functools
import operator
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtts import programs
from jaxtts import quantize as quant
from jaxtts.config import CSMConfig, LlamaConfig
from jaxtts.errors import JaxttsError
from jaxtts.llama import XLA, Block, KVCache, Llama, _init, dense, dot_f32, fused_step_applies, norm_gemv
from jaxtts.options import DecodeOptions
from jaxtts.quantize import weight
from jaxtts.sampling import SplitLogits

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise JaxttsError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


@functools.partial(jax.jit, static_argnames=("blocks", "dtype"))
def _project(table, w, blocks: int, dtype):
    # One block of rows at a time (a codebook's), so the temporaries (float32 products, the GEMM
    # autotuner's scratch, an int8 table's dequantized block) stay small next to the 134 MB
    # result. table: an array or a QuantizedTable; w: an array or a QuantizedWeight.
    if isinstance(table, quant.QuantizedTable):
        rows = (table.q.reshape(blocks, -1, table.shape[-1]), table.scale.reshape(blocks, -1))
        block = lambda qs: quant.dequantize_rows(*qs, dtype)  # noqa: E731
    else:
        rows, block = table.reshape(blocks, -1, table.shape[-1]), lambda t: t
    out = jax.lax.map(lambda r: dot_f32(block(r), w).astype(dtype), rows)
    return out.reshape(-1, w.shape[-1])


class CSM(nnx.Module):
    """The model. With int8 weights (`jaxtts.quantize`: `CSM.load(..., quantize="int8")`, an int8
    checkpoint, or `quantize_model`), each projection and head holds int8 beside a `<name>_scale`
    Param of float32 column scales, and each embedding table int8 beside float32 row scales;
    `quantization` says which ("int8" or None), `quantized_embeddings` whether the tables are."""

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
        """The model dtype: norms, activations (and the weights and embeddings unless quantized)."""
        return self.backbone.norm.scale.get_value().dtype

    @property
    def quantization(self) -> str | None:
        """ "int8" when the projections and heads hold int8 weights with column scales, else None."""
        return "int8" if hasattr(self, "codebook0_head" + quant.SCALE_SUFFIX) else None

    @property
    def quantized_embeddings(self) -> bool:
        """Whether the embedding tables hold int8 rows with row scales (`jaxtts.quantize`)."""
        return hasattr(self, "text_embeddings" + quant.SCALE_SUFFIX)

    # --- embeddings -------------------------------------------------------------------------
    def embed_rows(self, tokens, mask):
        """Masked sum of the 33 embeddings of each row: tokens/mask [B,T,33] → [B,T,D]."""
        nb, vocab = self.cfg.audio_num_codebooks, self.cfg.audio_vocab_size
        audio_ids = tokens[..., :nb] + vocab * jnp.arange(nb, dtype=tokens.dtype)
        audio = quant.lookup(quant.table(self, "audio_embeddings"), audio_ids, self.dtype)  # [B,T,32,D]
        text = quant.lookup(quant.table(self, "text_embeddings"), tokens[..., nb], self.dtype)  # [B,T,D]
        m = mask.astype(audio.dtype)
        return jnp.sum(audio * m[..., :nb, None], axis=-2) + text * m[..., nb, None]

    def embed_audio(self, codebook: int | jax.Array, codes):
        """Embedding of codes [B] of one codebook: [B, D_backbone] (codebook may be an array
        broadcasting against codes: [..., D_backbone])."""
        ids = codes + codebook * self.cfg.audio_vocab_size
        return quant.lookup(quant.table(self, "audio_embeddings"), ids, self.dtype)

    # --- the two transformers ------------------------------------------------------------------
    def run_backbone(self, tokens, mask, start, cache: KVCache, *, lengths=None, opts: DecodeOptions = XLA):
        """Backbone over rows [B,T,33] at positions start[b]+t. Returns (hidden [B,T,D], cache)."""
        with jax.named_scope("backbone"):
            return self.backbone(self.embed_rows(tokens, mask), start, cache, lengths=lengths, opts=opts)

    def codebook0_logits(self, hidden):
        return dot_f32(hidden, weight(self, "codebook0_head"))

    def run_decoder(self, inputs, start, cache: KVCache, *, opts: DecodeOptions = XLA):
        """Depth decoder over backbone-width inputs [B,T,D_bb] (projected here)."""
        with jax.named_scope("depth"):
            return self.decoder(dense(inputs, weight(self, "projection"), opts), start, cache, opts=opts)

    def decoder_step_logits(
        self, inputs, start, cache: KVCache, codebook, *, opts: DecodeOptions = XLA, projected=False
    ):
        """One depth-decoder step over inputs [B,1,D_bb] (or [B,1,D_dec] already `projected`) at
        positions start, then the logits of `codebook` (≥ 1, may be traced): (logits, cache).

        The logits are float32 [B, V], or with the fused Pallas step a `SplitLogits` (the head's
        partial sums with the final norm folded in, one kernel instead of two) for the sampling
        kernel to finish."""
        with jax.named_scope("depth"):
            x = inputs if projected else dense(inputs, weight(self, "projection"), opts)
            dec = self.decoder
            if fused_step_applies(x, None, opts, dec.quantized):
                h, cache = dec.fused_step(x, start, cache, opts, final_norm=False)
                parts, ss = norm_gemv(
                    h,
                    dec.norm.scale[...],
                    weight(self, "audio_head"),
                    opts,
                    w_index=jnp.reshape(codebook - 1, (1,)).astype(jnp.int32),
                )
                return SplitLogits(parts, ss, dec.cfg.embed_dim, dec.cfg.norm_eps), cache
            h, cache = self.decoder(x, start, cache, opts=opts)
            return self.codebook_logits(h[:, -1], codebook), cache

    def projected_audio_embeddings(self):
        """The audio embeddings through the decoder's input projection, [32·V, D_dec] in the model
        dtype: a table lookup then replaces one matvec per depth step (generation.audio_table)."""
        table = quant.table(self, "audio_embeddings")
        return _project(table, weight(self, "projection"), self.cfg.audio_num_codebooks, self.dtype)

    def codebook_logits(self, decoder_hidden, codebook: int | jax.Array):
        """Logits of codebook i ≥ 1 from the depth decoder's hidden state."""
        head = weight(self, "audio_head")
        head = head.select(codebook - 1) if isinstance(head, quant.QuantizedWeight) else head[codebook - 1]
        return dot_f32(decoder_hidden, head)

    def backbone_cache(self, batch: int, length: int | None = None) -> KVCache:
        return KVCache.zeros(self.cfg.backbone, batch, length or self.cfg.backbone.max_seq_len, self.dtype)

    def decoder_cache(self, batch: int) -> KVCache:
        return KVCache.zeros(self.cfg.decoder, batch, self.cfg.audio_num_codebooks, self.dtype)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def random(cls, cfg: CSMConfig, *, dtype="float32", seed: int = 0, quantize: str | None = None) -> CSM:
        """Random weights (for tests, benchmarks and checking an install without weights);
        `quantize="int8"`: those weights and tables quantized (`jaxtts.quantize`). The same
        seed (taken modulo 2**32) gives the same weights.

        Built inside one program, with its compile time in mind: XLA compiles a kernel per random
        draw (CSM-1B's ~300 Threefry draws took 21 s to compile on an H200). So each stack's layers
        are drawn together, one draw per weight kind (`_stacked_layers`; the constructor's own
        per-layer draws are dead code that XLA drops), and the keys are Philox ones (10 rounds of
        a multiply, cheaper to compile than Threefry's 20; like Threefry, the same on every backend
        and exact under vmap, unlike the "rbg" generators). The seed is an argument of the
        program, not a constant: every seed shares one compilation (and one trace per process).
        """
        quant.check_method(quantize)
        return _random_model(cls, cfg, resolve_dtype(dtype), quantize, np.uint32(operator.index(seed) % 2**32))

    @classmethod
    def abstract(
        cls, cfg: CSMConfig, dtype="float32", quantization: str | None = None, *, embeddings: bool = True
    ) -> CSM:
        """The model with ShapeDtypeStructs instead of arrays (no memory allocated); with
        quantization="int8", the int8 layout (int8 weights and their float32 `_scale` siblings;
        the embedding tables too unless `embeddings` is False)."""
        quant.check_method(quantization)

        def build():
            model = cls(cfg, dtype=resolve_dtype(dtype), rngs=nnx.Rngs(0))
            if quantization:
                return quant.quantize_modules_(model, quantization, embeddings=embeddings)
            return model

        return nnx.eval_shape(build)

    @classmethod
    def from_params(cls, cfg: CSMConfig, params: dict, dtype="float32") -> CSM:
        """Build from a nested dict of arrays shaped like `param_dict(model)`; shapes are checked.

        Params holding int8 weights with their `_scale` siblings (`quantize.quantize_params`, an
        int8 checkpoint) build an int8 model: those stay int8 and float32, the rest take `dtype`.
        The embedding tables are int8 too when their `_scale` siblings are given."""
        target = resolve_dtype(dtype)
        given = dict(_flat(params))
        method = "int8" if any(quant.is_scale_name(n) for n in given) else None
        tables = any(quant.is_scale_name(n) and quant.is_embedding_name(n[: -len(quant.SCALE_SUFFIX)]) for n in given)
        dtypes = {n: a.dtype for n, a in given.items()}
        quant.check_layout(dtypes, method, "parameters", "the parameter set", embeddings=tables)
        model = cls.abstract(cfg, target, quantization=method, embeddings=tables)
        expected = dict(_flat(param_dict(model)))
        for name, spec in expected.items():
            if name not in given:
                raise JaxttsError(f"parameter {name} is missing")
            if tuple(given[name].shape) != tuple(spec.shape):
                raise JaxttsError(
                    f"parameter {name} has shape {tuple(given[name].shape)}, expected {tuple(spec.shape)}"
                )
        if method:
            quant.check_scales({n: given[n] for n in expected if quant.is_scale_name(n)})
        state = nnx.state(model, nnx.Param)
        dtypes = {name: spec.dtype for name, spec in expected.items()}  # int8 and scales keep theirs
        nnx.replace_by_pure_dict(state, _cast_tree(params, dtypes, target))
        nnx.update(model, state)
        _fill_constants(model)
        return model

    def save(self, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        return save_csm(self, out, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, dtype=None, *, quantize: str | None = None) -> CSM:
        """Load a directory written by jaxtts-convert, or an original / transformers checkpoint.

        dtype: "bfloat16" / "float32" (default: `jaxtts.defaults.default_dtype()`, float32 on CPU);
        an int8 checkpoint keeps its int8 weights and scales, the rest takes `dtype`.
        quantize="int8": quantize a bfloat16 / float32 checkpoint's weights and tables at load
        time (a no-op for an int8 checkpoint; one stored with float embedding tables gets them
        quantized)."""
        from jaxtts.checkpoint import is_converted_dir, read_meta, read_param_dtypes, read_params
        from jaxtts.defaults import default_dtype

        dtype = default_dtype() if dtype is None else dtype
        quant.check_method(quantize)

        path = Path(path)
        if not path.exists():
            raise JaxttsError(f"{path}: no such file or directory")
        if is_converted_dir(path):
            meta = read_meta(path)
            if meta["model"] != "csm":
                raise JaxttsError(f"{path}: holds a {meta['model']} checkpoint, not CSM")
            cfg = CSMConfig.from_dict(meta["config"])
            scheme = quant.scheme_from_meta(meta.get("quantization"), f"{path}/config.json")
            stored, tables = (scheme.method, scheme.embeddings) if scheme else (None, False)
            # Orbax casts to the dtype asked for: a config that does not match the stored tensors
            # must be caught before the restore (int8 read as floats would be a garbage model).
            dtypes = dict(_flat(read_param_dtypes(path)))
            quant.check_layout(dtypes, stored, str(path), "config.json", embeddings=tables)
            abstract = param_dict(cls.abstract(cfg, dtype, quantization=stored, embeddings=tables))
            # int8 checkpoints written before the [out, in] layout: restored as stored, then transposed
            legacy = scheme is not None and scheme.layout == quant.LEGACY_LAYOUT
            if legacy:
                abstract = quant.transpose_projections(abstract)
            params = read_params(path, abstract)
            model = cls.from_params(cfg, quant.transpose_projections(params) if legacy else params, dtype)
        else:
            from convert.csm import read_csm_checkpoint

            cfg, params = read_csm_checkpoint(path)
            model = cls.from_params(cfg, params, dtype)
        if quantize and (model.quantization != quantize or not model.quantized_embeddings):
            model = quant.quantize_modules_(model, quantize)  # a new model: nothing has split it yet
        return model


def _random_model(cls, cfg: CSMConfig, dtype, quantize: str | None, seed: np.uint32) -> CSM:
    """`CSM.random`: the module graph from an abstract build, the variables from one program
    (seed → every variable), kept in `jaxtts.programs` so that a new process loads it instead of
    tracing the whole construction again."""
    graphdef, build = _random_builder(cls, cfg, dtype, quantize)
    if programs.usable(seed):
        key = ("csm_random", cls.__qualname__, cfg, str(jnp.dtype(dtype)), quantize)
        state = programs.Program("csm_random", key, lambda: build.lower(seed))(seed)
    else:
        state = build(seed)
    return nnx.merge(graphdef, state)


@functools.cache
def _random_builder(cls, cfg: CSMConfig, dtype, quantize: str | None):
    """`CSM.random`'s module graph and its program (seed → the model's variables)."""

    def build(seed):
        rngs = nnx.Rngs(jax.random.key(seed, impl="philox2x32"))
        model = cls(cfg, dtype=dtype, rngs=rngs)
        for stack in (model.backbone, model.decoder):
            layers = _stacked_layers(stack.cfg, dtype, rngs.params())
            for i, layer in enumerate(stack.layers):
                nnx.update(layer, jax.tree.map(operator.itemgetter(i), layers))
        return quant.quantize_modules_(model, quantize) if quantize else model

    graphdef = nnx.graphdef(nnx.eval_shape(build, np.uint32(0)))
    return graphdef, jax.jit(lambda seed: nnx.state(build(seed)))


def _stacked_layers(cfg: LlamaConfig, dtype, key) -> nnx.State:
    """The parameters of `cfg.num_layers` random `Block`s, stacked on a new leading axis: the Block
    constructor under vmap, so one draw per weight kind for all layers and the init rules stay the
    constructor's."""
    return jax.vmap(lambda k: nnx.state(Block(cfg, dtype=dtype, rngs=nnx.Rngs(k)), nnx.Param))(
        jax.random.split(key, cfg.num_layers)
    )


def save_csm(model: CSM, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `model` as a jaxtts directory (what `CSM.load`, `jaxtts.load` and `--model` accept)."""
    from jaxtts.checkpoint import atomic_directory, write_checkpoint

    dtype = "bfloat16" if model.dtype == jnp.bfloat16 else "float32"
    params = jax.tree.map(np.asarray, param_dict(model))
    extra = {}
    if model.quantization:
        extra["quantization"] = quant.meta(model.quantization, embeddings=model.quantized_embeddings)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, model="csm", config=model.cfg.to_dict(), dtype=dtype, params=params, **extra)
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


def _cast_tree(tree, dtypes: dict, default, prefix=""):
    """Each array of a nested dict to its dtype in the flat {name: dtype} (else `default`)."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        out[k] = (
            _cast_tree(v, dtypes, default, name) if isinstance(v, dict) else jnp.asarray(v, dtypes.get(name, default))
        )
    return out


def _flat(tree, prefix=""):
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from _flat(v, name)
        else:
            yield name, v
