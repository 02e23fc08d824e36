"""Several devices: a 1-D `jax.sharding.Mesh` over the batch axis, and where arrays live on it.

Everything jaxtts spreads over devices goes through `BatchMesh` (XLA SPMD through `jax.sharding`,
nothing home-made):

* serving (`Engine(devices=...)`, `jaxtts serve --devices`): weights replicated, the slot pool's
  rows (KV cache, decode state, Mimi streams, sampling settings) split over the devices; the decode
  chunk and the Mimi step run under `jax.shard_map`, so that each device runs exactly the
  single-device program (Pallas kernels included) on its own rows;
* fine-tuning (`finetune(devices=..., fsdp=...)`): the global batch split over the devices,
  parameters and optimizer state replicated or FSDP-sharded, gradients reduced by XLA (jit with
  sharded inputs and sharding constraints on the new state); several hosts through
  `jax.distributed.initialize()` (`initialize_distributed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtts.errors import JaxttsError

AXIS = "batch"  # the mesh's one axis: rows of a batch


@dataclass(frozen=True)
class BatchMesh:
    """A 1-D mesh over `devices`, axis "batch". Hashable (a jit static argument)."""

    mesh: Mesh

    @classmethod
    def of(cls, devices: Sequence[jax.Device]) -> BatchMesh:
        return cls(Mesh(np.asarray(list(devices), dtype=object), (AXIS,)))

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat)

    @property
    def size(self) -> int:
        return self.mesh.devices.size

    def round_up(self, n: int) -> int:
        """The smallest multiple of the device count ≥ n: a batch axis split over the devices
        must divide evenly (each device holds n / size rows)."""
        return -(-int(n) // self.size) * self.size

    # --- shardings -----------------------------------------------------------------------------
    def spec(self, axis: int | None = 0) -> P:
        """Rows along `axis` split over the devices (None: replicated)."""
        return P() if axis is None else P(*([None] * axis), AXIS)

    def sharding(self, axis: int | None = 0) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axis))

    @property
    def rows(self) -> NamedSharding:
        return self.sharding(0)

    @property
    def replicated(self) -> NamedSharding:
        return self.sharding(None)

    # --- placing arrays ------------------------------------------------------------------------
    def put_rows(self, tree, axis: int = 0):
        """Every array of `tree` with its `axis` split over the devices."""
        return jax.device_put(tree, self.sharding(axis))

    def replicate(self, tree):
        """Every array of `tree` copied onto every device."""
        return jax.device_put(tree, self.replicated)

    def constrain(self, tree, axis: int | None = 0):
        """Inside jit: `tree`'s arrays laid out rows-split along `axis` (None: replicated)."""
        return jax.lax.with_sharding_constraint(tree, self.sharding(axis))

    def per_row(self, fn: Callable, in_axes: tuple, out_axes) -> Callable:
        """`fn` run by each device on its own rows (`jax.shard_map`): `in_axes` per argument and
        `out_axes` per output (a prefix of the outputs' structure) give the batch axis of each,
        None for arguments that every device gets whole (weights). Each device then runs `fn`'s
        single-device program on size / devices rows: the results are those of `fn` on the whole
        batch whenever `fn` treats rows independently."""
        spec = lambda axes: jax.tree.map(self.spec, axes, is_leaf=lambda a: a is None)
        return jax.shard_map(fn, mesh=self.mesh, in_specs=spec(in_axes), out_specs=spec(out_axes), check_vma=False)

    # --- fine-tuning ---------------------------------------------------------------------------
    def param_spec(self, shape: tuple[int, ...], fsdp: bool, min_size: int = 1024) -> P:
        """Replicated, or with `fsdp` split along the largest axis the device count divides
        (arrays smaller than `min_size` elements, and those no axis of which divides, replicated)."""
        if not fsdp or self.size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
            return P()
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % self.size == 0:
                return self.spec(axis)
        return P()

    def param_shardings(self, tree, fsdp: bool):
        """A NamedSharding per array of `tree` (arrays or ShapeDtypeStructs): `param_spec`."""
        return jax.tree.map(lambda a: NamedSharding(self.mesh, self.param_spec(a.shape, fsdp)), tree)

    def put_global(self, tree, shardings):
        """Host arrays (numpy; the same values on every process) as global arrays laid out by
        `shardings` (one NamedSharding, or a tree of them matching `tree`): each process fills only
        the shards of its own devices, so this works across hosts."""

        def put(a, sharding):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

        if isinstance(shardings, NamedSharding):
            return jax.tree.map(lambda a: put(a, shardings), tree)
        return jax.tree.map(put, tree, shardings)

    def put_batch(self, batch: dict) -> dict:
        """A host batch (the same global batch on every process) split over the devices by rows."""
        return self.put_global(batch, self.rows)


