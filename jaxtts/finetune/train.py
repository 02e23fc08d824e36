"""The fine-tuning loop: jitted train step, AdamW + warm-up/cosine, checkpoints, resume, export.

Run directory (`out`):

    out/run.json          the settings; a restart checks it before resuming
    out/checkpoints/N/    Orbax CheckpointManager steps: trainable params (float32), optimizer
                          state, PRNG key, and JSON metadata (step, data position, losses)
    out/metrics.jsonl     one line per optimizer step (and eval results)
    out/model/            the exported model: what `CSM.load` and `jaxtts speak --model` read

Restarting the same command resumes from the newest complete checkpoint. Orbax writes each step
into a temporary directory and renames it when complete, so a run killed mid-save leaves only a
temporary directory, which is ignored (and cleaned up); a step that fails to restore is deleted and
the one before it used.

Several devices (`devices="all"` / N; `jaxtts.sharding`): data parallel, the global batch split
over the devices by rows, the parameters and optimizer state replicated (or with `fsdp=True` split
along one axis each), gradients reduced by XLA. Across hosts (`finetune(distributed=True)`, one
process per host, `jax.distributed.initialize()`), every process reads the same data and feeds its
own devices' rows; checkpoints are written by all processes into one (shared) directory, files
such as run.json, metrics.jsonl and model/ by process 0.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtts.buckets import train_rows
from jaxtts.csm import CSM, resolve_dtype
from jaxtts.errors import JaxttsError
from jaxtts.finetune import lora as lora_lib
from jaxtts.finetune.data import Example, Stream, collate, dataset_fingerprint, load_examples, split_eval
from jaxtts.finetune.loss import LossConfig, combine, csm_loss, loss_terms
from jaxtts.sharding import BatchMesh, batch_mesh, initialize_distributed, to_host

RUN_FORMAT = "jaxtts-finetune"
# Settings a resumed run must share with the run that wrote the checkpoints (they decide the shapes
# of the saved state or which examples come next); the rest (steps, lr, saving) may change.
FIXED_SETTINGS = ("batch_size", "grad_accum", "lora_rank", "lora_alpha", "seed", "eval_fraction")


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 4
    grad_accum: int = 1  # micro-batches per optimizer step (optax.MultiSteps)
    lr: float | None = None  # peak learning rate; default 2e-5 (full) or 2e-4 (LoRA)
    warmup_steps: int | None = None  # default: 5 % of steps, at most 100
    min_lr_ratio: float = 0.1  # cosine decays to lr × this
    weight_decay: float = 0.01  # AdamW, on matrices and embeddings only
    clip_norm: float = 1.0  # global gradient-norm clipping
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None  # default 2 × rank
    depth_fraction: float = 1 / 16  # share of frames the depth decoder trains on
    depth_weight: float = 1.0
    compute_dtype: str | None = None  # default bfloat16 on GPUs/TPUs, float32 on CPUs
    remat: bool = False  # recompute activations in the backward pass (long sequences)
    eval_fraction: float = 0.05
    eval_every: int | None = None  # default: save_every
    save_every: int = 100
    keep: int = 3  # checkpoints kept
    seed: int = 0
    export_dtype: str = "float32"
    devices: int | str | None = None  # None: the default device; "all" / N: data parallel over jax.devices()
    fsdp: bool = False  # with devices: parameters and optimizer state split over them too

    def resolved(self) -> FinetuneConfig:
        """Defaults filled in and everything checked."""
        c = self
        if c.compute_dtype is None:
            c = replace(c, compute_dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")
        if c.lr is None:
            c = replace(c, lr=2e-4 if c.lora_rank else 2e-5)
        if c.warmup_steps is None:
            c = replace(c, warmup_steps=min(100, c.steps // 20))
        if c.lora_rank and c.lora_alpha is None:
            c = replace(c, lora_alpha=2.0 * c.lora_rank)
        if c.eval_every is None:
            c = replace(c, eval_every=c.save_every)
        for name in ("steps", "batch_size", "grad_accum", "save_every", "keep", "eval_every"):
            if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
                raise JaxttsError(f"{name} must be a positive integer, got {getattr(c, name)!r}")
        if c.lora_rank < 0:
            raise JaxttsError(f"lora rank must be ≥ 0, got {c.lora_rank}")
        if not 0 < c.depth_fraction <= 1:
            raise JaxttsError(f"depth fraction must be in (0, 1], got {c.depth_fraction}")
        if not c.lr > 0:
            raise JaxttsError(f"learning rate must be positive, got {c.lr}")
        if not 0 <= c.warmup_steps < max(c.steps, 1) + 1:
            raise JaxttsError(f"warm-up steps must be in [0, steps], got {c.warmup_steps}")
        for name in ("compute_dtype", "export_dtype"):
            resolve_dtype(getattr(c, name))
        if c.compute_dtype == "bfloat16" and jax.default_backend() == "cpu":
            raise JaxttsError(
                "bfloat16 compute needs a GPU or TPU (XLA's CPU backend lacks bfloat16 matmuls with "
                "float32 accumulation); use float32 on CPU, the default there"
            )
        if not isinstance(c.fsdp, bool):
            raise JaxttsError(f"fsdp must be True or False, got {c.fsdp!r}")
        c.mesh()
        return c

    def mesh(self) -> BatchMesh | None:
        """The devices the run is spread over (None: the default device alone)."""
        mesh = batch_mesh(self.devices, what="devices", local=False)
        if mesh is not None and self.batch_size % mesh.size:
            raise JaxttsError(
                f"batch size {self.batch_size} does not split evenly over {mesh.size} devices: give a multiple "
                f"of {mesh.size} (each device takes batch size / devices rows)"
            )
        return mesh

    @property
    def lora(self) -> lora_lib.LoraConfig | None:
        return lora_lib.LoraConfig(self.lora_rank, float(self.lora_alpha)) if self.lora_rank else None


@dataclass
class FinetuneResult:
    model: CSM  # the fine-tuned model (LoRA merged), in export_dtype
    step: int
    history: list[dict]  # one record per optimizer step run in this call
    eval_loss: float | None
    export_dir: Path | None
    adapters: dict | None = None  # LoRA A/B matrices by name (numpy), for LoRA runs


# --- the model as a flat dict of parameters ---------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How a flat {name: array} parameter dict maps onto the CSM module (hashable: a jit static)."""

    graphdef: Any
    treedef: Any
    names: tuple[str, ...]

    @classmethod
    def split(cls, model: CSM) -> tuple[Layout, dict, Any]:
        """(layout, flat params, constants such as RoPE tables)."""
        graphdef, params, consts = nnx.split(model, nnx.Param, ...)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = tuple(".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)) for path, _ in leaves)
        return cls(graphdef, treedef, names), dict(zip(names, (leaf for _, leaf in leaves))), consts

    def module(self, flat: dict, consts) -> CSM:
        params = jax.tree.unflatten(self.treedef, [flat[n] for n in self.names])
        return nnx.merge(self.graphdef, params, consts)


def nested(flat: dict) -> dict:
    """{"a.0.b": x} → {"a": {0: {"b": x}}}: the layout `CSM.from_params` takes."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, last = [int(p) if p.isdigit() else p for p in name.split(".")]
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


# --- the jitted steps ---------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    params: dict  # trainable parameters, float32: the whole model, or the LoRA adapters
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (Orbax stores plain arrays)
    step: jax.Array  # micro-steps taken


@dataclass(frozen=True)
class StepSpec:
    """Everything that shapes the compiled step (hashable, so equal runs share compilations).

    The learning rate is an argument of the step, computed on the host from the schedule, so that
    runs differing only in steps, lr or warm-up (or a resumed run with more steps) share one program.
    """

    compute_dtype: str
    lora: lora_lib.LoraConfig | None
    loss: LossConfig
    remat: bool
    weight_decay: float
    clip_norm: float
    grad_accum: int

    @classmethod
    def of(cls, c: FinetuneConfig) -> StepSpec:
        return cls(
            c.compute_dtype,
            c.lora,
            LossConfig(c.depth_fraction, c.depth_weight),
            c.remat,
            c.weight_decay,
            c.clip_norm,
            c.grad_accum,
        )

    def optimizer(self) -> optax.GradientTransformation:
        """Clipping + AdamW at unit learning rate (the step scales the update by the scheduled lr)."""
        decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # not the norms' scales
        tx = optax.chain(
            optax.clip_by_global_norm(self.clip_norm), optax.adamw(1.0, weight_decay=self.weight_decay, mask=decay)
        )
        return optax.MultiSteps(tx, every_k_schedule=self.grad_accum) if self.grad_accum > 1 else tx


def lr_schedule(c: FinetuneConfig) -> optax.Schedule:
    """Linear warm-up from 0, then cosine decay to lr × min_lr_ratio at the last step."""
    return optax.warmup_cosine_decay_schedule(
        0.0, c.lr, c.warmup_steps, max(c.steps, c.warmup_steps + 1), end_value=c.lr * c.min_lr_ratio
    )


def compute_model(spec: StepSpec, layout: Layout, trainable: dict, frozen: dict, consts, gather=None) -> CSM:
    """The CSM a step runs: LoRA merged, weights cast to the compute dtype (float32 masters stay
    in the train state, so their gradients and optimizer state are float32). `gather`: applied to
    the compute-dtype weights (FSDP: made whole on every device before use)."""
    params = trainable if spec.lora is None else lora_lib.merge(frozen, trainable, spec.lora)
    compute = resolve_dtype(spec.compute_dtype)
    params = {n: p.astype(compute) for n, p in params.items()}
    return layout.module(params if gather is None else gather(params), consts)


@functools.lru_cache(maxsize=16)
def train_step_fn(spec: StepSpec, layout: Layout, mesh: BatchMesh | None = None, fsdp: bool = False) -> Callable:
    """jit(state, frozen, consts, batch, lr) → (state, metrics); `state` is donated.

    With a `mesh` (the arguments placed by `place_training` and `BatchMesh.put_batch`), XLA runs
    the step data parallel: each device's rows forward and backward, the gradients (and the loss
    sums) reduced across devices; the new state keeps the layout of the old (replicated, or
    `fsdp`-split)."""

    # FSDP: the weights are split at rest (masters, optimizer state) and gathered whole, in the
    # compute dtype, for the forward and backward passes (whose weight gradients XLA then
    # reduce-scatters back to the split layout). Left to itself, the partitioner would split the
    # activations along the weights' split axes (heads) and move them around instead.
    gather = (lambda params: mesh.constrain(params, None)) if mesh is not None and fsdp else None

    def forward(trainable, frozen, consts, batch, key):
        return csm_loss(compute_model(spec, layout, trainable, frozen, consts, gather), batch, key, spec.loss)

    if spec.remat:  # keep only the weight matmuls' outputs; recompute attention and elementwise work
        forward = jax.checkpoint(forward, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    optimizer = spec.optimizer()

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, frozen, consts, batch, lr):
        key, sub = jax.random.split(jax.random.wrap_key_data(state.rng))
        (_, metrics), grads = jax.value_and_grad(forward, has_aux=True)(state.params, frozen, consts, batch, sub)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, jax.tree.map(lambda u: lr * u, updates))
        metrics["grad_norm"] = optax.tree.norm(grads)
        new = TrainState(params, opt_state, jax.random.key_data(key), state.step + 1)
        if mesh is not None:
            new = jax.lax.with_sharding_constraint(new, mesh.param_shardings(new, fsdp))
        return new, metrics

    return step


@functools.lru_cache(maxsize=16)
def eval_step_fn(spec: StepSpec, layout: Layout, mesh: BatchMesh | None = None, fsdp: bool = False) -> Callable:
    """jit(params, frozen, consts, batch) → summed loss terms, depth decoder on every frame."""
    loss_cfg = replace(spec.loss, depth_fraction=1.0)
    gather = (lambda params: mesh.constrain(params, None)) if mesh is not None and fsdp else None  # see train_step_fn

    @jax.jit
    def step(trainable, frozen, consts, batch):
        model = compute_model(spec, layout, trainable, frozen, consts, gather)
        return loss_terms(model, batch, jax.random.key(0), loss_cfg)

    return step


def evaluate(
    spec: StepSpec,
    layout: Layout,
    state: TrainState,
    frozen,
    consts,
    examples: list[Example],
    batch_size: int,
    limit: int,
    mesh: BatchMesh | None = None,
    fsdp: bool = False,
) -> float:
    """Mean loss over held-out examples (batches padded with unscored copies to keep one shape)."""
    fn = eval_step_fn(spec, layout, mesh, fsdp)
    totals = None
    for i in range(0, len(examples), batch_size):
        group = examples[i : i + batch_size]
        blank = Example(group[0].name, group[0].tokens, group[0].mask, np.zeros_like(group[0].target))
        group = group + [blank] * (batch_size - len(group))
        batch = collate(group, train_rows(max(len(e) for e in group), limit))
        if mesh is not None:
            batch = mesh.put_batch(batch)
        terms = to_host(fn(state.params, frozen, consts, batch))
        totals = terms if totals is None else {k: totals[k] + terms[k] for k in terms}
    return float(combine(totals, spec.loss)["loss"])


# --- checkpoints ----------------------------------------------------------------------------------------------
class Checkpoints:
    """Orbax CheckpointManager over TrainState + JSON metadata; restores the newest good step."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            directory.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True)
        )

    def save(self, step: int, state: TrainState, meta: dict) -> None:
        # Returns once the arrays are copied off the device; the files are written in the background.
        self.manager.save(
            step,
            args=self.ocp.args.Composite(state=self.ocp.args.StandardSave(state), meta=self.ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore_latest(self, template: TrainState) -> tuple[TrainState, dict] | None:
        abstract = jax.tree.map(self.ocp.utils.to_shape_dtype_struct, template)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                got = self.manager.restore(
                    step,
                    args=self.ocp.args.Composite(
                        state=self.ocp.args.StandardRestore(abstract), meta=self.ocp.args.JsonRestore()
                    ),
                )
                return got["state"], got["meta"]
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                print(
                    f"warning: checkpoint step {step} cannot be restored ({str(e).splitlines()[0][:200]}); "
                    f"deleting it and trying the one before",
                    file=sys.stderr,
                )
                self.manager.delete(step)
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# --- the run ----------------------------------------------------------------------------------------------------
def init_training(model: CSM, cfg: FinetuneConfig, *, copy: bool = False):
    """(layout, initial TrainState, frozen params, constants) for a resolved config.

    Full fine-tuning trains float32 copies of every parameter. LoRA trains float32 adapters and
    keeps the base frozen in the compute dtype (no master copy needed for weights that never change).
    """
    if model.quantization:
        raise JaxttsError(
            f"fine-tuning needs bfloat16 / float32 weights, not {model.quantization}: fine-tune the original "
            "checkpoint, then quantize the result"
        )
    layout, flat, consts = Layout.split(model)
    key = jax.random.key(cfg.seed)
    if cfg.lora:
        frozen = {n: p.astype(resolve_dtype(cfg.compute_dtype)) for n, p in flat.items()}
        trainable = lora_lib.init_adapters(flat, model.cfg, cfg.lora, jax.random.fold_in(key, 1))
    else:
        frozen = {}
        trainable = {n: jnp.array(p, jnp.float32, copy=copy) for n, p in flat.items()}
    opt_state = StepSpec.of(cfg).optimizer().init(trainable)
    state = TrainState(trainable, opt_state, jax.random.key_data(jax.random.fold_in(key, 2)), jnp.zeros((), jnp.int32))
    return layout, state, frozen, consts


def place_training(mesh: BatchMesh, fsdp: bool, state: TrainState, frozen: dict, consts):
    """`init_training`'s state, frozen weights and constants as global arrays on the mesh: each
    array replicated, or with `fsdp` split along its largest axis the device count divides
    (`BatchMesh.param_spec`; the optimizer state's moments as their parameters); the constants
    replicated. From host copies (the same on every process), so this works across hosts."""
    state, frozen, consts = to_host((state, frozen, consts))
    state = mesh.put_global(state, mesh.param_shardings(state, fsdp))
    frozen = mesh.put_global(frozen, mesh.param_shardings(frozen, fsdp))
    return state, frozen, mesh.put_global(consts, mesh.replicated)


def _load_model(model) -> tuple[CSM, str]:
    if isinstance(model, CSM):
        return model, "given in Python"
    from jaxtts.hub import resolve

    path = resolve("csm", model)
    return CSM.load(path, dtype="float32"), str(path)


def _load_codec(codec):
    from jaxtts.mimi import Mimi

    if codec is None or isinstance(codec, (str, os.PathLike)):
        from jaxtts.hub import resolve

        return Mimi.load(resolve("mimi", codec))
    return codec


def _check_run(out: Path, run: dict) -> None:
    """Refuse to resume a run with different data, model or state-shaping settings."""
    path = out / "run.json"
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise JaxttsError(f"{out} exists and is not a fine-tuning run directory; choose another --out")
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise JaxttsError(f"{path}: not valid JSON; remove it to start afresh in {out}") from None
    if old.get("format") != RUN_FORMAT:
        raise JaxttsError(f"{path}: not written by jaxtts finetune")
    diffs = [k for k in ("model_config", "data_fingerprint") if old.get(k) != run[k]]
    diffs += [k for k in FIXED_SETTINGS if old["settings"].get(k) != run["settings"][k]]
    if diffs:
        raise JaxttsError(
            f"{out} holds a run with different {', '.join(diffs)}; resume with the same "
            f"data/model/settings or choose another --out"
        )


def _trim_log(path: Path, step: int) -> None:
    """Drop records of steps after `step` (run, then lost with the process, before a resume)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def finetune(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model=None,
    codec=None,
    config: FinetuneConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    export: bool = True,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
    distributed: bool | dict = False,
    **settings,
) -> FinetuneResult:
    """Fine-tune CSM on a manifest or folder of utterances (see jaxtts/finetune/data.py).

    `model`: a CSM, a converted directory / checkpoint path, or None for the cached CSM-1B.
    `codec`: a Mimi, a path, or None for the cached Mimi. `settings` override fields of
    FinetuneConfig (`devices="all"` / N: data parallel; `fsdp=True`: parameters and optimizer
    state split too). Resumes from `out/checkpoints` if a previous run left any. `callback(step,
    record)` is called after every optimizer step (and after its checkpoint is saved).
    `distributed`: one process of a run over several hosts: True calls `jax.distributed.initialize()`
    (cluster detected), a dict gives its coordinator_address / num_processes / process_id; before
    anything else touches JAX. `devices` then defaults to "all" (every device of every host).
    """
    if distributed:
        initialize_distributed(**(distributed if isinstance(distributed, dict) else {}))
        if "devices" not in settings and (config is None or config.devices is None):
            settings["devices"] = "all"
    cfg = replace(config or FinetuneConfig(), **settings).resolved()
    mesh = cfg.mesh()
    writer = jax.process_index() == 0  # files other than checkpoints: process 0 only
    progress = progress and writer
    out = Path(out)
    base, source = _load_model(model)
    limit = base.cfg.backbone.max_seq_len
    examples = load_examples(data, _load_codec(codec), max_positions=limit, cache_dir=cache_dir, progress=progress)
    train, held = split_eval(examples, cfg.eval_fraction, cfg.seed)
    run = {
        "format": RUN_FORMAT,
        "model": source,
        "model_config": base.cfg.to_dict(),
        "data": str(data),
        "data_fingerprint": dataset_fingerprint(examples),
        "train_examples": len(train),
        "eval_examples": len(held),
        "settings": asdict(cfg),
    }
    _check_run(out, run)
    out.mkdir(parents=True, exist_ok=True)
    if writer:
        _write_json(out / "run.json", run)

    model_cfg = base.cfg
    # The step donates its state: copy the weights of a model the caller still holds.
    layout, state, frozen, consts = init_training(base, cfg, copy=isinstance(model, CSM))
    if mesh is not None:
        state, frozen, consts = place_training(mesh, cfg.fsdp, state, frozen, consts)
    spec = StepSpec.of(cfg)
    del base

    ckpt = Checkpoints(out / "checkpoints", cfg.keep)
    start, position = 0, 0
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, meta = restored
        start, position = int(meta["step"]), int(meta["position"])
        if progress:
            print(f"resuming {out} from step {start}", file=sys.stderr)
    if writer:
        _trim_log(out / "metrics.jsonl", start)
    if start > cfg.steps:
        raise JaxttsError(f"{out} is already at step {start}, past --steps {cfg.steps}")

    history, eval_loss = [], None
    try:
        state, history, eval_loss = _train(
            cfg, spec, layout, state, frozen, consts, train, held, limit, start, position, ckpt, out, progress, callback
        )
    finally:
        ckpt.close()

    params = to_host(state.params)
    adapters = None
    if cfg.lora:
        adapters = {n: np.asarray(a) for n, a in params.items()}
        frozen = {n: np.asarray(p, np.float32) for n, p in to_host(frozen).items()}
        params = jax.device_get(lora_lib.merge(frozen, params, cfg.lora))
    result_model = CSM.from_params(model_cfg, nested(params), cfg.export_dtype)
    export_dir = None
    if export:
        export_dir = out / "model"
        if writer:
            result_model.save(export_dir, overwrite=True)
    return FinetuneResult(result_model, cfg.steps, history, eval_loss, export_dir, adapters)


def _train(
    cfg: FinetuneConfig,
    spec: StepSpec,
    layout: Layout,
    state: TrainState,
    frozen,
    consts,
    train,
    held,
    limit: int,
    start: int,
    position: int,
    ckpt: Checkpoints,
    out: Path,
    progress: bool,
    callback,
):
    from tqdm.auto import tqdm

    mesh = cfg.mesh()
    step_fn = train_step_fn(spec, layout, mesh, cfg.fsdp)
    schedule = lr_schedule(cfg)
    stream = Stream(train, cfg.batch_size, cfg.seed, limit)
    history, eval_loss = [], None
    bar = tqdm(
        total=cfg.steps, initial=start, desc="fine-tuning", unit="step", disable=not progress, dynamic_ncols=True
    )
    log_path = out / "metrics.jsonl" if jax.process_index() == 0 else os.devnull  # process 0 writes the log
    with bar, open(log_path, "a") as log:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            micro = []
            lr = np.float32(schedule(step - 1))
            for _ in range(cfg.grad_accum):
                batch, position = stream.batch(position)
                if mesh is not None:
                    batch = mesh.put_batch(batch)
                state, metrics = step_fn(state, frozen, consts, batch, lr)
                micro.append(metrics)
            micro = to_host(micro)  # waits for the step: timings below are real
            seconds = time.perf_counter() - t0
            frames = int(sum(m["frames"] for m in micro))
            record = {
                "step": step,
                **{k: float(np.mean([m[k] for m in micro])) for k in ("loss", "loss_c0", "loss_depth", "grad_norm")},
                "lr": float(lr),
                "frames": frames,
                "frames_per_s": frames / seconds,
                "seconds": seconds,
            }
            if held and (step % cfg.eval_every == 0 or step == cfg.steps):
                eval_loss = evaluate(spec, layout, state, frozen, consts, held, cfg.batch_size, limit, mesh, cfg.fsdp)
                record["eval_loss"] = eval_loss
            if not math.isfinite(record["loss"]):
                raise JaxttsError(
                    f"the loss became {record['loss']} at step {step}; lower --lr "
                    f"(checkpoints up to the last save are kept)"
                )
            if step % cfg.save_every == 0 or step == cfg.steps:
                ckpt.save(
                    step,
                    state,
                    {
                        "step": step,
                        "position": position,
                        "epoch": position // len(train),
                        "loss": record["loss"],
                        "eval_loss": eval_loss,
                    },
                )
            log.write(json.dumps(record) + "\n")
            log.flush()
            history.append(record)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                fps=f"{record['frames_per_s']:.0f}",
                **({"eval": f"{eval_loss:.3f}"} if eval_loss is not None else {}),
            )
            bar.update(1)
            if callback is not None:
                callback(step, record)
    return state, history, eval_loss
