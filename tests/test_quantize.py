"""8-bit weights (jaxtts/quantize.py): the arithmetic (per-column weights, per-row embedding
tables and their lookup), the int8 checkpoint (converter, load, save, size, bad input), `jaxtts speak --quantize int8`, accuracy against float32 on the parity model, and the
int8 GEMV / norm_matvec kernels and decode loop against XLA.

The kernel tests are written once for both devices (tests/conftest.py): the Pallas interpreter on
CPU; with JAXTTS_TEST_DEVICE=gpu the tests marked gpu compile them (and the decode loop runs
full-size CSM-1B)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtts import options as options_module
from jaxtts.config import CSM_1B, CSMConfig
from jaxtts.csm import CSM, param_dict
from jaxtts.errors import JaxttsError
from jaxtts.llama import dense
from jaxtts.options import DecodeOptions
from jaxtts.quantize import (
    QuantizedTable,
    QuantizedWeight,
    check_method,
    dequantize,
    dequantize_rows,
    is_embedding_name,
    is_quantized_name,
    is_scale_name,
    lookup,
    quantize_array,
    quantize_model,
    quantize_numpy,
    quantize_rows_array,
    quantize_rows_numpy,
)
from jaxtts.testing import flat
from pallas_kernels._backend import INT8_CONVERTS, int8_to
from pallas_kernels.fused_decode import finish, norm_matvec, norm_matvec_reference
from pallas_kernels.matvec import matvec, matvec_reference

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# The arithmetic.
# ------------------------------------------------------------------------------------------------
def test_quantize_dequantize_error_is_at_most_half_a_step_per_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 96, 40)).astype(np.float32) * rng.uniform(0.01, 5, (3, 1, 40)).astype(np.float32)
    w[0, :, 3] = 0  # an all-zero column
    w[1, 7, 5] = 60.0  # an outlier: its column's scale grows, the other columns' do not
    q, s = quantize_numpy(w)  # q stored transposed: [..., N, K], each column's weights contiguous
    assert q.dtype == np.int8 and s.dtype == np.float32 and q.shape == (3, 40, 96) and s.shape == (3, 40)
    assert q.flags.c_contiguous and q.min() >= -127 and q.max() <= 127 and np.all(s > 0)
    amax = np.abs(w).max(1)
    np.testing.assert_allclose(s, np.where(amax > 0, amax / 127, 1), rtol=1e-7)
    deq = np.asarray(dequantize(q, s))
    assert deq.shape == w.shape and QuantizedWeight(q, s).shape == w.shape  # W's [K, N]
    err = np.abs(w - deq)
    assert np.all(err <= s[:, None, :] / 2 * (1 + 1e-5)), (err / s[:, None, :]).max()
    assert np.all(q[0, 3] == 0) and np.abs(q).max(axis=2).min() == 0  # only the zero column is all zero
    assert np.all(np.abs(q).max(axis=2)[np.abs(w).max(1) > 0] == 127)  # each column's extreme hits ±127
    np.testing.assert_array_equal(q[1, 5, 7], 127)  # the outlier, at [column, row]
    # The converter's NumPy and the model's jitted quantizer give the same bytes.
    qj, sj = quantize_array(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(qj), q)
    np.testing.assert_array_equal(np.asarray(sj), s)
    # ... also from bfloat16 (a bf16 checkpoint quantized at load time): float32 arithmetic.
    wb = jnp.asarray(w, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(quantize_array(wb)[0]), quantize_numpy(np.asarray(wb, np.float32))[0])


def test_embedding_rows_quantize_per_row_and_lookup_dequantizes_only_the_gathered_rows():
    rng = np.random.default_rng(4)
    t = rng.standard_normal((300, 48)).astype(np.float32) * rng.uniform(0.01, 5, (300, 1)).astype(np.float32)
    t[7] = 0  # an all-zero row
    t[11, 5] = 80.0  # an outlier: its row's scale grows, the other rows' do not
    q, s = quantize_rows_numpy(t, block=64)  # in blocks of 64 rows: the same bytes as one pass
    assert q.dtype == np.int8 and s.dtype == np.float32 and q.shape == t.shape and s.shape == (300,)
    amax = np.abs(t).max(1)
    np.testing.assert_allclose(s, np.where(amax > 0, amax / 127, 1), rtol=2e-7)  # × float32(1/127): an ulp off
    err = np.abs(t - np.asarray(dequantize_rows(q, s)))
    assert np.all(err <= s[:, None] / 2 * (1 + 1e-5)), (err / s[:, None]).max()
    assert np.all(q[7] == 0) and np.all(np.abs(q).max(1)[amax > 0] == 127)
    qj, sj = quantize_rows_array(jnp.asarray(t))
    np.testing.assert_array_equal(np.asarray(qj), q)
    np.testing.assert_array_equal(np.asarray(sj), s)
    # lookup: the rows of the dequantized table, in the asked dtype, for ids of any shape.
    table = QuantizedTable(jnp.asarray(q), jnp.asarray(s))
    ids = jnp.asarray([[3, 7, 11], [299, 0, 3]], jnp.int32)
    for dtype in (jnp.float32, jnp.bfloat16):
        got = lookup(table, ids, dtype)
        assert got.shape == (2, 3, 48) and got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(dequantize_rows(q, s, dtype))[np.asarray(ids)])
    # ... gathering int8 rows and their scales: nothing of the table's size but the table itself.
    jaxpr = jax.make_jaxpr(lambda t, i: lookup(t, i, jnp.bfloat16))(table, ids)
    big = [e for e in jaxpr.eqns for v in e.outvars if np.prod(v.aval.shape) >= t.size]
    assert not big, [str(e.primitive) for e in big]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_applies_the_scale_after_the_dot(dtype):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 48)).astype(np.float32) / 8
    x = jnp.asarray(rng.standard_normal((2, 5, 64)), dtype)
    q, s = quantize_array(jnp.asarray(w))
    got = dense(x, QuantizedWeight(q, s))
    assert got.dtype == x.dtype and got.shape == (2, 5, 48)
    # q [N, K]: the dot contracts x's last axis with q's last, then the scale
    dims = (((2,), (1,)), ((), ()))
    want = (jax.lax.dot_general(x, q.astype(x.dtype), dims, preferred_element_type=jnp.float32) * s).astype(x.dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # ... which is x @ dequantized W up to rounding.
    ref = np.asarray(x, np.float32) @ np.asarray(dequantize(q, s))
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=tol, atol=tol)


def test_quantize_model_layout_and_the_original_untouched(random_csm):
    model = random_csm("tiny", seed=2)
    before = flat(param_dict(model))
    q = quantize_model(model)
    assert model.quantization is None and q.quantization == "int8" and q is not model
    assert quantize_model(q) is q  # already int8
    after = flat(param_dict(model))
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    params = flat(param_dict(q))
    int8 = sorted(k for k, v in params.items() if v.dtype == np.int8)
    assert len(int8) == 4 * (model.cfg.backbone.num_layers + model.cfg.decoder.num_layers) + 3 + 2
    assert {k.rsplit(".", 1)[-1] for k in int8} == {
        "qkv",
        "out",
        "gate_up",
        "down",
        "projection",
        "codebook0_head",
        "audio_head",
        "text_embeddings",
        "audio_embeddings",
    }
    for k in int8:  # a scale per output column of a weight, per row of a table
        # (weights are stored [..., N, K], tables [V, D]: the scales' shape is the rest)
        assert params[k + "_scale"].dtype == np.float32 and params[k + "_scale"].shape == params[k].shape[:-1], k
    d, v = model.cfg.decoder.embed_dim, model.cfg.audio_vocab_size
    assert params["audio_head"].shape == (model.cfg.audio_num_codebooks - 1, v, d)
    assert q.quantized_embeddings and q.dtype == jnp.float32  # the model dtype: norms, activations
    # Norms stay in the model dtype, untouched.
    for k in ("backbone.norm.scale", "decoder.layers.0.mlp_norm.scale"):
        assert params[k].dtype == np.float32 and np.array_equal(params[k], before[k])
    # embeddings=False keeps the tables (the layout of int8 checkpoints from before the tables were
    # quantized); quantizing that model again quantizes only the tables.
    keep = quantize_model(model, embeddings=False)
    assert keep.quantization == "int8" and not keep.quantized_embeddings
    assert np.array_equal(keep.text_embeddings[...], before["text_embeddings"])
    again = flat(param_dict(quantize_model(keep)))
    assert again.keys() == params.keys() and all(np.array_equal(again[k], params[k]) for k in params)
    # CSM.random(quantize=) is the same model (up to a few ties rounded the other way: the draws
    # and the quantization are fused into one program there).
    same = flat(param_dict(CSM.random(model.cfg, dtype="float32", seed=2, quantize="int8")))
    assert same.keys() == params.keys()
    for k, v in params.items():
        d = np.abs(np.asarray(v, np.float64) - np.asarray(same[k], np.float64))
        assert d.max() <= (1 if v.dtype == np.int8 else 1e-6 * np.abs(np.asarray(v)).max()) and (d > 0).mean() < 1e-5, k


def test_unknown_method_is_one_line():
    for call in (
        lambda: check_method("int4"),
        lambda: quantize_model(None, "fp8"),
        lambda: CSM.random(CSM_1B, quantize="nf4"),
    ):
        with pytest.raises(JaxttsError, match="unknown quantization") as e:
            call()
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# The int8 checkpoint: converter, load, save, size, bad input.
# ------------------------------------------------------------------------------------------------
# Linear layers large enough to dominate the file (as in CSM-1B), a small vocabulary.
SIZE_ARGS = {
    "backbone": dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=768, max_seq_len=64),
    "decoder": dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128, intermediate_dim=512, max_seq_len=32),
    "text_vocab_size": 300,
    "audio_vocab_size": 40,
    "audio_num_codebooks": 32,
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One random original-layout checkpoint, a bfloat16 `model.safetensors` (the file format
    CSM is distributed in), converted three ways: float32, bfloat16, int8."""
    import ml_dtypes
    from safetensors.numpy import save_file

    import reference_csm as R
    from convert.cli import main

    root = tmp_path_factory.mktemp("quant_convert")
    rng = np.random.default_rng(0)
    tensors = {
        k: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(ml_dtypes.bfloat16)
        for k, s in R.original_shapes(SIZE_ARGS).items()
    }
    save_file(tensors, str(root / "model.safetensors"))
    (root / "cfg.json").write_text(json.dumps(SIZE_ARGS))
    src, cfg = str(root / "model.safetensors"), str(root / "cfg.json")
    for name, extra in {
        "f32": [],
        "bf16": ["--dtype", "bfloat16"],
        "int8": ["--dtype", "bfloat16", "--quantize", "int8"],
    }.items():
        assert main(["csm", src, str(root / name), "--config", cfg, "--quiet", *extra]) == 0
    return root


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_int8_checkpoint_size(converted):
    """The converted int8 checkpoint (Orbax) is ≤ 55 % of the bf16 safetensors file it was
    converted from: every tensor is int8 (projections with a float32 scale per column, tables per
    row): 47.8 % here. Against a converted bf16 checkpoint it is 61 %: Orbax compresses (zstd) random bf16
    weights to ~78 % but int8 to only ~90 % (their bits are nearly all entropy), so the tensors'
    50 % does not survive compression (docs/QUANTIZATION.md has CSM-1B's figures)."""
    from jaxtts.checkpoint import read_param_dtypes

    def tensor_bytes(name, quantization):
        abstract = flat(param_dict(CSM.abstract(CSMConfig.from_dict(SIZE_ARGS), "bfloat16", quantization)))
        stored = flat(read_param_dtypes(converted / name))
        assert {k: np.dtype(a.dtype) for k, a in abstract.items()} == stored
        return {k: int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for k, a in abstract.items()}

    bf16, int8 = tensor_bytes("bf16", None), tensor_bytes("int8", "int8")
    assert sum(int8.values()) / sum(bf16.values()) < 0.51  # int8 + scales, every tensor but the norms
    source = (converted / "model.safetensors").stat().st_size
    assert abs(source / sum(bf16.values()) - 1) < 0.01  # the bf16 file: its tensors and a header
    ratio = du(converted / "int8") / source
    assert ratio <= 0.55, ratio
    assert du(converted / "int8") / du(converted / "bf16") < 0.7


