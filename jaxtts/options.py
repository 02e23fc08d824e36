"""`DecodeOptions`: every choice that makes the decode loop compile a different program.

One frozen, hashable value, chosen once per device by `default_options()`, carried by `TTS`,
`generate_frames` and the engine, and passed to the jitted functions as a static argument: two
options in one process are two programs by construction (JAX's compile cache keys on them), and
nothing else (no module global) changes what is compiled. Tests and benchmarks build variants
with `opts.replace(...)`.

This module imports no Pallas code: the kernels are imported where an option selects them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxtts.defaults import CUBLAS_GEMMS
from jaxtts.errors import JaxttsError

ATTENTION_IMPLS = ("xla", "pallas", "pallas_interpret")
INT8_CONVERTS = ("cvt", "magic", "asm")  # = pallas_kernels._backend.INT8_CONVERTS (no Pallas import here)
TOP_K_METHODS = ("sort", "rank")

# GEMV configs (block_n, block_k, k_splits, num_warps, num_stages, method) for more rows than
# `pallas_kernels.matvec.default_config` was tuned for, by device kind, then by (rows rounded up
# to a power of two, K, N). Only shapes where a GPU sweep found the kernel faster than XLA's dot
# are listed (`python -m benchmarks.decode_probe --tune-matvec`); `jaxtts.llama.dense` sends the
# other shapes of that many rows to jnp.dot. A table swept on one GPU never applies to another.
MATVEC_TUNED: dict[str, dict[tuple[int, int, int], tuple]] = {
    # 2026-12-02 (docs/PERF.md #20): the shapes that also won inside the batch-64 decode loop.
    "NVIDIA H200": {
        (64, 8192, 1024): (64, 128, 8, 4, 3, "dot"),  # depth down: 9.0 vs 10.0 µs alone
        (64, 8192, 2048): (64, 64, 8, 4, 4, "dot"),  # backbone down: 13.0 vs 16.5
        (64, 2048, 3072): (128, 64, 4, 4, 4, "dot"),  # backbone qkv: 8.1 vs 8.8
        (64, 2048, 2048): (64, 64, 4, 4, 4, "dot"),  # backbone out: 6.7 vs 8.8
    },
}
MATVEC_TUNED_MAX_ROWS = 64  # the GEMV kernel's largest M

# The smallest decode batch (rows per device) whose program compiles its XLA matmuls with cuBLAS
# instead of XLA's Triton GEMM fusions, by device kind (`DecodeOptions.cublas_min_rows`). Measured
# per decode program in one process (`python -m benchmarks.gemm_rows`): Triton's split-K GEMMs of
# the narrow projections (qkv, out) plus their reduction fusions lose to cuBLAS from 256 rows on.
CUBLAS_MIN_ROWS: dict[str, int] = {
    # 2026-12-04 (docs/PERF.md #64): batch 256 10.16 vs 10.80 ms per step; 128 8.51 vs 8.31; 64 7.18 vs 6.57.
    "NVIDIA H200": 256,
}


@dataclass(frozen=True)
class DecodeOptions:
    """How the decode loop is compiled. Results are the same for every choice up to rounding
    (the kernels are tested against their references); speed differs.

    attention             "xla", "pallas" (GPU kernels) or "pallas_interpret" (the kernels in the
                          Pallas interpreter on CPU, for tests). Every other kernel option below
                          applies only when this is a Pallas choice.
    matvec                skinny matmuls (≤ matvec_max_rows rows) through the Pallas GEMV kernel
    fused_step            decode steps of ≤ fused_step_max_rows rows as eight kernels per block
    step_attention        larger decode steps write k/v and attend in one kernel
    sample_kernel         draws of ≥ sample_kernel_min_rows rows in one Pallas kernel
    top_k_method          "sort" (lax.top_k) or "rank" (count larger entries): the XLA top-k
    depth_unroll          depth-decoder steps unrolled per loop iteration
    audio_table           depth-decoder inputs from a precomputed projected-embedding table
    matvec_tuned          measured GEMV configs for this device: ((rows, K, N), config) pairs
    int8_kernels          a model with int8 weights (jaxtts.quantize) takes the GEMV and fused
                          kernels above, dequantizing in registers; False: its matmuls all go
                          to XLA's convert+dot and its decode steps to the unfused path
    int8_convert          how those kernels turn int8 tiles into floats: "cvt" (the conversion
                          instruction), "magic" (integer add, float subtract) or "asm" (the
                          same in PTX, four bytes at a time); same values, different speed
    swiglu_epilogue       in the fused step, the MLP's gate/up projection finishes its norm and
                          applies SwiGLU in its epilogue (`norm_matvec(swiglu=True)`: one K
                          split, gate and up tiles in one program), saving the XLA fusion
                          between the two MLP projections (on by default on GPUs)
    block_tail            in the fused step, the tail of each block (out projection, residual,
                          norm, gate/up, SwiGLU, down) as one persistent Mosaic GPU kernel
                          (pallas_kernels.block_tail_mgpu; Hopper, bfloat16 weights) instead of
                          five kernels (its three phases as three kernels in the interpreter);
                          off by default: slower on the H200 (docs/PERF.md, session 7)
    between_attention     in the fused step, everything between two attentions (out projection,
                          residual, norm, gate/up, SwiGLU, down, residual, the next block's norm
                          and qkv) as one persistent Mosaic GPU kernel
                          (pallas_kernels.between_attention_mgpu; Hopper, bfloat16 weights, at
                          most 8 rows) instead of seven kernels; off by default (docs/PERF.md,
                          session 12)
    span_spread           with between_attention: the span kernel's out projection and qkv split
                          over K as well, so those phases run on (nearly) every program
                          (`between_attention_mgpu.config_for(spread=True)`)
    cublas_min_rows       decode programs of at least this many rows (per device) compile their
                          XLA matmuls with cuBLAS (`xla_gpu_enable_triton_gemm=False` for that
                          program only); 0: never. Same results up to rounding, different speed
    mosaic                the device runs the Mosaic GPU kernels (`mosaic_gpu_capable`: Hopper);
                          set by `default_options` from the device, required by every Mosaic
                          GPU option above when compiled (the interpreter runs them anywhere)
    """

    attention: str = "xla"
    matvec: bool = True
    matvec_max_rows: int = 8  # measured: ties XLA at 8 rows
    fused_step: bool = True
    fused_step_max_rows: int = 8  # measured: slower than XLA's dots at 64 rows (docs/PERF.md #14)
    step_attention: bool = True
    sample_kernel: bool = True
    sample_kernel_min_rows: int = 2  # one program per row: a lone row is faster in XLA (PERF.md)
    top_k_method: str = "sort"
    depth_unroll: int = 1
    audio_table: bool = True
    matvec_tuned: tuple = ()
    int8_kernels: bool = True
    int8_convert: str = "cvt"
    swiglu_epilogue: bool = False
    block_tail: bool = False
    between_attention: bool = False
    span_spread: bool = False
    cublas_min_rows: int = 0
    mosaic: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise JaxttsError(f"unknown attention impl {self.attention!r}; choose one of {ATTENTION_IMPLS}")
        if self.top_k_method not in TOP_K_METHODS:
            raise JaxttsError(f"unknown top_k_method {self.top_k_method!r}; choose one of {TOP_K_METHODS}")
        if self.int8_convert not in INT8_CONVERTS:
            raise JaxttsError(f"unknown int8_convert {self.int8_convert!r}; choose one of {INT8_CONVERTS}")
        if self.cublas_min_rows < 0:
            raise JaxttsError(f"cublas_min_rows must be ≥ 0 (0: never), got {self.cublas_min_rows}")
        if self.depth_unroll < 1:
            raise JaxttsError(f"depth_unroll must be ≥ 1, got {self.depth_unroll}")
        hash(self.matvec_tuned)  # a dict or list here would make the options unusable as a jit key

    @property
    def pallas(self) -> bool:
        """Whether the Pallas kernels run (compiled, or in the interpreter on CPU)."""
        return self.attention in ("pallas", "pallas_interpret")

    @property
    def interpret(self) -> bool:
        return self.attention == "pallas_interpret"

    def replace(self, **changes) -> DecodeOptions:
        return dataclasses.replace(self, **changes)

    def tuned_matvec(self, m: int, k: int, n: int) -> tuple | None:
        """The measured GEMV config for x [m, k] @ w [k, n] on this device, or None."""
        if m > MATVEC_TUNED_MAX_ROWS:
            return None
        key = (1 << max(0, m - 1).bit_length(), k, n)
        for shape, cfg in self.matvec_tuned:
            if shape == key:
                return cfg
        return None

    def uses_matvec(self, m: int, k: int, n: int, *, quantized: bool = False) -> bool:
        """Whether x [m, k] @ w [k, n] (an int8 w when `quantized`) goes to the GEMV kernel."""
        if quantized and not self.int8_kernels:
            return False
        return self.pallas and self.matvec and (m <= self.matvec_max_rows or self.tuned_matvec(m, k, n) is not None)

    def uses_fused_step(self, rows: int, *, quantized: bool = False) -> bool:
        if quantized and not self.int8_kernels:
            return False
        return self.pallas and self.fused_step and rows <= self.fused_step_max_rows

    def _streams_with_mosaic(self, rows: int, weights) -> bool:
        """A fused step of `rows` rows on a device that runs Mosaic GPU kernels (or interpreted),
        with plain bfloat16 weight arrays that a persistent Mosaic GPU kernel can stream."""
        return (
            (self.mosaic or self.interpret)
            and self.uses_fused_step(rows)
            and all(getattr(w, "dtype", None) == jnp.bfloat16 for w in weights)
        )

    def uses_block_tail(self, rows: int, weights) -> bool:
        """Whether a fused step of `rows` rows takes the block-tail kernel for the block's
        weights (out, gate_up, down): asked for, and `_streams_with_mosaic`."""
        return self.block_tail and self._streams_with_mosaic(rows, weights)

    def uses_between_attention(self, rows: int, weights) -> bool:
        """Whether a fused step of `rows` rows runs its spans from one attention to the next
        as `between_attention_mgpu`: asked for, at most 8 rows, and `_streams_with_mosaic`."""
        return self.between_attention and rows <= 8 and self._streams_with_mosaic(rows, weights)

    def compiler_options(self, rows: int) -> tuple:
        """XLA compiler options (sorted (name, value) pairs) of a decode program of `rows` rows
        per device: a per-program choice, passed to that program's `jax.jit`."""
        if self.cublas_min_rows and rows >= self.cublas_min_rows:
            return tuple(sorted(CUBLAS_GEMMS.items()))
        return ()

    def uses_sample_kernel(self, rows: int) -> bool:
        return self.pallas and self.sample_kernel and rows >= self.sample_kernel_min_rows


