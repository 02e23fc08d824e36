"""`jaxtts serve`: an OpenAI-compatible speech server over the batching engine.

    app = create_app(Engine(jaxtts.load()), api_key="secret")     # a FastAPI app
    uvicorn.run(app, host="127.0.0.1", port=8000)                  # or: jaxtts serve

Endpoints (docs/SERVING_HTTP.md): POST /v1/audio/speech (OpenAI's request; audio streamed as it
is generated in every format, or as server-sent events), GET /v1/models, GET/POST
/v1/audio/voices, DELETE /v1/audio/voices/{id}, GET /health, GET /metrics (Prometheus) and a web
page at /. Errors are OpenAI's JSON body {"error": {"message", "type", "param", "code"}}.

FastAPI, uvicorn, prometheus-client, python-multipart and PyAV (the `serve` extra) are imported
inside the functions that need them: `import jaxtts.server` works without them, so the CLI can
always offer `jaxtts serve` and explain what to install.

Everything this module knows about the engine's interface (jaxtts.engine.Engine and
jaxtts.voices.VoiceStore) is in `EngineAdapter`.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which name
# classes local to create_app.
import asyncio
import base64
import hmac
import io
import json
import logging
import math
import re
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxtts import defaults, validation
from jaxtts.audio import SAMPLE_RATE, _samples, to_mono_24k
from jaxtts.errors import JaxttsError
from jaxtts.quantize import add_quantize_argument

log = logging.getLogger("jaxtts.server")

STATIC_DIR = Path(__file__).parent / "static"
FRAME_SAMPLES = 1920  # one 80 ms Mimi frame at 24 kHz

# OpenAI's standard voices, each a CSM speaker id, so that unmodified clients work. Without a voice
# prompt a speaker id is only a label (the voice follows the seed); stored voices carry a prompt.
BUILTIN_VOICES = {
    name: speaker
    for speaker, name in enumerate("alloy ash ballad coral echo fable onyx nova sage shimmer verse marin cedar".split())
}
# Model names accepted besides the served one: OpenAI's, so that unmodified clients work.
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# response_format → (container, encoder, bit rate) for PyAV's incremental encoders
AV_FORMATS = {
    "mp3": ("mp3", "libmp3lame", 64_000),
    "opus": ("ogg", "libopus", 32_000),
    "aac": ("adts", "aac", 64_000),
    "flac": ("flac", "flac", None),
}
VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # jaxtts.voices' names
MAX_VOICE_SECONDS = 60.0
LONG_FORM_AUTO_CHARS = 300  # longer inputs are spoken sentence by sentence unless long_form is given
MAX_JSON_BYTES = 1 << 20
DEFAULT_MAX_UPLOAD_BYTES = 20 << 20
DRAIN_BYTES = 64 << 20  # a refused body up to this size is read to its end before the 413 is sent


# --------------------------------------------------------------------------- the engine adapter


class ServerBusy(Exception):
    """The engine's queue is full (→ 429 with Retry-After)."""

    def __init__(self, retry_after_s: float, message: str):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineAdapter:
    """The one place that knows the serving engine's names: `jaxtts.engine.Engine` (submit,
    Handle, Busy, warmup, stats, voices) and `jaxtts.voices.VoiceStore` (add, list, remove).
    Adapting the server to a change of the engine's interface is a change here alone."""

    def __init__(self, engine):
        self.engine = engine
        self._voice_lock = threading.Lock()

    # --- requests ----------------------------------------------------------------------------
    def submit(self, text: str, **kwargs):
        """Queue a request: `Engine.submit(text, voice=, speaker=, seed=, temperature=, top_k=,
        top_p=, min_p=, max_audio_ms=, long_form=)` (blocking: call it from a worker thread).
        Returns the engine's Handle; a full queue raises ServerBusy, a request the engine
        refuses JaxttsError."""
        from jaxtts.engine import Busy

        try:
            return self.engine.submit(text, **kwargs)
        except Busy as e:
            raise ServerBusy(e.retry_after_s, str(e)) from None

    @staticmethod
    async def chunks(handle):
        """The handle's float32 PCM chunks as they are decoded (`async for`); a failed request
        raises its error, a cancelled one just ends."""
        async for chunk in handle:
            yield chunk

    @staticmethod
    def is_internal(error: JaxttsError) -> bool:
        """Whether a request's error is the engine's own failure (it wraps unexpected exceptions
        as JaxttsError("internal error: ...")) rather than something the request asked for."""
        return str(error).startswith("internal error")

    @staticmethod
    def cancel(handle) -> None:
        handle.cancel()

    @staticmethod
    def seed(handle) -> int | None:
        return getattr(handle, "seed", None)

    def warmup(self, **kwargs) -> None:
        fn = getattr(self.engine, "warmup", None)
        if fn is not None:
            fn(**kwargs)

    def stats(self) -> dict:
        """{"queued", "active", "slots"}: requests waiting, rows decoding, rows in the pool."""
        try:
            s = self.engine.stats()
        except Exception:
            return {"queued": 0, "active": 0, "slots": 0}
        return {"queued": s.get("queued", 0), "active": s.get("live", 0), "slots": s.get("pool_size", 0)}

    def position_limit(self) -> int:
        limit = getattr(self.engine, "limit", None)
        return int(limit) if limit else int(self.engine.tts.model.cfg.backbone.max_seq_len)

    def count_tokens(self, text: str) -> int:
        try:
            return len(self.engine.tts.tokenizer.encode_segment(text, 0))
        except Exception:
            return len(text.split())

    def close(self) -> None:
        fn = getattr(self.engine, "close", None)
        if fn is not None:
            fn()

    # --- stored voices -----------------------------------------------------------------------
    @property
    def store(self):
        return getattr(self.engine, "voices", None)

    def voice_names(self) -> list[str]:
        return [] if self.store is None else list(self.store.list())

    def voices(self) -> list[dict]:
        """Stored voices: [{"id", "name", "speaker"}] (speaker None: unreadable, listed so that
        it can be deleted)."""
        out = []
        for name in self.voice_names():
            try:
                speaker = self.store.load(name).speaker
            except JaxttsError:
                speaker = None
            out.append({"id": name, "name": name, "speaker": speaker})
        return out

    def has_voice(self, name: str) -> bool:
        return name in self.voice_names()

    def add_voice(self, name: str, audio: np.ndarray, transcript: str, speaker: int) -> None:
        """Store a voice: one context segment (24 kHz float32 audio and its transcript), encoded
        to Mimi codes once, by the engine's codec."""
        from jaxtts.prompt import Segment

        if self.store is None:
            raise JaxttsError("this server has no voice store (start it with --voices DIR)")
        with self._voice_lock:
            self.store.add(name, [Segment(speaker, transcript, audio=audio)], speaker, codec=self.engine.tts.codec)

    def remove_voice(self, name: str) -> None:
        with self._voice_lock:
            self.store.remove(name)


