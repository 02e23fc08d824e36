"""GPU check of the fused decode step (pallas_kernels/fused_decode.py) inside CSM-1B.

    python -m benchmarks.fused_check [--out FILE]

Random full-size CSM-1B in bf16. 1. Correctness: one backbone step and one depth-decoder step
through the fused kernels vs the unfused Pallas path (same weights, same cache): relative error
of the hidden state and of the written cache slots. 2. Speed: ms per frame (batch 1, chunks of 16
frames, median of 4 chunks) and GPU kernels per frame (CUPTI) with the fused step on and off.
"On" and "off" are two `DecodeOptions` values (`fused_step=True / False` on this device's
`default_options(attention="pallas")`), so two compiled programs.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._report import log, write_log


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def correctness(model, state, base) -> bool:
    from jaxtts import llama
    from jaxtts.generation import frame_rows

    ok = True
    frame = jnp.ones((1, 32), jnp.int32) * 7
    tokens, mask = frame_rows(frame)
    x_dec = jax.random.normal(jax.random.key(1), (1, 1, model.cfg.backbone.embed_dim), model.dtype)
    pos_dec = jnp.array([5], jnp.int32)
    dec_cache = model.decoder_cache(1)
    dec_cache = llama.KVCache(
        k=[jax.random.normal(jax.random.key(i), c.shape, c.dtype) for i, c in enumerate(dec_cache.k)],
        v=[jax.random.normal(jax.random.key(9 + i), c.shape, c.dtype) for i, c in enumerate(dec_cache.v)],
    )
    outs = {}
    for fused in (False, True):
        opts = base.replace(fused_step=fused)
        bb = jax.jit(lambda m, c, p, opts=opts: m.run_backbone(tokens, mask, p, c, opts=opts))
        cache = jax.tree.map(jnp.copy, state.cache)
        h, c = bb(model, cache, state.position)
        dc = jax.tree.map(jnp.copy, dec_cache)
        hd, cd = jax.jit(lambda m, c, opts=opts: m.run_decoder(x_dec, pos_dec, c, opts=opts))(model, dc)
        p = int(state.position[0])
        outs[fused] = (h, [k[0, p] for k in c.k], hd, [k[0, 5] for k in cd.k] + [v[0, 5] for v in cd.v])
    for name, i in (("backbone hidden", 0), ("backbone new keys", 1), ("depth hidden", 2), ("depth new k/v", 3)):
        a, b = outs[True][i], outs[False][i]
        err = _rel(jnp.stack(a) if isinstance(a, list) else a, jnp.stack(b) if isinstance(b, list) else b)
        good = err < 3e-2
        ok &= good
        log(f"| {name} | {err:.2e} | {'yes' if good else 'NO'} |")
    return ok


def timings(model, base) -> dict:
    from benchmarks.profile import kernel_profile
    from jaxtts import bench
    from jaxtts.sampling import Sampler

    sampler = Sampler.create(0.9, 50)
    res = {}
    for name, fused in (("unfused", False), ("fused", True)):
        opts = base.replace(fused_step=fused)
        try:
            ms = 1000 * bench.time_decode(model, sampler, batch=1, chunk=16, reps=4, prompt_tokens=100, opts=opts)
            prof = kernel_profile(model, sampler, chunk=16, prompt_tokens=100, opts=opts, top=12)
            res[name] = dict(ms=ms, **prof)
            log(
                f"| {name} | {ms:.3f} | {prof.get('kernels_per_frame', 0):.0f} | "
                f"{prof.get('kernel_busy_ms_per_frame', 0):.3f} |"
            )
        except Exception as e:  # keep going: one failing variant must not hide the others
            log(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} | | |")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from jaxtts.config import preset
    from jaxtts.csm import CSM
    from jaxtts.options import default_options
    from jaxtts.testing import prompt_state

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind}, jax {jax.__version__}")
    base = default_options(attention="pallas")
    model = CSM.random(preset("csm-1b"), dtype="bfloat16")
    state = prompt_state(model, 1, 100, 512, base)
    log("| check | rel. err vs unfused | ok |\n|---|---|---|")
    ok = correctness(model, state, base)
    log("\n| variant | ms/frame | kernels/frame | GPU busy ms/frame |\n|---|---|---|---|")
    res = timings(model, base)
    for name, r in res.items():
        top = sorted((r.get("kernel_top") or {}).items(), key=lambda kv: -kv[1]["us_per_frame"])[:12]
        log(f"\n{name}: " + "; ".join(f"{k[:40]} {v['per_frame']:.0f}x {v['us_per_frame']:.0f}µs" for k, v in top))
    if args.out:
        write_log(args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
