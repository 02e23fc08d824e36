"""Start-up: what a new process spends before its first WAV, phase by phase.

    python -m benchmarks.startup [--preset csm-1b|tiny] [--max-audio-ms 3000] [--context-s 10] [--json FILE]
    python -m benchmarks.startup --compile-ab [--budget-s 900] [--json FILE]

Times, in one fresh process: importing jaxtts, starting the backend, building random weights
(CSM and Mimi), the tokenizer, the first `generate` (with every XLA compilation it triggers,
named, from JAX's monitoring events), a second `generate` (warm), and `prepare_context` for a
voice prompt of --context-s seconds, then of a different length (a new Mimi encode and prefill
shape). Run it twice with the same JAXTTS_COMPILE_CACHE to see the persistent cache's effect.
Also prints the memory XLA plans for the largest programs (memory_analysis), which is where a
runaway temporary shows up.

--compile-ab (instead of the phases): the heavy programs of a new process's first `generate`
and `prepare_context` (the prompt's prefill, the decode chunk, Mimi's streaming decode step, and
Mimi's encoder at the --context-s bucket) compiled under each variant of XLA compiler options in
`VARIANTS` (the persistent cache bypassed), then run a few times. Each variant runs in a process
of its own that compiles nothing else first: XLA keeps GPU autotuning results in memory for the
life of a process, so a program compiled a second time there is not a cold compile. The
programs are the library's own, lowered with the arguments TTS gives them (recorded by stand-ins
for its jitted functions, which run nothing: see `capture`). No compile starts after --budget-s.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()

FIRST_TEXT = "Hello from jaxtts, a first sentence."
CONTEXT_TEXT = "This is how I sound."

# --compile-ab: XLA compiler options, passed per compile (the xla_gpu_* ones mean nothing elsewhere).
# Each sets the Triton GEMM choice explicitly: options given here override those of the jitted
# function (the prefill and Mimi's are compiled with Triton GEMMs off: jaxtts.defaults.CUBLAS_GEMMS), so
# "XLA default" is XLA's default for every program.
VARIANTS = {
    "XLA default": {"xla_gpu_enable_triton_gemm": True},
    "autotune 0": {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": True},
    "no triton gemm": {"xla_gpu_enable_triton_gemm": False},
    "autotune 0, no triton gemm": {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False},
}
# The heavy programs: the jitted function (module, name) TTS calls and its static arguments (those
# of its jax.jit, which a compiled program's call leaves out).
PROGRAMS = {
    "prefill": ("jaxtts.generation", "_prefill", ("graphdef", "opts")),
    "decode chunk": ("jaxtts.generation", "_decode_chunk", ("graphdef", "num_frames", "opts", "mesh")),
    "Mimi decode step": ("jaxtts.mimi.codec", "_decode_step", ("cfg",)),
    "Mimi encode": ("jaxtts.mimi.codec", "_encode", ("cfg",)),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup")
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--max-audio-ms", type=float, default=3000)
    p.add_argument("--context-s", type=float, default=10.0)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--compile-ab",
        "--encode-ab",  # its name when it tried Mimi's encoder alone
        dest="compile_ab",
        action="store_true",
        help="instead of the phases: compile and run the heavy programs under each of VARIANTS' XLA options",
    )
    p.add_argument("--budget-s", type=float, default=900, help="--compile-ab: start no compile after this")
    p.add_argument("--ab-variant", default=None, help=argparse.SUPPRESS)  # a --compile-ab child process
    p.add_argument("--ab-deadline", type=float, default=None, help=argparse.SUPPRESS)  # time.time() of the budget
    p.add_argument(
        "--explain-cache",
        action="store_true",
        help="list the persistent compile cache's hits, misses and skipped writes per program",
    )
    args = p.parse_args(argv)
    if args.ab_variant is not None:
        return ab_variant(args)
    if args.compile_ab:
        return compile_ab(args)

    phases: dict[str, float] = {}
    compiles: list[tuple[str, float]] = []
    mark = [time.perf_counter()]

    split: dict[str, dict[str, float]] = {}  # phase → JAX's trace / lower / compile time within it
    spans: list[tuple[str, float, float]] = []  # (kind, start, end) since the last phase

    def phase(name):
        now = time.perf_counter()
        phases[name] = round(now - mark[0], 3)
        mark[0] = now
        split[name] = {kind: round(covered(spans, kind), 3) for kind in SPAN_KINDS.values()}
        spans.clear()
        parts = ", ".join(f"{k} {v:.2f}" for k, v in split[name].items() if v >= 0.005)
        print(f"{name:<34} {phases[name]:8.2f} s" + (f"   ({parts})" if parts else ""), flush=True)

    import jax

    def on_span(event, start, end, **_):  # nested jits trace inside their caller: `covered` merges
        if event in SPAN_KINDS:
            spans.append((SPAN_KINDS[event], start, end))

    jax.monitoring.register_event_time_span_listener(on_span)

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
    import numpy as np

    for i in range(2):  # the first host → device copy of a process pays set-up costs of its own
        jax.block_until_ready(jax.device_put(np.float32(i)))
        phase(f"{'first' if i == 0 else 'second'} transfer")
    jax.block_until_ready(jax.jit(lambda x: x + 1)(np.float32(0)))
    phase("first tiny program")
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
    audio = tts.generate(FIRST_TEXT, seed=0, max_audio_ms=args.max_audio_ms)
    phase("first generate")
    n_first = len(compiles)
    current["name"] = "second generate"
    tts.generate("Hello from jaxtts, a second sentence.", seed=1, max_audio_ms=args.max_audio_ms)
    phase("second generate (warm)")
    for i, secs in enumerate((args.context_s, args.context_s * 0.7)):
        current["name"] = f"prepare_context {secs:.1f} s"
        ctx = tts.prepare_context(voice_prompt(secs, seed=i))
        jax.block_until_ready(ctx.cache.k[0])
        phase(f"prepare_context {secs:.1f} s" + (" (new length)" if i else ""))
    # What XLA plans to hold for the Mimi encoder at this length (a runaway temporary shows here).
    from jaxtts.buckets import encode_frames
    from jaxtts.mimi import codec as mimi_codec

    frames = encode_frames(int(args.context_s * 12.5) + 1)
    x = jax.ShapeDtypeStruct((1, frames * 1920, 1), jax.numpy.float32)
    with codec._precision():  # as Mimi.encode runs it: the program prepare_context compiled
        ma = mimi_codec._encode.lower(codec.params, x, cfg=codec.config).compile().memory_analysis()
    if ma is not None:
        print(
            f"Mimi encode, {frames} frames: temp {ma.temp_size_in_bytes / 2**30:.2f} GiB, "
            f"arguments {ma.argument_size_in_bytes / 2**30:.2f} GiB"
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
            phase_split=split,
            compiles=compiles,
            cache_log=cache_log,
            total_s=total,
            jax=jax.__version__,
        )
        text = json.dumps(res, indent=1)
        sys.stdout.write(text + "\n") if args.json == "-" else open(args.json, "w").write(text)
    return 0


# JAX's monitoring events (jax/_src/dispatch.py) → what this report calls them. "compile" is the
# XLA compile or the persistent cache's load of it (cache hits are fast compiles).
SPAN_KINDS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}


def covered(spans, kind: str) -> float:
    """Seconds covered by the spans of this kind (overlaps counted once: nested traces, threads)."""
    total, end = 0.0, float("-inf")
    for _, s, e in sorted(sp for sp in spans if sp[0] == kind):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def voice_prompt(secs: float, seed: int = 0):
    """A voice prompt of `secs` seconds of noise, as `prepare_context` takes it."""
    import numpy as np

    from jaxtts.prompt import Segment

    wav = 0.1 * np.random.default_rng(seed).standard_normal(int(secs * 24000))
    return [Segment(0, CONTEXT_TEXT, audio=wav.astype(np.float32))]


# --- --compile-ab ----------------------------------------------------------------------------


def compile_ab(args) -> int:
    """Each variant in a child process (`ab_variant`), then the table program × variant."""
    deadline = time.time() + args.budget_s
    rows, device, skipped = [], None, None
    for variant in VARIANTS:
        if skipped:
            break
        if time.time() > deadline:
            print(f"{variant}: not run (--budget-s {args.budget_s:g} spent)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            child = [
                sys.executable,
                "-m",
                "benchmarks.startup",
                "--ab-variant",
                variant,
                "--ab-deadline",
                str(deadline),
            ]
            child += ["--preset", args.preset, "--max-audio-ms", str(args.max_audio_ms)]
            child += ["--context-s", str(args.context_s), "--json", str(out)]
            if subprocess.run(child).returncode or not out.exists():
                print(f"{variant}: its process failed")
                continue
            result = json.loads(out.read_text())
        rows += result["rows"]
        device = result["device"]
        if result["platform"] != "gpu":  # known after the first (default) child: it has the backend
            skipped = f"the other variants set xla_gpu_* options, which {result['platform']} ignores"
            print(f"{len(VARIANTS) - 1} variants not run: {skipped}")
    print_ab_table(rows)
    if args.json:
        res = dict(device=device, compile_ab=rows, variants=VARIANTS, skipped=skipped, budget_s=args.budget_s)
        text = json.dumps(res, indent=1)
        sys.stdout.write(text + "\n") if args.json == "-" else open(args.json, "w").write(text)
    return 0 if rows else 1


def print_ab_table(rows) -> None:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["program"], r["variant"]): r for r in rows}
    print(f"\n{'compile s / run ms':<18}" + "".join(f"{v:>30}" for v in variants))
    for program in PROGRAMS:
        line = f"{program:<18}"
        for v in variants:
            r = cell.get((program, v))
            if r is None or r["compile_s"] is None:
                text = "n/a" if r is None else r["note"]
            else:
                text = f"{r['compile_s']:.2f} / {r['run_ms']:.2f}"
            line += f"{text:>30}"
        print(line)


def ab_variant(args) -> int:
    """One variant's child: build the models, capture the programs, compile and run each."""
    import jax

    from jaxtts.config import preset
    from jaxtts.csm import CSM
    from jaxtts.defaults import default_dtype
    from jaxtts.mimi import Mimi
    from jaxtts.tts import TTS, enable_compilation_cache

    enable_compilation_cache()  # for the weights' programs; the A/B compiles bypass it
    tts = TTS(CSM.random(preset(args.preset), dtype=default_dtype()), Mimi.random(), max_silence_ms=None)
    options = VARIANTS[args.ab_variant]
    rows = []
    for program, (lowered, dynamic_args) in capture(tts, args).items():
        row = dict(program=program, variant=args.ab_variant, compile_s=None, run_ms=None, note=None)
        rows.append(row)
        if time.time() > args.ab_deadline:
            row["note"] = "budget spent"
            continue
        with persistent_cache_off():
            t = time.perf_counter()
            compiled = lowered.compile(compiler_options=options or None)
            row["compile_s"] = round(time.perf_counter() - t, 3)
        row["run_ms"] = round(run_ms(compiled, lowered, dynamic_args), 3)
        print(f"{args.ab_variant}: {program}: compile {row['compile_s']:.2f} s, run {row['run_ms']:.2f} ms", flush=True)
    result = dict(platform=jax.default_backend(), device=jax.devices()[0].device_kind, rows=rows)
    Path(args.json).write_text(json.dumps(result))
    return 0


