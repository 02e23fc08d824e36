"""Reading safetensors checkpoints with safetensors' numpy API (no torch), with clear errors."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors

from jaxtts.errors import JaxttsError

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


class TensorFile:
    """Name → numpy array for one or more safetensors files (a sharded index is several).

    Arrays are read lazily, one at a time, so a 6 GB checkpoint never sits in memory twice.
    bfloat16 tensors (which numpy cannot name) come back as `ml_dtypes.bfloat16` arrays.
    """

    def __init__(self, files: list[Path]):
        self.files = files
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in files:
            try:
                with safetensors.safe_open(str(f), framework="numpy") as st:
                    for name in st.keys():
                        sl = st.get_slice(name)
                        self._where[name] = f
                        self._shapes[name] = (tuple(sl.get_shape()), sl.get_dtype())
            except Exception as e:  # SafetensorError has no stable import path
                raise JaxttsError(f"{f}: not a readable safetensors file ({e}); re-download it") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name][0]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise JaxttsError(f"checkpoint has no tensor named {name!r}")
        path = self._where[name]
        shape, dtype = self._shapes[name]
        try:
            if dtype == "BF16":
                return _read_raw(path, name).view(ml_dtypes.bfloat16).reshape(shape)
            with safetensors.safe_open(str(path), framework="numpy") as st:
                return st.get_tensor(name)
        except JaxttsError:
            raise
        except Exception as e:
            raise JaxttsError(f"{path}: cannot read tensor {name!r} ({e}); the file may be corrupt") from None


def _read_raw(path: Path, name: str) -> np.ndarray:
    """The bytes of one tensor, located through the safetensors header (for dtypes numpy lacks)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        begin, end = header[name]["data_offsets"]
        f.seek(8 + n + begin)
        data = f.read(end - begin)
    if len(data) != end - begin:
        raise JaxttsError(f"{path}: tensor {name!r} is truncated; re-download the file")
    return np.frombuffer(data, dtype=np.uint16)


def open_checkpoint(src: str | os.PathLike, *, allow_pickle: bool = False) -> TensorFile:
    """Open a safetensors file, a directory of them, or a sharded `*.safetensors.index.json`."""
    src = Path(src)
    if not src.exists():
        raise JaxttsError(f"{src}: no such file or directory")
    if src.is_dir():
        indexes = sorted(src.glob("*.safetensors.index.json"))
        if indexes:
            return open_checkpoint(indexes[0])
        files = sorted(src.glob("*.safetensors"))
        if not files:
            pickles = [p for p in src.iterdir() if p.suffix in _PICKLE_SUFFIXES]
            if pickles:
                return open_checkpoint(pickles[0], allow_pickle=allow_pickle)
            raise JaxttsError(f"{src}: directory holds no .safetensors files")
        return TensorFile(files)
    if src.name.endswith(".index.json"):
        try:
            weight_map = json.loads(src.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise JaxttsError(f"{src}: not a safetensors index ({e})") from None
        shards = sorted({src.parent / v for v in weight_map.values()})
        missing = [s for s in shards if not s.exists()]
        if missing:
            raise JaxttsError(f"{src}: shard {missing[0].name} is missing")
        return TensorFile(shards)
    if src.suffix in _PICKLE_SUFFIXES:
        if not allow_pickle:
            raise JaxttsError(
                f"{src}: PyTorch pickles can run arbitrary code and are not read by default; "
                "use the .safetensors file, or pass --allow-pickle (needs torch installed)"
            )
        return _PickleFile(src)
    return TensorFile([src])


class _PickleFile(TensorFile):
    """A `.pt` state dict, loaded with torch (weights_only=True) when the user explicitly allows it."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError:
            raise JaxttsError("--allow-pickle needs torch installed (pip install torch)") from None
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise JaxttsError(f"{path}: cannot load pickle ({e})") from None
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]
        self.files = [path]
        self._arrays = {}
        for k, v in sd.items():
            if hasattr(v, "float"):
                self._arrays[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
        self._where = {k: path for k in self._arrays}
        self._shapes = {k: (tuple(a.shape), str(a.dtype)) for k, a in self._arrays.items()}

    def __getitem__(self, name):
        if name not in self._arrays:
            raise JaxttsError(f"checkpoint has no tensor named {name!r}")
        return self._arrays[name]
