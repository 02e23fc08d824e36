"""Model configurations. JSON keys mirror the original torchtune builder arguments."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from jaxtts.errors import JaxttsError

# Llama-3 RoPE scaling constants, fixed in torchtune's Llama3ScaledRoPE.
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_OLD_CONTEXT_LEN = 8192


@dataclass(frozen=True)
class LlamaConfig:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    scale_factor: float = 32.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def validate(self, name: str) -> None:
        if self.embed_dim % self.num_heads:
            raise JaxttsError(f"{name}: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise JaxttsError(
                f"{name}: num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )


@dataclass(frozen=True)
class CSMConfig:
    backbone: LlamaConfig
    decoder: LlamaConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051
    audio_num_codebooks: int = 32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> CSMConfig:
        try:
            fields = {f.name for f in dataclasses.fields(LlamaConfig)}
            llama = {}
            for part in ("backbone", "decoder"):
                sub = dict(d[part])
                unknown = set(sub) - fields - {"vocab_size", "attn_dropout"}
                if unknown:
                    raise JaxttsError(f"config {part}: unknown keys {sorted(unknown)}")
                llama[part] = LlamaConfig(**{k: v for k, v in sub.items() if k in fields})
            rest = {k: d[k] for k in ("text_vocab_size", "audio_vocab_size", "audio_num_codebooks") if k in d}
        except KeyError as e:
            raise JaxttsError(f"config: missing key {e}") from None
        except TypeError as e:
            raise JaxttsError(f"config: {e}") from None
        cfg = cls(backbone=llama["backbone"], decoder=llama["decoder"], **rest)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, text: str) -> CSMConfig:
        try:
            return cls.from_dict(json.loads(text))
        except ValueError as e:
            raise JaxttsError(f"config: not valid JSON ({e})") from None

    def validate(self) -> None:
        self.backbone.validate("backbone")
        self.decoder.validate("decoder")
        if self.decoder.max_seq_len < self.audio_num_codebooks:
            raise JaxttsError("decoder.max_seq_len must be at least audio_num_codebooks")

    @property
    def frame_width(self) -> int:
        """Width of one input row: the audio codebooks plus one text column."""
        return self.audio_num_codebooks + 1


CSM_1B = CSMConfig(
    backbone=LlamaConfig(
        num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192, max_seq_len=2048
    ),
    decoder=LlamaConfig(
        num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=1024, intermediate_dim=8192, max_seq_len=32
    ),
)

# Small sizes for tests and experiments: non-default dims, several layers, GQA with kv < heads.
CSM_TINY = CSMConfig(
    backbone=LlamaConfig(
        num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=160, max_seq_len=256
    ),
    decoder=LlamaConfig(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=48, intermediate_dim=96, max_seq_len=32),
    text_vocab_size=128_256,
    audio_vocab_size=2051,
    audio_num_codebooks=32,
)

PRESETS: dict[str, CSMConfig] = {"csm-1b": CSM_1B, "tiny": CSM_TINY}


def preset(name: str) -> CSMConfig:
    if name not in PRESETS:
        raise JaxttsError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
