"""CSM parity on CPU in float32: jaxtts against Sesame's original model code and transformers.

One set of random weights (every tensor random, norm scales included) at small non-default sizes
with grouped-query attention exists three ways: as transformers' `CsmForConditionalGeneration`
saved with `save_pretrained`, as the original checkpoint (torchtune names and interleaved RoPE
layout, reached by inverting transformers' q/k permutation), and loaded into a replica of the
original `models.Model`. The two PyTorch models are first checked against each other; then both
files are converted and the jaxtts model must give the same codebook-0 logits (rel. error < 1e-4)
and the same greedy frames, token for token, from a prompt holding text rows and an audio segment
with its all-zero EOS frame.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import reference_csm as R
from convert.csm import convert_csm, interleaved_to_halves, read_csm_checkpoint
from jaxtts.checkpoint import read_meta
from jaxtts.config import CSM_1B, CSMConfig
from jaxtts.csm import CSM, param_dict
from jaxtts.generation import generate_frames
from jaxtts.llama import rope_frequencies
from jaxtts.options import DecodeOptions

ROOT = Path(__file__).resolve().parents[1]
MAX_FRAMES = 12
MIN_COMPARED = 10
LOGITS_RTOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        out.update(flat(v, name) if isinstance(v, dict) else {name: np.asarray(v)})
    return out


# ------------------------------------------------------------------------------------------------
# Fixtures: the PyTorch side (built once per module).
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cfg() -> CSMConfig:
    return CSMConfig.from_dict(R.PARITY_ARGS)


@pytest.fixture(scope="module")
def torch_side(tmp_path_factory):
    """HF model + its save_pretrained dir, the replica with the same weights + its original file."""
    root = tmp_path_factory.mktemp("csm_parity")
    hf = R.build_hf_model(R.PARITY_ARGS, seed=1234)
    hf_dir = R.save_hf(hf, root / "hf")
    original = R.original_from_hf(hf, R.PARITY_ARGS)
    (root / "original").mkdir()
    orig_file = R.save_original(original, root / "original" / "model.safetensors")
    cfg_json = R.write_json(R.PARITY_ARGS, root / "config.json")
    return dict(root=root, hf=hf, hf_dir=hf_dir, original=original, orig_file=orig_file, cfg_json=cfg_json)


@pytest.fixture(scope="module")
def prompt():
    tokens, mask = R.parity_prompt(seed=7)
    # The prompt really holds text rows, audio rows and the audio segment's all-zero EOS frame.
    text = mask[:, -1] & ~mask[:, :-1].any(1)
    audio = mask[:, :-1].all(1) & ~mask[:, -1]
    eos = audio & (tokens[:, :-1] == 0).all(1)
    assert text.sum() >= 2 and audio.sum() >= 3 and eos.sum() == 1 and (text | audio).all()
    return tokens, mask


@pytest.fixture(scope="module")
def reference(torch_side, prompt):
    tokens, mask = prompt
    logits = R.reference_codebook0_logits(torch_side["original"], tokens, mask)
    frames = R.reference_frames(torch_side["original"], tokens, mask, max_frames=MAX_FRAMES, topk=1)
    assert frames.shape[0] >= MIN_COMPARED, f"reference stopped after {frames.shape[0]} frames"
    return dict(logits=logits, frames=frames)


# ------------------------------------------------------------------------------------------------
# Fixtures: the jaxtts side.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted_hf(torch_side, cfg):
    out = torch_side["root"] / "jax_from_hf"
    convert_csm(torch_side["hf_dir"] / "model.safetensors", out, config=cfg, dtype="float32", progress=False)
    return out


@pytest.fixture(scope="module")
def converted_original(torch_side):
    out = torch_side["root"] / "jax_from_original"
    config = CSMConfig.from_json(torch_side["cfg_json"].read_text())
    convert_csm(torch_side["orig_file"], out, config=config, dtype="float32", progress=False)
    return out


@pytest.fixture(scope="module")
def model_hf(converted_hf):
    return CSM.load(converted_hf, dtype="float32")


@pytest.fixture(scope="module")
def model_original(converted_original):
    return CSM.load(converted_original, dtype="float32")


@partial(jax.jit, static_argnames=("graphdef", "opts"))
def _prompt_logits(graphdef, state, tokens, mask, opts):
    model = nnx.merge(graphdef, state)
    cache = model.backbone_cache(1, tokens.shape[1])
    hidden, _ = model.run_backbone(tokens, mask, jnp.zeros((1,), jnp.int32), cache, opts=opts)
    return model.codebook0_logits(hidden)[0]


def jax_logits(model: CSM, tokens, mask, attention: str = "xla") -> np.ndarray:
    """Codebook-0 logits [T, vocab] with the backbone run over the whole prompt at once."""
    graphdef, state = nnx.split(model)
    return np.asarray(
        _prompt_logits(
            graphdef,
            state,
            jnp.asarray(tokens[None], jnp.int32),
            jnp.asarray(mask[None], bool),
            DecodeOptions(attention=attention),
        )
    )


def assert_frames_equal(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape[0] >= MIN_COMPARED, f"only {got.shape[0]} frames generated"
    assert got.shape == want.shape, f"{got.shape[0]} frames vs reference {want.shape[0]}"
    if not np.array_equal(got, want):
        f, c = np.argwhere(got != want)[0]
        raise AssertionError(
            f"first mismatch at frame {f}, codebook {c}: {got[f, c]} vs reference {want[f, c]}; "
            f"{int((got != want).sum())} of {got.size} tokens differ"
        )


# ------------------------------------------------------------------------------------------------
# The references agree with each other.
# ------------------------------------------------------------------------------------------------
def test_rope_scaling_same_in_transformers_torchtune_and_jaxtts(torch_side, cfg):
    """transformers' rescaled llama3 numbers give torchtune's Llama3ScaledRoPE frequencies; so does
    jaxtts' table. Both head dims have a frequency in the smoothed band, one kept, one divided."""
    hf_b, hf_d = R.hf_rope_inv_freq(torch_side["hf"])
    tt_b, tt_d = R.torchtune_rope_theta(torch_side["original"])
    for hf_f, tt_f, stack in ((hf_b, tt_b, cfg.backbone), (hf_d, tt_d, cfg.decoder)):
        np.testing.assert_allclose(hf_f, tt_f, rtol=1e-6, atol=0)
        np.testing.assert_allclose(rope_frequencies(stack), tt_f, rtol=1e-6, atol=0)
        base = 1.0 / stack.rope_base ** (np.arange(0, stack.head_dim, 2) / stack.head_dim)
        ratio = tt_f / base
        assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 1 / 32).any()
        assert ((ratio > 1 / 32 + 1e-3) & (ratio < 1 - 1e-3)).any(), "no frequency in the smoothed band"


