"""PyTorch references for the CSM parity tests (CPU, float32).

(a) `OriginalCSM`: a replica of Sesame's `models.py` (SesameAILabs/csm) built from torchtune's
    `llama3_2` builder, with its token embedding and output layer replaced by `nn.Identity`, KV
    caches from `setup_caches`, the depth decoder's cache reset every frame and `sample_topk`
    (top_k=1 is the greedy path). Its `state_dict()` is the original checkpoint layout.
(b) `build_hf_model`: transformers' `CsmForConditionalGeneration` with random weights at small,
    non-default sizes, Llama-3 RoPE scaling expressed the way transformers' CSM config does it.
(c) `hf_to_original_state_dict`: the same weights in the original names and RoPE layout
    (inverting transformers' `permute_for_rope`), so one set of random weights exists in both.
(d) `reference_frames`: the original generator's greedy frame loop over prompt rows built like
    `Generator._tokenize_text_segment` / `_tokenize_audio`.

Also the tensor names and shapes of both checkpoint layouts for any size (for fake checkpoints).
"""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchtune.models import llama3_2

BOS, EOS = 128_000, 128_001

# Torchtune builder arguments (the jaxtts JSON config form) for the parity model: non-default sizes,
# several layers, grouped-query attention (kv heads < heads), head dims 16 and 12 (both have a
# frequency in the smoothed band of the Llama-3 RoPE scaling).
PARITY_ARGS = {
    "backbone": {
        "num_layers": 3,
        "num_heads": 4,
        "num_kv_heads": 2,
        "embed_dim": 64,
        "intermediate_dim": 160,
        "max_seq_len": 256,
        "norm_eps": 1e-5,
        "rope_base": 500_000.0,
        "scale_factor": 32.0,
    },
    "decoder": {
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "embed_dim": 48,
        "intermediate_dim": 96,
        "max_seq_len": 32,
        "norm_eps": 1e-5,
        "rope_base": 500_000.0,
        "scale_factor": 32.0,
    },
    "text_vocab_size": 128_256,
    "audio_vocab_size": 2051,
    "audio_num_codebooks": 32,
}

# The released model's builder arguments (Sesame's llama3_2_1B / llama3_2_100M flavours, whose
# token embedding and output are discarded; the depth decoder only ever sees 32 positions).
CSM_1B_ARGS = {
    "backbone": {
        "num_layers": 16,
        "num_heads": 32,
        "num_kv_heads": 8,
        "embed_dim": 2048,
        "intermediate_dim": 8192,
        "max_seq_len": 2048,
        "norm_eps": 1e-5,
        "rope_base": 500_000.0,
        "scale_factor": 32.0,
    },
    "decoder": {
        "num_layers": 4,
        "num_heads": 8,
        "num_kv_heads": 2,
        "embed_dim": 1024,
        "intermediate_dim": 8192,
        "max_seq_len": 32,
        "norm_eps": 1e-5,
        "rope_base": 500_000.0,
        "scale_factor": 32.0,
    },
    "text_vocab_size": 128_256,
    "audio_vocab_size": 2051,
    "audio_num_codebooks": 32,
}


