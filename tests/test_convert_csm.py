"""The CSM converter at the real CSM-1B shapes (without 6 GB), and its handling of bad input.

Real-size tests use fake checkpoints that report the released model's tensor names and shapes and
hand out zero-strided arrays (one constant per tensor, so the name map can be checked too).
Bad-input tests run the CLI in subprocesses, side by side, and demand one line on stderr, a
non-zero exit, no traceback and nothing left where OUT was to be written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import convert.csm as ccsm
import reference_csm as R
from convert.safetensors_io import TensorFile
from jaxtts.checkpoint import read_meta
from jaxtts.config import CSM_1B, CSMConfig
from jaxtts.csm import CSM, param_dict
from jaxtts.errors import JaxttsError
from jaxtts.testing import flat

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Fake checkpoints at the real shapes.
# ------------------------------------------------------------------------------------------------
class FakeTensorFile(TensorFile):
    """Names and shapes of a real checkpoint; tensor i is the constant i+1, zero-strided."""

    def __init__(self, shapes: dict[str, tuple]):
        self.files = [Path("fake.safetensors")]
        self.shapes = dict(shapes)
        self.tag = {name: np.float32(i + 1) for i, name in enumerate(sorted(shapes))}
        self.reads: list[str] = []

    def keys(self):
        return list(self.shapes)

    def __contains__(self, name):
        return name in self.shapes

    def shape(self, name):
        return tuple(self.shapes[name])

    def __getitem__(self, name):
        if name not in self.shapes:
            raise JaxttsError(f"checkpoint has no tensor named {name!r}")
        self.reads.append(name)
        return np.broadcast_to(self.tag[name], self.shapes[name])


def use_fake(monkeypatch, fake: FakeTensorFile) -> None:
    monkeypatch.setattr(ccsm, "open_checkpoint", lambda src, **kw: fake)


def one_layer_per_stack(monkeypatch, expected: dict[str, tuple]) -> None:
    """Layers are fused on conversion (q|k|v and gate|up concatenated): at CSM-1B size that would
    materialise ~4 GB. Convert layer 0 of each stack for real and let the other layers share it,
    while every other layer tensor still goes through the converter's shape-checking reader
    (against `expected`, the true CSM-1B table of the layout)."""
    real = ccsm._stack_params

    def patched(read, fmt, stack, cfg):
        out = real(read, fmt, stack, dataclasses.replace(cfg, num_layers=1))
        prefix = ccsm._STACKS[fmt][stack] + "layers."
        for name, shape in expected.items():
            if name.startswith(prefix) and not name.startswith(prefix + "0."):
                read(name, shape)
        return {**out, "layers": {n: out["layers"][0] for n in range(cfg.num_layers)}}

    monkeypatch.setattr(ccsm, "_stack_params", patched)


FORMATS = {
    "original": R.original_shapes(R.CSM_1B_ARGS),
    "transformers": R.hf_shapes(R.CSM_1B_ARGS),
}

# Per-layer tensor (original-layout name) → (our parameter, its column block in a fused matrix).
_LAYER_PARTS = {
    "attn.q_proj.weight": ("attn.qkv", "q"),
    "attn.k_proj.weight": ("attn.qkv", "k"),
    "attn.v_proj.weight": ("attn.qkv", "v"),
    "attn.output_proj.weight": ("attn.out", None),
    "mlp.w1.weight": ("mlp.gate_up", "gate"),
    "mlp.w3.weight": ("mlp.gate_up", "up"),
    "mlp.w2.weight": ("mlp.down", None),
    "sa_norm.scale": ("attn_norm.scale", None),
    "mlp_norm.scale": ("mlp_norm.scale", None),
}


def _source_name(fmt: str, original_name: str) -> str:
    return original_name if fmt == "original" else R.hf_name(original_name)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_csm_1b_recognised_and_dims_inferred(fmt):
    fake = FakeTensorFile(FORMATS[fmt])
    assert ccsm.detect_format(fake.keys()) == fmt
    dims = ccsm.infer_dims(fake, fmt)
    assert dims["text_vocab_size"] == 128_256 and dims["audio_vocab_size"] == 2051 and dims["audio_num_codebooks"] == 32
    for stack in ("backbone", "decoder"):
        c = getattr(CSM_1B, stack)
        assert dims[stack] == {
            "num_layers": c.num_layers,
            "embed_dim": c.embed_dim,
            "intermediate_dim": c.intermediate_dim,
        }


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_csm_1b_conversion_at_real_shapes(monkeypatch, fmt):
    """Without --config: recognised as CSM-1B; every tensor read and shape-checked; the tree has
    exactly the shapes of the model (abstract, no memory), the name map puts each source tensor
    where it belongs, and `CSM.from_params` accepts the tree (traced with eval_shape)."""
    fake = FakeTensorFile(FORMATS[fmt])
    use_fake(monkeypatch, fake)
    one_layer_per_stack(monkeypatch, FORMATS[fmt])
    cfg, params = ccsm.read_csm_checkpoint("csm-1b.safetensors")
    assert cfg == CSM_1B
    assert sorted(set(fake.reads)) == sorted(fake.shapes), "not every tensor was read"

    got = flat(params)
    want = flat(param_dict(CSM.abstract(CSM_1B, "float32")))
    assert got.keys() == want.keys()
    for name in want:
        assert tuple(got[name].shape) == tuple(want[name].shape), name

    # Name map at the real size: each block holds its source tensor's constant.
    tag = lambda orig_name: fake.tag[_source_name(fmt, orig_name)]  # noqa: E731
    for stack, c in (("backbone", CSM_1B.backbone), ("decoder", CSM_1B.decoder)):
        hd = c.head_dim
        blocks = {
            "q": slice(0, c.num_heads * hd),
            "k": slice(c.num_heads * hd, (c.num_heads + c.num_kv_heads) * hd),
            "v": slice((c.num_heads + c.num_kv_heads) * hd, None),
            "gate": slice(0, c.intermediate_dim),
            "up": slice(c.intermediate_dim, None),
        }
        for src, (leaf, block) in _LAYER_PARTS.items():
            a = got[f"{stack}.layers.0.{leaf}"]
            a = a[..., blocks[block]] if block else a
            sample = np.asarray(a[(slice(None, None, 97),) * a.ndim])
            assert (sample == tag(f"{stack}.layers.0.{src}")).all(), (stack, src)
        assert (np.asarray(got[f"{stack}.norm.scale"]) == tag(f"{stack}.norm.scale")).all()
    for leaf, src in (
        ("text_embeddings", "text_embeddings.weight"),
        ("audio_embeddings", "audio_embeddings.weight"),
        ("projection", "projection.weight"),
        ("codebook0_head", "codebook0_head.weight"),
        ("audio_head", "audio_head"),
    ):
        a = got[leaf]
        assert (np.asarray(a[(slice(None, None, 997),) * a.ndim]) == tag(src)).all(), leaf

    # The model accepts this tree (shapes traced, nothing allocated).
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), params)
    out = jax.eval_shape(lambda p: param_dict(CSM.from_params(CSM_1B, p, "bfloat16")), abstract)
    assert all(a.dtype == jax.numpy.bfloat16 for a in jax.tree.leaves(out))


def test_older_transformers_names_recognised(monkeypatch):
    """Older exports keep the text table under backbone_model.embed_tokens and the audio table
    under the backbone's name."""
    shapes = R.hf_shapes(R.CSM_1B_ARGS, tied_name="backbone_model.embed_tokens.embed_audio_tokens.weight")
    shapes["backbone_model.embed_tokens.embed_text_tokens.weight"] = shapes.pop("embed_text_tokens.weight")
    fake = FakeTensorFile(shapes)
    use_fake(monkeypatch, fake)
    one_layer_per_stack(monkeypatch, shapes)
    cfg, params = ccsm.read_csm_checkpoint("old-export")
    assert cfg == CSM_1B
    assert (
        np.asarray(params["text_embeddings"][:3, :3])
        == fake.tag["backbone_model.embed_tokens.embed_text_tokens.weight"]
    ).all()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_other_sizes_need_a_config(monkeypatch, fmt):
    args = copy.deepcopy(R.CSM_1B_ARGS)
    args["backbone"]["num_layers"] = 15
    shapes = R.original_shapes(args) if fmt == "original" else R.hf_shapes(args)
    use_fake(monkeypatch, FakeTensorFile(shapes))
    with pytest.raises(JaxttsError, match="--config"):
        ccsm.read_csm_checkpoint("csm-15-layers")


