"""Ray Serve (jaxtts.ray_serve): two replicas of the server over the tiny random model on a local
Ray cluster (2 CPUs, no dashboard, loopback only) answer OpenAI speech requests, both of them.

The replicas load the tiny random CSM and the random Mimi from directories. Bounded: at most 16 requests within 180 s after the replicas are up; Serve and Ray are shut down
at the end whatever happens.
"""

import concurrent.futures
import io
import socket
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'jaxtts[ray]' (the ray extra)")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'jaxtts[ray]'")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'jaxtts[serve]'")
import soundfile as sf  # noqa: E402

from jaxtts.ray_serve import REPLICA_HEADER, app_builder, build  # noqa: E402

# ray.init starts Ray's processes with fork + exec, which JAX's fork warning does not tell apart.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu", "JAXTTS_COMPILE_CACHE": "0"}},
    )
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def weights(tiny_csm, mimi, tmp_path_factory) -> dict:
    """The tiny random CSM and the random Mimi as directories: what each replica's TTS.load reads."""
    root = tmp_path_factory.mktemp("ray-weights")
    return {"model": str(tiny_csm.save(root / "csm")), "codec": str(mimi.save(root / "mimi"))}


def test_two_replicas_answer_speech_requests(cluster, weights):
    app = build(
        weights,  # each replica: TTS.load(model=..., codec=...)
        num_replicas=2,
        gpus_per_replica=0,
        cpus_per_replica=0.5,
        max_batch=1,
        engine_options={"pool_sizes": (1,), "chunk_frames": 2, "first_chunk_frames": 2, "max_prefill": 1},
        warmup=False,  # programs compile on each replica's first request
        app_options={"model_name": "tiny"},
    )
    serve.run(app, name="jaxtts", route_prefix="/")  # returns once both replicas are running

    def speak(i: int):
        r = httpx.post(
            f"{cluster}/v1/audio/speech",
            json={
                "model": "tiny",
                "input": f"Hello number {i}.",
                "voice": "alloy",
                "response_format": "wav",
                "seed": i,
                "max_audio_ms": 240,
            },
            timeout=180,
        )
        return r.status_code, r.headers.get(REPLICA_HEADER), r.content

    seen: dict[str, int] = {}
    sent, deadline = 0, time.monotonic() + 180
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while len(seen) < 2 and sent < 16 and time.monotonic() < deadline:
            for status, replica, body in pool.map(speak, range(sent, sent + 4)):
                assert status == 200, body[:500]
                samples, rate = sf.read(io.BytesIO(body), dtype="int16")
                assert rate == 24000 and 0 < len(samples) <= 3 * 1920
                assert replica
                seen[replica] = seen.get(replica, 0) + 1
            sent += 4
    assert len(seen) == 2, f"answered by {seen} after {sent} requests"

    # The rest of jaxtts serve's routes come along: models, health, OpenAI-style errors.
    models = httpx.get(f"{cluster}/v1/models", timeout=30)
    assert models.status_code == 200 and "tiny" in [m["id"] for m in models.json()["data"]]
    assert httpx.get(f"{cluster}/health", timeout=30).status_code == 200
    bad = httpx.post(f"{cluster}/v1/audio/speech", json={"model": "tiny", "voice": "alloy"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
    serve.delete("jaxtts")


def test_build_arguments_are_checked():
    from jaxtts.errors import JaxttsError

    with pytest.raises(JaxttsError, match="num_replicas or autoscaling_config"):
        build(num_replicas=2, autoscaling_config={"max_replicas": 2})
    with pytest.raises(JaxttsError, match="unknown jaxtts Ray Serve arguments: colour"):
        app_builder({"colour": "blue"})
    app = app_builder({"random_weights": "true", "min_replicas": "1", "max_replicas": "4", "max_batch": "8"})
    options = app._bound_deployment._deployment_config
    assert options.autoscaling_config.max_replicas == 4
    assert options.autoscaling_config.target_ongoing_requests == 8
    assert options.max_ongoing_requests == 16


def test_serve_ray_command_wiring(monkeypatch, capsys):
    """`jaxtts serve --ray` checks its options, then starts Serve's proxy on --host/--port and runs
    the application `build` makes (Ray itself replaced here)."""
    import jaxtts.ray_serve as rs
    from jaxtts.cli import main

    assert main(["serve", "--replicas", "2"]) == 2
    assert "go with --ray" in capsys.readouterr().err
    assert main(["serve", "--ray", "--replicas", "2", "--autoscale", "1:2"]) == 2
    assert "--replicas or --autoscale" in capsys.readouterr().err
    assert main(["serve", "--ray", "--autoscale", "4:2"]) == 2
    assert "MIN:MAX" in capsys.readouterr().err
    assert main(["serve", "--ray", "--devices", "some"]) == 2
    assert "'all' or a number" in capsys.readouterr().err

    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(init=kw))
    monkeypatch.setattr(ray, "shutdown", lambda: seen.update(ray_down=True))
    monkeypatch.setattr(serve, "start", lambda **kw: seen.update(start=kw))
    monkeypatch.setattr(serve, "run", lambda app, **kw: seen.update(app=app, run=kw))
    monkeypatch.setattr(serve, "shutdown", lambda: seen.update(serve_down=True))
    monkeypatch.setattr(rs, "build", lambda tts, **kw: seen.update(tts=tts, build=kw) or "app")

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(rs, "_wait_for_interrupt", interrupted)
    args = ["serve", "--ray", "--random-weights", "--autoscale", "1:3", "--max-batch", "8", "--port", "8123"]
    assert main([*args, "--gpus-per-replica", "0.5", "--api-key", "k"]) == 0
    assert seen["start"]["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert seen["tts"] == {"random_weights": True}
    assert seen["build"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3}
    assert seen["build"]["num_replicas"] is None and seen["build"]["gpus_per_replica"] == 0.5
    assert seen["build"]["max_batch"] == 8 and seen["build"]["app_options"]["api_key"] == "k"
    assert seen["app"] == "app" and seen["run"] == {"name": "jaxtts", "route_prefix": "/"}
    assert seen["serve_down"] and seen["ray_down"]
