"""`jaxtts speak` end to end in subprocesses, and its handling of bad input."""

import os
import subprocess
import sys
import wave

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_csm, mimi):
    root = tmp_path_factory.mktemp("weights")
    tiny_csm.save(root / "csm")
    mimi.save(root / "mimi")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla-cache")
    return dict(
        os.environ,
        JAXTTS_COMPILE_CACHE=str(cache),
        JAXTTS_CACHE=str(cache / "empty"),
        HF_HUB_CACHE=str(cache / "no-hub"),
    )


def jaxtts(*args, env, stdin=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "jaxtts.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=timeout,
    )


def speak_args(weights, out, *extra):
    return [
        "speak",
        "--model",
        weights / "csm",
        "--codec",
        weights / "mimi",
        "--dtype",
        "float32",
        "--quiet",
        "-o",
        out,
        *extra,
    ]


def test_speak_writes_reproducible_wav(weights, env, tmp_path):
    a, b, s = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "s.wav"
    for out in (a, b):
        r = jaxtts(*speak_args(weights, out, "Hello from jaxtts.", "--seed", 7, "--max-audio-ms", 480), env=env)
        assert r.returncode == 0, r.stderr[-4000:]
    with wave.open(str(a)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        frames = w.getnframes()
    assert frames > 0 and frames % 1920 == 0 and frames <= 6 * 1920
    assert a.read_bytes() == b.read_bytes()
    r = jaxtts(*speak_args(weights, s, "Hello from jaxtts.", "--seed", 7, "--max-audio-ms", 480, "--stream"), env=env)
    assert r.returncode == 0, r.stderr
    # --stream decodes a first 1-frame chunk then 8-frame chunks, the plain file 8-frame chunks only:
    # the same frames, the audio equal up to Mimi's rounding (at most one 16-bit step)
    streamed, whole = sf.read(str(s))[0], sf.read(str(a))[0]
    assert len(streamed) == len(whole)
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1.01 / 32768)


