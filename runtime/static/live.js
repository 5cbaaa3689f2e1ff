// dmf live page: microphone -> AudioWorklet (16 kHz int16) -> WebSocket /v1/stream -> a timeline of
// utterances and their emotions. Texts come from a `?transcript=` query (a JSON array of strings, one
// per utterance in order: sent when the utterance starts; the page stops after that many), from the
// browser's speech recognition where it exists, or typed into the utterance's row.
// `window.dmfLive` holds every event received and the close code (what the browser test reads).
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// ?record=1 keeps every PCM block sent, so a test can score the very samples the server got
const live = (window.dmfLive = { events: [], closed: null, running: false, rate: null,
                                  sent: params.has("record") ? [] : null }); // rate: the capture's
live.recording = () => { // base64 of the int16 PCM sent so far (only with ?record=1)
  const bytes = new Uint8Array(live.sent.reduce((n, b) => n + b.byteLength, 0));
  let at = 0;
  for (const b of live.sent) { bytes.set(new Uint8Array(b), at); at += b.byteLength; }
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
};
const transcript = readTranscript(params.get("transcript"));
let ws = null, audio = null, recognizer = null, labels = [];
const rows = new Map(); // utterance id -> {li, textSent}

function readTranscript(value) {
  if (value === null) return null;
  try {
    const texts = JSON.parse(value);
    if (Array.isArray(texts) && texts.every((t) => typeof t === "string")) return texts;
  } catch (e) { /* reported below */ }
  status("?transcript= must be a JSON array of strings; ignored", true);
  return null;
}

function status(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

// ------------------------------------------------------------------------------------ audio in

async function startAudio(onBlock) {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  let ctx, source;
  try { // a 16 kHz context: the browser resamples the microphone (?native_rate=1: not asked, for tests)
    if (params.has("native_rate")) throw new Error("the device's rate was asked for");
    ctx = new AudioContext({ sampleRate: 16000 });
    source = ctx.createMediaStreamSource(stream); // Firefox refuses a rate other than the device's
  } catch (e) { // the device's rate: the worklet downsamples instead
    if (ctx) ctx.close();
    ctx = new AudioContext();
    source = ctx.createMediaStreamSource(stream);
  }
  await ctx.audioWorklet.addModule("/live/pcm-worklet.js");
  const node = new AudioWorkletNode(ctx, "pcm-processor");
  const mute = ctx.createGain();
  mute.gain.value = 0; // pulled by the destination so the graph runs, but silent
  source.connect(node).connect(mute).connect(ctx.destination);
  node.port.onmessage = (e) => onBlock(e.data);
  await ctx.resume();
  return {
    rate: ctx.sampleRate,
    stop() {
      node.port.postMessage("stop");
      stream.getTracks().forEach((t) => t.stop());
      ctx.close();
    },
  };
}

// ------------------------------------------------------------------------------- the stream

function start() {
  $("start").disabled = true;
  $("stop").disabled = false;
  rows.clear();
  $("timeline").replaceChildren();
  const wait = transcript ? 0 : Math.max(0, Number($("wait").value) || 0);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${scheme}://${location.host}/v1/stream`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => ws.send(JSON.stringify({
    type: "start", format: { sample_rate: 16000, channels: 1, sample_format: "int16" }, options: { text_wait_s: wait },
  }));
  ws.onmessage = (e) => onEvent(JSON.parse(e.data));
  ws.onclose = (e) => {
    live.closed = { code: e.code, reason: e.reason };
    if (e.code !== 1000) status(`stream closed: ${e.code} ${e.reason || ""}`, true);
    else if (!live.events.some((ev) => ev.type === "error")) status("stream closed");
    halt();
  };
}

async function onReady(ready) {
  labels = ready.labels;
  $("legend").replaceChildren(...labels.map((name) => { // the colours of the probability bars
    const chip = document.createElement("span");
    chip.className = `c-${name}`;
    chip.textContent = name;
    return chip;
  }));
  try {
    audio = await startAudio((block) => {
      if (!ws || ws.readyState !== WebSocket.OPEN) return;
      if (live.sent) live.sent.push(block.slice(0));
      ws.send(block);
    });
  } catch (e) {
    status(`microphone: ${e.message || e}`, true);
    ws.close(1000, "no microphone");
    return;
  }
  live.running = true;
  live.rate = audio.rate;
  status(`listening (${audio.rate} Hz capture, sent as 16 kHz int16)`);
  if (!transcript && $("recognition").checked) startRecognition();
}

