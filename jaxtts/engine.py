"""The serving engine: one model on one device (or several of one host: `devices=`), many
concurrent streaming requests.

    engine = Engine(jaxtts.load(), max_batch=64)
    engine.warmup()                                     # compile every program up front
    handle = engine.submit("Hello there.", seed=1)      # from any thread
    for pcm in handle: ...                              # float32 24 kHz chunks as they are decoded
    handle = await engine.asubmit("Hi.")                # asyncio
    async for pcm in handle: ...

A background thread owns a *slot pool*: the batched backbone KV cache, decode state and Mimi
stream state of `size` rows, and the table of which request holds which row. Between two decode
chunks (a *chunk boundary*) it retires rows that ended, were cancelled or missed their deadline,
prefills the prompts of newly arrived requests (several in one call) and writes them into free
slots, then decodes the next chunk for the whole pool. Pools come in a few compiled sizes and
grow or shrink with the load; rows move between pools unchanged. Every row has its own PRNG key
and sampling settings, so a request's frames do not depend on its slot, the pool size, the
chunking or its neighbours: with a seed it gets exactly what `TTS.generate` gives alone.
Over several devices the pool's rows are split evenly over them (`jaxtts.sharding`), each device
decoding its own. docs/SERVING.md describes the design.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtts import buckets, defaults, programs, validation
from jaxtts.audio import SAMPLE_RATE, load_audio
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
from jaxtts.mimi import streaming
from jaxtts.options import DecodeOptions
from jaxtts.prompt import Segment, text_rows, validate_speaker, validate_text
from jaxtts.sampling import (  # rows filter exactly as TTS does
    Sampler,
    SplitLogits,
    gumbel_noise,
    min_p_keep,
    top_p_filter,
)
from jaxtts.sharding import BatchMesh, batch_mesh
from jaxtts.tts import (
    FRAME_MS,
    FRAME_SIZE,
    SILENCE_RMS,
    TTS,
    Context,
    as_segments,
    frame_rms,
    mimi_codes,
    split_sentences,
)
from jaxtts.voices import Voice, VoiceStore

POOL_SIZES = (1, 8, 32, 64, 128, 256)


# --------------------------------------------------------------------------- compilation counter

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
_compiles: collections.Counter = collections.Counter()  # thread ident → programs compiled
_compiles_lock = threading.Lock()
_listening = False


def _count_compile(event: str, duration: float, **_) -> None:
    # JAX emits this once per new executable, also when it comes from the persistent cache.
    if event == _BACKEND_COMPILE:
        with _compiles_lock:
            _compiles[threading.get_ident()] += 1


def listen_for_compiles() -> None:
    """Start counting XLA compilations per thread (once per process; `compilations` reads it)."""
    global _listening
    with _compiles_lock:
        if _listening:
            return
        _listening = True
    jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compilations(thread: int | None = None) -> int:
    """Programs compiled so far by the thread with ident `thread` (all threads when None), since
    `listen_for_compiles()` was first called."""
    with _compiles_lock:
        return sum(_compiles.values()) if thread is None else _compiles[thread]


# --------------------------------------------------------------------------- errors and handles


class Busy(JaxttsError):
    """The request queue is full: retry after about `retry_after_s` seconds."""

    def __init__(self, queued: int, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(f"the engine is busy ({queued} requests queued); retry in about {retry_after_s:.1f} s")


QUEUED, RUNNING, DONE, CANCELLED, FAILED, EXPIRED = "queued", "running", "done", "cancelled", "failed", "expired"
_FINAL = (DONE, CANCELLED, FAILED, EXPIRED)


class Handle:
    """One submitted request: its audio as it is decoded, its status, and a way to cancel it.

    Iterate it (blocking, or `async for`) for float32 PCM chunks; the iteration ends when the
    request does, and raises its error if it failed or missed its deadline (a cancelled request
    just ends). `result()` / `frames()` wait for the whole audio / the Mimi frames [F, 32].
    status: "queued", "running", "done", "cancelled", "failed" or "expired" (deadline).
    """

    def __init__(self, engine: Engine, seed: int, deadline_s: float | None):
        self.seed = seed  # the request's seed (drawn at submit when none was given)
        self.submitted_at = time.monotonic()
        self.first_audio_at: float | None = None
        self.finished_at: float | None = None
        self._deadline = None if deadline_s is None else self.submitted_at + deadline_s
        self._engine = engine
        self._cond = threading.Condition()
        self._chunks: list[np.ndarray] = []
        self._frames: list[np.ndarray] = []
        self._status = QUEUED
        self._error: Exception | None = None
        self._cancel_requested = False
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # --- user side ---------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._status

    @property
    def error(self) -> Exception | None:
        return self._error

    @property
    def audio_seconds(self) -> float:
        """Seconds of audio delivered so far."""
        with self._cond:
            return sum(len(c) for c in self._chunks) / SAMPLE_RATE

    def done(self) -> bool:
        return self._status in _FINAL

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the request has ended; False on timeout."""
        with self._cond:
            return self._cond.wait_for(self.done, timeout)

    def cancel(self) -> bool:
        """Stop the request: a queued one never starts, a running one frees its slot at the next
        chunk boundary. False when it had already ended."""
        return self._engine._cancel(self)

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._chunks) > i or self.done())
                if len(self._chunks) > i:
                    chunk = self._chunks[i]
                else:
                    self._raise_if_failed()
                    return
            i += 1
            yield chunk

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        i = 0
        while True:
            with self._cond:
                ready = len(self._chunks) > i
                if ready:
                    chunk = self._chunks[i]
                elif self.done():
                    self._raise_if_failed()
                    return
                else:
                    event = asyncio.Event()
                    self._async_waiters.append((asyncio.get_running_loop(), event))
            if ready:
                i += 1
                yield chunk
            else:
                await event.wait()

    def result(self, timeout: float | None = None) -> np.ndarray:
        """The whole PCM once the request is done (raises its error, or if cancelled)."""
        self._wait_done(timeout)
        with self._cond:
            return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)

    def frames(self, timeout: float | None = None) -> np.ndarray:
        """The Mimi frames [F, 32] int32 of the whole answer (what `result()` decodes)."""
        self._wait_done(timeout)
        with self._cond:
            return np.concatenate(self._frames).astype(np.int32) if self._frames else np.zeros((0, 32), np.int32)

    def _wait_done(self, timeout):
        if not self.wait(timeout):
            raise TimeoutError(f"request still {self._status} after {timeout} s")
        if self._status == CANCELLED:
            raise JaxttsError("the request was cancelled")
        self._raise_if_failed()

    def _raise_if_failed(self):
        if self._status in (FAILED, EXPIRED):
            raise self._error

    def __repr__(self):
        return f"<Handle {self._status} {self.audio_seconds:.2f} s>"

    # --- engine side -------------------------------------------------------------------------
    def _push(self, pcm: np.ndarray, frames: np.ndarray) -> None:
        with self._cond:
            if self.first_audio_at is None:
                self.first_audio_at = time.monotonic()
            self._chunks.append(pcm)
            self._frames.append(frames)
            self._notify()

    def _set_status(self, status: str, error: Exception | None = None) -> bool:
        """Move to `status` unless already final. True if it moved."""
        with self._cond:
            if self.done():
                return False
            self._status, self._error = status, error
            if status in _FINAL:
                self.finished_at = time.monotonic()
            self._notify()
            return True

    def _notify(self):
        self._cond.notify_all()
        for loop, event in self._async_waiters:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(event.set)
        self._async_waiters.clear()