def mosaic_gpu_capable(device) -> bool:
    """Whether `device` runs this package's Pallas Mosaic GPU kernels (pallas_kernels/*_mgpu.py):
    an NVIDIA GPU of compute capability 9.x (Hopper). They use wgmma, which Blackwell (10.x)
    replaced and older GPUs lack. The one place that decides which kernel family a device gets:
    Mosaic GPU here, Triton on the other NVIDIA GPUs (while JAX ships that lowering), XLA
    elsewhere (`default_options`)."""
    cc = str(getattr(device, "compute_capability", "") or "")
    return device.platform == "gpu" and cc.split(".")[0] == "9"


def default_options(device: jax.Device | None = None, *, attention: str | None = None) -> DecodeOptions:
    """The options for `device` (default: JAX's first device): the Pallas kernels with the
    tuned configs of that GPU kind on NVIDIA GPUs, plain XLA elsewhere (Pallas on a CPU only
    runs in the slow interpreter). `attention` overrides the attention implementation."""
    device = device or jax.devices()[0]
    gpu = device.platform == "gpu"
    if attention == "pallas" and not gpu:  # the compiled kernels lower only through Triton
        raise JaxttsError(
            f"attention 'pallas' needs an NVIDIA GPU, this device is {device.platform}; use 'xla' "
            "(or 'pallas_interpret': the kernels in the slow interpreter)"
        )
    return DecodeOptions(
        attention=attention or ("pallas" if gpu else "xla"),
        # Rank counting is a fused compare-and-reduce: fewer, cheaper GPU kernels than a sort.
        top_k_method="rank" if gpu else "sort",
        # Five depth steps per loop iteration: 5.03 vs 5.16 ms per frame at batch 1 on the H200,
        # compiled no slower (docs/PERF.md #52); ×10 and ×30 measured no faster, and on CPU the
        # interpreted kernels would compile five times over for nothing.
        depth_unroll=5 if gpu else 1,
        # The norm and SwiGLU in the gate/up kernel: int8 4.30 vs 4.44 ms per frame, bf16 5.00 vs
        # 5.02 (a tie), 136 kernels a frame fewer (docs/PERF.md #78)
        swiglu_epilogue=gpu,
        mosaic=mosaic_gpu_capable(device),
        matvec_tuned=tuple(sorted(MATVEC_TUNED.get(device.device_kind, {}).items())) if gpu else (),
        cublas_min_rows=CUBLAS_MIN_ROWS.get(device.device_kind, 0) if gpu else 0,
    )


def resolve_options(options: DecodeOptions | None = None, attention: str | None = None) -> DecodeOptions:
    """`options` as given, else `default_options(attention=...)`; both at once is an error."""
    if options is None:
        return default_options(attention=attention)
    if not isinstance(options, DecodeOptions):
        raise JaxttsError(f"options must be a jaxtts.DecodeOptions, got {type(options).__name__}")
    if attention is not None and attention != options.attention:
        raise JaxttsError(f"attention={attention!r} contradicts options.attention={options.attention!r}")
    return options
