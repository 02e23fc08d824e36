"""Weight lookup: a given path, the jaxtts cache, then the Hugging Face cache (converted on first use)."""

import numpy as np
import pytest

from jaxtts.config import CSM_TINY
from jaxtts.csm import CSM
from jaxtts.errors import JaxttsError
from jaxtts.hub import MIMI_FILE, MIMI_REPO, find_in_hf_cache, resolve


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTTS_CACHE", str(tmp_path / "jaxtts"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HOME", raising=False)
    return tmp_path


def hub_file(root, repo, filename, revision="0123abcd", main=True):
    """Lay a file out as huggingface_hub does: blobs/, snapshots/REV/FILE → blob, refs/main."""
    base = root / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    snap = base / "snapshots" / revision
    snap.mkdir(parents=True)
    if main:
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / "main").write_text(revision)
    return snap / filename


def test_find_in_hf_cache_follows_refs_main(caches):
    old = hub_file(caches, "sesame/csm-1b", "model.safetensors", "aaaa", main=False)
    old.write_bytes(b"old")
    new = hub_file(caches, "sesame/csm-1b", "model.safetensors", "bbbb")
    new.write_bytes(b"new")
    assert find_in_hf_cache("sesame/csm-1b", "model.safetensors") == new
    assert find_in_hf_cache("sesame/csm-1b", "missing.safetensors") is None
    assert find_in_hf_cache("kyutai/mimi", "model.safetensors") is None


def test_given_path_wins_and_missing_path_is_an_error(caches, tmp_path):
    assert resolve("csm", tmp_path) == tmp_path
    with pytest.raises(JaxttsError, match="no such file"):
        resolve("csm", tmp_path / "nope")


def test_jaxtts_cache_then_advice(caches):
    with pytest.raises(JaxttsError, match="jaxtts download"):
        resolve("csm", None)
    (caches / "jaxtts").mkdir()
    CSM.random(CSM_TINY).save(caches / "jaxtts" / "csm-1b")
    assert resolve("csm", None) == caches / "jaxtts" / "csm-1b"
    assert resolve("csm", "sesame/csm-1b") == caches / "jaxtts" / "csm-1b"  # a hub id means the caches


def test_mimi_from_hf_cache_is_converted_once(caches):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from jaxtts.mimi import Mimi
    from mimi_reference import moshi_file_state_dict, moshi_mimi

    model = moshi_mimi(seed=0)
    src = hub_file(caches, MIMI_REPO, MIMI_FILE)
    save_file({k: v.contiguous() for k, v in moshi_file_state_dict(model).items()}, str(src))
    path = resolve("mimi", None, progress=False)
    assert path == caches / "jaxtts" / "mimi" and (path / "config.json").exists()
    assert resolve("mimi", None) == path  # second time: straight from the jaxtts cache
    codes = np.random.default_rng(0).integers(0, 2048, (1, 32, 3))
    ours = np.asarray(Mimi.load(path).decode(codes))
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(codes)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
