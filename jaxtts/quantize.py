"""8-bit weights: weight-only int8, symmetric, one float32 scale per output column.

A linear weight W [..., K, N] (stored [in, out]) becomes

    q = clip(round(W / s), -127, 127)  int8 [..., K, N],    s = max_k |W[..., k, n]| / 127  float32 [..., N]

(s = 1 for an all-zero column)

so every element is within s/2 of its original value, and a matmul computes
`(x @ q.astype(x.dtype)) * s` with float32 accumulation: the column scale commutes with the sum
over K, so applying it after the dot is exact up to rounding (`jaxtts.llama.dot_f32`; the Pallas
GEMV dequantizes in registers and scales in its epilogue).

Quantized: every projection of the backbone and the depth decoder (`qkv`, `out`, `gate_up`,
`down`), the decoder's input `projection`, `codebook0_head` and `audio_head` (a scale per codebook
and output column). Embeddings and norm scales stay in the model dtype.

In a module the int8 array takes the weight Param's place and a sibling Param `<name>_scale`
holds s (so `param_dict` and the Orbax checkpoint hold plain arrays: `attn.qkv` int8 beside
`attn.qkv_scale` float32); `weight(module, name)` hands a matmul either the plain array or a
`QuantizedWeight(q, scale)`. A model is quantized as a whole or not at all. A checkpoint's
config.json says how it is stored: `"quantization": {"method": "int8", "granularity":
"per_channel", "scale_dtype": "float32"}` (absent: not quantized).

This module imports nothing from the model code (the converter uses it too).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtts.errors import JaxttsError

METHODS = ("int8",)
GRANULARITY = "per_channel"
QMAX = 127
# The scale is max|w| times this float32 constant (not a division: XLA turns a division by a
# constant into this multiplication anyway, and the converter's NumPy must round the same way).
INV_QMAX = float(np.float32(1 / QMAX))
SCALE_SUFFIX = "_scale"
# The quantized weights, by attribute name (the last part of their parameter path).
QUANTIZED = ("qkv", "out", "gate_up", "down", "projection", "codebook0_head", "audio_head")


class QuantizedWeight(NamedTuple):
    """An int8 weight q [..., K, N] and its float32 column scales [..., N]: W ≈ q * scale."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    def select(self, i) -> QuantizedWeight:
        """The i-th matrix of a stack [L, K, N] (may be traced)."""
        return QuantizedWeight(self.q[i], self.scale[i])

    def dequantize(self, dtype=jnp.float32):
        return dequantize(self.q, self.scale, dtype)


# --- the arithmetic ---------------------------------------------------------------------------------


def check_method(method: str | None) -> str | None:
    """`method` if it is a known quantization (or None: none), else a one-line error."""
    if method is not None and method not in METHODS:
        raise JaxttsError(f"unknown quantization {method!r}; choose one of: {', '.join(METHODS)}")
    return method


@jax.jit
def quantize_array(w):
    """(q int8 [..., K, N], scale float32 [..., N]) of w, computed in float32."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=-2)
    scale = amax * jnp.float32(INV_QMAX)
    scale = jnp.where(scale > 0, scale, jnp.float32(1))  # an all-zero column: any scale is exact
    # Times the reciprocal, written out: XLA rewrites w / broadcast(s) so, and NumPy must match.
    q = jnp.clip(jnp.round(wf * (1 / scale)[..., None, :]), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def quantize_numpy(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`quantize_array` in NumPy (the converter's; the same float32 arithmetic, the same result)."""
    wf = np.asarray(w, np.float32)
    amax = np.max(np.abs(wf), axis=-2)
    scale = (amax * np.float32(INV_QMAX)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(wf * (np.float32(1) / scale)[..., None, :]), -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequantize(q, scale, dtype=jnp.float32):
    """q * scale (per column) in `dtype`."""
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None, :]).astype(dtype)


# --- checkpoint metadata ----------------------------------------------------------------------------


def meta(method: str) -> dict:
    """config.json's "quantization" entry for `method`."""
    check_method(method)
    return {"method": method, "granularity": GRANULARITY, "scale_dtype": "float32"}


def method_from_meta(entry, where: str = "config.json") -> str | None:
    """The method a config.json "quantization" entry names (None: absent), or a one-line error."""
    if entry is None:
        return None
    if not isinstance(entry, dict) or "method" not in entry:
        raise JaxttsError(f'{where}: "quantization" must be an object with a "method", got {entry!r}')
    method = entry["method"]
    if method not in METHODS:
        raise JaxttsError(f"{where}: unknown quantization method {method!r}; this jaxtts reads {', '.join(METHODS)}")
    granularity = entry.get("granularity", GRANULARITY)
    if granularity != GRANULARITY:
        raise JaxttsError(f"{where}: unsupported quantization granularity {granularity!r}; expected {GRANULARITY!r}")
    return method


