"""`jaxtts serve` (jaxtts.server) through the official `openai` client and plain HTTP: a real
Engine over the tiny random CSM and Mimi, uvicorn in a background thread on 127.0.0.1.

Every loop is bounded in count and time; audio is kept to a few 80 ms frames.
"""

import base64
import concurrent.futures
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import wave

import numpy as np
import pytest

fastapi = pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'jaxtts[serve]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed (test extra)")
av = pytest.importorskip("av")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
import soundfile as sf  # noqa: E402

from jaxtts.engine import Engine  # noqa: E402
from jaxtts.server import BUILTIN_VOICES, available_formats, create_app  # noqa: E402
from jaxtts.tts import TTS  # noqa: E402
from jaxtts.voices import VoiceStore  # noqa: E402

SHORT_MS = 400  # 5 frames: a first chunk of 1 frame, then 4
TEXT = "Hello from the server."


class Uvicorn:
    """An app served by uvicorn in a daemon thread on a free 127.0.0.1 port."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def wait_healthy(url: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/health", timeout=10).status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url}/health not 200 within {timeout} s")


@pytest.fixture(scope="module")
def engine(tiny_csm, mimi, tmp_path_factory):
    tts = TTS(tiny_csm, mimi, max_silence_ms=None)
    # One pool size and one-prompt prefills: the fewest programs to compile on a CPU.
    eng = Engine(
        tts,
        max_batch=8,
        pool_sizes=(8,),
        max_prefill=1,
        queue_limit=256,
        voices=VoiceStore(tmp_path_factory.mktemp("voices")),
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(
        engine, max_upload_bytes=256 * 1024, warmup={"text_tokens": 16, "context_rows": 16, "encode": False}
    )
    with Uvicorn(app) as s:
        wait_healthy(s.url)
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def speak(client, fmt="wav", *, seed=1, max_audio_ms=SHORT_MS, text=TEXT, voice="alloy", **extra) -> bytes:
    r = client.audio.speech.create(
        model="csm-1b",
        input=text,
        voice=voice,
        response_format=fmt,
        extra_body={"seed": seed, "max_audio_ms": max_audio_ms, **extra},
    )
    return r.content


def wav_samples(data: bytes) -> np.ndarray:
    samples, sr = sf.read(io.BytesIO(data), dtype="int16")
    assert sr == 24000 and samples.ndim == 1
    return samples


def av_decode(data: bytes):
    """(samples [n] as float, sample rate, channels) decoded by FFmpeg."""
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        channels = stream.codec_context.channels
        pcm = [f.to_ndarray().reshape(-1) for f in c.decode(stream)]
        rate = stream.codec_context.sample_rate
    return np.concatenate(pcm) if pcm else np.zeros(0), rate, channels


def check_error(r, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of the Prometheus text."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{want}}}" if want else "")) + r" ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


# --------------------------------------------------------------------------- formats


def test_every_format_decodes_to_24k_mono(client):
    assert set(available_formats()) == {"mp3", "opus", "aac", "flac", "wav", "pcm"}
    wav = speak(client, "wav")
    ref = wav_samples(wav)
    assert len(ref) == 5 * 1920
    with wave.open(io.BytesIO(wav)) as w:  # the streaming header: sizes unknown (0xFFFFFFFF)
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
    pcm = np.frombuffer(speak(client, "pcm"), "<i2")
    np.testing.assert_array_equal(pcm, ref)
    flac, rate, channels = av_decode(speak(client, "flac"))
    assert (rate, channels) == (24000, 1)
    np.testing.assert_array_equal(flac, ref)  # lossless: the WAV's samples exactly
    seconds = len(ref) / 24000
    for fmt, expected_rate in (("mp3", 24000), ("aac", 24000), ("opus", 48000)):  # Opus decoders run at 48 kHz
        samples, rate, channels = av_decode(speak(client, fmt))
        assert (rate, channels) == (expected_rate, 1), fmt
        # encoder delay and padding: within 0.1 s of the WAV's length
        assert abs(len(samples) / rate - seconds) < 0.1, (fmt, len(samples) / rate, seconds)
        assert np.abs(samples).max() > 0, fmt


def test_streaming_arrives_in_chunks_and_equals_the_whole_answer(client):
    for fmt in ("wav", "mp3"):
        whole = speak(client, fmt, seed=3, max_audio_ms=800)
        with client.audio.speech.with_streaming_response.create(
            model="csm-1b",
            input=TEXT,
            voice="alloy",
            response_format=fmt,
            extra_body={"seed": 3, "max_audio_ms": 800},
        ) as r:
            assert r.headers["content-type"].startswith({"wav": "audio/wav", "mp3": "audio/mpeg"}[fmt])
            assert r.headers.get("transfer-encoding") == "chunked"
            assert r.headers["x-seed"] == "3"
            chunks = [c for c in r.iter_bytes() if c]
        assert len(chunks) >= 2, (fmt, [len(c) for c in chunks])  # 1 frame first, then the rest
        assert b"".join(chunks) == whole, fmt


def test_sse_deltas_then_done_with_usage(client):
    pcm = speak(client, "pcm", seed=4)
    with client.audio.speech.with_streaming_response.create(
        model="csm-1b",
        input=TEXT,
        voice="alloy",
        response_format="pcm",
        stream_format="sse",
        extra_body={"seed": 4, "max_audio_ms": SHORT_MS},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert len(events) >= 3
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == pcm
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["output_tokens"] == 5 and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_concurrent_requests_equal_each_alone(client):
    seeds = [11, 12, 13, 14]
    alone = {s: speak(client, "pcm", seed=s, text=f"Request number {s}.") for s in seeds}
    assert len(set(alone.values())) == len(seeds)
    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
        together = dict(
            zip(
                seeds, pool.map(lambda s: speak(client, "pcm", seed=s, text=f"Request number {s}."), seeds, timeout=300)
            )
        )
    for s in seeds:
        # The engine gives each request exactly its frames alone. Its audio is the same up to the
        # last bit of 16 bits: Mimi's float arithmetic depends on how many frames one decode call
        # holds, and a request decoded beside others is chunked differently.
        a, b = np.frombuffer(together[s], "<i2"), np.frombuffer(alone[s], "<i2")
        assert len(a) == len(b) == 5 * 1920, s
        assert np.abs(a.astype(np.int32) - b).max() <= 2, (s, np.abs(a.astype(np.int32) - b).max())


def test_builtin_voices_and_speaker_field(client, server):
    voices = httpx.get(f"{server.url}/v1/audio/voices").json()["voices"]
    assert {v["id"] for v in voices} >= set(BUILTIN_VOICES)
    assert all(set(v) >= {"id", "name"} for v in voices)
    # a voice name is a speaker id: `speaker` overrides it, and the voice object form works too
    assert speak(client, "pcm", voice="ash") == speak(client, "pcm", voice="alloy", speaker=BUILTIN_VOICES["ash"])
    assert speak(client, "pcm", voice={"id": "ash"}) == speak(client, "pcm", voice="ash")
    models = client.models.list()
    assert [m.id for m in models.data] == ["csm-1b"]


def test_long_form_sentence_by_sentence(client):
    # each sentence up to max_audio_ms, continuing from the previous one's audio; inputs over 300
    # characters are spoken this way unless long_form is false
    audio = np.frombuffer(speak(client, "pcm", text="One. Two. Three.", max_audio_ms=160, long_form=True), "<i2")
    assert len(audio) == 3 * 2 * 1920
    # instructions (gpt-4o-mini-tts) are accepted and ignored: CSM takes none
    assert len(speak(client, "pcm", max_audio_ms=160, instructions="Speak calmly.")) == 2 * 1920 * 2


# --------------------------------------------------------------------------- bad requests


GOOD = {
    "model": "csm-1b",
    "input": TEXT,
    "voice": "alloy",
    "response_format": "pcm",
    "seed": 5,
    "max_audio_ms": SHORT_MS,
}

BAD_BODIES = [
    # (changes to GOOD, None = drop the key), status, param
    ({"input": None}, 400, "input"),
    ({"voice": None}, 400, "voice"),
    ({"input": ""}, 400, "input"),
    ({"input": "   "}, 400, "input"),
    ({"input": "x" * 4097}, 400, "input"),
    ({"input": 42}, 400, "input"),
    ({"model": "no-such-model"}, 404, "model"),
    ({"voice": "nobody"}, 400, "voice"),
    ({"voice": {"name": "alloy"}}, 400, None),
    ({"response_format": "ogg"}, 400, "response_format"),
    ({"stream_format": "websocket"}, 400, "stream_format"),
    ({"speed": 2.0}, 400, "speed"),
    ({"speed": 0.1}, 400, "speed"),
    ({"speed": "fast"}, 400, "speed"),
    ({"speed": "1"}, 400, "speed"),  # no coercion of strings, booleans or floats, as OpenAI's
    ({"seed": "5"}, 400, "seed"),
    ({"seed": True}, 400, "seed"),
    ({"temperature": "0.5"}, 400, "temperature"),
    ({"top_k": 50.0}, 400, "top_k"),
    ({"long_form": "yes"}, 400, "long_form"),
    ({"seed": -1}, 400, "seed"),
    ({"seed": 2**32}, 400, "seed"),
    ({"seed": 1.5}, 400, "seed"),
    ({"temperature": -0.5}, 400, "temperature"),
    ({"top_k": 0}, 400, "top_k"),
    ({"top_k": 2**31}, 400, "top_k"),  # past int32: it failed its whole decode batch (500)
    ({"top_p": 0.0}, 400, "top_p"),
    ({"min_p": 1.0}, 400, "min_p"),
    ({"max_audio_ms": 10}, 400, "max_audio_ms"),
    ({"speaker": -1}, 400, "speaker"),
    ({"unknown_field": 1}, 400, "unknown_field"),
    ({"max_audio_ms": 60_000}, 422, None),  # well-formed, but more than the tiny model's 256 positions
]


def test_bad_requests_get_openai_errors_and_disturb_nobody(client, server):
    url = f"{server.url}/v1/audio/speech"
    baseline = speak(client, "pcm", seed=21, max_audio_ms=1600, text="A request running beside the bad ones.")
    box = {}
    bystander = threading.Thread(
        target=lambda: box.setdefault(
            "audio", speak(client, "pcm", seed=21, max_audio_ms=1600, text="A request running beside the bad ones.")
        )
    )
    bystander.start()
    with httpx.Client(timeout=60) as http:
        for change, status, param in BAD_BODIES:
            body = {k: v for k, v in {**GOOD, **change}.items() if v is not None or k not in change}
            check_error(http.post(url, json=body), status, param)
        check_error(
            http.post(url, content=b'{"model": "csm-1b", "input": ', headers={"content-type": "application/json"}),
            400,
            code="invalid_json",
        )
        check_error(http.post(url, json=[1, 2, 3]), 400)
        check_error(http.post(url, content=b"model=csm-1b", headers={"content-type": "text/plain"}), 400)
        check_error(http.post(url, content=b"x" * (2 << 20), headers={"content-type": "application/json"}), 413)
        check_error(http.get(url), 405)
        check_error(http.get(f"{server.url}/v1/nothing-here"), 404, code="unknown_url")
        check_error(http.delete(f"{server.url}/v1/audio/voices/nobody"), 404)
        check_error(http.delete(f"{server.url}/v1/audio/voices/alloy"), 400)
        # the official client raises the matching exception classes
        with pytest.raises(openai.BadRequestError):
            client.audio.speech.create(model="csm-1b", input=TEXT, voice="alloy", speed=1.5)
        with pytest.raises(openai.NotFoundError):
            client.audio.speech.create(model="whisper-1", input=TEXT, voice="alloy")
        with pytest.raises(openai.UnprocessableEntityError):
            speak(client, max_audio_ms=60_000)
    bystander.join(300)
    assert box["audio"] == baseline  # the bad requests did not disturb it
    assert (
        speak(client, "pcm", seed=21, max_audio_ms=1600, text="A request running beside the bad ones.") == baseline
    )  # and the server still serves


RAW_BODIES = [
    # (path, content-type, body, status, code): bodies no JSON or form parser reads, or whose error once broke
    pytest.param(
        "/v1/audio/speech",
        "application/json",
        b'{"model": "\\ud800", "input": "x", "voice": "alloy"}',
        404,
        "model_not_found",
        id="lone-surrogate-in-message",  # UTF-8 cannot encode it: the error answer was a 500
    ),
    # JSON that json.loads refuses with other errors than a syntax error: code null, not invalid_json
    pytest.param("/v1/audio/speech", "application/json", b'{"input": "\xff"}', 400, "invalid_json", id="not-utf8"),
    pytest.param(
        "/v1/audio/speech", "application/json", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", id="deep"
    ),
    pytest.param(
        "/v1/audio/speech", "application/json", b'{"seed": ' + b"9" * 5000 + b"}", 400, "invalid_json", id="digits"
    ),
    # forms Starlette refuses (its 400s): code null, not invalid_multipart
    pytest.param("/v1/audio/voices", "multipart/form-data", b"name=x", 400, "invalid_multipart", id="no-boundary"),
    pytest.param(
        "/v1/audio/voices",
        "multipart/form-data; boundary=b",
        b'--b\r\nContent-Disposition: form-data; name="f"; filename="f.wav"\r\n\r\nx\r\n' * 3 + b"--b--\r\n",
        400,
        "invalid_multipart",
        id="three-files",
    ),
]


@pytest.mark.parametrize("path, ctype, body, status, code", RAW_BODIES)
def test_raw_bodies_get_openai_errors(server, path, ctype, body, status, code):
    r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": ctype}, timeout=60)
    check_error(r, status, code=code)


def test_client_disconnect_cancels_its_request(client, server, engine):
    before = metric(httpx.get(f"{server.url}/metrics").text, "jaxtts_speech_cancelled_total")
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST", f"{server.url}/v1/audio/speech", json={**GOOD, "max_audio_ms": 10_000, "response_format": "wav"}
        ) as r:
            assert r.status_code == 200
            first = next(r.iter_raw())
            assert first[:4] == b"RIFF"
        # leaving the block closes the connection after a few frames of 125
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        stats = engine.stats()
        if metric(text, "jaxtts_speech_cancelled_total") > before and stats["live"] == 0 and stats["queued"] == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the request was not cancelled: {engine.stats()}")
    assert engine.stats()["completed"] >= 0


# --------------------------------------------------------------------------- voices


def test_voice_upload_then_speak_with_it(client, server):
    rng = np.random.default_rng(0)
    sample = io.BytesIO()  # 1.2 s of stereo 16 kHz: mixed down and resampled like any voice prompt
    sf.write(sample, (0.1 * rng.standard_normal((19_200, 2))).astype(np.float32), 16_000, format="WAV")
    voice = client.audio.voices.create(
        name="tester",
        audio_sample=("tester.wav", sample.getvalue(), "audio/wav"),
        consent="not-needed",
        extra_body={"transcript": "A voice for the tests.", "speaker": 3},
    )
    assert (voice.id, voice.name, voice.object) == ("tester", "tester", "audio.voice")
    voices = {v["id"]: v for v in httpx.get(f"{server.url}/v1/audio/voices").json()["voices"]}
    assert voices["tester"]["speaker"] == 3 and voices["tester"]["type"] == "audio_sample"
    with_voice = speak(client, "pcm", voice="tester")
    assert len(with_voice) > 0
    assert speak(client, "pcm", voice={"id": "tester"}) == with_voice
    assert with_voice != speak(client, "pcm", voice="alloy", speaker=3)  # the prompt changes the audio

    form = {"name": "tester", "transcript": "Again."}
    files = {"audio_sample": ("t.wav", sample.getvalue(), "audio/wav")}
    check_error(httpx.post(f"{server.url}/v1/audio/voices", data=form, files=files), 400, "name", "voice_exists")
    bad = [
        ({"name": "alloy", "transcript": "x"}, files, 400, "name"),
        ({"name": "../evil", "transcript": "x"}, files, 400, "name"),
        ({"name": "evil\n", "transcript": "x"}, files, 400, "name"),  # was the store's 422 after encoding it
        ({"name": "nofile", "transcript": "x"}, None, 400, "audio_sample"),
        ({"name": "notext"}, files, 400, "transcript"),
        ({"name": "spk", "transcript": "x", "speaker": "one"}, files, 400, "speaker"),
        (
            {"name": "garbage", "transcript": "x"},
            {"audio_sample": ("g.wav", b"not audio at all" * 64, "audio/wav")},
            400,
            "audio_sample",
        ),
        ({"name": "empty", "transcript": "x"}, {"audio_sample": ("e.wav", b"", "audio/wav")}, 400, "audio_sample"),
        ({"name": "big", "transcript": "x"}, {"audio_sample": ("b.wav", b"\0" * (400 * 1024), "audio/wav")}, 413, None),
    ]
    for data, upload, status, param in bad:
        check_error(httpx.post(f"{server.url}/v1/audio/voices", data=data, files=upload), status, param)
    check_error(httpx.post(f"{server.url}/v1/audio/voices", json={"name": "x"}), 400)

    deleted = client.audio.voices.delete("tester")
    assert deleted.deleted and deleted.id == "tester"
    check_error(httpx.delete(f"{server.url}/v1/audio/voices/tester"), 404, code="voice_not_found")
    with pytest.raises(openai.BadRequestError):
        speak(client, voice="tester")
    assert "tester" not in {v["id"] for v in httpx.get(f"{server.url}/v1/audio/voices").json()["voices"]}


# --------------------------------------------------------------------------- auth, health, metrics, page


def test_api_key(engine):
    app = create_app(engine, api_key="s3cret", warmup=False)
    with Uvicorn(app) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            check_error(httpx.get(f"{s.url}/v1/models", headers=headers), 401, code="invalid_api_key")
            check_error(httpx.post(f"{s.url}/v1/audio/speech", json=GOOD, headers=headers), 401)
        assert httpx.get(f"{s.url}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for path in ("/health", "/metrics", "/", "/static/app.js"):  # open: probes, scrapers, the page
            assert httpx.get(f"{s.url}{path}").status_code == 200, path
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret", max_retries=0, timeout=300)
        assert len(speak(good, "pcm")) == 5 * 1920 * 2


def test_full_queue_is_429_with_retry_after(engine):
    full = Engine(engine.tts, max_batch=8, pool_sizes=(8,), max_prefill=1, queue_limit=0)  # every submit: Busy
    try:
        with Uvicorn(create_app(full, warmup=False)) as s:
            r = httpx.post(f"{s.url}/v1/audio/speech", json=GOOD)
            check_error(r, 429, code="rate_limit_exceeded")
            assert int(r.headers["retry-after"]) >= 1
            with pytest.raises(openai.RateLimitError):
                speak(openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0))
    finally:
        full.close()


class _Warming:
    """An engine stand-in whose warmup waits for a signal (the gate's behaviour alone)."""

    voices = None

    def __init__(self):
        self.go = threading.Event()

    def warmup(self):
        assert self.go.wait(60)

    def stats(self):
        return {"queued": 0, "live": 0, "pool_size": 0}

    limit = 2048


def test_health_is_503_until_warm():
    fake = _Warming()
    with Uvicorn(create_app(fake)) as s:
        r = httpx.get(f"{s.url}/health")
        assert r.status_code == 503 and r.json()["status"] == "warming up"
        check_error(httpx.post(f"{s.url}/v1/audio/speech", json=GOOD), 503, code="warming_up")
        assert metric(httpx.get(f"{s.url}/metrics").text, "jaxtts_ready") == 0
        fake.go.set()
        wait_healthy(s.url, timeout=30)
        assert metric(httpx.get(f"{s.url}/metrics").text, "jaxtts_ready") == 1


def test_page_and_metrics(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/static/app.js">' in page.text
    assert "javascript" in httpx.get(f"{server.url}/static/app.js").headers["content-type"]
    assert httpx.get(f"{server.url}/static/../server.py").status_code == 404
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "jaxtts_http_requests_total", endpoint="/v1/audio/speech", status="200") > 0
    assert metric(text, "jaxtts_http_errors_total", endpoint="/v1/audio/speech", status="400") > 0
    assert metric(text, "jaxtts_time_to_first_audio_seconds_count") > 0
    assert metric(text, "jaxtts_real_time_factor_count") > 0
    assert metric(text, "jaxtts_audio_seconds_total") > 0
    for name in ("jaxtts_queue_depth", "jaxtts_active_slots", "jaxtts_slots", "jaxtts_open_streams"):
        assert re.search(rf"^{name} [0-9.]+$", text, re.M), name


# --------------------------------------------------------------------------- load


def test_64_concurrent_streaming_clients(server):
    """64 clients stream at once (more than the 8 slots: the rest queue); none is lost or fails."""
    n = 64

    def one(i):
        with httpx.Client(timeout=300) as http:
            with http.stream(
                "POST",
                f"{server.url}/v1/audio/speech",
                json={**GOOD, "seed": i, "max_audio_ms": 240, "input": f"Client {i}.", "response_format": "wav"},
            ) as r:
                return r.status_code, b"".join(r.iter_bytes())

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n), timeout=280))
    assert time.monotonic() - start < 280
    assert [status for status, _ in results] == [200] * n
    for _, data in results:
        assert len(wav_samples(data)) == 3 * 1920


