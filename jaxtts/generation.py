"""The decode loop: prompt prefill, then fixed-size chunks of frames per XLA call.

Each call to `decode_chunk` runs `num_frames` frames in an outer `lax.scan`; per frame the depth
decoder runs its 31 steps (one two-position step, then an inner `lax.scan` of 30), and the new
frame is fed back through the backbone. The backbone cache is donated. End of speech (an all-zero
frame) is checked on the host between chunks: a data-dependent stop inside the program would make
the GPU sync with the host every frame.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtts import buckets, programs
from jaxtts.csm import CSM
from jaxtts.defaults import jit_cublas, jit_with_options
from jaxtts.errors import JaxttsError
from jaxtts.llama import KVCache
from jaxtts.options import DecodeOptions, resolve_options
from jaxtts.sampling import Sampler
from jaxtts.sharding import BatchMesh


@jax.tree_util.register_dataclass
@dataclass
class DecodeState:
    cache: KVCache  # backbone KV cache, [B, S, Hkv, D] per layer
    hidden: jax.Array  # [B, D] backbone output for each row's latest position
    position: jax.Array  # [B] int32: where each row's next row is written
    key: jax.Array  # [B] PRNG keys, one per row
    done: jax.Array  # [B] bool: the row has produced its end-of-speech frame


@partial(jit_cublas, static_argnames=("graphdef", "opts"), donate_argnames=("cache",))
def _prefill(graphdef, weights, tokens, mask, start, lengths, cache, opts: DecodeOptions):
    model = nnx.merge(graphdef, weights)
    hidden, cache = model.run_backbone(tokens, mask, start, cache, opts=opts)
    last = hidden[jnp.arange(hidden.shape[0]), lengths - 1]
    return last, cache


def row_keys(seeds) -> jax.Array:
    """One PRNG key per row from integer seeds."""
    return _row_keys(jnp.asarray(seeds, jnp.uint32))


_row_keys = jax.jit(jax.vmap(jax.random.key))  # eagerly, vmap re-traces on every call (ms of host time)


_SPLITS = weakref.WeakKeyDictionary()  # model → (graphdef, weights, [(variable, its array at the split)])


def split_model(model: CSM, *, reuse: bool = True):
    """`nnx.split(model)`, reused while every variable still holds the array it held at the split.

    A split walks the whole module graph (~5 ms for CSM-1B on a CPU host), and a generation call
    needs one for the prefill and one per chunk. New weights (`nnx.update`, a fine-tuning step)
    are new arrays, so they re-split; a submodule swapped in place (`model.decoder = ...`) is not
    noticed: build a new model instead. `reuse=False` always splits afresh (for measuring).
    """
    hit = _SPLITS.get(model) if reuse else None
    if hit is not None and all(var.get_raw_value() is value for var, value in hit[2]):
        return hit[0], hit[1]
    graphdef, weights = nnx.split(model)
    variables = [(node, node.get_raw_value()) for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)]
    _SPLITS[model] = (graphdef, weights, variables)
    return graphdef, weights


_MODEL_KEYS = weakref.WeakKeyDictionary()  # model → (graphdef, its `model_key`)


def model_key(model: CSM) -> tuple | None:
    """What a compiled program depends on in the model beyond the code (`jaxtts.programs`): its
    config, dtype and quantization, module graph and each weight's shape and dtype; computed once
    per split. None when the weights are not on the default device (programs run there only)."""
    graphdef, weights = split_model(model)
    hit = _MODEL_KEYS.get(model)
    if hit is None or hit[0] is not graphdef:
        key = None
        if programs.usable(weights):
            parts = (model.cfg, str(model.dtype), model.quantization, graphdef, programs.signature(weights))
            key = ("model", programs.fingerprint(parts))
        hit = _MODEL_KEYS[model] = (graphdef, key)
    return hit[1]


def prefill(
    model: CSM, tokens, mask, lengths, *, cache: KVCache, start=None, key, opts: DecodeOptions | None = None
) -> DecodeState:
    """Run the backbone over right-padded prompts tokens/mask [B,T,33] with true lengths [B].

    Rows are written at positions start[b] + t (start defaults to 0; a cached voice prompt puts
    the new rows after it). Padding rows land in slots that decoding overwrites before any
    valid query can see them. The program comes from `jaxtts.programs` when it can (a new
    process then skips tracing it).
    """
    opts = resolve_options(opts)
    graphdef, weights = split_model(model)
    b = tokens.shape[0]
    start = jnp.zeros((b,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    args = (jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool), start, lengths, cache)
    mkey = model_key(model)
    if mkey is not None and programs.usable(args):
        program = programs.Program(
            "prefill",
            (mkey, programs.signature(args), opts),
            lambda: _prefill.lower(graphdef, weights, *args, opts),
        )
        hidden, cache = program(weights, *args)
    else:
        hidden, cache = _prefill(graphdef, weights, *args, opts)
    return DecodeState(cache=cache, hidden=hidden, position=start + lengths, key=key, done=jnp.zeros((b,), bool))


def _sample_frame(model: CSM, sampler: Sampler, hidden, row_keys, opts: DecodeOptions, audio_table=None):
    """One frame of codes [B, 32] from the backbone's last hidden state [B, D].

    The frame's sampling noise is drawn up front from each row's keys (one kernel instead of a
    PRNG per draw). `audio_table` (`CSM.projected_audio_embeddings`) replaces the depth decoder's
    input projection of each new code by a row lookup."""
    b = hidden.shape[0]
    n, vocab = model.cfg.audio_num_codebooks, model.cfg.audio_vocab_size
    keys = jax.vmap(lambda k: jax.random.split(k, n), out_axes=1)(row_keys)  # [n, B]
    noise = sampler.noise(keys, vocab)  # [n, B, V]
    c0 = sampler.draw(model.codebook0_logits(hidden), noise, 0, opts)
    # The depth decoder starts afresh each frame: [last hidden, emb(c0)] at positions 0 and 1.
    x = jnp.stack([hidden, model.embed_audio(0, c0)], axis=1)
    h, cache = model.run_decoder(x, jnp.zeros((b,), jnp.int32), model.decoder_cache(b), opts=opts)
    c1 = sampler.draw(model.codebook_logits(h[:, -1], 1), noise, 1, opts)

    def depth_step(carry, i):
        prev, cache = carry
        if audio_table is None:
            inputs = model.embed_audio(i - 1, prev)
        else:
            inputs = audio_table[prev + (i - 1) * vocab]
        logits, cache = model.decoder_step_logits(
            inputs[:, None], jnp.full((b,), i, jnp.int32), cache, i, opts=opts, projected=audio_table is not None
        )
        c = sampler.draw(logits, noise, i, opts)
        return (c, cache), c

    _, rest = jax.lax.scan(depth_step, (c1, cache), jnp.arange(2, n, dtype=jnp.int32), unroll=opts.depth_unroll)
    return jnp.concatenate([c0[:, None], c1[:, None], rest.T], axis=1)


def frame_rows(frames):
    """Backbone input rows for generated frames [B, 32]: codes in the audio columns, no text."""
    b, n = frames.shape
    tokens = jnp.concatenate([frames, jnp.zeros((b, 1), frames.dtype)], axis=1)[:, None]
    mask = jnp.concatenate([jnp.ones((b, n), bool), jnp.zeros((b, 1), bool)], axis=1)[:, None]
    return tokens, mask


def _decode_chunk_impl(
    graphdef,
    weights,
    state: DecodeState,
    sampler: Sampler,
    num_frames: int,
    opts: DecodeOptions,
    audio_table,
    mesh: BatchMesh | None = None,
):
    run = partial(_decode_frames, graphdef, num_frames=num_frames, opts=opts)
    if mesh is not None:  # each device decodes its own rows with the single-device program
        run = mesh.per_row(run, in_axes=(None, 0, 0, None), out_axes=(0, 1, 1))
    return run(weights, state, sampler, audio_table)


@functools.cache
def _decode_chunk_jit(compiler_options: tuple):
    """The jitted decode chunk compiled with these XLA options: one jit per choice, so each
    options value is its own program (`DecodeOptions.compiler_options`)."""
    return jit_with_options(
        _decode_chunk_impl,
        dict(compiler_options),
        static_argnames=("graphdef", "num_frames", "opts", "mesh"),
        donate_argnames=("state",),
    )


def _decode_chunk_for(state: DecodeState, opts: DecodeOptions, mesh: BatchMesh | None):
    """The jitted decode chunk for this state's batch: compiled with the XLA options that `opts`
    gives its rows per device."""
    rows = state.position.shape[0] // (mesh.size if mesh is not None else 1)
    return _decode_chunk_jit(opts.compiler_options(rows))


def _per_batch(method: str):
    """`method` of the jit `_decode_chunk_for` picks for the call's state ("__call__", "lower", ...)."""

    def call(graphdef, weights, state, sampler, num_frames, opts, audio_table, mesh=None):
        jitted = _decode_chunk_for(state, opts, mesh)
        return getattr(jitted, method)(graphdef, weights, state, sampler, num_frames, opts, audio_table, mesh)

    return call


