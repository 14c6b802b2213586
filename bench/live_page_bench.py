"""Live mode through the real page (printed figures, not a test): Debian's chromium, headless, hears a spoken
program as its microphone and shows the portrait talking, against `python -m rest_model serve`.

    python bench/live_page_bench.py [--seconds 60] [--threads 2] [--chunk K] [--json out.json]

Everything is measured where a user sees it, on the page's own AudioContext clock:
- mouth-to-screen latency per speech onset: from the onset's first samples entering the page to the
  first frame that shows the mouth move (its mouth region changes by more than the preceding silence's
  mean + 4 sd) being drawn; median and 95th percentile;
- the A/V offset of every frame drawn (when it is drawn minus when its sound is heard) in the first and
  the last minute: mean, 95th percentile, largest;
- fps drawn and made, frames late (the page then raised its playout delay) and dropped (by the server),
  the playout delay over time, and the server's resident memory every 10 s.

The program is the bundled speech cut into utterances of 1-3 s, each after 1.5 s of silence
(bench/live_bench.py's `program`), at 48 kHz; chromium's fake capture device plays it in real time.
Chromium runs on the same 2 cores as the server: a user's browser on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.request

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from live_bench import MOUTH, SILENCE_S, program, report, rss_mib, serve  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 48000
LOUD, QUIET = 0.02, 1e-3  # frame loudness (RMS) of speech, and of the silence before an onset
POLL_S = 10.0

# in the page, on every frame drawn: what the page knows of it, and the change of its mouth region
HOOK = """([x0, y0, x1, y1]) => {
  window.drawn = [];
  let prev = null;
  window.restLive.onshow = (e, canvas) => {
    const c = canvas.getContext('2d'), W = canvas.width, H = canvas.height;
    const px = c.getImageData(Math.round(x0 * W), Math.round(y0 * H), Math.round((x1 - x0) * W),
                              Math.round((y1 - y0) * H)).data;
    let change = null;
    if (prev && prev.index === e.index - 1) {
      let d = 0;
      for (let i = 0; i < px.length; i += 4) d += Math.abs(px[i] - prev.px[i]) + Math.abs(px[i + 1] - prev.px[i + 1]);
      change = d / (px.length / 2);
    }
    prev = {index: e.index, px};
    window.drawn.push([e.index, e.sample, e.heard, e.entered, e.offset, e.late ? 1 : 0, e.delay, e.rms, change]);
  };
}"""


def write_wav(path: str, wave: np.ndarray, rate: int):
    with av.open(path, "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=rate, layout="mono")
        step = rate * 10
        for i in range(0, len(wave), step):
            frame = av.AudioFrame.from_ndarray((np.clip(wave[None, i:i + step], -1, 1) * 32767).astype(np.int16),
                                               format="s16", layout="mono")
            frame.sample_rate = rate
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def onsets_and_latency(drawn: np.ndarray, fps: int, look: int):
    """Speech onsets found in the page's own per-frame loudness -> (onsets, [latency s or None per onset])."""
    by_index = {int(r[0]): r for r in drawn}
    rms = {i: r[7] for i, r in by_index.items() if not np.isnan(r[7])}
    quiet_frames = int(1.0 * fps)
    onsets, latencies = [], []
    for i in sorted(rms):
        if rms[i] <= LOUD or not all(rms.get(j, 1.0) < QUIET for j in range(i - quiet_frames, i)):
            continue
        onsets.append(i)
        quiet = [by_index[j][8] for j in range(i - int(SILENCE_S * fps) + 3, i - look)
                 if j in by_index and not np.isnan(by_index[j][8])]
        if len(quiet) < 10:
            latencies.append(None)
            continue
        threshold = np.mean(quiet) + 4 * np.std(quiet)
        moved = next((j for j in range(i - look, i + fps) if j in by_index and by_index[j][8] > threshold), None)
        # from the onset frame's first sample entering the page to the moving frame being drawn
        latencies.append(None if moved is None else by_index[moved][2] - by_index[i][3])
    return onsets, latencies


