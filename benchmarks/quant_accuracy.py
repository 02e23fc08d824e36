"""Accuracy of int8 weights (jaxtts.quantize) against bfloat16 and float32, measured on random weights.

    python -m benchmarks.quant_accuracy --model parity [--frames 50] [--json FILE]
    python -m benchmarks.quant_accuracy --model csm-1b --group 128 [--json FILE]
    python -m benchmarks.quant_accuracy --model csm-1b --disk      # sizes: bf16 safetensors / checkpoint vs int8

Models (random weights: there is no trained checkpoint on this machine):
  parity   the PyTorch parity model of tests/reference_csm.py (`random_original(PARITY_ARGS)`: every
           tensor random, norm scales in [0.5, 1.5]), written in the original checkpoint layout and
           read by the converter; needs torch + torchtune (the test extras)
  tiny     `CSM.random(preset("tiny"))`
  csm-1b   `CSM.random(CSM_1B)` in float32: the real layout and sizes (~12 GB of host memory at
           the peak; on a 2-core CPU the whole script takes about half an hour)
  PATH     a checkpoint (converted directory or PyTorch file), read in float32: trained weights

Variants, all built from the same float32 weights:
  fp32       the float32 model
  bf16       the weights in bfloat16 (what a GPU runs by default)
  int8       `quantize_model(bf16)`: int8 weights and embedding tables, bf16 activations
             (`--quantize int8` on a GPU)
  int8_bf16_tables  `quantize_model(bf16, embeddings=False)`: int8 weights, the embedding tables
             in bf16 (the tables' share of int8's error: int8 vs this)
  int8_f32   `quantize_model(fp32)`: int8 weights and tables, float32 activations (the weights'
             error alone; what `--quantize int8` gives on a CPU)
  gG_f32     group-wise int8 (one scale per G input rows and output column; the tables per row,
             as int8's), dequantized into a float32 model: what group-wise scales would buy over
             per-channel ones (a K that G does not divide keeps one group: per-channel)

Measurements:
  teacher-forced  one sequence (a prompt of text rows, 40 audio frames + EOS, text rows, then F frames
                  sampled from fp32, temperature 0.9, top-k 50, seed 0) through every variant: the
                  relative L2 error of each layer's output (backbone and depth decoder) and of the
                  final normed hidden state, the codebook-0 and depth logits' relative error and mean
                  KL(ref || variant) in nats, and top-1 (argmax) agreement per codebook. Every variant
                  sees the same prefix, so errors do not compound through different samples.
  free-running    F frames from fp32 (the sequence above), bf16 and int8 with the same seed
                  (temperature 0.9, top-k 50), each decoded by the random full-size Mimi (seed 0):
                  per pair the first frame where they differ, the fraction of equal tokens, and the
                  SNR of one's audio against the other's (bf16 vs fp32 is the baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtts.config import CSM_1B, CSMConfig, preset
from jaxtts.csm import CSM, param_dict
from jaxtts.generation import _SPLITS, generate_frames
from jaxtts.llama import XLA, dense
from jaxtts.quantize import EMBEDDINGS, QUANTIZED, quantize_model, weight

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS = 128_000, 128_001


# --- models -------------------------------------------------------------------------------------------


def parity_model(seed: int = 0) -> CSM:
    """The parity model of tests/reference_csm.py in float32, through the original checkpoint layout."""
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    import reference_csm as R
    from convert.csm import read_csm_checkpoint

    cfg = CSMConfig.from_dict(R.PARITY_ARGS)
    original = R.random_original(R.PARITY_ARGS, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = R.save_original(original, Path(tmp) / "model.safetensors")
        _, params = read_csm_checkpoint(path, cfg)
    return CSM.from_params(cfg, params, "float32")


def base_model(name: str, seed: int = 0) -> CSM:
    """A named random model, or a checkpoint (a converted directory or a PyTorch file) in float32."""
    if name == "parity":
        return parity_model(seed)
    if name in ("tiny", "csm-1b"):
        return CSM.random(CSM_1B if name == "csm-1b" else preset(name), dtype="float32", seed=seed)
    model = CSM.load(name, dtype="float32")
    if model.quantization:
        raise SystemExit(f"{name} holds {model.quantization} weights: give the bfloat16 / float32 checkpoint")
    return model


def cast(model: CSM, dtype: str) -> CSM:
    return CSM.from_params(model.cfg, param_dict(model), dtype)


def group_fake_quant_(model: CSM, group: int) -> CSM:
    """Make a float32 model's quantized weights int8 with one scale per `group` input rows and
    output column, dequantized, in place (the weights' error of group-wise scales, in a float32
    model; in place, so that CSM-1B does not need a second float32 copy). The embedding tables
    get int8's per-row scales, dequantized, so that only the weights' granularity differs."""

    @jax.jit
    def fq(w):
        k = w.shape[-2]
        g = group if k % group == 0 else k  # a K the group does not divide keeps one group
        wg = w.reshape(*w.shape[:-2], k // g, g, w.shape[-1]).astype(jnp.float32)
        s = jnp.max(jnp.abs(wg), axis=-2, keepdims=True) / 127
        s = jnp.where(s > 0, s, 1)
        return (jnp.clip(jnp.round(wg / s), -127, 127) * s).reshape(w.shape).astype(w.dtype)

    @jax.jit
    def fq_rows(t):
        s = jnp.max(jnp.abs(t.astype(jnp.float32)), axis=-1, keepdims=True) / 127
        s = jnp.where(s > 0, s, 1)
        return (jnp.clip(jnp.round(t / s), -127, 127) * s).astype(t.dtype)

    _SPLITS.pop(model, None)  # the split cache would keep the old weights alive
    for _, node in nnx.iter_graph(model):
        for name in QUANTIZED + EMBEDDINGS:
            param = getattr(node, name, None) if isinstance(node, nnx.Module) else None
            if isinstance(param, nnx.Param):
                param.set_value((fq_rows if name in EMBEDDINGS else fq)(param.get_value()))
    return model


# --- the prompt and the teacher-forced pass -----------------------------------------------------------


def prompt(seed: int = 7, audio_frames: int = 40, codebooks: int = 32, text_vocab: int = 128_000):
    """Text rows, an audio segment with its all-zero EOS frame, text rows (like tests/reference_csm.py's
    parity_prompt): tokens int32 [T, 33], mask bool [T, 33]."""
    rng = np.random.default_rng(seed)

    def text(ids):
        t, m = np.zeros((len(ids), codebooks + 1), np.int32), np.zeros((len(ids), codebooks + 1), bool)
        t[:, -1], m[:, -1] = ids, True
        return t, m

    codes = np.concatenate([rng.integers(1, 2048, (audio_frames, codebooks)), np.zeros((1, codebooks), int)])
    audio = frame_rows(codes.astype(np.int32))  # the segment's frames, then its all-zero EOS frame
    segs = [
        text([BOS, *rng.integers(0, text_vocab, 7), EOS]),
        audio,
        text([BOS, *rng.integers(0, text_vocab, 5), EOS]),
    ]
    return np.concatenate([s[0] for s in segs]), np.concatenate([s[1] for s in segs])


def frame_rows(frames):
    """Generated frames [F, 32] as backbone rows (codes in the audio columns, no text)."""
    f, n = frames.shape
    tokens = np.concatenate([frames, np.zeros((f, 1), frames.dtype)], 1).astype(np.int32)
    mask = np.concatenate([np.ones((f, n), bool), np.zeros((f, 1), bool)], 1)
    return tokens, mask


def _stack(llama, x, start, cache):
    """`Llama.__call__` (XLA, positions start + t) keeping every block's output: (normed, [layers])."""
    t = x.shape[1]
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    cos, sin = llama.rope_cos[...][pos], llama.rope_sin[...][pos]
    lengths = start + t
    outs = []
    for layer, kc, vc in zip(llama.layers, cache.k, cache.v):
        x, _, _ = layer(x, cos, sin, kc, vc, start, lengths, XLA)
        outs.append(x.astype(jnp.float32))
    return llama.norm(x).astype(jnp.float32), outs


