// jaxtts web page: speaks through POST /v1/audio/speech (response_format "pcm", 24 kHz s16le mono),
// plays the chunks through WebAudio as they arrive, then hands the whole take to the <audio>
// element as a WAV (replay, download). Plain JS, no build step.
"use strict";

const RATE = 24000;
const $ = (id) => document.getElementById(id);

// Read by the page's tests: where the last take stands.
window.jaxtts = { state: "idle", bytes: 0, seconds: 0, chunks: 0, error: null };

function setState(state, fields = {}) {
  Object.assign(window.jaxtts, { state }, fields);
  document.body.dataset.state = state;
}

function status(text, isError = false, el = $("status")) {
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

// ------------------------------------------------------------------ voices

const BUILTIN_DEFAULTS = { "voice": "alloy", "voice-a": "alloy", "voice-b": "ash" };

async function loadVoices() {
  let voices = [];
  try {
    const r = await fetch("/v1/audio/voices", { headers: headers() });
    if (!r.ok) throw new Error(await errorMessage(r));
    voices = (await r.json()).voices;
  } catch (e) {
    status(`Could not list voices: ${e.message}`, true);
    return;
  }
  for (const select of document.querySelectorAll(".voice-picker")) {
    const previous = select.value || BUILTIN_DEFAULTS[select.id];
    select.replaceChildren();
    for (const group of ["audio_sample", "builtin"]) {
      const members = voices.filter((v) => v.type === group);
      if (!members.length) continue;
      const og = document.createElement("optgroup");
      og.label = group === "builtin" ? "Built-in (speaker ids)" : "Stored voices";
      for (const v of members) {
        const o = document.createElement("option");
        o.value = v.id;
        o.textContent = v.speaker === null || v.speaker === undefined ? v.name : `${v.name} (speaker ${v.speaker})`;
        og.appendChild(o);
      }
      select.appendChild(og);
    }
    if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  }
  const list = $("voice-list");
  list.replaceChildren();
  const stored = voices.filter((v) => v.type !== "builtin");
  if (!stored.length) {
    const li = document.createElement("li");
    li.className = "hint";
    li.textContent = "No stored voices yet.";
    list.appendChild(li);
  }
  for (const v of stored) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = `${v.name} (speaker ${v.speaker})`;
    const del = document.createElement("button");
    del.className = "secondary";
    del.textContent = "Delete";
    del.onclick = async () => {
      const r = await fetch(`/v1/audio/voices/${encodeURIComponent(v.id)}`, { method: "DELETE", headers: headers() });
      status(r.ok ? `Deleted ${v.name}.` : await errorMessage(r), !r.ok, $("voice-status"));
      loadVoices();
    };
    li.append(name, del);
    list.appendChild(li);
  }
}

// ------------------------------------------------------------------ speaking

let audioContext = null;
let current = null; // { controller, sources }

function turns() {
  if (document.querySelector('input[name="mode"]:checked').value === "line") {
    return [{ text: $("text").value.trim(), voice: $("voice").value }].filter((t) => t.text);
  }
  const out = [];
  let next = "A";
  for (let line of $("dialogue").value.split("\n")) {
    line = line.trim();
    if (!line) continue;
    let who = next;
    const m = line.match(/^([AaBb])\s*:\s*(.*)$/);
    if (m) { who = m[1].toUpperCase(); line = m[2].trim(); }
    if (!line) continue;
    out.push({ text: line, voice: who === "A" ? $("voice-a").value : $("voice-b").value });
    next = who === "A" ? "B" : "A";
  }
  return out;
}

let modelId = "csm-1b";  // replaced by the server's own from GET /v1/models

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.ok) modelId = (await r.json()).data[0].id;
  } catch (e) { /* keep the default */ }
}

function requestBody(turn) {
  const body = { model: modelId, input: turn.text, voice: turn.voice, response_format: "pcm" };
  const num = (id) => $(id).value.trim() === "" ? null : Number($(id).value);
  if (num("seed") !== null) body.seed = num("seed");
  if (num("temperature") !== null) body.temperature = num("temperature");
  if (num("top-k") !== null) body.top_k = num("top-k");
  if (num("max-audio-ms") !== null) body.max_audio_ms = num("max-audio-ms");
  return body;
}

