"""PyTorch peers of jaxtts's decode loop, timed in the process that timed jaxtts (`jaxtts bench
--compare transformers,original`): milliseconds per generated frame at batch 1, random weights,
bf16 on CUDA / float32 on CPU (the bench's --dtype on CUDA).

- "transformers": transformers' `CsmForConditionalGeneration.generate` (CSM-1B size only), eager
  and with `torch.compile(mode="reduce-overhead")` and static caches.
- "original": the torchtune replica of Sesame's original CSM (`OriginalCSM` in the repository's
  tests/reference_csm.py, the model the parity tests compare against) driven by the original
  `Generator`'s frame loop, eager and with `torch.compile(mode="reduce-overhead")` on the backbone
  and the depth decoder. The torch stack (torch, torchtune) is only in the test environment, and
  the replica only in a checkout of the repository.

Each function returns a dict of results; a failure is reported under a "*_error" key, never
hidden and never fatal to the jaxtts figures.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _torch_setup(dtype: str):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = torch.bfloat16 if device == "cuda" and dtype == "bfloat16" else torch.float32
    return torch, device, tdtype


def _sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_transformers(cfg=None, *, dtype: str = "bfloat16", prompt_tokens: int = 100, frames: int = 20) -> dict:
    """transformers' CsmForConditionalGeneration, random full-size weights: ms per frame."""
    from jaxtts.config import CSM_1B

    if cfg is not None and cfg != CSM_1B:
        return {"transformers_error": "comparison only at CSM-1B size (transformers' default CsmConfig)"}
    torch, device, tdtype = _torch_setup(dtype)
    from transformers import CsmConfig, CsmForConditionalGeneration

    with torch.device(device):
        model = CsmForConditionalGeneration(CsmConfig()).to(tdtype).eval()
    ids = torch.randint(0, 128000, (1, prompt_tokens), device=device)  # a text prompt
    out = {"transformers_device": device, "transformers_dtype": str(tdtype).removeprefix("torch.")}

    def run(n):
        _sync(torch, device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=True,
                depth_decoder_do_sample=True,
                output_audio=False,
            )
        _sync(torch, device)
        return time.perf_counter() - t

    run(3)
    # Per frame: difference of two lengths removes the prompt's prefill.
    out["transformers_eager_ms"] = 1000 * (run(frames + 5) - run(5)) / frames
    try:
        model.generation_config.cache_implementation = "static"
        model.depth_decoder.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        model.depth_decoder.forward = torch.compile(model.depth_decoder.forward, mode="reduce-overhead")
        run(3)
        run(3)
        out["transformers_compiled_ms"] = 1000 * (run(frames + 5) - run(5)) / frames
    except Exception as e:  # report, don't hide: compiled generation is fragile across versions
        out["transformers_compiled_error"] = _error(e)
    return out


def _reference_csm():
    """tests/reference_csm.py of this checkout (it imports torch and torchtune)."""
    if not (TESTS_DIR / "reference_csm.py").exists():
        raise ImportError(
            f"{TESTS_DIR / 'reference_csm.py'} not found: the 'original' peer needs a checkout of the repository"
        )
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    import reference_csm

    return reference_csm


def original_model(cfg, *, dtype: str = "bfloat16", seed: int = 0):
    """`OriginalCSM` at the size of `cfg` (a `jaxtts.config.CSMConfig`; its dict is the torchtune
    builder arguments) with random weights and batch-1 caches. Returns (model, torch, device)."""
    torch, device, tdtype = _torch_setup(dtype)
    ref = _reference_csm()
    torch.manual_seed(seed)
    with torch.device(device):
        model = ref.OriginalCSM(cfg.to_dict())
        with torch.no_grad():  # the only parameter the constructor leaves uninitialised
            torch.nn.init.normal_(model.audio_head, std=cfg.decoder.embed_dim**-0.5)
        model = model.to(tdtype).eval()
        model.setup_caches(1)  # caches and masks are created on the current device
    return model, torch, device


