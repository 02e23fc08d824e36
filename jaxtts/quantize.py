"""8-bit weights: weight-only int8, symmetric, one float32 scale per output column of each
projection and per row of each embedding table.

A linear weight W [..., K, N] (stored [in, out]) becomes

    q = clip(round(W / s), -127, 127)  int8,    s = max_k |W[..., k, n]| / 127  float32 [..., N]

(s = 1 for an all-zero column), with q stored transposed, [..., N, K] ([out, in], as PyTorch
stores a Linear): each output column's K weights are contiguous, the layout the int8 GEMV
kernels read fastest (20-35 % faster than [K, N] at CSM-1B's big projections on an H200,
docs/PERF.md #73); `QuantizedWeight.shape` still says [..., K, N], the matmul's shape

so every element is within s/2 of its original value, and a matmul computes
`(x @ qᵀ.astype(x.dtype)) * s` with float32 accumulation: the column scale commutes with the sum
over K, so applying it after the dot is exact up to rounding (`jaxtts.llama.dot_f32`; the Pallas
GEMV dequantizes in registers and scales in its epilogue).

Quantized: every projection of the backbone and the depth decoder (`qkv`, `out`, `gate_up`,
`down`), the decoder's input `projection`, `codebook0_head` and `audio_head` (a scale per codebook
and output column); and the embedding tables `text_embeddings` [V, D] and `audio_embeddings`
[32·V, D], which are only looked up: one scale per row (s = max_d |T[v, d]| / 127), and a lookup
gathers the int8 rows and their scales and dequantizes only those rows (`lookup`). Norm scales,
activations and the KV cache stay in the model dtype.

In a module the int8 array takes the weight Param's place and a sibling Param `<name>_scale`
holds s (so `param_dict` and the Orbax checkpoint hold plain arrays: `attn.qkv` int8 beside
`attn.qkv_scale` float32); `weight(module, name)` hands a matmul either the plain array or a
`QuantizedWeight(q, scale)`, `table(module, name)` hands a lookup the array or a
`QuantizedTable(q, scale)`. A model's projections are quantized as a whole or not at all. A
checkpoint's config.json says how each tensor is stored:
`"quantization": {"method": "int8", "granularity": "per_channel", "embeddings": "per_row",
"scale_dtype": "float32", "layout": "out_in"}` (absent: not quantized; no "embeddings": the tables
are stored in the model dtype, as int8 checkpoints written before the tables were quantized; no
"layout": the weights are stored [in, out], as int8 checkpoints written before 2026-12-04, and
`CSM.load` transposes them).

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
# The embedding tables [rows, D], quantized with one scale per row (they are only looked up).
EMBEDDINGS = ("text_embeddings", "audio_embeddings")
EMBEDDING_GRANULARITY = "per_row"


class QuantizedWeight(NamedTuple):
    """An int8 weight stored transposed, q [..., N, K], and its float32 column scales [..., N]:
    W [..., K, N] ≈ swapaxes(q) * scale. `shape` is W's."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple:
        *lead, n, k = self.q.shape
        return (*lead, k, n)

    @property
    def ndim(self) -> int:
        return self.q.ndim

    def select(self, i) -> QuantizedWeight:
        """The i-th matrix of a stack [L, K, N] (may be traced)."""
        return QuantizedWeight(self.q[i], self.scale[i])

    def dequantize(self, dtype=jnp.float32):
        return dequantize(self.q, self.scale, dtype)


