// REST live page: the microphone (or a file played in as if live) goes to the server in small PCM pieces,
// frames come back tagged with the audio sample they belong to. Everything is timed on the AudioContext's
// sample clock: sample s entered the page at t0 + s/rate, is played back at t0 + delay + s/rate, and its
// frame is shown when that moment is heard. Sync is by sample counts, so it cannot drift.
"use strict";

const $ = (id) => document.getElementById(id);
const HEADER = 16; // "REST", frame index uint32, sample position uint64 (little-endian)
const PIECE_SECONDS = 0.02;
const TRANSPORT_S = 0.05; // WebSocket both ways, JPEG decode, one display refresh
const UNKNOWN_COMPUTE_S = 0.2; // a chunk's compute when the server did not measure it
const LATE_MARGIN_S = 0.04; // a late frame raises the playout delay by its lateness plus this
// the delay shrinks back to what the recent frames needed (plus LATE_MARGIN_S) only in a pause of the voice,
// where the few ms of played-back sound it skips are silence; at most once a second, after 2 s of frames
const QUIET_RMS = 0.003, QUIET_S = 0.2, SHRINK_EVERY_S = 1, SHRINK_MIN_S = 0.02, NEED_FRAMES = 250;
const RING = 250;

const live = (window.restLive = { state: "idle", figures: {}, log: [], onshow: null, portrait: "bundled" });
let S = null; // the running session

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function ring(arr, v, n = RING) {
  arr.push(v);
  if (arr.length > n) arr.shift();
}

function quantile(arr, q) {
  if (!arr.length) return null;
  const s = [...arr].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
}

function wsUrl() {
  const u = new URL("ws", location.href);
  u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return u.href;
}

// the context time being heard now: output timestamp when the browser gives one, else the graph clock
// minus the output latency
function heardNow(ctx) {
  const ts = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
  if (ts && ts.contextTime > 0 && ts.performanceTime > 0) {
    return ts.contextTime + (performance.now() - ts.performanceTime) / 1000;
  }
  return ctx.currentTime - (ctx.outputLatency || ctx.baseLatency || 0);
}

// the playout delay each sample was scheduled with (it grows when frames come late, shrinks in pauses)
function delayAt(sample) {
  let d = S.delays[0].d;
  for (const seg of S.delays) if (seg.from <= sample) d = seg.d; else break;
  return d;
}

$("portraitFile").onchange = () => {
  const f = $("portraitFile").files[0];
  if (!f) return;
  const r = new FileReader();
  r.onload = () => { live.portrait = r.result; $("portraitPreview").src = r.result; };
  r.readAsDataURL(f);
};
$("portraitBundled").onclick = () => {
  live.portrait = "bundled";
  $("portraitPreview").src = "portrait.png";
  $("portraitFile").value = "";
};
$("start").onclick = () => start().catch((e) => { status(String(e.message || e), true); teardown(); });
$("stop").onclick = () => stop();