def offsets(drawn: np.ndarray, lo: float, hi: float) -> dict:
    sel = drawn[(drawn[:, 2] >= lo) & (drawn[:, 2] < hi)]
    o = sel[:, 4]
    return {"frames": int(len(o)), "mean_ms": round(1000 * float(np.mean(o)), 1),
            "p95_abs_ms": round(1000 * float(np.percentile(np.abs(o), 95)), 1),
            "max_abs_ms": round(1000 * float(np.max(np.abs(o))), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="session length (real time)")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--chunk", type=int, help="latent frames per chunk (default: the model's)")
    ap.add_argument("--overlap-decode", action="store_true", help="the server decodes on a second thread")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--screenshot", help="save a screenshot of the page at the end of the session")
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Debian's chromium is needed (scripts/setup_env.sh installs it)")
    from playwright.sync_api import sync_playwright

    tmp = tempfile.mkdtemp(prefix="rest_live_page_bench_")
    wav = os.path.join(tmp, "program.wav")
    wave, _ = program(args.seconds + 20, RATE)  # longer than the session: the fake device loops its file
    write_wav(wav, wave.numpy(), RATE)
    flags = ["--disable-gpu", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"]
    drawn, polls = [], []
    try:
        with serve(args, max_audio_ahead=30) as (server, url), sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=flags)
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 760})
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url)
                page.evaluate(HOOK, list(MOUTH))
                rss_start = rss_mib(server.pid)
                page.click("#start")
                page.wait_for_function("window.restLive.state === 'running'", timeout=60000)
                with urllib.request.urlopen(url + "info") as r:  # the model's fps and look-ahead
                    info = json.load(r)
                t0 = time.monotonic()
                while time.monotonic() - t0 < args.seconds:
                    time.sleep(min(POLL_S, args.seconds - (time.monotonic() - t0)))
                    state, fig = page.evaluate("[window.restLive.state, window.restLive.figures]")
                    drawn += page.evaluate("window.drawn.splice(0)")
                    polls.append({"t": round(time.monotonic() - t0, 1), "rss_mib": round(rss_mib(server.pid)),
                                  "delay_s": round(fig.get("delay") or 0, 3), "late": fig.get("late"),
                                  "dropped": fig.get("dropped"), "fps_drawn": fig.get("fpsShown"),
                                  "fps_made": fig.get("fpsMade")})
                    print(f"[{polls[-1]['t']:6.1f} s] {polls[-1]}", flush=True)
                    if state != "running":
                        raise SystemExit(f"the page stopped: {state} {page.evaluate('window.restLive.error')}")
                if args.screenshot:
                    page.screenshot(path=args.screenshot)
                page.click("#stop")
                page.wait_for_function("['ended', 'error'].includes(window.restLive.state)", timeout=60000)
                drawn += page.evaluate("window.drawn.splice(0)")
                end = page.evaluate("[window.restLive.state, window.restLive.figures]")
                if errors:
                    raise SystemExit(f"page errors: {errors}")
            finally:
                browser.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d = np.array([[np.nan if v is None else v for v in r] for r in drawn], dtype=np.float64)
    fps, look = info["fps"], info["lookahead_video_frames"]
    onsets, lat = onsets_and_latency(d, fps, look)
    found = [x for x in lat if x is not None]
    span = d[-1, 2] - d[0, 2]
    minute = min(60.0, span / 2)
    fig = end[1]
    figures = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.1f} at the end (server + chromium on the same cores)",
        "seconds": args.seconds, "torch_threads": args.threads, "overlap_decode": args.overlap_decode, "page_state": end[0],
        "frames_drawn": int(len(d)), "frames_received": fig["received"], "frames_dropped_by_server": fig["dropped"],
        "frames_late": fig["late"], "fps_drawn": round((len(d) - 1) / span, 2),
        "indices_in_order_without_gaps": bool(np.all(np.diff(d[:, 0]) == 1)),
        "onsets": len(onsets), "onsets_with_mouth_moving": len(found),
        "mouth_to_screen_median_s": round(float(np.median(found)), 3) if found else None,
        "mouth_to_screen_p95_s": round(float(np.percentile(found, 95)), 3) if found else None,
        "playout_delay_start_s": round(float(d[0, 6]), 3), "playout_delay_end_s": round(float(d[-1, 6]), 3),
        "playout_delay_median_s": round(float(np.median(d[:, 6])), 3), "delay_shrinks": fig.get("shrinks"),
        "av_offset_first_minute": offsets(d, d[0, 2], d[0, 2] + minute),
        "av_offset_last_minute": offsets(d, d[-1, 2] - minute, d[-1, 2] + 1),
        "server_rss_mib_start": round(rss_start), "server_rss_mib_every_10s": [q["rss_mib"] for q in polls],
        "polls": polls,
    }
    report(figures, args.json, leave_out=("polls",))
    return 0


if __name__ == "__main__":
    sys.exit(main())
