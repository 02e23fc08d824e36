"""CSM checkpoints → jaxtts parameters.

Two source layouts, told apart by their tensor names:
  original      Sesame's `model.safetensors`: torchtune names (`backbone.layers.N.attn.q_proj`),
                RoPE over interleaved pairs.
  transformers  `CsmForConditionalGeneration` (`backbone_model.layers.N.self_attn.q_proj`),
                RoPE over halves.
Our model rotates halves, stores weights [in, out], fuses q/k/v and gate/up (see jaxtts/llama.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from convert.safetensors_io import TensorFile, open_checkpoint
from jaxtts.config import CSM_1B, CSMConfig
from jaxtts.errors import JaxttsError

# Per-layer names in each layout: our name → source suffix.
_LAYER_NAMES = {
    "original": {
        "q": "attn.q_proj.weight",
        "k": "attn.k_proj.weight",
        "v": "attn.v_proj.weight",
        "o": "attn.output_proj.weight",
        "gate": "mlp.w1.weight",
        "up": "mlp.w3.weight",
        "down": "mlp.w2.weight",
        "attn_norm": "sa_norm.scale",
        "mlp_norm": "mlp_norm.scale",
    },
    "transformers": {
        "q": "self_attn.q_proj.weight",
        "k": "self_attn.k_proj.weight",
        "v": "self_attn.v_proj.weight",
        "o": "self_attn.o_proj.weight",
        "gate": "mlp.gate_proj.weight",
        "up": "mlp.up_proj.weight",
        "down": "mlp.down_proj.weight",
        "attn_norm": "input_layernorm.weight",
        "mlp_norm": "post_attention_layernorm.weight",
    },
}
_STACKS = {
    "original": {"backbone": "backbone.", "decoder": "decoder."},
    "transformers": {"backbone": "backbone_model.", "decoder": "depth_decoder.model."},
}
_NORM = {"original": "norm.scale", "transformers": "norm.weight"}
# Top-level tensors: our name → candidate source names (first present wins).
_TOP = {
    "original": {
        "text_embeddings": ["text_embeddings.weight"],
        "audio_embeddings": ["audio_embeddings.weight"],
        "projection": ["projection.weight"],
        "codebook0_head": ["codebook0_head.weight"],
        "audio_head": ["audio_head"],
    },
    "transformers": {
        "text_embeddings": ["embed_text_tokens.weight", "backbone_model.embed_tokens.embed_text_tokens.weight"],
        "audio_embeddings": [
            "backbone_model.embed_tokens.embed_audio_tokens.weight",
            "depth_decoder.model.embed_tokens.weight",
        ],
        "projection": ["depth_decoder.model.inputs_embeds_projector.weight"],
        "codebook0_head": ["lm_head.weight"],
        "audio_head": ["depth_decoder.codebooks_head.weight"],
    },
}


def detect_format(names) -> str:
    names = set(names)
    if "audio_head" in names and any(n.startswith("backbone.layers.") for n in names):
        return "original"
    if any(n.startswith("backbone_model.layers.") for n in names) and "depth_decoder.codebooks_head.weight" in names:
        return "transformers"
    if any(n.startswith(("encoder.", "decoder.model.", "quantizer.")) for n in names):
        raise JaxttsError("this looks like a Mimi codec checkpoint; convert it with `jaxtts-convert mimi`")
    raise JaxttsError(
        "not a CSM checkpoint: expected original (`backbone.layers.*`, `audio_head`) or "
        "transformers (`backbone_model.*`, `depth_decoder.*`) tensor names"
    )


def _first(tf: TensorFile, candidates: list[str]) -> str:
    for name in candidates:
        if name in tf:
            return name
    raise JaxttsError(f"checkpoint is missing tensor {candidates[0]!r}")


def _num_layers(names, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    idx = {int(m.group(1)) for n in names if (m := pat.match(n))}
    if not idx:
        raise JaxttsError(f"checkpoint has no layers under {prefix!r}")
    if idx != set(range(len(idx))):
        raise JaxttsError(f"checkpoint layers under {prefix!r} are not numbered 0..{len(idx) - 1}")
    return len(idx)


def infer_dims(tf: TensorFile, fmt: str) -> dict:
    """The sizes the tensor shapes decide (head counts and RoPE settings they do not)."""
    top = {k: _first(tf, v) for k, v in _TOP[fmt].items()}
    text_vocab, d_bb = tf.shape(top["text_embeddings"])
    heads_minus_one, d_dec, audio_vocab = tf.shape(top["audio_head"])
    dims = {"text_vocab_size": text_vocab, "audio_vocab_size": audio_vocab, "audio_num_codebooks": heads_minus_one + 1}
    for stack in ("backbone", "decoder"):
        prefix = _STACKS[fmt][stack]
        gate = f"{prefix}layers.0.{_LAYER_NAMES[fmt]['gate']}"
        if gate not in tf:
            raise JaxttsError(f"checkpoint is missing tensor {gate!r}")
        dims[stack] = {
            "num_layers": _num_layers(tf.keys(), prefix),
            "embed_dim": d_bb if stack == "backbone" else d_dec,
            "intermediate_dim": tf.shape(gate)[0],
        }
    return dims


def _matches(cfg: CSMConfig, dims: dict) -> bool:
    for stack in ("backbone", "decoder"):
        c = getattr(cfg, stack)
        if any(getattr(c, k) != v for k, v in dims[stack].items()):
            return False
    return all(getattr(cfg, k) == dims[k] for k in ("text_vocab_size", "audio_vocab_size", "audio_num_codebooks"))


def _describe(dims: dict) -> str:
    b, d = dims["backbone"], dims["decoder"]
    return (
        f"backbone {b['num_layers']} layers × {b['embed_dim']}, decoder {d['num_layers']} layers × "
        f"{d['embed_dim']}, {dims['audio_num_codebooks']} codebooks"
    )


def interleaved_to_halves(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder q/k output rows of each head from torchtune's (0,1),(2,3).. pairs to (i, i+D/2)."""
    rows, cols = w.shape
    hd = rows // num_heads
    perm = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])
    return w.reshape(num_heads, hd, cols)[:, perm].reshape(rows, cols)


