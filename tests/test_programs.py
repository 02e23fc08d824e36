"""`jaxtts.programs`: compiled programs kept across processes. A new process that finds them on
disk speaks exactly what a process that compiled them spoke, a changed key compiles a new
program, and a damaged or unwritable store costs a compile, never a wrong answer or an error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtts import programs


@pytest.fixture
def store(tmp_path):
    """The store in tmp_path, emptied in memory (as in a new process), with JAX's persistent
    compile cache off (an earlier test of this process may have turned it on: programs it serves
    are not saved on CPU); all restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache

    was = programs._directory, programs._platforms, dict(programs._memory), dict(programs.stats)
    was_cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    # On CPU too: these tests check the store's files with small programs (XLA:CPU's copies of
    # whole-model programs are not reliable, so the library keeps those in memory on CPU).
    programs.set_directory(tmp_path / "programs", platforms=("cpu", "gpu"))
    programs._memory.clear()
    programs.stats.update(dict.fromkeys(programs.stats, 0))
    yield tmp_path / "programs"
    jax.config.update("jax_enable_compilation_cache", was_cache)
    compilation_cache.reset_cache()
    programs.set_directory(was[0], platforms=was[1])
    programs._memory.clear()
    programs._memory.update(was[2])
    programs.stats.update(was[3])


def _double(x, *, scale: int):
    return x * scale


_double_jit = jax.jit(_double, static_argnames="scale")


def _program(x, scale=2):
    return programs.Program("double", (programs.signature(x), scale), lambda: _double_jit.lower(x, scale=scale))


def test_program_is_saved_then_loaded_and_runs_the_same(store):
    x = jnp.arange(6.0)
    p = _program(x)
    assert not p.ready
    np.testing.assert_array_equal(p(x), 2 * np.arange(6.0))
    assert programs.stats["compiled"] == 1 and programs.stats["saved"] == 1
    assert len(list(store.glob("double-*.jaxprog"))) == 1
    programs._memory.clear()  # a new process: only the file is left
    q = _program(x)
    assert q.ready and programs.stats["loaded"] == 1
    np.testing.assert_array_equal(q(x + 1), 2 * (np.arange(6.0) + 1))


def test_key_changes_make_new_programs(store):
    x = jnp.arange(6.0)
    _program(x)(x)
    np.testing.assert_array_equal(_program(x, scale=3)(x), 3 * np.arange(6.0))  # a static argument
    y = jnp.arange(4, dtype=jnp.int32)
    np.testing.assert_array_equal(_program(y)(y), 2 * np.arange(4))  # another shape and dtype
    assert programs.stats["compiled"] == 3
    assert len(list(store.glob("double-*.jaxprog"))) == 3
    # JAX settings read while tracing are part of the key (Mimi traces under "highest" precision).
    with jax.default_matmul_precision("highest"):
        assert programs._digest("double", (1,)) != _default_digest
    assert programs._digest("double", (1,)) == _default_digest


_default_digest = None


@pytest.fixture(autouse=True)
def _digest_outside_any_context():
    global _default_digest
    _default_digest = programs._digest("double", (1,))


def test_damaged_file_is_compiled_again_and_replaced(store, caplog):
    x = jnp.arange(6.0)
    _program(x)(x)
    (path,) = store.glob("double-*.jaxprog")
    path.write_bytes(b"not a program")
    programs._memory.clear()
    with caplog.at_level("WARNING", logger="jaxtts.programs"):
        p = _program(x)
    assert "could not be loaded" in caplog.text
    assert not p.ready
    np.testing.assert_array_equal(p(x), 2 * np.arange(6.0))
    assert programs.stats["failed"] == 1 and programs.stats["saved"] == 2
    programs._memory.clear()
    assert _program(x).ready  # the file was replaced by a good one