def single_thread(fn):
    """Run a reference with one torch thread: these models are tiny, and on a small shared machine
    thread hand-offs cost more than the matmuls (restores the previous setting afterwards)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(prev)

    return wrapper


# ---------------------------------------------------------------------------------------------
# (a) The original model, rebuilt from torchtune the way Sesame's models.py builds it.
# ---------------------------------------------------------------------------------------------
def _llama(stack: dict):
    # The original passes vocab_size=128_256; the token embedding is replaced right away, so any
    # size will do here (a small one keeps the throwaway table cheap).
    return llama3_2.llama3_2(
        vocab_size=16,
        num_layers=stack["num_layers"],
        num_heads=stack["num_heads"],
        num_kv_heads=stack["num_kv_heads"],
        embed_dim=stack["embed_dim"],
        max_seq_len=stack["max_seq_len"],
        intermediate_dim=stack["intermediate_dim"],
        attn_dropout=0.0,
        norm_eps=stack["norm_eps"],
        rope_base=stack["rope_base"],
        scale_factor=stack["scale_factor"],
    )


def _prepare_transformer(model):
    embed_dim = model.tok_embeddings.embedding_dim
    model.tok_embeddings = nn.Identity()
    model.output = nn.Identity()
    return model, embed_dim


def _causal_mask(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n, dtype=torch.bool))


def _rows_of_mask(mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """[max, max] causal mask → [batch, seq, max] rows for the given positions."""
    return mask[input_pos, :]


def _sample_one_no_sync(probs: torch.Tensor) -> torch.Tensor:
    # Exponential race, as the original: argmax(p / q) with q ~ Exp(1).
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)


def sample_topk(logits: torch.Tensor, topk: int, temperature: float) -> torch.Tensor:
    logits = logits / temperature
    kth = torch.topk(logits, topk)[0][..., -1, None]
    filtered = logits.masked_fill(logits < kth, -float("inf"))
    filtered = torch.nn.functional.log_softmax(filtered, dim=-1)
    probs = torch.nn.functional.softmax(filtered, dim=-1)
    return _sample_one_no_sync(probs)


class OriginalCSM(nn.Module):
    """Sesame's `models.Model`, sized by torchtune builder arguments instead of flavour names."""

    def __init__(self, args: dict):
        super().__init__()
        self.args = copy.deepcopy(args)
        self.text_vocab_size = args["text_vocab_size"]
        self.audio_vocab_size = args["audio_vocab_size"]
        self.audio_num_codebooks = args["audio_num_codebooks"]

        self.backbone, backbone_dim = _prepare_transformer(_llama(args["backbone"]))
        self.decoder, decoder_dim = _prepare_transformer(_llama(args["decoder"]))

        self.text_embeddings = nn.Embedding(self.text_vocab_size, backbone_dim)
        self.audio_embeddings = nn.Embedding(self.audio_vocab_size * self.audio_num_codebooks, backbone_dim)
        self.projection = nn.Linear(backbone_dim, decoder_dim, bias=False)
        self.codebook0_head = nn.Linear(backbone_dim, self.audio_vocab_size, bias=False)
        self.audio_head = nn.Parameter(torch.empty(self.audio_num_codebooks - 1, decoder_dim, self.audio_vocab_size))

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters only (what the released model.safetensors holds): no caches, no masks."""
        return {k: v.detach().clone().contiguous() for k, v in self.named_parameters()}

    def setup_caches(self, max_batch_size: int) -> None:
        dtype = next(self.parameters()).dtype
        self.backbone.setup_caches(max_batch_size, dtype)
        self.decoder.setup_caches(max_batch_size, dtype, decoder_max_seq_len=self.audio_num_codebooks)
        self.register_buffer("backbone_causal_mask", _causal_mask(self.backbone.max_seq_len), persistent=False)
        self.register_buffer("decoder_causal_mask", _causal_mask(self.audio_num_codebooks), persistent=False)

    def reset_caches(self) -> None:
        self.backbone.reset_caches()
        self.decoder.reset_caches()

    def _embed_audio(self, codebook: int, tokens: torch.Tensor) -> torch.Tensor:
        return self.audio_embeddings(tokens + codebook * self.audio_vocab_size)

    def _embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b, s, 33] → [b, s, 33, d]: the 32 audio embeddings, then the text embedding."""
        text = self.text_embeddings(tokens[:, :, -1]).unsqueeze(-2)
        offsets = self.audio_vocab_size * torch.arange(self.audio_num_codebooks, device=tokens.device)
        audio_ids = tokens[:, :, :-1] + offsets
        audio = self.audio_embeddings(audio_ids.reshape(-1)).reshape(
            tokens.size(0), tokens.size(1), self.audio_num_codebooks, -1
        )
        return torch.cat([audio, text], dim=-2)

    def backbone_hidden(self, tokens, tokens_mask, input_pos) -> torch.Tensor:
        """The first half of `generate_frame`: masked-sum rows → backbone (through its KV cache)."""
        dtype = next(self.parameters()).dtype
        assert self.backbone.caches_are_enabled(), "backbone caches are not enabled"
        mask = _rows_of_mask(self.backbone_causal_mask, input_pos)
        h = (self._embed_tokens(tokens) * tokens_mask.unsqueeze(-1)).sum(dim=2)
        return self.backbone(h, input_pos=input_pos, mask=mask).to(dtype=dtype)

    def generate_frame(self, tokens, tokens_mask, input_pos, temperature: float, topk: int) -> torch.Tensor:
        """tokens/tokens_mask [b, s, 33], input_pos [b, s] → sampled codes [b, 32]."""
        dtype = next(self.parameters()).dtype
        h = self.backbone_hidden(tokens, tokens_mask, input_pos)

        last_h = h[:, -1, :]
        c0_logits = self.codebook0_head(last_h)
        c0_sample = sample_topk(c0_logits, topk, temperature)
        c0_embed = self._embed_audio(0, c0_sample)

        curr_h = torch.cat([last_h.unsqueeze(1), c0_embed], dim=1)
        curr_sample = c0_sample.clone()
        curr_pos = torch.arange(0, curr_h.size(1), device=curr_h.device).unsqueeze(0).repeat(curr_h.size(0), 1)

        # The depth decoder starts afresh every frame.
        self.decoder.reset_caches()
        for i in range(1, self.audio_num_codebooks):
            dec_mask = _rows_of_mask(self.decoder_causal_mask, curr_pos)
            dec_h = self.decoder(self.projection(curr_h), input_pos=curr_pos, mask=dec_mask).to(dtype=dtype)
            ci_logits = torch.mm(dec_h[:, -1, :], self.audio_head[i - 1])
            ci_sample = sample_topk(ci_logits, topk, temperature)
            ci_embed = self._embed_audio(i, ci_sample)

            curr_h = ci_embed
            curr_sample = torch.cat([curr_sample, ci_sample], dim=1)
            curr_pos = curr_pos[:, -1:] + 1
        return curr_sample


