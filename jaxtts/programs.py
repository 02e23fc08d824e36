"""Compiled programs kept across processes, so that a new process does not trace them again.

JAX's persistent compilation cache saves XLA's compile, but a new process must still trace and
lower a program to find its entry: for CSM-1B on an H200 that was 3.5 s of the first `generate`
(trace 2.4 s, lower 1.1 s) against 0.7 s of loading what the cache held (docs/PERF.md #41). Here
the heavy programs (TTS's prefill and decode chunks, Mimi's encoder and streaming step,
`CSM.random`'s, the serving engine's pool programs) are kept as serialized executables under a
key made of everything that determines them: the program's name and the shapes and types of its
arguments (the caller's `key`), the jaxtts and pallas_kernels sources, the versions of jax,
jaxlib and flax, the device and platform, XLA_FLAGS and the JAX settings that change tracing.
Anything else that changes a program must be in the caller's key.

The files live in `jaxtts-programs/` inside JAX's compilation cache directory
(`jaxtts.tts.enable_compilation_cache`), and only while that cache is on; otherwise programs are
kept for the life of the process. Like JAX's cache they hold executables that are loaded and
run: the directory must be as trusted as the code. A file that cannot be read is compiled again
and replaced; writes go to a temporary name first. Only GPU executables go to disk
(`DISK_PLATFORMS`: XLA:CPU's copies can lack code), and what XLA cannot serialize stays in memory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger(__name__)

_directory: Path | None = None
_memory: dict[str, jax.stages.Compiled] = {}  # digest → program, for the life of the process
_lock = threading.Lock()
# What this process did (for tests): programs loaded from disk, compiled, saved, not saved or not loaded.
stats = {"loaded": 0, "compiled": 0, "saved": 0, "failed": 0}


# Backends whose serialized executables load and run again (checked on the H200, docs/PERF.md
# #42, #47). XLA:CPU's do not reliably: a copy can lack code the process compiled earlier
# ("Function copy_gather_fusion not found" when a later process runs it), so on CPU programs
# are kept in memory only.
DISK_PLATFORMS = ("gpu",)
_platforms: tuple[str, ...] = DISK_PLATFORMS


def set_directory(path: str | os.PathLike | None, *, platforms: tuple[str, ...] = DISK_PLATFORMS) -> None:
    """Keep programs in `path` when JAX's backend is one of `platforms` (None, or another
    backend: in memory only, for this process)."""
    global _directory, _platforms
    _directory = None if path is None else Path(path)
    _platforms = tuple(platforms)


def directory() -> Path | None:
    """Where programs are kept on disk for this backend (None: in memory only)."""
    if _directory is None or jax.default_backend() not in _platforms:
        return None
    return _directory


def fingerprint(parts) -> str:
    """A stable digest of `parts` (their repr: shapes, dtypes, tree structures, configs), for keys
    whose parts are costly to print on every call (a model's module graph)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def signature(tree) -> tuple:
    """A pytree's structure with each leaf's shape and dtype: what a program is compiled for."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(a)), str(getattr(a, "dtype", type(a).__name__))) for a in leaves)


_bypassed = 0  # > 0 inside `bypassed()`


@contextlib.contextmanager
def bypassed():
    """Inside: `usable` says no, so callers use their jitted functions (for tools that watch
    those functions' calls: `benchmarks.startup --compile-ab`)."""
    global _bypassed
    _bypassed += 1
    try:
        yield
    finally:
        _bypassed -= 1


def usable(*trees) -> bool:
    """Whether a stored program can take these arguments: no tracer among them (called inside a
    user's jit, grad or eval_shape) and every array on the default device (the one programs are
    compiled for; a sharded or moved array goes through the jitted function, which follows it).
    Call sites ask on every call (with no arguments: only whether the store is bypassed)."""
    if _bypassed:
        return False
    default = jax.devices()[0]
    for a in jax.tree.leaves(trees):
        if isinstance(a, jax.core.Tracer):
            return False
        if isinstance(a, jax.Array) and a.devices() != {default}:
            return False
    return True


class Program:
    """A compiled program from the store: found (in memory or on disk) when made, else lowered
    then; `compile()` (in any thread) compiles and keeps it; calling it runs it (compiling first
    if still needed) with the jitted function's non-static arguments.

    `key` names everything the program depends on beyond the code and the environment (see the
    module's docstring): the `signature`s of its arguments, static arguments and options.
    `lower` is called at once when the program is not found: call from the thread that may trace.
    """

    def __init__(self, name: str, key: tuple, lower: Callable[[], jax.stages.Lowered]):
        self.name = name
        self.digest = _digest(name, key)
        self._compiled = _find(self.digest)
        self._lowered = None if self._compiled is not None else lower()

    @property
    def ready(self) -> bool:
        """Whether it is compiled (found in memory or on disk, or compiled since)."""
        return self._compiled is not None

    def compile(self) -> jax.stages.Compiled:
        if self._compiled is None:
            program = self._lowered.compile()
            _count("compiled")
            if directory() is not None:
                _save(self.digest, program)
            with _lock:
                self._compiled = _memory.setdefault(self.digest, program)
        return self._compiled

    def __call__(self, *args):
        return (self._compiled or self.compile())(*args)


def _find(digest: str) -> jax.stages.Compiled | None:
    hit = _memory.get(digest)
    if hit is None and directory() is not None:
        hit = _load(digest)
        if hit is not None:
            with _lock:
                hit = _memory.setdefault(digest, hit)
    return hit


def _count(what: str) -> None:
    with _lock:
        stats[what] += 1


def _digest(name: str, key: tuple) -> str:
    h = hashlib.sha256()
    for part in (name, repr(key), _environment(), _trace_settings()):
        h.update(part.encode())
        h.update(b"\0")
    return f"{name.replace(' ', '_')}-{h.hexdigest()[:32]}"


@functools.cache
def _environment() -> str:
    """What every program depends on besides its own key; computed once per process."""
    import importlib.util

    import flax
    import jaxlib

    # The sources of jaxtts and pallas_kernels, found without importing the kernels.
    roots = [Path(__file__).parent, *map(Path, importlib.util.find_spec("pallas_kernels").submodule_search_locations)]
    sources = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            sources.update(str(path.relative_to(root)).encode())
            sources.update(path.read_bytes())
    devices = jax.devices()
    parts = (
        jax.__version__,
        jaxlib.__version__,
        flax.__version__,
        devices[0].platform,
        devices[0].client.platform_version,
        devices[0].device_kind,
        len(devices),
        os.environ.get("XLA_FLAGS", ""),
        sources.hexdigest(),
    )
    return repr(parts)


def _trace_settings() -> str:
    """JAX settings read while tracing (Mimi sets the matmul precision around its programs)."""
    c = jax.config
    return repr(
        (
            c.jax_enable_x64,
            str(c.jax_default_matmul_precision),
            c.jax_default_prng_impl,
            c.jax_threefry_partitionable,
        )
    )


def _path(digest: str) -> Path:
    assert _directory is not None
    return _directory / f"{digest}.jaxprog"


def _load(digest: str) -> jax.stages.Compiled | None:
    from jax.experimental.serialize_executable import deserialize_and_load

    path = _path(digest)
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    try:
        payload, in_tree, out_tree = pickle.loads(blob)
        program = deserialize_and_load(payload, in_tree, out_tree)
    except Exception as e:  # a file from a crashed write or another build: compile again
        _count("failed")
        log.warning(
            "jaxtts: compiled program %s could not be loaded (%s: %s); compiling it again", path, type(e).__name__, e
        )
        return None
    _count("loaded")
    return program


def _save(digest: str, program: jax.stages.Compiled) -> None:
    from jax.experimental.serialize_executable import serialize

    path = _path(digest)
    try:
        blob = pickle.dumps(serialize(program))
    except Exception as e:  # XLA:CPU cannot serialize some of its ops (a sort's comparator): memory only
        _count("failed")
        log.debug("compiled program %s cannot be serialized (%s: %s)", path.name, type(e).__name__, e)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk: memory only
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        _count("failed")
        log.warning("jaxtts: compiled program %s not saved (%s)", path, e.strerror or e)
        return
    _count("saved")