# --------------------------------------------------------------------------- per-row sampling


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RowSampler:
    """Sampling settings per row of a pool ([B] arrays), each row filtered and drawn with exactly
    `Sampler`'s arithmetic: a row samples as it would alone with `Sampler.create(...)` of its
    request. Every setting is traced, so one compiled program serves every mix of requests of
    the same `filters` kind.

    `filters` (static: part of the compiled program) says whether any row may use top-p or min-p.
    It is decided on the host, not with a `lax.cond` in the draw: XLA's GPU conditional copies its
    predicate to the host and waits, and a draw runs 32 times a frame."""

    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32; 0 keeps every code, 1 is greedy
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32
    use_top_p: jax.Array  # [B] bool
    use_min_p: jax.Array  # [B] bool
    filters: bool = field(default=True, metadata=dict(static=True))

    def noise(self, keys, vocab: int):
        return gumbel_noise(keys, vocab)  # greedy rows draw it too (and ignore it): keys advance alike

    def draw(self, logits, noise, step, opts: DecodeOptions | None = None):
        opts = opts or DecodeOptions()
        rows = logits.parts.shape[1] if isinstance(logits, SplitLogits) else logits.shape[0]
        # The sampling kernel takes each row's temperature and top-k; top-p and min-p rows take
        # the XLA draw (the whole pool, while any such row is in it).
        if self.filters or not opts.uses_sample_kernel(rows):
            return self._draw_xla(logits, noise, step, opts)
        return self._draw_kernel(logits, noise, step, opts)

    def _draw_kernel(self, logits, noise, step, opts: DecodeOptions):
        from pallas_kernels.sample_top_k import sample_top_k

        split = logits if isinstance(logits, SplitLogits) else None
        return sample_top_k(
            logits.parts if split else logits.astype(jnp.float32),
            noise,
            step,
            self.temperature,
            top_k=self.top_k,
            sumsq=split.sumsq if split else None,
            norm_dim=split.norm_dim if split else 1,
            eps=split.eps if split else 0.0,
            interpret=opts.interpret,
        )

    def _draw_xla(self, logits, noise, step, opts: DecodeOptions):
        if isinstance(logits, SplitLogits):
            logits = logits.finish()
        greedy = jnp.argmax(logits.astype(jnp.float32), axis=-1)
        sampled = jnp.argmax(self.filtered(logits, opts.top_k_method) + noise[step], axis=-1)
        return jnp.where(self.top_k == 1, greedy, sampled).astype(jnp.int32)

    def filtered(self, logits, top_k_method: str = "sort"):
        logits = logits.astype(jnp.float32) / self.temperature[:, None]
        logits = jnp.where(self._top_k_keep(logits, top_k_method), logits, -jnp.inf)
        if not self.filters:  # top-p and min-p cost a sort / softmax per draw
            return logits
        return self._min_p(self._top_p(logits))

    def _top_k_keep(self, logits, method: str):
        vocab = logits.shape[-1]
        k = self.top_k[:, None]
        if method == "sort":  # the k-th largest value, as lax.top_k's last one
            kth = jnp.take_along_axis(jnp.sort(logits, axis=-1), jnp.clip(vocab - k, 0, vocab - 1), axis=-1)
            keep = logits >= kth
        else:  # "rank": fewer than k entries strictly larger (Sampler's rank method)
            keep = jnp.sum(logits[..., None, :] > logits[..., :, None], axis=-1, dtype=jnp.int32) < k
        return keep | (k <= 0) | (k >= vocab)

    def _top_p(self, logits):
        return jnp.where(self.use_top_p[:, None], top_p_filter(logits, self.top_p[:, None]), logits)

    def _min_p(self, logits):
        keep = min_p_keep(logits, self.min_p[:, None])
        return jnp.where(self.use_min_p[:, None], jnp.where(keep, logits, -jnp.inf), logits)


class _SamplerTable:
    """The host copy of a pool's per-row sampling settings (free rows keep harmless defaults)."""

    FIELDS = ("temperature", "top_k", "top_p", "min_p", "use_top_p", "use_min_p")
    DTYPES = (np.float32, np.int32, np.float32, np.float32, bool, bool)
    FREE = (1.0, 0, 1.0, 0.0, False, False)

    def __init__(self, size: int, mesh: BatchMesh | None = None):
        self.columns = {f: np.full(size, v, d) for f, d, v in zip(self.FIELDS, self.DTYPES, self.FREE)}
        self.mesh = mesh
        self._device: RowSampler | None = None

    def set(self, slot: int, s: Sampler) -> None:
        for name, value in zip(self.FIELDS, (s.temperature, s.top_k, s.top_p, s.min_p, s.use_top_p, s.use_min_p)):
            self.columns[name][slot] = value
        self._device = None

    def gather(self, index: list[int]) -> _SamplerTable:
        out = _SamplerTable(len(index), self.mesh)
        out.columns = {name: col[index] for name, col in self.columns.items()}
        return out

    def device(self) -> RowSampler:
        if self._device is None:
            put = jax.device_put if self.mesh is None else self.mesh.put_rows
            filters = bool(self.columns["use_top_p"].any() or self.columns["use_min_p"].any())
            self._device = RowSampler(**{name: put(col) for name, col in self.columns.items()}, filters=filters)
        return self._device


# --------------------------------------------------------------------------- device programs
# Module-level jitted functions: every engine over the same model shares their compilations.


@partial(jax.jit, static_argnames=("cfg", "size", "length", "dtype", "mesh", "axis"))
def _blank_state(
    cfg, size: int, length: int, dtype, mesh: BatchMesh | None = None, axis: int | None = 0
) -> DecodeState:
    """A pool of `size` free rows (done: a free row never advances). Under a `mesh`, made in place
    on its devices: rows split (axis 0), or replicated (axis None: prompt rows)."""
    shape = (size, length, cfg.num_kv_heads, cfg.head_dim)
    cache = KVCache(
        k=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        v=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
    )
    state = DecodeState(
        cache=cache,
        hidden=jnp.zeros((size, cfg.embed_dim), dtype),
        position=jnp.zeros((size,), jnp.int32),
        key=jax.vmap(jax.random.key)(jnp.zeros(size, jnp.uint32)),
        done=jnp.ones((size,), bool),
    )
    return state if mesh is None else mesh.constrain(state, axis)


@partial(jax.jit, static_argnames=("size", "mesh"))
def _blank_mimi(row_state, size: int, mesh: BatchMesh | None = None):
    """`size` fresh Mimi streams, each with its own state (including its own time offset)."""
    mimi = jax.tree.map(lambda a: jnp.zeros((size, *a.shape), a.dtype), row_state)
    return mimi if mesh is None else mesh.constrain(mimi)


@partial(jax.jit, static_argnames=("cfg", "length", "dtype", "mesh"))
def _blank_row(cfg, length: int, dtype, mesh: BatchMesh):
    """`CSM.backbone_cache(1, length)` made replicated on the mesh's devices (a prompt row)."""
    shape = (1, length, cfg.num_kv_heads, cfg.head_dim)
    cache = KVCache(
        k=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        v=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
    )
    return mesh.constrain(cache, None)


@partial(jax.jit, static_argnames="mesh", donate_argnames=("pool", "mimi"))
def _insert(pool: DecodeState, mimi, rows: DecodeState, slots, mesh: BatchMesh | None = None):
    """Write prefilled rows into the pool at `slots` (an index ≥ the pool size drops that row)
    and start a fresh Mimi stream in each of those slots. (Under a `mesh` the prefilled rows are
    replicated and each device writes those that land in its own rows.)"""
    length = pool.cache.k[0].shape[1]
    put = lambda dst, src: dst.at[slots].set(src, mode="drop")
    cache = jax.tree.map(lambda d, s: put(d, s[:, :length]), pool.cache, rows.cache)
    state = DecodeState(
        cache=cache,
        hidden=put(pool.hidden, rows.hidden),
        position=put(pool.position, rows.position),
        key=put(pool.key, rows.key),
        done=put(pool.done, rows.done),
    )
    mimi = jax.tree.map(lambda a: a.at[slots].set(jnp.zeros((), a.dtype), mode="drop"), mimi)
    return (state, mimi) if mesh is None else mesh.constrain((state, mimi))


@partial(jax.jit, static_argnames="mesh")
def _gather(pool: DecodeState, mimi, index, live, mesh: BatchMesh | None = None):
    """A pool whose row i is row index[i] of `pool` (exact copies); rows not `live` are free.
    (Under a `mesh`, XLA moves the rows between devices.)"""
    state = jax.tree.map(lambda a: a[index], pool)
    out = dataclasses.replace(state, done=state.done | ~live), jax.tree.map(lambda a: a[index], mimi)
    return out if mesh is None else mesh.constrain(out)