def is_quantized_name(name: str) -> bool:
    """Whether the parameter path `a.b.name` names a weight that quantization replaces."""
    return name.rsplit(".", 1)[-1] in QUANTIZED


def is_scale_name(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last.endswith(SCALE_SUFFIX) and last[: -len(SCALE_SUFFIX)] in QUANTIZED


def check_layout(dtypes: dict, method: str | None, where: str, source: str = "config.json") -> None:
    """One-line error unless the flat {name: dtype} of stored parameters is the layout of
    `method` (as `source` gives it): every quantized weight int8 with its `_scale` sibling, or no
    int8 weight and no scale at all."""
    scales = sorted(n for n in dtypes if is_scale_name(n))
    for name, dtype in sorted(dtypes.items()):
        if not is_quantized_name(name):
            continue
        int8 = np.dtype(dtype) == np.int8
        if method is None and int8:
            raise JaxttsError(f"{where}: parameter {name} is stored as int8, but {source} names no quantization")
        if method is not None and not int8:
            raise JaxttsError(
                f"{where}: {source} says {method} quantization, but parameter {name} is stored as {np.dtype(dtype).name}"
            )
        if method is not None and name + SCALE_SUFFIX not in dtypes:
            raise JaxttsError(f"{where}: parameter {name + SCALE_SUFFIX} (the int8 column scales) is missing")
    if method is None and scales:
        raise JaxttsError(
            f"{where}: parameter {scales[0]} holds int8 column scales, but {source} names no quantization"
        )


def check_scales(scales: dict[str, jax.Array], where: str = "checkpoint") -> None:
    """One-line error if a scale is not finite and positive (a corrupt or hand-made checkpoint)."""
    if not scales:
        return
    names = sorted(scales)
    ok = np.asarray(jax.device_get(_scales_ok([scales[n] for n in names])))
    for name, good in zip(names, ok):
        if not good:
            raise JaxttsError(f"{where}: parameter {name} holds non-finite or non-positive int8 scales (corrupt?)")


@jax.jit
def _scales_ok(scales):
    return jnp.stack([jnp.all(jnp.isfinite(s) & (s > 0)) for s in scales])


# --- parameter trees and models ---------------------------------------------------------------------


def quantize_params(params: dict, method: str = "int8") -> dict:
    """A nested parameter dict with every weight of `QUANTIZED` replaced by its int8 array and a
    sibling `<name>_scale` (NumPy arrays in, NumPy arrays out: for the converter)."""
    check_method(method)
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out[key] = quantize_params(value, method)
        elif key in QUANTIZED and np.ndim(value) >= 2:
            out[key], out[f"{key}{SCALE_SUFFIX}"] = quantize_numpy(value)
        else:
            out[key] = value
    return out


def weight(module, name: str):
    """`module.<name>` as a matmul takes it: the array, or a `QuantizedWeight` when the module
    holds int8 with a `<name>_scale` sibling."""
    w = getattr(module, name)[...]
    scale = getattr(module, name + SCALE_SUFFIX, None)
    return w if scale is None else QuantizedWeight(w, scale[...])


def quantize_modules_(model, method: str = "int8"):
    """Quantize `model` in place (each weight of `QUANTIZED` becomes int8 + `<name>_scale`) and
    return it. Only for a model nothing has used yet: `jaxtts.generation.split_model` caches
    the split of a model it has seen (use `quantize_model` on those)."""
    from flax import nnx

    check_method(method)
    targets = []
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        for name in QUANTIZED:
            param = getattr(node, name, None)
            if isinstance(param, nnx.Param) and not hasattr(node, name + SCALE_SUFFIX):
                targets.append((node, name, param))
    for node, name, param in targets:
        q, scale = quantize_array(param[...])
        setattr(node, name, nnx.Param(q))
        setattr(node, name + SCALE_SUFFIX, nnx.Param(scale))
    return model


def quantize_model(model, method: str = "int8"):
    """A quantized copy of a bfloat16 / float32 CSM (the given model is left as it is; the copy
    shares its embeddings and norms). An already quantized model is returned as it is."""
    from flax import nnx

    check_method(method)
    if getattr(model, "quantization", None) == method:
        return model
    return quantize_modules_(nnx.clone(model), method)


def add_quantize_argument(parser) -> None:
    """`--quantize` for the commands that load CSM (jaxtts speak, jaxtts serve)."""
    parser.add_argument(
        "--quantize",
        default=None,
        choices=list(METHODS),
        help="int8: projections and heads as 8-bit weights with per-column scales, quantized at load time "
        "(an int8 checkpoint loads as int8 without it); --dtype is then that of activations and embeddings",
    )
