"""Fine-tuning on CPU: a small random CSM, the full-size random Mimi encoding short test clips."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf

from jaxtts.config import CSMConfig, LlamaConfig
from jaxtts.csm import CSM, _flat, param_dict
from jaxtts.errors import JaxttsError
from jaxtts.finetune import finetune
from jaxtts.finetune.data import load_examples
from jaxtts.finetune.lora import target_names

# Smaller than CSM_TINY (the full-vocabulary text embedding dominates a full fine-tuning step).
SMALL = CSMConfig(
    backbone=LlamaConfig(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64, max_seq_len=128),
    decoder=LlamaConfig(num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64, max_seq_len=32),
)
CLIPS = {"a": (1.0, "Hello there.", 0), "b": (0.6, "How are you?", 1), "c": (0.8, "Fine, thanks.", 0)}


def flat_params(model) -> dict:
    return {k: np.asarray(v) for k, v in _flat(param_dict(model))}


def clip(seconds, seed):
    t = np.arange(int(24_000 * seconds)) / 24_000
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (150 + 100 * seed) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory, mimi):
    """train.jsonl (b has a as context), one.jsonl (just a), and folder/ (wav + txt); codes cached once."""
    root = tmp_path_factory.mktemp("data")
    lines = []
    for i, (name, (seconds, text, speaker)) in enumerate(CLIPS.items()):
        sf.write(root / f"{name}.wav", clip(seconds, i), 24_000)
        entry = {"id": name, "audio": f"{name}.wav", "text": text, "speaker": speaker}
        if name == "b":
            entry["context"] = ["a"]
        lines.append(json.dumps(entry))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "one.jsonl").write_text(lines[0] + "\n")
    folder = root / "folder"
    folder.mkdir()
    for name in ("a", "c"):
        shutil.copy(root / f"{name}.wav", folder / f"{name}.wav")
        (folder / f"{name}.txt").write_text(CLIPS[name][1] + "\n")
    (folder / "speakers.json").write_text(json.dumps({"c": 0}))
    load_examples(root / "train.jsonl", mimi)
    return root


def test_rows_match_generation_prompt(data, mimi):
    from jaxtts.prompt import audio_rows, concat_rows, text_rows
    from jaxtts.tokenizer import default_tokenizer

    tok = default_tokenizer()
    ex = {e.name: e for e in load_examples(data / "train.jsonl", mimi)}
    assert len(list((data / ".jaxtts-codes").glob("*.npy"))) == 3
    codes_a = ex["a"].tokens[ex["a"].target][:-1, :32].T
    assert codes_a.shape == (32, 13)
    codes_b = ex["b"].tokens[ex["b"].target][:-1, :32].T
    expected = concat_rows(
        [
            text_rows(tok.encode_segment("Hello there.", 0)),
            audio_rows(codes_a),
            text_rows(tok.encode_segment("How are you?", 1)),
            audio_rows(codes_b),
        ]
    )
    np.testing.assert_array_equal(ex["b"].tokens, expected[0])
    np.testing.assert_array_equal(ex["b"].mask, expected[1])
    # Only b's own frames (and its end-of-audio frame) are targets, not its context.
    own = codes_b.shape[1] + 1
    assert ex["b"].frames == own and ex["b"].target[-own:].all() and not ex["b"].target[:-own].any()


def test_overfit_one_utterance_then_generate_it(data, mimi, tmp_path):
    from jaxtts.generation import generate_frames
    from jaxtts.prompt import text_rows
    from jaxtts.tokenizer import default_tokenizer

    (ex,) = load_examples(data / "one.jsonl", mimi)
    codes = ex.tokens[ex.target][:-1, :32]
    res = finetune(
        data / "one.jsonl",
        tmp_path / "run",
        model=CSM.random(SMALL, seed=1),
        codec=mimi,
        steps=100,
        batch_size=1,
        lr=1e-2,
        depth_fraction=1.0,
        eval_fraction=0,
        save_every=1000,
        progress=False,
        export=False,
    )
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert last <= 0.1 * first, (first, last)
    prompt = text_rows(default_tokenizer().encode_segment("Hello there.", 0))
    frames = generate_frames(res.model, *prompt, max_frames=len(codes) + 8, top_k=1)
    np.testing.assert_array_equal(frames, codes)  # every code, and it stops at the learned end frame


# Two micro-batches per step, a random depth subset, a held-out utterance (evaluated at the end only,
# so that the killed run compiles just the train step).
RESUME = dict(
    steps=6,
    batch_size=2,
    grad_accum=2,
    lr=3e-3,
    depth_fraction=0.25,
    eval_fraction=0.34,
    save_every=2,
    eval_every=6,
    keep=2,
    seed=3,
    progress=False,
    export=False,
)

KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    from jaxtts.config import CSMConfig
    from jaxtts.csm import CSM
    from jaxtts.finetune import finetune
    from jaxtts.mimi import Mimi

    cfg = CSMConfig.from_json(sys.argv[3])
    def kill_after_save(step, record):
        if step == 4:  # step 4's checkpoint is being written in the background right now
            os.kill(os.getpid(), signal.SIGKILL)
    finetune(sys.argv[1], sys.argv[2], model=CSM.random(cfg, seed=1), codec=Mimi.random(seed=0),
             callback=kill_after_save, **json.loads(sys.argv[4]))
""")


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(data, mimi, tmp_path):
    whole = finetune(data / "train.jsonl", tmp_path / "whole", model=CSM.random(SMALL, seed=1), codec=mimi, **RESUME)
    assert [r["step"] for r in whole.history] == list(range(1, 7)) and whole.eval_loss is not None

    run = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(data / "train.jsonl"), str(run), SMALL.to_json(), json.dumps(RESUME)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = run / "checkpoints"
    complete = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert complete and complete[-1] in (2, 4)
    # What other crashes leave behind: a temporary step directory, and a step whose files are incomplete.
    shutil.copytree(ckpts / str(complete[-1]), ckpts / "6.orbax-checkpoint-tmp")
    shutil.copytree(ckpts / str(complete[-1]), ckpts / "5")
    shutil.rmtree(ckpts / "5" / "state")

    resumed = finetune(data / "train.jsonl", run, model=CSM.random(SMALL, seed=1), codec=mimi, **RESUME)
    assert resumed.history[0]["step"] == complete[-1] + 1
    assert [r["step"] for r in resumed.history][-1] == 6
    assert not (ckpts / "5").exists()
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 7))  # steps lost with the killed process are logged once, by the resumed run
    a, b = flat_params(whole.model), flat_params(resumed.model)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert resumed.eval_loss == whole.eval_loss


