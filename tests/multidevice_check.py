"""The multi-device checks of tests/test_multidevice.py, run in a subprocess with 8 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_check.py OUT.json

XLA reads XLA_FLAGS once, when JAX starts its CPU backend, and the rest of the suite runs on one
device in the pytest process: hence a process of its own. Each check compares the sharded run with
the single-device run in this same process and writes what it found to OUT.json (the test asserts
on it, so that a failure shows the numbers).
"""

from __future__ import annotations

import dataclasses
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

from jaxtts.config import CSMConfig, LlamaConfig  # noqa: E402
from jaxtts.csm import CSM  # noqa: E402
from jaxtts.errors import JaxttsError  # noqa: E402

# The fine-tuning tests' small CSM (tests/test_finetune.py).
SMALL = CSMConfig(
    backbone=LlamaConfig(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64, max_seq_len=128),
    decoder=LlamaConfig(num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64, max_seq_len=32),
)


def check_engine() -> dict:
    """Ten requests (mixed sampling settings, some after a voice prompt) through an engine over 8
    devices (pools of 8 and 16 rows: grows, moves rows between devices, shrinks) and through the
    same engine on one device (which gives exactly `TTS.generate`'s frames: tests/test_engine.py):
    frames equal, audio equal up to rounding; nothing compiles after the warmup."""
    from jaxtts.engine import Engine
    from jaxtts.prompt import Segment
    from jaxtts.testing import tiny_tts

    voice = Segment(1, "My voice.", codes=np.random.default_rng(0).integers(0, 2048, (32, 3)))
    # Top-p and greedy rows land on some devices only (a device skips the top-p filter when none
    # of its rows asks for it).
    settings = [dict(temperature=0.9, top_k=50), dict(temperature=0.8, top_k=None, top_p=0.8), dict(temperature=0.0)]
    kinds = [0, 1, 0, 0, 1, 2, 0, 1, 2, 0]
    requests = [
        dict(
            text=f"Request number {i}.",
            seed=100 + i,
            max_audio_ms=80 * (3 + i % 5),
            speaker=i % 2,
            context=[voice] if i % 4 == 3 else None,
            **settings[kind],
        )
        for i, kind in enumerate(kinds)
    ]
    t0 = time.perf_counter()
    tts = tiny_tts()
    # A context prepared before the engines, its cache committed to one device (as a loaded
    # model's would be), handed to the sharded engine too.
    ctx = tts.prepare_context([Segment(0, "Before.", codes=np.ones((32, 2), np.int32))])
    requests[9]["context"] = dataclasses.replace(ctx, cache=jax.device_put(ctx.cache, jax.devices()[0]))

    def serve(engine) -> list[tuple[np.ndarray, np.ndarray]]:
        handles = [engine.submit(r.pop("text"), **r) for r in [dict(r) for r in requests]]
        return [(h.result(timeout=300), h.frames()) for h in handles]

    options = dict(chunk_frames=2, first_chunk_frames=2, max_prefill=1, shrink_after=1)
    with Engine(tts, max_batch=16, pool_sizes=(16,), **options) as single:
        refs = serve(single)
    found = {"reference_s": time.perf_counter() - t0}

    engine = Engine(tts, devices="all", max_batch=16, pool_sizes=(8, 16), **options)  # replicates tts's weights
    found.update(devices=engine.stats()["devices"], pool_sizes=list(engine.pool_sizes))
    t0 = time.perf_counter()
    engine.warmup(text_tokens=16, context_rows=16, encode=False)
    found["warmup_s"] = time.perf_counter() - t0
    warm = engine.compilations
    if os.environ.get("JAXTTS_LOG_COMPILES"):
        jax.config.update("jax_log_compiles", True)
    t0 = time.perf_counter()
    outs = serve(engine)
    frames_equal, audio_err, lengths = [], [], []
    for (audio, frames), (ref_audio, ref_frames) in zip(outs, refs):
        frames_equal.append(bool(np.array_equal(frames, ref_frames)))
        lengths.append([len(frames), len(ref_frames)])
        same_len = len(audio) == len(ref_audio) == 1920 * len(ref_frames)
        audio_err.append(
            float(np.abs(audio - ref_audio).max() / max(np.abs(ref_audio).max(), 1e-9)) if same_len else 1.0
        )
    found["serving_s"] = time.perf_counter() - t0
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
    """Two optimizer steps on global batches of 8: one device, data parallel over 8, and FSDP over 8;
    parameters and metrics compared. Then the FSDP state through an Orbax checkpoint and back,
    shardings included."""
    from pathlib import Path

    from jaxtts.finetune.train import (
        Checkpoints,
        FinetuneConfig,
        Layout,
        StepSpec,
        init_training,
        place_training,
        train_step_fn,
    )
    from jaxtts.sharding import to_host

    base = CSM.random(SMALL, seed=1)
    start = to_host(Layout.split(base)[1])
    batches = [_synthetic_batch(SMALL, 8, seed) for seed in (1, 2)]
    lr = np.float32(1e-3)
    found = {}

    def run(cfg: FinetuneConfig):
        t0 = time.perf_counter()
        layout, state, frozen, consts = init_training(base, cfg, copy=True)
        mesh = cfg.mesh()
        if mesh is not None:
            state, frozen, consts = place_training(mesh, cfg.fsdp, state, frozen, consts)
        step = train_step_fn(StepSpec.of(cfg), layout, mesh, cfg.fsdp)
        metrics = []
        for batch in batches:
            state, m = step(state, frozen, consts, batch if mesh is None else mesh.put_batch(batch), lr)
            metrics.append(to_host(m))
        return state, metrics, time.perf_counter() - t0

    cfg = FinetuneConfig(steps=2, batch_size=8, warmup_steps=0, lr=1e-3, compute_dtype="float32").resolved()
    ref_state, ref_metrics, found["single_seconds"] = run(cfg)
    ref = to_host(ref_state.params)
    for mode, fsdp in (("dp", False), ("fsdp", True)):
        state, metrics, seconds = run(replace(cfg, devices="all", fsdp=fsdp))
        params = to_host(state.params)
        leaves = jax.tree.leaves(state.params)
        found[mode] = dict(
            # parameters after two AdamW steps, relative to each parameter's scale
            param_rel_err=max(float(np.abs(params[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref),
            params_moved=max(float(np.abs(params[k] - start[k]).max()) for k in ref),
            metric_rel_err=max(
                abs(float(m[k]) - float(r[k])) / abs(float(r[k]))
                for m, r in zip(metrics, ref_metrics)
                for k in ("loss", "loss_c0", "loss_depth", "grad_norm")
            ),
            leaves=len(leaves),
            params_split=sum(a.sharding.spec != jax.sharding.PartitionSpec() for a in leaves),
            opt_split=sum(a.sharding.spec != jax.sharding.PartitionSpec() for a in jax.tree.leaves(state.opt_state)),
            devices=min(len(a.sharding.device_set) for a in leaves),
            seconds=seconds,
        )
        if fsdp:
            fsdp_state, fsdp_cfg = state, replace(cfg, devices="all", fsdp=True)

    # The FSDP state through an Orbax checkpoint, restored into a freshly placed FSDP template.
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpoints(Path(tmp) / "checkpoints", keep=2)
        ckpt.save(2, fsdp_state, {"step": 2, "position": 16})
        ckpt.close()
        _, template, frozen, consts = init_training(base, fsdp_cfg, copy=True)
        template, _, _ = place_training(fsdp_cfg.mesh(), True, template, frozen, consts)
        ckpt = Checkpoints(Path(tmp) / "checkpoints", keep=2)
        restored, meta = ckpt.restore_latest(template)
        ckpt.close()
        pairs = list(zip(jax.tree.leaves(restored), jax.tree.leaves(fsdp_state), jax.tree.leaves(template)))
        found["checkpoint"] = dict(
            values_equal=all(np.array_equal(to_host(a), to_host(b)) for a, b, _ in pairs),
            shardings_as_template=all(a.sharding == t.sharding for a, _, t in pairs),
            meta=meta,
        )

    errors = []
    for bad in (dict(devices=3), dict(devices=16), dict(devices="two")):
        try:
            replace(cfg, **bad).resolved()
        except JaxttsError as e:
            errors.append(str(e))
    found["errors"] = errors
    return found


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
