"""Mimi decode throughput: seconds of audio decoded per second of wall time, whole-sequence and streaming.

    python -m benchmarks.mimi_bench [--batch 1] [--frames 125] [--chunk 1] [--repeats 5]

Random full-size weights (float32). Each measurement runs once untimed first (compilation), waits for
the device with `block_until_ready`, and reports the median of `repeats` timed runs.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mimi_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=125, help="frames of 80 ms to decode (125 = 10 s)")
    parser.add_argument("--chunk", type=int, default=1, help="frames per streaming step")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
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