def test_csm_1b_int8_bytes():
    """CSM-1B's layout, counted from the shapes: every projection, head and embedding table in int8
    with its float32 scales is half of its bf16 bytes."""

    def nbytes(quantization, embeddings=True):
        abstract = flat(param_dict(CSM.abstract(CSM_1B, "bfloat16", quantization, embeddings=embeddings)))
        return {k: int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for k, a in abstract.items()}

    bf16, int8 = nbytes(None), nbytes("int8")
    ratio = sum(int8.values()) / sum(bf16.values())
    assert 0.5 < ratio < 0.501, ratio
    linear = [k for k in bf16 if is_quantized_name(k)]
    linear_ratio = sum(int8[k] + int8[k + "_scale"] for k in linear) / sum(bf16[k] for k in linear)
    assert 0.5 < linear_ratio < 0.501, linear_ratio
    # With the tables in bf16 (int8 checkpoints written before they were quantized): ~63 %.
    assert 0.62 < sum(nbytes("int8", embeddings=False).values()) / sum(bf16.values()) < 0.64


def test_int8_checkpoint_loads_as_the_load_time_quantization(converted):
    meta = json.loads((converted / "int8" / "config.json").read_text())
    assert meta["quantization"] == {
        "method": "int8",
        "granularity": "per_channel",
        "embeddings": "per_row",
        "scale_dtype": "float32",
        "layout": "out_in",
    }
    assert meta["dtype"] == "bfloat16"
    stored = CSM.load(converted / "int8", dtype="float32")
    assert stored.quantization == "int8" and stored.dtype == jnp.float32
    at_load = CSM.load(converted / "f32", dtype="float32", quantize="int8")
    a, b = flat(param_dict(stored)), flat(param_dict(at_load))
    assert a.keys() == b.keys()
    for k in a:  # int8 weights, tables and scales, all from the same values (the norms were stored bf16)
        if is_quantized_name(k) or is_embedding_name(k) or is_scale_name(k):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # An int8 checkpoint loads as int8 with quantize="int8" too (nothing to do).
    assert CSM.load(converted / "int8", dtype="float32", quantize="int8").quantization == "int8"


