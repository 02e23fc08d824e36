"""`jaxtts finetune`: the command-line face of jaxtts.finetune.finetune."""

from __future__ import annotations

import sys


def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune CSM on your own recordings (resumable; LoRA optional)")
    p.add_argument(
        "--data",
        required=True,
        help="JSONL manifest (audio, text, speaker, context) or a folder of audio + same-stem .txt files",
    )
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics, and the exported model/")
    p.add_argument("--model", help="CSM to start from: converted directory or checkpoint (default: the cache)")
    p.add_argument("--codec", help="Mimi to encode the audio: converted directory or checkpoint (default: the cache)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights for whichever of --model / --codec is not given: for trying the pipeline",
    )
    p.add_argument("--preset", default="csm-1b", help="model size of a random CSM (csm-1b, tiny)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-5, or 2e-4 with LoRA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of --steps, at most 100)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient global-norm clip")
    p.add_argument("--lora-rank", type=int, default=0, help="train rank-r LoRA adapters instead of all weights")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 × rank)")
    p.add_argument(
        "--depth-fraction",
        type=float,
        default=1 / 16,
        help="share of frames the depth decoder trains on (default 1/16, as in the CSM paper)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float32"],
        help="compute dtype (default bfloat16 on GPU, float32 on CPU); master weights stay float32",
    )
    p.add_argument("--remat", action="store_true", help="recompute activations in the backward pass (less memory)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="share of utterances held out for eval loss")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evals (default --save-every)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--cache-dir", default=None, help="where encoded audio is cached (default DATA_DIR/.jaxtts-codes)")
    p.add_argument(
        "--devices",
        default=None,
        help="'all' or N: data parallel over the devices (the batch split over them; default: one device, "
        "or all with --distributed); --batch-size must be a multiple of the count",
    )
    p.add_argument("--fsdp", action="store_true", help="with --devices: split parameters and optimizer state too")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one process of a multi-host run: jax.distributed.initialize() (cluster detected, or the three "
        "options below); run the same command on every host, --out on a shared file system",
    )
    p.add_argument("--coordinator", default=None, help="with --distributed: process 0's HOST:PORT")
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed: processes in the run")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_finetune(args) -> int:
    from jaxtts.errors import JaxttsError

    distributed = False
    hosts = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in hosts) and not args.distributed:
        raise JaxttsError("--coordinator / --num-processes / --process-id go with --distributed")
    if args.distributed:  # first: jax.distributed.initialize() must come before any device is used
        from jaxtts.sharding import initialize_distributed

        initialize_distributed(*hosts)
        distributed = True
    if args.devices is not None:  # checked before the data and weights load
        from jaxtts.sharding import resolve_devices

        resolve_devices(args.devices, what="--devices", local=False)
    from jaxtts.finetune.train import finetune
    from jaxtts.tts import enable_compilation_cache

    enable_compilation_cache()
    model, codec = args.model, args.codec
    if args.random_weights and model is None:
        from jaxtts.config import preset
        from jaxtts.csm import CSM

        print("note: --random-weights: training starts from a random CSM", file=sys.stderr)
        model = CSM.random(preset(args.preset), seed=args.seed)
    if args.random_weights and codec is None:
        from jaxtts.mimi import Mimi

        print("note: --random-weights: audio is encoded with a random Mimi", file=sys.stderr)
        codec = Mimi.random(seed=0)
    result = finetune(
        args.data,
        args.out,
        model=model,
        codec=codec,
        cache_dir=args.cache_dir,
        progress=not args.quiet,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        clip_norm=args.clip,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        depth_fraction=args.depth_fraction,
        compute_dtype=args.dtype,
        remat=args.remat,
        eval_fraction=args.eval_fraction,
        eval_every=args.eval_every,
        seed=args.seed,
        save_every=args.save_every,
        keep=args.keep,
        devices=args.devices if args.devices is not None or not distributed else "all",
        fsdp=args.fsdp,
    )
    last = result.history[-1] if result.history else None
    summary = f"step {result.step}"
    if last is not None:
        summary += f", loss {last['loss']:.4f}"
    if result.eval_loss is not None:
        summary += f", eval loss {result.eval_loss:.4f}"
    print(f"{summary}; model written to {result.export_dir} (use: jaxtts speak --model {result.export_dir})")
    return 0
