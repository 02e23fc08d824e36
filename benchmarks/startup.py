"""Start-up: what a new process spends before its first WAV, phase by phase.

    python -m benchmarks.startup [--preset csm-1b|tiny] [--max-audio-ms 3000] [--context-s 10] [--json FILE]

Times, in one fresh process: importing jaxtts, starting the backend, building random weights
(CSM and Mimi), the tokenizer, the first `generate` (with every XLA compilation it triggers,
named, from JAX's monitoring events), a second `generate` (warm), and `prepare_context` for a
voice prompt of --context-s seconds, then of a different length (a new Mimi encode and prefill
shape). Run it twice with the same JAXTTS_COMPILE_CACHE to see the persistent cache's effect.
Also prints the memory XLA plans for the largest programs (memory_analysis), which is where a
runaway temporary shows up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T0 = time.perf_counter()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup")
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--max-audio-ms", type=float, default=3000)
    p.add_argument("--context-s", type=float, default=10.0)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--encode-ab",
        action="store_true",
        help="also compile and time Mimi's encoder with XLA's GPU autotuning off (level 0) vs default",
    )
    p.add_argument(
        "--explain-cache",
        action="store_true",
        help="list the persistent compile cache's hits, misses and skipped writes per program",
    )
    args = p.parse_args(argv)

    phases: dict[str, float] = {}
    compiles: list[tuple[str, float]] = []
    mark = [time.perf_counter()]

    def phase(name):
        now = time.perf_counter()
        phases[name] = round(now - mark[0], 3)
        mark[0] = now
        print(f"{name:<34} {phases[name]:8.2f} s", flush=True)

    import jax

    phases["python start → import jax"] = round(mark[0] - T0, 3)
    current = {"name": "?"}

    import logging
    import re

    class CompileLog(logging.Handler):  # jax_log_compiles names each program and its compile time
        def emit(self, record):
            m = re.search(r"Finished XLA compilation of (.*) in ([0-9.]+) sec", record.getMessage())
            if m:
                compiles.append((f"{current['name']}: {m.group(1)}", round(float(m.group(2)), 3)))
            elif args.explain_cache and "persistent" in record.getMessage().lower():
                cache_log.append(f"{current['name']}: {record.getMessage()[:300]}")

    cache_log: list[str] = []
    if args.explain_cache:  # JAX then logs each persistent-cache decision at WARNING
        jax.config.update("jax_explain_cache_misses", True)

    logging.getLogger("jax").addHandler(CompileLog())
    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jax").propagate = False  # keep the per-program lines out of the output
    import jaxtts  # noqa: F401
    from jaxtts.tts import enable_compilation_cache

    enable_compilation_cache()
    phase("import jaxtts")
    jax.devices()
    phase("backend init")
    from jaxtts.config import preset
    from jaxtts.csm import CSM
    from jaxtts.defaults import default_dtype
    from jaxtts.mimi import Mimi

    current["name"] = "CSM.random"
    model = CSM.random(preset(args.preset), dtype=default_dtype())
    jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda a: a, model.text_embeddings.get_value())))
    phase("CSM weights (random)")
    current["name"] = "Mimi.random"
    codec = Mimi.random()
    phase("Mimi weights (random)")
    from jaxtts.tts import TTS

    tts = TTS(model, codec, max_silence_ms=None)
    phase("tokenizer + TTS")
    current["name"] = "first generate"
    audio = tts.generate("Hello from jaxtts, a first sentence.", seed=0, max_audio_ms=args.max_audio_ms)
    phase("first generate")
    n_first = len(compiles)
    current["name"] = "second generate"
    tts.generate("Hello from jaxtts, a second sentence.", seed=1, max_audio_ms=args.max_audio_ms)
    phase("second generate (warm)")
    import numpy as np

    from jaxtts.prompt import Segment

    rng = np.random.default_rng(0)
    for i, secs in enumerate((args.context_s, args.context_s * 0.7)):
        wav = (0.1 * rng.standard_normal(int(secs * 24000))).astype(np.float32)
        current["name"] = f"prepare_context {secs:.1f} s"
        ctx = tts.prepare_context([Segment(0, "This is how I sound.", audio=wav)])
        jax.block_until_ready(ctx.cache.k[0])
        phase(f"prepare_context {secs:.1f} s" + (" (new length)" if i else ""))
    # What XLA plans to hold for the Mimi encoder at this length (a runaway temporary shows here).
    from jaxtts.buckets import encode_frames
    from jaxtts.mimi import codec as mimi_codec

    frames = encode_frames(int(args.context_s * 12.5) + 1)
    x = jax.ShapeDtypeStruct((1, frames * 1920, 1), jax.numpy.float32)
    ma = mimi_codec._encode.lower(codec.params, x, cfg=codec.config).compile().memory_analysis()
    if ma is not None:
        print(
            f"Mimi encode, {frames} frames: temp {ma.temp_size_in_bytes / 2**30:.2f} GiB, "
            f"arguments {ma.argument_size_in_bytes / 2**30:.2f} GiB"
        )
    if args.encode_ab:
        from jaxtts.mimi import model as mimi_model

        wav = np.zeros((1, frames * 1920, 1), np.float32)
        for name, opts in (("default", None), ("autotune 0", {"xla_gpu_autotune_level": 0})):
            fn = jax.jit(mimi_model.encode, static_argnames="cfg", compiler_options=opts)
            t = time.perf_counter()
            exe = fn.lower(codec.params, wav, cfg=codec.config).compile()
            compile_s = time.perf_counter() - t
            exe(codec.params, wav).block_until_ready()
            t = time.perf_counter()
            for _ in range(5):
                exe(codec.params, wav).block_until_ready()
            print(
                f"Mimi encode {frames} frames, {name}: compile {compile_s:.2f} s, run {(time.perf_counter() - t) / 5 * 1000:.1f} ms"
            )
    total = round(time.perf_counter() - T0, 3)
    print(f"{'total':<34} {total:8.2f} s")
    print(f"audio: {len(audio) / 24000:.2f} s; compilations in the first generate: {n_first}")
    for name, secs in compiles:
        print(f"  {secs:7.2f} s  {name}")
    for line in cache_log:
        print(f"  cache: {line}")
    if args.json:
        res = dict(
            device=str(jax.devices()[0].device_kind),
            phases=phases,
            compiles=compiles,
            cache_log=cache_log,
            total_s=total,
            jax=jax.__version__,
        )
        text = json.dumps(res, indent=1)
        sys.stdout.write(text + "\n") if args.json == "-" else open(args.json, "w").write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