def test_save_and_load_round_trip(random_csm, tmp_path):
    model = quantize_model(random_csm("tiny", seed=2))
    model.save(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["method"] == "int8"
    back = CSM.load(tmp_path / "q", dtype="float32")
    a, b = flat(param_dict(model)), flat(param_dict(back))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # An int8 checkpoint with the tables in the model dtype (no "embeddings" entry: written before
    # the tables were quantized) loads as it is; quantize="int8" quantizes its tables.
    quantize_model(random_csm("tiny", seed=2), embeddings=False).save(tmp_path / "old")
    assert "embeddings" not in json.loads((tmp_path / "old" / "config.json").read_text())["quantization"]
    old = CSM.load(tmp_path / "old", dtype="float32")
    assert old.quantization == "int8" and not old.quantized_embeddings
    new = flat(param_dict(CSM.load(tmp_path / "old", dtype="float32", quantize="int8")))
    assert new.keys() == a.keys() and all(np.array_equal(a[k], new[k]) for k in a)


def test_an_int8_checkpoint_in_the_old_layout_loads_as_the_same_model(random_csm, tmp_path):
    """int8 checkpoints written before 2026-12-04 store the projections [in, out] and name no
    "layout": `CSM.load` transposes them into `QuantizedWeight`'s [out, in]."""
    from jaxtts.checkpoint import write_checkpoint
    from jaxtts.quantize import meta, transpose_projections

    model = quantize_model(random_csm("tiny", seed=2))
    params = jax.tree.map(np.asarray, param_dict(model))
    old = jax.tree.map(np.asarray, transpose_projections(params))
    d, v = model.cfg.decoder.embed_dim, model.cfg.audio_vocab_size
    assert old["audio_head"].shape[1:] == (d, v) and old["audio_embeddings"].shape == params["audio_embeddings"].shape
    entry = {k: x for k, x in meta("int8").items() if k != "layout"}
    (tmp_path / "old").mkdir()
    write_checkpoint(
        tmp_path / "old", model="csm", config=model.cfg.to_dict(), dtype="float32", params=old, quantization=entry
    )
    back = CSM.load(tmp_path / "old", dtype="float32")
    a, b = flat(param_dict(model)), flat(param_dict(back))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _edit_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "config.json").read_text())
    edit(meta)
    (dst / "config.json").write_text(json.dumps(meta))
    return dst


