// The rtns page: microphone -> AudioWorklet (the context's rate) -> WebSocket (/ws, binary
// float32 PCM after a JSON hello; docs/protocol.md) -> enhanced PCM -> a player worklet.
// Levels and spectrograms come from AnalyserNodes on the microphone and on the player.
// `?record=S` keeps the first S seconds sent and received for window.rtnsPage.recorded().
"use strict";

const $ = (id) => document.getElementById(id);
const CHUNK_S = 0.02;        // 20 ms per WebSocket message
const PREFILL_S = 0.06;      // playback starts with this much queued
const MAX_QUEUE_S = 0.15;    // more queued than this is cut back to PREFILL_S
const MAX_BUFFERED = 1 << 16; // bytes the WebSocket may hold unsent before chunks are dropped
const LIMIT_OFF = 61;         // the slider's last step

const params = new URLSearchParams(location.search);
const recordSeconds = Number(params.get("record") || 0);

const page = {
  state: "idle", ready: null, control: null, errors: [], sentDropped: 0,
  framesSent: 0, framesReceived: 0, fileResult: null,
  rec: {input: [], output: [], inN: 0, outN: 0, limit: 0},
};
window.rtnsPage = page;
let live = null;

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", !!isError);
}

function limitValue() {
  const v = Number($("limit").value);
  return v >= LIMIT_OFF ? "off" : v;
}

function showLimit(db) {
  $("limit").value = db === null ? LIMIT_OFF : Math.min(Math.round(db), LIMIT_OFF - 1);
  $("limit-text").textContent = db === null ? "off" : `${Math.round(db)} dB`;
}

function keep(which, arr) {
  const r = page.rec;
  const key = which === "input" ? "inN" : "outN";
  if (r[key] >= r.limit) return;
  const part = arr.slice(0, r.limit - r[key]);
  r[which].push(part);
  r[key] += part.length;
}

