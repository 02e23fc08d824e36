"""The web page at / in Debian's Chromium, headless, through Playwright for Python: speak a line
and a two-speaker conversation (audio streamed into WebAudio, then the whole take into the
<audio> element), record a voice from the (fake) microphone and speak with it.

Needs /usr/bin/chromium (Debian: apt-get install -y chromium); Playwright's own browsers are
never downloaded. JAXTTS_UPDATE_SCREENSHOT=1 also copies the screenshot to docs/img/web.png.
"""

import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install -y chromium)", allow_module_level=True)
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'jaxtts[serve]'")
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from jaxtts.engine import Engine  # noqa: E402
from jaxtts.server import create_app  # noqa: E402
from jaxtts.tts import TTS  # noqa: E402
from jaxtts.voices import VoiceStore  # noqa: E402
from test_server import Uvicorn, wait_healthy  # noqa: E402

TIMEOUT_MS = 240_000
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "web.png"


@pytest.fixture(scope="module")
def server(tiny_csm, mimi, tmp_path_factory):
    tts = TTS(tiny_csm, mimi, max_silence_ms=None)
    engine = Engine(
        tts, max_batch=8, pool_sizes=(8,), max_prefill=1, voices=VoiceStore(tmp_path_factory.mktemp("voices"))
    )
    app = create_app(engine, warmup={"text_tokens": 16, "context_rows": 16, "encode": False})
    try:
        with Uvicorn(app) as s:
            wait_healthy(s.url)
            yield s
    finally:
        engine.close()


@pytest.fixture(scope="module")
def page(server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-background-networking",
                "--disable-gpu",
                "--disable-component-update",
                "--no-first-run",
                "--autoplay-policy=no-user-gesture-required",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
            ],
        )
        try:
            context = browser.new_context(viewport={"width": 1000, "height": 1200})
            context.grant_permissions(["microphone"], origin=server.url)
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(server.url + "/")
            page.wait_for_function("document.querySelectorAll('#voice option').length > 0")
            page.errors = errors
            yield page
        finally:
            browser.close()


def settings(page, *, seed: int, max_audio_ms: int) -> None:
    if not page.locator("details").get_attribute("open") == "":
        page.click("details summary")
    page.fill("#seed", str(seed))
    page.fill("#max-audio-ms", str(max_audio_ms))


def speak_and_wait(page) -> dict:
    page.click("#speak-button")
    page.wait_for_function("['done', 'error'].includes(window.jaxtts.state)", timeout=TIMEOUT_MS)
    state = page.evaluate("window.jaxtts")
    assert state["state"] == "done", state
    return state


def player_duration(page) -> float:
    """The <audio> element's duration once its metadata has loaded (it holds the whole take)."""
    return page.evaluate("""() => new Promise((resolve) => {
        const a = document.getElementById('player');
        if (a.readyState >= 1) resolve(a.duration);
        else { a.onloadedmetadata = () => resolve(a.duration); a.onerror = () => resolve(-1); }
    })""")


def test_speak_a_line(page, tmp_path):
    settings(page, seed=1, max_audio_ms=800)
    page.fill("#text", "Hello from the web page.")
    state = speak_and_wait(page)
    assert state["bytes"] == 10 * 1920 * 2 and state["chunks"] >= 2  # streamed in pieces
    assert page.get_attribute("#player", "src").startswith("blob:")
    assert abs(player_duration(page) - 0.8) < 0.01
    assert page.get_attribute("#download", "href").startswith("blob:")
    assert "Done" in page.inner_text("#status")
    shot = tmp_path / "web.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("JAXTTS_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, DOCS_SCREENSHOT)
    assert not page.errors, page.errors


def test_two_speaker_conversation(page):
    settings(page, seed=2, max_audio_ms=400)
    page.check("input[name=mode][value=conversation]")
    page.fill("#dialogue", "A: Hi there.\nB: Hello to you.\nA: Bye.")
    page.select_option("#voice-a", "alloy")
    page.select_option("#voice-b", "ash")
    state = speak_and_wait(page)
    # three turns of 5 frames, with 0.3 s pauses between them
    assert abs(state["seconds"] - (3 * 0.4 + 2 * 0.3)) < 1e-6
    assert abs(player_duration(page) - state["seconds"]) < 0.01
    page.check("input[name=mode][value=line]")
    assert not page.errors, page.errors


def test_record_a_voice_from_the_microphone_and_use_it(page):
    page.click("#record-button")
    page.wait_for_function("document.getElementById('record-button').textContent === 'Stop recording'")
    time.sleep(1.5)
    page.click("#record-button")
    page.wait_for_function("document.getElementById('recording').src.startsWith('blob:')")
    page.fill("#voice-name", "mic-voice")
    page.fill("#voice-transcript", "A few words into the microphone.")
    page.click("#upload-button")
    page.wait_for_function(
        "document.getElementById('voice-status').textContent.startsWith('Added voice')", timeout=TIMEOUT_MS
    )
    # the list and the picker refresh after the status line: wait for them, bounded
    page.wait_for_function(
        "document.getElementById('voice-list').textContent.includes('mic-voice')", timeout=TIMEOUT_MS
    )
    page.wait_for_function("document.getElementById('voice').value === 'mic-voice'", timeout=TIMEOUT_MS)
    settings(page, seed=3, max_audio_ms=400)
    page.fill("#text", "Now in the recorded voice.")
    state = speak_and_wait(page)
    assert state["bytes"] == 5 * 1920 * 2
    page.click("#voice-list button")  # delete it again
    page.wait_for_function("!document.getElementById('voice-list').textContent.includes('mic-voice')")
    assert not page.errors, page.errors
