"""The machine jaxtts runs on: `jaxtts env` (what it finds, and what is missing with the command that
fixes it) and `--device` (pinning JAX to the CPU, or checking for a GPU)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from jaxtts.errors import JaxttsError


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def report() -> str:
    """A plain-text report: devices, versions, decode options, caches and their sizes, weights."""
    import jax

    from jaxtts.defaults import default_dtype
    from jaxtts.hub import CSM_FILE, CSM_REPO, MIMI_FILE, MIMI_REPO, find_in_hf_cache, hf_hub_cache, jaxtts_cache
    from jaxtts.options import default_options

    lines, missing = [], []
    lines.append("versions")
    for dist in (
        "jaxtts",
        "jax",
        "jaxlib",
        "jax-cuda12-plugin",
        "jax-cuda13-plugin",
        "flax",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "soundfile",
        "tiktoken",
        "llama-models",
    ):
        v = _version(dist)
        if v is not None or dist in ("jax", "jaxlib", "flax"):
            lines.append(f"  {dist:<20} {v or 'not installed'}")
    try:
        devices = jax.devices()
        backend = jax.default_backend()
    except RuntimeError as e:
        devices, backend = [], f"unavailable ({str(e).splitlines()[0]})"
    lines.append(f"devices (backend {backend})")
    for d in devices:
        lines.append(f"  {d.id}: {d.platform} {d.device_kind}")
    if backend == "cpu":
        missing.append(
            "no GPU: jaxtts runs on the CPU (slow for CSM-1B). On an NVIDIA machine: "
            "pip install 'jaxtts[cuda12]' (or cuda13)"
        )
    if devices:
        opts = default_options(devices[0])
        lines.append("decode options (jaxtts.default_options())")
        kernels = "Pallas (Triton lowering)" if opts.pallas else "none: plain XLA"
        lines.append(f"  kernels            {kernels}")
        lines.append(f"  attention          {opts.attention}")
        lines.append(f"  tuned GEMV configs {len(opts.matvec_tuned)} for {devices[0].device_kind!r}")
        lines.append(f"  dtype              {default_dtype(devices[0].platform)}")
    from jaxtts.tts import compilation_cache_dir

    cache = jaxtts_cache()
    xla = compilation_cache_dir()
    xla_line = "off (JAXTTS_COMPILE_CACHE=0)" if xla is None else f"{xla} ({_human(_size(xla))})"
    lines.append("caches")
    lines.append(f"  jaxtts             {cache} ({_human(_size(cache))})")
    lines.append(f"  compiled programs  {xla_line}")
    stored = None if xla is None else xla / "jaxtts-programs"  # jaxtts.programs: loaded instead of traced
    if stored is not None and stored.is_dir():
        count = sum(1 for _ in stored.glob("*.jaxprog"))
        lines.append(f"    jaxtts-programs/ {count} programs ({_human(_size(stored))}), loaded instead of traced")
    lines.append(f"  Hugging Face hub   {hf_hub_cache()}")
    lines.append("weights")
    for kind, sub, repo, fname in (("CSM", "csm-1b", CSM_REPO, CSM_FILE), ("Mimi", "mimi", MIMI_REPO, MIMI_FILE)):
        converted = cache / sub
        if (converted / "config.json").is_file():
            lines.append(f"  {kind:<5} {converted} (converted, {_human(_size(converted))})")
        elif (hub := find_in_hf_cache(repo, fname)) is not None:
            lines.append(f"  {kind:<5} {hub} (Hugging Face cache; converted on first use)")
        else:
            lines.append(f"  {kind:<5} not found")
            gated = (
                " (needs `huggingface-cli login` and the licence accepted at sesame/csm-1b)" if kind == "CSM" else ""
            )
            missing.append(f"{kind} weights: run `jaxtts download`{gated}, or pass --model/--codec paths")
    if _version("huggingface-hub") is None:
        missing.append("`jaxtts download` needs huggingface-hub: pip install 'jaxtts[hub]'")
    lines.append("missing" if missing else "missing: nothing")
    lines += [f"  - {m}" for m in missing]
    return "\n".join(lines) + "\n"


def select_device(device: str | None) -> None:
    """Pin JAX to the CPU, or check that it has a GPU (before anything touches a device)."""
    if device is None:
        return
    import jax

    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
        return
    try:
        backend = jax.default_backend()
    except RuntimeError as e:
        raise JaxttsError(f"--device gpu: JAX could not start ({str(e).splitlines()[0]})") from None
    if backend != "gpu":
        raise JaxttsError(
            "--device gpu: JAX sees no GPU; install the CUDA build (pip install 'jaxtts[cuda12]') "
            "or run with --device cpu"
        )