def test_shape_mismatch_names_the_tensor_at_real_size(monkeypatch):
    shapes = R.original_shapes(R.CSM_1B_ARGS)
    shapes["backbone.layers.3.mlp.w2.weight"] = (2048, 8000)
    use_fake(monkeypatch, FakeTensorFile(shapes))
    one_layer_per_stack(monkeypatch, FORMATS["original"])
    with pytest.raises(JaxttsError, match=r"backbone\.layers\.3\.mlp\.w2\.weight"):
        ccsm.read_csm_checkpoint("csm-1b.safetensors")


def test_mimi_checkpoint_is_pointed_elsewhere():
    with pytest.raises(JaxttsError, match="(?i)mimi"):
        ccsm.detect_format(
            ["encoder.model.0.conv.conv.weight", "quantizer.rvq_first.vq.layers.0._codebook.embedding_sum"]
        )


# ------------------------------------------------------------------------------------------------
# Small real files.
# ------------------------------------------------------------------------------------------------
# Not CSM-1B, and small: the parity layer sizes with small vocabularies.
SMALL_ARGS = copy.deepcopy(R.PARITY_ARGS)
SMALL_ARGS.update(text_vocab_size=300, audio_vocab_size=40)


def random_tensors(shapes: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_csm_inputs")
    tensors = random_tensors(R.original_shapes(SMALL_ARGS))
    good = root / "model.safetensors"
    save_file(tensors, str(good))
    return dict(root=root, tensors=tensors, good=good, cfg_json=R.write_json(SMALL_ARGS, root / "small.json"))


def test_bfloat16_conversion(small, tmp_path):
    out = ccsm.convert_csm(
        small["good"], tmp_path / "bf16", config=CSMConfig.from_dict(SMALL_ARGS), dtype="bfloat16", progress=False
    )
    assert read_meta(out)["dtype"] == "bfloat16"
    model = CSM.load(out, dtype="float32")
    import ml_dtypes

    got = np.asarray(model.codebook0_head[...])
    want = small["tensors"]["codebook0_head.weight"].T.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_pickle_needs_allow_pickle(small, tmp_path):
    torch = pytest.importorskip("torch")
    pt = tmp_path / "ckpt.pt"
    torch.save({k: torch.from_numpy(v) for k, v in small["tensors"].items()}, pt)
    cfg = CSMConfig.from_dict(SMALL_ARGS)
    with pytest.raises(JaxttsError, match="--allow-pickle"):
        ccsm.read_csm_checkpoint(pt, cfg)
    _, from_pickle = ccsm.read_csm_checkpoint(pt, cfg, allow_pickle=True)
    _, from_st = ccsm.read_csm_checkpoint(small["good"], cfg)
    a, b = flat(from_pickle), flat(from_st)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------------------------
# Bad input through the CLI.
# ------------------------------------------------------------------------------------------------
def _bad_inputs(small) -> dict[str, tuple[list[str], str]]:
    """case → (CLI arguments after `csm`, a regex the error line must match). OUT is appended."""
    root = small["root"]
    cfg = str(small["cfg_json"])

    unrelated = root / "unrelated.safetensors"
    save_file({"foo.weight": np.zeros((4, 4), np.float32), "bar.bias": np.zeros(4, np.float32)}, str(unrelated))

    data = small["good"].read_bytes()
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(data[: int(len(data) * 0.6)])
    header_cut = root / "header_cut.safetensors"
    header_cut.write_bytes(data[:100])
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(1).bytes(4096))
    empty = root / "empty.safetensors"
    empty.write_bytes(b"")

    bad_shape = dict(small["tensors"])
    bad_shape["decoder.layers.1.attn.k_proj.weight"] = np.zeros((20, 48), np.float32)
    mismatch = root / "mismatch.safetensors"
    save_file(bad_shape, str(mismatch))

    missing_tensor = {k: v for k, v in small["tensors"].items() if k != "backbone.layers.2.mlp_norm.scale"}
    incomplete = root / "incomplete.safetensors"
    save_file(missing_tensor, str(incomplete))

    pickle = root / "ckpt.pt"
    pickle.write_bytes(b"not really a pickle")

    bad_json = root / "bad.json"
    bad_json.write_text("{not json")
    unknown_key = root / "unknown_key.json"
    args = copy.deepcopy(SMALL_ARGS)
    args["backbone"]["num_layerz"] = 3
    unknown_key.write_text(json.dumps(args))

    return {
        "missing file": ([str(root / "nope.safetensors"), "--config", cfg], r"nope\.safetensors"),
        "missing directory": ([str(root / "no_such_dir"), "--config", cfg], r"no_such_dir"),
        "unrelated names": ([str(unrelated), "--config", cfg], r"(?i)not a CSM checkpoint"),
        "truncated": ([str(truncated), "--config", cfg], r"truncated"),
        "header cut": ([str(header_cut), "--config", cfg], r"header_cut"),
        "garbage bytes": ([str(garbage), "--config", cfg], r"garbage"),
        "empty file": ([str(empty), "--config", cfg], r"empty"),
        "shape mismatch": ([str(mismatch), "--config", cfg], r"decoder\.layers\.1\.attn\.k_proj\.weight"),
        "tensor missing": ([str(incomplete), "--config", cfg], r"backbone\.layers\.2\.mlp_norm\.scale"),
        "unknown size without --config": ([str(small["good"])], r"--config"),
        "pickle without --allow-pickle": ([str(pickle)], r"--allow-pickle"),
        "config not JSON": ([str(small["good"]), "--config", str(bad_json)], r"(?i)json"),
        "config unknown key": ([str(small["good"]), "--config", str(unknown_key)], r"num_layerz"),
        "config file missing": ([str(small["good"]), "--config", str(root / "none.json")], r"none\.json"),
    }