def test_interactive_speaks_each_line(weights, env, tmp_path):
    out = tmp_path / "line.wav"
    r = jaxtts(
        *speak_args(weights, out, "--interactive", "--seed", 1, "--max-audio-ms", 240),
        env=env,
        stdin="First line.\nSecond line.\n\n",
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line-001.wav", "line-002.wav"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + os.urandom(200))
    sf.write(str(d / "empty.wav"), np.zeros(0, np.float32), 24000)
    (d / "notes.txt").write_text("not audio at all\n")
    return d


BAD_CASES = {
    "empty text": (["   "], "text is empty"),
    "negative speaker": (["Hi.", "--speaker", "-1"], "speaker must be"),
    "non-integer speaker": (["Hi.", "--speaker", "1.5"], "invalid int value"),
    "negative temperature": (["Hi.", "--temperature", "-0.5"], "temperature"),
    "nan temperature": (["Hi.", "--temperature", "nan"], "temperature must be a finite number"),
    "top-k zero": (["Hi.", "--top-k", "0"], "top_k"),
    "top-p zero": (["Hi.", "--top-p", "0"], "top_p"),
    "min-p one": (["Hi.", "--min-p", "1"], "min_p"),
    "negative seed": (["Hi.", "--seed", "-1"], "unsigned 32-bit"),
    "seed past 32 bits": (["Hi.", "--seed", str(2**32)], "unsigned 32-bit"),
    "infinite audio length": (["Hi.", "--max-audio-ms", "inf"], "max-audio-ms"),
    "audio shorter than a frame": (["Hi.", "--max-audio-ms", "10"], "max-audio-ms"),
    "unknown output format": (["Hi.", "-o", "{out}.xyz"], "unknown audio format"),
    "text and interactive": (["Hi.", "--interactive"], "not both"),
    "random weights and a model": (["Hi.", "--random-weights"], "--random-weights"),
    "missing context wav": (["Hi.", "--context", "{bad}/missing.wav", "hello", "0"], "no such audio file"),
    "corrupt context wav": (["Hi.", "--context", "{bad}/corrupt.wav", "hello", "0"], "cannot read audio"),
    "empty context wav": (["Hi.", "--context", "{bad}/empty.wav", "hello", "0"], "empty"),
    "context not audio": (["Hi.", "--context", "{bad}/notes.txt", "hello", "0"], "cannot read audio"),
    "too long for the context": (["word " * 300], "exceeds the model's 256 positions"),
    "only invisible characters": (["\u200b\ufeff"], "text is empty"),
    "text not UTF-8": (["Hi \udcff"], "not valid Unicode"),  # the byte 0xff in argv
    "output name too long": (["Hi.", "-o", "{out}" + "x" * 300 + ".wav"], "cannot write the output file"),
    "pallas kernels on a CPU": (["Hi.", "--attention", "pallas"], "needs an NVIDIA GPU"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_one_line_no_output(case, weights, env, tmp_path, bad_files):
    args, message = BAD_CASES[case]
    out = tmp_path / "out.wav"
    args = [a.replace("{bad}", str(bad_files)).replace("{out}", str(tmp_path / "out")) for a in args]
    r = jaxtts(*speak_args(weights, out, *args), env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["missing model", "wrong model", "missing output dir"])
def test_bad_paths(which, weights, env, tmp_path):
    out = tmp_path / "out.wav"
    args = speak_args(weights, out, "Hi.")
    if which == "missing model":
        args[2], message = tmp_path / "nope", "no such file or directory"
    elif which == "wrong model":
        args[2], message = weights / "mimi", "not CSM"
    else:
        args[args.index(out)], message = tmp_path / "missing" / "out.wav", "no such directory"
    r = jaxtts(*args, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_dev_null_is_written_through(weights, env, tmp_path):
    """-o /dev/null (here a link to it) is written to, never replaced by a renamed temporary file
    (as root that replaced the device node); the duration is counted, not read back from it."""
    null = tmp_path / "null.wav"
    null.symlink_to(os.devnull)
    args = speak_args(weights, null, "Hi.", "--seed", 1, "--max-audio-ms", 160)
    r = jaxtts(*[a for a in args if a != "--quiet"], env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[-1].endswith(f"wrote {null} (0.16 s)"), r.stderr
    assert null.is_symlink() and null.is_char_device() and list(tmp_path.iterdir()) == [null]


def test_warning_is_one_line(weights, env, tmp_path):
    """A warning (here: the compile cache cannot be created, which costs speed, not the run) is one
    line, without Python's "file:line: UserWarning" and source line."""
    (tmp_path / "file").write_text("")
    args = speak_args(weights, tmp_path / "out.wav", "Hi.")
    args[2] = weights / "mimi"  # fails after the cache is set up
    r = jaxtts(*args, env=dict(env, JAXTTS_COMPILE_CACHE=str(tmp_path / "file")))
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"warning: compiled programs are not cached: cannot create {tmp_path / 'file'} (File exists); "
        "set JAXTTS_COMPILE_CACHE to a writable directory, or to 0",
        f"error: {weights / 'mimi'}: holds a mimi checkpoint, not CSM",
    ], r.stderr


def test_no_weights_advises_download(env, tmp_path):
    r = jaxtts("speak", "Hi.", "-o", tmp_path / "x.wav", env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "jaxtts download" in lines[0], r.stderr


def test_stdout_bytes_equal_the_file(weights, env, tmp_path):
    out = tmp_path / "file.wav"
    r = jaxtts(*speak_args(weights, out, "Same words.", "--seed", 4, "--max-audio-ms", 320), env=env)
    assert r.returncode == 0, r.stderr
    args = [a if a != out else "-" for a in speak_args(weights, out, "Same words.", "--seed", 4, "--max-audio-ms", 320)]
    piped = subprocess.run(
        [sys.executable, "-m", "jaxtts.cli", *map(str, args)], capture_output=True, env=env, timeout=600
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == out.read_bytes() and piped.stdout[:4] == b"RIFF"


FORMAT_ARGS = ("Formats.", "--seed", 2, "--max-audio-ms", 400)


@pytest.fixture(scope="module")
def format_reference(weights, env, tmp_path_factory):
    """The WAV every other format is compared with (one run for all of them)."""
    wav = tmp_path_factory.mktemp("formats") / "a.wav"
    r = jaxtts(*speak_args(weights, wav, *FORMAT_ARGS), env=env)
    assert r.returncode == 0, r.stderr
    return wav


@pytest.mark.parametrize("ext", [".flac", ".ogg", ".opus", ".mp3"])
def test_output_format_from_extension(ext, weights, env, tmp_path, format_reference):
    other = tmp_path / f"a{ext}"
    r = jaxtts(*speak_args(weights, other, *FORMAT_ARGS), env=env)
    assert r.returncode == 0, r.stderr
    ref, sr_ref = sf.read(str(format_reference), dtype="float32")
    got, sr = sf.read(str(other), dtype="float32")
    assert sr == sr_ref == 24000 and got.ndim == 1
    if ext == ".flac":  # lossless: the WAV's 16-bit samples exactly
        np.testing.assert_array_equal(got, ref)
    else:  # lossy: same duration (codec padding trimmed by libsndfile)
        assert abs(len(got) - len(ref)) <= 1920, (len(got), len(ref))


def test_internal_error_is_one_line_and_debug_shows_the_traceback(weights, env, tmp_path):
    """An exception jaxtts did not foresee (here: loading raises RuntimeError) is the CLI's last line
    of defence: one line, exit 1, no output file; --debug shows the traceback."""
    out = tmp_path / "out.wav"
    boom = (
        "import sys, jaxtts.tts as t\n"
        "def load(*a, **k): raise RuntimeError('simulated failure\\nsecond line')\n"
        "t.TTS.load = load\n"
        "from jaxtts.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [sys.executable, "-c", boom, *map(str, speak_args(weights, out, "Hi."))]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0] == (
        "jaxtts: internal error: RuntimeError: simulated failure second line "
        "(run with --debug or JAXTTS_DEBUG=1 for the traceback)"
    ), r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    r = subprocess.run([*args[:3], "--debug", *args[3:]], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1 and "Traceback" in r.stderr and "simulated failure" in r.stderr


def test_env_reports_cpu_and_missing_weights(env):
    r = jaxtts("env", env=env)
    assert r.returncode == 0, r.stderr
    assert "devices (backend cpu)" in r.stdout and "jax " in r.stdout
    assert "kernels            none: plain XLA" in r.stdout
    assert "CSM   not found" in r.stdout and "jaxtts download" in r.stdout


def test_voice_add_then_speak_with_it(weights, env, tmp_path):
    """jaxtts voice add → speak --voice NAME equals speak with the same turn as --context."""
    env = dict(env, JAXTTS_CACHE=str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    wav = tmp_path / "me.wav"
    sf.write(str(wav), (0.1 * rng.standard_normal(3 * 1920)).astype(np.float32), 24000)
    r = jaxtts("voice", "add", "me", wav, "This is me.", "--speaker", 3, "--codec", weights / "mimi", env=env)
    assert r.returncode == 0, r.stderr
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    r = jaxtts(*speak_args(weights, a, "Hello again.", "--voice", "me", "--seed", 5, "--max-audio-ms", 320), env=env)
    assert r.returncode == 0, r.stderr
    r = jaxtts(
        *speak_args(
            weights,
            b,
            "Hello again.",
            "--context",
            wav,
            "This is me.",
            3,
            "--speaker",
            3,
            "--seed",
            5,
            "--max-audio-ms",
            320,
        ),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(sf.read(str(a))[0], sf.read(str(b))[0])
    r = jaxtts(*speak_args(weights, tmp_path / "c.wav", "Hi.", "--voice", "nobody"), env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: no voice named 'nobody' (`jaxtts voice list` shows the stored ones)"
    ], r.stderr


@pytest.mark.parametrize("user", [None, "true"])
def test_speak_takes_gpu_memory_on_demand_unless_told(user, monkeypatch, capsys):
    """`jaxtts speak` turns off JAX's up-front reservation of GPU memory (seconds of a new
    process's start) before anything can start the backend; a user's own setting stays."""
    from jaxtts.cli import main

    if user is None:
        monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    else:
        monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", user)
    assert main(["speak", "Hi.", "--temperature", "-1", "-o", "x.wav"]) == 2  # refused before any model
    assert "temperature must be in" in capsys.readouterr().err
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == (user or "false")


def test_env_counts_the_stored_programs(env, tmp_path):
    stored = tmp_path / "xla" / "jaxtts-programs"
    stored.mkdir(parents=True)
    for name in ("prefill-a.jaxprog", "decode_chunk-b.jaxprog"):
        (stored / name).write_bytes(b"x" * 1000)
    r = jaxtts("env", env=dict(env, JAXTTS_COMPILE_CACHE=str(tmp_path / "xla")))
    assert r.returncode == 0, r.stderr
    assert "jaxtts-programs/ 2 programs (2.0 KB), loaded instead of traced" in r.stdout
