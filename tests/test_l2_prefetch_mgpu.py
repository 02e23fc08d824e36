"""pallas_kernels.l2_prefetch_mgpu (a kernel that asks L2 for weights a later kernel reads).

On CPU: the box plan against the bytes asked for, the kernel in Pallas' Mosaic GPU interpreter
(where a prefetch is a no-op: x must come back unchanged), the kernel
lowered for CUDA at CSM-1B's shapes. With JAXTTS_TEST_DEVICE=gpu, the compiled kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.l2_prefetch_mgpu import Boxes, l2_prefetch, plan, planned_bytes

BF = jnp.bfloat16


def _covered(boxes: Boxes, k: int, n: int) -> np.ndarray:
    """Which elements of a [k, n] weight the plan's boxes cover (each at most once)."""
    hit = np.zeros((k, n), np.int32)
    for j in range(boxes.count):
        r0, c0 = (j // boxes.per_row) * boxes.rows, (j % boxes.per_row) * boxes.cols
        hit[r0 : r0 + boxes.rows, c0 : c0 + boxes.cols] += 1
    return hit


@pytest.mark.parametrize(
    "shapes,max_bytes",
    [
        ([(1024, 16384), (8192, 1024)], None),  # depth gate/up and down, whole
        ([(1024, 16384), (8192, 1024)], 40 << 20),  # all of gate/up, the first rows of down
        ([(2048, 16384)], 32 << 20),  # the backbone's gate/up: the first 32 MB of rows
        ([(1024, 1536), (384, 200)], None),  # 200 columns: boxes of 8
    ],
)
def test_the_plan_covers_the_first_rows_asked_for(shapes, max_bytes):
    boxes = plan([(s, 2) for s in shapes], max_bytes)
    budget = max_bytes
    for (k, n), b in zip(shapes, boxes):
        assert b.rows <= 256 and b.cols <= 256 and k % b.rows == 0 and n % b.cols == 0
        hit = _covered(b, k, n)
        assert hit.max() <= 1
        rows = int(hit.any(axis=1).sum())
        assert hit[:rows].all() and not hit[rows:].any()  # whole leading rows, nothing after
        if budget is None:
            assert rows == k
        else:
            assert rows * n * 2 <= budget
            if rows < k:  # stopped only because one more row of boxes would not fit
                assert (rows + b.rows) * n * 2 > budget
            budget -= rows * n * 2
    assert planned_bytes(boxes, [2] * len(shapes)) <= (max_bytes or float("inf"))


@pytest.mark.parametrize("blocks", [1, 5, 64])
def test_interpreted_the_value_passes_through_unchanged(blocks):
    x = (
        jax.random.normal(jax.random.key(0), (3, 256), jnp.float32)
        .at[0, :3]
        .set(jnp.array([jnp.inf, -jnp.inf, jnp.nan]))
    )
    ws = [jnp.ones((512, 768), BF), jnp.ones((256, 128), jnp.int8)]
    for max_bytes in (None, 300_000):
        y = l2_prefetch(x, *ws, max_bytes=max_bytes, blocks=blocks, interpret=True)
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # infinities and NaN too
        yb = l2_prefetch(x.astype(BF), *ws, max_bytes=max_bytes, blocks=blocks, interpret=True)
        assert yb.dtype == BF
        np.testing.assert_array_equal(np.asarray(yb, np.float32), np.asarray(x.astype(BF), np.float32))


def test_lowers_for_cuda_at_csm_shapes():
    """The kernel at the depth decoder's gate/up + down and the backbone's gate/up (capped)."""
    h = jax.ShapeDtypeStruct((1, 1024), BF)
    gu, down = jax.ShapeDtypeStruct((1024, 16384), BF), jax.ShapeDtypeStruct((8192, 1024), BF)
    for args, max_bytes in (
        ((h, gu, down), None),
        ((jax.ShapeDtypeStruct((1, 2048), BF), jax.ShapeDtypeStruct((2048, 16384), BF)), 32 << 20),
    ):
        lowered = (
            jax.jit(lambda x, *w, mb=max_bytes: l2_prefetch(x, *w, max_bytes=mb))
            .trace(*args)
            .lower(lowering_platforms=("cuda",))
        )
        text = lowered.as_text()
        assert "mosaic_gpu" in text
        # the prefetch instruction survives into the kernel (plgpu.async_prefetch alone would be
        # removed as dead code: it has only a read effect)
        assert "cp.async.bulk.prefetch.tensor" in text


def test_rejects_a_stacked_weight():
    with pytest.raises(ValueError, match="2-D"):
        l2_prefetch(jnp.zeros((1, 8)), jnp.zeros((2, 64, 64), BF), interpret=True)


@pytest.mark.gpu
@pytest.mark.gpu_only(reason="the compiled kernel: a prefetch needs the GPU's TMA")
def test_compiled_passes_x_through_at_csm_shapes():
    """Compiled at the depth decoder's gate/up + down (all of it) and the backbone's gate/up
    (capped), 64 and 7 programs: x comes back bit for bit, in a jit that uses it afterwards."""
    x = jax.random.normal(jax.random.key(0), (1, 1024), jnp.float32)
    gu = jax.random.normal(jax.random.key(1), (1024, 16384), BF)
    down = jax.random.normal(jax.random.key(2), (8192, 1024), BF)
    big = jax.random.normal(jax.random.key(3), (2048, 16384), BF)
    for ws, max_bytes, blocks in (((gu, down), None, 64), ((big,), 40 << 20, 7)):
        step = jax.jit(lambda x, *w, mb=max_bytes, nb=blocks: l2_prefetch(x, *w, max_bytes=mb, blocks=nb) * 2)
        np.testing.assert_array_equal(np.asarray(step(x, *ws)), np.asarray(x) * 2)
        # and XLA kept the kernel (a kernel whose output nothing needs would be dead code)
        assert "mosaic_gpu" in step.lower(x, *ws).compile().as_text()