def _one_line_error(call, pattern):
    with pytest.raises(JaxttsError, match=pattern) as e:
        call()
    assert "\n" not in str(e.value), str(e.value)


def test_mismatched_config_is_one_line(converted, tmp_path):
    no_quant = _edit_config(converted / "int8", tmp_path / "a", lambda m: m.pop("quantization"))
    _one_line_error(lambda: CSM.load(no_quant), r"stored as int8, but config.json names no quantization")
    no_tables = _edit_config(converted / "int8", tmp_path / "f", lambda m: m["quantization"].pop("embeddings"))
    _one_line_error(
        lambda: CSM.load(no_tables), r"audio_embeddings is stored as int8, but .* tables in the model dtype"
    )
    tables = _edit_config(converted / "int8", tmp_path / "g", lambda m: m["quantization"].update(embeddings="g64"))
    _one_line_error(lambda: CSM.load(tables), r"unsupported embedding quantization 'g64'")
    claims = _edit_config(converted / "bf16", tmp_path / "b", lambda m: m.update(quantization={"method": "int8"}))
    _one_line_error(lambda: CSM.load(claims), r"config.json says int8 quantization, but parameter .* bfloat16")
    unknown = _edit_config(converted / "int8", tmp_path / "c", lambda m: m["quantization"].update(method="int4"))
    _one_line_error(lambda: CSM.load(unknown), r"unknown quantization method 'int4'")
    grouped = _edit_config(converted / "int8", tmp_path / "d", lambda m: m["quantization"].update(granularity="g128"))
    _one_line_error(lambda: CSM.load(grouped), r"granularity 'g128'")
    layout = _edit_config(converted / "int8", tmp_path / "h", lambda m: m["quantization"].update(layout="k_n"))
    _one_line_error(lambda: CSM.load(layout), r"unsupported int8 weight layout 'k_n'")
    # Stored [out, in] but said to be the old [in, out]: the shapes do not match.
    swapped = _edit_config(converted / "int8", tmp_path / "i", lambda m: m["quantization"].update(layout="in_out"))
    _one_line_error(lambda: CSM.load(swapped), r"parameter \S+ has shape \(.*\), expected")
    bad = _edit_config(converted / "int8", tmp_path / "e", lambda m: m.update(quantization="int8"))
    _one_line_error(lambda: CSM.load(bad), r'"quantization" must be an object')
    _one_line_error(lambda: CSM.load(converted / "bf16", quantize="int3"), r"unknown quantization 'int3'")