def test_rope_permutation_inverts_transformers(cfg):
    """Our inverse of transformers' permute_for_rope is an inverse, and jaxtts' converter does the
    forward permutation exactly as transformers' conversion script does."""
    g = torch.Generator().manual_seed(0)
    for heads, hd in ((4, 16), (2, 12), (32, 64)):
        w = torch.randn(heads * hd, 24, generator=g)
        halves = R.interleaved_to_halves_reference(w, heads)
        assert torch.equal(R.halves_to_interleaved(halves, heads), w)
        np.testing.assert_array_equal(interleaved_to_halves(w.numpy(), heads), halves.numpy())


def test_checkpoint_layouts_match_the_name_tables(torch_side):
    """The replica's state dict is the original layout; transformers' file holds the names the
    fake real-size checkpoints of test_convert_csm use."""
    from safetensors import safe_open

    with safe_open(str(torch_side["orig_file"]), "np") as f:
        orig = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert orig == R.original_shapes(R.PARITY_ARGS)
    assert not any("tok_embeddings" in k or k.startswith("output") for k in orig)
    with safe_open(str(torch_side["hf_dir"] / "model.safetensors"), "np") as f:
        hf = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith("codec_model.")}
    assert hf == R.hf_shapes(R.PARITY_ARGS)


