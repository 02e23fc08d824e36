"""Ray Serve: `jaxtts serve`'s OpenAI-compatible app on a Ray cluster, one replica per GPU.

    pip install -e ".[serve,ray]"
    jaxtts serve --ray --replicas 4              # on $RAY_ADDRESS's cluster, else a local one
    jaxtts serve --ray --autoscale 1:8           # Ray Serve autoscaling between 1 and 8 replicas

    from ray import serve
    from jaxtts.ray_serve import build
    serve.run(build({"model": "csm-1b/", "codec": "mimi/"}, num_replicas=2), route_prefix="/")

Each replica is a Ray actor holding its own `TTS` and `Engine` on the GPU Ray gives it (Ray sets
CUDA_VISIBLE_DEVICES per replica), warmed up before the replica takes traffic; its HTTP routes are
`jaxtts.server.create_app`'s, mounted by Ray Serve's FastAPI ingress (`@serve.ingress()` with the
app built in the replica, `__serve_build_asgi_app__`), so the endpoints, errors and streaming are
those of `jaxtts serve`. Ray's proxy spreads requests over the replicas (each response names its
replica in an `x-jaxtts-replica` header); Ray's autoscaler adds and removes replicas from the
number of requests in flight (`autoscaling_config`, Ray's own keys). Voices stored through one
replica are seen by the others when the voice directory is shared (the default is per host).

Ray is imported only here (the `ray` extra), never by the rest of jaxtts.
"""

from __future__ import annotations

import importlib
import sys

from jaxtts import validation
from jaxtts.errors import JaxttsError
from jaxtts.server import create_app, make_engine
from jaxtts.tts import TTS

REPLICA_HEADER = "x-jaxtts-replica"


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise JaxttsError("Ray Serve is not installed: pip install 'jaxtts[ray]'") from None
    return ray, serve


def _make_tts(tts) -> TTS:
    """The replica's TTS: None (the cached CSM-1B and Mimi), a dict of `TTS.load` arguments, a
    zero-argument callable, or "module:function" naming one."""
    if tts is None or isinstance(tts, dict):
        return TTS.load(**{"progress": False, **(tts or {})})
    if isinstance(tts, str):
        module, _, name = tts.partition(":")
        tts = getattr(importlib.import_module(module), name)
    made = tts()
    if not isinstance(made, TTS):
        raise JaxttsError(f"the replica's TTS factory returned {type(made).__name__}, not a jaxtts.TTS")
    return made


class _ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that served it."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


