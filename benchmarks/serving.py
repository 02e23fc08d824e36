"""Serving benchmark: N concurrent streaming clients against one `jaxtts.engine.Engine`.

    python -m benchmarks.serving --clients 1,64,256 --audio-s 10                 # CSM-1B from the caches
    python -m benchmarks.serving --clients 1,64,256 --audio-s 10 --random-weights
    python -m benchmarks.serving --clients 1,4 --audio-s 1 --preset tiny         # CPU smoke run
    python -m benchmarks.serving --clients 1,64 --random-weights --http          # and through HTTP

For each N, N requests arrive as a Poisson process (mean gap ramp_s / N, the first at once),
each streamed by its own client thread. Reported per N:

  TTFA p50 / p95    time to first audio: submit → first PCM chunk in the client's hands
  slowest RTF       the slowest stream's real-time factor: (its last chunk − its submit) /
                    its seconds of audio (< 1: faster than real time, including its wait)
  aggregate ×RT     seconds of audio delivered / wall seconds from the first submit to the last chunk
  compiles          XLA programs compiled on the engine thread during the run (0 after warmup)
  admit / wait /    the engine thread's time during the run: admitting requests (contexts,
  deliver           prefills, inserts), waiting for chunks' frames and audio from the device,
                    handing them to the streams (Engine.stats())
  prefills          prefill calls; frames/chunk: frames per decode call (short while rows wait
                    for their first audio)

With --http, each N runs twice on the same warm engine: clients calling the engine directly,
then clients of `jaxtts serve`'s app (uvicorn in this process on 127.0.0.1, an ephemeral port)
streaming `POST /v1/audio/speech` with response_format pcm through httpx, first audio being the
first body byte. The difference between the two rows is what HTTP adds.

The engine is warmed up first (its report is in the JSON). A table goes to stdout, the numbers
to --out as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time

import numpy as np

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest to find its friends."
COLUMNS = [
    ("clients", "clients", "{:d}"),
    ("via", "via", "{}"),
    ("run-ahead", "run_ahead", "{}"),
    ("Mimi precision", "codec_precision", "{}"),
    ("TTFA p50", "ttfa_p50_s", "{:.3f} s"),
    ("TTFA p95", "ttfa_p95_s", "{:.3f} s"),
    ("slowest RTF", "slowest_rtf", "{:.3f}"),
    ("aggregate ×RT", "aggregate_x_realtime", "{:.2f}"),
    ("audio", "audio_s_total", "{:.1f} s"),
    ("wall", "wall_s", "{:.1f} s"),
    ("failed", "failed", "{:d}"),
    ("compiles", "compilations", "{:d}"),
    ("admit", "admit_s", "{:.2f} s"),
    ("wait", "wait_s", "{:.2f} s"),
    ("deliver", "deliver_s", "{:.2f} s"),
    ("prefills", "prefills", "{:d}"),
    ("frames/chunk", "frames_per_chunk", "{:.1f}"),
]


_ENGINE_TIMINGS = ("admit_s", "wait_s", "deliver_s", "prefills", "chunks", "chunk_frames")


def _client(engine, delay_s: float, start: float, request: dict, record: dict) -> None:
    """Submit at start + delay_s (retrying while the engine is busy), stream, time it."""
    from jaxtts.engine import Busy

    time.sleep(max(0.0, start + delay_s - time.monotonic()))
    submitted = time.monotonic()
    while True:
        try:
            handle = engine.submit(**request)
            break
        except Busy as e:
            time.sleep(e.retry_after_s)
    first = last = None
    samples = 0
    try:
        for chunk in handle:
            last = time.monotonic()
            first = first or last
            samples += len(chunk)
    except Exception as e:  # counted as failed; the benchmark goes on
        record["error"] = f"{type(e).__name__}: {e}"
    record.update(submitted=submitted, first=first, last=last, audio_s=samples / 24_000)


async def _http_stream(client, url: str, delay_s: float, start: float, request: dict) -> dict:
    """As _client, through the server: POST /v1/audio/speech (pcm: 24 kHz s16le), streamed."""
    import asyncio

    body = dict(
        model="csm-1b",
        input=request["text"],
        voice="alloy",
        response_format="pcm",
        seed=request["seed"],
        max_audio_ms=request["max_audio_ms"],
    )
    await asyncio.sleep(max(0.0, start + delay_s - time.monotonic()))
    record = {"submitted": time.monotonic(), "first": None, "last": None}
    size = 0
    try:
        while True:
            async with client.stream("POST", url, json=body) as r:
                if r.status_code == 429:  # queue full: retry as an OpenAI client would
                    await asyncio.sleep(float(r.headers.get("retry-after", "0.05")))
                    continue
                if r.status_code != 200:
                    record["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    break
                async for data in r.aiter_bytes():
                    if data:
                        record["last"] = time.monotonic()
                        record["first"] = record["first"] or record["last"]
                        size += len(data)
            break
    except Exception as e:  # counted as failed; the benchmark goes on
        record["error"] = f"{type(e).__name__}: {e}"
    record["audio_s"] = size / 2 / 24_000
    return record


def _http_clients(url: str, delays: list[float], requests: list[dict]) -> tuple[float, list[dict]]:
    """Run in a separate process (so that the clients' Python work does not take the server's
    GIL, as with real clients elsewhere): all streams from one asyncio loop sharing one
    connection pool, made and used once before the clock starts. Returns the start time and
    the records."""
    import asyncio

    import httpx

    async def run():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            # One short request first: this process's first request pays for httpx's lazy imports
            # and set-up (~0.1 s), which no warm client sees.
            warm = dict(model="csm-1b", input="Warm up.", voice="alloy", response_format="pcm", max_audio_ms=160)
            (await client.post(url, json=warm)).raise_for_status()
            start = time.monotonic()
            records = await asyncio.gather(
                *(_http_stream(client, url, d, start, r) for d, r in zip(delays, requests, strict=True))
            )
            return start, records

    return asyncio.run(run())


def run_clients(
    engine, n: int, *, audio_s: float, ramp_s: float, seed: int, text: str = TEXT, url: str | None = None
) -> dict:
    """One run of n clients (through the HTTP server at `url` if given); returns its row of the table."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(ramp_s / n, n)
    delays = np.cumsum(gaps) - gaps[0]
    requests = [dict(text=text, seed=seed * 100_003 + i, max_audio_ms=audio_s * 1000) for i in range(n)]
    before, stats_before = engine.compilations, engine.stats()
    if url is None:
        records = [{} for _ in range(n)]
        start = time.monotonic()
        threads = [
            threading.Thread(target=_client, args=(engine, float(d), start, requests[i], records[i]))
            for i, d in enumerate(delays)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(1) as pool:
            start, records = pool.apply(_http_clients, (url, [float(d) for d in delays], requests))
    stats = {k: v - stats_before.get(k, 0) for k, v in engine.stats().items() if k in _ENGINE_TIMINGS}
    ok = [r for r in records if "error" not in r and r["first"] is not None]
    ttfa = np.array([r["first"] - r["submitted"] for r in ok]) if ok else np.array([np.nan])
    total_audio = sum(r["audio_s"] for r in ok)
    end = max((r["last"] for r in ok), default=start)
    return {
        "clients": n,
        "via": "engine" if url is None else "HTTP",
        "completed": len(ok),
        "failed": n - len(ok),
        "ttfa_p50_s": float(np.percentile(ttfa, 50)),
        "ttfa_p95_s": float(np.percentile(ttfa, 95)),
        "slowest_rtf": max(
            ((r["last"] - r["submitted"]) / r["audio_s"] for r in ok if r["audio_s"]), default=float("nan")
        ),
        "aggregate_x_realtime": total_audio / max(end - start, 1e-9),
        "audio_s_total": total_audio,
        "wall_s": end - start,
        "compilations": engine.compilations - before,
        **{k: stats.get(k, 0) for k in ("admit_s", "wait_s", "deliver_s", "prefills")},
        "frames_per_chunk": stats.get("chunk_frames", 0) / max(stats.get("chunks", 0), 1),
        "errors": sorted({r["error"] for r in records if "error" in r})[:3],
    }


def measure(
    engine, clients, *, audio_s: float, ramp_s: float = 1.0, seed: int = 0, text: str = TEXT, url: str | None = None
) -> list[dict]:
    """A row per client count (runs one after another on the same warm engine); with `url`, each
    count a second time through the HTTP server there."""
    rows = []
    for k, n in enumerate(clients):
        for via in [None] if url is None else [None, url]:
            rows.append(run_clients(engine, n, audio_s=audio_s, ramp_s=ramp_s, seed=seed + k, text=text, url=via))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # as it comes, should a later run die
    return rows


class HttpServer:
    """`jaxtts serve`'s app over `engine` (already warm), served by uvicorn in a thread on
    127.0.0.1 at an ephemeral port; `url` is its speech endpoint."""

    def __init__(self, engine):
        import socket

        import uvicorn

        from jaxtts.server import create_app

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        app = create_app(engine, warmup=False)
        config = uvicorn.Config(app, host="127.0.0.1", log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[sock]), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start within 30 s")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1/audio/speech"
        # One request through the whole path first: the handler's first call pays for lazy imports
        # and set-up that no later request sees.
        import httpx

        body = dict(model="csm-1b", input="Warm up.", voice="alloy", response_format="pcm", max_audio_ms=160)
        httpx.post(self.url, json=body, timeout=120).raise_for_status()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def format_table(rows: list[dict]) -> str:
    cells = [[name for name, _, _ in COLUMNS]]
    cells += [[fmt.format(r[key]) if key in r else "-" for _, key, fmt in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=_positive_ints, default=[1, 64, 256], help="comma list of client counts")
    p.add_argument("--audio-s", type=float, default=10.0, help="seconds of audio per request (max_audio_ms)")
    p.add_argument("--ramp-s", type=float, default=1.0, help="mean span of the Poisson arrivals (default 1 s)")
    p.add_argument(
        "--preset",
        default="csm-1b",
        choices=["csm-1b", "tiny"],
        help="model size; tiny implies random weights (a CPU smoke run)",
    )
    p.add_argument("--random-weights", action="store_true", help="CSM-1B with random weights (no download)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    p.add_argument("--max-batch", type=int, default=None, help="engine slots (default: the largest client count)")
    p.add_argument("--chunk-frames", type=int, default=8, help="frames per decode call once audio flows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", default=None, help="'all' or N: one engine over this host's devices (Engine(devices=))")
    p.add_argument("--http", action="store_true", help="also run each client count through the HTTP server")
    p.add_argument(
        "--run-ahead",
        type=_on_off_list,
        default=[False],
        help="off, on or off,on (an A/B in one process: an engine per value over the same model): "
        "Engine(run_ahead=...), the next chunk decodes while one is handed out",
    )
    p.add_argument(
        "--codec-precision",
        default=None,
        help="comma list of Mimi matmul precisions to compare (highest, tensorfloat32, bfloat16, default): "
        "an engine per value over the same weights (default: the codec's own, highest)",
    )
    p.add_argument("--out", default="serving.json", help="JSON results (default serving.json)")
    return p


def _on_off_list(text: str) -> list[bool]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or any(w not in ("on", "off") for w in words):
        raise argparse.ArgumentTypeError(f"expected on, off or a comma list of them, got {text!r}")
    return [w == "on" for w in words]


def build_tts(args):
    if args.preset == "tiny":
        from jaxtts.config import CSM_TINY
        from jaxtts.csm import CSM
        from jaxtts.mimi import Mimi
        from jaxtts.tts import TTS

        return TTS(
            CSM.random(CSM_TINY, dtype=args.dtype or "float32", seed=1), Mimi.random(seed=0), max_silence_ms=None
        )
    import jaxtts

    # No silence guard: every request runs its full length (random weights never end on their own).
    return jaxtts.load(dtype=args.dtype, random_weights=args.random_weights, progress=False, max_silence_ms=None)


def with_codec_precision(tts, precision: str | None):
    """`tts` with its Mimi weights under another matmul precision (None: `tts` itself)."""
    if precision is None or precision == tts.codec.matmul_precision:
        return tts
    from jaxtts.mimi import Mimi
    from jaxtts.tts import TTS

    codec = Mimi(tts.codec.params, tts.codec.config, matmul_precision=None if precision == "default" else precision)
    return TTS(tts.model, codec, tokenizer=tts.tokenizer, options=tts.options, max_silence_ms=tts.max_silence_ms)


def build_engine(args, tts, run_ahead: bool):
    from jaxtts.engine import Engine

    max_batch = args.max_batch or max(args.clients)
    return Engine(
        tts,
        max_batch=max_batch,
        queue_limit=4 * max(args.clients),
        chunk_frames=args.chunk_frames,
        run_ahead=run_ahead,
        devices=args.devices,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    base = build_tts(args)
    rows, warmups = [], []
    precisions = args.codec_precision.split(",") if args.codec_precision else [base.codec.matmul_precision]
    # An engine per variant; later ones find most programs compiled (same process).
    for precision, run_ahead in itertools.product(precisions, args.run_ahead):
        engine = build_engine(args, with_codec_precision(base, precision), run_ahead)
        variant = dict(run_ahead="on" if run_ahead else "off", codec_precision=precision)
        try:
            text_tokens = len(engine.tts.tokenizer.encode_segment(TEXT, 0))
            print(f"warming up (pool sizes {engine.pool_sizes}, {variant})...", file=sys.stderr, flush=True)
            warm = engine.warmup(text_tokens=text_tokens, context_rows=1, encode=False)
            warmups.append(dict(warm, **variant))
            print(f"warmup: {warm['compilations']} programs in {warm['seconds']:.1f} s", file=sys.stderr, flush=True)
            server = HttpServer(engine) if args.http else None
            try:
                url = server.url if server else None
                measured = measure(
                    engine, args.clients, audio_s=args.audio_s, ramp_s=args.ramp_s, seed=args.seed, url=url
                )
            finally:
                if server:
                    server.close()
        finally:
            engine.close()
        rows += [dict(r, **variant) for r in measured]
        print(format_table(rows), file=sys.stderr, flush=True)  # so far, in case a later variant dies
    print(format_table(rows))
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(pool_sizes=list(engine.pool_sizes), device=_device())
    with open(args.out, "w") as f:
        json.dump({"config": config, "warmup": warmups, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind}"


if __name__ == "__main__":
    sys.exit(main())