def test_original_replica_matches_transformers(torch_side, prompt, reference):
    tokens, mask = prompt
    hf_logits = R.hf_codebook0_logits(torch_side["hf"], tokens, mask)
    assert rel_err(reference["logits"], hf_logits) < 1e-5
    # Depth decoder: transformers, teacher-forced with the replica's first frame, picks the same
    # codes 1..31 (audio head, projection, tied embedding and decoder stack agree).
    original = torch_side["original"]
    with torch.inference_mode():
        original.reset_caches()
        t = torch.as_tensor(tokens)[None]
        m = torch.as_tensor(mask)[None]
        last = original.backbone_hidden(t, m, torch.arange(t.shape[1])[None])[0, -1].numpy()
        original.reset_caches()
    depth = R.hf_depth_logits(torch_side["hf"], last, reference["frames"][0])
    np.testing.assert_array_equal(depth.argmax(-1), reference["frames"][0, 1:])
    assert reference["frames"][0, 0] == hf_logits[-1].argmax()


# ------------------------------------------------------------------------------------------------
# jaxtts against the references.
# ------------------------------------------------------------------------------------------------
def test_hf_format_codebook0_logits(model_hf, prompt, reference):
    tokens, mask = prompt
    got = jax_logits(model_hf, tokens, mask)
    assert got.shape == reference["logits"].shape
    assert rel_err(got, reference["logits"]) < LOGITS_RTOL


def test_hf_format_greedy_frames_token_exact(model_hf, prompt, reference):
    tokens, mask = prompt
    frames = generate_frames(model_hf, tokens, mask, max_frames=MAX_FRAMES, top_k=1, seed=3)
    assert_frames_equal(frames, reference["frames"])


def test_greedy_frames_across_chunk_boundaries(model_hf, prompt, reference):
    """One frame per decode call (the end-of-speech check between calls) gives the same frames."""
    tokens, mask = prompt
    frames = generate_frames(model_hf, tokens, mask, max_frames=MAX_FRAMES, top_k=1, chunk_frames=1)
    assert_frames_equal(frames, reference["frames"])


@pytest.fixture(scope="module")
def eos_case(torch_side, prompt, cfg):
    """Weights edited so that the second frame is all zeros (see `R.force_end_of_speech_`), in the
    original layout, converted and loaded."""
    tokens, mask = prompt
    hf = R.build_hf_model(R.PARITY_ARGS, seed=99)
    R.force_end_of_speech_(hf, beta=2.0)
    original = R.original_from_hf(hf, R.PARITY_ARGS)
    frames = R.reference_frames(original, tokens, mask, max_frames=MAX_FRAMES, topk=1)
    assert 1 <= frames.shape[0] < MAX_FRAMES, "the edited weights did not end speech early"
    root = torch_side["root"] / "eos"
    root.mkdir()
    out = convert_csm(R.save_original(original, root / "model.safetensors"), root / "jax", config=cfg, progress=False)
    return CSM.load(out, dtype="float32"), frames


@pytest.mark.parametrize("chunk_frames", [16, 1])
def test_stops_before_the_first_all_zero_frame(eos_case, prompt, chunk_frames):
    """End of speech inside a decode call and at the start of the next one."""
    model, want = eos_case
    tokens, mask = prompt
    got = generate_frames(model, tokens, mask, max_frames=MAX_FRAMES, top_k=1, chunk_frames=chunk_frames)
    np.testing.assert_array_equal(got, want)


def test_original_format_gives_identical_results(model_hf, model_original, converted_original, prompt, reference):
    """The same weights in the original layout, converted with the JSON config: identical params,
    identical frames, logits as close."""
    a, b = flat(param_dict(model_hf)), flat(param_dict(model_original))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    tokens, mask = prompt
    assert rel_err(jax_logits(model_original, tokens, mask), reference["logits"]) < LOGITS_RTOL
    frames = generate_frames(model_original, tokens, mask, max_frames=MAX_FRAMES, top_k=1)
    assert_frames_equal(frames, reference["frames"])


