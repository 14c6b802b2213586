"""Live mode benchmark (printed figures, not a test): one real-time session against `python -m rest_model serve`.

    python bench/live_bench.py [--seconds 60] [--threads 2] [--chunk K] [--overlap-decode] [--rate 48000] [--json out.json]

A client on this machine plays the page's part: it sends speech (the bundled speech.wav cut into
utterances of 1-3 s, each after 1.5 s of silence) in 20 ms PCM pieces paced by its own sample clock,
and timestamps every frame it gets back. A session of N seconds takes N seconds of wall time.

Figures:
- mouth-to-screen latency per speech onset: the first frame whose mouth region moves (its change beats the
  preceding silence's mean + 4 sd), from the moment the onset sample entered the client: on arrival, and
  as the page shows it (the page plays sound and frames together after a playout delay that covers
  the arrival latency, so what a user sees is that delay plus the frames the mouth takes to move; the
  page's delay rule is replayed on the session by `page_playout`);
- where a frame's time goes: waiting for the rest of its chunk's audio, the audio look-ahead, compute
  (the server's own figure: the chunk's last audio piece in -> its frames out), and the rest (transport,
  JPEG, 20 ms pieces);
- sustained fps, frames dropped, the A/V offset on the client's clock in the first and last minute (a
  frame shown later than its sound's moment is late by that much; sample positions are checked exact),
  and the server's resident memory at the start and the end.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time

import numpy as np
import torch
import torchaudio
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiohttp import ClientSession, WSMsgType  # noqa: E402

from rest_model import live, media  # noqa: E402
from rest_model.cli import DEMO_SPEECH  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIECE_S = 0.02
MOUTH = (0.31, 0.56, 0.69, 0.75)  # x0, y0, x1, y1 of the bundled portrait's mouth, fractions of the frame
SILENCE_S = 1.5
# the page's playout delay rule (rest_model/live_page/live.js), replayed by `page_playout`
PAGE_TRANSPORT_S, PAGE_LATE_MARGIN_S, PAGE_MAX_DELAY_S = 0.05, 0.04, 5.0
PAGE_QUIET_RMS, PAGE_QUIET_S, PAGE_SHRINK_EVERY_S, PAGE_SHRINK_MIN_S, PAGE_NEED_FRAMES = 0.003, 0.2, 1.0, 0.02, 250


def program(seconds: float, rate: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Utterances of 1-3 s cut from the bundled speech, each after SILENCE_S of silence -> (wave, onset samples)."""
    speech, sr = media.load_audio(DEMO_SPEECH)
    speech = torchaudio.functional.resample(speech.mean(0), sr, rate)
    env = speech.abs().unfold(0, rate // 50, rate // 50).mean(1)  # 20 ms loudness, to start cuts on voice
    voiced = (env > 0.1 * env.max()).nonzero().flatten().tolist()
    g = np.random.default_rng(seed)
    out, onsets, n = [], [], 0
    while n < seconds * rate:
        out.append(torch.zeros(int(SILENCE_S * rate)))
        n += out[-1].numel()
        start = voiced[g.integers(len(voiced))] * (rate // 50)
        seg = speech[start: start + int(g.uniform(1.0, 3.0) * rate)]
        onsets.append(n)
        out.append(seg)
        n += seg.numel()
    return torch.cat(out)[: int(seconds * rate)], [o for o in onsets if o < seconds * rate]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def mouth_crop(jpeg: bytes) -> np.ndarray:
    im = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)
    h, w = im.shape[:2]
    x0, y0, x1, y1 = MOUTH
    return im[round(y0 * h): round(y1 * h), round(x0 * w): round(x1 * w)]


async def session(url: str, wave: torch.Tensor, rate: int, pid: int):
    """Send `wave` in real time, collect every frame's arrival time and mouth change."""
    frames, stats, end, rss = [], [], None, []
    async with ClientSession() as http:
        async with http.ws_connect(url.replace("http", "ws", 1) + "ws", max_msg_size=0) as ws:
            await ws.send_str(json.dumps({"type": "start", "sample_rate": rate, "seed": 0, "format": "jpeg"}))
            ready = json.loads((await ws.receive()).data)
            assert ready["type"] == "ready", ready
            t0 = time.perf_counter()  # the client's sample clock: sample s enters at t0 + s / rate
            piece = int(PIECE_S * rate)

            async def send():
                for pos in range(0, wave.numel(), piece):
                    chunk = wave[pos: pos + piece]
                    delay = t0 + (pos + chunk.numel()) / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await ws.send_bytes(chunk.numpy().astype("<f4").tobytes())
                    if pos % (10 * rate) < piece:
                        rss.append((pos / rate, rss_mib(pid)))
                await ws.send_str(json.dumps({"type": "stop"}))
            sender = asyncio.ensure_future(send())
            prev = None
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    index, sample, body = live.decode_frame_header(msg.data)
                    now = time.perf_counter()
                    crop = mouth_crop(body)
                    change = float(np.abs(crop - prev).mean()) if prev is not None else 0.0
                    prev = crop
                    frames.append((index, sample, now - t0, change))
                elif msg.type == WSMsgType.TEXT:
                    m = json.loads(msg.data)
                    if m["type"] == "stats":
                        stats.append(m)
                    elif m["type"] in ("end", "error"):
                        end = m
                        break
                else:
                    break
            if end is not None and end["type"] == "error":
                sender.cancel()
                raise SystemExit(f"the server ended the session: {end}")
            await sender
    rss.append((wave.numel() / rate, rss_mib(pid)))
    return ready, frames, stats, end, rss


def onset_latencies(frames, onsets, rate, fps, look, shown_at):
    """Per onset: (latency on arrival, latency as the page shows it, frames the mouth took) or None."""
    by_index = {f[0]: f for f in frames}
    out = []
    for s_on in onsets:
        f_on = s_on * fps // rate
        quiet = [by_index[i][3] for i in range(f_on - int(SILENCE_S * fps) + 3, f_on - look) if i in by_index]
        if len(quiet) < 10:
            continue
        threshold = np.mean(quiet) + 4 * np.std(quiet)
        moved = next((i for i in range(f_on - look, f_on + fps) if i in by_index and by_index[i][3] > threshold), None)
        if moved is None:
            out.append(None)
            continue
        arrival = by_index[moved][2] - s_on / rate
        shown = shown_at[moved] - s_on / rate
        out.append((arrival, shown, moved - f_on))
    return out


def page_playout(frames, wave, rate, first_delay):
    """The page's playout delay rule replayed on the session: the delay starts at `first_delay`, grows by a late
    frame's lateness + margin, and in a pause of the voice shrinks back to what the last frames needed.

    -> (when each frame index is shown, its lateness (0 when on time), the delay per frame, number of shrinks);
    times on the client's clock, 0 = sample 0 entering."""
    piece = int(PIECE_S * rate)
    events = [(p / rate, 0, p) for p in range(0, wave.numel(), piece)]  # a piece is captured (its first sample)
    events += [(arrival, 1, i) for i, (index, sample, arrival, _) in enumerate(frames)]
    delay, segments, needs, quiet_from, last_shrink, shrinks = first_delay, [(0, first_delay)], [], None, -1e9, 0
    shown, late, delays = {}, [], []

    def delay_at(sample):
        return next(d for s, d in reversed(segments) if s <= sample)
    for t, kind, x in sorted(events):
        if kind == 0:  # live.js onPiece -> shrinkInSilence
            if float(wave[x: x + piece].pow(2).mean().sqrt()) >= PAGE_QUIET_RMS:
                quiet_from = None
            else:
                quiet_from = x if quiet_from is None else quiet_from
                if ((x - quiet_from) / rate >= PAGE_QUIET_S and len(needs) >= PAGE_NEED_FRAMES // 5
                        and t - last_shrink >= PAGE_SHRINK_EVERY_S):
                    target = max(needs[-PAGE_NEED_FRAMES:]) + PAGE_LATE_MARGIN_S
                    if delay - target >= PAGE_SHRINK_MIN_S:
                        delay, last_shrink, shrinks = target, t, shrinks + 1
            if delay != segments[-1][1]:
                segments.append((x, delay))
        else:  # live.js onFrame
            index, sample, arrival, _ = frames[x]
            needs.append(arrival - sample / rate)
            slot = delay_at(sample) + sample / rate
            lateness = arrival + PAGE_LATE_MARGIN_S - slot
            late.append(max(0.0, arrival - slot))
            shown[index] = max(slot, arrival)
            delays.append(delay_at(sample))
            if lateness > 0:
                delay = min(delay + lateness + PAGE_LATE_MARGIN_S, PAGE_MAX_DELAY_S)
    return shown, late, delays, shrinks


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="session length (real time; at least 60)")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--chunk", type=int, help="latent frames per chunk (default: the model's)")
    ap.add_argument("--overlap-decode", action="store_true", help="the server decodes on a second thread")
    ap.add_argument("--rate", type=int, default=48000, help="the client's sample rate (a browser's is 48000)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    with serve(args, max_audio_ahead=args.seconds + 30) as (server, url):
        wave, onsets = program(args.seconds, args.rate)
        rss_start = rss_mib(server.pid)
        ready, frames, stats, end, rss = asyncio.run(session(url, wave, args.rate, server.pid))
    fps, rate = ready["fps"], args.rate
    chunk_v, look = ready["chunk_video_frames"], ready["lookahead_video_frames"]
    start_delay = (chunk_v + look) / fps + PIECE_S + (ready.get("compute_s_per_chunk") or 0.2) + PAGE_TRANSPORT_S
    n = len(frames)
    assert end is not None and end["type"] == "end", end
    exact = all(s == i * rate // fps for i, s, _, _ in frames)
    # arrival after the frame's own audio was complete at the client
    after_own = [a - (s + rate / fps) / rate for _, s, a, _ in frames]
    shown_at, late, delays, shrinks = page_playout(frames, wave, rate, start_delay)
    lat = onset_latencies(frames, onsets, rate, fps, look, shown_at)
    found = [x for x in lat if x is not None]
    compute = [m["chunk_latency_ms"] / 1000 for m in stats if m.get("chunk_latency_ms")]  # on the frames' path
    minute = min(60.0, args.seconds / 2)
    first_min = [lt for (_, _, a, _), lt in zip(frames, late) if a < minute]
    last_min = [lt for (_, _, a, _), lt in zip(frames, late) if a > frames[-1][2] - minute]
    span = frames[-1][2] - frames[0][2]
    chunk_wait = (chunk_v - 1) / 2 / fps  # mean over the frames of a chunk: the rest of the chunk's audio
    figures = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.1f} at the end",
        "torch_threads": args.threads, "overlap_decode": args.overlap_decode, "seconds": args.seconds, "client_rate": rate,
        "chunk_video_frames": chunk_v, "lookahead_video_frames": look,
        "frames_received": n, "frames_made": end["frames_made"], "frames_dropped": end["frames_dropped"],
        "sustained_fps": (n - 1) / span, "sample_positions_exact": exact,
        "onsets": len(lat), "onsets_with_mouth_moving": len(found),
        "mouth_latency_arrival_median_s": pct([x[0] for x in found], 50),
        "mouth_latency_arrival_p95_s": pct([x[0] for x in found], 95),
        "mouth_latency_page_median_s": pct([x[1] for x in found], 50),
        "mouth_latency_page_p95_s": pct([x[1] for x in found], 95),
        "mouth_moves_frames_after_onset_median": pct([x[2] for x in found], 50),
        "frame_after_own_audio_median_s": pct(after_own, 50), "frame_after_own_audio_p95_s": pct(after_own, 95),
        "budget_chunk_wait_s": chunk_wait, "budget_lookahead_s": look / fps,
        "budget_compute_s": pct(compute, 50),
        "budget_rest_s": pct(after_own, 50) - chunk_wait - look / fps - pct(compute, 50),
        "page_playout_delay_start_s": start_delay, "page_playout_delay_end_s": delays[-1],
        "page_playout_delay_median_s": pct(delays, 50), "page_playout_delay_max_s": max(delays),
        "page_delay_shrinks": shrinks, "server_compute_s_per_chunk_at_load": ready.get("compute_s_per_chunk"),
        "av_offset_first_minute_mean_s": float(np.mean(first_min)), "av_offset_first_minute_max_s": max(first_min),
        "av_offset_last_minute_mean_s": float(np.mean(last_min)), "av_offset_last_minute_max_s": max(last_min),
        "late_frames": sum(1 for x in late if x > 0),
        "server_rss_mib_start": rss_start, "server_rss_mib_end": rss[-1][1],
        "server_rss_mib_max": max(r for _, r in rss),
        "server_rss_mib_every_10s": [round(r) for _, r in rss],
        "real_time": (n - 1) / span >= 0.98 * fps,
    }
    report(figures, args.json)
    return 0


@contextlib.contextmanager
def serve(args, max_audio_ahead: float):
    """`python -m rest_model serve` with the bench's --threads/--chunk/--overlap-decode on a free loopback port
    -> (the server process, the page's URL); stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "rest_model", "serve", "--port", str(port), "--threads", str(args.threads),
           "--max-audio-ahead", str(max_audio_ahead)] + (["--chunk", str(args.chunk)] if args.chunk else []) \
        + (["--overlap-decode"] if args.overlap_decode else [])
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield server, server.stdout.readline().split("open ")[1].split()[0]
    finally:
        server.terminate()
        server.wait(10)


def report(figures: dict, json_path: str | None, leave_out=()):
    """Print the figures one per line (and write them all as JSON when asked)."""
    for k, v in figures.items():
        if k not in leave_out:
            print(f"{k:40s} {v:.3f}" if isinstance(v, float) else f"{k:40s} {v}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
