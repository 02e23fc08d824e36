"""Defaults in one place: what every loader, generator and command uses when not told otherwise."""

from __future__ import annotations

TEMPERATURE = 0.9
TOP_K = 50
MAX_AUDIO_MS = 90_000  # 1125 frames; context + text + audio must still fit 2048 positions
MAX_SILENCE_MS = 3000  # stop a row after this much trailing silence (None: never)
CHUNK_FRAMES = 8  # frames per compiled decode call once audio flows (streaming granularity)
FIRST_CHUNK_FRAMES = 1  # the first call returns after one frame: low time to first audio
PROGRESS = True  # progress bars for downloads, conversion and long generations

# XLA options for the programs whose matmuls go through cuBLAS rather than XLA's Triton GEMM
# fusions (Mimi's encoder, decoder and streaming step; the prompt's prefill). XLA autotunes those
# fusions while compiling: on an H200 the Mimi step took 24.7 s and the encoder 39.7 s to compile,
# and a new process's first audio and first voice prompt wait for them; with cuBLAS 2.3 s and
# 3.6 s (prefill 2.45 → 1.45 s), for a Mimi step 0.28 ms slower per 8 frames at batch 1 (1.48 →
# 1.76 ms), an encoder 4 % and a prefill 7 % slower (`python -m benchmarks.startup --compile-ab`,
# docs/PERF.md #38). The decode loop keeps XLA's default below `DecodeOptions.cublas_min_rows`
# rows and takes these from there (PERF.md #64). Ignored off GPUs.
CUBLAS_GEMMS = {"xla_gpu_enable_triton_gemm": False}


def allocate_on_demand() -> None:
    """For a one-shot command (`jaxtts speak`): GPU memory taken as the programs need it, instead
    of JAX reserving 75 % of the GPU when the backend starts. On an H200 that reservation made a
    new process's first transfer take 1.4–2.4 s (0.15 s for 5 %, ~0 without; docs/PERF.md #42), a
    third of a cached start. A server (`jaxtts serve`) keeps JAX's default: one reservation
    avoids fragmentation over a long life. The user's own XLA_PYTHON_CLIENT_PREALLOCATE wins.
    Only has an effect before anything starts JAX's backend."""
    import os

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def jit_cublas(fn, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` compiled with `CUBLAS_GEMMS` (see `jit_with_options`)."""
    return jit_with_options(fn, CUBLAS_GEMMS, **jit_kwargs)


def jit_with_options(fn, compiler_options: dict, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` compiled with these XLA `compiler_options` when called on its
    own. Called inside another trace (a user's jit or eval_shape) it is a plain nested jit: JAX
    refuses compiler options there, and the enclosing program's options apply."""
    import functools

    import jax

    with_options = jax.jit(fn, compiler_options=compiler_options or None, **jit_kwargs)
    if not compiler_options:
        return with_options
    nested = jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return with_options(*args, **kwargs)
        except ValueError as e:  # raised while staging, before anything runs
            if "compiler_options" not in str(e):
                raise
            return nested(*args, **kwargs)

    call.lower, call.eval_shape, call.trace = with_options.lower, with_options.eval_shape, with_options.trace
    return call


def default_dtype(platform: str | None = None) -> str:
    """Parameter dtype for a platform (default: JAX's default backend): bfloat16 where it is
    fast (GPUs, TPUs); float32 on CPUs, which emulate bfloat16 slowly."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "float32" if platform == "cpu" else "bfloat16"


def add_dtype_argument(parser) -> None:
    """`--dtype` for the commands that load models (jaxtts speak, jaxtts serve)."""
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float32"],
        help="parameter dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