@partial(jax.jit, static_argnames=("graphdef", "prompt_len"))
def _teacher_forced(graphdef, weights, tokens, mask, prompt_len: int):
    model = nnx.merge(graphdef, weights)
    nb = model.cfg.audio_num_codebooks
    t = tokens.shape[0]
    x = model.embed_rows(tokens[None], mask[None])
    hidden, bb_layers = _stack(model.backbone, x, jnp.zeros((1,), jnp.int32), model.backbone_cache(1, t))
    h = hidden[0, prompt_len - 1 : t - 1].astype(model.dtype)  # the row before each frame: [F, D]
    frames = tokens[prompt_len:, :nb]  # [F, 32]
    f = frames.shape[0]
    emb = model.embed_audio(jnp.arange(nb - 1), frames[:, : nb - 1])  # [F, 31, D]
    dec_in = dense(jnp.concatenate([h[:, None], emb], axis=1), weight(model, "projection"))
    dec_hidden, dec_layers = _stack(model.decoder, dec_in, jnp.zeros((f,), jnp.int32), model.decoder_cache(f))
    dh = dec_hidden.astype(model.dtype)
    depth = jnp.stack([model.codebook_logits(dh[:, i], i) for i in range(1, nb)], axis=1)  # [F, 31, V]
    logits = jnp.concatenate([model.codebook0_logits(h)[:, None], depth], axis=1)  # [F, 32, V]
    return dict(
        logits=logits.astype(jnp.float32),
        backbone_layers=[a[0, prompt_len - 1 : t - 1] for a in bb_layers],
        decoder_layers=dec_layers,
        backbone_final=hidden[0, prompt_len - 1 : t - 1],
        decoder_final=dec_hidden,
    )