async function start() {
  const source = document.querySelector("input[name=source]:checked").value;
  const file = $("audioFile").files[0];
  if (source === "file" && !file) throw new Error("choose an audio file first");
  if (source === "mic" && !(navigator.mediaDevices && navigator.mediaDevices.getUserMedia)) {
    throw new Error("this browser gives no microphone here: open the page as http://127.0.0.1 or over https (docs/live.md)");
  }
  $("start").disabled = true;
  status("starting...");
  const ctx = new AudioContext({ latencyHint: "interactive" });
  await ctx.resume();
  await ctx.audioWorklet.addModule("capture-worklet.js");
  let input, mediaStream = null;
  if (source === "mic") {
    mediaStream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 } });
    input = ctx.createMediaStreamSource(mediaStream);
  } else {
    input = ctx.createBufferSource();
    input.buffer = await ctx.decodeAudioData(await file.arrayBuffer());
  }
  const ws = new WebSocket(wsUrl());
  ws.binaryType = "arraybuffer";
  S = { ctx, ws, input, mediaStream, source, rate: ctx.sampleRate, t0: null, pos: 0, delays: [], delay: 0,
        needs: [], quietFrom: null, lastShrink: 0, shrinks: 0, playedUntil: 0,
        frames: [], shown: null, arrival: [], offsets: [], offsetSum: 0, offsetCount: 0, offsetMax: 0,
        shownAt: [], late: 0, received: 0, server: {}, rms: new Map(), stopping: false, ended: false,
        canvas: $("screen").getContext("2d") };
  live.state = "connecting";
  ws.onopen = () => ws.send(JSON.stringify({
    type: "start", sample_rate: S.rate, seed: Number($("seed").value) || 0, pcm: "f32", format: "jpeg",
    portrait: live.portrait, record: $("record").checked }));
  ws.onmessage = (e) => (typeof e.data === "string" ? onMessage(JSON.parse(e.data)) : onFrame(e.data));
  ws.onclose = () => { if (S && !S.ended) { status("the connection closed", true); teardown(); } };
  requestAnimationFrame(render);
}

function onMessage(msg) {
  if (msg.type === "ready") return onReady(msg);
  if (msg.type === "stats") { S.server = msg; return; }
  if (msg.type === "error") {
    status(`server: ${msg.message}`, true);
    S.ended = true;
    live.state = "error";
    live.error = msg;
    return teardown();
  }
  if (msg.type === "end") {
    S.server = msg;
    S.ended = true;
    status(`ended: ${msg.frames_made} frames made, ${msg.frames_dropped} dropped` +
           (msg.recording ? `, recorded to ${msg.recording}` : ""));
    live.state = "ended";
    $("stop").disabled = true;
    S.ws.close();
    setTimeout(teardown, 1000 * (delayAt(S.pos) + 0.5)); // let the last frames and sound play out
  }
}

function onReady(msg) {
  $("screen").width = $("screen").height = msg.resolution;
  S.fps = msg.fps;
  S.spf = S.rate / msg.fps;
  // the first frame of a chunk waits for the chunk's audio and the look-ahead, one audio piece, the server's
  // compute (measured there when the models loaded) and the transport
  S.delay = (msg.chunk_video_frames + msg.lookahead_video_frames) / msg.fps + PIECE_SECONDS +
            (msg.compute_s_per_chunk ?? UNKNOWN_COMPUTE_S) + TRANSPORT_S;
  S.delays = [{ from: 0, d: S.delay }];
  const node = new AudioWorkletNode(S.ctx, "rest-capture", {
    numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
    processorOptions: { pieceFrames: Math.round(S.rate * PIECE_SECONDS) } });
  const mute = S.ctx.createGain();
  mute.gain.value = 0; // the worklet is pulled by the graph; what it captures is played by onPiece, delayed
  S.input.connect(node);
  node.connect(mute).connect(S.ctx.destination);
  node.port.onmessage = (e) => onPiece(e.data.first, e.data.samples);
  S.node = node;
  if (S.source === "file") S.input.start();
  live.state = "running";
  $("stop").disabled = false;
  status(`live: ${msg.resolution}x${msg.resolution} at ${msg.fps} fps, audio at ${S.rate} Hz`);
}

