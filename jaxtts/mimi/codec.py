"""`Mimi`: the user-facing codec. Checks its inputs, pads audio, runs the jitted model functions."""

from __future__ import annotations

import contextlib
import os
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxtts import programs
from jaxtts.buckets import encode_frames
from jaxtts.checkpoint import atomic_directory, is_converted_dir, read_meta, read_params, write_checkpoint
from jaxtts.defaults import jit_cublas  # compile in seconds, not tens of seconds
from jaxtts.errors import JaxttsError
from jaxtts.mimi import model, streaming
from jaxtts.mimi.config import MIMI, MimiConfig

# Module-level so that every Mimi with the same config shares one compilation per input shape; the
# parameters are arguments, not constants baked into the program.
_encode = jit_cublas(model.encode, static_argnames="cfg")
_decode = jit_cublas(model.decode, static_argnames="cfg")
_decode_step = jit_cublas(model.decode_step, static_argnames="cfg", donate_argnames="state")


class Mimi:
    """Kyutai's Mimi codec: 24 kHz mono audio ↔ 12.5 Hz frames of 32 codes (2048 entries each).

    `matmul_precision` is applied around every call ("highest" keeps float32 matmuls and convs exact on
    GPUs, which would otherwise use TF32; None leaves XLA's default).
    """

    def __init__(
        self, params: dict, config: MimiConfig = MIMI, *, dtype=jnp.float32, matmul_precision: str | None = "highest"
    ):
        config.validate()
        self.config = config
        self.dtype = jnp.dtype(dtype)
        # Host arrays converted on the host, then one transfer for the whole tree (~3x faster
        # than one per leaf).
        self.params = jax.device_put(jax.tree.map(lambda a: _as_dtype(a, self.dtype), params))
        self.matmul_precision = matmul_precision
        self._state_init: dict = {}  # batch → jitted builder of a fresh stream state
        self._key: tuple | None = None  # (params, `program_key()`) once computed

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, *, dtype=jnp.float32, **kwargs) -> Mimi:
        """From a directory written by `jaxtts-convert mimi`, or straight from a moshi
        (`tokenizer-….safetensors`) or transformers (`kyutai/mimi`) checkpoint file or directory."""
        path = Path(path)
        if is_converted_dir(path):
            meta = read_meta(path)
            if meta["model"] != "mimi":
                raise JaxttsError(f"{path}: holds a converted {meta['model']!r} model, not Mimi")
            cfg = MimiConfig.from_dict(meta["config"])
            params = read_params(path, model.abstract_params(cfg))
        else:
            from convert.mimi import read_mimi_checkpoint  # the converter sits above the library

            cfg, params = read_mimi_checkpoint(path)
        return cls(params, cfg, dtype=dtype, **kwargs)

    @classmethod
    def random(cls, seed: int = 0, *, config: MimiConfig = MIMI, dtype=jnp.float32, **kwargs) -> Mimi:
        """Random weights of the real sizes (tests, benchmarks, `--random-weights`)."""
        return cls(model.init_params(config, seed), config, dtype=dtype, **kwargs)

    def save(self, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a converted directory that `Mimi.load` reads back."""
        params = jax.tree.map(np.asarray, self.params)
        with atomic_directory(out, overwrite=overwrite) as tmp:
            write_checkpoint(tmp, model="mimi", config=self.config.to_dict(), dtype=self.dtype.name, params=params)
        return Path(out)

    # -- properties ---------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_size(self) -> int:
        """Audio samples per frame of codes (1920 = 80 ms)."""
        return self.config.frame_size

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    @property
    def num_codebooks(self) -> int:
        return self.config.n_q

    @property
    def cardinality(self) -> int:
        return self.config.bins

    # -- encode / decode ----------------------------------------------------------------------

    def encode(self, wav) -> jax.Array:
        """float audio [B, 1, L] at 24 kHz → int32 codes [B, 32, ceil(L / 1920)].

        A partial last frame is padded with zeros at the end, as moshi does. The input is padded
        further to a bucketed length (`jaxtts.buckets.encode_frames`) so that clips of many
        lengths share a few compiled encoders; the encoder is causal, so the codes of the real
        frames do not change, and the codes of the padding are dropped.
        """
        wav = self._check_audio(wav)
        b, _, length = wav.shape
        frames = -(-length // self.frame_size)
        padded = np.zeros((b, encode_frames(frames) * self.frame_size, 1), np.float32)
        padded[:, :length, 0] = wav[:, 0]
        with self._precision():
            key = self.program_key() if programs.usable() else None
            if key is None:
                codes = _encode(self.params, padded, cfg=self.config)
            else:  # from `jaxtts.programs`: a new process skips tracing the encoder
                lower = partial(_encode.lower, self.params, padded, cfg=self.config)
                codes = programs.Program("mimi_encode", (key, padded.shape), lower)(self.params, padded)
        # Cropped on the host: a device slice would be one more program per length.
        return jnp.asarray(np.asarray(codes)[:, :, :frames])

    def decode(self, codes) -> jax.Array:
        """int codes [B, K, T] (K ≤ 32 codebooks) → float32 audio [B, 1, 1920·T]."""
        codes = self._check_codes(codes)
        with self._precision():
            pcm = _decode(self.params, codes, cfg=self.config)
        return _to_channels_first(pcm)

    # -- streaming decode ---------------------------------------------------------------------

    def decode_stream_init(self, batch: int) -> dict:
        """A fresh streaming-decode state for `batch` streams (see jaxtts/mimi/streaming.py)."""
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise JaxttsError(f"batch must be a positive integer; got {batch!r}")
        batch = int(batch)
        if batch not in self._state_init:
            shapes = streaming.state_shapes(self.params, batch, cfg=self.config)
            # One program for the whole state (eagerly, each zeros buffer is its own dispatch).
            self._state_init[batch] = jax.jit(
                lambda: streaming.init_state(self.params, batch, cfg=self.config, shapes=shapes)
            )
        return self._state_init[batch]()

    def lower_stream_step(self, batch: int, frames: int) -> jax.stages.Lowered:
        """The streaming-decode program for `batch` streams and `frames` frames per step, lowered:
        `.compile()` it ahead of its first use (in a thread) and the step reuses it."""
        state = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
            jax.eval_shape(
                lambda: streaming.init_state(
                    self.params,
                    batch,
                    cfg=self.config,
                    shapes=streaming.state_shapes(self.params, batch, cfg=self.config),
                )
            ),
        )
        codes = jax.ShapeDtypeStruct((batch, self.config.n_q, frames), jnp.int32)
        with self._precision():
            return _decode_step.lower(self.params, state, codes, cfg=self.config)

    def stream_step_program(self, batch: int, frames: int) -> programs.Program | None:
        """The streaming-decode program for `batch` streams and `frames` frames per step from
        `jaxtts.programs` (found, or lowered now), for `decode_stream_step(..., program=)`:
        `.compile()` it ahead of its first use (in a thread). None where the store cannot serve
        (parameters off the default device)."""
        with self._precision():
            key = self.program_key() if programs.usable() else None
            if key is None:
                return None
            return programs.Program(
                "mimi_stream_step", (key, batch, frames), partial(self.lower_stream_step, batch, frames)
            )

    def program_key(self) -> str | None:
        """What Mimi's programs depend on besides their inputs' shapes: the config, and each
        parameter's shape and dtype (the matmul precision is part of every program's key). None
        when the parameters are not on the default device."""
        if self._key is None or self._key[0] is not self.params:
            key = None
            if programs.usable(self.params):
                parts = (self.config, programs.signature(self.params))
                key = programs.fingerprint(parts)
            self._key = (self.params, key)
        return self._key[1]

    def decode_stream_step(
        self, state: dict, codes, *, check: bool = True, program: programs.Program | None = None
    ) -> tuple[dict, jax.Array]:
        """Decode the next frames codes [B, K, T] → (new state, float32 audio [B, 1, 1920·T]).

        The state passed in is consumed (its buffers are donated on accelerators): keep only the one
        returned. Concatenating the audio of successive steps equals `decode` of all frames at once.
        check=False skips the range check of the codes (a host round trip), for callers whose
        codes are int32 device arrays already known to lie in [0, 2048). `program`: this step's
        `stream_step_program` instead of the jitted function.
        """
        codes = self._check_codes(codes) if check else codes
        batch = state["upsample"].shape[0]
        if codes.shape[0] != batch:
            raise JaxttsError(f"codes have batch {codes.shape[0]} but the stream state was made for batch {batch}")
        if program is not None:
            state, pcm = program(self.params, state, codes)
        else:
            with self._precision():
                state, pcm = _decode_step(self.params, state, codes, cfg=self.config)
        return state, _to_channels_first(pcm)

    # -- input checks -------------------------------------------------------------------------

    def _precision(self):
        if self.matmul_precision is None:
            return contextlib.nullcontext()
        return jax.default_matmul_precision(self.matmul_precision)

    def _check_codes(self, codes) -> np.ndarray:
        a = np.asarray(codes)
        if a.ndim != 3:
            raise JaxttsError(f"codes must have shape [batch, codebooks, frames]; got shape {a.shape}")
        if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
            raise JaxttsError(f"codes must be integers; got dtype {a.dtype}")
        b, k, t = a.shape
        if b == 0 or t == 0:
            raise JaxttsError(f"codes are empty (shape {a.shape})")
        if not 1 <= k <= self.config.n_q:
            raise JaxttsError(f"codes have {k} codebooks; Mimi decodes 1 to {self.config.n_q}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= self.config.bins:
            raise JaxttsError(f"codes must lie in [0, {self.config.bins}); found {lo if lo < 0 else hi}")
        return a.astype(np.int32)

    def _check_audio(self, wav) -> np.ndarray:
        a = np.asarray(wav)
        if a.ndim != 3 or a.shape[1] != 1:
            raise JaxttsError(f"audio must have shape [batch, 1, samples] (mono); got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise JaxttsError(f"audio must be floating point samples in [-1, 1]; got dtype {a.dtype}")
        if a.shape[0] == 0 or a.shape[2] == 0:
            raise JaxttsError(f"audio is empty (shape {a.shape})")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise JaxttsError("audio contains NaN or infinite samples")
        return a


def _to_channels_first(pcm: jax.Array) -> jax.Array:
    """[B, L, 1] → float32 [B, 1, L]."""
    return jnp.moveaxis(pcm, 2, 1).astype(jnp.float32)


def _as_dtype(a, dtype) -> np.ndarray | jax.Array:
    """`a` in `dtype`: a device array stays on its device, anything else becomes a host array."""
    return a.astype(dtype) if isinstance(a, jax.Array) else np.asarray(a, dtype)
