"""Mimi's sizes. Field names follow moshi's `_seanet_kwargs` / `_transformer_kwargs` / `_quantizer_kwargs`."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from jaxtts.errors import JaxttsError


@dataclass(frozen=True)
class MimiConfig:
    sample_rate: int = 24_000
    channels: int = 1
    # SEANet (moshi lists the ratios in decoder order; the encoder walks them reversed)
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    n_residual_layers: int = 1
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    # Transformers on both sides of the quantizer (at the SEANet frame rate)
    num_layers: int = 8
    num_heads: int = 8
    dim_feedforward: int = 2048
    context: int = 250
    max_period: float = 10_000.0
    norm_eps: float = 1e-5
    # Resampling between the SEANet rate (25 Hz) and the code rate (12.5 Hz)
    frame_rate: float = 12.5
    # Split residual vector quantizer
    n_q: int = 32
    n_q_semantic: int = 1
    bins: int = 2048
    codebook_dim: int = 256
    codebook_eps: float = 1e-5

    @property
    def hop_length(self) -> int:
        """Audio samples per SEANet step."""
        return math.prod(self.ratios)

    @property
    def resample_stride(self) -> int:
        """SEANet steps per code frame (the down/upsampling stride)."""
        return round(self.sample_rate / self.hop_length / self.frame_rate)

    @property
    def frame_size(self) -> int:
        """Audio samples per code frame."""
        return self.hop_length * self.resample_stride

    @property
    def head_dim(self) -> int:
        return self.dimension // self.num_heads

    def validate(self) -> None:
        if self.channels != 1:
            raise JaxttsError("mimi config: only mono (channels=1) is supported")
        steps_per_frame = self.sample_rate / self.hop_length / self.frame_rate
        if self.sample_rate % self.hop_length or steps_per_frame != self.resample_stride:
            raise JaxttsError("mimi config: sample_rate / prod(ratios) / frame_rate must be a whole number")
        if self.dimension % self.num_heads or self.head_dim % 2:
            raise JaxttsError("mimi config: dimension must split into heads of even size")
        if not 0 < self.n_q_semantic < self.n_q:
            raise JaxttsError("mimi config: need 0 < n_q_semantic < n_q")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratios"] = list(self.ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MimiConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise JaxttsError(f"mimi config: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "ratios" in d:
            d["ratios"] = tuple(int(r) for r in d["ratios"])
        try:
            cfg = cls(**d)
        except TypeError as e:
            raise JaxttsError(f"mimi config: {e}") from None
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


MIMI = MimiConfig()