class _Reader:
    """Reads named tensors, checks their shapes, reports progress.

    With `bar=None` it only checks names and shapes against the file header and hands back
    zero-strided stand-ins: a first, data-free pass, so that a bad checkpoint fails before
    any progress is shown or gigabytes are read.
    """

    def __init__(self, tf: TensorFile, bar=None):
        self.tf, self.bar = tf, bar

    def __call__(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.tf:
            raise JaxttsError(f"checkpoint is missing tensor {name!r}")
        got = self.tf.shape(name)
        if tuple(got) != tuple(shape):
            raise JaxttsError(f"tensor {name!r} has shape {tuple(got)}, expected {tuple(shape)} for this config")
        if self.bar is None:
            return np.broadcast_to(np.zeros((), np.float32), shape)
        a = np.asarray(self.tf[name], dtype=np.float32)
        self.bar.update(1)
        return a


def _stack_params(read: _Reader, fmt: str, stack: str, cfg) -> dict:
    prefix = _STACKS[fmt][stack]
    names = _LAYER_NAMES[fmt]
    d, h, hkv, hd, i = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_dim
    layers = {}
    for n in range(cfg.num_layers):
        p = f"{prefix}layers.{n}."
        q, k = read(p + names["q"], (h * hd, d)), read(p + names["k"], (hkv * hd, d))
        v = read(p + names["v"], (hkv * hd, d))
        if fmt == "original":
            q, k = interleaved_to_halves(q, h), interleaved_to_halves(k, hkv)
        layers[n] = {
            "attn_norm": {"scale": read(p + names["attn_norm"], (d,))},
            "attn": {"qkv": np.concatenate([q.T, k.T, v.T], axis=1), "out": read(p + names["o"], (d, h * hd)).T},
            "mlp_norm": {"scale": read(p + names["mlp_norm"], (d,))},
            "mlp": {
                "gate_up": np.concatenate([read(p + names["gate"], (i, d)).T, read(p + names["up"], (i, d)).T], axis=1),
                "down": read(p + names["down"], (d, i)).T,
            },
        }
    return {"layers": layers, "norm": {"scale": read(prefix + _NORM[fmt], (d,))}}


def num_tensors(cfg: CSMConfig) -> int:
    return 5 + 9 * (cfg.backbone.num_layers + cfg.decoder.num_layers) + 2


def read_csm_checkpoint(
    src: str | os.PathLike, config: CSMConfig | None = None, *, allow_pickle: bool = False, progress: bool = False
) -> tuple[CSMConfig, dict]:
    """Read an original or transformers CSM checkpoint into (config, parameter dict of float32 arrays)."""
    tf = open_checkpoint(src, allow_pickle=allow_pickle)
    fmt = detect_format(tf.keys())
    dims = infer_dims(tf, fmt)
    if config is None:
        if not _matches(CSM_1B, dims):
            raise JaxttsError(
                f"checkpoint is not CSM-1B ({_describe(dims)}); pass --config with its sizes "
                "(JSON keys as the torchtune builder: backbone/decoder num_layers, num_heads, ...)"
            )
        config = CSM_1B
    cfg = config
    nb, vocab = cfg.audio_num_codebooks, cfg.audio_vocab_size
    d_bb, d_dec = cfg.backbone.embed_dim, cfg.decoder.embed_dim
    top = {k: _first(tf, v) for k, v in _TOP[fmt].items()}

    def build(read: _Reader) -> dict:
        return {
            "backbone": _stack_params(read, fmt, "backbone", cfg.backbone),
            "decoder": _stack_params(read, fmt, "decoder", cfg.decoder),
            "text_embeddings": read(top["text_embeddings"], (cfg.text_vocab_size, d_bb)),
            "audio_embeddings": read(top["audio_embeddings"], (nb * vocab, d_bb)),
            "projection": read(top["projection"], (d_dec, d_bb)).T,
            "codebook0_head": read(top["codebook0_head"], (vocab, d_bb)).T,
            "audio_head": read(top["audio_head"], (nb - 1, d_dec, vocab)),
        }

    build(_Reader(tf))  # names and shapes only
    with tqdm(total=num_tensors(cfg), desc="reading CSM", unit="tensor", disable=not progress) as bar:
        params = build(_Reader(tf, bar))
    return cfg, params


def convert_csm(
    src,
    out,
    *,
    config: CSMConfig | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    quantize: str | None = None,
) -> Path:
    """Convert SRC into a jaxtts directory OUT (config.json + Orbax params), atomically.

    quantize="int8": the projections and heads are stored as int8 with float32 column scales,
    the embedding tables as int8 with float32 row scales (`jaxtts.quantize`), quantized from the
    float32 values read; `dtype` is then the dtype of the rest (the norms)."""
    import ml_dtypes

    from jaxtts import quantize as quant
    from jaxtts.checkpoint import atomic_directory, write_checkpoint

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
    if np_dtype is None:
        raise JaxttsError(f"unknown dtype {dtype!r}; choose float32 or bfloat16")
    quant.check_method(quantize)
    if not Path(src).exists():
        raise JaxttsError(f"{src}: no such file or directory")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        cfg, params = read_csm_checkpoint(src, config, allow_pickle=allow_pickle, progress=progress)
        extra = {}
        if quantize:
            params = quant.quantize_params(params, quantize)
            extra["quantization"] = quant.meta(quantize)
        params = _cast(params, np_dtype)
        write_checkpoint(tmp, model="csm", config=cfg.to_dict(), dtype=dtype, params=params, **extra)
    return Path(out)


def _cast(tree, dtype):
    """Floating-point arrays to `dtype`; int8 weights and their float32 scales as they are."""
    from jaxtts.quantize import SCALE_SUFFIX

    if isinstance(tree, dict):
        return {k: (v if str(k).endswith(SCALE_SUFFIX) else _cast(v, dtype)) for k, v in tree.items()}
    if np.asarray(tree).dtype == np.int8:
        return np.ascontiguousarray(tree)
    return np.ascontiguousarray(tree, dtype=dtype)