def random_original(args: dict, seed: int = 0) -> OriginalCSM:
    """The replica with every parameter random (norm scales too), eval mode, float32."""
    torch.manual_seed(seed)
    model = OriginalCSM(args).eval()
    randomize_(model, seed)
    return model


def randomize_(model: nn.Module, seed: int, *, skip: tuple[str, ...] = ()) -> None:
    """Re-draw every parameter: matrices ~ N(0, 1/fan_in), embedding tables ~ N(0, 1), norm scales
    in [0.5, 1.5]. (Unit norm scales would hide a converter that drops or swaps them.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.startswith(skip):
                continue
            if p.ndim == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "embed" in name and "projector" not in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-2] if p.ndim == 3 else p.shape[-1]  # audio_head is [n, in, out]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


# ---------------------------------------------------------------------------------------------
# (d) Prompt rows and the original generator's greedy loop.
# ---------------------------------------------------------------------------------------------
def text_rows(token_ids, width: int = 33) -> tuple[np.ndarray, np.ndarray]:
    """Like `Generator._tokenize_text_segment`: ids in the text column, only it unmasked."""
    ids = np.asarray(token_ids, np.int64)
    tokens = np.zeros((len(ids), width), np.int64)
    mask = np.zeros((len(ids), width), bool)
    tokens[:, -1] = ids
    mask[:, -1] = True
    return tokens, mask


def audio_rows(codes) -> tuple[np.ndarray, np.ndarray]:
    """Like `Generator._tokenize_audio`: codes [K, F] plus one all-zero EOS frame, audio columns."""
    codes = np.asarray(codes, np.int64)
    k = codes.shape[0]
    codes = np.concatenate([codes, np.zeros((k, 1), np.int64)], axis=1)
    tokens = np.zeros((codes.shape[1], k + 1), np.int64)
    mask = np.zeros((codes.shape[1], k + 1), bool)
    tokens[:, :-1] = codes.T
    mask[:, :-1] = True
    return tokens, mask


def parity_prompt(
    seed: int = 0, *, num_audio_frames: int = 40, text_vocab: int = 128_000, codebooks: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """A context segment (text + audio with its EOS frame), then the text to speak."""
    rng = np.random.default_rng(seed)
    segs = [
        text_rows([BOS, *rng.integers(0, text_vocab, 7).tolist(), EOS]),
        audio_rows(rng.integers(1, 2048, (codebooks, num_audio_frames))),
        text_rows([BOS, *rng.integers(0, text_vocab, 5).tolist(), EOS]),
    ]
    tokens = np.concatenate([s[0] for s in segs])
    mask = np.concatenate([s[1] for s in segs])
    return tokens, mask


@single_thread
@torch.inference_mode()
def reference_frames(
    model: OriginalCSM, tokens, mask, *, max_frames: int, temperature: float = 0.9, topk: int = 1, seed: int = 0
) -> np.ndarray:
    """`Generator.generate` without text/audio tokenizers: frames [F, 32], stopping before the
    first all-zero frame."""
    torch.manual_seed(seed)
    if not hasattr(model, "backbone_causal_mask"):
        model.setup_caches(1)
    model.reset_caches()
    curr_tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long).unsqueeze(0)
    curr_mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool).unsqueeze(0)
    curr_pos = torch.arange(0, curr_tokens.size(1)).unsqueeze(0).long()
    samples = []
    for _ in range(max_frames):
        sample = model.generate_frame(curr_tokens, curr_mask, curr_pos, temperature, topk)
        if torch.all(sample == 0):
            break
        samples.append(sample)
        curr_tokens = torch.cat([sample, torch.zeros(1, 1).long()], dim=1).unsqueeze(1)
        curr_mask = torch.cat([torch.ones_like(sample).bool(), torch.zeros(1, 1).bool()], dim=1).unsqueeze(1)
        curr_pos = curr_pos[:, -1:] + 1
    if not samples:
        return np.zeros((0, model.audio_num_codebooks), np.int32)
    return torch.cat(samples).numpy().astype(np.int32)


@single_thread
@torch.inference_mode()
def reference_codebook0_logits(model: OriginalCSM, tokens, mask) -> np.ndarray:
    """Codebook-0 logits [T, vocab] at every prompt position (the original's prefill pass)."""
    if not hasattr(model, "backbone_causal_mask"):
        model.setup_caches(1)
    model.reset_caches()
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long).unsqueeze(0)
    m = torch.as_tensor(np.asarray(mask), dtype=torch.bool).unsqueeze(0)
    pos = torch.arange(t.size(1)).unsqueeze(0)
    h = model.backbone_hidden(t, m, pos)
    out = model.codebook0_head(h)[0].numpy()
    model.reset_caches()
    return out