def teacher_forced(model: CSM, tokens, mask, prompt_len: int) -> dict:
    """Every layer's output and the logits of all 32 codebooks for each frame after the prompt,
    each codebook conditioned on the given codes (numpy, float32)."""
    graphdef, weights = nnx.split(model)  # not split_model: its cache would hold every variant's weights
    out = _teacher_forced(graphdef, weights, jnp.asarray(tokens), jnp.asarray(mask), prompt_len)
    return jax.tree.map(lambda a: np.asarray(a, np.float32), out)


# --- metrics ------------------------------------------------------------------------------------------


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(ref_logits, logits) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(logits)), nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def compare(var: dict, ref: dict) -> dict:
    """The teacher-forced figures of one variant against a reference."""
    lv, lr = var["logits"], ref["logits"]
    agree = (lv.argmax(-1) == lr.argmax(-1)).mean(0)  # per codebook [32]
    return dict(
        backbone_layer_rel=[rel(a, b) for a, b in zip(var["backbone_layers"], ref["backbone_layers"])],
        decoder_layer_rel=[rel(a, b) for a, b in zip(var["decoder_layers"], ref["decoder_layers"])],
        backbone_final_rel=rel(var["backbone_final"], ref["backbone_final"]),
        decoder_final_rel=rel(var["decoder_final"], ref["decoder_final"]),
        c0_logits_rel=rel(lv[:, 0], lr[:, 0]),
        c0_kl=kl(lr[:, 0], lv[:, 0]),
        depth_logits_rel=rel(lv[:, 1:], lr[:, 1:]),
        depth_kl=kl(lr[:, 1:].reshape(-1, lr.shape[-1]), lv[:, 1:].reshape(-1, lv.shape[-1])),
        top1_per_codebook=[float(a) for a in agree],
        top1_c0=float(agree[0]),
        top1_depth_mean=float(agree[1:].mean()),
        top1_mean=float(agree.mean()),
        top1_min=float(agree.min()),
    )


def margins(ref: dict) -> dict:
    """How close the reference's top two logits are, relative to the logits' spread (a flip of the
    argmax needs an error of about this size)."""
    s = np.sort(ref["logits"], -1)
    gap = (s[..., -1] - s[..., -2]) / ref["logits"].std(-1)
    return dict(top2_gap_over_std_median=float(np.median(gap)), top2_gap_over_std_p10=float(np.quantile(gap, 0.1)))


def snr_db(x, ref) -> float:
    x, ref = np.asarray(x, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    n = min(len(x), len(ref))
    noise = np.sum((x[:n] - ref[:n]) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref[:n] ** 2) / noise))


def free_running(models: dict, tokens, mask, frames: int, seed: int, mimi, given: dict | None = None) -> dict:
    """F sampled frames per model (the same seed; `given`: frames already sampled so), decoded by
    Mimi; each pair compared: first differing frame, equal tokens, SNR of the audio."""
    out = dict(given or {})
    for name, model in models.items():
        t0 = time.perf_counter()
        out[name] = generate_frames(model, tokens, mask, max_frames=frames, temperature=0.9, top_k=50, seed=seed)
        print(f"  {name}: {len(out[name])} frames in {time.perf_counter() - t0:.1f} s", flush=True)
    pcm = {k: np.asarray(mimi.decode(np.where(v < 2048, v, 0).T[None]))[0, 0] for k, v in out.items()}
    result = {}
    for a, b in (("int8", "bf16"), ("int8", "fp32"), ("bf16", "fp32")):
        if a in out and b in out:
            fa, fb = out[a], out[b]
            n = min(len(fa), len(fb))
            differ = np.nonzero((fa[:n] != fb[:n]).any(1))[0]
            result[f"{a}_vs_{b}"] = dict(
                frames=n,
                first_differing_frame=int(differ[0]) if len(differ) else None,
                token_agreement=round(float((fa[:n] == fb[:n]).mean()), 4),
                snr_db=round(snr_db(pcm[a], pcm[b]), 2),
            )
    result["audio_seconds"] = len(pcm[next(iter(pcm))]) / 24000
    return result


