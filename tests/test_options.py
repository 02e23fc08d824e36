"""DecodeOptions: every variant is its own compiled program, and the refactor changed no output."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtts.config import preset
from jaxtts.csm import CSM
from jaxtts.errors import JaxttsError
from jaxtts.generation import _decode_chunk, _decode_chunk_for, _decode_chunk_jit, generate_frames, split_model
from jaxtts.options import DecodeOptions, default_options
from jaxtts.sampling import Sampler
from jaxtts.testing import prompt_state

GOLDEN = Path(__file__).parent / "data" / "frames_before_options.npz"


@pytest.fixture(scope="module")
def model():
    # The weights the golden frames were recorded with: CSM.random(preset("tiny"), seed=7) as it
    # was then, the constructor with Threefry keys in one jit (CSM.random now draws differently).
    return nnx.jit(lambda: CSM(preset("tiny"), dtype=jnp.float32, rngs=nnx.Rngs(7)))()


@pytest.mark.parametrize("attention", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("top_k", [50, 1])
def test_frames_unchanged_by_the_options_refactor(model, attention, top_k):
    """Frames recorded with the code before DecodeOptions (module switches), same model and seed."""
    golden = np.load(GOLDEN)
    got = generate_frames(
        model,
        golden["tokens"],
        golden["mask"],
        max_frames=10,
        temperature=0.9,
        top_k=top_k,
        seed=3,
        chunk_frames=4,
        options=DecodeOptions(attention=attention),
    )
    np.testing.assert_array_equal(got, golden[f"{attention}_k{top_k}"])


def _lowered_text(model, opts):
    state = prompt_state(model, 1, 8, 64, opts)
    graphdef, weights = split_model(model)
    return _decode_chunk.lower(graphdef, weights, state, Sampler.create(0.9, 50), 2, opts, None).as_text()


def test_two_options_are_two_programs(model):
    a = DecodeOptions(attention="pallas_interpret")
    variants = [
        a.replace(matvec=False),
        a.replace(fused_step=False),
        a.replace(top_k_method="rank"),
        a.replace(sample_kernel_min_rows=1),
        a.replace(depth_unroll=2),
    ]
    base = _lowered_text(model, a)
    for v in variants:
        assert _lowered_text(model, v) != base, v
    # The same options compile to the same program (the jit cache keys on the value).
    assert _lowered_text(model, a.replace()) == base


def test_options_are_hashable_values_and_checked():
    a, b = DecodeOptions(), DecodeOptions()
    assert a == b and hash(a) == hash(b) and a.replace(matvec=False) != a
    with pytest.raises(JaxttsError, match="attention"):
        DecodeOptions(attention="cuda")
    with pytest.raises(JaxttsError, match="top_k_method"):
        DecodeOptions(top_k_method="heap")
    with pytest.raises(TypeError):
        DecodeOptions(matvec_tuned={(64, 1, 1): ()})  # a dict cannot key a jit cache


def test_default_options_on_cpu():
    opts = default_options()
    assert jax.default_backend() == "cpu"
    assert opts.attention == "xla" and not opts.pallas and opts.matvec_tuned == ()
    assert default_options(attention="pallas_interpret").interpret


def test_default_options_on_a_gpu():
    """What a GPU gets (a stand-in device: only its platform and kind are read): the compiled
    kernels, rank top-k, that GPU kind's tuned GEMV configs, five depth steps per loop iteration."""
    from types import SimpleNamespace

    from jaxtts.options import CUBLAS_MIN_ROWS, MATVEC_TUNED

    h200 = default_options(SimpleNamespace(platform="gpu", device_kind="NVIDIA H200", compute_capability="9.0"))
    assert h200.attention == "pallas" and h200.top_k_method == "rank" and h200.depth_unroll == 5
    assert dict(h200.matvec_tuned) == MATVEC_TUNED["NVIDIA H200"] and h200.mosaic
    assert h200.cublas_min_rows == CUBLAS_MIN_ROWS["NVIDIA H200"] > 0
    a100 = default_options(SimpleNamespace(platform="gpu", device_kind="NVIDIA A100", compute_capability="8.0"))
    assert a100.matvec_tuned == () and a100.depth_unroll == 5 and not a100.mosaic
    assert a100.cublas_min_rows == 0  # measured on the H200 only
    b200 = default_options(SimpleNamespace(platform="gpu", device_kind="NVIDIA B200", compute_capability="10.0"))
    assert not b200.mosaic  # no wgmma
    cpu = default_options()
    assert cpu.depth_unroll == 1 and not cpu.mosaic and cpu.cublas_min_rows == 0


def test_cublas_from_a_batch_size_is_a_per_program_choice(model):
    """`cublas_min_rows`: decode programs of that many rows per device get cuBLAS for XLA's
    matmuls through their own jit's compiler options; smaller ones keep XLA's default program.
    Same frames either way (on a CPU the GPU option changes nothing at all)."""
    opts = DecodeOptions(cublas_min_rows=2)
    assert opts.compiler_options(1) == () and DecodeOptions().compiler_options(4096) == ()
    assert dict(opts.compiler_options(2)) == {"xla_gpu_enable_triton_gemm": False} == dict(opts.compiler_options(64))
    one, two = (prompt_state(model, b, 8, 64, opts) for b in (1, 2))
    assert _decode_chunk_for(one, opts, None) is _decode_chunk_jit(())
    assert (
        _decode_chunk_for(two, opts, None) is _decode_chunk_jit(opts.compiler_options(2)) is not _decode_chunk_jit(())
    )
    with pytest.raises(JaxttsError, match="cublas_min_rows"):
        DecodeOptions(cublas_min_rows=-1)
    golden = np.load(GOLDEN)
    kw = dict(max_frames=4, temperature=0.9, top_k=50, seed=3, chunk_frames=2)
    tokens, mask = (np.repeat(golden[name], 2, axis=0) for name in ("tokens", "mask"))
    plain = generate_frames(model, tokens, mask, **kw, options=DecodeOptions())
    np.testing.assert_array_equal(generate_frames(model, tokens, mask, **kw, options=opts), plain)


def test_mosaic_options_need_a_mosaic_device():
    """block_tail compiles only where `mosaic` says the device runs Mosaic GPU kernels; the
    interpreter runs it anywhere (tests)."""
    bf16 = [jnp.zeros((2, 2), jnp.bfloat16)] * 3
    compiled = DecodeOptions(attention="pallas", block_tail=True)
    assert not compiled.uses_block_tail(1, bf16)
    assert compiled.replace(mosaic=True).uses_block_tail(1, bf16)
    assert DecodeOptions(attention="pallas_interpret", block_tail=True).uses_block_tail(1, bf16)
    assert not compiled.replace(mosaic=True).uses_block_tail(1, [jnp.zeros((2, 2), jnp.float32)] * 3)
