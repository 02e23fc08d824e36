"""Does XLA fuse the int8 → activation-dtype convert into the dot? (`jaxtts.llama.dense` with int8 weights)

    python -m benchmarks.int8_fusion_check [--rows 1,64,512] [--dtype bfloat16] [--out DIR]

For each row count, compiles `dense(x [rows, K], QuantizedWeight(q [N, K], scale [N]))` at CSM-1B's
largest projection (K=2048, N=16384: backbone gate_up) and looks at the optimized HLO's entry
computation: if an instruction there produces the whole converted weight (`bf16[16384,2048]` for
bf16 activations), the convert is a separate kernel that writes the dequantized weight to memory
and the dot reads it back (no bandwidth saved at run time); otherwise the convert is inside the
dot's fusion. Also checks the result against x @ dequantized W. `--out` keeps each HLO text.

Seen on a CPU (jax 0.10.2): a separate convert fusion (`wrapped_convert`), then the dot. On a GPU,
XLA's Triton GEMM fusion is expected to take the convert into the GEMM's operand loads: this is
the check to run there (docs/QUANTIZATION.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxtts.llama import dense
from jaxtts.quantize import QuantizedWeight, quantize_array

K, N = 2048, 16384


def check(rows: int, dtype, out: Path | None = None) -> dict:
    w = jax.random.normal(jax.random.key(0), (K, N), jnp.float32) / K**0.5
    q, s = quantize_array(w)
    x = jax.random.normal(jax.random.key(1), (rows, K), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, q, s: dense(x, QuantizedWeight(q, s)))
    hlo = f.lower(x, q, s).compile().as_text()
    if out is not None:
        (out / f"int8_dense_rows{rows}_{jnp.dtype(dtype).name}.hlo.txt").write_text(hlo)
    entry = hlo[hlo.rfind("ENTRY") :]
    short = {"bfloat16": "bf16", "float32": "f32"}[jnp.dtype(dtype).name]
    materialized = f"{short}[{N},{K}]" in entry or f"{short}[{K},{N}]" in entry  # q is stored [N, K]
    got = f(x, q, s).astype(jnp.float32)
    ref = x.astype(jnp.float32) @ (q.T.astype(jnp.float32) * s)
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    return dict(rows=rows, convert_materialized=materialized, rel_err=err, entry=entry)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,64,512")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out", default=None, help="directory for the optimized HLO texts")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    print(jax.devices()[0].device_kind, jax.__version__)
    for rows in (int(r) for r in args.rows.split(",")):
        r = check(rows, jnp.dtype(args.dtype), out)
        verdict = "separate convert (weight materialized)" if r["convert_materialized"] else "convert fused"
        print(f"rows {rows:4d}: {verdict}; rel err vs x @ dequantized W {r['rel_err']:.1e}")
        print("\n".join("    " + line.strip()[:200] for line in r["entry"].splitlines()[1:12]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
