"""The live page in a real browser: Debian's chromium, headless, with the bundled speech as its microphone.

The page is served by `python -m rest_model serve` (the bundled demo model) on 127.0.0.1, a secure
origin, so getUserMedia works without a certificate; chromium's fake capture device plays a wav
(speech, then silence, looped) into it. Set REST_LIVE_SCREENSHOT=path to save a screenshot of the page.
"""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from rest_model import media
from rest_model.cli import DEMO_DIT, DEMO_SPEECH, DEMO_VAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium")
SPEECH_S, SILENCE_S = 3.0, 2.5
LOUD, QUIET, ENOUGH = 0.02, 1e-4, 30  # frame loudness (RMS) of speech and of silence; frames of each
# the mouth of the bundled portrait in the demo model's frames (fractions of the frame)
MOUTH = (0.31, 0.56, 0.69, 0.75)  # x0, y0, x1, y1

pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/setup_env.sh installs it)")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup_env.sh "
                                                "installs it with apt-get where apt is available)"),
    pytest.mark.skipif(not (DEMO_VAE.is_file() and DEMO_DIT.is_file()), reason="the bundled demo model is missing"),
]

# runs in the page on every frame it shows: the mean change of the mouth region since the previous frame
HOOK = """([x0, y0, x1, y1]) => {
  window.mouth = [];
  let prev = null;
  window.restLive.onshow = (entry, canvas) => {
    const c = canvas.getContext('2d'), W = canvas.width, H = canvas.height;
    const px = c.getImageData(Math.round(x0 * W), Math.round(y0 * H), Math.round((x1 - x0) * W),
                              Math.round((y1 - y0) * H)).data;
    if (prev && prev.index === entry.index - 1) {
      let d = 0;
      for (let i = 0; i < px.length; i += 4) d += Math.abs(px[i] - prev.px[i]) + Math.abs(px[i + 1] - prev.px[i + 1]);
      window.mouth.push({index: entry.index, change: d / (px.length / 2), rms: entry.rms, offset: entry.offset,
                         late: entry.late});
    }
    prev = {index: entry.index, px};
  };
}"""


def _speech_then_silence(path):
    wave, sr = media.load_audio(DEMO_SPEECH)
    wave = wave.mean(0)[: int(SPEECH_S * sr)]
    wave = torch.cat([wave, torch.zeros(int(SILENCE_S * sr))])
    import av
    import numpy as np
    with av.open(str(path), "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=sr, layout="mono")
        frame = av.AudioFrame.from_ndarray((wave.clamp(-1, 1) * 32767).short().numpy()[None].astype(np.int16),
                                           format="s16", layout="mono")
        frame.sample_rate = sr
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)


@pytest.fixture
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rest_model", "serve", "--port", str(port), "--threads", "2",
                             "--max-audio-ahead", "60"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "http://127.0.0.1" in line, line + proc.stderr.read()
    try:
        yield line.split("open ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_page_shows_the_portrait_talking_in_sync_in_chromium(server, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright
    wav = tmp_path / "speech_then_silence.wav"
    _speech_then_silence(wav)
    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server)
            page.evaluate(HOOK, list(MOUTH))
            page.click("#start")
            page.wait_for_function("window.restLive.state === 'running'", timeout=20000)
            # until the page has shown enough frames of speech and of silence (seconds alone on 2 cores)
            try:
                page.wait_for_function(f"""(() => {{ const m = window.mouth || [];
                    return window.restLive.state !== 'running' || (m.filter(e => e.rms > {LOUD}).length >= {ENOUGH}
                        && m.filter(e => e.rms !== null && e.rms < {QUIET}).length >= {ENOUGH}); }})()""",
                                       timeout=120000, polling=500)
            finally:
                state = page.evaluate("[window.restLive.state, window.restLive.error, window.restLive.figures]")
            assert state[0] == "running", state
            figures = page.evaluate("window.restLive.figures")
            mouth = page.evaluate("window.mouth")
            shot = os.environ.get("REST_LIVE_SCREENSHOT")
            if shot:
                page.screenshot(path=shot)
            # a hiccup raised the playout delay by a second: in the next pause of the voice it comes back down
            # (when the server keeps real time; a slower one needs the delay)
            shrinks, raised = page.evaluate("[S.shrinks, S.delay += 1.0]")
            try:
                after_shrink = page.wait_for_function(f"S.shrinks > {shrinks} && [S.delay, window.mouth.length]",
                                                      timeout=20000, polling=50).json_value()
                page.wait_for_function(f"window.mouth.length >= {after_shrink[1] + 25}", timeout=30000, polling=200)
                mouth_after = page.evaluate(f"window.mouth.slice({after_shrink[1]})")
            except PlaywrightTimeout:
                after_shrink = mouth_after = None
            figures = page.evaluate("window.restLive.figures")
            page.click("#stop")
            page.wait_for_function("['ended', 'error'].includes(window.restLive.state)", timeout=60000)
            assert page.evaluate("window.restLive.state") == "ended", page.evaluate("window.restLive.error")
            assert not errors, errors
        finally:
            browser.close()
    assert figures["shown"] >= 2 * ENOUGH and figures["received"] >= figures["shown"], figures
    speaking = [m["change"] for m in mouth if m["rms"] is not None and m["rms"] > LOUD]
    silent = [m["change"] for m in mouth if m["rms"] is not None and m["rms"] < QUIET]
    speak, quiet = sum(speaking) / len(speaking), sum(silent) / len(silent)
    assert speak > 1.5 * quiet, f"mouth change {speak:.2f} while speaking, {quiet:.2f} in silence"
    assert quiet > 0, "the portrait froze in silence"
    # the sync: frames that came in time are shown within one frame (40 ms) of their sound; a display loop
    # starved of CPU (this test shares its machine) may miss a refresh, so the bound holds for 95 % of them
    on_time = sorted(abs(m["offset"]) for m in mouth if not m["late"])
    assert len(on_time) > 20, len(on_time)
    p95 = on_time[int(0.95 * len(on_time))]
    assert p95 <= 0.040 and sum(on_time) / len(on_time) <= 0.020, (p95, on_time[-5:])
    # the page starts with the smallest delay the server's measured compute allows, so a few of the first
    # frames may come late (the page then adds delay); once settled, frames come late only when the server
    # is slower than real time (a machine shared with other work)
    if figures["fpsMade"] is not None and figures["fpsMade"] >= 24.5:
        assert sum(m["late"] for m in mouth[2 * ENOUGH:]) <= 2 and figures["dropped"] == 0, figures
    # the raised delay came back down in a pause, and frames stay in sync after it (the played sound skipped a
    # few ms of silence to follow)
    if after_shrink is not None:
        assert after_shrink[0] < raised - 0.02, (raised, after_shrink)
        on_time_after = sorted(abs(m["offset"]) for m in mouth_after if not m["late"])
        assert len(on_time_after) >= 10 and on_time_after[len(on_time_after) // 2] <= 0.020, on_time_after
    # a second of extra delay outlasts the next pause unless the server falls far behind real time
    if figures["fpsMade"] is not None and figures["fpsMade"] >= 20:
        assert after_shrink is not None, f"the delay raised to {raised:.2f} s never came down: {figures}"
    if figures["fpsMade"] is not None and figures["fpsMade"] >= 24.5:
        assert after_shrink[0] < raised - 0.5, (raised, after_shrink)  # back to about what the frames needed
    print(f"browser: {figures}; delay raised to {raised:.2f} s -> {after_shrink and round(after_shrink[0], 2)} s")