function onPiece(first, samples) {
  if (S.stopping || !S.ws || S.ws.readyState !== WebSocket.OPEN) return;
  if (S.t0 === null) S.t0 = first / S.rate; // the context time of sample 0
  const pos = S.pos;
  S.pos += samples.length;
  S.ws.send(samples.buffer.slice(0));
  let energy = 0; // of the piece (a pause?), and per video frame (shown in the log)
  for (let i = 0; i < samples.length; i++) {
    const f = Math.floor((pos + i) / S.spf), e = samples[i] * samples[i];
    energy += e;
    S.rms.set(f, (S.rms.get(f) || 0) + e);
  }
  if (S.rms.size > 2 * RING) S.rms.delete(S.rms.keys().next().value);
  shrinkInSilence(pos, Math.sqrt(energy / samples.length));
  if (S.delay !== S.delays[S.delays.length - 1].d) S.delays.push({ from: pos, d: S.delay });
  if ($("playback").checked) {
    // after a shrink this piece's slot overlaps what is already scheduled: skip that much (silence)
    const at = S.t0 + S.delay + pos / S.rate;
    const skip = Math.max(0, Math.ceil((S.playedUntil - at) * S.rate - 1e-6));
    if (skip < samples.length && at + skip / S.rate > S.ctx.currentTime) {
      const buf = S.ctx.createBuffer(1, samples.length - skip, S.rate);
      buf.copyToChannel(samples.subarray(skip), 0);
      const src = S.ctx.createBufferSource();
      src.buffer = buf;
      src.connect(S.ctx.destination);
      src.start(at + skip / S.rate);
    }
    S.playedUntil = Math.max(S.playedUntil, at + samples.length / S.rate);
  }
}

// a delay raised by late frames (a slow start, a hiccup) is not kept for the rest of the session: in a pause
// of the voice it comes back to what the last NEED_FRAMES frames needed to be on time, plus LATE_MARGIN_S
function shrinkInSilence(pos, rms) {
  if (rms >= QUIET_RMS) { S.quietFrom = null; return; }
  if (S.quietFrom === null) S.quietFrom = pos;
  const now = S.ctx.currentTime;
  if ((pos - S.quietFrom) / S.rate < QUIET_S || S.needs.length < NEED_FRAMES / 5 || now - S.lastShrink < SHRINK_EVERY_S) return;
  const target = Math.max(...S.needs) + LATE_MARGIN_S;
  if (S.delay - target < SHRINK_MIN_S) return;
  S.delay = target;
  S.lastShrink = now;
  S.shrinks++;
}

function onFrame(data) {
  const dv = new DataView(data);
  if (String.fromCharCode(dv.getUint8(0), dv.getUint8(1), dv.getUint8(2), dv.getUint8(3)) !== "REST") return;
  const index = dv.getUint32(4, true), sample = Number(dv.getBigUint64(8, true));
  S.received++;
  const now = S.ctx.currentTime;
  ring(S.arrival, now - (S.t0 + (sample + S.spf) / S.rate)); // after the frame's own audio was complete
  const at = S.t0 + delayAt(sample) + sample / S.rate; // when its audio is heard
  const heard = heardNow(S.ctx);
  ring(S.needs, heard - (S.t0 + sample / S.rate), NEED_FRAMES); // the delay it needed to be on time
  const lateness = heard + LATE_MARGIN_S - at;
  if (lateness > 0) { // too late for its moment: later samples get more delay (a short gap in the sound)
    S.late++;
    S.delay = Math.min(S.delay + lateness + LATE_MARGIN_S, 5);
  }
  const entry = { index, sample, at, late: lateness > 0, bitmap: null };
  S.frames.push(entry);
  if (S.frames.length > 2 * RING) { // never shown (a stalled output clock): keep memory bounded
    const old = S.frames.shift();
    if (old.bitmap && old.bitmap !== "bad") old.bitmap.close();
  }
  createImageBitmap(new Blob([new Uint8Array(data, HEADER)], { type: "image/jpeg" }))
    .then((bmp) => { entry.bitmap = bmp; }, () => { entry.bitmap = "bad"; });
}

