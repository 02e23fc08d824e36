"""`jaxtts bench`: speed of the decode loop, end to end, and against PyTorch.

Random full-size weights unless --model is given. Every timing follows a warm-up, waits for the
device (`block_until_ready`), and is the median of repeated runs. Frames come from real sampling
(temperature 0.9, top-k 50), so no timing is of zeros.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure ms per frame, real-time factor, first-audio latency, batch throughput")
    p.add_argument("--model", help="converted CSM directory (default: random full-size weights)")
    p.add_argument("--codec", help="converted Mimi directory (default: random full-size weights)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--attention", default=None, choices=["xla", "pallas"], help="attention implementation")
    p.add_argument("--preset", default="csm-1b", help="model size when using random weights (csm-1b, tiny)")
    p.add_argument("--frames", type=int, default=128, help="warm frames timed at batch 1 (≥ 100)")
    p.add_argument("--chunk", type=int, default=16, help="frames per XLA call")
    p.add_argument("--batches", default="1,8,32,64", help="batch sizes for the throughput sweep")
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--skip", default="", help="comma list of parts to skip: compile,latency,sweep")
    p.add_argument("--compare", default=None, choices=["transformers"], help="also time a PyTorch implementation")
    p.add_argument("--json", default=None, help="write the results as JSON to this path ('-' for stdout)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the parts of a frame: backbone step, depth decoder, sampling, unroll variants")
    p.add_argument("--kernels", action="store_true",
                   help="profile one chunk on the GPU: kernels per frame, busy vs span, the costliest kernels")
    p.add_argument("--kernels-batch", type=int, default=1, help="batch size of the --kernels profile")
    p.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)


def _sync(x):
    import jax

    jax.block_until_ready(x)
    return x


def _model(args):
    from jaxtts.config import preset
    from jaxtts.csm import CSM

    if args.model:
        from jaxtts.hub import resolve

        return CSM.load(resolve("csm", args.model), dtype=args.dtype)
    return CSM.random(preset(args.preset), dtype=args.dtype)


def _prompt_state(model, batch: int, prompt_tokens: int, cache_len: int, impl, seed=0):
    from jaxtts.generation import prefill, row_keys

    rng = np.random.default_rng(seed)
    tok = np.zeros((batch, prompt_tokens, 33), np.int32)
    tok[..., 32] = rng.integers(0, 128_000, (batch, prompt_tokens))
    msk = np.zeros((batch, prompt_tokens, 33), bool)
    msk[..., 32] = True
    return prefill(model, tok, msk, [prompt_tokens] * batch, cache=model.backbone_cache(batch, cache_len),
                   key=row_keys(range(seed, seed + batch)), impl=impl)


def _median_time(fn, *args, reps=50):
    _sync(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _sync(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def breakdown(model, impl, prompt_tokens, chunk) -> dict:
    """Milliseconds of each part of a batch-1 frame, each jitted alone."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxtts.generation import _sample_frame, frame_rows
    from jaxtts.sampling import Sampler

    graphdef, weights = nnx.split(model)
    state = _prompt_state(model, 1, prompt_tokens, 512, impl)
    frame = jnp.ones((1, 32), jnp.int32)

    @jax.jit
    def backbone_step(weights, cache, position):
        m = nnx.merge(graphdef, weights)
        tokens, mask = frame_rows(frame)
        return m.run_backbone(tokens, mask, position, cache, impl=impl)[0]

    def depth(sampler, unroll):
        @jax.jit
        def f(weights, hidden, keys):
            return _sample_frame(nnx.merge(graphdef, weights), sampler, hidden, keys, impl, unroll)
        return f

    out = {"backbone_step_ms": 1000 * _median_time(backbone_step, weights, state.cache, state.position)}
    topk, greedy = Sampler.create(0.9, 50), Sampler.create(0.9, 1)
    for name, sampler, unroll in [("depth_frame_ms", topk, 1), ("depth_frame_greedy_ms", greedy, 1),
                                  ("depth_frame_unroll30_ms", topk, 30)]:
        out[name] = 1000 * _median_time(depth(sampler, unroll), weights, state.hidden, state.key)
    from jaxtts import sampling

    logits = jax.random.normal(jax.random.key(0), (1, 2051))
    for method in ("sort", "rank"):
        sampling.TOP_K_METHOD = method
        out[f"one_topk_draw_{method}_ms"] = 1000 * _median_time(jax.jit(lambda k, l: topk.per_row(k, l)),
                                                                state.key, logits)
        out[f"depth_frame_{method}_ms"] = 1000 * _median_time(depth(topk, 1), weights, state.hidden, state.key)
    sampling.TOP_K_METHOD = None
    from jaxtts import llama

    for use in (False, True):
        llama.USE_MATVEC = use
        for b in (1, 64):
            out[f"frame_b{b}_matvec_{'on' if use else 'off'}_ms"] = 1000 * time_decode(
                model, topk, batch=b, chunk=chunk, reps=4, prompt_tokens=prompt_tokens, impl=impl)
    llama.USE_MATVEC = True
    return out


