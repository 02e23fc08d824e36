"""Mimi checkpoints → jaxtts parameters (the tree described in jaxtts/mimi/model.py).

Two source layouts, told apart by their tensor names:
  moshi         Kyutai's `tokenizer-e351c8d8-checkpoint125.safetensors`: `encoder.model.N.conv.conv`,
                `…transformer.layers.N.self_attn.in_proj_weight` (fused q/k/v, RoPE over interleaved pairs),
                `quantizer.rvq_first` / `rvq_rest` with `_codebook.embedding_sum` / `cluster_usage`.
  transformers  `kyutai/mimi` (`MimiModel.save_pretrained`): `encoder.layers.N.conv`, split q/k/v whose
                q/k rows were permuted so that RoPE rotates halves, `quantizer.semantic_residual_vector_quantizer`.
Our model keeps moshi's interleaved RoPE, so transformers q/k rows are permuted back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from convert.safetensors_io import TensorFile, open_checkpoint
from jaxtts.errors import JaxttsError
from jaxtts.mimi.config import MIMI, MimiConfig
from jaxtts.mimi.model import param_specs

# Per-layout names. SEANet modules are numbered as in moshi's nn.Sequential (ELUs take numbers too).
_LAYOUTS = {
    "moshi": {
        "seanet": "{side}.model.{n}",
        "conv": ".conv.conv",
        "convtr": ".convtr.convtr",
        "transformer": "{side}_transformer.transformer.layers.{i}.",
        "downsample": "downsample.conv.conv.conv",
        "upsample": "upsample.convtr.convtr.convtr",
        "rvq": {"semantic": "quantizer.rvq_first.", "acoustic": "quantizer.rvq_rest."},
        "codebook": "vq.layers.{i}._codebook.",
        "embedding_sum": "embedding_sum",
        "layer": {
            "norm1": "norm1",
            "norm2": "norm2",
            "ff1": "linear1.weight",
            "ff2": "linear2.weight",
            "scale1": "layer_scale_1.scale",
            "scale2": "layer_scale_2.scale",
            # the released file fuses q/k/v; a live moshi state_dict names them in_projs.0 / out_projs.0
            "qkv": ["self_attn.in_proj_weight", "self_attn.in_projs.0.weight"],
            "out": ["self_attn.out_proj.weight", "self_attn.out_projs.0.weight"],
        },
    },
    "transformers": {
        "seanet": "{side}.layers.{n}",
        "conv": ".conv",
        "convtr": ".conv",
        "transformer": "{side}_transformer.layers.{i}.",
        "downsample": "downsample.conv",
        "upsample": "upsample.conv",
        "rvq": {
            "semantic": "quantizer.semantic_residual_vector_quantizer.",
            "acoustic": "quantizer.acoustic_residual_vector_quantizer.",
        },
        "codebook": "layers.{i}.codebook.",
        "embedding_sum": "embed_sum",
        "layer": {
            "norm1": "input_layernorm",
            "norm2": "post_attention_layernorm",
            "ff1": "mlp.fc1.weight",
            "ff2": "mlp.fc2.weight",
            "scale1": "self_attn_layer_scale.scale",
            "scale2": "mlp_layer_scale.scale",
            "q": "self_attn.q_proj.weight",
            "k": "self_attn.k_proj.weight",
            "v": "self_attn.v_proj.weight",
            "out": "self_attn.o_proj.weight",
        },
    },
}

# Buffers that carry no weights (the codebooks' "k-means done" flag).
_IGNORED_SUFFIXES = ("._initialized", ".initialized")


def detect_layout(names) -> str:
    names = list(names)
    if any(n.startswith("quantizer.rvq_first.") for n in names):
        return "moshi"
    if any(n.startswith("quantizer.semantic_residual_vector_quantizer.") for n in names):
        return "transformers"
    if any(n.startswith(("backbone.layers.", "backbone_model.", "depth_decoder.")) or n == "audio_head" for n in names):
        raise JaxttsError("this looks like a CSM checkpoint, not Mimi; convert it with `jaxtts-convert csm`")
    raise JaxttsError(
        "not a Mimi checkpoint: expected moshi (`quantizer.rvq_first.*`, `encoder.model.*`) or "
        "transformers (`quantizer.semantic_residual_vector_quantizer.*`) tensor names"
    )


def halves_to_interleaved(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo transformers' q/k row permutation: rows (i, i+D/2) of each head back to pairs (2i, 2i+1)."""
    rows, cols = w.shape
    hd = rows // num_heads
    return w.reshape(num_heads, 2, hd // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


class _Reader:
    """Reads named tensors as float32, checks their shapes, remembers what it used, reports progress.

    With `bar=None` it only checks names and shapes against the file header and hands back zero-strided
    stand-ins: a first, data-free pass, so that a bad checkpoint fails before any data is read.
    """

    def __init__(self, tf: TensorFile, bar=None):
        self.tf, self.bar, self.used = tf, bar, set()

    def __call__(self, names: str | list[str], shape: tuple) -> np.ndarray:
        names = [names] if isinstance(names, str) else names
        name = next((n for n in names if n in self.tf), None)
        if name is None:
            raise JaxttsError(f"checkpoint is missing tensor {names[0]!r}")
        got = tuple(self.tf.shape(name))
        if got != tuple(shape):
            raise JaxttsError(f"tensor {name!r} has shape {got}, expected {tuple(shape)} for Mimi")
        self.used.add(name)
        if self.bar is None:
            return np.broadcast_to(np.zeros((), np.float32), shape)
        a = np.asarray(self.tf[name], dtype=np.float32)
        self.bar.update(1)
        return a

    # Torch layouts → ours. Our spec's shapes give the source shapes to expect.
    def conv(self, prefix: str, spec: dict) -> dict:
        k, cin_g, cout = spec["w"].shape
        out = {"w": self(prefix + ".weight", (cout, cin_g, k)).transpose(2, 1, 0)}
        if "b" in spec:
            out["b"] = self(prefix + ".bias", (cout,))
        return out

    def convtr(self, prefix: str, spec: dict) -> dict:
        cin, k, cout_g = spec["w"].shape
        out = {"w": self(prefix + ".weight", (cin, cout_g, k)).transpose(0, 2, 1)}
        if "b" in spec:
            out["b"] = self(prefix + ".bias", (spec["b"].shape[0],))
        return out

    def linear(self, names, spec) -> np.ndarray:
        din, dout = spec.shape
        return self(names, (dout, din)).T


def _seanet(read: _Reader, lay: dict, side: str, spec: dict, cfg: MimiConfig) -> dict:
    def name(n, sub=""):
        return lay["seanet"].format(side=side, n=n) + sub

    def res(n, sp):
        return {
            "conv1": read.conv(name(n, ".block.1" + lay["conv"]), sp["conv1"]),
            "conv2": read.conv(name(n, ".block.3" + lay["conv"]), sp["conv2"]),
        }

    out = {"conv_in": read.conv(name(0, lay["conv"]), spec["conv_in"]), "blocks": {}}
    n = 1
    for i in range(len(cfg.ratios)):
        sp, blk = spec["blocks"][i], {"res": {}}
        if side == "decoder":  # ELU, transposed conv, residual blocks
            blk["up"] = read.convtr(name(n + 1, lay["convtr"]), sp["up"])
            n += 2
        for j in range(cfg.n_residual_layers):
            blk["res"][j] = res(n, sp["res"][j])
            n += 1
        if side == "encoder":  # residual blocks, ELU, strided conv
            blk["down"] = read.conv(name(n + 1, lay["conv"]), sp["down"])
            n += 2
        out["blocks"][i] = blk
    out["conv_out"] = read.conv(name(n + 1, lay["conv"]), spec["conv_out"])
    return out


def _transformer(read: _Reader, lay: dict, side: str, spec: dict, cfg: MimiConfig) -> dict:
    names, d, h = lay["layer"], cfg.dimension, cfg.num_heads
    layers = {}
    for i, sp in spec.items():
        prefix = lay["transformer"].format(side=side, i=i)

        def name(key, suffix=""):  # the candidate source names of one tensor
            v = names[key]
            return [prefix + n + suffix for n in (v if isinstance(v, list) else [v])]

        if "qkv" in names:  # moshi: fused, and rotating interleaved pairs as we do
            qkv = read.linear(name("qkv"), sp["qkv"])
        else:  # transformers: split, with q/k rows permuted for half rotation
            q, k, v = (read(name(x), (d, d)) for x in "qkv")
            qkv = np.concatenate([halves_to_interleaved(q, h).T, halves_to_interleaved(k, h).T, v.T], axis=1)
        layers[i] = {
            "norm1": {"scale": read(name("norm1", ".weight"), (d,)), "bias": read(name("norm1", ".bias"), (d,))},
            "qkv": qkv,
            "out": read.linear(name("out"), sp["out"]),
            "norm2": {"scale": read(name("norm2", ".weight"), (d,)), "bias": read(name("norm2", ".bias"), (d,))},
            "ff1": read.linear(name("ff1"), sp["ff1"]),
            "ff2": read.linear(name("ff2"), sp["ff2"]),
            "scale1": read(name("scale1"), (d,)),
            "scale2": read(name("scale2"), (d,)),
        }
    return layers


def _quantizer(read: _Reader, lay: dict, spec: dict, cfg: MimiConfig) -> dict:
    out = {}
    for part, sp in spec.items():
        p = lay["rvq"][part]
        d, q = sp["in_proj"].shape
        n, bins, _ = sp["codebooks"].shape
        words = []
        for i in range(n):
            c = p + lay["codebook"].format(i=i)
            emb_sum = read(c + lay["embedding_sum"], (bins, q))
            usage = read(c + "cluster_usage", (bins,))
            words.append(emb_sum / np.maximum(usage, np.float32(cfg.codebook_eps))[:, None])
        out[part] = {
            "in_proj": read(p + "input_proj.weight", (q, d, 1))[:, :, 0].T,
            "out_proj": read(p + "output_proj.weight", (d, q, 1))[:, :, 0].T,
            "codebooks": np.stack(words),
        }
    return out


def read_mimi_checkpoint(src: str | os.PathLike, *, progress: bool = False) -> tuple[MimiConfig, dict]:
    """Read a moshi or transformers Mimi checkpoint into (config, parameter tree of float32 arrays)."""
    tf = open_checkpoint(src)
    layout = detect_layout(tf.keys())
    lay, cfg = _LAYOUTS[layout], MIMI
    spec = param_specs(cfg)

    def build(read: _Reader) -> dict:
        return {
            "encoder": _seanet(read, lay, "encoder", spec["encoder"], cfg),
            "encoder_transformer": _transformer(read, lay, "encoder", spec["encoder_transformer"], cfg),
            "downsample": read.conv(lay["downsample"], spec["downsample"]),
            "quantizer": _quantizer(read, lay, spec["quantizer"], cfg),
            "upsample": read.convtr(lay["upsample"], spec["upsample"]),
            "decoder_transformer": _transformer(read, lay, "decoder", spec["decoder_transformer"], cfg),
            "decoder": _seanet(read, lay, "decoder", spec["decoder"], cfg),
        }

    dry = _Reader(tf)
    build(dry)  # names and shapes only
    weights = [n for n in tf.keys() if not n.endswith(_IGNORED_SUFFIXES)]
    unexpected = sorted(set(weights) - dry.used)
    if unexpected:
        raise JaxttsError(
            f"checkpoint has unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all); "
            f"it does not match the {layout} Mimi layout"
        )
    with tqdm(total=len(dry.used), desc=f"reading Mimi ({layout})", unit="tensor", disable=not progress) as bar:
        params = build(_Reader(tf, bar))
    return cfg, params


def convert_mimi(src, out, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert SRC into a jaxtts directory OUT (config.json + Orbax params), atomically."""
    from jaxtts.checkpoint import atomic_directory, write_checkpoint

    if not Path(src).exists():
        raise JaxttsError(f"{src}: no such file or directory")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        cfg, params = read_mimi_checkpoint(src, progress=progress)
        write_checkpoint(tmp, model="mimi", config=cfg.to_dict(), dtype="float32", params=params)
    return Path(out)
