"""Which kernels does a decode frame of an int8 model take, against bf16? (no GPU needed)

    python -m benchmarks.int8_kernel_path [--preset csm-1b] [--batch 1] [--attention pallas]

Traces one frame of the decode loop (`jaxtts.generation._decode_chunk`, one frame per call) for
the bf16 model and its int8 copy (abstract weights: nothing is allocated or compiled, so this
runs on a CPU in seconds even for CSM-1B) under `default_options()` of a GPU (`--attention
pallas`; `pallas_interpret` traces the same program) and walks the jaxpr, scans multiplied out:

- the Pallas kernels per frame by name, and how many of them read an int8 weight;
- the XLA dots (`dot_general`) per frame whose weight operand is a stored weight or a slice of
  one, with that weight's stored dtype: what is *not* in a kernel;
- converts of a whole int8 weight or table that do not feed a dot directly (a dequantize of the
  whole weight in the loop, which XLA could not fuse into a GEMM: there should be none).

The numbers are per frame of `--batch` rows; the projected audio table is an input (it is built
once per model, outside the loop).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from jaxtts.config import preset
from jaxtts.csm import CSM, param_dict
from jaxtts.llama import KVCache
from jaxtts.options import DecodeOptions, default_options


def _abstract_state(model: CSM, batch: int, cache_len: int):
    from jaxtts.generation import DecodeState

    cfg = model.cfg.backbone
    kv = jax.ShapeDtypeStruct((batch, cache_len, cfg.num_kv_heads, cfg.head_dim), model.dtype)
    return DecodeState(
        cache=KVCache(k=[kv] * cfg.num_layers, v=[kv] * cfg.num_layers),
        hidden=jax.ShapeDtypeStruct((batch, cfg.embed_dim), model.dtype),
        position=jax.ShapeDtypeStruct((batch,), jnp.int32),
        key=jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.zeros((batch,), jnp.uint32))),
        done=jax.ShapeDtypeStruct((batch,), jnp.bool_),
    )


def frame_jaxpr(model: CSM, opts: DecodeOptions, batch: int = 1, cache_len: int = 256):
    """The jaxpr of one decode frame of `model` (abstract or concrete) under `opts`."""
    from flax import nnx

    from jaxtts import generation
    from jaxtts.sampling import Sampler

    graphdef, weights = nnx.split(model)
    weights = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), weights)
    state = _abstract_state(model, batch, cache_len)
    table = None
    if opts.audio_table and opts.pallas:
        cfg = model.cfg
        rows = cfg.audio_num_codebooks * cfg.audio_vocab_size
        table = jax.ShapeDtypeStruct((rows, cfg.decoder.embed_dim), model.dtype)
    sampler = Sampler.create(0.9, 50)

    def frame(weights, state, table):
        return generation._decode_chunk(graphdef, weights, state, sampler, 1, opts, table)

    return jax.make_jaxpr(frame)(weights, state, table)


def _sub_jaxprs(eqn):
    """(jaxpr, multiplier) of each sub-computation of an equation (a scan's body counts `length` times)."""
    mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr, mult
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v, mult


def _kernel_name(eqn) -> str:
    info = eqn.params.get("name_and_src_info")
    return getattr(info, "name", None) or str(eqn.params.get("name", "pallas_call"))


def kernel_path(jaxpr, weight_shapes: dict) -> dict:
    """Walk a (closed) jaxpr: Pallas kernels, XLA dots on stored weights, whole-weight converts.

    weight_shapes: {shape: dtype name} of the stored 2-D/3-D weights and tables (a dot's operand of
    such a shape, or of a stack's [K, N] slice, is a weight)."""
    kernels, kernels_int8, dots = Counter(), Counter(), Counter()
    loose_converts = Counter()
    matrix_shapes = {s[-2:]: d for s, d in weight_shapes.items()}

    def walk(jx, mult):
        # A var produced by converting an int8 array (its source shape), within this jaxpr.
        from_int8 = {}
        consumers = Counter()
        for eqn in jx.eqns:
            for v in eqn.invars:
                if isinstance(v, jax.extend.core.Var):
                    consumers[v] += 1
        for eqn in jx.eqns:
            name = eqn.primitive.name
            if name == "pallas_call":
                k = _kernel_name(eqn)
                kernels[k] += mult
                if any(getattr(v.aval, "dtype", None) == jnp.int8 and v.aval.ndim >= 2 for v in eqn.invars):
                    kernels_int8[k] += mult
                continue
            if name == "convert_element_type":
                (src,) = eqn.invars
                aval = getattr(src, "aval", None)
                if aval is not None and aval.dtype == jnp.int8 and tuple(aval.shape[-2:]) in matrix_shapes:
                    from_int8[eqn.outvars[0]] = tuple(aval.shape)
            if name == "dot_general":
                lhs, rhs = eqn.invars
                shape = tuple(rhs.aval.shape)
                if rhs in from_int8:
                    dots[(f"{shape}", "int8")] += mult
                elif shape[-2:] in matrix_shapes and rhs.aval.ndim >= 2:
                    dots[(f"{shape}", str(rhs.aval.dtype))] += mult
            for sub, m in _sub_jaxprs(eqn):
                walk(sub, mult * m)
        # int8 → float converts of a whole weight whose result feeds anything but a dot
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general":
                for v in eqn.invars:
                    if v in from_int8:
                        consumers[v] -= 1
        for var, shape in from_int8.items():
            if consumers[var] > 0:
                loose_converts[str(shape)] += mult

    walk(getattr(jaxpr, "jaxpr", jaxpr), 1)
    return dict(
        kernels=dict(sorted(kernels.items())),
        kernels_total=sum(kernels.values()),
        kernels_reading_int8=dict(sorted(kernels_int8.items())),
        xla_dots_on_weights={f"{s} {d}": n for (s, d), n in sorted(dots.items())},
        whole_int8_converts_not_into_a_dot=dict(loose_converts),
    )


def weight_shapes(model: CSM) -> dict:
    leaves = jax.tree.leaves(param_dict(model))
    return {tuple(a.shape): np.dtype(a.dtype).name for a in leaves if len(a.shape) >= 2}


def compare(cfg, opts: DecodeOptions, batch: int = 1, dtype="bfloat16") -> dict:
    """kernel_path of one frame for the bf16 model and its int8 copy (abstract weights)."""
    out = {}
    for name, quantization in (("bf16", None), ("int8", "int8")):
        model = CSM.abstract(cfg, dtype, quantization)
        out[name] = kernel_path(frame_jaxpr(model, opts, batch), weight_shapes(model))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attention", default="pallas", choices=["pallas", "pallas_interpret", "xla"])
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    # A GPU's options (on a CPU, default_options() would be plain XLA): kernels on, no tuned table
    # unless this is that GPU.
    opts = default_options(attention=args.attention)
    if jax.default_backend() != "gpu" and args.attention != "xla":
        opts = DecodeOptions(attention=args.attention, top_k_method="rank")
    res = compare(preset(args.preset), opts, args.batch)
    res["options"] = {k: v for k, v in vars(opts).items() if k != "matvec_tuned"}
    res["batch"] = args.batch
    for name in ("bf16", "int8"):
        r = res[name]
        print(f"== {name}: {r['kernels_total']} Pallas kernels per frame")
        for k, n in r["kernels"].items():
            print(f"   {k:24s} {n:5d}   reading int8: {r['kernels_reading_int8'].get(k, 0)}")
        print("   XLA dots on stored weights per frame:", r["xla_dots_on_weights"] or "none")
        print("   whole int8 weights converted outside a dot:", r["whole_int8_converts_not_into_a_dot"] or "none")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