def test_resume_refuses_different_settings(data, mimi, tmp_path):
    finetune(
        data / "one.jsonl",
        tmp_path / "run",
        model=CSM.random(SMALL, seed=1),
        codec=mimi,
        steps=1,
        batch_size=1,
        depth_fraction=1.0,
        eval_fraction=0,
        progress=False,
        export=False,
    )
    with pytest.raises(JaxttsError, match="different batch_size"):
        finetune(
            data / "one.jsonl",
            tmp_path / "run",
            model=CSM.random(SMALL, seed=1),
            codec=mimi,
            steps=2,
            batch_size=2,
            depth_fraction=1.0,
            eval_fraction=0,
            progress=False,
            export=False,
        )


def test_lora_trains_only_adapters_and_export_merges_them(data, mimi, tmp_path):
    base = CSM.random(SMALL, seed=1)
    before = flat_params(base)
    res = finetune(
        data / "train.jsonl",
        tmp_path / "run",
        model=base,
        codec=mimi,
        steps=4,
        batch_size=2,
        lr=1e-2,
        lora_rank=4,
        eval_fraction=0,
        save_every=2,
        progress=False,
    )
    targets = set(target_names(SMALL))
    assert set(res.adapters) == {f"{t}.{m}" for t in targets for m in "ab"}
    assert all(np.abs(res.adapters[f"{t}.b"]).max() > 0 for t in targets)  # B starts at zero: it trained
    scale = 8.0 / 4  # default alpha = 2 × rank
    exported = flat_params(CSM.load(res.export_dir, dtype="float32"))
    assert set(exported) == set(before)
    for name, w in before.items():
        if name in targets:
            a, b = res.adapters[f"{name}.a"].astype(np.float64), res.adapters[f"{name}.b"].astype(np.float64)
            merged = w.astype(np.float64) + a @ b * scale
            np.testing.assert_allclose(exported[name], merged, rtol=1e-5, atol=1e-6, err_msg=name)
            assert not np.array_equal(exported[name], w)
        else:
            np.testing.assert_array_equal(exported[name], w, err_msg=name)  # frozen, bit for bit


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such audio file"),
        ("corrupt", "cannot read audio"),
        ("empty-audio", "audio is empty"),
        ("empty-text", "text is empty"),
        ("bad-json", "not valid JSON"),
        ("bad-context", "context id 'zz'"),
    ],
)
def test_data_errors_name_the_line(data, mimi, tmp_path, case, message):
    good = {"audio": str(data / "a.wav"), "text": "Fine."}
    bad = {"audio": str(tmp_path / "x.wav"), "text": "Fine."}
    if case == "corrupt":
        (tmp_path / "x.wav").write_bytes(b"RIFF\x00\x00not really a wav file at all")
    elif case == "empty-audio":
        sf.write(tmp_path / "x.wav", np.zeros(0, np.float32), 24_000)
    elif case == "empty-text":
        bad = {"audio": str(data / "a.wav"), "text": "  "}
    elif case == "bad-context":
        bad = {"audio": str(data / "a.wav"), "text": "Fine.", "context": ["zz"]}
    second = "{not json" if case == "bad-json" else json.dumps(bad)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(good) + "\n" + second + "\n")
    with pytest.raises(JaxttsError, match=message) as err:
        load_examples(manifest, mimi)
    assert f"{manifest} line 2" in str(err.value)