function onEvent(ev) {
  live.events.push(ev);
  if (ev.type === "ready") return onReady(ev);
  if (ev.type === "speech_started") {
    row(ev.utterance_id, ev.start_s);
    if (transcript && ev.utterance_id < transcript.length) sendText(ev.utterance_id, transcript[ev.utterance_id]);
  } else if (ev.type === "utterance") {
    showUtterance(ev);
    const done = live.events.filter((e) => e.type === "utterance").length;
    if (transcript && done >= transcript.length) stop(false); // the transcript's utterances are all in
  } else if (ev.type === "error") {
    if (ev.utterance_id !== undefined && rows.has(ev.utterance_id)) {
      rows.get(ev.utterance_id).li.querySelector(".error").textContent = ev.message;
    } else status(`server: ${ev.message}`, true);
  }
}

function sendText(id, text) {
  if (!ws || ws.readyState !== WebSocket.OPEN || !text.trim()) return;
  ws.send(JSON.stringify({ type: "text", utterance_id: id, text }));
  const r = rows.get(id);
  if (r) { r.textSent = true; r.li.querySelector(".text input").value = text; }
}

// `sendEnd`: the server scores an utterance still open and everything waiting for text, then
// closes; without it the stream is dropped at once (the page's own stop after a transcript).
function stop(sendEnd = true) {
  if (!ws) return;
  halt();
  if (ws.readyState === WebSocket.OPEN) {
    if (sendEnd) ws.send(JSON.stringify({ type: "end" }));
    else ws.close(1000, "page stopped");
  }
}

function halt() {
  live.running = false;
  if (audio) { audio.stop(); audio = null; }
  if (recognizer) { const r = recognizer; recognizer = null; r.stop(); }
  $("start").disabled = false;
  $("stop").disabled = true;
}

// ----------------------------------------------------------------------------------- timeline

function row(id, startS) {
  if (rows.has(id)) return rows.get(id);
  const li = document.createElement("li");
  li.className = "utt speaking";
  li.dataset.id = id;
  li.innerHTML = `<span class="id">#${id}</span><span class="times"></span><span class="label">…</span>
    <div><div class="text"><input placeholder="type the text, Enter sends it"></div><div class="bars"></div>
    <div class="error"></div></div>`;
  li.querySelector(".times").textContent = `${startS.toFixed(2)} s`;
  const input = li.querySelector(".text input");
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") sendText(id, input.value); });
  $("timeline").prepend(li);
  const r = { li, textSent: false };
  rows.set(id, r);
  return r;
}

function showUtterance(ev) {
  const { li } = row(ev.utterance_id, ev.start_s);
  li.className = "utt";
  li.dataset.start = ev.start_s;
  li.dataset.end = ev.end_s;
  li.querySelector(".times").textContent = `${ev.start_s.toFixed(2)}–${ev.end_s.toFixed(2)} s${ev.cut ? " (cut)" : ""}`;
  const label = li.querySelector(".label");
  label.textContent = ev.label || "—";
  label.className = `label ${ev.label ? `c-${ev.label}` : ""}`;
  if (ev.label) li.dataset.label = ev.label;
  const input = li.querySelector(".text input");
  input.value = ev.text || "";
  input.disabled = true; // scored: a later text would be refused as an unknown utterance
  const bars = li.querySelector(".bars");
  bars.replaceChildren();
  for (const name of labels) {
    const p = (ev.probabilities || {})[name] || 0;
    const span = document.createElement("span");
    span.className = `c-${name}`;
    span.style.width = `${(100 * p).toFixed(1)}%`;
    span.title = `${name} ${(100 * p).toFixed(0)} %`;
    bars.append(span);
  }
  if (ev.error) li.querySelector(".error").textContent = ev.error;
}

// ------------------------------------------------------------------------- speech recognition

function startRecognition() {
  const Recognition = window.SpeechRecognition || window.webkitSpeechRecognition;
  if (!Recognition) { status("listening; this browser has no speech recognition: type each text in its row"); return; }
  recognizer = new Recognition();
  recognizer.continuous = true;
  recognizer.interimResults = false;
  recognizer.lang = navigator.language || "en-US";
  recognizer.onresult = (e) => {
    for (let i = e.resultIndex; i < e.results.length; i++) {
      if (!e.results[i].isFinal) continue;
      // the newest utterance still without text (open, or closed and waiting for it)
      const waiting = [...rows.entries()].filter(([, r]) => !r.textSent && !r.li.dataset.label);
      if (waiting.length) sendText(waiting[waiting.length - 1][0], e.results[i][0].transcript);
    }
  };
  recognizer.onerror = (e) => { // no service (offline, headless) or no permission: typing still works
    status(`speech recognition: ${e.error}; type the texts instead`, true);
    recognizer = null;
  };
  recognizer.onend = () => { if (recognizer && live.running) recognizer.start(); };
  recognizer.start();
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => stop(true));
if (transcript) $("recognition").checked = false;