def test_transformers_directory_and_sharded_index(torch_side, cfg, model_hf):
    """A transformers checkpoint given as a directory, and saved in shards with an index, reads
    to the same parameters as the single file."""
    want = flat(param_dict(model_hf))
    shards = R.save_hf(torch_side["hf"], torch_side["root"] / "hf_sharded", max_shard_size="20MB")
    index = shards / "model.safetensors.index.json"
    assert index.exists() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    for src in (torch_side["hf_dir"], index, shards):
        got_cfg, params = read_csm_checkpoint(src, cfg)
        assert got_cfg == cfg
        got = flat(params)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{src}: {k}")


def test_cli_converts_both_layouts(torch_side, model_hf):
    """`python -m convert csm SRC OUT --config ...` (a JSON file, and inline JSON; run side by side)
    writes directories that load to the same parameters as the in-process conversion."""
    root = torch_side["root"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    runs = {
        "module_original": [
            sys.executable,
            "-m",
            "convert",
            "csm",
            str(torch_side["orig_file"]),
            str(root / "cli_original"),
            "--config",
            str(torch_side["cfg_json"]),
        ],
        "module_hf_inline_json": [
            sys.executable,
            "-m",
            "convert",
            "csm",
            str(torch_side["hf_dir"]),
            str(root / "cli_hf"),
            "--config",
            json.dumps(R.PARITY_ARGS),
            "--quiet",
        ],
    }
    procs = {
        k: subprocess.Popen(v, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k, v in runs.items()
    }
    want = flat(param_dict(model_hf))
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{err}"
        assert "Traceback" not in err
        outdir = Path(runs[name][5])
        meta = read_meta(outdir)
        assert meta["model"] == "csm" and meta["dtype"] == "float32"
        assert CSMConfig.from_dict(meta["config"]) == CSMConfig.from_dict(R.PARITY_ARGS)
        got = flat(param_dict(CSM.load(outdir, dtype="float32")))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")
    # The directories sit alone: no temporary siblings left behind.
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_config_json_round_trips(converted_original, cfg):
    """The JSON config uses the torchtune builder arguments and survives every trip."""
    assert CSMConfig.from_json(json.dumps(R.PARITY_ARGS)) == cfg
    assert json.loads(cfg.to_json()) == R.PARITY_ARGS
    assert CSMConfig.from_json(cfg.to_json()) == cfg
    assert CSMConfig.from_dict(read_meta(converted_original)["config"]) == cfg
    assert read_meta(converted_original)["config"] == R.PARITY_ARGS
    # The released model's builder calls (with the vocab_size / attn_dropout arguments the
    # original passes) describe CSM-1B.
    one_b = json.loads(json.dumps(R.CSM_1B_ARGS))
    for stack in ("backbone", "decoder"):
        one_b[stack].update(vocab_size=128_256, attn_dropout=0.0)
    assert CSMConfig.from_dict(one_b) == CSM_1B
    assert CSMConfig.from_json(CSM_1B.to_json()) == CSM_1B


def _pallas_attention():
    try:
        import pallas_kernels
    except ImportError as e:
        return None, f"pallas_kernels cannot be imported ({e})"
    fn = getattr(pallas_kernels, "attention", None)
    if not callable(fn):
        return None, "pallas_kernels.attention does not exist yet"
    return fn, ""


def test_pallas_interpret_parity(model_hf, prompt, reference):
    """The same parity through the Pallas attention kernels, run by the Pallas interpreter."""
    fn, why = _pallas_attention()
    if fn is None:
        pytest.skip(why)
    tokens, mask = prompt
    assert rel_err(jax_logits(model_hf, tokens, mask, attention="pallas_interpret"), reference["logits"]) < LOGITS_RTOL
    frames = generate_frames(model_hf, tokens, mask, max_frames=MAX_FRAMES, top_k=1, attention="pallas_interpret")
    assert_frames_equal(frames, reference["frames"])