# The cases the brief names run through `python -m convert` in subprocesses (side by side); the
# rest go through the same CLI entry point in-process, which is much cheaper.
SUBPROCESS_CASES = [
    "missing file",
    "unrelated names",
    "truncated",
    "garbage bytes",
    "shape mismatch",
    "unknown size without --config",
]


@pytest.fixture(scope="module")
def cases(small):
    return _bad_inputs(small)


@pytest.fixture(scope="module")
def subprocess_results(cases, tmp_path_factory):
    """Each OUT sits alone in its own parent directory, so anything left behind shows up."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    runs = {}
    for i, name in enumerate(SUBPROCESS_CASES):
        argv, pattern = cases[name]
        parent = tmp_path_factory.mktemp(f"bad{i}")
        out = parent / "out"
        runs[name] = (
            parent,
            out,
            pattern,
            subprocess.Popen(
                [sys.executable, "-m", "convert", "csm", argv[0], str(out), *argv[1:]],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    results = {}
    for name, (parent, out, pattern, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = dict(rc=proc.returncode, stderr=stderr, parent=parent, out=out, pattern=pattern)
    return results


def check_failure(r: dict) -> None:
    lines = r["stderr"].splitlines()
    assert r["rc"] != 0, "exit status 0"
    assert "Traceback" not in r["stderr"], r["stderr"]
    assert len(lines) == 1, f"stderr has {len(lines)} lines: {r['stderr']!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(r["pattern"], lines[0]), f"{lines[0]!r} does not match {r['pattern']!r}"
    assert not r["out"].exists(), "OUT was left behind"
    assert [p.name for p in r["parent"].iterdir()] == [], "something was left next to OUT"


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_cli_bad_input_subprocess(subprocess_results, case):
    check_failure(subprocess_results[case])


def run_main(argv, capsys) -> tuple[int, str]:
    from convert.cli import main

    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


IN_PROCESS_CASES = [
    "missing directory",
    "header cut",
    "empty file",
    "tensor missing",
    "pickle without --allow-pickle",
    "config not JSON",
    "config unknown key",
    "config file missing",
]


@pytest.mark.parametrize("case", IN_PROCESS_CASES)
def test_cli_bad_input_in_process(cases, case, tmp_path, capsys):
    argv, pattern = cases[case]
    out = tmp_path / "out"
    rc, err = run_main(["csm", argv[0], str(out), *argv[1:]], capsys)
    check_failure(dict(rc=rc, stderr=err, out=out, parent=tmp_path, pattern=pattern))


def test_cli_refuses_existing_out(small, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = run_main(["csm", str(small["good"]), str(out), "--config", str(small["cfg_json"])], capsys)
    lines = err.splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "exists" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