@partial(jax.jit, static_argnames=("cfg", "cardinality", "mesh"), donate_argnames="mimi")
def _decode_audio(params, mimi, frames, *, cfg, cardinality: int, mesh: BatchMesh | None = None):
    """Frames [N, B, 32] of a chunk → (Mimi state, frames as Mimi codes, PCM [B, N·1920]).

    Each row decodes in its own stream (vmap over rows): Mimi's state keeps one time offset per
    stream, and a row that joined the pool later is at an earlier point of its stream. Under a
    `mesh` each device decodes its own rows."""

    def rows(params, mimi, frames):
        frames = mimi_codes(frames, cardinality)
        codes = jnp.transpose(frames, (1, 2, 0))  # [B, 32, N]

        def one_row(state, row_codes):
            state, pcm = streaming.decode_step(params, state, row_codes[None], cfg=cfg)
            return state, pcm[0, :, 0].astype(jnp.float32)

        mimi, pcm = jax.vmap(one_row)(mimi, codes)
        return mimi, frames, pcm

    if mesh is not None:
        rows = mesh.per_row(rows, in_axes=(None, 0, 1), out_axes=(0, 1, 0))
    return rows(params, mimi, frames)


def _precision(codec):
    """The matmul precision Mimi runs its own calls under (part of the compiled program)."""
    precision = getattr(codec, "matmul_precision", None)
    return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


# --------------------------------------------------------------------------- requests and the pool


class _SilenceHold:
    """`SilenceGuard`'s rule applied frame by frame, so that what a row keeps does not depend on
    where chunks end: after speech, silent frames beyond the first `pause` are held back, sent if
    speech resumes, dropped when `limit` silent frames stop the row. (The guard alone cannot take
    back silence it let through in an earlier chunk.) A row gets what the guard gives the whole
    utterance at once: up to `pause` frames of silence after its last speech."""

    def __init__(self, limit: int, pause: int = 5, threshold: float = SILENCE_RMS):
        self.limit, self.pause, self.threshold = limit, pause, threshold
        self.silent_run, self.heard_speech = 0, False
        self.held: list[tuple[np.ndarray, np.ndarray]] = []  # (pcm, frame) held back

    def take(self, pcm: np.ndarray, frames: np.ndarray, last: bool) -> tuple[np.ndarray, np.ndarray, bool]:
        """(PCM, frames) to send now out of a chunk's, and whether silence stops the row. `last`:
        the row ends with this chunk anyway, so held frames are sent."""
        out = []
        for f, rms in enumerate(frame_rms(pcm)):
            frame = (pcm[f * FRAME_SIZE : (f + 1) * FRAME_SIZE], frames[f : f + 1])
            if rms >= self.threshold:
                self.silent_run, self.heard_speech = 0, True
                out, self.held = out + self.held + [frame], []
                continue
            self.silent_run += 1
            (self.held if self.heard_speech and self.silent_run > self.pause else out).append(frame)
            if self.heard_speech and self.silent_run >= self.limit:
                self.held = []
                return _joined(out, frames) + (True,)
        if last:
            out, self.held = out + self.held, []
        return _joined(out, frames) + (False,)


def _joined(pieces, frames) -> tuple[np.ndarray, np.ndarray]:
    if not pieces:
        return np.zeros(0, np.float32), frames[:0]
    return np.concatenate([p for p, _ in pieces]), np.concatenate([f for _, f in pieces])


@dataclass(eq=False)
class _LongForm:
    """A long text spoken sentence by sentence through one handle."""

    sentences: list[tuple[str, np.ndarray, np.ndarray]]  # (text, token rows, mask rows)
    base: list[Segment]  # the voice's / caller's context
    base_len: int
    speaker: int
    index: int = 0
    encoded: bool = False  # base audio encoded to codes (once, on the engine thread)
    history: list[tuple[Segment, int]] = field(default_factory=list)  # previous sentences, rows; newest last


@dataclass(eq=False)
class _Job:
    """One prompt to decode: a request, or one sentence of a long-form request."""

    handle: Handle
    tokens: np.ndarray  # text rows [t, 33]
    mask: np.ndarray
    context: Context | list[Segment]  # prepared on the engine thread before prefill
    context_len: int
    seed: int
    sampler: Sampler
    max_frames: int
    voice_key: tuple | None = None  # the prepared-context cache key of a stored voice
    long_form: _LongForm | None = None
    slot: int | None = None
    produced: int = 0
    frames: list[np.ndarray] = field(default_factory=list)
    guard: _SilenceHold | None = None
    started_at: float = 0.0


@dataclass
class _Chunk:
    """A decode chunk on its way: the job of each row when it was dispatched, and its outputs."""

    jobs: list
    frames: jax.Array
    emitted: jax.Array
    pcm: jax.Array


class _Pool:
    """`size` decode rows on the device (state, Mimi streams, sampling settings) and the job
    holding each row (None: free)."""

    def __init__(
        self, size: int, state: DecodeState, mimi, table: _SamplerTable | None = None, mesh: BatchMesh | None = None
    ):
        self.size, self.state, self.mimi, self.mesh = size, state, mimi, mesh
        self.jobs: list[_Job | None] = [None] * size
        self.table = table or _SamplerTable(size, mesh)

    @property
    def live(self) -> int:
        return sum(j is not None for j in self.jobs)

    def free_slots(self) -> list[int]:
        return [s for s, j in enumerate(self.jobs) if j is None]

    def insert(self, rows: DecodeState, jobs: list[_Job | None]) -> None:
        """Write prefilled rows (row i for jobs[i]; None and padding rows are dropped) into free slots."""
        free = iter(self.free_slots())
        slots = np.full(rows.hidden.shape[0], self.size, np.int32)
        for i, job in enumerate(jobs):
            if job is not None:
                slots[i] = job.slot = next(free)
                self.jobs[job.slot] = job
                self.table.set(job.slot, job.sampler)
        self.state, self.mimi = _insert(self.state, self.mimi, rows, self._put(slots), self.mesh)

    def release(self, job: _Job) -> None:
        # The row keeps computing (ignored) until a new prompt overwrites it: rows never interact.
        self.jobs[job.slot] = None
        job.slot = None

    def moved(self, size: int) -> _Pool:
        """This pool's live rows, exactly, in a pool of `size` (≥ live) rows."""
        live = [s for s, j in enumerate(self.jobs) if j is not None]
        index = live + [0] * (size - len(live))
        mask = np.arange(size) < len(live)
        state, mimi = _gather(self.state, self.mimi, self._put(np.asarray(index, np.int32)), self._put(mask), self.mesh)
        pool = _Pool(size, state, mimi, self.table.gather(index), self.mesh)
        for new_slot, old_slot in enumerate(live):
            pool.jobs[new_slot] = self.jobs[old_slot]
            pool.jobs[new_slot].slot = new_slot
        return pool

    def _put(self, a: np.ndarray) -> jax.Array:
        """A small host array (slot indices) on the device, or on every device of the mesh."""
        return jax.device_put(a) if self.mesh is None else self.mesh.replicate(a)