function wavBlob(chunks) {
  const samples = chunks.reduce((n, c) => n + c.length, 0);
  const buf = new ArrayBuffer(44 + 2 * samples);
  const v = new DataView(buf);
  const text = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  text(0, "RIFF"); v.setUint32(4, 36 + 2 * samples, true); text(8, "WAVE");
  text(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, RATE, true); v.setUint32(28, 2 * RATE, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
  text(36, "data"); v.setUint32(40, 2 * samples, true);
  let o = 44;
  for (const c of chunks) for (let i = 0; i < c.length; i++, o += 2) v.setInt16(o, c[i], true);
  return new Blob([buf], { type: "audio/wav" });
}

async function speak() {
  const list = turns();
  if (!list.length) { status("Type something to say first.", true); return; }
  if (!audioContext) {
    try { audioContext = new AudioContext(); } catch (e) { audioContext = null; }
  }
  if (audioContext && audioContext.state === "suspended") audioContext.resume().catch(() => {});
  stop();
  const controller = new AbortController();
  current = { controller, sources: [] };
  const take = [];  // Int16Array chunks of the whole take
  let playAt = audioContext ? audioContext.currentTime + 0.1 : 0;
  let total = 0;
  const started = performance.now();
  let firstAudio = null;
  $("speak-button").disabled = true;
  $("stop-button").disabled = false;
  $("download").classList.add("hidden");
  setState("streaming", { bytes: 0, seconds: 0, chunks: 0, error: null });
  const player = $("player");
  player.removeAttribute("src");
  player.load();

  const play = (pcm) => {
    if (!audioContext) return;
    const buffer = audioContext.createBuffer(1, pcm.length, RATE);
    const data = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) data[i] = pcm[i] / 32768;
    const src = audioContext.createBufferSource();
    src.buffer = buffer;
    src.connect(audioContext.destination);
    playAt = Math.max(playAt, audioContext.currentTime + 0.02);
    src.start(playAt);
    playAt += buffer.duration;
    current.sources.push(src);
  };

  try {
    for (const [n, turn] of list.entries()) {
      const r = await fetch("/v1/audio/speech", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(requestBody(turn)),
        signal: controller.signal,
      });
      if (!r.ok) throw new Error(await errorMessage(r));
      const reader = r.body.getReader();
      let carry = new Uint8Array(0);
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        const bytes = new Uint8Array(carry.length + value.length);
        bytes.set(carry); bytes.set(value, carry.length);
        const usable = bytes.length - (bytes.length % 2);
        carry = bytes.slice(usable);
        if (!usable) continue;
        const pcm = new Int16Array(bytes.buffer.slice(0, usable));
        if (firstAudio === null) firstAudio = performance.now() - started;
        take.push(pcm);
        play(pcm);
        total += pcm.length;
        window.jaxtts.bytes += usable;
        window.jaxtts.chunks += 1;
        window.jaxtts.seconds = total / RATE;
        const turnInfo = list.length > 1 ? ` (turn ${n + 1} of ${list.length})` : "";
        status(`Streaming${turnInfo}: ${(total / RATE).toFixed(2)} s of audio, first audio after ${firstAudio.toFixed(0)} ms`);
        $("meter").firstElementChild.style.width = `${Math.min(100, (100 * (n + 1)) / list.length)}%`;
      }
      if (n + 1 < list.length) {  // a short pause between turns
        const pause = new Int16Array(Math.round(0.3 * RATE));
        take.push(pause);
        play(pause);
        total += pause.length;
      }
    }
    const blob = wavBlob(take);
    const url = URL.createObjectURL(blob);
    player.src = url;
    const link = $("download");
    link.href = url;
    link.classList.remove("hidden");
    status(`Done: ${(total / RATE).toFixed(2)} s of audio` +
      (firstAudio !== null ? `, first audio after ${firstAudio.toFixed(0)} ms.` : "."));
    setState("done", { seconds: total / RATE });
  } catch (e) {
    if (e.name === "AbortError") {
      status("Stopped.");
      setState("stopped");
    } else {
      status(e.message, true);
      setState("error", { error: e.message });
    }
  } finally {
    $("speak-button").disabled = false;
    $("stop-button").disabled = true;
  }
}

