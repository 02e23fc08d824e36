"""The multi-device checks of tests/test_multidevice.py, run in a subprocess with 8 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_check.py OUT.json

XLA reads XLA_FLAGS once, when JAX starts its CPU backend, and the rest of the suite runs on one
device in the pytest process: hence a process of its own. Each check compares the sharded run with
the single-device run in this same process and writes what it found to OUT.json (the test asserts
on it, so that a failure shows the numbers).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import replace

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxtts.config import CSMConfig, LlamaConfig, preset  # noqa: E402
from jaxtts.csm import CSM  # noqa: E402
from jaxtts.errors import JaxttsError  # noqa: E402

# The fine-tuning tests' small CSM (tests/test_finetune.py).
SMALL = CSMConfig(
    backbone=LlamaConfig(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64, max_seq_len=128),
    decoder=LlamaConfig(num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64, max_seq_len=32),
)


def check_engine() -> dict:
    """Requests through an engine over 8 devices (pools of 8 and 16 rows: grows, moves rows between
    devices, shrinks) against `TTS.generate_batch` on one device: frames equal, audio close."""
    from jaxtts.engine import Engine
    from jaxtts.mimi import Mimi
    from jaxtts.prompt import Segment
    from jaxtts.tts import TTS

    voice = Segment(1, "This is my voice.", codes=np.random.default_rng(0).integers(0, 2048, (32, 6)))
    settings = [  # sampling settings: each a group of requests with its own reference call
        dict(temperature=0.9, top_k=50),
        dict(temperature=0.0),  # greedy
        dict(temperature=0.8, top_k=0, top_p=0.8),
        dict(temperature=1.0, top_k=100, min_p=0.1),
    ]
    requests = []
    for i in range(10):
        requests.append(
            dict(
                text=f"Request number {i}, spoken.",
                seed=100 + i,
                max_audio_ms=80 * (3 + i % 5),
                speaker=i % 2,
                context=[voice] if i % 4 == 3 else None,
                sampling=settings[i % len(settings)],
            )
        )

    model, codec = CSM.random(preset("tiny"), seed=1), Mimi.random(seed=0)
    single = TTS(model, codec, max_silence_ms=None)
    refs = {}
    for sampling in settings:
        group = [r for r in requests if r["sampling"] is sampling]
        outs = single.generate_batch(
            [{k: r[k] for k in ("text", "seed", "max_audio_ms", "speaker", "context")} for r in group],
            return_frames=True,
            **sampling,
        )
        refs.update({id(r): out for r, out in zip(group, outs)})

    # Its own copy of the weights: the engine replicates them in place.
    tts = TTS(CSM.random(preset("tiny"), seed=1), Mimi.random(seed=0), max_silence_ms=None)
    engine = Engine(
        tts,
        devices="all",
        max_batch=16,
        pool_sizes=(8, 16),
        chunk_frames=2,
        first_chunk_frames=1,
        max_prefill=4,
        shrink_after=1,
    )
    found = {"devices": engine.stats()["devices"], "pool_sizes": list(engine.pool_sizes)}
    t0 = time.perf_counter()
    engine.warmup(text_tokens=16, context_rows=16, encode=False)
    found["warmup_s"] = time.perf_counter() - t0
    warm = engine.compilations
    handles = [
        engine.submit(
            r["text"],
            seed=r["seed"],
            max_audio_ms=r["max_audio_ms"],
            speaker=r["speaker"],
            context=r["context"],
            **r["sampling"],
        )
        for r in requests
    ]
    frames_equal, audio_err, lengths = [], [], []
    for r, h in zip(requests, handles):
        ref_audio, ref_frames = refs[id(r)]
        frames = h.frames(timeout=300)
        audio = h.result()
        frames_equal.append(bool(np.array_equal(frames, ref_frames)))
        lengths.append([len(frames), len(ref_frames)])
        same_len = len(audio) == len(ref_audio)
        audio_err.append(
            float(np.abs(audio - ref_audio).max() / max(np.abs(ref_audio).max(), 1e-9))
            if same_len and len(ref_audio)
            else (0.0 if same_len else 1.0)
        )
    state = engine._pool.state if engine._pool is not None else None
    found.update(
        frames_equal=frames_equal,
        frame_counts=lengths,
        audio_rel_err=max(audio_err),
        compiled_after_warmup=engine.compilations - warm,
        resizes=[list(r) for r in engine.resizes],
        cache_spec=str(state.cache.k[0].sharding.spec) if state is not None else None,
        cache_devices=len(state.cache.k[0].sharding.device_set) if state is not None else 0,
    )
    engine.close()

    # Pool sizes on 3 devices: multiples of 3. Bad device counts: one-line errors.
    three = Engine(tts, devices=3, max_batch=10, pool_sizes=(1, 8, 32))
    found["pool_sizes_3"], found["max_batch_3"] = list(three.pool_sizes), three.max_batch
    three.close()
    errors = []
    for bad in (9, "abc", 0):
        try:
            Engine(tts, devices=bad)
        except JaxttsError as e:
            errors.append(str(e))
    found["errors"] = errors
    return found


def _synthetic_batch(cfg: CSMConfig, batch: int, seed: int) -> dict:
    """Collated rows as `jaxtts.finetune.data` builds them: text rows, then audio frames and the
    end-of-audio frame (scored), then padding; random codes and text tokens, ragged lengths."""
    from jaxtts.buckets import train_rows
    from jaxtts.finetune.data import Example, collate
    from jaxtts.prompt import audio_rows, concat_rows, text_rows

    rng = np.random.default_rng(seed)
    examples = []
    for b in range(batch):
        text = text_rows(list(rng.integers(1, 1000, 4 + b % 3)))
        audio = audio_rows(rng.integers(0, 2048, (32, 6 + 2 * (b % 4))))
        tokens, mask = concat_rows([text, audio])
        target = np.concatenate([np.zeros(len(text[0]), bool), np.ones(len(audio[0]), bool)])
        examples.append(Example(f"s{b}", tokens, mask, target))
    return collate(examples, train_rows(max(len(e) for e in examples), cfg.backbone.max_seq_len))


def check_finetune() -> dict:
    """Two optimizer steps on one global batch of 8: one device, data parallel over 8, and FSDP
    over 8 (also LoRA with FSDP); parameters and metrics compared. Then the FSDP state through an
    Orbax checkpoint and back, shardings included."""
    from jaxtts.finetune.train import (
        Checkpoints,
        FinetuneConfig,
        StepSpec,
        init_training,
        place_training,
        train_step_fn,
    )
    from jaxtts.sharding import to_host

    base = CSM.random(SMALL, seed=1)
    batches = [_synthetic_batch(SMALL, 8, seed) for seed in (1, 2)]
    lr = np.float32(1e-3)
    found = {}

    def run(cfg: FinetuneConfig):
        layout, state, frozen, consts = init_training(base, cfg, copy=True)
        mesh = cfg.mesh()
        if mesh is not None:
            state, frozen, consts = place_training(mesh, cfg.fsdp, state, frozen, consts)
        step = train_step_fn(StepSpec.of(cfg), layout, mesh, cfg.fsdp)
        metrics = []
        for batch in batches:
            state, m = step(state, frozen, consts, batch if mesh is None else mesh.put_batch(batch), lr)
            metrics.append(to_host(m))
        return state, metrics

    common = dict(steps=2, batch_size=8, warmup_steps=0, lr=1e-3, compute_dtype="float32")
    for name, extra in (("full", {}), ("lora", dict(lora_rank=4))):
        cfg = FinetuneConfig(**common, **extra).resolved()
        ref_state, ref_metrics = run(cfg)
        ref_params = to_host(ref_state.params)
        for mode, fsdp in (("dp", False), ("fsdp", True)):
            if name == "lora" and not fsdp:
                continue
            state, metrics = run(replace(cfg, devices="all", fsdp=fsdp))
            params = to_host(state.params)
            err = max(
                float(np.abs(params[k] - ref_params[k]).max() / max(np.abs(ref_params[k]).max(), 1e-6))
                for k in ref_params
            )
            changed = max(float(np.abs(params[k] - to_host(base_value(base, k, cfg))).max()) for k in params)
            loss_err = max(
                abs(float(m[k]) - float(r[k])) / max(abs(float(r[k])), 1e-6)
                for m, r in zip(metrics, ref_metrics)
                for k in ("loss", "loss_c0", "loss_depth", "grad_norm")
            )
            specs = {str(a.sharding.spec) for a in jax.tree.leaves(state.params)}
            split = sum(a.sharding.spec != jax.sharding.PartitionSpec() for a in jax.tree.leaves(state.params))
            opt_split = sum(
                a.sharding.spec != jax.sharding.PartitionSpec()
                for a in jax.tree.leaves(state.opt_state)
                if hasattr(a, "sharding")
            )
            found[f"{name}_{mode}"] = dict(
                param_rel_err=err,
                metric_rel_err=loss_err,
                params_changed=changed,
                specs=sorted(specs),
                params_split=split,
                opt_split=opt_split,
                leaves=len(jax.tree.leaves(state.params)),
                devices=len(jax.tree.leaves(state.params)[0].sharding.device_set),
            )
            if name == "full" and fsdp:
                fsdp_state, fsdp_cfg = state, replace(cfg, devices="all", fsdp=True)

    # Checkpoint the FSDP state and restore it into a fresh FSDP-placed template.
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        ckpt = Checkpoints(Path(tmp) / "checkpoints", keep=2)
        ckpt.save(2, fsdp_state, {"step": 2, "position": 16})
        ckpt.close()
        layout, template, frozen, consts = init_training(base, fsdp_cfg, copy=True)
        template, _, _ = place_training(fsdp_cfg.mesh(), True, template, frozen, consts)
        ckpt = Checkpoints(Path(tmp) / "checkpoints", keep=2)
        restored, meta = ckpt.restore_latest(template)
        ckpt.close()
        same = all(
            np.array_equal(to_host(a), to_host(b))
            for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(fsdp_state))
        )
        layouts = all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(template)))
        found["checkpoint"] = dict(values_equal=same, shardings_as_template=layouts, meta=meta)

    errors = []
    for bad in (dict(devices=3), dict(devices=16), dict(devices="two")):
        try:
            FinetuneConfig(**{**common, **bad}).resolved()
        except JaxttsError as e:
            errors.append(str(e))
    found["errors"] = errors
    return found


def base_value(model: CSM, name: str, cfg):
    """The starting value of trainable `name` (LoRA adapters start at B = 0: compare to zeros)."""
    from jaxtts.finetune.train import Layout

    if cfg.lora_rank:
        return np.zeros(())
    _, flat, _ = Layout.split(model)
    return flat[name]


def main(out: str, checks: list[str]) -> int:
    results = {"device_count": jax.device_count()}
    for name in checks:
        t0 = time.perf_counter()
        try:
            results[name] = globals()[f"check_{name}"]()
        except Exception:
            results[name] = {"exception": traceback.format_exc()[-4000:]}
        results[name]["seconds"] = time.perf_counter() - t0
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:] or ["engine", "finetune"]))