function toBase64(chunks) {
  let n = 0;
  for (const c of chunks) n += c.length;
  const all = new Float32Array(n);
  let at = 0;
  for (const c of chunks) { all.set(c, at); at += c.length; }
  const bytes = new Uint8Array(all.buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

page.recorded = () => ({
  rate: live ? live.ctx.sampleRate : 0,
  input: toBase64(page.rec.input),
  output: toBase64(page.rec.output),
});

const statsWaiting = [];
page.playerStats = () => new Promise((resolve) => {
  if (!live) { resolve(null); return; }
  statsWaiting.push(resolve);
  live.player.port.postMessage("stats");
});

async function start() {
  $("start").disabled = true;
  setStatus("Asking for the microphone...");
  const media = await navigator.mediaDevices.getUserMedia({
    audio: {echoCancellation: false, noiseSuppression: false, autoGainControl: false},
  });
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule("/static/worklet.js");
  const rate = ctx.sampleRate;
  page.rec.limit = Math.round(recordSeconds * rate);
  const src = ctx.createMediaStreamSource(media);
  const capture = new AudioWorkletNode(ctx, "rtns-capture", {
    numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
    channelCount: 1, channelCountMode: "explicit", channelInterpretation: "speakers",
    processorOptions: {chunk: Math.round(rate * CHUNK_S)},
  });
  const player = new AudioWorkletNode(ctx, "rtns-player", {
    numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
    processorOptions: {
      capacity: Math.round(rate), prefill: Math.round(rate * PREFILL_S),
      maxQueue: Math.round(rate * MAX_QUEUE_S),
    },
  });
  const mute = ctx.createGain();
  mute.gain.value = 0;
  src.connect(capture).connect(mute).connect(ctx.destination); // keeps the capture pulled
  const inAn = ctx.createAnalyser();
  const outAn = ctx.createAnalyser();
  for (const an of [inAn, outAn]) { an.fftSize = 1024; an.smoothingTimeConstant = 0; }
  src.connect(inAn);
  player.connect(outAn);
  player.connect(ctx.destination);
  player.port.onmessage = (e) => { while (statsWaiting.length) statsWaiting.shift()(e.data); };
  live = {ctx, media, capture, player, inAn, outAn, ws: null, timer: null};
  connect(rate);
  live.timer = setInterval(draw, 30);
  live.statsTimer = setInterval(showPlayback, 1000);
  $("start").textContent = "Stop";
  $("start").classList.add("stop");
  $("start").disabled = false;
}

function connect(rate) {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  live.ws = ws;
  ws.onopen = () => {
    const limit = limitValue();
    ws.send(JSON.stringify({
      type: "hello", version: 1, sample_rate: rate, channels: 1, format: "f32le",
      atten_lim_db: limit === "off" && !page.touchedLimit ? null : limit,
      bypass: $("bypass").checked,
    }));
  };
  ws.onmessage = (e) => {
    if (typeof e.data === "string") { onText(JSON.parse(e.data)); return; }
    const y = new Float32Array(e.data);
    page.framesReceived += y.length;
    keep("output", y);
    if (y.length) live.player.port.postMessage(y, [y.buffer]);
  };
  ws.onclose = (e) => {
    page.state = "closed";
    if (live && live.ws === ws) setStatus(`Connection closed (${e.code} ${e.reason || ""}).`, e.code !== 1000);
  };
  live.capture.port.onmessage = (e) => {
    if (page.state !== "ready" || ws.readyState !== WebSocket.OPEN) return;
    if (ws.bufferedAmount > MAX_BUFFERED) { page.sentDropped += e.data.length; return; }
    keep("input", e.data);
    page.framesSent += e.data.length;
    ws.send(e.data.buffer);
  };
}

function onText(msg) {
  if (msg.type === "ready") {
    page.ready = msg;
    page.state = "ready";
    showLimit(msg.atten_lim_db);
    $("bypass").checked = msg.bypass;
    const ms = (1000 * msg.latency / msg.sample_rate).toFixed(1);
    setStatus(`Live: ${msg.model} (${msg.backend}), ${msg.sample_rate} Hz, model latency ${ms} ms, session ${msg.session}.`);
  } else if (msg.type === "control") {
    page.control = msg;
    showLimit(msg.atten_lim_db);
    $("bypass").checked = msg.bypass;
  } else if (msg.type === "error") {
    page.errors.push(msg);
    setStatus(`Server: ${msg.message} (${msg.code})`, true);
  } else if (msg.type === "closed") {
    page.state = "closed";
  }
}

function stop() {
  if (!live) return;
  clearInterval(live.timer);
  clearInterval(live.statsTimer);
  if (live.ws.readyState === WebSocket.OPEN) live.ws.send(JSON.stringify({type: "close"}));
  live.media.getTracks().forEach((t) => t.stop());
  live.ctx.close();
  live = null;
  page.state = "idle";
  setStatus("Stopped.");
  $("start").textContent = "Start microphone";
  $("start").classList.remove("stop");
}

function sendControl(fields) {
  if (live && live.ws.readyState === WebSocket.OPEN && page.state === "ready") {
    live.ws.send(JSON.stringify({type: "control", ...fields}));
  }
}

async function showPlayback() {
  const st = await page.playerStats();
  if (!st || !live) return;
  const ms = (n) => (1000 * n / live.ctx.sampleRate).toFixed(0);
  $("playback").textContent = `Playback: ${ms(st.queued)} ms queued, ${st.underruns} under-runs, ` +
    `${ms(st.dropped)} ms dropped; ${ms(page.sentDropped)} ms of microphone not sent (connection behind).`;
}

// -- levels and spectrograms ----------------------------------------------------------------
function level(an, bar, text) {
  const buf = new Float32Array(an.fftSize);
  an.getFloatTimeDomainData(buf);
  let s = 0;
  for (const v of buf) s += v * v;
  const db = 10 * Math.log10(s / buf.length + 1e-12) + 3.01; // dBFS of a full-scale sine = 0
  $(bar).style.width = `${Math.max(0, Math.min(100, (db + 80) / 80 * 100))}%`;
  $(text).textContent = db < -100 ? "-∞ dBFS" : `${db.toFixed(1)} dBFS`;
}

function column(an, canvasId) {
  const canvas = $(canvasId);
  const g = canvas.getContext("2d");
  const bins = new Uint8Array(an.frequencyBinCount);
  an.getByteFrequencyData(bins);
  const h = canvas.height;
  const nyquist = an.context.sampleRate / 2;
  g.drawImage(canvas, -2, 0);
  for (let y = 0; y < h; y++) {
    // Log frequency, 50 Hz at the bottom to Nyquist at the top.
    const f = 50 * Math.pow(nyquist / 50, (h - 1 - y) / (h - 1));
    const v = bins[Math.min(bins.length - 1, Math.round(f / nyquist * bins.length))];
    const r = Math.min(255, v * 1.6), gg = Math.max(0, v * 1.2 - 100), b = v < 128 ? v : 255 - v;
    g.fillStyle = `rgb(${r | 0},${gg | 0},${(b + 40) | 0})`;
    g.fillRect(canvas.width - 2, y, 2, 1);
  }
}

function draw() {
  if (!live) return;
  level(live.inAn, "in-level", "in-db");
  level(live.outAn, "out-level", "out-db");
  column(live.inAn, "in-spec");
  column(live.outAn, "out-spec");
}

// -- files ------------------------------------------------------------------------------------
async function enhanceFile(file) {
  const st = $("file-status");
  st.classList.remove("error");
  st.textContent = `Enhancing ${file.name}...`;
  const res = await fetch(`/api/enhance?name=${encodeURIComponent(file.name)}`, {method: "POST", body: file});
  const out = await res.json();
  if (!res.ok) {
    st.textContent = out.error;
    st.classList.add("error");
    page.fileResult = out;
    return;
  }
  const wav = `data:audio/wav;base64,${out.wav}`;
  $("file-audio").src = wav;
  $("file-download").href = wav;
  $("file-download").download = out.name.replace(/\.[^.]*$/, "") + "-enhanced.wav";
  $("file-plot").hidden = !out.png;
  if (out.png) $("file-plot").src = `data:image/png;base64,${out.png}`;
  $("file-result").hidden = false;
  st.textContent = `${out.name}: ${out.duration} s, ${out.sample_rate} Hz, ${out.channels} ch, enhanced by ${out.model}.` + (out.note ? ` ${out.note}` : "");
  page.fileResult = {name: out.name, duration: out.duration, png: !!out.png};
}

function wire() {
  $("start").onclick = () => (live ? stop() : start().catch((e) => {
    setStatus(`Cannot start: ${e.message || e}`, true);
    $("start").disabled = false;
  }));
  $("bypass").onchange = () => sendControl({bypass: $("bypass").checked});
  $("limit").oninput = () => {
    page.touchedLimit = true;
    const v = limitValue();
    $("limit-text").textContent = v === "off" ? "off" : `${v} dB`;
  };
  $("limit").onchange = () => sendControl({atten_lim_db: limitValue()});
  const drop = $("drop");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) enhanceFile(e.dataTransfer.files[0]);
  };
  $("file-input").onchange = (e) => { if (e.target.files.length) enhanceFile(e.target.files[0]); };
  fetch("/api/info").then((r) => r.json()).then((info) => {
    $("info").textContent = `rtns web: model ${info.model} (${info.backend}); WebSocket protocol v${info.version} at /ws (docs/protocol.md).`;
  });
}

wire();
