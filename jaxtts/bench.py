"""`jaxtts bench`: speed of the decode loop, end to end, and against PyTorch.

Random full-size weights unless --model is given. Every timing follows a warm-up, waits for the
device (`block_until_ready`), and is the median of repeated runs. Frames come from real sampling
(temperature 0.9, top-k 50), so no timing is of zeros.

What is compiled is one `jaxtts.DecodeOptions` value (`default_options()` for this device, the
attention implementation from --attention); every variant the breakdown times is another value
(`opts.replace(...)`), hence another compiled program. This module uses the library's public
pieces only; the PyTorch peers (--compare) and the CUPTI profile (--kernels) live in the
`benchmarks` package, imported only when asked for.

`--quantize none,int8` times each weight format in turn in one process (the model built, timed,
then freed before the next), and prints them side by side. Peak device memory is measured per
phase (`MemoryPhase`: loading, batch 1, each batch of the sweep), each phase's own peak, although
JAX's `peak_bytes_in_use` only ever grows.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

PEERS = ("transformers", "original")
NO_QUANTIZATION = "none"


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure ms per frame, real-time factor, first-audio latency, batch throughput")
    p.add_argument("--model", help="converted CSM directory (default: random full-size weights)")
    p.add_argument("--codec", help="converted Mimi directory (default: random full-size weights)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--quantize",
        default=NO_QUANTIZATION,
        metavar="LIST",
        help="weight formats to time, comma list of: none (--dtype weights), int8 (8-bit weights and "
        "embedding tables, quantized at load time; an int8 --model is int8 either way). Several "
        "(none,int8) are timed in turn in this process and printed side by side (default: none)",
    )
    p.add_argument(
        "--attention",
        default=None,
        choices=["xla", "pallas", "pallas_interpret"],
        help="attention implementation (default: pallas on GPU, xla elsewhere)",
    )
    p.add_argument("--preset", default="csm-1b", help="model size when using random weights (csm-1b, tiny)")
    p.add_argument("--frames", type=int, default=128, help="warm frames timed at batch 1 (≥ 100)")
    p.add_argument("--chunk", type=int, default=16, help="frames per XLA call")
    p.add_argument("--batches", default="1,8,32,64", help="batch sizes for the throughput sweep")
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--skip", default="", help="comma list of parts to skip: compile,latency,sweep")
    p.add_argument(
        "--compare",
        default=None,
        metavar="PEERS",
        help="also time PyTorch implementations in this process, comma list of: transformers "
        "(CsmForConditionalGeneration), original (the torchtune replica of Sesame's CSM; "
        "needs the repository's tests/ and the test extras)",
    )
    p.add_argument("--json", default=None, help="write the results as JSON to this path ('-' for stdout)")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the parts of a frame and variants of the decode options (backbone step, "
        "greedy, depth unroll, top-k sort vs rank, GEMV kernel on vs off)",
    )
    p.add_argument(
        "--breakdown-only",
        default=None,
        metavar="NAMES",
        help="with --breakdown: time only these whole-frame variants (comma list of names, e.g. "
        "b1,b1_int8_asm; an unknown name is an error that lists the names)",
    )
    p.add_argument(
        "--kernels",
        action="store_true",
        help="profile one chunk on the GPU: kernels per frame, busy vs span, the costliest kernels",
    )
    p.add_argument("--kernels-batch", type=int, default=1, help="batch size of the --kernels profile")
    p.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)


def _sync(x):
    import jax

    jax.block_until_ready(x)
    return x


def parse_quantize(text: str | None) -> list[str | None]:
    """--quantize's comma list as the `quantize=` values to time in turn (None: no quantization)."""
    from jaxtts.errors import JaxttsError
    from jaxtts.quantize import METHODS

    names = [n.strip() for n in (text or NO_QUANTIZATION).split(",") if n.strip()] or [NO_QUANTIZATION]
    unknown = [n for n in names if n != NO_QUANTIZATION and n not in METHODS]
    if unknown:
        choices = ", ".join((NO_QUANTIZATION, *METHODS))
        raise JaxttsError(f"--quantize: unknown {', '.join(unknown)}; choose from {choices} (comma list)")
    return [None if n == NO_QUANTIZATION else n for n in dict.fromkeys(names)]


def _variant_name(quantize: str | None) -> str:
    return quantize or NO_QUANTIZATION


