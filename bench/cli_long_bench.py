"""The command line over a short and a long speech track, side by side (printed figures, not a test):

    python bench/cli_long_bench.py [--short 10] [--long 600] [--device cpu] [-- extra generate flags]

Each run is `python -m rest_model generate` in a subprocess (the bundled demo model, the bundled portrait),
its speech assets/speech.wav tiled to the length asked for. Per run: the peak resident memory of that process
(its own ru_maxrss from wait4, so one run's peak never hides another's), also sampled from /proc while it runs
to show how memory moves; frames, generation fps and wall time as the CLI reports them. The memory of a
stream does not grow with its length (the ID-Context Cache, the audio timeline and the decoder carry fixed
state, and the video is encoded as it is made), so the two peaks should be within a few percent.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import wave as wavmod
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rest_model import media  # noqa: E402
from rest_model.cli import DEMO_SPEECH  # noqa: E402


def tiled_speech(path: Path, seconds: float) -> Path:
    """assets/speech.wav repeated (and cut) to `seconds`, as 16-bit mono wav."""
    wave, sr = media.load_audio(DEMO_SPEECH)
    mono = wave.mean(0).numpy()
    n = int(round(seconds * sr))
    data = np.tile(mono, -(-n // mono.size))[:n]
    with wavmod.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes((np.clip(data, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run(audio: Path, out: Path, extra: list[str]) -> dict:
    """One generate run: its peak RSS (wait4), RSS samples over time, and the CLI's own summary."""
    cmd = [sys.executable, "-m", "rest_model", "generate", "--audio", str(audio), "--out", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples, done = [], threading.Event()

    def sample():
        while not done.wait(1.0):
            kib = rss_kib(proc.pid)
            if kib:
                samples.append((time.perf_counter() - t0, kib / 1024))
    threading.Thread(target=sample, daemon=True).start()
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"generate failed (exit {proc.returncode}): {' '.join(cmd)}")
    m = re.search(r"(\d+) frames at (\d+) fps .* generated in ([\d.]+) s \(([\d.]+) fps, first frame after ([\d.]+) s\)",
                  stdout)
    frames, fps_video, gen_s, fps, first = m.groups()
    return dict(frames=int(frames), gen_s=float(gen_s), fps=float(fps), first=float(first), wall=wall,
                peak_mib=usage.ru_maxrss / 1024, samples=samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", type=float, default=10.0, help="seconds of speech of the short run")
    ap.add_argument("--long", type=float, default=600.0, help="seconds of speech of the long run")
    ap.add_argument("extra", nargs="*", help="more generate flags after --, e.g. -- --device cuda")
    args = ap.parse_args()
    print(f"python -m rest_model generate, bundled demo model and portrait; {os.cpu_count()} CPUs visible; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in (args.short, args.long):
            audio = tiled_speech(Path(tmp) / f"speech_{seconds:g}s.wav", seconds)
            r = run(audio, Path(tmp) / f"out_{seconds:g}s.mp4", args.extra)
            rows.append((seconds, r))
            trace = ", ".join(f"{t:.0f}s {m:.0f}" for t, m in r["samples"][:: max(1, len(r["samples"]) // 8)])
            print(f"  {seconds:g} s of speech done: RSS MiB over time: {trace}", flush=True)
    print(f"\n{'speech':>8} {'frames':>7} {'gen fps':>8} {'first frame':>12} {'wall':>8} {'peak RSS':>10}")
    for seconds, r in rows:
        print(f"{seconds:>7g}s {r['frames']:>7} {r['fps']:>8.1f} {r['first']:>11.2f}s {r['wall']:>7.0f}s "
              f"{r['peak_mib']:>7.0f} MiB")
    (s, a), (l, b) = rows
    print(f"\npeak RSS {l:g} s vs {s:g} s: {b['peak_mib'] - a['peak_mib']:+.0f} MiB "
          f"({100 * (b['peak_mib'] / a['peak_mib'] - 1):+.1f}%)")


if __name__ == "__main__":
    main()