class SpeechReplica:
    """One Ray Serve replica: a TTS, its Engine (warmed up here, before Ray routes requests to
    the replica) and `create_app`'s FastAPI app over it."""

    def __init__(
        self,
        tts=None,
        *,
        max_batch: int = 64,
        devices=None,
        voices: str | None = None,
        engine_options: dict | None = None,
        warmup: bool | dict = True,
        app_options: dict | None = None,
    ):
        self.engine = make_engine(
            _make_tts(tts), max_batch=max_batch, voices_dir=voices, devices=devices, **(engine_options or {})
        )
        if warmup is not False:
            self.engine.warmup(**(warmup if isinstance(warmup, dict) else {}))
        self.app_options = dict(app_options or {})

    def __serve_build_asgi_app__(self):
        from ray import serve

        app = create_app(self.engine, warmup=False, **self.app_options)
        app.add_middleware(_ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread has died is replaced."""
        if not self.engine.running:
            raise RuntimeError("the jaxtts engine thread has stopped")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout=10)


def build(
    tts=None,
    *,
    num_replicas: int | None = None,
    autoscaling_config: dict | None = None,
    gpus_per_replica: float | None = None,
    cpus_per_replica: float = 1.0,
    max_ongoing_requests: int | None = None,
    name: str = "jaxtts",
    runtime_env: dict | None = None,
    **replica,
):
    """A Ray Serve application (`serve.run(build(...), route_prefix="/")`) of `SpeechReplica`s.

    tts: what each replica loads (see `_make_tts`). num_replicas: a fixed count (default 1), or
    autoscaling_config: Ray Serve's autoscaling keys (min_replicas, max_replicas,
    target_ongoing_requests, ...; target_ongoing_requests defaults to the replica's max_batch).
    gpus_per_replica: default 1 when the connected Ray cluster has GPUs, else 0.
    max_ongoing_requests: requests Ray sends one replica at once (default 2 × max_batch: the
    engine batches max_batch and queues the rest). runtime_env: the replicas' Ray runtime
    environment (e.g. {"env_vars": {...}}). The other keywords go to `SpeechReplica`: max_batch,
    devices, voices, engine_options (more `Engine` arguments), warmup (Engine.warmup's
    arguments, or False), app_options (`create_app`'s: api_key, model_name, ...).
    """
    ray, serve = _ray()
    if num_replicas is not None and autoscaling_config is not None:
        raise JaxttsError("give num_replicas or autoscaling_config, not both")
    max_batch = validation.integer("max_batch", replica.get("max_batch", 64), low=1, high=4096)
    if num_replicas is not None:
        validation.integer("num_replicas", num_replicas, low=1)
    if autoscaling_config is not None:
        autoscaling_config = {"target_ongoing_requests": max_batch, **autoscaling_config}
    if gpus_per_replica is None:
        gpus_per_replica = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    actor = {"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica}
    if runtime_env:
        actor["runtime_env"] = runtime_env
    ingress = serve.ingress()(SpeechReplica)  # the app comes from __serve_build_asgi_app__
    options = dict(
        name=name,
        ray_actor_options=actor,
        max_ongoing_requests=max_ongoing_requests or 2 * max_batch,
        health_check_period_s=10,
    )
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas or 1
    return serve.deployment(ingress, **options).bind(tts, **replica)


def app_builder(args: dict):
    """For `serve run jaxtts.ray_serve:app_builder model=csm-1b/ codec=mimi/ num_replicas=2` and
    Ray Serve config files: string arguments model, codec, dtype, quantize, random_weights,
    num_replicas, min_replicas / max_replicas (autoscaling), max_batch, devices, api_key."""
    args = dict(args)
    load = {k: args.pop(k) for k in ("model", "codec", "dtype", "quantize") if k in args}
    if str(args.pop("random_weights", "")).lower() in ("1", "true", "yes"):
        load["random_weights"] = True
    kwargs = {}
    if "num_replicas" in args:
        kwargs["num_replicas"] = int(args.pop("num_replicas"))
    if "min_replicas" in args or "max_replicas" in args:
        kwargs["autoscaling_config"] = {
            "min_replicas": int(args.pop("min_replicas", 1)),
            "max_replicas": int(args.pop("max_replicas", 1)),
        }
    if "max_batch" in args:
        kwargs["max_batch"] = int(args.pop("max_batch"))
    if "devices" in args:
        kwargs["devices"] = args.pop("devices")
    if "api_key" in args:
        kwargs["app_options"] = {"api_key": args.pop("api_key")}
    if args:
        raise JaxttsError(f"unknown jaxtts Ray Serve arguments: {', '.join(sorted(args))}")
    return build(load, **kwargs)


def _autoscale(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or not 0 <= int(lo) <= int(hi) or int(hi) < 1:
        raise JaxttsError(f"--autoscale takes MIN:MAX replicas (0 ≤ MIN ≤ MAX, MAX ≥ 1), got {text!r}")
    return int(lo), int(hi)


def run_ray_serve(args) -> int:
    """`jaxtts serve --ray`: deploy on a Ray cluster and serve until interrupted."""
    import os

    validation.integer("--port", args.port, low=0, high=65535)
    validation.integer("--max-batch", args.max_batch, low=1, high=4096)
    if args.random_weights and (args.model or args.codec):
        raise JaxttsError("--random-weights builds its own weights: drop --model/--codec, or drop --random-weights")
    if args.replicas is not None and args.autoscale is not None:
        raise JaxttsError("give --replicas or --autoscale, not both")
    if args.replicas is not None:
        validation.integer("--replicas", args.replicas, low=1)
    autoscaling = None
    if args.autoscale is not None:
        lo, hi = _autoscale(args.autoscale)
        autoscaling = {"min_replicas": lo, "max_replicas": hi}
        if args.target_ongoing is not None:
            autoscaling["target_ongoing_requests"] = validation.integer("--target-ongoing", args.target_ongoing, low=1)
    if args.devices is not None and args.devices.strip().lower() != "all" and not args.devices.strip().isdigit():
        raise JaxttsError(f"--devices must be 'all' or a number of devices, got {args.devices!r}")
    ray, serve = _ray()
    api_key = args.api_key or os.environ.get("JAXTTS_API_KEY") or None
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=not args.quiet)
    serve.start(http_options={"host": args.host, "port": args.port})
    load = dict(model=args.model, codec=args.codec, dtype=args.dtype, quantize=args.quantize)
    load = {k: v for k, v in load.items() if v is not None}
    if args.random_weights:
        load["random_weights"] = True
    app = build(
        load,
        num_replicas=args.replicas if autoscaling is None else None,
        autoscaling_config=autoscaling,
        gpus_per_replica=args.gpus_per_replica,
        max_batch=args.max_batch,
        devices=args.devices,
        voices=args.voices,
        app_options=dict(
            api_key=api_key,
            model_name=args.model_name,
            max_input_chars=args.max_input_chars,
            max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        ),
    )
    print("jaxtts serve --ray: starting the replicas (each loads and warms up)...", file=sys.stderr, flush=True)
    serve.run(app, name="jaxtts", route_prefix="/")
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"jaxtts serve --ray: ready on http://{host}:{args.port}/", file=sys.stderr, flush=True)
    try:
        _wait_for_interrupt()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C (the replicas serve in Ray's processes meanwhile)."""
    import threading

    threading.Event().wait()


__all__ = ["REPLICA_HEADER", "SpeechReplica", "app_builder", "build", "run_ray_serve"]
