"""Kyutai's Mimi audio codec in JAX: 24 kHz mono audio ↔ 12.5 Hz frames of 32 codes.

from jaxtts.mimi import Mimi
mimi = Mimi.load("mimi-converted/")          # or a moshi / transformers safetensors file
codes = mimi.encode(wav)                     # float [B, 1, L] → int32 [B, 32, ceil(L/1920)]
audio = mimi.decode(codes)                   # int [B, K≤32, T] → float32 [B, 1, 1920·T]

state = mimi.decode_stream_init(batch)       # streaming decode, see jaxtts/mimi/streaming.py
state, audio = mimi.decode_stream_step(state, codes)
"""

from jaxtts.mimi.codec import Mimi
from jaxtts.mimi.config import MIMI, MimiConfig

__all__ = ["MIMI", "Mimi", "MimiConfig"]