def test_corrupt_or_missing_scales_are_one_line(random_csm, tmp_path):
    from jaxtts.checkpoint import write_checkpoint
    from jaxtts.quantize import meta

    model = quantize_model(random_csm("tiny", seed=2))
    params = jax.tree.map(np.asarray, param_dict(model))

    def write(name, params):
        (tmp_path / name).mkdir()
        write_checkpoint(
            tmp_path / name,
            model="csm",
            config=model.cfg.to_dict(),
            dtype="float32",
            params=params,
            quantization=meta("int8"),
        )
        return tmp_path / name

    nan = jax.tree.map(lambda a: a.copy(), params)
    nan["decoder"]["layers"][1]["mlp"]["down_scale"][3] = np.nan
    _one_line_error(lambda: CSM.load(write("nan", nan)), r"decoder\.layers\.1\.mlp\.down_scale holds non-finite")
    zero = jax.tree.map(lambda a: a.copy(), params)
    zero["audio_head_scale"][4, 7] = 0
    _one_line_error(lambda: CSM.load(write("zero", zero)), r"audio_head_scale holds non-finite or non-positive")
    missing = jax.tree.map(lambda a: a, params)
    del missing["backbone"]["layers"][0]["attn"]["qkv_scale"]
    _one_line_error(lambda: CSM.load(write("missing", missing)), r"backbone\.layers\.0\.attn\.qkv_scale .* missing")
    # The embedding tables' row scales: the same checks.
    inf = jax.tree.map(lambda a: a.copy(), params)
    inf["text_embeddings_scale"][1234] = np.inf
    _one_line_error(lambda: CSM.load(write("inf", inf)), r"text_embeddings_scale holds non-finite or non-positive")
    no_rows = jax.tree.map(lambda a: a, params)
    del no_rows["audio_embeddings_scale"]
    _one_line_error(
        lambda: CSM.load(write("no_rows", no_rows)), r"audio_embeddings_scale \(the int8 row scales\) is missing"
    )
    # A hand-made parameter dict: the same checks.
    _one_line_error(lambda: CSM.from_params(model.cfg, nan), r"down_scale holds non-finite")
    _one_line_error(lambda: CSM.from_params(model.cfg, missing), r"qkv_scale .* missing")


# ------------------------------------------------------------------------------------------------
# The command line.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_weights(tmp_path_factory, tiny_csm, mimi):
    root = tmp_path_factory.mktemp("quant_weights")
    tiny_csm.save(root / "csm")
    mimi.save(root / "mimi")
    return root


