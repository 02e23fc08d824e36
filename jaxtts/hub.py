"""Finding weights: the jaxtts cache, then the Hugging Face cache (converted on first use), else
advise `jaxtts download`.

Converted checkpoints live in `$JAXTTS_CACHE` (default `~/.cache/jaxtts`): `csm-1b/` and `mimi/`.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxtts.errors import JaxttsError

CSM_REPO = "sesame/csm-1b"
CSM_FILE = "model.safetensors"
MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
MIMI_TRANSFORMERS_REPO = "kyutai/mimi"


def jaxtts_cache() -> Path:
    return Path(os.environ.get("JAXTTS_CACHE", Path.home() / ".cache" / "jaxtts"))


def hf_hub_cache() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    if "HF_HOME" in os.environ:
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def find_in_hf_cache(repo: str, filename: str) -> Path | None:
    """A file of a repo in the hub cache layout: models--ORG--NAME/snapshots/REV/FILE (newest first)."""
    snapshots = hf_hub_cache() / f"models--{repo.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = snapshots.parent / "refs" / "main"
    revisions = [snapshots / ref.read_text().strip()] if ref.is_file() else []
    revisions += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for rev in revisions:
        if (rev / filename).exists():
            return rev / filename
    return None


def _converted(kind: str) -> Path:
    return jaxtts_cache() / ("csm-1b" if kind == "csm" else "mimi")


def _sources(kind: str) -> list[tuple[str, str]]:
    if kind == "csm":
        return [(CSM_REPO, CSM_FILE)]
    return [(MIMI_REPO, MIMI_FILE), (MIMI_TRANSFORMERS_REPO, "model.safetensors")]


def _convert(kind: str, src: Path, out: Path, progress: bool) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "csm":
        from convert.csm import convert_csm

        return convert_csm(src, out, overwrite=True, progress=progress)
    from convert.mimi import convert_mimi

    return convert_mimi(src, out, overwrite=True, progress=progress)


def resolve(kind: str, given: str | os.PathLike | None, *, progress: bool = True) -> Path:
    """The path to load for `kind` ("csm" or "mimi"): a given path, or the caches."""
    from jaxtts.checkpoint import is_converted_dir

    if given is not None and not isinstance(given, (str, os.PathLike)):
        arg = "model" if kind == "csm" else "codec"
        raise JaxttsError(f"{arg} must be a path (str or os.PathLike) or None, got {type(given).__name__}")
    if given is not None:
        path = Path(given)
        if path.exists():
            return path
        if str(given) in {repo for repo, _ in _sources(kind)}:
            given = None  # a hub id: look it up in the caches below
        else:
            raise JaxttsError(f"{given}: no such file or directory")
    converted = _converted(kind)
    if is_converted_dir(converted):
        return converted
    for repo, filename in _sources(kind):
        found = find_in_hf_cache(repo, filename)
        if found is not None:
            return _convert(kind, found, converted, progress)
    what = "CSM weights" if kind == "csm" else "Mimi codec weights"
    raise JaxttsError(
        f"no {what} found in {jaxtts_cache()} or the Hugging Face cache; run `jaxtts download` "
        f"(or pass a path, or --random-weights to check the install)"
    )


def download(*, progress: bool = True, token: str | None = None) -> tuple[Path, Path]:
    """Fetch sesame/csm-1b and Kyutai's Mimi from the hub, convert both into the jaxtts cache."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise JaxttsError("downloading needs huggingface_hub: pip install 'jaxtts[hub]'") from None
    out = []
    for kind in ("csm", "mimi"):
        repo, filename = _sources(kind)[0]
        try:
            src = hf_hub_download(repo, filename, token=token)
        except Exception as e:
            raise JaxttsError(
                f"download of {repo}/{filename} failed ({str(e).splitlines()[0]}); "
                f"{repo} may need you to accept its licence and `huggingface-cli login`"
            ) from None
        out.append(_convert(kind, Path(src), _converted(kind), progress))
    return out[0], out[1]
