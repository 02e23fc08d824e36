"""The converted-checkpoint directory: `config.json` + an Orbax checkpoint of the parameters.

Layout of a directory written by `jaxtts-convert` (or the fine-tuning export):

    OUT/config.json   {"format": "jaxtts", "model": "csm" | "mimi", "dtype": ..., "config": {...}}
                      (+ "quantization": {"method": "int8", ...} for int8 weights: jaxtts/quantize.py)
    OUT/params/       Orbax StandardCheckpointer tree (nested dicts of arrays, string keys)

Directories are written to a temporary sibling and renamed at the end, so an interrupted
conversion never leaves a half-written OUT behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtts.errors import JaxttsError

FORMAT = "jaxtts"


def _stringify_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _stringify_keys(v) for k, v in tree.items()}
    return tree


def _restore_int_keys(tree):
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _restore_int_keys(v) for k, v in tree.items()}
    return tree


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary directory that becomes `out` only if the block finishes without error."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise JaxttsError(f"{out} already exists; choose another path or pass --overwrite")
    if not out.parent.is_dir():
        raise JaxttsError(f"{out.parent}: no such directory")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_checkpoint(
    directory: Path, *, model: str, config: dict, dtype: str, params: dict, quantization: dict | None = None
) -> None:
    """Write config.json and params/ into an (already temporary) directory. `dtype` is the model
    dtype; `quantization` (config.json's entry, `jaxtts.quantize.meta`) says which weights are int8."""
    import orbax.checkpoint as ocp

    meta = {"format": FORMAT, "model": model, "dtype": dtype, "config": config}
    if quantization is not None:
        meta["quantization"] = quantization
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    options = {}
    if jax.process_count() > 1:  # one process of several writes (a multi-host fine-tune's export): alone
        me = jax.process_index()
        options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.StandardCheckpointer(**options) as ckpt:
        ckpt.save((directory / "params").absolute(), _stringify_keys(params))
        ckpt.wait_until_finished()


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise JaxttsError(f"{directory}: no config.json; is this a directory made by jaxtts-convert?") from None
    except ValueError as e:
        raise JaxttsError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or "model" not in meta:
        raise JaxttsError(f"{path}: not a jaxtts checkpoint (convert the weights with jaxtts-convert)")
    return meta


def is_converted_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").exists() and (p / "params").exists()


def read_params(directory: str | os.PathLike, abstract: dict, dtype=None) -> dict:
    """Restore the parameter tree; `abstract` gives the expected shapes (ShapeDtypeStructs)."""
    import orbax.checkpoint as ocp

    target = _stringify_keys(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype), abstract))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore((Path(directory) / "params").absolute(), target)
    except Exception as e:
        raise JaxttsError(f"{directory}: cannot restore parameters ({str(e).splitlines()[0]})") from None
    return _restore_int_keys(restored)


def read_param_dtypes(directory: str | os.PathLike) -> dict:
    """The stored parameter tree's dtypes (nested dicts, string keys), read from Orbax's metadata
    without restoring anything: a restore casts to the dtypes asked for, so a caller that must
    know what is stored (int8 or not) asks here first."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckpt:
            meta = ckpt.metadata((Path(directory) / "params").absolute())
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        return jax.tree.map(lambda m: np.dtype(m.dtype), dict(tree))
    except Exception as e:
        raise JaxttsError(
            f"{directory}: cannot read the parameters' metadata ({(str(e).splitlines() or [type(e).__name__])[0]})"
        ) from None


def to_numpy_tree(tree):
    return jax.tree.map(np.asarray, tree)