def resolve_devices(devices, *, what: str = "devices", local: bool = True) -> list[jax.Device]:
    """The devices a `devices=` / `--devices` value names: "all", a count N (the first N), or a
    list of `jax.Device`s. `local`: this process's devices only (serving); else every process's
    (fine-tuning across hosts). Bad values raise one-line `JaxttsError`s."""
    available = jax.local_devices() if local else jax.devices()
    where = f"{len(available)} {available[0].platform} device{'s' if len(available) != 1 else ''}"
    if isinstance(devices, str):
        text = devices.strip().lower()
        if text == "all":
            return list(available)
        if not text.isdigit():
            raise JaxttsError(f"{what} must be 'all' or a number of devices, got {devices!r}")
        devices = int(text)
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        n = int(devices)
        if not 1 <= n <= len(available):
            raise JaxttsError(
                f"{what} {n}: {'this host has' if local else 'JAX sees'} {where}; give 'all' or a number "
                f"from 1 to {len(available)}"
            )
        return list(available[:n])
    if isinstance(devices, (list, tuple)) and devices and all(isinstance(d, jax.Device) for d in devices):
        if len(set(devices)) != len(devices):
            raise JaxttsError(f"{what}: a device is listed twice")
        missing = [d for d in devices if d not in available]
        if missing:
            raise JaxttsError(
                f"{what}: {missing[0]} is not one of the {where} {'of this process' if local else 'here'}"
            )
        return list(devices)
    raise JaxttsError(f"{what} must be 'all', a number of devices or a list of jax devices, got {devices!r}")


def batch_mesh(devices, *, what: str = "devices", local: bool = True) -> BatchMesh | None:
    """`BatchMesh` over the devices `devices` names, or None for the plain single-device path
    (None, or just the default device)."""
    if devices is None:
        return None
    chosen = resolve_devices(devices, what=what, local=local)
    if len(chosen) == 1 and chosen[0] == jax.devices()[0]:
        return None
    return BatchMesh.of(chosen)


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """`jax.distributed.initialize()` for a run over several hosts (one process per host), before
    anything touches a device. Without arguments JAX detects the cluster (SLURM, Open MPI,
    Kubernetes, TPU pods); else give all three (the coordinator is process 0's `host:port`).
    Once per process: a second call is a no-op."""
    if jax.distributed.is_initialized():
        return
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise JaxttsError("multi-host: give the coordinator address, the number of processes and the process id")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        hint = ""
        if "before any JAX calls" in str(e):
            hint = (
                " (call jaxtts.sharding.initialize_distributed() first thing in the process, before building or "
                "loading a model; then finetune(distributed=True) goes on)"
            )
        raise JaxttsError(f"jax.distributed.initialize() failed: {' '.join(str(e).split())[:300]}{hint}") from None


def to_host(tree):
    """Arrays as numpy on this process: this process's own arrays as they are, global arrays
    spanning other hosts' devices gathered whole."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return jax.device_get(a)

    return jax.tree.map(get, tree)


__all__ = ["AXIS", "BatchMesh", "batch_mesh", "initialize_distributed", "resolve_devices", "to_host"]
