"""Fine-tuning CSM: data → Mimi codes → rows, the CSM loss, LoRA, and a resumable training loop.

    from jaxtts.finetune import finetune
    result = finetune("voice/train.jsonl", "runs/voice", model="csm-1b-converted/", steps=500)
    # result.export_dir is a model directory for `jaxtts speak --model` / `jaxtts.load`

See docs/FINETUNE.md. The training parts are imported on first use, so `jaxtts --help` stays fast.
"""

_EXPORTS = {
    "finetune": "jaxtts.finetune.train",
    "FinetuneConfig": "jaxtts.finetune.train",
    "FinetuneResult": "jaxtts.finetune.train",
    "LossConfig": "jaxtts.finetune.loss",
    "csm_loss": "jaxtts.finetune.loss",
    "LoraConfig": "jaxtts.finetune.lora",
    "load_examples": "jaxtts.finetune.data",
    "add_finetune_parser": "jaxtts.finetune.cli",
    "run_finetune": "jaxtts.finetune.cli",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS)
