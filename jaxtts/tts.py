"""Text → speech: the engine users touch.

    tts = jaxtts.load()                                   # weights from the caches
    audio = tts.generate("Hello there.", speaker=0)       # float32 mono PCM at 24 kHz
    tts.save("hello.wav", audio)

A request's prompt is its context segments (text rows + Mimi-code rows each) followed by its own
text rows. Contexts are prefilled one request at a time (so a prepared context is bit-for-bit
the same computation as passing its segments), then the new text rows of all requests are
prefilled together at per-row offsets, and frames are decoded for the whole batch in chunks.
Every row has its own PRNG key: a request gives the same audio alone or in any batch.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxtts import buckets, defaults, programs, validation
from jaxtts.audio import SAMPLE_RATE, load_audio, write_audio
from jaxtts.csm import CSM
from jaxtts.errors import JaxttsError
from jaxtts.generation import (
    DecodeState,
    decode_chunk,
    decode_chunk_program,
    lower_decode_chunk,
    prefill,
    row_keys,
)
from jaxtts.llama import KVCache
from jaxtts.options import DecodeOptions, resolve_options
from jaxtts.prompt import Segment, audio_rows, concat_rows, text_rows, validate_speaker, validate_text
from jaxtts.sampling import Sampler

FRAME_MS = 80
FRAME_SIZE = 1920


@dataclass
class Context:
    """A voice prompt prepared once (`TTS.prepare_context`): its rows and the backbone cache after them."""

    tokens: np.ndarray  # [n, 33]
    mask: np.ndarray  # [n, 33]
    cache: KVCache | None  # batch-1 backbone cache holding the n rows (None when n == 0)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def save(self, path: str | os.PathLike) -> Path:
        """Write this prepared context (rows and cache) to a directory, atomically."""
        from jaxtts.voices import save_context

        return save_context(path, self)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Context:
        from jaxtts.voices import load_context

        return cls(*load_context(path))


@dataclass
class Request:
    text: str
    speaker: int = 0
    context: Context | Sequence[Segment] | None = None
    seed: int | None = None
    max_audio_ms: float = 90_000


def compilation_cache_dir() -> Path | None:
    """Where `enable_compilation_cache` keeps compiled programs: a `jax_compilation_cache_dir` the
    user set, else JAXTTS_COMPILE_CACHE's path, else ~/.cache/jaxtts/xla; None when it is off."""
    setting = os.environ.get("JAXTTS_COMPILE_CACHE", "1")
    if setting == "0":
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    if setting not in ("1", ""):
        return Path(setting)
    from jaxtts.hub import jaxtts_cache

    return jaxtts_cache() / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> None:
    """JAX's persistent compilation cache, on by default in ~/.cache/jaxtts/xla (JAXTTS_COMPILE_CACHE=0: off;
    a path: there). A cache directory the user already gave JAX is left as it is. jaxtts keeps
    its own compiled programs (`jaxtts.programs`) in `jaxtts-programs/` inside it."""
    if os.environ.get("JAXTTS_COMPILE_CACHE", "1") == "0":
        return
    if path is None and jax.config.jax_compilation_cache_dir:
        if "://" not in jax.config.jax_compilation_cache_dir:  # a local directory, not a bucket
            programs.set_directory(Path(jax.config.jax_compilation_cache_dir) / "jaxtts-programs")
        return
    path = path if path is not None else compilation_cache_dir()
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:  # only a speed-up: a read-only home or a mistyped path must not stop speech
        warnings.warn(
            f"compiled programs are not cached: cannot create {path} ({e.strerror or e}); "
            "set JAXTTS_COMPILE_CACHE to a writable directory, or to 0",
            stacklevel=2,
        )
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    programs.set_directory(Path(path) / "jaxtts-programs")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # small programs add up at start-up


def split_sentences(text: str) -> list[str]:
    """Split long text after sentence-ending punctuation (keeping it), dropping empty pieces."""
    parts = re.split(r"(?<=[.!?…。！？])\s+", text.strip())
    return [p for p in (s.strip() for s in parts) if p]


