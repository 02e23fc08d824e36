"""One process of a multi-host fine-tune on CPU (tests/test_multidevice.py, opt-in):

    python tests/multihost_check.py DATA OUT STEPS PROCESS_ID NUM_PROCESSES PORT

Each process has 2 CPU devices; with NUM_PROCESSES > 1 the processes join through
jax.distributed on 127.0.0.1:PORT (CPU collectives over gloo) and train FSDP over all their
devices; with 1 the run is on one device. The small CSM of the fine-tuning tests, the random Mimi,
a constant learning rate (so that runs of different lengths share their first steps).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(data: str, out: str, steps: int, process_id: int, processes: int, port: int) -> int:
    if processes > 1:  # before anything touches JAX
        from jaxtts.sharding import initialize_distributed

        initialize_distributed(f"127.0.0.1:{port}", processes, process_id)
    import jax

    from jaxtts.csm import CSM
    from jaxtts.finetune import finetune
    from jaxtts.mimi import Mimi

    sys.path.insert(0, os.path.dirname(__file__))
    from multidevice_check import SMALL

    result = finetune(
        data,
        out,
        model=CSM.random(SMALL, seed=1),
        codec=Mimi.random(seed=0),
        steps=steps,
        batch_size=4,
        lr=1e-3,
        warmup_steps=0,
        min_lr_ratio=1.0,
        save_every=1,
        eval_fraction=0.25,
        progress=False,
        devices="all" if processes > 1 else None,
        fsdp=processes > 1,
        distributed=processes > 1,
    )
    print(
        "RESULT "
        + json.dumps(
            {
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "losses": [r["loss"] for r in result.history],
                "eval_loss": result.eval_loss,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    data, out, steps, pid, n, port = sys.argv[1:7]
    sys.exit(main(data, out, int(steps), int(pid), int(n), int(port)))