def time_decode(model, sampler, *, batch, chunk, reps, prompt_tokens, impl, depth_unroll=None):
    """Median seconds per frame step over `reps` chunks, after one warm-up chunk."""
    from jaxtts.generation import decode_chunk

    cache_len = min(model.cfg.backbone.max_seq_len, prompt_tokens + chunk * (reps + 1) + 1)
    state = _prompt_state(model, batch, prompt_tokens, cache_len, impl)
    state, frames, _ = decode_chunk(model, state, sampler, chunk, impl=impl, depth_unroll=depth_unroll)
    _sync(frames)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        state, frames, _ = decode_chunk(model, state, sampler, chunk, impl=impl, depth_unroll=depth_unroll)
        _sync(frames)
        times.append((time.perf_counter() - t) / chunk)
    assert int(np.asarray(frames).max()) > 0, "timed frames are all zeros"
    return statistics.median(times)


def kernel_profile(model, sampler, *, chunk, prompt_tokens, impl, top: int = 30, batch: int = 1) -> dict:
    """GPU kernels of one warm chunk (CUPTI): count, busy time (sum of durations) and span
    (first start to last end) per frame, and the kernels that cost the most per frame."""
    from jaxtts.generation import decode_chunk
    from pallas_kernels._report import gpu_kernel_events

    state = _prompt_state(model, batch, prompt_tokens, min(model.cfg.backbone.max_seq_len, prompt_tokens + 4 * chunk),
                          impl)
    for _ in range(2):
        state, frames, _ = decode_chunk(model, state, sampler, chunk, impl=impl)
        _sync(frames)
    # One traced chunk (its state is donated, so it runs exactly once).
    events = gpu_kernel_events(lambda: _sync(decode_chunk(model, state, sampler, chunk, impl=impl)[1]))
    if not events:
        return {"kernels_error": "no GPU kernel events in the trace"}
    busy = sum(d for _, d, _ in events)
    span = max(t + d for t, d, _ in events) - events[0][0]
    per_name: dict[str, list] = {}
    for _, d, name in events:
        c = per_name.setdefault(name, [0, 0])
        c[0] += 1
        c[1] += d
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"kernels_per_frame": len(events) / chunk, "kernel_busy_ms_per_frame": busy / chunk * 1e-6,
            "kernel_span_ms_per_frame": span / chunk * 1e-6,
            "kernel_top": {name: {"per_frame": c / chunk, "us_per_frame": d / chunk * 1e-3}
                           for name, (c, d) in ranked}}


def peak_memory_gb():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def _compile_probe(args) -> dict:
    """Run in a subprocess: time the first (compiling) prefill + decode call."""
    import jax

    from jaxtts.generation import decode_chunk
    from jaxtts.sampling import Sampler

    model = _model(args)
    _sync(model.text_embeddings[...])
    t = time.perf_counter()
    state = _prompt_state(model, 1, args.prompt_tokens, 2048 if args.preset == "csm-1b" else 256, args.attention)
    state, frames, _ = decode_chunk(model, state, Sampler.create(), args.chunk, impl=args.attention)
    _sync(frames)
    return {"compile_s": time.perf_counter() - t, "backend": jax.default_backend()}


