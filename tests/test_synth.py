"""Procedural talking faces: files and ground truth, distinct identities, a mouth that follows the
audio, natural motion; the dependency-free babble voice (espeak-ng only where installed)."""
import json
import shutil

import numpy as np
import pytest

from rest_model import media

from rest_model.eval import metrics

from rest_model.data import synth
from rest_model.__main__ import main

FPS, SR = synth.FPS, synth.SAMPLE_RATE


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    rc = main(["synth", "--out", str(out), "--n", "3", "--seconds", "1.2", "--size", "64", "--identities", "2",
               "--speech", "babble", "--jobs", "1"])
    assert rc == 0
    return out


def test_cli_writes_clips_with_ground_truth(synth_dir):
    mp4s = sorted(synth_dir.glob("*.mp4"))
    assert len(mp4s) == 3 and not list(synth_dir.glob("*.tmp*"))
    for mp4 in mp4s:
        info = media.probe(mp4)
        assert (info["frames"], info["fps"], info["width"], info["height"]) == (30, 25, 64, 64)
        assert info["has_audio"]
        gt = json.loads(mp4.with_suffix(".json").read_text())
        assert gt["generator"] == "rest_model.synth" and gt["fps"] == 25 and gt["frames"] == 30
        for key in ("mouth_open", "mouth_width", "blink"):
            assert len(gt[key]) == 30 and all(0 <= v <= 1 for v in gt[key])
        assert np.asarray(gt["head_pose"]).shape == (30, 3)
        assert gt["voice"].startswith("babble:")
    ids = {m.stem.rsplit("_c", 1)[1]: json.loads(m.with_suffix(".json").read_text())["identity"] for m in mp4s}
    assert ids["00000"] == ids["00002"] != ids["00001"]  # clip k has identity k % identities


def test_audio_track_is_aligned_with_the_ground_truth(synth_dir):
    """The mp4's speech must start with frame 0: AAC priming must not delay it (lip-sync in the data)."""
    mp4 = sorted(synth_dir.glob("*.mp4"))[0]
    gt = json.loads(mp4.with_suffix(".json").read_text())
    wave, sr = media.load_audio(mp4)
    assert sr == SR
    heard, _ = metrics.audio_mouth_shape(wave.numpy(), sr, FPS, gt["frames"])
    r = metrics.sync_score(heard, np.asarray(gt["mouth_open"]), max_offset=5)
    assert r.offset == 0 and r.score > 0.95, r.as_dict()


def test_deterministic(tmp_path):
    a = synth.synthesize(str(tmp_path / "a"), 1, 0.6, 48, seed=3, speech="babble", jobs=1)
    b = synth.synthesize(str(tmp_path / "b"), 1, 0.6, 48, seed=3, speech="babble", jobs=1)
    assert a == b
    ja, jb = ((tmp_path / d / f"{a[0]}.json").read_text() for d in "ab")
    assert ja == jb


def test_identities_are_distinct():
    frames, params = [], []
    for i in range(8):
        ident = synth.make_identity(0, i, "babble")
        mot = synth.make_motion(np.random.default_rng(i), 1, FPS, ident, np.zeros(1, np.float32))
        frames.append(synth.render_frame(ident, synth.background(ident, 64 * synth.SS), 64, mot, 0, 0.0, 0.5)
                      .astype(np.float32))
        params.append((ident.skin, ident.hair_style, ident.bg_kind, ident.voice["f0"]))
    assert len(set(params)) == 8
    diffs = [np.abs(frames[i] - frames[j]).mean() for i in range(8) for j in range(i + 1, 8)]
    assert min(diffs) > 10  # mean absolute pixel difference between any two faces
    # a face is centred: skin-coloured pixels around the middle, the mouth region inside the face
    ident = synth.make_identity(0, 0, "babble")
    assert abs(ident.centre[0] - 0.5) < 0.05


def test_mouth_follows_audio_and_head_moves():
    ident = synth.make_identity(1, 0, "babble")
    rng = np.random.default_rng(0)
    audio, text, _ = synth.clip_speech(rng, ident, 4.0)
    assert audio.shape == (4 * SR,) and text == ""
    mo, mw = metrics.audio_mouth_shape(audio, SR, FPS, 100)
    mot = synth.make_motion(rng, 100, FPS, ident, mo)
    bg = synth.background(ident, 96 * synth.SS)
    frames = np.stack([synth.render_frame(ident, bg, 96, mot, i, float(mo[i]), float(mw[i])) for i in range(100)])
    est = metrics.mouth_openness(frames)
    assert np.corrcoef(est, mo)[0, 1] > 0.8
    shut, wide = np.argmin(mo), np.argmax(mo)
    assert est[wide] > est[shut] + 0.01
    # the lead-in before the speech is silent, so the mouth is shut there
    assert mo[0] < 0.05 and mo.max() > 0.4
    # natural head motion: moves, within talking-head bounds
    yaw, pitch, roll = mot.yaw, mot.pitch, mot.roll
    assert 1 < np.ptp(yaw) < 60 and np.abs(pitch).max() < 30 and np.abs(roll).max() < 20
    assert np.abs(np.diff(yaw)).max() < 3  # degrees per frame: smooth


def test_blinks():
    b = synth.blinks(np.random.default_rng(0), 25 * 30, FPS, rate=0.3)
    onsets = np.flatnonzero((b[1:] > 0.5) & (b[:-1] <= 0.5))
    assert 4 <= len(onsets) <= 20  # ~9 in 30 s
    assert b.max() == pytest.approx(1.0, abs=0.35) and (b > 0.5).mean() < 0.1


def test_babble_is_speech_like():
    rng = np.random.default_rng(1)
    y = synth.babble(rng, 6.0, synth.BabbleVoice(200, 1.17, 4.5, 0.3, 0.8))
    assert y.shape == (6 * SR,) and np.isfinite(y).all() and 0.3 < np.abs(y).max() <= 1
    frame = y[: 6 * SR // 400 * 400].reshape(-1, 400)  # 25 ms frames
    db = 10 * np.log10((frame ** 2).mean(1) + 1e-10)
    loud = db > db.max() - 20
    assert 0.3 < loud.mean() < 0.95  # syllables with gaps and pauses, not a drone
    rises = np.flatnonzero(loud[1:] & ~loud[:-1])
    assert 6 <= len(rises) <= 60  # syllable/word rhythm
    # pitch near the voice's f0: the spectrum's strongest low peak
    spec = np.abs(np.fft.rfft(y[SR:3 * SR]))
    f = np.fft.rfftfreq(2 * SR, 1 / SR)
    band = (f > 80) & (f < 400)
    assert 150 < f[band][np.argmax(spec[band])] < 400


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_espeak_voice():
    ident = synth.make_identity(0, 5, "espeak")
    audio, text, params = synth.clip_speech(np.random.default_rng(0), ident, 3.0)
    assert text and audio.shape == (3 * SR,) and "pitch" in params
    assert (np.abs(audio) > 0.05).mean() > 0.1
    assert ident.voice_name.startswith("espeak:")


def test_bad_arguments(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path), "--n", "1", "--size", "20"]) == 2
    assert "--size" in capsys.readouterr().err
