"""Several devices (jaxtts.sharding), on 8 CPU devices: the serving engine with its pool split over
them gives each request the frames it gets on one device; a data-parallel (and an FSDP)
fine-tuning step equals the single-device step on the same global batch; sharded train state
round-trips through an Orbax checkpoint. Bad device counts are one-line errors.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX starts, and this pytest
process runs on one device: the checks run in one subprocess (tests/multidevice_check.py), which
writes its findings to a JSON file that the tests below assert on. A fine-tune over two processes
(jax.distributed on loopback, tests/multihost_check.py) is opt-in: JAXTTS_TEST_MULTIHOST=1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtts.errors import JaxttsError

CHECK = Path(__file__).with_name("multidevice_check.py")


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("multidevice") / "found.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, str(CHECK), str(out), "engine", "finetune"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["device_count"] == 8
    return found


def _part(found: dict, name: str) -> dict:
    part = found[name]
    assert "exception" not in part, part["exception"]
    return part


def test_sharded_engine_gives_each_request_its_single_device_frames(found):
    e = _part(found, "engine")
    assert e["devices"] == 8 and e["pool_sizes"] == [8, 16]
    assert e["frames_equal"] == [True] * 10, e["frame_counts"]
    assert e["audio_rel_err"] < 1e-4
    assert e["compiled_after_warmup"] == 0
    assert [16, 8] in [r[:2] for r in e["resizes"]], e["resizes"]  # rows moved between devices
    assert e["cache_spec"] == "P('batch',)" and e["cache_devices"] == 8  # the KV cache split by rows
    # On 3 of the 8 devices: max_batch 10 → 12, pool sizes (1, 8, 32) → multiples of 3 up to 12.
    assert (e["pool_sizes_3"], e["max_batch_3"]) == ([3, 9, 12], 12)
    assert len(e["errors"]) == 3 and all("\n" not in m for m in e["errors"])
    assert "this host has 8 cpu devices" in e["errors"][0] and "'abc'" in e["errors"][1]


def test_data_parallel_and_fsdp_steps_equal_the_single_device_step(found):
    f = _part(found, "finetune")
    for mode in ("dp", "fsdp"):
        r = f[mode]
        assert r["devices"] == 8, r
        assert r["params_moved"] > 1e-4, r  # the steps did change the weights
        assert r["param_rel_err"] < 1e-4, r
        assert r["metric_rel_err"] < 1e-5, r  # loss, both terms, gradient norm
    assert f["dp"]["params_split"] == 0 and f["dp"]["opt_split"] == 0  # replicated
    assert f["fsdp"]["params_split"] > f["fsdp"]["leaves"] // 2 and f["fsdp"]["opt_split"] > 0
    ckpt = f["checkpoint"]
    assert ckpt["values_equal"] and ckpt["shardings_as_template"] and ckpt["meta"]["step"] == 2
    assert "does not split evenly over 3 devices" in f["errors"][0]
    assert "JAX sees 8 cpu devices" in f["errors"][1] and "'two'" in f["errors"][2]


def test_device_arguments_in_this_process():
    """One device here: a count above it, a word, a duplicate are one-line errors; None / 1 / "all"
    are the plain single-device path."""
    import jax

    from jaxtts.sharding import batch_mesh, resolve_devices

    assert batch_mesh(None) is None and batch_mesh(1) is None and batch_mesh("all") is None
    assert resolve_devices("all") == jax.local_devices()
    for bad, message in ((2, "this host has 1 cpu device;"), ("abc", "'all' or a number"), ("-1", "'all' or a number")):
        with pytest.raises(JaxttsError, match=message):
            resolve_devices(bad, what="--devices")
    with pytest.raises(JaxttsError, match="listed twice"):
        resolve_devices([jax.devices()[0]] * 2)


def test_serve_and_finetune_commands_refuse_bad_devices(capsys):
    from jaxtts.cli import main

    assert main(["serve", "--random-weights", "--devices", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--devices 3: this host has 1 cpu device" in err
    assert main(["serve", "--random-weights", "--devices", "abc"]) == 2
    assert "--devices must be 'all' or a number of devices, got 'abc'" in capsys.readouterr().err
    assert main(["finetune", "--data", "none.jsonl", "--out", "none", "--devices", "2"]) == 2
    assert "--devices 2: JAX sees 1 cpu device;" in capsys.readouterr().err
    assert main(["finetune", "--data", "none.jsonl", "--out", "none", "--process-id", "1"]) == 2
    assert "go with --distributed" in capsys.readouterr().err


@pytest.mark.skipif(
    not os.environ.get("JAXTTS_TEST_MULTIHOST"),
    reason="opt-in (about 2 minutes on 2 cores): JAXTTS_TEST_MULTIHOST=1 runs two processes x 2 CPU devices",
)
def test_two_processes_fine_tune_like_one_device(tmp_path):
    """A fine-tune over two processes (jax.distributed on 127.0.0.1, 2 CPU devices each, FSDP)
    ends with the single-device run's weights; one stopped after 2 steps and resumed on ONE
    device ends with the uninterrupted 3-step run's weights."""
    import socket

    import numpy as np
    import soundfile as sf

    from jaxtts.csm import CSM, _flat, param_dict

    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i in range(8):
        t = np.arange(int(24_000 * (0.4 + 0.1 * i))) / 24_000
        sf.write(data / f"c{i}.wav", (0.3 * np.sin(2 * np.pi * (150 + 50 * i) * t)).astype(np.float32), 24_000)
        lines.append(json.dumps({"id": f"c{i}", "audio": f"c{i}.wav", "text": f"Clip number {i}.", "speaker": i % 2}))
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXTTS_COMPILE_CACHE="0")
    script = Path(__file__).with_name("multihost_check.py")

    def run(out: str, steps: int, processes: int) -> list[dict]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [str(data / "train.jsonl"), str(tmp_path / out), str(steps)]
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), *argv, str(i), str(processes), str(port)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(processes)
        ]
        results = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            assert p.returncode == 0, stderr[-3000:]
            results.append(json.loads(stdout.split("RESULT ", 1)[1]))
        return results

    def weights(out: str) -> dict:
        return {k: np.asarray(v) for k, v in _flat(param_dict(CSM.load(tmp_path / out / "model")))}

    hosts = run("hosts", 3, 2)
    assert [(r["processes"], r["devices"]) for r in hosts] == [(2, 4)] * 2
    assert hosts[0]["losses"] == hosts[1]["losses"] and len(hosts[0]["losses"]) == 3
    single = run("single", 3, 1)[0]
    np.testing.assert_allclose(hosts[0]["losses"], single["losses"], rtol=1e-5)
    a, b = weights("hosts"), weights("single")
    assert max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in a) < 1e-4

    run("resumed", 2, 2)
    resumed = run("resumed", 3, 1)[0]  # the 2-process checkpoint of step 2, restored on one device
    assert len(resumed["losses"]) == 1
    np.testing.assert_allclose(resumed["losses"], hosts[0]["losses"][2:], rtol=1e-5)
    c = weights("resumed")
    assert max(float(np.abs(a[k] - c[k]).max() / np.abs(a[k]).max()) for k in a) < 1e-5