SILENCE_RMS = 1e-3  # ≈ -60 dBFS


def frame_rms(pcm: np.ndarray) -> np.ndarray:
    """RMS of each whole 80 ms frame of `pcm`."""
    n = len(pcm) // FRAME_SIZE
    return np.sqrt(np.mean(pcm[: n * FRAME_SIZE].reshape(n, FRAME_SIZE).astype(np.float64) ** 2, axis=1))


def trailing_silence_frames(pcm: np.ndarray, threshold: float = SILENCE_RMS) -> int:
    """How many whole frames at the end of `pcm` are silent."""
    rms = frame_rms(pcm)
    loud = np.nonzero(rms >= threshold)[0]
    return len(rms) if len(loud) == 0 else len(rms) - 1 - int(loud[-1])


class SilenceGuard:
    """Stops a row once speech has been followed by `limit` silent frames (CSM sometimes runs on
    in silence instead of ending), keeping the first `pause` of them as a natural pause."""

    def __init__(self, limit: int, pause: int = 5, threshold: float = SILENCE_RMS):
        self.limit, self.pause, self.threshold = limit, pause, threshold
        self.silent_run = 0
        self.heard_speech = False

    def frames_to_keep(self, piece: np.ndarray) -> int | None:
        """How many frames of the new `piece` to keep if the row must stop now, else None."""
        for f, rms in enumerate(frame_rms(piece)):
            if rms >= self.threshold:
                self.silent_run, self.heard_speech = 0, True
            else:
                self.silent_run += 1
            if self.heard_speech and self.silent_run >= self.limit:
                # keep up to `pause` silent frames, never frames after this one (limit < pause)
                return min(f + 1, max(0, f + 1 - (self.silent_run - self.pause)))
        return None