# --- the run ------------------------------------------------------------------------------------------


def run(name: str, num_frames: int, group: int, seed: int, free: bool) -> dict:
    t0 = time.perf_counter()
    fp32 = base_model(name, seed)
    cfg = fp32.cfg
    p_tok, p_mask = prompt(codebooks=cfg.audio_num_codebooks, text_vocab=min(128_000, cfg.text_vocab_size))
    print(f"{name}: model in {time.perf_counter() - t0:.1f} s; sampling {num_frames} frames from fp32", flush=True)
    gen = generate_frames(fp32, p_tok, p_mask, max_frames=num_frames, temperature=0.9, top_k=50, seed=0)
    if len(gen) < num_frames:
        raise SystemExit(f"fp32 ended the sequence after {len(gen)} frames; choose another --seed")
    f_tok, f_mask = frame_rows(gen)
    tokens, mask = np.concatenate([p_tok, f_tok]), np.concatenate([p_mask, f_mask])
    plen = len(p_tok)

    # CSM-1B in float32 is 6 GB: at most bf16 and one int8 model beside fp32, and the group-wise
    # variant made from fp32 in place, last; bf16 and int8 are kept for the free-running part.
    _SPLITS.pop(fp32, None)  # generate_frames' split of fp32
    outputs, keep = {}, {}
    for variant in ["fp32", "int8_f32", "bf16", "int8", "int8_bf16_tables", f"g{group}_f32"]:
        t = time.perf_counter()
        if variant == "fp32":
            model = fp32
        elif variant == "int8_f32":
            model = quantize_model(fp32)
        elif variant == "bf16":
            model = cast(fp32, "bfloat16")
        elif variant == "int8":
            model = quantize_model(keep["bf16"])
        elif variant == "int8_bf16_tables":
            model = quantize_model(keep["bf16"], embeddings=False)
        else:
            model = group_fake_quant_(fp32, group)
        outputs[variant] = teacher_forced(model, tokens, mask, plen)
        if variant in ("bf16", "int8"):
            keep[variant] = model
        print(f"  teacher-forced {variant}: {time.perf_counter() - t:.1f} s", flush=True)
        del model
    del fp32

    result = dict(
        model=name,
        frames=num_frames,
        prompt_rows=plen,
        group=group,
        jax=jax.__version__,
        platform=jax.devices()[0].platform,
        fp32_margins=margins(outputs["fp32"]),
        teacher_forced={
            "int8_vs_fp32": compare(outputs["int8"], outputs["fp32"]),
            "int8_vs_bf16": compare(outputs["int8"], outputs["bf16"]),
            "bf16_vs_fp32": compare(outputs["bf16"], outputs["fp32"]),
            "int8_bf16_tables_vs_fp32": compare(outputs["int8_bf16_tables"], outputs["fp32"]),
            "int8_f32_vs_fp32": compare(outputs["int8_f32"], outputs["fp32"]),
            f"g{group}_f32_vs_fp32": compare(outputs[f"g{group}_f32"], outputs["fp32"]),
        },
    )
    if free:
        from jaxtts.mimi import Mimi

        print("free-running bf16 and int8 (the seed of the fp32 sequence), Mimi decode", flush=True)
        result["free_running"] = free_running(
            keep, p_tok, p_mask, num_frames, seed=0, mimi=Mimi.random(0), given={"fp32": gen}
        )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def disk_sizes(name: str, seed: int = 0) -> dict:
    """Bytes of the model's bf16 weights as a safetensors file (the format CSM is distributed in:
    its tensors and a header) and as a converted checkpoint (`save`: Orbax, with its zstd), of the
    int8 checkpoint (every projection, head and embedding table int8) and of the int8 checkpoint
    with bf16 tables, and of their tensors uncompressed. Random models are drawn in bf16."""
    import tempfile

    from safetensors.numpy import save_file

    if name in ("tiny", "csm-1b"):
        bf16 = CSM.random(CSM_1B if name == "csm-1b" else preset(name), dtype="bfloat16", seed=seed)
    else:
        bf16 = cast(base_model(name, seed), "bfloat16")

    def tensor_bytes(model):
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(param_dict(model)))

    def du(path):
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

    def flat(tree, prefix=""):
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield from flat(v, key) if isinstance(v, dict) else [(key, np.asarray(v))]

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["bf16_tensor_bytes"] = tensor_bytes(bf16)
        save_file(dict(flat(param_dict(bf16))), str(Path(tmp) / "model.safetensors"))
        out["bf16_safetensors_bytes"] = (Path(tmp) / "model.safetensors").stat().st_size
        out["bf16_disk_bytes"] = du(bf16.save(Path(tmp) / "bf16"))
        for variant, tables in (("int8_bf16_tables", False), ("int8", True)):
            int8 = quantize_model(bf16, embeddings=tables)
            out[f"{variant}_tensor_bytes"] = tensor_bytes(int8)
            out[f"{variant}_disk_bytes"] = du(int8.save(Path(tmp) / variant))
            del int8
    for variant in ("int8", "int8_bf16_tables"):
        out[f"{variant}_tensor_ratio"] = round(out[f"{variant}_tensor_bytes"] / out["bf16_tensor_bytes"], 4)
        out[f"{variant}_disk_ratio_vs_safetensors"] = round(
            out[f"{variant}_disk_bytes"] / out["bf16_safetensors_bytes"], 4
        )
        out[f"{variant}_disk_ratio_vs_orbax"] = round(out[f"{variant}_disk_bytes"] / out["bf16_disk_bytes"], 4)
    return out


