"""Minimal experiment (issue 17): which Pallas Mosaic GPU ("plgpu") features run on a CPU-only
machine, in JAX's GPU interpret mode, and which lower for the GPU without one.

    python -m benchmarks.mgpu_interpret_probe      # CPU only, ~11 s; prints one line per case

Each case is the smallest kernel that exercises one feature, checked against NumPy. A case prints
`OK` (ran, output right), `WRONG` (ran, output wrong) or `FAILS <exception>: <message> [where]`.
The interpreter is selected by passing `interpret=InterpretGPUParams(...)` (JAX 0.10.2 keeps it in
jax._src.pallas.mosaic_gpu.interpret.params; `jax.experimental.pallas.mosaic_gpu` does not export
it). After a failing case the interpreter's global state is reset
(`reset_gpu_interpret_mode_state`), as its docstring requires. The output of the run on the
development machine (JAX 0.10.2, CPU) is pasted at the end of this file and summarised in
docs/KERNELS.md ("Mosaic GPU on CPU").
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

try:
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError as e:  # JAX without the GPU interpreter
    print(f"no Mosaic GPU interpreter in this JAX ({jax.__version__}): {e}")
    sys.exit(1)

IP = InterpretGPUParams()
RESULTS: list[tuple[str, str]] = []


def _where(e: BaseException) -> str:
    """file:line of the innermost JAX frame that raised, and its source line for bare asserts."""
    frames = traceback.extract_tb(e.__traceback__)
    jax_frames = [f for f in frames if "site-packages/jax" in f.filename] or frames
    f = jax_frames[-1]
    return f"{f.filename.split('site-packages/')[-1]}:{f.lineno}", (f.line or "")


def _describe(e: BaseException) -> str:
    msg = next((line for line in str(e).splitlines() if line.strip()), "")
    where, src = _where(e)
    text = str(e)
    if "CpuCallback error" in msg:  # the interpreter's callbacks wrap the real error and its traceback
        inner = [line.strip() for line in text.splitlines() if "Error:" in line and "Traceback" not in line]
        msg = inner[-1] if inner else msg
        files = re.findall(r'File "[^"]*site-packages/([^"]+)", line (\d+)', text)
        if files:
            where = f"{files[-1][0]}:{files[-1][1]}"
        return f"{msg[:240]} [{where}]"
    if not msg:  # a bare assert: its source line says what failed
        cause = e.__cause__ or e.__context__
        if cause is not None and not str(cause).strip():
            where, src = _where(cause)
        msg = f"(bare assert) {src.strip()}"
    return f"{type(e).__name__}: {msg[:240]} [{where}]"


def case(name: str):
    def run(fn):
        t = time.perf_counter()
        note = ""
        try:
            ok = fn()
            if isinstance(ok, tuple):
                ok, note = ok
            status = "OK" if ok else "WRONG"
        except Exception as e:  # every failure is a result here
            status = "FAILS " + _describe(e)
            reset_gpu_interpret_mode_state()
        print(f"{name:<60} {status}  ({time.perf_counter() - t:.1f} s)", flush=True)
        if note:
            print(f"    {note}", flush=True)
        RESULTS.append((name, status))
        return fn

    return run


X = jnp.arange(2 * 128, dtype=jnp.float32).reshape(2, 128)
WANT = X * 2.0 + 1.0


def tma_kernel(pdl: bool):
    """Per program i: TMA x[i] -> smem, wait on the barrier, write 2x+1 to out[i]."""

    def body(x_gmem, o_gmem, x_smem, bar):
        i = lax.axis_index("b")
        if pdl:
            plgpu.griddepcontrol_launch_dependents()
            plgpu.griddepcontrol_wait()
        plgpu.copy_gmem_to_smem(x_gmem.at[i], x_smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        o_gmem[i] = x_smem[...] * 2.0 + 1.0

    return body


def tma_call(pdl: bool, interpret):
    return plgpu.kernel(
        tma_kernel(pdl),
        out_type=jax.ShapeDtypeStruct(X.shape, X.dtype),
        grid=(2,),
        grid_names=("b",),
        scratch_types=[plgpu.SMEM((128,), jnp.float32), plgpu.Barrier(num_barriers=1)],
        interpret=interpret,
    )


print(f"JAX {jax.__version__}, jaxlib {jax.lib.__version__ if hasattr(jax, 'lib') else '?'}, devices {jax.devices()}")


@case("1 TMA gmem->smem + barrier_wait (plgpu.kernel, grid 2)")
def _():
    return bool(jnp.array_equal(tma_call(False, IP)(X), WANT))


@case("2 + griddepcontrol_launch_dependents/_wait")
def _():
    return bool(jnp.array_equal(tma_call(True, IP)(X), WANT))


@case("3 generic interpreter (interpret=True), TMA + barrier")
def _():
    return bool(jnp.array_equal(tma_call(False, True)(X), WANT))


@case("4 pallas_call grid=(2,) + pl.program_id, GMEM refs")
def _():
    def body(x_ref, o_ref):
        i = pl.program_id(0)
        o_ref[i] = x_ref[i] * 2.0 + 1.0

    out = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct(X.shape, X.dtype),
        grid=(2,),
        in_specs=[pl.BlockSpec(memory_space=plgpu.GMEM)],
        out_specs=pl.BlockSpec(memory_space=plgpu.GMEM),
        compiler_params=plgpu.CompilerParams(),
        interpret=IP,
    )(X)
    written = [bool(np.isfinite(np.asarray(out[r])).all()) for r in range(2)]
    return bool(jnp.array_equal(out, WANT)), (
        f"rows written: {written} (program_id is 0 at every grid point: the interpreter's program_id_p"
        " rule returns 0; plgpu.kernel's grid_names + lax.axis_index work)"
    )


@case("5 pallas_call with BlockSpec index_map (blocks of 1 row)")
def _():
    def body(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2.0 + 1.0

    out = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct(X.shape, X.dtype),
        grid=(2,),
        in_specs=[pl.BlockSpec((1, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((1, 128), lambda i: (i, 0)),
        compiler_params=plgpu.CompilerParams(),
        interpret=IP,
    )(X)
    return bool(jnp.array_equal(out, WANT))


@case("6 pallas_call without grid (whole arrays in SMEM)")
def _():
    def body(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2.0 + 1.0

    out = pl.pallas_call(
        body, out_shape=jax.ShapeDtypeStruct(X.shape, X.dtype), compiler_params=plgpu.CompilerParams(), interpret=IP
    )(X)
    return bool(jnp.array_equal(out, WANT))


@case("7 smem store + commit_smem + TMA smem->gmem + wait")
def _():
    def body(x_gmem, o_gmem, x_smem, bar):
        i = lax.axis_index("b")
        plgpu.copy_gmem_to_smem(x_gmem.at[i], x_smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        x_smem[...] = x_smem[...] * 2.0 + 1.0
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(x_smem, o_gmem.at[i])
        plgpu.wait_smem_to_gmem(0)

    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(X.shape, X.dtype),
        grid=(2,),
        grid_names=("b",),
        scratch_types=[plgpu.SMEM((128,), jnp.float32), plgpu.Barrier(num_barriers=1)],
        interpret=IP,
    )(X)
    return bool(jnp.array_equal(out, WANT))


X4 = jnp.arange(4 * 256, dtype=jnp.float32).reshape(4, 256)


@case("8 emit_pipeline, inputs only (grid (4, 2), 2 stages)")
def _():
    def body(x_gmem, o_gmem, acc):
        acc[...] = jnp.zeros((4, 128), jnp.float32)

        def step(idx, x_smem):
            acc[pl.ds(idx[0], 1)] = acc[pl.ds(idx[0], 1)] + x_smem[...]

        plgpu.emit_pipeline(
            step, grid=(4, 2), in_specs=[plgpu.BlockSpec((1, 128), lambda i, j: (i, j))], max_concurrent_steps=2
        )(x_gmem)
        o_gmem[...] = acc[...]

    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((4, 128), jnp.float32),
        interpret=IP,
        scratch_types=[plgpu.SMEM((4, 128), jnp.float32)],
    )(X4)
    return bool(jnp.array_equal(out, X4[:, :128] + X4[:, 128:]))


@case("9 emit_pipeline with out_specs")
def _():
    def body(x_gmem, o_gmem):
        def step(idx, x_smem, o_smem):
            o_smem[...] = x_smem[...] + 1.0

        plgpu.emit_pipeline(
            step,
            grid=(4, 2),
            in_specs=[plgpu.BlockSpec((1, 128), lambda i, j: (i, j))],
            out_specs=[plgpu.BlockSpec((1, 128), lambda i, j: (i, j))],
            max_concurrent_steps=2,
        )(x_gmem, o_gmem)

    out = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(X4.shape, X4.dtype), interpret=IP)(X4)
    return bool(jnp.array_equal(out, X4 + 1.0))


A = jax.random.normal(jax.random.key(0), (64, 64), jnp.bfloat16)
B = jax.random.normal(jax.random.key(1), (64, 128), jnp.bfloat16)
AB = np.asarray(A, np.float32) @ np.asarray(B, np.float32)
TILES = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def wgmma_kernel(acc_in_scratch: bool, transpose_b: bool = False):
    def mma(a_smem, b_smem, o_gmem, acc):
        b = plgpu.transpose_ref(b_smem, (1, 0)) if transpose_b else b_smem
        plgpu.wgmma(acc, a_smem, b)
        plgpu.wgmma_wait(0)
        o_gmem[...] = acc[...]

    def body(a_gmem, b_gmem, o_gmem, a_smem, b_smem, bar, *acc):
        plgpu.copy_gmem_to_smem(a_gmem, a_smem, bar.at[0])
        plgpu.copy_gmem_to_smem(b_gmem, b_smem, bar.at[1])
        plgpu.barrier_wait(bar.at[0])
        plgpu.barrier_wait(bar.at[1])
        if acc_in_scratch:
            mma(a_smem, b_smem, o_gmem, acc[0])
        else:
            pl.run_scoped(lambda acc_ref: mma(a_smem, b_smem, o_gmem, acc_ref), plgpu.ACC((64, 128), jnp.float32))

    b_shape = (128, 64) if transpose_b else (64, 128)
    scratch = [
        plgpu.SMEM((64, 64), jnp.bfloat16, transforms=TILES),
        plgpu.SMEM(b_shape, jnp.bfloat16, transforms=TILES),
        plgpu.Barrier(num_barriers=2),
    ]
    if acc_in_scratch:
        scratch.append(plgpu.ACC((64, 128), jnp.float32))
    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((64, 128), jnp.float32), scratch_types=scratch, interpret=IP
    )


@case("10 wgmma, ACC in scratch_types")
def _():
    return bool(np.allclose(wgmma_kernel(True)(A, B), AB, atol=1e-3))


@case("11 wgmma 64x64 @ 64x128 bf16, swizzled smem, ACC via run_scoped")
def _():
    return bool(np.allclose(wgmma_kernel(False)(A, B), AB, atol=1e-3))


@case("12 wgmma with a transposed operand (transpose_ref)")
def _():
    return bool(np.allclose(wgmma_kernel(False, transpose_b=True)(A, B.T), AB, atol=1e-3))


@case("13 two warpgroups (num_threads=2), one TMA, both wait")
def _():
    def body(x_gmem, o_gmem, x_smem, bar):
        wg = lax.axis_index("wg")

        @pl.when(wg == 0)
        def _():
            plgpu.copy_gmem_to_smem(x_gmem, x_smem, bar.at[0])

        plgpu.barrier_wait(bar.at[0])
        o_gmem[wg] = x_smem[wg] * 2.0 + 1.0

    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(X.shape, X.dtype),
        num_threads=2,
        thread_name="wg",
        scratch_types=[plgpu.SMEM((2, 128), jnp.float32), plgpu.Barrier(num_barriers=1)],
        interpret=IP,
    )(X)
    return bool(jnp.array_equal(out, WANT))


def oob_kernel(interpret):
    """TMA of 8 rows from a 3-row array (rows 3..7 are out of bounds: TMA zero-fills them)."""
    x3 = X4[:3, :64]

    def body(x_gmem, o_gmem, x_smem, bar):
        z = lax.axis_index("b") * 0  # a dynamic start: Pallas checks static slices against the shape
        plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(z, 8)], x_smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        o_gmem[...] = x_smem[...]

    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((8, 64), jnp.float32),
        grid=(1,),
        grid_names=("b",),
        scratch_types=[plgpu.SMEM((8, 64), jnp.float32), plgpu.Barrier(num_barriers=1)],
        interpret=interpret,
    )(x3)
    return bool(jnp.array_equal(out[:3], x3)), np.asarray(out[3:, 0])


@case("14 TMA read past the end of x (GPU: zero fill)")
def _():
    return oob_kernel(IP)[0]


@case("15 same, InterpretGPUParams(out_of_bounds_reads='uninitialized')")
def _():
    ok, tail = oob_kernel(InterpretGPUParams(out_of_bounds_reads="uninitialized"))
    return ok, f"rows past the end read as {tail.tolist()} (NaN here; zeros from TMA on a GPU)"


@case("16 lower for cuda on CPU: TMA + barrier + griddepcontrol")
def _():
    low = jax.jit(tma_call(True, None)).trace(X).lower(lowering_platforms=("cuda",))
    text = low.as_text()
    return bool("mosaic_gpu" in text)


@case("17 compile that lowering on CPU")
def _():
    jax.jit(tma_call(True, None)).trace(X).lower(lowering_platforms=("cuda",)).compile()
    return True


@case("18 pallas_kernels.matvec_mgpu, M=1 K=256 N=256, interpreted")
def _():
    from pallas_kernels.matvec_mgpu import matvec_mgpu

    x = jax.random.normal(jax.random.key(2), (1, 256), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(3), (256, 256), jnp.bfloat16) / 16
    out = matvec_mgpu(x, w, interpret=True).astype(jnp.float32)
    want = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    return bool(np.allclose(out, want, rtol=1e-2, atol=1e-2))


# Last: a no-op CPU lowering for the two griddepcontrol primitives (process-global, so after every
# other case) shows that they are the only thing the interpreter lacks for case 2.
@case("19 case 2 with no-op CPU lowerings for griddepcontrol_*")
def _():
    from jax._src.interpreters import mlir
    from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives

    for prim in (gpu_primitives.griddepcontrol_wait_p, gpu_primitives.griddepcontrol_launch_dependents_p):
        mlir.register_lowering(prim, lambda ctx: [], platform="cpu")
    return bool(jnp.array_equal(tma_call(True, IP)(X), WANT))


failed = [name for name, status in RESULTS if not status.startswith("OK")]
print(f"{len(RESULTS) - len(failed)} of {len(RESULTS)} cases OK")

# Output on the development machine (JAX 0.10.2, CPU only, 2 shared cores), 11 s in all:
#
#   JAX 0.10.2, jaxlib 0.10.2, devices [CpuDevice(id=0)]
#   1 TMA gmem->smem + barrier_wait (plgpu.kernel, grid 2)       OK  (0.5 s)
#   2 + griddepcontrol_launch_dependents/_wait                   FAILS NotImplementedError: MLIR translation rule for primitive 'griddepcontrol_launch_dependents' not found for platform cpu [jax/_src/pallas/pallas_call.py:881]  (0.0 s)
#   3 generic interpreter (interpret=True), TMA + barrier        FAILS NotImplementedError: No state discharge rule implemented for primitive: copy_gmem_to_smem [jax/_src/state/discharge.py:235]  (0.0 s)
#   4 pallas_call grid=(2,) + pl.program_id, GMEM refs           WRONG  (0.4 s)
#       rows written: [True, False] (program_id is 0 at every grid point: the interpreter's program_id_p rule returns 0; plgpu.kernel's grid_names + lax.axis_index work)
#   5 pallas_call with BlockSpec index_map (blocks of 1 row)     FAILS AssertionError: (bare assert) assert all(bm.has_trivial_window() for bm in grid_mapping.block_mappings) [jax/_src/pallas/mosaic_gpu/interpret/interpret_pallas_call.py:387]  (0.0 s)
#   6 pallas_call without grid (whole arrays in SMEM)            OK  (0.1 s)
#   7 smem store + commit_smem + TMA smem->gmem + wait           OK  (0.2 s)
#   8 emit_pipeline, inputs only (grid (4, 2), 2 stages)         OK  (0.6 s)
#   9 emit_pipeline with out_specs                               FAILS NotImplementedError: predicate not supported [jax/_src/pallas/mosaic_gpu/interpret/gpu_callbacks.py:1436]  (0.3 s)
#   10 wgmma, ACC in scratch_types                               FAILS ValueError: Scoped allocations in MemorySpace.REGS cannot be mixed with scoped allocations in other memory spaces. [jax/_src/pallas/mosaic_gpu/interpret/jaxpr_interpret.py:499]  (0.0 s)
#   11 wgmma 64x64 @ 64x128 bf16, swizzled smem, ACC via run_scoped OK  (0.3 s)
#   12 wgmma with a transposed operand (transpose_ref)           FAILS AttributeError: 'TransposeTransform' object has no attribute 'indices' [jax/_src/pallas/mosaic/interpret/utils.py:356]  (0.3 s)
#   13 two warpgroups (num_threads=2), one TMA, both wait        OK  (0.4 s)
#   14 TMA read past the end of x (GPU: zero fill)               FAILS IndexError: Out-of-bounds read of HostAllocationKey(memory_space_id=0, device_id=0, thread_id=0, initial_ref_count=1, buffer_id=100): reading [(slice(0, 8, 1), slice(0, 64, 1))] but buffer has shape (3, 64). [jax/_src/pallas/mosaic_gpu/interpret/gpu_callbacks.py:597]  (0.3 s)
#   15 same, InterpretGPUParams(out_of_bounds_reads='uninitialized') OK  (0.3 s)
#       rows past the end read as [nan, nan, nan, nan, nan] (NaN here; zeros from TMA on a GPU)
#   16 lower for cuda on CPU: TMA + barrier + griddepcontrol     OK  (0.0 s)
#   17 compile that lowering on CPU                              FAILS JaxRuntimeError: NOT_FOUND: No FFI handler registered for mosaic_gpu_v2 on a platform Host (canonical host) [jax/_src/compiler.py:353]  (0.0 s)
#   18 pallas_kernels.matvec_mgpu, M=1 K=256 N=256, interpreted  OK  (1.4 s)
#   19 case 2 with no-op CPU lowerings for griddepcontrol_*      OK  (0.2 s)
#   10 of 19 cases OK