class _ContextLRU:
    """Prepared contexts of stored voices, least recently used dropped beyond `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict[tuple, Context] = collections.OrderedDict()

    @staticmethod
    def size(ctx: Context) -> int:
        return 0 if ctx.cache is None else sum(a.nbytes for a in jax.tree.leaves(ctx.cache))

    def get(self, key) -> Context | None:
        ctx = self.entries.get(key)
        if ctx is not None:
            self.entries.move_to_end(key)
        return ctx

    def put(self, key, ctx: Context) -> None:
        self.entries[key] = ctx
        self.entries.move_to_end(key)
        while len(self.entries) > 1 and sum(map(self.size, self.entries.values())) > self.max_bytes:
            self.entries.popitem(last=False)

    @property
    def bytes(self) -> int:
        return sum(map(self.size, self.entries.values()))


def _pool_sizes(sizes, max_batch: int, mesh: BatchMesh | None = None) -> tuple[int, ...]:
    """The compiled pool sizes up to max_batch (always one). Over a mesh each size is rounded up
    to a multiple of the device count: a pool's rows are split evenly over the devices (each
    holds size / devices rows; `jax.shard_map` and a rows-split NamedSharding need an even split),
    so (1, 8, 32, 64) on 3 devices is (3, 9, 33, 66), on 8 devices (8, 32, 64)."""
    up = (lambda n: n) if mesh is None else mesh.round_up
    out = sorted({up(int(s)) for s in sizes if 1 <= int(s) <= max_batch} | {up(max_batch)})
    return tuple(out)


def _group_sizes(max_prefill: int) -> tuple[int, ...]:
    """Prefill batch buckets: powers of two up to `max_prefill`, and `max_prefill` itself."""
    return tuple(sorted({min(1 << i, max_prefill) for i in range(max_prefill.bit_length() + 1)}))


def _bucket(n: int, sizes) -> int:
    return next(s for s in sizes if s >= n)


# --------------------------------------------------------------------------- the engine


class Engine:
    """Continuous-batching TTS server for one model on one device (a background thread).

    tts_or_model_parts: a `TTS` (its model, codec, tokenizer, DecodeOptions and silence limit are
    used), or (model, codec[, tokenizer]) with `options` / `max_silence_ms` given here.
    max_batch: the most rows decoded together; pool_sizes: the compiled pool sizes (capped at
    max_batch, which is always one). queue_limit: requests waiting for a slot before `submit`
    raises `Busy`. chunk_frames / first_chunk_frames: frames per decode call, and per call while
    a new row waits for its first audio. max_prefill: prompts prefilled in one call.
    voices: a `VoiceStore` (or its root) for `submit(voice=NAME)`; context_cache_bytes bounds the
    prepared voice contexts kept on the device. long_form_history: previous sentences a long-form
    sentence hears (newest first, as many as fit). shrink_after: chunk boundaries a smaller pool
    must suffice before the pool shrinks.
    devices: None (the default device), "all" (every local device), a count N (the first N local
    devices) or a list of `jax.Device`s. Over several devices the weights are replicated onto each
    (in place: the TTS given then computes on all of them) and every pool's rows are split evenly
    over them (`jaxtts.sharding`), each device decoding its own rows; max_batch and the pool
    sizes are rounded up to multiples of the device count. A request's frames are the same as on
    one device.
    run_ahead: keep the next chunk decoding on the device while the host hands out the current
    one (hides the host's share of a chunk; a request joining the batch may then wait for the
    chunk already on its way). Each request's frames are the same either way. Off by default
    until measured on a GPU (`python -m benchmarks.serving --run-ahead`).
    """

    def __init__(
        self,
        tts_or_model_parts,
        *,
        max_batch: int = 64,
        pool_sizes=POOL_SIZES,
        queue_limit: int = 256,
        chunk_frames: int = defaults.CHUNK_FRAMES,
        first_chunk_frames: int = defaults.FIRST_CHUNK_FRAMES,
        max_prefill: int = 8,
        voices: VoiceStore | str | os.PathLike | None = None,
        context_cache_bytes: int = 1 << 30,
        long_form_history: int = 1,
        shrink_after: int = 8,
        options: DecodeOptions | None = None,
        max_silence_ms: float | None = defaults.MAX_SILENCE_MS,
        devices=None,
        run_ahead: bool = False,
    ):
        self.tts = _as_tts(tts_or_model_parts, options, max_silence_ms)
        self.run_ahead = validation.boolean("run_ahead", run_ahead)
        self.mesh = batch_mesh(devices)
        self.max_batch = validation.integer("max_batch", max_batch, low=1, high=4096)
        if self.mesh is not None:
            self.max_batch = self.mesh.round_up(self.max_batch)  # see _pool_sizes
            _replicate_weights(self.tts, self.mesh)
        self.pool_sizes = _pool_sizes(pool_sizes, self.max_batch, self.mesh)
        self.queue_limit = validation.integer("queue_limit", queue_limit, low=0)
        self.chunk_frames = validation.integer("chunk_frames", chunk_frames, low=1, high=256)
        self.first_chunk_frames = validation.integer("first_chunk_frames", first_chunk_frames, low=1, high=256)
        self.max_prefill = min(validation.integer("max_prefill", max_prefill, low=1), self.max_batch)
        self.group_sizes = _group_sizes(self.max_prefill)
        self.long_form_history = validation.integer("long_form_history", long_form_history, low=0)
        self.shrink_after = validation.integer("shrink_after", shrink_after, low=1)
        self.voices = voices if isinstance(voices, VoiceStore) or voices is None else VoiceStore(voices)
        self._contexts = _ContextLRU(validation.integer("context_cache_bytes", context_cache_bytes, low=0))

        model = self.tts.model
        self.limit = model.cfg.backbone.max_seq_len
        # Prompt rows are prefilled in a cache of twice the limit: a row's text padding (up to the
        # limit) may run past its real rows; only the first `limit` slots move into the pool.
        self._prefill_len = 2 * self.limit
        self._mimi_row = self.tts.codec.decode_stream_init(1)
        # (pool size, frames per chunk, filters) → (decode chunk, Mimi) programs from
        # `jaxtts.programs` (a restarted server loads them), or None (a mesh: jitted functions).
        self._pool_programs: dict[tuple, tuple | None] = {}
        self._pool_audio: dict[tuple, programs.Program | None] = {}  # (pool size, frames) → Mimi program

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[_Job] = collections.deque()
        self._tasks: list = []
        self._closing = False
        self._pool: _Pool | None = None
        self._ahead: _Chunk | None = None  # the chunk decoding ahead on the device (see _decode)
        self._admitting: list[_Job] = []  # taken off the queue, not yet in a slot
        self._small_streak = 0
        self._service_s = 1.0  # running mean of request service time (admission to end), for Busy
        self.completed = 0  # requests done
        self.frame_steps = 0  # frames decoded for the whole pool (one per row per frame)
        # Where the engine thread's time goes (seconds, counts), for stats() and the benchmarks.
        self.timings = collections.Counter()
        # The latest pool moves (from size, to size, live rows moved) and how many there were.
        self.resizes: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=64)
        self.resize_count = 0
        listen_for_compiles()
        self._thread = threading.Thread(target=self._serve, name="jaxtts-engine", daemon=True)
        self._thread.start()

    # --- public API --------------------------------------------------------------------------
    def submit(
        self,
        text: str,
        voice: str | Voice | None = None,
        speaker: int | None = None,
        context=None,
        seed: int | None = None,
        temperature: float = defaults.TEMPERATURE,
        top_k: int | None = defaults.TOP_K,
        top_p: float | None = None,
        min_p: float | None = None,
        max_audio_ms: float = defaults.MAX_AUDIO_MS,
        long_form: bool = False,
        deadline_s: float | None = None,
    ) -> Handle:
        """Queue a request; returns its `Handle` at once. Callable from any thread.

        voice: a stored voice's name (or a `Voice`): its context segments come first, and its
        speaker is the default `speaker` (else 0). context: Segments (after the voice's) or a
        prepared `Context`. seed: unsigned 32-bit (None: random, see `Handle.seed`); with a seed
        the frames are exactly `TTS.generate`'s. deadline_s: the request ends ("expired") if not
        finished this many seconds after submission. Bad arguments, and a prompt that cannot
        fit the model's positions, raise `JaxttsError` here; a full queue raises `Busy`.
        """
        job = self._make_job(
            text, voice, speaker, context, seed, temperature, top_k, top_p, min_p, max_audio_ms, long_form, deadline_s
        )
        with self._lock:
            if self._closing:
                raise JaxttsError("the engine is closed")
            if len(self._queue) >= self.queue_limit:
                raise Busy(len(self._queue), self._retry_after())
            self._queue.append(job)
            self._wake.notify()
        return job.handle

    async def asubmit(self, text: str, **kwargs) -> Handle:
        """`submit` for asyncio code (argument checks and audio loading run off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(None, partial(self.submit, text, **kwargs))

    def warmup(self, *, text_tokens: int | None = None, context_rows: int | None = None, encode: bool = True) -> dict:
        """Compile every program serving can run, so that nothing compiles afterwards: each pool
        size's decode chunks, Mimi steps, inserts and moves; the prompt prefills of every group
        size and text bucket up to `text_tokens`; context prefills up to `context_rows` rows (and,
        with `encode`, Mimi encodes of context audio that long). Both default to the model's
        limit. Returns {"seconds", "compilations"}."""
        text_tokens = self.limit if text_tokens is None else validation.integer("text_tokens", text_tokens, low=1)
        context_rows = self.limit if context_rows is None else validation.integer("context_rows", context_rows, low=1)
        return self._call(
            partial(self._warmup, min(text_tokens, self.limit), min(context_rows, self.limit - 1), bool(encode))
        )

    def stats(self) -> dict:
        with self._lock:
            queued = len(self._queue)
        pool = self._pool
        return {
            "devices": 1 if self.mesh is None else self.mesh.size,
            "pool_size": pool.size if pool else 0,
            "live": pool.live if pool else 0,
            "queued": queued,
            "completed": self.completed,
            "frame_steps": self.frame_steps,
            "resizes": self.resize_count,
            "compilations": compilations(self._thread.ident),
            "context_cache_bytes": self._contexts.bytes,
            # admit_s: preparing contexts, prefilling and inserting new rows (prefills: calls);
            # wait_s: waiting for a chunk's frames and audio; deliver_s: handing them out;
            # chunks / chunk_frames: decode calls and the frames they decoded per row.
            **{k: round(v, 6) if k.endswith("_s") else v for k, v in sorted(self.timings.items())},
        }

    @property
    def running(self) -> bool:
        """Whether the engine's thread is serving (False once closed, or if it died)."""
        return self._thread.is_alive()

    @property
    def compilations(self) -> int:
        """XLA programs compiled on the engine's thread so far (warmup included)."""
        return compilations(self._thread.ident)

    def close(self, timeout: float | None = 60) -> None:
        """Stop serving: queued and running requests end as cancelled."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- request building (caller's thread) ---------------------------------------------------
    def _make_job(
        self, text, voice, speaker, context, seed, temperature, top_k, top_p, min_p, max_audio_ms, long_form, deadline_s
    ) -> _Job:
        validate_text(text)
        sampler = Sampler.create(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        max_frames = max(1, int(validation.number("max_audio_ms", max_audio_ms, low=FRAME_MS) // FRAME_MS))
        seed = validation.seed(seed)
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        deadline_s = validation.optional_number("deadline_s", deadline_s, low=0.0, low_open=True)
        long_form = validation.boolean("long_form", long_form)
        voice = self._voice(voice)
        if speaker is None:
            speaker = voice.speaker if voice is not None else 0
        validate_speaker(speaker)
        speaker = int(speaker)
        handle = Handle(self, seed, deadline_s)
        common = dict(handle=handle, seed=seed, sampler=sampler, max_frames=max_frames)
        if isinstance(context, Context):
            if voice is not None or long_form:
                raise JaxttsError("a prepared Context goes alone: give the voice / long_form context as Segments")
            tokens, mask = self._text_rows(text, speaker)
            self._check_fits(context.length, len(tokens), max_frames)
            return _Job(tokens=tokens, mask=mask, context=context, context_len=context.length, **common)
        segments = (voice.segments if voice is not None else []) + [_loaded(s) for s in as_segments(context)]
        context_len = sum(self._segment_len(s) for s in segments)
        voice_key = voice.cache_key if voice is not None and len(segments) == len(voice.segments) else None
        if long_form:
            return self._first_sentence(text, speaker, segments, context_len, common)
        tokens, mask = self._text_rows(text, speaker)
        self._check_fits(context_len, len(tokens), max_frames)
        return _Job(tokens=tokens, mask=mask, context=segments, context_len=context_len, voice_key=voice_key, **common)

    def _first_sentence(self, text, speaker, segments, context_len, common) -> _Job:
        sentences = []
        for n, sentence in enumerate(split_sentences(text)):
            tokens, mask = self._text_rows(sentence, speaker)
            self._check_fits(context_len, len(tokens), common["max_frames"], what=f"sentence {n + 1} of the text")
            sentences.append((sentence, tokens, mask))
        lf = _LongForm(sentences=sentences, base=segments, base_len=context_len, speaker=speaker)
        _, tokens, mask = sentences[0]
        return _Job(tokens=tokens, mask=mask, context=segments, context_len=context_len, long_form=lf, **common)

    def _voice(self, voice) -> Voice | None:
        if voice is None or isinstance(voice, Voice):
            return voice
        if not isinstance(voice, str):
            raise JaxttsError(
                f"voice must be a stored voice's name or a jaxtts.voices.Voice, got {type(voice).__name__}"
            )
        if self.voices is None:
            self.voices = VoiceStore()
        return self.voices.load(voice, codec=self.tts.codec)

    def _text_rows(self, text: str, speaker: int):
        return text_rows(self.tts.tokenizer.encode_segment(text, speaker))

    def _segment_len(self, seg: Segment) -> int:
        """Prompt rows of a context segment: its text, then its frames and the end-of-audio frame."""
        rows = len(self.tts.tokenizer.encode_segment(seg.text, seg.speaker))
        if seg.codes is not None:
            rows += seg.codes.shape[1] + 1
        elif seg.audio is not None:
            rows += -(-len(seg.audio) // FRAME_SIZE) + 1  # Mimi codes ceil(samples / 1920) frames
        return rows

    def _check_fits(self, context_len: int, text_len: int, frames: int, what: str = "the request") -> None:
        total = context_len + text_len + frames
        if total > self.limit:
            raise JaxttsError(
                f"{what} needs {context_len} context rows + {text_len} text tokens + {frames} frames of 80 ms = "
                f"{total} positions, more than the model's {self.limit}; shorten the text or context, lower "
                f"max_audio_ms, or use long_form=True"
            )

    def _retry_after(self) -> float:
        """Seconds until a queue place is likely free: the queue drains about max_batch requests
        per mean service time."""
        return max(0.1, self._service_s * (1 + len(self._queue) / self.max_batch))

    def _cancel(self, handle: Handle) -> bool:
        with self._lock:
            if handle.done():
                return False
            handle._cancel_requested = True
            queued = [j for j in self._queue if j.handle is handle]
            for job in queued:
                self._queue.remove(job)
            self._wake.notify()
        if queued:
            handle._set_status(CANCELLED)
        return True

    def _call(self, fn):
        """Run fn() on the engine thread (it owns the device state) and return its result."""
        done, box = threading.Event(), {}

        def task():
            try:
                box["value"] = fn()
            except BaseException as e:  # handed to the caller
                box["error"] = e
            done.set()

        with self._lock:
            if self._closing:
                raise JaxttsError("the engine is closed")
            self._tasks.append(task)
            self._wake.notify()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    # --- the serving loop (engine thread) -----------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._lock:
                while not (self._tasks or self._queue or self._closing or (self._pool and self._pool.live)):
                    self._wake.wait()
                tasks, self._tasks = self._tasks, []
                closing = self._closing
            for task in tasks:
                task()
            if closing:
                self._shut_down()
                return
            try:
                self._boundary()
            except Exception as e:  # a batch-wide failure: its rows fail, the engine goes on
                self._fail_pool(e)
            self._admitting = []

    def _boundary(self) -> None:
        """One chunk boundary: retire, admit, decode one chunk."""
        self._retire()
        t = time.perf_counter()
        self._admit()
        self.timings["admit_s"] += time.perf_counter() - t
        pool = self._pool
        if pool is not None and pool.live:
            self._decode(pool)
            self._maybe_shrink()
        elif pool is not None and pool.size > self.pool_sizes[0]:
            self._resize(self.pool_sizes[0])  # idle: hold the smallest pool

    def _retire(self) -> None:
        """Free the slots of cancelled rows and rows past their deadline."""
        self._expire_queued_locked()
        pool, now = self._pool, time.monotonic()
        for job in [j for j in (pool.jobs if pool else []) if j is not None]:
            if job.handle._cancel_requested:
                self._end(job, CANCELLED)
            elif job.handle._deadline is not None and now > job.handle._deadline:
                self._end(job, EXPIRED, self._deadline_error(job.handle))

    def _expire_queued_locked(self) -> None:
        with self._lock:
            self._expire_queued()

    def _expire_queued(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._queue if j.handle._deadline is not None and now > j.handle._deadline]:
            self._queue.remove(job)
            job.handle._set_status(EXPIRED, self._deadline_error(job.handle))

    @staticmethod
    def _deadline_error(handle: Handle) -> JaxttsError:
        limit = handle._deadline - handle.submitted_at
        return JaxttsError(f"deadline of {limit:g} s passed with {handle.audio_seconds:.2f} s of audio delivered")

    def _admit(self) -> None:
        """Move queued requests into free slots (growing the pool if needed): prepare their
        contexts, prefill their prompts in groups, insert the rows."""
        with self._lock:
            waiting = len(self._queue)
        if not waiting:
            return
        live = self._pool.live if self._pool else 0
        pool = self._grow(live + waiting)
        with self._lock:
            jobs = [self._queue.popleft() for _ in range(min(pool.size - pool.live, len(self._queue)))]
        self._admitting = jobs
        ready = [job for job in jobs if self._prepare(job)]
        for start in range(0, len(ready), self.max_prefill):
            self._start_group(ready[start : start + self.max_prefill])

    def _grow(self, needed: int) -> _Pool:
        """A pool for `needed` rows (or the largest). A larger pool that cannot be allocated is
        dropped from the sizes (the engine serves on with the rows it has); when not even a
        first pool can be made, the queued requests fail."""
        pool, size = self._pool, _bucket(min(needed, self.max_batch), self.pool_sizes)
        try:
            if pool is None:
                self._pool = self._blank_pool(size)
            elif size > pool.size:
                self._resize(size)
        except Exception as e:
            if pool is None:
                self._fail_queued(e)
                raise
            self.pool_sizes = tuple(s for s in self.pool_sizes if s < size)
            self.max_batch = self.pool_sizes[-1]
            warnings.warn(
                f"jaxtts engine: a pool of {size} rows failed ({type(e).__name__}); serving with at most "
                f"{self.max_batch} rows",
                RuntimeWarning,
                stacklevel=1,
            )
        return self._pool

    def _resize(self, size: int) -> None:
        self.resizes.append((self._pool.size, size, self._pool.live))
        self.resize_count += 1
        self._pool, self._small_streak = self._pool.moved(size), 0

    def _maybe_shrink(self) -> None:
        """Shrink to the smallest pool holding the live rows once it has sufficed for a while."""
        pool = self._pool
        target = _bucket(max(pool.live, 1), self.pool_sizes)
        with self._lock:
            waiting = len(self._queue)
        self._small_streak = self._small_streak + 1 if target < pool.size and not waiting else 0
        if self._small_streak >= self.shrink_after:
            self._resize(target)

    def _blank_pool(self, size: int) -> _Pool:
        model = self.tts.model
        state = _blank_state(model.cfg.backbone, size, self.limit, model.dtype, self.mesh)
        return _Pool(size, state, _blank_mimi(self._mimi_row, size, self.mesh), mesh=self.mesh)

    def _prepare(self, job: _Job) -> bool:
        """The job's context as a prepared Context (a stored voice's from the cache). A failure
        fails this request alone."""
        if job.handle._cancel_requested:
            job.handle._set_status(CANCELLED)
            return False
        try:
            job.context = self._prepared_context(job)
            return True
        except Exception as e:
            job.handle._set_status(FAILED, _as_jaxtts_error(e))
            return False

    def _prepared_context(self, job: _Job) -> Context:
        if isinstance(job.context, Context):
            return job.context
        lf = job.long_form
        if lf is not None and not lf.encoded:  # the voice prompt is encoded once per request
            lf.base, lf.encoded = [self.tts.encode_segment(s) for s in lf.base], True
            job.context = lf.base + job.context[len(lf.base) :]
        if job.voice_key is None:
            return self.tts.prepare_context(job.context)
        ctx = self._contexts.get(job.voice_key)
        if ctx is None:
            ctx = self.tts.prepare_context(job.context)
            self._contexts.put(job.voice_key, ctx)
        return ctx

    def _start_group(self, jobs: list[_Job]) -> None:
        """Prefill the jobs' prompts together and insert them; on an error, each alone, so that
        only a failing request fails."""
        try:
            self.timings["prefills"] += 1
            rows = self._prefill([(j.tokens, j.mask, j.context, j.seed) for j in jobs])
            finite = np.isfinite(np.asarray(rows.hidden, np.float32)).all(axis=1)
        except Exception as e:
            if len(jobs) > 1:
                for job in jobs:
                    self._start_group([job])
            else:
                jobs[0].handle._set_status(FAILED, _as_jaxtts_error(e))
            return
        for job, ok in zip(jobs, finite):
            if not ok:
                job.handle._set_status(FAILED, JaxttsError("the prompt gave non-finite values (check the context)"))
            elif job.handle._cancel_requested:
                job.handle._set_status(CANCELLED)
        keep = [j if not j.handle.done() else None for j in jobs]
        self._pool.insert(rows, keep)
        now = time.monotonic()
        for job in filter(None, keep):
            job.started_at, job.produced, job.frames = now, 0, []
            limit = self.tts.max_silence_ms
            job.guard = None if limit is None else _SilenceHold(int(limit // FRAME_MS))
            job.handle._set_status(RUNNING)

    def _prefill(self, items) -> DecodeState:
        """Prefill prompts [(text tokens, mask, prepared Context, seed)] in one call: each text
        after its own context. The batch is padded to a group size and the text to a bucket."""
        g = _bucket(len(items), self.group_sizes)
        width = self.tts.model.cfg.frame_width
        t_pad = buckets.prompt_rows(max(len(t) for t, _, _, _ in items), self.limit)
        tok, msk = np.zeros((g, t_pad, width), np.int32), np.zeros((g, t_pad, width), bool)
        lengths, starts, seeds = np.ones(g, np.int32), np.zeros(g, np.int32), np.zeros(g, np.uint32)
        for i, (t, m, ctx, seed) in enumerate(items):
            tok[i, : len(t)], msk[i, : len(t)] = t, m
            lengths[i], starts[i], seeds[i] = len(t), ctx.length, seed
        rows = [self._context_row(ctx) for _, _, ctx, _ in items]
        rows += [self._context_row(None)] * (g - len(items))
        cache = KVCache.concat(rows)
        rows = prefill(
            self.tts.model, tok, msk, lengths, cache=cache, start=starts, key=row_keys(seeds), opts=self.tts.options
        )
        # Under a mesh: all of it replicated (positions, keys and flags are made outside the
        # program), as the rows `_insert` was compiled for.
        return rows if self.mesh is None else self.mesh.replicate(rows)

    def _context_row(self, ctx: Context | None) -> KVCache:
        if ctx is None or ctx.cache is None:
            if self.mesh is not None:  # replicated like the prompt rows of a context
                model = self.tts.model
                return _blank_row(model.cfg.backbone, self._prefill_len, model.dtype, self.mesh)
            return self.tts.model.backbone_cache(1, self._prefill_len)
        cache = ctx.cache if self.mesh is None else self.mesh.replicate(ctx.cache)  # e.g. prepared before the engine
        return cache.resized(self._prefill_len)

    def _decode(self, pool: _Pool) -> None:
        """Hand each live row its next chunk of audio (with `run_ahead`, keeping one chunk ahead
        on the device).

        The chunk dispatched at the previous boundary (if any) is handed out now; before that the
        next one is dispatched, so that the device decodes while the host reads, checks and
        delivers audio (at batch 1 the host's share of a chunk is otherwise device idle time).
        Nothing runs ahead while requests wait in the queue: they join at the next boundary, and
        a chunk already on its way would make them wait one chunk longer. A row that ended or was
        cancelled meanwhile is skipped (its slot's rows are ignored until a new prompt overwrites
        them), so every request gets exactly the frames it gets without running ahead."""
        chunk, self._ahead = self._ahead, None
        if chunk is not None and not any(j is not None and j.slot is not None for j in chunk.jobs):
            chunk = None  # every row of it has ended: nothing to hand out
        if chunk is None:
            fresh = any(j is not None and j.produced == 0 for j in pool.jobs)
            chunk = self._dispatch(pool, self.first_chunk_frames if fresh else self.chunk_frames)
        with self._lock:
            waiting = bool(self._queue)
        # Nothing to run ahead for when every row of the chunk reaches its frame limit in it.
        ending = all(
            j is None or j.slot is None or j.produced + chunk.frames.shape[0] >= j.max_frames for j in chunk.jobs
        )
        if self.run_ahead and not waiting and not ending:
            # Rows admitted after `chunk` was dispatched still wait for their first (short) chunk.
            in_chunk = {id(j) for j in chunk.jobs}
            fresh = any(j is not None and j.produced == 0 and id(j) not in in_chunk for j in pool.jobs)
            self._ahead = self._dispatch(pool, self.first_chunk_frames if fresh else self.chunk_frames)
        t = time.perf_counter()
        frames, emitted, pcm = (np.asarray(a) for a in (chunk.frames, chunk.emitted, chunk.pcm))
        t2 = time.perf_counter()
        for row, job in enumerate(chunk.jobs):
            if job is not None and job.slot is not None:  # still running (a moved pool keeps its jobs)
                self._deliver(job, frames[:, row], emitted[:, row], pcm[row])
        self.timings.update(wait_s=t2 - t, deliver_s=time.perf_counter() - t2, chunks=1, chunk_frames=len(frames))

    def _dispatch(self, pool: _Pool, n: int) -> _Chunk:
        """Start decoding n frames for every row of the pool, and their audio (device arrays:
        frames [n, B, 32] as Mimi codes, emitted [n, B], PCM [B, n·1920])."""
        return _Chunk(list(pool.jobs), *self._run_chunk(pool, n, fetch=False))

    def _run_chunk(self, pool: _Pool, n: int, fetch: bool = True, sampler: RowSampler | None = None):
        """n frames for every row of the pool, and their audio: frames [n, B, 32] (as Mimi
        codes), emitted [n, B], PCM [B, n·1920]; host arrays, or device arrays with fetch=False.
        `sampler`: instead of the pool's own (warmup)."""
        sampler = sampler or pool.table.device()
        stored = self._programs_for(pool.size, n, sampler, pool.state, pool.mimi)
        pool.state, frames, emitted = decode_chunk(
            self.tts.model,
            pool.state,
            sampler,
            n,
            opts=self.tts.options,
            mesh=self.mesh,
            program=stored[0] if stored else None,
        )
        self.frame_steps += n
        codec = self.tts.codec
        if stored:
            pool.mimi, frames, pcm = stored[1](codec.params, pool.mimi, frames)
        else:
            with _precision(codec):
                sharded = {} if self.mesh is None else {"mesh": self.mesh}
                pool.mimi, frames, pcm = _decode_audio(
                    codec.params, pool.mimi, frames, cfg=codec.config, cardinality=codec.cardinality, **sharded
                )
        if not fetch:
            return frames, emitted, pcm
        return np.asarray(frames), np.asarray(emitted), np.asarray(pcm)

    def _programs_for(self, size: int, n: int, sampler, state, mimi) -> tuple | None:
        """A pool's decode chunk and Mimi programs from `jaxtts.programs` (made on first use:
        found, or lowered here and compiled on their first call), or None under a mesh or where
        the store cannot serve. `state` and `mimi` may hold ShapeDtypeStructs (warmup)."""
        key = (size, n, sampler.filters)
        if key not in self._pool_programs:
            decode = None
            if self.mesh is None:
                decode = decode_chunk_program(self.tts.model, state, sampler, n, opts=self.tts.options)
            audio = None if decode is None else self._audio_program(size, n, mimi)
            self._pool_programs[key] = None if audio is None else (decode, audio)
        return self._pool_programs[key]

    def _audio_program(self, size: int, n: int, mimi) -> programs.Program | None:
        """The pool's Mimi program (`_decode_audio`) for chunks of n frames, shared by both
        filter kinds; None where the store cannot serve."""
        if (size, n) not in self._pool_audio:
            codec = self.tts.codec
            with _precision(codec):
                key = codec.program_key() if programs.usable() else None
                program = None
                if key is not None:
                    frames = jax.ShapeDtypeStruct((n, size, self.tts.model.cfg.audio_num_codebooks), jnp.int32)
                    mimi = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), mimi)
                    program = programs.Program(
                        "engine_mimi",
                        (key, programs.signature(mimi), frames.shape, codec.cardinality),
                        lambda: _decode_audio.lower(
                            codec.params, mimi, frames, cfg=codec.config, cardinality=codec.cardinality
                        ),
                    )
            self._pool_audio[(size, n)] = program
        return self._pool_audio[(size, n)]

    def _deliver(self, job: _Job, frames: np.ndarray, emitted: np.ndarray, pcm: np.ndarray) -> None:
        """A row's share of a chunk: the frames before its end of speech, within its limits."""
        n = len(emitted) if emitted.all() else int(np.argmin(emitted))
        n = min(n, job.max_frames - job.produced)
        pcm, frames = pcm[: n * FRAME_SIZE], frames[:n]
        job.produced += n
        finished = n < len(emitted) or job.produced >= job.max_frames
        if not np.isfinite(pcm).all():
            self._end(job, FAILED, JaxttsError("the model produced non-finite audio for this request"))
            return
        if job.guard is not None:
            pcm, frames, silenced = job.guard.take(pcm, frames, last=finished)
            finished = finished or silenced
        if len(frames):
            job.frames.append(frames)
            job.handle._push(pcm, frames)
        if finished:
            self._end(job, DONE)

    def _end(self, job: _Job, status: str, error: Exception | None = None) -> None:
        """Free the job's slot; finish its handle, or queue a long-form request's next sentence."""
        if job.slot is not None:
            self._pool.release(job)
        self._service_s = 0.9 * self._service_s + 0.1 * (time.monotonic() - job.started_at)
        if status == DONE and job.long_form is not None:
            nxt = self._next_sentence(job)
            if nxt is not None:
                with self._lock:
                    self._queue.appendleft(nxt)  # ahead of new requests: this answer is streaming
                return
        if job.handle._set_status(status, error) and status == DONE:
            self.completed += 1

    def _next_sentence(self, job: _Job) -> _Job | None:
        """The next sentence of a long-form request: after the voice's context and as many of the
        previous sentences (their own frames, newest first) as fit."""
        lf = job.long_form
        sentence = lf.sentences[lf.index][0]
        codes = np.concatenate(job.frames).T if job.frames else np.zeros((32, 0), np.int32)
        if codes.shape[1]:
            seg = Segment(lf.speaker, sentence, codes=codes)
            lf.history.append((seg, self._segment_len(seg)))
        lf.index += 1
        if lf.index == len(lf.sentences):
            return None
        _, tokens, mask = lf.sentences[lf.index]
        room = self.limit - lf.base_len - len(tokens) - job.max_frames
        kept: list[tuple[Segment, int]] = []
        for seg, rows in reversed(lf.history[-self.long_form_history :] if self.long_form_history else []):
            if rows > room:
                break  # older sentences go first
            kept.insert(0, (seg, rows))
            room -= rows
        lf.history = kept
        return _Job(
            handle=job.handle,
            tokens=tokens,
            mask=mask,
            context=lf.base + [s for s, _ in kept],
            context_len=lf.base_len + sum(r for _, r in kept),
            seed=(job.seed + 1) % (validation.SEED_MAX + 1),
            sampler=job.sampler,
            max_frames=job.max_frames,
            long_form=lf,
        )

    def _fail_pool(self, error: Exception) -> None:
        """A chunk boundary failed for the whole batch: its rows (and those being admitted) fail,
        the pool starts afresh."""
        pool, self._pool, self._ahead = self._pool, None, None
        for job in [j for j in (pool.jobs if pool else []) if j is not None] + self._admitting:
            job.slot = None
            job.handle._set_status(
                FAILED,
                JaxttsError(
                    f"internal error while decoding: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
                ),
            )

    def _fail_queued(self, error: Exception) -> None:
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
        for job in queued:
            job.handle._set_status(FAILED, _as_jaxtts_error(error))

    def _shut_down(self) -> None:
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
            tasks, self._tasks = self._tasks, []
        for task in tasks:
            task()
        for job in queued + [j for j in (self._pool.jobs if self._pool else []) if j is not None]:
            job.handle._set_status(CANCELLED)
        self._pool, self._ahead = None, None

    # --- warmup (engine thread) ----------------------------------------------------------------
    def _warmup(self, text_tokens: int, context_rows: int, encode: bool) -> dict:
        """The large programs (each pool size's decode chunk and Mimi step) compile in threads
        while the small ones compile and run here; then every pool program runs once."""
        start, workers = time.perf_counter(), {threading.get_ident()}
        before = {t: compilations(t) for t in workers}

        def compile_in_worker(lowered):
            workers.add(threading.get_ident())
            before.setdefault(threading.get_ident(), compilations(threading.get_ident()))
            return lowered.compile()

        lowered = self._lower_pool_programs()
        with ThreadPoolExecutor(max(1, min(len(lowered), os.cpu_count() or 1))) as ex:
            compiled = [ex.submit(compile_in_worker, p) for p in lowered]
            self._warm_prefills(text_tokens)
            self._warm_contexts(context_rows, encode)
            for c in compiled:
                c.result()
        self._warm_pools()
        count = sum(compilations(t) - before.get(t, 0) for t in workers)
        return {"seconds": time.perf_counter() - start, "compilations": count}

    def _lower_pool_programs(self) -> list:
        """Each pool size's decode chunk and Mimi step programs, lowered for `.compile()`."""
        model, codec, mesh, lowered = self.tts.model, self.tts.codec, self.mesh, []
        # Under a mesh the shapes carry the shardings the pool's arrays will have.
        rows, frame_rows = (None, None) if mesh is None else (mesh.rows, mesh.sharding(1))
        for size in self.pool_sizes:
            state = _abstract(
                jax.eval_shape(lambda size=size: _blank_state(model.cfg.backbone, size, self.limit, model.dtype)), rows
            )
            mimi = _abstract(jax.eval_shape(lambda size=size: _blank_mimi(self._mimi_row, size)), rows)
            sampler = _SamplerTable(size, mesh).device()
            for n in sorted({self.first_chunk_frames, self.chunk_frames}):
                for filters in (False, True):  # pools with and without top-p / min-p rows
                    rows_sampler = dataclasses.replace(sampler, filters=filters)
                    stored = self._programs_for(size, n, rows_sampler, state, mimi)
                    if stored:  # compile (or find loaded) both; the Mimi program is shared by filters
                        lowered += [p for p in stored if not p.ready and p not in lowered]
                        continue
                    lowered.append(lower_decode_chunk(model, state, rows_sampler, n, opts=self.tts.options, mesh=mesh))
                if self._pool_programs.get((size, n, False)):
                    continue
                frames = jax.ShapeDtypeStruct((n, size, model.cfg.audio_num_codebooks), jnp.int32, sharding=frame_rows)
                with _precision(codec):
                    lowered.append(
                        _decode_audio.lower(
                            codec.params, mimi, frames, cfg=codec.config, cardinality=codec.cardinality, mesh=mesh
                        )
                    )
        return lowered

    def _warm_pools(self) -> None:
        """Each pool size: a blank pool, decode chunks of both sizes, inserts of each group size it
        can receive, moves to every other size. (The pools are scratch: serving's is untouched.)"""
        for size in self.pool_sizes:
            pool = self._blank_pool(size)
            for n in sorted({self.first_chunk_frames, self.chunk_frames}):
                for filters in (False, True):
                    self._run_chunk(pool, n, sampler=dataclasses.replace(pool.table.device(), filters=filters))
            largest = _bucket(min(size, self.max_prefill), self.group_sizes)
            for g in [g for g in self.group_sizes if g <= largest]:
                pool.insert(self._blank_rows(g), [None] * g)
            for other in self.pool_sizes:
                if other != size:
                    jax.block_until_ready(pool.moved(other).state.hidden)

    def _blank_rows(self, g: int) -> DecodeState:
        model = self.tts.model
        return _blank_state(model.cfg.backbone, g, self._prefill_len, model.dtype, self.mesh, None)

    def _warm_prefills(self, text_tokens: int) -> None:
        """Prompt prefills of every group size × text bucket up to `text_tokens` tokens."""
        empty = Context(np.zeros((0, 33), np.int32), np.zeros((0, 33), bool), None)
        for t_pad in self._row_buckets(text_tokens):
            tokens = np.zeros((t_pad, 33), np.int32)
            for g in self.group_sizes:
                jax.block_until_ready(self._prefill([(tokens, tokens != 0, empty, 0)] * g).hidden)

    def _row_buckets(self, upto: int) -> list[int]:
        """The prompt-row buckets of 1 to `upto` rows."""
        sizes = [buckets.prompt_rows(1, self.limit)]
        while sizes[-1] < upto:
            sizes.append(buckets.prompt_rows(sizes[-1] + 1, self.limit))
        return sizes

    def _warm_contexts(self, context_rows: int, encode: bool) -> None:
        """Context prefills (and their copies into prompt rows) of every bucket up to
        `context_rows` rows, and with `encode` the Mimi encodes of context audio that long."""
        text_len = len(self.tts.tokenizer.encode_segment("warm", 0))
        for bucket in self._row_buckets(context_rows):
            frames = max(1, min(bucket, context_rows) - text_len - 1)  # rows: text, frames, end of audio
            ctx = self.tts.prepare_context([Segment(0, "warm", codes=np.zeros((32, frames), np.int32))])
            jax.block_until_ready(self._context_row(ctx).k[0])
            if encode:
                self.tts.encode_segment(Segment(0, "warm", audio=np.zeros(frames * FRAME_SIZE, np.float32)))