class TTS:
    sample_rate = SAMPLE_RATE
    frame_size = FRAME_SIZE

    def __init__(
        self,
        model: CSM,
        codec,
        *,
        tokenizer=None,
        options: DecodeOptions | None = None,
        attention: str | None = None,
        chunk_frames: int = defaults.CHUNK_FRAMES,
        first_chunk_frames: int = defaults.FIRST_CHUNK_FRAMES,
        max_silence_ms: float | None = defaults.MAX_SILENCE_MS,
        progress: bool = False,
    ):
        from jaxtts.tokenizer import default_tokenizer

        if not isinstance(model, CSM):
            raise JaxttsError(f"model must be a jaxtts.CSM (CSM.load(path)), got {type(model).__name__}")
        if not hasattr(codec, "decode_stream_step"):  # Mimi, or a stand-in that decodes like it
            raise JaxttsError(f"codec must be a jaxtts.Mimi (Mimi.load(path)), got {type(codec).__name__}")
        self.model = model
        self.codec = codec
        self.tokenizer = tokenizer or default_tokenizer()
        # How the decode loop is compiled (default: `default_options()` for this device);
        # `attention` alone ("xla" | "pallas" | "pallas_interpret") adjusts the default.
        self.options = resolve_options(options, attention)
        self.chunk_frames = validation.integer("chunk_frames", chunk_frames, low=1, high=256)
        self.first_chunk_frames = validation.integer("first_chunk_frames", first_chunk_frames, low=1, high=256)
        self.max_silence_ms = validation.optional_number("max_silence_ms", max_silence_ms, low=FRAME_MS)
        self.progress = progress
        # The decode / Mimi programs `_run` has made, by signature: finding one again in
        # `jaxtts.programs` costs a hash of its key, lowering it again a trace (~0.15 s for Mimi).
        self._programs: dict = {}

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | os.PathLike | None = None,
        codec: str | os.PathLike | None = None,
        *,
        dtype: str | None = None,
        quantize: str | None = None,
        random_weights: bool = False,
        progress: bool = True,
        **kwargs,
    ) -> TTS:
        """Load CSM and Mimi. With no paths, look in the jaxtts cache, then the Hugging Face cache.

        `quantize="int8"`: the projections and heads as int8 weights with per-column scales, the
        embedding tables with per-row scales (`jaxtts.quantize`; quantized at load time unless the
        checkpoint already is; `dtype` is then that of the activations and norms). An int8 checkpoint loads as int8
        either way. `random_weights=True` builds full-size CSM-1B and Mimi with random weights:
        the whole pipeline runs, but the output is noise (for checking an install or benchmarking).
        """
        from jaxtts.hub import resolve
        from jaxtts.mimi import Mimi
        from jaxtts.quantize import check_method

        enable_compilation_cache()
        dtype = defaults.default_dtype() if dtype is None else dtype
        if dtype not in ("float32", "bfloat16"):
            raise JaxttsError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
        check_method(quantize)
        random_weights = validation.boolean("random_weights", random_weights)
        if random_weights and (model is not None or codec is not None):
            raise JaxttsError("random_weights=True builds its own weights: give it without model/codec paths")
        if not random_weights:  # downloads (with their progress bars) one after the other
            model, codec = resolve("csm", model, progress=progress), resolve("mimi", codec, progress=progress)
        # Mimi and the tokenizer load in threads while CSM loads here (~0.5 s of a new process).
        from jaxtts.tokenizer import default_tokenizer

        tokenizer = kwargs.pop("tokenizer", None)
        with ThreadPoolExecutor(2) as pool:
            mimi = pool.submit(Mimi.random) if random_weights else pool.submit(Mimi.load, codec)
            pending = pool.submit(default_tokenizer) if tokenizer is None else None
            if random_weights:
                from jaxtts.config import CSM_1B

                csm = CSM.random(CSM_1B, dtype=dtype, quantize=quantize)
            else:
                csm = CSM.load(model, dtype=dtype, quantize=quantize)
            mimi, tokenizer = mimi.result(), tokenizer or pending.result()
        return cls(csm, mimi, tokenizer=tokenizer, progress=progress, **kwargs)

    # --- prompts -------------------------------------------------------------------------------
    def _segment_rows(self, seg: Segment):
        parts = [text_rows(self.tokenizer.encode_segment(seg.text, seg.speaker))]
        if seg.codes is not None or seg.audio is not None:
            parts.append(audio_rows(self.encode_segment(seg).codes))
        return concat_rows(parts)

    def encode_segment(self, seg: Segment) -> Segment:
        """The segment with its audio encoded to Mimi codes (itself when it has codes or no audio):
        encode a voice prompt once, then reuse it for many requests without re-encoding."""
        if seg.codes is not None or seg.audio is None:
            return seg
        wav = load_audio(seg.audio)
        # Audio too long for the model's positions is refused anyway: refuse it before Mimi
        # spends minutes encoding it.
        frames, limit = -(-len(wav) // FRAME_SIZE), self.model.cfg.backbone.max_seq_len
        if frames + 1 > limit:
            raise JaxttsError(
                f"context audio of {len(wav) / SAMPLE_RATE:.1f} s ({frames} frames of 80 ms) exceeds the model's "
                f"{limit} positions; trim it to a few seconds"
            )
        codes = np.asarray(self.codec.encode(wav[None, None]))[0]
        return Segment(seg.speaker, seg.text, codes=codes)

    def prepare_context(self, segments: Sequence[Segment] | Segment | None) -> Context:
        """Encode the context's audio with Mimi and prefill the backbone over it, once."""
        if isinstance(segments, Context):
            return segments
        segments = as_segments(segments)
        tokens, mask = concat_rows([self._segment_rows(s) for s in segments])
        n = len(tokens)
        self._check_fits(n, 0, 1)
        if n == 0:
            return Context(tokens, mask, None)
        # In chunks of a fixed size, into a cache of a bucketed length: contexts of many lengths
        # share one prefill program per cache bucket (a new voice-prompt length compiles nothing).
        step = buckets.CONTEXT_CHUNK
        chunks = -(-n // step)
        cache = self.model.backbone_cache(1, buckets.cache_length(chunks * step, self.model.cfg.backbone.max_seq_len))
        tok = np.zeros((chunks * step, tokens.shape[1]), np.int32)
        msk = np.zeros((chunks * step, tokens.shape[1]), bool)
        tok[:n], msk[:n] = tokens, mask
        key = row_keys([0])
        for i in range(chunks):
            rows = slice(i * step, (i + 1) * step)
            cache = prefill(
                self.model,
                tok[None, rows],
                msk[None, rows],
                [min(step, n - i * step)],
                cache=cache,
                start=[i * step],
                key=key,
                opts=self.options,
            ).cache
        return Context(tokens, mask, cache)

    def _check_fits(self, context_len: int, text_len: int, frames: int) -> None:
        limit = self.model.cfg.backbone.max_seq_len
        if context_len + text_len + frames > limit:
            raise JaxttsError(
                f"context ({context_len} rows) + text ({text_len} tokens) + audio ({frames} frames of 80 ms) "
                f"exceeds the model's {limit} positions; shorten the text or context, lower max_audio_ms, "
                f"or use long_form=True"
            )

    # --- the batch decode loop -------------------------------------------------------------------
    def _run(
        self, requests: list[Request], sampler: Sampler, *, streaming: bool = True
    ) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
        """Yield, after each chunk, (new PCM, new frames [n, 32]) of every request (empty once finished).

        streaming=False: every chunk has chunk_frames frames (one decode program instead of two:
        the short first chunk only buys latency for a listener)."""
        model = self.model
        width = model.cfg.frame_width
        contexts = [self.prepare_context(r.context) for r in requests]
        texts = [text_rows(self.tokenizer.encode_segment(r.text, r.speaker)) for r in requests]
        max_frames = [max(1, int(r.max_audio_ms // FRAME_MS)) for r in requests]
        for c, t, f in zip(contexts, texts, max_frames):
            self._check_fits(c.length, len(t[0]), f)
        b = len(requests)
        limit = model.cfg.backbone.max_seq_len
        # Every row's text is padded to the same t_pad rows, written after its own context: the
        # cache must hold each row's padding too (padding slots are overwritten by decoding before
        # any valid query sees them), which can reach past `limit` when a long context sits beside
        # a long text; each row's real positions stay within `limit` (checked above).
        t_pad = buckets.prompt_rows(max(len(t[0]) for t in texts), limit)
        cache_len = buckets.cache_length(
            max(c.length + max(t_pad, len(t[0]) + f) for c, t, f in zip(contexts, texts, max_frames)), limit
        )

        cache = self._stack_caches(contexts, cache_len)
        tok = np.zeros((b, t_pad, width), np.int32)
        msk = np.zeros((b, t_pad, width), bool)
        for i, (t, m) in enumerate(texts):
            tok[i, : len(t)], msk[i, : len(t)] = t, m
        seeds = [r.seed if r.seed is not None else int.from_bytes(os.urandom(4), "little") for r in requests]
        keys = row_keys(seeds)
        first = self.first_chunk_frames if streaming else self.chunk_frames
        # The decode and Mimi programs compile in threads while the prompt's prefill compiles and
        # runs here: a new process pays for the slowest compilation, not for their sum.
        state_shape = DecodeState(
            cache=cache,
            hidden=jax.ShapeDtypeStruct((b, model.cfg.backbone.embed_dim), model.dtype),
            position=jax.ShapeDtypeStruct((b,), jnp.int32),
            key=keys,
            done=jax.ShapeDtypeStruct((b,), jnp.bool_),
        )
        decode, mimi = {}, {}  # frames per chunk → its decode program, its Mimi step program
        for n in {first, self.chunk_frames}:
            key = ("decode", id(model), programs.signature((state_shape, sampler)), n, self.options)
            if key not in self._programs:
                self._programs[key] = decode_chunk_program(
                    model, state_shape, sampler, n, opts=self.options
                ) or lower_decode_chunk(model, state_shape, sampler, n, opts=self.options)
            decode[n] = self._programs[key]
            key = ("mimi", id(self.codec), b, n)
            if key not in self._programs and hasattr(self.codec, "stream_step_program"):  # test stand-ins have none
                self._programs[key] = self.codec.stream_step_program(b, n)
            mimi[n] = self._programs.get(key)
        ahead = [p for p in (*decode.values(), *mimi.values()) if p is not None and not getattr(p, "ready", False)]
        with ThreadPoolExecutor(max(1, len(ahead))) as pool:
            compiled = [pool.submit(p.compile) for p in ahead]
            state = prefill(
                model,
                tok,
                msk,
                [len(t[0]) for t in texts],
                cache=cache,
                start=[c.length for c in contexts],
                key=keys,
                opts=self.options,
            )
            for c in compiled:
                c.result()
        # A jax Lowered (where the store cannot serve) is compiled once: the jitted function reuses it.
        for key, p in self._programs.items():
            if isinstance(p, jax.stages.Lowered):
                self._programs[key] = None
        decode = {n: p if isinstance(p, programs.Program) else None for n, p in decode.items()}
        mimi_step = {  # a stand-in codec (tests) takes no program
            n: partial(self.codec.decode_stream_step, check=False, **({"program": p} if p else {}))
            for n, p in mimi.items()
        }

        stream = self.codec.decode_stream_init(b)
        produced = [0] * b
        finished = [False] * b
        guards = [
            None if self.max_silence_ms is None else SilenceGuard(int(self.max_silence_ms // FRAME_MS))
            for _ in range(b)
        ]
        chunk = first
        from tqdm.auto import tqdm

        bar = tqdm(
            total=max(max_frames) * FRAME_MS / 1000,
            unit="s",
            desc="speaking",
            leave=False,
            bar_format="{desc}: {n:.1f}/{total:.1f} s of audio [{elapsed}<{remaining}]",
            disable=not self.progress,
        )
        while not all(finished):
            state, frames, emitted = decode_chunk(
                model, state, sampler, chunk, opts=self.options, program=decode[chunk]
            )
            # CSM's audio vocabulary (2051) is wider than Mimi's codebooks (2048). A sampled code
            # ≥ 2048 is fed back to the backbone as sampled, but everything that leaves the model
            # (decoded audio, returned frames, contexts built from them) sees it as 0.
            frames, codes = _frames_and_codes(frames, self.codec.cardinality)
            stream, pcm = mimi_step[chunk](stream, codes)
            frames_np, emitted_np, pcm_np = np.asarray(frames), np.asarray(emitted), np.asarray(pcm)[:, 0]
            out = []
            for i in range(b):
                if finished[i]:
                    out.append((np.zeros(0, np.float32), np.zeros((0, frames_np.shape[2]), np.int32)))
                    continue
                valid = emitted_np[:, i]
                n = int(np.argmin(valid)) if not valid.all() else len(valid)
                n = min(n, max_frames[i] - produced[i])
                piece = pcm_np[i, : n * FRAME_SIZE]
                produced[i] += n
                finished[i] = n < len(valid) or produced[i] >= max_frames[i]
                keep = guards[i].frames_to_keep(piece) if guards[i] else None
                if keep is not None:
                    piece, finished[i] = piece[: keep * FRAME_SIZE], True
                out.append((piece, frames_np[: len(piece) // FRAME_SIZE, i]))
            chunk = self.chunk_frames
            bar.update(max(len(p) for p, _ in out) / SAMPLE_RATE)
            yield out
        bar.close()
        del state

    def _stack_caches(self, contexts: list[Context], cache_len: int) -> KVCache:
        rows = [
            self.model.backbone_cache(1, cache_len) if c.cache is None else c.cache.resized(cache_len) for c in contexts
        ]
        return rows[0] if len(rows) == 1 else KVCache.concat(rows)

    # --- public API ------------------------------------------------------------------------------
    def _sampler(self, temperature, top_k, top_p, min_p) -> Sampler:
        return Sampler.create(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)

    def _request(self, text, speaker, context, seed, max_audio_ms) -> Request:
        validate_text(text)
        validate_speaker(speaker)
        max_audio_ms = validation.number("max_audio_ms", max_audio_ms, low=FRAME_MS)  # the fit is checked later
        if not isinstance(context, Context):
            context = as_segments(context)
        return Request(
            text=text, speaker=int(speaker), context=context, seed=validation.seed(seed), max_audio_ms=max_audio_ms
        )

    def stream(
        self,
        text: str,
        speaker: int | None = None,
        context=None,
        *,
        voice: str | None = None,
        max_audio_ms: float = 90_000,
        temperature: float = 0.9,
        top_k: int = 50,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        long_form: bool = False,
    ) -> Iterator[np.ndarray]:
        """Yield float32 PCM chunks as frames are generated (the first after `first_chunk_frames`).

        Arguments are checked before anything runs (see `generate`)."""
        return self._stream(
            text,
            speaker,
            context,
            voice=voice,
            max_audio_ms=max_audio_ms,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
            long_form=long_form,
            streaming=True,
        )

    def _stream(
        self,
        text,
        speaker,
        context,
        *,
        voice,
        max_audio_ms,
        temperature,
        top_k,
        top_p,
        min_p,
        seed,
        long_form,
        streaming: bool,
    ) -> Iterator[np.ndarray]:
        sampler = self._sampler(temperature, top_k, top_p, min_p)
        if voice is not None:  # a stored voice: its speaker (unless given) and its turns before `context`
            from jaxtts.voices import with_voice

            speaker, context = with_voice(voice, speaker, context, codec=self.codec)
        speaker = 0 if speaker is None else speaker
        if validation.boolean("long_form", long_form):
            validate_text(text)
            validate_speaker(speaker)
            validation.number("max_audio_ms", max_audio_ms, low=FRAME_MS)
            if isinstance(context, Context):
                raise JaxttsError("long_form needs the context as Segments, not a prepared Context")
            return self._long_form(
                text, speaker, as_segments(context), max_audio_ms, sampler, validation.seed(seed), streaming
            )
        req = self._request(text, speaker, context, seed, max_audio_ms)
        return (pieces[0][0] for pieces in self._run([req], sampler, streaming=streaming) if len(pieces[0][0]))

    def generate(
        self,
        text: str,
        speaker: int | None = None,
        context=None,
        *,
        voice: str | None = None,
        max_audio_ms: float = 90_000,
        temperature: float = 0.9,
        top_k: int = 50,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        long_form: bool = False,
    ) -> np.ndarray:
        """Speak `text` as `speaker`, continuing `context`: float32 mono PCM at 24 kHz.

        voice: a stored voice (`jaxtts voice add`): its speaker unless `speaker` is given, and its
        turns before `context`. speaker: default the voice's, else 0.
        context: a prepared `Context`, a `Segment` or a list of them. seed: unsigned 32-bit, or
        None for a random one. temperature 0 (or top_k 1) is greedy. max_audio_ms: at least one
        80 ms frame; context + text + audio must fit the model's 2048 positions.
        """
        chunks = list(
            self._stream(
                text,
                speaker,
                context,
                voice=voice,
                max_audio_ms=max_audio_ms,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                seed=seed,
                long_form=long_form,
                streaming=False,
            )
        )
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def generate_batch(
        self,
        requests: Sequence[Request | dict | str],
        *,
        temperature: float = 0.9,
        top_k: int = 50,
        top_p: float | None = None,
        min_p: float | None = None,
        return_frames: bool = False,
    ) -> list:
        """Many requests at once (different lengths and contexts); each row as it would be alone.

        Returns one PCM array per request, or (PCM, Mimi frames [F, 32]) pairs with return_frames.
        """
        sampler = self._sampler(temperature, top_k, top_p, min_p)
        return_frames = validation.boolean("return_frames", return_frames)
        if isinstance(requests, (str, Request, dict)) or not isinstance(requests, Sequence):
            raise JaxttsError(f"requests must be a list of Request, dict or str, got {type(requests).__name__}")
        reqs = []
        for i, r in enumerate(requests):
            if isinstance(r, str):
                r = Request(text=r)
            elif isinstance(r, dict):
                unknown = sorted(set(r) - set(Request.__dataclass_fields__))
                if unknown:
                    raise JaxttsError(
                        f"requests[{i}]: unknown field {unknown[0]!r}; "
                        f"allowed: {', '.join(Request.__dataclass_fields__)}"
                    )
                r = Request(**r)
            elif not isinstance(r, Request):
                raise JaxttsError(f"requests[{i}] must be a Request, dict or str, got {type(r).__name__}")
            reqs.append(self._request(r.text, r.speaker, r.context, r.seed, r.max_audio_ms))
        if not reqs:
            return []
        pcm = [[] for _ in reqs]
        frames = [[] for _ in reqs]
        for out in self._run(reqs, sampler, streaming=False):
            for i, (p, f) in enumerate(out):
                pcm[i].append(p)
                frames[i].append(f)
        audio = [np.concatenate(p) for p in pcm]
        if return_frames:
            return [(a, np.concatenate(f).astype(np.int32)) for a, f in zip(audio, frames)]
        return audio

    def _long_form(self, text, speaker, context, max_audio_ms, sampler, seed, streaming):
        """Sentence by sentence, each continuing from the previous sentence's text and audio."""
        base = [self.encode_segment(s) for s in context]  # the voice prompt is encoded once
        previous: list[Segment] = []
        for n, sentence in enumerate(split_sentences(text)):
            req = self._request(
                sentence,
                speaker,
                base + previous,
                None if seed is None else (seed + n) % (validation.SEED_MAX + 1),
                max_audio_ms,
            )
            frames = []
            for pieces in self._run([req], sampler, streaming=streaming):
                pcm, new_frames = pieces[0]
                frames.append(new_frames)
                if len(pcm):
                    yield pcm
            codes = np.concatenate(frames).T
            # The next sentence hears this one: its own frames, no re-encoding needed.
            previous = [Segment(speaker, sentence, codes=codes)] if codes.shape[1] else []

    @staticmethod
    def save(path: str | os.PathLike, audio: np.ndarray) -> Path:
        """Write 24 kHz mono audio atomically, in the format of the extension (.wav 16-bit, .flac,
        .ogg, .opus, .mp3)."""
        return write_audio(path, audio, SAMPLE_RATE)


def as_segments(context) -> list[Segment]:
    """A context given as None, one Segment, or a list/tuple of Segments → a list of Segments."""
    if context is None:
        return []
    if isinstance(context, Segment):
        return [context]
    if isinstance(context, (list, tuple)):
        for i, s in enumerate(context):
            if not isinstance(s, Segment):
                raise JaxttsError(f"context[{i}] must be a jaxtts.Segment, got {type(s).__name__}")
        return list(context)
    raise JaxttsError(
        f"context must be a jaxtts.Segment, a list of them or a prepared Context, got {type(context).__name__}"
    )


def mimi_codes(frames, cardinality: int = 2048):
    """Frames as Mimi can decode them: codes ≥ `cardinality` (CSM's vocabulary has 2051 entries,
    Mimi's codebooks 2048) become 0. Applied to everything that leaves the model."""
    return jnp.where(frames < cardinality, frames, 0)


@partial(jax.jit, static_argnums=1)
def _frames_and_codes(frames, cardinality: int):
    """A chunk's frames [N, B, 32] as returned (`mimi_codes`) and as Mimi's codes [B, 32, N], in one
    dispatch (eagerly, each op is its own program to compile and launch)."""
    frames = mimi_codes(frames, cardinality)
    return frames, jnp.transpose(frames, (1, 2, 0))


def load(model=None, codec=None, *, dtype: str | None = None, random_weights: bool = False, **kwargs) -> TTS:
    """`jaxtts.load(...)`: see `TTS.load`."""
    return TTS.load(model, codec, dtype=dtype, random_weights=random_weights, **kwargs)
