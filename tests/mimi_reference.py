"""PyTorch reference Mimis (moshi's and transformers') with random weights, saved in their own file layouts.

Every weight, bias, LayerNorm, LayerScale and codebook buffer is random, so that no part of the model is
trivially zero or the identity, with scales that keep activations well-conditioned.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MOSHI_FILENAME = "tokenizer-e351c8d8-checkpoint125.safetensors"


@torch.no_grad()
def randomize_(model: nn.Module, seed: int, codeword_std: float = 1.0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)

    def normal(t, std, mean=0.0):
        t.copy_(mean + std * torch.randn(t.shape, generator=g))

    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            normal(mod.weight, 0.1, 1.0)
            normal(mod.bias, 0.1)
            continue
        if isinstance(mod, nn.ConvTranspose1d):  # each output sums kernel/stride taps per input channel
            fan_in = mod.in_channels // mod.groups * mod.kernel_size[0] // mod.stride[0]
        elif isinstance(mod, nn.Conv1d):
            fan_in = mod.in_channels // mod.groups * mod.kernel_size[0]
        elif isinstance(mod, nn.Linear):
            fan_in = mod.in_features
        else:
            _randomize_codebook(mod, g, codeword_std)
            continue
        normal(mod.weight, fan_in**-0.5)
        if mod.bias is not None:
            normal(mod.bias, 0.1)
    for name, p in model.named_parameters():
        if name.endswith(".scale") and "norm" not in name:  # LayerScale
            p.copy_(0.05 + 0.15 * torch.rand(p.shape, generator=g))
    return model


def _randomize_codebook(mod: nn.Module, g: torch.Generator, std: float) -> None:
    """Random codewords and cluster usages; a few usages are 0 to exercise the max(usage, 1e-5) clamp."""
    buffers = dict(mod.named_buffers(recurse=False))
    emb_name = "embedding_sum" if "embedding_sum" in buffers else "embed_sum" if "embed_sum" in buffers else None
    if emb_name is None:
        return
    bins, dim = buffers[emb_name].shape
    usage = 0.5 + 1.5 * torch.rand(bins, generator=g)
    words = std * torch.randn(bins, dim, generator=g)
    usage[:4] = 0.0  # their stored sums are words·1e-5, so only the clamp gives back the words
    buffers[emb_name].copy_(words * usage.clamp(min=1e-5)[:, None])
    buffers["cluster_usage"].copy_(usage)
    # both implementations cache the codewords on first use
    if hasattr(mod, "_embedding"):
        mod._embedding = None
    if hasattr(mod, "_embed"):
        mod._embed = None


def moshi_mimi(seed: int = 0, codeword_std: float = 1.0):
    """moshi's full-size MimiModel (the loaders' own config) with random weights, all 32 codebooks on."""
    from moshi.models import loaders

    torch.manual_seed(seed)
    model = loaders.get_mimi(None, device="cpu", num_codebooks=32)
    return randomize_(model, seed, codeword_std).eval()


def moshi_file_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the released file's names: fused `in_proj_weight`, `out_proj.weight`."""
    renames = {".in_projs.0.weight": ".in_proj_weight", ".out_projs.0.weight": ".out_proj.weight"}
    out = {}
    for name, t in model.state_dict().items():
        for old, new in renames.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        out[name] = t.detach().contiguous().clone()
    return out


def save_moshi(model: nn.Module, directory: Path) -> Path:
    from safetensors.torch import save_file

    path = Path(directory) / MOSHI_FILENAME
    save_file(moshi_file_state_dict(model), str(path))
    return path


def transformers_mimi(seed: int = 0, codeword_std: float = 1.0):
    """transformers' MimiModel with its default (= kyutai/mimi, full-size) config and random weights."""
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(seed)
    model = MimiModel(MimiConfig())
    return randomize_(model, seed, codeword_std).eval()