def test_unwritable_store_keeps_programs_in_memory(tmp_path, store, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    programs.set_directory(blocker / "programs", platforms=("cpu", "gpu"))  # its parent is a file
    x = jnp.arange(6.0)
    with caplog.at_level("WARNING", logger="jaxtts.programs"):
        np.testing.assert_array_equal(_program(x)(x), 2 * np.arange(6.0))
    assert "not saved" in caplog.text
    assert _program(x).ready  # still in this process's memory
    assert not list(tmp_path.glob("**/*.tmp"))


def test_usable_refuses_tracers(store):
    seen = []

    @jax.jit
    def f(x):
        seen.append(programs.usable(x))
        return x

    f(jnp.ones(3))
    assert seen == [False]
    assert programs.usable(jnp.ones(3), np.ones(2), jax.ShapeDtypeStruct((2,), jnp.float32))
    with programs.bypassed():
        assert not programs.usable() and not programs.usable(jnp.ones(3))
    assert programs.usable()


def test_prefill_inside_a_users_trace_uses_the_jitted_function(store, tiny_csm):
    """A traced prefill (eval_shape here) cannot run a compiled program: it must still work."""
    from jaxtts.generation import prefill, row_keys

    tokens = np.zeros((1, 16, 33), np.int32)
    mask = np.zeros((1, 16, 33), bool)
    cache = tiny_csm.backbone_cache(1, 256)
    out = jax.eval_shape(lambda t: prefill(tiny_csm, t, mask, [4], cache=cache, key=row_keys([0])).hidden, tokens)
    assert out.shape == (1, tiny_csm.cfg.backbone.embed_dim)
    assert programs.stats["compiled"] == 0


SPEAK = textwrap.dedent(
    """
    import sys
    import numpy as np
    from jaxtts import programs
    from jaxtts.config import preset
    from jaxtts.csm import CSM
    from jaxtts.mimi import Mimi
    from jaxtts.tts import TTS, enable_compilation_cache

    enable_compilation_cache()
    tts = TTS(CSM.random(preset("tiny")), Mimi.random(), max_silence_ms=None)
    ctx = tts.prepare_context([__import__("jaxtts").Segment(0, "Hi.", audio=np.full(4000, 0.05, np.float32))])
    audio = tts.generate("Hello there.", seed=3, max_audio_ms=800, context=ctx)
    np.save(sys.argv[1], audio)
    print(programs.stats["loaded"], programs.stats["compiled"])
    """
)


def test_on_cpu_whole_model_programs_stay_in_memory(tmp_path):
    """On CPU nothing goes to disk (XLA:CPU's serialized copies of such programs can lack code
    compiled earlier in the process), and processes with the caches on or off speak the same."""

    def speak(name, **env):
        out = tmp_path / f"{name}.npy"
        run = subprocess.run(
            [sys.executable, "-c", SPEAK, str(out)],
            env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        loaded, compiled = map(int, run.stdout.split()[-2:])
        return np.load(out), loaded, compiled

    cache = str(tmp_path / "xla")
    first, loaded, compiled = speak("first", JAXTTS_COMPILE_CACHE=cache)
    assert loaded == 0 and compiled >= 4  # prefills, a decode chunk, Mimi's encoder and step
    second, loaded, _ = speak("second", JAXTTS_COMPILE_CACHE=cache)
    off, _, _ = speak("off", JAXTTS_COMPILE_CACHE="0")
    assert loaded == 0 and not list((tmp_path / "xla").glob("**/*.jaxprog"))
    assert len(first) > 0
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(off, first)


@pytest.mark.gpu
@pytest.mark.gpu_only(reason="whole-model programs go to disk on GPUs only (see jaxtts.programs.DISK_PLATFORMS)")
def test_loaded_programs_speak_as_the_compiled_ones(store, check_preset, kernel_options):
    """In one process: speech from freshly compiled programs, then from the same programs loaded
    back from disk (memory cleared), the Pallas kernels' executables among them."""
    from jaxtts.config import preset
    from jaxtts.csm import CSM
    from jaxtts.defaults import default_dtype
    from jaxtts.mimi import Mimi
    from jaxtts.tts import TTS

    model = CSM.random(preset(check_preset), dtype=default_dtype())
    tts = TTS(model, Mimi.random(), options=kernel_options, max_silence_ms=None)
    first = tts.generate("Hello there.", seed=3, max_audio_ms=640)
    saved = programs.stats["saved"]
    assert saved >= 4  # CSM.random's, the prefill, a decode chunk, Mimi's step
    programs._memory.clear()
    again = TTS(model, tts.codec, options=kernel_options, max_silence_ms=None)
    second = again.generate("Hello there.", seed=3, max_audio_ms=640)
    assert programs.stats["loaded"] >= 3 and programs.stats["saved"] == saved
    np.testing.assert_array_equal(second, first)


def test_a_second_engine_reuses_the_pool_programs(tiny_csm, mimi):
    """The serving engine's pool programs (decode chunks, its Mimi step) and prefills come from
    the store: a second engine (as after a restart; here from this process's memory) compiles
    none of them again and speaks the same samples. (On a GPU they are also kept on disk.)"""
    from jaxtts.engine import Engine
    from jaxtts.tts import TTS

    def speak():
        tts = TTS(tiny_csm, mimi, max_silence_ms=None)
        with Engine(tts, max_batch=1, chunk_frames=2, first_chunk_frames=1) as eng:
            return eng.submit("Hello there.", seed=7, max_audio_ms=480).result(timeout=600)

    first = speak()
    compiled = programs.stats["compiled"]
    second = speak()
    assert programs.stats["compiled"] == compiled
    np.testing.assert_array_equal(second, first)