# --------------------------------------------------------------------------- without the extra, and the command


def test_jaxtts_imports_without_the_serve_extra():
    code = (
        "import sys\n"
        "for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client', 'multipart', 'av'): sys.modules[m] = None\n"
        "import jaxtts, jaxtts.server, jaxtts.cli\n"
        "from jaxtts.errors import JaxttsError\n"
        "try:\n"
        "    jaxtts.server.create_app(object())\n"
        "except JaxttsError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pip install 'jaxtts[serve]'" in r.stdout


def test_serve_command_wiring(monkeypatch, tiny_csm, mimi, tmp_path):
    """`run_serve` loads, builds the engine and hands uvicorn the app on 127.0.0.1 (uvicorn.run replaced)."""
    from jaxtts import server
    from jaxtts.errors import ArgumentParser, JaxttsError

    parser = ArgumentParser(prog="jaxtts")
    server.add_serve_parser(parser.add_subparsers(dest="command", parser_class=ArgumentParser))
    args = parser.parse_args(
        ["serve", "--random-weights", "--port", "8123", "--max-batch", "4", "--voices", str(tmp_path / "voices")]
    )
    assert (args.host, args.port, args.max_batch) == ("127.0.0.1", 8123, 4)
    with pytest.raises(JaxttsError, match="--random-weights"):
        server.run_serve(parser.parse_args(["serve", "--random-weights", "--model", "x"]))
    with pytest.raises(JaxttsError, match="--port"):
        server.run_serve(parser.parse_args(["serve", "--random-weights", "--port", "70000"]))

    seen = {}
    monkeypatch.setattr(TTS, "load", classmethod(lambda cls, *a, **k: TTS(tiny_csm, mimi, max_silence_ms=None)))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert server.run_serve(args) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    engine = seen["app"].state.adapter.engine
    assert engine.max_batch == 4 and engine.voices.root == tmp_path / "voices"