def _jaxtts(*args, tmp_path):
    env = dict(
        os.environ,
        JAXTTS_COMPILE_CACHE=str(tmp_path / "xla"),
        JAXTTS_CACHE=str(tmp_path / "empty"),
        HF_HUB_CACHE=str(tmp_path / "no-hub"),
    )
    return subprocess.run(
        [sys.executable, "-m", "jaxtts.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


def test_speak_quantize_int8_writes_audio(cli_weights, tmp_path):
    import soundfile as sf

    out = tmp_path / "q.wav"
    common = ["--codec", cli_weights / "mimi", "--dtype", "float32", "--quiet", "--seed", 3, "--max-audio-ms", 400]
    r = _jaxtts(
        "speak",
        "Eight bits.",
        "--model",
        cli_weights / "csm",
        "--quantize",
        "int8",
        "-o",
        out,
        *common,
        tmp_path=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    audio, sr = sf.read(str(out))
    assert sr == 24000 and 0 < len(audio) <= 5 * 1920 and len(audio) % 1920 == 0 and np.isfinite(audio).all()
    # A bad method is one line, before anything loads.
    r = _jaxtts(
        "speak",
        "Hi.",
        "--model",
        cli_weights / "csm",
        "--quantize",
        "int4",
        "-o",
        tmp_path / "x.wav",
        *common,
        tmp_path=tmp_path,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "--quantize" in lines[0] and "int4" in lines[0], r.stderr
    assert not (tmp_path / "x.wav").exists()


def test_cli_parsers_take_quantize():
    from jaxtts.cli import build_parser

    parser = build_parser()
    for argv in (["speak", "x", "--quantize", "int8"], ["serve", "--quantize", "int8"]):
        assert parser.parse_args(argv).quantize == "int8"
    assert parser.parse_args(["convert", "csm", "a", "b", "--quantize", "int8"]).quantize == "int8"
    with pytest.raises(JaxttsError, match="invalid choice: 'fp8'"):
        parser.parse_args(["serve", "--quantize", "fp8"])


# ------------------------------------------------------------------------------------------------
# Accuracy: the parity model, teacher-forced, against float32.
# ------------------------------------------------------------------------------------------------
MIN_TOP1 = 0.95


def test_teacher_forced_top1_agreement_on_the_parity_model():
    """50 frames sampled from the float32 parity model, then every codebook's argmax with int8
    weights (float32 activations, what --quantize int8 gives on a CPU) given the same prefix.
    Measured (docs/QUANTIZATION.md): 97.1 % of the 1600 tokens; bf16 weights and activations: 98.6 %."""
    from benchmarks import quant_accuracy as qa

    fp32 = qa.parity_model(seed=0)
    p_tok, p_mask = qa.prompt()
    frames = qa.generate_frames(fp32, p_tok, p_mask, max_frames=50, temperature=0.9, top_k=50, seed=0)
    assert frames.shape == (50, 32)
    f_tok, f_mask = qa.frame_rows(frames)
    tokens, mask = np.concatenate([p_tok, f_tok]), np.concatenate([p_mask, f_mask])
    ref = qa.teacher_forced(fp32, tokens, mask, len(p_tok))
    got = qa.teacher_forced(quantize_model(fp32), tokens, mask, len(p_tok))
    r = qa.compare(got, ref)
    assert r["top1_mean"] >= MIN_TOP1, r["top1_per_codebook"]
    assert r["c0_logits_rel"] < 2e-2 and r["depth_logits_rel"] < 3e-2 and r["c0_kl"] < 1e-3, r


# ------------------------------------------------------------------------------------------------
# The kernels: int8 GEMV and norm_matvec against their references, the decode loop against XLA.
# ------------------------------------------------------------------------------------------------
def _int8_operands(m, k, n, dtype, seed=0, lead=()):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), dtype)
    w = rng.standard_normal((*lead, k, n)).astype(np.float32) * rng.uniform(0.2, 2, (*lead, 1, n)) / np.sqrt(k)
    q, s = quantize_numpy(w)
    return x, jnp.asarray(q), jnp.asarray(s)


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("how", INT8_CONVERTS)
def test_int8_to_is_exact_for_every_byte(how, dtype):
    """Every way of turning int8 into floats gives each of the 256 values exactly ("asm" runs
    only on a GPU: here, as in the interpreter, it computes "magic")."""
    q = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
    got = jax.jit(lambda q: int8_to(q, dtype, how, interpret=True))(q)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.arange(-128, 128).reshape(16, 16))


def test_int8_to_refuses_an_unknown_way():
    assert INT8_CONVERTS == options_module.INT8_CONVERTS  # the options name the kernels' ways
    with pytest.raises(ValueError, match="int8 convert"):
        int8_to(jnp.zeros((4,), jnp.int8), jnp.float32, "fast")
    with pytest.raises(JaxttsError, match="int8_convert"):
        DecodeOptions(int8_convert="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("how", INT8_CONVERTS)
@pytest.mark.parametrize(
    "m, k, n, dtype, kw",
    [
        (1, 256, 640, jnp.bfloat16, {}),  # default config
        (3, 200, 96, jnp.float32, dict(block_n=32, block_k=32, k_splits=3)),  # ragged K and N, 3 splits
        (8, 192, 130, jnp.bfloat16, dict(block_n=64, block_k=64, k_splits=1)),  # one split: scaled in-kernel output
        (2, 100, 70, jnp.float32, dict(method="reduce", block_n=32, block_k=16, k_splits=2)),
        (1, 256, 128, jnp.bfloat16, dict(method="reduce", block_n=64, block_k=32, k_splits=2)),
    ],
)
def test_int8_matvec_matches_reference(m, k, n, dtype, kw, how, interpret):
    x, q, s = _int8_operands(m, k, n, dtype)  # q [N, K], as int8 weights are stored
    kw = dict(kw, int8_convert=how, w_transposed=True)
    got = matvec(x, q, s, interpret=interpret, **kw)
    want = matvec_reference(x, q.T, s)
    # ... and given [K, N]: the same products (the other tile layout)
    got_kn = matvec(x, jnp.asarray(q.T), s, interpret=interpret, **dict(kw, w_transposed=False))
    np.testing.assert_allclose(
        np.asarray(got_kn, np.float32), np.asarray(got, np.float32), rtol=TOL[dtype], atol=TOL[dtype]
    )
    assert got.dtype == x.dtype and got.shape == (m, n)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()  # the interpreter fills unwritten outputs with NaN
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    # The reference is x @ dequantized W.
    deq = np.asarray(x, np.float32) @ np.asarray(dequantize(q, s))
    np.testing.assert_allclose(want, deq, rtol=TOL[dtype], atol=TOL[dtype])
    # Partials come back scaled: their sum is the product.
    parts = matvec(x, q, s, partials=True, interpret=interpret, **kw)
    np.testing.assert_allclose(np.asarray(parts.sum(0)), deq, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.gpu
def test_int8_matvec_rejects_a_wrong_scale(interpret):
    x, q, s = _int8_operands(1, 64, 32, jnp.float32)
    with pytest.raises(ValueError, match="one scale per column"):
        matvec(x, q, s[:16], w_transposed=True, interpret=interpret)
    with pytest.raises(ValueError, match="do not multiply"):
        matvec(x, q, s, interpret=interpret)  # [N, K] given as [K, N]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, how", [(jnp.float32, "cvt"), (jnp.bfloat16, "cvt"), (jnp.bfloat16, "asm")])
def test_int8_norm_matvec_rope_and_stack(dtype, how, interpret):
    m, k, heads, kv, d = 2, 256, 8, 2, 64
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    rng = np.random.default_rng(3)
    norm = jnp.asarray(rng.uniform(0.5, 1.5, k), dtype)
    # RoPE: the column scales must be applied before the rotation mixes the halves.
    x, q, s = _int8_operands(m, k, (heads + 2 * kv) * d, dtype, seed=1)
    ang = jnp.asarray(rng.uniform(0, 6, (m, d // 2)), jnp.float32)
    rope = (jnp.cos(ang), jnp.sin(ang))
    y, ss = norm_matvec(
        x,
        norm,
        q,
        w_scale=s,
        rope=rope,
        head_dim=d,
        rope_heads=heads + kv,
        k_splits=2,
        int8_convert=how,
        w_transposed=True,
        interpret=interpret,
    )
    want = norm_matvec_reference(x, norm, q.T, eps=1e-5, w_scale=s, rope=rope, head_dim=d, rope_heads=heads + kv)
    _rel_close(finish(y, ss, k, 1e-5), want, tol)
    # A stack [L, K, N] with scales [L, N] (the audio head), ragged N.
    x, q, s = _int8_operands(3, 192, 70, dtype, seed=2, lead=(3,))
    y, ss = norm_matvec(
        x,
        norm[:192],
        q,
        w_index=jnp.array([1]),
        w_scale=s,
        k_splits=2,
        int8_convert=how,
        w_transposed=True,
        interpret=interpret,
    )
    want = norm_matvec_reference(x, norm[:192], jnp.swapaxes(q, 1, 2), eps=1e-6, w_index=1, w_scale=s)
    _rel_close(finish(y, ss, 192, 1e-6), want, tol)
    deq = norm_matvec_reference(x, norm[:192], dequantize(q, s)[1].astype(dtype), eps=1e-6)
    _rel_close(want, deq, tol)


@pytest.mark.parametrize("m", [1, 8, 64])
def test_int8_kernels_lower_to_triton_at_csm_shapes(m):
    """The Triton lowering runs at trace time, so CPU catches its shape and op restrictions for the
    int8 loads and the scale epilogues (on a GPU the tests above compile the kernels)."""
    sds = jax.ShapeDtypeStruct
    bf, i8, f32 = jnp.bfloat16, jnp.int8, jnp.float32

    def lowers(fn, *args):
        return "triton" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    for d, heads, kv, hd, ffn in [(2048, 32, 8, 64, 8192), (1024, 8, 2, 128, 8192)]:
        qkv_n = (heads + 2 * kv) * hd
        x, norm = sds((m, d), bf), sds((d,), bf)
        rope = (sds((m, hd // 2), f32), sds((m, hd // 2), f32))
        for k, n in [(d, qkv_n), (d, d), (d, 2 * ffn), (ffn, d)]:
            for method, how in itertools.product(("dot", "reduce") if m <= 8 else ("dot",), INT8_CONVERTS):
                assert lowers(  # int8 weights stored [N, K] (the model's), and given [K, N]
                    lambda x, w, s, method=method, how=how: matvec(
                        x, w, s, method=method, int8_convert=how, w_transposed=True
                    ),
                    sds((m, k), bf),
                    sds((n, k), i8),
                    sds((n,), f32),
                )
            assert lowers(lambda x, w, s: matvec(x, w, s), sds((m, k), bf), sds((k, n), i8), sds((n,), f32))
        assert lowers(
            lambda x, s, w, ws, r: norm_matvec(
                x, s, w, w_scale=ws, rope=r, head_dim=hd, rope_heads=heads + kv, int8_convert="asm", w_transposed=True
            ),
            x,
            norm,
            sds((qkv_n, d), i8),
            sds((qkv_n,), f32),
            rope,
        )
        assert lowers(
            lambda x, s, w, ws, i: norm_matvec(x, s, w, w_index=i, w_scale=ws, w_transposed=True),
            x,
            norm,
            sds((31, 2051, d), i8),
            sds((31, 2051), f32),
            sds((1,), jnp.int32),
        )
    # Ragged K and N: masked int8 loads and a masked scale load, both layouts.
    for transposed, shape in ((True, (1500, 1000)), (False, (1000, 1500))):
        assert lowers(
            lambda x, w, s, t=transposed: matvec(x, w, s, block_n=64, block_k=64, k_splits=3, w_transposed=t),
            sds((3, 1000), bf),
            sds(shape, i8),
            sds((1500,), f32),
        )


def _rel_close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < tol, f"relative error {err:.2e} ≥ {tol}"


@pytest.mark.gpu
def test_int8_pallas_loop_matches_xla_loop(random_csm, check_preset, kernel_options, xla_options, monkeypatch):
    """The decode loop of an int8 model through the kernels (fused step, int8 GEMV, int8
    norm_matvec for the audio head) gives the XLA int8 loop's frames: float32 activations, top-k 50,
    batch 1 (the fused step). The tiny model on CPU, full-size CSM-1B on a GPU."""
    import pallas_kernels
    from jaxtts.generation import decode_chunk
    from jaxtts.sampling import Sampler
    from jaxtts.testing import prompt_state

    model = quantize_model(random_csm(check_preset, seed=3))
    calls = []
    real = pallas_kernels.matvec
    monkeypatch.setattr(pallas_kernels, "matvec", lambda *a, **kw: calls.append(kw.get("w_scale")) or real(*a, **kw))
    sampler = Sampler.create(0.9, 50)

    def frames(opts):
        state = prompt_state(model, 1, 10, 64, opts, seed=5)
        state, f, _ = decode_chunk(model, state, sampler, 3, opts=opts)
        return np.asarray(f), np.asarray(state.hidden)

    want = frames(xla_options)
    assert not calls
    got = frames(kernel_options)
    assert calls and all(c is not None for c in calls)  # the int8 GEMV ran (every matvec had scales)
    assert want[0].std() > 0
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)


def test_int8_frame_takes_the_bf16_kernels_reading_int8():
    """At batch 1 with the Pallas kernels, an int8 frame runs the kernels a bf16 frame runs, one
    for one: every GEMV and norm_matvec (the fused step's projections, the audio head) reads the
    int8 weight; the only XLA dots on weights are those bf16 has in XLA too (codebook 0's head and
    codebook 1's, before the depth loop); no whole int8 weight or table is converted except into a
    dot (the jaxpr of one frame, traced with abstract weights: `benchmarks.int8_kernel_path`)."""
    from benchmarks.int8_kernel_path import compare

    cfg = CSMConfig.from_dict(SIZE_ARGS)
    paths = compare(cfg, DecodeOptions(attention="pallas_interpret"), batch=1)
    bf16, int8 = paths["bf16"], paths["int8"]
    assert int8["kernels"] == bf16["kernels"] and int8["kernels_total"] > 0
    assert not bf16["kernels_reading_int8"]
    for name in ("matvec", "norm_matvec"):
        assert int8["kernels_reading_int8"][name] == int8["kernels"][name] > 0, name
    d, v = cfg.decoder.embed_dim, cfg.audio_vocab_size
    b = cfg.backbone.embed_dim
    assert bf16["xla_dots_on_weights"] == {f"({d}, {v}) bfloat16": 1, f"({b}, {v}) bfloat16": 1}
    assert int8["xla_dots_on_weights"] == {f"({v}, {d}) int8": 1, f"({v}, {b}) int8": 1}  # stored [N, K]
    assert not int8["whole_int8_converts_not_into_a_dot"]
    # Without the int8 kernels (the A/B lever) every projection is an XLA dot on the int8 weight.
    off = compare(cfg, DecodeOptions(attention="pallas_interpret", int8_kernels=False), batch=1)["int8"]
    assert "matvec" not in off["kernels"] and "norm_matvec" not in off["kernels"]
    assert all(k.endswith("int8") for k in off["xla_dots_on_weights"]) and not off["whole_int8_converts_not_into_a_dot"]


def test_int8_audio_table_is_the_projection_of_the_dequantized_rows_and_follows_the_scales(random_csm):
    from jaxtts.generation import audio_table

    model = quantize_model(random_csm("tiny", seed=2))
    rows = dequantize_rows(model.audio_embeddings[...], model.audio_embeddings_scale[...])
    want = np.asarray(dense(rows, QuantizedWeight(model.projection[...], model.projection_scale[...])))
    table = audio_table(model)
    np.testing.assert_allclose(np.asarray(table), want, rtol=1e-5, atol=1e-5)
    assert audio_table(model) is table
    model.audio_embeddings_scale.set_value(model.audio_embeddings_scale[...] * 2)  # new row scales: a new table
    np.testing.assert_allclose(np.asarray(audio_table(model)), 2 * want, rtol=1e-5, atol=1e-5)


def test_int8_kernels_option_keeps_int8_weights_off_the_kernels():
    opts = DecodeOptions(attention="pallas_interpret")
    assert opts.uses_matvec(1, 64, 64, quantized=True) and opts.uses_fused_step(1, quantized=True)
    off = opts.replace(int8_kernels=False)
    assert off.uses_matvec(1, 64, 64) and off.uses_fused_step(1)  # bf16 / float32 weights: unchanged
    assert not off.uses_matvec(1, 64, 64, quantized=True) and not off.uses_fused_step(1, quantized=True)


def test_finetune_refuses_int8(random_csm):
    from jaxtts.finetune.train import FinetuneConfig, init_training

    model = quantize_model(random_csm("tiny", seed=2))
    with pytest.raises(JaxttsError, match="fine-tuning needs bfloat16 / float32 weights"):
        init_training(model, FinetuneConfig().resolved())