def make_engine(tts, *, max_batch: int, voices_dir: str | None, devices=None, **options):
    """The engine `jaxtts serve` runs (the engine's constructor, known here only). devices: the
    engine's `devices` (None: the default device; "all" / N / a list: the pool split over them);
    options: more of `Engine`'s arguments (pool_sizes, chunk_frames, ...)."""
    from jaxtts.engine import Engine
    from jaxtts.voices import VoiceStore

    store = VoiceStore(voices_dir) if voices_dir else VoiceStore()
    options = {"queue_limit": max(256, 4 * max_batch), **options}
    return Engine(tts, max_batch=max_batch, voices=store, devices=devices, **options)


# --------------------------------------------------------------------------- streaming encoders


class _Sink:
    """A write-only, non-seekable file for PyAV: the muxer writes headers once and never seeks back."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


class Encoder:
    """16-bit mono 24 kHz samples in, bytes of a `response_format` stream out, chunk by chunk:
    `encode(int16 samples)` then `finish()`. Deterministic: the same samples give the same bytes
    however they are chunked."""

    def encode(self, samples: np.ndarray) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""


class PcmEncoder(Encoder):
    def encode(self, samples):
        return samples.astype("<i2").tobytes()


class WavEncoder(PcmEncoder):
    """A 16-bit WAV whose RIFF and data sizes are 0xFFFFFFFF (unknown: the stream's length),
    which readers take as "until the end of the file"."""

    def __init__(self):
        self.header = (
            b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, 2 * SAMPLE_RATE, 2, 16)
            + b"data" + struct.pack("<I", 0xFFFFFFFF)
        )  # fmt: skip

    def encode(self, samples):
        out, self.header = self.header + super().encode(samples), b""
        return out

    def finish(self):
        out, self.header = self.header, b""
        return out


class AvEncoder(Encoder):
    """mp3 / opus (Ogg) / aac (ADTS) / flac through PyAV's encoders, muxed into a non-seekable
    stream (bit-exact flags: no random Ogg serial numbers, no version strings)."""

    def __init__(self, fmt: str):
        import av

        container, codec, bit_rate = AV_FORMATS[fmt]
        self.sink = _Sink()
        options = {"fflags": "+bitexact"}
        if fmt == "mp3":
            options["write_xing"] = "0"  # a Xing header could not be completed without seeking back
        self.container = av.open(self.sink, mode="w", format=container, options=options)
        self.stream = self.container.add_stream(codec, rate=SAMPLE_RATE, layout="mono")
        if bit_rate:
            self.stream.bit_rate = bit_rate
        self.stream.codec_context.options = {"flags": "+bitexact"}
        self.pts = 0

    def _mux(self, frame) -> bytes:
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        return self.sink.take()

    def encode(self, samples):
        import av

        if len(samples) == 0:
            return b""
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.int16)[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, self.pts
        self.pts += len(samples)
        return self._mux(frame)

    def finish(self):
        out = self._mux(None)
        self.container.close()
        return out + self.sink.take()


def available_formats() -> tuple[str, ...]:
    """The response formats this installation can stream (mp3/opus/aac/flac need PyAV's encoders)."""
    out = ["wav", "pcm"]
    try:
        import av
    except ImportError:
        return tuple(out)
    for fmt, (container, codec, _) in AV_FORMATS.items():
        try:
            av.codec.Codec(codec, "w")
            av.format.ContainerFormat(container, "w")
            out.append(fmt)
        except Exception:
            pass
    return tuple(f for f in FORMATS if f in out)


def make_encoder(fmt: str) -> Encoder:
    if fmt == "pcm":
        return PcmEncoder()
    if fmt == "wav":
        return WavEncoder()
    return AvEncoder(fmt)


def pcm16(chunk: np.ndarray) -> np.ndarray:
    """float PCM → int16, quantized as jaxtts writes 16-bit files (so every format agrees)."""
    return _samples(chunk, "PCM_16")


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answer in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _one_line(e: BaseException | str, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validation_error(errors: list) -> ApiError:
    """FastAPI's request-validation errors as OpenAI words them (400), naming the top-level field."""
    if not errors:
        return ApiError(400, "Invalid request.")
    e = errors[0]
    kind = e.get("type", "")
    if kind == "json_invalid":
        return ApiError(
            400,
            "We could not parse the JSON body of your request. The request body must be a JSON "
            "object (Content-Type: application/json).",
            code="invalid_json",
        )
    loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path")]
    if not loc:
        return ApiError(
            400,
            f"The request body must be a JSON object (Content-Type: application/json): {_one_line(e.get('msg', ''))}.",
            code="invalid_json",
        )
    param, nested = loc[0], len(loc) > 1
    if param == "voice" and kind != "missing":
        return ApiError(
            400,
            "Invalid value for 'voice': give a voice id (a string, see GET /v1/audio/voices) or "
            'an object {"id": "..."}.',
            param=param,
            code="invalid_value",
        )
    if kind == "missing" and not nested:
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden" and not nested:
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    msg = _one_line(e.get("msg", ""), 200)
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return ApiError(400, f"Invalid type for '{param}': {msg}.", param=param, code="invalid_type")
    return ApiError(400, f"Invalid value for '{param}': {msg}.", param=param, code="invalid_value")


# --------------------------------------------------------------------------- the app


@dataclass
class _Metrics:
    registry: object
    requests: object
    errors: object
    cancelled: object
    audio_seconds: object
    ttfa: object
    rtf: object
    streams: object
    ready: object


def _make_metrics(adapter: EngineAdapter) -> _Metrics:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    queue = Gauge("jaxtts_queue_depth", "Requests waiting for a decode slot", registry=reg)
    queue.set_function(lambda: adapter.stats()["queued"])
    active = Gauge("jaxtts_active_slots", "Requests decoding now (occupied slots)", registry=reg)
    active.set_function(lambda: adapter.stats()["active"])
    slots = Gauge("jaxtts_slots", "Rows of the engine's current decode pool", registry=reg)
    slots.set_function(lambda: adapter.stats()["slots"])
    return _Metrics(
        registry=reg,
        requests=Counter(
            "jaxtts_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=reg
        ),
        errors=Counter(
            "jaxtts_http_errors",
            "Error answers (status ≥ 400) and speech streams that failed after they began (status 'stream')",
            ["endpoint", "status"],
            registry=reg,
        ),
        cancelled=Counter(
            "jaxtts_speech_cancelled", "Speech requests cancelled because the client went away", registry=reg
        ),
        audio_seconds=Counter("jaxtts_audio_seconds", "Seconds of audio sent", registry=reg),
        ttfa=Histogram(
            "jaxtts_time_to_first_audio_seconds",
            "From the request's arrival to its first audio",
            buckets=(0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
            registry=reg,
        ),
        rtf=Histogram(
            "jaxtts_real_time_factor",
            "Generation time / audio duration of each completed request (below 1: faster than real time)",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
            registry=reg,
        ),
        streams=Gauge("jaxtts_open_streams", "Speech responses being sent now", registry=reg),
        ready=Gauge("jaxtts_ready", "1 once the engine is warm", registry=reg),
    )


def _endpoint(path: str) -> str:
    """A bounded label for a request path."""
    if path in ("/", "/health", "/metrics", "/v1/models", "/v1/audio/speech", "/v1/audio/voices"):
        return path
    if path.startswith("/v1/audio/voices/"):
        return "/v1/audio/voices/{id}"
    if path.startswith("/static/"):
        return "/static"
    return "other"


OPEN_PATHS = ("/", "/health", "/metrics", "/favicon.ico")


def create_app(
    engine,
    *,
    api_key: str | None = None,
    model_name: str = "csm-1b",
    max_input_chars: int = 4096,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    default_max_audio_ms: float | None = None,
    warmup: bool | dict = True,
    on_ready=None,
):
    """The FastAPI app serving `engine` (a jaxtts.engine.Engine).

    api_key: when set, /v1/* needs `Authorization: Bearer <api_key>` (the page, /health and
    /metrics stay open). max_input_chars: longest `input`. max_upload_bytes: largest voice upload.
    default_max_audio_ms: a request's audio limit when it gives none (default: half the model's
    positions, at most jaxtts's 90 s). warmup: warm the engine up in a background thread at
    startup (a dict: keyword arguments for Engine.warmup; False: the engine is taken as warm);
    /health answers 503 and speech requests 503 until it is done; on_ready() is called then.
    """
    try:
        from fastapi import FastAPI, HTTPException, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
        from pydantic import BaseModel, ConfigDict, Field
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as e:
        raise JaxttsError(
            f"the server needs the serve extra ({e.name} is missing): pip install 'jaxtts[serve]'"
        ) from None

    adapter = engine if isinstance(engine, EngineAdapter) else EngineAdapter(engine)
    max_input_chars = validation.integer("max_input_chars", max_input_chars, low=1)
    max_upload_bytes = validation.integer("max_upload_bytes", max_upload_bytes, low=1024)
    if default_max_audio_ms is None:
        default_max_audio_ms = min(defaults.MAX_AUDIO_MS, adapter.position_limit() // 2 * 80)
    default_max_audio_ms = validation.number("default_max_audio_ms", default_max_audio_ms, low=80)
    formats = available_formats()
    metrics = _make_metrics(adapter)
    state = {"ready": warmup is False, "warmup_error": None}
    metrics.ready.set(1 if state["ready"] else 0)

    class VoiceRef(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: str = Field(strict=True)

    class SpeechRequest(BaseModel):
        # strict: a string, a boolean or 5.0 where a number, an integer or a boolean goes is a 400, as OpenAI's
        model_config = ConfigDict(extra="forbid", strict=True)
        model: str = Field(strict=True)
        input: str = Field(strict=True)
        voice: str | VoiceRef
        instructions: str | None = None  # accepted and ignored: CSM takes no style instructions
        response_format: str = "mp3"
        speed: float = 1.0
        stream_format: str = "audio"
        # jaxtts fields
        seed: int | None = None
        temperature: float = defaults.TEMPERATURE
        top_k: int | None = defaults.TOP_K
        top_p: float | None = None
        min_p: float | None = None
        max_audio_ms: float | None = None
        speaker: int | None = None
        long_form: bool | None = None

    def warm():
        try:
            adapter.warmup(**(warmup if isinstance(warmup, dict) else {}))
        except Exception as e:
            state["warmup_error"] = _one_line(e)
            log.error("warmup failed: %s", state["warmup_error"])
            return
        state["ready"] = True
        metrics.ready.set(1)
        if on_ready is not None:
            on_ready()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if not state["ready"]:
            threading.Thread(target=warm, name="jaxtts-warmup", daemon=True).start()
        elif on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="jaxtts", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.adapter = adapter

    def error_json(e: ApiError):
        # json.dumps's \u escapes: a message may echo a lone surrogate a client sent, which UTF-8 cannot encode
        return Response(json.dumps(e.body()), status_code=e.status, headers=e.headers, media_type="application/json")

    # --- error handlers: every error is OpenAI's JSON body ---------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_json(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return error_json(_validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        if e.status_code == 413:
            err = ApiError(413, _one_line(e.detail), code="request_too_large")
        elif e.status_code == 404:
            err = ApiError(404, f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
        elif e.status_code == 400 and e.detail == "There was an error parsing the body":
            err = _validation_error([{"type": "json_invalid"}])  # FastAPI's: not UTF-8, nested too deep, ...
        elif e.status_code == 405:
            err = ApiError(
                405, f"Method {request.method} is not allowed for {request.url.path}.", code="method_not_allowed"
            )
        else:
            err = ApiError(
                e.status_code,
                _one_line(e.detail),
                type="server_error" if e.status_code >= 500 else "invalid_request_error",
            )
        return error_json(err)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        metrics.requests.labels(_endpoint(request.url.path), "500").inc()  # sent outside the Guard middleware
        metrics.errors.labels(_endpoint(request.url.path), "500").inc()
        return error_json(
            ApiError(500, f"internal error: {type(e).__name__}: {_one_line(e, 200)}", type="server_error")
        )

    # --- middleware: body size, auth, request metrics (plain ASGI: streaming passes through) --
    class Guard:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            path = scope["path"]
            endpoint = _endpoint(path)
            status = {"code": 0}

            async def send_counted(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                    metrics.requests.labels(endpoint, str(message["status"])).inc()
                    if message["status"] >= 400:
                        metrics.errors.labels(endpoint, str(message["status"])).inc()
                await send(message)

            async def refuse(err: ApiError):
                await error_json(err)(scope, receive, send_counted)

            if api_key is not None and path.startswith("/v1/"):
                headers = dict(scope["headers"])
                auth = headers.get(b"authorization", b"").decode("latin-1")
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else None
                if given is None:
                    return await refuse(
                        ApiError(
                            401,
                            "You didn't provide an API key. Send it in the Authorization "
                            "header: 'Authorization: Bearer YOUR_KEY'.",
                            code="invalid_api_key",
                        )
                    )
                if not hmac.compare_digest(given.encode(), api_key.encode()):
                    return await refuse(ApiError(401, "Incorrect API key provided.", code="invalid_api_key"))

            limit = max_upload_bytes + 65536 if endpoint == "/v1/audio/voices" else MAX_JSON_BYTES
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                if length.isdigit() and int(length) <= DRAIN_BYTES:
                    await _drain(receive, 0)
                return await refuse(_too_large(limit))
            received = {"n": 0}

            async def receive_limited():
                message = await receive()
                if message["type"] == "http.request":
                    received["n"] += len(message.get("body", b""))
                    if received["n"] > limit:  # FastAPI re-raises an HTTPException from reading the body
                        if message.get("more_body"):
                            await _drain(receive, received["n"])
                        raise HTTPException(413, _too_large(limit).message)
                return message

            await self.app(scope, receive_limited, send_counted)

    def _too_large(limit: int) -> ApiError:
        return ApiError(
            413, f"The request body is larger than this server accepts ({limit} bytes).", code="request_too_large"
        )

    app.add_middleware(Guard)

    # --- pages and service endpoints ---------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = STATIC_DIR / name
        if name not in {p.name for p in STATIC_DIR.iterdir()} or not path.is_file():
            raise ApiError(404, f"Unknown static file {name!r}.", code="unknown_url")
        media = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}.get(path.suffix)
        return FileResponse(path, media_type=media)

    @app.get("/health")
    async def health():
        if state["ready"]:
            return {"status": "ok", "model": model_name}
        if state["warmup_error"]:
            return JSONResponse({"status": "error", "error": state["warmup_error"]}, status_code=503)
        return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    started = int(time.time())

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "jaxtts"}],
        }

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
        return {"id": model_name, "object": "model", "created": started, "owned_by": "jaxtts"}

    # --- voices ------------------------------------------------------------------------------
    def all_voices() -> list[dict]:
        builtin = [{"id": n, "name": n, "type": "builtin", "speaker": s} for n, s in BUILTIN_VOICES.items()]
        stored = [{**v, "type": "audio_sample"} for v in adapter.voices()]
        return builtin + stored

    @app.get("/v1/audio/voices")
    async def list_voices():
        import anyio

        return {"voices": await anyio.to_thread.run_sync(all_voices)}

    @app.post("/v1/audio/voices")
    async def create_voice(request: Request):
        import anyio

        ctype = request.headers.get("content-type", "")
        if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise ApiError(
                400,
                "Send the voice as multipart/form-data: name, audio_sample (or audio) file, transcript[, speaker].",
                code="invalid_content_type",
            )
        try:
            form = await request.form(max_files=2, max_fields=20, max_part_size=1 << 20)
        except StarletteHTTPException as e:
            if e.status_code != 400:  # 413: the body is too large
                raise
            raise ApiError(
                400, f"Could not parse the form body: {_one_line(e.detail, 200)}", code="invalid_multipart"
            ) from None
        except Exception as e:
            raise ApiError(
                400, f"Could not parse the form body: {_one_line(e, 200)}", code="invalid_multipart"
            ) from None
        try:
            name = _form_text(form, "name", required=True)
            transcript = _form_text(form, "transcript", required=True)
            speaker_text = _form_text(form, "speaker", required=False)
            upload = form.get("audio_sample") or form.get("audio")
            if upload is None or isinstance(upload, str):
                raise ApiError(
                    400,
                    "Missing required parameter: 'audio_sample' (an audio file; 'audio' also works).",
                    param="audio_sample",
                    code="missing_required_parameter",
                )
            if not VOICE_NAME.fullmatch(name):  # match's $ also matches before a final newline
                raise ApiError(
                    400,
                    f"Invalid value for 'name': {name[:80]!r}; use 1-64 letters, digits, '.', '-' or "
                    "'_', starting with a letter or digit.",
                    param="name",
                    code="invalid_value",
                )
            if name in BUILTIN_VOICES:
                raise ApiError(
                    400, f"'{name}' is a built-in voice; choose another name.", param="name", code="voice_exists"
                )
            if not transcript.strip():
                raise ApiError(
                    400,
                    "'transcript' is empty: give the words spoken in the audio sample.",
                    param="transcript",
                    code="invalid_value",
                )
            speaker = 0
            if speaker_text not in (None, ""):
                try:
                    speaker = int(speaker_text)
                except ValueError:
                    speaker = -1
                if not 0 <= speaker <= 2**31 - 1:
                    raise ApiError(
                        400,
                        f"Invalid value for 'speaker': {speaker_text[:40]!r}; an integer in [0, {2**31 - 1}].",
                        param="speaker",
                        code="invalid_value",
                    )
            data = await upload.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise _too_large(max_upload_bytes)
            audio = await anyio.to_thread.run_sync(_decode_upload, data, upload.filename or "audio_sample")
            if await anyio.to_thread.run_sync(adapter.has_voice, name):
                raise ApiError(
                    400, f"A voice named '{name}' exists; delete it first.", param="name", code="voice_exists"
                )
            try:
                await anyio.to_thread.run_sync(adapter.add_voice, name, audio, transcript.strip(), speaker)
            except JaxttsError as e:
                raise ApiError(422, _one_line(e), param="audio_sample", code="voice_rejected") from None
        finally:
            await form.close()
        return {
            "id": name,
            "name": name,
            "object": "audio.voice",
            "type": "audio_sample",
            "created_at": int(time.time()),
            "speaker": speaker,
        }

    @app.delete("/v1/audio/voices/{voice_id}")
    async def delete_voice(voice_id: str):
        import anyio

        if voice_id in BUILTIN_VOICES:
            raise ApiError(
                400, f"'{voice_id}' is a built-in voice and cannot be deleted.", param="voice_id", code="voice_builtin"
            )
        if not await anyio.to_thread.run_sync(adapter.has_voice, voice_id):
            raise ApiError(404, f"No voice named '{voice_id[:80]}'.", param="voice_id", code="voice_not_found")
        try:
            await anyio.to_thread.run_sync(adapter.remove_voice, voice_id)
        except (JaxttsError, KeyError, FileNotFoundError) as e:
            raise ApiError(
                404,
                f"No voice named '{voice_id[:80]}' ({_one_line(e, 200)}).",
                param="voice_id",
                code="voice_not_found",
            ) from None
        return {"id": voice_id, "deleted": True, "object": "audio.voice.deleted"}

    # --- speech ------------------------------------------------------------------------------
    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest, request: Request):
        import anyio

        arrived = time.monotonic()
        if not state["ready"]:
            raise ApiError(
                503,
                "The model is still warming up; retry shortly.",
                type="server_error",
                code="warming_up",
                headers={"Retry-After": "5"},
            )
        args = await anyio.to_thread.run_sync(_check_speech, body)
        try:
            handle = await anyio.to_thread.run_sync(lambda: adapter.submit(body.input, **args))
        except ServerBusy as e:
            retry = max(1, math.ceil(e.retry_after_s))
            raise ApiError(
                429,
                f"The server is busy: {_one_line(e)}",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            ) from None
        except JaxttsError as e:
            raise _refused(e) from None
        return await _respond(request, handle, body, arrived)

    def _refused(e: JaxttsError) -> ApiError:
        """The engine's error for a request: 422 (it cannot be done), or 500 for its internal errors."""
        if adapter.is_internal(e):
            log.error("engine error: %s", _one_line(e))
            return ApiError(500, _one_line(e), type="server_error", code="engine_error")
        return ApiError(422, _one_line(e), code="unprocessable_request")

    def _check_speech(body) -> dict:
        """The request's checks (400s), and the engine's arguments."""
        if (
            body.model != model_name
            and body.model not in OPENAI_MODELS
            and not body.model.startswith(OPENAI_MODELS[-1])
        ):
            raise ApiError(
                404,
                f"The model '{body.model[:80]}' does not exist; this server speaks with "
                f"'{model_name}' (OpenAI's {', '.join(OPENAI_MODELS)} are accepted as aliases).",
                param="model",
                code="model_not_found",
            )
        if not body.input.strip():
            raise ApiError(400, "'input' is empty: give some words to speak.", param="input", code="invalid_value")
        if len(body.input) > max_input_chars:
            raise ApiError(
                400,
                f"'input' is {len(body.input)} characters, more than the maximum of {max_input_chars}.",
                param="input",
                code="string_above_max_length",
            )
        if body.response_format not in FORMATS:
            raise ApiError(
                400,
                f"Invalid value for 'response_format': {body.response_format[:40]!r}; supported: {', '.join(formats)}.",
                param="response_format",
                code="invalid_value",
            )
        if body.response_format not in formats:
            raise ApiError(
                400,
                f"response_format '{body.response_format}' is not available on this server (its "
                f"encoder is missing from PyAV's build); available: {', '.join(formats)}.",
                param="response_format",
                code="unsupported_value",
            )
        if body.stream_format not in ("audio", "sse"):
            raise ApiError(
                400,
                f"Invalid value for 'stream_format': {body.stream_format[:40]!r}; 'audio' or 'sse'.",
                param="stream_format",
                code="invalid_value",
            )
        if not (math.isfinite(body.speed) and 0.25 <= body.speed <= 4.0):
            raise ApiError(
                400,
                f"Invalid value for 'speed': {body.speed:g}; it must be in [0.25, 4.0].",
                param="speed",
                code="invalid_value",
            )
        if body.speed != 1.0:
            raise ApiError(
                400,
                f"speed {body.speed:g} is not supported: CSM has no speed control; send 1.0 or leave it out.",
                param="speed",
                code="unsupported_value",
            )
        voice_id = body.voice if isinstance(body.voice, str) else body.voice.id
        voice, speaker = None, None
        if voice_id in BUILTIN_VOICES:
            speaker = BUILTIN_VOICES[voice_id]
        elif adapter.has_voice(voice_id):
            voice = voice_id
        else:
            names = ", ".join(list(BUILTIN_VOICES)[:4] + [v["id"] for v in adapter.voices()][:4])
            raise ApiError(
                400,
                f"Invalid value for 'voice': {voice_id[:80]!r} is not a voice of this server "
                f"(GET /v1/audio/voices lists them: {names}, ...).",
                param="voice",
                code="voice_not_found",
            )
        if body.speaker is not None:
            speaker = body.speaker
        from jaxtts.prompt import validate_speaker
        from jaxtts.sampling import Sampler

        checks = [
            ("speaker", lambda: speaker is None or validate_speaker(speaker)),
            ("seed", lambda: validation.seed(body.seed)),
            ("temperature", lambda: Sampler.create(temperature=body.temperature)),
            # the engine holds top_k as int32: a larger one failed every request of its decode batch
            ("top_k", lambda: body.top_k is None or validation.integer("top_k", body.top_k, low=1, high=2**31 - 1)),
            ("top_p", lambda: Sampler.create(top_p=body.top_p)),
            ("min_p", lambda: Sampler.create(min_p=body.min_p)),
            (
                "max_audio_ms",
                lambda: (
                    body.max_audio_ms is None
                    or validation.number("max_audio_ms", body.max_audio_ms, low=80, high=3_600_000)
                ),
            ),
        ]
        for param, check in checks:
            try:
                check()
            except JaxttsError as e:
                raise ApiError(400, _one_line(e), param=param, code="invalid_value") from None
        long_form = body.long_form
        if long_form is None:
            long_form = len(body.input) > LONG_FORM_AUTO_CHARS
        return dict(
            voice=voice,
            speaker=speaker,
            seed=body.seed,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            min_p=body.min_p,
            long_form=long_form,
            max_audio_ms=default_max_audio_ms if body.max_audio_ms is None else body.max_audio_ms,
        )

    async def _respond(request, handle, body, arrived: float):
        """Wait for the first audio (so that a request failing at its start gets an error status),
        then stream. A client that goes away cancels its request."""
        fmt, sse = body.response_format, body.stream_format == "sse"
        finished = {"done": False}

        async def watch_disconnect():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    if not finished["done"]:
                        metrics.cancelled.inc()
                        adapter.cancel(handle)
                    return

        watcher = asyncio.create_task(watch_disconnect())
        chunks = adapter.chunks(handle).__aiter__()
        try:
            encoder = make_encoder(fmt)
            tokens = adapter.count_tokens(body.input)
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException as e:
            watcher.cancel()
            adapter.cancel(handle)
            if isinstance(e, JaxttsError):
                raise _refused(e) from None
            raise
        if first is not None:
            metrics.ttfa.observe(time.monotonic() - arrived)

        async def audio():
            samples = 0
            metrics.streams.inc()
            try:
                pending = [first] if first is not None else []
                while True:
                    if pending:
                        chunk = pending.pop()
                    else:
                        try:
                            chunk = await chunks.__anext__()
                        except StopAsyncIteration:
                            break
                    pcm = pcm16(chunk)
                    samples += len(pcm)
                    data = encoder.encode(pcm)
                    if data:
                        yield data
                tail = encoder.finish()
                if tail:
                    yield tail
                finished["done"] = True
                audio_s = samples / SAMPLE_RATE
                metrics.audio_seconds.inc(audio_s)
                if audio_s > 0:
                    metrics.rtf.observe((time.monotonic() - arrived) / audio_s)
                if sse:
                    frames = -(-samples // FRAME_SAMPLES)
                    yield {"usage": {"input_tokens": tokens, "output_tokens": frames, "total_tokens": tokens + frames}}
            except JaxttsError as e:  # the request failed after its audio began
                metrics.errors.labels("/v1/audio/speech", "stream").inc()
                if not sse:
                    raise
                yield {
                    "error": {
                        "message": _one_line(e),
                        "type": "server_error",
                        "param": None,
                        "code": "generation_failed",
                    }
                }
            finally:
                metrics.streams.dec()
                watcher.cancel()
                if not finished["done"]:
                    adapter.cancel(handle)

        async def sse_events():
            async for item in audio():
                if isinstance(item, bytes):
                    event = {"type": "speech.audio.delta", "audio": base64.b64encode(item).decode("ascii")}
                elif "usage" in item:
                    event = {"type": "speech.audio.done", **item}
                else:
                    event = {"type": "error", **item}
                yield f"data: {json.dumps(event)}\n\n".encode()

        headers = {"X-Sample-Rate": str(SAMPLE_RATE), "Cache-Control": "no-store"}
        seed = adapter.seed(handle)
        if seed is not None:
            headers["X-Seed"] = str(seed)
        if sse:
            return StreamingResponse(sse_events(), media_type="text/event-stream", headers=headers)
        return StreamingResponse(audio(), media_type=MEDIA_TYPES[fmt], headers=headers)

    return app


async def _drain(receive, received: int) -> None:
    """Read and drop the rest of a refused request body (up to DRAIN_BYTES in all), so that the
    client, still sending, reads the 413 instead of a reset connection."""
    while received <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body"):
            return


def _form_text(form, name: str, *, required: bool) -> str | None:
    value = form.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
        return None
    if not isinstance(value, str):
        raise ApiError(
            400, f"Invalid type for '{name}': expected a text field, got a file.", param=name, code="invalid_type"
        )
    return value


def _decode_upload(data: bytes, name: str) -> np.ndarray:
    """An uploaded voice sample as 24 kHz mono float32, checked as jaxtts.audio.read_audio checks
    files: a decoding failure, empty or non-finite audio → 400 in one line."""
    import soundfile as sf

    if not data:
        raise ApiError(400, f"{name}: the audio file is empty.", param="audio_sample", code="invalid_audio")
    try:
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        first = re.sub(r"^Error opening <[^>]*>: ", "", first)  # soundfile names the BytesIO object
        raise ApiError(
            400,
            f"{name}: cannot read audio ({_one_line(first, 200)}); send WAV, FLAC, Ogg or MP3.",
            param="audio_sample",
            code="invalid_audio",
        ) from None
    if len(samples) > MAX_VOICE_SECONDS * sr:
        raise ApiError(
            400,
            f"{name}: the audio is {len(samples) / sr:.1f} s long; a voice sample may be at most "
            f"{MAX_VOICE_SECONDS:g} s.",
            param="audio_sample",
            code="invalid_audio",
        )
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # channels are mixed down, as for any voice prompt
            return to_mono_24k(samples, sr, name=name)
    except JaxttsError as e:
        raise ApiError(400, _one_line(e), param="audio_sample", code="invalid_audio") from None


# --------------------------------------------------------------------------- the command


def add_serve_parser(subparsers):
    """`jaxtts serve`: the subcommand's parser (wired in jaxtts.cli)."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible speech server (HTTP, streaming, web page)")
    p.add_argument("--model", help="converted CSM directory or checkpoint (default: jaxtts / Hugging Face cache)")
    p.add_argument("--codec", help="converted Mimi directory or checkpoint (default: caches)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="random full-size weights to check an install: the output is noise",
    )
    defaults.add_dtype_argument(p)
    add_quantize_argument(p)
    p.add_argument("--device", default=None, choices=["cpu", "gpu"], help="where to run (default: GPU if JAX has one)")
    p.add_argument(
        "--devices",
        default=None,
        help="'all' or N: one engine over this host's devices (or the first N), the batch split over them, "
        "weights replicated (default: one device); --max-batch is rounded up to a multiple of the count",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=64, help="most requests decoded together (default 64)")
    p.add_argument("--voices", default=None, help="voice store directory (default: ~/.cache/jaxtts/voices)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $JAXTTS_API_KEY, else open)",
    )
    p.add_argument("--model-name", default="csm-1b", help="the model id clients send (default csm-1b)")
    p.add_argument("--max-input-chars", type=int, default=4096, help="longest input text (default 4096)")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_BYTES / (1 << 20),
        help="largest voice upload in MiB (default 20)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--quiet", action="store_true", help="no progress bars while loading")
    ray = p.add_argument_group("Ray Serve (--ray; pip install 'jaxtts[ray]'; jaxtts.ray_serve)")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve: replicas of this server (one per GPU by default) behind Ray's proxy "
        "on --host/--port",
    )
    ray.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas (default 1)")
    ray.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="Ray Serve autoscaling between MIN and MAX")
    ray.add_argument(
        "--target-ongoing",
        type=int,
        default=None,
        help="with --autoscale: requests in flight per replica Ray aims for (default --max-batch)",
    )
    ray.add_argument(
        "--gpus-per-replica", type=float, default=None, help="default 1 if the Ray cluster has GPUs, else 0"
    )
    ray.add_argument("--ray-address", default=None, help="Ray cluster to join (default $RAY_ADDRESS, else a local one)")
    return p


def run_serve(args) -> int:
    """Load the model, start the engine, warm it up and serve until interrupted."""
    import os

    from jaxtts.environment import select_device

    try:
        import uvicorn
    except ImportError:
        raise JaxttsError("jaxtts serve needs the serve extra: pip install 'jaxtts[serve]'") from None
    if args.random_weights and (args.model or args.codec):
        raise JaxttsError("--random-weights builds its own weights: drop --model/--codec, or drop --random-weights")
    ray_only = ("replicas", "autoscale", "target_ongoing", "gpus_per_replica", "ray_address")
    if any(getattr(args, name, None) is not None for name in ray_only):
        raise JaxttsError(
            "--replicas, --autoscale, --target-ongoing, --gpus-per-replica and --ray-address go with --ray"
        )
    validation.integer("--port", args.port, low=0, high=65535)
    validation.integer("--max-batch", args.max_batch, low=1, high=4096)
    validation.integer("--max-input-chars", args.max_input_chars, low=1)
    validation.number("--max-upload-mb", args.max_upload_mb, low=0.01)
    api_key = args.api_key or os.environ.get("JAXTTS_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it may use it", file=sys.stderr)
    select_device(args.device)
    devices = None
    if args.devices is not None:  # checked before the weights load
        from jaxtts.sharding import resolve_devices

        devices = resolve_devices(args.devices, what="--devices")

    from jaxtts.tts import TTS

    if args.random_weights:
        print("note: --random-weights: full-size random weights, the output is noise", file=sys.stderr)
    tts = TTS.load(
        args.model,
        args.codec,
        dtype=args.dtype,
        quantize=args.quantize,
        random_weights=args.random_weights,
        progress=not args.quiet,
    )
    engine = make_engine(tts, max_batch=args.max_batch, voices_dir=args.voices, devices=devices)
    host = f"[{args.host}]" if ":" in args.host else args.host

    def ready():
        print(
            f"jaxtts serve: ready on http://{host}:{args.port}/ (model {args.model_name})", file=sys.stderr, flush=True
        )

    print("jaxtts serve: warming up (compiling the engine's programs)...", file=sys.stderr, flush=True)
    app = create_app(
        engine,
        api_key=api_key,
        model_name=args.model_name,
        max_input_chars=args.max_input_chars,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        on_ready=ready,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        EngineAdapter(engine).close()
    return 0