def _original_frames(
    model, torch, device, prompt_tokens: int, frames: int, seed: int = 0, mark_steps: bool = False
) -> float:
    """Seconds per frame of the original `Generator.generate` loop over a random text prompt,
    after its prefill: each frame is `generate_frame` on the last frame's row, and the loop checks
    every frame for the all-zero end frame (a host sync, as the original does). mark_steps: tell
    torch.compile's CUDA graphs that each frame is a new step (`cudagraph_mark_step_begin`)."""
    step = torch.compiler.cudagraph_mark_step_begin if mark_steps else (lambda: None)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(1, prompt_tokens, 33, dtype=torch.long)
    tokens[..., 32] = torch.randint(0, min(128_000, model.text_vocab_size), (1, prompt_tokens), generator=g)
    mask = torch.zeros(1, prompt_tokens, 33, dtype=torch.bool)
    mask[..., 32] = True
    tokens, mask = tokens.to(device), mask.to(device)
    pos = torch.arange(prompt_tokens, device=device).unsqueeze(0)
    zero_text = torch.zeros(1, 1, dtype=torch.long, device=device)
    no_text = torch.zeros(1, 1, dtype=torch.bool, device=device)
    with torch.inference_mode():
        model.reset_caches()
        step()
        sample = model.generate_frame(tokens, mask, pos, 0.9, 50)  # the prompt's prefill
        _sync(torch, device)
        t = time.perf_counter()
        for _ in range(frames):
            bool(torch.all(sample == 0))  # the original stops here on the end frame
            tokens = torch.cat([sample.long(), zero_text], dim=1).unsqueeze(1)
            mask = torch.cat([torch.ones_like(sample, dtype=torch.bool), no_text], dim=1).unsqueeze(1)
            pos = pos[:, -1:] + 1
            step()
            sample = model.generate_frame(tokens, mask, pos, 0.9, 50)
        _sync(torch, device)
        return (time.perf_counter() - t) / frames


def time_original(
    cfg, *, dtype: str = "bfloat16", prompt_tokens: int = 100, frames: int = 20, compile: bool = True
) -> dict:
    """The torchtune replica of the original CSM at the size of `cfg`, random weights: ms per
    frame at batch 1, eager, then (compile=True) with torch.compile(mode="reduce-overhead") on
    the backbone and the depth decoder."""
    try:
        model, torch, device = original_model(cfg, dtype=dtype)
    except ImportError as e:
        return {"original_error": f"{_error(e)} (the 'original' peer needs torch and torchtune: the test extras)"}
    frames = min(frames, cfg.backbone.max_seq_len - prompt_tokens - 1)
    out = {"original_device": device, "original_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    _original_frames(model, torch, device, prompt_tokens, 3)  # warm-up
    out["original_eager_ms"] = 1000 * _original_frames(model, torch, device, prompt_tokens, frames)
    if compile:
        eager = (model.backbone, model.decoder)
        # torch.compile(mode="reduce-overhead") as recipes for it run: first with each frame marked
        # as a CUDA-graph step; then, where CUDA graph trees refuse the caches the model mutates
        # (torch 2.11: "storage data ptrs are not allocated in pool"), with plain CUDA graphs.
        errors = []
        for recipe in ("cudagraph trees, a step per frame", "plain CUDA graphs"):
            import torch._inductor.config as inductor

            trees = inductor.triton.cudagraph_trees
            inductor.triton.cudagraph_trees = recipe.startswith("cudagraph trees")
            try:
                torch._dynamo.reset()
                model.backbone = torch.compile(eager[0], mode="reduce-overhead")
                model.decoder = torch.compile(eager[1], mode="reduce-overhead")
                for _ in range(2):  # compiles each shape (prefill, step; the decoder's 2- and 1-position calls)
                    _original_frames(model, torch, device, prompt_tokens, 3, mark_steps=True)
                ms = 1000 * _original_frames(model, torch, device, prompt_tokens, frames, mark_steps=True)
                out["original_compiled_ms"], out["original_compiled_recipe"] = ms, recipe
                break
            except Exception as e:  # report, don't hide
                errors.append(f"{recipe}: {_error(e)}")
            finally:
                inductor.triton.cudagraph_trees = trees
                model.backbone, model.decoder = eager
        if errors:
            out["original_compiled_error" if "original_compiled_ms" not in out else "original_compiled_notes"] = errors
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def compare(peers, cfg, *, dtype: str, prompt_tokens: int, jaxtts_ms: float, frames: int = 20) -> dict:
    """Time each of `peers` ("transformers", "original") and add `speedup_vs_<peer>_<mode>`: the
    peer's ms per frame over jaxtts's `jaxtts_ms` (measured earlier in this process)."""
    out = {}
    for name in peers:
        try:
            if name == "transformers":
                res = time_transformers(cfg, dtype=dtype, prompt_tokens=prompt_tokens, frames=frames)
            elif name == "original":
                res = time_original(cfg, dtype=dtype, prompt_tokens=prompt_tokens, frames=frames)
            else:
                raise ValueError(f"unknown peer {name!r}")
        except Exception as e:  # e.g. torch not installed
            res = {f"{name}_error": _error(e)}
        out.update(res)
        for mode in ("eager", "compiled"):
            if res.get(f"{name}_{mode}_ms"):
                out[f"speedup_vs_{name}_{mode}"] = res[f"{name}_{mode}_ms"] / jaxtts_ms
    return out
