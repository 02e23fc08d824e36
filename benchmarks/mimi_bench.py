"""Mimi decode throughput: seconds of audio decoded per second of wall time, whole-sequence and streaming.

    python -m benchmarks.mimi_bench [--batch 1] [--frames 125] [--chunk 1] [--repeats 5]
    python -m benchmarks.mimi_bench --variants highest,tensorfloat32,bfloat16,bf16-weights --batches 1,64,256 --chunk 8

Random full-size weights (float32). Each measurement runs once untimed first (compilation), waits for
the device with `block_until_ready`, and reports the median of `repeats` timed runs.

--variants times the same weights and codes under several numeric settings in one run: a matmul
precision for float32 weights ("highest": exact float32; "tensorfloat32"; "bfloat16": one bf16
pass; "default": XLA's choice) or "bf16-weights" (weights and activations in bfloat16), each with
its audio's SNR against "highest" (dB; whole decode of the batch's first row).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from jaxtts.mimi.codec import Mimi


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compiles
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_mimi(
    batch: int = 1, frames: int = 125, chunk: int = 1, repeats: int = 5, seed: int = 0, mimi: Mimi | None = None
) -> dict:
    """Time `decode` of `frames` frames and a streaming decode of the same frames `chunk` at a time.

    Returns the wall times and "× real time" rates (seconds of audio, summed over the batch, per second).
    """
    mimi = mimi or Mimi.random(seed)
    codes = np.random.default_rng(seed).integers(0, mimi.cardinality, (batch, mimi.num_codebooks, frames))
    frames -= frames % chunk  # whole chunks only, so one compilation serves every streaming step
    codes = codes[:, :, :frames]
    audio_seconds = batch * frames * mimi.frame_size / mimi.sample_rate

    def whole():
        mimi.decode(codes).block_until_ready()

    def stream():
        state = mimi.decode_stream_init(batch)
        for start in range(0, frames, chunk):
            state, pcm = mimi.decode_stream_step(state, codes[:, :, start : start + chunk])
        pcm.block_until_ready()

    whole_s = _median_seconds(whole, repeats)
    stream_s = _median_seconds(stream, repeats)
    steps = frames // chunk
    return {
        "device": jax.devices()[0].device_kind,
        "batch": batch,
        "frames": frames,
        "chunk": chunk,
        "audio_seconds": audio_seconds,
        "decode_seconds": whole_s,
        "decode_x_realtime": audio_seconds / whole_s,
        "stream_seconds": stream_s,
        "stream_step_ms": 1000 * stream_s / steps,
        "stream_x_realtime": audio_seconds / stream_s,
    }


def variant(base: Mimi, name: str) -> Mimi:
    """`base`'s weights under a numeric setting (see the module doc)."""
    import jax.numpy as jnp

    if name == "bf16-weights":
        return Mimi(base.params, base.config, dtype=jnp.bfloat16, matmul_precision=None)
    return Mimi(base.params, base.config, matmul_precision=None if name == "default" else name)


def snr_db(reference, audio) -> float:
    ref, x = (np.asarray(a, np.float64).ravel() for a in (reference, audio))
    noise = np.sum((x - ref) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


def compare_variants(names, batches, frames: int, chunk: int, repeats: int, seed: int = 0) -> list[dict]:
    base = Mimi.random(seed)
    codes = np.random.default_rng(seed).integers(0, base.cardinality, (1, base.num_codebooks, frames))
    reference = np.asarray(variant(base, "highest").decode(codes), np.float32)
    rows = []
    for name in names:
        mimi = variant(base, name)
        snr = snr_db(reference, np.asarray(mimi.decode(codes), np.float32))
        for b in batches:
            r = bench_mimi(batch=b, frames=frames, chunk=chunk, repeats=repeats, seed=seed, mimi=mimi)
            rows.append(dict(r, variant=name, snr_db=snr))
            print(
                f"{name:>14}  batch {b:>4}  stream {r['stream_step_ms']:8.2f} ms per {chunk}-frame step "
                f"({r['stream_x_realtime']:9.1f}× real time)  whole {r['decode_seconds'] * 1000:8.1f} ms  "
                f"SNR vs highest {snr:6.1f} dB",
                flush=True,
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mimi_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=None, help="comma list of numeric settings to compare (module doc)")
    parser.add_argument("--batches", default=None, help="comma list of batch sizes for --variants")
    parser.add_argument("--json", default=None, help="with --variants: write the rows here")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=125, help="frames of 80 ms to decode (125 = 10 s)")
    parser.add_argument("--chunk", type=int, default=1, help="frames per streaming step")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.variants:
        batches = [int(b) for b in (args.batches or str(args.batch)).split(",")]
        rows = compare_variants(args.variants.split(","), batches, args.frames, args.chunk, args.repeats)
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    r = bench_mimi(batch=args.batch, frames=args.frames, chunk=args.chunk, repeats=args.repeats)
    print(f"device {r['device']}  batch {r['batch']}  {r['frames']} frames ({r['audio_seconds']:.1f} s of audio)")
    print(f"  whole decode : {r['decode_seconds']:.3f} s   {r['decode_x_realtime']:.1f}× real time")
    print(
        f"  streaming    : {r['chunk']} frame(s)/step, {r['stream_step_ms']:.1f} ms/step   "
        f"{r['stream_x_realtime']:.1f}× real time"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