def table(result: dict) -> str:
    """The figures as a Markdown table (what docs/QUANTIZATION.md quotes)."""
    rows = [
        "| comparison | backbone final rel | depth final rel | c0 logits rel | c0 KL | depth logits rel | depth KL "
        "| top-1 c0 | top-1 depth mean | top-1 all | top-1 min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["teacher_forced"].items():
        rows.append(
            f"| {name.replace('_vs_', ' vs ')} | {r['backbone_final_rel']:.2e} | {r['decoder_final_rel']:.2e} "
            f"| {r['c0_logits_rel']:.2e} | {r['c0_kl']:.1e} | {r['depth_logits_rel']:.2e} | {r['depth_kl']:.1e} "
            f"| {100 * r['top1_c0']:.0f} % | {100 * r['top1_depth_mean']:.1f} % | {100 * r['top1_mean']:.1f} % "
            f"| {100 * r['top1_min']:.0f} % |"
        )
    lines = ["\n".join(rows), ""]
    for name in ("int8_vs_fp32", "bf16_vs_fp32"):
        r = result["teacher_forced"][name]
        lines.append(
            f"{name} per-layer rel error: backbone "
            + " ".join(f"{e:.1e}" for e in r["backbone_layer_rel"])
            + "; depth "
            + " ".join(f"{e:.1e}" for e in r["decoder_layer_rel"])
        )
    lines.append(f"fp32 top-2 logit gap / logit std: {result['fp32_margins']}")
    for pair, r in result.get("free_running", {}).items():
        if isinstance(r, dict):
            lines.append(f"free-running {pair}: {r}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="parity",
        help="parity, tiny, csm-1b (random weights), or a checkpoint: a converted directory or a PyTorch file",
    )
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--group", type=int, default=16, help="group size of the group-wise variant (default 16)")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.add_argument("--no-free-running", action="store_true", help="skip the free-running / Mimi SNR part")
    p.add_argument("--json", help="write the figures here")
    p.add_argument(
        "--disk",
        action="store_true",
        help="only the checkpoint sizes: bf16 (safetensors file, converted) vs int8, on disk and raw",
    )
    p.add_argument("--from-json", metavar="FILE", help="print the tables of a saved --json result and exit")
    args = p.parse_args(argv)
    command = "python -m benchmarks.quant_accuracy " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        print(table(json.loads(Path(args.from_json).read_text())))
        return 0
    if args.disk:
        sizes = dict(model=args.model, command=command, jax=jax.__version__, **disk_sizes(args.model, args.seed))
        print(sizes)
        if args.json:
            Path(args.json).write_text(json.dumps(sizes, indent=1) + "\n")
        return 0
    if jax.default_backend() == "gpu":  # fp32 is the reference: true float32 matmuls, not TF32
        jax.config.update("jax_default_matmul_precision", "highest")
    result = dict(command=command, **run(args.model, args.frames, args.group, args.seed, free=not args.no_free_running))
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