class _Spy:
    """Stands in for one of the library's jitted functions while `capture` runs TTS: records its
    first call's arguments and that call lowered (in the caller's context: Mimi's matmul
    precision), and returns zeros shaped like the outputs instead of running it."""

    def __init__(self, fn):
        self.fn, self.first = fn, None

    def __call__(self, *args, **kwargs):
        if self.first is None:
            self.first = (self.fn.lower(*args, **kwargs), (args, kwargs))
        return jax_tree_zeros(self.fn.eval_shape(*args, **kwargs))

    def lower(self, *args, **kwargs):  # TTS lowers the decode programs to compile them ahead of use
        return _Uncompiled()


class _Uncompiled:
    def compile(self):
        return None


def jax_tree_zeros(shapes):
    """Zeros for a tree of ShapeDtypeStructs: host arrays (no program to compile), or device
    arrays for PRNG keys."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def zeros(s):
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            return jnp.zeros(s.shape, s.dtype)
        return np.zeros(s.shape, s.dtype)

    return jax.tree.map(zeros, shapes)


def capture(tts, args) -> dict:
    """{program: (lowered, its call's dynamic (args, kwargs))} for the `PROGRAMS` of a first `generate`
    and of a `prepare_context` of --context-s seconds, each its first call's: the jitted functions
    are replaced by `_Spy`s meanwhile, so nothing of them is compiled or run."""
    modules = {mod: importlib.import_module(mod) for mod, _, _ in PROGRAMS.values()}
    spies = {program: _Spy(getattr(modules[mod], name)) for program, (mod, name, _) in PROGRAMS.items()}
    from jaxtts import programs

    try:
        for program, (mod, name, _) in PROGRAMS.items():
            setattr(modules[mod], name, spies[program])
        with programs.bypassed():  # TTS calls the jitted functions (the spies), not stored programs
            tts.generate(FIRST_TEXT, seed=0, max_audio_ms=args.max_audio_ms)
            tts.prepare_context(voice_prompt(args.context_s))
    finally:
        for program, (mod, name, _) in PROGRAMS.items():
            setattr(modules[mod], name, spies[program].fn)
    missing = [program for program, spy in spies.items() if spy.first is None]
    if missing:
        raise SystemExit(f"TTS did not call {missing}: update PROGRAMS in {__file__}")
    out = {}
    for program, spy in spies.items():
        lowered, (args, kwargs) = spy.first
        out[program] = (lowered, dynamic(spy.fn, lowered, args, kwargs, PROGRAMS[program][2]))
    return out


def dynamic(fn, lowered, args, kwargs, static: tuple) -> tuple:
    """A call's (args, kwargs) without its static arguments: what the compiled program takes."""
    import inspect

    import jax

    names = list(inspect.signature(fn).parameters)
    out = (
        tuple(a for n, a in zip(names, args) if n not in static),
        {k: v for k, v in kwargs.items() if k not in static},
    )
    if jax.tree.structure(out) != lowered.in_tree:
        raise SystemExit(f"{fn.__name__}: its static arguments are not {static}: update PROGRAMS in {__file__}")
    return out


@contextlib.contextmanager
def persistent_cache_off():
    """JAX's persistent compile cache off (it decides once per process whether it is on: reset)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        compilation_cache.reset_cache()


def run_ms(compiled, lowered, dynamic, runs: int = 3) -> float:
    """The fastest of `runs` calls of `compiled` (after one warm-up) on the recorded arguments
    `dynamic` (args, kwargs); donated buffers are copied afresh for each call, outside the timing."""
    import jax
    import jax.numpy as jnp

    leaves = [jax.device_put(a) if hasattr(a, "shape") else a for a in jax.tree.leaves(dynamic)]
    donated = [info.donated for info in jax.tree.leaves(lowered.args_info)]
    times = []
    for _ in range(runs + 1):
        fresh = [jnp.copy(a) if d else a for a, d in zip(leaves, donated, strict=True)]
        args, kwargs = jax.tree.unflatten(lowered.in_tree, jax.block_until_ready(fresh))
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args, **kwargs))
        times.append(time.perf_counter() - t)
    return 1000 * min(times[1:])


if __name__ == "__main__":
    sys.exit(main())
