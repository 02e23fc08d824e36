"""Step time and peak device memory of fine-tuning, full and LoRA, on random weights.

    python -m benchmarks.finetune_bench --preset csm-1b --batch 8 --seq 512

Each mode runs in its own process so that its peak memory is its own. A batch is `--seq` rows per
sequence: `--text` text rows, then audio frames (the targets, the last one the all-zero end frame),
random codes; the step is the real one (loss, backward, clipping, AdamW). Times are the median of
`--steps` steps after two warm-up steps (compilation), each waited for on the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np


def synthetic_batch(batch: int, seq: int, text: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, seq, 33), np.int32)
    mask = np.zeros((batch, seq, 33), bool)
    tokens[:, :text, 32] = rng.integers(0, 128_000, (batch, text))
    mask[:, :text, 32] = True
    tokens[:, text:-1, :32] = rng.integers(0, 2048, (batch, seq - text - 1, 32))
    mask[:, text:, :32] = True  # audio frames and the end frame
    target = np.zeros((batch, seq), bool)
    target[:, text:] = True
    return {"tokens": tokens, "mask": mask, "target": target}


def measure(mode: str, args) -> dict:
    import jax

    from jaxtts.config import preset
    from jaxtts.csm import CSM
    from jaxtts.finetune.train import FinetuneConfig, StepSpec, init_training, place_training, train_step_fn

    cfg = FinetuneConfig(
        steps=1000,
        batch_size=args.batch,
        lora_rank=args.lora_rank if mode == "lora" else 0,
        depth_fraction=args.depth_fraction,
        compute_dtype=args.dtype,
        remat=args.remat,
        devices=args.devices,
        fsdp=args.fsdp,
    ).resolved()
    mesh = cfg.mesh()
    model = CSM.random(preset(args.preset), dtype="float32")
    layout, state, frozen, consts = init_training(model, cfg)
    del model
    if mesh is not None:  # data parallel: --batch is the global batch
        state, frozen, consts = place_training(mesh, cfg.fsdp, state, frozen, consts)
    spec = StepSpec.of(cfg)
    step = train_step_fn(spec, layout, mesh, cfg.fsdp)
    host_batch = synthetic_batch(args.batch, args.seq, args.text)
    batch = jax.device_put(host_batch) if mesh is None else mesh.put_batch(host_batch)
    lr = np.float32(1e-5)
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    stored = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    t0 = time.perf_counter()
    state, metrics = step(state, frozen, consts, batch, lr)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    state, metrics = step(state, frozen, consts, batch, lr)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = step(state, frozen, consts, batch, lr)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    frames = int(metrics["frames"])
    devices = jax.devices()[:1] if mesh is None else mesh.devices
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", float("nan")) for d in devices]
    ms = statistics.median(times) * 1e3
    return {
        "mode": mode,
        "device": jax.devices()[0].device_kind,
        "devices": len(devices),
        "fsdp": cfg.fsdp,
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "remat": args.remat,
        "depth_fraction": args.depth_fraction,
        "lora_rank": cfg.lora_rank,
        "trainable_params": count(state.params),
        "state_gib": (stored(state) + stored(frozen)) / 2**30,
        "frames_per_step": frames,
        "compile_s": compile_s,
        "step_ms": ms,
        "frames_per_s": frames / (ms / 1e3),
        "peak_gib": max(peaks) / 2**30,  # the fullest device's
        "loss": float(metrics["loss"]),
    }


def table(rows: list[dict]) -> str:
    head = [
        "mode",
        "trainable",
        "batch×seq",
        "frames/step",
        "step ms",
        "frames/s",
        "state GiB",
        "peak GiB",
        "compile s",
    ]
    lines = [head]
    for r in rows:
        mode = r["mode"] + (f" r={r['lora_rank']}" if r["lora_rank"] else "")
        lines.append(
            [
                mode,
                f"{r['trainable_params'] / 1e6:.1f} M",
                f"{r['batch']}×{r['seq']}",
                str(r["frames_per_step"]),
                f"{r['step_ms']:.1f}",
                f"{r['frames_per_s']:.0f}",
                f"{r['state_gib']:.1f}",
                f"{r['peak_gib']:.1f}",
                f"{r['compile_s']:.0f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda line: "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines[1:])])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512, help="rows per sequence (text + audio frames)")
    p.add_argument("--text", type=int, default=32, help="text rows at the start of each sequence")
    p.add_argument("--modes", default="full,lora", help="comma list of full, lora")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--depth-fraction", type=float, default=1 / 16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--devices", default=None, help="'all' or N: data parallel over them (--batch is the global batch)")
    p.add_argument("--fsdp", action="store_true", help="with --devices: weights and optimizer state split too")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one mode, print its JSON
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)), flush=True)
        return 0
    rows = []
    for mode in args.modes.split(","):
        given = argv if argv is not None else sys.argv[1:]
        cmd = [sys.executable, "-m", "benchmarks.finetune_bench", "--one", mode, *given]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            print(f"{mode}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(found[-1][len("RESULT ") :]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if rows:
        r = rows[0]
        print(
            f"\n{r['device']}, {r['preset']}, compute {r['dtype']}, depth fraction {r['depth_fraction']:.4g}, "
            f"remat {'on' if r['remat'] else 'off'}, {args.text} text rows per sequence"
        )
        print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if len(rows) == len(args.modes.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