function stop() {
  if (!current) return;
  current.controller.abort();  // the server cancels the request when the connection closes
  for (const s of current.sources) { try { s.stop(); } catch (e) { /* not started */ } }
  current = null;
}

// ------------------------------------------------------------------ voice upload

let recorder = null;
let recorded = null;  // a Blob from the microphone

async function toWav24k(blob) {
  // Any audio the browser can decode → 16-bit mono 24 kHz WAV (what the model hears anyway).
  const ctx = new (window.AudioContext || window.webkitAudioContext)();
  try {
    const decoded = await ctx.decodeAudioData(await blob.arrayBuffer());
    const length = Math.ceil(decoded.duration * RATE);
    const offline = new OfflineAudioContext(1, Math.max(1, length), RATE);
    const src = offline.createBufferSource();
    src.buffer = decoded;
    src.connect(offline.destination);
    src.start();
    const rendered = await offline.startRendering();
    const f = rendered.getChannelData(0);
    const pcm = new Int16Array(f.length);
    for (let i = 0; i < f.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(f[i] * 32767)));
    return wavBlob([pcm]);
  } finally {
    ctx.close();
  }
}

async function record() {
  const button = $("record-button");
  if (recorder && recorder.state === "recording") { recorder.stop(); return; }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    status(`No microphone: ${e.message}`, true, $("voice-status"));
    return;
  }
  const parts = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => { if (e.data.size) parts.push(e.data); };
  recorder.onstop = () => {
    stream.getTracks().forEach((t) => t.stop());
    recorded = new Blob(parts, { type: recorder.mimeType });
    const preview = $("recording");
    preview.src = URL.createObjectURL(recorded);
    preview.classList.remove("hidden");
    button.textContent = "Record again";
    status("Recorded. Type its transcript, then add the voice.", false, $("voice-status"));
  };
  recorder.start();
  button.textContent = "Stop recording";
  status("Recording... say the transcript, then stop.", false, $("voice-status"));
}

async function upload() {
  const file = $("voice-file").files[0];
  const source = file || recorded;
  const vs = $("voice-status");
  if (!source) { status("Choose an audio file or record one first.", true, vs); return; }
  let blob = source, filename = file ? file.name : "recording.wav";
  try {
    blob = await toWav24k(source);
    filename = filename.replace(/\.[^.]*$/, "") + ".wav";
  } catch (e) {
    // The browser cannot decode it: send it as it is, the server will say what it makes of it.
  }
  const form = new FormData();
  form.append("name", $("voice-name").value.trim());
  form.append("transcript", $("voice-transcript").value.trim());
  form.append("speaker", $("voice-speaker").value.trim() || "0");
  form.append("audio_sample", blob, filename);
  status("Uploading and encoding...", false, vs);
  const r = await fetch("/v1/audio/voices", { method: "POST", headers: headers(), body: form });
  if (!r.ok) { status(await errorMessage(r), true, vs); return; }
  const voice = await r.json();
  status(`Added voice ${voice.name}.`, false, vs);
  await loadVoices();
  $("voice").value = voice.id;
}

// ------------------------------------------------------------------ wiring

function init() {
  $("api-key").value = localStorage.getItem("jaxtts-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("jaxtts-api-key", $("api-key").value);
    loadModel();
    loadVoices();
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      const line = document.querySelector('input[name="mode"]:checked').value === "line";
      $("line-mode").classList.toggle("hidden", !line);
      $("conversation-mode").classList.toggle("hidden", line);
    });
  }
  $("speak-button").addEventListener("click", speak);
  $("stop-button").addEventListener("click", () => { stop(); });
  $("record-button").addEventListener("click", record);
  $("upload-button").addEventListener("click", upload);
  if (!window.MediaRecorder || !navigator.mediaDevices) $("record-button").disabled = true;
  setState("idle");
  loadModel();
  loadVoices();
}

init();