# `_decode_chunk_impl` jitted per batch; `.lower` and `.eval_shape` take the same arguments.
_decode_chunk = _per_batch("__call__")
_decode_chunk.lower, _decode_chunk.eval_shape = _per_batch("lower"), _per_batch("eval_shape")


def _decode_frames(
    graphdef, weights, state: DecodeState, sampler: Sampler, audio_table, *, num_frames: int, opts: DecodeOptions
):
    model = nnx.merge(graphdef, weights)

    def frame_step(state: DecodeState, _):
        split = jax.vmap(jax.random.split)(state.key)  # [B, 2]
        key, sub = split[:, 0], split[:, 1]
        frame = _sample_frame(model, sampler, state.hidden, sub, opts, audio_table)
        frame = jnp.where(state.done[:, None], 0, frame)
        eos = jnp.all(frame == 0, axis=1)
        emitted = ~state.done & ~eos
        tokens, mask = frame_rows(frame)
        hidden, cache = model.run_backbone(tokens, mask, state.position, state.cache, opts=opts)
        new = DecodeState(
            cache=cache,
            hidden=hidden[:, 0],
            position=state.position + emitted.astype(jnp.int32),
            key=key,
            done=state.done | eos,
        )
        return new, (frame, emitted)

    state, (frames, emitted) = jax.lax.scan(frame_step, state, None, length=num_frames)
    return state, frames, emitted