def _abstract(tree, sharding):
    """ShapeDtypeStructs of `tree`'s arrays with `sharding` (None: as on one device)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _replicate_weights(tts: TTS, mesh: BatchMesh) -> None:
    """The model's and the codec's weights copied onto every device of the mesh, in place."""
    nnx.update(tts.model, mesh.replicate(nnx.state(tts.model)))
    tts.codec.params = mesh.replicate(tts.codec.params)


def _as_tts(parts, options, max_silence_ms) -> TTS:
    if isinstance(parts, TTS):
        return parts
    if isinstance(parts, (tuple, list)) and len(parts) in (2, 3):
        model, codec, *tokenizer = parts
        return TTS(
            model, codec, tokenizer=tokenizer[0] if tokenizer else None, options=options, max_silence_ms=max_silence_ms
        )
    raise JaxttsError(f"Engine needs a jaxtts.TTS or (model, codec[, tokenizer]), got {type(parts).__name__}")


def _loaded(seg: Segment) -> Segment:
    """A context segment with its audio read and checked on the caller's thread (a bad file is an
    error of `submit`, and its length is known before admission); encoding waits for the engine."""
    if seg.audio is None:
        return seg
    return Segment(seg.speaker, seg.text, audio=load_audio(seg.audio))


def _as_jaxtts_error(e: Exception) -> JaxttsError:
    if isinstance(e, JaxttsError):
        return e
    return JaxttsError(f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:200]}")


__all__ = ["Busy", "Engine", "Handle", "POOL_SIZES", "RowSampler", "compilations", "listen_for_compiles"]