# ---------------------------------------------------------------------------------------------
# (b) transformers' CsmForConditionalGeneration at small sizes.
# ---------------------------------------------------------------------------------------------
def hf_rope_parameters(stack: dict, original_max_position_embeddings: int) -> dict:
    """Llama-3 scaling (torchtune: factor, low 1, high 4, original context 8192) as transformers'
    CSM config writes it: the original context rescaled, with the low/high factors rescaled alike
    (wavelength bounds 8192/low and 8192/high are unchanged), so that it stays below
    `max_position_embeddings`. sesame/csm-1b: 1024, 0.125, 0.5 (backbone), 16, 1/512, 1/128 (decoder)."""
    ratio = original_max_position_embeddings / 8192
    return {
        "rope_type": "llama3",
        "rope_theta": float(stack["rope_base"]),
        "factor": float(stack["scale_factor"]),
        "low_freq_factor": 1.0 * ratio,
        "high_freq_factor": 4.0 * ratio,
        "original_max_position_embeddings": original_max_position_embeddings,
    }


# A small Mimi: the converter ignores `codec_model.*`, only its presence in the file matters.
_SMALL_CODEC = dict(
    model_type="mimi",
    hidden_size=16,
    num_filters=4,
    num_hidden_layers=1,
    intermediate_size=32,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    codebook_size=16,
    codebook_dim=8,
    vector_quantization_hidden_dimension=8,
    upsample_groups=16,
    num_quantizers=32,
)