# The depth decoder's projected code embeddings, looked up in a precomputed table (134 MB for
# CSM-1B in bf16) when `DecodeOptions.audio_table` and the Pallas kernels are on; on CPU building
# the table costs more than it saves.
_AUDIO_TABLES = weakref.WeakKeyDictionary()  # model → ((embeddings, projection, their int8 scales), table)


def audio_table(model: CSM):
    """`model.projected_audio_embeddings()`, computed once per set of weights (new weights, e.g.
    after fine-tuning, are new arrays and get a new table)."""
    key = tuple(
        None if getattr(model, name, None) is None else getattr(model, name).get_value()
        # int8: the table's row scales and the projection's column scales too
        for name in ("audio_embeddings", "projection", "audio_embeddings_scale", "projection_scale")
    )
    hit = _AUDIO_TABLES.get(model)
    if hit is None or any(a is not b for a, b in zip(hit[0], key)):
        hit = (key, model.projected_audio_embeddings())
        _AUDIO_TABLES[model] = hit
    return hit[1]


def decode_chunk(
    model: CSM,
    state: DecodeState,
    sampler: Sampler,
    num_frames: int,
    *,
    opts: DecodeOptions | None = None,
    mesh: BatchMesh | None = None,
    program: programs.Program | None = None,
):
    """Generate `num_frames` frames for every row. Returns (state, frames [N,B,32], emitted [N,B]).

    `emitted[n, b]` is False from the row's end-of-speech frame on (that frame included).
    `mesh`: the rows are split over its devices (state and sampler rows-split, weights
    replicated: `jaxtts.sharding`), each device decoding its own. `program`: this call's
    `decode_chunk_program` (made for the same model, shapes, num_frames and opts), instead of the
    jitted function.
    """
    opts = resolve_options(opts)
    table = audio_table(model) if opts.audio_table and opts.pallas else None
    graphdef, weights = split_model(model)
    if program is not None:
        return program(weights, state, sampler, table)
    return _decode_chunk(graphdef, weights, state, sampler, num_frames, opts, table, mesh)