def _compile_times(args) -> dict:
    """Cold compile (empty persistent cache) and warm (cache filled by the first run), each in a fresh process."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAXTTS_COMPILE_CACHE=cache)
        cmd = [sys.executable, "-m", "jaxtts.cli", "bench", "--compile-probe", "--dtype", args.dtype,
               "--preset", args.preset, "--chunk", str(args.chunk), "--prompt-tokens", str(args.prompt_tokens)]
        if args.model:
            cmd += ["--model", args.model]
        if args.attention:
            cmd += ["--attention", args.attention]
        for name in ("cold", "cached"):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                out[f"compile_{name}_s"] = None
                out["compile_error"] = res.stderr.strip().splitlines()[-1:] or ["?"]
                break
            out[f"compile_{name}_s"] = json.loads(res.stdout.strip().splitlines()[-1])["compile_s"]
    return out


def time_first_audio(args, model, impl) -> float:
    """Seconds from `stream()` to its first PCM chunk, warm, for a prompt of ~prompt_tokens tokens."""
    from jaxtts.mimi import Mimi
    from jaxtts.tts import TTS

    codec = Mimi.load(args.codec) if args.codec else Mimi.random()
    tts = TTS(model, codec, attention=impl, first_chunk_frames=1)
    words = " ".join(["speech"] * (args.prompt_tokens - 6))
    times = []
    for i in range(6):  # the first two calls compile
        t = time.perf_counter()
        gen = tts.stream(words, seed=i, max_audio_ms=2000)
        first = next(gen)
        times.append(time.perf_counter() - t)
        assert len(first) >= 1920 and np.abs(first).max() > 0
        gen.close()
    return statistics.median(times[2:])


def time_transformers(args, frames: int = 20) -> dict:
    """transformers' CsmForConditionalGeneration, bf16, random full-size weights: ms per frame."""
    import torch
    from transformers import CsmConfig, CsmForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    cfg = CsmConfig()
    if args.preset != "csm-1b":
        return {"transformers_error": "comparison only at csm-1b size"}
    with torch.device(device):
        model = CsmForConditionalGeneration(cfg).to(dtype).eval()
    ids = torch.randint(0, 128000, (1, args.prompt_tokens), device=device)  # a text prompt
    out = {}

    def run(n):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                           depth_decoder_do_sample=True, output_audio=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(3)
    # Per frame: difference of two lengths removes the prompt's prefill.
    out["transformers_eager_ms"] = 1000 * (run(frames + 5) - run(5)) / frames
    try:
        model.generation_config.cache_implementation = "static"
        model.depth_decoder.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        model.depth_decoder.forward = torch.compile(model.depth_decoder.forward, mode="reduce-overhead")
        run(3)
        run(3)
        out["transformers_compiled_ms"] = 1000 * (run(frames + 5) - run(5)) / frames
    except Exception as e:  # report, don't hide: compiled generation is fragile across versions
        out["transformers_compiled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


def run_bench(args) -> int:
    from jaxtts.errors import JaxttsError

    for name in ("frames", "chunk", "kernels_batch", "prompt_tokens"):
        if getattr(args, name) < 1:
            raise JaxttsError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.compile_probe:
        from jaxtts.tts import enable_compilation_cache

        enable_compilation_cache()
        print(json.dumps(_compile_probe(args)))
        return 0
    import jax

    from jaxtts.attention import default_impl
    from jaxtts.sampling import Sampler

    skip = set(filter(None, args.skip.split(",")))
    impl = args.attention or default_impl()
    dev = jax.devices()[0]
    res = {"device": getattr(dev, "device_kind", str(dev)), "backend": jax.default_backend(), "jax": jax.__version__,
           "dtype": args.dtype, "attention": impl, "weights": args.model or f"random {args.preset}",
           "date": time.strftime("%Y-%m-%d"), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if "compile" not in skip:
        res.update(_compile_times(args))
    model = _model(args)
    sampler = Sampler.create(0.9, 50)
    reps = max(1, -(-args.frames // args.chunk))
    ms = 1000 * time_decode(model, sampler, batch=1, chunk=args.chunk, reps=reps,
                            prompt_tokens=args.prompt_tokens, impl=impl)
    res.update(ms_per_frame=ms, rtf=ms / 80.0, frames_timed=reps * args.chunk)
    res["peak_memory_gb_batch1"] = peak_memory_gb()
    if args.kernels:
        try:
            res.update(kernel_profile(model, sampler, chunk=args.chunk, prompt_tokens=args.prompt_tokens, impl=impl,
                                      batch=args.kernels_batch))
            res["kernels_batch"] = args.kernels_batch
        except Exception as e:  # no CUPTI on this machine
            res["kernels_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if args.breakdown:
        res.update(breakdown(model, impl, args.prompt_tokens, args.chunk))
    if "latency" not in skip:
        res["first_audio_ms"] = 1000 * time_first_audio(args, model, impl)
    if "sweep" not in skip:
        sweep = {}
        for b in [int(x) for x in args.batches.split(",") if x]:
            try:
                step = time_decode(model, sampler, batch=b, chunk=args.chunk, reps=3,
                                   prompt_tokens=args.prompt_tokens, impl=impl)
                sweep[b] = {"ms_per_step": 1000 * step, "x_realtime": b * 0.080 / step}
            except Exception as e:
                sweep[b] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        res["batch_sweep"] = sweep
    res["peak_memory_gb"] = peak_memory_gb()
    if args.compare == "transformers":
        res.update(time_transformers(args))
        if res.get("transformers_eager_ms"):
            res["speedup_vs_transformers_eager"] = res["transformers_eager_ms"] / ms
        if res.get("transformers_compiled_ms"):
            res["speedup_vs_transformers_compiled"] = res["transformers_compiled_ms"] / ms
    _print_table(res)
    if args.json:
        text = json.dumps(res, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


def _print_table(res: dict) -> None:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [(k, fmt(v)) for k, v in res.items() if k not in ("batch_sweep", "kernel_top")]
    for name, r in (res.get("kernel_top") or {}).items():
        rows.append((f"kernel {name[:60]}", f"{r['per_frame']:.1f}/frame, {r['us_per_frame']:.1f} µs/frame"))
    for b, r in (res.get("batch_sweep") or {}).items():
        rows.append((f"batch {b}", ", ".join(f"{k}={fmt(v)}" for k, v in r.items())))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