def test_folder_needs_transcripts(data, mimi, tmp_path):
    shutil.copy(data / "a.wav", tmp_path / "lonely.wav")
    with pytest.raises(JaxttsError, match="lonely.wav: no transcript lonely.txt"):
        load_examples(tmp_path, mimi)


def test_cli_finetunes_a_folder_and_exports_a_loadable_model(data, mimi, tmp_path, monkeypatch, capsys):
    from jaxtts.finetune.cli import add_finetune_parser, run_finetune

    monkeypatch.setenv("JAXTTS_COMPILE_CACHE", "0")
    start = CSM.random(SMALL, seed=1)
    start.save(tmp_path / "start")
    parser = argparse.ArgumentParser()
    add_finetune_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "run"
    args = parser.parse_args(
        [
            "finetune",
            "--data",
            str(data / "folder"),
            "--out",
            str(out),
            "--model",
            str(tmp_path / "start"),
            "--random-weights",
            "--steps",
            "2",
            "--batch-size",
            "1",
            "--depth-fraction",
            "1",
            "--eval-fraction",
            "0",
            "--dtype",
            "float32",
            "--quiet",
        ]
    )
    assert run_finetune(args) == 0  # --random-weights fills in only the codec: a random Mimi
    assert str(out / "model") in capsys.readouterr().out
    loaded = CSM.load(out / "model", dtype="float32")
    assert loaded.cfg == SMALL
    assert not np.array_equal(flat_params(loaded)["codebook0_head"], flat_params(start)["codebook0_head"])
    assert json.loads((out / "run.json").read_text())["train_examples"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