function render() {
  if (!S) return;
  const heard = heardNow(S.ctx);
  let pick = null;
  while (S.frames.length && S.frames[0].at <= heard && S.frames[0].bitmap) {
    const f = S.frames.shift();
    if (pick && pick.bitmap !== "bad") pick.bitmap.close();
    pick = f;
  }
  if (pick && pick.bitmap !== "bad") {
    S.canvas.drawImage(pick.bitmap, 0, 0); // at the model's size: the page's CSS scales it up (no canvas resample)
    pick.bitmap.close();
    while (S.delays.length > 1 && S.delays[1].from <= pick.sample) S.delays.shift(); // behind us now
    const offset = heard - pick.at; // shown this long after its sound is heard
    ring(S.offsets, offset);
    S.offsetSum += offset; S.offsetCount++;
    S.offsetMax = Math.max(S.offsetMax, Math.abs(offset));
    ring(S.shownAt, heard, 50);
    const e2 = S.rms.get(pick.index);
    const entry = { index: pick.index, sample: pick.sample, offset, heard, late: pick.late,
                    entered: S.t0 + pick.sample / S.rate, delay: delayAt(pick.sample),
                    rms: e2 === undefined ? null : Math.sqrt(e2 / S.spf) };
    ring(live.log, entry, 2000);
    if (live.onshow) live.onshow(entry, $("screen"));
  }
  updateFigures();
  if (S && !S.closed) requestAnimationFrame(render);
}

let lastFigures = 0;
function updateFigures() {
  const t = performance.now();
  if (t - lastFigures < 250) return;
  lastFigures = t;
  const ms = (s) => (s === null || s === undefined ? "-" : `${Math.round(1000 * s)} ms`);
  const shownFps = S.shownAt.length > 1
    ? (S.shownAt.length - 1) / (S.shownAt[S.shownAt.length - 1] - S.shownAt[0]) : null;
  const offsetMean = S.offsets.length ? S.offsets.reduce((a, b) => a + b, 0) / S.offsets.length : null;
  const f = (live.figures = {
    latency: S.delay + (offsetMean || 0), arrivalP50: quantile(S.arrival, 0.5), arrivalP95: quantile(S.arrival, 0.95),
    fpsShown: shownFps, fpsMade: S.server.fps ?? null, offsetMean, offsetMaxRecent: S.offsets.length
      ? Math.max(...S.offsets.map(Math.abs)) : null, offsetMaxAll: S.offsetMax,
    offsetMeanAll: S.offsetCount ? S.offsetSum / S.offsetCount : null, shown: S.offsetCount,
    received: S.received, late: S.late, dropped: S.server.frames_dropped ?? 0, audioSent: S.pos / S.rate,
    delay: S.delay, shrinks: S.shrinks });
  $("latency").textContent = S.delay ? ms(f.latency) : "-";
  $("arrival").textContent = `${ms(f.arrivalP50)} (p95 ${ms(f.arrivalP95)})`;
  $("fps").textContent = `${f.fpsShown ? f.fpsShown.toFixed(1) : "-"} / ${f.fpsMade ? f.fpsMade.toFixed(1) : "-"}`;
  $("offset").textContent = `${ms(f.offsetMean)} / ${ms(f.offsetMaxRecent)}`;
  $("dropped").textContent = `${f.late} / ${f.dropped}`;
  $("sent").textContent = `${f.audioSent.toFixed(1)} s`;
}

function stop() {
  if (!S || S.stopping) return;
  S.stopping = true;
  $("stop").disabled = true;
  live.state = "stopping";
  if (S.node) S.node.port.postMessage("stop");
  try { S.input.disconnect(); } catch (e) { /* already */ }
  if (S.mediaStream) S.mediaStream.getTracks().forEach((t) => t.stop());
  if (S.ws.readyState === WebSocket.OPEN) S.ws.send(JSON.stringify({ type: "stop" }));
  status("stopping: the last frames are on their way");
}

function teardown() {
  if (!S) { $("start").disabled = false; return; }
  const s = S;
  s.closed = true;
  if (s.mediaStream) s.mediaStream.getTracks().forEach((t) => t.stop());
  try { s.input.disconnect(); } catch (e) { /* already */ }
  if (s.ws.readyState <= WebSocket.OPEN) s.ws.close();
  s.ctx.close();
  if (live.state !== "ended" && live.state !== "error") live.state = "idle";
  $("start").disabled = false;
  $("stop").disabled = true;
}