class QuantizedTable(NamedTuple):
    """An int8 embedding table q [V, D] and its float32 row scales [V]: row v ≈ q[v] * scale[v]."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim


# --- the arithmetic ---------------------------------------------------------------------------------


def check_method(method: str | None) -> str | None:
    """`method` if it is a known quantization (or None: none), else a one-line error."""
    if method is not None and method not in METHODS:
        raise JaxttsError(f"unknown quantization {method!r}; choose one of: {', '.join(METHODS)}")
    return method


def _quantize_jnp(w, axis: int):
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=axis)
    scale = amax * jnp.float32(INV_QMAX)
    scale = jnp.where(scale > 0, scale, jnp.float32(1))  # an all-zero column/row: any scale is exact
    # Times the reciprocal, written out: XLA rewrites w / broadcast(s) so, and NumPy must match.
    q = jnp.clip(jnp.round(wf * jnp.expand_dims(1 / scale, axis)), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def _quantize_numpy(w, axis: int):
    wf = np.asarray(w, np.float32)
    amax = np.max(np.abs(wf), axis=axis)
    scale = (amax * np.float32(INV_QMAX)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(wf * np.expand_dims(np.float32(1) / scale, axis)), -QMAX, QMAX).astype(np.int8)
    return q, scale


@jax.jit
def quantize_array(w):
    """(q int8 [..., N, K], scale float32 [..., N]) of w [..., K, N], computed in float32 (q
    transposed: `QuantizedWeight`'s layout)."""
    q, scale = _quantize_jnp(w, -2)
    return jnp.swapaxes(q, -1, -2), scale


def quantize_numpy(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`quantize_array` in NumPy (the converter's; the same float32 arithmetic, the same result)."""
    q, scale = _quantize_numpy(w, -2)
    return np.ascontiguousarray(np.swapaxes(q, -1, -2)), scale


@jax.jit
def quantize_rows_array(t):
    """(q int8 [V, D], scale float32 [V]) of an embedding table t [V, D]: one scale per row."""
    return _quantize_jnp(t, -1)


def quantize_rows_numpy(t: np.ndarray, block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """`quantize_rows_array` in NumPy, `block` rows at a time (the float32 temporaries of
    CSM-1B's 128k-row text table stay small); the same bytes."""
    t = np.asarray(t)
    q, scale = np.empty(t.shape, np.int8), np.empty(t.shape[:-1], np.float32)
    for i in range(0, max(1, t.shape[0]), block):
        q[i : i + block], scale[i : i + block] = _quantize_numpy(t[i : i + block], -1)
    return q, scale


def dequantize(q, scale, dtype=jnp.float32):
    """W [..., K, N] in `dtype` from q [..., N, K] (stored transposed) and its column scales."""
    return jnp.swapaxes(q.astype(jnp.float32) * scale.astype(jnp.float32)[..., :, None], -1, -2).astype(dtype)


def dequantize_rows(q, scale, dtype=jnp.float32):
    """q * scale (per row: q [..., D], scale [...]) in `dtype`."""
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)


def lookup(table, ids, dtype):
    """Rows `ids` (any shape) of an embedding table (an array or a `QuantizedTable`) in `dtype`:
    [*ids.shape, D]. An int8 table gathers the int8 rows and their scales and dequantizes those
    rows only, never the whole table."""
    if isinstance(table, QuantizedTable):
        return dequantize_rows(table.q[ids], table.scale[ids], dtype)
    return table[ids].astype(dtype)


# --- checkpoint metadata ----------------------------------------------------------------------------


# How int8 projections are stored: "out_in" = [..., N, K] (`QuantizedWeight`'s layout, written
# since 2026-12-04), "in_out" = [..., K, N] (earlier int8 checkpoints: no "layout" entry).
LAYOUT = "out_in"
LEGACY_LAYOUT = "in_out"


class Scheme(NamedTuple):
    """How a checkpoint's tensors are stored (config.json's "quantization" entry, parsed):
    `method` for the projections and heads (one scale per output column), whether the
    embedding tables are int8 too (one scale per row), and the projections' `layout`."""

    method: str
    embeddings: bool
    layout: str = LAYOUT


def meta(method: str, embeddings: bool = True) -> dict:
    """config.json's "quantization" entry for `method` (with int8 embedding tables unless
    `embeddings` is False)."""
    check_method(method)
    out = {"method": method, "granularity": GRANULARITY}
    if embeddings:
        out["embeddings"] = EMBEDDING_GRANULARITY
    out["scale_dtype"] = "float32"
    out["layout"] = LAYOUT
    return out


def scheme_from_meta(entry, where: str = "config.json") -> Scheme | None:
    """The storage a config.json "quantization" entry names (None: absent), or a one-line error."""
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
    embeddings = entry.get("embeddings")
    if embeddings not in (None, EMBEDDING_GRANULARITY):
        raise JaxttsError(
            f"{where}: unsupported embedding quantization {embeddings!r}; expected {EMBEDDING_GRANULARITY!r} "
            '(or no "embeddings" entry: tables in the model dtype)'
        )
    scale_dtype = entry.get("scale_dtype", "float32")
    if scale_dtype != "float32":
        raise JaxttsError(f"{where}: unsupported quantization scale_dtype {scale_dtype!r}; expected 'float32'")
    layout = entry.get("layout", LEGACY_LAYOUT)
    if layout not in (LAYOUT, LEGACY_LAYOUT):
        raise JaxttsError(
            f"{where}: unsupported int8 weight layout {layout!r}; expected {LAYOUT!r} (or {LEGACY_LAYOUT!r})"
        )
    return Scheme(method, embeddings is not None, layout)


def method_from_meta(entry, where: str = "config.json") -> str | None:
    """The method a config.json "quantization" entry names (None: absent), or a one-line error."""
    scheme = scheme_from_meta(entry, where)
    return None if scheme is None else scheme.method


def is_quantized_name(name: str) -> bool:
    """Whether the parameter path `a.b.name` names a projection or head that quantization replaces."""
    return name.rsplit(".", 1)[-1] in QUANTIZED


def is_embedding_name(name: str) -> bool:
    """Whether the parameter path names an embedding table (int8 with row scales when quantized)."""
    return name.rsplit(".", 1)[-1] in EMBEDDINGS


def is_scale_name(name: str) -> bool:
    """Whether the parameter path names the scales of an int8 weight or table."""
    last = name.rsplit(".", 1)[-1]
    return last.endswith(SCALE_SUFFIX) and last[: -len(SCALE_SUFFIX)] in QUANTIZED + EMBEDDINGS


def check_layout(
    dtypes: dict, method: str | None, where: str, source: str = "config.json", *, embeddings: bool = False
) -> None:
    """One-line error unless the flat {name: dtype} of stored parameters is the layout `source`
    gives: with `method`, every projection and head int8 with its `_scale` sibling, and the
    embedding tables too when `embeddings`; without, no int8 tensor and no scale at all."""
    says_not = "names no quantization" if method is None else "keeps the embedding tables in the model dtype"
    for name, dtype in sorted(dtypes.items()):
        is_table = is_embedding_name(name)
        if not (is_table or is_quantized_name(name)):
            continue
        expect = method is not None and (embeddings or not is_table)
        int8 = np.dtype(dtype) == np.int8
        if int8 and not expect:
            raise JaxttsError(f"{where}: parameter {name} is stored as int8, but {source} {says_not}")
        if expect and not int8:
            what = f"says {method} quantization" + (" of the embedding tables" if is_table else "")
            raise JaxttsError(f"{where}: {source} {what}, but parameter {name} is stored as {np.dtype(dtype).name}")
        if expect and name + SCALE_SUFFIX not in dtypes:
            kind = "the int8 row scales" if is_table else "the int8 column scales"
            raise JaxttsError(f"{where}: parameter {name + SCALE_SUFFIX} ({kind}) is missing")
        if not expect and name + SCALE_SUFFIX in dtypes:
            raise JaxttsError(f"{where}: parameter {name + SCALE_SUFFIX} holds int8 scales, but {source} {says_not}")
    for name in sorted(dtypes):
        if is_scale_name(name) and name[: -len(SCALE_SUFFIX)] not in dtypes:
            raise JaxttsError(f"{where}: parameter {name} holds int8 scales of no stored weight")


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


def quantize_params(params: dict, method: str = "int8", *, embeddings: bool = True) -> dict:
    """A nested parameter dict with every weight of `QUANTIZED` (and, with `embeddings`, every
    table of `EMBEDDINGS`: one scale per row) replaced by its int8 array and a sibling
    `<name>_scale` (NumPy arrays in, NumPy arrays out: for the converter)."""
    check_method(method)
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out[key] = quantize_params(value, method, embeddings=embeddings)
        elif key in QUANTIZED and np.ndim(value) >= 2:
            out[key], out[f"{key}{SCALE_SUFFIX}"] = quantize_numpy(value)
        elif embeddings and key in EMBEDDINGS and np.ndim(value) == 2:
            out[key], out[f"{key}{SCALE_SUFFIX}"] = quantize_rows_numpy(value)
        else:
            out[key] = value
    return out


def transpose_projections(tree: dict) -> dict:
    """The nested parameter dict with the last two axes of each int8 projection and head swapped
    (arrays or ShapeDtypeStructs): between the "in_out" layout of older int8 checkpoints and
    `LAYOUT`."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = transpose_projections(value)
        elif key in QUANTIZED and np.dtype(value.dtype) == np.int8 and len(value.shape) >= 2:
            if isinstance(value, jax.ShapeDtypeStruct):
                out[key] = jax.ShapeDtypeStruct((*value.shape[:-2], value.shape[-1], value.shape[-2]), value.dtype)
            else:
                out[key] = jnp.swapaxes(value, -1, -2)
        else:
            out[key] = value
    return out


def weight(module, name: str):
    """`module.<name>` as a matmul takes it: the array, or a `QuantizedWeight` when the module
    holds int8 with a `<name>_scale` sibling."""
    w = getattr(module, name)[...]
    scale = getattr(module, name + SCALE_SUFFIX, None)
    return w if scale is None else QuantizedWeight(w, scale[...])


def table(module, name: str):
    """The embedding table `module.<name>` as `lookup` takes it: the array, or a `QuantizedTable`
    when the module holds int8 rows with a `<name>_scale` sibling."""
    t = getattr(module, name)[...]
    scale = getattr(module, name + SCALE_SUFFIX, None)
    return t if scale is None else QuantizedTable(t, scale[...])


def quantize_modules_(model, method: str = "int8", *, embeddings: bool = True):
    """Quantize `model` in place (each weight of `QUANTIZED` becomes int8 + `<name>_scale`, and
    with `embeddings` each table of `EMBEDDINGS` int8 + row scales; those already int8 are left
    as they are) and return it. Only for a model nothing has used yet:
    `jaxtts.generation.split_model` caches the split of a model it has seen (use
    `quantize_model` on those)."""
    from flax import nnx

    check_method(method)
    targets = []
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        for name in QUANTIZED + (EMBEDDINGS if embeddings else ()):
            param = getattr(node, name, None)
            if isinstance(param, nnx.Param) and not hasattr(node, name + SCALE_SUFFIX):
                targets.append((node, name, param))
    for node, name, param in targets:
        q, scale = (quantize_rows_array if name in EMBEDDINGS else quantize_array)(param[...])
        setattr(node, name, nnx.Param(q))
        setattr(node, name + SCALE_SUFFIX, nnx.Param(scale))
    return model


def quantize_model(model, method: str = "int8", *, embeddings: bool = True):
    """A quantized copy of a bfloat16 / float32 CSM (the given model is left as it is; the copy
    shares its norms, and its embedding tables when `embeddings` is False). A model already
    quantized so is returned as it is."""
    from flax import nnx

    check_method(method)
    if getattr(model, "quantization", None) == method and (
        not embeddings or getattr(model, "quantized_embeddings", False)
    ):
        return model
    return quantize_modules_(nnx.clone(model), method, embeddings=embeddings)


def add_quantize_argument(parser) -> None:
    """`--quantize` for the commands that load CSM (jaxtts speak, jaxtts serve)."""
    parser.add_argument(
        "--quantize",
        default=None,
        choices=list(METHODS),
        help="int8: projections and heads as 8-bit weights with per-column scales, embedding tables with "
        "per-row scales, quantized at load time (an int8 checkpoint loads as int8 without it); --dtype is "
        "then that of activations and norms",
    )