def _model(args, quantize: str | None = None):
    from jaxtts.config import preset
    from jaxtts.csm import CSM

    if args.model:
        from jaxtts.hub import resolve

        return CSM.load(resolve("csm", args.model), dtype=args.dtype, quantize=quantize)
    return CSM.random(preset(args.preset), dtype=args.dtype, quantize=quantize)


def _options(args):
    from jaxtts.options import default_options

    return default_options(attention=args.attention)


def _median_time(fn, *args, reps=50):
    _sync(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _sync(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_decode(model, sampler, *, batch, chunk, reps, prompt_tokens, opts=None, fresh_split=False, report=None):
    """Median seconds per frame step over `reps` chunks of `batch` rows compiled with `opts`
    (default: `default_options()`), after one warm-up chunk, with the cache length the engine
    would use (`jaxtts.buckets.cache_length`). `fresh_split` splits the model
    afresh before every chunk (`split_model(reuse=False)`): the host cost without the split cache.
    `report` (a dict) receives "first_chunk_s": the warm-up chunk's seconds, its compilation
    included (or its load from the persistent cache)."""
    from jaxtts import buckets
    from jaxtts.generation import decode_chunk, split_model
    from jaxtts.options import resolve_options
    from jaxtts.testing import prompt_state

    opts = resolve_options(opts)
    # The engine's bucketed cache length: timings of one batch size share one program.
    limit = model.cfg.backbone.max_seq_len
    cache_len = buckets.cache_length(min(limit, prompt_tokens + chunk * (reps + 1) + 1), limit)
    state = prompt_state(model, batch, prompt_tokens, cache_len, opts)
    t = time.perf_counter()
    state, frames, _ = decode_chunk(model, state, sampler, chunk, opts=opts)
    _sync(frames)
    if report is not None:
        report["first_chunk_s"] = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        if fresh_split:
            split_model(model, reuse=False)
        state, frames, _ = decode_chunk(model, state, sampler, chunk, opts=opts)
        _sync(frames)
        times.append((time.perf_counter() - t) / chunk)
    assert int(np.asarray(frames).max()) > 0, "timed frames are all zeros"
    return statistics.median(times)


def _changed(base, opts) -> dict:
    """The fields of `opts` that differ from `base`."""
    return {
        f.name: getattr(opts, f.name)
        for f in dataclasses.fields(opts)
        if getattr(opts, f.name) != getattr(base, f.name)
    }


def _dense_shapes(cfg):
    """(K, N) of every projection of the two decoders and of the depth decoder's input."""
    for c in (cfg.backbone, cfg.decoder):
        yield c.embed_dim, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        yield c.num_heads * c.head_dim, c.embed_dim
        yield c.embed_dim, 2 * c.intermediate_dim
        yield c.intermediate_dim, c.embed_dim
    yield cfg.backbone.embed_dim, cfg.decoder.embed_dim


def gemv_runs(opts, cfg, rows: int) -> bool:
    """Whether a decode step of `rows` rows runs the Pallas GEMV kernel under `opts`: in the fused
    step (built from GEMV kernels) or for some projection of the model `cfg`."""
    return opts.uses_fused_step(rows) or any(opts.uses_matvec(rows, k, n) for k, n in _dense_shapes(cfg))


def breakdown_variants(opts, cfg, quantization: str | None = None) -> dict:
    """name → (DecodeOptions, sampler kind, batch) of the whole-frame variants `breakdown` times
    for a model of config `cfg`. The members of each pair are distinct options values, so distinct
    compiled programs (the options are a static argument of the jitted decode loop).

    "matvec_off" turns the fused step off too: the fused step is built from GEMV kernels. A pair
    is only timed where its choice changes the program: the GEMV pair at a batch where `opts`
    runs the kernel at all (never under plain XLA), the top-k pair where the draw is XLA's (not
    the sampling kernel). For an int8 model whose weights reach the kernels, each other way of
    converting the int8 tiles (`int8_convert`) at batch 1."""
    out = {
        "b1": (opts, "top_k", 1),
        "b1_greedy": (opts, "greedy", 1),
        "b1_unroll1": (opts.replace(depth_unroll=1), "top_k", 1),
        "b1_unroll30": (opts.replace(depth_unroll=30), "top_k", 1),
    }
    if not opts.uses_sample_kernel(1):
        out["b1_topk_sort"] = (opts.replace(top_k_method="sort"), "top_k", 1)
        out["b1_topk_rank"] = (opts.replace(top_k_method="rank"), "top_k", 1)
    for b in (1, 64):
        if gemv_runs(opts.replace(matvec=True), cfg, b):
            out[f"b{b}_matvec_on"] = (opts.replace(matvec=True), "top_k", b)
            out[f"b{b}_matvec_off"] = (opts.replace(matvec=False, fused_step=False), "top_k", b)
    if quantization == "int8" and opts.uses_fused_step(1, quantized=True):
        from jaxtts.options import INT8_CONVERTS

        for how in INT8_CONVERTS:
            out[f"b1_int8_{how}"] = (opts.replace(int8_convert=how), "top_k", 1)
    return out


def select_variants(variants: dict, only: str | None) -> dict:
    """The variants named in `only` (a comma list; None: all), "b1" always kept (the other
    figures are read against it)."""
    if only is None:
        return variants
    from jaxtts.errors import JaxttsError

    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise JaxttsError(
            f"--breakdown-only: no variant {', '.join(unknown)} for this model and options; "
            f"choose from {', '.join(variants)}"
        )
    return {n: v for n, v in variants.items() if n == "b1" or n in names}


def breakdown(model, opts, prompt_tokens, chunk, only: str | None = None) -> dict:
    """Milliseconds of a batch-1 backbone step and of one top-k draw, each jitted alone, and of a
    whole frame step under each of `breakdown_variants(opts, model.cfg)`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxtts import buckets
    from jaxtts.generation import frame_rows
    from jaxtts.sampling import Sampler
    from jaxtts.testing import prompt_state

    graphdef, weights = nnx.split(model)
    limit = model.cfg.backbone.max_seq_len
    state = prompt_state(model, 1, prompt_tokens, buckets.cache_length(prompt_tokens + 1, limit), opts)
    tokens, mask = frame_rows(jnp.ones((1, 32), jnp.int32))

    @jax.jit
    def backbone_step(weights, cache, position):
        return nnx.merge(graphdef, weights).run_backbone(tokens, mask, position, cache, opts=opts)[0]

    out = {"backbone_step_ms": 1000 * _median_time(backbone_step, weights, state.cache, state.position)}
    samplers = {"top_k": Sampler.create(0.9, 50), "greedy": Sampler.create(0.9, 1)}
    topk = samplers["top_k"]
    logits = jax.random.normal(jax.random.key(0), (1, model.cfg.audio_vocab_size))
    keys = state.key  # one key per row
    for method in ("sort", "rank"):
        o = opts.replace(top_k_method=method, sample_kernel=False)  # XLA's draw, whatever the batch-1 choice
        draw = jax.jit(lambda k, lg, o=o: topk.draw(lg, topk.noise(k, lg.shape[-1])[None], 0, o))
        out[f"one_topk_draw_{method}_ms"] = 1000 * _median_time(draw, keys, logits)
    every = breakdown_variants(opts, model.cfg, model.quantization)
    variants = select_variants(every, only)
    out["breakdown_variants"] = {
        name: {"options": _changed(opts, o), "sampler": s, "batch": b} for name, (o, s, b) in variants.items()
    }
    if not any(name.endswith("matvec_on") for name in every):
        out["breakdown_note"] = "the GEMV kernel does not run under these options: no matvec on/off pair"
    timed = {}  # one timing per program: a variant equal to another (e.g. b1_matvec_on = b1) reuses it
    for name, (o, s, b) in variants.items():
        if (o, s, b) not in timed:
            first = {}
            ms = 1000 * time_decode(
                model, samplers[s], batch=b, chunk=chunk, reps=4, prompt_tokens=prompt_tokens, opts=o, report=first
            )
            timed[o, s, b] = ms, first["first_chunk_s"]
        # first chunk: its program's compilation (or persistent-cache load) and one chunk
        out[f"frame_{name}_ms"], out[f"first_chunk_{name}_s"] = timed[o, s, b]
    out["depth_share_b1_ms"] = out["frame_b1_ms"] - out["backbone_step_ms"]
    return out


def peak_memory_gb():
    """The process's peak device memory so far (GB), or None (no statistics, e.g. on a CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def _device_stats():
    import jax

    return jax.devices()[0].memory_stats()


def _allocate_ballast(nbytes: int, chunk: int = 1 << 30) -> list:
    """Device buffers of `nbytes` in all (in chunks, so no single huge allocation is needed)."""
    import jax
    import jax.numpy as jnp

    out = [jnp.zeros((min(chunk, nbytes - i),), jnp.uint8) for i in range(0, nbytes, chunk)]
    jax.block_until_ready(out)
    return out


class MemoryPhase:
    """The peak device memory of one phase (a `with` block): the most bytes in use at any time
    during it, whatever earlier phases reached.

    JAX's `peak_bytes_in_use` is the process's peak so far and cannot be reset, so a phase that
    stays below an earlier peak (a second model's batch-1 run after the first model's batch-64
    sweep) would not move it. On entering, a ballast buffer lifts the bytes in use to that peak;
    every allocation of the phase then raises the peak, and the phase's own peak is the new peak
    less the ballast. `start` is the bytes in use on entering (what the phase inherits: the
    weights), `peak` the phase's peak (both bytes, None without statistics: a CPU; `peak` is also
    None if the ballast could not be allocated and the phase stayed below the old peak).
    `stats` and `allocate` are for tests."""

    def __init__(self, stats=_device_stats, allocate=_allocate_ballast):
        self._stats, self._allocate = stats, allocate
        self.start = self.peak = None

    def __enter__(self):
        stats = self._stats()
        self._ballast, self._offset = [], 0
        if not stats or "peak_bytes_in_use" not in stats:
            self._floor = None
            return self
        self.start = stats["bytes_in_use"]
        gap = stats["peak_bytes_in_use"] - self.start
        if gap > 0:
            try:
                self._ballast = self._allocate(gap)
            except Exception:  # out of memory: measure what can still be seen
                self._ballast = []
        after = self._stats()
        self._offset = after["bytes_in_use"] - self.start  # the ballast as allocated (rounded up)
        self._floor = after["peak_bytes_in_use"]
        return self

    def __exit__(self, *exc):
        if self._floor is None:
            return False
        peak = self._stats()["peak_bytes_in_use"]
        for buf in self._ballast:
            buf.delete()
        self._ballast = []
        reached = self.start + self._offset >= self._floor  # the ballast lifted the bytes in use to the old peak
        self.peak = peak - self._offset if reached or peak > self._floor else None
        return False

    @property
    def peak_gb(self):
        return None if self.peak is None else self.peak / 1e9

    @property
    def start_gb(self):
        return None if self.start is None else self.start / 1e9


def _compile_probe(args) -> dict:
    """Run in a subprocess: time the first (compiling) prefill + decode call."""
    import jax

    from jaxtts.generation import decode_chunk
    from jaxtts.sampling import Sampler
    from jaxtts.testing import prompt_state

    opts = _options(args)
    model = _model(args, parse_quantize(args.quantize)[0])
    _sync(model.text_embeddings[...])
    t = time.perf_counter()
    state = prompt_state(model, 1, args.prompt_tokens, 2048 if args.preset == "csm-1b" else 256, opts)
    state, frames, _ = decode_chunk(model, state, Sampler.create(), args.chunk, opts=opts)
    _sync(frames)
    return {"compile_s": time.perf_counter() - t, "backend": jax.default_backend()}


def _compile_times(args, quantize: str | None = None) -> dict:
    """Cold compile (empty persistent cache) and warm (cache filled by the first run), each in a fresh process."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAXTTS_COMPILE_CACHE=cache)
        cmd = [
            sys.executable,
            "-m",
            "jaxtts.cli",
            "bench",
            "--compile-probe",
            "--dtype",
            args.dtype,
            "--preset",
            args.preset,
            "--chunk",
            str(args.chunk),
            "--prompt-tokens",
            str(args.prompt_tokens),
        ]
        if args.model:
            cmd += ["--model", args.model]
        cmd += ["--quantize", _variant_name(quantize)]
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


def time_first_audio(model, codec, opts, *, prompt_tokens: int) -> float:
    """Seconds from `stream()` to its first PCM chunk, warm, for a prompt of ~prompt_tokens tokens,
    through a `TTS` built with `opts` (a new TTS per options value: nothing global changes)."""
    from jaxtts.tts import TTS

    tts = TTS(model, codec, options=opts, first_chunk_frames=1)
    words = " ".join(["speech"] * max(1, prompt_tokens - 6))
    times = []
    for i in range(6):  # the first two calls compile
        t = time.perf_counter()
        gen = tts.stream(words, seed=i, max_audio_ms=2000)
        first = next(gen)
        times.append(time.perf_counter() - t)
        assert len(first) >= 1920 and np.abs(first).max() > 0
        gen.close()
    return statistics.median(times[2:])


def _codec(args):
    from jaxtts.mimi import Mimi

    return Mimi.load(args.codec) if args.codec else Mimi.random()


def parse_peers(text: str | None) -> list[str]:
    from jaxtts.errors import JaxttsError

    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise JaxttsError(f"--compare: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)} (comma list)")
    return list(dict.fromkeys(names))


def run_bench(args) -> int:
    from jaxtts.errors import JaxttsError

    for name in ("frames", "chunk", "kernels_batch", "prompt_tokens"):
        if getattr(args, name) < 1:
            raise JaxttsError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.breakdown_only is not None and not args.breakdown:
        raise JaxttsError("--breakdown-only picks variants of --breakdown: add --breakdown")
    peers = parse_peers(args.compare)
    variants = parse_quantize(args.quantize)
    if args.compile_probe:
        from jaxtts.tts import enable_compilation_cache

        enable_compilation_cache()
        print(json.dumps(_compile_probe(args)))
        return 0
    import jax

    skip = set(filter(None, args.skip.split(",")))
    batches = [int(x) for x in args.batches.split(",") if x]
    opts = _options(args)
    dev = jax.devices()[0]
    res = {
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "dtype": args.dtype,
        "quantize": _variant_name(variants[0]) if len(variants) == 1 else [_variant_name(q) for q in variants],
        "attention": opts.attention,
        "options": dataclasses.asdict(opts),
        "weights": args.model or f"random {args.preset}",
        "date": time.strftime("%Y-%m-%d"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "memory_note": "peak_memory_gb_*: each phase's own peak of device bytes in use (jaxtts.bench.MemoryPhase); "
        "memory_loaded_gb: bytes in use once the model is built",
    }
    results, cfg = {}, None
    for quantize in variants:  # one model at a time: built, timed, freed
        model = _model_in(args, quantize, results.setdefault(_variant_name(quantize), {}))
        cfg = model.cfg
        _time_variant(args, model, opts, skip, batches, results[_variant_name(quantize)])
        del model
        gc.collect()
    if len(variants) == 1:
        res.update(results[_variant_name(variants[0])])
    else:
        res["variants"] = results
    if peers:
        first = results[_variant_name(variants[0])]
        try:
            from benchmarks.peers import compare
        except ImportError as e:
            res["compare_error"] = (
                f"the benchmarks package is not importable ({e}): run from a checkout, reinstalled with "
                "pip install -e ."
            )
        else:
            res.update(
                compare(peers, cfg, dtype=args.dtype, prompt_tokens=args.prompt_tokens, jaxtts_ms=first["ms_per_frame"])
            )
    if len(variants) == 1:
        _print_table(res)
    else:
        _print_variants(res)
    if args.json:
        text = json.dumps(res, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


def _model_in(args, quantize: str | None, out: dict):
    """Build the model of one variant, measuring its load (compile times first, in subprocesses)."""
    if "compile" not in set(filter(None, args.skip.split(","))):
        out.update(_compile_times(args, quantize))
    import jax
    from flax import nnx

    with MemoryPhase() as load:
        model = _model(args, quantize)
        _sync(jax.tree.leaves(nnx.state(model)))
    stats = _device_stats() or {}
    out["quantize"] = _variant_name(quantize)
    out["memory_before_load_gb"] = load.start_gb  # what the previous variant left behind (≈ 0)
    out["memory_loaded_gb"] = stats["bytes_in_use"] / 1e9 if "bytes_in_use" in stats else None
    out["peak_memory_gb_load"] = load.peak_gb
    return model


def _time_variant(args, model, opts, skip: set, batches: list, out: dict) -> None:
    """Time one model: batch 1, the optional profile and breakdown, first audio, the batch sweep."""
    from jaxtts.sampling import Sampler

    sampler = Sampler.create(0.9, 50)
    reps = max(1, -(-args.frames // args.chunk))
    with MemoryPhase() as b1:
        ms = 1000 * time_decode(
            model, sampler, batch=1, chunk=args.chunk, reps=reps, prompt_tokens=args.prompt_tokens, opts=opts
        )
    out.update(ms_per_frame=ms, rtf=ms / 80.0, frames_timed=reps * args.chunk)
    out["peak_memory_gb_batch1"] = b1.peak_gb
    if args.kernels:
        try:
            from benchmarks.profile import kernel_profile

            out.update(
                kernel_profile(
                    model,
                    sampler,
                    chunk=args.chunk,
                    prompt_tokens=args.prompt_tokens,
                    opts=opts,
                    batch=args.kernels_batch,
                )
            )
            out["kernels_batch"] = args.kernels_batch
        except Exception as e:  # no CUPTI on this machine, or no benchmarks package installed
            out["kernels_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if args.breakdown:
        out.update(breakdown(model, opts, args.prompt_tokens, args.chunk, args.breakdown_only))
    peaks = [out["peak_memory_gb_load"], b1.peak_gb]
    if "latency" not in skip:
        with MemoryPhase() as latency:  # Mimi too
            out["first_audio_ms"] = 1000 * time_first_audio(model, _codec(args), opts, prompt_tokens=args.prompt_tokens)
        out["peak_memory_gb_first_audio"] = latency.peak_gb
        peaks.append(latency.peak_gb)
    if "sweep" not in skip:
        sweep = {}
        for b in batches:
            try:
                with MemoryPhase() as phase:
                    step = time_decode(
                        model, sampler, batch=b, chunk=args.chunk, reps=3, prompt_tokens=args.prompt_tokens, opts=opts
                    )
                sweep[b] = {"ms_per_step": 1000 * step, "x_realtime": b * 0.080 / step}
                sweep[b]["peak_memory_gb"] = phase.peak_gb
                peaks.append(phase.peak_gb)
            except Exception as e:
                sweep[b] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        out["batch_sweep"] = sweep
    known = [p for p in peaks if p is not None]
    out["peak_memory_gb"] = max(known) if known else peak_memory_gb()


def _print_table(res: dict) -> None:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    nested = ("batch_sweep", "kernel_top", "options", "breakdown_variants")
    rows = [(k, fmt(v)) for k, v in res.items() if k not in nested]
    for name, r in (res.get("kernel_top") or {}).items():
        rows.append((f"kernel {name[:60]}", f"{r['per_frame']:.1f}/frame, {r['us_per_frame']:.1f} µs/frame"))
    for b, r in (res.get("batch_sweep") or {}).items():
        rows.append((f"batch {b}", ", ".join(f"{k}={fmt(v)}" for k, v in r.items())))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _print_variants(res: dict) -> None:
    """The variants side by side: ms per frame at batch 1, the sweep, memory."""
    variants = res["variants"]
    names = list(variants)

    def fmt(v, digits=3):
        if v is None:
            return "-"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    rows = [("", names)]
    for key, label in (
        ("ms_per_frame", "ms/frame, batch 1"),
        ("rtf", "RTF, batch 1"),
        ("first_audio_ms", "first audio ms"),
        ("compile_cold_s", "compile cold s"),
    ):
        if any(key in v for v in variants.values()):
            rows.append((label, [fmt(v.get(key)) for v in variants.values()]))
    batches = list(dict.fromkeys(b for v in variants.values() for b in (v.get("batch_sweep") or {})))
    for b in batches:
        cells = []
        for v in variants.values():
            r = (v.get("batch_sweep") or {}).get(b, {})
            cells.append(
                "error" if "error" in r else f"{fmt(r.get('ms_per_step'), 2)} ms, {fmt(r.get('x_realtime'), 0)}× RT"
            )
        rows.append((f"batch {b}", cells))
    for key, label in (
        ("memory_loaded_gb", "GB in use, loaded"),
        ("peak_memory_gb_load", "peak GB, loading"),
        ("peak_memory_gb_batch1", "peak GB, batch-1 timing"),
        ("peak_memory_gb_first_audio", "peak GB, first audio"),
        ("peak_memory_gb", "peak GB, any phase"),
    ):
        rows.append((label, [fmt(v.get(key)) for v in variants.values()]))
    for b in batches:
        cells = [fmt(((v.get("batch_sweep") or {}).get(b) or {}).get("peak_memory_gb")) for v in variants.values()]
        rows.append((f"peak GB, sweep batch {b}", cells))
    print(f"{res['device']} · {res['backend']} · jax {res['jax']} · {res['weights']} · {res['dtype']}")
    width = max(len(label) for label, _ in rows)
    cols = [max(len(str(c[i])) for _, c in rows) for i in range(len(names))]
    for label, cells in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{str(c):>{w}}" for c, w in zip(cells, cols)))