def hf_config(args: dict):
    from transformers import CsmConfig

    b, d = args["backbone"], args["decoder"]
    dec_positions = max(d["max_seq_len"], args["audio_num_codebooks"] + 1)  # transformers' csm-1b: 33
    depth = dict(
        num_codebooks=args["audio_num_codebooks"],
        backbone_hidden_size=b["embed_dim"],
        vocab_size=args["audio_vocab_size"],
        hidden_size=d["embed_dim"],
        intermediate_size=d["intermediate_dim"],
        num_hidden_layers=d["num_layers"],
        num_attention_heads=d["num_heads"],
        num_key_value_heads=d["num_kv_heads"],
        max_position_embeddings=dec_positions,
        rms_norm_eps=d["norm_eps"],
        rope_parameters=hf_rope_parameters(d, 16),
    )
    cfg = CsmConfig(
        num_codebooks=args["audio_num_codebooks"],
        vocab_size=args["audio_vocab_size"],
        text_vocab_size=args["text_vocab_size"],
        hidden_size=b["embed_dim"],
        intermediate_size=b["intermediate_dim"],
        num_hidden_layers=b["num_layers"],
        num_attention_heads=b["num_heads"],
        num_key_value_heads=b["num_kv_heads"],
        max_position_embeddings=b["max_seq_len"],
        rms_norm_eps=b["norm_eps"],
        rope_parameters=hf_rope_parameters(b, b["max_seq_len"] // 2),
        depth_decoder_config=depth,
        codec_config=dict(_SMALL_CODEC),
    )
    cfg._attn_implementation = "eager"
    cfg.depth_decoder_config._attn_implementation = "eager"
    return cfg


def build_hf_model(args: dict, seed: int = 0):
    """CsmForConditionalGeneration with every parameter random (see `randomize_`), eval, fp32."""
    import transformers
    from transformers import CsmForConditionalGeneration

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(hf_config(args)).eval()
    # The codec's weights do not matter here; leave transformers' init on them.
    randomize_(model, seed, skip=("codec_model.",))
    return model


def force_end_of_speech_(model, beta: float) -> None:
    """Edit an HF model's weights so that speech ends early, to test the end-of-speech stop.

    Feature 0 of both residual streams is made positive everywhere: every embedding has a 1 there,
    no layer writes to it, and the depth decoder's input projection copies it. Codebooks 1..31
    then always pick code 0 (their head reads feature 0 with a large weight), and codebook 0 gets
    `beta` · feature 0 on code 0: small after a text row (one embedding in the sum), large after
    an audio row (32), so with a moderate beta the frame after the first generated one is all zero.
    """
    sd = dict(model.named_parameters())
    with torch.no_grad():
        sd["embed_text_tokens.weight"][:, 0] = 1.0
        sd["backbone_model.embed_tokens.embed_audio_tokens.weight"][:, 0] = 1.0
        for name, p in sd.items():
            if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                p[0, :] = 0.0
        proj = sd["depth_decoder.model.inputs_embeds_projector.weight"]
        proj[0, :] = 0.0
        proj[0, 0] = 1.0
        sd["depth_decoder.codebooks_head.weight"][:, 0, 0] = 1000.0
        sd["lm_head.weight"][0, 0] = beta


def save_hf(model, directory: Path, **kwargs) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_rope_inv_freq(model) -> tuple[np.ndarray, np.ndarray]:
    return (
        model.backbone_model.rotary_emb.inv_freq.numpy().copy(),
        model.depth_decoder.model.rotary_emb.inv_freq.numpy().copy(),
    )


def torchtune_rope_theta(original: OriginalCSM) -> tuple[np.ndarray, np.ndarray]:
    def theta(stack):
        return stack.layers[0].attn.pos_embeddings.theta.numpy().copy()

    return theta(original.backbone), theta(original.decoder)


@single_thread
@torch.inference_mode()
def hf_codebook0_logits(model, tokens, mask) -> np.ndarray:
    """transformers' codebook-0 logits [T, vocab] for prompt rows. Text rows are embedded with
    `embed_text_tokens`, audio rows (codes or the all-zero EOS frame) with the backbone's audio
    embedding sum, as `_merge_input_ids_with_input_values` places them."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    mask = np.asarray(mask, bool)
    n = model.config.num_codebooks
    text = model.embed_text_tokens(tokens[:, n])
    audio = model.backbone_model.embed_tokens(tokens[None, :, :n])[0]
    is_text = torch.as_tensor(mask[:, n] & ~mask[:, :n].any(axis=1))
    assert bool((mask[:, :n].all(axis=1) | is_text.numpy()).all()), "rows must be pure text or pure audio"
    embeds = torch.where(is_text[:, None], text, audio)[None]
    out = model(inputs_embeds=embeds, use_cache=False)
    return out.logits[0].numpy()


@single_thread
@torch.inference_mode()
def hf_depth_logits(model, backbone_last_hidden, frame) -> np.ndarray:
    """Teacher-forced depth-decoder logits [31, vocab] for codebooks 1..31 of one frame [32]."""
    frame = torch.as_tensor(np.asarray(frame), dtype=torch.long)
    ids = torch.cat([torch.zeros(1, dtype=torch.long), frame[:-1]])[None]
    h = torch.as_tensor(np.asarray(backbone_last_hidden), dtype=torch.float32)[None]
    out = model.depth_decoder(input_ids=ids, backbone_last_hidden_state=h, use_cache=False)
    return out.logits[0].numpy()


# ---------------------------------------------------------------------------------------------
# (c) transformers ↔ original names and RoPE layout.
# ---------------------------------------------------------------------------------------------
_LAYER_HF_TO_ORIG = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.output_proj.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "input_layernorm.weight": "sa_norm.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
}
_TOP_HF_TO_ORIG = {
    "embed_text_tokens.weight": "text_embeddings.weight",
    "backbone_model.embed_tokens.embed_audio_tokens.weight": "audio_embeddings.weight",
    "lm_head.weight": "codebook0_head.weight",
    "depth_decoder.codebooks_head.weight": "audio_head",
    "depth_decoder.model.inputs_embeds_projector.weight": "projection.weight",
    "backbone_model.norm.weight": "backbone.norm.scale",
    "depth_decoder.model.norm.weight": "decoder.norm.scale",
}
_STACK_HF_TO_ORIG = {"backbone_model.layers.": "backbone.layers.", "depth_decoder.model.layers.": "decoder.layers."}


def halves_to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert transformers' `permute_for_rope` (which maps row (h, i, j) of each head's
    interleaved pairs to row (h, j, i) of its halves): back to torchtune's layout."""
    rows, cols = w.shape
    hd = rows // num_heads
    return w.reshape(num_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_halves_reference(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """transformers' `permute_for_rope` (for checking the inverse above)."""
    rows, cols = w.shape
    hd = rows // num_heads
    return w.reshape(num_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_original_state_dict(hf_state: dict, args: dict) -> dict[str, torch.Tensor]:
    """transformers CSM parameters → the original checkpoint's names and q/k row order."""
    out = {}
    for name, t in hf_state.items():
        if name.startswith("codec_model.") or name == "depth_decoder.model.embed_tokens.weight":
            continue  # the codec is a separate checkpoint; the depth embedding is tied to the backbone's
        if name in _TOP_HF_TO_ORIG:
            out[_TOP_HF_TO_ORIG[name]] = t
            continue
        for hf_prefix, orig_prefix in _STACK_HF_TO_ORIG.items():
            if name.startswith(hf_prefix):
                idx, rest = name[len(hf_prefix) :].split(".", 1)
                stack = args["backbone" if orig_prefix.startswith("backbone") else "decoder"]
                if rest == "self_attn.q_proj.weight":
                    t = halves_to_interleaved(t, stack["num_heads"])
                elif rest == "self_attn.k_proj.weight":
                    t = halves_to_interleaved(t, stack["num_kv_heads"])
                out[f"{orig_prefix}{idx}.{_LAYER_HF_TO_ORIG[rest]}"] = t
                break
        else:
            raise KeyError(f"unmapped transformers tensor {name}")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def original_from_hf(hf_model, args: dict) -> OriginalCSM:
    """The replica holding exactly the HF model's weights."""
    model = OriginalCSM(args).eval()
    missing, unexpected = model.load_state_dict(hf_to_original_state_dict(hf_model.state_dict(), args), strict=False)
    missing = [m for m in missing if not m.endswith(("kv_cache.k_cache", "kv_cache.v_cache"))]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def save_original(model: OriginalCSM, path: Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file(model.checkpoint_state_dict(), str(path), metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------------
# Names and shapes of both layouts for any size (fake checkpoints at the real CSM-1B shapes).
# ---------------------------------------------------------------------------------------------
def _layer_shapes(stack: dict) -> dict[str, tuple]:
    d, h, hkv = stack["embed_dim"], stack["num_heads"], stack["num_kv_heads"]
    hd, i = d // h, stack["intermediate_dim"]
    return {
        "attn.q_proj.weight": (h * hd, d),
        "attn.k_proj.weight": (hkv * hd, d),
        "attn.v_proj.weight": (hkv * hd, d),
        "attn.output_proj.weight": (d, h * hd),
        "mlp.w1.weight": (i, d),
        "mlp.w2.weight": (d, i),
        "mlp.w3.weight": (i, d),
        "sa_norm.scale": (d,),
        "mlp_norm.scale": (d,),
    }


def original_shapes(args: dict) -> dict[str, tuple]:
    b, d = args["backbone"], args["decoder"]
    nb, v = args["audio_num_codebooks"], args["audio_vocab_size"]
    out = {}
    for prefix, stack in (("backbone", b), ("decoder", d)):
        for n in range(stack["num_layers"]):
            for k, s in _layer_shapes(stack).items():
                out[f"{prefix}.layers.{n}.{k}"] = s
        out[f"{prefix}.norm.scale"] = (stack["embed_dim"],)
    out.update(
        {
            "text_embeddings.weight": (args["text_vocab_size"], b["embed_dim"]),
            "audio_embeddings.weight": (nb * v, b["embed_dim"]),
            "projection.weight": (d["embed_dim"], b["embed_dim"]),
            "codebook0_head.weight": (v, b["embed_dim"]),
            "audio_head": (nb - 1, d["embed_dim"], v),
        }
    )
    return out


def hf_name(original_name: str, *, tied_name: str = "depth_decoder.model.embed_tokens.weight") -> str:
    """The transformers name of an original-layout tensor (the audio table: `tied_name`)."""
    if original_name == "audio_embeddings.weight":
        return tied_name
    top = {v: k for k, v in _TOP_HF_TO_ORIG.items()}
    if original_name in top:
        return top[original_name]
    stack, _, n, rest = original_name.split(".", 3)
    prefix = "backbone_model.layers." if stack == "backbone" else "depth_decoder.model.layers."
    return f"{prefix}{n}.{ {v: k for k, v in _LAYER_HF_TO_ORIG.items()}[rest] }"


def hf_shapes(args: dict, *, tied_name: str = "depth_decoder.model.embed_tokens.weight") -> dict[str, tuple]:
    """The CSM tensors of a transformers `save_pretrained` file (the audio embedding is stored once,
    under the depth decoder's tied name; pass another `tied_name` to mimic other exports)."""
    return {hf_name(k, tied_name=tied_name): s for k, s in original_shapes(args).items()}


def write_json(obj, path: Path) -> Path:
    Path(path).write_text(json.dumps(obj, indent=2))
    return Path(path)