def decode_chunk_program(
    model: CSM, state: DecodeState, sampler: Sampler, num_frames: int, *, opts: DecodeOptions | None = None
) -> programs.Program | None:
    """`decode_chunk`'s program for this state's shapes from `jaxtts.programs` (found, or lowered
    now), for `decode_chunk(..., program=)`: `.compile()` it ahead of the first call (in a thread,
    while the prompt is prefilled). `state` may hold jax.ShapeDtypeStructs. None where the store
    cannot serve (weights off the default device): use `lower_decode_chunk`. Call from the main
    thread: it touches the model's split and table caches."""
    opts = resolve_options(opts)
    mkey = model_key(model)
    if mkey is None or not programs.usable():
        return None
    table = audio_table(model) if opts.audio_table and opts.pallas else None
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    key = (mkey, programs.signature((abstract, sampler, table)), num_frames, opts)
    return programs.Program(
        "decode_chunk", key, lambda: lower_decode_chunk(model, abstract, sampler, num_frames, opts=opts)
    )


def lower_decode_chunk(
    model: CSM,
    state: DecodeState,
    sampler: Sampler,
    num_frames: int,
    *,
    opts: DecodeOptions | None = None,
    mesh: BatchMesh | None = None,
) -> jax.stages.Lowered:
    """`decode_chunk`'s program for this state's shapes, lowered: `.compile()` it ahead of the first
    call (in a thread, while the prompt is prefilled) and the call reuses it. `state` may hold
    jax.ShapeDtypeStructs (with the shardings the call's arrays will have, under a `mesh`).
    Call from the main thread: it touches the model's split and table caches."""
    opts = resolve_options(opts)
    table = audio_table(model) if opts.audio_table and opts.pallas else None
    graphdef, weights = split_model(model)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_sharding(a)), state)
    return _decode_chunk.lower(graphdef, weights, abstract, sampler, num_frames, opts, table, mesh)


def _sharding(a):
    s = getattr(a, "sharding", None)
    return s if isinstance(s, jax.sharding.NamedSharding) else None


def check_length(model: CSM, prompt_len: int, max_frames: int) -> None:
    limit = model.cfg.backbone.max_seq_len
    if prompt_len + max_frames > limit:
        raise JaxttsError(
            f"prompt of {prompt_len} rows + {max_frames} frames exceeds the model's {limit} positions; "
            f"shorten the text or context, or lower the audio length to at most {max(0, limit - prompt_len)} frames"
        )


def generate_frames(
    model: CSM,
    tokens,
    mask,
    *,
    max_frames: int,
    temperature: float = 0.9,
    top_k: int = 50,
    seed: int = 0,
    chunk_frames: int = 16,
    attention: str | None = None,
    options: DecodeOptions | None = None,
) -> np.ndarray:
    """Generate Mimi frames for one prompt: int tokens [T,33], bool mask [T,33] → int32 [F, 32].

    Stops before the first all-zero frame or after `max_frames`. `top_k=1` is exactly greedy.
    `options` (default: `default_options()`) chooses the kernels; `attention` alone picks the
    attention implementation ("xla", "pallas", "pallas_interpret") of the default options.
    """
    opts = resolve_options(options, attention)
    tokens = np.asarray(tokens)
    mask = np.asarray(mask, bool)
    width = model.cfg.frame_width
    if tokens.ndim != 2 or tokens.shape[1] != width or mask.shape != tokens.shape:
        raise JaxttsError(f"tokens and mask must both be [T, {width}], got {tokens.shape} and {mask.shape}")
    if tokens.shape[0] == 0:
        raise JaxttsError("the prompt is empty")
    if max_frames < 1:
        raise JaxttsError(f"max_frames must be ≥ 1, got {max_frames}")
    sampler = Sampler.create(temperature, top_k)
    t = tokens.shape[0]
    check_length(model, t, max_frames)
    limit = model.cfg.backbone.max_seq_len
    padded = buckets.prompt_rows(t, limit)
    tok = np.zeros((1, padded, width), np.int32)
    msk = np.zeros((1, padded, width), bool)
    tok[0, :t], msk[0, :t] = tokens, mask
    cache = model.backbone_cache(1, max(padded, buckets.cache_length(t + max_frames, limit)))
    state = prefill(model, tok, msk, [t], cache=cache, key=row_keys([seed]), opts=opts)
    out = []
    while len(out) < max_frames:
        state, frames, emitted = decode_chunk(model, state, sampler, chunk_frames, opts=opts)
        frames, emitted = np.asarray(frames[:, 0]), np.asarray(emitted[:, 0])
        n = int(np.argmin(emitted)) if not emitted.all() else len(emitted)
        out.extend(frames[:n])
        if n < len(emitted):
            break
    return np.asarray(out[:max_frames], np.int32).reshape(-1, model.cfg.audio_num_codebooks)
